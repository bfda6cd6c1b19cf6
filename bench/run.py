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

The shared machinery (shapes, threads, timing, statistics, the worker processes) is in
common.py, each competitor's step builders in competitors/. Importing this file does
nothing: main() parses the arguments and sets the threads.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # imported from elsewhere, not run as a script: find common.py
    sys.path.insert(0, HERE)

import common  # noqa: E402
from common import (  # noqa: E402
    NOISY_SPREAD,
    OPTIMIZERS,
    SHAPES,
    CpuMonitor,
    flops_per_step,
    load_note,
    print_noise,
    summarize,
)

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
    if args.threads is None:
        args.threads = len(common.available_cpus())
    args.timing = common.timing(args.quick)
    return args


def run_training(args, workers, shape, opt, peak):
    spec = SHAPES[shape]
    rows, samples = {}, {}
    for name, (label, wname) in TRAIN_ROWS.items():
        status = common.worker_status(workers, wname, args.skip)
        rows[name] = {"shape": shape, "optimizer": opt, "impl": name, "label": label,
                      "batch": spec["batch"], "widths": spec["widths"],
                      "status": "ok" if status == "ok" else "skipped"}
        if status != "ok":
            rows[name]["why"] = status.removeprefix("skipped: ")
        samples[name] = []
    rounds = common.xl_rounds(args.quick) if shape == "XL" else args.timing["rounds"]
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
        summarize(row, samples[name], flops, peak, args.stat)
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


def run_predict(args, workers, peak):
    widths = SHAPES["M"]["widths"]
    rows = []
    for n in (1, 1024):
        by_name, samples = {}, {}
        for name, (label, wname) in PREDICT_ROWS.items():
            status = common.worker_status(workers, wname, args.skip)
            by_name[name] = {"shape": "M", "n": n, "impl": name, "label": label,
                             "status": "ok" if status == "ok" else "skipped"}
            if status != "ok":
                by_name[name]["why"] = status.removeprefix("skipped: ")
            samples[name] = []
        for _ in range(args.timing["rounds"]):
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
            summarize(row, samples[name], flops, peak, args.stat)
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


def check_consistency(args, workers, opt, steps=3):
    """Same init, same batches: the losses of the first steps must agree, or some
    implementation is not doing the same work. Reference: torch (numpy without it)."""
    losses = {}
    for name in ("bpfast", "torch", "jax", "numpy"):
        if common.worker_status(workers, TRAIN_ROWS[name][1], args.skip) != "ok":
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


def import_times(args, bpfast_ok):
    reps = 3 if args.quick else 5
    base, _ = subprocess_seconds("pass", reps)
    result = {"python_startup_ms": round(base * 1e3, 1)}
    modules = {"bpfast": "import bpfast", "numpy+scipy.linalg": "import numpy, scipy.linalg",
               "torch": "import torch", "jax": "import jax, jax.numpy"}
    if args.quick:  # the competitors' import times do not change: full runs only
        modules = {"bpfast": modules["bpfast"]}
    for name, code in modules.items():
        if name in args.skip or (name == "bpfast" and not bpfast_ok):
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


def memory(args, workers):
    shape = SHAPES["L"]
    steps = 20 if args.quick else 50
    widths = ",".join(map(str, shape["widths"]))
    n_params = sum(i * o + o for i, o in zip(shape["widths"][:-1], shape["widths"][1:]))
    result = {"shape": "L", "steps": steps, "params_mib": round(n_params * 4 / 2 ** 20, 2),
              "runs": []}
    for opt in OPTIMIZERS:
        for impl in ("bpfast", "torch"):
            status = common.worker_status(workers, impl, args.skip)
            if status != "ok":
                result["runs"].append({"impl": impl, "optimizer": opt, "status": "skipped",
                                       "why": status.removeprefix("skipped: ")})
                continue
            cmd = [sys.executable, os.path.join(HERE, "memprobe.py"), impl, opt,
                   str(args.threads), str(steps), widths, str(shape["batch"])]
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

def print_training_table(args, opt, rows, peak, background):
    bg = load_note(background)
    print(f"\nTraining step: {OPTIMIZERS[opt]}, float32, ReLU, cross-entropy, "
          f"{args.threads} thread(s); GEMM peak {peak:.1f} GFLOP/s{bg}")
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
    print(f"  us/step: {args.stat} (min); bpfast x = competitor time / bpfast train_step time "
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


def plot(args, results, path):
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
        shapes = [s for s in args.shapes if any(r["shape"] == s for r in rows)]
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
    fig.suptitle(f"bpfast training step speed-up, {args.threads} thread(s)")
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


def main(argv=None):
    """Parse the arguments, limit every library's threads (CPU affinity and environment,
    inherited by the workers), then run the benchmark, or with --worker serve as one
    competitor's worker process."""
    args = parse_args(argv)
    common.configure_threads(args.threads)
    if args.worker:
        common.worker_main(args.worker, args.threads, args.quick)
        return 0
    return benchmark(args)


def benchmark(args):
    import numpy as np  # after configure_threads, on purpose

    t_start = time.perf_counter()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    print(f"bpfast benchmark ({'quick' if args.quick else 'full'}), {args.threads} thread(s) "
          f"of {os.cpu_count()} cores, CPU: {cpu_model()}"
          + (f", load average {load:.2f}" if load is not None else ""))
    workers = common.start_workers([w for w in WORKER_LIBRARIES if w not in args.skip],
                                   args.threads, args.quick)
    versions = {}
    for name, w in workers.items():
        lib = WORKER_LIBRARIES[name][0]
        versions[lib] = w.hello.get("versions", {}).get(lib) or w.hello.get("error")
    versions["numpy"] = np.__version__
    for name in WORKER_LIBRARIES:
        lib = WORKER_LIBRARIES[name][0]
        if name in args.skip:
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
        if common.worker_status(workers, name, args.skip) == "ok":
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
        "mode": "quick" if args.quick else "full", "command": sys.argv, "stat": args.stat,
        "threads": args.threads, "cpu_count": os.cpu_count(), "cpu": cpu_model(),
        "load_average_at_start": load, "platform": platform.platform(),
        "python": sys.version.split()[0], "versions": versions, "bpfast_config": config,
        "thread_pools": pools, "timing": args.timing, "gemm_gflops": gemm_all,
        "gemm_peak_gflops": peak, "training": [], "predict": [], "consistency": [],
        "other_load_percent": {},  # per table: other processes and steal
    }

    print("\nConsistency: loss after 3 steps on M from the same init (max |diff| vs "
          "reference over the 3 steps)")
    for opt in OPTIMIZERS:
        c = check_consistency(args, workers, opt)
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
        for shape in args.shapes:
            rows += run_training(args, workers, shape, opt, peak)
            if shape == "XL":
                for w in workers.values():
                    w.ask(op="forget", shape="XL")
        results["training"] += rows
        background = monitor.percents()
        results["other_load_percent"][opt] = background
        print_training_table(args, opt, rows, peak, background)

    if "predict" not in args.skip:
        monitor = CpuMonitor(pids)
        results["predict"] = run_predict(args, workers, peak)
        background = monitor.percents()
        results["other_load_percent"]["predict"] = background
        print_predict_table(results["predict"], background)
    # did the machine's speed change?
    if common.worker_status(workers, "numpy", args.skip) == "ok":
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

    if "memory" not in args.skip:
        mem = memory(args, workers)
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

    if "import" not in args.skip:
        imp = import_times(args, bpfast_ok)
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

    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    for name in (f"{stamp}.json", "latest.json"):
        with open(os.path.join(args.out, name), "w") as f:
            json.dump(results, f, indent=1, default=str)
    png = plot(args, results, os.path.join(args.out, "speedups.png"))
    print(f"\nWrote {os.path.join(args.out, stamp + '.json')} and latest.json"
          + (f", {png}" if png else "") + f"  ({results['wall_s']:.0f} s)")



if __name__ == "__main__":
    sys.exit(main())
