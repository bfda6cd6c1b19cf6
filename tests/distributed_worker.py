"""What tests/test_distributed.py runs under ``mpiexec -n 2``: one scenario per call.

    mpiexec -n 2 python -m mpi4py tests/distributed_worker.py SCENARIO [DIRECTORY]

Each scenario checks its results on every rank (assert) and prints "rank R: ok"; a
failed check raises, which (as any exception under ``python -m mpi4py``) aborts the
job with a non-zero exit status.
"""
import os
import signal
import sys
import types
from importlib import resources

import numpy as np
from mpi4py import MPI

import bpfast as bp
from bpfast.distributed import average_buffers

comm = MPI.COMM_WORLD
rank, size = comm.Get_rank(), comm.Get_size()


def relative_error(a, b):
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


def same_on_every_rank(name, value):
    """value (bytes, or anything with a repr) is the same on every rank."""
    key = value if isinstance(value, bytes) else repr(value).encode()
    keys = comm.allgather(key)
    assert all(k == keys[0] for k in keys), f"{name} differs between ranks"


def small_problem(seed=0, n=40):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 5))
    return X, rng.integers(0, 3, n), rng.uniform(0.1, 2.0, n)


def make_network(seed=1):
    return bp.Network([bp.Dense(5, 8, activation="tanh"), bp.Dense(8, 3)], dtype="float64",
                      seed=seed)


def steps():
    """train_step / compute_gradients with comm equal the single-process whole batch."""
    X, y, w = small_problem()
    n = X.shape[0]
    optimizers = {"sgd": lambda: bp.SGD(lr=0.1, momentum=0.9),
                  "adam": lambda: bp.Adam(lr=0.01)}
    for name, make_optimizer in optimizers.items():
        for split in (n // 2, 13):  # equal halves, unequal ones
            for weighted in (False, True):
                rows = slice(0, split) if rank == 0 else slice(split, n)
                # the weighted case also has l2 and a clipping that acts
                options = {"l2": 1e-3, "clip_norm": 0.05} if weighted else {}
                weights = w if weighted else None
                reference, network = make_network(), make_network()
                ref_optimizer, optimizer = make_optimizer(), make_optimizer()
                for _ in range(20):
                    ref_loss = reference.train_step(X, y, "cross_entropy", ref_optimizer,
                                                    sample_weight=weights, **options)
                    loss = network.train_step(
                        X[rows], y[rows], "cross_entropy", optimizer, comm=comm,
                        sample_weight=None if weights is None else weights[rows], **options)
                    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss), (loss, ref_loss)
                error = relative_error(network.parameters, reference.parameters)
                assert error <= 1e-12, (name, split, weighted, error)
                assert not np.array_equal(network.parameters, make_network().parameters)
                same_on_every_rank("parameters", network.parameters.tobytes())
    # compute_gradients, unequal halves with weights and l2
    reference, network = make_network(), make_network()
    rows = slice(0, 13) if rank == 0 else slice(13, n)
    ref_loss = reference.compute_gradients(X, y, "cross_entropy", sample_weight=w, l2=0.01)
    loss = network.compute_gradients(X[rows], y[rows], "cross_entropy", sample_weight=w[rows],
                                     l2=0.01, comm=comm)
    assert abs(loss - ref_loss) <= 1e-12 * abs(ref_loss), (loss, ref_loss)
    assert relative_error(network.gradients, reference.gradients) <= 1e-12
    # a regression loss on dense targets, float32: to float32 rounding
    targets = np.tanh(X[:, :2])
    net32 = bp.Network([bp.Dense(5, 4, activation="relu"), bp.Dense(4, 2)], seed=3)
    ref32 = bp.Network([bp.Dense(5, 4, activation="relu"), bp.Dense(4, 2)], seed=3)
    opt32, ref_opt32 = bp.Adam(lr=0.01), bp.Adam(lr=0.01)
    for _ in range(20):
        ref32.train_step(X, targets, "mse", ref_opt32)
        net32.train_step(X[rows], targets[rows], "mse", opt32, comm=comm)
    assert relative_error(net32.parameters, ref32.parameters) <= 1e-5
    # running statistics (net.buffers, where layers have them): averaged over the ranks
    holder = types.SimpleNamespace(buffers=np.array([rank + 1.0, 4.0 * rank]))
    average_buffers(holder, comm)
    assert holder.buffers.tolist() == [1.5, 2.0], holder.buffers
    print(f"rank {rank}: ok", flush=True)


def digits_shards():
    # the copy bpfast ships for `bpfast demo` (scikit-learn's takes seconds to import)
    with resources.files("bpfast").joinpath("data", "digits.npz").open("rb") as file:
        digits = np.load(file)
        X, y = digits["X"] / 16.0, digits["y"].astype(np.intp)
    order = np.random.default_rng(0).permutation(X.shape[0])
    test, train = order[:360], order[360:]
    shard = train[rank::size]  # 719 and 718 rows: unequal shards (wrap-around)
    return X[shard], y[shard], X[test], y[test]


def fit(directory):
    """fit on digits over the ranks: the same parameters and History everywhere,
    >= 97% test accuracy; writers on rank 0 only; save, load, continue identically."""
    X, y, X_test, y_test = digits_shards()
    # different initial weights per rank: fit must broadcast rank 0's
    network = bp.Network([bp.Dense(64, 64, activation="relu"), bp.Dense(64, 10)],
                         seed=0 if rank == 0 else 100 + rank)
    optimizer = bp.Adam(lr=3e-3)
    log = os.path.join(directory, f"log-rank{rank}.csv")
    history = network.fit(
        X, y, loss="cross_entropy", optimizer=optimizer, epochs=30, batch_size=32,
        validation_split=0.1, metrics=["accuracy"],
        callbacks=[bp.callbacks.CSVLogger(log),
                   bp.callbacks.ReduceLROnPlateau("val_loss", patience=3, factor=0.5)],
        comm=comm)
    same_on_every_rank("parameters", network.parameters.tobytes())
    same_on_every_rank("history", (history.epoch, history.history))
    assert len(history.epoch) == 30 and history.history["loss"][-1] < 0.1, history
    accuracy = float(np.mean(network.predict(X_test).argmax(axis=1) == y_test))
    assert accuracy >= 0.97, accuracy
    assert os.path.exists(log) == (rank == 0), "CSVLogger must write on rank 0 only"
    # save on rank 0, load on every rank, continue: the same as continuing in memory
    path = os.path.join(directory, "model.npz")
    if rank == 0:
        bp.save(network, path, optimizer=optimizer)
    comm.Barrier()
    loaded, loaded_optimizer = bp.load(path, with_optimizer=True)
    continued = network.fit(X, y, loss="cross_entropy", optimizer=optimizer, epochs=3,
                            batch_size=32, comm=comm)
    resumed = loaded.fit(X, y, loss="cross_entropy", optimizer=loaded_optimizer, epochs=3,
                         batch_size=32, comm=comm)
    assert np.array_equal(loaded.parameters, network.parameters)
    assert continued.history["loss"] == resumed.history["loss"]
    same_on_every_rank("continued parameters", loaded.parameters.tobytes())
    print(f"rank {rank}: ok, test accuracy {accuracy:.4f}", flush=True)


class FailOnRank1(bp.callbacks.Callback):
    def __init__(self, how):
        self.how = how

    def on_epoch_end(self, epoch, logs):
        if rank == 1 and epoch == 2:
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError("rank 1 gives up at epoch 2")


def fail(how):
    """A Python exception (or SIGKILL) on rank 1 during fit: mpiexec must not hang."""
    X, y, _, _ = digits_shards()
    network = bp.Network([bp.Dense(64, 16, activation="relu"), bp.Dense(16, 10)], seed=0)
    network.fit(X, y, loss="cross_entropy", optimizer="adam", epochs=1000, batch_size=64,
                callbacks=[FailOnRank1(how)], comm=comm)
    print(f"rank {rank}: finished, which it must not", flush=True)


if __name__ == "__main__":
    scenario = sys.argv[1]
    if scenario == "steps":
        steps()
    elif scenario == "fit":
        fit(sys.argv[2])
    elif scenario in ("raise", "kill"):
        fail(scenario)
    else:
        raise SystemExit(f"unknown scenario {scenario!r}")
