"""bpfast: train_step, fit (plain, and with validation and a callback) and predict."""
import itertools

from common import import_bpfast

LIBRARIES = {"bpfast": import_bpfast}


def network(p):
    """A float32 network of p's widths, ReLU hidden layers, starting from p's weights."""
    bp = import_bpfast()
    w = p.widths
    layers = [bp.Dense(i, o, activation="relu") for i, o in zip(w[:-2], w[1:-1])]
    layers.append(bp.Dense(w[-2], w[-1]))
    net = bp.Network(layers, dtype="float32", seed=0)
    for layer, W, b in zip(net.layers, p.weights, p.biases):
        layer.weight[...] = W
        layer.bias[...] = b
    return net


def optimizer(opt):
    bp = import_bpfast()
    return bp.SGD(lr=0.01, momentum=0.9) if opt == "sgd" else bp.Adam(lr=1e-3)


def train_step(p, opt):
    bp = import_bpfast()
    net, loss, optim = network(p), bp.CrossEntropy(), optimizer(opt)
    batches = itertools.cycle(p.batches)

    def step():
        X, y = next(batches)
        return net.train_step(X, y, loss, optim)
    return step, 1


def fit(p, opt):
    bp = import_bpfast()
    net, loss, optim = network(p), bp.CrossEntropy(), optimizer(opt)

    def epoch():
        return net.fit(p.X, p.y, loss=loss, optimizer=optim, epochs=1,
                       batch_size=p.batch, shuffle=True)
    return epoch, p.n_batches


def fit_validated(p, opt):
    """fit as above, plus a validation set of a tenth of the data and EarlyStopping."""
    bp = import_bpfast()
    net, loss, optim = network(p), bp.CrossEntropy(), optimizer(opt)
    n_val = max(1, p.X.shape[0] // 10)
    validation = (p.X[:n_val], p.y[:n_val])
    stopper = bp.callbacks.EarlyStopping("val_loss", patience=10**9)

    def epoch():
        return net.fit(p.X, p.y, loss=loss, optimizer=optim, epochs=1,
                       batch_size=p.batch, shuffle=True, validation_data=validation,
                       callbacks=[stopper])
    return epoch, p.n_batches


def predict(p, n):
    import numpy as np
    net = network(p)
    X = np.ascontiguousarray(p.X[:n])
    return lambda: net.predict(X)


TRAIN = {"bpfast": train_step, "bpfast_fit": fit, "bpfast_fit_val": fit_validated}
PREDICT = {"bpfast": predict}
