"""Learning-rate schedules for ``Network.fit(schedule=...)``.

A schedule maps a time ``t`` and the optimizer's initial learning rate to the
learning rate to use, with PyTorch's formulas (``torch.optim.lr_scheduler``).
``t`` counts epochs (``per="epoch"``, the default: the rate is set before each
epoch) or optimizer steps (``per="step"``: every batch gets its own rate, all
computed at once for an epoch and handed to the compiled epoch loop, so a
per-step schedule costs no Python call per batch). Times continue across
``fit`` calls: they are the network's ``epochs_trained`` and the optimizer's
``step_count``.

The initial learning rate is the optimizer's ``lr`` when it is first trained
with a schedule; it is kept as ``optimizer.initial_lr`` (PyTorch keeps
``initial_lr`` in the parameter group the same way).

Any callable ``epoch -> lr`` is accepted too, as in Keras'
``LearningRateScheduler``.
"""
import numpy as np

from ._validation import check_int, check_real

__all__ = ["Schedule", "StepDecay", "ExponentialDecay", "CosineAnnealing", "LinearWarmup",
           "as_schedule"]

_PER = ("epoch", "step")


class Schedule:
    """Base class: ``schedule(t, initial_lr)`` gives the rate at time(s) t.

    Subclasses implement ``factor(t)`` for an integer array t (vectorised), the
    multiplier of the initial rate; ``__call__`` applies it.
    """

    def __init__(self, per="epoch"):
        if per not in _PER:
            raise ValueError(f"per must be 'epoch' or 'step', got {per!r}")
        self.per = per

    def factor(self, t):
        raise NotImplementedError

    def __call__(self, t, initial_lr):
        """The learning rate(s) at t (an int or an int array), as float64."""
        return initial_lr * self.factor(np.asarray(t, dtype=np.int64))

    def __repr__(self):
        fields = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({fields})"


class StepDecay(Schedule):
    """``lr = initial_lr * gamma ** (t // step_size)`` (PyTorch's StepLR).

    Parameters
    ----------
    step_size : int >= 1
    gamma : float in (0, 1]
    per : {"epoch", "step"}
    """

    def __init__(self, step_size, gamma=0.1, *, per="epoch"):
        super().__init__(per)
        self.step_size = check_int("step_size", step_size, minimum=1)
        self.gamma = check_real("gamma", gamma, minimum=0, maximum=1, min_inclusive=False)

    def factor(self, t):
        return self.gamma ** (t // self.step_size)


class ExponentialDecay(Schedule):
    """``lr = initial_lr * gamma ** t`` (PyTorch's ExponentialLR).

    Parameters
    ----------
    gamma : float in (0, 1]
    per : {"epoch", "step"}
    """

    def __init__(self, gamma, *, per="epoch"):
        super().__init__(per)
        self.gamma = check_real("gamma", gamma, minimum=0, maximum=1, min_inclusive=False)

    def factor(self, t):
        return self.gamma ** t.astype(np.float64)


class CosineAnnealing(Schedule):
    """Cosine from the initial rate down to ``min_lr`` over ``t_max``, then ``min_lr``.

    ``lr = min_lr + (initial_lr - min_lr) * (1 + cos(pi * t / t_max)) / 2`` for
    ``t <= t_max``: PyTorch's CosineAnnealingLR. After ``t_max`` the rate stays at
    ``min_lr``, where PyTorch's cosine would rise again (use a longer ``t_max``, or
    warm restarts of your own, for that).

    Parameters
    ----------
    t_max : int >= 1
    min_lr : float >= 0
    per : {"epoch", "step"}
    """

    def __init__(self, t_max, min_lr=0.0, *, per="epoch"):
        super().__init__(per)
        self.t_max = check_int("t_max", t_max, minimum=1)
        self.min_lr = check_real("min_lr", min_lr, minimum=0)

    def __call__(self, t, initial_lr):
        t = np.minimum(np.asarray(t, dtype=np.int64), self.t_max)
        cosine = (1 + np.cos(np.pi * t / self.t_max)) / 2
        return self.min_lr + (initial_lr - self.min_lr) * cosine


class LinearWarmup(Schedule):
    """Linear warm-up from ``start_factor * initial_lr`` over ``warmup`` steps or epochs.

    ``factor = start_factor + (1 - start_factor) * min(t, warmup) / warmup``, as
    PyTorch's LinearLR with end_factor 1. After the warm-up, ``then`` (another
    schedule) continues from its own time 0; without it the rate stays at the
    initial rate.

    Parameters
    ----------
    warmup : int >= 1
    start_factor : float in (0, 1]
    then : Schedule or None
        Must count in the same unit (``per``).
    per : {"epoch", "step"}
    """

    def __init__(self, warmup, start_factor=1 / 3, *, then=None, per="epoch"):
        super().__init__(per)
        self.warmup = check_int("warmup", warmup, minimum=1)
        self.start_factor = check_real("start_factor", start_factor, minimum=0, maximum=1,
                                       min_inclusive=False)
        if then is not None and (not isinstance(then, Schedule) or then.per != per):
            raise TypeError(f"then must be a Schedule counting per {per!r}, got {then!r}")
        self.then = then

    def __call__(self, t, initial_lr):
        t = np.asarray(t, dtype=np.int64)
        ramp = self.start_factor + (1 - self.start_factor) * np.minimum(t, self.warmup) \
            / self.warmup
        rate = initial_lr * ramp
        if self.then is not None:
            later = self.then(np.maximum(t - self.warmup, 0), initial_lr)
            rate = np.where(t >= self.warmup, later, rate)
        return rate


class _EpochFunction(Schedule):
    """A user's callable ``epoch -> lr``."""

    def __init__(self, function):
        super().__init__("epoch")
        self.function = function

    def __call__(self, t, initial_lr):
        value = self.function(int(t))
        return check_real("the learning rate returned by the schedule", value, minimum=0)

    def __repr__(self):
        return f"schedule({self.function!r})"


def as_schedule(schedule):
    """A Schedule for ``schedule`` (a Schedule, a callable ``epoch -> lr``, or None)."""
    if schedule is None or isinstance(schedule, Schedule):
        return schedule
    if callable(schedule):
        return _EpochFunction(schedule)
    raise TypeError(f"schedule must be a bpfast.schedules.Schedule or a callable "
                    f"epoch -> lr, got {schedule!r}")
