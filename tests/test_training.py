"""Training as users expect it: sample and class weights, L2, clipping,
validation and metrics, early stopping and convergence, partial_fit and repeated fit,
divergence and Ctrl-C.

Oracles: explicit weighted means of per-sample losses, duplicated rows, central
differences, hand-written NumPy clipping (and torch's clip_grad_*_ when installed),
scikit-learn's compute_class_weight / accuracy_score, replays of the same steps with
train_step, and the stopping rules written out. Data: scikit-learn's digits, breast
cancer and diabetes sets, scaled, and crafted cases. Callbacks are in
test_callbacks.py, schedules in test_schedules.py.
"""
import contextlib
import math
import os
import signal
import threading

import numpy as np
import pytest
from central_differences import numerical_gradient, relative_error
from training_data import (
    Recorder,
    batches,
    cancer,
    diabetes,
    digits,
    mlp,
    twins,
    unchanged,
)

import bpfast as bp
from bpfast._training import combined_weights, split_validation

CE = bp.CrossEntropy()


# --------------------------------------------------------------------------- problems
KINDS = ["ce", "ce_probs", "bce", "bce_probs", "mse", "mse2", "l1", "huber"]


def problem(kind, n=40, seed=0, dtype="float64", hidden=6):
    """(net, X, y, loss): a small network on n rows of a real data set."""
    rng = np.random.default_rng(seed + 100)
    if kind in ("ce", "ce_probs"):
        X, y = digits()
        rows = rng.choice(len(X), n, replace=False)
        out = "softmax" if kind == "ce_probs" else None
        loss = bp.CrossEntropy(from_logits=kind == "ce")
        return mlp((64, hidden, 10), dtype=dtype, seed=seed, output=out), X[rows], y[rows], loss
    if kind in ("bce", "bce_probs"):
        X, y = cancer()
        rows = rng.choice(len(X), n, replace=False)
        out = "sigmoid" if kind == "bce_probs" else None
        loss = bp.BinaryCrossEntropy(from_logits=kind == "bce")
        return (mlp((30, hidden, 1), dtype=dtype, seed=seed, output=out), X[rows],
                y[rows].astype(np.float64), loss)
    X, y = diabetes()
    rows = rng.choice(len(X), n, replace=False)
    X, y = X[rows], y[rows]
    if kind == "mse2":
        # two outputs: the target and a second, nonlinear one
        y = np.stack([y, X[:, 2] * X[:, 3]], axis=1)
        return mlp((10, hidden, 2), dtype=dtype, seed=seed), X, y, bp.MSE()
    loss = {"mse": bp.MSE(), "l1": bp.L1(), "huber": bp.Huber(delta=0.5)}[kind]
    return mlp((10, hidden, 1), dtype=dtype, seed=seed), X, y, loss


def some_weights(n, seed=1):
    w = np.random.default_rng(seed).uniform(0.0, 3.0, n)
    w[::7] = 0.0
    return w


# =========================================================================== sample_weight
@pytest.mark.parametrize("kind", KINDS)
def test_weighted_loss_is_weighted_mean_of_per_sample_losses(kind):
    net, X, y, loss = problem(kind)
    w = some_weights(len(X))
    out = net.predict(X)
    per_sample = np.array([loss(out[i:i + 1], y[i:i + 1]) for i in range(len(X))])
    expected = np.sum(w * per_sample) / np.sum(w)
    assert loss(out, y, sample_weight=w) == pytest.approx(expected, rel=1e-12)
    assert net.compute_gradients(X, y, loss, sample_weight=w) == pytest.approx(
        expected, rel=1e-12)
    fused = net.gradients.copy()
    # dL/dout of the weighted mean: each row's own gradient times w_i / sum(w)
    per_row = np.concatenate([loss.gradient(out[i:i + 1], y[i:i + 1])
                              for i in range(len(X))])
    grad = loss.gradient(out, y, sample_weight=w)
    expected_grad = per_row * (w / w.sum())[:, None]
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-12,
                               atol=1e-15 * np.abs(expected_grad).max())
    # the fused step back-propagates that same gradient
    net.forward(X)
    net.backward(grad)
    np.testing.assert_allclose(fused, net.gradients, rtol=1e-10,
                               atol=1e-14 * np.abs(fused).max())
    # scale invariance: constant weights are the unweighted mean
    assert loss(out, y, sample_weight=np.full(len(X), 2.5)) == pytest.approx(
        loss(out, y), rel=1e-13)


@pytest.mark.parametrize("kind", ["ce", "bce_probs", "mse2", "huber"])
def test_weighted_gradient_matches_central_differences(kind):
    net, X, y, loss = problem(kind, n=12, hidden=4)
    w = some_weights(len(X), seed=5)
    value = net.compute_gradients(X, y, loss, sample_weight=w)
    fused = net.gradients.copy()
    assert value == pytest.approx(loss(net.predict(X), y, sample_weight=w), rel=1e-12)
    numeric = numerical_gradient(lambda: loss(net.predict(X), y, sample_weight=w),
                                 net.parameters)
    assert relative_error(fused, numeric) < 1e-6
    # the weights matter: the unweighted gradient is far from it
    net.compute_gradients(X, y, loss)
    assert relative_error(net.gradients, numeric) > 1e-3


@pytest.mark.parametrize("kind", ["ce", "bce", "mse2"])
def test_integer_weights_equal_duplicated_rows(kind):
    net, X, y, loss = problem(kind, n=60)
    counts = np.random.default_rng(2).integers(0, 4, len(X))
    counts[:3] = [0, 3, 1]
    X_dup, y_dup = np.repeat(X, counts, axis=0), np.repeat(y, counts, axis=0)
    weighted = net.compute_gradients(X, y, loss, sample_weight=counts)
    g_weighted = net.gradients.copy()
    duplicated = net.compute_gradients(X_dup, y_dup, loss)
    assert weighted == pytest.approx(duplicated, rel=1e-12)
    np.testing.assert_allclose(g_weighted, net.gradients, rtol=1e-12,
                               atol=1e-12 * np.abs(net.gradients).max())

    # full-batch fit: the same parameters and losses, epoch after epoch
    a, _, _, _ = problem(kind, n=60)
    b, _, _, _ = problem(kind, n=60)
    ha = a.fit(X, y, loss=loss, optimizer=bp.SGD(lr=0.1, momentum=0.9), epochs=10,
               sample_weight=counts, batch_size=None)
    hb = b.fit(X_dup, y_dup, loss=loss, optimizer=bp.SGD(lr=0.1, momentum=0.9), epochs=10,
               batch_size=None)
    np.testing.assert_allclose(a.parameters, b.parameters, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ha.history["loss"], hb.history["loss"], rtol=1e-11)
    assert hb.history["loss"][-1] < hb.history["loss"][0]


def test_integer_weights_equal_duplicated_rows_float32():
    net, X, y, loss = problem("ce", n=60, dtype="float32")
    counts = np.random.default_rng(3).integers(0, 4, len(X))
    weighted = net.compute_gradients(X, y, loss, sample_weight=counts)
    g_weighted = net.gradients.copy()
    duplicated = net.compute_gradients(np.repeat(X, counts, axis=0),
                                       np.repeat(y, counts), loss)
    assert net.gradients.dtype == np.float32
    assert weighted == pytest.approx(duplicated, rel=1e-5)
    np.testing.assert_allclose(g_weighted, net.gradients, rtol=1e-4,
                               atol=1e-5 * np.abs(net.gradients).max())


@pytest.mark.parametrize("kind", ["ce", "mse"])
def test_zero_weight_equals_dropping_the_row(kind):
    net, X, y, loss = problem(kind, n=50)
    w = np.random.default_rng(4).uniform(0.5, 2.0, len(X))
    w[[0, 5, 6, 30, 49]] = 0.0
    keep = w > 0
    weighted = net.compute_gradients(X, y, loss, sample_weight=w)
    g_weighted = net.gradients.copy()
    dropped = net.compute_gradients(X[keep], y[keep], loss, sample_weight=w[keep])
    assert weighted == pytest.approx(dropped, rel=1e-13)
    np.testing.assert_allclose(g_weighted, net.gradients, rtol=1e-12,
                               atol=1e-13 * np.abs(net.gradients).max())
    a, _, _, _ = problem(kind, n=50)
    b, _, _, _ = problem(kind, n=50)
    a.fit(X, y, loss=loss, optimizer=bp.SGD(lr=0.05, momentum=0.5), epochs=5,
          sample_weight=w, batch_size=None)
    b.fit(X[keep], y[keep], loss=loss, optimizer=bp.SGD(lr=0.05, momentum=0.5), epochs=5,
          sample_weight=w[keep], batch_size=None)
    np.testing.assert_allclose(a.parameters, b.parameters, rtol=1e-11, atol=1e-13)


def test_minibatch_whose_weights_are_all_zero_is_a_no_op_for_sgd():
    """A batch with zero total weight has loss 0 and gradient 0: plain SGD does not
    move, and the epoch's loss is the weighted mean of the other batches."""
    X, y = digits()
    X, y = X[:70], y[:70]
    w = np.ones(70)
    w[:10] = 0.0
    a, b = twins((64, 8, 10))
    opt_a, opt_b = bp.SGD(lr=0.1), bp.SGD(lr=0.1)
    ha = a.fit(X, y, loss=CE, optimizer=opt_a, epochs=2, batch_size=10, shuffle=False,
               sample_weight=w)
    hb = b.fit(X[10:], y[10:], loss=CE, optimizer=opt_b, epochs=2, batch_size=10,
               shuffle=False)
    np.testing.assert_allclose(a.parameters, b.parameters, rtol=1e-14, atol=1e-16)
    np.testing.assert_allclose(ha.history["loss"], hb.history["loss"], rtol=1e-13)
    assert opt_a.step_count == 14 and opt_b.step_count == 12


BAD_WEIGHTS = {
    "all_zero": (lambda n: np.zeros(n), ValueError, "zero"),
    "negative": (lambda n: np.r_[np.ones(n - 1), -0.5], ValueError, ">= 0"),
    "nan": (lambda n: np.r_[np.nan, np.ones(n - 1)], ValueError, "finite"),
    "inf": (lambda n: np.r_[np.ones(n - 1), np.inf], ValueError, "finite"),
    "short": (lambda n: np.ones(n - 1), ValueError, "shape"),
    "column": (lambda n: np.ones((n, 1)), ValueError, "shape"),
    "strings": (lambda n: np.array(["1"] * n), TypeError, None),
}


@pytest.fixture
def trained():
    """A network and an Adam optimizer that have taken a step (so state exists)."""
    X, y = digits()
    X, y = X[:40], y[:40]
    net = mlp((64, 8, 10), seed=1)
    opt = bp.Adam(lr=0.01)
    net.fit(X, y, loss=CE, optimizer=opt, epochs=2, batch_size=16)
    return net, opt, X, y


@pytest.mark.parametrize("bad", sorted(BAD_WEIGHTS))
@pytest.mark.parametrize("call", ["loss", "gradient", "compute_gradients", "train_step",
                                  "fit", "fit_minibatch", "partial_fit", "validation"])
def test_bad_sample_weight_raises_before_anything_changes(trained, bad, call):
    net, opt, X, y = trained
    make, error, message = BAD_WEIGHTS[bad]
    w = make(len(X))
    calls = {
        "loss": lambda: CE(net.predict(X), y, sample_weight=w),
        "gradient": lambda: CE.gradient(net.predict(X), y, sample_weight=w),
        "compute_gradients": lambda: net.compute_gradients(X, y, CE, sample_weight=w),
        "train_step": lambda: net.train_step(X, y, CE, opt, sample_weight=w),
        "fit": lambda: net.fit(X, y, loss=CE, optimizer=opt, epochs=2, sample_weight=w),
        "fit_minibatch": lambda: net.fit(X, y, loss=CE, optimizer=opt, epochs=2,
                                         batch_size=8, sample_weight=w,
                                         validation_split=0.25),
        "partial_fit": lambda: net.partial_fit(X, y, loss=CE, optimizer=opt,
                                               sample_weight=w),
        "validation": lambda: net.fit(X[:20], y[:20], loss=CE, optimizer=opt, epochs=2,
                                      validation_data=(X, y, w)),
    }
    with unchanged(net, opt):
        with pytest.raises(error, match=message):
            calls[call]()


# =========================================================================== class_weight
def test_class_weight_dict_is_a_per_sample_weight():
    X, y = digits()
    X, y = X[:300], y[:300]
    class_weight = {0: 2.0, 3: 0.5, 7: 3.0, 9: 0.0}
    per_sample = np.array([class_weight.get(c, 1.0) for c in y])
    sw = np.random.default_rng(0).uniform(0.5, 1.5, len(y))
    a, b = twins((64, 16, 10), seed=3)
    common = dict(loss=CE, epochs=3, batch_size=50, validation_data=(X[:60], y[:60]))
    ha = a.fit(X, y, optimizer=bp.Adam(lr=0.01), class_weight=class_weight,
               sample_weight=sw, **common)
    hb = b.fit(X, y, optimizer=bp.Adam(lr=0.01), sample_weight=sw * per_sample, **common)
    np.testing.assert_array_equal(a.parameters, b.parameters)
    assert ha.history == hb.history


def test_class_weight_balanced_is_scikit_learns():
    from sklearn.utils.class_weight import compute_class_weight
    X, y = digits()
    # imbalanced, and class 9 absent (the network still has 10 outputs)
    rows = np.concatenate([np.flatnonzero(y == c)[:n] for c, n in
                           enumerate([100, 10, 40, 5, 60, 20, 30, 70, 3, 0])])
    X, y = X[rows], y[rows]
    classes = np.unique(y)
    table = compute_class_weight("balanced", classes=classes, y=y)
    expected = table[np.searchsorted(classes, y)]
    got = combined_weights(CE, None, y, None, "balanced", len(y), 10)
    np.testing.assert_allclose(got, expected, rtol=1e-15)
    a, b = twins((64, 16, 10), seed=4)
    ha = a.fit(X, y, loss=CE, optimizer=bp.Adam(lr=0.01), epochs=3, batch_size=32,
               class_weight="balanced")
    hb = b.fit(X, y, loss=CE, optimizer=bp.Adam(lr=0.01), epochs=3, batch_size=32,
               sample_weight=expected)
    np.testing.assert_allclose(a.parameters, b.parameters, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ha.history["loss"], hb.history["loss"], rtol=1e-12)


def test_class_weight_balanced_binary_cross_entropy():
    from sklearn.utils.class_weight import compute_class_weight
    X, y = cancer()
    table = compute_class_weight("balanced", classes=np.array([0, 1]), y=y)
    a, b = twins((30, 4, 1), seed=2)
    target = y.astype(np.float64)
    ha = a.fit(X, target, loss=bp.BinaryCrossEntropy(), optimizer=bp.SGD(lr=0.1),
               epochs=3, batch_size=64, class_weight="balanced")
    hb = b.fit(X, target, loss=bp.BinaryCrossEntropy(), optimizer=bp.SGD(lr=0.1),
               epochs=3, batch_size=64, sample_weight=table[y])
    np.testing.assert_allclose(a.parameters, b.parameters, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(ha.history["loss"], hb.history["loss"], rtol=1e-12)


def test_balanced_class_weight_raises_minority_recall():
    """Breast cancer with the malignant class cut to 10%: weighting the classes
    "balanced" finds more of the held-out malignant cases."""
    X, y = cancer()
    rng = np.random.default_rng(0)
    minority, majority = np.flatnonzero(y == 0), np.flatnonzero(y == 1)
    rng.shuffle(minority)
    n_minority = round(len(majority) / 9)
    rows = np.concatenate([minority[:n_minority], majority])
    held_out = minority[n_minority:]
    X_train, is_minority = X[rows], (y[rows] == 0).astype(np.float64)
    assert is_minority.mean() == pytest.approx(0.1, abs=0.005)
    gains = []
    for seed in range(3):
        recall = {}
        for class_weight in (None, "balanced"):
            net = mlp((30, 1), seed=seed)
            net.fit(X_train, is_minority, loss=bp.BinaryCrossEntropy(),
                    optimizer=bp.SGD(lr=0.05), epochs=20, class_weight=class_weight)
            recall[class_weight] = np.mean(net.predict(X[held_out])[:, 0] > 0)
        assert recall["balanced"] > recall[None]
        gains.append(recall["balanced"] - recall[None])
    assert np.mean(gains) > 0.02


@pytest.mark.parametrize("class_weight,error", [
    ({0: 1.0}, ValueError), ("balanced", ValueError),
])
def test_class_weight_with_mse_raises(class_weight, error):
    X, y = diabetes()
    net = mlp((10, 4, 1))
    opt = bp.SGD(lr=0.01)
    with unchanged(net, opt):
        with pytest.raises(error, match="class_weight"):
            net.fit(X, y, loss=bp.MSE(), optimizer=opt, class_weight=class_weight)


@pytest.mark.parametrize("class_weight,error", [
    ("balance", ValueError), ({0: -1.0}, ValueError), ({-1: 2.0}, ValueError),
    ({0.5: 2.0}, ValueError), ({0: float("nan")}, ValueError), ([1.0, 2.0], TypeError),
    ({c: 0.0 for c in range(10)}, ValueError),
])
def test_bad_class_weight_raises_before_anything_changes(trained, class_weight, error):
    net, opt, X, y = trained
    with unchanged(net, opt):
        with pytest.raises(error):
            net.fit(X, y, loss=CE, optimizer=opt, class_weight=class_weight)


# =========================================================================== l2
def weight_penalty(net, l2):
    return 0.5 * l2 * sum(np.sum(layer.weight.astype(np.float64) ** 2)
                          for layer in net.layers)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_l2_is_a_loss_term_on_weights_only(bias, dtype):
    X, y = digits()
    X, y = X[:100], y[:100]
    net = mlp((64, 16, 8, 10), dtype=dtype, bias=bias, seed=2)
    if bias:
        for layer in net.layers:
            layer.bias[:] = np.random.default_rng(0).normal(size=layer.bias.shape)
    l2 = 0.03
    plain = net.compute_gradients(X, y, CE)
    before = [(layer.grad_weight.copy(), None if layer.grad_bias is None
               else layer.grad_bias.copy()) for layer in net.layers]
    regularized = net.compute_gradients(X, y, CE, l2=l2)
    rel = 1e-12 if dtype == "float64" else 1e-5
    assert regularized == pytest.approx(plain + weight_penalty(net, l2), rel=rel)
    assert regularized > plain + 0.1 * weight_penalty(net, l2)
    for layer, (grad_weight, grad_bias) in zip(net.layers, before):
        expected = grad_weight + np.asarray(l2 * layer.weight, dtype=grad_weight.dtype)
        np.testing.assert_allclose(layer.grad_weight, expected, rtol=rel,
                                   atol=rel * np.abs(expected).max())
        if bias:
            np.testing.assert_array_equal(layer.grad_bias, grad_bias)  # untouched


def test_l2_gradient_matches_central_differences():
    net, X, y, loss = problem("bce", n=15, hidden=5)
    for layer in net.layers:
        layer.bias[:] = 0.3
    l2 = 0.2

    def objective():
        return loss(net.predict(X), y) + weight_penalty(net, l2)

    value = net.compute_gradients(X, y, loss, l2=l2)
    assert value == pytest.approx(objective(), rel=1e-12)
    numeric = numerical_gradient(objective, net.parameters)
    assert relative_error(net.gradients, numeric) < 1e-6


def test_l2_in_train_step_and_fit_and_unlike_weight_decay():
    X, y = digits()
    X, y = X[:128], y[:128]
    a, b = twins((64, 12, 10), seed=5)
    for net in (a, b):
        for layer in net.layers:
            layer.bias[:] = 0.1
    opt_a, opt_b = bp.SGD(lr=0.1, momentum=0.9), bp.SGD(lr=0.1, momentum=0.9)
    history = a.fit(X, y, loss=CE, optimizer=opt_a, epochs=3, shuffle=False, l2=0.01,
                    batch_size=None)
    losses = []
    for _ in range(3):
        losses.append(b.compute_gradients(X, y, CE, l2=0.01))
        opt_b.step(b)
    np.testing.assert_array_equal(a.parameters, b.parameters)
    # the recorded loss includes the l2 term
    assert history.history["loss"] == pytest.approx(losses, rel=1e-15, abs=0)

    # SGD's weight_decay decays the biases too; l2 does not
    c, d = twins((64, 12, 10), seed=5)
    for net in (c, d):
        for layer in net.layers:
            layer.bias[:] = 0.1
    c.train_step(X, y, CE, bp.SGD(lr=0.5), l2=0.1)
    d.train_step(X, y, CE, bp.SGD(lr=0.5, weight_decay=0.1))
    for lc, ld in zip(c.layers, d.layers):
        np.testing.assert_allclose(lc.weight, ld.weight, rtol=1e-14, atol=1e-16)
        assert not np.allclose(lc.bias, ld.bias, rtol=1e-6, atol=0)


@pytest.mark.parametrize("l2", [-0.1, float("nan"), "0.1"])
def test_bad_l2_raises_before_anything_changes(trained, l2):
    net, opt, X, y = trained
    with unchanged(net, opt):
        with pytest.raises((ValueError, TypeError)):
            net.train_step(X, y, CE, opt, l2=l2)
        with pytest.raises((ValueError, TypeError)):
            net.fit(X, y, loss=CE, optimizer=opt, l2=l2)


# =========================================================================== clipping
def numpy_clip(grad, clip_value, clip_norm):
    """torch.nn.utils.clip_grad_value_ then clip_grad_norm_ on one flat gradient."""
    grad = grad.copy()
    if clip_value is not None:
        np.clip(grad, -clip_value, clip_value, out=grad)
    if clip_norm is not None:
        norm = math.sqrt(float(np.sum(grad.astype(np.float64) ** 2)))
        coef = clip_norm / (norm + 1e-6)
        if coef < 1:
            grad *= grad.dtype.type(coef)
    return grad


CLIPS = [(0.01, None), (None, 0.5), (0.02, 0.1), (None, 1e6), (1e6, None)]


@pytest.mark.parametrize("make_opt", [lambda: bp.SGD(lr=0.5, momentum=0.9),
                                      lambda: bp.Adam(lr=0.01)], ids=["sgd", "adam"])
@pytest.mark.parametrize("clip_value,clip_norm", CLIPS)
def test_clipping_in_train_step_equals_clipping_by_hand(clip_value, clip_norm, make_opt):
    X, y = digits()
    a, b = twins((64, 16, 10), seed=6)
    opt_a, opt_b = make_opt(), make_opt()
    clipped_any = False
    for rows in batches(256, 64):
        a.train_step(X[rows], y[rows], CE, opt_a, clip_value=clip_value,
                     clip_norm=clip_norm)
        b.compute_gradients(X[rows], y[rows], CE)
        grad = b.gradients.copy()
        clipped = numpy_clip(grad, clip_value, clip_norm)
        clipped_any |= not np.array_equal(grad, clipped)
        b.gradients[:] = clipped
        opt_b.step(b)
    np.testing.assert_allclose(a.parameters, b.parameters, rtol=1e-12, atol=1e-14)
    active = max(clip_value or 0, clip_norm or 0) < 1e3
    assert clipped_any == active
    if not active:
        # a clip that never triggers changes nothing at all
        c = mlp((64, 16, 10), seed=6)
        opt_c = make_opt()
        for rows in batches(256, 64):
            c.train_step(X[rows], y[rows], CE, opt_c)
        np.testing.assert_array_equal(a.parameters, c.parameters)


def test_clipping_float32():
    X, y = digits()
    a, b = twins((64, 16, 10), seed=6, dtype="float32")
    opt_a, opt_b = bp.SGD(lr=0.5), bp.SGD(lr=0.5)
    for rows in batches(192, 64):
        a.train_step(X[rows], y[rows], CE, opt_a, clip_value=0.02, clip_norm=0.1)
        b.compute_gradients(X[rows], y[rows], CE)
        b.gradients[:] = numpy_clip(b.gradients, 0.02, 0.1)
        opt_b.step(b)
    assert a.parameters.dtype == np.float32
    np.testing.assert_allclose(a.parameters, b.parameters, rtol=1e-5, atol=1e-6)


def test_clipping_in_fit_is_clipping_in_each_step():
    X, y = digits()
    X, y = X[:300], y[:300]
    a, b = twins((64, 16, 10), seed=7)
    opt_a, opt_b = bp.Adam(lr=0.01), bp.Adam(lr=0.01)
    a.fit(X, y, loss=CE, optimizer=opt_a, epochs=2, batch_size=64, shuffle=False,
          clip_norm=0.2, clip_value=0.05, l2=1e-3)
    for _ in range(2):
        for rows in batches(300, 64):
            b.train_step(X[rows], y[rows], CE, opt_b, clip_norm=0.2, clip_value=0.05,
                         l2=1e-3)
    np.testing.assert_array_equal(a.parameters, b.parameters)


def test_clipping_matches_torch():
    torch = pytest.importorskip("torch")
    X, y = digits()
    a, b = twins((64, 16, 10), seed=8)
    opt_a = bp.SGD(lr=0.3, momentum=0.9)
    params = [torch.tensor(array.copy(), requires_grad=True)
              for layer in b.layers for array in (layer.weight, layer.bias)]
    opt_t = torch.optim.SGD(params, lr=0.3, momentum=0.9)
    for rows in batches(256, 64):
        a.train_step(X[rows], y[rows], CE, opt_a, clip_value=0.02, clip_norm=0.1)
        # torch's parameters into b, b's gradient into torch, clip and step there
        for layer, (weight, bias) in zip(b.layers, zip(params[::2], params[1::2])):
            layer.weight[...] = weight.detach().numpy()
            layer.bias[...] = bias.detach().numpy()
        b.compute_gradients(X[rows], y[rows], CE)
        for layer, (weight, bias) in zip(b.layers, zip(params[::2], params[1::2])):
            weight.grad = torch.tensor(layer.grad_weight.copy())
            bias.grad = torch.tensor(layer.grad_bias.copy())
        torch.nn.utils.clip_grad_value_(params, 0.02)
        torch.nn.utils.clip_grad_norm_(params, 0.1)
        opt_t.step()
    for layer, (weight, bias) in zip(a.layers, zip(params[::2], params[1::2])):
        np.testing.assert_allclose(layer.weight, weight.detach().numpy(), rtol=1e-12,
                                   atol=1e-14)
        np.testing.assert_allclose(layer.bias, bias.detach().numpy(), rtol=1e-12,
                                   atol=1e-14)


@pytest.mark.parametrize("kwargs", [dict(clip_norm=0.0), dict(clip_norm=-1.0),
                                    dict(clip_value=0.0), dict(clip_value=float("nan")),
                                    dict(clip_norm=float("inf"))])
def test_bad_clip_raises_before_anything_changes(trained, kwargs):
    net, opt, X, y = trained
    with unchanged(net, opt):
        with pytest.raises(ValueError):
            net.train_step(X, y, CE, opt, **kwargs)
        with pytest.raises(ValueError):
            net.fit(X, y, loss=CE, optimizer=opt, **kwargs)


# =========================================================================== validation
def test_validation_data_history_val_loss_and_accuracy():
    from sklearn.metrics import accuracy_score
    X, y = digits()
    X_train, y_train, X_val, y_val = X[:500], y[:500], X[500:800], y[500:800]
    net = mlp((64, 16, 10), seed=9)
    recorder = Recorder(keep_parameters=True)
    history = net.fit(X_train, y_train, loss=CE, optimizer=bp.Adam(lr=0.01), epochs=4,
                      batch_size=64, validation_data=(X_val, y_val), metrics=["accuracy"],
                      callbacks=[recorder])
    assert set(history.history) == {"loss", "lr", "val_loss", "accuracy", "val_accuracy"}
    assert all(len(values) == 4 for values in history.history.values())
    assert history.epoch == [1, 2, 3, 4] and history.stop_reason is None
    # val_loss is computed after the epoch, on the parameters the epoch ended with
    assert history.history["val_loss"][-1] == pytest.approx(CE(net.predict(X_val), y_val),
                                                            rel=1e-14)
    probe = mlp((64, 16, 10))
    for epoch in range(4):
        probe.parameters[:] = recorder.parameters[epoch + 1]  # numbered from 1
        assert history.history["val_loss"][epoch] == pytest.approx(
            CE(probe.predict(X_val), y_val), rel=1e-14)
        assert history.history["accuracy"][epoch] == accuracy_score(
            y_train, probe.predict(X_train).argmax(axis=1))
        assert history.history["val_accuracy"][epoch] == accuracy_score(
            y_val, probe.predict(X_val).argmax(axis=1))
    assert history.history["val_loss"][-1] < history.history["val_loss"][0]
    assert history.history["val_accuracy"][-1] > 0.7


def test_weighted_validation_loss():
    X, y = digits()
    w_val = np.random.default_rng(0).uniform(0, 2, 200)
    net = mlp((64, 8, 10))
    history = net.fit(X[:300], y[:300], loss=CE, optimizer=bp.Adam(lr=0.01), epochs=2,
                      validation_data=(X[300:500], y[300:500], w_val))
    expected = CE(net.predict(X[300:500]), y[300:500], sample_weight=w_val)
    assert history.history["val_loss"][-1] == pytest.approx(expected, rel=1e-14)
    assert expected != pytest.approx(CE(net.predict(X[300:500]), y[300:500]), rel=1e-6)


@pytest.mark.parametrize("from_logits", [True, False])
def test_binary_accuracy_is_scikit_learns(from_logits):
    from sklearn.metrics import accuracy_score
    X, y = cancer()
    net = mlp((30, 4, 1), output=None if from_logits else "sigmoid", seed=1)
    history = net.fit(X[:400], y[:400].astype(float),
                      loss=bp.BinaryCrossEntropy(from_logits=from_logits),
                      optimizer=bp.SGD(lr=0.1), epochs=3, batch_size=32,
                      validation_data=(X[400:], y[400:].astype(float)), metrics=["accuracy"])
    threshold = 0.0 if from_logits else 0.5
    assert history.history["val_accuracy"][-1] == accuracy_score(
        y[400:], net.predict(X[400:])[:, 0] > threshold)
    assert history.history["accuracy"][-1] == accuracy_score(
        y[:400], net.predict(X[:400])[:, 0] > threshold)
    assert history.history["val_accuracy"][-1] > 0.9


def test_callable_metric_on_regression():
    from sklearn.metrics import mean_absolute_error
    X, y = diabetes()
    seen = []

    def mae(y_true, y_pred):
        seen.append((np.shape(y_true), np.shape(y_pred)))
        return mean_absolute_error(y_true, y_pred)

    net = mlp((10, 8, 1), seed=2)
    history = net.fit(X[:300], y[:300], loss=bp.MSE(), optimizer=bp.Adam(lr=0.01),
                      epochs=3, batch_size=32, validation_data=(X[300:], y[300:]),
                      metrics=[mae])
    assert set(history.history) == {"loss", "lr", "val_loss", "mae", "val_mae"}
    assert history.history["mae"][-1] == pytest.approx(
        mean_absolute_error(y[:300], net.predict(X[:300])), rel=1e-14)
    assert history.history["val_mae"][-1] == pytest.approx(
        mean_absolute_error(y[300:], net.predict(X[300:])), rel=1e-14)
    # the user's targets as given, and the network's output
    assert seen[:2] == [((300,), (300, 1)), ((142,), (142, 1))]


def test_callable_metric_on_classification_gets_the_output():
    X, y = digits()
    net = mlp((64, 8, 10), seed=2)

    def top1(y_true, output):
        return float(np.mean(np.argmax(output, axis=1) == y_true))

    history = net.fit(X[:400], y[:400], loss=CE, optimizer=bp.Adam(lr=0.01), epochs=2,
                      metrics=["accuracy", top1])
    assert history.history["top1"] == history.history["accuracy"]


def test_split_validation_is_stratified_and_reproducible():
    counts = [50, 30, 7, 12]
    classes = np.random.default_rng(0).permutation(np.repeat(np.arange(4), counts))
    train, val = split_validation(len(classes), 0.2, classes, np.random.default_rng(1))
    assert np.array_equal(np.bincount(classes[val], minlength=4),
                          [round(0.2 * c) for c in counts])
    assert np.array_equal(np.sort(np.concatenate([train, val])), np.arange(len(classes)))
    again = split_validation(len(classes), 0.2, classes, np.random.default_rng(1))
    assert np.array_equal(again[1], val) and np.array_equal(again[0], train)
    other = split_validation(len(classes), 0.2, classes, np.random.default_rng(2))
    assert not np.array_equal(other[1], val)
    # without classes (regression): a plain random fraction
    train, val = split_validation(87, 0.2, None, np.random.default_rng(1))
    assert len(val) == round(0.2 * 87) and len(train) == 87 - len(val)
    assert len(np.intersect1d(train, val)) == 0


def test_fit_validation_split_is_the_stratified_split_from_the_networks_rng():
    X, y = digits()
    X, y = X[:500], y[:500]
    a, b = twins((64, 12, 10), seed=3)
    recorder = Recorder()
    ha = a.fit(X, y, loss=CE, optimizer=bp.Adam(lr=0.01), epochs=2, batch_size=64,
               validation_split=0.2, callbacks=[recorder], metrics=["accuracy"])
    counts = np.bincount(y)
    n_val = sum(round(0.2 * c) for c in counts)
    assert recorder.train_begin_logs["n_samples"] == len(y) - n_val
    # the same split drawn from the twin's RNG, then fit on it: the same training
    train, val = split_validation(len(y), 0.2, y, b._rng)
    assert np.array_equal(np.bincount(y[val], minlength=10), [round(0.2 * c) for c in counts])
    hb = b.fit(X[train], y[train], loss=CE, optimizer=bp.Adam(lr=0.01), epochs=2,
               batch_size=64, validation_data=(X[val], y[val]), metrics=["accuracy"])
    np.testing.assert_array_equal(a.parameters, b.parameters)
    assert ha.history == hb.history


def test_validation_split_regression_is_not_stratified():
    X, y = diabetes()
    recorder = Recorder()
    net = mlp((10, 4, 1))
    history = net.fit(X, y, loss=bp.MSE(), optimizer=bp.SGD(lr=0.01), epochs=1,
                      validation_split=0.2, callbacks=[recorder])
    assert recorder.train_begin_logs["n_samples"] == 442 - round(0.2 * 442)
    assert "val_loss" in history.history


@pytest.mark.parametrize("kwargs,error", [
    (dict(validation_split=0.2, validation_data="both"), ValueError),
    (dict(validation_split=0.0), ValueError),
    (dict(validation_split=1.0), ValueError),
    (dict(validation_split=0.001), ValueError),   # no validation sample at all
    (dict(validation_data=([[0.0] * 64], [0], [1.0], [2])), TypeError),
    (dict(validation_data=np.zeros((4, 64))), TypeError),
    (dict(metrics=["accuracy"], loss=bp.MSE()), ValueError),
    (dict(metrics=["f2"]), ValueError),  # unknown
    (dict(metrics=["r2"]), ValueError),  # a regression metric for CrossEntropy
])
def test_bad_validation_arguments_raise_before_anything_changes(trained, kwargs, error):
    net, opt, X, y = trained
    kwargs = dict(kwargs)
    if isinstance(kwargs.get("validation_data"), str):
        kwargs["validation_data"] = (X, y)
    loss = kwargs.pop("loss", CE)
    target = np.eye(10)[y] if isinstance(loss, bp.MSE) else y
    with unchanged(net, opt):
        with pytest.raises(error):
            net.fit(X, target, loss=loss, optimizer=opt, epochs=2, **kwargs)


# =========================================================================== early stopping
def overfitting_case(seed=0):
    """20 training digits, a 64-unit hidden layer: the validation loss falls, then rises."""
    X, y = digits()
    return (X[:20], y[:20], X[1000:1200], y[1000:1200],
            mlp((64, 64, 10), seed=seed))


@pytest.mark.parametrize("restore_best", [True, False])
def test_early_stopping_on_a_validation_curve_that_turns_up(restore_best):
    X, y, X_val, y_val, net = overfitting_case()
    recorder = Recorder(keep_parameters=True)
    stopper = bp.callbacks.EarlyStopping("val_loss", patience=5, restore_best=restore_best)
    history = net.fit(X, y, loss=CE, optimizer=bp.Adam(lr=0.01), epochs=300,
                      validation_data=(X_val, y_val), callbacks=[recorder],
                      early_stopping=stopper)
    val_loss = history.history["val_loss"]
    n_epochs = len(history.epoch)
    assert history.stop_reason == "early_stopping" and n_epochs < 300
    assert net.epochs_trained == n_epochs
    best = int(np.argmin(val_loss))  # an index; epochs are numbered from 1
    assert stopper.best_epoch == best + 1 and min(val_loss[best + 1:]) >= val_loss[best]
    # Keras' count: it stops after the patience-th epoch in a row without improvement
    assert stopper.stopped_epoch == n_epochs == best + 1 + 5
    assert val_loss[-1] > val_loss[best]  # the curve did turn up
    expected = recorder.parameters[best + 1 if restore_best else n_epochs]
    np.testing.assert_array_equal(net.parameters, expected)
    assert CE(net.predict(X_val), y_val) == pytest.approx(
        val_loss[best if restore_best else -1], rel=1e-14)


def test_early_stopping_true_uses_val_loss_patience_and_tol():
    X, y, X_val, y_val, net = overfitting_case()
    recorder = Recorder(keep_parameters=True)
    history = net.fit(X, y, loss=CE, optimizer=bp.Adam(lr=0.01), epochs=300,
                      validation_data=(X_val, y_val), early_stopping=True, patience=4,
                      tol=1e-3, callbacks=[recorder])
    val_loss = history.history["val_loss"]
    assert history.stop_reason == "early_stopping"
    stop, best = reference_stop(val_loss, tol=1e-3, patience=4)
    assert stop == len(val_loss) - 1
    np.testing.assert_array_equal(net.parameters, recorder.parameters[best + 1])


def test_early_stopping_max_mode_on_accuracy():
    X, y, X_val, y_val, net = overfitting_case(seed=1)
    stopper = bp.callbacks.EarlyStopping("val_accuracy", patience=3)
    recorder = Recorder(keep_parameters=True)
    history = net.fit(X, y, loss=CE, optimizer=bp.Adam(lr=0.01), epochs=300,
                      validation_data=(X_val, y_val), metrics=["accuracy"],
                      early_stopping=stopper, callbacks=[recorder])
    accuracy = history.history["val_accuracy"]
    assert stopper.best_epoch == int(np.argmax(accuracy)) + 1  # numbered from 1
    assert len(accuracy) == stopper.best_epoch + 3  # patience=3 epochs after the best
    np.testing.assert_array_equal(net.parameters, recorder.parameters[stopper.best_epoch])


def test_early_stopping_on_val_loss_without_validation_raises(trained):
    net, opt, X, y = trained
    with unchanged(net, opt):
        with pytest.raises(ValueError, match="validation"):
            net.fit(X, y, loss=CE, optimizer=opt,
                    early_stopping=bp.callbacks.EarlyStopping("val_loss"))


def reference_stop(losses, tol, patience):
    """The stopping rule written out: an epoch improves when its value is below the best
    so far by more than tol; stop after the epoch that is the (patience + 1)-th in a row
    without improvement. Returns (stop epoch or None, best epoch)."""
    best_value, best_epoch, wait = None, None, 0
    for epoch, value in enumerate(losses):
        if best_value is None or value < best_value - tol:
            best_value, best_epoch, wait = value, epoch, 0
            continue
        wait += 1
        if wait > patience:
            return epoch, best_epoch
    return None, best_epoch


def test_tol_stops_when_the_training_loss_no_longer_decreases():
    X, y = diabetes()
    net = mlp((10, 8, 1), seed=1)
    recorder = Recorder(keep_parameters=True)
    history = net.fit(X, y, loss=bp.MSE(), optimizer=bp.SGD(lr=0.02), epochs=3000,
                      tol=1e-3, patience=4, callbacks=[recorder])
    losses = history.history["loss"]
    assert history.stop_reason == "converged"
    assert 10 < len(losses) < 3000
    stop, best = reference_stop(losses, tol=1e-3, patience=4)
    assert stop == len(losses) - 1  # it stopped at the rule's epoch, not before or after
    # the textbook reading: over the last patience + 1 epochs the loss did not go
    # below the best before them by more than tol, but it had been decreasing
    assert min(losses[-5:]) >= min(losses[:-5]) - 1e-3
    assert losses[0] - losses[-1] > 0.1
    # convergence keeps the last parameters (no restore)
    np.testing.assert_array_equal(net.parameters, recorder.parameters[stop + 1])
    # tol=0 with plain gradient descent on a small rate does not stop early
    other = mlp((10, 8, 1), seed=1)
    assert len(other.fit(X, y, loss=bp.MSE(), optimizer=bp.SGD(lr=0.02), epochs=30,
                         tol=0.0, patience=4).epoch) == 30


# =========================================================================== partial_fit
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_partial_fit_is_fit_for_one_epoch(dtype):
    X, y = digits()
    X, y = X[:400], y[:400]
    a, b = twins((64, 16, 10), seed=4, dtype=dtype)
    opt_a, opt_b = bp.Adam(lr=0.01), bp.Adam(lr=0.01)
    losses = [a.partial_fit(X, y, loss=CE, optimizer=opt_a, batch_size=32)
              for _ in range(3)]
    history = b.fit(X, y, loss=CE, optimizer=opt_b, epochs=3, batch_size=32)
    np.testing.assert_array_equal(a.parameters, b.parameters)
    assert losses == history.history["loss"]
    assert isinstance(losses[0], float)
    assert a.epochs_trained == b.epochs_trained == 3
    assert opt_a.step_count == opt_b.step_count == 3 * 13
    for key in opt_b.state:
        np.testing.assert_array_equal(opt_a.state[key], opt_b.state[key])


@pytest.mark.parametrize("shuffle", [False, True])
def test_repeated_fit_continues(shuffle):
    X, y = digits()
    X, y = X[:300], y[:300]
    a, b = twins((64, 16, 10), seed=5)
    opt_a, opt_b = bp.Adam(lr=0.01), bp.Adam(lr=0.01)
    first = a.fit(X, y, loss=CE, optimizer=opt_a, epochs=2, batch_size=40, shuffle=shuffle)
    second = a.fit(X, y, loss=CE, optimizer=opt_a, epochs=2, batch_size=40, shuffle=shuffle)
    whole = b.fit(X, y, loss=CE, optimizer=opt_b, epochs=4, batch_size=40, shuffle=shuffle)
    np.testing.assert_array_equal(a.parameters, b.parameters)
    assert first.epoch == [1, 2] and second.epoch == [3, 4]
    assert first.history["loss"] + second.history["loss"] == whole.history["loss"]
    assert a.epochs_trained == 4 and a.history is second
    a.partial_fit(X, y, loss=CE, optimizer=opt_a)
    assert a.epochs_trained == 5


# =========================================================================== divergence
def raw_diabetes():
    from sklearn.datasets import load_diabetes
    return load_diabetes(return_X_y=True, scaled=False)


def replay_until_divergence(net, opt, X, y, loss, batch_size, epochs):
    """train_step over the batches fit(shuffle=False) visits until the loss is not
    finite; returns (steps taken, parameters then, (parameters, step count) at the
    start of that epoch)."""
    for _ in range(epochs):
        epoch_start = (net.parameters.copy(), opt.step_count)
        for rows in batches(len(X), batch_size):
            try:
                net.train_step(X[rows], y[rows], loss, opt)
            except bp.DivergenceError:
                return opt.step_count, net.parameters.copy(), epoch_start
    raise AssertionError("the replay did not diverge")


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("batch_size", [32, None])
def test_huge_learning_rate_on_unscaled_data_raises_divergence_error(batch_size, dtype):
    X, y = raw_diabetes()
    a, b = twins((10, 16, 1), activation="identity", seed=0, dtype=dtype)
    opt_a, opt_b = bp.SGD(lr=0.01, momentum=0.9), bp.SGD(lr=0.01, momentum=0.9)
    with pytest.raises(bp.DivergenceError, match="NaN or infinite"):
        a.fit(X, y, loss=bp.MSE(), optimizer=opt_a, epochs=100, batch_size=batch_size,
              shuffle=False)
    assert issubclass(bp.DivergenceError, FloatingPointError)
    assert np.isfinite(a.parameters).all()
    assert a.history.stop_reason == "diverged"
    steps, parameters, _ = replay_until_divergence(b, opt_b, X, y, bp.MSE(),
                                                   batch_size or len(X), 100)
    # every applied update is counted, and it is the replay's last finite state
    assert opt_a.step_count == steps > 0
    np.testing.assert_array_equal(a.parameters, parameters)
    n_batches = 1 if batch_size is None else -(-len(X) // batch_size)
    assert len(a.history.epoch) == a.epochs_trained == steps // n_batches
    # the history holds the epochs that finished, with their (finite) losses
    assert np.isfinite(a.history.history["loss"]).all()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("batch_size", [100, None])
def test_update_that_overflows_the_parameters_leaves_them_finite(batch_size, dtype):
    """A rate so large that one update makes the parameters infinite (with a finite
    loss): the next step's loss is NaN, and fit must go back to finite parameters."""
    X, y = diabetes()
    y = 100 * y
    lr = 1e308 if dtype == "float64" else 3e38
    a, b = twins((10, 4, 1), seed=0, dtype=dtype)
    opt_a, opt_b = bp.SGD(lr=lr), bp.SGD(lr=lr)
    with pytest.raises(bp.DivergenceError):
        a.fit(X, y, loss=bp.MSE(), optimizer=opt_a, epochs=3, batch_size=batch_size,
              shuffle=False)
    assert a.history.stop_reason == "diverged"
    assert np.isfinite(a.parameters).all(), "fit left non-finite parameters after divergence"
    steps, parameters, _ = replay_until_divergence(b, opt_b, X, y, bp.MSE(),
                                                   batch_size or len(X), 3)
    assert not np.isfinite(parameters).all()  # the crafted case: the update overflowed
    # the last finite parameters are those before the overflowing update
    assert steps == 1
    # here: the initial parameters, before the one update that overflowed
    np.testing.assert_array_equal(a.parameters, mlp((10, 4, 1), seed=0, dtype=dtype).parameters)
    assert opt_a.step_count == 0


@pytest.mark.parametrize("batch_size", [32, None])
def test_on_divergence_warn_returns_the_history(batch_size):
    X, y = raw_diabetes()
    a, b = twins((10, 16, 1), activation="identity")
    opt_a, opt_b = bp.SGD(lr=0.01, momentum=0.9), bp.SGD(lr=0.01, momentum=0.9)
    with pytest.warns(RuntimeWarning, match="NaN or infinite"):
        history = a.fit(X, y, loss=bp.MSE(), optimizer=opt_a, epochs=100,
                        batch_size=batch_size, shuffle=False, on_divergence="warn")
    assert history is a.history and history.stop_reason == "diverged"
    assert len(history.epoch) < 100 and np.isfinite(a.parameters).all()
    steps, parameters, _ = replay_until_divergence(b, opt_b, X, y, bp.MSE(),
                                                   batch_size or len(X), 100)
    assert opt_a.step_count == steps
    np.testing.assert_array_equal(a.parameters, parameters)
    # a recorded loss is a mean of finished batches' losses (or NaN), never a made-up 0
    losses = history.history["loss"]
    assert all(math.isnan(value) or value > 1.0 for value in losses), losses


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_train_step_with_an_overflowing_loss_changes_nothing(dtype):
    X, y = diabetes()
    net = mlp((10, 8, 1), activation="identity", dtype=dtype)
    opt = bp.Adam(lr=0.01)
    for rows in batches(64, 16):
        net.train_step(X[rows], y[rows], bp.MSE(), opt)
    huge = X[:16] * (1e200 if dtype == "float64" else 1e30)
    parameters = net.parameters.copy()
    state = {key: value.copy() for key, value in opt.state.items()}
    with pytest.raises(bp.DivergenceError, match="unchanged"):
        net.train_step(huge, y[:16], bp.MSE(), opt)
    np.testing.assert_array_equal(net.parameters, parameters)
    assert opt.step_count == 4
    for key in state:
        np.testing.assert_array_equal(opt.state[key], state[key])
    # and the next good step is the step the network would have taken anyway
    twin = mlp((10, 8, 1), activation="identity", dtype=dtype)
    opt_twin = bp.Adam(lr=0.01)
    for rows in batches(80, 16):
        twin.train_step(X[rows], y[rows], bp.MSE(), opt_twin)
    net.train_step(X[64:80], y[64:80], bp.MSE(), opt)
    np.testing.assert_array_equal(net.parameters, twin.parameters)


def test_bad_on_divergence_raises(trained):
    net, opt, X, y = trained
    with unchanged(net, opt):
        with pytest.raises(ValueError, match="on_divergence"):
            net.fit(X, y, loss=CE, optimizer=opt, on_divergence="ignore")


# =========================================================================== Ctrl-C
needs_sigint = pytest.mark.skipif(
    os.name != "posix" or threading.current_thread() is not threading.main_thread(),
    reason="sends SIGINT to the main thread (POSIX only)")


@contextlib.contextmanager
def sigint_raises_keyboard_interrupt():
    """SIGINT raises KeyboardInterrupt inside, whatever the runner's disposition: a test
    runner started as a background job of a non-interactive shell ignores SIGINT, and
    a test waiting for it would hang. Python's handler is installed, then restored."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


class SigintAt(bp.callbacks.Callback):
    """Sends SIGINT to this process from another thread when epoch `epoch` begins, so that
    it arrives while the main thread runs the compiled epoch (or soon after): a real
    Ctrl-C, with no timing in the test."""

    def __init__(self, epoch):
        self.epoch = epoch
        self.sender = None

    def on_epoch_begin(self, epoch, logs):
        if epoch == self.epoch:
            self.sender = threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGINT))
            self.sender.start()


@needs_sigint
def test_ctrl_c_during_fit_stops_at_a_batch_boundary():
    X, y = digits()
    X, y = X[:400], y[:400]
    a, b = twins((64, 32, 10), seed=7)
    opt_a, opt_b = bp.Adam(lr=1e-3), bp.Adam(lr=1e-3)
    batch_size, n_batches = 16, 25
    a.fit(X, y, loss=CE, optimizer=opt_a, epochs=1, batch_size=batch_size, shuffle=False)
    ender, sender = Recorder(), SigintAt(epoch=3)
    # bounded: if SIGINT never arrived, fit would end after these epochs (a few seconds)
    # and pytest.raises would fail, instead of the test hanging
    with sigint_raises_keyboard_interrupt(), pytest.raises(KeyboardInterrupt):
        a.fit(X, y, loss=CE, optimizer=opt_a, epochs=2000, batch_size=batch_size,
              shuffle=False, callbacks=[ender, sender])
    sender.sender.join()
    history = a.history
    completed = len(history.epoch)
    assert history.stop_reason == "interrupted"
    assert history.epoch == list(range(2, 2 + completed))  # numbered from 1
    assert a.epochs_trained == 1 + completed
    assert ender.events[-1] == ("train_end", None)
    assert ender.train_end_logs["stop_reason"] == "interrupted"
    steps = opt_a.step_count
    # every finished epoch is recorded (also one whose last batch was
    # running when Ctrl-C came); the partial one's batches are counted
    assert (1 + completed) * n_batches <= steps < (2 + completed) * n_batches
    assert np.isfinite(a.parameters).all()
    # replay exactly opt.step_count steps in the same order: the same parameters
    b.fit(X, y, loss=CE, optimizer=opt_b, epochs=steps // n_batches, batch_size=batch_size,
          shuffle=False)
    for rows in batches(len(X), batch_size)[:steps % n_batches]:
        b.train_step(X[rows], y[rows], CE, opt_b)
    assert opt_b.step_count == steps
    np.testing.assert_array_equal(a.parameters, b.parameters)
    # usable: a step, and fit again, continuing the epoch count
    assert np.isfinite(a.train_step(X[:16], y[:16], CE, opt_a))
    again = a.fit(X, y, loss=CE, optimizer=opt_a, epochs=1, batch_size=batch_size)
    assert again.epoch == [2 + completed] and again.stop_reason is None


class InterruptOnReturn:
    """The network's engine, except that the `at`-th train_epoch call raises
    KeyboardInterrupt once the real call has returned: what a Ctrl-C that arrives during
    the call's last batch does (Python runs the signal handler as the compiled call
    returns, and the call's result is lost)."""

    def __init__(self, engine, at):
        self.engine, self.at, self.calls = engine, at, 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def train_epoch(self, *args, **kwargs):
        result = self.engine.train_epoch(*args, **kwargs)
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return result


@pytest.mark.parametrize("per_batch", [False, True])
@pytest.mark.parametrize("metrics, validation", [(None, False), (["accuracy"], True)])
def test_ctrl_c_during_the_last_batch_of_an_epoch_counts_the_epoch(per_batch, metrics,
                                                                   validation):
    """An epoch interrupted after its last update counts: its updates were all applied, so
    epochs_trained and the history count it (once neither did). Its History record has the epoch's
    loss and rate (the same as an uninterrupted twin's) and NaN for what was not computed."""
    X, y = digits()
    X, y = X[:60], y[:60]
    a, b = twins((64, 8, 10), seed=3)
    opt_a, opt_b = bp.SGD(lr=0.1, momentum=0.9), bp.SGD(lr=0.1, momentum=0.9)
    n_batches = 4  # batches of 16: 16, 16, 16, 12
    kwargs = dict(loss=CE, batch_size=16, metrics=metrics,
                  validation_data=(X[:10], y[:10]) if validation else None,
                  callbacks=[Recorder(wants_batches=True)] if per_batch else None)
    trainer = a.trainer(X, y, optimizer=opt_a, epochs=3, **kwargs)
    # the second epoch's last compiled call: one per epoch, or one per batch
    trainer.engine = InterruptOnReturn(trainer.engine, at=2 * n_batches if per_batch else 2)
    with pytest.raises(KeyboardInterrupt):
        trainer.run(3)
    twin = b.fit(X, y, optimizer=opt_b, epochs=2, **kwargs)
    assert a.epochs_trained == 2 and opt_a.step_count == 2 * n_batches
    np.testing.assert_array_equal(a.parameters, b.parameters)
    history = a.history
    assert history.stop_reason == "interrupted" and history.epoch == [1, 2]
    assert history.history["loss"] == twin.history["loss"]
    assert history.history["lr"] == twin.history["lr"]
    assert set(history.history) == set(twin.history)
    for key, values in history.history.items():
        if key not in ("loss", "lr"):
            assert values[0] == twin.history[key][0] and math.isnan(values[1])
    # the epoch count continues from there
    assert a.fit(X, y, optimizer=opt_a, epochs=1, **kwargs).epoch == [3]


def test_ctrl_c_before_the_last_batch_does_not_count_the_epoch():
    X, y = digits()
    X, y = X[:60], y[:60]
    net = mlp((64, 8, 10), seed=3)
    opt = bp.SGD(lr=0.1)
    trainer = net.trainer(X, y, loss=CE, optimizer=opt, epochs=3, batch_size=16,
                          callbacks=[Recorder(wants_batches=True)])
    trainer.engine = InterruptOnReturn(trainer.engine, at=7)  # the second epoch's third
    with pytest.raises(KeyboardInterrupt):
        trainer.run(3)
    assert net.epochs_trained == 1 and net.history.epoch == [1] and opt.step_count == 7


class InterruptAt(bp.callbacks.Callback):
    def __init__(self, epoch):
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs):
        if epoch == self.epoch:
            raise KeyboardInterrupt


def test_keyboard_interrupt_from_a_callback():
    X, y = digits()
    X, y = X[:200], y[:200]
    a, b = twins((64, 16, 10), seed=8)
    opt_a, opt_b = bp.Adam(lr=0.01), bp.Adam(lr=0.01)
    after = Recorder()
    with pytest.raises(KeyboardInterrupt):
        a.fit(X, y, loss=CE, optimizer=opt_a, epochs=50, batch_size=50,
              callbacks=[InterruptAt(3), after], validation_data=(X[:50], y[:50]))
    assert a.history.epoch == [1, 2, 3] and a.history.stop_reason == "interrupted"
    assert a.epochs_trained == 3 and opt_a.step_count == 3 * 4
    assert after.events[-1] == ("train_end", None)
    assert after.train_end_logs["stop_reason"] == "interrupted"
    assert 3 not in after.epoch_logs  # the interrupt came before its on_epoch_end
    b.fit(X, y, loss=CE, optimizer=opt_b, epochs=3, batch_size=50)
    np.testing.assert_array_equal(a.parameters, b.parameters)


class InterruptAtBatch(bp.callbacks.Callback):
    wants_batches = True

    def __init__(self, epoch, batch):
        self.target = (epoch, batch)

    def on_epoch_begin(self, epoch, logs):
        self.epoch = epoch

    def on_batch_end(self, batch, logs):
        if (self.epoch, batch) == self.target:
            raise KeyboardInterrupt


def test_keyboard_interrupt_between_batches_keeps_the_finished_batches():
    X, y = digits()
    X, y = X[:200], y[:200]
    a, b = twins((64, 16, 10), seed=9)
    opt_a, opt_b = bp.Adam(lr=0.01), bp.Adam(lr=0.01)
    with pytest.raises(KeyboardInterrupt):
        a.fit(X, y, loss=CE, optimizer=opt_a, epochs=50, batch_size=40, shuffle=False,
              callbacks=[InterruptAtBatch(3, 1)])  # epoch 3, from 1
    assert a.history.epoch == [1, 2] and a.history.stop_reason == "interrupted"
    assert a.epochs_trained == 2 and opt_a.step_count == 2 * 5 + 2
    b.fit(X, y, loss=CE, optimizer=opt_b, epochs=2, batch_size=40, shuffle=False)
    for rows in batches(200, 40)[:2]:
        b.train_step(X[rows], y[rows], CE, opt_b)
    np.testing.assert_array_equal(a.parameters, b.parameters)


def test_ctrl_c_after_the_last_batch_of_an_epoch_counts_that_epoch():
    """A Ctrl-C that lands after an epoch's last batch (simulated: while the epoch's
    metrics are computed) must not lose that epoch: all its updates are applied, so
    epochs_trained (the time of schedules and of the next fit) must count it."""
    X, y = digits()
    X, y = X[:200], y[:200]
    calls = []

    def metric(y_true, output):
        calls.append(len(y_true))
        if len(calls) == 3:  # the third epoch's training metric
            raise KeyboardInterrupt
        return 0.0

    net = mlp((64, 16, 10), seed=9)
    opt = bp.Adam(lr=0.01)
    with pytest.raises(KeyboardInterrupt):
        net.fit(X, y, loss=CE, optimizer=opt, epochs=50, batch_size=40, metrics=[metric])
    assert net.history.stop_reason == "interrupted"
    assert opt.step_count == 3 * 5
    assert net.epochs_trained == opt.step_count // 5, \
        "an epoch whose every update was applied is not counted"


@pytest.mark.parametrize("key", [10, -1, 1.5, True])
def test_class_weight_key_outside_the_classes_is_refused(key):
    X, y = digits()
    net = mlp((64, 16, 10), seed=0)
    opt = bp.Adam(lr=0.01)
    with pytest.raises(ValueError, match="class_weight keys"):
        net.fit(X[:50], y[:50], loss=CE, optimizer=opt, class_weight={key: 2.0})
    assert opt.step_count == 0 and net.epochs_trained == 0
