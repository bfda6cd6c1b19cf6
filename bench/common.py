"""What every bench script shares: finding bpfast, the shapes, thread settings, timing,
statistics and the worker processes that keep each library apart.

Importing this module changes nothing (no arguments, environment, affinity or
sys.path): the scripts' ``main`` functions call what they need. It imports only the
standard library, so that ``configure_threads`` can still run before NumPy loads.
"""
import contextlib
import io
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SRC = os.path.join(REPO, "src")


# ---------------------------------------------------------------------------------------
# Finding bpfast
# ---------------------------------------------------------------------------------------

def import_bpfast():
    """Import bpfast: the one Python finds first (installed, or on PYTHONPATH), else the
    repository's src/ built in place.

    src/ is only a fallback: put first, an unbuilt tree there would hide a working
    installed package. When src/ is used, PYTHONPATH is set so that subprocesses (the
    memory and import-time probes) find the same copy.
    """
    try:
        import bpfast
        return bpfast
    except Exception as first:
        if not os.path.isdir(os.path.join(SRC, "bpfast")) or SRC in sys.path:
            raise first
        for name in [m for m in sys.modules if m == "bpfast" or m.startswith("bpfast.")]:
            del sys.modules[name]
        sys.path.insert(0, SRC)
        import bpfast
        os.environ["PYTHONPATH"] = os.pathsep.join(
            p for p in (SRC, os.environ.get("PYTHONPATH")) if p)
        return bpfast


# ---------------------------------------------------------------------------------------
# What is measured, and how long
# ---------------------------------------------------------------------------------------

SHAPES = {  # layer widths (input, hidden..., classes) and batch size
    "S": {"widths": [64, 32, 10], "batch": 32},
    "M": {"widths": [784, 128, 10], "batch": 64},
    "L": {"widths": [784, 512, 512, 10], "batch": 128},
    "XL": {"widths": [1024, 2048, 2048, 1024], "batch": 256},
}
OPTIMIZERS = {"sgd": "SGD(lr=0.01, momentum=0.9)", "adam": "Adam(lr=1e-3)"}

TIMING_QUICK = {"warmup_s": 0.02, "warmup_calls": 2, "sample_s": 0.001, "budget_s": 0.05,
                "min_samples": 3, "max_samples": 10, "rounds": 1}
TIMING_FULL = {"warmup_s": 0.1, "warmup_calls": 3, "sample_s": 0.002, "budget_s": 0.4,
               "min_samples": 5, "max_samples": 40, "rounds": 3}


def timing(quick):
    """The sampling settings of `measure` for a quick or a full run."""
    return dict(TIMING_QUICK if quick else TIMING_FULL)


def xl_rounds(quick):
    return 1 if quick else 2


def n_batches(shape, quick):
    """Batches in the data set that the training rows cycle through."""
    return (4 if quick else 8) if shape == "XL" else 32


# ---------------------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------------------

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


def limit_loaded_pools(n, libs):
    """After the imports, set every thread pool already loaded to n threads; returns the
    threadpoolctl handle (keep it alive) or None."""
    limits = None
    try:  # threadpoolctl only reaches pools already loaded
        import threadpoolctl
        limits = threadpoolctl.threadpool_limits(limits=n)
    except ImportError:
        pass
    if "torch" in libs:
        libs["torch"].set_num_threads(n)
    if "bpfast" in libs and hasattr(libs["bpfast"], "set_num_threads"):
        libs["bpfast"].set_num_threads(n)
    return limits


def bpfast_config(bp):
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
# The problem every implementation solves, and the clock
# ---------------------------------------------------------------------------------------

class Problem:
    """One shape: a data set of n_batches batches, the batches as separate C-contiguous
    arrays (training steps cycle through them, as training does), and the initial weights
    every implementation starts from (PyTorch's default init, drawn once with NumPy)."""

    def __init__(self, shape, n_batches):
        import numpy as np  # here, not at the top: configure_threads comes first
        from numpy_mlp import init_params
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


def measure(fn, timing, per_call=1):
    """Warm up, then time fn in samples of `inner` back-to-back calls (each sample lasts
    about timing['sample_s'] so the clock's resolution does not matter); return one
    per-call time in seconds per sample. Calls that are whole epochs (per_call > 1)
    get one warm-up call and three samples at least."""
    t = timing
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


def gemm(functions, quick, n=2048):
    """Time each of `functions` (name -> f() computing one float32 n x n @ n x n product):
    median and best over a few runs, in GFLOP/s."""
    reps = 3 if quick else 7
    result = {}
    for name, fn in functions.items():
        fn()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        result[name] = {"gflops": 2.0 * n ** 3 / statistics.median(times) / 1e9,
                        "best_gflops": 2.0 * n ** 3 / min(times) / 1e9}
    return result


def gemm_operands(n=2048):
    import numpy as np
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    return a, b, np.empty((n, n), np.float32)


# ---------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------

NOISY_SPREAD = 1.15


def summarize(row, samples, flops, peak, stat):
    """Fill a row's times from its samples (seconds per step): us is the `stat` statistic
    ("median" or "min"), spread = median / min (near 1 on a quiet machine)."""
    if row["status"] == "ok" and samples:
        t = statistics.median(samples) if stat == "median" else min(samples)
        row["us"] = t * 1e6
        row["us_median"] = statistics.median(samples) * 1e6
        row["us_min"] = min(samples) * 1e6
        row["spread"] = round(row["us_median"] / row["us_min"], 3)
        row["gflops"] = flops / t / 1e9
        row["pct_peak"] = 100.0 * row["gflops"] / peak
    elif row["status"] == "ok":
        row["status"], row["why"] = "error", "no samples"
    row["n_samples"] = len(samples)


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


# ---------------------------------------------------------------------------------------
# Process isolation: one worker process per competitor
# ---------------------------------------------------------------------------------------

MARK = "@@bench "   # prefix of the worker's answers on stdout (anything else is ignored)


def short_error(e):
    msg = f"{type(e).__name__}: {e}".replace("\n", " ")
    return msg if len(msg) < 160 else msg[:157] + "..."


def load_competitor(worker, threads):
    """Import a worker's competitor module and its libraries (each optional), then set
    every thread pool to `threads`. Returns (module, libs, status): libs maps a library
    name to its module for those that imported, status to a version or "skipped: why"."""
    import competitors
    import numpy as np
    module = competitors.load(worker)
    libs, status = {}, {}
    for name, importer in module.LIBRARIES.items():
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                libs[name] = importer()
            status[name] = getattr(libs[name], "__version__", "?")
        except ImportError as e:
            status[name] = f"skipped: not installed ({e})"
        except Exception as e:  # a broken install: report, never stop the run
            status[name] = f"skipped: import failed ({type(e).__name__}: {e})"
    libs["numpy"] = np
    status["numpy"] = np.__version__
    libs["_limits"] = limit_loaded_pools(threads, libs)
    return module, libs, status


def worker_main(worker, threads, quick):
    """Answer one JSON request per stdin line with one MARK-prefixed JSON line."""
    module, libs, lib_status = load_competitor(worker, threads)
    needed = "numpy" if worker == "numpy" else next(iter(module.LIBRARIES))
    train_factories, predict_factories = module.TRAIN, module.PREDICT
    measure_timing = timing(quick)
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
                ok = needed in libs
                bp = libs.get("bpfast")
                answer({"ok": ok, "status": lib_status.get(needed), "versions": lib_status,
                        "bpfast_config": bpfast_config(bp), "thread_pools": thread_pools(),
                        "bpfast_file": os.path.dirname(bp.__file__) if bp else None,
                        "pythonpath": os.environ.get("PYTHONPATH")})
            elif op == "train":  # time one row; the model persists across rounds
                key = ("train", req["row"], req["shape"], req["opt"])
                if key not in steps:
                    p = problem(req["shape"], n_batches(req["shape"], quick))
                    steps[key] = train_factories[req["row"]](p, req["opt"])
                fn, per_call = steps[key]
                answer({"ok": True, "samples": [s / per_call for s in
                                                measure(fn, measure_timing, per_call)]})
            elif op == "predict":
                key = ("predict", req["row"], req["n"])
                if key not in steps:
                    steps[key] = (predict_factories[req["row"]](problem("M", 16), req["n"]),
                                  1)
                answer({"ok": True, "samples": measure(steps[key][0], measure_timing)})
            elif op == "losses":  # first steps from the shared init, for the consistency check
                step, _ = train_factories[req["row"]](problem("M", 4), req["opt"])
                losses = [step() for _ in range(req["steps"])]
                losses = [float(v.detach() if hasattr(v, "detach") else v) for v in losses]
                answer({"ok": True, "losses": losses})
            elif op == "gemm":
                functions = {}
                make = getattr(module, "gemm_functions", None)
                if make is not None and all(name in libs for name in module.LIBRARIES):
                    functions = make(*gemm_operands())
                answer({"ok": True, "gemm": gemm(functions, quick)})
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


class Worker:
    """One competitor's process (bench/run.py --worker NAME), spoken to by JSON lines."""

    def __init__(self, name, threads, quick):
        self.name = name
        cmd = [sys.executable, os.path.join(HERE, "run.py"), "--worker", name,
               "--threads", str(threads)] + (["--quick"] if quick else [])
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


def start_workers(names, threads, quick):
    workers = {w: Worker(w, threads, quick) for w in names}   # they import in parallel
    for w in workers.values():
        w.hello = w.ask(op="hello")
    return workers


def worker_status(workers, name, skip):
    """'ok' or why this worker's rows are empty."""
    if name in skip:
        return "skipped: --skip"
    w = workers.get(name)
    if w is None or w.hello is None:
        return "skipped"
    if not w.hello.get("ok"):
        return w.hello.get("status") or w.hello.get("error") or "skipped"
    return "ok"
