"""Custom losses and activations (issue 17) together with the layer kinds of issue 15
(Dropout, BatchNorm1d, LayerNorm, Activation) and the "sum" reduction.

The oracles: the same network with the built-in activation or loss that the custom
one writes out in NumPy (same seed, so the same initial parameters and Dropout
masks), and central differences.
"""
import numpy as np
import pytest
from central_differences import numerical_gradient, relative_error

import bpfast as bp


def tanh_derivative(z):
    return 1 - np.tanh(z) ** 2


def squared_error(output, target):
    return (output - target) ** 2


def squared_error_gradient(output, target):
    return 2 * (output - target)


def data(n=48, n_in=4, n_out=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, n_in)), rng.standard_normal((n, n_out))


def with_layers(activation, n_out=2):
    """A network with every new layer kind around a Dense using `activation`."""
    return bp.Network([bp.Dense(4, 8, activation), bp.BatchNorm1d(8), bp.Dropout(0.25),
                       bp.LayerNorm(8), bp.Dense(8, 6), bp.Activation(activation),
                       bp.Dense(6, n_out)], dtype="float64", seed=7)


def test_custom_activation_in_a_network_with_the_new_layers_trains_as_the_builtin():
    X, y = data()
    custom = with_layers(bp.CustomActivation(np.tanh, tanh_derivative))
    builtin = with_layers("tanh")
    np.testing.assert_array_equal(custom.parameters, builtin.parameters)
    h1 = custom.fit(X, y, loss="mse", optimizer="adam", epochs=3, batch_size=16)
    h2 = builtin.fit(X, y, loss="mse", optimizer="adam", epochs=3, batch_size=16)
    np.testing.assert_allclose(h1.history["loss"], h2.history["loss"], rtol=1e-12)
    np.testing.assert_allclose(custom.parameters, builtin.parameters, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(custom.buffers, builtin.buffers, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(custom.predict(X), builtin.predict(X), rtol=1e-10, atol=1e-12)
    # forward/backward by hand in training mode: the same gradients as the built-in's
    for net in (custom, builtin):
        out = net.forward(X[:10])
        net.backward(bp.MSE().gradient(out, y[:10]))
    np.testing.assert_allclose(custom.gradients, builtin.gradients, rtol=1e-9, atol=1e-12)


def test_custom_activation_layer_gradient_matches_central_differences():
    X, y = data(n=12)
    act = bp.CustomActivation(lambda z: z ** 3 / 3 + z, lambda z: z ** 2 + 1, name="cubic")
    net = bp.Network([bp.Dense(4, 5), bp.LayerNorm(5), bp.Activation(act), bp.Dense(5, 2)],
                     dtype="float64", seed=3)
    net.compute_gradients(X, y, "mse")
    expected = numerical_gradient(lambda: bp.MSE()(net.predict(X), y), net.parameters)
    assert relative_error(net.gradients, expected) < 1e-7


@pytest.mark.parametrize("name", ["silu", "Swish", "mish", "hardtanh", "SELU", "soft-sign"])
def test_activation_layer_takes_the_new_names(name):
    X, y = data(n=20, n_in=3)
    as_layer = bp.Network([bp.Dense(3, 5), bp.Activation(name), bp.Dense(5, 2)],
                          dtype="float64", seed=1)
    in_dense = bp.Network([bp.Dense(3, 5, name), bp.Dense(5, 2)], dtype="float64", seed=1)
    parameters = as_layer.parameters * 3  # pre-activations on both sides of every kink
    as_layer.parameters = parameters
    in_dense.parameters = parameters
    assert as_layer.layers[1].activation == in_dense.layers[0].activation
    np.testing.assert_allclose(as_layer.predict(X), in_dense.predict(X), rtol=1e-14)
    loss_a = as_layer.compute_gradients(X, y, "mse")
    loss_b = in_dense.compute_gradients(X, y, "mse")
    assert loss_a == pytest.approx(loss_b, rel=1e-14)
    np.testing.assert_allclose(as_layer.gradients, in_dense.gradients, rtol=1e-12, atol=1e-15)


def test_activation_with_a_function_is_the_custom_activation_shorthand():
    act = bp.Activation(np.tanh, tanh_derivative, name="my_tanh", check_gradient=False)
    assert type(act) is bp.CustomActivation
    assert not isinstance(act, bp.Activation)
    assert (act.fn, act.derivative, act.name, act.check_gradient) == (
        np.tanh, tanh_derivative, "my_tanh", False)
    layer = bp.Activation(act)  # a CustomActivation given: the layer applying it
    assert isinstance(layer, bp.Activation) and layer.activation is act
    assert repr(layer) == "Activation(CustomActivation('my_tanh'))"
    X, y = data(n=16)
    custom = bp.Network([bp.Dense(4, 6), bp.BatchNorm1d(6), layer, bp.Dense(6, 2)],
                        dtype="float64", seed=2)
    builtin = bp.Network([bp.Dense(4, 6), bp.BatchNorm1d(6), bp.Activation("tanh"),
                          bp.Dense(6, 2)], dtype="float64", seed=2)
    for net in (custom, builtin):
        net.train_step(X, y, "mse", bp.SGD(lr=0.1))
    np.testing.assert_allclose(custom.parameters, builtin.parameters, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(custom.predict(X), builtin.predict(X), rtol=1e-12, atol=1e-14)
    with pytest.raises(TypeError, match="takes two functions"):
        bp.Activation(np.tanh, "not a function")


def test_a_custom_activation_alone_in_the_layer_list_is_refused_naming_the_fix():
    act = bp.CustomActivation(np.tanh, tanh_derivative, name="t")
    dense = bp.Dense(3, 4)
    with pytest.raises(TypeError, match=r"layer 1 is CustomActivation\('t'\), an activation "
                                        r"function, not a layer.*bpfast\.Activation\(act\)"
                                        r".*activation=act"):
        bp.Network([dense, act, bp.Dense(4, 1)])
    assert dense._network is None  # nothing changed
    bp.Network([dense, bp.Activation(act), bp.Dense(4, 1)])


class Failing:
    """fn and derivative of tanh that raise while `fail` is set."""

    def __init__(self):
        self.fail = False

    def fn(self, z):
        if self.fail:
            raise FloatingPointError("user bug")
        return np.tanh(z)


def test_exception_in_a_custom_activation_after_dropout_changes_nothing():
    X, y = data(n=16)
    failing = Failing()

    def make(activation):
        return bp.Network([bp.Dense(4, 6), bp.Dropout(0.5), bp.Dense(6, 6, activation),
                           bp.BatchNorm1d(6), bp.Dense(6, 2)], dtype="float64", seed=4)

    net = make(bp.CustomActivation(failing.fn, tanh_derivative))
    twin = make("tanh")
    net_opt, twin_opt = bp.Adam(lr=0.01), bp.Adam(lr=0.01)
    net.train_step(X, y, "mse", net_opt)
    twin.train_step(X, y, "mse", twin_opt)
    parameters, buffers = net.parameters.copy(), net.buffers.copy()
    failing.fail = True
    for call in (lambda: net.train_step(X, y, "mse", net_opt),
                 lambda: net.fit(X, y, loss="mse", optimizer=net_opt, batch_size=8)):
        with pytest.raises(FloatingPointError, match="user bug"):
            call()
        np.testing.assert_array_equal(net.parameters, parameters)
        # the BatchNorm1d comes after the failing layer: its statistics did not move
        np.testing.assert_array_equal(net.buffers, buffers)
    failing.fail = False
    # Dropout's stream did not move on either: the next step is the twin's
    net.train_step(X, y, "mse", net_opt)
    twin.train_step(X, y, "mse", twin_opt)
    np.testing.assert_allclose(net.parameters, twin.parameters, rtol=1e-12, atol=1e-14)


def test_exception_in_a_custom_loss_does_not_move_the_dropout_stream():
    X, y = data(n=16)
    state = {"fail": False}

    def value(output, target):
        if state["fail"]:
            raise FloatingPointError("user bug")
        return squared_error(output, target)

    # (unchecked: the check would call value before the compiled step does)
    loss = bp.CustomLoss(value, squared_error_gradient, check_gradient=False)

    def make():
        return bp.Network([bp.Dense(4, 6, "relu"), bp.Dropout(0.5), bp.Dense(6, 2)],
                          dtype="float64", seed=4)

    net, twin = make(), make()
    state["fail"] = True
    with pytest.raises(FloatingPointError, match="user bug"):
        net.train_step(X, y, loss, "sgd")
    state["fail"] = False
    net.train_step(X, y, loss, bp.SGD(lr=0.1))
    twin.train_step(X, y, "mse", bp.SGD(lr=0.1))
    np.testing.assert_allclose(net.parameters, twin.parameters, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------- reduction="sum"
class SumOfSquares(bp.Loss):
    """Squared error per element, summed (the class attribute a user sets)."""

    reduction = "sum"

    def value(self, output, target):
        return squared_error(output, target)

    def gradient(self, output, target):
        return squared_error_gradient(output, target)


def per_sample_squares(output, target):
    return ((output - target) ** 2).sum(axis=1)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("make_loss", [
    lambda: bp.CustomLoss(squared_error, squared_error_gradient, reduction="sum"),
    lambda: bp.CustomLoss(per_sample_squares, squared_error_gradient, reduction="sum"),
    SumOfSquares])
def test_custom_loss_with_sum_reduction_is_the_builtin_sum(make_loss, dtype):
    X, y = data(n=30)
    weights = np.random.default_rng(5).uniform(0.2, 2.0, 30)
    loss, builtin = make_loss(), bp.MSE(reduction="sum")
    assert loss.reduction == "sum"
    tolerance = 1e-12 if dtype == "float64" else 1e-5
    nets = [bp.Network([bp.Dense(4, 5, "tanh"), bp.LayerNorm(5), bp.Dense(5, 2)],
                       dtype=dtype, seed=3) for _ in range(2)]
    values = [net.compute_gradients(X, y, which, sample_weight=weights)
              for net, which in zip(nets, (loss, builtin))]
    assert values[0] == pytest.approx(values[1], rel=tolerance)
    np.testing.assert_allclose(nets[0].gradients, nets[1].gradients, rtol=tolerance * 10,
                               atol=tolerance)
    out = nets[0].predict(X)
    assert loss(out, y, weights) == pytest.approx(builtin(out, y, weights), rel=tolerance)
    assert loss(out, y) == pytest.approx(float(((out - y) ** 2).sum()), rel=tolerance)
    histories = [net.fit(X, y, loss=which, optimizer=bp.SGD(lr=0.001), epochs=2,
                         batch_size=8, shuffle=False)
                 for net, which in zip(nets, (loss, builtin))]
    np.testing.assert_allclose(histories[0].history["loss"], histories[1].history["loss"],
                               rtol=tolerance)
    np.testing.assert_allclose(nets[0].parameters, nets[1].parameters, rtol=tolerance * 10,
                               atol=tolerance)


def test_custom_loss_reduction_is_checked():
    with pytest.raises(ValueError, match="reduction"):
        bp.CustomLoss(squared_error, squared_error_gradient, reduction="max")

    class Bad(SumOfSquares):
        reduction = "none"

    with pytest.raises(ValueError, match="reduction"):
        bp.Network([bp.Dense(2, 1)]).compute_gradients(np.zeros((3, 2)), np.zeros(3), Bad())


# --------------------------------------------------------------------------- explain
@pytest.mark.parametrize("loss", [
    "mse", bp.CustomLoss(squared_error, squared_error_gradient, name="sq"),
    bp.CustomLoss(squared_error, squared_error_gradient, name="sq_sum", reduction="sum")])
def test_explain_takes_the_new_and_custom_activations_and_custom_losses(loss):
    X, y = data(n=3, n_in=2, n_out=1)
    my_tanh = bp.CustomActivation(np.tanh, tanh_derivative, name="my_tanh")
    net = bp.Network([bp.Dense(2, 3, "silu"), bp.Dense(3, 2, my_tanh), bp.Dense(2, 1)],
                     dtype="float64", seed=0)
    trace = bp.explain(net, X, y, loss, "sgd")
    assert trace.gradients_match_engine
    text = str(trace) + trace.to_markdown() + trace.to_dot()
    assert "silu'" in text and "my_tanh'" in text
