"""Data sets and small helpers shared by test_training.py, test_callbacks.py and
test_schedules.py: scikit-learn's digits, breast cancer and diabetes sets, scaled."""
import contextlib
import functools

import numpy as np

import bpfast as bp


def _standardize(X):
    X = np.asarray(X, dtype=np.float64)
    std = X.std(axis=0)
    std[std == 0] = 1.0
    return np.ascontiguousarray((X - X.mean(axis=0)) / std)


@functools.cache
def _digits():
    from sklearn.datasets import load_digits
    X, y = load_digits(return_X_y=True)
    return np.ascontiguousarray(X / 16.0), y.astype(np.intp)


@functools.cache
def _cancer():
    from sklearn.datasets import load_breast_cancer
    X, y = load_breast_cancer(return_X_y=True)
    return _standardize(X), y.astype(np.intp)


@functools.cache
def _diabetes():
    from sklearn.datasets import load_diabetes
    X, y = load_diabetes(return_X_y=True)
    return _standardize(X), (y - y.mean()) / y.std()


def digits():
    """(X (1797, 64) in [0, 1], labels (1797,) in 0..9): fresh copies."""
    X, y = _digits()
    return X.copy(), y.copy()


def cancer():
    """(X (569, 30) standardized, labels (569,) in {0, 1}): fresh copies."""
    X, y = _cancer()
    return X.copy(), y.copy()


def diabetes():
    """(X (442, 10) standardized, y (442,) standardized): fresh copies."""
    X, y = _diabetes()
    return X.copy(), y.copy()


def mlp(sizes, activation="tanh", dtype="float64", seed=0, bias=True, output=None):
    """A Network of Dense layers with the given widths."""
    layers = []
    for i in range(len(sizes) - 1):
        last = i == len(sizes) - 2
        layers.append(bp.Dense(sizes[i], sizes[i + 1],
                               activation=output if last else activation, bias=bias))
    return bp.Network(layers, dtype=dtype, seed=seed)


def twins(sizes, **kwargs):
    """Two identical networks (same seed): one to test, one to replay by hand."""
    return mlp(sizes, **kwargs), mlp(sizes, **kwargs)


def batches(n, batch_size):
    """The row slices fit(shuffle=False) visits, in order."""
    return [slice(b, min(n, b + batch_size)) for b in range(0, n, batch_size)]


def snapshot(net, opt=None):
    """Everything a refused call must leave as it was."""
    state = None if opt is None else {k: v.copy() for k, v in opt.state.items()}
    return (net.parameters.copy(), net.gradients.copy(), net.epochs_trained, net.history,
            repr(net._rng.bit_generator.state),
            None if opt is None else (opt.step_count, opt.lr, state))


def assert_same_snapshot(before, after):
    np.testing.assert_array_equal(after[0], before[0])
    np.testing.assert_array_equal(after[1], before[1])
    assert after[2:5] == before[2:5]
    if before[5] is not None:
        assert after[5][:2] == before[5][:2]
        assert after[5][2].keys() == before[5][2].keys()
        for key in before[5][2]:
            np.testing.assert_array_equal(after[5][2][key], before[5][2][key])


@contextlib.contextmanager
def unchanged(net, opt=None):
    before = snapshot(net, opt)
    yield
    assert_same_snapshot(before, snapshot(net, opt))


class Recorder(bp.callbacks.Callback):
    """Records every hook call (and the parameters after each epoch)."""

    def __init__(self, wants_batches=False, keep_parameters=False):
        self.wants_batches = wants_batches
        self.keep_parameters = keep_parameters
        self.events = []
        self.parameters = {}
        self.epoch_logs = {}
        self.lr_at_begin = {}
        self.batch_logs = []

    def on_train_begin(self, logs):
        self.events.append(("train_begin", None))
        self.train_begin_logs = dict(logs)

    def on_epoch_begin(self, epoch, logs):
        self.events.append(("epoch_begin", epoch))
        self.lr_at_begin[epoch] = self.optimizer.lr

    def on_batch_end(self, batch, logs):
        self.events.append(("batch_end", batch))
        self.batch_logs.append(dict(logs))

    def on_epoch_end(self, epoch, logs):
        self.events.append(("epoch_end", epoch))
        self.epoch_logs[epoch] = dict(logs)
        if self.keep_parameters:
            self.parameters[epoch] = self.network.parameters.copy()

    def on_train_end(self, logs):
        self.events.append(("train_end", None))
        self.train_end_logs = dict(logs)


def network_calls(loss, fit_epochs):
    """The Network entry points that take X (and y, where they train), by name, each as
    ``call(net, opt, X, y)``: what a table of bad inputs runs through all of them."""
    return {
        "forward": lambda net, opt, X, y: net.forward(X),
        "predict": lambda net, opt, X, y: net.predict(X),
        "compute_gradients": lambda net, opt, X, y: net.compute_gradients(X, y, loss),
        "train_step": lambda net, opt, X, y: net.train_step(X, y, loss, opt),
        "fit": lambda net, opt, X, y: net.fit(X, y, loss=loss, optimizer=opt,
                                              epochs=fit_epochs, batch_size=4, shuffle=True),
    }
