"""Memory: no growth over many calls, bounded peak in a large predict.

* Resident memory (VmRSS, Linux) grows by less than 1 MB over 10,000 train_step
  calls, 1,000 fit calls, and the other entry points (forward/backward, predict,
  compute_gradients, the losses, calls that raise, building and dropping networks),
  each measured as the difference between a second run of the workload and the end
  of a first, identical one (the warm-up).
* A large predict works in chunks: numpy reports its allocations to tracemalloc, and
  the traced peak stays below the output's size plus a few MB of scratch, where an
  unchunked pass would hold a (rows x 256) hidden activation.
"""
import gc
import sys
import tracemalloc

import numpy as np
import pytest

import bpfast as bp

MB = 1 << 20

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="reads VmRSS from /proc/self/status")


def rss():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")  # pragma: no cover


def growth(workload, repeats=1):
    """RSS after a second run of workload minus RSS after the first (the warm-up); with
    repeats > 1, the least growth of that many further runs (a leak grows every run,
    heap fragmentation does not)."""
    workload()
    gc.collect()
    grown = []
    for _ in range(repeats):
        before = rss()
        workload()
        gc.collect()
        grown.append(rss() - before)
    return min(grown)


def _small(dtype="float32", seed=0):
    return bp.Network([bp.Dense(8, 32, "relu"), bp.Dense(32, 16, "gelu"), bp.Dense(16, 4)],
                      dtype=dtype, seed=seed)


def _data(n=64, dtype="float32"):
    rng = np.random.default_rng(0)
    return (np.ascontiguousarray(rng.standard_normal((n, 8)), dtype=dtype),
            rng.integers(0, 4, n).astype(np.intp))


@linux_only
@pytest.mark.parametrize("dtype", ["float32"])
def test_10000_train_steps_do_not_grow_memory(dtype):
    X, y = _data(32, dtype)
    net, loss, opt = _small(dtype), bp.CrossEntropy(), bp.Adam(lr=1e-3)

    def workload():
        for _ in range(10_000):
            net.train_step(X, y, loss, opt)

    grown = growth(workload)
    assert grown < MB, f"RSS grew by {grown / MB:.2f} MB over 10,000 train_step calls"
    assert opt.step_count == 20_000 and np.isfinite(net.parameters).all()


@linux_only
def test_10000_train_steps_with_converted_input_do_not_grow_memory():
    """Input that needs conversion (float64 into a float32 network, int labels of
    another width, a Fortran-ordered X) allocates per call; all of it must be freed."""
    X, y = _data(32, "float64")
    X = np.asfortranarray(X)
    y = y.astype(np.int32)
    net, loss, opt = _small("float32"), bp.CrossEntropy(), bp.SGD(lr=1e-3, momentum=0.9)

    def workload():
        for _ in range(10_000):
            net.train_step(X, y, loss, opt)

    grown = growth(workload)
    assert grown < MB, f"RSS grew by {grown / MB:.2f} MB"


@linux_only
@pytest.mark.parametrize("shuffle", [True, False])
def test_1000_fits_do_not_grow_memory(shuffle):
    X, y = _data(64)
    net, loss, opt = _small(), bp.CrossEntropy(), bp.RMSprop(lr=1e-3)

    def workload():
        for _ in range(1_000):
            net.fit(X, y, loss=loss, optimizer=opt, epochs=2, batch_size=16, shuffle=shuffle)

    grown = growth(workload)
    assert grown < MB, f"RSS grew by {grown / MB:.2f} MB over 1,000 fit calls"


@linux_only
def test_step_by_step_api_and_losses_do_not_grow_memory():
    X, y = _data(32)
    Y = np.eye(4, dtype=np.float32)[y]
    net, opt = _small("float64"), bp.AdamW(lr=1e-3)
    X = X.astype(np.float64)
    losses = [bp.CrossEntropy(), bp.MSE(), bp.Huber(0.5), bp.L1(), bp.BinaryCrossEntropy()]

    def workload():
        for i in range(2_000):
            loss = losses[i % len(losses)]
            target = y if i % len(losses) == 0 else Y
            out = net.forward(X)
            loss(out, target)
            net.backward(loss.gradient(out, target))
            opt.step(net)
            net.predict(X)
            net.compute_gradients(X, target, loss)

    grown = growth(workload)
    assert grown < MB, f"RSS grew by {grown / MB:.2f} MB"


@linux_only
def test_failed_calls_do_not_grow_memory_or_leave_the_network_busy():
    X, y = _data(32)
    bad_X = X.copy()
    bad_X[5, 3] = np.nan
    bad_y = y.copy()
    bad_y[2] = 9
    net, loss, opt = _small(), bp.CrossEntropy(), bp.Adam(lr=1e-3)
    net.train_step(X, y, loss, opt)
    foreign = _small(seed=1)

    def workload():
        for _ in range(2_000):
            for call in (lambda: net.train_step(bad_X, y, loss, opt),
                         lambda: net.train_step(X, bad_y, loss, opt),
                         lambda: net.fit(X, y, loss=loss, optimizer=opt, batch_size=0),
                         lambda: foreign.train_step(X, y, loss, opt),
                         lambda: net.backward(np.ones((3, 4))),
                         lambda: net.predict(bad_X)):
                try:
                    call()
                except (ValueError, TypeError):
                    pass
                else:  # pragma: no cover
                    raise AssertionError("a bad call succeeded")

    grown = growth(workload)
    assert grown < MB, f"RSS grew by {grown / MB:.2f} MB over failed calls"
    # nothing was left locked or half-done: the network still trains, exactly
    twin, twin_opt = _small(), bp.Adam(lr=1e-3)
    twin.train_step(X, y, loss, twin_opt)
    assert net.train_step(X, y, loss, opt) == twin.train_step(X, y, loss, twin_opt)
    assert net.parameters.tobytes() == twin.parameters.tobytes()


@linux_only
def test_building_and_dropping_networks_frees_them():
    X, y = _data(16)

    def workload():
        for i in range(200):
            net = _small(seed=i)
            opt = bp.Adam(lr=1e-3)
            net.train_step(X, y, bp.CrossEntropy(), opt)
            net.forward(np.zeros((200, 8), dtype=np.float32))  # grow the workspaces
            del net, opt
            if i % 50 == 0:
                gc.collect()  # a network and its layers form a cycle

    grown = growth(workload, repeats=3)
    assert grown < MB, f"RSS grew by {grown / MB:.2f} MB over 200 networks built and dropped"


# =========================================================================== large predict
@pytest.mark.parametrize("dtype, rows", [("float32", 300_000), ("float64", 150_000)])
def test_large_predict_runs_in_bounded_memory(dtype, rows):
    net = bp.Network([bp.Dense(16, 256, "relu"), bp.Dense(256, 16)], dtype=dtype, seed=0)
    X = np.random.default_rng(0).standard_normal((rows, 16), dtype=np.dtype(dtype).type)
    hidden_unchunked = rows * 256 * X.itemsize
    gc.collect()
    tracemalloc.start()
    try:
        out = net.predict(X)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert out.shape == (rows, 16) and out.dtype == np.dtype(dtype)
    assert peak >= out.nbytes, "tracemalloc did not see numpy's allocation of the output"
    scratch_budget = 17 * MB  # 2 chunks x 2^20 elements of float64 is 16 MB
    assert peak <= out.nbytes + scratch_budget, (
        f"predict peaked at {(peak - out.nbytes) / MB:.1f} MB above its output "
        f"(an unchunked hidden layer would be {hidden_unchunked / MB:.0f} MB)")
    assert current <= out.nbytes + MB, "predict kept scratch memory after returning"
    # the chunks compute what the network computes
    head = net.forward(X[:2000])
    tol = 1e-12 if dtype == "float64" else 1e-5
    np.testing.assert_allclose(out[:2000], head, rtol=tol, atol=tol)
    np.testing.assert_allclose(out[-2000:], net.forward(X[-2000:]), rtol=tol, atol=tol)
