#!/usr/bin/env python
"""Dropout and BatchNorm1d in the training step: bpfast with and without them, and
PyTorch eager with the same layers.

    python bench/layers.py [--rounds 5] [--threads 1] [--quick] [--out bench/results]

Problems are bench/run.py's (common.Problem: the same data, batches and initial
weights, float32, cross-entropy). Variants:

    M plain        784-128-10 ReLU, batch 64 (run.py's M)
    M dropout      the same with Dropout(0.2) after the hidden layer
    L plain        784-512-512-10 ReLU, batch 128 (run.py's L)
    L batchnorm    each hidden Dense without activation, then BatchNorm1d, then ReLU

each timed as one train_step (SGD with momentum 0.9 and Adam, as run.py) in bpfast and
in PyTorch eager (nn.Sequential of Linear, Dropout, BatchNorm1d, ReLU; torch.optim).
The GEMM floor of each shape is its step's matrix products alone (forward, dW, and dX
but the first layer's), each one NumPy matmul on OpenBLAS's own threads: no step that
multiplies with this machine's BLAS is faster, so torch / floor bounds the speed-up
over torch that any implementation could reach.
Each library runs in its own fresh process per round (this file with --worker),
the libraries alternating, so that neither's thread pools affect the other's and slow
drift falls on both. Reported: the median over rounds of each process's median time,
the ratio to bpfast's plain step of the same shape (target <= 1.15x), and torch's time
over bpfast's (target >= 2x). Targets: issue 15.
"""
import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

VARIANTS = {"M plain": ("M", None), "M dropout": ("M", "dropout"),
            "L plain": ("L", None), "L batchnorm": ("L", "batchnorm")}
OPTIMIZER_NAMES = ("sgd", "adam")
TARGET_OVERHEAD = 1.15   # bpfast with the layers / bpfast plain, at most
TARGET_SPEEDUP = 2.0     # torch eager / bpfast with the same layers, at least
DROPOUT_P = 0.2


def bpfast_step(problem, extra, opt):
    from common import import_bpfast
    bp = import_bpfast()
    hidden = len(problem.weights) - 1
    layers = []
    for index, W in enumerate(problem.weights):
        last = index == hidden
        if extra == "batchnorm" and not last:
            layers += [bp.Dense(W.shape[1], W.shape[0]), bp.BatchNorm1d(W.shape[0]),
                       bp.Activation("relu")]
        else:
            layers.append(bp.Dense(W.shape[1], W.shape[0], None if last else "relu"))
        if extra == "dropout" and not last:
            layers.append(bp.Dropout(DROPOUT_P))
    net = bp.Network(layers, dtype="float32", seed=0)
    dense = [layer for layer in net.layers if isinstance(layer, bp.Dense)]
    for layer, W, b in zip(dense, problem.weights, problem.biases):
        layer.weight[...] = W
        layer.bias[...] = b
    optimizer = bp.SGD(lr=0.01, momentum=0.9) if opt == "sgd" else bp.Adam(lr=1e-3)
    loss = bp.CrossEntropy()
    batches = problem.batches
    position = [0]

    def step():
        X, y = batches[position[0] % len(batches)]
        position[0] += 1
        return net.train_step(X, y, loss, optimizer)
    return step


def torch_step(problem, extra, opt):
    import torch
    from competitors import torch_eager

    def hidden_block(width):
        modules = [torch.nn.BatchNorm1d(width)] if extra == "batchnorm" else []
        modules.append(torch.nn.ReLU())
        if extra == "dropout":
            modules.append(torch.nn.Dropout(DROPOUT_P))
        return modules
    net = torch_eager.model(problem, hidden_block).train()
    loss_fn = torch.nn.CrossEntropyLoss()
    optimizer = (torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9) if opt == "sgd"
                 else torch.optim.Adam(net.parameters(), lr=1e-3))
    batches = [(torch.from_numpy(X), torch.from_numpy(y)) for X, y in problem.batches]
    position = [0]

    def step():
        X, y = batches[position[0] % len(batches)]
        position[0] += 1
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(net(X), y)
        loss.backward()
        optimizer.step()
        return loss
    return step


def floor_step(problem):
    """The step's matrix products only (the same for every variant of a shape)."""
    import numpy as np
    rng = np.random.default_rng(0)
    widths, rows = problem.widths, problem.batch
    weights = [rng.standard_normal((n_out, n_in)).astype(np.float32)
               for n_in, n_out in zip(widths[:-1], widths[1:])]
    acts = [rng.standard_normal((rows, width)).astype(np.float32) for width in widths]

    def step():
        for layer, weight in enumerate(weights):
            np.matmul(acts[layer], weight.T)                   # forward
        for layer in range(len(weights) - 1, -1, -1):
            np.matmul(acts[layer + 1].T, acts[layer])          # dW = dz^T a
            if layer > 0:
                np.matmul(acts[layer + 1], weights[layer])     # dx = dz W
    return step


def worker(library, threads, quick):
    """Time every variant with this library; print {variant/opt: [microseconds]}."""
    import common
    common.configure_threads(threads)
    from common import Problem, measure, timing
    if library == "floor":
        out = {}
        for shape in ("M", "L"):
            step = floor_step(Problem(shape, 4))
            out[f"{shape} floor"] = [t * 1e6 for t in measure(step, timing(quick))]
        print(json.dumps(out))
        return
    builder = bpfast_step if library == "bpfast" else torch_step
    if library == "torch":
        import torch
        torch.set_num_threads(threads)
    else:
        common.import_bpfast().set_num_threads(threads)
    problems = {}
    out = {}
    for variant, (shape, extra) in VARIANTS.items():
        problem = problems.setdefault(shape, Problem(shape, 4))
        for opt in OPTIMIZER_NAMES:
            samples = measure(builder(problem, extra, opt), timing(quick))
            out[f"{variant}/{opt}"] = [t * 1e6 for t in samples]
    print(json.dumps(out))


def run_worker(library, args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (HERE, os.environ.get("PYTHONPATH")) if p))
    command = [sys.executable, os.path.abspath(__file__), "--worker", library,
               "--threads", str(args.threads)] + (["--quick"] if args.quick else [])
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"{library}: failed, skipped\n{result.stderr[-1500:]}", file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="short timings (a check)")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--worker", choices=("bpfast", "torch", "floor"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.threads, args.quick)
        return
    libraries = ("bpfast", "torch", "floor")
    medians = {library: {} for library in libraries}
    for round_index in range(args.rounds):
        order = libraries[round_index % 3:] + libraries[:round_index % 3]
        for library in order:
            result = run_worker(library, args)
            for key, samples in (result or {}).items():
                medians[library].setdefault(key, []).append(statistics.median(samples))
        print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)
    table = report(medians)
    os.makedirs(args.out, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = os.path.join(args.out, f"layers-{stamp}.json")
    with open(path, "w") as file:
        json.dump({"threads": args.threads, "rounds": args.rounds, "quick": args.quick,
                   "medians_us": medians, "table": table}, file, indent=1)
    print(f"\nwritten: {os.path.relpath(path)}")


def report(medians):
    """Print the table (markdown) and return its rows."""
    rows = []
    header = ("| variant | opt | bpfast us | vs plain (<= 1.15x) | torch us | "
              "torch / bpfast (>= 2x) | GEMM floor us | torch / floor |")
    print(header)
    print("|---|---|---|---|---|---|---|---|")
    for variant, (shape, extra) in VARIANTS.items():
        for opt in OPTIMIZER_NAMES:
            key = f"{variant}/{opt}"
            ours = medians["bpfast"].get(key)
            theirs = medians["torch"].get(key)
            plain = medians["bpfast"].get(f"{shape} plain/{opt}")
            ours_us = statistics.median(ours) if ours else None
            torch_us = statistics.median(theirs) if theirs else None
            overhead = ours_us / statistics.median(plain) if ours and plain else None
            speedup = torch_us / ours_us if ours_us and torch_us else None
            floor = medians["floor"].get(f"{shape} floor")
            floor_us = statistics.median(floor) if floor else None
            bound = torch_us / floor_us if torch_us and floor_us else None

            def cell(value, fmt, target=None, at_most=True):
                if value is None:
                    return "-"
                text = format(value, fmt)
                if target is not None:
                    ok = value <= target if at_most else value >= target
                    text += " ok" if ok else " MISS"
                return text

            row = (variant, opt, cell(ours_us, ".0f"),
                   cell(overhead, ".3f", TARGET_OVERHEAD if extra else None),
                   cell(torch_us, ".0f"), cell(speedup, ".2f", TARGET_SPEEDUP, False),
                   cell(floor_us, ".0f"), cell(bound, ".2f"))
            rows.append(row)
            print("| " + " | ".join(row) + " |")
    return rows


if __name__ == "__main__":
    main()
