"""The compiled kernels at the kinks of their functions, against PyTorch.

Elsewhere the engine is compared with oracles on random data, which never lands
exactly on a kink: a prediction equal to its target (L1), a pre-activation of
exactly 0 (ReLU, leaky ReLU, ELU) or 20 (softplus's threshold), a difference of
exactly delta (Huber), a probability of exactly 0 or 1 (the clamped logs of the
probability losses). Here the data is built to hit them exactly, in both dtypes,
and PyTorch (its documented one-sided choice at each kink) is the oracle: a kernel
that took the other side (say -1/n for L1 at a tie) fails.

Exact kinks come from zero weights: a layer's output is then its bias, bit for bit,
in any framework, so both see the same kink.
"""
import numpy as np
import oracle as ref
import pytest

import bpfast as bp

torch = pytest.importorskip("torch")
F = torch.nn.functional

DTYPES = ["float32", "float64"]
TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def rtol(dtype):
    return 1e-12 if dtype == "float64" else 2e-6


def assert_close(got, expected, dtype):
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), expected,
                               rtol=rtol(dtype), atol=rtol(dtype) * scale)


def tensor(array, dtype, grad=False):
    return torch.tensor(np.array(array), dtype=TORCH_DTYPES[dtype], requires_grad=grad)


TORCH_ACTIVATIONS = {
    "identity": lambda z, layer: z,
    "relu": lambda z, layer: F.relu(z),
    "leaky_relu": lambda z, layer: F.leaky_relu(z, layer.activation_param),
    "elu": lambda z, layer: F.elu(z, layer.activation_param),
    "softplus": lambda z, layer: F.softplus(z),  # beta 1, threshold 20, as bpfast
    "tanh": lambda z, layer: torch.tanh(z),
    "sigmoid": lambda z, layer: torch.sigmoid(z),
}


def torch_loss_and_gradients(net, X, target, loss_fn):
    """PyTorch's loss and flat gradient (bpfast's layout) for net's parameters."""
    a = tensor(X, net.dtype.name)
    leaves = []
    for layer in net.layers:
        weight = tensor(layer.weight, net.dtype.name, grad=True)
        bias = tensor(layer.bias, net.dtype.name, grad=True)
        a = TORCH_ACTIVATIONS[layer.activation](a @ weight.T + bias, layer)
        leaves += [weight, bias]
    loss = loss_fn(a, tensor(target, net.dtype.name))
    loss.backward()
    return loss.item(), np.concatenate([leaf.grad.numpy().ravel() for leaf in leaves])


def output_net(dtype, output_values, n_in=3, hidden="tanh", seed=0):
    """A network whose output is exactly output_values (k,) for every row: the last
    layer's weights are zero, so the output is its bias."""
    k = len(output_values)
    net = bp.Network([bp.Dense(n_in, 5, hidden), bp.Dense(5, k)], dtype=dtype, seed=seed)
    net.layers[1].weight[...] = 0
    net.layers[1].bias[...] = output_values
    return net


# --------------------------------------------------------------------------- L1
def _tied(dtype, seed=0):
    """Outputs (8, 3) and targets equal to them exactly at half the elements."""
    rng = np.random.default_rng(seed)
    out = rng.standard_normal((8, 3)).astype(dtype)
    target = out.copy()
    ties = rng.uniform(size=out.shape) < 0.5
    target[~ties] += rng.choice([-1.0, 1.0], size=(~ties).sum()).astype(dtype)
    assert ties.any() and (~ties).any()
    return out, target, ties


@pytest.mark.parametrize("dtype", DTYPES)
def test_l1_at_exact_ties_is_torchs_value_and_gradient(dtype):
    out, target, ties = _tied(dtype)
    leaf = tensor(out, dtype, grad=True)
    expected = F.l1_loss(leaf, tensor(target, dtype))
    expected.backward()
    loss = bp.L1()
    assert loss(out, target) == pytest.approx(expected.item(), rel=rtol(dtype))
    gradient = loss.gradient(out, target)
    assert (gradient[ties] == 0).all()  # sign(0) = 0, as torch
    assert_close(gradient, leaf.grad.numpy(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_l1_train_step_at_exact_ties_is_torchs(dtype):
    """Every output ties with its target in the first two columns: the fused kernel's
    gradient there must be 0, so only the third column moves the parameters."""
    values = np.array([0.5, -1.25, 2.0])
    net = output_net(dtype, values)
    X = np.random.default_rng(1).standard_normal((6, 3))
    target = np.tile(values, (6, 1))
    target[:, 2] += np.arange(6) - 2.5  # no tie in the last column
    expected_loss, expected_grad = torch_loss_and_gradients(net, X, target, F.l1_loss)
    before = net.parameters.astype(np.float64)
    lr = 0.125
    assert net.train_step(X, target, bp.L1(), bp.SGD(lr=lr)) == pytest.approx(
        expected_loss, rel=rtol(dtype))
    assert_close(net.gradients, expected_grad, dtype)
    assert_close(net.parameters, before - lr * expected_grad, dtype)
    # the tied columns' biases do not move at all
    assert (net.layers[1].bias[:2] == values[:2]).all()


# --------------------------------------------------------------------------- Huber
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("delta", [1.0, 0.5, 2.0])
def test_huber_at_exactly_delta_is_torchs(delta, dtype):
    values = np.array([0.5, -1.5, 0.25, 3.0])
    net = output_net(dtype, values)
    X = np.random.default_rng(2).standard_normal((4, 3))
    # differences of exactly +delta, -delta, 0 and 1.5 delta (all exact in binary)
    target = np.tile(values, (4, 1)) - np.array([delta, -delta, 0.0, 1.5 * delta])
    loss = bp.Huber(delta=delta)
    out = net.forward(X)
    assert (np.abs(out - target.astype(dtype))[:, :2] == delta).all()
    leaf = tensor(out, dtype, grad=True)
    expected = F.huber_loss(leaf, tensor(target, dtype), delta=delta)
    expected.backward()
    assert loss(out, target) == pytest.approx(expected.item(), rel=rtol(dtype))
    assert_close(loss.gradient(out, target), leaf.grad.numpy(), dtype)
    expected_loss, expected_grad = torch_loss_and_gradients(
        net, X, target, lambda a, y: F.huber_loss(a, y, delta=delta))
    assert net.compute_gradients(X, target, loss) == pytest.approx(expected_loss,
                                                                   rel=rtol(dtype))
    assert_close(net.gradients, expected_grad, dtype)


# --------------------------------------------------------------------------- activations
KINKS = [("relu", {}, 0.0), ("leaky_relu", {}, 0.0), ("leaky_relu", {"negative_slope": 0.3}, 0.0),
         ("elu", {}, 0.0), ("elu", {"alpha": 0.5}, 0.0), ("softplus", {}, 20.0),
         ("relu", {}, -0.0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation, options, kink", KINKS,
                         ids=[f"{a}-{o}-{k}" for a, o, k in KINKS])
def test_activation_at_its_kink_is_torchs(activation, options, kink, dtype):
    """A hidden layer whose pre-activations are exactly the kink (zero weights, the
    kink as bias) in three of five units, and just beside it in the others."""
    net = bp.Network([bp.Dense(3, 5, activation, **options), bp.Dense(5, 2)], dtype=dtype,
                     seed=4)
    net.layers[0].weight[...] = 0
    net.layers[0].bias[...] = [kink, kink, kink, kink + 0.5, kink - 0.5]
    X = np.random.default_rng(3).standard_normal((6, 3))
    target = np.random.default_rng(5).standard_normal((6, 2))
    expected_loss, expected_grad = torch_loss_and_gradients(net, X, target, F.mse_loss)
    assert net.compute_gradients(X, target, bp.MSE()) == pytest.approx(expected_loss,
                                                                       rel=rtol(dtype))
    assert_close(net.gradients, expected_grad, dtype)
    # the bias gradient of a unit at the kink is the derivative's one-sided choice
    # there: 0 for ReLU, the slope for leaky ReLU, alpha for ELU, e/(e+1) for softplus
    assert_close(net.layers[0].grad_bias[:3], expected_grad[15:18], dtype)


# --------------------------------------------------------------------------- clamps
@pytest.mark.parametrize("dtype", DTYPES)
def test_binary_cross_entropy_on_probabilities_0_and_1_is_torchs(dtype):
    """torch.nn.BCELoss clamps each log at -100 and the gradient's denominator
    p(1 - p) at 1e-12; at p = 0 and p = 1 exactly both clamps are active."""
    out = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0], [0.5, 1.0, 0.0]])
    target = np.array([[0.0, 1.0, 1.0], [0.0, 0.5, 1.0], [0.5, 0.5, 0.5]])
    out, target = out.astype(dtype), target.astype(dtype)
    leaf = tensor(out, dtype, grad=True)
    expected = F.binary_cross_entropy(leaf, tensor(target, dtype))
    expected.backward()
    loss = bp.BinaryCrossEntropy(from_logits=False)
    assert loss(out, target) == pytest.approx(expected.item(), rel=rtol(dtype))
    assert_close(loss.gradient(out, target), leaf.grad.numpy(), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_on_probabilities_0_and_1_is_the_oracles(dtype):
    """PyTorch has no cross-entropy on probabilities; bpfast's (log clamped at -100,
    the gradient's denominator at 1e-12, as BCELoss) is checked against the NumPy
    oracle, which tests/test_reference_vs_torch.py checks against PyTorch's BCELoss
    conventions. Probabilities of exactly 0 and 1, with labels and with soft targets."""
    out = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.5, 0.5, 0.0]]).astype(dtype)
    loss = bp.CrossEntropy(from_logits=False)
    for target in (np.array([1, 1, 2]), np.array([[0.0, 1.0, 0.0], [0.5, 0.5, 0.0],
                                                  [0.0, 0.25, 0.75]])):
        expected = ref.loss_forward("cross_entropy", out.astype(np.float64), target,
                                    from_logits=False)
        expected_grad = ref.loss_gradient("cross_entropy", out.astype(np.float64), target,
                                          from_logits=False)
        assert loss(out, target) == pytest.approx(expected, rel=rtol(dtype))
        assert_close(loss.gradient(out, target), expected_grad, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_clip_value_at_its_bounds_is_torchs_clamp(dtype):
    """Gradients exactly at +-clip_value stay there (torch.clamp's bounds are inclusive);
    the others are clamped to them."""
    values = np.array([0.5, -0.5])
    net = output_net(dtype, values, hidden="identity")
    X = np.ones((2, 3))
    # the output biases' gradients 2 * (out - y) / numel are exact: -0.5, 0.5 (summed
    # over two rows: -1 and 1.5 per column); clip_value is exactly one of them
    target = np.tile(values, (2, 1)) + np.array([[1.0, -1.0], [1.0, -2.0]])
    _, expected_grad = torch_loss_and_gradients(net, X, target, F.mse_loss)
    clip = float(abs(expected_grad[-2]))
    assert clip < abs(expected_grad[-1])
    before = net.parameters.astype(np.float64)
    net.train_step(X, target, bp.MSE(), bp.SGD(lr=1.0), clip_value=clip)
    clamped = torch.clamp(torch.tensor(expected_grad, dtype=torch.float64), -clip, clip)
    assert_close(net.parameters, before - clamped.numpy(), dtype)
    assert net.layers[1].bias[0] == np.asarray(values[0] + clip, dtype=dtype)
