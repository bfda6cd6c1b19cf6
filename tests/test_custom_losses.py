"""Custom losses written by users in NumPy (bpfast.Loss subclasses, bpfast.CustomLoss).

The oracles: central differences of the loss with respect to the parameters, and
the same loss written out in NumPy driving the network by forward/backward and an
optimizer's step (the path that never calls the compiled loss callback).
"""
import pickle

import numpy as np
import pytest
from central_differences import numerical_gradient, relative_error

import bpfast as bp

DTYPES = ["float32", "float64"]


# --------------------------------------------------------------------------- as users write them
class Pinball(bp.Loss):
    """The quantile (pinball) loss, per element."""

    def __init__(self, quantile=0.9):
        self.quantile = quantile

    def value(self, output, target):
        d = target - output
        return np.maximum(self.quantile * d, (self.quantile - 1) * d)

    def gradient(self, output, target):
        return np.where(target > output, -self.quantile, 1 - self.quantile)


class BinaryFocal(bp.Loss):
    """Binary focal loss on logits (Lin et al.), per element, hard 0/1 targets."""

    def __init__(self, gamma=2.0, alpha=0.25):
        self.gamma, self.alpha = gamma, alpha

    def _parts(self, output, target):
        sign = 2 * target - 1
        p_t = 1 / (1 + np.exp(-sign * output))
        alpha_t = np.where(target > 0.5, self.alpha, 1 - self.alpha)
        return sign, p_t, alpha_t

    def value(self, output, target):
        _, p_t, alpha_t = self._parts(output, target)
        return -alpha_t * (1 - p_t) ** self.gamma * np.log(p_t)

    def gradient(self, output, target):
        sign, p_t, alpha_t = self._parts(output, target)
        return sign * alpha_t * (1 - p_t) ** self.gamma * (
            self.gamma * p_t * np.log(p_t) - (1 - p_t))


def softmax_focal_value(output, target):
    """Multi-class focal loss (gamma 2) on logits, one-hot targets: one value per sample."""
    shifted = output - output.max(axis=1, keepdims=True)
    p = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    p_c = (p * target).sum(axis=1)
    return -(1 - p_c) ** 2 * np.log(p_c)


def softmax_focal_gradient(output, target):
    shifted = output - output.max(axis=1, keepdims=True)
    p = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
    p_c = (p * target).sum(axis=1, keepdims=True)
    return (target - p) * (2 * (1 - p_c) * p_c * np.log(p_c) - (1 - p_c) ** 2)


SoftmaxFocal = bp.CustomLoss(softmax_focal_value, softmax_focal_gradient, name="focal")


def regression_data(n=48, n_in=4, n_out=2, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, n_in))
    return X, X[:, :n_out] * 2 + 0.3 * rng.standard_normal((n, n_out))


def binary_data(n=48, n_in=4, n_out=3, seed=1):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, n_in))
    return X, (X[:, :n_out] + 0.5 * rng.standard_normal((n, n_out)) > 0).astype(float)


def onehot_data(n=48, n_in=4, k=3, seed=2):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, n_in))
    return X, np.eye(k)[rng.integers(0, k, n)]


CASES = {
    "pinball": (lambda: Pinball(0.8), regression_data),
    "binary_focal": (lambda: BinaryFocal(), binary_data),
    "softmax_focal": (lambda: SoftmaxFocal, onehot_data),
}


def make_net(n_in, n_out, dtype, seed=3):
    return bp.Network([bp.Dense(n_in, 6, "tanh"), bp.Dense(6, n_out)], dtype=dtype, seed=seed)


def numpy_mean_loss(loss, output, target, weights=None):
    """The reduction bpfast documents, written out: (mean loss, dL/doutput)."""
    values = np.asarray(loss.value(output, target), dtype=np.float64)
    gradient = np.asarray(loss.gradient(output, target), dtype=np.float64)
    n, k = output.shape
    w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    per_element = values.ndim == 2
    rows = values.sum(axis=1) if per_element else values
    denominator = w.sum() * (k if per_element else 1)
    return (w * rows).sum() / denominator, gradient * (w / denominator)[:, None]


# --------------------------------------------------------------------------- gradients
@pytest.mark.parametrize("case", CASES)
def test_parameter_gradients_match_central_differences(case):
    make_loss, data = CASES[case]
    loss = make_loss()
    X, y = data()
    net = make_net(X.shape[1], y.shape[1], "float64")
    value = net.compute_gradients(X, y, loss)
    assert value == pytest.approx(loss(net.predict(X), y), rel=1e-12)
    expected = numerical_gradient(lambda: loss(net.predict(X), y), net.parameters)
    assert relative_error(net.gradients, expected) < 1e-7


@pytest.mark.parametrize("case", CASES)
def test_loss_gradient_matches_central_differences_of_its_value(case):
    """The user's own gradient, through bpfast's reduction: Loss.__call__ is the mean."""
    make_loss, data = CASES[case]
    loss = make_loss()
    X, y = data()
    output = make_net(X.shape[1], y.shape[1], "float64").predict(X)
    _, mean_gradient = numpy_mean_loss(loss, output, y)
    expected = numerical_gradient(lambda: loss(output, y), output.reshape(-1)).reshape(
        output.shape)
    assert relative_error(mean_gradient, expected) < 1e-7


# --------------------------------------------------------------------------- trajectories
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("weighted", [False, True])
def test_train_step_trajectory_matches_numpy_loss_driving_forward_backward(case, dtype,
                                                                           weighted):
    make_loss, data = CASES[case]
    loss = make_loss()
    X, y = data()
    weights = np.random.default_rng(7).uniform(0.2, 2.0, X.shape[0]) if weighted else None
    compiled = make_net(X.shape[1], y.shape[1], dtype)
    by_hand = make_net(X.shape[1], y.shape[1], dtype)
    opt_compiled, opt_by_hand = bp.Adam(lr=0.01), bp.Adam(lr=0.01)
    tolerance = 1e-10 if dtype == "float64" else 2e-4
    for _ in range(15):
        value = compiled.train_step(X, y, loss, opt_compiled, sample_weight=weights)
        output = by_hand.forward(X).astype(np.float64)
        expected, grad_output = numpy_mean_loss(loss, output, y, weights)
        by_hand.backward(grad_output)
        opt_by_hand.step(by_hand)
        assert value == pytest.approx(expected, rel=tolerance, abs=tolerance)
    np.testing.assert_allclose(compiled.parameters, by_hand.parameters, rtol=tolerance * 10,
                               atol=tolerance * 10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fit_trajectory_matches_numpy_loss_in_batches(dtype):
    """fit's compiled epoch loop (consecutive batches of 16, SGD) against NumPy."""
    X, y = regression_data(n=64)
    loss = Pinball(0.3)
    compiled = make_net(4, 2, dtype)
    by_hand = make_net(4, 2, dtype)
    history = compiled.fit(X, y, loss=loss, optimizer=bp.SGD(lr=0.05), epochs=3,
                           batch_size=16, shuffle=False)
    opt = bp.SGD(lr=0.05)
    for epoch in range(3):
        losses = []
        for begin in range(0, 64, 16):
            output = by_hand.forward(X[begin:begin + 16]).astype(np.float64)
            value, grad_output = numpy_mean_loss(loss, output, y[begin:begin + 16])
            by_hand.backward(grad_output)
            opt.step(by_hand)
            losses.append(value)
        tolerance = 1e-10 if dtype == "float64" else 1e-4
        assert history.history["loss"][epoch] == pytest.approx(np.mean(losses), rel=tolerance)
    np.testing.assert_allclose(compiled.parameters, by_hand.parameters,
                               rtol=1e-9 if dtype == "float64" else 1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mse_written_in_numpy_trains_as_the_builtin_mse(dtype):
    X, y = regression_data()
    mse = bp.CustomLoss(lambda out, t: (out - t) ** 2, lambda out, t: 2 * (out - t))
    custom, builtin = make_net(4, 2, dtype), make_net(4, 2, dtype)
    h1 = custom.fit(X, y, loss=mse, optimizer="adam", epochs=3, batch_size=8)
    h2 = builtin.fit(X, y, loss="mse", optimizer="adam", epochs=3, batch_size=8)
    tolerance = 1e-12 if dtype == "float64" else 1e-5
    np.testing.assert_allclose(h1.history["loss"], h2.history["loss"], rtol=tolerance)
    np.testing.assert_allclose(custom.parameters, builtin.parameters, rtol=tolerance * 10,
                               atol=tolerance)
    assert custom.evaluate(X, y, loss=mse)["loss"] == pytest.approx(
        builtin.evaluate(X, y, loss="mse")["loss"], rel=tolerance)


def test_validation_loss_uses_the_custom_loss():
    X, y = regression_data()
    net = make_net(4, 2, "float64")
    loss = Pinball(0.7)
    history = net.fit(X[:40], y[:40], loss=loss, optimizer="adam", epochs=2,
                      validation_data=(X[40:], y[40:]))
    assert history.history["val_loss"][-1] == pytest.approx(loss(net.predict(X[40:]), y[40:]))


# --------------------------------------------------------------------------- the check
def test_wrong_gradient_is_refused_naming_the_worst_element_before_any_change():
    X, y = regression_data()
    net = make_net(4, 2, "float64")
    wrong = bp.CustomLoss(lambda out, t: (out - t) ** 2, lambda out, t: out - t)  # 2x off
    before = net.parameters.copy()
    with pytest.raises(ValueError, match=r"gradient does not match central differences.*"
                                         r"worst at output\[\d+, \d+\].*check_gradient=False"):
        net.fit(X, y, loss=wrong, optimizer="adam")
    with pytest.raises(ValueError, match="does not match"):
        net.train_step(X, y, wrong, "sgd")
    np.testing.assert_array_equal(net.parameters, before)
    # the worst element: where |out - t| (the error of the halved gradient) is largest
    output = net.predict(X[:16])
    row, column = np.unravel_index(np.argmax(np.abs(output - y[:16])), output.shape)
    with pytest.raises(ValueError, match=rf"output\[{row}, {column}\]"):
        net.compute_gradients(X, y, wrong)
    wrong.check_gradient = False
    net.compute_gradients(X, y, wrong)  # trusted


def test_gradient_is_checked_once_and_kinks_are_skipped():
    calls = []

    def l1_value(out, t):
        calls.append(1)
        return np.abs(out - t)

    loss = bp.CustomLoss(l1_value, lambda out, t: np.sign(out - t))
    X, y = regression_data()
    net = make_net(4, 2, "float64")
    y = y.copy()
    y[:4] = net.predict(X[:4])  # exact kinks in the first rows: skipped, not failed
    net.train_step(X, y, loss, "sgd")
    checked = len(calls)
    net.train_step(X, y, loss, "sgd")
    assert len(calls) == checked + 1  # one call per step once checked


def test_exception_from_the_user_function_propagates_and_changes_nothing():
    X, y = regression_data()
    net = make_net(4, 2, "float64")
    opt = bp.Adam(lr=0.01)
    fail = {"on": False}

    def value(out, t):
        if fail["on"]:
            raise ArithmeticError("user bug")
        return (out - t) ** 2

    loss = bp.CustomLoss(value, lambda out, t: 2 * (out - t))
    net.train_step(X, y, loss, opt)
    parameters, gradients = net.parameters.copy(), net.gradients.copy()
    state, steps = opt.state["exp_avg"].copy(), opt.step_count
    fail["on"] = True
    for call in (lambda: net.train_step(X, y, loss, opt),
                 lambda: net.compute_gradients(X, y, loss),
                 lambda: net.fit(X, y, loss=loss, optimizer=opt, epochs=2),
                 lambda: net.evaluate(X, y, loss=loss)):
        with pytest.raises(ArithmeticError, match="user bug"):
            call()
        np.testing.assert_array_equal(net.parameters, parameters)
        np.testing.assert_array_equal(net.gradients, gradients)
        np.testing.assert_array_equal(opt.state["exp_avg"], state)
        assert opt.step_count == steps
    fail["on"] = False
    net.train_step(X, y, loss, opt)  # the network still works
    assert opt.step_count == steps + 1


@pytest.mark.parametrize("returned, error, match", [
    (lambda out, t: np.zeros((out.shape[0] + 1,)), ValueError, r"value returned shape"),
    (lambda out, t: np.zeros(3), ValueError, r"value returned shape"),
    (lambda out, t: "text", TypeError, r"value must return an array of real numbers"),
])
def test_bad_value_shapes_are_clear_errors(returned, error, match):
    X, y = regression_data()
    net = make_net(4, 2, "float64")
    loss = bp.CustomLoss(returned, lambda out, t: out - t, check_gradient=False)
    before = net.parameters.copy()
    with pytest.raises(error, match=match):
        net.train_step(X, y, loss, "sgd")
    np.testing.assert_array_equal(net.parameters, before)


def test_bad_gradient_shape_is_a_clear_error():
    X, y = regression_data()
    net = make_net(4, 2, "float32")
    loss = bp.CustomLoss(lambda out, t: (out - t) ** 2, lambda out, t: (out - t)[:, :1],
                         check_gradient=False)
    with pytest.raises(ValueError, match=r"gradient returned shape \(48, 1\), expected "
                                         r"\(48, 2\)"):
        net.train_step(X, y, loss, "sgd")


def test_a_subclass_must_define_both_functions():
    class OnlyValue(bp.Loss):
        def value(self, output, target):
            return output

    class Nothing(bp.Loss):
        pass

    with pytest.raises(TypeError, match="defines value but not gradient"):
        OnlyValue()._config  # noqa: B018
    with pytest.raises(TypeError, match="must define value"):
        Nothing()
    with pytest.raises(TypeError, match="two functions"):
        bp.CustomLoss(np.abs, None)


def test_views_handed_to_the_user_are_read_only():
    def value(out, t):
        out[...] = 0
        return out

    X, y = regression_data()
    with pytest.raises(ValueError, match="read-only"):
        make_net(4, 2, "float64").train_step(X, y, bp.CustomLoss(value, value,
                                                                 check_gradient=False), "sgd")


def test_the_output_view_is_made_once_not_per_step():
    """The compiled step hands the same view object of its output buffer each batch."""
    seen = []

    def value(out, t):
        seen.append(out)  # kept alive, so that an id cannot be reused by a new view
        return (out - t) ** 2

    X, y = regression_data()
    net = make_net(4, 2, "float32")
    loss = bp.CustomLoss(value, lambda out, t: 2 * (out - t), check_gradient=False)
    for _ in range(3):
        net.train_step(X, y, loss, "sgd")
    assert seen[0] is seen[1] is seen[2]
    assert not seen[0].flags.writeable and not seen[0].flags.owndata


# --------------------------------------------------------------------------- elsewhere
def test_custom_loss_pickles_and_copies():
    loss = Pinball(0.25)
    again = pickle.loads(pickle.dumps(loss))
    assert isinstance(again, Pinball) and again.quantile == 0.25
    out, target = np.array([[1.0, -1.0]]), np.array([[0.0, 0.0]])
    assert again(out, target) == loss(out, target) == pytest.approx(0.5 * (0.75 + 0.25))


def test_sklearn_regressor_takes_a_custom_loss():
    """Half the squared error written in NumPy trains MLPRegressor exactly as its own
    "squared_error" (one output: the same objective, the same steps)."""
    pytest.importorskip("sklearn")
    from bpfast.sklearn import MLPRegressor
    X, y = regression_data(n=80, n_out=1)
    y = y.ravel()
    half_squares = bp.CustomLoss(lambda out, t: 0.5 * (out - t) ** 2, lambda out, t: out - t)
    options = {"hidden_layer_sizes": (8,), "max_iter": 5, "random_state": 0,
               "dtype": "float64", "tol": 0.0}
    with pytest.warns(UserWarning):  # ConvergenceWarning: 5 iterations only
        custom = MLPRegressor(loss=half_squares, **options).fit(X, y)
    with pytest.warns(UserWarning):
        builtin = MLPRegressor(**options).fit(X, y)
    np.testing.assert_allclose(custom.loss_curve_, builtin.loss_curve_, rtol=1e-12)
    for a, b in zip(custom.coefs_, builtin.coefs_):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)
    with pytest.warns(UserWarning):
        pinball = MLPRegressor(loss=Pinball(0.9), solver="lbfgs", **options).fit(X, y)
    # lbfgs's objective: the pinball loss plus scikit-learn's penalty (alpha 1e-4)
    assert pinball.loss_ == pytest.approx(
        Pinball(0.9)(pinball.network_.predict(X), y.reshape(-1, 1)) + 0.5 * 1e-4 * sum(
            (w ** 2).sum() for w in pinball.coefs_) / len(X), rel=1e-9)
    with pytest.raises(ValueError, match="squared_error"):
        MLPRegressor(loss="hinge").fit(X, y)
