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
    assert layers.ACTIVATIONS is core.ACTIVATIONS
    assert bp.ACTIVATIONS is core.ACTIVATIONS
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
    assert set(_reference.ACTIVATIONS) == set(core.ACTIVATIONS)
    with pytest.raises(ValueError):
        core.LossConfig("no_such_loss")
