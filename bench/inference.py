#!/usr/bin/env python
"""Inference speed: bpfast's ``net.predict`` against ONNX Runtime running the network's
ONNX export and against PyTorch (eager, ``inference_mode``), on the M network of
bench/run.py (784-128-10, relu, float32), for one sample and for 1,024 samples.

    python bench/inference.py [--threads N] [--rounds R] [--only NAMES] [--quick]
                                [--stat median|min]

Each library runs in its own worker process (this script with ``--worker NAME``), all
with the same thread count (bpfast.set_num_threads, ONNX Runtime's intra-op threads,
torch.set_num_threads, and the BLAS/OpenMP variables), so one library's idle thread
pools, which spin for a while after a call, never take a core from the next one; the
parent waits until a worker is idle before asking the next. Every worker builds the
same network (seed 0) and checks its outputs against ``net.predict`` before timing.
The libraries take turns, round after round, so drift in the machine's speed falls
on all alike; each cell is the median (or ``--stat min``) over the samples of all
rounds (common.measure: warm-up, then samples of back-to-back calls). Not a test: the
numbers depend on the machine and on what else runs on it. Output: a Markdown table
on stdout.
"""
import argparse
import functools
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # imported from elsewhere, not run as a script: find common.py
    sys.path.insert(0, HERE)

import common  # noqa: E402

WIDTHS = common.SHAPES["M"]["widths"]  # bench/run.py's shape M: 784, 128, 10
SIZES = (1, 1024)
LIBRARIES = ("bpfast", "onnxruntime", "torch")


def build_network(bp):
    layers = [bp.Dense(i, o, activation="relu") for i, o in zip(WIDTHS[:-2], WIDTHS[1:-1])]
    layers.append(bp.Dense(WIDTHS[-2], WIDTHS[-1]))
    return bp.Network(layers, dtype="float32", seed=0)


def make_runner(name, network, threads):
    """(function(X) -> output, version) for one library limited to `threads` threads."""
    if name == "bpfast":
        import bpfast
        return network.predict, bpfast.__version__
    if name == "onnxruntime":
        import onnxruntime as ort
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(network.to_onnx().SerializeToString(), options,
                                       providers=["CPUExecutionProvider"])
        return (lambda X: session.run(None, {"input": X})[0]), ort.__version__
    if name == "torch":
        import torch
        torch.set_num_threads(threads)
        module = network.to_torch().eval()

        def run_torch(X):
            with torch.inference_mode():
                return module(torch.from_numpy(X)).numpy()
        return run_torch, torch.__version__
    raise ValueError(f"unknown library {name!r}")


def worker_main(name, threads, quick):
    """One library's process: answers JSON lines on stdin (hello, time, quit)."""
    common.configure_threads(threads)  # before NumPy and the libraries load their pools
    import numpy as np

    def answer(obj):
        sys.stdout.write(common.MARK + json.dumps(obj) + "\n")
        sys.stdout.flush()

    bp = common.import_bpfast()
    bp.set_num_threads(threads)
    network = build_network(bp)
    rng = np.random.default_rng(0)
    inputs = {n: rng.normal(size=(n, WIDTHS[0])).astype(np.float32) for n in SIZES}
    try:
        function, version = make_runner(name, network, threads)
        for X in inputs.values():  # the same answers as net.predict, and warmed up
            np.testing.assert_allclose(function(X), network.predict(X), rtol=1e-4,
                                       atol=1e-5, err_msg=name)
        status = {"ok": True, "version": version}
    except ImportError as error:
        function, status = None, {"ok": False, "error": f"not installed ({error})"}
    except Exception as error:  # a broken install, or outputs that differ: say so
        function, status = None, {"ok": False, "error": common.short_error(error)}
    timing = common.timing(quick)
    timing["rounds"] = 1
    for line in sys.stdin:
        request = json.loads(line)
        if request["op"] == "hello":
            answer({**status, "threads": bp.get_num_threads()})
        elif request["op"] == "time":
            X = inputs[request["n"]]
            call = functools.partial(function, X)
            answer({"ok": True, "samples": common.measure(call, timing)})
        elif request["op"] == "quit":
            answer({"ok": True})
            return


class Worker(common.Worker):
    """This script's worker for one library (common.Worker's protocol and settling)."""

    def __init__(self, name, threads, quick):
        self.name, self.hello = name, None
        command = [sys.executable, os.path.abspath(__file__), "--worker", name,
                   "--threads", str(threads)] + (["--quick"] if quick else [])
        self.proc = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, bufsize=1)


def table(samples, names, threads, rounds, versions, stat):
    """The Markdown table: microseconds per call and each library's time / bpfast's."""
    statistic = statistics.median if stat == "median" else min
    lines = [f"M network {'-'.join(map(str, WIDTHS))}, relu, float32, {threads} thread(s), "
             f"{stat} over {rounds} interleaved rounds; "
             + ", ".join(f"{name} {versions[name]}" for name in names), ""]
    header = ["rows"] + [f"{name} us/call" for name in names] + \
        [f"{name} / bpfast" for name in names if name != "bpfast"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---:" for _ in header) + "|")
    for n in SIZES:
        medians = {name: statistic(samples[name, n]) for name in names}
        cells = [str(n)] + [f"{medians[name] * 1e6:.1f}" for name in names]
        if "bpfast" in medians:
            cells += [f"{medians[name] / medians['bpfast']:.2f}x" for name in names
                      if name != "bpfast"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for every library (default: every core this process "
                             "may use)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="shorter samples (noisier)")
    parser.add_argument("--stat", choices=("median", "min"), default="median",
                        help="the statistic of the samples reported (min: steadier on a "
                             "busy machine)")
    parser.add_argument("--only", default=",".join(LIBRARIES), metavar="NAMES",
                        help="comma-separated subset of " + ",".join(LIBRARIES))
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    threads = args.threads or len(common.available_cpus())
    if args.worker:
        return worker_main(args.worker, threads, args.quick)
    names = [name for name in args.only.split(",") if name]
    unknown = set(names) - set(LIBRARIES)
    if unknown:
        parser.error(f"--only: unknown {sorted(unknown)}; choose from {LIBRARIES}")
    workers = {name: Worker(name, threads, args.quick) for name in names}  # import at once
    try:
        versions = {}
        for name, worker in list(workers.items()):
            hello = worker.ask(op="hello")
            if not hello.get("ok"):
                print(f"{name}: skipped: {hello.get('error')}")
                worker.close()
                del workers[name]
            else:
                versions[name] = hello["version"]
        names = list(workers)
        samples = {(name, n): [] for name in names for n in SIZES}
        for _ in range(args.rounds):
            for n in SIZES:
                for name, worker in workers.items():
                    answer = worker.ask(op="time", n=n)
                    if not answer.get("ok"):
                        raise SystemExit(f"{name}: {answer.get('error')}")
                    samples[name, n].extend(answer["samples"])
                    worker.settle()  # its pools idle before the next library runs
        print(table(samples, names, threads, args.rounds, versions, args.stat))
    finally:
        for worker in workers.values():
            worker.close()


if __name__ == "__main__":
    main()
