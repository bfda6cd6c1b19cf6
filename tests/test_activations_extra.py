"""The named activations silu (swish), mish, hardtanh, selu, softsign against PyTorch and
central differences, at their kinks too; custom activations (bpfast.CustomActivation).

PyTorch is the oracle for the named ones: forward values (predict) and every parameter
gradient (compute_gradients) of a network with such a hidden layer, in both dtypes.
"""
import pickle

import numpy as np
import pytest
from central_differences import numerical_gradient, relative_error

import bpfast as bp

NEW = ["silu", "mish", "hardtanh", "selu", "softsign"]
DTYPES = ["float32", "float64"]


def rtol(dtype):
    return 1e-12 if dtype == "float64" else 2e-6


def torch_reference(net, X, target):
    """(output, loss, flat gradient) of net in PyTorch with MSE, bpfast's layout."""
    torch = pytest.importorskip("torch")
    modules = {"silu": torch.nn.SiLU(), "mish": torch.nn.Mish(), "hardtanh": torch.nn.Hardtanh(),
               "selu": torch.nn.SELU(), "softsign": torch.nn.Softsign(),
               "identity": torch.nn.Identity()}
    dtype = getattr(torch, net.dtype.name)
    a = torch.tensor(X, dtype=dtype)
    leaves = []
    for layer in net.layers:
        weight = torch.tensor(layer.weight, dtype=dtype, requires_grad=True)
        bias = torch.tensor(layer.bias, dtype=dtype, requires_grad=True)
        a = modules[layer.activation](a @ weight.T + bias)
        leaves += [weight, bias]
    loss = torch.nn.functional.mse_loss(a, torch.tensor(target, dtype=dtype))
    loss.backward()
    return (a.detach().numpy(), loss.item(),
            np.concatenate([leaf.grad.numpy().ravel() for leaf in leaves]))


def assert_close(got, expected, dtype):
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(1.0, float(np.abs(expected).max()))
    np.testing.assert_allclose(np.asarray(got, dtype=np.float64), expected,
                               rtol=rtol(dtype), atol=rtol(dtype) * scale)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", NEW)
def test_named_activation_is_torchs(activation, dtype):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((20, 4)) * 2
    target = rng.standard_normal((20, 3))
    net = bp.Network([bp.Dense(4, 7, activation), bp.Dense(7, 3)], dtype=dtype, seed=1)
    net.layers[0].weight[...] *= 3  # pre-activations spread over [-10, 10]: both branches
    output, loss, grad = torch_reference(net, X, target)
    assert_close(net.predict(X), output, dtype)
    assert net.compute_gradients(X, target, bp.MSE()) == pytest.approx(loss, rel=rtol(dtype))
    assert_close(net.gradients, grad, dtype)


@pytest.mark.parametrize("activation", NEW)
def test_named_activation_gradient_matches_central_differences(activation):
    rng = np.random.default_rng(2)
    X = rng.standard_normal((10, 3))
    target = rng.standard_normal((10, 2))
    net = bp.Network([bp.Dense(3, 5, activation), bp.Dense(5, 2)], dtype="float64", seed=3)
    net.compute_gradients(X, target, "mse")
    expected = numerical_gradient(lambda: bp.MSE()(net.predict(X), target), net.parameters)
    assert relative_error(net.gradients, expected) < 1e-7


KINKS = [("hardtanh", 1.0), ("hardtanh", -1.0), ("selu", 0.0), ("softsign", 0.0),
         ("silu", 0.0), ("mish", 0.0), ("selu", -0.0)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation, kink", KINKS, ids=[f"{a}-{k}" for a, k in KINKS])
def test_named_activation_at_its_kink_is_torchs(activation, kink, dtype):
    """Pre-activations exactly at the kink (zero weights, the kink as bias) in three of
    five units: the derivative there is PyTorch's one-sided choice (0 for hardtanh at
    +-1, alpha * scale for selu at 0, 1 for softsign at 0)."""
    net = bp.Network([bp.Dense(3, 5, activation), bp.Dense(5, 2)], dtype=dtype, seed=4)
    net.layers[0].weight[...] = 0
    net.layers[0].bias[...] = [kink, kink, kink, kink + 0.5, kink - 0.5]
    X = np.random.default_rng(3).standard_normal((6, 3))
    target = np.random.default_rng(5).standard_normal((6, 2))
    output, loss, grad = torch_reference(net, X, target)
    assert_close(net.predict(X), output, dtype)
    assert net.compute_gradients(X, target, bp.MSE()) == pytest.approx(loss, rel=rtol(dtype))
    assert_close(net.gradients, grad, dtype)
    if activation == "hardtanh":
        assert (net.layers[0].grad_bias[:3] == 0).all()


def test_swish_is_silu_and_names_ignore_case():
    assert bp.Dense(2, 2, "swish").activation == "silu"
    assert bp.Dense(2, 2, "SiLU").activation == "silu"
    assert bp.Dense(2, 2, "ReLU").activation == "relu"
    assert bp.Dense(2, 2, "LeakyReLU").activation == "leaky_relu"
    assert bp.Dense(2, 2, "Hard-Tanh").activation == "hardtanh"
    assert bp.Dense(2, 2, "linear").activation == "identity"
    for name in NEW:
        assert name in bp.ACTIVATIONS
    assert "custom" not in bp.ACTIVATIONS


@pytest.mark.parametrize("activation", NEW)
def test_named_activation_exports_to_torch_and_onnx(activation):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    X = rng.standard_normal((9, 3)) * 3
    for dtype in DTYPES:
        net = bp.Network([bp.Dense(3, 6, activation), bp.Dense(6, 2)], dtype=dtype, seed=2)
        module = net.to_torch()
        with torch.no_grad():
            out = module(torch.tensor(X, dtype=getattr(torch, dtype))).numpy()
        assert_close(out, net.predict(X), dtype)
        assert bp.Network.from_torch(module).layers[0].activation == activation
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    net = bp.Network([bp.Dense(3, 6, activation), bp.Dense(6, 2)], seed=2)
    model = net.to_onnx()
    onnx.checker.check_model(model, full_check=True)
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": X.astype(np.float32)})[0]
    np.testing.assert_allclose(got, net.predict(X), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", NEW)
def test_named_activation_saves_and_loads(activation, tmp_path):
    net = bp.Network([bp.Dense(3, 6, activation), bp.Dense(6, 2)], seed=2)
    bp.save(net, tmp_path / "model.npz")
    again = bp.load(tmp_path / "model.npz")
    assert again.layers[0].activation == activation
    X = np.random.default_rng(0).standard_normal((5, 3))
    np.testing.assert_array_equal(again.predict(X), net.predict(X))


# --------------------------------------------------------------------------- custom
def cube(z):
    return z ** 3 / 3 + z


def cube_derivative(z):
    return z ** 2 + 1


def tanh_derivative(z):
    return 1 - np.tanh(z) ** 2


@pytest.mark.parametrize("dtype", DTYPES)
def test_custom_activation_trains_as_the_builtin_one(dtype):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 4))
    y = rng.integers(0, 3, 64)
    custom = bp.Network([bp.Dense(4, 8, bp.CustomActivation(np.tanh, tanh_derivative)),
                         bp.Dense(8, 3)], dtype=dtype, seed=5)
    builtin = bp.Network([bp.Dense(4, 8, "tanh"), bp.Dense(8, 3)], dtype=dtype, seed=5)
    h1 = custom.fit(X, y, loss="cross_entropy", optimizer="adam", epochs=3, batch_size=16)
    h2 = builtin.fit(X, y, loss="cross_entropy", optimizer="adam", epochs=3, batch_size=16)
    tolerance = 1e-12 if dtype == "float64" else 1e-5
    np.testing.assert_allclose(h1.history["loss"], h2.history["loss"], rtol=tolerance)
    np.testing.assert_allclose(custom.parameters, builtin.parameters, rtol=tolerance * 10,
                               atol=tolerance)
    np.testing.assert_allclose(custom.predict(X), builtin.predict(X), rtol=tolerance * 10,
                               atol=tolerance)


def test_custom_activation_gradient_matches_central_differences():
    rng = np.random.default_rng(1)
    X = rng.standard_normal((10, 3))
    target = rng.standard_normal((10, 2))
    act = bp.CustomActivation(cube, cube_derivative)
    net = bp.Network([bp.Dense(3, 5, act), bp.Dense(5, 4, act), bp.Dense(4, 2)],
                     dtype="float64", seed=3)
    net.compute_gradients(X, target, "mse")
    expected = numerical_gradient(lambda: bp.MSE()(net.predict(X), target), net.parameters)
    assert relative_error(net.gradients, expected) < 1e-7
    # forward/backward by hand: the same gradients
    grads = net.gradients.copy()
    output = net.forward(X)
    net.backward(bp.MSE().gradient(output, target))
    np.testing.assert_allclose(net.gradients, grads, rtol=1e-12)


def test_wrong_derivative_is_refused_naming_the_point():
    wrong = bp.CustomActivation(np.tanh, lambda z: 1 - np.tanh(z), name="bad_tanh")
    with pytest.raises(ValueError, match=r"CustomActivation\('bad_tanh'\): derivative does not "
                                         r"match.*worst at z = .*check_gradient=False"):
        bp.Network([bp.Dense(2, 3, wrong), bp.Dense(3, 1)])
    relu_like = bp.CustomActivation(lambda z: np.maximum(z, 0), lambda z: (z > 0) * 1.0)
    bp.Network([bp.Dense(2, 3, relu_like), bp.Dense(3, 1)])  # kink at 0 skipped
    unchecked = bp.CustomActivation(np.tanh, lambda z: 1 - np.tanh(z), check_gradient=False)
    bp.Network([bp.Dense(2, 3, unchecked), bp.Dense(3, 1)])


def test_exception_in_a_custom_activation_propagates_and_changes_nothing():
    state = {"fail": False}

    def fn(z):
        if state["fail"]:
            raise FloatingPointError("user bug")
        return np.tanh(z)

    net = bp.Network([bp.Dense(3, 4, bp.CustomActivation(fn, tanh_derivative)), bp.Dense(4, 1)],
                     dtype="float64", seed=0)
    X, y = np.ones((5, 3)), np.zeros(5)
    opt = bp.SGD(lr=0.1, momentum=0.9)
    net.train_step(X, y, "mse", opt)
    parameters, gradients, steps = net.parameters.copy(), net.gradients.copy(), opt.step_count
    state["fail"] = True
    for call in (lambda: net.train_step(X, y, "mse", opt), lambda: net.predict(X),
                 lambda: net.forward(X), lambda: net.fit(X, y, loss="mse", optimizer=opt)):
        with pytest.raises(FloatingPointError, match="user bug"):
            call()
        np.testing.assert_array_equal(net.parameters, parameters)
        np.testing.assert_array_equal(net.gradients, gradients)
        assert opt.step_count == steps
    with pytest.raises(ValueError, match="forward"):
        net.backward(np.zeros((5, 1)))  # the failed forward left nothing to go back through
    state["fail"] = False
    net.train_step(X, y, "mse", opt)


def test_custom_activation_output_shape_is_checked():
    net = bp.Network([bp.Dense(3, 4, bp.CustomActivation(lambda z: z[:, :2], lambda z: z,
                                                   check_gradient=False)), bp.Dense(4, 1)])
    with pytest.raises(ValueError, match=r"fn returned shape \(5, 2\), expected \(5, 4\)"):
        net.predict(np.ones((5, 3)))


def test_custom_activation_save_and_export_are_refused_pickle_works(tmp_path):
    net = bp.Network([bp.Dense(3, 4, bp.CustomActivation(cube, cube_derivative)), bp.Dense(4, 1)],
                     dtype="float64", seed=0)
    with pytest.raises(ValueError, match="custom Python activation.*cannot be saved"):
        bp.save(net, tmp_path / "model.npz")
    assert not (tmp_path / "model.npz").exists()
    pytest.importorskip("torch")
    with pytest.raises(ValueError, match="custom Python activation"):
        net.to_torch()
    pytest.importorskip("onnx")
    with pytest.raises(ValueError, match="custom Python activation"):
        net.to_onnx()
    again = pickle.loads(pickle.dumps(net))
    X = np.random.default_rng(0).standard_normal((4, 3))
    np.testing.assert_array_equal(again.predict(X), net.predict(X))
    text = []
    net.summary(file=type("F", (), {"write": lambda self, s: text.append(s)})())
    assert "cube" in "".join(text)
