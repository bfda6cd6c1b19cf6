"""Gradients against central differences, for every activation, loss, bias setting and depth.

The oracle is the definition of the derivative: (L(p + h) - L(p - h)) / 2h in
float64. Both the fused path (compute_gradients) and the step-by-step path
(forward, loss.gradient, backward) are checked, and dL/dX too.
"""

import numpy as np
import pytest
from central_differences import numerical_gradient, relative_error

import bpfast as bp

ACTIVATIONS = [a for a in bp.ACTIVATIONS]
HIDDEN_ACTIVATIONS = [a for a in ACTIVATIONS if a != "softmax"]


def make_loss(name):
    return {
        "mse": lambda: bp.MSE(),
        "mse_half": lambda: bp.MSE(half=True),
        "l1": lambda: bp.L1(),
        "huber": lambda: bp.Huber(delta=0.3),
        "ce_labels": lambda: bp.CrossEntropy(),
        "ce_probs_target": lambda: bp.CrossEntropy(),
        "ce_from_probs": lambda: bp.CrossEntropy(from_logits=False),
        "bce": lambda: bp.BinaryCrossEntropy(),
        "bce_from_probs": lambda: bp.BinaryCrossEntropy(from_logits=False),
    }[name]()


LOSSES = ["mse", "mse_half", "l1", "huber", "ce_labels", "ce_probs_target", "ce_from_probs",
          "bce", "bce_from_probs"]


def compatible(output_activation, loss_name):
    """Pairs that make sense: probability losses need a probability output, and a
    loss on logits refuses an output that already applies its squashing."""
    if loss_name == "ce_from_probs":
        return output_activation == "softmax"
    if loss_name == "bce_from_probs":
        return output_activation == "sigmoid"
    if loss_name in ("ce_labels", "ce_probs_target"):
        return output_activation != "softmax"
    if loss_name == "bce":
        return output_activation != "sigmoid"
    return True


def make_target(loss_name, rng, n, k):
    if loss_name in ("ce_labels", "ce_from_probs"):
        return rng.integers(0, k, size=n)
    if loss_name == "ce_probs_target":
        # rows that do not sum to 1, as PyTorch allows
        return rng.uniform(0, 1, size=(n, k))
    if loss_name in ("bce", "bce_from_probs"):
        return rng.uniform(0, 1, size=(n, k))
    return rng.normal(size=(n, k))


def build(depth, hidden, output, bias, seed=0, dtype="float64"):
    rng = np.random.default_rng(seed)
    widths = [3] + list(rng.integers(2, 5, size=depth - 1)) + [3]
    layers = []
    for i in range(depth):
        act = output if i == depth - 1 else hidden
        kwargs = {}
        if act == "leaky_relu":
            kwargs["negative_slope"] = 0.2
        if act == "elu":
            kwargs["alpha"] = 1.3
        layers.append(bp.Dense(int(widths[i]), int(widths[i + 1]), activation=act, bias=bias,
                               init="pytorch", **kwargs))
    net = bp.Network(layers, dtype=dtype, seed=seed)
    # spread pre-activations so softplus crosses its threshold-free region and relu
    # units are both on and off
    net.parameters[:] *= 2.0
    return net


CASES = [
    (hidden, output, loss_name, bias, depth)
    for output in ACTIVATIONS
    for loss_name in LOSSES
    if compatible(output, loss_name)
    for hidden, bias, depth in [
        (HIDDEN_ACTIVATIONS[(ACTIVATIONS.index(output) + d) % len(HIDDEN_ACTIVATIONS)], b, d)
        for d in (1, 2, 3, 4) for b in (True, False)
    ]
]


@pytest.mark.parametrize("hidden,output,loss_name,bias,depth", CASES)
def test_gradients_match_central_differences(hidden, output, loss_name, bias, depth):
    rng = np.random.default_rng(depth * 7 + bias)
    net = build(depth, hidden, output, bias)
    X = rng.normal(size=(6, 3))
    y = make_target(loss_name, rng, 6, 3)
    loss = make_loss(loss_name)

    value = net.compute_gradients(X, y, loss)
    fused = net.gradients.copy()
    assert value == pytest.approx(loss(net.predict(X), y), rel=1e-12)

    out = net.forward(X)
    grad_X = net.backward(loss.gradient(out, y))
    stepwise = net.gradients.copy()

    numeric = numerical_gradient(lambda: loss(net.predict(X), y), net.parameters)
    assert relative_error(fused, numeric) < 1e-6
    assert relative_error(stepwise, numeric) < 1e-6
    np.testing.assert_allclose(fused, stepwise, rtol=1e-9, atol=1e-12)

    X_flat = X.reshape(-1)
    numeric_X = numerical_gradient(lambda: loss(net.predict(X_flat.reshape(6, 3)), y), X_flat)
    assert relative_error(grad_X.reshape(-1), numeric_X) < 1e-6


def test_every_activation_and_loss_is_covered():
    covered_outputs = {case[1] for case in CASES}
    covered_hidden = {case[0] for case in CASES}
    assert covered_outputs == set(ACTIVATIONS)
    assert covered_hidden == set(HIDDEN_ACTIVATIONS)
    assert {case[2] for case in CASES} == set(LOSSES)


@pytest.mark.parametrize("hidden,loss_name", [
    ("tanh", "ce_labels"), ("relu", "mse"), ("gelu", "bce"), ("softplus", "huber"),
    ("elu", "ce_probs_target"), ("sigmoid", "l1"),
])
def test_float32_agrees_with_float64(hidden, loss_name):
    rng = np.random.default_rng(3)
    net64 = build(3, hidden, "identity", True, dtype="float64")
    net32 = build(3, hidden, "identity", True, dtype="float32")
    net32.parameters[:] = net64.parameters
    X = rng.normal(size=(16, 3))
    y = make_target(loss_name, rng, 16, 3)
    loss = make_loss(loss_name)
    v64 = net64.compute_gradients(X, y, loss)
    v32 = net32.compute_gradients(X.astype(np.float32), y, loss)
    assert net32.gradients.dtype == np.float32
    assert v32 == pytest.approx(v64, rel=1e-5)
    scale = np.abs(net64.gradients).max()
    np.testing.assert_allclose(net32.gradients, net64.gradients, rtol=1e-3, atol=1e-5 * scale)


def test_extreme_inputs_stay_finite():
    """Logits of +-1e4 and inputs of 1e30 give finite losses and gradients."""
    for dtype in ("float32", "float64"):
        net = bp.Network([bp.Dense(2, 3)], dtype=dtype, seed=0)
        net.parameters[:] = 0
        net.layers[0].bias[:] = [1e4, -1e4, 0]
        X = np.zeros((2, 2))
        for loss, y in [(bp.CrossEntropy(), np.array([1, 2])),
                        (bp.BinaryCrossEntropy(), np.array([[0, 1, 1], [1, 0, 0.5]]))]:
            value = net.compute_gradients(X, y, loss)
            assert np.isfinite(value) and np.isfinite(net.gradients).all()
        sig = bp.Network([bp.Dense(2, 3, activation="sigmoid")], dtype=dtype, seed=0)
        value = sig.compute_gradients(np.full((2, 2), 1e30), np.array([[0, 1, 1], [1, 0, 0.5]]),
                                      bp.BinaryCrossEntropy(from_logits=False))
        assert np.isfinite(value) and np.isfinite(sig.gradients).all()
