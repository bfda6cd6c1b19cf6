"""Optimizers: hyperparameters and state. The update arithmetic is in _core.

Each follows PyTorch's documented update rule, defaults and order of operations
(its single-tensor implementation), so a model moved between the two steps the
same. The state lives in one flat (n_states, n_parameters) array beside the
network's parameters; ``state`` exposes its rows by PyTorch's names.
"""
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from ._compiled import core as _core
from ._validation import check_bool, check_memory, check_real, instance_by_name

if TYPE_CHECKING:
    from .network import Network

__all__ = ["Optimizer", "SGD", "Adam", "AdamW", "RMSprop", "Adagrad", "OPTIMIZER_NAMES",
           "get_optimizer"]


class Optimizer:
    """Base class: an optimizer with a compiled configuration ``_config``.

    An optimizer belongs to the first network it steps; stepping another is a
    ValueError (its state is per parameter).

    Attributes
    ----------
    initial_lr : float or None
        The base rate of a learning-rate schedule: ``lr`` when the optimizer was
        first trained with a schedule (PyTorch keeps ``initial_lr`` the same way);
        saved with the optimizer. Set it to None to restart a schedule from ``lr``.
    """

    initial_lr: float | None

    def __init__(self, core_name: str, **hyperparameters: Any) -> None:
        self._config = _core.OptimizerConfig(core_name, **hyperparameters)
        self.initial_lr = None
        # kept for bpfast.io, which saves them (the compiled config does not expose them)
        self._hyperparameters = dict(hyperparameters)

    def step(self, network: "Network") -> None:
        """One update of ``network.parameters`` from ``network.gradients``."""
        self._bind_check(network)
        self._config.step(network._engine)

    def _bind_check(self, network):
        """Refuse, before it steps network, what would go wrong only then: another
        network's optimizer, or a hyperparameter that network's dtype cannot hold."""
        if self._config.owner is network._engine:
            return  # checked when it bound, and lr on every change since
        self._config.check_owner(network._engine)
        for name, value in self._hyperparameters.items():
            if not isinstance(value, bool):
                _check_representable(_PUBLIC_NAMES.get(name, name), value, network.dtype)
        _check_representable("lr", self.lr, network.dtype)
        n_states = len(self._config.state_names)
        if n_states:
            names = ", ".join(self._config.state_names)
            check_memory(f"the state of {type(self).__name__} ({names}) for "
                         f"{network.n_parameters} parameters",
                         n_states * network.n_parameters * network.dtype.itemsize)

    @property
    def lr(self) -> float:
        """The learning rate; may be changed between steps."""
        return self._config.lr

    @lr.setter
    def lr(self, value: float) -> None:
        value = check_real("lr", value, minimum=0.0)
        if self._config.owner is not None:
            _check_representable("lr", value, self._config.owner.dtype)
        self._config.lr = value

    @property
    def step_count(self) -> int:
        """Updates made so far."""
        return self._config.step_count

    @property
    def state(self) -> dict[str, NDArray[np.floating]]:
        """The state buffers by PyTorch's names (views of one array); empty before a step."""
        if self._config.state is None:
            return {}
        return dict(zip(self._config.state_names, self._config.state))

    def _arguments(self) -> dict[str, Any]:
        """The constructor's keyword arguments that rebuild this optimizer, at its current lr."""
        arguments = dict(self._hyperparameters)
        arguments["lr"] = self.lr  # the current rate, which may have been changed
        if "beta1" in arguments:  # Adam and AdamW take the pair as betas=(b1, b2)
            arguments["betas"] = [arguments.pop("beta1"), arguments.pop("beta2")]
        arguments.pop("decoupled_weight_decay", None)  # implied by the class
        return arguments

    def __repr__(self):
        # the constructor's call, at the current lr: Adam(lr=0.001, betas=(0.9, 0.999), ...)
        arguments = self._arguments()
        ordered = {"lr": arguments.pop("lr")}
        if "betas" in arguments:
            ordered["betas"] = tuple(arguments.pop("betas"))
        ordered.update(arguments)
        body = ", ".join(f"{name}={value!r}" for name, value in ordered.items())
        return f"{type(self).__name__}({body})"

    # ---------------------------------------------------------------- state protocol
    # Saving (bpfast.io) and pickling both describe an optimizer by _get_state (plain
    # JSON-able values) and rebuild it with _from_state; the state rows, which belong
    # to the network, travel beside it (Network._get_state takes them with the
    # parameters, in one snapshot).
    def _get_state(self, network=None):
        """The optimizer as JSON-able values: its class name (one of bpfast's), constructor
        arguments, initial_lr, step count and state names. With network: refuse (before
        anything is read) an optimizer that steps another network."""
        name = next((cls.__name__ for cls in type(self).__mro__
                     if _BY_CLASS_NAME.get(cls.__name__) is cls), None)
        if name is None:
            raise TypeError(f"cannot save an optimizer of type {type(self).__name__}")
        config = self._config
        if network is not None and config.owner is not None \
                and config.owner is not network._engine:
            raise ValueError("this optimizer steps another Network; save it with that one")
        return {"name": name, "hyperparameters": self._arguments(),
                "initial_lr": self.initial_lr,  # a schedule's base rate, if one ran
                "step_count": int(self.step_count),
                "state_names": list(config.state_names),
                "has_state": config.state is not None}

    @staticmethod
    def _from_state(record):
        """The optimizer that ``record`` (from _get_state) describes, not bound to a network
        yet (``_restore`` binds it with its state rows). ValueError names what is wrong."""
        try:
            optimizer = _BY_CLASS_NAME[record["name"]](**record["hyperparameters"])
        except (TypeError, ValueError, OverflowError) as error:
            raise ValueError(f"invalid optimizer: {error}") from None
        if list(optimizer._config.state_names) != record["state_names"]:
            raise ValueError(f"optimizer state names {record['state_names']} do not match "
                             f"{list(optimizer._config.state_names)} for its hyperparameters")
        optimizer._config.step_count = record["step_count"]
        initial_lr = record.get("initial_lr")
        optimizer.initial_lr = None if initial_lr is None else float(initial_lr)
        return optimizer

    def __reduce__(self):
        # pickle and copy.deepcopy through the constructor. The state of an optimizer
        # that has stepped belongs to its network: bpfast.save keeps the two together.
        if self._config.state is not None:
            raise TypeError(f"cannot pickle or copy this {type(self).__name__}: it has "
                            "stepped a network, whose state it holds; bpfast.save(network, "
                            "path, optimizer=...) keeps both")
        # the class itself, not _get_state's name: a subclass pickles as itself
        return (_rebuild_optimizer, (type(self), self._arguments(), self.initial_lr))

    def _restore(self, network, state, step_count):
        """Belong to network with the given state rows and step count (for bpfast.io.load)."""
        self._bind_check(network)
        self._config.attach(network._engine)
        self._config.state[...] = state
        self._config.step_count = step_count


# the constructor's names of the hyperparameters that it stores under other names
_PUBLIC_NAMES = {"beta1": "betas[0]", "beta2": "betas[1]"}


def _check_representable(name, value, dtype):
    """Refuse a hyperparameter that the kernels, computing in dtype, would see as
    infinite (``SGD(lr=1e39)`` on float32) or as zero while it is not (an ``eps`` of
    1e-50 would divide by zero); a ValueError naming it and the dtype."""
    with np.errstate(over="ignore", under="ignore"):
        cast = dtype.type(value)
    if not np.isfinite(cast) or (cast == 0) != (value == 0):
        limits = np.finfo(dtype)
        raise ValueError(f"{name}={value} cannot be represented in the network's dtype "
                         f"{dtype.name} (which holds magnitudes from {limits.smallest_subnormal}"
                         f" to {limits.max}); it would become {cast}")


def _check_betas(betas):
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise TypeError(f"betas must be a pair (beta1, beta2), got {betas!r}")
    return (check_real("betas[0]", betas[0], 0.0, 1.0, max_inclusive=False),
            check_real("betas[1]", betas[1], 0.0, 1.0, max_inclusive=False))


class SGD(Optimizer):
    """Stochastic gradient descent with optional momentum, as torch.optim.SGD."""

    def __init__(self, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0) -> None:
        lr = check_real("lr", lr, minimum=0.0)
        momentum = check_real("momentum", momentum, minimum=0.0)
        dampening = check_real("dampening", dampening)
        nesterov = check_bool("nesterov", nesterov)
        weight_decay = check_real("weight_decay", weight_decay, minimum=0.0)
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("nesterov momentum requires a momentum and zero dampening")
        super().__init__("sgd", lr=lr, momentum=momentum, dampening=dampening,
                         nesterov=nesterov, weight_decay=weight_decay)


class Adam(Optimizer):
    """Adam (and AMSGrad with ``amsgrad=True``), as torch.optim.Adam."""

    _decoupled = False

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, amsgrad: bool = False) -> None:
        beta1, beta2 = _check_betas(betas)
        super().__init__(
            "adam", lr=check_real("lr", lr, minimum=0.0), beta1=beta1, beta2=beta2,
            eps=check_real("eps", eps, minimum=0.0),
            weight_decay=check_real("weight_decay", weight_decay, minimum=0.0),
            amsgrad=check_bool("amsgrad", amsgrad),
            decoupled_weight_decay=self._decoupled)


class AdamW(Adam):
    """Adam with decoupled weight decay, as torch.optim.AdamW."""

    _decoupled = True

    def __init__(self, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False) -> None:
        super().__init__(lr, betas, eps, weight_decay, amsgrad)


class RMSprop(Optimizer):
    """RMSprop, as torch.optim.RMSprop (``centered`` and ``momentum`` included)."""

    def __init__(self, lr: float = 1e-2, alpha: float = 0.99, eps: float = 1e-8,
                 weight_decay: float = 0.0, momentum: float = 0.0,
                 centered: bool = False) -> None:
        super().__init__(
            "rmsprop", lr=check_real("lr", lr, minimum=0.0),
            alpha=check_real("alpha", alpha, 0.0, 1.0),
            eps=check_real("eps", eps, minimum=0.0),
            weight_decay=check_real("weight_decay", weight_decay, minimum=0.0),
            momentum=check_real("momentum", momentum, minimum=0.0),
            centered=check_bool("centered", centered))


class Adagrad(Optimizer):
    """Adagrad, as torch.optim.Adagrad."""

    def __init__(self, lr: float = 1e-2, lr_decay: float = 0.0, weight_decay: float = 0.0,
                 initial_accumulator_value: float = 0.0, eps: float = 1e-10) -> None:
        super().__init__(
            "adagrad", lr=check_real("lr", lr, minimum=0.0),
            lr_decay=check_real("lr_decay", lr_decay, minimum=0.0),
            weight_decay=check_real("weight_decay", weight_decay, minimum=0.0),
            initial_accumulator_value=check_real(
                "initial_accumulator_value", initial_accumulator_value, minimum=0.0),
            eps=check_real("eps", eps, minimum=0.0))


def _rebuild_optimizer(cls, arguments, initial_lr):
    """The inverse of Optimizer.__reduce__."""
    optimizer = cls(**arguments)
    optimizer.initial_lr = initial_lr
    return optimizer


_BY_CLASS_NAME = {cls.__name__: cls for cls in (SGD, Adam, AdamW, RMSprop, Adagrad)}
_BY_NAME = {"sgd": SGD, "adam": Adam, "adamw": AdamW, "rmsprop": RMSprop, "adagrad": Adagrad}
# the names get_optimizer (and the command line's --optimizer) takes
OPTIMIZER_NAMES = tuple(_BY_NAME)


def get_optimizer(optimizer) -> "Optimizer":
    """An Optimizer instance from an instance or a name ("sgd", "adam", ...; defaults)."""
    return instance_by_name("optimizer", optimizer, Optimizer, _BY_NAME)
