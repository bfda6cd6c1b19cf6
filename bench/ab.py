"""Two bpfast trees side by side: the S/M/L train_step of each, in alternating fresh processes.

    python bench/ab.py BEFORE_SRC AFTER_SRC [--rounds 16] [--threads 1] [--shapes S,M,L]

BEFORE_SRC and AFTER_SRC are folders that hold a built ``bpfast`` package (a
checkout's ``src/`` after ``python setup.py build_ext --inplace``). Each round runs
one process per tree, in alternating order, and each process times every shape
with SGD (momentum) and Adam, float32, with ``bench/run.py``'s problems, step
builder (``competitors/bpfast_steps.py``) and timing (``common.measure``). Reported:
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

from common import SHAPES

BENCH = os.path.dirname(os.path.abspath(__file__))

# the child times what bench/run.py times: its Problem, its bpfast step builder, its
# measure() with the full timing settings
CHILD = r"""
import json, sys
from common import OPTIMIZERS, TIMING_FULL, Problem, import_bpfast, measure
from competitors import bpfast_steps
out = {"file": import_bpfast().__file__}
for name in json.loads(sys.argv[1]):
    problem = Problem(name, 4)
    for opt in OPTIMIZERS:
        step, per_call = bpfast_steps.train_step(problem, opt)
        out[f"{name}/{opt}"] = [t * 1e6 for t in measure(step, TIMING_FULL, per_call)]
print(json.dumps(out))
"""


def run_tree(tree, threads, shapes):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join((tree, BENCH)),
               OMP_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads))
    result = subprocess.run([sys.executable, "-c", CHILD, json.dumps(shapes)],
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
    shapes = [name for name in args.shapes.split(",") if name in SHAPES]
    trees = {"before": os.path.abspath(args.before), "after": os.path.abspath(args.after)}
    runs = {"before": [], "after": []}
    started = time.time()
    for r in range(args.rounds):
        order = ("before", "after") if r % 2 == 0 else ("after", "before")
        for label in order:
            runs[label].append(run_tree(trees[label], args.threads, shapes))
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
