"""The textbook worked examples, reproduced with the public API."""
import numpy as np
import pytest

import bpfast as bp


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def tiny_network():
    """One input, a sigmoid hidden unit, a linear output, no biases, w1 = w2 = 0.5."""
    net = bp.Network([bp.Dense(1, 1, activation="sigmoid", bias=False),
                      bp.Dense(1, 1, bias=False)], dtype="float64")
    net.layers[0].weight[:] = 0.5
    net.layers[1].weight[:] = 0.5
    return net


# closed form for x = 1, t = 0, w1 = w2 = 0.5, half squared error, lr = 0.1
X, T, LR = np.array([[1.0]]), np.array([[0.0]]), 0.1
H = sigmoid(0.5)
OUT = 0.5 * H
LOSS = 0.5 * OUT ** 2
DW2 = OUT * H
DW1 = OUT * 0.5 * H * (1 - H) * 1.0
W1_NEW, W2_NEW = 0.5 - LR * DW1, 0.5 - LR * DW2
NEW_LOSS = 0.5 * (W2_NEW * sigmoid(W1_NEW)) ** 2
# the published walk-through, which rounded its intermediates
PUBLISHED = dict(hidden=0.6225, out=0.3112, loss=0.0484, dw2=0.1938, dw1=0.0365,
                 w2=0.4806, w1=0.4963, new_loss=0.0447)


def test_closed_form_matches_the_published_numbers():
    assert DW2 == pytest.approx(0.193728, abs=1e-6)
    assert DW1 == pytest.approx(0.036570, abs=1e-6)
    assert NEW_LOSS == pytest.approx(0.044628, abs=1e-6)


def check(net, hidden, out, loss_value, new_loss):
    exact = dict(hidden=H, out=OUT, loss=LOSS, dw2=DW2, dw1=DW1, w2=W2_NEW, w1=W1_NEW,
                 new_loss=NEW_LOSS)
    got = dict(hidden=hidden, out=out, loss=loss_value, dw1=net.layers[0].grad_weight[0, 0],
               dw2=net.layers[1].grad_weight[0, 0], w1=net.layers[0].weight[0, 0],
               w2=net.layers[1].weight[0, 0], new_loss=new_loss)
    for key in exact:
        assert got[key] == pytest.approx(exact[key], abs=1e-12), key
        # three published values are off in the 4th decimal because the text rounded
        assert got[key] == pytest.approx(PUBLISHED[key], abs=1.5e-4), key


def test_step_by_step_api():
    net, loss = tiny_network(), bp.MSE(half=True)
    out = net.forward(X)
    hidden = net._engine.layer_output(0)[0, 0]
    loss_value = loss(out, T)
    net.backward(loss.gradient(out, T))
    bp.SGD(lr=LR).step(net)
    check(net, hidden, out[0, 0], loss_value, loss(net.predict(X), T))


def test_train_step():
    net, loss = tiny_network(), bp.MSE(half=True)
    hidden = sigmoid(net.layers[0].weight[0, 0])
    out = net.predict(X)[0, 0]
    loss_value = net.train_step(X, T, loss, bp.SGD(lr=LR))
    check(net, hidden, out, loss_value, loss(net.predict(X), T))


# ---------------------------------------------------------------------------
# The classic deep-learning-course network: [n_in, 10, 20, 30, 2], sigmoid hidden
# layers, softmax output, cross-entropy, columns are samples.

def course_forward(params, X):
    """X: (n_in, m). Returns the caches A[0..L]."""
    A = [X]
    L = len(params)
    for l in range(L):
        W, b = params[l]
        Z = W @ A[-1] + b
        if l < L - 1:
            A.append(sigmoid(Z))
        else:
            E = np.exp(Z - Z.max(axis=0, keepdims=True))
            A.append(E / E.sum(axis=0, keepdims=True))
    return A


def course_backward(params, A, Y):
    """dZ = A - Y at the output, dW = dZ A_prev^T / m, db = mean of dZ."""
    m = Y.shape[1]
    grads = [None] * len(params)
    dZ = A[-1] - Y
    for l in range(len(params) - 1, -1, -1):
        W, _ = params[l]
        grads[l] = (dZ @ A[l].T / m, dZ.mean(axis=1, keepdims=True))
        if l > 0:
            dZ = (W.T @ dZ) * A[l] * (1 - A[l])
    return grads


def course_cost(AL, Y):
    return -np.sum(Y * np.log(AL)) / Y.shape[1]


@pytest.fixture
def course_problem():
    rng = np.random.default_rng(1)
    n_in, m = 5, 40
    X = rng.normal(size=(m, n_in))
    labels = (X[:, 0] + X[:, 1] ** 2 > 1).astype(int)
    sizes = [n_in, 10, 20, 30, 2]
    layers = [bp.Dense(sizes[i], sizes[i + 1], activation="sigmoid", init="normal")
              for i in range(3)] + [bp.Dense(30, 2, activation="softmax", init="normal")]
    net = bp.Network(layers, dtype="float64", seed=2)
    for layer in net.layers:  # the course's small random weights and zero biases
        layer.weight[:] = rng.normal(size=layer.weight.shape) * 0.5
    return net, X, labels


def params_of(net):
    return [(layer.weight.copy(), layer.bias.copy()[:, None]) for layer in net.layers]


def test_course_network_gradients(course_problem):
    net, X, labels = course_problem
    Y = np.eye(2)[labels].T
    params = params_of(net)
    A = course_forward(params, X.T)
    expected = course_backward(params, A, Y)
    value = net.compute_gradients(X, labels, bp.CrossEntropy(from_logits=False))
    assert value == pytest.approx(course_cost(A[-1], Y), rel=1e-12)
    for layer, (dW, db) in zip(net.layers, expected):
        np.testing.assert_allclose(layer.grad_weight, dW, rtol=1e-10, atol=1e-15)
        np.testing.assert_allclose(layer.grad_bias, db[:, 0], rtol=1e-10, atol=1e-15)


def test_course_network_training_run(course_problem):
    net, X, labels = course_problem
    Y = np.eye(2)[labels].T
    params = params_of(net)
    lr, costs = 0.5, []
    for _ in range(100):
        A = course_forward(params, X.T)
        costs.append(course_cost(A[-1], Y))
        grads = course_backward(params, A, Y)
        params = [(W - lr * dW, b - lr * db) for (W, b), (dW, db) in zip(params, grads)]
    history = net.fit(X, labels, loss=bp.CrossEntropy(from_logits=False),
                      optimizer=bp.SGD(lr=lr), epochs=100, batch_size=None, shuffle=False)
    np.testing.assert_allclose(history.history["loss"], costs, rtol=1e-9)
    for layer, (W, b) in zip(net.layers, params):
        np.testing.assert_allclose(layer.weight, W, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(layer.bias, b[:, 0], rtol=1e-9, atol=1e-12)
    assert costs[-1] < costs[0]
