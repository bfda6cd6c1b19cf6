"""Numerical extremes: logits of +-1e4, inputs of 1e30, both dtypes.

Where mathematics allows a finite loss and gradient, bpfast must give them, equal to
the NumPy oracle tests/oracle.py evaluated in float64 (on the same float32-rounded
inputs for a float32 network). Where the true value does not fit the dtype (the
squared error of 1e30 in float32), the test states what the library does: the loss
comes back non-finite from compute_gradients and the losses, so the caller can see
it, and train_step and fit raise bpfast.DivergenceError with finite
parameters left.
"""
import math

import numpy as np
import oracle as ref
import pytest
from oracle_checks import oracle_spec

import bpfast as bp

DTYPES = ["float32", "float64"]
HAS_DIVERGENCE_ERROR = hasattr(bp, "DivergenceError")
needs_divergence_error = pytest.mark.skipif(not HAS_DIVERGENCE_ERROR, reason="no DivergenceError")

LABELS = np.array([0, 1, 2, 1, 0, 2])
# binary targets hitting both saturated ends with 0, 1 and 0.5
BINARY = np.array([[0, 1, 1], [1, 0, 0.5], [0, 0, 0], [1, 1, 1], [0.5, 0.5, 0.5], [1, 0, 1]],
                  dtype=float)


def rtol(dtype):
    return 1e-12 if dtype == "float64" else 2e-6


def logit_net(dtype, output=None, logits=(1e4, -1e4, 0.0)):
    """A 2 -> 3 layer whose output is exactly the given logits for every row (zero
    weights, the logits in the bias), so the loss sees +-1e4 whatever X is."""
    net = bp.Network([bp.Dense(2, 3, output)], dtype=dtype, seed=0)
    net.parameters[:] = 0
    net.layers[0].bias[:] = logits
    return net


def reference_gradients(net, X, d_out_fn):
    """The reference network's parameter gradients in net's flat layout, float64.

    d_out_fn(z_last, a_last) gives dL/d(a_last) or, for a fused probability output,
    dL/dz_last (then the last activation is treated as the identity).
    """
    weights, biases, acts = oracle_spec(net)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        cache = ref.network_forward(weights, biases, acts, X)
        grad, fused = d_out_fn(*cache[-1])
        if fused:
            acts = acts[:-1] + ["identity"]
        grad_w, grad_b, grad_x = ref.network_backward(weights, cache, acts, grad, X,
                                                      biases=biases)
    flat = []
    for w, b in zip(grad_w, grad_b):
        flat.append(w.ravel())
        if b is not None:
            flat.append(b)
    return np.concatenate(flat), grad_x, cache


def assert_close(got, expected, dtype, scale=None):
    got = np.asarray(got, dtype=np.float64)
    assert np.isfinite(got).all(), got
    assert np.isfinite(expected).all(), expected
    scale = np.abs(expected).max() if scale is None else scale
    np.testing.assert_allclose(got, expected, rtol=rtol(dtype), atol=rtol(dtype) * scale + 1e-300)


# =========================================================================== logits +-1e4
# (id, last activation, loss, target, reference loss name, from_logits, fused)
LOGIT_CASES = [
    ("ce_from_logits", None, bp.CrossEntropy(), LABELS, "cross_entropy", True, False),
    ("ce_softmax_fused", "softmax", bp.CrossEntropy(from_logits=False), LABELS, "cross_entropy",
     True, True),
    ("ce_from_logits_probabilities", None, bp.CrossEntropy(), np.eye(3)[LABELS] * 0.7 + 0.1,
     "cross_entropy", True, False),
    ("bce_from_logits", None, bp.BinaryCrossEntropy(), BINARY, "binary_cross_entropy", True,
     False),
    ("bce_sigmoid_fused", "sigmoid", bp.BinaryCrossEntropy(from_logits=False), BINARY,
     "binary_cross_entropy", True, True),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("logits", [(1e4, -1e4, 0.0), (-1e4, -1e4, 1e4), (1e4, 1e4, 1e4),
                                    (-1e4, -1e4, -1e4)], ids=str)
@pytest.mark.parametrize("output, loss, target, name, from_logits, fused",
                         [pytest.param(*c[1:], id=c[0]) for c in LOGIT_CASES])
def test_logits_of_1e4(output, loss, target, name, from_logits, fused, logits, dtype):
    """The loss of +-1e4 logits is finite (up to ~2e4) and so is its gradient; both
    equal the reference's on the logits, for the fused probability outputs too."""
    net = logit_net(dtype, output, logits)
    X = np.random.default_rng(0).standard_normal((len(LABELS), 2))
    z = np.tile(np.asarray(logits, dtype=dtype).astype(np.float64), (len(LABELS), 1))
    with np.errstate(over="ignore", under="ignore"):
        expected_value = ref.loss_forward(name, z, target, from_logits=from_logits)
    assert math.isfinite(expected_value)
    value = net.compute_gradients(X, target, loss)
    assert value == pytest.approx(expected_value, rel=rtol(dtype))
    expected_grad, _, _ = reference_gradients(
        net, X, lambda z_last, a_last: (ref.loss_gradient(name, z_last, target), fused))
    assert_close(net.gradients, expected_grad, dtype, scale=1.0)
    # the same through a whole training step (the loss before the update) and fit
    opt = bp.Adam(lr=1e-3)
    assert net.train_step(X, target, loss, opt) == pytest.approx(expected_value, rel=rtol(dtype))
    assert np.isfinite(net.parameters).all()
    history = net.fit(X, target, loss=loss, optimizer=opt, epochs=3, batch_size=2)
    assert np.isfinite(history.history["loss"]).all()
    assert np.isfinite(net.parameters).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_standalone_probability_losses_clamp_the_log_at_minus_100(dtype):
    """On probabilities saturated to exactly 0 and 1, the standalone losses (and
    PyTorch's BCELoss) clamp log p at -100; the fused training path of a softmax or
    sigmoid output computes the exact loss from the logits instead. Both are finite;
    each equals its own reference formula, and they differ by design."""
    X = np.zeros((len(LABELS), 2))
    soft = logit_net(dtype, "softmax")
    p = soft.predict(X)
    assert set(np.unique(p)) <= {0.0, 1.0}
    ce = bp.CrossEntropy(from_logits=False)
    standalone = ce(p, LABELS)
    assert standalone == pytest.approx(
        ref.loss_forward("cross_entropy", p, LABELS, from_logits=False), rel=1e-12)
    assert standalone <= 100.0
    assert np.isfinite(ce.gradient(p, LABELS)).all()
    fused = soft.compute_gradients(X, LABELS, ce)
    z = np.tile([1e4, -1e4, 0.0], (len(LABELS), 1))
    assert fused == pytest.approx(ref.loss_forward("cross_entropy", z, LABELS), rel=rtol(dtype))

    sig = logit_net(dtype, "sigmoid")
    p = sig.predict(X)
    bce = bp.BinaryCrossEntropy(from_logits=False)
    standalone = bce(p, BINARY)
    assert standalone == pytest.approx(
        ref.loss_forward("binary_cross_entropy", p, BINARY, from_logits=False), rel=1e-6)
    assert standalone <= 100.0
    assert np.isfinite(bce.gradient(p, BINARY)).all()
    fused = sig.compute_gradients(X, BINARY, bce)
    assert fused == pytest.approx(ref.loss_forward("binary_cross_entropy", z, BINARY),
                                  rel=rtol(dtype))


# =========================================================================== activations
EDGE_Z = [1e30, -1e30, 1e4, -1e4, 710.0, -710.0, 89.0, -89.0, 20.0, -20.0, 20.5, 0.0, -0.0,
          1e-30, -1e-30, 3e38, -3e38]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", [a for a in bp.ACTIVATIONS if a != "softmax"])
def test_activation_at_extreme_pre_activations(activation, dtype):
    """Each activation and its derivative at +-1e30, +-1e4, the float32/float64 exp
    overflow points, softplus's threshold and +-0: finite where the function is, and
    equal to the reference (evaluated in float64 on the same inputs)."""
    k = len(EDGE_Z)
    kwargs = {"negative_slope": 0.2} if activation == "leaky_relu" else (
        {"alpha": 1.5} if activation == "elu" else {})
    net = bp.Network([bp.Dense(k, k, activation, **kwargs)], dtype=dtype, seed=0)
    net.parameters[:] = 0
    net.layers[0].weight[:] = np.eye(k)  # z = x exactly
    X = np.asarray([EDGE_Z, [-v for v in EDGE_Z]], dtype=dtype)
    param = kwargs.get("negative_slope", kwargs.get("alpha"))
    z = X.astype(np.float64)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        expected_a = ref.activation_forward(activation, z, param)
        g = np.random.default_rng(0).uniform(0.5, 1.5, z.shape)
        expected_dz = ref.activation_backward(activation, g, z, expected_a, param)
    finite = np.isfinite(expected_a)
    if dtype == "float32":
        # |z| up to 3e38 times a derivative of 1 still fits; identity-like outputs do too
        finite &= np.abs(expected_a) <= np.finfo(np.float32).max
    out = net.forward(X).astype(np.float64)
    assert np.isfinite(out).all(), out
    # float32 atol: PyTorch's silu, x / (1 + exp(-x)), is -0 at x = -89 (exp overflows),
    # where the float64 reference gives -2e-37
    np.testing.assert_allclose(out[finite], expected_a[finite], rtol=rtol(dtype),
                               atol=1e-300 if dtype == "float64" else 1e-36)
    assert out.tobytes() == net.predict(X).astype(np.float64).tobytes()
    dX = net.backward(g.astype(dtype)).astype(np.float64)  # dX = dz (identity weight)
    assert np.isfinite(dX).all(), dX
    # float32: a derivative taken from the stored output, like sigmoid's a(1 - a), is 0
    # once a rounds to 1 (z >= ~17), as in PyTorch; the true value is below 1e-7 there
    np.testing.assert_allclose(dX, expected_dz, rtol=rtol(dtype),
                               atol=1e-300 if dtype == "float64" else 1e-7 * np.abs(g).max())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("output, loss", [(None, "ce"), ("softmax", "ce_probs"),
                                          (None, "bce"), ("sigmoid", "bce_probs")])
def test_logits_of_1e30(output, loss, dtype):
    """Logits of +-1e30 (representable in float32): cross-entropy losses up to ~2e30,
    finite, with bounded gradients."""
    net = logit_net(dtype, output, logits=(1e30, -1e30, 0.0))
    X = np.zeros((len(LABELS), 2))
    loss_obj, target, name = {
        "ce": (bp.CrossEntropy(), LABELS, "cross_entropy"),
        "ce_probs": (bp.CrossEntropy(from_logits=False), LABELS, "cross_entropy"),
        "bce": (bp.BinaryCrossEntropy(), BINARY, "binary_cross_entropy"),
        "bce_probs": (bp.BinaryCrossEntropy(from_logits=False), BINARY, "binary_cross_entropy"),
    }[loss]
    z = np.tile([1e30, -1e30, 0.0], (len(LABELS), 1))
    value = net.compute_gradients(X, target, loss_obj)
    assert value == pytest.approx(ref.loss_forward(name, z, target), rel=rtol(dtype))
    expected = ref.loss_gradient(name, z, target)
    # only the bias receives gradient (X = 0): the column sums of dL/dz
    assert_close(net.layers[0].grad_bias, expected.sum(axis=0), dtype, scale=1.0)
    assert np.isfinite(net.gradients).all()


# =========================================================================== inputs 1e30
def _x_1e30(n=6, n_in=4):
    rng = np.random.default_rng(1)
    return rng.choice([1e30, -1e30, 0.0, 1.0], size=(n, n_in))


BOUNDED_HIDDEN = ["tanh", "sigmoid"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", BOUNDED_HIDDEN + ["relu", "gelu", "softplus", "elu"])
@pytest.mark.parametrize("loss_kind", ["ce", "ce_softmax", "bce", "bce_sigmoid", "l1", "huber"])
def test_inputs_of_1e30_with_losses_linear_in_the_output(hidden, loss_kind, dtype):
    """Inputs of 1e30: every loss here grows at most linearly with the output, so for a
    bounded hidden layer (tanh, sigmoid) everything is O(1), and for an unbounded one
    (relu, gelu, softplus, elu) the loss and the gradients are ~1e30 at most (dL/dout is
    bounded, times activations or inputs of ~1e30), which float32 holds too: finite in
    every case, and equal to the reference network's."""
    bounded = hidden in BOUNDED_HIDDEN
    X = _x_1e30()
    n = len(X)
    output, loss, target, name, params, fused = {
        "ce": (None, bp.CrossEntropy(), LABELS[:n], "cross_entropy", {}, False),
        "ce_softmax": ("softmax", bp.CrossEntropy(from_logits=False), LABELS[:n],
                       "cross_entropy", {}, True),
        "bce": (None, bp.BinaryCrossEntropy(), BINARY[:n], "binary_cross_entropy", {}, False),
        "bce_sigmoid": ("sigmoid", bp.BinaryCrossEntropy(from_logits=False), BINARY[:n],
                        "binary_cross_entropy", {}, True),
        "l1": (None, bp.L1(), BINARY[:n], "l1", {}, False),
        "huber": (None, bp.Huber(0.5), BINARY[:n], "huber", {"delta": 0.5}, False),
    }[loss_kind]
    net = bp.Network([bp.Dense(4, 5, hidden), bp.Dense(5, 3, output)], dtype=dtype, seed=3)
    value = net.compute_gradients(X, target, loss)
    assert math.isfinite(value)
    assert np.isfinite(net.gradients).all()
    expected_grad, _, cache = reference_gradients(
        net, X, lambda z, a: (ref.loss_gradient(name, z if fused else a, target, **params),
                              fused))
    z_last, a_last = cache[-1]
    expected_value = ref.loss_forward(name, z_last if fused else a_last, target, **params)
    assert value == pytest.approx(expected_value, rel=rtol(dtype))
    if bounded:
        assert abs(value) < 1e3
    assert_close(net.gradients, expected_grad, dtype)
    # a step of a scale-free optimizer keeps everything finite
    opt = bp.Adam(lr=1e-3)
    net.train_step(X, target, loss, opt)
    assert np.isfinite(net.parameters).all()
    assert np.isfinite(net.predict(X)).all()


@pytest.mark.parametrize("loss", [bp.MSE(), bp.MSE(half=True)], ids=repr)
def test_inputs_of_1e30_mse_in_float64_is_finite(loss):
    """The squared error of outputs ~1e30 is ~1e60: finite in float64, and equal to the
    reference."""
    X = _x_1e30()
    net = bp.Network([bp.Dense(4, 5, "relu"), bp.Dense(5, 3)], dtype="float64", seed=3)
    target = BINARY[:len(X)]
    value = net.compute_gradients(X, target, loss)
    half = loss.half
    expected_grad, _, cache = reference_gradients(
        net, X, lambda z, a: (ref.loss_gradient("mse", a, target, half=half), False))
    assert value == pytest.approx(ref.loss_forward("mse", cache[-1][1], target, half=half),
                                  rel=1e-12)
    assert 1e50 < value < 1e70
    assert_close(net.gradients, expected_grad, "float64")


@pytest.mark.parametrize("call", ["compute_gradients", "train_step", "loss"])
def test_inputs_of_1e30_mse_in_float32_overflows_visibly(call):
    """The squared error of ~1e30 outputs (~1e60) and its weight gradient do not fit in
    float32. compute_gradients and the loss return the non-finite value, so the caller
    sees it; train_step either does the same or raises DivergenceError and
    skips the update."""
    X = _x_1e30()
    net = bp.Network([bp.Dense(4, 5, "relu"), bp.Dense(5, 3)], dtype="float32", seed=3)
    target = BINARY[:len(X)]
    assert np.isfinite(net.predict(X)).all()  # the outputs themselves (~1e30) fit
    before = net.parameters.copy()
    with np.errstate(over="ignore", invalid="ignore"):
        if call == "compute_gradients":
            value = net.compute_gradients(X, target, bp.MSE())
            assert not np.isfinite(net.gradients).all()
        elif call == "train_step":
            opt = bp.SGD(lr=0.1, momentum=0.9)
            if HAS_DIVERGENCE_ERROR:
                with pytest.raises(bp.DivergenceError, match="loss"):
                    net.train_step(X, target, bp.MSE(), opt)
                assert net.parameters.tobytes() == before.tobytes()
                assert all(np.isfinite(s).all() for s in opt.state.values())
                return
            value = net.train_step(X, target, bp.MSE(), opt)
        else:
            value = bp.MSE()(net.predict(X), target)
    assert not math.isfinite(value)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fit_on_1e30_inputs_with_cross_entropy_stays_finite(dtype):
    X = np.tile(_x_1e30(), (4, 1))
    y = np.resize(LABELS, len(X))
    net = bp.Network([bp.Dense(4, 8, "tanh"), bp.Dense(8, 3)], dtype=dtype, seed=0)
    history = net.fit(X, y, loss=bp.CrossEntropy(), optimizer=bp.Adam(lr=1e-2), epochs=5,
                      batch_size=5)
    assert np.isfinite(history.history["loss"]).all()
    assert np.isfinite(net.parameters).all()


# =========================================================================== divergence
DIVERGING = [
    # (id, dtype, X, loss, optimizer): the loss becomes inf or NaN within a few epochs
    ("float32_mse_1e30", "float32", "x1e30", bp.MSE, lambda: bp.SGD(lr=0.1)),
    ("float64_mse_1e30", "float64", "x1e30", bp.MSE, lambda: bp.SGD(lr=0.1)),
    ("float64_huge_lr", "float64", "normal", bp.MSE, lambda: bp.SGD(lr=1e6)),
    ("float32_huge_lr", "float32", "normal", bp.MSE, lambda: bp.SGD(lr=1e6)),
]


def _diverging_data(kind):
    if kind == "x1e30":
        X = np.tile(_x_1e30(), (2, 1))
    else:
        X = np.random.default_rng(0).standard_normal((12, 4)) * 10
    return X, np.random.default_rng(1).standard_normal((len(X), 3))


@needs_divergence_error
@pytest.mark.parametrize("dtype, kind, loss, make_opt",
                         [pytest.param(*c[1:], id=c[0]) for c in DIVERGING])
def test_diverging_fit_raises(dtype, kind, loss, make_opt):
    """A non-finite loss stops fit with bp.DivergenceError and the network is
    restored to finite weights (the last finite ones), still usable."""
    X, T = _diverging_data(kind)
    net = bp.Network([bp.Dense(4, 6, "relu"), bp.Dense(6, 3)], dtype=dtype, seed=0)
    initial = net.parameters.copy()
    with np.errstate(all="ignore"):
        diverges_at_once = not math.isfinite(net.compute_gradients(X[:6], T[:6], loss()))
    with np.errstate(all="ignore"), pytest.raises(bp.DivergenceError) as info:
        net.fit(X, T, loss=loss(), optimizer=make_opt(), epochs=60, batch_size=6, shuffle=False)
    assert "loss" in str(info.value) or "gradient" in str(info.value)
    # finite weights (they may be huge: the last finite ones of a diverging run)
    assert np.isfinite(net.parameters).all()
    if diverges_at_once:  # the very first batch's loss is not finite: nothing changed
        assert net.parameters.tobytes() == initial.tobytes()


@needs_divergence_error
@pytest.mark.parametrize("dtype", DTYPES)
def test_finite_extreme_fit_does_not_raise_divergence(dtype):
    """Large but finite losses (logits of +-1e4, loss ~1e4) are not a divergence."""
    net = logit_net(dtype)
    X = np.zeros((len(LABELS), 2))
    history = net.fit(X, LABELS, loss=bp.CrossEntropy(), optimizer=bp.SGD(lr=1e-3), epochs=3)
    assert np.isfinite(history.history["loss"]).all()
    assert min(history.history["loss"]) > 1e3


# ============================== hyperparameters float32 cannot hold: a clear error
def _small_regression(dtype, seed=0):
    X = np.random.default_rng(seed).standard_normal((8, 3))
    net = bp.Network([bp.Dense(3, 4, "tanh"), bp.Dense(4, 1)], dtype=dtype, seed=0)
    return net, X, 100 * X[:, :1]


UNREPRESENTABLE_IN_FLOAT32 = [
    (lambda: bp.SGD(lr=1e39), "lr=1e\\+39"),
    (lambda: bp.SGD(lr=1e-50), "lr=1e-50"),
    (lambda: bp.SGD(lr=0.1, momentum=1e39), "momentum"),
    (lambda: bp.SGD(lr=0.1, dampening=-1e39), "dampening"),
    (lambda: bp.SGD(lr=0.1, weight_decay=1e39), "weight_decay"),
    (lambda: bp.Adam(eps=1e-50), "eps=1e-50"),
    (lambda: bp.AdamW(weight_decay=1e39), "weight_decay"),
    (lambda: bp.RMSprop(eps=1e-46), "eps"),
    (lambda: bp.Adagrad(initial_accumulator_value=1e39), "initial_accumulator_value"),
    (lambda: bp.Adagrad(lr_decay=1e39), "lr_decay"),
]


@pytest.mark.parametrize("call", ["train_step", "fit", "step"])
@pytest.mark.parametrize("make, name", UNREPRESENTABLE_IN_FLOAT32)
def test_hyperparameter_not_representable_in_float32_is_refused(make, name, call):
    """SGD(lr=1e39) is a finite double but inf in float32: refused (ValueError naming it)
    when the optimizer first meets a float32 network, before anything changes; the same
    optimizer steps a float64 network."""
    net, X, y = _small_regression("float32")
    opt = make()
    before = net.parameters.copy()
    with pytest.raises(ValueError, match=f"{name}.*float32"):
        if call == "train_step":
            net.train_step(X, y, "mse", opt)
        elif call == "fit":
            net.fit(X, y, loss="mse", optimizer=opt, epochs=1)
        else:
            net.compute_gradients(X, y, "mse")
            opt.step(net)
    assert net.parameters.tobytes() == before.tobytes()
    assert opt.step_count == 0 and opt.state == {}
    net64, X, y = _small_regression("float64")
    net64.compute_gradients(X, y, "mse")
    opt.step(net64)  # representable in float64: no error (whatever the step gives)


def test_changed_learning_rate_is_checked_in_the_network_dtype():
    net, X, y = _small_regression("float32")
    opt = bp.SGD(lr=1e-3)
    net.train_step(X, y, "mse", opt)
    with pytest.raises(ValueError, match="lr=1e\\+39 .*float32"):
        opt.lr = 1e39
    assert opt.lr == 1e-3
    # a schedule's rate, per epoch and per step, the same
    class Huge(bp.schedules.Schedule):
        def factor(self, t):
            return np.full(np.shape(t), 1e42)

    for schedule in (lambda epoch: 1e39, Huge(per="step")):
        with pytest.raises(ValueError, match="1e\\+39"):
            net.fit(X, y, loss="mse", optimizer=bp.SGD(lr=1e-3), epochs=1, schedule=schedule)
    assert np.isfinite(net.parameters).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("on_divergence", ["raise", "warn"])
@pytest.mark.parametrize("early_stopping", [False, True])
def test_fit_whose_last_update_overflows_ends_finite(on_divergence, early_stopping, dtype):
    """The loss is computed before each update, so within an epoch an overflowing update
    shows at the next batch; the last update of a fit has no next batch. It is checked
    too: fit raises DivergenceError or warns (the on_divergence action), and the network
    keeps the finite parameters of the epoch's start."""
    net, X, y = _small_regression(dtype)
    lr = 1e37 if dtype == "float32" else 1e307
    net.fit(X, y, loss="mse", optimizer=bp.SGD(lr=1e-3), epochs=1)  # one finite epoch
    before = net.parameters.copy()
    kwargs = dict(loss="mse", optimizer=bp.SGD(lr=lr), epochs=1, early_stopping=early_stopping,
                  on_divergence=on_divergence)
    if on_divergence == "raise":
        with pytest.raises(bp.DivergenceError, match="parameters became NaN or infinite"):
            net.fit(X, y, **kwargs)
    else:
        with pytest.warns(RuntimeWarning, match="parameters became NaN or infinite"):
            history = net.fit(X, y, **kwargs)
        assert history.stop_reason == "diverged" and history.epoch == []
    assert net.parameters.tobytes() == before.tobytes()
    assert net.epochs_trained == 1


# ====================================== sizes beyond BLAS's int: a clear error, no crash
HUGE_ROWS = 2 ** 31  # one more than BLAS's int takes


@pytest.fixture
def little_memory(monkeypatch):
    """available_memory() says 64 MiB: sizes that fail here need no real allocation."""
    import bpfast._validation as validation
    monkeypatch.setattr(validation, "available_memory", lambda: 64 << 20)


def test_available_memory_is_a_plausible_size():
    from bpfast._validation import available_memory
    available = available_memory()
    assert available is None or 0 < available < 1 << 60


def test_network_larger_than_memory_is_refused_before_allocating():
    # 10**12 parameters: 3.6 TiB each for parameters and gradients, on any machine
    with pytest.raises(MemoryError, match=r"1000001000000 float32 parameters .* needs 14\.6 TiB"):
        bp.Network([bp.Dense(10 ** 6, 10 ** 6)])
    with pytest.raises(ValueError, match=r"wider than 2147483647"):
        bp.Network([bp.Dense(1, 2 ** 31)])


def test_network_of_the_issue_is_refused_where_it_cannot_fit(little_memory):
    """Dense(1, 10**9) was OOM-killed; with 64 MiB available, Dense(1, 10**7) (2 x 76 MiB
    and a float64 draw) is refused the same way, with nothing allocated."""
    import tracemalloc
    tracemalloc.start()
    try:
        with pytest.raises(MemoryError, match=r"20000000 float32 parameters .* needs 305\.2 MiB, "
                                              r"but only 64\.0 MiB"):
            bp.Network([bp.Dense(1, 10 ** 7)])
        assert tracemalloc.get_traced_memory()[1] < 1 << 20
    finally:
        tracemalloc.stop()


def test_optimizer_state_larger_than_memory_is_refused(monkeypatch):
    import bpfast._validation as validation
    net = bp.Network([bp.Dense(1000, 1000)], seed=0)  # 1001000 float32: 3.8 MiB
    X, y = np.ones((2, 1000)), np.zeros((2, 1000))
    before = net.parameters.copy()
    monkeypatch.setattr(validation, "available_memory", lambda: 5 << 20)
    opt = bp.Adam()
    for call in (lambda: net.train_step(X, y, "mse", opt),
                 lambda: net.fit(X, y, loss="mse", optimizer=opt)):
        with pytest.raises(MemoryError, match=r"state of Adam \(exp_avg, exp_avg_sq\) for "
                                              r"1001000 parameters needs 7\.6 MiB"):
            call()
    assert net.parameters.tobytes() == before.tobytes() and opt.state == {}
    net.train_step(X, y, "mse", bp.SGD(lr=0.1))  # no state: fits


def test_workspaces_of_a_huge_batch_are_refused(little_memory):
    net = bp.Network([bp.Dense(4, 2000, "relu"), bp.Dense(2000, 3)], seed=0)
    X = np.ones((20000, 4), dtype=np.float32)  # 0.3 MiB; its workspaces about 0.5 GiB
    y = np.zeros(20000, dtype=np.intp)
    before = net.parameters.copy()
    for call in (net.forward, lambda X: net.compute_gradients(X, y, "cross_entropy"),
                 lambda X: net.train_step(X, y, "cross_entropy", "sgd"),
                 lambda X: net.fit(X, y, loss="cross_entropy", optimizer="sgd",
                                   batch_size=None)):
        with pytest.raises(MemoryError, match="workspaces for a batch of 20000 rows"):
            call(X)
    assert net.parameters.tobytes() == before.tobytes()
    # in batches that fit, and predict (which works in chunks): no error
    net.fit(X, y, loss="cross_entropy", optimizer="sgd", batch_size=100)
    assert net.predict(X).shape == (20000, 3)


def test_batch_of_more_rows_than_blas_takes_is_refused():
    """A batch of 2**31 rows would reach BLAS as a C int: refused before any copy (the
    input is a zero-stride view of 4 bytes; a copy would be 8 GiB)."""
    net = bp.Network([bp.Dense(1, 1)], seed=0)
    X = np.broadcast_to(np.float32(1), (HUGE_ROWS, 1))
    y = np.broadcast_to(np.float32(0), (HUGE_ROWS, 1))
    for call in (net.forward, lambda X: net.compute_gradients(X, y, "mse"),
                 lambda X: net.train_step(X, y, "mse", "sgd")):
        with pytest.raises(ValueError, match=r"X has 2147483648 rows; .* at most 2147483647"):
            call(X)
    with pytest.raises(ValueError, match=r"batch of fit \(batch_size=None, 2147483648 samples"):
        net.fit(X, y, loss="mse", optimizer="sgd", batch_size=None)
