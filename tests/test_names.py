"""The compiled enums are the one table of activation, loss, optimizer and layer-kind
names: every Python list is derived from them, and every name the public API offers
reaches a code the kernels know."""
import oracle as _reference
import pytest

import bpfast as bp
from bpfast import cli, layers, losses, optimizers
from bpfast._compiled import core


@pytest.mark.parametrize("enum, prefix, names", [
    (core.Activation, "ACT_", core.ACTIVATIONS), (core.Loss, "LOSS_", core.LOSSES),
    (core.Optimizer, "OPT_", core.OPTIMIZERS), (core.LayerKind, "KIND_", core.LAYER_KINDS)])
def test_name_tables_follow_the_enums(enum, prefix, names):
    """Each name is its enum member's name, indexed by the member's code."""
    assert len(names) == len(enum) > 0
    for member in enum:
        assert names[int(member)] == member.name.removeprefix(prefix).lower()


def test_python_lists_are_the_compiled_table():
    """bpfast.ACTIVATIONS and the command line's choices come from the compiled table."""
    # every compiled name but "custom" (a Python bpfast.CustomActivation), in code order
    assert layers.ACTIVATIONS == tuple(n for n in core.ACTIVATIONS if n != "custom")
    assert bp.ACTIVATIONS is layers.ACTIVATIONS
    train = next(action for action in cli.build_parser()._subparsers._group_actions[0]
                 .choices["train"]._actions if action.dest == "optimizer")
    assert tuple(train.choices) == optimizers.OPTIMIZER_NAMES


def test_every_public_name_reaches_a_kernel_code():
    """Every loss and optimizer name the API takes configures a code of the compiled
    table, and the NumPy oracle knows every activation."""
    for name in optimizers.OPTIMIZER_NAMES:
        assert optimizers.get_optimizer(name)._config is not None
    for loss in (losses.get_loss(name) for name in ("mse", "l1", "huber", "cross_entropy",
                                                    "binary_cross_entropy")):
        assert loss._config.name in core.LOSSES
    for probs in (bp.CrossEntropy(from_logits=False), bp.BinaryCrossEntropy(from_logits=False)):
        assert probs._config.name in core.LOSSES
    assert set(_reference.ACTIVATIONS) == set(bp.ACTIVATIONS)
    with pytest.raises(ValueError):
        core.LossConfig("no_such_loss")


# --------------------------------------------------------------------------- spellings
@pytest.mark.parametrize("spelling, name", [
    ("MSE", "mse"), ("mean_squared_error", "mse"), ("mae", "l1"), ("L1", "l1"),
    ("Huber", "huber"), ("crossentropy", "cross_entropy"), ("CrossEntropy", "cross_entropy"),
    ("categorical_crossentropy", "cross_entropy"), ("Cross-Entropy", "cross_entropy"),
    ("sparse_categorical_crossentropy", "cross_entropy"),
    ("binary_crossentropy", "binary_cross_entropy"), ("BCE", "binary_cross_entropy")])
def test_loss_names_ignore_case_and_take_the_usual_aliases(spelling, name):
    assert losses.get_loss(spelling)._config.name == name


@pytest.mark.parametrize("spelling, cls", [
    ("Adam", bp.Adam), ("ADAM", bp.Adam), ("adamw", bp.AdamW), ("AdamW", bp.AdamW),
    ("SGD", bp.SGD), ("RMSprop", bp.RMSprop), ("Adagrad", bp.Adagrad)])
def test_optimizer_names_ignore_case(spelling, cls):
    assert type(optimizers.get_optimizer(spelling)) is cls


def test_spellings_of_a_name_continue_one_optimizer():
    import numpy as np
    net = bp.Network([bp.Dense(2, 1)], seed=0)
    X, y = np.ones((4, 2)), np.zeros(4)
    net.fit(X, y, loss="MSE", optimizer="Adam", epochs=1)
    net.fit(X, y, loss="mean_squared_error", optimizer="adam", epochs=1)
    assert net._get_optimizer("ADAM").step_count == 2


@pytest.mark.parametrize("spelling, name", [
    ("ReLU", "relu"), ("Tanh", "tanh"), ("LeakyReLU", "leaky_relu"), ("GELU", "gelu"),
    ("swish", "silu"), ("SiLU", "silu"), ("logistic", "sigmoid"), ("linear", "identity"),
    ("Softmax", "softmax"), ("SELU", "selu")])
def test_activation_names_ignore_case_and_take_the_usual_aliases(spelling, name):
    assert bp.Dense(2, 2, spelling).activation == name


def test_metric_names_ignore_case_and_are_recorded_as_given():
    import numpy as np
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((40, 3)), rng.integers(0, 2, 40)
    net = bp.Network([bp.Dense(3, 2)], seed=0)
    results = net.evaluate(X, y, loss="CrossEntropy", metrics=["Accuracy", "acc", "F1"])
    assert results["Accuracy"] == results["acc"] == net.evaluate(
        X, y, loss="cross_entropy", metrics=["accuracy"])["accuracy"]
    assert results["F1"] == net.evaluate(X, y, loss="cross_entropy", metrics=["f1"])["f1"]
    with pytest.raises(ValueError, match=r"unknown metric 'acuracy'; valid: accuracy, mae"):
        net.evaluate(X, y, loss="cross_entropy", metrics=["acuracy"])


@pytest.mark.parametrize("call, match", [
    (lambda: losses.get_loss("hinge"),
     r"unknown loss 'hinge'; valid: .*mse, l1, huber, cross_entropy, binary_cross_entropy"),
    (lambda: optimizers.get_optimizer("Adamax"),
     r"unknown optimizer 'Adamax'; valid: .*sgd, adam, adamw, rmsprop, adagrad"),
    (lambda: bp.Dense(2, 2, "swishy"), r"unknown activation 'swishy'; valid: identity, "
                                       r"sigmoid, .*silu, mish, hardtanh, selu, softsign"),
])
def test_an_unknown_name_lists_the_valid_ones(call, match):
    with pytest.raises(ValueError, match=match):
        call()
