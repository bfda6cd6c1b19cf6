"""Data-parallel training over MPI on one machine, and a cost model for N machines.

    python bench/distributed.py [--quick] [--shapes M,L,XL] [--ranks 2]

Measures, for each shape of bench/common.py (float32, SGD with momentum, the
shape's batch as the *global* batch):

* ``1 x 2``: one process, 2 threads (bpfast.set_num_threads), ``train_step`` on the
  whole batch: this machine used the usual way;
* ``1 x 1``: one process, one thread, the whole batch (the single-core rate);
* ``2 x 1``: ``mpiexec -n 2``, one thread per rank, each rank half of the batch,
  ``train_step(..., comm=MPI.COMM_WORLD)``: one all-reduce of the gradient per step;
* the time of one ``Allreduce(IN_PLACE, net.gradients)`` (the shape's float32 gradient
  buffer) between the 2 ranks.

and prints them with the ratio (1 x 2 time / 2 x 1 time: above 1, the ranks are
faster). Then the cost model of bench/README.md ("Training on several machines"):
per-machine compute from the measured 1 x 2 step, ring all-reduce
``2 (N-1)/N * bytes / bandwidth + 2 (N-1) * latency`` at 10, 25 and 100 Gbit/s.

Each configuration runs in its own process (`--worker`), started by this driver;
Open MPI's mpiexec gets ``--bind-to core`` (``--oversubscribe`` when there are fewer
cores than ranks) and ``--allow-run-as-root`` as root. Steps run in fixed counts
(every rank must make the same calls).
"""
import argparse
import json
import os
import shutil
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

LATENCY_S = 10e-6  # one message hop: TCP on Ethernet ~10-30 us, RDMA fabrics 1-5 us
BANDWIDTHS_GBIT = (10, 25, 100)
MACHINES = (2, 4, 8, 16, 64)


def steps_and_repeats(shape, quick):
    """(steps per timed repeat, repeats): about 50-100 ms per repeat."""
    per_repeat = {"S": 200, "M": 100, "L": 20, "XL": 2}[shape]
    return per_repeat, (3 if quick else 7)


# --------------------------------------------------------------------------- workers
def worker(kind, shape, quick):
    """One measurement in this process; prints one JSON line (rank 0 only)."""
    import time

    import numpy as np
    bp = common.import_bpfast()
    comm = None
    if kind == "mpi":
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
    rank = 0 if comm is None else comm.Get_rank()
    size = 1 if comm is None else comm.Get_size()
    problem = common.Problem(shape, 4)
    network = bp.Network([bp.Dense(a, b, activation="relu" if i < len(problem.widths) - 2
                                    else "identity")
                          for i, (a, b) in enumerate(zip(problem.widths[:-1],
                                                         problem.widths[1:]))], seed=0)
    optimizer = bp.SGD(lr=0.01, momentum=0.9)
    # this rank's rows of each global batch (the whole batch in one process)
    batches = [(np.ascontiguousarray(X[rank::size]), np.ascontiguousarray(y[rank::size]))
               for X, y in problem.batches]
    steps, repeats = steps_and_repeats(shape, quick)

    def run(n):
        for i in range(n):
            X, y = batches[i % len(batches)]
            network.train_step(X, y, "cross_entropy", optimizer, comm=comm)

    run(max(2, steps // 4))  # warm-up (the workspaces, BLAS's buffers, the MPI paths)
    samples = []
    for _ in range(repeats):
        if comm is not None:
            comm.Barrier()
        start = time.perf_counter()
        run(steps)
        samples.append((time.perf_counter() - start) / steps)
    result = {"kind": kind, "shape": shape, "threads": bp.get_num_threads(),
              "step_s": float(np.median(samples)), "min_s": float(min(samples)),
              "n_parameters": network.n_parameters,
              "flops": common.flops_per_step(problem.widths, problem.batch)}
    if comm is not None:
        from mpi4py import MPI
        gradients = network.gradients
        calls = max(3, int(0.05 / max(result["step_s"], 1e-4)) * 4)
        times = []
        for _ in range(repeats):
            comm.Barrier()
            start = time.perf_counter()
            for _ in range(calls):
                comm.Allreduce(MPI.IN_PLACE, gradients)
            times.append((time.perf_counter() - start) / calls)
        result["allreduce_s"] = float(np.median(times))
        result["bytes"] = gradients.nbytes
    if rank == 0:
        print(json.dumps(result), flush=True)


def launch(kind, shape, threads, quick, ranks):
    """Run one worker in a fresh process (under mpiexec for "mpi"); its JSON result."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (common.SRC, env.get("PYTHONPATH")) if p)
    command = [sys.executable, os.path.abspath(__file__), "--worker", kind, "--shapes", shape]
    if quick:
        command.append("--quick")
    if kind == "mpi":
        mpiexec = shutil.which("mpiexec")
        if mpiexec is None:
            raise SystemExit("mpiexec not found: install Open MPI or MPICH, and mpi4py")
        version = subprocess.run([mpiexec, "--version"], capture_output=True,
                                 text=True).stdout
        flags = []
        if "Open MPI" in version or "OpenRTE" in version:
            if os.geteuid() == 0:
                flags.append("--allow-run-as-root")
            # one core per rank where there are enough, else let them share
            flags += (["--bind-to", "core"] if ranks <= len(common.available_cpus())
                      else ["--oversubscribe"])
        command = [mpiexec, "-n", str(ranks), *flags, sys.executable, "-m", "mpi4py",
                   *command[1:]]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- the model
def ring_allreduce_s(n_bytes, machines, gbit):
    """A ring all-reduce of n_bytes over `machines` at gbit Gbit/s, with LATENCY_S hops."""
    if machines == 1:
        return 0.0
    return (2 * (machines - 1) / machines * n_bytes / (gbit * 1e9 / 8)
            + 2 * (machines - 1) * LATENCY_S)


def model_table(rows):
    """The cost model's speed-ups, from each shape's measured 1 x 2 step (one machine).

    Weak scaling (the usual data-parallel use): every machine keeps the shape's batch,
    so the global batch grows N-fold; speed-up in samples/s = N * T / (T + T_ar(N)),
    T the step of one machine, T_ar the all-reduce (not overlapped with backward: the
    gradient is reduced in one call after it). Strong scaling (the global batch fixed,
    as measured above): T / (T / N + T_ar(N)), ignoring that small per-machine batches
    run below the GEMM rate.
    """
    lines = ["| shape | params (MB) | step (ms) | Gbit/s | "
             + " | ".join(f"N={n}" for n in MACHINES) + " | strong scaling: best N (speed-up) |",
             "|---|---:|---:|---:|" + "---:|" * len(MACHINES) + "---|"]
    for shape, row in rows.items():
        step = row["step_s"]
        n_bytes = 4 * row["n_parameters"]
        for gbit in BANDWIDTHS_GBIT:
            weak = [n * step / (step + ring_allreduce_s(n_bytes, n, gbit)) for n in MACHINES]
            strong = {n: step / (step / n + ring_allreduce_s(n_bytes, n, gbit))
                      for n in (1, 2, 4, 8, 16, 32, 64)}
            best = max(strong, key=strong.get)
            lines.append(f"| {shape} | {n_bytes / 1e6:.1f} | {step * 1e3:.2f} | {gbit} | "
                         + " | ".join(f"{s:.1f}x" for s in weak)
                         + f" | {best} ({strong[best]:.2f}x) |")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--shapes", default="M,L,XL")
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--model", metavar="SHAPE=MS,...",
                        help="only print the cost model, from these step times of one "
                             "machine in ms (e.g. M=0.269,L=3.2,XL=88.76)")
    parser.add_argument("--worker", choices=("single", "mpi"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    shapes = args.shapes.split(",")
    if args.model:
        rows = {}
        for item in args.model.split(","):
            shape, ms = item.split("=")
            widths = common.SHAPES[shape]["widths"]
            rows[shape] = {"step_s": float(ms) / 1e3, "n_parameters": sum(
                (a + 1) * b for a, b in zip(widths[:-1], widths[1:]))}
        print(model_table(rows))
        return
    if args.worker:
        for shape in shapes:
            worker(args.worker, shape, args.quick)
        return
    print(f"bpfast data-parallel bench: {args.ranks} ranks x 1 thread against 1 process x "
          f"{args.ranks} threads, the same global batch (float32, SGD momentum, train_step)")
    print("| shape | batch | 1 x 1 (ms) | 1 x 2 (ms) | 2 x 1 (ms) | ratio 1x2 / 2x1 | "
          "GFLOP/s (1 x 2) | all-reduce (ms) | gradient (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    rows = {}
    for shape in shapes:
        one = launch("single", shape, 1, args.quick, 1)
        threaded = launch("single", shape, args.ranks, args.quick, 1)
        ranks = launch("mpi", shape, 1, args.quick, args.ranks)
        rows[shape] = threaded
        print(f"| {shape} | {common.SHAPES[shape]['batch']} | {one['step_s'] * 1e3:.3f} | "
              f"{threaded['step_s'] * 1e3:.3f} | {ranks['step_s'] * 1e3:.3f} | "
              f"{threaded['step_s'] / ranks['step_s']:.2f} | "
              f"{threaded['flops'] / threaded['step_s'] / 1e9:.1f} | "
              f"{ranks['allreduce_s'] * 1e3:.3f} | {ranks['bytes'] / 1e6:.2f} |", flush=True)
    print()
    print(f"Cost model (speed-up in samples/s with N machines, each the measured 1 x "
          f"{args.ranks} step at the shape's batch; ring all-reduce, {LATENCY_S * 1e6:.0f} us "
          "per hop):")
    print(model_table(rows))


if __name__ == "__main__":
    main()
