#!/usr/bin/env python
"""bpfast benchmark suite: one training step of a dense network, bpfast against PyTorch
eager, JAX (jit), scikit-learn and plain NumPy, all measured in one run on one machine.

    python bench/run.py [--quick] [--threads N] [--shapes S,M,L,XL] [--out bench/results]

See bench/README.md for what is measured and how. Every competitor is optional: one
that is not installed is reported as "skipped"; if bpfast itself does not import, the
others still run (the speed-up and target columns are then empty).

Each library runs in its own worker process (this same file, started with --worker),
so that no library's thread pools or OpenMP settings affect another's; the driver
asks the workers in turn, round after round, so slow drift in the machine's speed
falls on all of them alike.
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
FIT_VALIDATED_TARGETS = {"M": 1.25}        # fit with validation + callback / plain fit at most
PREDICT_TARGETS = {1: 10.0, 1024: 1.3}     # predict on M, speed-up over torch eager

# Table rows: row name -> (label, worker process that measures it)
TRAIN_ROWS = {
    "bpfast": ("bpfast train_step", "bpfast"),
    "bpfast_fit": ("bpfast fit (per batch)", "bpfast"),
    "bpfast_fit_val": ("  + validation, callback", "bpfast"),
    "torch": ("torch eager", "torch"),
    "jax": ("jax.jit", "jax"),
    "sklearn": ("sklearn MLP (per batch)", "sklearn"),
    "numpy": ("numpy", "numpy"),
}
PREDICT_ROWS = {
    "bpfast": ("bpfast predict", "bpfast"),
    "torch": ("torch eager no_grad", "torch"),
    "jax": ("jax.jit", "jax"),
    "numpy": ("numpy", "numpy"),
}
WORKER_LIBRARIES = {  # worker -> the libraries it imports (numpy always)
    "bpfast": ["bpfast"], "torch": ["torch"], "jax": ["jax"],
    "sklearn": ["sklearn"], "numpy": ["scipy"],
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short run (about a minute)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for every library (default: all cores available)")
    p.add_argument("--shapes", default="S,M,L,XL", help="comma-separated subset of S,M,L,XL")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="results folder")
    p.add_argument("--stat", choices=("median", "min"), default="median",
                   help="statistic of the samples reported and compared (default median; "
                        "min is steadier when something else shares the CPUs)")
    p.add_argument("--skip", default="",
                   help="comma-separated parts to leave out: "
                        "bpfast,torch,jax,sklearn,numpy,predict,memory,import")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal
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
    if n == 1 and "xla_cpu_multi_thread_eigen" not in os.environ.get("XLA_FLAGS", ""):
        # XLA's own single-thread switch (the affinity above is what limits n > 1)
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

if ARGS.quick:
    TIMING = {"warmup_s": 0.02, "warmup_calls": 2, "sample_s": 0.001, "budget_s": 0.05,
              "min_samples": 3, "max_samples": 10, "rounds": 1}
else:
    TIMING = {"warmup_s": 0.1, "warmup_calls": 3, "sample_s": 0.002, "budget_s": 0.4,
              "min_samples": 5, "max_samples": 40, "rounds": 3}
XL_ROUNDS = 1 if ARGS.quick else 2
N_BATCHES = {"S": 32, "M": 32, "L": 32, "XL": 4 if ARGS.quick else 8}  # data set for fit

# =======================================================================================
# Worker side: each competitor, one function per step kind
# =======================================================================================

LIBS = {}          # name -> module, for the ones that imported (in this process)
LIB_STATUS = {}    # name -> version, or "skipped: why"


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


IMPORTERS = {  # name -> import function (the module kept is the top-level one)
    "bpfast": import_bpfast,
    "torch": lambda: importlib.import_module("torch"),
    "jax": lambda: importlib.import_module("jax"),
    "sklearn": lambda: (importlib.import_module("sklearn.neural_network")
                        and sys.modules["sklearn"]),
    "scipy": lambda: importlib.import_module("scipy.linalg.blas") and sys.modules["scipy"],
}


def load_libraries(names):
    """Import the named libraries (each optional), then set every thread pool to n."""
    n = ARGS.threads
    for name in names:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                LIBS[name] = IMPORTERS[name]()
            LIB_STATUS[name] = getattr(LIBS[name], "__version__", "?")
        except ImportError as e:
            LIB_STATUS[name] = f"skipped: not installed ({e})"
        except Exception as e:  # a broken install: report, never stop the run
            LIB_STATUS[name] = f"skipped: import failed ({type(e).__name__}: {e})"
    LIBS["numpy"] = np
    LIB_STATUS["numpy"] = np.__version__
    try:  # after the imports: threadpoolctl only reaches pools already loaded
        import threadpoolctl
        LIBS["_limits"] = threadpoolctl.threadpool_limits(limits=n)
    except ImportError:
        pass
    if "torch" in LIBS:
        LIBS["torch"].set_num_threads(n)
    if "bpfast" in LIBS and hasattr(LIBS["bpfast"], "set_num_threads"):
        LIBS["bpfast"].set_num_threads(n)


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


def measure(fn, per_call=1):
    """Warm up, then time fn in samples of `inner` back-to-back calls (each sample lasts
    about TIMING['sample_s'] so the clock's resolution does not matter); return one
    per-call time in seconds per sample. Calls that are whole epochs (per_call > 1)
    get one warm-up call and three samples at least."""
    t = TIMING
    warmup_calls = 1 if per_call > 1 else t["warmup_calls"]
    min_samples = 3 if per_call > 1 else t["min_samples"]
    calls, start, last = 0, time.perf_counter(), 0.0
    while calls < warmup_calls or time.perf_counter() - start < t["warmup_s"]:
        t0 = time.perf_counter()
        fn()
        last = time.perf_counter() - t0
        calls += 1
    inner = max(1, int(t["sample_s"] / max(last, 1e-9)))
    samples, start = [], time.perf_counter()
    while len(samples) < min_samples or (
            len(samples) < t["max_samples"] and time.perf_counter() - start < t["budget_s"]):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        samples.append((time.perf_counter() - t0) / inner)
    return samples


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


def flops_per_step(widths, batch):
    macs = sum(i * o for i, o in zip(widths[:-1], widths[1:]))
    return 6 * batch * macs  # forward 2, backward 4 (dW and da) per multiply-add


def cycle(batches):
    """Endless iterator over the batches; the same tiny cost for every implementation."""
    return itertools.cycle(batches)


# ---- bpfast ---------------------------------------------------------------------------

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


def bpfast_fit_validated(p, opt):
    """fit as above, plus a validation set of a tenth of the data and EarlyStopping."""
    bp = LIBS["bpfast"]
    net, loss, optimizer = bpfast_network(p), bp.CrossEntropy(), bpfast_optimizer(opt)
    n_val = max(1, p.X.shape[0] // 10)
    validation = (p.X[:n_val], p.y[:n_val])
    stopper = bp.callbacks.EarlyStopping("val_loss", patience=10**9)

    def epoch():
        return net.fit(p.X, p.y, loss=loss, optimizer=optimizer, epochs=1,
                       batch_size=p.batch, shuffle=True, validation_data=validation,
                       callbacks=[stopper])
    return epoch, p.n_batches


def bpfast_predict(p, n):
    net = bpfast_network(p)
    X = np.ascontiguousarray(p.X[:n])
    return lambda: net.predict(X)


# ---- PyTorch eager --------------------------------------------------------------------

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


# ---- JAX: the whole step under jax.jit, parameters and optimizer state donated --------

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


# ---- scikit-learn MLPClassifier: one partial_fit call is one epoch over the data set --

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


# ---- plain NumPy (bench/numpy_mlp.py) -------------------------------------------------

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


TRAIN_FACTORIES = {
    "bpfast": bpfast_train_step, "bpfast_fit": bpfast_fit,
    "bpfast_fit_val": bpfast_fit_validated, "torch": torch_train_step,
    "jax": jax_train_step, "sklearn": sklearn_partial_fit, "numpy": numpy_train_step,
}
PREDICT_FACTORIES = {
    "bpfast": bpfast_predict, "torch": torch_predict, "jax": jax_predict,
    "numpy": numpy_predict,
}


# ---- GEMM peak ------------------------------------------------------------------------

def gemm(n=2048):
    """float32 n x n @ n x n, median over a few runs, with this worker's library: NumPy's
    and SciPy's BLAS in the numpy worker (SciPy's is the one bpfast calls through
    scipy.linalg.cython_blas), torch.mm and a jitted jax matmul for information."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = np.empty((n, n), np.float32)
    fns = {}
    if "scipy" in LIBS:  # numpy worker
        fns["numpy"] = lambda: np.matmul(a, b, out=out)
        sgemm = LIBS["scipy"].linalg.blas.sgemm
        af, bf = np.asfortranarray(a), np.asfortranarray(b)
        fns["scipy"] = lambda: sgemm(1.0, af, bf)  # Fortran order: no copies
    if "torch" in LIBS:
        torch = LIBS["torch"]
        ta, tb, tout = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(out)
        fns["torch"] = lambda: torch.mm(ta, tb, out=tout)
    if "jax" in LIBS:
        import jax
        ja, jb = jax.numpy.asarray(a), jax.numpy.asarray(b)
        mm = jax.jit(lambda x, y: x @ y)
        fns["jax"] = lambda: mm(ja, jb).block_until_ready()
    reps = 3 if ARGS.quick else 7
    result = {}
    for name, fn in fns.items():
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        result[name] = {"gflops": 2.0 * n ** 3 / statistics.median(times) / 1e9,
                        "best_gflops": 2.0 * n ** 3 / min(times) / 1e9}
    return result


# ---- the worker loop ------------------------------------------------------------------

MARK = "@@bench "   # prefix of the worker's answers on stdout (anything else is ignored)


def worker_main(worker):
    """Answer one JSON request per stdin line with one MARK-prefixed JSON line."""
    load_libraries(WORKER_LIBRARIES[worker])
    needed = "numpy" if worker == "numpy" else WORKER_LIBRARIES[worker][0]
    problems, steps = {}, {}

    def problem(shape, n_batches):
        key = (shape, n_batches)
        if key not in problems:
            problems[key] = Problem(shape, n_batches)
        return problems[key]

    def answer(obj):
        sys.stdout.write(MARK + json.dumps(obj) + "\n")
        sys.stdout.flush()

    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        try:
            if op == "hello":
                ok = needed in LIBS
                bp = LIBS.get("bpfast")
                answer({"ok": ok, "status": LIB_STATUS.get(needed), "versions": LIB_STATUS,
                        "bpfast_config": bpfast_config(), "thread_pools": thread_pools(),
                        "bpfast_file": os.path.dirname(bp.__file__) if bp else None,
                        "pythonpath": os.environ.get("PYTHONPATH")})
            elif op == "train":  # time one row; the model persists across rounds
                key = ("train", req["row"], req["shape"], req["opt"])
                if key not in steps:
                    p = problem(req["shape"], N_BATCHES[req["shape"]])
                    steps[key] = TRAIN_FACTORIES[req["row"]](p, req["opt"])
                fn, per_call = steps[key]
                answer({"ok": True,
                        "samples": [s / per_call for s in measure(fn, per_call)]})
            elif op == "predict":
                key = ("predict", req["row"], req["n"])
                if key not in steps:
                    steps[key] = (PREDICT_FACTORIES[req["row"]](problem("M", 16), req["n"]), 1)
                answer({"ok": True, "samples": measure(steps[key][0])})
            elif op == "losses":  # first steps from the shared init, for the consistency check
                step, _ = TRAIN_FACTORIES[req["row"]](problem("M", 4), req["opt"])
                losses = [step() for _ in range(req["steps"])]
                losses = [float(v.detach() if hasattr(v, "detach") else v) for v in losses]
                answer({"ok": True, "losses": losses})
            elif op == "gemm":
                answer({"ok": True, "gemm": gemm()})
            elif op == "forget":  # free a shape's models and data (XL is big)
                for key in [k for k in steps if req["shape"] in k]:
                    del steps[key]
                for key in [k for k in problems if k[0] == req["shape"]]:
                    del problems[key]
                answer({"ok": True})
            elif op == "quit":
                answer({"ok": True})
                return
        except Exception as e:
            traceback.print_exc(limit=4)
            answer({"ok": False, "error": short_error(e)})


def short_error(e):
    msg = f"{type(e).__name__}: {e}".replace("\n", " ")
    return msg if len(msg) < 160 else msg[:157] + "..."


# =======================================================================================
# Driver side
# =======================================================================================

class Worker:
    """One competitor's process: this file with --worker NAME, spoken to by JSON lines."""

    def __init__(self, name):
        self.name = name
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name,
               "--threads", str(ARGS.threads)] + (["--quick"] if ARGS.quick else [])
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.hello = None

    def ask(self, **req):
        if self.proc.poll() is not None:
            return {"ok": False, "error": f"worker exited ({self.proc.returncode})"}
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            for line in self.proc.stdout:
                if line.startswith(MARK):
                    return json.loads(line[len(MARK):])
        except (BrokenPipeError, OSError) as e:
            return {"ok": False, "error": f"worker failed: {e}"}
        return {"ok": False, "error": f"worker died (exit {self.proc.wait()})"}

    def cpu_ticks(self):
        """CPU time used so far by all this worker's threads, in clock ticks (Linux)."""
        with open(f"/proc/{self.proc.pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return int(parts[11]) + int(parts[12])  # utime + stime

    def settle(self, window=0.03, max_wait=0.6):
        """Wait until this worker is idle. After its last call, BLAS and OpenMP workers
        spin on for a while (OpenBLAS for ~0.1 s); left alone, they would take a core from
        whichever library is measured next."""
        try:
            deadline = time.perf_counter() + max_wait
            before = self.cpu_ticks()
            while time.perf_counter() < deadline:
                time.sleep(window)
                now = self.cpu_ticks()
                if now == before:
                    return
                before = now
        except (OSError, ValueError, IndexError):  # no /proc: wait out OpenBLAS's spin
            time.sleep(0.15)

    def close(self):
        if self.proc.poll() is None:
            self.ask(op="quit")
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_workers():
    wanted = [w for w in WORKER_LIBRARIES if w not in ARGS.skip]
    workers = {w: Worker(w) for w in wanted}   # they import in parallel
    for w in workers.values():
        w.hello = w.ask(op="hello")
    return workers


def worker_status(workers, name):
    """'ok' or why this worker's rows are empty."""
    if name in ARGS.skip:
        return "skipped: --skip"
    w = workers.get(name)
    if w is None or w.hello is None:
        return "skipped"
    if not w.hello.get("ok"):
        return w.hello.get("status") or w.hello.get("error") or "skipped"
    return "ok"


class CpuMonitor:
    """How much of the machine was not ours while we measured (Linux; None elsewhere):
    other = CPU time of every other process (/proc/stat busy time minus our processes'
    /proc/PID/stat time), steal = time the hypervisor gave our virtual CPUs to someone
    else; both in percent of wall time x cores."""

    def __init__(self, pids):
        self.pids = pids
        self.start = self.snapshot()

    def snapshot(self):
        try:
            with open("/proc/stat") as f:
                user, nice, system, idle, iowait, irq, softirq, steal = (
                    int(x) for x in f.readline().split()[1:9])
            ours = 0
            for pid in self.pids:
                with open(f"/proc/{pid}/stat") as f:
                    parts = f.read().rsplit(")", 1)[1].split()
                ours += int(parts[11]) + int(parts[12])  # utime, stime
            busy = user + nice + system + irq + softirq
            return busy, ours, steal, time.perf_counter()
        except (OSError, ValueError, IndexError):
            return None

    def percents(self):
        """{'other': %, 'steal': %} since construction, or None."""
        end = self.snapshot()
        if self.start is None or end is None:
            return None
        ticks = os.sysconf("SC_CLK_TCK") * (end[3] - self.start[3]) * (os.cpu_count() or 1)
        other = (end[0] - self.start[0]) - (end[1] - self.start[1])
        steal = end[2] - self.start[2]
        return {"other": round(max(0.0, 100.0 * other / ticks), 1),
                "steal": round(100.0 * steal / ticks, 1)}


def load_note(load):
    if load is None:
        return ""
    return f"; other processes {load['other']:.0f}%, steal {load['steal']:.0f}% of the CPUs"


NOISY_SPREAD = 1.15


def print_noise(rows):
    """Median over the rows of median/min: well above 1 means the machine's speed changed
    while we measured, often because another virtual machine shares the same cores (which
    neither /proc/stat nor steal time shows)."""
    spreads = sorted(r["spread"] for r in rows if r.get("spread"))
    if not spreads:
        return None
    typical = statistics.median(spreads)
    print(f"  noise: median/min over the samples, typical {typical:.2f}, worst {spreads[-1]:.2f}"
          + ("  <- NOISY: timings unreliable, rerun on a quiet machine or use --stat min"
             if typical > NOISY_SPREAD else ""))
    return typical


def summarize(row, samples, flops, peak):
    """Fill a row's times from its samples (seconds per step): us is the --stat statistic
    (median by default), spread = median / min (near 1 on a quiet machine)."""
    if row["status"] == "ok" and samples:
        t = statistics.median(samples) if ARGS.stat == "median" else min(samples)
        row["us"] = t * 1e6
        row["us_median"] = statistics.median(samples) * 1e6
        row["us_min"] = min(samples) * 1e6
        row["spread"] = round(row["us_median"] / row["us_min"], 3)
        row["gflops"] = flops / t / 1e9
        row["pct_peak"] = 100.0 * row["gflops"] / peak
    elif row["status"] == "ok":
        row["status"], row["why"] = "error", "no samples"
    row["n_samples"] = len(samples)


def run_training(workers, shape, opt, peak):
    spec = SHAPES[shape]
    rows, samples = {}, {}
    for name, (label, wname) in TRAIN_ROWS.items():
        status = worker_status(workers, wname)
        rows[name] = {"shape": shape, "optimizer": opt, "impl": name, "label": label,
                      "batch": spec["batch"], "widths": spec["widths"],
                      "status": "ok" if status == "ok" else "skipped"}
        if status != "ok":
            rows[name]["why"] = status.removeprefix("skipped: ")
        samples[name] = []
    rounds = XL_ROUNDS if shape == "XL" else TIMING["rounds"]
    for _ in range(rounds):  # interleave the implementations to share any drift
        for name, (_, wname) in TRAIN_ROWS.items():
            if rows[name]["status"] != "ok":
                continue
            r = workers[wname].ask(op="train", row=name, shape=shape, opt=opt)
            workers[wname].settle()
            if r.get("ok"):
                samples[name] += r["samples"]
            else:
                rows[name]["status"], rows[name]["why"] = "error", r.get("error", "?")
    flops = flops_per_step(spec["widths"], spec["batch"])
    for name, row in rows.items():
        summarize(row, samples[name], flops, peak)
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
        if name == "bpfast_fit_val":
            if fit["status"] == "ok" and row["status"] == "ok":
                row["over_fit"] = row["us"] / fit["us"]
            if shape in FIT_VALIDATED_TARGETS:
                row["target"] = f"<={FIT_VALIDATED_TARGETS[shape]}x fit"
                if "over_fit" in row:
                    row["verdict"] = ("PASS" if row["over_fit"] <= FIT_VALIDATED_TARGETS[shape]
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


def run_predict(workers, peak):
    widths = SHAPES["M"]["widths"]
    rows = []
    for n in (1, 1024):
        by_name, samples = {}, {}
        for name, (label, wname) in PREDICT_ROWS.items():
            status = worker_status(workers, wname)
            by_name[name] = {"shape": "M", "n": n, "impl": name, "label": label,
                             "status": "ok" if status == "ok" else "skipped"}
            if status != "ok":
                by_name[name]["why"] = status.removeprefix("skipped: ")
            samples[name] = []
        for _ in range(TIMING["rounds"]):
            for name, (_, wname) in PREDICT_ROWS.items():
                if by_name[name]["status"] != "ok":
                    continue
                r = workers[wname].ask(op="predict", row=name, n=n)
                workers[wname].settle()
                if r.get("ok"):
                    samples[name] += r["samples"]
                else:
                    by_name[name]["status"], by_name[name]["why"] = "error", r.get("error")
        flops = flops_per_step(widths, n) / 3  # forward only: 2 flops per multiply-add
        bp = by_name["bpfast"]
        for name, row in by_name.items():
            summarize(row, samples[name], flops, peak)
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
        rows += by_name.values()
    return rows


def check_consistency(workers, opt, steps=3):
    """Same init, same batches: the losses of the first steps must agree, or some
    implementation is not doing the same work. Reference: torch (numpy without it)."""
    losses = {}
    for name in ("bpfast", "torch", "jax", "numpy"):
        if worker_status(workers, TRAIN_ROWS[name][1]) != "ok":
            continue
        r = workers[TRAIN_ROWS[name][1]].ask(op="losses", row=name, opt=opt, steps=steps)
        losses[name] = r["losses"] if r.get("ok") else r.get("error", "?")
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
            lines = r.stderr.strip().splitlines()
            return None, lines[-1] if lines else "failed"
    return statistics.median(times), None


def import_times(bpfast_ok):
    reps = 3 if ARGS.quick else 5
    base, _ = subprocess_seconds("pass", reps)
    result = {"python_startup_ms": round(base * 1e3, 1)}
    modules = {"bpfast": "import bpfast", "numpy+scipy.linalg": "import numpy, scipy.linalg",
               "torch": "import torch", "jax": "import jax, jax.numpy"}
    if ARGS.quick:  # the competitors' import times do not change: full runs only
        modules = {"bpfast": modules["bpfast"]}
    for name, code in modules.items():
        if name in ARGS.skip or (name == "bpfast" and not bpfast_ok):
            result[name] = "skipped"
            continue
        t, err = subprocess_seconds(code, reps)
        result[name] = round((t - base) * 1e3, 1) if t is not None else f"error: {err}"
    if bpfast_ok:  # where bpfast's own import time goes
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


def memory(workers):
    shape = SHAPES["L"]
    steps = 20 if ARGS.quick else 50
    widths = ",".join(map(str, shape["widths"]))
    n_params = sum(i * o + o for i, o in zip(shape["widths"][:-1], shape["widths"][1:]))
    result = {"shape": "L", "steps": steps, "params_mib": round(n_params * 4 / 2 ** 20, 2),
              "runs": []}
    for opt in OPTIMIZERS:
        for impl in ("bpfast", "torch"):
            status = worker_status(workers, impl)
            if status != "ok":
                result["runs"].append({"impl": impl, "optimizer": opt, "status": "skipped",
                                       "why": status.removeprefix("skipped: ")})
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

def print_training_table(opt, rows, peak, background):
    bg = load_note(background)
    print(f"\nTraining step: {OPTIMIZERS[opt]}, float32, ReLU, cross-entropy, "
          f"{ARGS.threads} thread(s); GEMM peak {peak:.1f} GFLOP/s{bg}")
    head = (f"{'shape':5} {'implementation':24} {'us/step':>11} {'(min)':>10} {'GFLOP/s':>8} "
            f"{'%peak':>6} {'bpfast x':>9}  {'target':13} {'':4}")
    print(head)
    print("-" * len(head))
    last_shape = None
    for r in rows:
        if last_shape is not None and r["shape"] != last_shape:
            print()
        last_shape = r["shape"]
        if r["status"] != "ok":
            why = str(r.get("why", ""))
            print(f"{r['shape']:5} {r['label']:24} {r['status']}: {why[:80]}"
                  + (f"  [{r['target']}]" if r.get("target") else ""))
            continue
        if r["impl"] == "bpfast_fit":
            x = f"{r['fit_over_step']:.2f}x st" if r.get("fit_over_step") else "-"
        elif r["impl"] == "bpfast_fit_val":
            x = f"{r['over_fit']:.2f}x fit" if r.get("over_fit") else "-"
        elif r["speedup"] is not None:
            x = f"{r['speedup']:.2f}x" + ("*" if r["impl"] == "sklearn" else "")
        else:
            x = "-"
        print(f"{r['shape']:5} {r['label']:24} {r['us']:11.1f} {r['us_min']:10.1f} "
              f"{r['gflops']:8.2f} {r['pct_peak']:5.1f}% {x:>9}  {r['target'] or '':13} "
              f"{r['verdict'] or ''}")
    print_noise(rows)
    print(f"  us/step: {ARGS.stat} (min); bpfast x = competitor time / bpfast train_step time "
          "(* sklearn: / bpfast fit time,\n  both include batching and shuffling); "
          "fit row: fit time per batch / train_step time; + validation row: its time / fit's")


def print_predict_table(rows, background):
    bg = load_note(background)
    print(f"\nInference on M ([784, 128, 10]), float32: predict(X) latency{bg}")
    head = (f"{'n':>5} {'implementation':24} {'us/call':>11} {'(min)':>10} {'GFLOP/s':>8} "
            f"{'bpfast x':>9}  {'target':13}")
    print(head)
    print("-" * (len(head) + 5))
    for r in rows:
        if r["status"] != "ok":
            print(f"{r['n']:5} {r['label']:24} {r['status']}: {str(r.get('why', ''))[:80]}")
            continue
        x = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-"
        print(f"{r['n']:5} {r['label']:24} {r['us']:11.2f} {r['us_min']:10.2f} "
              f"{r['gflops']:8.2f} {x:>9}  {r['target'] or '':13} {r['verdict'] or ''}")
    print_noise(rows)


def print_targets(results):
    verdicts = []
    for r in results["training"] + results["predict"]:
        if r.get("target"):
            kind = r["optimizer"] if "optimizer" in r else f"predict n={r['n']}"
            verdicts.append((f"{r['shape']} {kind} {r['impl']}", r["target"],
                             r.get("verdict") or "n/a"))
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
        ax.set_title(OPTIMIZERS[opt])
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
    t_start = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"bpfast benchmark ({'quick' if ARGS.quick else 'full'}), {ARGS.threads} thread(s) "
          f"of {os.cpu_count()} cores, CPU: {cpu_model()}"
          + (f", load average {load:.2f}" if load is not None else ""))
    workers = start_workers()
    versions = {}
    for name, w in workers.items():
        lib = WORKER_LIBRARIES[name][0]
        versions[lib] = w.hello.get("versions", {}).get(lib) or w.hello.get("error")
    versions["numpy"] = np.__version__
    for name in WORKER_LIBRARIES:
        lib = WORKER_LIBRARIES[name][0]
        if name in ARGS.skip:
            versions[lib] = "skipped: --skip"
        print(f"  {lib:8} {versions.get(lib)}")
    bp_hello = workers["bpfast"].hello if "bpfast" in workers else {}
    bpfast_ok = bool(bp_hello.get("ok"))
    if bpfast_ok:
        print(f"  bpfast from {bp_hello['bpfast_file']}")
        if bp_hello.get("pythonpath"):  # found in src/: the subprocesses need it too
            os.environ["PYTHONPATH"] = bp_hello["pythonpath"]
    config = bp_hello.get("bpfast_config")
    if config:
        print("bpfast.show_config():\n  " + config.replace("\n", "\n  "))
    pools = {name: w.hello.get("thread_pools", []) for name, w in workers.items()}
    for name, ps in pools.items():
        print(f"  {name} worker thread pools: " + "; ".join(
            f"{d['internal_api']} {d['num_threads']} ({os.path.basename(d['filepath'] or '')})"
            for d in ps))
    pids = [os.getpid()] + [w.proc.pid for w in workers.values()]

    gemm_all = {}
    for name in ("numpy", "torch", "jax"):
        if worker_status(workers, name) == "ok":
            r = workers[name].ask(op="gemm")
            workers[name].settle()
            gemm_all.update(r.get("gemm", {}))
    blas = [gemm_all[k]["gflops"] for k in ("numpy", "scipy") if k in gemm_all]
    peak = max(blas) if blas else max((v["gflops"] for v in gemm_all.values()), default=1.0)
    print("\nGEMM float32 2048x2048 @ 2048x2048 (median, GFLOP/s): " + ", ".join(
        f"{k} {v['gflops']:.1f}" for k, v in gemm_all.items())
        + f"; peak used = {peak:.1f} (best of numpy, scipy)")

    results = {
        "timestamp": datetime.datetime.now().isoformat(timespec="seconds"),
        "mode": "quick" if ARGS.quick else "full", "command": sys.argv, "stat": ARGS.stat,
        "threads": ARGS.threads, "cpu_count": os.cpu_count(), "cpu": cpu_model(),
        "load_average_at_start": load, "platform": platform.platform(),
        "python": sys.version.split()[0], "versions": versions, "bpfast_config": config,
        "thread_pools": pools, "timing": TIMING, "gemm_gflops": gemm_all,
        "gemm_peak_gflops": peak, "training": [], "predict": [], "consistency": [],
        "other_load_percent": {},  # per table: other processes and steal
    }

    print("\nConsistency: loss after 3 steps on M from the same init (max |diff| vs "
          "reference over the 3 steps)")
    for opt in OPTIMIZERS:
        c = check_consistency(workers, opt)
        results["consistency"].append(c)
        cells = []
        for name, ls in c["losses"].items():
            if isinstance(ls, list):
                cells.append(f"{name} {ls[-1]:.6f} ({c['max_abs_diff'].get(name, 0):.0e})")
            else:
                cells.append(f"{name} ERROR {ls}")
        print(f"  {opt:5} ref={c['reference']}: " + "; ".join(cells))

    for opt in OPTIMIZERS:
        monitor = CpuMonitor(pids)
        rows = []
        for shape in ARGS.shapes:
            rows += run_training(workers, shape, opt, peak)
            if shape == "XL":
                for w in workers.values():
                    w.ask(op="forget", shape="XL")
        results["training"] += rows
        background = monitor.percents()
        results["other_load_percent"][opt] = background
        print_training_table(opt, rows, peak, background)

    if "predict" not in ARGS.skip:
        monitor = CpuMonitor(pids)
        results["predict"] = run_predict(workers, peak)
        background = monitor.percents()
        results["other_load_percent"]["predict"] = background
        print_predict_table(results["predict"], background)
    if worker_status(workers, "numpy") == "ok":  # did the machine's speed change?
        end = workers["numpy"].ask(op="gemm").get("gemm", {})
        blas_end = [end[k]["gflops"] for k in ("numpy", "scipy") if k in end]
        if blas_end:
            results["gemm_peak_end_gflops"] = max(blas_end)
            change = 100.0 * (max(blas_end) / peak - 1)
            print(f"\nGEMM peak at the end: {max(blas_end):.1f} GFLOP/s ({change:+.0f}% from the "
                  "start)" + ("  <- the machine's speed changed during the run"
                             if abs(change) > 10 else ""))
    for w in workers.values():
        w.close()

    if "memory" not in ARGS.skip:
        mem = memory(workers)
        results["memory"] = mem
        print(f"\nPeak memory, training on L ({mem['steps']} steps; parameters "
              f"{mem['params_mib']} MiB), peak RSS above the baseline after imports:")
        for run in mem["runs"]:
            if run["status"] == "ok":
                print(f"  {run['impl']:7} {run['optimizer']:5} {run['delta_mib']:8.1f} MiB "
                      f"(baseline {run['baseline_mib']:.1f}, peak {run['peak_mib']:.1f})")
            else:
                print(f"  {run['impl']:7} {run['optimizer']:5} {run['status']}: "
                      f"{run.get('why', '')}")

    if "import" not in ARGS.skip:
        imp = import_times(bpfast_ok)
        results["import_ms"] = imp
        print(f"\nImport time (wall, median, minus `python -c pass` = "
              f"{imp['python_startup_ms']:.0f} ms):")
        for k, v in imp.items():
            if k == "python_startup_ms" or isinstance(v, dict):
                continue
            print(f"  {k:20} {v if isinstance(v, str) else f'{v:.0f} ms'}")
        if imp.get("bpfast_modules_cumulative_ms"):
            print("  bpfast modules (cumulative ms): " + ", ".join(
                f"{k} {v}" for k, v in imp["bpfast_modules_cumulative_ms"].items()))
            print("  largest self times (ms): " + ", ".join(
                f"{k} {v}" for k, v in imp["top_self_ms"].items()))

    print_targets(results)
    results["wall_s"] = round(time.perf_counter() - t_start, 1)
    spreads = [r["spread"] for r in results["training"] + results["predict"] if r.get("spread")]
    results["typical_spread"] = statistics.median(spreads) if spreads else None
    if spreads and statistics.median(spreads) > NOISY_SPREAD:
        print(f"\nWARNING: the samples of one measurement differ a lot (typical median/min "
              f"{statistics.median(spreads):.2f}): something else was using the CPUs, maybe "
              "another virtual machine on the same host. Rerun on a quiet machine.")
    loads = [v["other"] + v["steal"] for v in results["other_load_percent"].values() if v]
    if loads and max(loads) > 10:
        print(f"\nWARNING: other processes (or the hypervisor) took up to {max(loads):.0f}% of "
              "the CPUs during the measurements; the timings are unreliable. Run again on a "
              "quiet machine.")

    os.makedirs(ARGS.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for name in (f"{stamp}.json", "latest.json"):
        with open(os.path.join(ARGS.out, name), "w") as f:
            json.dump(results, f, indent=1, default=str)
    png = plot(results, os.path.join(ARGS.out, "speedups.png"))
    print(f"\nWrote {os.path.join(ARGS.out, stamp + '.json')} and latest.json"
          + (f", {png}" if png else "") + f"  ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    if ARGS.worker:
        worker_main(ARGS.worker)
    else:
        main()
