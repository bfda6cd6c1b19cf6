"""Network: construction, input checks, step-by-step vs fused semantics, fit, learning,
determinism, threads, allocation and concurrency.

Oracles: the plain NumPy reference (tests/oracle.py), twin networks built with the
same seed and stepped by a different route, hand-written loops over train_step, and
the network's own promises (views, ownership, "a failed call changes nothing").
"""
import contextlib
import gc
import textwrap
import threading
import time
import tracemalloc

import numpy as np
import oracle as ref
import pytest
from oracle_checks import oracle_spec
from thread_races import RACE_PRELUDE, run_isolated, start_and_join
from training_data import network_calls

import bpfast as bp


# --------------------------------------------------------------------------- helpers
def small_net(dtype="float64", seed=0, sizes=(4, 8, 3), hidden="tanh", output=None, **kw):
    layers = [bp.Dense(a, b, hidden) for a, b in zip(sizes[:-2], sizes[1:-1])]
    layers.append(bp.Dense(sizes[-2], sizes[-1], output, **kw))
    return bp.Network(layers, dtype=dtype, seed=seed)


def make_data(n=20, n_in=4, n_classes=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, n_in))
    y = rng.integers(0, n_classes, n).astype(np.intp)
    return X, y


def layer_offsets(net):
    """(weight offset, bias offset or None) of each layer in the flat buffers."""
    offsets, offset = [], 0
    for layer in net.layers:
        n_weights = layer.out_features * layer.in_features
        offsets.append((offset, offset + n_weights if layer.bias is not None else None))
        offset += n_weights + (layer.out_features if layer.bias is not None else 0)
    return offsets


def snapshot(obj):
    if isinstance(obj, bp.Network):
        return ("net", obj.parameters.tobytes(), obj.gradients.tobytes())
    state = {name: value.tobytes() for name, value in obj.state.items()}
    return ("opt", obj.step_count, state)


@contextlib.contextmanager
def unchanged(*objects):
    """Assert the networks' buffers and the optimizers' state are byte-identical after."""
    before = [snapshot(obj) for obj in objects]
    yield
    after = [snapshot(obj) for obj in objects]
    for obj, b, a in zip(objects, before, after):
        assert b == a, f"{obj!r} changed during a call that raised"


@pytest.fixture
def used():
    """A float64 4-8-3 classifier and its Adam after three steps (state non-trivial)."""
    X, y = make_data()
    net = small_net()
    opt = bp.Adam(lr=0.01)
    for _ in range(3):
        net.train_step(X, y, bp.CrossEntropy(), opt)
    return net, opt, X, y


CE = bp.CrossEntropy()

CALLS_X = network_calls(CE, fit_epochs=1)
CALLS_XY = {k: v for k, v in CALLS_X.items() if k not in ("forward", "predict")}


# =========================================================================== 1. construction
@pytest.mark.parametrize("dtype, expected", [(None, np.float32), ("float32", np.float32),
                                             ("float64", np.float64),
                                             (np.float64, np.float64)])
def test_flat_buffers_dtype_and_layout(dtype, expected):
    kwargs = {} if dtype is None else {"dtype": dtype}
    net = bp.Network([bp.Dense(5, 7, "tanh"), bp.Dense(7, 3, bias=False), bp.Dense(3, 2)],
                     seed=0, **kwargs)
    n = 7 * 5 + 7 + 3 * 7 + 2 * 3 + 2
    assert net.n_parameters == n
    for buffer in (net.parameters, net.gradients):
        assert type(buffer) is np.ndarray
        assert buffer.dtype == expected and buffer.shape == (n,)
        assert buffer.flags.c_contiguous and buffer.flags.writeable
    assert not np.shares_memory(net.parameters, net.gradients)
    pieces = []
    for layer in net.layers:
        assert layer.weight.shape == (layer.out_features, layer.in_features)
        assert layer.grad_weight.shape == layer.weight.shape
        assert layer.weight.dtype == expected and layer.grad_weight.dtype == expected
        pieces.append(layer.weight.ravel())
        if layer.bias is not None:
            assert layer.bias.shape == layer.grad_bias.shape == (layer.out_features,)
            pieces.append(layer.bias)
    # weight then bias, layer by layer
    np.testing.assert_array_equal(np.concatenate(pieces), net.parameters)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_layer_arrays_are_views_both_ways(dtype):
    net = bp.Network([bp.Dense(3, 4, "relu"), bp.Dense(4, 2)], dtype=dtype, seed=1)
    for layer, (w_off, b_off) in zip(net.layers, layer_offsets(net)):
        for view, buffer in ((layer.weight, net.parameters), (layer.bias, net.parameters),
                             (layer.grad_weight, net.gradients),
                             (layer.grad_bias, net.gradients)):
            assert np.shares_memory(view, buffer)
        n_in = layer.in_features
        layer.weight[1, 2] = 123.0
        assert net.parameters[w_off + n_in + 2] == 123.0
        net.parameters[b_off + 1] = -7.0
        assert layer.bias[1] == -7.0
        layer.grad_weight[...] = 3.0
        assert np.all(net.gradients[w_off:b_off] == 3.0)
        net.gradients[b_off:b_off + layer.out_features] = np.arange(layer.out_features)
        np.testing.assert_array_equal(layer.grad_bias, np.arange(layer.out_features))
    # the views stay valid when parameters are assigned as a whole
    new = np.linspace(-1, 1, net.n_parameters)
    net.parameters = new
    np.testing.assert_array_equal(net.parameters, new.astype(dtype))
    np.testing.assert_array_equal(net.layers[1].bias, new[-2:].astype(dtype))
    with unchanged(net), pytest.raises(ValueError):
        net.parameters = np.zeros(net.n_parameters + 1)


def test_gradient_views_hold_backward_result():
    net = small_net(sizes=(4, 6, 5, 3))
    X, _ = make_data(n=7)
    out = net.forward(X)
    g = np.random.default_rng(2).standard_normal(out.shape)
    net.backward(g)
    flat = np.concatenate([np.concatenate([l.grad_weight.ravel(), l.grad_bias])
                           for l in net.layers])
    np.testing.assert_array_equal(flat, net.gradients)
    assert np.any(net.gradients != 0)


def test_no_bias_layer():
    with_bias = bp.Network([bp.Dense(5, 7, "tanh"), bp.Dense(7, 3)], dtype="float64", seed=0)
    no_bias = bp.Network([bp.Dense(5, 7, "tanh", bias=False), bp.Dense(7, 3)],
                         dtype="float64", seed=0)
    layer = no_bias.layers[0]
    assert layer.bias is None and layer.grad_bias is None
    assert no_bias.n_parameters == with_bias.n_parameters - 7
    X, _ = make_data(n=6, n_in=5)
    hidden = np.tanh(X @ layer.weight.T)  # no bias term at all
    expected = hidden @ no_bias.layers[1].weight.T + no_bias.layers[1].bias
    np.testing.assert_allclose(no_bias.forward(X), expected, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_seeds(dtype):
    def build(seed):
        return bp.Network([bp.Dense(6, 10, "relu"), bp.Dense(10, 3, init="pytorch")],
                          dtype=dtype, seed=seed)
    np.testing.assert_array_equal(build(3).parameters, build(3).parameters)
    assert not np.array_equal(build(3).parameters, build(4).parameters)
    assert not np.array_equal(build(None).parameters, build(None).parameters)


def test_same_seed_same_model_in_both_dtypes():
    def build(dtype):
        return bp.Network([bp.Dense(6, 10, "relu"), bp.Dense(10, 3)], dtype=dtype, seed=5)
    np.testing.assert_array_equal(build("float32").parameters,
                                  build("float64").parameters.astype(np.float32))


N_IN, N_OUT = 400, 300  # 120_000 weights: sample std within ~0.5% of the true one


def _weights(activation=None, init=None):
    net = bp.Network([bp.Dense(N_IN, N_OUT, activation, init=init)], dtype="float64", seed=0)
    return net.layers[0].weight, net.layers[0].bias


def test_init_normal():
    w, b = _weights("relu", init="normal")
    assert w.std() == pytest.approx(0.01, rel=0.03)
    assert abs(w.mean()) < 0.1 * 0.01
    assert np.all(b == 0)


def test_init_pytorch():
    w, b = _weights("tanh", init="pytorch")
    limit = 1 / np.sqrt(N_IN)
    assert np.abs(w).max() <= limit and np.abs(w).max() > 0.98 * limit
    assert w.std() == pytest.approx(limit / np.sqrt(3), rel=0.03)
    assert np.abs(b).max() <= limit and np.any(b != 0)
    assert np.abs(b).max() > 0.8 * limit


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "elu"])
def test_default_init_he_for_relu_family(activation):
    w, b = _weights(activation)
    assert w.std() == pytest.approx(np.sqrt(2 / N_IN), rel=0.03)
    assert np.all(b == 0)


@pytest.mark.parametrize("activation", ["tanh", "sigmoid", None])
def test_default_init_glorot_otherwise(activation):
    w, b = _weights(activation)
    limit = np.sqrt(6 / (N_IN + N_OUT))
    assert np.abs(w).max() <= limit and np.abs(w).max() > 0.98 * limit
    assert w.std() == pytest.approx(limit / np.sqrt(3), rel=0.03)
    assert np.all(b == 0)


def test_explicit_init_overrides_default():
    w, _ = _weights("tanh", init="he")
    assert w.std() == pytest.approx(np.sqrt(2 / N_IN), rel=0.03)
    w, _ = _weights("relu", init="glorot")
    assert w.std() == pytest.approx(np.sqrt(2 / (N_IN + N_OUT)), rel=0.03)


# =========================================================================== 2. errors
def test_mismatched_layer_sizes_leave_layers_reusable():
    first = bp.Dense(4, 8, "tanh")
    with pytest.raises(ValueError, match="layer 1"):
        bp.Network([first, bp.Dense(9, 2)])
    assert first.weight is None
    net = bp.Network([first, bp.Dense(8, 2)])  # the refused layer is still free
    assert np.shares_memory(first.weight, net.parameters)


def test_softmax_on_hidden_layer():
    with pytest.raises(ValueError, match="softmax"):
        bp.Network([bp.Dense(4, 8, "softmax"), bp.Dense(8, 2)])


def test_unknown_activation_lists_valid_ones():
    with pytest.raises(ValueError) as info:
        bp.Dense(3, 3, activation="relux")
    message = str(info.value)
    assert "relux" in message
    for name in ("relu", "tanh", "sigmoid", "softmax", "identity"):
        assert name in message
    assert set(bp.ACTIVATIONS) >= {"relu", "tanh", "sigmoid", "softmax", "identity"}


def test_dense_reused_in_two_networks():
    shared = bp.Dense(3, 3, "tanh")
    first = bp.Network([shared], dtype="float64", seed=0)
    before = first.parameters.copy()
    with pytest.raises(ValueError, match="already belongs"):
        bp.Network([bp.Dense(2, 3), shared], dtype="float64", seed=1)
    np.testing.assert_array_equal(first.parameters, before)
    assert np.shares_memory(shared.weight, first.parameters)
    again = bp.Dense(3, 3)
    with pytest.raises(ValueError):
        bp.Network([again, again])


@pytest.mark.parametrize("dtype", ["float16", "int32", np.int64, "complex128", "float"])
def test_dtype_refused(dtype):
    if dtype == "float":
        # numpy's "float" is float64: accepted as that
        assert bp.Network([bp.Dense(2, 2)], dtype=dtype).parameters.dtype == np.float64
        return
    with pytest.raises((ValueError, TypeError)):
        bp.Network([bp.Dense(2, 2)], dtype=dtype)


def _bad_x(kind, X):
    n, d = X.shape
    if kind == "features":
        return np.zeros((n, d + 1))
    if kind == "1d":
        return X[0].copy()
    if kind == "3d":
        return X.reshape(1, n, d)
    if kind == "empty":
        return np.zeros((0, d))
    raise AssertionError(kind)


@pytest.mark.parametrize("call", list(CALLS_X))
@pytest.mark.parametrize("kind", ["features", "1d", "3d", "empty"])
def test_bad_x_shape(used, call, kind):
    net, opt, X, y = used
    with unchanged(net, opt), pytest.raises(ValueError):
        CALLS_X[call](net, opt, _bad_x(kind, X), y)


@pytest.mark.parametrize("call", list(CALLS_X))
@pytest.mark.parametrize("value, row, col", [(np.nan, 2, 1), (np.inf, 0, 3),
                                             (-np.inf, 19, 0)])
def test_nonfinite_x_named_by_row_and_column(used, call, value, row, col):
    net, opt, X, y = used
    bad = X.copy()
    bad[row, col] = value
    with unchanged(net, opt), pytest.raises(ValueError) as info:
        CALLS_X[call](net, opt, bad, y)
    assert f"row {row}" in str(info.value) and f"column {col}" in str(info.value)


@pytest.mark.parametrize("call", list(CALLS_X))
@pytest.mark.parametrize("kind", ["str", "complex", "bool", "object"])
def test_non_real_x_is_type_error(used, call, kind):
    net, opt, X, y = used
    bad = {"str": X.astype(str), "complex": X.astype(complex), "bool": X > 0,
           "object": X.astype(object)}[kind]
    with unchanged(net, opt), pytest.raises(TypeError):
        CALLS_X[call](net, opt, bad, y)


@pytest.mark.parametrize("call", list(CALLS_XY))
@pytest.mark.parametrize("case", ["long", "short", "too_big", "negative", "fraction",
                                  "width"])
def test_bad_labels(used, call, case):
    net, opt, X, y = used
    bad = {"long": np.append(y, 0), "short": y[:-1],
           "too_big": np.where(np.arange(len(y)) == 5, 3, y),
           "negative": np.where(np.arange(len(y)) == 5, -1, y),
           "fraction": y + 0.5,
           "width": np.full((len(y), 4), 0.25)}[case]
    error = TypeError if case == "fraction" else ValueError
    with unchanged(net, opt), pytest.raises(error):
        CALLS_XY[call](net, opt, X, bad)


def test_bad_mse_target(used):
    _, _, X, _ = used
    net = small_net(sizes=(4, 8, 2))
    opt = bp.SGD(lr=0.1)
    target = np.zeros((len(X), 2))
    net.train_step(X, target, bp.MSE(), opt)
    for bad in (np.zeros(len(X)), np.zeros((len(X), 1)), np.zeros((len(X), 3)),
                np.zeros((len(X) + 1, 2)), np.zeros((len(X), 2, 1))):
        with unchanged(net, opt), pytest.raises(ValueError):
            net.train_step(X, bad, bp.MSE(), opt)
    nan_target = target.copy()
    nan_target[4, 1] = np.nan
    with unchanged(net, opt), pytest.raises(ValueError, match="row 4"):
        net.train_step(X, nan_target, bp.MSE(), opt)


def test_integer_x_is_converted(used):
    net, opt, X, y = used
    X_int = np.random.default_rng(3).integers(-3, 4, X.shape)
    twin = small_net()
    twin.parameters = net.parameters
    out = net.forward(X_int)
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, twin.forward(X_int.astype(np.float64)))
    np.testing.assert_array_equal(net.predict(X_int.astype(np.int8)),
                                  twin.predict(X_int.astype(np.float64)))
    opt_a, opt_b = bp.SGD(lr=0.1, momentum=0.9), bp.SGD(lr=0.1, momentum=0.9)
    for _ in range(2):
        assert (net.train_step(X_int.astype(np.int32), y, CE, opt_a)
                == twin.train_step(X_int.astype(np.float64), y, CE, opt_b))
    np.testing.assert_array_equal(net.parameters, twin.parameters)


def test_float32_network_converts_float64_input():
    net = small_net(dtype="float32")
    X, y = make_data()
    out = net.forward(X)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out, net.forward(X.astype(np.float32)))


def _layouts(X):
    wide = np.zeros((X.shape[0], 2 * X.shape[1]))
    wide[:, ::2] = X
    tall = np.zeros((2 * X.shape[0], X.shape[1]))
    tall[::2] = X
    readonly = X.copy()
    readonly.setflags(write=False)
    return {"columns_strided": wide[:, ::2], "rows_strided": tall[::2],
            "fortran": np.asfortranarray(X), "readonly": readonly,
            "float32": X.astype(np.float32), "list": X.tolist()}


@pytest.mark.parametrize("layout", ["columns_strided", "rows_strided", "fortran", "readonly",
                                    "float32", "list"])
def test_any_x_layout_gives_the_contiguous_result(layout):
    X, y = make_data()
    if layout == "float32":
        X = X.astype(np.float32).astype(np.float64)  # representable either way
    odd = _layouts(X)[layout]
    a, b = small_net(), small_net()
    np.testing.assert_array_equal(a.forward(odd), b.forward(X))
    np.testing.assert_array_equal(a.predict(odd), b.predict(X))
    opt_a, opt_b = bp.Adam(lr=0.01), bp.Adam(lr=0.01)
    assert a.train_step(odd, y, CE, opt_a) == b.train_step(X, y, CE, opt_b)
    a.fit(odd, y, loss=CE, optimizer=opt_a, epochs=2, batch_size=6)
    b.fit(X, y, loss=CE, optimizer=opt_b, epochs=2, batch_size=6)
    np.testing.assert_array_equal(a.parameters, b.parameters)
    if isinstance(odd, np.ndarray) and not odd.flags.writeable:
        assert not odd.flags.writeable  # still the caller's read-only array, untouched


@pytest.mark.parametrize("labels", ["int32", "uint8", "strided", "float_whole", "list"])
def test_label_layouts(labels):
    X, y = make_data()
    strided = np.zeros(2 * len(y), dtype=np.int64)
    strided[::2] = y
    odd = {"int32": y.astype(np.int32), "uint8": y.astype(np.uint8),
           "strided": strided[::2], "float_whole": y.astype(np.float64),
           "list": y.tolist()}[labels]
    a, b = small_net(), small_net()
    assert a.compute_gradients(X, odd, CE) == b.compute_gradients(X, y, CE)
    np.testing.assert_array_equal(a.gradients, b.gradients)


def test_backward_needs_a_forward():
    net = small_net()
    X, y = make_data()
    g = np.ones((len(X), 3))
    with unchanged(net), pytest.raises(ValueError, match="forward"):
        net.backward(g)
    opt = bp.SGD(lr=0.1)
    for run in (lambda: net.train_step(X, y, CE, opt),
                lambda: net.compute_gradients(X, y, CE),
                lambda: net.fit(X, y, loss=CE, optimizer=opt, epochs=1)):
        net.forward(X)
        net.backward(g)  # works right after a forward
        run()            # ... but a fused call leaves no forward cache behind
        with unchanged(net, opt), pytest.raises(ValueError, match="forward"):
            net.backward(g)


def test_predict_keeps_the_forward_cache():
    net = small_net()
    X, _ = make_data()
    twin = small_net()
    g = np.random.default_rng(1).standard_normal((len(X), 3))
    net.forward(X)
    net.predict(np.ones((3, 4)))
    net.predict(np.ones((500, 4)))
    net.backward(g)
    twin.forward(X)
    twin.backward(g)
    np.testing.assert_array_equal(net.gradients, twin.gradients)


@pytest.mark.parametrize("shape", [(20, 4), (21, 3), (19, 3), (60,), (20, 3, 1)])
def test_grad_output_wrong_shape(shape):
    net = small_net()
    X, _ = make_data()
    net.forward(X)
    net.backward(np.ones((20, 3)))
    with unchanged(net), pytest.raises(ValueError):
        net.backward(np.ones(shape))
    bad = np.ones((20, 3))
    bad[3, 2] = np.nan
    with unchanged(net), pytest.raises(ValueError):
        net.backward(bad)


@pytest.mark.parametrize("output, loss, target", [
    ("softmax", bp.CrossEntropy(), "labels"),
    ("softmax", "cross_entropy", "labels"),
    ("sigmoid", bp.BinaryCrossEntropy(), "binary"),
    ("sigmoid", "binary_cross_entropy", "binary"),
])
def test_probability_output_with_loss_on_logits(output, loss, target):
    net = small_net(output=output)
    opt = bp.SGD(lr=0.1)
    X, y = make_data()
    if target == "binary":
        y = (np.random.default_rng(0).random((len(X), 3)) > 0.5).astype(float)
    for run in (lambda: net.compute_gradients(X, y, loss),
                lambda: net.train_step(X, y, loss, opt),
                lambda: net.fit(X, y, loss=loss, optimizer=opt, epochs=1)):
        with unchanged(net), pytest.raises(ValueError, match="from_logits"):
            run()
    assert opt.step_count == 0 and opt.state == {}


def test_optimizer_reused_on_second_network(used):
    net, opt, X, y = used
    other = small_net(seed=9)
    other.compute_gradients(X, y, CE)
    with unchanged(net, other, opt):
        with pytest.raises(ValueError, match="another"):
            other.train_step(X, y, CE, opt)
        with pytest.raises(ValueError, match="another"):
            other.fit(X, y, loss=CE, optimizer=opt, epochs=2, batch_size=5)
        with pytest.raises(ValueError, match="another"):
            opt.step(other)
    # and the first network keeps using it
    net.train_step(X, y, CE, opt)
    assert opt.step_count == 4


@pytest.mark.parametrize("kwargs, error", [
    ({"epochs": -1}, ValueError), ({"batch_size": 0}, ValueError),
    ({"batch_size": -4}, ValueError), ({"batch_size": 1.5}, (TypeError, ValueError)),
    ({"epochs": 2.0}, (TypeError, ValueError)), ({"shuffle": "yes"}, (TypeError, ValueError)),
    ({"loss": "hinge"}, ValueError), ({"optimizer": "lbfgs"}, ValueError),
])
def test_fit_bad_arguments(used, kwargs, error):
    net, opt, X, y = used
    args = {"loss": CE, "optimizer": opt, "epochs": 2, "batch_size": 5, **kwargs}
    with unchanged(net, opt), pytest.raises(error):
        net.fit(X, y, **args)


@pytest.mark.parametrize("failure", ["batch_size", "labels", "foreign_optimizer"])
def test_failed_fit_does_not_advance_the_shuffle(failure):
    """A failed fit leaves the network as it was, its shuffling stream included."""
    X, y = make_data()
    failed, clean = small_net(seed=4), small_net(seed=4)
    foreign = bp.SGD(lr=0.1)
    small_net(seed=8).train_step(X, y, CE, foreign)
    args = {"loss": CE, "optimizer": bp.SGD(lr=0.1), "epochs": 2, "batch_size": 5,
            "shuffle": True}
    if failure == "batch_size":
        args["batch_size"] = 0
    elif failure == "labels":
        y_bad = y.copy()
        y_bad[0] = 7
    else:
        args["optimizer"] = foreign
    with pytest.raises(ValueError):
        failed.fit(X, y_bad if failure == "labels" else y, **args)
    history_a = failed.fit(X, y, loss=CE, optimizer=bp.SGD(lr=0.1), epochs=2, batch_size=5)
    history_b = clean.fit(X, y, loss=CE, optimizer=bp.SGD(lr=0.1), epochs=2, batch_size=5)
    assert history_a.history == history_b.history
    np.testing.assert_array_equal(failed.parameters, clean.parameters)


def test_failed_step_keeps_the_forward_cache():
    """A call that raises (here: another network's optimizer, with a larger batch than
    the workspaces hold) must not throw away the cached forward pass."""
    X, y = make_data(n=10)
    X_big, y_big = make_data(n=50)
    net, twin = small_net(), small_net()
    foreign = bp.SGD(lr=0.1)
    small_net(seed=8).train_step(X, y, CE, foreign)
    g = np.random.default_rng(0).standard_normal((10, 3))
    net.forward(X)
    with pytest.raises(ValueError, match="another"):
        net.train_step(X_big, y_big, CE, foreign)
    with pytest.raises(ValueError, match="another"):
        net.fit(X_big, y_big, loss=CE, optimizer=foreign, epochs=1, batch_size=40)
    net.backward(g)
    twin.forward(X)
    twin.backward(g)
    np.testing.assert_array_equal(net.gradients, twin.gradients)


# =========================================================================== 3. semantics
def test_forward_and_predict_return_owned_arrays():
    X, _ = make_data()
    net, twin = small_net(), small_net()
    g = np.random.default_rng(1).standard_normal((len(X), 3))
    X_mine = X.copy()
    out = net.forward(X_mine)
    expected = out.copy()
    out[...] = 1e6
    X_mine[...] = -5.0  # the forward cache holds its own copy of X too
    net.backward(g)
    twin.forward(X)
    twin.backward(g)
    np.testing.assert_array_equal(net.gradients, twin.gradients)
    p = net.predict(X)
    np.testing.assert_array_equal(p, expected)
    p[...] = 0
    np.testing.assert_array_equal(net.predict(X), expected)
    assert not np.shares_memory(net.forward(X), net.forward(X))


@pytest.mark.parametrize("sizes, hidden, output", [
    ((4, 8, 3), "tanh", None), ((4, 16, 16, 3), "relu", "softmax"),
    ((4, 9, 2), "gelu", "sigmoid"), ((4, 7, 5, 1), "elu", None),
])
def test_predict_equals_forward(sizes, hidden, output):
    net = small_net(sizes=sizes, hidden=hidden, output=output)
    X, _ = make_data(n=37)
    np.testing.assert_allclose(net.predict(X), net.forward(X), rtol=1e-15, atol=1e-300)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_predict_large_input_in_chunks(dtype):
    # 50_000 rows through a net whose widest layer is 64: chunks of 16384 rows, the
    # last one partial.
    net = bp.Network([bp.Dense(10, 64, "relu"), bp.Dense(64, 32, "tanh"),
                      bp.Dense(32, 3, "softmax")], dtype=dtype, seed=0)
    X = np.random.default_rng(0).standard_normal((50_000, 10))
    got = net.predict(X)
    assert got.shape == (50_000, 3) and got.dtype == np.dtype(dtype)
    if ref is not None:
        expected = ref.network_forward(*oracle_spec(net), X.astype(dtype))[-1][1]
    else:  # pragma: no cover
        expected = net.forward(X)
    tol = 1e-12 if dtype == "float64" else 2e-5
    np.testing.assert_allclose(got, expected, rtol=tol, atol=tol)
    # the rows do not depend on which chunk they fell in (to BLAS's rounding: a gemm
    # may round a row differently for another number of rows)
    np.testing.assert_allclose(net.predict(X[16380:16390]), got[16380:16390],
                               rtol=1e-14 if dtype == "float64" else 1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_forward_backward_against_reference(dtype):
    net = bp.Network([bp.Dense(5, 12, "leaky_relu", negative_slope=0.2),
                      bp.Dense(12, 7, "tanh", bias=False), bp.Dense(7, 4)],
                     dtype=dtype, seed=2)
    rng = np.random.default_rng(0)
    X = rng.standard_normal((11, 5)).astype(dtype)
    g = rng.standard_normal((11, 4)).astype(dtype)
    spec = oracle_spec(net)
    cache = ref.network_forward(*spec, X)
    grad_w, grad_b, grad_x = ref.network_backward(spec[0], cache, spec[2], g, X,
                                                  biases=spec[1])
    tol = 1e-12 if dtype == "float64" else 1e-4
    np.testing.assert_allclose(net.forward(X), cache[-1][1], rtol=tol, atol=tol)
    dx = net.backward(g)
    assert dx.shape == X.shape and dx.dtype == np.dtype(dtype)
    np.testing.assert_allclose(dx, grad_x, rtol=tol, atol=tol)
    for layer, gw, gb in zip(net.layers, grad_w, grad_b):
        np.testing.assert_allclose(layer.grad_weight, gw, rtol=tol, atol=tol)
        if gb is None:
            assert layer.grad_bias is None
        else:
            np.testing.assert_allclose(layer.grad_bias, gb, rtol=tol, atol=tol)


def test_backward_overwrites_instead_of_accumulating():
    net = small_net()
    X, _ = make_data()
    g = np.random.default_rng(1).standard_normal((len(X), 3))
    net.gradients[...] = 99.0
    net.forward(X)
    dx1 = net.backward(g)
    first = net.gradients.copy()
    assert not np.any(first == 99.0)
    dx2 = net.backward(g)
    np.testing.assert_array_equal(net.gradients, first)
    np.testing.assert_array_equal(dx1, dx2)
    net.compute_gradients(X, np.zeros(len(X), dtype=int), CE)
    second = net.gradients.copy()
    net.compute_gradients(X, np.zeros(len(X), dtype=int), CE)
    np.testing.assert_array_equal(net.gradients, second)


def _manual_gradients(net, X, y, loss):
    out = net.forward(X)
    value = loss(out, y)
    net.backward(loss.gradient(out, y))
    return value, net.gradients.copy()


@pytest.mark.parametrize("case", ["ce_labels", "ce_probabilities", "mse", "mse_half",
                                  "bce_logits", "huber"])
def test_compute_gradients_equals_forward_loss_backward(case):
    rng = np.random.default_rng(5)
    X = rng.standard_normal((13, 4))
    if case == "ce_labels":
        loss, y, k = bp.CrossEntropy(), rng.integers(0, 3, 13), 3
    elif case == "ce_probabilities":
        loss, y, k = bp.CrossEntropy(), rng.dirichlet(np.ones(3), 13), 3
    elif case in ("mse", "mse_half"):
        loss, y, k = bp.MSE(half=case == "mse_half"), rng.standard_normal((13, 2)), 2
    elif case == "bce_logits":
        loss, y, k = bp.BinaryCrossEntropy(), rng.random((13, 2)), 2
    else:
        loss, y, k = bp.Huber(delta=0.5), rng.standard_normal((13, 2)), 2
    net = small_net(sizes=(4, 8, 6, k))
    value, manual = _manual_gradients(net, X, y, loss)
    fused = net.compute_gradients(X, y, loss)
    assert fused == pytest.approx(value, rel=1e-13, abs=1e-300)
    scale = np.abs(manual).max()
    np.testing.assert_allclose(net.gradients, manual, rtol=1e-12, atol=1e-14 * scale)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_fused_probability_output_equals_logits_network(kind):
    """softmax + CE(from_logits=False) trains exactly like identity + CE() on the same
    logits (and sigmoid + BCE(from_logits=False) like identity + BCE())."""
    rng = np.random.default_rng(6)
    X = rng.standard_normal((17, 4))
    if kind == "softmax":
        y = rng.integers(0, 3, 17)
        probs_loss, logits_loss = bp.CrossEntropy(from_logits=False), bp.CrossEntropy()
    else:
        y = (rng.random((17, 3)) > 0.5).astype(float)
        probs_loss = bp.BinaryCrossEntropy(from_logits=False)
        logits_loss = bp.BinaryCrossEntropy()
    probs_net = small_net(sizes=(4, 10, 3), output=kind)
    logits_net = small_net(sizes=(4, 10, 3))
    logits_net.parameters = probs_net.parameters
    logits = logits_net.forward(X)
    expected = (ref.softmax(logits) if ref is not None and kind == "softmax"
                else np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
                if kind == "softmax" else 1 / (1 + np.exp(-logits)))
    np.testing.assert_allclose(probs_net.forward(X), expected, rtol=1e-14, atol=1e-16)
    a = probs_net.compute_gradients(X, y, probs_loss)
    b = logits_net.compute_gradients(X, y, logits_loss)
    assert a == pytest.approx(b, rel=1e-12)
    scale = np.abs(logits_net.gradients).max()
    np.testing.assert_allclose(probs_net.gradients, logits_net.gradients, rtol=1e-12,
                               atol=1e-13 * scale)
    # the unfused route (loss gradient on probabilities, then the activation's
    # derivative) agrees too, to rounding
    value, manual = _manual_gradients(probs_net, X, y, probs_loss)
    assert value == pytest.approx(a, rel=1e-12)
    np.testing.assert_allclose(manual, logits_net.gradients, rtol=1e-8, atol=1e-10 * scale)
    # and a fused train_step steps both alike
    opt_a, opt_b = bp.SGD(lr=0.5, momentum=0.9), bp.SGD(lr=0.5, momentum=0.9)
    for _ in range(5):
        probs_net.train_step(X, y, probs_loss, opt_a)
        logits_net.train_step(X, y, logits_loss, opt_b)
    np.testing.assert_allclose(probs_net.parameters, logits_net.parameters, rtol=1e-11,
                               atol=1e-12)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("make_opt", [lambda: bp.Adam(lr=0.01),
                                      lambda: bp.SGD(lr=0.1, momentum=0.9, nesterov=True),
                                      lambda: bp.RMSprop(lr=0.01, centered=True)],
                         ids=["adam", "sgd", "rmsprop"])
def test_train_step_is_compute_gradients_then_step(dtype, make_opt):
    X, y = make_data(n=15)
    a, b = small_net(dtype=dtype), small_net(dtype=dtype)
    opt_a, opt_b = make_opt(), make_opt()
    for _ in range(4):
        before = a.parameters.copy()
        expected_loss = CE(a.forward(X), y)  # the loss at the parameters before the step
        value = a.train_step(X, y, CE, opt_a)
        assert not np.array_equal(a.parameters, before)
        assert value == b.compute_gradients(X, y, CE)
        assert value == pytest.approx(expected_loss, rel=1e-12 if dtype == "float64" else 1e-5)
        opt_b.step(b)
        np.testing.assert_array_equal(a.parameters, b.parameters)
        np.testing.assert_array_equal(a.gradients, b.gradients)
    assert opt_a.step_count == opt_b.step_count == 4
    for name in opt_a.state:
        np.testing.assert_array_equal(opt_a.state[name], opt_b.state[name])


def test_single_output_mse_accepts_1d_target():
    rng = np.random.default_rng(0)
    X, t = rng.standard_normal((12, 4)), rng.standard_normal(12)
    a, b = small_net(sizes=(4, 8, 1)), small_net(sizes=(4, 8, 1))
    opt_a, opt_b = bp.SGD(lr=0.1), bp.SGD(lr=0.1)
    assert a.train_step(X, t, bp.MSE(), opt_a) == b.train_step(X, t[:, None], bp.MSE(), opt_b)
    np.testing.assert_array_equal(a.parameters, b.parameters)
    a.fit(X, t, loss=bp.MSE(), optimizer=opt_a, epochs=2, batch_size=5)
    b.fit(X, t[:, None], loss=bp.MSE(), optimizer=opt_b, epochs=2, batch_size=5)
    np.testing.assert_array_equal(a.parameters, b.parameters)
    with unchanged(a, opt_a), pytest.raises(ValueError):
        a.train_step(X, t[:-1], bp.MSE(), opt_a)
    with unchanged(a, opt_a), pytest.raises(ValueError):
        a.train_step(X, np.stack([t, t], 1), bp.MSE(), opt_a)


# =========================================================================== 4. fit
def _manual_epoch(net, X, y, loss, opt, batch_size):
    n = len(X)
    total = 0.0
    for begin in range(0, n, batch_size):
        end = min(begin + batch_size, n)
        total += (end - begin) * net.train_step(X[begin:end], y[begin:end], loss, opt)
    return total / n


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fit_batch_gradient_descent_is_train_step(dtype):
    X, y = make_data(n=23)
    a, b = small_net(dtype=dtype), small_net(dtype=dtype)
    opt_a, opt_b = bp.Adam(lr=0.01), bp.Adam(lr=0.01)
    history = a.fit(X, y, loss=CE, optimizer=opt_a, epochs=3, batch_size=None, shuffle=False)
    losses = [b.train_step(X, y, CE, opt_b) for _ in range(3)]
    np.testing.assert_array_equal(a.parameters, b.parameters)
    assert history.history["loss"] == pytest.approx(losses, rel=1e-15, abs=0)
    assert history.epoch == [1, 2, 3] and opt_a.step_count == 3


def test_fit_sgd_is_one_train_step_per_row():
    X, y = make_data(n=17)
    a, b = small_net(), small_net()
    opt_a, opt_b = bp.SGD(lr=0.05, momentum=0.5), bp.SGD(lr=0.05, momentum=0.5)
    history = a.fit(X, y, loss=CE, optimizer=opt_a, epochs=2, batch_size=1, shuffle=False)
    losses = []
    for _ in range(2):
        losses.append(np.mean([b.train_step(X[i:i + 1], y[i:i + 1], CE, opt_b)
                               for i in range(len(X))]))
    np.testing.assert_allclose(a.parameters, b.parameters, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(history.history["loss"], losses, rtol=1e-13)
    assert opt_a.step_count == opt_b.step_count == 34


@pytest.mark.parametrize("loss_kind", ["ce", "mse"])
@pytest.mark.parametrize("batch_size", [16, 7, 50, 1000])
def test_fit_minibatch_equals_manual_loop(loss_kind, batch_size):
    rng = np.random.default_rng(1)
    X = rng.standard_normal((50, 4))
    if loss_kind == "ce":
        loss, y, k = CE, rng.integers(0, 3, 50), 3
    else:
        loss, y, k = bp.MSE(), rng.standard_normal((50, 2)), 2
    a, b = small_net(sizes=(4, 8, k)), small_net(sizes=(4, 8, k))
    opt_a, opt_b = bp.Adam(lr=0.01), bp.Adam(lr=0.01)
    X_before, y_before = X.copy(), y.copy()
    history = a.fit(X, y, loss=loss, optimizer=opt_a, epochs=3, batch_size=batch_size,
                    shuffle=False)
    effective = min(batch_size, 50)
    expected = [_manual_epoch(b, X, y, loss, opt_b, effective) for _ in range(3)]
    np.testing.assert_array_equal(a.parameters, b.parameters)
    assert len(history.history["loss"]) == 3
    np.testing.assert_allclose(history.history["loss"], expected, rtol=1e-14)
    assert opt_a.step_count == opt_b.step_count == 3 * -(-50 // effective)
    np.testing.assert_array_equal(X, X_before)  # fit does not touch the caller's data
    np.testing.assert_array_equal(y, y_before)


def test_fit_zero_epochs_changes_nothing(used):
    net, opt, X, y = used
    with unchanged(net, opt):
        history = net.fit(X, y, loss=CE, optimizer=opt, epochs=0)
    assert history.history["loss"] == [] and history.epoch == []


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_fit_shuffle_reproducible(dtype):
    X, y = make_data(n=40)
    runs = []
    for _ in range(2):
        net = small_net(dtype=dtype, seed=11)
        history = net.fit(X, y, loss=CE, optimizer=bp.Adam(lr=0.01), epochs=4, batch_size=6,
                          shuffle=True)
        runs.append((net.parameters.copy(), history.history["loss"]))
    np.testing.assert_array_equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]
    unshuffled = small_net(dtype=dtype, seed=11)
    unshuffled.fit(X, y, loss=CE, optimizer=bp.Adam(lr=0.01), epochs=4, batch_size=6,
                   shuffle=False)
    assert not np.array_equal(unshuffled.parameters, runs[0][0])
    # each epoch a new order: two one-epoch fits differ from repeating the first order
    a, b = small_net(dtype=dtype, seed=11), small_net(dtype=dtype, seed=11)
    opt_a, opt_b = bp.SGD(lr=0.1), bp.SGD(lr=0.1)
    first = a.fit(X, y, loss=CE, optimizer=opt_a, epochs=2, batch_size=6).history["loss"]
    b.fit(X, y, loss=CE, optimizer=opt_b, epochs=1, batch_size=6)
    second = b.fit(X, y, loss=CE, optimizer=opt_b, epochs=1, batch_size=6).history["loss"]
    assert first[1] == second[0]  # the stream continues across calls
    np.testing.assert_array_equal(a.parameters, b.parameters)


def test_fit_shuffle_gathers_labels_and_targets_alike():
    """Shuffled fit with integer labels equals shuffled fit with one-hot targets."""
    X, y = make_data(n=31)
    a, b = small_net(seed=3), small_net(seed=3)
    onehot = np.eye(3)[y]
    ha = a.fit(X, y, loss=CE, optimizer=bp.Adam(lr=0.01), epochs=3, batch_size=8)
    hb = b.fit(X, onehot, loss=CE, optimizer=bp.Adam(lr=0.01), epochs=3, batch_size=8)
    np.testing.assert_allclose(a.parameters, b.parameters, rtol=1e-11, atol=1e-13)
    np.testing.assert_allclose(ha.history["loss"], hb.history["loss"], rtol=1e-12)


def test_fit_shuffle_is_a_permutation_per_epoch():
    """With SGD on the mean-squared error and lr = 0 nothing moves, so each epoch's loss
    is the plain mean over all samples whatever the order: shuffling visits every
    sample once."""
    rng = np.random.default_rng(0)
    X, t = rng.standard_normal((29, 4)), rng.standard_normal((29, 2))
    net = small_net(sizes=(4, 8, 2))
    expected = bp.MSE()(net.predict(X), t)
    history = net.fit(X, t, loss=bp.MSE(), optimizer=bp.SGD(lr=0.0), epochs=3, batch_size=4)
    np.testing.assert_allclose(history.history["loss"], [expected] * 3, rtol=1e-13)


# =========================================================================== 5. learning
def test_learns_xor():
    X = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=float)
    y = np.array([[0], [1], [1], [0]], dtype=float)
    net = bp.Network([bp.Dense(2, 32, "tanh"), bp.Dense(32, 1)], dtype="float64", seed=0)
    loss = bp.BinaryCrossEntropy()
    history = net.fit(X, y, loss=loss, optimizer=bp.Adam(lr=0.01), epochs=400)
    assert history.history["loss"][-1] < 0.1 * history.history["loss"][0]
    np.testing.assert_array_equal(net.predict(X) > 0, y > 0.5)


def test_digits_accuracy():
    sklearn = pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    assert sklearn
    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X / 16.0, y, test_size=0.25,
                                                        random_state=0)
    net = bp.Network([bp.Dense(64, 64, "relu"), bp.Dense(64, 10)], seed=0)
    history = net.fit(X_train, y_train, loss=CE, optimizer=bp.Adam(lr=1e-3), epochs=100,
                      batch_size=32)
    assert history.history["loss"][-1] < history.history["loss"][0]
    accuracy = np.mean(net.predict(X_test).argmax(1) == y_test)
    assert accuracy >= 0.97, accuracy


# =========================================================================== 6. determinism
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_same_seed_same_training(dtype):
    X, y = make_data(n=64, n_in=4)
    results = []
    for _ in range(2):
        net = bp.Network([bp.Dense(4, 32, "relu"), bp.Dense(32, 32, "gelu"),
                          bp.Dense(32, 3)], dtype=dtype, seed=21)
        net.fit(X, y, loss=CE, optimizer=bp.AdamW(lr=0.01), epochs=5, batch_size=10)
        results.append(net.parameters.copy())
    np.testing.assert_array_equal(results[0], results[1])


@contextlib.contextmanager
def num_threads(n):
    previous = bp.get_num_threads()
    bp.set_num_threads(n)
    try:
        yield
    finally:
        bp.set_num_threads(previous)


def test_thread_count_does_not_change_results():
    # 256 x 512 = 131072 elements per elementwise pass: above the parallel threshold
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((512, 32)), rng.integers(0, 10, 512)
    results = []
    for n in (1, 2):
        with num_threads(n):
            net = bp.Network([bp.Dense(32, 512, "relu"), bp.Dense(512, 512, "tanh"),
                              bp.Dense(512, 10)], dtype="float64", seed=0)
            net.fit(X, y, loss=CE, optimizer=bp.Adam(lr=1e-3), epochs=2, batch_size=256)
            results.append((net.parameters.copy(), net.predict(X)))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(results[0][1], results[1][1], rtol=1e-12, atol=1e-15)


def test_set_num_threads_is_restored_and_checked():
    previous = bp.get_num_threads()
    with num_threads(1):
        assert bp.get_num_threads() == 1
    assert bp.get_num_threads() == previous
    for bad in (0, -1):
        with pytest.raises(ValueError):
            bp.set_num_threads(bad)
    with pytest.raises(TypeError):
        bp.set_num_threads(1.5)
    assert bp.get_num_threads() == previous


# =========================================================================== 7. allocation
def test_train_step_allocates_nothing():
    rng = np.random.default_rng(0)
    X = np.ascontiguousarray(rng.standard_normal((32, 16)), dtype=np.float32)
    y = np.ascontiguousarray(rng.integers(0, 4, 32), dtype=np.intp)
    net = bp.Network([bp.Dense(16, 32, "relu"), bp.Dense(32, 4)], seed=0)
    loss, opt = bp.CrossEntropy(), bp.Adam(lr=1e-3)
    for _ in range(20):
        net.train_step(X, y, loss, opt)
    gc.collect()
    tracemalloc.start()
    try:
        for _ in range(20):
            net.train_step(X, y, loss, opt)
        tracemalloc.reset_peak()
        start, _ = tracemalloc.get_traced_memory()
        for _ in range(1000):
            net.train_step(X, y, loss, opt)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert current - start < 10_000, (start, current)
    # a step that allocated even its (32, 4) float32 output (512 bytes plus the array
    # object) would peak above this; the hidden activations alone are 4 KB
    assert peak - start < 1024, (start, peak)


# =========================================================================== 8. threads
def _wide_net(seed):
    return bp.Network([bp.Dense(32, 512, "relu"), bp.Dense(512, 512, "relu"),
                       bp.Dense(512, 10)], dtype="float64", seed=seed)


def test_threads_training_own_networks_match_sequential():
    rng = np.random.default_rng(0)
    data = [(rng.standard_normal((64, 32)), rng.integers(0, 10, 64)) for _ in range(2)]
    n_steps = 100

    def train(net, opt, X, y, out=None, index=None):
        for _ in range(n_steps):
            net.train_step(X, y, CE, opt)
        if out is not None:
            out[index] = net.parameters.copy()

    with num_threads(1):  # two Python threads on two cores, no oversubscription
        sequential = []
        for i, (X, y) in enumerate(data):
            net = _wide_net(i)
            train(net, bp.Adam(lr=1e-3), X, y)
            sequential.append(net.parameters.copy())
        threaded = [None, None]
        threads = [threading.Thread(target=train, args=(_wide_net(i), bp.Adam(lr=1e-3), X, y,
                                                        threaded, i))
                   for i, (X, y) in enumerate(data)]
        start_and_join(threads)
    for a, b in zip(sequential, threaded):
        np.testing.assert_array_equal(a, b)


def test_compiled_step_releases_the_gil():
    """While one thread is inside a long compiled call, a pure-Python thread runs."""
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((2048, 32)), rng.integers(0, 10, 2048)
    net = _wide_net(0)
    ratios = []
    with num_threads(1):
        net.compute_gradients(X, y, CE)  # warm-up: workspaces sized
        for _ in range(3):
            counter = [0]
            stop = threading.Event()

            def spin(stop=stop, counter=counter):
                while not stop.is_set():
                    counter[0] += 1

            spinner = threading.Thread(target=spin)
            spinner.start()
            try:
                time.sleep(0.02)
                c0, t0 = counter[0], time.perf_counter()
                time.sleep(0.1)  # sleep releases the GIL: the spinner's full rate
                rate = (counter[0] - c0) / (time.perf_counter() - t0)
                c0, t0 = counter[0], time.perf_counter()
                for _ in range(3):
                    net.compute_gradients(X, y, CE)
                spun = (counter[0] - c0) / (time.perf_counter() - t0)
            finally:
                stop.set()
                spinner.join()
            ratios.append(spun / max(rate, 1.0))
            if ratios[-1] > 0.2:
                break
    # holding the GIL would leave the spinner a few switch intervals (~0.005 s each) in
    # a call of ~0.1 s or more, i.e. a ratio near 0
    print("spinner rate ratios during the compiled calls:", ratios)
    assert max(ratios) > 0.2, ratios


_SUBPROCESS_PRELUDE = RACE_PRELUDE + """
import json, threading, numpy as np, bpfast as bp
bp.set_num_threads(1)
CE = bp.CrossEntropy()
def make():
    return bp.Network([bp.Dense(32, 256, "relu"), bp.Dense(256, 10)], dtype="float64", seed=1)
rng = np.random.default_rng(0)
X, y = rng.standard_normal((256, 32)), rng.integers(0, 10, 256)
def replay(k):
    net, opt = make(), bp.Adam(lr=1e-3)
    for _ in range(k):
        net.train_step(X, y, CE, opt)
    return net
"""


def _run_isolated(body):
    """Run a concurrency scenario in a fresh interpreter, so that a crash is a failure
    of this test rather than the end of the test session; its JSON result."""
    return run_isolated(_SUBPROCESS_PRELUDE + textwrap.dedent(body), timeout=120)


def _check_race_result(result):
    for message in result["errors"]:
        assert "thread" in message, message
    assert result["mismatches"] == [], result


def test_one_network_two_threads_warm():
    """Two threads stepping one (warmed-up) network: every call either completes a whole
    step or raises RuntimeError; the result is that many steps, bitwise."""
    result = _run_isolated("""
        errors, mismatches = [], []
        for trial in range(5):
            net, opt = make(), bp.Adam(lr=1e-3)
            net.train_step(X, y, CE, opt)
            done = [0, 0]
            def work(i):
                for _ in range(30):
                    try:
                        net.train_step(X, y, CE, opt)
                        done[i] += 1
                    except RuntimeError as e:
                        errors.append(str(e))
            race(lambda: work(0), lambda: work(1))
            k = 1 + sum(done)
            if opt.step_count != k or not np.array_equal(replay(k).parameters,
                                                         net.parameters):
                mismatches.append([trial, done, opt.step_count])
        print(json.dumps({"errors": errors[:20], "mismatches": mismatches}))
    """)
    _check_race_result(result)


def test_one_network_two_threads_first_step():
    """The same with two threads making the very first steps (the optimizer binds its
    state to the network on first use)."""
    result = _run_isolated("""
        errors, mismatches = [], []
        for trial in range(20):
            net, opt = make(), bp.Adam(lr=1e-3)
            net.forward(X)  # workspaces sized; the optimizer still unbound
            done = [0, 0]
            def work(i):
                for _ in range(3):
                    try:
                        net.train_step(X, y, CE, opt)
                        done[i] += 1
                    except RuntimeError as e:
                        errors.append(str(e))
            race(lambda: work(0), lambda: work(1))
            k = sum(done)
            if opt.step_count != k or not np.array_equal(replay(k).parameters,
                                                         net.parameters):
                mismatches.append([trial, done, opt.step_count])
        print(json.dumps({"errors": errors[:20], "mismatches": mismatches}))
    """)
    _check_race_result(result)


def test_one_network_growing_batch_from_another_thread():
    """A second thread calling forward() with ever larger batches (so that workspaces
    would have to grow) while the first trains: it raises RuntimeError or completes,
    and the training thread's result is untouched."""
    result = _run_isolated("""
        errors, mismatches = [], []
        net, opt = make(), bp.Adam(lr=1e-3)
        net.train_step(X, y, CE, opt)
        done = [0]
        def train():
            for _ in range(40):
                net.train_step(X, y, CE, opt)
                done[0] += 1
        def grow():
            for n in range(257, 657):
                try:
                    net.forward(rng.standard_normal((n, 32)))
                except RuntimeError as e:
                    errors.append(str(e))
        threads = [threading.Thread(target=train), threading.Thread(target=grow)]
        [t.start() for t in threads]; [t.join() for t in threads]
        if not np.array_equal(replay(1 + done[0]).parameters, net.parameters):
            mismatches.append(done)
        print(json.dumps({"errors": errors[:20], "mismatches": mismatches}))
    """)
    _check_race_result(result)


def test_pickle_and_deepcopy_give_an_equal_independent_network():
    import copy
    import pickle
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((40, 5)), rng.integers(0, 3, 40)
    net = bp.Network([bp.Dense(5, 8, "leaky_relu", negative_slope=0.2),
                      bp.Dense(8, 6, "elu", alpha=0.5, bias=False), bp.Dense(6, 3)],
                     dtype="float64", seed=3)
    net.fit(X, y, loss="cross_entropy", optimizer=bp.Adam(lr=0.01), epochs=2, batch_size=8)
    for clone in (pickle.loads(pickle.dumps(net)), copy.deepcopy(net)):
        assert repr(clone) == repr(net) and clone.epochs_trained == net.epochs_trained
        np.testing.assert_array_equal(clone.parameters, net.parameters)
        np.testing.assert_array_equal(clone.predict(X), net.predict(X))
        # the same future: shuffling continues from the same RNG state
        a_opt, b_opt = bp.SGD(lr=0.1), bp.SGD(lr=0.1)
        twin = copy.deepcopy(net)
        clone.fit(X, y, loss="cross_entropy", optimizer=a_opt, epochs=1, batch_size=8)
        twin.fit(X, y, loss="cross_entropy", optimizer=b_opt, epochs=1, batch_size=8)
        np.testing.assert_array_equal(clone.parameters, twin.parameters)
        assert not np.shares_memory(clone.parameters, net.parameters)
