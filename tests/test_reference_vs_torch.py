"""The NumPy oracle (tests/oracle.py) against PyTorch itself, in float64.

Agreement is to a few units in the last place (relative 1e-12 or better), not
bit for bit: PyTorch's CPU kernels use fused multiply-adds and MKL's sqrt.
"""

import numpy as np
import pytest
from optimizer_configs import CONFIGS as OPTIMIZER_CONFIGS

torch = pytest.importorskip("torch")
F = torch.nn.functional

import oracle as ref  # noqa: E402
from oracle_checks import assert_close as _assert_close  # noqa: E402

RTOL = 1e-12


def assert_close(got, expected, rtol=RTOL):
    _assert_close(got, expected, rtol)


def t64(x, grad=False):
    return torch.tensor(np.asarray(x, dtype=np.float64), dtype=torch.float64, requires_grad=grad)


# ---------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------

TORCH_ACTIVATIONS = {
    "identity": lambda z, p: z,
    "sigmoid": lambda z, p: torch.sigmoid(z),
    "tanh": lambda z, p: torch.tanh(z),
    "relu": lambda z, p: F.relu(z),
    "leaky_relu": lambda z, p: F.leaky_relu(z, 0.01 if p is None else p),
    "elu": lambda z, p: F.elu(z, 1.0 if p is None else p),
    "softplus": lambda z, p: F.softplus(z),
    "gelu": lambda z, p: F.gelu(z),
    "softmax": lambda z, p: torch.softmax(z, dim=1),
    "silu": lambda z, p: F.silu(z),
    "mish": lambda z, p: F.mish(z),
    "hardtanh": lambda z, p: F.hardtanh(z),
    "selu": lambda z, p: F.selu(z),
    "softsign": lambda z, p: F.softsign(z),
}


def activation_inputs(rng):
    z = rng.standard_normal((40, 7)) * 4.0
    # Special points: the kinks at 0, the softplus threshold, large magnitudes.
    z[0, :] = [0.0, 20.0, 20.000001, 19.99, -30.0, 35.0, -1e-300]
    z[1, :] = [-700.0, 700.0, 1e-8, -1e-8, 5.0, -5.0, 0.5]
    return z


ACTIVATION_CASES = [(name, None) for name in ref.ACTIVATIONS] + [
    ("leaky_relu", 0.3), ("elu", 0.3), ("elu", 2.0)]


@pytest.mark.parametrize("name, param", ACTIVATION_CASES)
def test_activation_forward_backward(name, param):
    rng = np.random.default_rng(1)
    z = activation_inputs(rng)
    if name == "softmax":
        z = rng.standard_normal((40, 7)) * 4.0
        z[0, :] = 1e3 * np.arange(7)  # needs the max subtraction
    grad_a = rng.standard_normal(z.shape)

    tz = t64(z, grad=True)
    ta = TORCH_ACTIVATIONS[name](tz, param)
    ta.backward(t64(grad_a))

    a = ref.activation_forward(name, z, param)
    assert a.dtype == np.float64 and a.shape == z.shape
    assert_close(a, ta.detach().numpy())
    assert_close(ref.activation_backward(name, grad_a, z, a, param), tz.grad.numpy())
    # `a` recomputed when not given
    assert_close(ref.activation_backward(name, grad_a, z, None, param), tz.grad.numpy())


def test_activation_float32_input_is_computed_in_float64():
    z = np.linspace(-3, 3, 12, dtype=np.float32).reshape(3, 4)
    a = ref.activation_forward("tanh", z)
    assert a.dtype == np.float64
    assert_close(a, np.tanh(z.astype(np.float64)))


def test_identity_is_none():
    z = np.arange(6.0).reshape(2, 3)
    assert_close(ref.activation_forward(None, z), z)
    with pytest.raises(ValueError):
        ref.activation_forward("swish", z)


# ---------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------


def torch_loss(name, out, y, params):
    """PyTorch's value for (name, params); `out` a leaf tensor."""
    from_logits = params.get("from_logits", True)
    if name == "mse":
        v = F.mse_loss(out, y)
        return 0.5 * v if params.get("half", False) else v
    if name == "l1":
        return F.l1_loss(out, y)
    if name == "huber":
        return F.huber_loss(out, y, delta=params.get("delta", 1.0))
    if name == "cross_entropy":
        if from_logits:
            return F.cross_entropy(out, y)
        if y.dtype == torch.int64:
            y = F.one_hot(y, out.shape[1]).to(torch.float64)
        return -(y * torch.clamp(torch.log(out), min=-100.0)).sum() / out.shape[0]
    if name == "binary_cross_entropy":
        if from_logits:
            return F.binary_cross_entropy_with_logits(out, y)
        return F.binary_cross_entropy(out, y)
    raise AssertionError(name)


def loss_cases():
    """(id, name, params, out, target) on random data."""
    rng = np.random.default_rng(2)
    n, k = 33, 5
    z = rng.standard_normal((n, k)) * 3.0
    y = rng.standard_normal((n, k))
    p = ref.softmax(rng.standard_normal((n, k)))
    labels = rng.integers(0, k, n)
    prob_y = ref.softmax(rng.standard_normal((n, k)))
    # rows that do not sum to one (PyTorch uses them as given)
    bad_y = rng.random((n, k)) * 0.7
    bad_y[0] = 0.0
    u = 1.0 / (1.0 + np.exp(-rng.standard_normal((n, k)) * 2))
    bin_y = rng.integers(0, 2, (n, k)).astype(np.float64)
    soft_bin_y = rng.random((n, k))

    cases = []
    for half in (False, True):
        cases.append((f"mse-half{half}", "mse", {"half": half}, z, y))
    cases.append(("l1", "l1", {}, z, y))
    # include exact ties for L1 (gradient 0 there)
    y_ties = y.copy()
    y_ties[:3] = z[:3]
    cases.append(("l1-ties", "l1", {}, z, y_ties))
    for delta in (1.0, 0.5, 2.5):
        cases.append((f"huber-{delta}", "huber", {"delta": delta}, z, y))
    cases.append(("ce-logits-labels", "cross_entropy", {"from_logits": True}, z, labels))
    cases.append(("ce-logits-probs", "cross_entropy", {"from_logits": True}, z, prob_y))
    cases.append(("ce-logits-badrows", "cross_entropy", {"from_logits": True}, z, bad_y))
    cases.append(("ce-probs-labels", "cross_entropy", {"from_logits": False}, p, labels))
    cases.append(("ce-probs-probs", "cross_entropy", {"from_logits": False}, p, prob_y))
    cases.append(("ce-probs-badrows", "cross_entropy", {"from_logits": False}, p, bad_y))
    cases.append(("bce-logits", "binary_cross_entropy", {"from_logits": True}, z, bin_y))
    cases.append(("bce-logits-soft", "binary_cross_entropy", {"from_logits": True}, z, soft_bin_y))
    cases.append(("bce-probs", "binary_cross_entropy", {"from_logits": False}, u, bin_y))
    cases.append(("bce-probs-soft", "binary_cross_entropy", {"from_logits": False}, u, soft_bin_y))
    # BCELoss's clamps: p exactly 0 or 1, and p(1-p) below 1e-12
    u_ext = u.copy()
    u_ext[0, :] = [0.0, 1.0, 1e-14, 1.0 - 1e-15, 1e-50]
    cases.append(("bce-probs-extreme", "binary_cross_entropy", {"from_logits": False}, u_ext,
                  soft_bin_y))
    z_ext = z.copy()
    z_ext[0, :] = [1e4, -1e4, 800.0, -800.0, 0.0]
    cases.append(("bce-logits-extreme", "binary_cross_entropy", {"from_logits": True}, z_ext,
                  soft_bin_y))
    cases.append(("ce-logits-extreme", "cross_entropy", {"from_logits": True}, z_ext, labels))
    cases.append(("ce-logits-extreme-probs", "cross_entropy", {"from_logits": True}, z_ext,
                  bad_y))
    # single output column
    cases.append(("mse-k1", "mse", {}, z[:, :1], y[:, :1]))
    cases.append(("bce-logits-k1", "binary_cross_entropy", {}, z[:, :1], bin_y[:, :1]))
    return cases


LOSS_CASES = loss_cases()


@pytest.mark.parametrize("case", LOSS_CASES, ids=[c[0] for c in LOSS_CASES])
def test_loss_value_and_gradient(case):
    _, name, params, out, target = case
    tout = t64(out, grad=True)
    if np.issubdtype(np.asarray(target).dtype, np.integer):
        ttarget = torch.tensor(target, dtype=torch.int64)
    else:
        ttarget = t64(target)
    tv = torch_loss(name, tout, ttarget, params)
    tv.backward()

    value = ref.loss_forward(name, out, target, **params)
    grad = ref.loss_gradient(name, out, target, **params)
    assert isinstance(value, float)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    assert_close(value, tv.item())
    assert grad.shape == out.shape and grad.dtype == np.float64
    assert_close(grad, tout.grad.numpy())


def test_ce_probabilities_gradient_clamp():
    # p = 0 where the target is positive: loss uses log clamped at -100 and the
    # gradient divides by max(p, 1e-12); both finite.
    p = np.array([[0.0, 1.0], [0.5, 0.5]])
    y = np.array([[1.0, 0.0], [0.5, 0.5]])
    v = ref.loss_forward("cross_entropy", p, y, from_logits=False)
    assert v == pytest.approx((100.0 - np.log(0.5)) / 2, rel=1e-15)
    g = ref.loss_gradient("cross_entropy", p, y, from_logits=False)
    assert_close(g, [[-1.0 / 1e-12 / 2, 0.0], [-0.5, -0.5]])


def test_loss_one_dim_target_for_single_output():
    rng = np.random.default_rng(3)
    out = rng.standard_normal((10, 1))
    y = rng.standard_normal(10)
    for name in ("mse", "l1", "huber"):
        assert ref.loss_forward(name, out, y) == ref.loss_forward(name, out, y[:, None])
        assert_close(ref.loss_gradient(name, out, y), ref.loss_gradient(name, out, y[:, None]))


def test_loss_bad_shapes_and_labels():
    out = np.zeros((4, 3))
    with pytest.raises(ValueError):
        ref.loss_forward("mse", out, np.zeros((4, 2)))
    with pytest.raises(ValueError):
        ref.loss_forward("mse", out, np.zeros(4))
    with pytest.raises(ValueError):
        ref.loss_forward("cross_entropy", out, np.array([0, 1, 3, 0]))
    with pytest.raises(ValueError):
        ref.loss_forward("cross_entropy", out, np.array([0, 1, 2]))
    with pytest.raises(ValueError):
        ref.loss_forward("hinge", out, out)


# ---------------------------------------------------------------------------
# Optimizers
# ---------------------------------------------------------------------------



def _config_id(cfg):
    name, kw = cfg
    return name + "-" + "-".join(f"{k}={v}" for k, v in kw.items())


@pytest.mark.parametrize("config", OPTIMIZER_CONFIGS,
                         ids=[_config_id(c) for c in OPTIMIZER_CONFIGS])
def test_optimizer_matches_torch(config):
    name, kw = config
    rng = np.random.default_rng(4)
    n = 257
    p0 = rng.standard_normal(n)

    tp = torch.tensor(p0.copy(), dtype=torch.float64, requires_grad=True)
    topt = getattr(torch.optim, name)([tp], **kw)
    ropt = getattr(ref, name)(**kw)
    p = p0.copy()

    for _ in range(50):
        g = rng.standard_normal(n) * rng.choice([1e-3, 1.0, 10.0])
        tp.grad = torch.tensor(g, dtype=torch.float64)
        topt.step()
        ropt.step(p, g)
        assert_close(p, tp.detach().numpy())
    assert ropt.step_count == 50


def test_optimizer_float32_params_updated_in_place():
    p = np.ones(5, dtype=np.float32)
    before = p
    opt = ref.SGD(lr=0.5)
    opt.step(p, np.ones(5, dtype=np.float32))
    assert p is before and p.dtype == np.float32
    np.testing.assert_array_equal(p, np.full(5, 0.5, dtype=np.float32))


def test_optimizer_size_change_raises():
    opt = ref.Adam()
    opt.step(np.zeros(4), np.ones(4))
    with pytest.raises(ValueError):
        opt.step(np.zeros(5), np.ones(5))


@pytest.mark.parametrize(
    "name, kw",
    [
        ("SGD", {"lr": -0.1}),
        ("SGD", {"lr": 0.1, "momentum": -0.1}),
        ("SGD", {"lr": 0.1, "nesterov": True}),
        ("SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "nesterov": True}),
        ("Adam", {"lr": float("nan")}),
        ("Adam", {"betas": (1.0, 0.999)}),
        ("Adam", {"betas": (0.9, -0.1)}),
        ("Adam", {"eps": -1e-8}),
        ("AdamW", {"weight_decay": -1.0}),
        ("RMSprop", {"alpha": -0.5}),
        ("Adagrad", {"lr_decay": -1.0}),
        ("Adagrad", {"initial_accumulator_value": -1.0}),
    ],
)
def test_reference_and_torch_reject_same_hyperparameters(name, kw):
    with pytest.raises(ValueError):
        getattr(ref, name)(**kw)
    with pytest.raises(ValueError):
        getattr(torch.optim, name)([torch.zeros(2, requires_grad=True)], **kw)


def test_defaults_match_torch():
    import inspect

    for name in ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad"):
        tsig = inspect.signature(getattr(torch.optim, name)).parameters
        rsig = inspect.signature(getattr(ref, name)).parameters
        for pname, param in rsig.items():
            assert pname in tsig, (name, pname)
            assert param.default == tsig[pname].default, (name, pname)


# ---------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("with_bias", [True, False])
def test_network_matches_torch(with_bias):
    rng = np.random.default_rng(5)
    sizes = [6, 9, 8, 7, 5, 4]
    acts = ["tanh", ("leaky_relu", 0.2), "gelu", "softplus", "softmax"]
    n = 11
    X = rng.standard_normal((n, sizes[0]))
    weights = [rng.standard_normal((o, i)) / np.sqrt(i) for i, o in zip(sizes[:-1], sizes[1:])]
    biases = [rng.standard_normal(o) if with_bias else None for o in sizes[1:]]
    biases[1] = None  # a layer without bias in any case
    grad_out = rng.standard_normal((n, sizes[-1]))

    tX = t64(X, grad=True)
    tW = [t64(W, grad=True) for W in weights]
    tb = [None if b is None else t64(b, grad=True) for b in biases]
    a = tX
    for W, b, spec in zip(tW, tb, acts):
        z = F.linear(a, W, b)
        name, param = (spec, None) if isinstance(spec, str) else spec
        a = TORCH_ACTIVATIONS[name](z, param)
    a.backward(t64(grad_out))

    cache = ref.network_forward(weights, biases, acts, X)
    assert_close(cache[-1][1], a.detach().numpy())
    gW, gb, gX = ref.network_backward(weights, cache, acts, grad_out, X, biases=biases)
    for l in range(len(weights)):
        assert_close(gW[l], tW[l].grad.numpy())
        if biases[l] is None:
            assert gb[l] is None
        else:
            assert_close(gb[l], tb[l].grad.numpy())
    assert_close(gX, tX.grad.numpy())


def test_network_with_loss_matches_torch():
    """Reference net + reference CE-from-logits = torch net + F.cross_entropy."""
    rng = np.random.default_rng(6)
    X = rng.standard_normal((20, 4))
    y = rng.integers(0, 3, 20)
    weights = [rng.standard_normal((16, 4)), rng.standard_normal((3, 16))]
    biases = [rng.standard_normal(16), rng.standard_normal(3)]
    acts = ["relu", None]

    cache = ref.network_forward(weights, biases, acts, X)
    out = cache[-1][1]
    g = ref.loss_gradient("cross_entropy", out, y)
    gW, gb, _ = ref.network_backward(weights, cache, acts, g, X)

    tW = [t64(W, grad=True) for W in weights]
    tb = [t64(b, grad=True) for b in biases]
    h = F.relu(F.linear(t64(X), tW[0], tb[0]))
    loss = F.cross_entropy(F.linear(h, tW[1], tb[1]), torch.tensor(y))
    loss.backward()
    assert_close(ref.loss_forward("cross_entropy", out, y), loss.item())
    for l in range(2):
        assert_close(gW[l], tW[l].grad.numpy())
        assert_close(gb[l], tb[l].grad.numpy())
