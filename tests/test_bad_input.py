"""Bad input, one table row per case: a clear ValueError or TypeError, nothing changed.

Every row asserts three things:

* the exception type (ValueError for a bad value or shape, TypeError for a bad type),
* a message fragment naming the argument (``match=``),
* that the failed call left the network and the optimizer byte-identical:
  ``net.parameters``, ``net.gradients``, ``opt.step_count``, ``opt.lr`` and every
  ``opt.state`` array, snapshot with ``.copy()`` before and compared by bytes after.

Inputs that must be *accepted* (integer X, strided, Fortran-ordered, read-only,
memory-mapped, unaligned or byte-swapped X, labels from a memory map) are checked
against the result of the plain contiguous float copy, bitwise. Class-probability
targets whose rows do not sum to 1 are accepted (PyTorch's semantics) and checked
against the NumPy oracle ``tests/oracle.py``.

tests/test_network.py already checks the exception *types* of many of these
inputs; this file is the table with the messages and the byte-identity checks.
"""
import contextlib

import numpy as np
import oracle as ref
import pytest
from training_data import network_calls

import bpfast as bp

N, N_IN, N_OUT = 20, 4, 3
CE = bp.CrossEntropy()


# --------------------------------------------------------------------------- helpers
def make_net(dtype="float64", seed=0, n_out=N_OUT, output=None):
    return bp.Network([bp.Dense(N_IN, 8, "tanh"), bp.Dense(8, n_out, output)],
                      dtype=dtype, seed=seed)


def make_data(n=N, seed=0):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, N_IN)), rng.integers(0, N_OUT, n).astype(np.intp)


def warmed_up(dtype="float64"):
    """A network and an Adam whose state is non-trivial (three steps), and the data."""
    X, y = make_data()
    net, opt = make_net(dtype), bp.Adam(lr=0.01)
    for _ in range(3):
        net.train_step(X, y, CE, opt)
    return net, opt, X, y


def snapshot(net=None, opt=None):
    snap = {}
    if net is not None:
        snap["parameters"] = net.parameters.copy()
        snap["gradients"] = net.gradients.copy()
    if opt is not None:
        snap["step_count"] = opt.step_count
        snap["lr"] = opt.lr
        snap["state"] = {name: value.copy() for name, value in opt.state.items()}
    return snap


def assert_same(before, after):
    assert before.keys() == after.keys()
    for key in before:
        if key == "state":
            assert before[key].keys() == after[key].keys(), "optimizer state appeared/vanished"
            for name in before[key]:
                assert before[key][name].dtype == after[key][name].dtype
                assert before[key][name].tobytes() == after[key][name].tobytes(), \
                    f"optimizer state {name!r} changed during a call that raised"
        elif isinstance(before[key], np.ndarray):
            assert before[key].dtype == after[key].dtype
            assert before[key].tobytes() == after[key].tobytes(), \
                f"net.{key} changed during a call that raised"
        else:
            assert before[key] == after[key], f"{key} changed during a call that raised"


@contextlib.contextmanager
def raises_and_unchanged(error, match, net=None, opt=None, *others):
    """pytest.raises(error, match=match), and net/opt (and others) byte-identical after."""
    befores = [snapshot(net, opt)] + [snapshot(*o) for o in others]
    with pytest.raises(error, match=match) as info:
        yield info
    afters = [snapshot(net, opt)] + [snapshot(*o) for o in others]
    for b, a in zip(befores, afters):
        assert_same(b, a)


def table(cases, prefix):
    """pytest params from (id, *values) rows, with readable ids."""
    return [pytest.param(*case[1:], id=f"{prefix}-{case[0]}") for case in cases]


# =========================================================================== X
def _with(X, *entries, dtype=None, order="C"):
    bad = np.array(X, dtype=dtype or X.dtype, order=order)
    for row, col, value in entries:
        bad[row, col] = value
    return bad


def _strided_nan(X):
    wide = np.zeros((X.shape[0], 2 * X.shape[1]))
    wide[:, ::2] = X
    wide[6, 4] = np.nan  # X column 2
    wide[6, 1] = np.inf  # not part of the view
    return wide[:, ::2]


def _long_x_with_late_nan(X):
    """3000 rows: the first bad value lies past the first 1024-element scan block."""
    big = np.tile(X, (150, 1))
    big[2500, 3] = np.nan
    big[2900, 0] = np.inf
    return big


# (id, builder of the bad X from the good one, error, match)
X_CASES = [
    ("nan", lambda X: _with(X, (2, 1, np.nan)), ValueError, r"X contains nan at row 2, column 1"),
    ("inf", lambda X: _with(X, (0, 3, np.inf)), ValueError, r"X contains inf at row 0, column 3"),
    ("-inf", lambda X: _with(X, (19, 0, -np.inf)), ValueError, r"X .*row 19, column 0"),
    ("first_of_two", lambda X: _with(X, (7, 0, np.inf), (5, 2, np.nan)), ValueError,
     r"X contains nan at row 5, column 2"),
    # in memory order (column-major) the inf at (3, 0) comes first; the message must
    # still name the first bad value by row, the one at (1, 2)
    ("fortran_first_by_row", lambda X: _with(X, (3, 0, np.inf), (1, 2, np.nan), order="F"),
     ValueError, r"X contains nan at row 1, column 2"),
    ("strided_nan", _strided_nan, ValueError, r"X contains nan at row 6, column 2"),
    ("late_nan_3000_rows", _long_x_with_late_nan, ValueError,
     r"X contains nan at row 2500, column 3"),
    ("float32_nan", lambda X: _with(X, (4, 3, np.nan), dtype=np.float32), ValueError,
     r"X contains nan at row 4, column 3"),
    ("overflows_float32", lambda X: _with(X, (9, 1, 1e300)), ValueError, r"X .*row 9, column 1"),
    ("features", lambda X: np.zeros((X.shape[0], N_IN + 1)), ValueError,
     r"X has 5 features, but the network takes 4"),
    ("features_0", lambda X: np.zeros((X.shape[0], 0)), ValueError,
     r"X (has 0 features|is empty)"),
    ("empty", lambda X: np.zeros((0, N_IN)), ValueError, r"X is empty"),
    ("1d", lambda X: X[0].copy(), ValueError, r"X must be 2-D, got shape \(4,\)"),
    ("3d", lambda X: X.reshape(1, *X.shape), ValueError, r"X must be 2-D, got shape \(1, 20, 4\)"),
    ("0d", lambda X: np.float64(1.0), ValueError, r"X must be 2-D"),
    ("none", lambda X: None, TypeError, r"X must hold real numbers"),
    ("str_array", lambda X: X.astype(str), TypeError, r"X must hold real numbers"),
    ("str", lambda X: "1 2 3 4", TypeError, r"X must hold real numbers"),
    ("complex", lambda X: X.astype(complex), TypeError, r"X must hold real numbers.*complex"),
    ("bool", lambda X: X > 0, TypeError, r"X must hold real numbers.*bool"),
    ("object", lambda X: X.astype(object), TypeError, r"X must hold real numbers.*object"),
    ("datetime", lambda X: np.zeros(X.shape, "datetime64[s]"), TypeError,
     r"X must hold real numbers"),
    ("structured", lambda X: np.zeros(X.shape, [("a", "f8")]), TypeError,
     r"X must hold real numbers"),
    ("ragged_list", lambda X: [[1.0, 2.0, 3.0, 4.0], [1.0, 2.0]], (ValueError, TypeError),
     r"\bX\b"),
]

CALLS = network_calls(CE, fit_epochs=2)
Y_CALLS = ["compute_gradients", "train_step", "fit"]


def _x_params():
    for case_id, build, error, match in X_CASES:
        for dtype in ("float64", "float32"):
            for call in CALLS:
                if case_id == "overflows_float32" and dtype == "float64":
                    continue  # 1e300 is a fine float64
                yield pytest.param(build, error, match, dtype, call,
                                   id=f"X-{case_id}-{dtype}-{call}")


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")
@pytest.mark.parametrize("build, error, match, dtype, call", list(_x_params()))
def test_bad_x(build, error, match, dtype, call):
    net, opt, X, y = warmed_up(dtype)
    bad = build(X)
    # labels as many as X's rows where X has rows, so that only X is wrong
    rows = bad.shape[0] if isinstance(bad, np.ndarray) and bad.ndim >= 1 else 0
    labels = np.resize(y, rows) if rows > 0 else y
    with raises_and_unchanged(error, match, net, opt):
        CALLS[call](net, opt, bad, labels)


# =========================================================================== y / targets
def _labels(y, index, value, dtype=None):
    bad = np.array(y, dtype=dtype or y.dtype)
    bad[index] = value
    return bad


# (id, loss, builder of the bad target from (y labels, n), error, match)
Y_CASES = [
    ("labels_long", CE, lambda y: np.append(y, 0), ValueError,
     r"target has 21 labels for 20 samples"),
    ("labels_short", CE, lambda y: y[:-1], ValueError, r"target has 19 labels for 20 samples"),
    ("labels_out_of_range", CE, lambda y: _labels(y, 5, 3), ValueError,
     r"class label 3 at row \d+ is out of range for 3 outputs"),
    ("labels_huge", CE, lambda y: _labels(y, 5, 2**62), ValueError,
     r"class label \d+ at row \d+ is out of range"),
    ("labels_negative", CE, lambda y: _labels(y, 5, -1), ValueError,
     r"class label -1 at row \d+ is out of range"),
    ("labels_fraction", CE, lambda y: y + 0.5, TypeError, r"class labels must be integers"),
    ("labels_one_fraction", CE, lambda y: _labels(y, 7, 1.25, np.float64), TypeError,
     r"class labels must be integers"),
    # NaN/inf in y: the issue asks for the position of the first one
    ("labels_nan", CE, lambda y: _labels(y, 5, np.nan, np.float64), (ValueError, TypeError),
     r"(?=.*\bnan\b)(?=.*\brow 5\b)"),
    ("labels_inf", CE, lambda y: _labels(y, 5, np.inf, np.float64), (ValueError, TypeError),
     r"(?=.*\binf\b)(?=.*\brow 5\b)"),
    ("labels_str", CE, lambda y: y.astype(str), TypeError, r"class labels must be integers"),
    ("labels_bool", CE, lambda y: y > 0, TypeError, r"class labels must be integers"),
    ("labels_object", CE, lambda y: y.astype(object), TypeError, r"class labels must be integers"),
    ("labels_complex", CE, lambda y: y.astype(complex), TypeError, r"(class labels|target)"),
    ("labels_column", CE, lambda y: y[:, None], ValueError, r"target has shape \(20, 1\)"),
    ("labels_none", CE, lambda y: None, (ValueError, TypeError), r"target"),
    ("probs_width", CE, lambda y: np.full((N, 4), 0.25), ValueError,
     r"target has shape \(20, 4\)"),
    ("probs_nan", CE, lambda y: _with(np.eye(3)[y], (11, 2, np.nan)), ValueError,
     r"target contains nan at row 11, column 2"),
    ("probs_inf", CE, lambda y: _with(np.eye(3)[y], (0, 0, np.inf)), ValueError,
     r"target contains inf at row 0, column 0"),
    ("mse_shape", bp.MSE(), lambda y: np.zeros((N, 2)), ValueError, r"target has shape \(20, 2\)"),
    ("mse_1d_for_3_outputs", bp.MSE(), lambda y: np.zeros(N), ValueError,
     r"target has shape \(20,\)"),
    ("mse_rows", bp.MSE(), lambda y: np.zeros((N + 1, N_OUT)), ValueError,
     r"target has shape \(21, 3\)"),
    ("mse_3d", bp.MSE(), lambda y: np.zeros((N, N_OUT, 1)), ValueError, r"target has shape"),
    ("mse_nan", bp.MSE(), lambda y: _with(np.zeros((N, N_OUT)), (4, 1, np.nan)), ValueError,
     r"target contains nan at row 4, column 1"),
    ("mse_complex", bp.MSE(), lambda y: np.zeros((N, N_OUT), complex), TypeError,
     r"target must hold real numbers"),
    ("mse_str", bp.MSE(), lambda y: np.zeros((N, N_OUT)).astype(str), TypeError,
     r"target must hold real numbers"),
    ("huber_inf", bp.Huber(0.5), lambda y: _with(np.zeros((N, N_OUT)), (13, 0, -np.inf)),
     ValueError, r"target contains -inf at row 13, column 0"),
    ("l1_empty", bp.L1(), lambda y: np.zeros((0, N_OUT)), ValueError,
     r"target has shape \(0, 3\)"),
    ("bce_above_1", bp.BinaryCrossEntropy(), lambda y: np.full((N, N_OUT), 1.5), ValueError,
     r"targets must lie in \[0, 1\]"),
    ("bce_below_0", bp.BinaryCrossEntropy(), lambda y: _with(np.zeros((N, N_OUT)), (3, 1, -0.1)),
     ValueError, r"targets must lie in \[0, 1\]"),
    ("bce_nan", bp.BinaryCrossEntropy(), lambda y: _with(np.zeros((N, N_OUT)), (3, 1, np.nan)),
     ValueError, r"target contains nan at row 3, column 1"),
]


@pytest.mark.parametrize("call", Y_CALLS)
@pytest.mark.parametrize("loss, build, error, match",
                         table(Y_CASES, "y"))
def test_bad_target(loss, build, error, match, call):
    net, opt, X, y = warmed_up()
    bad = build(y)
    calls = {
        "compute_gradients": lambda: net.compute_gradients(X, bad, loss),
        "train_step": lambda: net.train_step(X, bad, loss, opt),
        "fit": lambda: net.fit(X, bad, loss=loss, optimizer=opt, epochs=2, batch_size=4),
    }
    with raises_and_unchanged(error, match, net, opt):
        calls[call]()


def test_single_output_1d_target_nan_names_row_and_column_0():
    net = bp.Network([bp.Dense(N_IN, 5, "tanh"), bp.Dense(5, 1)], dtype="float64", seed=0)
    opt = bp.SGD(lr=0.1, momentum=0.9)
    X, _ = make_data()
    t = np.linspace(-1, 1, N)
    net.train_step(X, t, bp.MSE(), opt)
    t[8] = np.nan
    with raises_and_unchanged(ValueError, r"target contains nan at row 8, column 0", net, opt):
        net.train_step(X, t, bp.MSE(), opt)


# =========================================================================== loss(...) directly
LOSS_CALL_CASES = [
    ("output_1d", bp.MSE(), np.zeros(3), np.zeros(3), ValueError, r"output must be 2-D"),
    ("output_3d", bp.MSE(), np.zeros((2, 3, 1)), np.zeros((2, 3)), ValueError,
     r"output must be 2-D"),
    ("output_empty", bp.MSE(), np.zeros((0, 3)), np.zeros((0, 3)), ValueError, r"output is empty"),
    ("output_nan", bp.MSE(), _with(np.zeros((4, 3)), (2, 1, np.nan)), np.zeros((4, 3)),
     ValueError, r"output contains nan at row 2, column 1"),
    ("output_str", bp.L1(), np.zeros((4, 3)).astype(str), np.zeros((4, 3)), TypeError,
     r"output must hold real numbers"),
    ("output_complex", bp.Huber(), np.zeros((4, 3), complex), np.zeros((4, 3)), TypeError,
     r"output must hold real numbers"),
    ("target_shape", bp.MSE(), np.zeros((4, 3)), np.zeros((4, 2)), ValueError,
     r"target has shape"),
    ("target_nan", bp.MSE(), np.zeros((4, 3)), _with(np.zeros((4, 3)), (3, 2, np.nan)),
     ValueError, r"target contains nan at row 3, column 2"),
    ("labels_count", CE, np.zeros((4, 3)), np.array([0, 1, 2]), ValueError,
     r"target has 3 labels for 4 samples"),
    ("labels_range", CE, np.zeros((4, 3)), np.array([0, 1, 2, 3]), ValueError,
     r"class label 3 at row \d+ is out of range"),
    ("labels_negative", CE, np.zeros((4, 3)), np.array([0, -2, 2, 1]), ValueError,
     r"class label -2 at row 1 is out of range"),
    ("labels_fraction", CE, np.zeros((4, 3)), np.array([0, 0.5, 2, 1]), TypeError,
     r"class labels must be integers"),
    ("probs_output_not_in_0_1", bp.BinaryCrossEntropy(), np.zeros((4, 3)), np.full((4, 3), 2.0),
     ValueError, r"targets must lie in \[0, 1\]"),
]


@pytest.mark.parametrize("method", ["__call__", "gradient"])
@pytest.mark.parametrize("loss, out, target, error, match",
                         table(LOSS_CALL_CASES, "loss"))
def test_bad_loss_call(loss, out, target, error, match, method):
    out_before, target_before = np.array(out, copy=True), np.array(target, copy=True)
    with pytest.raises(error, match=match):
        getattr(loss, method)(out, target)
    assert np.array(out).tobytes() == out_before.tobytes()  # the caller's arrays untouched
    assert np.array(target).tobytes() == target_before.tobytes()


# =========================================================================== backward
def test_backward_before_any_forward():
    net, opt = make_net(), bp.SGD(lr=0.1)
    with raises_and_unchanged(ValueError, r"backward\(\) needs a preceding forward\(\)", net, opt):
        net.backward(np.ones((N, N_OUT)))


@pytest.mark.parametrize("fused", ["train_step", "compute_gradients", "fit"])
def test_backward_after_a_fused_call(fused):
    net, opt, X, y = warmed_up()
    {"train_step": lambda: net.train_step(X, y, CE, opt),
     "compute_gradients": lambda: net.compute_gradients(X, y, CE),
     "fit": lambda: net.fit(X, y, loss=CE, optimizer=opt, epochs=1)}[fused]()
    with raises_and_unchanged(ValueError, r"forward", net, opt):
        net.backward(np.ones((N, N_OUT)))


BACKWARD_CASES = [
    ("columns", np.ones((N, N_OUT + 1)), ValueError, r"grad_output has shape \(20, 4\)"),
    ("rows", np.ones((N + 1, N_OUT)), ValueError, r"grad_output has shape \(21, 3\)"),
    ("flat", np.ones(N * N_OUT), ValueError, r"grad_output must be 2-D"),
    ("3d", np.ones((N, N_OUT, 1)), ValueError, r"grad_output must be 2-D"),
    ("empty", np.ones((0, N_OUT)), ValueError, r"grad_output (is empty|has shape)"),
    ("nan", _with(np.ones((N, N_OUT)), (3, 2, np.nan)), ValueError,
     r"grad_output contains nan at row 3, column 2"),
    ("inf", _with(np.ones((N, N_OUT)), (19, 0, np.inf)), ValueError,
     r"grad_output contains inf at row 19, column 0"),
    ("complex", np.ones((N, N_OUT), complex), TypeError, r"grad_output must hold real numbers"),
    ("bool", np.ones((N, N_OUT), bool), TypeError, r"grad_output must hold real numbers"),
    ("none", None, TypeError, r"grad_output must hold real numbers"),
]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("grad, error, match",
                         table(BACKWARD_CASES, "grad"))
def test_bad_grad_output(grad, error, match, dtype):
    net, opt, X, _ = warmed_up(dtype)
    g = np.random.default_rng(1).standard_normal((N, N_OUT))
    net.forward(X)
    net.backward(g)  # gradients now hold this backward's result
    with raises_and_unchanged(error, match, net, opt):
        net.backward(grad)
    # and the cached forward pass survived the failed call: the same backward again
    expected = net.gradients.copy()
    net.backward(g)
    assert net.gradients.tobytes() == expected.tobytes()


def test_failed_forward_keeps_the_previous_forward_cache():
    net, twin = make_net(), make_net()
    X, _ = make_data()
    g = np.random.default_rng(1).standard_normal((N, N_OUT))
    net.forward(X)
    with raises_and_unchanged(ValueError, r"X contains nan at row 1, column 1", net):
        net.forward(_with(np.ones((50, N_IN)), (1, 1, np.nan)))
    with raises_and_unchanged(ValueError, r"X has 5 features", net):
        net.forward(np.ones((50, N_IN + 1)))
    net.backward(g)
    twin.forward(X)
    twin.backward(g)
    assert net.gradients.tobytes() == twin.gradients.tobytes()


# =========================================================================== constructors
CONSTRUCTOR_CASES = [
    ("size_mismatch", lambda: bp.Network([bp.Dense(4, 8), bp.Dense(7, 3)]), ValueError,
     r"layer 1 takes 7 inputs but layer 0 gives 8 outputs"),
    ("size_mismatch_deep", lambda: bp.Network([bp.Dense(4, 8), bp.Dense(8, 5), bp.Dense(6, 2)]),
     ValueError, r"layer 2 takes 6 inputs but layer 1 gives 5 outputs"),
    ("softmax_hidden", lambda: bp.Network([bp.Dense(4, 8, "softmax"), bp.Dense(8, 3)]), ValueError,
     r"softmax is only allowed on the last layer \(layer 0 is hidden\)"),
    ("layers_empty", lambda: bp.Network([]), TypeError, r"layers must be a non-empty list"),
    ("layers_not_list", lambda: bp.Network(bp.Dense(2, 2)), TypeError, r"layers must be"),
    ("layers_not_dense", lambda: bp.Network([bp.Dense(2, 2), "relu"]), TypeError,
     r"layers must be"),
    ("seed_negative", lambda: bp.Network([bp.Dense(2, 2)], seed=-1), ValueError,
     r"seed must be >= 0"),
    ("seed_float", lambda: bp.Network([bp.Dense(2, 2)], seed=1.5), TypeError,
     r"seed must be an integer"),
    ("seed_str", lambda: bp.Network([bp.Dense(2, 2)], seed="1"), TypeError,
     r"seed must be an integer"),
    ("in_features_0", lambda: bp.Dense(0, 2), ValueError, r"in_features must be >= 1"),
    ("out_features_negative", lambda: bp.Dense(2, -3), ValueError, r"out_features must be >= 1"),
    ("in_features_float", lambda: bp.Dense(2.5, 2), TypeError, r"in_features must be an integer"),
    ("in_features_bool", lambda: bp.Dense(True, 2), TypeError, r"in_features must be an integer"),
    ("out_features_str", lambda: bp.Dense(2, "3"), TypeError, r"out_features must be an integer"),
    ("bias_str", lambda: bp.Dense(2, 2, bias="no"), TypeError, r"bias must be True or False"),
    ("negative_slope_elsewhere", lambda: bp.Dense(2, 2, "relu", negative_slope=0.1), ValueError,
     r"negative_slope is only for"),
    ("negative_slope_nan", lambda: bp.Dense(2, 2, "leaky_relu", negative_slope=float("nan")),
     ValueError, r"negative_slope must be finite"),
    ("negative_slope_str", lambda: bp.Dense(2, 2, "leaky_relu", negative_slope="0.1"),
     TypeError, r"negative_slope must be a real number"),
    ("alpha_elsewhere", lambda: bp.Dense(2, 2, "tanh", alpha=1.0), ValueError,
     r"alpha is only for"),
    ("alpha_inf", lambda: bp.Dense(2, 2, "elu", alpha=float("inf")), ValueError,
     r"alpha must be finite"),
    ("huber_delta_0", lambda: bp.Huber(0.0), ValueError, r"delta must be > 0"),
    ("huber_delta_nan", lambda: bp.Huber(float("nan")), ValueError, r"delta must be finite"),
    ("huber_delta_str", lambda: bp.Huber("1"), TypeError, r"delta must be a real number"),
    ("mse_half_str", lambda: bp.MSE(half="yes"), TypeError, r"half must be True or False"),
    ("ce_from_logits_int", lambda: bp.CrossEntropy(from_logits=1), TypeError,
     r"from_logits must be True or False"),
    ("bce_from_logits_none", lambda: bp.BinaryCrossEntropy(from_logits=None), TypeError,
     r"from_logits must be True or False"),
]


@pytest.mark.parametrize("make, error, match",
                         table(CONSTRUCTOR_CASES, "ctor"))
def test_bad_constructor_argument(make, error, match):
    with pytest.raises(error, match=match):
        make()


def _listing(names):
    """A regex that matches a message listing every name."""
    return "".join(rf"(?=.*\b{name}\b)" for name in names)


UNKNOWN_NAME_CASES = [
    ("activation", lambda net, opt, X, y: bp.Dense(2, 2, activation="relux"),
     r"unknown activation 'relux'" + _listing(bp.ACTIVATIONS)),
    ("activation_case", lambda net, opt, X, y: bp.Dense(2, 2, activation="ReLUs"),
     r"unknown activation 'ReLUs'" + _listing(bp.ACTIVATIONS)),
    ("activation_not_str", lambda net, opt, X, y: bp.Dense(2, 2, activation=np.tanh),
     r"unknown activation" + _listing(bp.ACTIVATIONS)),
    ("init", lambda net, opt, X, y: bp.Dense(2, 2, init="xavier"),
     r"unknown init 'xavier'" + _listing(["he", "glorot", "normal", "pytorch"])),
    ("loss_train_step", lambda net, opt, X, y: net.train_step(X, y, "hinge", opt),
     r"unknown loss 'hinge'" + _listing(["mse", "l1", "huber", "cross_entropy",
                                         "binary_cross_entropy"])),
    ("loss_compute_gradients", lambda net, opt, X, y: net.compute_gradients(X, y, "nll"),
     r"unknown loss 'nll'" + _listing(["mse", "cross_entropy"])),
    ("loss_fit", lambda net, opt, X, y: net.fit(X, y, loss="CrossEntropie", optimizer=opt),
     r"unknown loss 'CrossEntropie'" + _listing(["mse", "cross_entropy"])),
    ("loss_class_not_instance", lambda net, opt, X, y: net.train_step(X, y, bp.MSE, opt),
     r"unknown loss" + _listing(["mse", "cross_entropy"])),
    ("optimizer_train_step", lambda net, opt, X, y: net.train_step(X, y, CE, "lbfgs"),
     r"unknown optimizer 'lbfgs'" + _listing(["sgd", "adam", "adamw", "rmsprop", "adagrad"])),
    ("optimizer_fit", lambda net, opt, X, y: net.fit(X, y, loss=CE, optimizer="Adamax"),
     r"unknown optimizer 'Adamax'" + _listing(["sgd", "adam", "adamw", "rmsprop", "adagrad"])),
    ("optimizer_none", lambda net, opt, X, y: net.train_step(X, y, CE, None),
     r"unknown optimizer None" + _listing(["sgd", "adam"])),
]


@pytest.mark.parametrize("call, match",
                         table(UNKNOWN_NAME_CASES, "unknown"))
def test_unknown_name_lists_the_valid_ones(call, match):
    net, opt, X, y = warmed_up()
    with raises_and_unchanged(ValueError, match, net, opt):
        call(net, opt, X, y)


DTYPE_CASES = ["float16", "float128", "int32", "int64", "uint8", "bool", "complex64",
               "complex128", "object", "U8", "xyz", "bfloat16", int, complex, bool, np.longdouble,
               np.int8, [("a", "f8")]]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.parametrize("dtype", DTYPE_CASES, ids=str)
def test_dtype_other_than_float32_or_float64(dtype):
    with pytest.raises(ValueError, match=r"dtype must be 'float32' or 'float64'"):
        bp.Network([bp.Dense(2, 2)], dtype=dtype)


def test_dtype_none_is_the_default_or_refused():
    """dtype=None must not silently pick float64 while the documented default is float32
    (numpy's np.dtype(None) is float64)."""
    try:
        net = bp.Network([bp.Dense(2, 2)], dtype=None)
    except (ValueError, TypeError) as error:
        assert "dtype" in str(error)
    else:
        assert net.parameters.dtype == bp.Network([bp.Dense(2, 2)]).parameters.dtype == np.float32


@pytest.mark.parametrize("dtype", ["float32", np.float32, np.dtype("float32"), "f4", "float64",
                                   np.float64, "f8", "double", float], ids=str)
def test_dtype_spellings_accepted(dtype):
    net = bp.Network([bp.Dense(2, 2)], dtype=dtype)
    assert net.parameters.dtype == np.dtype(dtype)
    assert net.parameters.dtype in (np.float32, np.float64)


# =========================================================================== hyperparameters
NAN, INF = float("nan"), float("inf")

# (optimizer class, keyword, bad value, error, match)
HYPER_CASES = []
for _cls in (bp.SGD, bp.Adam, bp.AdamW, bp.RMSprop, bp.Adagrad):
    HYPER_CASES += [
        (_cls, "lr", -0.1, ValueError, r"lr must be >= 0"),
        (_cls, "lr", NAN, ValueError, r"lr must be finite"),
        (_cls, "lr", INF, ValueError, r"lr must be finite"),
        (_cls, "lr", "0.1", TypeError, r"lr must be a real number"),
        (_cls, "lr", None, TypeError, r"lr must be a real number"),
        (_cls, "lr", True, TypeError, r"lr must be a real number"),
        (_cls, "lr", 0.1j, TypeError, r"lr must be a real number"),
        (_cls, "lr", np.array([0.1]), TypeError, r"lr must be a real number"),
        (_cls, "weight_decay", -1e-4, ValueError, r"weight_decay must be >= 0"),
        (_cls, "weight_decay", NAN, ValueError, r"weight_decay must be finite"),
    ]
for _cls in (bp.Adam, bp.AdamW, bp.RMSprop, bp.Adagrad):
    HYPER_CASES += [
        (_cls, "eps", -1e-8, ValueError, r"eps must be >= 0"),
        (_cls, "eps", NAN, ValueError, r"eps must be finite"),
        (_cls, "eps", INF, ValueError, r"eps must be finite"),
        (_cls, "eps", "1e-8", TypeError, r"eps must be a real number"),
        (_cls, "eps", None, TypeError, r"eps must be a real number"),
    ]
for _cls in (bp.SGD, bp.RMSprop):
    HYPER_CASES += [
        (_cls, "momentum", -0.5, ValueError, r"momentum must be >= 0"),
        (_cls, "momentum", NAN, ValueError, r"momentum must be finite"),
        (_cls, "momentum", INF, ValueError, r"momentum must be finite"),
        (_cls, "momentum", "0.9", TypeError, r"momentum must be a real number"),
        (_cls, "momentum", None, TypeError, r"momentum must be a real number"),
    ]
for _cls in (bp.Adam, bp.AdamW):
    HYPER_CASES += [
        (_cls, "betas", (1.0, 0.999), ValueError, r"betas\[0\] must be < 1"),
        (_cls, "betas", (0.9, 1.5), ValueError, r"betas\[1\] must be < 1"),
        (_cls, "betas", (-0.1, 0.999), ValueError, r"betas\[0\] must be >= 0"),
        (_cls, "betas", (0.9, NAN), ValueError, r"betas\[1\] must be finite"),
        (_cls, "betas", (NAN, 0.9), ValueError, r"betas\[0\] must be finite"),
        (_cls, "betas", ("0.9", 0.999), TypeError, r"betas\[0\] must be a real number"),
        (_cls, "betas", (0.9, None), TypeError, r"betas\[1\] must be a real number"),
        (_cls, "betas", 0.9, TypeError, r"betas must be a pair"),
        (_cls, "betas", (0.9,), TypeError, r"betas must be a pair"),
        (_cls, "betas", (0.9, 0.99, 0.999), TypeError, r"betas must be a pair"),
        (_cls, "betas", None, TypeError, r"betas must be a pair"),
        (_cls, "amsgrad", 1, TypeError, r"amsgrad must be True or False"),
    ]
HYPER_CASES += [
    (bp.SGD, "dampening", NAN, ValueError, r"dampening must be finite"),
    (bp.SGD, "dampening", "0", TypeError, r"dampening must be a real number"),
    (bp.SGD, "nesterov", "yes", TypeError, r"nesterov must be True or False"),
    (bp.SGD, "nesterov", True, ValueError, r"nesterov"),  # without momentum
    (bp.RMSprop, "alpha", 1.5, ValueError, r"alpha must be <= 1"),
    (bp.RMSprop, "alpha", -0.1, ValueError, r"alpha must be >= 0"),
    (bp.RMSprop, "alpha", NAN, ValueError, r"alpha must be finite"),
    (bp.RMSprop, "centered", "no", TypeError, r"centered must be True or False"),
    (bp.Adagrad, "lr_decay", -0.1, ValueError, r"lr_decay must be >= 0"),
    (bp.Adagrad, "lr_decay", NAN, ValueError, r"lr_decay must be finite"),
    (bp.Adagrad, "initial_accumulator_value", -1.0, ValueError,
     r"initial_accumulator_value must be >= 0"),
    (bp.Adagrad, "initial_accumulator_value", INF, ValueError,
     r"initial_accumulator_value must be finite"),
]


@pytest.mark.parametrize("cls, name, value, error, match", [
    pytest.param(*case, id=f"{case[0].__name__}-{case[1]}={case[2]!r}") for case in HYPER_CASES])
def test_bad_optimizer_hyperparameter(cls, name, value, error, match):
    with pytest.raises(error, match=match):
        cls(**{name: value})


@pytest.mark.parametrize("value, error, match", [
    (-0.1, ValueError, r"lr must be >= 0"), (NAN, ValueError, r"lr must be finite"),
    (INF, ValueError, r"lr must be finite"), ("0.1", TypeError, r"lr must be a real number"),
    (None, TypeError, r"lr must be a real number"), (False, TypeError,
     r"lr must be a real number"),
], ids=repr)
def test_bad_lr_assignment_keeps_the_old_lr(value, error, match):
    net, opt, X, y = warmed_up()
    with raises_and_unchanged(error, match, net, opt):
        opt.lr = value
    assert opt.lr == 0.01


# (keyword, bad value, error, match) for fit
FIT_CASES = [
    ("epochs", -1, ValueError, r"epochs must be >= 0"),
    ("epochs", 2.0, TypeError, r"epochs must be an integer"),
    ("epochs", NAN, TypeError, r"epochs must be an integer"),
    ("epochs", INF, TypeError, r"epochs must be an integer"),
    ("epochs", "3", TypeError, r"epochs must be an integer"),
    ("epochs", None, TypeError, r"epochs must be an integer"),
    ("epochs", True, TypeError, r"epochs must be an integer"),
    ("batch_size", 0, ValueError, r"batch_size must be >= 1"),
    ("batch_size", -4, ValueError, r"batch_size must be >= 1"),
    ("batch_size", 1.5, TypeError, r"batch_size must be an integer"),
    ("batch_size", 8.0, TypeError, r"batch_size must be an integer"),
    ("batch_size", NAN, TypeError, r"batch_size must be an integer"),
    ("batch_size", "8", TypeError, r"batch_size must be an integer"),
    ("batch_size", True, TypeError, r"batch_size must be an integer"),
    ("batch_size", np.float64(8), TypeError, r"batch_size must be an integer"),
    ("shuffle", "yes", TypeError, r"shuffle must be True or False"),
    ("shuffle", 1, TypeError, r"shuffle must be True or False"),
    ("shuffle", None, TypeError, r"shuffle must be True or False"),
]


@pytest.mark.parametrize("name, value, error, match", [
    pytest.param(*case, id=f"fit-{case[0]}={case[1]!r}") for case in FIT_CASES])
def test_bad_fit_argument(name, value, error, match):
    net, opt, X, y = warmed_up()
    kwargs = {"loss": CE, "optimizer": opt, "epochs": 2, "batch_size": 5, "shuffle": True}
    kwargs[name] = value
    with raises_and_unchanged(error, match, net, opt):
        net.fit(X, y, **kwargs)


# =========================================================================== misuse
@pytest.mark.parametrize("call", ["train_step", "fit", "step"])
@pytest.mark.parametrize("other_kind", ["same_shape", "other_shape", "other_dtype"])
def test_optimizer_reused_across_two_networks(call, other_kind):
    net, opt, X, y = warmed_up()
    other = {"same_shape": lambda: make_net(seed=5),
             "other_shape": lambda: bp.Network([bp.Dense(N_IN, 3)], dtype="float64", seed=5),
             "other_dtype": lambda: make_net("float32", seed=5)}[other_kind]()
    other.compute_gradients(X, y, CE)  # non-trivial gradients for opt.step to apply
    run = {"train_step": lambda: other.train_step(X, y, CE, opt),
           "fit": lambda: other.fit(X, y, loss=CE, optimizer=opt, epochs=2, batch_size=5),
           "step": lambda: opt.step(other)}[call]
    with raises_and_unchanged(ValueError, r"already steps another Network", net, opt, (other,)):
        run()


@pytest.mark.parametrize("output, loss", [("softmax", bp.CrossEntropy()),
                                          ("softmax", "cross_entropy"),
                                          ("sigmoid", bp.BinaryCrossEntropy())], ids=repr)
@pytest.mark.parametrize("call", Y_CALLS)
def test_probability_output_with_a_loss_on_logits(output, loss, call):
    X, y = make_data()
    target = y if output == "softmax" else (np.eye(N_OUT)[y])
    net, opt = make_net(output=output), bp.SGD(lr=0.1, momentum=0.5)
    net.train_step(X, target, bp.CrossEntropy(from_logits=False) if output == "softmax"
                   else bp.BinaryCrossEntropy(from_logits=False), opt)
    run = {"compute_gradients": lambda: net.compute_gradients(X, target, loss),
           "train_step": lambda: net.train_step(X, target, loss, opt),
           "fit": lambda: net.fit(X, target, loss=loss, optimizer=opt, epochs=1)}[call]
    with raises_and_unchanged(ValueError, r"from_logits=False", net, opt):
        run()


PARAMETER_SETTER_CASES = [
    ("short", lambda n: np.ones(n - 1), ValueError, r"parameters must have shape"),
    ("2d", lambda n: np.ones((1, n)), ValueError, r"parameters must have shape"),
    ("scalar", lambda n: 1.0, ValueError, r"parameters must have shape"),
    ("nan", lambda n: _with(np.ones((1, n)), (0, 3, np.nan))[0], ValueError,
     r"parameters contains nan at index 3"),
    ("complex", lambda n: np.ones(n, complex), TypeError, r"parameters must hold real numbers"),
    ("str", lambda n: np.ones(n).astype(str), TypeError, r"parameters must hold real numbers"),
]


@pytest.mark.parametrize("build, error, match",
                         table(PARAMETER_SETTER_CASES, "parameters"))
def test_bad_parameters_assignment(build, error, match):
    net, opt, X, y = warmed_up()
    with raises_and_unchanged(error, match, net, opt):
        net.parameters = build(net.n_parameters)


def test_set_num_threads_bad_values():
    before = bp.get_num_threads()
    for value, error, match in [(0, ValueError, r"n must be >= 1"), (-2, ValueError, r">= 1"),
                                (1.5, TypeError, r"must be an integer"),
                                ("2", TypeError, r"must be an integer"),
                                (None, TypeError, r"must be an integer")]:
        with pytest.raises(error, match=match):
            bp.set_num_threads(value)
        assert bp.get_num_threads() == before


# =========================================================================== accepted inputs
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("int_dtype", ["int8", "uint8", "int32", "int64", "uint64"])
def test_integer_x_is_converted_not_refused(dtype, int_dtype):
    rng = np.random.default_rng(2)
    X_int = rng.integers(0 if int_dtype.startswith("u") else -5, 6, (N, N_IN)).astype(int_dtype)
    X_float = X_int.astype(dtype)
    _, y = make_data()
    a, b = make_net(dtype), make_net(dtype)
    oa, ob = bp.Adam(lr=0.01), bp.Adam(lr=0.01)
    out = a.forward(X_int)
    assert out.dtype == np.dtype(dtype)
    assert out.tobytes() == b.forward(X_float).tobytes()
    assert a.predict(X_int).tobytes() == b.predict(X_float).tobytes()
    assert a.compute_gradients(X_int, y, CE) == b.compute_gradients(X_float, y, CE)
    assert a.train_step(X_int, y, CE, oa) == b.train_step(X_float, y, CE, ob)
    ha = a.fit(X_int, y, loss=CE, optimizer=oa, epochs=2, batch_size=6)
    hb = b.fit(X_float, y, loss=CE, optimizer=ob, epochs=2, batch_size=6)
    assert ha.history == hb.history
    assert a.parameters.tobytes() == b.parameters.tobytes()


def _layout(kind, X, tmp_path):
    """X in an unusual layout or storage, with the same values."""
    if kind == "column_strided":
        wide = np.zeros((X.shape[0], 3 * X.shape[1]))
        wide[:, ::3] = X
        return wide[:, ::3]
    if kind == "row_strided_negative":
        tall = np.zeros((2 * X.shape[0], X.shape[1]))
        tall[::2] = X[::-1]
        return tall[::-2]
    if kind == "fortran":
        return np.asfortranarray(X)
    if kind == "transposed_view":
        return np.ascontiguousarray(X.T).T
    if kind == "readonly":
        ro = X.copy()
        ro.setflags(write=False)
        return ro
    if kind == "readonly_fortran_float32":
        ro = np.asfortranarray(X.astype(np.float32))
        ro.setflags(write=False)
        return ro
    if kind == "broadcast_readonly":
        # every row the same: a zero-stride, read-only view
        return np.broadcast_to(X[3], X.shape)
    if kind == "unaligned":
        buffer = bytearray(X.nbytes + 1)
        un = np.frombuffer(buffer, dtype=X.dtype, offset=1, count=X.size).reshape(X.shape)
        un[...] = X
        assert not un.flags.aligned
        return un
    if kind == "big_endian":
        return X.astype(">f8")
    if kind == "memmap_r":
        path = tmp_path / "x.dat"
        X.tofile(path)
        return np.memmap(path, dtype=X.dtype, mode="r", shape=X.shape)
    if kind == "memmap_c":
        path = tmp_path / "x.dat"
        X.tofile(path)
        return np.memmap(path, dtype=X.dtype, mode="c", shape=X.shape)
    if kind == "memmap_offset_unaligned":
        path = tmp_path / "x.dat"
        with open(path, "wb") as f:
            f.write(b"\0" * 3)
            f.write(X.tobytes())
        return np.memmap(path, dtype=X.dtype, mode="r", shape=X.shape, offset=3)
    if kind == "npy_mmap":
        path = tmp_path / "x.npy"
        np.save(path, X)
        return np.load(path, mmap_mode="r")
    if kind == "npy_mmap_fortran":
        path = tmp_path / "x.npy"
        np.save(path, np.asfortranarray(X))
        loaded = np.load(path, mmap_mode="r")
        assert loaded.flags.f_contiguous and not loaded.flags.c_contiguous
        return loaded
    if kind == "npy_mmap_strided_rows":
        path = tmp_path / "x.npy"
        tall = np.zeros((2 * X.shape[0], X.shape[1]))
        tall[::2] = X
        np.save(path, tall)
        return np.load(path, mmap_mode="r")[::2]
    if kind == "matrix":
        with pytest.warns(PendingDeprecationWarning):
            return np.asmatrix(X)
    raise AssertionError(kind)


LAYOUTS = ["column_strided", "row_strided_negative", "fortran", "transposed_view", "readonly",
           "readonly_fortran_float32", "broadcast_readonly", "unaligned", "big_endian",
           "memmap_r", "memmap_c", "memmap_offset_unaligned", "npy_mmap", "npy_mmap_fortran",
           "npy_mmap_strided_rows", "matrix"]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("kind", LAYOUTS)
def test_any_x_layout_equals_its_contiguous_copy(kind, dtype, tmp_path):
    X, y = make_data()
    X = X.astype(np.float32).astype(np.float64)  # exactly representable in both dtypes
    odd = _layout(kind, X, tmp_path)
    plain = np.ascontiguousarray(np.asarray(odd), dtype=dtype)  # the values odd holds
    assert plain.shape == X.shape
    odd_before = np.array(odd, copy=True)
    a, b = make_net(dtype), make_net(dtype)
    assert a.forward(odd).tobytes() == b.forward(plain).tobytes()
    assert a.predict(odd).tobytes() == b.predict(plain).tobytes()
    g = np.random.default_rng(3).standard_normal((N, N_OUT))
    assert a.backward(g).tobytes() == b.backward(g).tobytes()
    assert a.gradients.tobytes() == b.gradients.tobytes()
    assert a.compute_gradients(odd, y, CE) == b.compute_gradients(plain, y, CE)
    assert a.gradients.tobytes() == b.gradients.tobytes()
    oa, ob = bp.SGD(lr=0.1, momentum=0.9), bp.SGD(lr=0.1, momentum=0.9)
    assert a.train_step(odd, y, CE, oa) == b.train_step(plain, y, CE, ob)
    for shuffle in (True, False):
        ha = a.fit(odd, y, loss=CE, optimizer=oa, epochs=2, batch_size=7, shuffle=shuffle)
        hb = b.fit(plain, y, loss=CE, optimizer=ob, epochs=2, batch_size=7, shuffle=shuffle)
        assert ha.history == hb.history
    assert a.parameters.tobytes() == b.parameters.tobytes()
    # the caller's data, file-backed or not, is untouched
    assert np.array(odd).tobytes() == odd_before.tobytes()


@pytest.mark.parametrize("kind", ["npy_mmap", "memmap_r", "strided", "int32_readonly"])
def test_labels_and_targets_from_any_layout(kind, tmp_path):
    X, y = make_data()
    Y = np.random.default_rng(4).uniform(size=(N, N_OUT))
    if kind == "npy_mmap":
        np.save(tmp_path / "y.npy", y)
        np.save(tmp_path / "t.npy", Y)
        odd_y, odd_t = np.load(tmp_path / "y.npy", mmap_mode="r"), np.load(tmp_path / "t.npy",
                                                                           mmap_mode="r")
    elif kind == "memmap_r":
        y.astype(np.int64).tofile(tmp_path / "y.dat")
        Y.tofile(tmp_path / "t.dat")
        odd_y = np.memmap(tmp_path / "y.dat", dtype=np.int64, mode="r", shape=y.shape)
        odd_t = np.memmap(tmp_path / "t.dat", dtype=np.float64, mode="r", shape=Y.shape)
    elif kind == "strided":
        odd_y = np.repeat(y, 2)[::2]
        odd_t = np.asfortranarray(Y)
    else:
        odd_y = y.astype(np.int32)
        odd_y.setflags(write=False)
        odd_t = Y.copy()
        odd_t.setflags(write=False)
    for loss, odd, plain in [(CE, odd_y, y), (CE, odd_t, Y), (bp.BinaryCrossEntropy(), odd_t, Y),
                             (bp.MSE(), odd_t, Y)]:
        a, b = make_net(), make_net()
        oa, ob = bp.Adam(lr=0.01), bp.Adam(lr=0.01)
        assert a.train_step(X, odd, loss, oa) == b.train_step(X, plain, loss, ob)
        ha = a.fit(X, odd, loss=loss, optimizer=oa, epochs=2, batch_size=6)
        hb = b.fit(X, plain, loss=loss, optimizer=ob, epochs=2, batch_size=6)
        assert ha.history == hb.history
        assert a.parameters.tobytes() == b.parameters.tobytes()


# =========================================================================== probabilities
PROBABILITY_TARGETS = {
    "rows_sum_to_half": lambda rng: rng.dirichlet(np.ones(N_OUT), N) * 0.5,
    "rows_sum_to_two": lambda rng: rng.dirichlet(np.ones(N_OUT), N) * 2.0,
    "unnormalised_uniform": lambda rng: rng.uniform(0, 1, (N, N_OUT)),
    "some_rows_zero": lambda rng: np.where(np.arange(N)[:, None] % 3 == 0, 0.0,
                                           rng.dirichlet(np.ones(N_OUT), N)),
    "two_hot": lambda rng: np.eye(N_OUT)[rng.integers(0, N_OUT, N)] + np.eye(N_OUT)[
        rng.integers(0, N_OUT, N)],
    "negative_entries": lambda rng: rng.uniform(-0.5, 1.0, (N, N_OUT)),
}


@pytest.mark.parametrize("from_logits", [True, False])
@pytest.mark.parametrize("kind", list(PROBABILITY_TARGETS))
def test_cross_entropy_probability_rows_need_not_sum_to_one(kind, from_logits):
    """PyTorch's CrossEntropyLoss takes class probabilities as given, with no check that
    a row sums to 1; bpfast does the same. The oracle is tests/oracle.py (float64)."""
    rng = np.random.default_rng(7)
    X = rng.standard_normal((N, N_IN))
    Y = PROBABILITY_TARGETS[kind](rng)
    output = None if from_logits else "softmax"
    loss = bp.CrossEntropy(from_logits=from_logits)
    net = make_net(output=output)
    out = net.forward(X)
    expected_value = ref.loss_forward("cross_entropy", out, Y, from_logits=from_logits)
    expected_grad = ref.loss_gradient("cross_entropy", out, Y, from_logits=from_logits)
    assert loss(out, Y) == pytest.approx(expected_value, rel=1e-13, abs=1e-15)
    np.testing.assert_allclose(loss.gradient(out, Y), expected_grad, rtol=1e-12, atol=1e-15)
    # the network's fused path: the loss, and the gradients of the reference network
    value = net.compute_gradients(X, Y, loss)
    assert value == pytest.approx(expected_value, rel=1e-12, abs=1e-15)
    weights = [layer.weight for layer in net.layers]
    biases = [layer.bias for layer in net.layers]
    acts = [layer.activation for layer in net.layers]
    cache = ref.network_forward(weights, biases, acts, X)
    if from_logits:
        d_out = ref.loss_gradient("cross_entropy", cache[-1][1], Y)
        grad_w, grad_b, _ = ref.network_backward(weights, cache, acts, d_out, X, biases=biases)
    else:
        # softmax + cross-entropy on probabilities: the same as the logits formula on z
        d_z = ref.loss_gradient("cross_entropy", cache[-1][0], Y)
        grad_w, grad_b, _ = ref.network_backward(weights, cache, acts[:-1] + ["identity"], d_z,
                                                 X, biases=biases)
    expected = np.concatenate([np.concatenate([w.ravel(), b]) for w, b in zip(grad_w, grad_b)])
    np.testing.assert_allclose(net.gradients, expected, rtol=1e-10,
                               atol=1e-13 * np.abs(expected).max())


# =========================================================================== any float array
# Every array argument of every public entry point, in every float dtype and in every
# layout or storage that compiled code cannot read as is, gives what its contiguous
# float64 copy gives (float16 labels from a memory map once crashed fit).
# The values are float16-exact, so every dtype holds them exactly and the one documented
# conversion (to the network's dtype; float labels and weights to float64) loses nothing.
ANY_DTYPES = [np.float16, np.float32, np.float64, np.longdouble]
ANY_LAYOUTS = ["contiguous", "npy_mmap", "strided", "negative_stride", "fortran",
               "misaligned"]


def _stored(values, dtype, layout, path):
    """values (float64) as an array of dtype in the given layout or storage."""
    cast = values.astype(dtype)
    if layout == "contiguous":
        return cast
    if layout == "npy_mmap":
        np.save(path, cast)
        return np.load(path, mmap_mode="r")
    if layout in ("strided", "negative_stride"):
        # the gaps hold NaN: a kernel that read them would say so
        wide = np.full((2 * cast.shape[0],) + cast.shape[1:], np.nan, dtype=dtype)
        if layout == "strided":
            wide[::2] = cast
            return wide[::2]
        wide[::2] = cast[::-1]
        return wide[-2::-2]
    if layout == "fortran":
        return np.asfortranarray(cast) if cast.ndim == 2 else cast
    if layout == "misaligned":
        buffer = np.zeros(cast.nbytes + 1, dtype=np.uint8)
        shifted = np.frombuffer(buffer.data, dtype=dtype, offset=1, count=cast.size)
        shifted = shifted.reshape(cast.shape)
        shifted[...] = cast
        assert not shifted.flags.aligned
        return shifted
    raise AssertionError(layout)


def _every_entry_point(net, arrays):
    """The results of every public entry point of net, of a loss and of the estimators,
    fed the arrays of the dict arrays (X, outputs O, gradient G, targets Y, float
    labels, sample weights w)."""
    X, O, G, Y, labels, w = (arrays[k] for k in ("X", "O", "G", "Y", "labels", "w"))
    results = [net.forward(X), net.backward(G), net.gradients.copy(), net.predict(X)]
    for loss, target in [(CE, labels), (CE, Y), (bp.MSE(), Y), (bp.L1(), Y),
                         (bp.Huber(), Y), (bp.BinaryCrossEntropy(), Y)]:
        results += [loss(O, target), loss(O, target, sample_weight=w),
                    loss.gradient(O, target, sample_weight=w)]
        results.append(net.compute_gradients(X, target, loss, sample_weight=w))
        opt = bp.Adam(lr=0.01)
        results.append(net.train_step(X, target, loss, opt, sample_weight=w))
        history = net.fit(X, target, loss=loss, optimizer=opt, epochs=2, batch_size=7,
                          sample_weight=w, validation_data=(X, target, w))
        results += [history.history["loss"], history.history["val_loss"]]
        results.append(net.partial_fit(X, target, loss=loss, optimizer=opt, batch_size=6,
                                       sample_weight=w))
        results.append(net.parameters.copy())
    return results


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@pytest.mark.parametrize("net_dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", ANY_LAYOUTS)
@pytest.mark.parametrize("dtype", ANY_DTYPES, ids=lambda d: np.dtype(d).name)
def test_every_entry_point_takes_any_float_array_as_its_float64_copy(dtype, layout,
                                                                     net_dtype, tmp_path):
    rng = np.random.default_rng(11)
    plain = {name: values.astype(np.float16).astype(np.float64) for name, values in {
        "X": rng.standard_normal((N, N_IN)), "O": rng.standard_normal((N, N_OUT)),
        "G": rng.standard_normal((N, N_OUT)), "Y": rng.uniform(size=(N, N_OUT)),
        "labels": rng.integers(0, N_OUT, N).astype(np.float64),
        "w": rng.uniform(0.25, 2.0, N)}.items()}
    odd = {name: _stored(values, dtype, layout, tmp_path / f"{name}.npy")
           for name, values in plain.items()}
    # a loss computes in its output's dtype when that is float32 or float64, else float64
    plain["O"] = plain["O"].astype(np.float32 if dtype is np.float32 else np.float64)
    got = _every_entry_point(make_net(net_dtype), odd)
    expected = _every_entry_point(make_net(net_dtype), plain)
    assert len(got) == len(expected)
    for index, (g, e) in enumerate(zip(got, expected)):
        assert np.asarray(g).dtype == np.asarray(e).dtype, index
        assert np.asarray(g).tobytes() == np.asarray(e).tobytes(), index
    # the scikit-learn estimators, which convert through validate_data first
    sklearn = pytest.importorskip("sklearn")
    del sklearn
    from bpfast.sklearn import MLPClassifier, MLPRegressor
    for make, target in [(MLPClassifier, "labels"), (MLPRegressor, "Y")]:
        models = [make(hidden_layer_sizes=(8,), max_iter=3, batch_size=7, random_state=0,
                       dtype=net_dtype) for _ in range(2)]
        models[0].fit(odd["X"], odd[target], sample_weight=odd["w"])
        models[1].fit(plain["X"], plain[target], sample_weight=plain["w"])
        assert models[0].network_.parameters.tobytes() == models[1].network_.parameters.tobytes()
        np.testing.assert_array_equal(np.asarray(models[0].predict(odd["X"]), dtype=float),
                                      np.asarray(models[1].predict(plain["X"]), dtype=float))


def test_float16_labels_from_a_memory_map_train(tmp_path):
    """The issue's crash: 2**20 float16 labels from np.load(mmap_mode="r") made fit read
    them as float32 (past the end of the map: a segfault)."""
    n = 1 << 20
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n, 2)).astype(np.float32)
    labels = rng.integers(0, 3, n)
    np.save(tmp_path / "y.npy", labels.astype(np.float16))
    mapped = np.load(tmp_path / "y.npy", mmap_mode="r")
    a = bp.Network([bp.Dense(2, 3)], seed=0)
    b = bp.Network([bp.Dense(2, 3)], seed=0)
    ha = a.fit(X, mapped, loss=CE, optimizer=bp.SGD(lr=0.1), epochs=1, batch_size=1 << 16)
    hb = b.fit(X, labels, loss=CE, optimizer=bp.SGD(lr=0.1), epochs=1, batch_size=1 << 16)
    assert ha.history == hb.history
    assert a.parameters.tobytes() == b.parameters.tobytes()


def test_strided_float_labels_name_the_right_row():
    # the strided float64 labels: [0, 1, 2, 1] at even positions, NaN between
    net, X = make_net(), make_data(4)[0]
    labels = np.array([0, np.nan, 1, np.nan, 2, np.nan, 1, np.nan])[::2]
    assert np.isfinite(net.train_step(X, labels, CE, bp.SGD(lr=0.1)))
    with raises_and_unchanged(ValueError, r"target contains nan at row 2;", net):
        net.train_step(X, np.array([0, 7, 1, 7, np.nan, 7, 2, 7])[::2], CE, bp.SGD(lr=0.1))


def _unconverted():
    """Arrays that compiled code must not read as float64: (array, what is wrong)."""
    good = np.zeros((N, N_IN))
    misaligned = np.frombuffer(bytearray(good.nbytes + 1), dtype=np.float64, offset=1,
                               count=good.size).reshape(good.shape)
    return {"float16": good.astype(np.float16), "float32": good.astype(np.float32),
            "longdouble": good.astype(np.longdouble), "strided": np.zeros((N, 2 * N_IN))[:, ::2],
            "fortran": np.asfortranarray(good), "big_endian": good.astype(">f8"),
            "misaligned": misaligned, "list": good.tolist()}


@pytest.mark.parametrize("kind", list(_unconverted()))
def test_compiled_code_refuses_an_array_that_was_not_converted(kind):
    """The guarantee of the Python layer's conversion, enforced again where the pointers
    are taken: a wrong array is a TypeError, never read as the wrong type."""
    from bpfast._compiled import core
    bad = _unconverted()[kind]
    net, opt, X, y = warmed_up("float64")
    engine = net._engine
    expected = "x must be a C-contiguous, aligned float64 array"
    with raises_and_unchanged(TypeError, expected, net, opt):
        engine.train_step(bad, None, y, None, CE._config, opt._config)
    with raises_and_unchanged(TypeError, expected, net, opt):
        engine.train_epoch(bad, None, y, None, None, 5, CE._config, opt._config)
    with raises_and_unchanged(TypeError, "x must be", net, opt):
        engine.forward(bad)
    with raises_and_unchanged(TypeError, "x must be", net, opt):
        engine.predict(bad, 8)
    target = bad[:, :N_OUT] if kind != "list" else bad
    with raises_and_unchanged(TypeError, "target must be", net, opt):
        engine.train_step(X, target, None, None, bp.MSE()._config, opt._config)
    with pytest.raises(TypeError, match="out must be|target must be"):
        bp.MSE()._config.evaluate(np.zeros((N, N_OUT)), target, None, None)
    if kind != "float32":  # float32 and float64 are first_nonfinite's two types
        with pytest.raises(TypeError, match="first_nonfinite"):
            core.first_nonfinite(bad)
    weights = bad[:, 0] if kind != "list" else bad
    if kind not in ("fortran", "list"):  # a column of a Fortran array is contiguous
        with raises_and_unchanged(TypeError, "weights must be", net, opt):
            engine.train_step(X, None, y, weights, CE._config, opt._config)
    with raises_and_unchanged(TypeError, "labels must be a C-contiguous, aligned", net, opt):
        engine.train_step(X, None, y.astype(np.int32), None, CE._config, opt._config)
    with raises_and_unchanged(ValueError, "labels has shape", net, opt):
        engine.train_step(X, None, y[:-1], None, CE._config, opt._config)
