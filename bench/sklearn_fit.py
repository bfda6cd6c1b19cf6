#!/usr/bin/env python
"""Time ``fit`` of scikit-learn's MLPClassifier against bpfast.sklearn.MLPClassifier.

    python bench/sklearn_fit.py [--threads 1] [--repeats 5] [--solver adam] [--dtype float64]
                                [--out bench/results]

Both estimators get scikit-learn's default hyperparameters (hidden_layer_sizes=(100,),
relu, adam, alpha=1e-4, batch_size=min(200, n), max_iter=200, tol=1e-4), float64 (or
float32 for both with --dtype), the same random_state, on the digits set (1797 x 64,
10 classes) scaled by StandardScaler outside the timed region. Both use the same number
of threads: threadpoolctl limits every BLAS and OpenMP pool in the process, and bpfast's
own OpenMP count is set to match.

Each repeat fits both, in alternating order (so slow drift in the machine falls on both
alike), after one untimed warm-up fit each. Reported: the median wall time of ``fit``,
the epochs it ran (``n_iter_``; both stop by the same rule but need not stop at the
same epoch, since their shuffles differ), the median time per epoch, and the speed-up
(scikit-learn time / bpfast time) of both. The target (issue 5) is a fit >= 5x faster.
Results go to OUT/sklearn_fit-<timestamp>.json and OUT/sklearn_fit-latest.json.
"""
import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # imported from elsewhere, not run as a script: find common.py
    sys.path.insert(0, HERE)

import common  # noqa: E402  (finds bpfast: installed first, else src/ built in place)

TARGET_SPEEDUP = 5.0


def parse_arguments():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for every BLAS/OpenMP pool, both libraries (default 1)")
    parser.add_argument("--repeats", type=int, default=5, help="timed fits per library")
    parser.add_argument("--solver", default="adam", choices=("adam", "sgd", "lbfgs"))
    parser.add_argument("--dtype", default="float64", choices=("float64", "float32"),
                        help="dtype of X for both (scikit-learn keeps float32 input) and of "
                             "bpfast's network (default float64, the target's setting)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    return parser.parse_args()


def timed_fit(estimator, X, y):
    """(seconds, fitted estimator) of one fit, its ConvergenceWarning silenced."""
    from sklearn.exceptions import ConvergenceWarning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        start = time.perf_counter()
        estimator.fit(X, y)
        return time.perf_counter() - start, estimator


def main():
    args = parse_arguments()
    # imported here, not at the top: importing scikit-learn sets KMP_* variables
    import numpy as np
    import scipy
    import sklearn
    import threadpoolctl
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier as SklearnMLP
    from sklearn.preprocessing import StandardScaler

    bpfast = common.import_bpfast()
    from bpfast.sklearn import MLPClassifier as BpfastMLP
    X, y = load_digits(return_X_y=True)
    X = StandardScaler().fit_transform(X).astype(args.dtype)
    hyperparameters = dict(solver=args.solver, random_state=0)
    makers = {
        "sklearn": lambda: SklearnMLP(**hyperparameters),
        "bpfast": lambda: BpfastMLP(dtype=args.dtype, **hyperparameters),
    }
    load_before = os.getloadavg()
    with threadpoolctl.threadpool_limits(limits=args.threads):
        previous_threads = bpfast.get_num_threads()
        bpfast.set_num_threads(args.threads)
        try:
            pools = [{key: pool.get(key) for key in
                      ("user_api", "internal_api", "num_threads", "version", "filepath")}
                     for pool in threadpoolctl.threadpool_info()]
            for make in makers.values():  # warm-up: imports, first allocations
                timed_fit(make(), X, y)
            runs = {name: [] for name in makers}
            for repeat in range(args.repeats):
                order = list(makers) if repeat % 2 == 0 else list(reversed(makers))
                for name in order:
                    seconds, model = timed_fit(makers[name](), X, y)
                    runs[name].append({"seconds": seconds, "n_iter": int(model.n_iter_),
                                       "train_accuracy": float(model.score(X, y))})
        finally:
            bpfast.set_num_threads(previous_threads)
    load_after = os.getloadavg()

    summary = {}
    for name, records in runs.items():
        seconds = [record["seconds"] for record in records]
        per_epoch = [record["seconds"] / record["n_iter"] for record in records]
        summary[name] = {
            "median_fit_s": statistics.median(seconds),
            "min_fit_s": min(seconds),
            "median_epoch_ms": 1e3 * statistics.median(per_epoch),
            "min_epoch_ms": 1e3 * min(per_epoch),
            "n_iter": [record["n_iter"] for record in records],
            "train_accuracy": statistics.median(r["train_accuracy"] for r in records),
        }
    speedup_fit = summary["sklearn"]["median_fit_s"] / summary["bpfast"]["median_fit_s"]
    speedup_epoch = summary["sklearn"]["median_epoch_ms"] / summary["bpfast"]["median_epoch_ms"]

    print(f"digits {X.shape}, solver={args.solver}, {args.dtype}, {args.threads} thread(s), "
          f"{args.repeats} repeats; load average {load_before[0]:.2f} -> {load_after[0]:.2f}")
    print(f"{'':10}{'fit (median)':>14}{'per epoch':>12}{'epochs':>18}{'train acc':>11}")
    for name, row in summary.items():
        print(f"{name:10}{row['median_fit_s']:>12.3f} s{row['median_epoch_ms']:>9.2f} ms"
              f"{str(sorted(set(row['n_iter']))):>18}{row['train_accuracy']:>11.4f}")
    verdict = "meets" if speedup_fit >= TARGET_SPEEDUP else "misses"
    print(f"speed-up of fit: {speedup_fit:.2f}x ({verdict} the {TARGET_SPEEDUP:g}x target); "
          f"per epoch: {speedup_epoch:.2f}x")

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    result = {
        "benchmark": "sklearn_fit",
        "timestamp": stamp,
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "dataset": {"name": "digits", "shape": list(X.shape), "scaled": "StandardScaler"},
        "hyperparameters": {**hyperparameters, "others": "scikit-learn defaults",
                            "dtype": args.dtype},
        "threads": args.threads,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "load_average_before_after": [load_before, load_after],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {"bpfast": bpfast.__version__, "scikit-learn": sklearn.__version__,
                     "numpy": np.__version__, "scipy": scipy.__version__},
        "thread_pools": pools,
        "runs": runs,
        "summary": summary,
        "speedup_fit": speedup_fit,
        "speedup_per_epoch": speedup_epoch,
        "target_speedup": TARGET_SPEEDUP,
        "meets_target": speedup_fit >= TARGET_SPEEDUP,
    }
    os.makedirs(args.out, exist_ok=True)
    for name in (f"sklearn_fit-{stamp}.json", "sklearn_fit-latest.json"):
        with open(os.path.join(args.out, name), "w") as file:
            json.dump(result, file, indent=1)
    print(f"wrote {os.path.join(args.out, f'sklearn_fit-{stamp}.json')}")


if __name__ == "__main__":
    main()
