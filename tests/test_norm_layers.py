"""Dropout, BatchNorm1d, LayerNorm (and Activation): against the NumPy oracle
(tests/oracle.py) always, and against torch.nn when PyTorch is installed; float64.

Dropout's masks: the oracle transcribes bpfast's counter-based stream
(oracle.dropout_scale), and PyTorch gets the same mask as a fixed factor (its own
generator differs), so whole trajectories with dropout compare exactly.
"""
import copy
import pickle

import numpy as np
import oracle as ref
import pytest
from central_differences import numerical_gradient, relative_error
from oracle_checks import assert_close
from training_data import digits

import bpfast as bp
from bpfast._compiled import core as _core

RTOL = 1e-10


# --------------------------------------------------------------------------- helpers
def randomize(net, rng):
    """Give the normalisation layers' affine parameters and running statistics values
    other than their defaults, so that every term of the formulas shows."""
    for layer in net.layers:
        if getattr(layer, "weight", None) is not None and not isinstance(layer, bp.Dense):
            layer.weight[...] = rng.uniform(0.5, 1.5, layer.weight.shape)
        if getattr(layer, "bias", None) is not None and not isinstance(layer, bp.Dense):
            layer.bias[...] = rng.normal(0, 0.5, layer.bias.shape)
        if getattr(layer, "running_mean", None) is not None:
            layer.running_mean[...] = rng.normal(0, 0.3, layer.running_mean.shape)
            layer.running_var[...] = rng.uniform(0.5, 2.0, layer.running_var.shape)
    return net


def mixed(n_in=6, width=8, n_out=3, *, momentum=0.1, p=0.3, track=True, affine=True,
          dtype="float64", seed=0):
    """Dense, BatchNorm1d, relu, LayerNorm, Dropout, Dense, tanh, BatchNorm1d, Dense."""
    return bp.Network([
        # no bias before a BatchNorm1d (it would cancel): its gradient would be rounding
        # noise, which Adam scales up to whole steps
        bp.Dense(n_in, width, bias=False), bp.BatchNorm1d(width, momentum=momentum,
                                              track_running_stats=track, affine=affine),
        bp.Activation("relu"), bp.LayerNorm(width, elementwise_affine=affine),
        bp.Dropout(p), bp.Dense(width, width, "tanh"),
        bp.BatchNorm1d(width, momentum=momentum, eps=1e-3), bp.Dense(width, n_out)],
        dtype=dtype, seed=seed)


def oracle_layers(net):
    """The network as oracle.sequential_forward takes it (copies of its arrays)."""
    layers = []
    for index, layer in enumerate(net.layers):
        if isinstance(layer, bp.Dense):
            spec = {"kind": "dense", "weight": layer.weight.copy(),
                    "bias": None if layer.bias is None else layer.bias.copy(),
                    "activation": (layer.activation, layer.activation_param)}
        elif isinstance(layer, bp.Activation):
            spec = {"kind": "activation",
                    "activation": (layer.activation, layer.activation_param)}
        elif isinstance(layer, bp.Dropout):
            spec = {"kind": "dropout", "p": layer.p, "index": index, "scale": None}
        else:
            spec = {"kind": layer.kind, "eps": layer.eps,
                    "weight": None if layer.weight is None else layer.weight.copy(),
                    "bias": None if layer.bias is None else layer.bias.copy()}
            if isinstance(layer, bp.BatchNorm1d):
                spec["momentum"] = layer.momentum
                tracked = layer.track_running_stats
                spec["running_mean"] = layer.running_mean.copy() if tracked else None
                spec["running_var"] = layer.running_var.copy() if tracked else None
                spec["num_batches_tracked"] = float(layer.num_batches_tracked) \
                    if tracked else 0.0
        layers.append(spec)
    return layers


def prepare(layers, net, n_rows, counter=None):
    """Give each Dropout of the oracle's layers the factors of the network's training
    pass number `counter` (default: its next pass) on n_rows rows."""
    key, current = net._engine.stream
    for spec, layer in zip(layers, net.layers):
        if spec["kind"] == "dropout":
            spec["scale"] = None if spec["p"] == 0 else ref.dropout_scale(
                key, current if counter is None else counter, spec["index"],
                (n_rows, layer.out_features), spec["p"])


def flat(net, grads):
    """Per-layer oracle gradients in bpfast's flat layout (weight, then bias)."""
    parts = []
    for layer, grad in zip(net.layers, grads):
        for name in ("weight", "bias"):
            if getattr(layer, name, None) is not None:
                parts.append(np.ravel(grad[name]))
    return np.concatenate(parts)


def unflat(net, values, layers):
    """Write flat parameter values (bpfast's layout) into the oracle's layer dicts."""
    offset = 0
    for layer, spec in zip(net.layers, layers):
        for name in ("weight", "bias"):
            array = getattr(layer, name, None)
            if array is not None:
                spec[name] = values[offset:offset + array.size].reshape(array.shape).copy()
                offset += array.size


def running(net):
    return [(layer.running_mean.copy(), layer.running_var.copy(),
             float(layer.num_batches_tracked)) for layer in net.layers
            if isinstance(layer, bp.BatchNorm1d) and layer.track_running_stats]


def oracle_running(layers):
    return [(spec["running_mean"], spec["running_var"], spec["num_batches_tracked"])
            for spec in layers if spec["kind"] == "batch_norm1d"
            and spec["running_mean"] is not None]


def assert_running_close(got, expected, rtol):
    assert len(got) == len(expected)
    for (mean, var, count), (mean_ref, var_ref, count_ref) in zip(got, expected):
        assert_close(mean, mean_ref, rtol)
        assert_close(var, var_ref, rtol)
        assert count == count_ref


NETWORKS = {
    "mixed": lambda: mixed(),
    "momentum_none": lambda: mixed(momentum=None),
    "untracked": lambda: mixed(track=False),
    "no_affine": lambda: mixed(affine=False, p=0.5),
    "norm_first": lambda: bp.Network([
        bp.BatchNorm1d(6), bp.Dense(6, 5, "relu"), bp.LayerNorm(5, bias=False),
        bp.Dropout(0.2), bp.Dense(5, 3)], dtype="float64", seed=3),
    "dropout_first": lambda: bp.Network([
        bp.Dropout(0.4), bp.Dense(6, 7, "elu"), bp.BatchNorm1d(7, affine=False),
        bp.Dense(7, 3)], dtype="float64", seed=4),
}


# --------------------------------------------------------------------------- vs oracle
@pytest.mark.parametrize("name", sorted(NETWORKS))
@pytest.mark.parametrize("training", [True, False])
def test_forward_and_backward_match_the_oracle(name, training):
    rng = np.random.default_rng(1)
    net = randomize(NETWORKS[name](), rng)
    X = rng.normal(0, 2, (9, net.n_inputs))
    G = rng.normal(size=(9, net.n_outputs))
    layers = oracle_layers(net)
    prepare(layers, net, 9)
    expected, caches = ref.sequential_forward(layers, X, training)
    out = net.forward(X, training=training)
    assert_close(out, expected, RTOL)
    grad_x = net.backward(G)
    grads, grad_x_ref = ref.sequential_backward(layers, caches, G)
    assert_close(net.gradients, flat(net, grads), RTOL)
    assert_close(grad_x, grad_x_ref, RTOL)
    assert_running_close(running(net), oracle_running(layers), 1e-14)
    assert_close(net.predict(X), ref.sequential_forward(oracle_layers(net), X, False)[0],
                 RTOL)


def test_compute_gradients_is_the_training_mode_pass_with_l2_on_norm_weights():
    """compute_gradients: forward in training mode, loss, backward; l2 adds l2 * weight
    to Dense and normalisation weights (not to biases), as the docs say."""
    rng = np.random.default_rng(2)
    net = randomize(mixed(), rng)
    X, y = rng.normal(size=(10, 6)), rng.integers(0, 3, 10)
    layers = oracle_layers(net)
    prepare(layers, net, 10)
    params = net.parameters.copy()
    loss = net.compute_gradients(X, y, "cross_entropy", l2=0.1)
    out, caches = ref.sequential_forward(layers, X, True)
    target = np.eye(3)[y]
    grads, _ = ref.sequential_backward(
        layers, caches, ref.loss_gradient("cross_entropy", out, target))
    penalty = np.zeros_like(params)
    offset = 0
    for layer in net.layers:
        if getattr(layer, "weight", None) is not None:
            penalty[offset:offset + layer.weight.size] = 0.1 * layer.weight.ravel()
        offset += layer.n_parameters
    assert_close(net.gradients, flat(net, grads) + penalty, RTOL)
    weights = penalty / 0.1
    assert loss == pytest.approx(ref.loss_forward("cross_entropy", out, target)
                                 + 0.05 * (weights ** 2).sum(), rel=1e-12)


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("batch", [2, 7, 32])
def test_running_statistics_after_20_steps(momentum, batch):
    rng = np.random.default_rng(5)
    net = randomize(mixed(momentum=momentum, p=0.0), rng)
    layers = oracle_layers(net)
    for _ in range(20):
        X = rng.normal(1.0, 3.0, (batch, 6))
        net.forward(X)
        prepare(layers, net, batch)
        ref.sequential_forward(layers, X, True)
    assert_running_close(running(net), oracle_running(layers), 1e-12)
    assert running(net)[0][2] == 20


def _oracle_trajectory(net, optimizer, X, y, batch, steps):
    layers = oracle_layers(net)
    params = net.parameters.copy()
    losses = []
    for step in range(steps):
        rows = slice((step * batch) % (len(X) - batch + 1), None)
        xb, yb = X[rows][:batch], y[rows][:batch]
        unflat(net, params, layers)
        prepare(layers, net, batch, counter=step)
        out, caches = ref.sequential_forward(layers, xb, True)
        target = np.eye(out.shape[1])[yb]
        losses.append(ref.loss_forward("cross_entropy", out, target))
        grads, _ = ref.sequential_backward(
            layers, caches, ref.loss_gradient("cross_entropy", out, target))
        optimizer.step(params, flat(net, grads))
    return losses, params, oracle_running(layers)


OPTIMIZERS = {
    "sgd": (lambda: bp.SGD(lr=0.05, momentum=0.9),
            lambda: ref.SGD(lr=0.05, momentum=0.9)),
    "adam": (lambda: bp.Adam(lr=0.01), lambda: ref.Adam(lr=0.01)),
}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("width,batch,momentum", [(4, 2, 0.1), (16, 8, None), (33, 16, 0.3)])
def test_50_step_trajectories_match_the_oracle(optimizer, width, batch, momentum):
    rng = np.random.default_rng(width)
    net = randomize(mixed(width=width, momentum=momentum, p=0.25, seed=width), rng)
    X, y = rng.normal(size=(64, 6)), rng.integers(0, 3, 64)
    losses_ref, params_ref, running_ref = _oracle_trajectory(
        net, OPTIMIZERS[optimizer][1](), X, y, batch, 50)
    opt = OPTIMIZERS[optimizer][0]()
    losses = []
    for step in range(50):
        rows = slice((step * batch) % (len(X) - batch + 1), None)
        losses.append(net.train_step(X[rows][:batch], y[rows][:batch], "cross_entropy", opt))
    assert_close(losses, losses_ref, 1e-9)
    assert_close(net.parameters, params_ref, 1e-9)
    assert_running_close(running(net), running_ref, 1e-9)


# --------------------------------------------------------------------------- vs torch
@pytest.fixture(autouse=True, scope="module")
def _torch_on_one_thread():
    """Tiny models: PyTorch's threads only cost here (and the machine may be shared)."""
    try:
        import torch
    except ImportError:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def torch_model(net, scales=None):
    """nn.Sequential of net (same parameters and buffers); Dropout as nn.Dropout when
    scales is None (use with p=0 or eval), else multiplying by scales[index]."""
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Mask(nn.Module):
        def __init__(self, factors):
            super().__init__()
            self.factors = factors

        def forward(self, x):
            return x * self.factors if self.training else x

    activations = {"relu": nn.ReLU, "tanh": nn.Tanh, "elu": nn.ELU, "sigmoid": nn.Sigmoid}
    modules = []
    for index, layer in enumerate(net.layers):
        if isinstance(layer, bp.Dense):
            module = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
            modules.append(module)
            act = layer.activation
        elif isinstance(layer, bp.Activation):
            act = layer.activation
        elif isinstance(layer, bp.Dropout):
            modules.append(nn.Dropout(layer.p) if scales is None else
                           Mask(torch.tensor(scales[index])))
            act = "identity"
        elif isinstance(layer, bp.BatchNorm1d):
            module = nn.BatchNorm1d(layer.num_features, eps=layer.eps, momentum=layer.momentum,
                                    affine=layer.affine,
                                    track_running_stats=layer.track_running_stats)
            modules.append(module)
            act = "identity"
        else:
            module = nn.LayerNorm(layer.normalized_shape, eps=layer.eps,
                                  elementwise_affine=layer.elementwise_affine,
                                  bias=layer.use_bias)
            modules.append(module)
            act = "identity"
        if act != "identity":
            modules.append(activations[act]())
    model = nn.Sequential(*modules).double()
    with torch.no_grad():
        bp_layers = [layer for layer in net.layers
                     if not isinstance(layer, (bp.Activation, bp.Dropout))]
        torch_layers = [m for m in model if isinstance(m, (nn.Linear, nn.BatchNorm1d,
                                                           nn.LayerNorm))]
        for layer, module in zip(bp_layers, torch_layers, strict=True):
            for name in ("weight", "bias", "running_mean", "running_var"):
                value = getattr(layer, name, None)
                if value is not None:
                    getattr(module, name).copy_(torch.tensor(value))
            if getattr(layer, "num_batches_tracked", None) is not None:
                module.num_batches_tracked.fill_(int(layer.num_batches_tracked))
    return model


def torch_grads(model):
    import torch
    return np.concatenate([p.grad.numpy().ravel() if p.grad is not None
                           else torch.zeros_like(p).numpy().ravel()
                           for p in model.parameters()])


def torch_running(model):
    import torch
    return [(m.running_mean.numpy().copy(), m.running_var.numpy().copy(),
             float(m.num_batches_tracked)) for m in model
            if isinstance(m, torch.nn.BatchNorm1d) and m.track_running_stats]


def dropout_scales(net, n_rows, counter=None):
    key, current = net._engine.stream
    counter = current if counter is None else counter
    return {index: ref.dropout_scale(key, counter, index, (n_rows, layer.out_features),
                                     layer.p)
            for index, layer in enumerate(net.layers) if isinstance(layer, bp.Dropout)}


@pytest.mark.parametrize("name", sorted(NETWORKS))
@pytest.mark.parametrize("training", [True, False])
def test_forward_and_backward_match_torch(name, training):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(7)
    net = randomize(NETWORKS[name](), rng)
    X = rng.normal(0, 2, (11, net.n_inputs))
    G = rng.normal(size=(11, net.n_outputs))
    model = torch_model(net, dropout_scales(net, 11))
    model.train(training)
    Xt = torch.tensor(X, requires_grad=True)
    expected = model(Xt)
    expected.backward(torch.tensor(G))
    assert_close(net.forward(X, training=training), expected.detach().numpy(), RTOL)
    assert_close(net.backward(G), Xt.grad.numpy(), RTOL)
    assert_close(net.gradients, torch_grads(model), RTOL)
    assert_running_close(running(net), torch_running(model), 1e-12)
    model.eval()
    assert_close(net.predict(X), model(torch.tensor(X)).detach().numpy(), RTOL)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_statistics_after_20_steps_match_torch(momentum):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(8)
    net = randomize(mixed(momentum=momentum, p=0.0), rng)
    model = torch_model(net)
    model.train()
    for _ in range(20):
        X = rng.normal(-1.0, 2.0, (5, 6))
        net.forward(X)
        with torch.no_grad():
            model(torch.tensor(X))
    assert_running_close(running(net), torch_running(model), 1e-12)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("width,batch,momentum", [(4, 3, 0.1), (16, 8, None), (40, 20, 0.01)])
def test_50_step_trajectories_match_torch(optimizer, width, batch, momentum):
    """Whole training runs of a network mixing every kind (dropout with bpfast's masks)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(width + batch)
    net = randomize(mixed(width=width, momentum=momentum, p=0.3, seed=batch), rng)
    X, y = rng.normal(size=(60, 6)), rng.integers(0, 3, 60)
    model = torch_model(net, dropout_scales(net, batch))
    masks = [m for m in model if hasattr(m, "factors")]
    if optimizer == "sgd":
        opt, torch_opt = bp.SGD(lr=0.05, momentum=0.9), torch.optim.SGD(
            model.parameters(), lr=0.05, momentum=0.9)
    else:
        opt, torch_opt = bp.Adam(lr=0.01), torch.optim.Adam(model.parameters(), lr=0.01)
    model.train()
    for step in range(50):
        rows = slice((step * batch) % (len(X) - batch + 1), None)
        xb, yb = X[rows][:batch], y[rows][:batch]
        scales = dropout_scales(net, batch)
        for mask, factors in zip(masks, scales.values()):
            mask.factors = torch.tensor(factors)
        loss = net.train_step(xb, yb, "cross_entropy", opt)
        torch_opt.zero_grad()
        torch_loss = torch.nn.functional.cross_entropy(model(torch.tensor(xb)),
                                                       torch.tensor(yb))
        torch_loss.backward()
        torch_opt.step()
        assert loss == pytest.approx(torch_loss.item(), rel=1e-9)
    assert_close(net.parameters, np.concatenate(
        [p.detach().numpy().ravel() for p in model.parameters()]), 1e-9)
    assert_running_close(running(net), torch_running(model), 1e-9)


def test_dropout_with_p_zero_matches_torch_dropout_exactly_in_both_modes():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(9)
    net = bp.Network([bp.Dense(5, 4), bp.Dropout(0.0), bp.Dense(4, 2)], dtype="float64",
                     seed=0)
    model = torch_model(net)
    X = rng.normal(size=(6, 5))
    for training in (True, False):
        model.train(training)
        assert_close(net.forward(X, training=training),
                     model(torch.tensor(X)).detach().numpy(), 1e-13)


# --------------------------------------------------------------------------- dropout
def test_dropout_p_zero_and_inference_are_the_identity():
    rng = np.random.default_rng(10)
    X = rng.normal(size=(50, 20))
    for dtype in ("float32", "float64"):
        net = bp.Network([bp.Dense(20, 20), bp.Dropout(0.0), bp.Dense(20, 3)], dtype=dtype,
                         seed=0)
        plain = bp.Network([bp.Dense(20, 20), bp.Dense(20, 3)], dtype=dtype, seed=0)
        np.testing.assert_array_equal(net.forward(X), plain.forward(X))
        dropped = bp.Network([bp.Dense(20, 20), bp.Dropout(0.7), bp.Dense(20, 3)],
                             dtype=dtype, seed=0)
        np.testing.assert_array_equal(dropped.forward(X, training=False), plain.forward(X))
        np.testing.assert_array_equal(dropped.predict(X), plain.predict(X))


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_outputs_fraction_and_gradient(dtype, p):
    """Each output is 0 or x * (1/(1-p)) exactly (PyTorch's factor, in the dtype); the
    dropped fraction is p within 5 binomial sigmas over 10**6 elements; dL/dx is the
    upstream gradient times the same factors; the mask is the oracle's stream."""
    rng = np.random.default_rng(11)
    n_rows, width = 1000, 1000
    X = rng.uniform(0.5, 1.5, (n_rows, width)).astype(dtype)
    net = bp.Network([bp.Dropout(p), bp.Dense(width, 1)], dtype=dtype, seed=123)
    net.layers[1].weight[...] = 1.0
    scale = ref.dropout_scale(net._engine.stream[0], 0, 0, (n_rows, width), p, np.dtype(dtype))
    net.forward(X)
    out = net._engine.layer_output(0)
    kept = out != 0
    np.testing.assert_array_equal(out[kept], X[kept] * np.asarray(1 / np.asarray(1 - p, dtype),
                                                                  dtype))
    np.testing.assert_array_equal(out, X * scale)  # the oracle's transcription of the stream
    dropped = 1 - kept.mean()
    sigma = np.sqrt(p * (1 - p) / kept.size)
    assert abs(dropped - p) < 5 * sigma
    grad_out = rng.normal(size=(n_rows, 1)).astype(dtype)
    grad_x = net.backward(grad_out)
    np.testing.assert_array_equal(grad_x, (grad_out @ net.layers[1].weight) * scale)


def test_dropout_masks_differ_between_passes_layers_and_seeds_and_continue_in_fit():
    X = np.ones((8, 64))

    def mask(net, layer=0):
        net.forward(X)
        return net._engine.layer_output(layer) != 0

    a = bp.Network([bp.Dropout(0.5), bp.Dense(64, 64), bp.Dropout(0.5), bp.Dense(64, 1)],
                   dtype="float64", seed=1)
    a.layers[1].weight[...] = np.eye(64)
    first, second = mask(a), mask(a)
    assert (first != second).any()
    assert a._engine.stream[1] == 2
    # the two Dropout layers of one pass draw different masks (identity weights between)
    assert ((a._engine.layer_output(0) != 0) != (a._engine.layer_output(2) != 0)).any()
    b = bp.Network([bp.Dropout(0.5), bp.Dense(64, 64)], dtype="float64", seed=2)
    assert mask(b).tolist() != first.tolist()
    assert 0.3 < first.mean() < 0.7
    # fit continues the stream: two one-epoch fits are one two-epoch fit
    rng = np.random.default_rng(3)
    Xf, yf = rng.normal(size=(40, 64)), rng.normal(size=(40, 1))
    one = bp.Network([bp.Dense(64, 16, "relu"), bp.Dropout(0.3), bp.Dense(16, 1)], seed=5)
    two = copy.deepcopy(one)
    one.fit(Xf, yf, loss="mse", optimizer=bp.SGD(lr=0.01), epochs=2, batch_size=8)
    opt = bp.SGD(lr=0.01)
    for _ in range(2):
        two.fit(Xf, yf, loss="mse", optimizer=opt, epochs=1, batch_size=8)
    np.testing.assert_array_equal(one.parameters, two.parameters)
    assert one._engine.stream == two._engine.stream and one._engine.stream[1] == 10


def test_same_seed_same_training_with_one_and_two_threads():
    """Large enough that the elementwise passes run threaded (adaptive policy off)."""
    rng = np.random.default_rng(12)
    X, y = rng.normal(size=(512, 300)), rng.integers(0, 4, 512)
    results = []
    _core.set_adaptive(False)
    try:
        for n_threads in (1, 2):
            with bp.threads(n_threads):
                net = bp.Network([bp.Dense(300, 300), bp.BatchNorm1d(300),
                                  bp.Activation("relu"), bp.Dropout(0.3), bp.LayerNorm(300),
                                  bp.Dense(300, 4)], seed=7)
                net.fit(X, y, loss="cross_entropy", optimizer="adam", epochs=2,
                        batch_size=512)
                net.train_step(X, y, "cross_entropy", bp.SGD(lr=0.1))
                results.append((net.parameters.copy(), net.buffers.copy(),
                                net.predict(X)))
    finally:
        _core.set_adaptive(True)
    for a, b in zip(*results):
        np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------- gradcheck
def _gradcheck(net, X, y, training_rows=None):
    """Central differences of compute_gradients' loss (training mode), and of dL/dX.
    Dropout has p = 0 here; the stream counter is put back before every evaluation so
    that each one draws the same masks."""
    stream = net._engine.stream
    buffers = net.buffers.copy()

    def loss():
        net._engine.stream = stream
        net.buffers = buffers
        return net.compute_gradients(X, y, "mse")

    loss()
    analytic = net.gradients.copy()
    numeric = numerical_gradient(loss, net.parameters)
    assert relative_error(analytic, numeric) < 1e-7
    net._engine.stream = stream
    net.buffers = buffers
    out = net.forward(X)
    grad_x = net.backward(2 * (out - y) / out.size)

    def input_loss():
        net._engine.stream = stream
        net.buffers = buffers
        return float(((net.forward(X) - y) ** 2).mean())

    assert relative_error(grad_x, numerical_gradient(input_loss, X.reshape(-1)).reshape(
        X.shape)) < 1e-7


@pytest.mark.parametrize("kind", ["batch_norm1d", "layer_norm"])
@pytest.mark.parametrize("position", ["first", "after_dense", "before_output", "last"])
@pytest.mark.parametrize("affine", [True, False])
def test_central_differences(kind, position, affine):
    rng = np.random.default_rng(13)

    def norm(width):
        if kind == "batch_norm1d":
            return bp.BatchNorm1d(width, affine=affine)
        return bp.LayerNorm(width, elementwise_affine=affine)

    layers = {"first": [norm(4), bp.Dense(4, 5, "tanh"), bp.Dense(5, 3)],
              "after_dense": [bp.Dense(4, 5), norm(5), bp.Activation("tanh"),
                              bp.Dense(5, 3)],
              "before_output": [bp.Dense(4, 5, "tanh"), bp.Dense(5, 5, "sigmoid"), norm(5),
                                bp.Dense(5, 3)],
              "last": [bp.Dense(4, 5, "tanh"), bp.Dense(5, 3), norm(3)]}[position]
    net = randomize(bp.Network(layers, dtype="float64", seed=0), rng)
    _gradcheck(net, rng.normal(size=(6, 4)), rng.normal(size=(6, 3)))
    if kind == "batch_norm1d":  # and in inference mode (running statistics)
        stream = net._engine.stream
        X, y = rng.normal(size=(6, 4)), rng.normal(size=(6, 3))
        out = net.forward(X, training=False)
        grad_x = net.backward(2 * (out - y) / out.size)
        numeric = numerical_gradient(
            lambda: float(((net.forward(X, training=False) - y) ** 2).mean()),
            X.reshape(-1)).reshape(X.shape)
        assert relative_error(grad_x, numeric) < 1e-7
        assert net._engine.stream == stream


# --------------------------------------------------------------------------- bad input
def test_bad_hyperparameters_are_clear_errors():
    for p in (1.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="p must be"):
            bp.Dropout(p)
    with pytest.raises(TypeError, match="p must be a real number"):
        bp.Dropout("0.5")
    with pytest.raises(ValueError, match="num_features must be >= 1"):
        bp.BatchNorm1d(0)
    with pytest.raises(ValueError, match="eps must be > 0"):
        bp.BatchNorm1d(3, eps=0)
    with pytest.raises(ValueError, match="momentum must be <= 1"):
        bp.BatchNorm1d(3, momentum=1.5)
    with pytest.raises(TypeError, match="affine must be True or False"):
        bp.BatchNorm1d(3, affine=1)
    with pytest.raises(ValueError, match="normalized_shape must be one width"):
        bp.LayerNorm((3, 4))
    with pytest.raises(TypeError, match="normalized_shape must be an integer"):
        bp.LayerNorm(3.0)


def test_width_mismatch_and_misplaced_layers_are_refused_unchanged():
    layers = [bp.Dense(4, 5), bp.BatchNorm1d(6), bp.Dense(6, 2)]
    with pytest.raises(ValueError, match=r"layer 1 \(BatchNorm1d\(6\)\) takes 6 inputs "
                                         r"\(num_features\) but layer 0 .* gives 5"):
        bp.Network(layers)
    with pytest.raises(ValueError, match="normalized_shape"):
        bp.Network([bp.Dense(4, 5), bp.LayerNorm(4)])
    assert all(layer._network is None for layer in layers)
    assert layers[1].weight is None  # nothing was attached
    with pytest.raises(ValueError, match="at least one Dense"):
        bp.Network([bp.BatchNorm1d(3), bp.Dropout(0.1)])
    with pytest.raises(ValueError, match="softmax is only allowed on the last layer"):
        bp.Network([bp.Dense(3, 3, "softmax"), bp.Dropout(0.1)])
    with pytest.raises(TypeError, match="bpfast layers"):
        bp.Network([bp.Dense(3, 3), "relu"])
    # a normalisation layer may come first, taking the raw input
    net = bp.Network([bp.LayerNorm(3), bp.BatchNorm1d(3), bp.Dense(3, 2)], seed=0)
    assert net.n_inputs == 3 and net.predict(np.ones((2, 3))).shape == (2, 2)


def test_non_finite_running_statistics_are_refused_before_anything_changes():
    rng = np.random.default_rng(14)
    net = randomize(mixed(), rng)
    X, y = rng.normal(size=(8, 6)), rng.integers(0, 3, 8)
    opt = bp.Adam()
    net.train_step(X, y, "cross_entropy", opt)
    layer = net.layers[1]
    for field, value in (("running_mean", np.nan), ("running_var", np.inf),
                         ("running_var", -1.0)):
        array = getattr(layer, field)
        saved = array[2]
        array[2] = value  # by hand, through the view
        before = (net.parameters.copy(), net.buffers.copy(), net._engine.stream,
                  opt._config.step_count)
        for call in (lambda: net.train_step(X, y, "cross_entropy", opt),
                     lambda: net.forward(X), lambda: net.predict(X),
                     lambda: net.fit(X, y, loss="cross_entropy", optimizer=opt)):
            with pytest.raises(ValueError, match=f"{field} holds"):
                call()
        after = (net.parameters, net.buffers, net._engine.stream, opt._config.step_count)
        np.testing.assert_array_equal(before[0], after[0])
        np.testing.assert_array_equal(before[1], after[1])
        assert before[2:] == after[2:]
        array[2] = saved
    good = net.buffers.copy()
    for bad in (np.nan, -1.0):
        values = good.copy()
        values[net.layers[1].num_features] = bad  # the first running variance
        with pytest.raises(ValueError):
            net.buffers = values
        np.testing.assert_array_equal(net.buffers, good)
    with pytest.raises(ValueError, match="buffers must have shape"):
        net.buffers = good[:-1]


def test_batch_norm_training_batch_of_one_is_refused():
    net = bp.Network([bp.Dense(3, 4), bp.BatchNorm1d(4), bp.Dense(4, 2)], seed=0)
    X, y = np.ones((1, 3)), np.array([1])
    state = (net.parameters.copy(), net.buffers.copy())
    with pytest.raises(ValueError, match="more than one row"):
        net.forward(X)
    with pytest.raises(ValueError, match="more than one row"):
        net.train_step(X, y, "cross_entropy", "sgd")
    Xf, yf = np.ones((9, 3)), np.zeros(9, dtype=int)
    with pytest.raises(ValueError, match="a batch has one row"):
        net.fit(Xf, yf, loss="cross_entropy", optimizer="sgd", batch_size=4)
    with pytest.raises(ValueError, match="a batch has one row"):
        net.fit(Xf, yf, loss="cross_entropy", optimizer="sgd", batch_size=1)
    np.testing.assert_array_equal(state[0], net.parameters)
    np.testing.assert_array_equal(state[1], net.buffers)
    assert net.forward(X, training=False).shape == (1, 2)  # inference: running statistics
    assert net.predict(X).shape == (1, 2)
    net.fit(Xf, yf, loss="cross_entropy", optimizer="sgd", batch_size=3)


def test_optimizers_update_parameters_only():
    rng = np.random.default_rng(15)
    net = randomize(mixed(), rng)
    X, y = rng.normal(size=(8, 6)), rng.integers(0, 3, 8)
    net.compute_gradients(X, y, "cross_entropy")
    buffers = net.buffers.copy()
    opt = bp.AdamW(weight_decay=0.5)
    opt.step(net)
    np.testing.assert_array_equal(net.buffers, buffers)


def test_track_running_stats_false_uses_batch_statistics_in_both_modes():
    rng = np.random.default_rng(16)
    net = bp.Network([bp.Dense(4, 6), bp.BatchNorm1d(6, track_running_stats=False),
                      bp.Dense(6, 2)], dtype="float64", seed=0)
    assert net.buffers.shape == (0,) and net.layers[1].running_mean is None
    X = rng.normal(size=(3000, 4))
    np.testing.assert_allclose(net.predict(X), net.forward(X), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(net.forward(X, training=False), net.forward(X), rtol=0, atol=0)


# --------------------------------------------------------------------------- state
def _batches(seed, n=4):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(16, 6)), rng.integers(0, 3, 16)) for _ in range(n)]


def test_save_and_load_continue_bit_for_bit(tmp_path):
    net = mixed(dtype="float32", seed=11)
    opt = bp.Adam(lr=0.01)
    for X, y in _batches(17, 3):
        net.train_step(X, y, "cross_entropy", opt)
    path = tmp_path / "model.npz"
    bp.save(net, path, optimizer=opt)
    header = bp.io.read_header(path)
    assert header["format_version"] == 2 and header["layers"][1]["kind"] == "batch_norm1d"
    assert header["stream"] == list(net._engine.stream) and header["stream"][1] == 3
    loaded, loaded_opt = bp.load(path, with_optimizer=True)
    np.testing.assert_array_equal(loaded.buffers, net.buffers)
    for other, other_opt in ((net, opt), (loaded, loaded_opt)):
        for X, y in _batches(18):
            other.train_step(X, y, "cross_entropy", other_opt)
        other.fit(X, y, loss="cross_entropy", optimizer=other_opt, epochs=2, batch_size=4)
    np.testing.assert_array_equal(loaded.parameters, net.parameters)
    np.testing.assert_array_equal(loaded.buffers, net.buffers)
    assert loaded._engine.stream == net._engine.stream


@pytest.mark.parametrize("clone", [lambda net: pickle.loads(pickle.dumps(net)), copy.deepcopy])
def test_pickle_and_deepcopy_continue_bit_for_bit(clone):
    net = mixed(seed=12)
    for X, y in _batches(19, 3):
        net.train_step(X, y, "cross_entropy", bp.SGD(lr=0.1))
    other = clone(net)
    assert [layer.describe() for layer in other.layers] == \
        [layer.describe() for layer in net.layers]
    assert other._engine.stream == net._engine.stream
    for network in (net, other):
        opt = bp.SGD(lr=0.1, momentum=0.9)
        for X, y in _batches(20):
            network.train_step(X, y, "cross_entropy", opt)
    np.testing.assert_array_equal(other.parameters, net.parameters)
    np.testing.assert_array_equal(other.buffers, net.buffers)
    assert not np.shares_memory(other.buffers, net.buffers)


def test_dense_only_files_stay_format_1(tmp_path):
    net = bp.Network([bp.Dense(3, 2)], seed=0)
    bp.save(net, tmp_path / "m.npz")
    header = bp.io.read_header(tmp_path / "m.npz")
    assert header["format_version"] == 1 and "stream" not in header


def test_a_file_with_bad_running_statistics_is_refused(tmp_path):
    net = mixed(seed=1)
    path = tmp_path / "m.npz"
    bp.save(net, path)
    with np.load(path) as archive:
        arrays = dict(archive)
    arrays["buffers"][net.layers[1].num_features] = -3.0  # a negative running variance
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match="running_var holds"):
        bp.load(path)


def test_describe_and_from_description_round_trip():
    from bpfast.layers import from_description
    layers = [bp.Dropout(0.25), bp.BatchNorm1d(4, eps=1e-3, momentum=None, affine=False,
                                               track_running_stats=False),
              bp.LayerNorm((4,), eps=1e-6, elementwise_affine=True, bias=False),
              bp.Activation("leaky_relu", negative_slope=0.2)]
    assert layers[0].describe() == {"kind": "dropout", "p": 0.25}
    assert layers[1].describe() == {"kind": "batch_norm1d", "num_features": 4, "eps": 1e-3,
                                    "momentum": None, "affine": False,
                                    "track_running_stats": False}
    assert layers[2].describe() == {"kind": "layer_norm", "normalized_shape": [4],
                                    "eps": 1e-6, "elementwise_affine": True, "bias": False}
    for layer in layers:
        assert from_description(layer.describe()).describe() == layer.describe()
    net = bp.Network([bp.Dense(3, 4), *layers, bp.Dense(4, 1)], seed=0)
    assert layers[2].weight.base is not None and np.shares_memory(layers[2].weight,
                                                                  net.parameters)
    assert layers[2].bias is None and layers[1].weight is None
    assert net.n_parameters == 3 * 4 + 4 + 4 + 4 + 1


def test_batch_norm_views():
    net = bp.Network([bp.Dense(3, 4), bp.BatchNorm1d(4), bp.Dense(4, 2)], seed=0)
    bn = net.layers[1]
    assert np.shares_memory(bn.weight, net.parameters)
    assert np.shares_memory(bn.running_mean, net.buffers)
    assert bn.num_batches_tracked.shape == () and bn.num_batches_tracked == 0
    np.testing.assert_array_equal(net.buffers, [0, 0, 0, 0, 1, 1, 1, 1, 0])
    np.testing.assert_array_equal(bn.weight, 1)
    np.testing.assert_array_equal(bn.bias, 0)
    assert (bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats) == \
        (4, 1e-5, 0.1, True, True)


# --------------------------------------------------------------------------- real data
def test_digits_with_dropout_and_batch_norm_reaches_the_plain_accuracy():
    X, y = digits()
    order = np.random.default_rng(0).permutation(len(X))
    train, test = order[:1200], order[1200:]
    X_train, X_test, y_train, y_test = X[train], X[test], y[train], y[test]

    def accuracy(extra, seed):
        layers = [bp.Dense(64, 128, None if extra else "relu")]
        if extra:
            layers += [bp.BatchNorm1d(128), bp.Activation("relu"), bp.Dropout(0.2)]
        layers.append(bp.Dense(128, 10))
        net = bp.Network(layers, seed=seed)
        net.fit(X_train, y_train, loss="cross_entropy", optimizer=bp.Adam(lr=3e-3),
                epochs=15, batch_size=32)
        return (net.predict(X_test).argmax(axis=1) == y_test).mean()

    plain = np.mean([accuracy(False, seed) for seed in range(3)])
    regularised = np.mean([accuracy(True, seed) for seed in range(3)])
    print(f"digits test accuracy, mean of 3 seeds: plain {plain:.4f}, "
          f"dropout + batch norm {regularised:.4f}")
    assert regularised >= plain and regularised > 0.95
