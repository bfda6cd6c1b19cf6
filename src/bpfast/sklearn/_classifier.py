"""MLPClassifier: the log-loss on bpfast's engine, scikit-learn's classifier API."""
import numpy as np
from scipy.special import expit, softmax
from sklearn.base import ClassifierMixin
from sklearn.metrics import accuracy_score
from sklearn.utils import column_or_1d
from sklearn.utils.class_weight import compute_sample_weight
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets, type_of_target

from ..losses import BinaryCrossEntropy, CrossEntropy
from ._base import _BaseMLP, _is_stochastic


def _check_class_weight(name, value):
    if not (value is None or isinstance(value, dict)
            or (isinstance(value, str) and value == "balanced")):
        raise ValueError(f"{name} must be a dict, 'balanced' or None, got {value!r}")


class MLPClassifier(ClassifierMixin, _BaseMLP):
    """Multilayer perceptron classifier, scikit-learn's API on bpfast's engine.

    A drop-in replacement for :class:`sklearn.neural_network.MLPClassifier`: the same
    parameters (below, with scikit-learn's defaults and meanings), the same fitted
    attributes, and bpfast's ``dtype``, ``n_threads`` and ``class_weight`` besides.
    It minimises the log-loss (cross-entropy from logits for several classes,
    binary cross-entropy for two classes and for multilabel targets) plus
    ``0.5 * alpha * ||W||^2 / n_samples``.

    Parameters
    ----------
    hidden_layer_sizes : array-like of int or int, default=(100,)
        The width of each hidden layer.
    activation : {"identity", "logistic", "tanh", "relu"}, default="relu"
        The hidden layers' activation.
    solver : {"lbfgs", "sgd", "adam"}, default="adam"
        "lbfgs" minimises the full-batch loss with SciPy's L-BFGS-B; "sgd" and "adam"
        take mini-batch steps, one compiled call per epoch.
    alpha : float, default=1e-4
        Strength of the L2 penalty on the weights (not the biases), divided by the
        number of samples (per batch for the stochastic solvers).
    batch_size : int or "auto", default="auto"
        Mini-batch size of "sgd"/"adam"; "auto" is ``min(200, n_samples)``.
    learning_rate : {"constant", "invscaling", "adaptive"}, default="constant"
        The schedule of "sgd": constant; ``learning_rate_init / (t_ + 1) ** power_t``
        after each epoch; or divided by 5 whenever ``n_iter_no_change`` epochs fail to
        improve by ``tol`` (training stops once it would fall to 1e-6).
    learning_rate_init : float, default=1e-3
        The (initial) step size of "sgd" and "adam".
    power_t : float, default=0.5
        The exponent of "invscaling".
    max_iter : int, default=200
        Epochs for "sgd"/"adam"; iterations for "lbfgs".
    shuffle : bool, default=True
        Visit the samples in a new random order each epoch ("sgd"/"adam").
    random_state : int, RandomState instance or None, default=None
        Draws the initial weights (scikit-learn's scheme and order, so the same seed
        gives the same initial network as scikit-learn), the early-stopping split and
        the seed of the shuffling.
    tol : float, default=1e-4
        The least improvement of the loss (or validation score) that counts as
        progress; for "lbfgs", the projected-gradient tolerance.
    verbose : bool or int, default=False
        Print the loss after each epoch.
    warm_start : bool, default=False
        Continue from the fitted network instead of a new one.
    momentum : float, default=0.9
        Momentum of "sgd".
    nesterovs_momentum : bool, default=True
        Nesterov's momentum for "sgd" (when ``momentum > 0``).
    early_stopping : bool, default=False
        Hold out ``validation_fraction`` of the samples (stratified) and stop when
        their accuracy has not improved by ``tol`` for ``n_iter_no_change`` epochs;
        the network with the best validation accuracy is kept.
    validation_fraction : float, default=0.1
        The held-out share for ``early_stopping``.
    beta_1, beta_2 : float, default=0.9, 0.999
        Adam's moment decay rates.
    epsilon : float, default=1e-8
        Adam's epsilon.
    n_iter_no_change : int or np.inf, default=10
        Epochs without progress before stopping (or slowing "adaptive" sgd).
    max_fun : int, default=15000
        Most loss evaluations of "lbfgs".
    dtype : {"float64", "float32"}, default="float64"
        bpfast's: the network's dtype; input is converted to it. float64 gives
        scikit-learn's numbers; float32 is faster on wide layers.
    n_threads : int or None, default=None
        bpfast's: threads for bpfast's OpenMP loops, its products and BLAS while this
        estimator fits or predicts; restored afterwards. None leaves the process's
        settings (see :func:`bpfast.set_num_threads` and :func:`bpfast.threads`:
        by default the CPUs this process may use, products threaded only where that
        is faster, also under load) alone. The thread
        counts belong to the process, so estimators with ``n_threads`` set fit and
        predict one at a time (a process-wide lock), each restoring the counts it
        found; bpfast work in other threads meanwhile (an estimator with
        ``n_threads=None`` included) runs with the counts of the one working.
    class_weight : dict, "balanced" or None, default=None
        bpfast's: weights per class, multiplied into ``sample_weight``; "balanced"
        uses ``n_samples / (n_classes * count(class))``. Not for multilabel targets;
        "balanced" is not for ``partial_fit``.
    dropout : float in [0, 1), default=0.0
        bpfast's: a :class:`bpfast.Dropout` of this rate after each hidden layer
        (after its activation) while training ("sgd"/"adam" only); 0 adds none.
        ``predict``, ``predict_proba``, ``score`` and the early-stopping score run in
        inference mode (no dropout).
    batch_norm : bool, default=False
        bpfast's: a :class:`bpfast.BatchNorm1d` before each hidden activation
        (``Dense`` without activation, ``BatchNorm1d``, then the activation). Batches
        of one sample cannot train it (choose ``batch_size`` accordingly). Prediction
        uses its running statistics. Such an estimator cannot be converted to
        scikit-learn's MLP (``to_sklearn``).

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
        The class labels (``arange(n_labels)`` for multilabel targets).
    loss_ : float
        The training loss of the last epoch (the final loss for "lbfgs"), penalty
        included.
    best_loss_ : float or None
        The lowest ``loss_`` reached ("sgd"/"adam"); None with early stopping.
    loss_curve_ : list of float
        ``loss_`` after each epoch ("sgd"/"adam"), continued by ``warm_start`` and
        ``partial_fit``.
    validation_scores_ : list of float or None
        The held-out accuracy after each epoch with early stopping, else None.
    best_validation_score_ : float or None
        The best of ``validation_scores_``, else None.
    t_ : int
        Training samples seen ("sgd"/"adam").
    coefs_ : list of ndarray (fan_in, fan_out)
        The weights of each layer: views into ``network_.parameters`` (edits in
        place, and assignments ``coefs_[i] = W``, change the model).
    intercepts_ : list of ndarray (fan_out,)
        The biases of each layer, views likewise.
    n_features_in_ : int
    feature_names_in_ : ndarray of str
        Defined when X had string column names.
    n_iter_ : int
        Epochs (iterations for "lbfgs") run by the last fit or partial_fit call.
    n_layers_ : int
        Layers counting input and output.
    n_outputs_ : int
        Output units: 1 for two classes, else the number of classes or labels.
    out_activation_ : {"logistic", "softmax"}
        The output's link: the network itself outputs logits.
    network_ : bpfast.Network
        The trained network (float64 by default); its output is the logits.

    See Also
    --------
    sklearn.neural_network.MLPClassifier : the estimator this one replaces.
    MLPRegressor : the regressor.
    """

    _PARAMETER_CHECKS = {**_BaseMLP._PARAMETER_CHECKS, "class_weight": _check_class_weight}

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam",
                 alpha=0.0001, batch_size="auto", learning_rate="constant",
                 learning_rate_init=0.001, power_t=0.5, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9,
                 nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=10, max_fun=15000,
                 dtype="float64", n_threads=None, class_weight=None, dropout=0.0,
                 batch_norm=False):
        self._set_hyperparameters(locals())

    @available_if(_is_stochastic)
    def partial_fit(self, X, y, sample_weight=None, classes=None):
        """One epoch over X, y, continuing from the current network (``sgd``/``adam``).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_labels)
        sample_weight : array-like of shape (n_samples,), optional
        classes : array-like of shape (n_classes,), optional
            Every class of every call; needed on the first call (not for multilabel
            targets), optional afterwards. y need not hold them all.

        Returns
        -------
        self : MLPClassifier
        """
        return self._fit(X, y, sample_weight, incremental=True, classes=classes)

    # ------------------------------------------------------------- targets
    def _encode_targets(self, y, first_pass, incremental, classes):
        """y -> (training target, what the validation score compares, target attributes).

        The target attributes (classes_, _target_kind, n_outputs_, out_activation_) are
        new on a first fit, else the fitted ones; nothing is set here. Several classes
        train on integer class indices with cross-entropy from logits; two classes on
        one 0/1 column and multilabel on the 0/1 matrix, with binary cross-entropy.
        """
        if y.ndim == 2 and y.shape[1] == 1:
            y = column_or_1d(y, warn=True)
        check_classification_targets(y)
        target_type = type_of_target(y)
        if target_type not in ("binary", "multiclass", "multilabel-indicator"):
            raise ValueError(f"MLPClassifier does not support {target_type} targets")
        if incremental and "classes_" not in self.__dict__:
            first_pass = True  # the first partial_fit call defines the classes
            if target_type != "multilabel-indicator":
                if classes is None:
                    raise ValueError("classes must be passed on the first call to "
                                     "partial_fit.")
                fitted_classes = np.unique(np.asarray(classes))
            else:
                fitted_classes = np.arange(y.shape[1])
        elif first_pass:
            fitted_classes = (np.arange(y.shape[1]) if target_type == "multilabel-indicator"
                              else np.unique(y))
        else:
            fitted_classes = self.classes_
            if incremental and classes is not None and not np.array_equal(
                    np.unique(np.asarray(classes)), self.classes_):
                raise ValueError(f"classes={classes!r} is not the same as on the first "
                                 f"call to partial_fit, which was {self.classes_!r}")
        multilabel = target_type == "multilabel-indicator"
        if not first_pass and multilabel != (self.__dict__["_target_kind"] == "multilabel"):
            raise ValueError("y is multilabel now but was not when fitted, or the reverse")
        if multilabel:
            if y.shape[1] != len(fitted_classes):
                raise ValueError(f"y has {y.shape[1]} labels but the network was fitted "
                                 f"on {len(fitted_classes)}")
            kind = "multilabel"
        else:
            present = np.unique(y)
            if not first_pass and self.warm_start and not incremental \
                    and set(present) != set(fitted_classes):
                raise ValueError(
                    "warm_start can only be used where `y` has the same classes as in "
                    f"the previous call to fit. Previously got {fitted_classes}, `y` "
                    f"has {present}")
            unknown = np.setdiff1d(present, fitted_classes)
            if len(unknown):
                raise ValueError(f"`y` has classes not in `self.classes_`. `self.classes_` "
                                 f"has {fitted_classes}. 'y' has {present}.")
            if len(fitted_classes) < 2:
                raise ValueError("MLPClassifier needs samples of at least 2 classes in the "
                                 f"data, but the data contain only one class: "
                                 f"{fitted_classes[0]!r}")
            kind = "binary" if len(fitted_classes) == 2 else "multiclass"
        if first_pass:
            targets = {"classes_": fitted_classes, "_target_kind": kind,
                       "n_outputs_": 1 if kind == "binary" else len(fitted_classes),
                       "out_activation_": "softmax" if kind == "multiclass" else "logistic"}
        else:
            targets = {name: self.__dict__[name] for name in
                       ("classes_", "_target_kind", "n_outputs_", "out_activation_")}
        if kind == "multilabel":
            target = np.ascontiguousarray(y, dtype=self.dtype)
            return target, target, targets
        indices = np.searchsorted(fitted_classes, y).astype(np.intp)
        if kind == "binary":
            return indices.astype(self.dtype).reshape(-1, 1), indices, targets
        return indices, indices, targets

    def _training_weights(self, sample_weight, y, incremental, targets):
        """sample_weight times class_weight, and at least two classes with weight in fit."""
        kind = targets["_target_kind"]
        if self.class_weight is not None:
            if kind == "multilabel":
                raise ValueError("class_weight is not supported for multilabel targets")
            if incremental and self.class_weight == "balanced":
                raise ValueError("class_weight='balanced' is not supported for "
                                 "partial_fit: one batch's class counts are not the data's;"
                                 " pass a dict of weights")
            labels = column_or_1d(y) if y.ndim == 2 else y
            class_weights = compute_sample_weight(self.class_weight, labels)
            sample_weight = (class_weights if sample_weight is None
                             else sample_weight * class_weights)
            if not sample_weight.any():
                raise ValueError("the weights (sample_weight times class_weight) are all "
                                 "zero")
        if sample_weight is not None and not incremental and kind != "multilabel":
            labels = column_or_1d(y) if y.ndim == 2 else y
            if len(np.unique(labels[sample_weight > 0])) < 2:
                raise ValueError("the samples with non-zero weight belong to a single "
                                 "class; fitting needs at least 2 classes")
        return sample_weight

    def _make_loss(self, targets=None):
        """(bpfast loss, scale): the objective is scale times the bpfast loss.

        bpfast's binary cross-entropy averages over every output; scikit-learn's log
        loss sums over the labels, so several labels scale it by their number.
        ``targets``: the target attributes of the fit being planned (default: the
        fitted ones).
        """
        targets = self.__dict__ if targets is None else targets
        if targets["_target_kind"] == "multiclass":
            return CrossEntropy(from_logits=True), 1.0
        return BinaryCrossEntropy(from_logits=True), float(targets["n_outputs_"])

    def _stratify_labels(self, score_target, targets):
        # scikit-learn's documentation: stratified, except for multilabel targets
        return None if targets["_target_kind"] == "multilabel" else score_target

    def _encoded_prediction(self, output):
        if self._target_kind == "multiclass":
            return output.argmax(axis=1)
        prediction = (output > 0).astype(int)
        return prediction.ravel() if self._target_kind == "binary" else prediction

    def _score_output(self, output, score_val, weight_val):
        return accuracy_score(score_val, self._encoded_prediction(output),
                              sample_weight=weight_val)

    # ------------------------------------------------------------- prediction
    def _decode_output(self, output):
        """The class of each sample (a 0/1 indicator row for multilabel targets)."""
        encoded = self._encoded_prediction(output)
        if self._target_kind == "multilabel":
            return encoded
        return self.classes_[encoded]

    def predict_proba(self, X):
        """Probability of each class, columns ordered as ``classes_``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        proba : ndarray of shape (n_samples, n_classes)
            Softmax of the logits for several classes; for two classes the columns
            are ``1 - p`` and ``p = sigmoid(logit)``; for multilabel, each label's
            sigmoid (rows need not sum to 1).
        """
        output = self._raw_output(X)
        if self._target_kind == "multiclass":
            return softmax(output, axis=1)
        probability = expit(output)
        if self._target_kind == "binary":
            return np.hstack([1 - probability, probability])
        return probability

    def predict_log_proba(self, X):
        """``log(predict_proba(X))``, as scikit-learn defines it.

        A probability that rounds to 0 gives -inf (scikit-learn's checks compare
        against exactly this).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        log_proba : ndarray of shape (n_samples, n_classes)
        """
        probability = self.predict_proba(X)
        return np.log(probability, out=probability)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags
