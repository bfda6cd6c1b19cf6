"""Property-based tests (hypothesis): random architectures, batch sizes, dtypes,
activations and losses.

Properties and their oracles:

* shapes, dtypes and finiteness of forward, predict, backward, compute_gradients and
  train_step, for every activation and every compatible loss, both dtypes;
* gradients equal central differences of the loss (float64, relative error 1e-6), for
  every activation and loss; samples whose pre-activations (or residuals, for L1 and
  Huber) sit within a margin of a kink are rejected with ``assume``;
* ``train_step`` equals the step-by-step API (forward, loss, loss.gradient, backward,
  opt.step) to 1e-12 in float64, for five optimizers;
* ``fit`` with a batch larger than n is batch gradient descent: bitwise equal to
  ``batch_size=None`` and to a loop of ``train_step``.
"""
import numpy as np
import pytest
from central_differences import numerical_gradient

hypothesis = pytest.importorskip("hypothesis")
import oracle as ref  # noqa: E402
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from oracle_checks import oracle_spec  # noqa: E402

import bpfast as bp  # noqa: E402

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

HIDDEN = [a for a in bp.ACTIVATIONS if a != "softmax"]
OUTPUTS = list(bp.ACTIVATIONS)
KINKS = {"relu": (0.0,), "leaky_relu": (0.0,), "elu": (0.0,), "softplus": (20.0,)}

# losses by name: (factory, target kind)
LOSSES = {
    "mse": (lambda: bp.MSE(), "real"),
    "mse_half": (lambda: bp.MSE(half=True), "real"),
    "l1": (lambda: bp.L1(), "real"),
    "huber": (lambda: bp.Huber(delta=0.7), "real"),
    "ce_labels": (lambda: bp.CrossEntropy(), "labels"),
    "ce_probabilities": (lambda: bp.CrossEntropy(), "probabilities"),
    "ce_from_probs": (lambda: bp.CrossEntropy(from_logits=False), "labels"),
    "bce": (lambda: bp.BinaryCrossEntropy(), "binary"),
    "bce_from_probs": (lambda: bp.BinaryCrossEntropy(from_logits=False), "binary"),
}
FUSED_PROBABILITY_LOSSES = ("ce_from_probs", "bce_from_probs")


def compatible(output, loss_name):
    """Loss on probabilities only after the matching squashing; a loss on logits never
    after it (bpfast refuses that pair)."""
    if loss_name == "ce_from_probs":
        return output == "softmax"
    if loss_name == "bce_from_probs":
        return output == "sigmoid"
    if loss_name in ("ce_labels", "ce_probabilities"):
        return output != "softmax"
    if loss_name == "bce":
        return output != "sigmoid"
    return True


@st.composite
def cases(draw, dtypes=("float32", "float64"), exclude_losses=()):
    depth = draw(st.integers(1, 3))
    widths = draw(st.lists(st.integers(1, 8), min_size=depth + 1, max_size=depth + 1))
    hidden = [draw(st.sampled_from(HIDDEN)) for _ in range(depth - 1)]
    output = draw(st.sampled_from(OUTPUTS))
    loss_name = draw(st.sampled_from([name for name in LOSSES if compatible(output, name)
                                      and name not in exclude_losses]))
    return {
        "widths": widths,
        "activations": hidden + [output],
        "bias": draw(st.lists(st.booleans(), min_size=depth, max_size=depth)),
        "loss": loss_name,
        "dtype": draw(st.sampled_from(dtypes)),
        "n": draw(st.integers(1, 20)),
        "seed": draw(st.integers(0, 2**32 - 1)),
        "scale": draw(st.sampled_from([0.5, 1.0, 3.0])),
    }


def build(case, seed_offset=0):
    layers = []
    for i, act in enumerate(case["activations"]):
        kwargs = {}
        if act == "leaky_relu":
            kwargs["negative_slope"] = 0.1
        elif act == "elu":
            kwargs["alpha"] = 1.3
        layers.append(bp.Dense(case["widths"][i], case["widths"][i + 1], act,
                               bias=case["bias"][i], init="pytorch", **kwargs))
    net = bp.Network(layers, dtype=case["dtype"], seed=case["seed"] % 1000 + seed_offset)
    net.parameters[:] *= case["scale"] * 2  # spread pre-activations over the kinks/tails
    return net


def data(case):
    rng = np.random.default_rng(case["seed"])
    n, n_in, k = case["n"], case["widths"][0], case["widths"][-1]
    X = rng.standard_normal((n, n_in)) * case["scale"]
    kind = LOSSES[case["loss"]][1]
    if kind == "labels":
        y = rng.integers(0, k, n)
    elif kind == "probabilities":
        y = rng.uniform(0, 1, (n, k))  # rows need not sum to 1 (PyTorch's semantics)
    elif kind == "binary":
        y = rng.uniform(0, 1, (n, k))
    else:
        y = rng.standard_normal((n, k))
    return X, y


def make_loss(case):
    return LOSSES[case["loss"]][0]()


def reference_cache(net, X):
    return ref.network_forward(*oracle_spec(net), X)


def far_from_kinks(net, X, y, case, margin=1e-4):
    """No pre-activation within margin of its activation's kink, and (L1, Huber) no
    residual within margin of the loss's kink."""
    cache = reference_cache(net, X)
    for layer, (z, _) in zip(net.layers, cache):
        for kink in KINKS.get(layer.activation, ()):
            if np.any(np.abs(z - kink) < margin):
                return False
    out = cache[-1][1]
    if case["loss"] == "l1" and np.any(np.abs(out - y) < margin):
        return False
    if case["loss"] == "huber" and np.any(np.abs(np.abs(out - y) - 0.7) < margin):
        return False
    return True


def assert_gradient_close(analytic, numeric, loss_value, what):
    """Relative error 1e-6, plus the rounding floor of a central difference
    (~eps |L| / h per component)."""
    error = np.linalg.norm(analytic - numeric)
    floor = 1e-8 * (1.0 + abs(loss_value)) * np.sqrt(analytic.size)
    bound = 1e-6 * max(np.linalg.norm(analytic), np.linalg.norm(numeric)) + floor
    assert error <= bound, (what, error, bound, analytic, numeric)


# =========================================================================== shapes, finiteness
@SETTINGS
@given(case=cases())
def test_shapes_dtypes_and_finiteness(case):
    net = build(case)
    X, y = data(case)
    loss = make_loss(case)
    dtype = np.dtype(case["dtype"])
    n, n_in, k = case["n"], case["widths"][0], case["widths"][-1]
    out = net.forward(X)
    assert out.shape == (n, k) and out.dtype == dtype and out.flags.c_contiguous
    assert np.isfinite(out).all()
    tol = 1e-12 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(net.predict(X), out, rtol=tol, atol=tol)
    if net.layers[-1].activation == "softmax":
        np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=tol)
    grad_out = loss.gradient(out, y)
    assert grad_out.shape == (n, k) and grad_out.dtype == dtype
    grad_x = net.backward(grad_out)
    assert grad_x.shape == (n, n_in) and grad_x.dtype == dtype
    assert np.isfinite(grad_x).all() and np.isfinite(net.gradients).all()
    assert net.gradients.shape == net.parameters.shape == (net.n_parameters,)
    for layer in net.layers:
        assert layer.grad_weight.shape == layer.weight.shape == (layer.out_features,
                                                                 layer.in_features)
        assert np.shares_memory(layer.grad_weight, net.gradients)
    value = net.compute_gradients(X, y, loss)
    assert isinstance(value, float) and np.isfinite(value)
    assert np.isfinite(net.gradients).all()
    opt = bp.Adam(lr=1e-2)
    value = net.train_step(X, y, loss, opt)
    assert isinstance(value, float) and np.isfinite(value)
    assert np.isfinite(net.parameters).all() and net.parameters.dtype == dtype
    assert {name: s.shape for name, s in opt.state.items()} == {
        "exp_avg": net.parameters.shape, "exp_avg_sq": net.parameters.shape}


# =========================================================================== gradient check
@SETTINGS
@given(case=cases(dtypes=("float64",)))
def test_gradients_equal_central_differences(case):
    net = build(case)
    X, y = data(case)
    loss = make_loss(case)
    assume(far_from_kinks(net, X, y, case))
    if case["loss"] == "bce_from_probs":
        # the standalone BCELoss clamps log p at -100: stay clear of saturation
        assume(np.all(np.abs(reference_cache(net, X)[-1][0]) < 30))
    value = net.compute_gradients(X, y, loss)
    fused = net.gradients.copy()

    def objective():
        return loss(net.predict(X), y)

    assert value == pytest.approx(objective(), rel=1e-11, abs=1e-14)
    numeric = numerical_gradient(objective, net.parameters)
    assert_gradient_close(fused, numeric, value, "dL/dparameters")
    X_flat = X.reshape(-1).copy()
    out = net.forward(X)
    grad_x = net.backward(loss.gradient(out, y))
    numeric_x = numerical_gradient(lambda: loss(net.predict(X_flat.reshape(X.shape)), y), X_flat)
    if case["loss"] not in FUSED_PROBABILITY_LOSSES:
        assert_gradient_close(grad_x.reshape(-1), numeric_x, value, "dL/dX")
    else:  # the unfused route through the probabilities is rounded differently
        np.testing.assert_allclose(grad_x.reshape(-1), numeric_x, rtol=1e-5,
                                   atol=1e-7 * (1 + abs(value)))


# =========================================================================== train_step == API
OPTIMIZERS = {
    "sgd_nesterov": lambda: bp.SGD(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam_amsgrad": lambda: bp.Adam(lr=0.01, amsgrad=True),
    "adamw": lambda: bp.AdamW(lr=0.01),
    "rmsprop_centered": lambda: bp.RMSprop(lr=0.01, momentum=0.5, centered=True),
    "adagrad": lambda: bp.Adagrad(lr=0.05, lr_decay=0.01),
}


@SETTINGS
@given(case=cases(dtypes=("float64",), exclude_losses=FUSED_PROBABILITY_LOSSES),
       optimizer=st.sampled_from(sorted(OPTIMIZERS)), steps=st.integers(1, 3))
def test_train_step_equals_the_step_by_step_api(case, optimizer, steps):
    """The fused probability outputs (softmax + CE(from_logits=False), sigmoid +
    BCE(from_logits=False)) are left out: their one-call step uses the stable (p - y)/n
    on purpose, which the unfused route reaches only to rounding (test_network.py)."""
    fused_net, api_net = build(case), build(case)
    assert fused_net.parameters.tobytes() == api_net.parameters.tobytes()
    X, y = data(case)
    loss = make_loss(case)
    opt_fused, opt_api = OPTIMIZERS[optimizer](), OPTIMIZERS[optimizer]()
    for _ in range(steps):
        value = fused_net.train_step(X, y, loss, opt_fused)
        out = api_net.forward(X)
        expected = loss(out, y)
        api_net.backward(loss.gradient(out, y))
        opt_api.step(api_net)
        assert value == pytest.approx(expected, rel=1e-12, abs=1e-300)
        scale = max(np.abs(api_net.gradients).max(), 1e-300)
        np.testing.assert_allclose(fused_net.gradients, api_net.gradients, rtol=1e-12,
                                   atol=1e-12 * scale)
        scale = max(np.abs(api_net.parameters).max(), 1e-300)
        np.testing.assert_allclose(fused_net.parameters, api_net.parameters, rtol=1e-12,
                                   atol=1e-12 * scale)
    assert opt_fused.step_count == opt_api.step_count == steps
    assert opt_fused.state.keys() == opt_api.state.keys()
    for name in opt_fused.state:
        scale = max(np.abs(opt_api.state[name]).max(), 1e-300)
        np.testing.assert_allclose(opt_fused.state[name], opt_api.state[name], rtol=1e-12,
                                   atol=1e-12 * scale)


# =========================================================================== fit, batch > n
@SETTINGS
@given(case=cases(), extra=st.integers(1, 50), epochs=st.integers(1, 3))
def test_fit_with_a_batch_larger_than_n_is_batch_gradient_descent(case, extra, epochs):
    X, y = data(case)
    loss = make_loss(case)
    n = case["n"]
    big, full, loop = build(case), build(case), build(case)
    opts = [bp.Adam(lr=0.01) for _ in range(3)]
    h_big = big.fit(X, y, loss=loss, optimizer=opts[0], epochs=epochs, batch_size=n + extra,
                    shuffle=False)
    h_full = full.fit(X, y, loss=loss, optimizer=opts[1], epochs=epochs, batch_size=None,
                      shuffle=False)
    losses = [loop.train_step(X, y, loss, opts[2]) for _ in range(epochs)]
    assert big.parameters.tobytes() == full.parameters.tobytes() == loop.parameters.tobytes()
    assert h_big.history["loss"] == h_full.history["loss"]
    assert h_big.epoch == list(range(1, epochs + 1))
    np.testing.assert_allclose(h_big.history["loss"], losses,
                               rtol=1e-13 if case["dtype"] == "float64" else 1e-6)
    assert opts[0].step_count == opts[1].step_count == epochs
    # shuffled, the one batch holds the same rows in another order: the same step up
    # to the order of the sums (plain SGD, so that rounding is not amplified the way
    # Adam's first step, lr * sign(g), amplifies it for a gradient that is ~0)
    shuffled, ordered = build(case), build(case)
    h_shuffled = shuffled.fit(X, y, loss=loss, optimizer=bp.SGD(lr=0.05), epochs=epochs,
                              batch_size=n + extra, shuffle=True)
    h_ordered = ordered.fit(X, y, loss=loss, optimizer=bp.SGD(lr=0.05), epochs=epochs,
                            batch_size=n + extra, shuffle=False)
    tol = 1e-10 if case["dtype"] == "float64" else 1e-4
    np.testing.assert_allclose(h_shuffled.history["loss"], h_ordered.history["loss"], rtol=tol,
                               atol=tol)
    np.testing.assert_allclose(shuffled.parameters, ordered.parameters, rtol=tol, atol=tol)
