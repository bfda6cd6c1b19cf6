"""Two bpfast trees side by side: the S/M/L train_step of each, in alternating fresh processes.

    python bench/ab.py BEFORE_SRC AFTER_SRC [--rounds 16] [--threads 1] [--shapes S,M,L]

BEFORE_SRC and AFTER_SRC are folders that hold a built ``bpfast`` package (a
checkout's ``src/`` after ``python setup.py build_ext --inplace``). Each round runs
one process per tree, in alternating order, and each process times every shape
with SGD (momentum) and Adam, float32, as ``bench/run.py`` builds them. Reported:
the median over rounds of each process's median, the minimum over rounds, and the
median of the paired after/before ratios (the steadiest number on a shared machine).
Used for the engine rewrite (bench/README.md, "Typed engines: before and after").
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from common import OPTIMIZERS, SHAPES

CHILD = r"""
import json, sys, time
import numpy as np
import bpfast as bp
shapes, optimizers, budget = json.loads(sys.argv[1]), json.loads(sys.argv[2]), float(sys.argv[3])
out = {"file": bp.__file__}
for name, shape in shapes.items():
    widths, batch = shape["widths"], shape["batch"]
    for opt_name, opt_text in optimizers.items():
        rng = np.random.default_rng(0)
        layers = [bp.Dense(i, o, activation="relu") for i, o in zip(widths[:-2], widths[1:-1])]
        layers.append(bp.Dense(widths[-2], widths[-1]))
        net = bp.Network(layers, dtype="float32", seed=0)
        X = [rng.standard_normal((batch, widths[0])).astype(np.float32) for _ in range(4)]
        y = [rng.integers(0, widths[-1], batch) for _ in range(4)]
        loss, opt = bp.CrossEntropy(), eval("bp." + opt_text)
        for i in range(20):
            net.train_step(X[i % 4], y[i % 4], loss, opt)
        start, calls = time.perf_counter(), 0
        while time.perf_counter() - start < 0.05:
            net.train_step(X[calls % 4], y[calls % 4], loss, opt)
            calls += 1
        per_sample, samples = max(1, calls // 5), []
        end = time.perf_counter() + budget
        while time.perf_counter() < end or len(samples) < 5:
            start = time.perf_counter()
            for i in range(per_sample):
                net.train_step(X[i % 4], y[i % 4], loss, opt)
            samples.append((time.perf_counter() - start) / per_sample * 1e6)
        out[f"{name}/{opt_name}"] = samples
print(json.dumps(out))
"""


def run_tree(tree, threads, shapes, budget):
    env = dict(os.environ, PYTHONPATH=tree, OMP_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads))
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(shapes),
                             json.dumps(OPTIMIZERS), "0.25"],
                            env=env, capture_output=True, text=True, check=True)
    return json.loads(result.stdout)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("before")
    parser.add_argument("after")
    parser.add_argument("--rounds", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shapes", default="S,M,L")
    parser.add_argument("--out", default=None, help="write the samples as JSON here")
    args = parser.parse_args(argv)
    shapes = {name: SHAPES[name] for name in args.shapes.split(",")}
    trees = {"before": os.path.abspath(args.before), "after": os.path.abspath(args.after)}
    runs = {"before": [], "after": []}
    started = time.time()
    for r in range(args.rounds):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        for label in order:
            runs[label].append(run_tree(trees[label], args.threads, shapes, 0.25))
    for label in runs:
        print(f"{label}: {runs[label][0].pop('file')}")
        for run in runs[label][1:]:
            run.pop("file")
    print(f"{args.rounds} rounds, {args.threads} thread(s), {time.time() - started:.0f} s; "
          "microseconds per step")
    print(f"{'case':10} {'before med':>11} {'after med':>11} {'before min':>11} "
          f"{'after min':>11} {'paired med ratio':>17} {'paired min ratio':>17}")
    for case in runs["before"][0]:
        before = [(statistics.median(run[case]), min(run[case])) for run in runs["before"]]
        after = [(statistics.median(run[case]), min(run[case])) for run in runs["after"]]
        med_ratio = statistics.median(a[0] / b[0] for a, b in zip(after, before))
        min_ratio = statistics.median(a[1] / b[1] for a, b in zip(after, before))
        print(f"{case:10} {statistics.median(b[0] for b in before):11.2f} "
              f"{statistics.median(a[0] for a in after):11.2f} "
              f"{min(b[1] for b in before):11.2f} {min(a[1] for a in after):11.2f} "
              f"{med_ratio:17.3f} {min_ratio:17.3f}")
    if args.out:
        with open(args.out, "w") as file:
            json.dump({"trees": trees, "threads": args.threads, "runs": runs}, file)


if __name__ == "__main__":
    main()
