"""MLPRegressor: half the squared error on bpfast's engine, scikit-learn's regressor API."""
import numpy as np
from sklearn.base import RegressorMixin
from sklearn.metrics import r2_score

from .._validation import check_choice
from ..losses import MSE, Loss
from ._base import _BaseMLP


def _check_loss(name, value):
    if isinstance(value, Loss):
        return value
    if isinstance(value, str) and value == "poisson":
        raise ValueError(f"{name}='poisson' is not available in bpfast.sklearn; use "
                         f"{name}='squared_error' or scikit-learn's MLPRegressor")
    check_choice(name, value, ("squared_error",))


class MLPRegressor(RegressorMixin, _BaseMLP):
    """Multilayer perceptron regressor, scikit-learn's API on bpfast's engine.

    A drop-in replacement for :class:`sklearn.neural_network.MLPRegressor`. It
    minimises half the squared error, summed over outputs and averaged over samples,
    plus ``0.5 * alpha * ||W||^2 / n_samples``; the last layer is linear.

    Parameters
    ----------
    loss : {"squared_error"} or bpfast.Loss, default="squared_error"
        The loss; scikit-learn's "poisson" is not available in bpfast. A
        :class:`bpfast.Loss` instance (a built-in one, or a custom loss written in
        NumPy, see docs/extending.rst) is minimised as it is (``loss_`` is then its
        value, not scaled by the number of outputs).
    hidden_layer_sizes, activation, solver, alpha, batch_size, learning_rate, \
learning_rate_init, power_t, max_iter, shuffle, random_state, tol, verbose, \
warm_start, momentum, nesterovs_momentum, early_stopping, validation_fraction, \
beta_1, beta_2, epsilon, n_iter_no_change, max_fun, dtype, n_threads, dropout, \
batch_norm
        As for :class:`MLPClassifier`; with ``early_stopping`` the validation score
        is R^2 and the split is not stratified.

    Attributes
    ----------
    loss_ : float
        The last epoch's training loss (the final loss for "lbfgs"), penalty
        included. For several outputs it is summed over them: ``n_outputs_`` times
        what scikit-learn reports, whose gradient is of this sum too.
    best_loss_, loss_curve_, validation_scores_, best_validation_score_, t_, \
coefs_, intercepts_, n_features_in_, feature_names_in_, n_iter_, n_layers_, \
n_outputs_, network_
        As for :class:`MLPClassifier` (validation scores are R^2).
    out_activation_ : "identity"

    See Also
    --------
    sklearn.neural_network.MLPRegressor : the estimator this one replaces.
    MLPClassifier : the classifier.
    """

    _y_numeric = True
    _PARAMETER_CHECKS = {"loss": _check_loss, **_BaseMLP._PARAMETER_CHECKS}

    def __init__(self, loss="squared_error", hidden_layer_sizes=(100,), activation="relu", *,
                 solver="adam", alpha=0.0001, batch_size="auto", learning_rate="constant",
                 learning_rate_init=0.001, power_t=0.5, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9,
                 nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=10, max_fun=15000,
                 dtype="float64", n_threads=None, dropout=0.0, batch_norm=False):
        self._set_hyperparameters(locals())

    def _encode_targets(self, y, first_pass, incremental, classes):
        target = np.ascontiguousarray(y.reshape(-1, 1) if y.ndim == 1 else y,
                                      dtype=self.dtype)
        if not first_pass and target.shape[1] != self.n_outputs_:
            raise ValueError(f"y has {target.shape[1]} outputs but the network was fitted "
                             f"on {self.n_outputs_}")
        return target, target, {"n_outputs_": target.shape[1], "out_activation_": "identity"}

    def _make_loss(self, targets=None):
        """(bpfast loss, scale): half the squared error, summed over outputs.

        bpfast's MSE averages over all elements; scikit-learn's gradient is that of
        the sum over outputs, which is n_outputs times it. ``targets``: the target
        attributes of the fit being planned (default: the fitted ones).
        """
        if isinstance(self.loss, Loss):
            return self.loss, 1.0
        targets = self.__dict__ if targets is None else targets
        return MSE(half=True), float(targets["n_outputs_"])

    def _score_output(self, output, score_val, weight_val):
        return r2_score(score_val, output, sample_weight=weight_val)

    def _decode_output(self, output):
        """The targets: one column per output, a 1-D array for one output."""
        return output.ravel() if self.n_outputs_ == 1 else output

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags
