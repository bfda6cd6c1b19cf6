#!/usr/bin/env python
"""Inference speed: bpfast's ``net.predict`` against ONNX Runtime running the network's
ONNX export and against PyTorch (eager, ``inference_mode``), on the M network of
bench/run.py (784-128-10, relu, float32), for one sample and for 1,024 samples.

    python bench/inference.py [--threads N] [--rounds R] [--seconds S]

All three run in this process with the same thread count (bpfast.set_num_threads,
ONNX Runtime's intra-op threads, torch.set_num_threads). The libraries take turns,
round after round, so drift in the machine's speed falls on all alike; each cell is
the median over rounds of the mean time per call within a round. Not a test: the
numbers depend on the machine and on what else runs on it.
"""
import argparse
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # imported from elsewhere, not run as a script: find common.py
    sys.path.insert(0, HERE)

import common  # noqa: E402

WIDTHS = common.SHAPES["M"]["widths"]  # bench/run.py's shape M: 784, 128, 10
SIZES = (1, 1024)


def build_network():
    bp = common.import_bpfast()
    layers = [bp.Dense(i, o, activation="relu") for i, o in zip(WIDTHS[:-2], WIDTHS[1:-1])]
    layers.append(bp.Dense(WIDTHS[-2], WIDTHS[-1]))
    return bp.Network(layers, dtype="float32", seed=0)


def runners(network, threads):
    """{name: function(X) -> output}, each library limited to `threads` threads."""
    found = {"bpfast": network.predict}
    try:
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(network.to_onnx().SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        found["onnxruntime"] = lambda X: session.run(None, {"input": X})[0]
    except ImportError:
        print("onnxruntime: skipped (not installed)")
    try:
        import torch
        torch.set_num_threads(threads)
        module = network.to_torch().eval()

        def run_torch(X):
            with torch.inference_mode():
                return module(torch.from_numpy(X)).numpy()
        found["torch"] = run_torch
    except ImportError:
        print("torch: skipped (not installed)")
    return found


def time_per_call(function, X, seconds):
    """Mean seconds per call over about `seconds` of calls."""
    calls, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        function(X)
        calls += 1
        now = time.perf_counter()
        if now >= deadline:
            return (now - start) / calls


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for every library (default: bpfast's default)")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--seconds", type=float, default=0.2, help="per cell and round")
    parser.add_argument("--only", default=None, metavar="NAMES",
                        help="comma-separated subset of bpfast,onnxruntime,torch (each one's "
                             "idle thread pools spin for a while after a call, which can slow "
                             "the next library down on a machine with few cores)")
    args = parser.parse_args()
    bp = common.import_bpfast()
    if args.threads is not None:
        bp.set_num_threads(args.threads)
    threads = bp.get_num_threads()
    network = build_network()
    functions = runners(network, threads)
    if args.only:
        functions = {name: functions[name] for name in args.only.split(",")}
    rng = np.random.default_rng(0)
    inputs = {n: rng.normal(size=(n, WIDTHS[0])).astype(np.float32) for n in SIZES}
    for X in inputs.values():  # same answers, and every library warmed up
        expected = network.predict(X)
        for name, function in functions.items():
            np.testing.assert_allclose(function(X), expected, rtol=1e-4, atol=1e-5,
                                       err_msg=name)
    samples = {(name, n): [] for name in functions for n in SIZES}
    for _ in range(args.rounds):
        for n, X in inputs.items():
            for name, function in functions.items():
                samples[name, n].append(time_per_call(function, X, args.seconds))
    print(f"M network {'-'.join(map(str, WIDTHS))}, float32, {threads} thread(s), "
          f"median of {args.rounds} rounds; bpfast {bp.__version__}")
    print(f"{'rows':>6} {'library':<12} {'us/call':>10} {'vs first':>10}")
    for n in SIZES:
        base = statistics.median(samples[next(iter(functions)), n])
        for name in functions:
            value = statistics.median(samples[name, n])
            print(f"{n:>6} {name:<12} {value * 1e6:>10.1f} {value / base:>9.2f}x")


if __name__ == "__main__":
    main()
