"""bpfast's optimizers against the NumPy oracle (tests/oracle.py) and torch.optim.

Each configuration takes 50 steps with fresh random gradients written into
``net.gradients``; the parameters must follow the reference to rtol 1e-10 in
float64, and to ~1e-5 relative in float32 (against the float64 reference fed
the same float32 gradients).
"""

import math

import numpy as np
import oracle as ref
import pytest
from optimizer_configs import CONFIGS

import bpfast as bp

N_STEPS = 50

CONFIG_IDS = [name + "-" + "-".join(f"{k}={v}" for k, v in kw.items()) for name, kw in CONFIGS]


def make_net(dtype="float64", seed=0):
    return bp.Network([bp.Dense(5, 7, activation="tanh"), bp.Dense(7, 3)], dtype=dtype, seed=seed)


def random_gradient(rng, n):
    """A fresh gradient, of a random scale so that eps and the clamps matter sometimes."""
    return rng.standard_normal(n) * rng.choice([1e-3, 1.0, 10.0])


def assert_close(got, expected, rtol, err_msg=""):
    got = np.asarray(got, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * scale, err_msg=err_msg)


def test_network_buffers():
    net = make_net()
    n = 5 * 7 + 7 + 7 * 3 + 3
    for buf in (net.parameters, net.gradients):
        assert buf.shape == (n,) and buf.dtype == np.float64
        assert buf.flags.writeable and buf.flags.c_contiguous


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_matches_reference_float64(config):
    name, kw = config
    net = make_net("float64")
    opt = getattr(bp, name)(**kw)
    ref_opt = getattr(ref, name)(**kw)
    expected = net.parameters.copy()
    rng = np.random.default_rng(20)
    for step in range(N_STEPS):
        g = random_gradient(rng, expected.size)
        net.gradients[:] = g
        opt.step(net)
        ref_opt.step(expected, g)
        assert_close(net.parameters, expected, 1e-10, f"step {step + 1}")
        # the step reads the gradients and leaves them as they were
        np.testing.assert_array_equal(net.gradients, g)


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_matches_reference_float32(config):
    name, kw = config
    net = make_net("float32")
    assert net.parameters.dtype == np.float32 and net.gradients.dtype == np.float32
    opt = getattr(bp, name)(**kw)
    ref_opt = getattr(ref, name)(**kw)
    expected = net.parameters.astype(np.float64)
    rng = np.random.default_rng(21)
    for _ in range(N_STEPS):
        g = random_gradient(rng, expected.size).astype(np.float32)
        net.gradients[:] = g
        opt.step(net)
        ref_opt.step(expected, g)
    assert net.parameters.dtype == np.float32
    assert_close(net.parameters, expected, 1e-5)


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_matches_torch(config, dtype):
    torch = pytest.importorskip("torch")
    name, kw = config
    net = make_net(dtype)
    opt = getattr(bp, name)(**kw)
    tdtype = torch.float64 if dtype == "float64" else torch.float32
    tp = torch.tensor(net.parameters.copy(), dtype=tdtype, requires_grad=True)
    topt = getattr(torch.optim, name)([tp], **kw)
    rng = np.random.default_rng(22)
    for _ in range(N_STEPS):
        g = random_gradient(rng, tp.numel()).astype(dtype)
        net.gradients[:] = g
        opt.step(net)
        tp.grad = torch.tensor(g, dtype=tdtype)
        topt.step()
    assert_close(net.parameters, tp.detach().numpy(), 1e-10 if dtype == "float64" else 1e-5)


def test_step_reads_the_current_gradients_and_parameters():
    """Parameters and gradients written by the user between steps are honoured."""
    net = make_net()
    opt = bp.Adam(lr=0.01, weight_decay=0.1)
    ref_opt = ref.Adam(lr=0.01, weight_decay=0.1)
    rng = np.random.default_rng(23)
    expected = net.parameters.copy()
    for _ in range(5):
        p = rng.standard_normal(expected.size)
        net.parameters[:] = p
        expected[:] = p
        g = rng.standard_normal(expected.size)
        net.gradients[:] = g
        opt.step(net)
        ref_opt.step(expected, g)
    assert_close(net.parameters, expected, 1e-10)


def test_layer_views_see_the_update():
    net = make_net()
    w_view = net.layers[0].weight
    before = w_view.copy()
    net.gradients[:] = 1.0
    bp.SGD(lr=0.5).step(net)
    np.testing.assert_array_equal(w_view, before - 0.5)


# ---------------------------------------------------------------------------
# An optimizer belongs to one network
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("config", [("SGD", {"lr": 0.1, "momentum": 0.9}), ("Adam", {}),
                                    ("RMSprop", {"centered": True}), ("Adagrad", {}),
                                    ("SGD", {"lr": 0.1})],
                         ids=["SGD-momentum", "Adam", "RMSprop", "Adagrad", "SGD-stateless"])
@pytest.mark.parametrize("same_shape", [True, False], ids=["same-shape", "other-shape"])
def test_stepping_a_second_network_raises(config, same_shape):
    name, kw = config
    net = make_net()
    other = make_net(seed=1) if same_shape else bp.Network(
        [bp.Dense(4, 2, activation="relu")], dtype="float64", seed=1)
    opt = getattr(bp, name)(**kw)
    ref_opt = getattr(ref, name)(**kw)
    expected = net.parameters.copy()
    rng = np.random.default_rng(24)

    g = rng.standard_normal(expected.size)
    net.gradients[:] = g
    opt.step(net)
    ref_opt.step(expected, g)

    other.gradients[:] = rng.standard_normal(other.gradients.size)
    other_before = other.parameters.copy()
    with pytest.raises(ValueError):
        opt.step(other)
    np.testing.assert_array_equal(other.parameters, other_before)

    # the failed call changed nothing: stepping the first network goes on as before
    g = rng.standard_normal(expected.size)
    net.gradients[:] = g
    opt.step(net)
    ref_opt.step(expected, g)
    assert_close(net.parameters, expected, 1e-10)


# ---------------------------------------------------------------------------
# Hyperparameter checks at construction
# ---------------------------------------------------------------------------

NAN = math.nan

BAD_HYPERPARAMETERS = [
    ("SGD", {"lr": -0.1}),
    ("SGD", {"lr": NAN}),
    ("SGD", {"lr": "0.1"}),
    ("SGD", {"lr": None}),
    ("SGD", {"lr": 0.1, "momentum": -0.5}),
    ("SGD", {"lr": 0.1, "momentum": NAN}),
    ("SGD", {"lr": 0.1, "momentum": "high"}),
    ("SGD", {"lr": 0.1, "weight_decay": -1e-4}),
    ("SGD", {"lr": 0.1, "weight_decay": NAN}),
    ("SGD", {"lr": 0.1, "dampening": NAN}),
    ("SGD", {"lr": 0.1, "nesterov": True}),  # nesterov needs momentum
    ("SGD", {"lr": 0.1, "momentum": 0.9, "dampening": 0.1, "nesterov": True}),
    ("Adam", {"lr": -1e-3}),
    ("Adam", {"lr": NAN}),
    ("Adam", {"lr": "fast"}),
    ("Adam", {"betas": (1.0, 0.999)}),
    ("Adam", {"betas": (0.9, 1.0)}),
    ("Adam", {"betas": (-0.1, 0.999)}),
    ("Adam", {"betas": (0.9, -0.5)}),
    ("Adam", {"betas": (NAN, 0.999)}),
    ("Adam", {"betas": (0.9, NAN)}),
    ("Adam", {"betas": (0.9,)}),
    ("Adam", {"betas": (0.9, 0.99, 0.999)}),
    ("Adam", {"betas": "ab"}),
    ("Adam", {"betas": ("0.9", 0.999)}),
    ("Adam", {"eps": -1e-8}),
    ("Adam", {"eps": NAN}),
    ("Adam", {"eps": "tiny"}),
    ("Adam", {"weight_decay": -0.1}),
    ("Adam", {"weight_decay": NAN}),
    ("AdamW", {"lr": -1e-3}),
    ("AdamW", {"lr": NAN}),
    ("AdamW", {"betas": (1.0, 0.999)}),
    ("AdamW", {"betas": (0.9, 1.5)}),
    ("AdamW", {"eps": -1.0}),
    ("AdamW", {"weight_decay": -1e-2}),
    ("AdamW", {"weight_decay": "some"}),
    ("RMSprop", {"lr": -0.01}),
    ("RMSprop", {"lr": NAN}),
    ("RMSprop", {"lr": "0.01"}),
    ("RMSprop", {"alpha": -0.99}),
    ("RMSprop", {"alpha": NAN}),
    ("RMSprop", {"eps": -1e-8}),
    ("RMSprop", {"eps": NAN}),
    ("RMSprop", {"momentum": -0.9}),
    ("RMSprop", {"weight_decay": -0.1}),
    ("Adagrad", {"lr": -0.01}),
    ("Adagrad", {"lr": NAN}),
    ("Adagrad", {"lr": [0.01]}),
    ("Adagrad", {"lr_decay": -0.1}),
    ("Adagrad", {"lr_decay": NAN}),
    ("Adagrad", {"weight_decay": -0.1}),
    ("Adagrad", {"initial_accumulator_value": -0.1}),
    ("Adagrad", {"initial_accumulator_value": NAN}),
    ("Adagrad", {"eps": -1e-10}),
    ("Adagrad", {"eps": NAN}),
]


@pytest.mark.parametrize("config", BAD_HYPERPARAMETERS,
                         ids=[f"{n}-{kw}" for n, kw in BAD_HYPERPARAMETERS])
def test_bad_hyperparameters_raise(config):
    name, kw = config
    with pytest.raises((ValueError, TypeError)):
        getattr(bp, name)(**kw)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad"])
def test_default_construction_and_keyword_names(name):
    """PyTorch's names are accepted; boundary values PyTorch accepts are accepted."""
    getattr(bp, name)()
    boundary = {
        "SGD": {"lr": 0.0, "momentum": 0.0, "dampening": 0.0, "nesterov": False,
                "weight_decay": 0.0},
        "Adam": {"lr": 0.0, "betas": (0.0, 0.0), "eps": 0.0, "weight_decay": 0.0,
                 "amsgrad": True},
        "AdamW": {"lr": 0.0, "betas": [0.0, 0.0], "eps": 0.0, "weight_decay": 0.0,
                  "amsgrad": False},
        "RMSprop": {"lr": 0.0, "alpha": 0.0, "eps": 0.0, "weight_decay": 0.0, "momentum": 0.0,
                    "centered": True},
        "Adagrad": {"lr": 0.0, "lr_decay": 0.0, "weight_decay": 0.0,
                    "initial_accumulator_value": 0.0, "eps": 0.0},
    }[name]
    getattr(bp, name)(**boundary)


@pytest.mark.parametrize("config", CONFIGS, ids=CONFIG_IDS)
def test_an_unused_optimizer_pickles_and_copies_to_an_identical_one(config):
    import copy
    import pickle

    name, kw = config
    opt = getattr(bp, name)(**kw)
    opt.lr = opt.lr * 0.5  # a changed rate travels too
    opt.initial_lr = 0.25
    for twin in (pickle.loads(pickle.dumps(opt)), copy.deepcopy(opt)):
        assert type(twin) is type(opt)
        assert twin.lr == opt.lr and twin.initial_lr == 0.25
        net, twin_net = make_net(), make_net()
        rng = np.random.default_rng(3)
        for _ in range(10):
            g = random_gradient(rng, net.parameters.size)
            net.gradients[:] = g
            twin_net.gradients[:] = g
            opt.step(net)
            twin.step(twin_net)
        np.testing.assert_array_equal(twin_net.parameters, net.parameters)
        opt = getattr(bp, name)(**kw)  # the first one has stepped now: a fresh original
        opt.lr = opt.lr * 0.5
        opt.initial_lr = 0.25


def test_an_optimizer_with_state_refuses_pickling_and_names_save():
    import copy
    import pickle

    opt = bp.SGD(lr=0.1, momentum=0.9)
    opt.step(make_net())
    for attempt in (lambda: pickle.dumps(opt), lambda: copy.deepcopy(opt)):
        with pytest.raises(TypeError, match=r"stepped a network.*bpfast\.save"):
            attempt()
