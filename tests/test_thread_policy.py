"""The thread policy (issue 13) and the thread-count cap (issue 12, item 3).

* The default thread count is what the process may use: a restricted affinity mask (a
  subprocess that sets one before importing bpfast), a cgroup v2 or v1 CPU quota (a
  fake cgroup tree under ``_threads.CGROUP_ROOT``), OMP_NUM_THREADS; show_config says
  which.
* ``bp.threads(n)`` sets bpfast's count and SciPy's OpenBLAS's, and restores both
  when its body raises; ``set_num_threads`` limits SciPy's OpenBLAS without
  threadpoolctl (a subprocess where importing it fails, OpenBLAS's own
  ``get_num_threads`` read through ctypes).
* Large products are split into fixed blocks: the result equals NumPy's product for
  every transpose and split direction, and it is bit-identical for 1, 2 and 3 threads
  and for the timed choice, in both dtypes.
* A training step chooses its way (one thread, or threaded) as a whole, timed per
  shape; outside steps each product and elementwise pass times its own; a step that
  raises leaves no way set behind it.
* ``set_num_threads(100000)`` warns and clamps, and a large step then runs (it
  segfaulted): in a subprocess, so that a crash fails the test, not the session.
"""
import ctypes
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import bpfast as bp
from bpfast import _threads
from bpfast._compiled import core as _core

PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(bp.__file__)))
OPENMP = _core.openmp_enabled()


@pytest.fixture(autouse=True)
def restore_thread_counts():
    omp, blas = bp.get_num_threads(), _threads.blas_num_threads()
    yield
    _core.set_adaptive(True)
    bp.set_num_threads(omp)
    if blas is not None:
        _core.set_blas_num_threads(blas)


def run_python(code, env=None, block_threadpoolctl=False):
    """Run code in a fresh interpreter that imports this bpfast; (returncode, out, err)."""
    environment = dict(os.environ if env is None else env)
    environment["PYTHONPATH"] = PACKAGE_ROOT + os.pathsep + environment.get("PYTHONPATH", "")
    prefix = "import sys; sys.modules['threadpoolctl'] = None\n" if block_threadpoolctl else ""
    proc = subprocess.run([sys.executable, "-c", prefix + textwrap.dedent(code)],
                          env=environment, capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def scipy_openblas_threads():
    """OpenBLAS's own count, asked directly (not through bpfast)."""
    from scipy.linalg import cython_blas
    library = ctypes.CDLL(cython_blas.__file__)
    for name in ("scipy_openblas_get_num_threads", "openblas_get_num_threads"):
        if hasattr(library, name):
            return getattr(library, name)()
    pytest.skip("SciPy's BLAS is not OpenBLAS")


# =========================================================================== default count
@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or not OPENMP,
                    reason="needs sched_setaffinity and an OpenMP build")
def test_default_follows_a_restricted_affinity_mask():
    cpus = sorted(os.sched_getaffinity(0))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    code = f"""
        import io, os
        os.sched_setaffinity(0, {{{cpus[0]}}})
        import bpfast as bp
        from bpfast import _threads
        _threads.CGROUP_ROOT = "/nonexistent"  # the mask alone decides here
        buffer = io.StringIO()
        bp.show_config(file=buffer)
        print(bp.get_num_threads(), _threads.default_num_threads()[0])
        print(buffer.getvalue())
    """
    returncode, out, err = run_python(code, env)
    assert returncode == 0, err
    assert out.splitlines()[0] == "1 1"
    assert f"default threads: 1 (affinity mask: 1 of {os.cpu_count()} CPUs)" in out


@pytest.fixture
def eight_cpus(monkeypatch):
    """A process that may use 8 CPUs, in the root cgroup of a fake tree."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    return monkeypatch


def _fake_tree(tmp_path, monkeypatch, own_cgroups, files):
    proc = tmp_path / "self_cgroup"
    proc.write_text(own_cgroups)
    for name, text in files.items():
        (tmp_path / "cg" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "cg" / name).write_text(text)
    monkeypatch.setattr(_threads, "PROC_SELF_CGROUP", str(proc))
    monkeypatch.setattr(_threads, "CGROUP_ROOT", str(tmp_path / "cg"))


@pytest.mark.parametrize("own, files, expected", [
    # cgroup v2: 2.5 CPUs -> 3 threads; "max" is no limit
    ("0::/\n", {"cpu.max": "250000 100000\n"}, 3),
    ("0::/\n", {"cpu.max": "max 100000\n"}, 8),
    # v2, nested: the tightest of the process's cgroup and its parents
    ("0::/box/job\n", {"cpu.max": "400000 100000", "box/cpu.max": "max 100000",
                       "box/job/cpu.max": "50000 100000"}, 1),
    # cgroup v1, either mount name; -1 is no limit
    ("4:cpu,cpuacct:/\n", {"cpu,cpuacct/cpu.cfs_quota_us": "200000",
                           "cpu,cpuacct/cpu.cfs_period_us": "100000"}, 2),
    ("1:cpu:/job\n", {"cpu/job/cpu.cfs_quota_us": "150000",
                      "cpu/job/cpu.cfs_period_us": "100000"}, 2),
    ("1:cpu:/\n", {"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, 8),
    # a quota above the affinity mask does not raise the count
    ("0::/\n", {"cpu.max": "1600000 100000"}, 8),
])
def test_default_follows_the_cgroup_cpu_quota(tmp_path, eight_cpus, own, files, expected):
    _fake_tree(tmp_path, eight_cpus, own, files)
    count, reason = _threads.default_num_threads()
    assert count == expected
    if expected < 8:
        assert reason.startswith("cgroup CPU quota") and str(tmp_path) in reason
    else:
        assert reason.startswith("affinity mask: 8")


def test_omp_num_threads_wins_and_is_named(tmp_path, eight_cpus):
    _fake_tree(tmp_path, eight_cpus, "0::/\n", {"cpu.max": "100000 100000"})
    eight_cpus.setenv("OMP_NUM_THREADS", "3,1")
    assert _threads.default_num_threads() == (3, "OMP_NUM_THREADS=3,1")


@pytest.mark.skipif(not OPENMP, reason="a serial build always has one thread")
def test_import_time_default_reads_the_cgroup_root(tmp_path):
    (tmp_path / "cpu.max").write_text("100000 100000\n")  # v2: one CPU
    for v1 in ("cpu", "cpu,cpuacct"):
        (tmp_path / v1).mkdir()
        (tmp_path / v1 / "cpu.cfs_quota_us").write_text("100000\n")
        (tmp_path / v1 / "cpu.cfs_period_us").write_text("100000\n")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    env["BPFAST_CGROUP_ROOT"] = str(tmp_path)
    returncode, out, err = run_python("import bpfast as bp; print(bp.get_num_threads())", env)
    assert returncode == 0, err
    assert out.strip() == "1"


# =========================================================================== bp.threads
def test_threads_restores_both_pools_when_the_body_raises():
    bp.set_num_threads(2)
    assert scipy_openblas_threads() == 2
    with pytest.raises(KeyError, match="inside"):
        with bp.threads(1):
            assert bp.get_num_threads() == 1
            assert scipy_openblas_threads() == 1
            with bp.threads(3):  # nests
                assert scipy_openblas_threads() == 3
            assert scipy_openblas_threads() == 1
            raise KeyError("inside")
    assert bp.get_num_threads() == (2 if OPENMP else 1)
    assert scipy_openblas_threads() == 2


def test_threads_checks_its_argument():
    before = bp.get_num_threads()
    for bad, error in ((0, ValueError), (-2, ValueError), (1.5, TypeError), ("2", TypeError)):
        with pytest.raises(error):
            with bp.threads(bad):
                pass  # pragma: no cover
    assert bp.get_num_threads() == before


def test_set_num_threads_limits_blas_without_threadpoolctl():
    code = """
        import ctypes
        from scipy.linalg import cython_blas
        import bpfast as bp
        library = ctypes.CDLL(cython_blas.__file__)
        get = getattr(library, "scipy_openblas_get_num_threads", None) or getattr(
            library, "openblas_get_num_threads")
        try:
            import threadpoolctl
        except ImportError:
            print("no threadpoolctl")
        bp.set_num_threads(1)
        one = get()
        with bp.threads(2):
            two = get()
        print(one, two, get())
    """
    returncode, out, err = run_python(code, block_threadpoolctl=True)
    if returncode != 0 and "AttributeError" in err:
        pytest.skip("SciPy's BLAS is not OpenBLAS")
    assert returncode == 0, err
    assert out.splitlines() == ["no threadpoolctl", "1 2 1"]


# =========================================================================== split products
def _two_layer_net(dtype, seed=0):
    # layer 1: 300 -> 520, layer 2: 520 -> 260, identity: every product is a plain matmul
    return bp.Network([bp.Dense(300, 520), bp.Dense(520, 260)], dtype=dtype, seed=seed)


def _products(net, X, grad_out):
    out = net.forward(X)
    grad_x = net.backward(grad_out)
    return out, grad_x, net.gradients.copy()


@pytest.mark.parametrize("rows", [200, 600])  # the batch below and above the widths
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_split_products_equal_numpy(rows, dtype):
    """Every product of a forward/backward is split (m n k >= the split size, a side of
    at least two blocks); with 200 rows some are split by columns, with 600 by rows,
    with and without transposes. NumPy in float64 is the oracle."""
    rng = np.random.default_rng(rows)
    net = _two_layer_net(dtype)
    X = rng.standard_normal((rows, 300)).astype(dtype)
    grad_out = rng.standard_normal((rows, 260)).astype(dtype)
    W1, b1 = net.layers[0].weight.astype(np.float64), net.layers[0].bias.astype(np.float64)
    W2, b2 = net.layers[1].weight.astype(np.float64), net.layers[1].bias.astype(np.float64)
    X64, g64 = X.astype(np.float64), grad_out.astype(np.float64)
    hidden = X64 @ W1.T + b1
    expected_out = hidden @ W2.T + b2
    grad_hidden = g64 @ W2
    expected_grads = np.concatenate([(grad_hidden.T @ X64).ravel(), grad_hidden.sum(0),
                                     (g64.T @ hidden).ravel(), g64.sum(0)])
    tolerance = 1e-10 if dtype == "float64" else 2e-4
    for n in (1, 2):
        with bp.threads(n):
            _core.set_adaptive(False)  # n = 2: always threaded
            out, grad_x, grads = _products(net, X, grad_out)
            _core.set_adaptive(True)
        np.testing.assert_allclose(out, expected_out, rtol=tolerance, atol=tolerance * 30)
        np.testing.assert_allclose(grad_x, grad_hidden @ W1, rtol=tolerance,
                                   atol=tolerance * 30)
        np.testing.assert_allclose(grads, expected_grads, rtol=tolerance,
                                   atol=tolerance * 300)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_split_products_give_the_same_bits_for_any_thread_count(dtype):
    """1, 2 and 3 threads, always threaded or timed: the blocks depend on the shape only,
    each is one single-threaded BLAS call, so training ends bit for bit the same."""
    rng = np.random.default_rng(1)
    X = rng.standard_normal((256, 300)).astype(dtype)
    y = rng.standard_normal((256, 260)).astype(dtype)
    results = []
    for n, adaptive in ((1, False), (2, False), (3, False), (2, True)):
        with bp.threads(n):
            _core.set_adaptive(adaptive)
            net, opt = _two_layer_net(dtype, seed=3), bp.Adam(lr=1e-3)
            losses = [net.train_step(X, y, bp.MSE(), opt) for _ in range(4)]
            losses += net.fit(X, y, loss=bp.MSE(), optimizer=opt, epochs=2,
                              batch_size=128).history["loss"]
            _core.set_adaptive(True)
        results.append((np.array(losses).tobytes(), net.parameters.tobytes(),
                        net.predict(X).tobytes()))
    assert all(result == results[0] for result in results[1:])
    if OPENMP:  # the products were timed (threaded and not) under the timed policy
        assert any(m == 256 and n == 520 and k == 300 for m, n, k, *_ in
                   _core.product_timings())


@pytest.mark.skipif(not OPENMP, reason="a serial build always has one thread")
def test_elementwise_passes_are_timed_on_their_own():
    """Outside a training step (forward, predict) the bias-and-activation pass of a
    layer with more than PARALLEL_MIN_WORK outputs keeps its own timing, not the
    products', and gets its threaded way timed too once its probe is due; the output
    stays that of one thread."""
    bias_pass = _core.ELEMENTWISE_PASSES.index("bias_activation") + 1
    rng = np.random.default_rng(4)
    X = rng.standard_normal((300, 301))  # Dense(301, 520): a size no other test uses
    net = bp.Network([bp.Dense(301, 520, activation="tanh")], seed=0)
    work = X.shape[0] * 520
    assert work >= _core.PARALLEL_MIN_WORK

    def timing():
        return [t for t in _core.product_timings() if t[:3] == (work, 0, bias_pass)]
    with bp.threads(1):
        serial = net.forward(X)
    assert not timing()  # one thread: nothing to choose, nothing timed
    with bp.threads(2):
        for _ in range(5000):
            np.testing.assert_array_equal(net.forward(X), serial)
            if timing() and timing()[0][4] > 0:
                break
    (_, _, _, serial_s, parallel_s, _), = timing()
    assert serial_s > 0 and parallel_s > 0, "the threaded way was never probed"


def _step_timing(net, rows):
    return [t for t in _core.product_timings()
            if t[:3] == (rows, net.n_parameters, len(net.layers))]


@pytest.mark.skipif(not OPENMP, reason="a serial build always has one thread")
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_training_steps_choose_their_way_as_a_whole(dtype):
    """A train_step is timed as a whole, on one thread and threaded (the threaded way
    probed once its turn comes), and the products inside it are not timed one by one;
    whichever way each step took, the parameters are those of one thread, bit for bit."""
    rows = 136 if dtype == "float32" else 140  # batches no other test uses
    rng = np.random.default_rng(6)
    X = rng.standard_normal((rows, 300)).astype(dtype)
    y = rng.standard_normal((rows, 260)).astype(dtype)
    with bp.threads(1):
        serial, serial_opt = _two_layer_net(dtype, seed=5), bp.SGD(lr=1e-3)
    net, opt = _two_layer_net(dtype, seed=5), bp.SGD(lr=1e-3)
    with bp.threads(2):
        for _ in range(5000):
            net.train_step(X, y, bp.MSE(), opt)
            with bp.threads(1):
                serial.train_step(X, y, bp.MSE(), serial_opt)
            if _step_timing(net, rows) and _step_timing(net, rows)[0][4] > 0:
                break
    (_, _, _, serial_s, parallel_s, _), = _step_timing(net, rows)
    assert serial_s > 0 and parallel_s > 0, "the threaded way was never probed"
    np.testing.assert_array_equal(net.parameters, serial.parameters)
    step_products = {(rows, 520, 300), (rows, 260, 520), (520, 300, rows),
                     (260, 520, rows), (rows, 520, 260)}  # forward, dW, dX
    assert not step_products & {tuple(t[:3]) for t in _core.product_timings()}, \
        "a product inside a step was timed"


@pytest.mark.skipif(not OPENMP, reason="a serial build always has one thread")
def test_a_step_that_raises_leaves_no_way_behind():
    """A custom loss that raises ends the step: its way (one thread or threaded) must
    not stay set for what the thread runs next, so a later forward times its products
    again, on its own."""
    rng = np.random.default_rng(7)
    X = rng.standard_normal((392, 300))  # 392 rows: a shape no other test uses

    class Broken(bp.Loss):
        def value(self, output, target):
            raise RuntimeError("broken loss")

        def gradient(self, output, target):
            raise RuntimeError("broken loss")
    with bp.threads(2):
        net = _two_layer_net("float64")
        for _ in range(3):
            with pytest.raises(RuntimeError, match="broken loss"):
                net.train_step(X, np.zeros((392, 260)), Broken(), bp.SGD(lr=0.1))
        assert not any(m == 392 and n == 520 for m, n, *_ in _core.product_timings())
        for _ in range(3):
            net.forward(X)
        assert any(m == 392 and n == 520 for m, n, *_ in _core.product_timings())


@pytest.mark.skipif(not OPENMP, reason="a serial build always has one thread")
def test_an_outside_blas_limit_also_limits_the_products():
    """threadpoolctl's BLAS limit of one thread (as scikit-learn users set it) keeps
    bpfast's split products on one thread: they are then not even timed."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    rng = np.random.default_rng(2)
    X = rng.standard_normal((384, 300))  # a shape no other test uses

    def timed():
        return any(m == 384 and n == 520 for m, n, *_ in _core.product_timings())
    with bp.threads(2):
        net = _two_layer_net("float64")
        with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
            for _ in range(3):
                net.forward(X)
        assert not timed()
        for _ in range(3):
            net.forward(X)
        assert timed()


# =========================================================================== issue 12.3
def test_huge_thread_count_is_clamped_and_a_large_step_runs():
    code = """
        import warnings
        import numpy as np
        import bpfast as bp
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            bp.set_num_threads(100000)
        print(bp.get_num_threads(), [str(w.message) for w in caught])
        net = bp.Network([bp.Dense(64, 2048, "relu"), bp.Dense(2048, 10)], seed=0)
        X = np.random.default_rng(0).standard_normal((256, 64))
        y = np.arange(256) % 10
        loss = net.train_step(X, y, "cross_entropy", bp.SGD(lr=0.01))
        print(np.isfinite(loss))
    """
    returncode, out, err = run_python(code)
    assert returncode == 0, err[-2000:]
    first, second = out.splitlines()[:2]
    count = 4 * os.cpu_count() if OPENMP else 1
    assert first.startswith(f"{count} ")
    assert "set_num_threads(100000): using" in first and "per CPU" in first
    assert second == "True"
    assert _threads.max_num_threads() == 4 * os.cpu_count()


# =========================================================================== GridSearchCV
def _threads_score(estimator, X, y):
    """A scorer that reports the worker's thread counts: bpfast's * 1000 + BLAS's."""
    return bp.get_num_threads() * 1000 + (_threads.blas_num_threads() or 0)


@pytest.mark.skipif(not OPENMP, reason="a serial build always has one thread")
def test_grid_search_workers_share_the_cpus():
    """GridSearchCV(n_jobs=2): joblib's worker processes get OMP_NUM_THREADS = CPUs // 2,
    and bpfast's default there follows it for both pools: two workers never start
    more threads together than the machine has CPUs."""
    joblib = pytest.importorskip("joblib")
    pytest.importorskip("sklearn")
    from sklearn.model_selection import GridSearchCV

    from bpfast.sklearn import MLPClassifier
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((40, 4)), np.arange(40) % 2
    search = GridSearchCV(MLPClassifier(hidden_layer_sizes=(4,), max_iter=2, random_state=0),
                          {"alpha": [1e-4, 1e-3]}, cv=2, n_jobs=2, scoring=_threads_score,
                          error_score="raise")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ConvergenceWarning of the two-epoch fits
        search.fit(X, y)
    per_worker = max(1, joblib.cpu_count() // 2)
    scores = search.cv_results_["mean_test_score"]
    assert np.all(scores == per_worker * 1000 + per_worker), scores
