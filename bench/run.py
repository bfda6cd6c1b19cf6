#!/usr/bin/env python
"""bpfast benchmark suite: one training step of a dense network, bpfast against PyTorch
eager, JAX (jit), scikit-learn and plain NumPy, all measured in one run on one machine.

    python bench/run.py [--quick] [--threads N] [--shapes S,M,L,XL] [--out bench/results]

See bench/README.md for what is measured and how. Every competitor is optional: one
that is not installed is reported as "skipped"; if bpfast itself does not import, the
others still run (the speed-up and target columns are then empty).
"""
import argparse
import contextlib
import datetime
import importlib
import io
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)

# ---------------------------------------------------------------------------------------
# What is measured
# ---------------------------------------------------------------------------------------

SHAPES = {  # layer widths (input, hidden..., classes) and batch size
    "S": {"widths": [64, 32, 10], "batch": 32},
    "M": {"widths": [784, 128, 10], "batch": 64},
    "L": {"widths": [784, 512, 512, 10], "batch": 128},
    "XL": {"widths": [1024, 2048, 2048, 1024], "batch": 256},
}
OPTIMIZERS = {"sgd": "SGD(lr=0.01, momentum=0.9)", "adam": "Adam(lr=1e-3)"}

# Targets: bpfast's speed-up (competitor time / bpfast time) must be at least this.
SPEEDUP_TARGETS = {
    ("S", "jax"): 5.0, ("S", "torch"): 25.0,
    ("M", "jax"): 1.3, ("M", "torch"): 2.0,
    ("L", "jax"): 1.05, ("L", "torch"): 1.4,
    ("XL", "jax"): 1.0,
}
PEAK_TARGETS = {"L": 80.0, "XL": 80.0}     # bpfast train_step, percent of GEMM peak
FIT_TARGETS = {"M": 1.2}                   # bpfast fit per batch / train_step at most this
PREDICT_TARGETS = {1: 10.0, 1024: 1.3}     # predict on M, speed-up over torch eager

IMPL_LABELS = {
    "bpfast": "bpfast train_step",
    "bpfast_fit": "bpfast fit (per batch)",
    "torch": "torch eager",
    "jax": "jax.jit",
    "sklearn": "sklearn MLP (per batch)",
    "numpy": "numpy",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short run (about a minute)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for every library (default: all cores available)")
    p.add_argument("--shapes", default="S,M,L,XL", help="comma-separated subset of S,M,L,XL")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="results folder")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one library
    p.add_argument("--peak", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-optimizer", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-predict", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--skip", default="",
                   help="comma-separated implementations to leave out "
                        "(torch,jax,sklearn,numpy,bpfast,memory,import)")
    args = p.parse_args(argv)
    args.shapes = [s.strip().upper() for s in args.shapes.split(",") if s.strip()]
    bad = [s for s in args.shapes if s not in SHAPES]
    if bad:
        p.error(f"unknown shape(s) {bad}; choose from {list(SHAPES)}")
    args.skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    return args


def available_cpus():
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def configure_threads(n):
    """Pin the thread count for every library. Must run before numpy, torch or jax load:
    the environment variables and the CPU affinity are read when their pools start."""
    cpus = available_cpus()
    if n < len(cpus) and hasattr(os, "sched_setaffinity"):
        # The one knob every pool respects (XLA's CPU client sizes its pool from this).
        os.sched_setaffinity(0, cpus[:n])
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
                "BLIS_NUM_THREADS", "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
        os.environ[var] = str(n)
    if n == 1:  # XLA's own single-thread switch (the affinity above is what limits n > 1)
        xla = os.environ.get("XLA_FLAGS", "")
        xla += " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
        os.environ["XLA_FLAGS"] = xla.strip()


ARGS = parse_args() if __name__ == "__main__" else parse_args([])
if ARGS.threads is None:
    ARGS.threads = len(available_cpus())
configure_threads(ARGS.threads)

import numpy as np  # noqa: E402  (after configure_threads, on purpose)

sys.path.insert(0, HERE)
from numpy_mlp import NumpyMLP, init_params  # noqa: E402

# ---------------------------------------------------------------------------------------
# Loading the libraries (each optional)
# ---------------------------------------------------------------------------------------

LIBS = {}          # name -> module, for the ones that imported
LIB_STATUS = {}    # name -> "version ..." or "skipped: why"
_THREAD_LIMITS = None


def import_bpfast():
    """Import bpfast; if it is not installed, try the repository's src/ (built in place)."""
    try:
        import bpfast
        return bpfast
    except Exception as first:
        src = os.path.join(REPO, "src")
        if not os.path.isdir(os.path.join(src, "bpfast")) or src in sys.path:
            raise first
        for name in [m for m in sys.modules if m == "bpfast" or m.startswith("bpfast.")]:
            del sys.modules[name]
        sys.path.insert(0, src)
        import bpfast
        # subprocesses (memory, import time) must find the same copy
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (src, os.environ.get("PYTHONPATH")) if p)
        return bpfast


def load_libraries(skip):
    global _THREAD_LIMITS
    n = ARGS.threads
    importers = {  # name -> what to import (the module recorded is the top-level one)
        "bpfast": import_bpfast,
        "torch": lambda: importlib.import_module("torch"),
        "jax": lambda: importlib.import_module("jax"),
        "sklearn": lambda: importlib.import_module("sklearn.neural_network") and
        sys.modules["sklearn"],
        "scipy": lambda: importlib.import_module("scipy.linalg.blas") and sys.modules["scipy"],
    }
    for name, importer in importers.items():
        if name in skip:
            LIB_STATUS[name] = "skipped: --skip"
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                LIBS[name] = importer()
            LIB_STATUS[name] = getattr(LIBS[name], "__version__", "?")
        except ImportError as e:
            LIB_STATUS[name] = f"skipped: not installed ({e})"
        except Exception as e:  # a broken install: report, never stop the run
            LIB_STATUS[name] = f"skipped: import failed ({type(e).__name__}: {e})"
    LIBS["numpy"] = np
    LIB_STATUS["numpy"] = np.__version__
    if "numpy" in skip:
        LIB_STATUS["numpy"] = "skipped: --skip"
    # Thread counts, now that every pool has been loaded.
    try:
        import threadpoolctl
        _THREAD_LIMITS = threadpoolctl.threadpool_limits(limits=n)
        LIB_STATUS["threadpoolctl"] = threadpoolctl.__version__
    except ImportError:
        LIB_STATUS["threadpoolctl"] = "skipped: not installed (BLAS threads set by env only)"
    if "torch" in LIBS:
        LIBS["torch"].set_num_threads(n)
    if "bpfast" in LIBS and hasattr(LIBS["bpfast"], "set_num_threads"):
        LIBS["bpfast"].set_num_threads(n)


def has(name):
    return name in LIBS and name not in ARGS.skip


def bpfast_config():
    bp = LIBS.get("bpfast")
    if bp is None or not hasattr(bp, "show_config"):
        return None
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        ret = bp.show_config()
    text = buf.getvalue()
    if ret is not None and not text:
        text = ret if isinstance(ret, str) else json.dumps(ret, indent=1, default=str)
    return text.strip()


def thread_pools():
    try:
        import threadpoolctl
        return [{k: d.get(k) for k in ("user_api", "internal_api", "prefix", "version",
                                        "num_threads", "filepath")}
                for d in threadpoolctl.threadpool_info()]
    except ImportError:
        return []


# ---------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------

if ARGS.quick:
    TIMING = {"warmup_s": 0.02, "min_warmup_calls": 2, "sample_s": 0.001, "budget_s": 0.05,
              "min_samples": 3, "max_samples": 10, "rounds": 1}
else:
    TIMING = {"warmup_s": 0.1, "min_warmup_calls": 3, "sample_s": 0.002, "budget_s": 0.25,
              "min_samples": 5, "max_samples": 25, "rounds": 3}
XL_ROUNDS = 1
N_BATCHES = {"S": 32, "M": 32, "L": 32, "XL": 4 if ARGS.quick else 8}  # data set for fit


def measure(fn, min_samples=None):
    """Warm up, then time fn in samples of `inner` back-to-back calls (each sample lasts
    about TIMING['sample_s'] so the clock's resolution does not matter); return the
    per-call times in seconds, one per sample."""
    t = TIMING
    calls, start = 0, time.perf_counter()
    last = 0.0
    while calls < t["min_warmup_calls"] or time.perf_counter() - start < t["warmup_s"]:
        t0 = time.perf_counter()
        fn()
        last = time.perf_counter() - t0
        calls += 1
    inner = max(1, int(t["sample_s"] / max(last, 1e-9)))
    min_samples = min_samples or t["min_samples"]
    samples, start = [], time.perf_counter()
    while len(samples) < min_samples or (
            len(samples) < t["max_samples"] and time.perf_counter() - start < t["budget_s"]):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    return samples


# ---------------------------------------------------------------------------------------
# Data and initial weights (the same for every implementation)
# ---------------------------------------------------------------------------------------

class Problem:
    """One shape: a data set of n_batches batches, the batches as separate C-contiguous
    arrays (training steps cycle through them, as training does), and the initial weights
    every implementation starts from (PyTorch's default init, drawn once with NumPy)."""

    def __init__(self, shape, n_batches):
        spec = SHAPES[shape]
        self.shape, self.widths, self.batch = shape, spec["widths"], spec["batch"]
        self.n_batches = n_batches
        rng = np.random.default_rng(1)
        n = n_batches * self.batch
        self.X = rng.standard_normal((n, self.widths[0])).astype(np.float32)
        self.y = rng.integers(0, self.widths[-1], n).astype(np.int64)
        self.batches = [(self.X[i * self.batch:(i + 1) * self.batch],
                         self.y[i * self.batch:(i + 1) * self.batch])
                        for i in range(n_batches)]
        self.weights, self.biases = init_params(self.widths, seed=0)
        for a in self.weights + self.biases:
            a.flags.writeable = False  # every implementation copies them

    def flops_per_step(self):
        macs = sum(i * o for i, o in zip(self.widths[:-1], self.widths[1:]))
        return 6 * self.batch * macs  # forward 2, backward 4 (dW and da) per MAC


def cycle(batches):
    """Endless iterator over the batches; the same tiny cost for every implementation."""
    return itertools.cycle(batches)


# ---------------------------------------------------------------------------------------
# bpfast
# ---------------------------------------------------------------------------------------

def bpfast_network(p):
    bp = LIBS["bpfast"]
    w = p.widths
    layers = [bp.Dense(i, o, activation="relu") for i, o in zip(w[:-2], w[1:-1])]
    layers.append(bp.Dense(w[-2], w[-1]))
    net = bp.Network(layers, dtype="float32", seed=0)
    for layer, W, b in zip(net.layers, p.weights, p.biases):
        layer.weight[...] = W
        layer.bias[...] = b
    return net


def bpfast_optimizer(opt):
    bp = LIBS["bpfast"]
    return bp.SGD(lr=0.01, momentum=0.9) if opt == "sgd" else bp.Adam(lr=1e-3)


def bpfast_train_step(p, opt):
    bp = LIBS["bpfast"]
    net, loss, optimizer = bpfast_network(p), bp.CrossEntropy(), bpfast_optimizer(opt)
    batches = cycle(p.batches)

    def step():
        X, y = next(batches)
        return net.train_step(X, y, loss, optimizer)
    return step, 1


def bpfast_fit(p, opt):
    bp = LIBS["bpfast"]
    net, loss, optimizer = bpfast_network(p), bp.CrossEntropy(), bpfast_optimizer(opt)

    def epoch():
        return net.fit(p.X, p.y, loss=loss, optimizer=optimizer, epochs=1,
                       batch_size=p.batch, shuffle=True)
    return epoch, p.n_batches


def bpfast_predict(p, n):
    net = bpfast_network(p)
    X = np.ascontiguousarray(p.X[:n])
    return lambda: net.predict(X)


# ---------------------------------------------------------------------------------------
# PyTorch eager
# ---------------------------------------------------------------------------------------

def torch_model(p):
    torch = LIBS["torch"]
    mods = []
    for i, (W, b) in enumerate(zip(p.weights, p.biases)):
        lin = torch.nn.Linear(W.shape[1], W.shape[0])
        with torch.no_grad():
            lin.weight.copy_(torch.from_numpy(W.copy()))
            lin.bias.copy_(torch.from_numpy(b.copy()))
        mods.append(lin)
        if i < len(p.weights) - 1:
            mods.append(torch.nn.ReLU())
    return torch.nn.Sequential(*mods)


def torch_train_step(p, opt):
    torch = LIBS["torch"]
    model = torch_model(p)
    loss_fn = torch.nn.CrossEntropyLoss()
    if opt == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    else:
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    batches = cycle([(torch.from_numpy(X), torch.from_numpy(y)) for X, y in p.batches])

    def step():
        X, y = next(batches)
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(X), y)
        loss.backward()
        optimizer.step()
        return loss
    return step, 1


def torch_predict(p, n):
    torch = LIBS["torch"]
    model = torch_model(p)
    X = torch.from_numpy(np.ascontiguousarray(p.X[:n]))

    def predict():
        with torch.no_grad():
            return model(X)
    return predict


# ---------------------------------------------------------------------------------------
# JAX: the whole step under jax.jit, parameters and optimizer state donated
# ---------------------------------------------------------------------------------------

def jax_params(p):
    import jax.numpy as jnp
    return [(jnp.array(W, copy=True), jnp.array(b, copy=True))
            for W, b in zip(p.weights, p.biases)]


def jax_forward(params, X):
    import jax
    a = X
    for i, (W, b) in enumerate(params):
        a = a @ W.T + b
        if i < len(params) - 1:
            a = jax.nn.relu(a)
    return a


def jax_train_step(p, opt):
    import jax
    import jax.numpy as jnp

    def loss_fn(params, X, y):
        logp = jax.nn.log_softmax(jax_forward(params, X))
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    params = jax_params(p)
    if opt == "sgd":
        state = jax.tree.map(jnp.zeros_like, params)

        def update(params, buf, grads, lr=0.01, momentum=0.9):  # torch.optim.SGD
            buf = jax.tree.map(lambda b, g: momentum * b + g, buf, grads)
            params = jax.tree.map(lambda w, b: w - lr * b, params, buf)
            return params, buf
    else:
        state = (jax.tree.map(jnp.zeros_like, params), jax.tree.map(jnp.zeros_like, params),
                 jnp.zeros((), jnp.float32))

        def update(params, state, grads, lr=1e-3, b1=0.9, b2=0.999, eps=1e-8):  # torch Adam
            m, v, t = state
            t = t + 1
            m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, m, grads)
            v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, v, grads)
            step_size = lr / (1 - b1 ** t)
            bias2_sqrt = jnp.sqrt(1 - b2 ** t)
            params = jax.tree.map(
                lambda w, m, v: w - step_size * m / (jnp.sqrt(v) / bias2_sqrt + eps),
                params, m, v)
            return params, (m, v, t)

    def train_step(params, state, X, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, X, y)
        params, state = update(params, state, grads)
        return params, state, loss

    jitted = jax.jit(train_step, donate_argnums=(0, 1))
    batches = cycle([(jnp.asarray(X), jnp.asarray(y.astype(np.int32))) for X, y in p.batches])
    box = [params, state]

    def step():
        X, y = next(batches)
        box[0], box[1], loss = jitted(box[0], box[1], X, y)
        return loss.block_until_ready()
    return step, 1


def jax_predict(p, n):
    import jax
    import jax.numpy as jnp
    params = jax_params(p)
    X = jnp.asarray(p.X[:n])
    forward = jax.jit(jax_forward)
    return lambda: forward(params, X).block_until_ready()


# ---------------------------------------------------------------------------------------
# scikit-learn MLPClassifier: one partial_fit call is one epoch over the data set
# ---------------------------------------------------------------------------------------

def sklearn_partial_fit(p, opt):
    from sklearn.neural_network import MLPClassifier
    common = {"hidden_layer_sizes": tuple(p.widths[1:-1]), "activation": "relu",
              "alpha": 0.0, "batch_size": p.batch, "shuffle": True, "random_state": 0}
    if opt == "sgd":
        clf = MLPClassifier(solver="sgd", learning_rate_init=0.01, momentum=0.9,
                            nesterovs_momentum=False, **common)
    else:
        clf = MLPClassifier(solver="adam", learning_rate_init=1e-3, **common)
    classes = np.arange(p.widths[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.partial_fit(p.X, p.y, classes=classes)  # first call allocates and initializes

    def epoch():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clf.partial_fit(p.X, p.y)
        return clf.loss_
    return epoch, p.n_batches


# ---------------------------------------------------------------------------------------
# Plain NumPy (bench/numpy_mlp.py)
# ---------------------------------------------------------------------------------------

def numpy_train_step(p, opt):
    if opt == "sgd":
        model = NumpyMLP(p.weights, p.biases, "sgd", lr=0.01, momentum=0.9)
    else:
        model = NumpyMLP(p.weights, p.biases, "adam", lr=1e-3)
    batches = cycle(p.batches)

    def step():
        X, y = next(batches)
        return model.train_step(X, y)
    return step, 1


def numpy_predict(p, n):
    model = NumpyMLP(p.weights, p.biases)
    X = np.ascontiguousarray(p.X[:n])
    return lambda: model.forward(X)


TRAIN_FACTORIES = {  # row name -> (library needed, factory)
    "bpfast": ("bpfast", bpfast_train_step),
    "bpfast_fit": ("bpfast", bpfast_fit),
    "torch": ("torch", torch_train_step),
    "jax": ("jax", jax_train_step),
    "sklearn": ("sklearn", sklearn_partial_fit),
    "numpy": ("numpy", numpy_train_step),
}
PREDICT_FACTORIES = {
    "bpfast": ("bpfast", bpfast_predict),
    "torch": ("torch", torch_predict),
    "jax": ("jax", jax_predict),
    "numpy": ("numpy", numpy_predict),
}


def short_error(e):
    msg = f"{type(e).__name__}: {e}".replace("\n", " ")
    return msg if len(msg) < 160 else msg[:157] + "..."


# ---------------------------------------------------------------------------------------
# The measurements
# ---------------------------------------------------------------------------------------

def gemm_peak(n=2048):
    """float32 n x n @ n x n through NumPy's and SciPy's BLAS (SciPy's is the one bpfast
    calls, through scipy.linalg.cython_blas); torch's and jax's for information."""
    flops = 2.0 * n ** 3
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), np.float32)
    reps = 3 if ARGS.quick else 7
    candidates = {"numpy": lambda: np.matmul(a, b, out=out)}
    if has("scipy"):
        sgemm = LIBS["scipy"].linalg.blas.sgemm
        af, bf = np.asfortranarray(a), np.asfortranarray(b)
        candidates["scipy"] = lambda: sgemm(1.0, af, bf)
    if has("torch"):
        torch = LIBS["torch"]
        ta, tb, tout = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(out)
        candidates["torch"] = lambda: torch.mm(ta, tb, out=tout)
    if has("jax"):
        import jax
        ja, jb = jax.numpy.asarray(a), jax.numpy.asarray(b)
        mm = jax.jit(lambda x, y: x @ y)
        candidates["jax"] = lambda: mm(ja, jb).block_until_ready()
    result = {}
    for name, fn in candidates.items():
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        result[name] = {"gflops": flops / statistics.median(times) / 1e9,
                        "best_gflops": flops / min(times) / 1e9}
    peak = max(result[k]["gflops"] for k in ("numpy", "scipy") if k in result)
    return peak, result


# Each library is timed in a fresh process of its own. In one process, the idle pools
# of the others (PyTorch's spinning OpenMP workers, XLA's Eigen threads) take the cores
# and slow everyone by 2-3x on 2 cores (bench/README.md). The one run still times every
# library on the same machine, shape after shape, with the same settings.
WORKER_LIBS = ("bpfast", "torch", "jax", "sklearn", "numpy")


def run_worker(lib, shape, opt, peak, predict=False):
    """Run this script as a worker timing only lib's rows; its rows, or [] on failure."""
    if lib in ARGS.skip:
        return []
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", lib, "--shapes", shape,
           "--threads", str(ARGS.threads), "--peak", str(peak), "--worker-optimizer", opt]
    if ARGS.quick:
        cmd.append("--quick")
    if predict:
        cmd.append("--worker-predict")
    r = subprocess.run(cmd, capture_output=True, text=True)
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        print(f"  worker {lib} {shape} {opt} failed: {r.stderr.strip()[-300:]}")
        return []
    return json.loads(lines[-1])


def worker_main():
    """Time one library's rows (training for one optimizer and shape, or predict) as JSON."""
    lib = ARGS.worker
    load_libraries([name for name in WORKER_LIBS + ("scipy",) if name not in (lib, "scipy")])
    if ARGS.worker_predict:
        rows = [r for r in run_predict(ARGS.peak) if PREDICT_FACTORIES[r["impl"]][0] == lib]
    else:
        rows = [r for r in run_training(ARGS.shapes[0], ARGS.worker_optimizer, ARGS.peak)
                if TRAIN_FACTORIES[r["impl"]][0] == lib]
    print(json.dumps(rows))


def run_training_isolated(shape, opt, peak):
    rows = {}
    for lib in WORKER_LIBS:
        for row in run_worker(lib, shape, opt, peak):
            rows[row["impl"]] = row
    for name, (lib, _) in TRAIN_FACTORIES.items():
        skipped = lib in ARGS.skip
        rows.setdefault(name, {"shape": shape, "optimizer": opt, "impl": name,
                               "label": IMPL_LABELS[name],
                               "status": "skipped" if skipped else "error",
                               "why": "--skip" if skipped else "worker failed",
                               "n_samples": 0})
    add_speedups_and_targets(shape, rows)
    return [rows[name] for name in TRAIN_FACTORIES]


def run_predict_isolated(peak):
    rows = []
    for lib in WORKER_LIBS:
        if any(l == lib for l, _ in PREDICT_FACTORIES.values()):
            rows += run_worker(lib, "M", "sgd", peak, predict=True)
    for n in (1, 1024):
        by_name = {r["impl"]: r for r in rows if r["n"] == n}
        bp = by_name.get("bpfast")
        for name, row in by_name.items():
            if name == "bpfast" or row["status"] != "ok" or not bp or bp["status"] != "ok":
                continue
            row["speedup"] = row["us"] / bp["us"]
            if name == "torch":
                row["verdict"] = "PASS" if row["speedup"] >= PREDICT_TARGETS[n] else "FAIL"
    return sorted(rows, key=lambda r: (r["n"], list(PREDICT_FACTORIES).index(r["impl"])))


def run_training(shape, opt, peak):
    p = Problem(shape, N_BATCHES[shape])
    flops = p.flops_per_step()
    rows, steps = {}, {}
    for name, (lib, factory) in TRAIN_FACTORIES.items():
        row = {"shape": shape, "optimizer": opt, "impl": name, "label": IMPL_LABELS[name],
               "batch": p.batch, "widths": p.widths, "status": "ok", "samples": []}
        rows[name] = row
        if not has(lib):
            row["status"] = "skipped"
            row["why"] = LIB_STATUS.get(lib, "")
            continue
        try:
            steps[name] = factory(p, opt)
        except Exception as e:
            row["status"] = "error"
            row["why"] = short_error(e)
            traceback.print_exc(limit=3)
    rounds = XL_ROUNDS if shape == "XL" else TIMING["rounds"]
    for _ in range(rounds):  # interleave the implementations to share any drift
        for name, (fn, per_call) in list(steps.items()):
            try:
                min_samples = 3 if per_call > 1 else None  # whole epochs: fewer
                rows[name]["samples"] += [s / per_call for s in measure(fn, min_samples)]
            except Exception as e:
                rows[name]["status"] = "error"
                rows[name]["why"] = short_error(e)
                del steps[name]
                traceback.print_exc(limit=3)
    for row in rows.values():
        if row["status"] == "ok":
            t = statistics.median(row["samples"])
            row["us"] = t * 1e6
            row["gflops"] = flops / t / 1e9
            row["pct_peak"] = 100.0 * row["gflops"] / peak
        row["n_samples"] = len(row.pop("samples"))
    add_speedups_and_targets(shape, rows)
    return list(rows.values())


def add_speedups_and_targets(shape, rows):
    bp, fit = rows["bpfast"], rows["bpfast_fit"]
    bp_ok = bp["status"] == "ok"
    for name, row in rows.items():
        row["speedup"], row["target"], row["verdict"] = None, None, None
        if name == "bpfast":
            if shape in PEAK_TARGETS:
                row["target"] = f">={PEAK_TARGETS[shape]:.0f}% peak"
                if bp_ok:
                    row["verdict"] = "PASS" if row["pct_peak"] >= PEAK_TARGETS[shape] else "FAIL"
            continue
        if name == "bpfast_fit":
            if bp_ok and row["status"] == "ok":
                row["fit_over_step"] = row["us"] / bp["us"]
            if shape in FIT_TARGETS:
                row["target"] = f"<={FIT_TARGETS[shape]}x step"
                if "fit_over_step" in row:
                    row["verdict"] = ("PASS" if row["fit_over_step"] <= FIT_TARGETS[shape]
                                      else "FAIL")
            continue
        # sklearn's time includes batching and shuffling: compare it with bpfast's fit
        ref = fit if name == "sklearn" else bp
        if ref["status"] == "ok" and row["status"] == "ok":
            row["speedup"] = row["us"] / ref["us"]
            row["speedup_vs"] = ref["impl"]
        key = (shape, name)
        if key in SPEEDUP_TARGETS:
            row["target"] = f">={SPEEDUP_TARGETS[key]:g}x"
            if row["speedup"] is not None:
                row["verdict"] = "PASS" if row["speedup"] >= SPEEDUP_TARGETS[key] else "FAIL"


def run_predict(peak):
    p = Problem("M", 16)   # 1024 samples
    macs = sum(i * o for i, o in zip(p.widths[:-1], p.widths[1:]))
    rows = []
    for n in (1, 1024):
        fns, by_name = {}, {}
        for name, (lib, factory) in PREDICT_FACTORIES.items():
            row = {"shape": "M", "n": n, "impl": name, "status": "ok", "samples": []}
            by_name[name] = row
            rows.append(row)
            if not has(lib):
                row["status"], row["why"] = "skipped", LIB_STATUS.get(lib, "")
                continue
            try:
                fns[name] = factory(p, n)
            except Exception as e:
                row["status"], row["why"] = "error", short_error(e)
        for _ in range(TIMING["rounds"]):
            for name, fn in list(fns.items()):
                try:
                    by_name[name]["samples"] += measure(fn)
                except Exception as e:
                    by_name[name]["status"], by_name[name]["why"] = "error", short_error(e)
                    del fns[name]
        for row in by_name.values():
            if row["status"] == "ok":
                t = statistics.median(row["samples"])
                row["us"] = t * 1e6
                row["gflops"] = 2 * n * macs / t / 1e9
                row["pct_peak"] = 100 * row["gflops"] / peak
            row["n_samples"] = len(row.pop("samples"))
        bp = by_name["bpfast"]
        for name, row in by_name.items():
            row["speedup"], row["target"], row["verdict"] = None, None, None
            if name == "bpfast":
                continue
            if bp["status"] == "ok" and row["status"] == "ok":
                row["speedup"] = row["us"] / bp["us"]
            if name == "torch":
                row["target"] = f">={PREDICT_TARGETS[n]:g}x"
                if row["speedup"] is not None:
                    row["verdict"] = "PASS" if row["speedup"] >= PREDICT_TARGETS[n] else "FAIL"
    return rows


def check_consistency(opt, steps=3):
    """Same init, same batches: the losses of the first steps must agree, or some
    implementation is not doing the same work. Reference: torch (numpy without it)."""
    p = Problem("M", 4)
    losses = {}
    for name in ("bpfast", "torch", "jax", "numpy"):
        lib, factory = TRAIN_FACTORIES[name]
        if not has(lib):
            continue
        try:
            step, _ = factory(p, opt)
            losses[name] = [float(step()) for _ in range(steps)]
        except Exception as e:
            losses[name] = short_error(e)
    ref_name = "torch" if isinstance(losses.get("torch"), list) else "numpy"
    ref = losses.get(ref_name)
    result = {"optimizer": opt, "reference": ref_name, "losses": losses, "max_abs_diff": {}}
    if isinstance(ref, list):
        for name, ls in losses.items():
            if isinstance(ls, list):
                result["max_abs_diff"][name] = max(abs(a - b) for a, b in zip(ls, ref))
    return result


def subprocess_seconds(code, reps):
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if r.returncode != 0:
            return None, r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "failed"
    return statistics.median(times), None


def import_times():
    reps = 3 if ARGS.quick else 5
    base, _ = subprocess_seconds("pass", reps)
    result = {"python_startup_ms": base * 1e3}
    modules = {"bpfast": "import bpfast", "numpy+scipy.linalg": "import numpy, scipy.linalg",
               "torch": "import torch", "jax": "import jax, jax.numpy"}
    for name, code in modules.items():
        lib = name.split("+")[0]
        if lib != "numpy" and not has(lib):
            result[name] = "skipped"
            continue
        t, err = subprocess_seconds(code, reps)
        result[name] = round((t - base) * 1e3, 1) if t is not None else f"error: {err}"
    if has("bpfast"):  # where bpfast's own import time goes
        r = subprocess.run([sys.executable, "-X", "importtime", "-c", "import bpfast"],
                           capture_output=True, text=True)
        entries = []
        for line in r.stderr.splitlines():
            if not line.startswith("import time:") or "self [us]" in line:
                continue
            self_us, cum_us, name = line[len("import time:"):].split("|")
            entries.append((name.strip(), int(self_us), int(cum_us)))
        result["bpfast_modules_cumulative_ms"] = {
            n: round(c / 1e3, 1) for n, s, c in entries if n.startswith("bpfast")}
        top = sorted(entries, key=lambda e: -e[1])[:6]
        result["top_self_ms"] = {n: round(s / 1e3, 1) for n, s, c in top}
    return result


def memory():
    shape = SHAPES["L"]
    steps = 20 if ARGS.quick else 50
    widths = ",".join(map(str, shape["widths"]))
    n_params = sum(i * o + o for i, o in zip(shape["widths"][:-1], shape["widths"][1:]))
    result = {"shape": "L", "steps": steps, "params_mib": round(n_params * 4 / 2 ** 20, 2),
              "runs": []}
    for opt in ("sgd", "adam"):
        for impl in ("bpfast", "torch"):
            if not has(impl):
                result["runs"].append({"impl": impl, "optimizer": opt, "status": "skipped"})
                continue
            cmd = [sys.executable, os.path.join(HERE, "memprobe.py"), impl, opt,
                   str(ARGS.threads), str(steps), widths, str(shape["batch"])]
            r = subprocess.run(cmd, capture_output=True, text=True)
            if r.returncode == 0:
                run = json.loads(r.stdout.strip().splitlines()[-1])
                run["status"] = "ok"
            else:
                lines = r.stderr.strip().splitlines()
                run = {"impl": impl, "optimizer": opt, "status": "error",
                       "why": lines[-1] if lines else f"exit {r.returncode}"}
            result["runs"].append(run)
    return result


# ---------------------------------------------------------------------------------------
# Printing and saving
# ---------------------------------------------------------------------------------------

def fmt(x, spec, empty="-"):
    return empty if x is None else format(x, spec)


def print_training_table(opt, rows, peak):
    print(f"\nTraining step: {OPTIMIZERS[opt]}, float32, ReLU, cross-entropy, "
          f"{ARGS.threads} thread(s); GEMM peak {peak:.1f} GFLOP/s")
    head = (f"{'shape':5} {'implementation':24} {'us/step':>11} {'GFLOP/s':>8} {'%peak':>6} "
            f"{'bpfast x':>9}  {'target':14} {'':4}")
    print(head)
    print("-" * len(head))
    last_shape = None
    for r in rows:
        if last_shape is not None and r["shape"] != last_shape:
            print()
        last_shape = r["shape"]
        if r["status"] != "ok":
            why = r.get("why", "")
            print(f"{r['shape']:5} {r['label']:24} {r['status']}: {why[:90]}"
                  + (f"  [{r['target']}]" if r.get("target") else ""))
            continue
        if r["impl"] == "bpfast_fit":
            x = fmt(r.get("fit_over_step"), ".2f", "")
            x = f"{x}x step" if x else "-"
        elif r["speedup"] is not None:
            x = f"{r['speedup']:.2f}x" + ("*" if r["impl"] == "sklearn" else "")
        else:
            x = "-"
        print(f"{r['shape']:5} {r['label']:24} {r['us']:11.1f} {r['gflops']:8.2f} "
              f"{r['pct_peak']:5.1f}% {x:>9}  {r['target'] or '':14} {r['verdict'] or ''}")
    print("  bpfast x = competitor time / bpfast train_step time (* sklearn: / bpfast fit "
          "time, both include batching and shuffling)")


def print_predict_table(rows):
    print("\nInference on M ([784, 128, 10]), float32: predict(X) latency")
    head = (f"{'n':>5} {'implementation':24} {'us/call':>11} {'GFLOP/s':>8} "
            f"{'bpfast x':>9}  {'target':14}")
    print(head)
    print("-" * (len(head) + 5))
    labels = {"bpfast": "bpfast predict", "torch": "torch eager no_grad",
              "jax": "jax.jit", "numpy": "numpy"}
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['n']:5} {labels[r['impl']]:24} {r['status']}: {r.get('why', '')[:90]}")
            continue
        print(f"{r['n']:5} {labels[r['impl']]:24} {r['us']:11.2f} {r['gflops']:8.2f} "
              f"{fmt(r['speedup'], '.2f'):>8}{'x' if r['speedup'] else ' '}  "
              f"{r['target'] or '':14} {r['verdict'] or ''}")


def print_targets(results):
    verdicts = []
    for r in results["training"] + results["predict"]:
        if r.get("target"):
            what = (f"{r['shape']} {r.get('optimizer', 'predict n=' + str(r.get('n')))} "
                    f"{r['impl']}")
            verdicts.append((what, r["target"], r.get("verdict") or "n/a"))
    results["targets"] = [{"what": w, "target": t, "verdict": v} for w, t, v in verdicts]
    n_pass = sum(v == "PASS" for _, _, v in verdicts)
    n_fail = sum(v == "FAIL" for _, _, v in verdicts)
    print(f"\nTargets: {n_pass} PASS, {n_fail} FAIL, {len(verdicts) - n_pass - n_fail} n/a")
    for w, t, v in verdicts:
        if v != "PASS":
            print(f"  {v:4}  {w:28} {t}")


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    competitors = ["torch", "jax", "numpy", "sklearn"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, opt in zip(axes, OPTIMIZERS):
        rows = [r for r in results["training"] if r["optimizer"] == opt]
        shapes = [s for s in ARGS.shapes if any(r["shape"] == s for r in rows)]
        width = 0.8 / len(competitors)
        for k, comp in enumerate(competitors):
            vals = []
            for s in shapes:
                r = next((r for r in rows if r["shape"] == s and r["impl"] == comp), None)
                vals.append(r["speedup"] if r and r.get("speedup") else 0.0)
            xs = [i + (k - (len(competitors) - 1) / 2) * width for i in range(len(shapes))]
            ax.bar(xs, vals, width, label=comp)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels(shapes)
        ax.set_title(f"{OPTIMIZERS[opt]}")
        ax.set_xlabel("shape")
    axes[0].set_ylabel("bpfast speed-up (competitor time / bpfast time)")
    axes[1].legend()
    fig.suptitle(f"bpfast training step speed-up, {ARGS.threads} thread(s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main():
    if ARGS.worker:
        worker_main()
        return
    t_start = time.perf_counter()
    print(f"bpfast benchmark ({'quick' if ARGS.quick else 'full'}), {ARGS.threads} thread(s) "
          f"of {os.cpu_count()} cores, CPU: {cpu_model()}")
    load_libraries(ARGS.skip)
    for name in ("bpfast", "torch", "jax", "sklearn", "scipy", "numpy", "threadpoolctl"):
        print(f"  {name:14} {LIB_STATUS.get(name, '?')}")
    if "bpfast" in LIBS:
        print(f"  bpfast from    {os.path.dirname(LIBS['bpfast'].__file__)}")
    config = bpfast_config()
    if config:
        print("bpfast.show_config():\n  " + config.replace("\n", "\n  "))
    pools = thread_pools()
    for d in pools:
        print(f"  thread pool: {d['internal_api']:9} {d['num_threads']} thread(s)  "
              f"{os.path.basename(d['filepath'] or '')}")

    peak, gemm = gemm_peak()
    print("\nGEMM float32 2048x2048 @ 2048x2048 (median): " + ", ".join(
        f"{k} {v['gflops']:.1f}" for k, v in gemm.items())
        + f" GFLOP/s; peak used = {peak:.1f} (best of numpy, scipy)")

    results = {
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
        "mode": "quick" if ARGS.quick else "full",
        "threads": ARGS.threads, "cpu_count": os.cpu_count(), "cpu": cpu_model(),
        "platform": platform.platform(), "python": sys.version.split()[0],
        "versions": LIB_STATUS, "bpfast_config": config, "thread_pools": pools,
        "timing": TIMING, "gemm_gflops": gemm, "gemm_peak_gflops": peak,
        "training": [], "predict": [], "consistency": [],
    }

    print("\nConsistency: loss of the first 3 steps on M from the same init (|diff| vs "
          "reference)")
    for opt in OPTIMIZERS:
        c = check_consistency(opt)
        results["consistency"].append(c)
        cells = []
        for name, ls in c["losses"].items():
            if isinstance(ls, list):
                cells.append(f"{name} {ls[-1]:.6f} ({c['max_abs_diff'].get(name, 0):.1e})")
            else:
                cells.append(f"{name} ERROR {ls}")
        print(f"  {opt:5} ref={c['reference']}: " + "; ".join(cells))

    for opt in OPTIMIZERS:
        rows = []
        for shape in ARGS.shapes:
            rows += run_training_isolated(shape, opt, peak)
        results["training"] += rows
        print_training_table(opt, rows, peak)

    results["predict"] = run_predict_isolated(peak)  # always on M
    print_predict_table(results["predict"])

    if "memory" not in ARGS.skip:
        mem = memory()
        results["memory"] = mem
        print(f"\nPeak memory, training on L ({mem['steps']} steps; parameters "
              f"{mem['params_mib']} MiB), maxrss above the after-import baseline:")
        for run in mem["runs"]:
            if run["status"] == "ok":
                print(f"  {run['impl']:7} {run['optimizer']:5} {run['delta_mib']:8.1f} MiB "
                      f"(baseline {run['baseline_mib']:.1f}, peak {run['peak_mib']:.1f})")
            else:
                print(f"  {run['impl']:7} {run['optimizer']:5} {run['status']}: "
                      f"{run.get('why', '')}")

    if "import" not in ARGS.skip:
        imp = import_times()
        results["import_ms"] = imp
        print(f"\nImport time (wall, median, minus `python -c pass` = "
              f"{imp['python_startup_ms']:.0f} ms):")
        for k, v in imp.items():
            if k in ("python_startup_ms",) or isinstance(v, dict):
                continue
            print(f"  {k:20} {v if isinstance(v, str) else f'{v:.0f} ms'}")
        if imp.get("bpfast_modules_cumulative_ms"):
            print("  bpfast modules (cumulative ms): " + ", ".join(
                f"{k} {v}" for k, v in imp["bpfast_modules_cumulative_ms"].items()))
            print("  largest self times (ms): " + ", ".join(
                f"{k} {v}" for k, v in imp["top_self_ms"].items()))

    print_targets(results)
    results["wall_s"] = round(time.perf_counter() - t_start, 1)

    os.makedirs(ARGS.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for name in (f"{stamp}.json", "latest.json"):
        with open(os.path.join(ARGS.out, name), "w") as f:
            json.dump(results, f, indent=1, default=str)
    png = plot(results, os.path.join(ARGS.out, "speedups.png"))
    print(f"\nWrote {os.path.join(ARGS.out, stamp + '.json')} and latest.json"
          + (f", {png}" if png else "") + f"  ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
