"""Loss functions: their hyperparameters and target checks. The arithmetic is in _core.

Every loss takes PyTorch's ``reduction``: ``"mean"`` (the default) averages,
cross-entropy over samples and the others over all elements; ``"sum"`` adds every
term, as the textbook's ``E = 1/2 sum (d - y)^2`` does (``MSE(half=True,
reduction="sum")``). With ``sample_weight`` the mean is weighted:
``sum(w_i * loss_i) / sum(w_i)`` (per element: each sample's elements share its
weight), as PyTorch weights cross-entropy by class, and the sum is
``sum(w_i * loss_i)``, as PyTorch's weighted losses sum (for the losses that have
no weights in PyTorch, bpfast's choice, the same rule). ``loss(out, y)`` is the value,
``loss.gradient(out, y)`` is dL/dout with out's shape, the same quantity that
back-propagates inside ``Network.train_step``.

Custom losses: subclass :class:`Loss` and define ``value`` and ``gradient``, or wrap
two functions in :class:`CustomLoss` (see docs/extending.rst). The compiled training
loop calls them once per batch and does the rest of the step itself.
"""

from collections.abc import Callable
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._compiled import core as _core
from ._validation import (
    as_array,
    as_float_array,
    as_kernel_array,
    check_bool,
    check_choice,
    check_real,
    check_sample_weight,
    instance_by_name,
)

__all__ = ["Loss", "CustomLoss", "MSE", "L1", "Huber", "CrossEntropy", "BinaryCrossEntropy",
           "get_loss", "LOSS_NAMES"]

# rows of the first batch the gradient of a custom loss is checked on
_CHECK_ROWS = 16
# columns checked at most (the widest outputs: an even spread of them)
_CHECK_COLUMNS = 64


class Loss:
    """A loss function: the built-in ones below, or your own.

    A custom loss subclasses ``Loss`` and defines two NumPy functions of
    ``(output, target)``, both (n, k) arrays of the network's dtype:

    ``value(output, target)``
        The loss of each sample, shape (n,), or of each element, shape (n, k).
    ``gradient(output, target)``
        Shape (n, k): element [i, j] is the derivative of sample i's loss (the sum
        of row i of ``value`` when it is per element) with respect to
        ``output[i, j]``.

    bpfast averages as PyTorch does: over samples when ``value`` is per sample,
    over all elements when it is per element; with sample weights ``w`` the mean
    is ``sum(w_i * loss_i) / sum(w_i)`` (per element: a sample's elements share its
    weight), and the gradient rows are scaled to match. With ``reduction = "sum"``
    (a class attribute, as the built-in losses' ``reduction=``) the loss is
    ``sum(w_i * loss_i)`` and the gradient rows are the user's times ``w_i``. The
    compiled training loop
    calls ``value`` and ``gradient`` once per batch, with read-only views of its
    buffers that are valid only during the call; ``__init__`` need not call
    ``super().__init__()``.

    Attributes
    ----------
    check_gradient : bool
        Compare ``gradient`` with central differences of ``value`` on the first
        batch the loss trains on (default True); a mismatch is a ValueError naming
        the worst element. Set it to False (on the class or the instance) to skip.
    reduction : {"mean", "sum"}
        How the losses of a batch combine (default ``"mean"``); set it on the class,
        or on the instance before its first use.

    Examples
    --------
    >>> import numpy as np
    >>> import bpfast as bp
    >>> class Pinball(bp.Loss):
    ...     def __init__(self, quantile=0.9):
    ...         self.quantile = quantile
    ...     def value(self, output, target):
    ...         d = target - output
    ...         return np.maximum(self.quantile * d, (self.quantile - 1) * d)
    ...     def gradient(self, output, target):
    ...         return np.where(target > output, -self.quantile, 1 - self.quantile)
    >>> net = bp.Network([bp.Dense(3, 8, "relu"), bp.Dense(8, 1)], seed=0)
    >>> X = np.random.default_rng(0).standard_normal((64, 3))
    >>> history = net.fit(X, X.sum(axis=1), loss=Pinball(0.9), optimizer="adam", epochs=2)
    """

    #: whether integer class labels of shape (n,) are accepted as targets
    accepts_labels = False
    #: the last-layer activation whose output this loss expects when from_logits=False
    output_activation: str | None = None
    check_gradient: bool = True

    #: "mean" or "sum", as PyTorch's ``reduction=``
    reduction: str = "mean"

    def __init__(self, core_name: str | None = None, param: float = 1.0,
                 reduction: str | None = None) -> None:
        if reduction is None and core_name is None:
            reduction = self.reduction  # a custom loss's class attribute (or "mean")
        self.reduction = check_choice("reduction", reduction, _core.REDUCTIONS)
        if core_name is None:
            self._config = self._custom_config()
        else:
            self._config = _core.LossConfig(core_name, param, self.reduction)

    @property
    def is_custom(self) -> bool:
        """Whether this loss is written in Python (its own ``value``/``gradient``)."""
        return type(self).value is not Loss.value

    def value(self, output: NDArray[np.floating],
              target: NDArray[np.floating]) -> NDArray[np.floating]:
        """A custom loss's per-sample (n,) or per-element (n, k) losses: define it."""
        raise NotImplementedError(
            f"{type(self).__name__} is a custom loss: define value(output, target) and "
            "gradient(output, target)")

    def _custom_config(self):
        if not self.is_custom:
            raise TypeError(f"{type(self).__name__}: a custom loss must define "
                            "value(output, target) and gradient(output, target)")
        if type(self).gradient is Loss.gradient:
            raise TypeError(f"{type(self).__name__} defines value but not gradient; bpfast "
                            "has no automatic differentiation: define "
                            "gradient(output, target) too")
        reduction = check_choice("reduction", self.reduction, _core.REDUCTIONS)
        return _core.LossConfig("custom", 1.0, reduction, self)

    def __getattr__(self, name):
        # a subclass whose __init__ did not call Loss.__init__, or an unpickled one
        if name == "_config":
            config = self._custom_config()
            self.__dict__["_config"] = config
            return config
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def __reduce__(self):
        if self.is_custom:  # its own constructor: keep its attributes, not its config
            state = {key: value for key, value in vars(self).items()
                     if key not in ("_config", "_gradient_checked")}
            return (_rebuild_custom_loss, (type(self), state))
        # pickle and copy.deepcopy through the constructor: a loss's arguments are its
        # public attributes, and the compiled config is rebuilt from them
        arguments = {name: value for name, value in vars(self).items()
                     if not name.startswith("_")}
        return (_rebuild_loss, (type(self), arguments))

    def _check_gradient_on(self, output, target):
        """Once per custom loss with check_gradient: gradient() against central
        differences of value() on the first rows of output (the network's output on
        the training data) and target; ValueError naming the worst element."""
        if not self.is_custom or not self.check_gradient or \
                self.__dict__.get("_gradient_checked"):
            return
        check_custom_gradient(self, output, target)
        self.__dict__["_gradient_checked"] = True

    def __call__(self, output: ArrayLike, target: ArrayLike,
                 sample_weight: ArrayLike | None = None) -> float:
        """The loss of ``output`` (n, k) against ``target`` (its mean or sum, as
        ``reduction`` says), as a Python float.

        ``sample_weight`` (n,), optional, weights each sample's terms.
        """
        output_array, dense, labels, weights = self._prepare(output, target, sample_weight)
        return self._config.evaluate(output_array, dense, labels, None, weights)

    def gradient(self, output: ArrayLike, target: ArrayLike,
                 sample_weight: ArrayLike | None = None) -> NDArray[np.floating]:
        """dL/d(output): an array of output's shape and dtype."""
        output_array, dense, labels, weights = self._prepare(output, target, sample_weight)
        grad = np.empty_like(output_array)
        self._config.evaluate(output_array, dense, labels, grad, weights)
        return grad

    def _prepare(self, output, target, sample_weight):
        output = np.asarray(output)
        dtype = output.dtype if output.dtype in (np.float32, np.float64) else np.float64
        output = as_float_array("output", output, dtype, 2)
        dense, labels = self.prepare_target(target, output.shape[0], output.shape[1], dtype)
        weights = check_sample_weight(sample_weight, output.shape[0])
        return output, dense, labels, weights

    def class_indices(self, dense, labels):
        """Each sample's class (n,) intp, for class weights and stratified splits; or None.

        Only classification losses have classes: see CrossEntropy and
        BinaryCrossEntropy.
        """
        return None

    def prepare_target(self, target, n_samples, n_outputs, dtype):
        """Check target against (n_samples, n_outputs); return (dense or None, labels or None).

        A target of shape (n,) is accepted for a single output. Anything that does
        not match is a ValueError: nothing is broadcast silently.
        """
        target_array = np.asarray(target)
        if target_array.ndim == 1 and n_outputs == 1 and not self.accepts_labels:
            target_array = target_array.reshape(-1, 1)
        if target_array.shape != (n_samples, n_outputs):
            raise ValueError(f"target has shape {target_array.shape}, expected "
                             f"({n_samples}, {n_outputs}) to match the output")
        dense = as_float_array("target", target_array, dtype, 2)
        self._check_values(dense)
        return dense, None

    def _check_values(self, dense):
        pass

    def __repr__(self):
        # the constructor's call: a loss's arguments are its public attributes
        body = ", ".join(f"{name}={value!r}" for name, value in vars(self).items()
                         if not name.startswith("_"))
        return f"{type(self).__name__}({body})"


class CustomLoss(Loss):
    """A loss from two NumPy functions, as a :class:`Loss` subclass would define them.

    Parameters
    ----------
    value : callable ``(output, target) -> array``
        Each sample's loss, shape (n,), or each element's, shape (n, k).
    gradient : callable ``(output, target) -> array (n, k)``
        The derivative of each sample's loss with respect to each output element.
    check_gradient : bool
        Check ``gradient`` against central differences of ``value`` on the first
        batch trained on (ValueError naming the worst element if they disagree).
    name : str, optional
        Shown by ``repr`` (default: the value function's name).
    reduction : {"mean", "sum"}
        As the built-in losses' (see :class:`Loss`).

    Examples
    --------
    >>> import numpy as np
    >>> import bpfast as bp
    >>> half_squares = bp.CustomLoss(lambda out, y: 0.5 * (out - y) ** 2,
    ...                              lambda out, y: out - y, name="half_mse")
    >>> float(half_squares(np.array([[1.0, 2.0]]), np.array([[0.0, 0.0]])))
    1.25
    """

    def __init__(self, value: Callable[[Any, Any], Any], gradient: Callable[[Any, Any], Any],
                 *, check_gradient: bool = True, name: str | None = None,
                 reduction: str = "mean") -> None:
        if not callable(value) or not callable(gradient):
            raise TypeError("CustomLoss(value, gradient) takes two functions of "
                            "(output, target)")
        self.value_fn = value
        self.gradient_fn = gradient
        self.check_gradient = check_bool("check_gradient", check_gradient)
        self.name = name if name is not None else getattr(value, "__name__", "custom")
        super().__init__(reduction=check_choice("reduction", reduction, _core.REDUCTIONS))

    def value(self, output, target):
        return self.value_fn(output, target)

    def gradient(self, output, target):  # type: ignore[override]
        return self.gradient_fn(output, target)

    def __repr__(self):
        extra = "" if self.reduction == "mean" else f", reduction={self.reduction!r}"
        return (f"CustomLoss(name={self.name!r}, check_gradient={self.check_gradient}"
                f"{extra})")


def _per_row(values, n_rows, what):
    values = np.asarray(values, dtype=np.float64)
    if values.ndim == 2 and values.shape[0] == n_rows:
        return values.sum(axis=1)
    if values.ndim == 1 and values.shape[0] == n_rows:
        return values
    raise ValueError(f"{what}.value returned shape {values.shape}, expected ({n_rows},) or "
                     f"({n_rows}, k)")


def check_custom_gradient(loss, output, target):
    """ValueError unless loss.gradient matches central differences of loss.value.

    On float64 copies of the first rows of output and target. Each column is
    perturbed in every row at once (a sample's loss depends on its own row only), so
    this costs 2 calls of value per column. An element where the one-sided
    differences disagree (a kink within the step) is skipped.
    """
    what = type(loss).__name__
    output = np.array(output[:_CHECK_ROWS], dtype=np.float64)
    target = np.array(target[:_CHECK_ROWS], dtype=np.float64)
    n_rows, width = output.shape
    gradient = np.asarray(loss.gradient(output, target), dtype=np.float64)
    if gradient.shape != output.shape:
        raise ValueError(f"{what}.gradient returned shape {gradient.shape}, expected "
                         f"{output.shape}")
    base = _per_row(loss.value(output, target), n_rows, what)
    columns = np.arange(width)
    if width > _CHECK_COLUMNS:
        columns = np.unique(np.linspace(0, width - 1, _CHECK_COLUMNS).round().astype(int))
    worst = None
    for column in columns:
        step = 1e-6 * np.maximum(1.0, np.abs(output[:, column]))
        saved = output[:, column].copy()
        output[:, column] = saved + step
        plus = _per_row(loss.value(output, target), n_rows, what)
        output[:, column] = saved - step
        minus = _per_row(loss.value(output, target), n_rows, what)
        output[:, column] = saved
        central = (plus - minus) / (2 * step)
        one_sided_gap = np.abs((plus - base) - (base - minus)) / step
        smooth = one_sided_gap <= 1e-3 * np.maximum(1.0, np.abs(central))
        error = np.abs(gradient[:, column] - central)
        excess = np.where(smooth, error - 1e-4 * np.maximum(1.0, np.abs(central)), -np.inf)
        row = int(np.argmax(excess))
        if excess[row] > 0 and (worst is None or excess[row] > worst[0]):
            worst = (excess[row], row, int(column), central[row])
    if worst is not None:
        _, row, column, central = worst
        raise ValueError(
            f"{what}.gradient does not match central differences of {what}.value: worst at "
            f"output[{row}, {column}] (output {output[row, column]:.6g}, target "
            f"{target[row, column]:.6g}): gradient gives {gradient[row, column]:.6g}, "
            f"central differences {central:.6g}. Fix gradient, or set "
            f"check_gradient=False to skip this check")


class MSE(Loss):
    """Squared error, as torch.nn.MSELoss: ``mean((out - y)**2)`` over all elements.

    Parameters
    ----------
    half : bool
        Multiply by 1/2 (the textbook and scikit-learn convention), so the
        gradient is ``(out - y) / numel``.
    reduction : {"mean", "sum"}
        ``"sum"``: ``sum((out - y)**2)``; with ``half=True`` the textbook's
        ``E = 1/2 sum (d - y)^2``, whose gradient is ``out - y``.
    """

    def __init__(self, half: bool = False, *, reduction: str = "mean") -> None:
        self.half = check_bool("half", half)
        super().__init__("mse", 0.5 if self.half else 1.0, reduction)

class L1(Loss):
    """Absolute error, as torch.nn.L1Loss (gradient sign(out - y) / numel, 0 at 0).

    ``reduction="sum"`` sums instead of averaging (gradient sign(out - y)).
    """

    def __init__(self, *, reduction: str = "mean") -> None:
        super().__init__("l1", 1.0, reduction)


class Huber(Loss):
    """Huber loss, as torch.nn.HuberLoss: quadratic below ``delta``, linear above.

    ``reduction``: ``"mean"`` (default) or ``"sum"``, as PyTorch's.
    """

    def __init__(self, delta: float = 1.0, *, reduction: str = "mean") -> None:
        self.delta = check_real("delta", delta, minimum=0.0, min_inclusive=False)
        super().__init__("huber", self.delta, reduction)

class CrossEntropy(Loss):
    """Cross-entropy, as torch.nn.CrossEntropyLoss, averaged over samples
    (``reduction="sum"``: summed).

    Parameters
    ----------
    from_logits : bool
        True (default): the output is logits and the loss applies log-softmax
        itself (log-sum-exp, stable for any logits). False: the output is already
        probabilities (a softmax last layer); in training, such a network uses the
        fused, stable gradient ``(p - y) / n``.

    Notes
    -----
    Targets are integer class labels of shape (n,) or probabilities of shape
    (n, k); probability rows need not sum to 1 (PyTorch's formula is used as is).
    Labels may be stored as floats (any float dtype) if they are whole numbers;
    they are converted to float64 for that check, then to integers.
    """

    accepts_labels = True
    output_activation = "softmax"

    def __init__(self, from_logits: bool = True, *, reduction: str = "mean") -> None:
        self.from_logits = check_bool("from_logits", from_logits)
        super().__init__("cross_entropy" if self.from_logits else "cross_entropy_probs", 1.0,
                         reduction)

    def prepare_target(self, target, n_samples, n_outputs, dtype):
        if _core.ready_labels(target, n_samples, n_outputs):
            return None, target  # the fast path: intp labels in range, checked in C
        target_array = as_array("target", target)
        if target_array.ndim != 1:
            return super().prepare_target(target_array, n_samples, n_outputs, dtype)
        if target_array.shape[0] != n_samples:
            raise ValueError(f"target has {target_array.shape[0]} labels for "
                             f"{n_samples} samples")
        if target_array.size == 0:
            raise ValueError("target is empty")
        if target_array.dtype.kind not in "iu":
            if target_array.dtype.kind != "f":
                raise TypeError("class labels must be integers, got dtype "
                                f"{target_array.dtype}")
            # whole numbers stored as floats are labels too; name the first that is not.
            # Converted to float64 first, as any float array (float16 to longdouble, any
            # layout) is before compiled code reads it
            target_array = as_float_array("target", target_array, np.float64, 1)
            fractional = np.flatnonzero(target_array != np.round(target_array))
            if fractional.size:
                raise TypeError(f"class labels must be integers, got "
                                f"{target_array[fractional[0]]} at row {fractional[0]}")
        outside = np.flatnonzero((target_array < 0) | (target_array >= n_outputs))
        if outside.size:
            raise ValueError(f"class label {target_array[outside[0]]} at row {outside[0]} "
                             f"is out of range for {n_outputs} outputs (labels must be in "
                             f"[0, {n_outputs - 1}])")
        return None, as_kernel_array(target_array, np.intp)

    def class_indices(self, dense, labels):
        # probability targets: the most likely class
        return labels if labels is not None else np.argmax(dense, axis=1)

class BinaryCrossEntropy(Loss):
    """Binary cross-entropy, mean over all elements (``reduction="sum"``: summed).

    ``from_logits=True`` (default) is torch.nn.BCEWithLogitsLoss, stable for any
    logits; ``from_logits=False`` is torch.nn.BCELoss on probabilities (logs clamped
    at -100), and a sigmoid last layer then trains with the fused ``(p - y) / numel``.
    Targets lie in [0, 1].
    """

    output_activation = "sigmoid"

    def __init__(self, from_logits: bool = True, *, reduction: str = "mean") -> None:
        self.from_logits = check_bool("from_logits", from_logits)
        super().__init__("binary_cross_entropy" if self.from_logits
                         else "binary_cross_entropy_probs", 1.0, reduction)

    def _check_values(self, dense):
        if dense.min() < 0 or dense.max() > 1:
            raise ValueError("binary cross-entropy targets must lie in [0, 1]")

    def class_indices(self, dense, labels):
        # one output: the two classes are target >= 0.5 and below; several outputs
        # are independent labels (multi-label), with no single class per sample
        if dense.shape[1] != 1:
            return None
        return (dense[:, 0] >= 0.5).astype(np.intp)

def _rebuild_loss(cls, arguments):
    """The inverse of Loss.__reduce__."""
    return cls(**arguments)


def _rebuild_custom_loss(cls, state):
    """The inverse of Loss.__reduce__ for a custom loss: its attributes, a new config."""
    loss = cls.__new__(cls)
    loss.__dict__.update(state)
    return loss


_BY_NAME = {"mse": MSE, "l1": L1, "huber": Huber, "cross_entropy": CrossEntropy,
            "binary_cross_entropy": BinaryCrossEntropy}
#: the names get_loss takes (any case), and the other spellings it accepts for them
LOSS_NAMES = tuple(_BY_NAME)
_ALIASES = {"mean_squared_error": "mse", "squared_error": "mse", "l2": "mse",
            "mae": "l1", "mean_absolute_error": "l1", "absolute_error": "l1",
            "huber_loss": "huber",
            "crossentropy": "cross_entropy", "categorical_crossentropy": "cross_entropy",
            "sparse_categorical_crossentropy": "cross_entropy",
            "categorical_cross_entropy": "cross_entropy", "ce": "cross_entropy",
            "binary_crossentropy": "binary_cross_entropy", "bce": "binary_cross_entropy",
            "bce_with_logits": "binary_cross_entropy"}


def get_loss(loss):
    """A Loss instance from an instance or a name, in any case: "mse", "cross_entropy",
    "binary_cross_entropy", "l1", "huber", or a usual alias ("categorical_crossentropy",
    "crossentropy", "mean_squared_error", "mae", "bce", ...). Names give losses on
    logits (``from_logits=True``)."""
    return instance_by_name("loss", loss, Loss, _BY_NAME, _ALIASES)
