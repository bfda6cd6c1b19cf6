"""bpfast's losses against the NumPy oracle (tests/oracle.py).

Values and gradients in float64 (rtol 1e-12) and float32 (rtol 1e-5, against the
float64 reference evaluated on the same float32 inputs), for every loss, both
``from_logits`` settings, label and probability targets; plus extreme logits and
the input checks.
"""

import numpy as np
import oracle as ref
import pytest
from oracle_checks import assert_close

import bpfast as bp

RTOL = {np.float64: 1e-12, np.float32: 1e-5}
DTYPES = [np.float64, np.float32]


# (id, bpfast constructor, reference name, reference params, output kind)
LOSSES = [
    ("mse", lambda: bp.MSE(), "mse", {}, "real"),
    ("mse-half", lambda: bp.MSE(half=True), "mse", {"half": True}, "real"),
    ("l1", lambda: bp.L1(), "l1", {}, "real"),
    ("huber", lambda: bp.Huber(), "huber", {"delta": 1.0}, "real"),
    ("huber-0.3", lambda: bp.Huber(delta=0.3), "huber", {"delta": 0.3}, "real"),
    ("huber-2.5", lambda: bp.Huber(delta=2.5), "huber", {"delta": 2.5}, "real"),
    ("ce-logits", lambda: bp.CrossEntropy(), "cross_entropy", {"from_logits": True}, "logits"),
    ("ce-probs", lambda: bp.CrossEntropy(from_logits=False), "cross_entropy",
     {"from_logits": False}, "softmax"),
    ("bce-logits", lambda: bp.BinaryCrossEntropy(), "binary_cross_entropy",
     {"from_logits": True}, "logits"),
    ("bce-probs", lambda: bp.BinaryCrossEntropy(from_logits=False), "binary_cross_entropy",
     {"from_logits": False}, "sigmoid"),
]
LOSS_IDS = [c[0] for c in LOSSES]


def make_output(rng, kind, n, k):
    z = rng.standard_normal((n, k)) * 3.0
    if kind == "softmax":
        return ref.softmax(z)
    if kind == "sigmoid":
        return ref.sigmoid(z)
    return z


def make_targets(rng, ref_name, n, k):
    """{target kind: target} appropriate to the loss."""
    if ref_name in ("mse", "l1", "huber"):
        return {"dense": rng.standard_normal((n, k)) * 2.0}
    if ref_name == "binary_cross_entropy":
        return {"binary": rng.integers(0, 2, (n, k)).astype(np.float64),
                "soft": rng.random((n, k))}
    bad_rows = rng.random((n, k)) * 0.8  # rows that do not sum to 1
    bad_rows[0] = 0.0
    return {"labels": rng.integers(0, k, n),
            "labels-int32": rng.integers(0, k, n).astype(np.int32),
            "probs": ref.softmax(rng.standard_normal((n, k))),
            "bad-rows": bad_rows}


def cast_target(target, dtype):
    target = np.asarray(target)
    return target if np.issubdtype(target.dtype, np.integer) else target.astype(dtype)


def check_against_reference(loss, ref_name, params, out, target, rtol):
    out_before, target_before = out.copy(), np.copy(target)
    value = loss(out, target)
    grad = loss.gradient(out, target)
    assert type(value) is float
    assert isinstance(grad, np.ndarray)
    assert grad.shape == out.shape and grad.dtype == out.dtype
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    # inputs untouched
    np.testing.assert_array_equal(out, out_before)
    np.testing.assert_array_equal(target, target_before)
    assert_close(value, ref.loss_forward(ref_name, out, target, **params), rtol)
    assert_close(grad, ref.loss_gradient(ref_name, out, target, **params), rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("case", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("shape", [(37, 5), (1, 3), (64, 1)], ids=["37x5", "1x3", "64x1"])
def test_loss_matches_reference(case, dtype, shape):
    _, make_loss, ref_name, params, kind = case
    n, k = shape
    rng = np.random.default_rng(10)
    out = make_output(rng, kind, n, k).astype(dtype)
    loss = make_loss()
    for target in make_targets(rng, ref_name, n, k).values():
        check_against_reference(loss, ref_name, params, out, cast_target(target, dtype),
                                RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("case", LOSSES, ids=LOSS_IDS)
def test_loss_matches_reference_large(case, dtype):
    """Enough elements for any threaded or blocked reduction to take part."""
    _, make_loss, ref_name, params, kind = case
    n, k = 3000, 7
    rng = np.random.default_rng(11)
    out = make_output(rng, kind, n, k).astype(dtype)
    target = next(iter(make_targets(rng, ref_name, n, k).values()))
    check_against_reference(make_loss(), ref_name, params, out, cast_target(target, dtype),
                            RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("case", [c for c in LOSSES if c[2] != "cross_entropy"],
                         ids=[c[0] for c in LOSSES if c[2] != "cross_entropy"])
def test_one_dim_target_for_single_output(case, dtype):
    _, make_loss, ref_name, params, kind = case
    rng = np.random.default_rng(12)
    out = make_output(rng, kind, 25, 1).astype(dtype)
    target = next(iter(make_targets(rng, ref_name, 25, 1).values())).astype(dtype)
    loss = make_loss()
    assert loss(out, target[:, 0]) == loss(out, target)
    g1 = loss.gradient(out, target[:, 0])
    assert g1.shape == (25, 1) and g1.dtype == out.dtype
    np.testing.assert_array_equal(g1, loss.gradient(out, target))


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("from_logits", [True, False])
def test_cross_entropy_labels_equal_one_hot(dtype, from_logits):
    rng = np.random.default_rng(13)
    n, k = 30, 4
    out = make_output(rng, "logits" if from_logits else "softmax", n, k).astype(dtype)
    labels = rng.integers(0, k, n)
    one_hot = np.eye(k, dtype=dtype)[labels]
    loss = bp.CrossEntropy(from_logits=from_logits)
    rtol = RTOL[dtype]
    assert_close(loss(out, labels), loss(out, one_hot), rtol)
    assert_close(loss.gradient(out, labels), loss.gradient(out, one_hot), rtol)
    assert loss(out, labels) == loss(out, labels.astype(np.int32))


# ---------------------------------------------------------------------------
# Extreme inputs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
@pytest.mark.parametrize("loss_name", ["ce", "bce"])
def test_extreme_logits_are_finite(dtype, loss_name):
    rng = np.random.default_rng(14)
    n, k = 8, 4
    out = rng.standard_normal((n, k))
    out[0] = [1e4, -1e4, 0.0, 1e4]
    out[1] = [-1e4, -1e4, -1e4, -1e4]
    out[2] = [1e4, 1e4, 1e4, 1e4]
    out[3] = [-1e4, 1e4, -1e4, 5.0]
    out = out.astype(dtype)
    if loss_name == "ce":
        loss, ref_name = bp.CrossEntropy(), "cross_entropy"
        labels = np.array([1, 0, 3, 2, 0, 1, 2, 3])  # the first and fourth rows cost ~2e4
        targets = [labels, ref.softmax(rng.standard_normal((n, k))).astype(dtype)]
    else:
        loss, ref_name = bp.BinaryCrossEntropy(), "binary_cross_entropy"
        targets = [rng.integers(0, 2, (n, k)).astype(dtype), rng.random((n, k)).astype(dtype)]
    for target in targets:
        check_against_reference(loss, ref_name, {"from_logits": True}, out, target,
                                RTOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES, ids=["float64", "float32"])
def test_probabilities_at_zero_and_one_are_finite(dtype):
    # log clamped at -100, gradient denominators clamped at 1e-12
    p = np.array([[0.0, 1.0, 0.5], [1.0, 0.0, 1e-30], [0.25, 0.25, 0.5]], dtype=dtype)
    y_bin = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 0.5], [0.3, 0.7, 0.0]], dtype=dtype)
    check_against_reference(bp.BinaryCrossEntropy(from_logits=False), "binary_cross_entropy",
                            {"from_logits": False}, p, y_bin, RTOL[dtype])
    p_rows = np.array([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]], dtype=dtype)
    y_rows = np.array([[0.5, 0.5, 0.0], [0.0, 0.5, 0.5], [1.0, 0.0, 0.0]], dtype=dtype)
    check_against_reference(bp.CrossEntropy(from_logits=False), "cross_entropy",
                            {"from_logits": False}, p_rows, y_rows, RTOL[dtype])
    check_against_reference(bp.CrossEntropy(from_logits=False), "cross_entropy",
                            {"from_logits": False}, p_rows, np.array([0, 2, 1]), RTOL[dtype])


# ---------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------

ALL_LOSSES = [make_loss for _, make_loss, *_ in LOSSES]


@pytest.mark.parametrize("make_loss", ALL_LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize(
    "target_shape", [(10, 2), (9, 3), (11, 3), (10, 3, 1), (3, 10), (10, 1), (1, 3)],
    ids=str)
def test_shape_mismatch_raises(make_loss, target_shape):
    out = np.full((10, 3), 0.25)
    target = np.full(target_shape, 0.5)
    loss = make_loss()
    with pytest.raises(ValueError):
        loss(out, target)
    with pytest.raises(ValueError):
        loss.gradient(out, target)


@pytest.mark.parametrize("make_loss", [c[1] for c in LOSSES if c[2] != "cross_entropy"],
                         ids=[c[0] for c in LOSSES if c[2] != "cross_entropy"])
def test_one_dim_target_for_several_outputs_raises(make_loss):
    out = np.full((10, 3), 0.25)
    loss = make_loss()
    for target in (np.full(10, 0.5), np.full(30, 0.5), np.full(3, 0.5)):
        with pytest.raises(ValueError):
            loss(out, target)
        with pytest.raises(ValueError):
            loss.gradient(out, target)


@pytest.mark.parametrize("from_logits", [True, False])
def test_cross_entropy_label_count_mismatch_raises(from_logits):
    out = np.full((10, 3), 1.0 / 3)
    loss = bp.CrossEntropy(from_logits=from_logits)
    for labels in (np.zeros(9, dtype=int), np.zeros(11, dtype=int)):
        with pytest.raises(ValueError):
            loss(out, labels)
        with pytest.raises(ValueError):
            loss.gradient(out, labels)


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("bad", [-1, 3, 100, np.iinfo(np.int64).min])
def test_cross_entropy_label_out_of_range_raises(from_logits, bad):
    out = np.full((5, 3), 1.0 / 3)
    labels = np.array([0, 1, 2, 1, 0])
    labels[2] = bad
    loss = bp.CrossEntropy(from_logits=from_logits)
    with pytest.raises(ValueError):
        loss(out, labels)
    with pytest.raises(ValueError):
        loss.gradient(out, labels)


@pytest.mark.parametrize("make_loss", ALL_LOSSES, ids=LOSS_IDS)
def test_output_not_two_dimensional_raises(make_loss):
    loss = make_loss()
    with pytest.raises((ValueError, TypeError)):
        loss(np.full(6, 0.25), np.full(6, 0.5))
    with pytest.raises((ValueError, TypeError)):
        loss(np.full((2, 3, 1), 0.25), np.full((2, 3, 1), 0.5))


# ---------------------------------------------------------------------------
# Directly against PyTorch (when installed)
# ---------------------------------------------------------------------------


def _torch_loss(torch, case_id, params, out, target):
    F = torch.nn.functional
    if case_id.startswith("mse"):
        v = F.mse_loss(out, target)
        return 0.5 * v if params.get("half") else v
    if case_id == "l1":
        return F.l1_loss(out, target)
    if case_id.startswith("huber"):
        return F.huber_loss(out, target, delta=params["delta"])
    if case_id == "ce-logits":
        return F.cross_entropy(out, target)
    if case_id == "ce-probs":  # no torch class: the formula, on probabilities
        if target.dtype == torch.int64:
            target = F.one_hot(target, out.shape[1]).to(out.dtype)
        return -(target * torch.clamp(torch.log(out), min=-100.0)).sum() / out.shape[0]
    if case_id == "bce-logits":
        return F.binary_cross_entropy_with_logits(out, target)
    if case_id == "bce-probs":
        return F.binary_cross_entropy(out, target)
    raise AssertionError(case_id)


@pytest.mark.parametrize("case", LOSSES, ids=LOSS_IDS)
def test_matches_torch_float64(case):
    torch = pytest.importorskip("torch")
    case_id, make_loss, ref_name, params, kind = case
    rng = np.random.default_rng(15)
    n, k = 29, 4
    out = make_output(rng, kind, n, k)
    if kind == "sigmoid":  # BCELoss's clamps: p at 0 and 1, p*(1-p) below 1e-12
        out[0] = [0.0, 1.0, 1e-14, 1.0 - 1e-15]
    loss = make_loss()
    for target in make_targets(rng, ref_name, n, k).values():
        tout = torch.tensor(out, requires_grad=True)
        if np.issubdtype(target.dtype, np.integer):
            ttarget = torch.tensor(target.astype(np.int64))
        else:
            ttarget = torch.tensor(target)
        expected = _torch_loss(torch, case_id, params, tout, ttarget)
        expected.backward()
        assert_close(loss(out, target), expected.item(), 1e-12)
        assert_close(loss.gradient(out, target), tout.grad.numpy(), 1e-12)


@pytest.mark.parametrize("case", LOSSES, ids=LOSS_IDS)
def test_a_loss_pickles_and_copies_to_an_identical_one(case):
    import copy
    import pickle

    _, make, ref_name, _, kind = case
    loss = make()
    rng = np.random.default_rng(8)
    out = make_output(rng, kind, 12, 4)
    for twin in (pickle.loads(pickle.dumps(loss)), copy.deepcopy(loss)):
        assert type(twin) is type(loss) and repr(twin) == repr(loss)
        for target_kind, target in make_targets(rng, ref_name, 12, 4).items():
            if target_kind == "bad-rows":  # an error case, tested elsewhere
                continue
            assert twin(out, target) == loss(out, target)
            np.testing.assert_array_equal(twin.gradient(out, target), loss.gradient(out, target))


# ---------------------------------------------------------------------------
# reduction="mean" | "sum", against PyTorch's reduction= (when installed)
# ---------------------------------------------------------------------------

def _torch_terms(torch, case_id, params, out, target):
    """PyTorch's per-term losses (reduction="none"): (n,) for cross-entropy, else (n, k)."""
    F = torch.nn.functional
    if case_id.startswith("mse"):
        terms = F.mse_loss(out, target, reduction="none")
        return 0.5 * terms if params.get("half") else terms
    if case_id == "l1":
        return F.l1_loss(out, target, reduction="none")
    if case_id.startswith("huber"):
        return F.huber_loss(out, target, delta=params["delta"], reduction="none")
    if case_id == "ce-logits":
        return F.cross_entropy(out, target, reduction="none")
    if case_id == "ce-probs":
        if target.dtype == torch.int64:
            target = F.one_hot(target, out.shape[1]).to(out.dtype)
        return -(target * torch.clamp(torch.log(out), min=-100.0)).sum(dim=1)
    if case_id == "bce-logits":
        return F.binary_cross_entropy_with_logits(out, target, reduction="none")
    if case_id == "bce-probs":
        return F.binary_cross_entropy(out, target, reduction="none")
    raise AssertionError(case_id)


def _with_reduction(loss, reduction):
    arguments = {name: value for name, value in vars(loss).items() if not name.startswith("_")}
    return type(loss)(**{**arguments, "reduction": reduction})


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("case", LOSSES, ids=LOSS_IDS)
def test_reduction_matches_torch(case, reduction, weighted):
    """Every loss x reduction, value and gradient, against PyTorch's reduction="mean"/"sum"
    (where PyTorch has no per-sample weights: its per-term losses, weighted by hand)."""
    torch = pytest.importorskip("torch")
    case_id, make_loss, ref_name, params, kind = case
    rng = np.random.default_rng(16)
    n, k = 23, 3
    out = make_output(rng, kind, n, k)
    weights = rng.random(n) * 2.0 if weighted else None
    loss = _with_reduction(make_loss(), reduction)
    assert loss.reduction == reduction and f"reduction={reduction!r}" in repr(loss)
    for target_kind, target in make_targets(rng, ref_name, n, k).items():
        tout = torch.tensor(out, requires_grad=True)
        ttarget = torch.tensor(target.astype(np.int64) if np.issubdtype(target.dtype,
                                                                        np.integer) else target)
        terms = _torch_terms(torch, case_id, params, tout, ttarget)
        if weighted:
            row_weights = torch.tensor(weights)
            terms = terms * (row_weights if terms.ndim == 1 else row_weights[:, None])
        if reduction == "sum":
            expected = terms.sum()
        elif weighted:  # the weighted mean: sum(w_i * loss_i) / sum(w_i) (per element)
            expected = terms.sum() / (row_weights.sum() * (1 if terms.ndim == 1 else k))
        else:
            expected = terms.mean()
        expected.backward()
        assert_close(loss(out, target, weights), expected.item(), 1e-12)
        assert_close(loss.gradient(out, target, weights), tout.grad.numpy(), 1e-12)
        if case_id == "ce-logits" and target_kind == "labels" and weighted is False:
            # PyTorch's own class weights: sample weights of weight[label]
            class_weight = rng.random(k) + 0.5
            expected = torch.nn.functional.cross_entropy(
                torch.tensor(out), ttarget, weight=torch.tensor(class_weight),
                reduction=reduction)
            assert_close(loss(out, target, class_weight[target]), expected.item(), 1e-12)


def test_textbook_error_is_half_the_summed_squares():
    """MSE(half=True, reduction="sum") is E = 1/2 sum (d - y)^2, gradient y - d."""
    out = np.array([[0.75136507, 0.772928465]])
    target = np.array([[0.01, 0.99]])
    loss = bp.MSE(half=True, reduction="sum")
    assert loss(out, target) == pytest.approx(0.298371109, abs=1e-9)  # Mazur's total error
    np.testing.assert_allclose(loss.gradient(out, target), out - target, rtol=1e-15)
    assert bp.MSE(half=True)(out, target) == pytest.approx(0.298371109 / 2, abs=1e-9)


def test_reduction_survives_pickle_and_repr():
    import copy
    import pickle

    for loss in (bp.MSE(half=True, reduction="sum"), bp.L1(reduction="sum"),
                 bp.Huber(0.5, reduction="sum"), bp.CrossEntropy(False, reduction="sum"),
                 bp.BinaryCrossEntropy(reduction="sum")):
        for twin in (pickle.loads(pickle.dumps(loss)), copy.deepcopy(loss),
                     eval(repr(loss), {"bp": bp, **vars(bp)})):  # noqa: S307 (our repr)
            assert twin.reduction == "sum" and twin._config.reduction == "sum"
            assert repr(twin) == repr(loss)


@pytest.mark.parametrize("reduction", ["average", "none", None, 1])
def test_unknown_reduction_is_refused(reduction):
    with pytest.raises(ValueError, match="reduction"):
        bp.MSE(reduction=reduction)


def _torch_fit(torch, module, X, y, loss_fn, lr, batch_size, epochs, weights=None):
    """Plain PyTorch SGD over consecutive batches; each epoch's summed batch losses."""
    optimizer = torch.optim.SGD(module.parameters(), lr=lr)
    totals = []
    for _ in range(epochs):
        total = 0.0
        for begin in range(0, len(X), batch_size):
            rows = slice(begin, begin + batch_size)
            optimizer.zero_grad()
            terms = loss_fn(module(torch.tensor(X[rows])), torch.tensor(y[rows]))
            if weights is not None:
                terms = terms * torch.tensor(weights[rows])[:, None]
            value = terms.sum()
            value.backward()
            optimizer.step()
            total += value.item()
        totals.append(total)
    return totals


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
def test_fit_and_train_step_with_a_summed_loss_match_torch(weighted):
    """The compiled step and epoch with reduction="sum": parameters after SGD and the
    history's loss (the epoch's summed batch losses) as PyTorch's with reduction="sum"."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(17)
    X, y = rng.standard_normal((10, 3)), rng.standard_normal((10, 2))
    weights = rng.random(10) + 0.5 if weighted else None

    def make():
        return bp.Network([bp.Dense(3, 4, "tanh"), bp.Dense(4, 2)], dtype="float64", seed=3)

    loss = bp.MSE(half=True, reduction="sum")

    def half_squares(out, target):
        return 0.5 * torch.nn.functional.mse_loss(out, target, reduction="none")

    net = make()
    module = net.to_torch().double()
    history = net.fit(X, y, loss=loss, optimizer=bp.SGD(lr=0.05), epochs=3, batch_size=4,
                      shuffle=False, sample_weight=weights)
    totals = _torch_fit(torch, module, X, y, half_squares, 0.05, 4, 3, weights)
    np.testing.assert_allclose(history.history["loss"], totals, rtol=1e-12)
    expected = np.concatenate([p.detach().numpy().ravel() for p in module.parameters()])
    np.testing.assert_allclose(net.parameters, expected, rtol=1e-12, atol=1e-14)

    # one train_step over the whole batch: BGD with the summed error
    net = make()
    module = net.to_torch().double()
    value = net.train_step(X, y, loss, bp.SGD(lr=0.05), sample_weight=weights)
    totals = _torch_fit(torch, module, X, y, half_squares, 0.05, 10, 1, weights)
    assert value == pytest.approx(totals[0], rel=1e-12)
    expected = np.concatenate([p.detach().numpy().ravel() for p in module.parameters()])
    np.testing.assert_allclose(net.parameters, expected, rtol=1e-12, atol=1e-14)


def test_summed_loss_gradient_is_n_times_the_mean():
    """compute_gradients with "sum" is exactly the "mean" gradient times the number of
    averaged terms (a power of two here, so exact) for each loss family."""
    rng = np.random.default_rng(18)
    X = rng.standard_normal((8, 3))
    for loss_name, y, terms in (("mse", rng.standard_normal((8, 2)), 16),
                                ("cross_entropy", rng.integers(0, 2, 8), 8)):
        net = bp.Network([bp.Dense(3, 2, "sigmoid"), bp.Dense(2, 2)], dtype="float64", seed=1)
        mean_loss = bp.losses.get_loss(loss_name)
        sum_loss = _with_reduction(mean_loss, "sum")
        mean_value = net.compute_gradients(X, y, mean_loss)
        mean_gradients = net.gradients.copy()
        sum_value = net.compute_gradients(X, y, sum_loss)
        assert sum_value == pytest.approx(terms * mean_value, rel=1e-14)
        np.testing.assert_allclose(net.gradients, terms * mean_gradients, rtol=1e-14)
