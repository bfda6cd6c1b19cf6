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
"""
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

__all__ = ["Loss", "MSE", "L1", "Huber", "CrossEntropy", "BinaryCrossEntropy", "get_loss"]


class Loss:
    """Base class: a loss with a compiled configuration ``_config``."""

    #: whether integer class labels of shape (n,) are accepted as targets
    accepts_labels = False
    #: the last-layer activation whose output this loss expects when from_logits=False
    output_activation: str | None = None

    #: "mean" or "sum", as PyTorch's ``reduction=``
    reduction: str = "mean"

    def __init__(self, core_name: str, param: float = 1.0, reduction: str = "mean") -> None:
        self.reduction = check_choice("reduction", reduction, _core.REDUCTIONS)
        self._config = _core.LossConfig(core_name, param, self.reduction)

    def __reduce__(self):
        # pickle and copy.deepcopy through the constructor: a loss's arguments are its
        # public attributes, and the compiled config is rebuilt from them
        arguments = {name: value for name, value in vars(self).items()
                     if not name.startswith("_")}
        return (_rebuild_loss, (type(self), arguments))

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


_BY_NAME = {"mse": MSE, "l1": L1, "huber": Huber, "cross_entropy": CrossEntropy,
            "binary_cross_entropy": BinaryCrossEntropy}


def get_loss(loss):
    """A Loss instance from an instance or a name ("mse", "cross_entropy", ...)."""
    return instance_by_name("loss", loss, Loss, _BY_NAME)
