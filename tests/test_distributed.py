"""Training over several processes: MPI (``comm=``, under ``mpiexec -n 2``) and Dask.

The MPI tests run tests/distributed_worker.py under ``mpiexec -n 2 python -m mpi4py``
in a subprocess; each scenario checks its results on every rank (see that file). They
skip without an ``mpiexec`` or without mpi4py; the Dask test skips without
dask.distributed. Everything else (the duck-typed communicator, the refusals) runs
in-process on a one-rank communicator written here.
"""
import functools
import importlib.util
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

import bpfast as bp

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "distributed_worker.py")
MPIEXEC = shutil.which("mpiexec")

needs_mpi = pytest.mark.skipif(
    MPIEXEC is None or importlib.util.find_spec("mpi4py") is None,
    reason="needs an MPI launcher (mpiexec) and mpi4py (pip install 'bpfast[mpi]')")


@functools.cache
def _launcher():
    """mpiexec -n 2 and the flags this launcher needs here."""
    command = [MPIEXEC, "-n", "2"]
    version = subprocess.run([MPIEXEC, "--version"], capture_output=True, text=True).stdout
    if "Open MPI" in version or "OpenRTE" in version:
        # two ranks on a machine with fewer cores; Open MPI refuses root without the flag
        command.append("--oversubscribe")
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            command.append("--allow-run-as-root")
    return command


def mpiexec(arguments, *, timeout, cwd):
    """Run python `arguments` on 2 ranks (this bpfast, one thread each): (status, output)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(
                   p for p in (os.path.dirname(os.path.dirname(bp.__file__)),
                               os.environ.get("PYTHONPATH")) if p))
    result = subprocess.run([*_launcher(), sys.executable, *arguments], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=timeout)
    return result.returncode, result.stdout


def run_worker(scenario, tmp_path, timeout=120):
    return mpiexec(["-m", "mpi4py", WORKER, scenario, str(tmp_path)], timeout=timeout,
                   cwd=tmp_path)


@needs_mpi
def test_steps_on_two_ranks_equal_the_whole_batch_in_one_process(tmp_path):
    # SGD with momentum and Adam, 20 steps, float64 to 1e-12: equal and unequal halves,
    # sample weights (with l2 and clip_norm), compute_gradients; MSE in float32
    status, output = run_worker("steps", tmp_path)
    assert status == 0, output
    assert output.count(": ok") == 2, output


@needs_mpi
def test_fit_on_two_ranks_is_the_same_everywhere_and_resumes_from_a_file(tmp_path):
    # digits: bitwise-identical parameters and History on both ranks, test accuracy
    # >= 97%, CSVLogger on rank 0 only; save on rank 0, load on both, continue
    status, output = run_worker("fit", tmp_path)
    assert status == 0, output
    assert output.count(": ok, test accuracy") == 2, output
    assert (tmp_path / "log-rank0.csv").exists() and not (tmp_path / "log-rank1.csv").exists()


@needs_mpi
@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_rank_ends_the_job(tmp_path, how):
    # an exception on rank 1 (printed, then comm.Abort), or rank 1 killed by SIGKILL:
    # mpiexec exits non-zero instead of leaving rank 0 waiting in the all-reduce
    # (a hang would raise subprocess.TimeoutExpired)
    status, output = run_worker(how, tmp_path, timeout=30)
    assert status != 0, output
    assert "finished, which it must not" not in output
    if how == "raise":
        assert "RuntimeError: rank 1 gives up at epoch 2" in output, output
        assert "rank 1 of 2 failed; aborting every rank" in output, output


@needs_mpi
def test_command_line_distributed(tmp_path):
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0, 0], [5, 5, 0], [0, 5, 5]], dtype=float)
    X = np.concatenate([c + rng.normal(size=(60, 3)) for c in centres])
    labels = np.repeat(["a", "b", "c"], 60)
    with open(tmp_path / "data.csv", "w") as file:
        file.write("x0,x1,x2,label\n")
        file.writelines(f"{x[0]},{x[1]},{x[2]},{label}\n" for x, label in zip(X, labels))
    status, output = mpiexec(["-m", "mpi4py", "-m", "bpfast", "train", "data.csv",
                              "--target", "label", "--epochs", "10", "--batch-size", "16",
                              "--lr", "0.01", "--distributed"], timeout=120, cwd=tmp_path)
    assert status == 0, output
    # rank 0 alone prints (one header line, one save line) and saves
    assert output.count("saved the model to model.npz") == 1, output
    assert float(output.split("validation accuracy:")[1].split()[0]) >= 0.9, output
    assert bp.load(tmp_path / "model.npz").n_inputs == 3


# ----------------------------------------------------------------- in one process
class OneRank:
    """A one-rank communicator with mpi4py's methods (sums over one rank are copies)."""

    def __init__(self):
        self.calls = []

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 1

    def Allreduce(self, sendbuf, recvbuf):
        self.calls.append(("Allreduce", np.asarray(recvbuf).size))
        if not isinstance(sendbuf, np.ndarray):  # mpi4py's IN_PLACE
            return
        recvbuf[...] = sendbuf

    def Bcast(self, buffer, root=0):
        self.calls.append(("Bcast", np.asarray(buffer).size))

    def allreduce(self, value, op=None):
        return value

    def Abort(self, code=1):
        raise SystemExit(f"Abort({code})")


def test_a_duck_typed_communicator_reduces_the_gradient_in_one_call():
    X = np.random.default_rng(0).normal(size=(12, 4))
    y = np.arange(12) % 3
    make = functools.partial(bp.Network, dtype="float64", seed=0)
    alone = make([bp.Dense(4, 5, activation="tanh"), bp.Dense(5, 3)])
    with_comm = make([bp.Dense(4, 5, activation="tanh"), bp.Dense(5, 3)])
    comm = OneRank()
    for _ in range(3):
        expected = alone.train_step(X, y, "cross_entropy", "adam", clip_norm=0.5, l2=0.01)
        got = with_comm.train_step(X, y, "cross_entropy", "adam", clip_norm=0.5, l2=0.01,
                                   comm=comm)
        assert got == pytest.approx(expected, rel=1e-14)
    np.testing.assert_allclose(with_comm.parameters, alone.parameters, rtol=1e-13)
    # per step: (weight, weight * loss), then the gradient buffer, in place
    assert comm.calls[:2] == [("Allreduce", 2), ("Allreduce", alone.n_parameters)]
    assert len(comm.calls) == 6


def test_fit_with_a_one_rank_communicator_is_fit():
    rng = np.random.default_rng(1)
    X, X_val = rng.normal(size=(50, 4)), rng.normal(size=(20, 4))
    y, y_val = (X[:, 0] > 0).astype(np.intp), (X_val[:, 0] > 0).astype(np.intp)
    results = []
    for comm in (None, OneRank()):
        network = bp.Network([bp.Dense(4, 6, activation="relu"), bp.Dense(6, 2)],
                             dtype="float64", seed=2)
        history = network.fit(X, y, loss="cross_entropy", optimizer=bp.SGD(lr=0.1, momentum=0.9),
                              epochs=3, batch_size=16, shuffle=False, l2=1e-3,
                              validation_data=(X_val, y_val), metrics=["accuracy"], comm=comm)
        results.append((network.parameters, history.history))
    # the same batches in the same order: the same parameters, to the bit
    np.testing.assert_array_equal(results[1][0], results[0][0])
    assert results[1][1].keys() == results[0][1].keys()
    for key, values in results[0][1].items():
        assert results[1][1][key] == pytest.approx(values, rel=1e-14), key


def test_a_bad_communicator_is_refused_before_anything_changes():
    network = bp.Network([bp.Dense(2, 2)], seed=0)
    before = network.parameters.copy()
    with pytest.raises(TypeError, match="comm must be an mpi4py communicator"):
        network.train_step(np.ones((2, 2)), [0, 1], "cross_entropy", "sgd", comm=object())
    with pytest.raises(TypeError, match="lacks Allreduce"):
        network.fit(np.ones((2, 2)), [0, 1], loss="cross_entropy", optimizer="sgd",
                    comm=object())
    np.testing.assert_array_equal(network.parameters, before)


def test_an_error_with_a_communicator_aborts_the_job(capsys):
    network = bp.Network([bp.Dense(2, 2)], seed=0)
    with pytest.raises(SystemExit, match="Abort"):
        network.train_step(np.ones((2, 3)), [0, 1], "cross_entropy", "sgd", comm=OneRank())
    assert "rank 0 of 1 failed" in capsys.readouterr().err


def test_importing_bpfast_does_not_import_mpi4py():
    code = ("import sys, bpfast, bpfast.distributed, bpfast.cli; "
            "sys.exit('mpi4py' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


# ----------------------------------------------------------------- Dask
@pytest.mark.filterwarnings("ignore:Stochastic Optimizer")
def test_grid_search_on_a_dask_cluster_picks_what_joblib_picks():
    pytest.importorskip("sklearn")
    distributed = pytest.importorskip("distributed")
    import joblib
    from sklearn.model_selection import GridSearchCV

    from bpfast.sklearn import MLPClassifier

    rng = np.random.default_rng(0)
    X = rng.normal(size=(120, 4))
    y = (X[:, 0] + X[:, 1] ** 2 > 1).astype(int)
    grid = {"hidden_layer_sizes": [(4,), (16,)], "alpha": [1e-4, 1.0]}

    def search():
        # n_threads=1: one thread per fit, as many fits as workers (Dask's nanny also
        # starts its workers with OMP_NUM_THREADS=1)
        estimator = MLPClassifier(max_iter=40, random_state=0, n_threads=1)
        return GridSearchCV(estimator, grid, cv=3).fit(X, y)

    local = search()  # joblib's default backend (n_jobs=None: in this process)
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  dashboard_address=None) as cluster, \
            distributed.Client(cluster), joblib.parallel_backend("dask"):
        on_dask = search()
    assert on_dask.best_params_ == local.best_params_
    np.testing.assert_array_equal(on_dask.cv_results_["mean_test_score"],
                                  local.cv_results_["mean_test_score"])
