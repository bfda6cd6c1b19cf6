"""Metrics for ``Network.fit(metrics=...)`` and ``Network.evaluate``: scikit-learn's values.

Each metric is a few vectorised NumPy operations over all predictions at once
(computed in float64, unweighted), giving what the scikit-learn function named
below gives on the same predictions:

========================  ==================================  =====================
name                      scikit-learn                        needs
========================  ==================================  =====================
"accuracy"                accuracy_score                      a classification loss
"mae", "mse", "rmse"      mean_absolute_error, ..._squared..  a regression loss
"r2"                      r2_score (uniform average)          a regression loss
"log_loss"                log_loss on predict_proba           a classification loss
"top_k_accuracy"          top_k_accuracy_score, k=5 (Keras)   CrossEntropy
"top_3_accuracy"          top_k_accuracy_score, k=3 (any k)   CrossEntropy
"precision", "recall",    precision_score, ... with average=  a classification loss
"f1"                      "binary" for two classes, else
                          "macro"
"precision_macro", ...    average="macro" (also _binary)
"auc"                     roc_auc_score                       two classes
========================  ==================================  =====================

Two classes means BinaryCrossEntropy with one output (class 1: target >= 0.5)
or CrossEntropy with two outputs; "binary" averaging scores class 1. Predicted
classes are argmax (CrossEntropy) or probability > 1/2 (BinaryCrossEntropy);
"log_loss" and "auc" use the probabilities ``Network.predict_proba`` gives. A
zero division (no predicted or no true sample of a class) counts as 0, as
scikit-learn's ``zero_division="warn"`` does (without the warning); "auc" with
a single class present is NaN (scikit-learn raises). Any callable
``f(y_true, y_pred) -> float`` is a metric too, named by its ``__name__``: it
gets y as given to fit and the network's raw output (``predict``).
"""
import re

import numpy as np

from .losses import BinaryCrossEntropy, CrossEntropy

__all__ = ["get_metric", "top_k_accuracy", "METRICS"]

#: the metric names (besides "top_<k>_accuracy" for any k >= 1)
METRICS = ("accuracy", "mae", "mse", "rmse", "r2", "log_loss", "top_k_accuracy",
           "precision", "recall", "f1", "precision_macro", "recall_macro", "f1_macro",
           "precision_binary", "recall_binary", "f1_binary", "auc")

_TOP_K = re.compile(r"top_(\d+)_accuracy")


def top_k_accuracy(k):
    """The metric name for top-k accuracy: ``metrics=[top_k_accuracy(3)]`` is
    ``metrics=["top_3_accuracy"]`` (the fraction of samples whose class is among
    the k highest outputs; ties broken as scikit-learn's top_k_accuracy_score)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"top_k_accuracy needs an integer k >= 1, got {k!r}")
    return f"top_{int(k)}_accuracy"


# ----------------------------------------------------------------- targets and outputs
def _classes_true(loss, data):
    """Each sample's true class (n,) intp."""
    if isinstance(loss, CrossEntropy):
        return data.labels if data.labels is not None else np.argmax(data.dense, axis=1)
    return (data.dense[:, 0] >= 0.5).astype(np.intp)


def _probabilities(loss, output):
    """float64 class probabilities (n, k): softmax or sigmoid of logits, or the output."""
    output = np.asarray(output, dtype=np.float64)
    if isinstance(loss, CrossEntropy):
        if not loss.from_logits:
            return output
        shifted = np.exp(output - output.max(axis=1, keepdims=True))
        return shifted / shifted.sum(axis=1, keepdims=True)
    p = output[:, 0]
    if loss.from_logits:
        p = 0.5 * (1.0 + np.tanh(0.5 * p))  # sigmoid, no overflow warning
    return np.stack([1.0 - p, p], axis=1)


def _classes_predicted(loss, output):
    if isinstance(loss, CrossEntropy):
        return np.argmax(output, axis=1)
    threshold = 0.0 if loss.from_logits else 0.5
    return (output[:, 0] > threshold).astype(np.intp)


def _n_classes(loss, output):
    return output.shape[1] if isinstance(loss, CrossEntropy) else 2


# ----------------------------------------------------------------- the metrics
def _accuracy(loss, output, data):
    if isinstance(loss, CrossEntropy):
        return float(np.mean(np.argmax(output, axis=1) == _classes_true(loss, data)))
    # binary (per output): logit > 0, or probability > 1/2, against target >= 1/2
    threshold = 0.0 if loss.from_logits else 0.5
    return float(np.mean((output > threshold) == (data.dense >= 0.5)))


def _errors(output, data):
    return np.asarray(output, np.float64) - np.asarray(data.dense, np.float64)


def _mae(loss, output, data):
    return float(np.mean(np.abs(_errors(output, data))))


def _mse(loss, output, data):
    return float(np.mean(np.square(_errors(output, data))))


def _rmse(loss, output, data):
    # scikit-learn: the mean over outputs of each output's root mean squared error
    return float(np.mean(np.sqrt(np.mean(np.square(_errors(output, data)), axis=0))))


def _r2(loss, output, data):
    target = np.asarray(data.dense, np.float64)
    residual = np.sum(np.square(target - np.asarray(output, np.float64)), axis=0)
    total = np.sum(np.square(target - target.mean(axis=0)), axis=0)
    # scikit-learn's force_finite: a constant target scores 1 if predicted exactly, else 0
    with np.errstate(divide="ignore", invalid="ignore"):
        scores = np.where(total != 0, 1.0 - residual / total,
                          np.where(residual == 0, 1.0, 0.0))
    return float(np.mean(scores))


def _log_loss(loss, output, data):
    probabilities = _probabilities(loss, output)
    # scikit-learn: clip to [eps, 1 - eps] (eps of the predictions' float64) and renormalise
    eps = np.finfo(np.float64).eps
    probabilities = np.clip(probabilities, eps, 1 - eps)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    if isinstance(loss, CrossEntropy) and data.labels is None:
        truth = np.asarray(data.dense, np.float64)  # one-hot (or soft) rows
    else:
        truth = np.zeros_like(probabilities)
        truth[np.arange(truth.shape[0]), _classes_true(loss, data)] = 1.0
    return float(-np.mean(np.sum(truth * np.log(probabilities), axis=1)))


def _top_k_accuracy_for(k):
    def top_k(loss, output, data):
        truth = _classes_true(loss, data)
        score = output[np.arange(output.shape[0]), truth][:, None]
        # in the top k: fewer than k outputs rank before the true one. scikit-learn ranks
        # by a stable ascending sort, reversed: among equal scores the higher index first
        columns = np.arange(output.shape[1])
        before = np.count_nonzero((output > score) | ((output == score)
                                                      & (columns > truth[:, None])), axis=1)
        return float(np.mean(before < k))
    return top_k


def _confusion_counts(loss, output, data):
    """(true positives, predicted, actual) per class, and the classes present in either."""
    n_classes = _n_classes(loss, output)
    truth, predicted = _classes_true(loss, data), _classes_predicted(loss, output)
    true_positives = np.bincount(truth[truth == predicted], minlength=n_classes)
    n_predicted = np.bincount(predicted, minlength=n_classes)
    n_actual = np.bincount(truth, minlength=n_classes)
    return true_positives, n_predicted, n_actual


def _ratio(numerator, denominator):
    return np.divide(numerator, denominator, out=np.zeros(numerator.shape),
                     where=denominator != 0)


def _score(kind, true_positives, n_predicted, n_actual):
    precision = _ratio(true_positives, n_predicted)
    recall = _ratio(true_positives, n_actual)
    if kind == "precision":
        return precision
    if kind == "recall":
        return recall
    return _ratio(2.0 * true_positives, n_predicted + n_actual)  # f1 = 2tp / (2tp+fp+fn)


def _prf_for(kind, average):
    def prf(loss, output, data):
        counts = _confusion_counts(loss, output, data)
        scores = _score(kind, *counts)
        mode = average or ("binary" if _n_classes(loss, output) == 2 else "macro")
        if mode == "binary":
            return float(scores[1])
        _, n_predicted, n_actual = counts
        present = (n_predicted + n_actual) > 0  # scikit-learn's labels: in y_true or y_pred
        return float(np.mean(scores[present]))
    return prf


def _auc(loss, output, data):
    truth = _classes_true(loss, data).astype(bool)
    score = _probabilities(loss, output)[:, 1]
    n_positive = np.count_nonzero(truth)
    n_negative = truth.shape[0] - n_positive
    if n_positive == 0 or n_negative == 0:
        return float("nan")
    # Mann-Whitney: mean rank of the positives, ties sharing their average rank
    ordered = np.sort(score)
    ranks = 0.5 * (np.searchsorted(ordered, score[truth], "left")
                   + np.searchsorted(ordered, score[truth], "right") + 1)
    return float((ranks.sum() - n_positive * (n_positive + 1) / 2)
                 / (n_positive * n_negative))


_REGRESSION = {"mae": _mae, "mse": _mse, "rmse": _rmse, "r2": _r2}
_CLASSIFICATION = {"accuracy": _accuracy, "log_loss": _log_loss,
                   **{f"{kind}{suffix}": _prf_for(kind, suffix[1:] or None)
                      for kind in ("precision", "recall", "f1")
                      for suffix in ("", "_macro", "_binary")}}


#: other spellings of the metric names (lower case), as Keras and scikit-learn write them
_ALIASES = {"acc": "accuracy", "mean_absolute_error": "mae", "mean_squared_error": "mse",
            "root_mean_squared_error": "rmse", "r2_score": "r2", "roc_auc": "auc",
            "f1_score": "f1", "precision_score": "precision", "recall_score": "recall",
            "accuracy_score": "accuracy", "cross_entropy": "log_loss",
            "crossentropy": "log_loss"}


def get_metric(metric, loss, n_outputs):
    """(name, function(output, data) -> float) for a metric name or callable, for a
    network of n_outputs trained with loss.

    A ValueError names the metric when it is unknown or does not fit the loss.
    """
    if callable(metric) and not isinstance(metric, str):
        name = getattr(metric, "__name__", type(metric).__name__)
        return name, lambda output, data, f=metric: float(f(data.y, output))
    if not isinstance(metric, str):
        raise TypeError(f"a metric must be a name or a callable f(y_true, y_pred) -> float, "
                        f"got {metric!r}")
    name = metric
    # any case, "-" or " " for "_", and the usual other spellings; recorded as given
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    key = _ALIASES.get(key, key)
    key = "top_5_accuracy" if key == "top_k_accuracy" else key
    classification = isinstance(loss, (CrossEntropy, BinaryCrossEntropy))
    binary_output = isinstance(loss, BinaryCrossEntropy)
    top_k = _TOP_K.fullmatch(key)
    if key in _REGRESSION:
        if classification:
            raise ValueError(f"metric {name!r} needs a regression loss (MSE, L1, Huber), "
                             f"not {loss!r}")
        function = _REGRESSION[key]
    elif key in _CLASSIFICATION or key == "auc" or top_k:
        if not classification:
            raise ValueError(f"metric {name!r} needs a classification loss (CrossEntropy "
                             f"or BinaryCrossEntropy), not {loss!r}")
        if top_k:
            if binary_output or int(top_k.group(1)) < 1:
                raise ValueError(f"metric {name!r} needs CrossEntropy and k >= 1")
            function = _top_k_accuracy_for(int(top_k.group(1)))
        else:
            function = _auc if key == "auc" else _CLASSIFICATION[key]
    else:
        raise ValueError(f"unknown metric {name!r}; valid: {', '.join(METRICS)}, "
                         f"'top_<k>_accuracy', or a callable f(y_true, y_pred) -> float")
    n_classes = n_outputs if isinstance(loss, CrossEntropy) else 2
    if binary_output and key != "accuracy" and n_outputs != 1:
        raise ValueError(f"metric {name!r} with BinaryCrossEntropy needs one output, "
                         f"got {n_outputs} (multi-label)")
    if (key == "auc" or key.endswith("_binary")) and n_classes != 2:
        raise ValueError(f"metric {name!r} needs two classes, got {n_outputs} outputs")
    return name, lambda output, data: function(loss, output, data)
