"""What MLPClassifier and MLPRegressor share: hyperparameters and their checks, the
network, the solvers (lbfgs; sgd and adam with scikit-learn's bookkeeping),
prediction, pickling and interchange. The package's docstring says how the
arithmetic differs from scikit-learn's.
"""
import numbers
import warnings
from contextlib import nullcontext
from functools import partial
from itertools import pairwise

import numpy as np
import scipy.optimize

try:
    from sklearn.base import BaseEstimator
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.model_selection import train_test_split
    from sklearn.utils import check_random_state
    from sklearn.utils.metaestimators import available_if
    from sklearn.utils.validation import check_is_fitted, validate_data
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "bpfast.sklearn needs scikit-learn 1.6 or newer (it uses "
        "sklearn.utils.validation.validate_data); install it with "
        "`pip install 'scikit-learn>=1.6'`. The rest of bpfast works without it."
    ) from error

from .._threads import threads
from .._validation import check_bool, check_choice, check_int, check_real, check_sample_weight
from ..layers import Activation, BatchNorm1d, Dense, Dropout
from ..network import DivergenceError, Network
from ..optimizers import SGD, Adam

# scikit-learn's hidden activation names -> bpfast's
_HIDDEN_ACTIVATIONS = {"identity": "identity", "logistic": "sigmoid", "tanh": "tanh",
                       "relu": "relu"}
_SOLVERS = ("lbfgs", "sgd", "adam")
_LEARNING_RATES = ("constant", "invscaling", "adaptive")
_DTYPES = ("float32", "float64")
# scikit-learn's 'adaptive' schedule stops once the rate would fall below this
_ADAPTIVE_MIN_LEARNING_RATE = 1e-6
_NON_FINITE_MESSAGE = ("Solver produced non-finite parameter weights. The input data may "
                       "contain large values and need to be preprocessed.")
# the per-epoch records of the stochastic solvers (lbfgs keeps none, as in scikit-learn)
_EPOCH_RECORDS = ("loss_curve_", "best_loss_", "validation_scores_", "best_validation_score_",
                  "_no_improvement_count", "_best_parameters", "_best_buffers")

# --------------------------------------------------------------------------- checks
def _check_batch_size(name, value):
    if isinstance(value, str):
        if value != "auto":
            raise ValueError(f"{name} must be 'auto' or an integer >= 1, got {value!r}")
        return
    check_int(name, value, minimum=1)


def _check_verbose(name, value):
    if not isinstance(value, (bool, np.bool_, numbers.Integral)):
        raise TypeError(f"{name} must be a bool or an integer, got {value!r}")


def _check_n_iter_no_change(name, value):
    if not (isinstance(value, numbers.Real) and value == np.inf):
        check_int(name, value, minimum=1)


def _real(**bounds):
    return partial(check_real, **bounds)


_PROBABILITY = _real(minimum=0, maximum=1, max_inclusive=False)  # [0, 1)
_POSITIVE = _real(minimum=0, min_inclusive=False)
_NON_NEGATIVE = _real(minimum=0)
_AT_LEAST_ONE = partial(check_int, minimum=1)

# the hyperparameters MLPClassifier and MLPRegressor share: name -> check(name, value)
_SHARED_PARAMETER_CHECKS = {
    "activation": partial(check_choice, choices=tuple(_HIDDEN_ACTIVATIONS)),
    "solver": partial(check_choice, choices=_SOLVERS),
    "alpha": _NON_NEGATIVE,
    "batch_size": _check_batch_size,
    "learning_rate": partial(check_choice, choices=_LEARNING_RATES),
    "learning_rate_init": _POSITIVE,
    "power_t": _NON_NEGATIVE,
    "max_iter": _AT_LEAST_ONE,
    "shuffle": check_bool,
    "tol": _NON_NEGATIVE,
    "verbose": _check_verbose,
    "warm_start": check_bool,
    "momentum": _real(minimum=0, maximum=1),
    "nesterovs_momentum": check_bool,
    "early_stopping": check_bool,
    "validation_fraction": _PROBABILITY,
    "beta_1": _PROBABILITY,
    "beta_2": _PROBABILITY,
    "epsilon": _POSITIVE,
    "n_iter_no_change": _check_n_iter_no_change,
    "max_fun": _AT_LEAST_ONE,
    "dtype": partial(check_choice, choices=_DTYPES),
    "n_threads": partial(check_int, minimum=1, allow_none=True),
    "dropout": _PROBABILITY,
    "batch_norm": check_bool,
}


# --------------------------------------------------------------------------- helpers
class _LayerViews(list):
    """The list behind ``coefs_``/``intercepts_``: one writable view per layer.

    Each element is a view into ``network_.parameters``, so editing it in place
    (``est.coefs_[0][:] = W``) changes the model, as editing scikit-learn's arrays
    does. Assigning an element (``est.coefs_[0] = W``) copies W into that view for
    the same reason; W must have the layer's shape. A copy or pickle of the list is
    a plain list (of copies, for a deep copy).
    """

    def __init__(self, views, name):
        super().__init__(views)
        self._name = name

    def __setitem__(self, index, value):
        if not isinstance(index, numbers.Integral):
            raise TypeError(f"assign one layer at a time, e.g. est.{self._name}[0] = array")
        view = list.__getitem__(self, index)
        view[...] = _checked_layer(view, value, f"{self._name}[{index}]")

    def __delitem__(self, index):
        raise TypeError(f"the layers of a fitted network cannot be removed from "
                        f"{self._name}")

    def _refuse(self, *args, **kwargs):
        raise TypeError("the layers of a fitted network are fixed; edit the arrays in place")

    append = extend = insert = pop = remove = clear = sort = reverse = _refuse
    __iadd__ = __imul__ = _refuse

    def __reduce_ex__(self, protocol):
        return list, (list(self),)


def _checked_layer(view, value, what):
    """value as a new array of view's shape and dtype, or an error naming what."""
    array = np.asarray(value)
    if array.shape != view.shape:
        raise ValueError(f"{what} must have shape {view.shape}, got {array.shape}")
    if array.dtype.kind not in "biuf":
        raise TypeError(f"{what} must hold real numbers, got an array of dtype {array.dtype}")
    return array.astype(view.dtype)


def _assign_layers(views, values, what):
    """Copy one array per layer into views: all checked first, so a refusal changes none."""
    values = list(values)
    if len(values) != len(views):
        raise ValueError(f"{what} must hold {len(views)} arrays, one per layer, "
                         f"got {len(values)}")
    arrays = [_checked_layer(view, value, f"{what}[{index}]")
              for index, (view, value) in enumerate(zip(views, values))]
    for view, array in zip(views, arrays):
        view[...] = array


def _dense_layers(network):
    """The network's Dense layers: scikit-learn's layers (coefs_, intercepts_)."""
    return [layer for layer in network.layers if isinstance(layer, Dense)]


def _checked_sample_weight(sample_weight, n_samples):
    """None, or sample_weight as float64 (n_samples,) finite weights >= 0, not all 0.

    A number is the same weight for every sample, as in scikit-learn.
    """
    if isinstance(sample_weight, numbers.Real) and not isinstance(sample_weight,
                                                                  (bool, np.bool_)):
        sample_weight = np.full(n_samples, sample_weight, dtype=np.float64)
    return check_sample_weight(sample_weight, n_samples)


class _Fit:
    """What one fit or partial_fit call will do, checked and built before anything changes.

    ``attributes`` are assigned to the estimator (and ``removed`` deleted from it)
    in one step once every check has passed; then ``train`` runs.
    """

    def __init__(self):
        self.attributes = {}
        self.removed = set()
        self.train = None


def _is_stochastic(estimator):
    if estimator.solver not in ("sgd", "adam"):
        raise AttributeError(f"partial_fit is only available for stochastic optimizers. "
                             f"{estimator.solver} is not stochastic.")
    return True


# --------------------------------------------------------------------------- base
class _BaseMLP(BaseEstimator):
    """What MLPClassifier and MLPRegressor share: checks, network, solvers, bookkeeping.

    A subclass defines ``__init__`` (its parameters, stored by
    ``_set_hyperparameters``), ``_encode_targets`` (y -> what the network trains on,
    and the target attributes), ``_make_loss``, ``_score_output`` (the validation
    score of an output) and ``_decode_output`` (an output -> ``predict``'s answer).
    """

    #: whether validate_data converts y to numbers (regression) or keeps labels
    _y_numeric = False
    #: name -> check(name, value) of each hyperparameter, run in this order (a
    #: subclass adds its own); validation_fraction's lower bound depends on
    #: early_stopping and is checked after the table
    _PARAMETER_CHECKS = _SHARED_PARAMETER_CHECKS

    def _set_hyperparameters(self, given):
        """Store the arguments of a subclass's ``__init__`` (its ``locals()``) as given.

        scikit-learn's rule: ``__init__`` stores each parameter unchanged, under its
        own name, and checks nothing (``fit`` does, see ``_check_parameters``).
        """
        for name, value in given.items():
            if name != "self":
                setattr(self, name, value)

    # ------------------------------------------------------------- fitted attributes
    @property
    def coefs_(self):
        """list of ndarray (fan_in, fan_out): each layer's weights, views into ``network_``.

        The arrays are transposed views of the network's weights (``layer.weight.T``),
        so reading them copies nothing and editing them in place edits the model.
        """
        network = self._network_or_raise("coefs_")
        return _LayerViews((layer.weight.T for layer in _dense_layers(network)), "coefs_")

    @coefs_.setter
    def coefs_(self, values):
        _assign_layers(self.coefs_, values, "coefs_")

    @property
    def intercepts_(self):
        """list of ndarray (fan_out,): each layer's bias, views into ``network_``."""
        network = self._network_or_raise("intercepts_")
        return _LayerViews((layer.bias for layer in _dense_layers(network)), "intercepts_")

    @intercepts_.setter
    def intercepts_(self, values):
        _assign_layers(self.intercepts_, values, "intercepts_")

    def _network_or_raise(self, name):
        network = self.__dict__.get("network_")
        if network is None:
            # AttributeError, so that hasattr(est, "coefs_") is False before fit
            raise AttributeError(f"{type(self).__name__} has no attribute {name!r} before "
                                 "it is fitted")
        return network

    # ------------------------------------------------------------- parameter checks
    def _hidden_sizes(self):
        sizes = self.hidden_layer_sizes
        if isinstance(sizes, numbers.Integral) and not isinstance(sizes, (bool, np.bool_)):
            sizes = [sizes]
        if isinstance(sizes, str):
            sizes = None
        try:
            sizes = list(sizes)
        except TypeError:
            raise TypeError("hidden_layer_sizes must be an integer or a sequence of "
                            f"integers, got {self.hidden_layer_sizes!r}") from None
        return [check_int(f"hidden_layer_sizes[{index}]", size, minimum=1)
                for index, size in enumerate(sizes)]

    def _check_parameters(self):
        """Refuse a bad hyperparameter before anything changes, naming it.

        Each is checked by its entry in ``_PARAMETER_CHECKS`` (bpfast's checks,
        shared with Network.fit): a value of the wrong type is a TypeError, one out
        of range a ValueError.
        """
        for name, check in self._PARAMETER_CHECKS.items():
            check(name, getattr(self, name))
        if self.dropout > 0 and self.solver == "lbfgs":
            raise ValueError(f"dropout={self.dropout} needs a stochastic solver ('sgd' or "
                             "'adam'): lbfgs needs the same objective at every evaluation")
        if self.early_stopping and self.validation_fraction == 0:
            raise ValueError("validation_fraction must be > 0 with early_stopping=True, "
                             f"got {self.validation_fraction}")

    def _thread_limit(self):
        """``bpfast.threads(n_threads)`` around a fit or predict; None: the counts as set.

        None leaves the process's counts alone: bpfast's default policy (the CPUs this
        process may use, with large products threaded only while that is faster, see
        bpfast._threads) applies, and in joblib's worker processes
        (GridSearchCV(n_jobs=k)) the default follows the OMP_NUM_THREADS joblib sets
        there, cpu_count // k. Estimators that set n_threads take turns, as any
        ``bpfast.threads`` blocks in several threads do.
        """
        return nullcontext() if self.n_threads is None else threads(self.n_threads)

    # ------------------------------------------------------------- fit
    def fit(self, X, y, sample_weight=None):
        """Fit a new network (with ``warm_start``, continue the fitted one) to X and y.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
            MLPClassifier: class labels (any sortable values, strings included), or a
            0/1 label indicator matrix for multilabel classification. MLPRegressor:
            the real targets.
        sample_weight : array-like of shape (n_samples,), optional
            Non-negative weights: the loss is the weighted mean over samples.

        Returns
        -------
        self : object
        """
        return self._fit(X, y, sample_weight, incremental=False)

    @available_if(_is_stochastic)
    def partial_fit(self, X, y, sample_weight=None):
        """One epoch over X, y, continuing from the current network (``sgd``/``adam``).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
        sample_weight : array-like of shape (n_samples,), optional

        Returns
        -------
        self : object
        """
        return self._fit(X, y, sample_weight, incremental=True)

    def _fit(self, X, y, sample_weight, incremental, classes=None):
        self._check_parameters()
        with self._thread_limit():
            plan = self._plan_fit(X, y, sample_weight, incremental, classes)
            # every check passed: the fitted attributes change together, here
            for name in plan.removed:
                self.__dict__.pop(name, None)
            self.__dict__.update(plan.attributes)
            try:
                plan.train()
            except DivergenceError as error:
                raise ValueError(_NON_FINITE_MESSAGE) from error
        if not np.isfinite(self.network_.parameters).all():
            raise ValueError(_NON_FINITE_MESSAGE)
        return self

    def _plan_fit(self, X, y, sample_weight, incremental, classes):
        """Check everything and build what the fit needs, changing nothing: a _Fit."""
        hidden_sizes = self._hidden_sizes()
        if incremental and self.early_stopping:
            raise ValueError("partial_fit does not support early_stopping=True")
        first_pass = "network_" not in self.__dict__ or (
            not self.warm_start and not incremental)
        plan = _Fit()
        X, y = self._validate_fit_data(X, y, first_pass, plan)
        target, score_target, targets = self._encode_targets(y, first_pass, incremental,
                                                             classes)
        plan.attributes.update(targets)
        sample_weight = self._training_weights(
            _checked_sample_weight(sample_weight, X.shape[0]), y, incremental, targets)
        layer_sizes = [X.shape[1], *hidden_sizes, targets["n_outputs_"]]
        random_state = check_random_state(self.random_state)
        # a RandomState passed as random_state is the user's: a refused fit leaves it too
        rng_state = random_state.get_state() if random_state is self.random_state else None
        try:
            if first_pass:
                network = self._new_network(layer_sizes, random_state, plan)
            else:
                network = self.network_
                self._check_compatible(layer_sizes)
                self._continue_records(plan)
            loss, scale = self._make_loss(targets)
            if self.solver == "lbfgs":
                def train():
                    self._fit_lbfgs(X, target, sample_weight, loss, scale)
                plan.train = train
            else:
                self._plan_stochastic(plan, network, X, target, score_target, sample_weight,
                                      random_state, incremental, loss, scale, targets)
        except BaseException:
            if rng_state is not None:
                random_state.set_state(rng_state)
            raise
        return plan

    def _validate_fit_data(self, X, y, reset, plan):
        """validate_data's checks of X and y; with reset, n_features_in_ and
        feature_names_in_ go into plan instead of onto the estimator."""
        if not reset:
            return validate_data(self, X, y, accept_sparse=False, multi_output=True,
                                 y_numeric=self._y_numeric, dtype=self.dtype, order="C",
                                 reset=False)
        # validate_data records the input's width and column names on the estimator it
        # is given: give it a stand-in with the same parameters (and so the same tags)
        probe = object.__new__(type(self))
        probe.__dict__.update(self.get_params(deep=False))
        X, y = validate_data(probe, X, y, accept_sparse=False, multi_output=True,
                             y_numeric=self._y_numeric, dtype=self.dtype, order="C",
                             reset=True)
        plan.attributes["n_features_in_"] = probe.n_features_in_
        if "feature_names_in_" in probe.__dict__:
            plan.attributes["feature_names_in_"] = probe.feature_names_in_
        else:
            plan.removed.add("feature_names_in_")
        return X, y

    def _training_weights(self, sample_weight, y, incremental, targets):
        """The per-sample weights training uses (the classifier adds class weights)."""
        return sample_weight

    def _new_network(self, layer_sizes, random_state, plan):
        """A new network with scikit-learn's initialisation; its fresh records into plan."""
        # scikit-learn's Glorot-uniform initialisation (biases too), drawn in its order
        # from random_state, so one seed gives both libraries the same initial network
        factor = 2.0 if self.activation == "logistic" else 6.0
        initial = []
        for fan_in, fan_out in pairwise(layer_sizes):
            bound = np.sqrt(factor / (fan_in + fan_out))
            initial.append((random_state.uniform(-bound, bound, (fan_in, fan_out)),
                            random_state.uniform(-bound, bound, fan_out)))
        # the network's own generator only shuffles; its seed is read off random_state's
        # state without drawing, so the draws that follow (the early-stopping split)
        # are those scikit-learn makes
        key, position = random_state.get_state()[1:3]
        shuffle_seed = int(np.random.SeedSequence([*key.tolist(), position])
                           .generate_state(1)[0] >> 1)
        network = Network(self._layers(layer_sizes), dtype=self.dtype, seed=shuffle_seed)
        for layer, (coef, intercept) in zip(_dense_layers(network), initial):
            layer.weight[...] = coef.T
            layer.bias[...] = intercept
        plan.attributes.update(network_=network, n_layers_=len(layer_sizes), n_iter_=0,
                               t_=0, _optimizer=None)
        plan.removed.update(_EPOCH_RECORDS)  # as in scikit-learn, lbfgs keeps none
        if self.solver != "lbfgs":
            plan.attributes.update(loss_curve_=[], _no_improvement_count=0)
            self._reset_stopping_records(plan, network)
        return network

    def _reset_stopping_records(self, plan, network):
        """The fresh records of early stopping (validation) or of the training loss."""
        if self.early_stopping:
            plan.attributes.update(validation_scores_=[], best_validation_score_=-np.inf,
                                   best_loss_=None,
                                   _best_parameters=network.parameters.copy(),
                                   _best_buffers=network.buffers.copy())
        else:
            plan.attributes.update(best_loss_=np.inf, validation_scores_=None,
                                   best_validation_score_=None)
            plan.removed.update(("_best_parameters", "_best_buffers"))

    def _check_compatible(self, layer_sizes):
        """warm_start and partial_fit continue the fitted network; it must fit the data."""
        network = self.network_
        fitted_sizes = [network.n_inputs] + [layer.out_features
                                             for layer in _dense_layers(network)]
        if fitted_sizes != layer_sizes:
            raise ValueError(
                f"the fitted network has layer sizes {fitted_sizes}, but these data and "
                f"parameters need {layer_sizes}; refit with warm_start=False")
        if network.dtype.name != self.dtype:
            raise ValueError(f"the fitted network is {network.dtype.name}, but dtype="
                             f"{self.dtype!r}; refit with warm_start=False")
        wanted = [layer.describe() for layer in self._layers(layer_sizes)]
        if [layer.describe() for layer in network.layers] != wanted:
            raise ValueError("activation, dropout or batch_norm changed since the network "
                             "was fitted; refit with warm_start=False")

    def _continue_records(self, plan):
        """The records a continued stochastic fit needs but the last fit did not keep.

        After an lbfgs fit (which keeps none) they start afresh; after a fit with the
        other early_stopping setting, the records of this setting start afresh.
        """
        if self.solver == "lbfgs":
            return
        if "loss_curve_" not in self.__dict__:
            plan.attributes.update(loss_curve_=[], _no_improvement_count=0)
        had_validation = self.__dict__.get("validation_scores_") is not None
        if "best_loss_" not in self.__dict__ or had_validation != bool(self.early_stopping):
            self._reset_stopping_records(plan, self.network_)

    def _layers(self, layer_sizes):
        """The network's layers for these widths: Dense layers with the hidden
        activation; with batch_norm, Dense without activation, BatchNorm1d, Activation;
        with dropout, a Dropout after each hidden layer; an identity output layer."""
        activation = _HIDDEN_ACTIVATIONS[self.activation]
        layers = []
        for fan_in, fan_out in pairwise(layer_sizes[:-1]):
            if self.batch_norm:
                layers += [Dense(fan_in, fan_out), BatchNorm1d(fan_out)]
                if activation != "identity":
                    layers.append(Activation(activation))
            else:
                layers.append(Dense(fan_in, fan_out, activation=activation))
            if self.dropout > 0:
                layers.append(Dropout(self.dropout))
        layers.append(Dense(layer_sizes[-2], layer_sizes[-1]))  # identity: logits or values
        return layers

    # ------------------------------------------------------------- lbfgs
    def _fit_lbfgs(self, X, target, sample_weight, loss, scale):
        network = self.network_
        total_weight = X.shape[0] if sample_weight is None else float(sample_weight.sum())
        # scikit-learn's objective is the data loss plus 0.5 * alpha * ||W||^2 / n (W:
        # the weights, not the biases); bpfast computes both divided by `scale`
        l2 = self.alpha / (total_weight * scale)

        def objective(packed):
            network.parameters[...] = packed  # the one copy; no per-layer unpacking
            value = network.compute_gradients(X, target, loss, sample_weight=sample_weight,
                                              l2=l2)
            # a new float64 array, also when no scaling is needed: scipy may keep the
            # previous gradient while the next evaluation overwrites network.gradients
            return scale * value, np.multiply(network.gradients, scale, dtype=np.float64)

        callback = None
        if self.verbose:
            def callback(intermediate_result):
                print(f"lbfgs: loss = {intermediate_result.fun:.8f}")
        result = scipy.optimize.minimize(
            objective, network.parameters.astype(np.float64), method="L-BFGS-B", jac=True,
            callback=callback,
            options={"maxiter": self.max_iter, "maxfun": self.max_fun, "gtol": self.tol})
        network.parameters[...] = result.x
        if result.status != 0:
            message = result.message
            if isinstance(message, bytes):
                message = message.decode("latin1")
            warnings.warn(
                f"lbfgs failed to converge after {result.nit} iterations (status "
                f"{result.status}: {message}). Increase the number of iterations "
                "(max_iter) or scale the data.", ConvergenceWarning, stacklevel=5)
        self.n_iter_ = min(int(result.nit), self.max_iter)
        self.loss_ = float(result.fun)

    # ------------------------------------------------------------- sgd, adam
    def _make_optimizer(self, scale):
        # The network minimises the objective divided by `scale`; these settings
        # make its steps those of the undivided objective (SGD's step is linear
        # in the gradient, Adam's is invariant to its scale but for epsilon).
        if self.solver == "sgd":
            return SGD(lr=self.learning_rate_init * scale, momentum=self.momentum,
                       nesterov=bool(self.nesterovs_momentum and self.momentum > 0))
        return Adam(lr=self.learning_rate_init, betas=(self.beta_1, self.beta_2),
                    eps=self.epsilon / scale)

    def _plan_stochastic(self, plan, network, X, target, score_target, sample_weight,
                         random_state, incremental, loss, scale, targets):
        """The optimizer, the validation split and the network's checked Trainer."""
        optimizer = self.__dict__.get("_optimizer")
        if not incremental or optimizer is None:
            optimizer = self._make_optimizer(scale)
            plan.attributes.update(_optimizer=optimizer,
                                   _learning_rate=float(self.learning_rate_init))
        if not incremental:
            # each fit() needs n_iter_no_change fresh epochs without progress to stop
            plan.attributes["_no_improvement_count"] = 0
        plan.attributes["n_iter_"] = 0

        if self.early_stopping:
            (X_train, X_val, target_train, score_val, weight_train,
             weight_val) = self._split_validation(X, target, score_target, sample_weight,
                                                  random_state, targets)
            validation = (X_val, score_val, weight_val)
        else:
            X_train, target_train, weight_train = X, target, sample_weight
            validation = None
        n_train = X_train.shape[0]
        if self.batch_size == "auto":
            batch_size = min(200, n_train)
        else:
            if self.batch_size > n_train:
                warnings.warn("Got `batch_size` less than 1 or larger than sample size. "
                              "It is going to be clipped", stacklevel=5)
            batch_size = min(self.batch_size, n_train)
        # alpha / batch_size per batch as scikit-learn, on the divided objective; with
        # weights a batch counts as batch_size * mean weight samples
        mean_weight = 1.0 if weight_train is None else float(weight_train.mean())
        l2 = self.alpha / (batch_size * mean_weight * scale)
        # the data are checked once here, not once per epoch; each run(1) is one epoch
        epochs = 1 if incremental else self.max_iter
        trainer = network.trainer(
            X_train, target_train, loss=loss, optimizer=optimizer, epochs=epochs,
            batch_size=batch_size, shuffle=self.shuffle, sample_weight=weight_train, l2=l2,
            patience=1)

        def train():
            self._fit_stochastic(trainer, n_train, validation, scale, incremental)
        plan.train = train

    def _fit_stochastic(self, trainer, n_train, validation, scale, incremental):
        try:
            for _ in range(self.max_iter):
                history = trainer.run(1)
                self.n_iter_ += 1
                self.t_ += n_train
                self.loss_ = scale * float(history.history["loss"][-1])
                self.loss_curve_.append(self.loss_)
                if self.verbose:
                    print(f"Iteration {self.n_iter_}, loss = {self.loss_:.8f}")
                self._update_no_improvement_count(validation)
                if self.solver == "sgd" and self.learning_rate == "invscaling":
                    self._set_learning_rate(
                        self.learning_rate_init / (self.t_ + 1) ** self.power_t, scale)
                if self._no_improvement_count > self.n_iter_no_change \
                        and self._stop_or_slow_down(scale):
                    break
                if incremental:
                    break
                if self.n_iter_ == self.max_iter:
                    warnings.warn(
                        f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) reached "
                        "and the optimization hasn't converged yet.", ConvergenceWarning,
                        stacklevel=5)
        except KeyboardInterrupt:
            warnings.warn("Training interrupted by user.", stacklevel=5)
        if self.early_stopping:
            self.network_.parameters = self._best_parameters
            self.network_.buffers = self._best_buffers

    def _set_learning_rate(self, learning_rate, scale):
        """Change the step size between epochs as scikit-learn's SGD does."""
        optimizer = self._optimizer
        previous = optimizer.lr
        self._learning_rate = float(learning_rate)
        optimizer.lr = self._learning_rate * (scale if self.solver == "sgd" else 1.0)
        buffer = optimizer.state.get("momentum_buffer")
        if buffer is not None and optimizer.lr > 0:
            # scikit-learn's velocity holds past steps (rate included) and PyTorch's
            # buffer past gradients (step = rate * buffer); rescaling the buffer keeps
            # the velocity, so the next steps are scikit-learn's
            buffer *= previous / optimizer.lr

    def _stop_or_slow_down(self, scale):
        """No progress for n_iter_no_change epochs: True to stop; 'adaptive' sgd slows first."""
        what = ("Validation score did not improve" if self.early_stopping
                else "Training loss did not improve")
        message = (f"{what} more than tol={self.tol:f} for {self.n_iter_no_change} "
                   "consecutive epochs.")
        if self.solver == "sgd" and self.learning_rate == "adaptive" \
                and self._learning_rate > _ADAPTIVE_MIN_LEARNING_RATE:
            self._set_learning_rate(self._learning_rate / 5.0, scale)
            self._no_improvement_count = 0
            if self.verbose:
                print(f"{message} Setting learning rate to {self._learning_rate:f}")
            return False
        if self.verbose:
            print(f"{message} Stopping.")
        return True

    def _split_validation(self, X, target, score_target, sample_weight, random_state,
                          targets):
        """Hold out validation_fraction of the samples, stratified for one-output classes.

        Stratified when every class can be on both sides; otherwise (tiny data, many
        classes) a plain random split, as scikit-learn's own code does for more than
        two classes.
        """
        stratify = self._stratify_labels(score_target, targets)
        if stratify is not None:
            n_validation = int(np.ceil(self.validation_fraction * X.shape[0]))
            counts = np.unique(stratify, return_counts=True)[1]
            if counts.min() < 2 or min(n_validation, X.shape[0] - n_validation) < len(counts):
                stratify = None
        arrays = [X, target, score_target]
        if sample_weight is not None:
            arrays.append(sample_weight)
        parts = train_test_split(*arrays, test_size=self.validation_fraction,
                                 random_state=random_state, stratify=stratify)
        X_train, X_val, target_train, _, _, score_val = parts[:6]
        weight_train, weight_val = parts[6:] if sample_weight is not None else (None, None)
        if X_val.shape[0] < 2:
            raise ValueError("The validation set is too small. Increase "
                             "'validation_fraction' or the size of your dataset.")
        if weight_val is not None and not weight_val.any():
            raise ValueError("The sample weights of the validation set are all zero; "
                             "use another random_state or validation_fraction")
        if weight_train is not None and not weight_train.any():
            raise ValueError("The sample weights of the training part are all zero; "
                             "use another random_state or validation_fraction")
        return (np.ascontiguousarray(X_train), X_val, np.ascontiguousarray(target_train),
                score_val, weight_train, weight_val)

    def _stratify_labels(self, score_target, targets):
        return None

    def _validation_score(self, X_val, score_val, weight_val):
        """The held-out score of early stopping (NaN once the output is not finite)."""
        output = self.network_.predict(X_val)
        if not np.isfinite(output).all():
            return np.nan
        return float(self._score_output(output, score_val, weight_val))

    def _update_no_improvement_count(self, validation):
        """scikit-learn's convergence test: progress by tol on validation score or loss."""
        if self.early_stopping:
            score = self._validation_score(*validation)
            self.validation_scores_.append(score)
            if self.verbose:
                print(f"Validation score: {score:f}")
            if score < self.best_validation_score_ + self.tol:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            if score > self.best_validation_score_:
                self.best_validation_score_ = score
                np.copyto(self._best_parameters, self.network_.parameters)
                np.copyto(self._best_buffers, self.network_.buffers)
        else:
            last_loss = self.loss_curve_[-1]
            if last_loss > self.best_loss_ - self.tol:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            self.best_loss_ = min(self.best_loss_, last_loss)

    # ------------------------------------------------------------- prediction
    def predict(self, X):
        """The prediction for each sample of X.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        y : ndarray of shape (n_samples,) or (n_samples, n_outputs)
            MLPClassifier: the predicted class (a 0/1 indicator row for multilabel
            targets). MLPRegressor: the predicted targets, one column per output.
        """
        return self._decode_output(self._raw_output(X))

    def _raw_output(self, X):
        """The network's last-layer output (logits or values) for validated X."""
        check_is_fitted(self)
        X = validate_data(self, X, accept_sparse=False, dtype=self.network_.dtype.name,
                          order="C", reset=False)
        with self._thread_limit():
            return self.network_.predict(X)

    # ------------------------------------------------------------- pickling
    def __getstate__(self):
        """Pickle the network as its layer sizes, activations, dtype and parameters.

        The optimizer is not kept: a ``partial_fit`` after unpickling starts with
        fresh momentum/Adam moments, as a ``fit`` always does.
        """
        state = dict(super().__getstate__())
        network = state.pop("network_", None)
        state.pop("_optimizer", None)
        if network is not None and len(_dense_layers(network)) != len(network.layers):
            state["_network"] = network  # pickled by its own state protocol
        elif network is not None:
            state["_network_state"] = {
                "layers": [(layer.in_features, layer.out_features, layer.activation)
                           for layer in network.layers],
                "dtype": network.dtype.name,
                "seed": network.seed,
                "parameters": network.parameters.copy(),
            }
        return state

    def __setstate__(self, state):
        state = dict(state)
        network_state = state.pop("_network_state", None)
        network = state.pop("_network", None)
        super().__setstate__(state)
        if network is not None:
            self._optimizer = None
            self.network_ = network
        if network_state is not None:
            self._optimizer = None
            network = Network([Dense(fan_in, fan_out, activation=activation)
                               for fan_in, fan_out, activation in network_state["layers"]],
                              dtype=network_state["dtype"], seed=network_state["seed"])
            network.parameters[...] = network_state["parameters"]
            self.network_ = network

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.sparse = False  # dense arrays only; sparse input is a TypeError
        return tags

    # ------------------------------------------------------------- interchange
    # thin wrappers around bpfast.export
    @classmethod
    def from_sklearn(cls, fitted):
        """This estimator made from a fitted scikit-learn MLPClassifier/MLPRegressor.

        The parameters, weights (copied, in the coefficients' dtype), classes and
        fitted records are taken over, so ``predict``/``predict_proba`` agree with
        the scikit-learn estimator's. The optimizer's state is not: a ``partial_fit``
        or warm-started ``fit`` continues with fresh Adam moments or momentum.
        """
        from ..export import estimator_from_sklearn
        return estimator_from_sklearn(cls, fitted)

    def to_sklearn(self):
        """The equivalent fitted scikit-learn estimator (weights copied).

        bpfast's own parameters (``dtype``, ``n_threads``, ``class_weight``) have no
        scikit-learn counterpart and are left out; predictions are the same.
        """
        from ..export import estimator_to_sklearn
        return estimator_to_sklearn(self)

    def to_onnx(self, path=None, *, opset=None):
        """This estimator as an ONNX model, written to path if given, in skl2onnx's layout.

        Input "input" (batch, n_features). A classifier has the outputs "label"
        (the ``classes_`` values, or the 0/1 indicator matrix for multilabel
        targets) and "probabilities" (batch, n_classes), as skl2onnx writes them
        without ZipMap; a regressor has "variable" (batch, n_outputs).
        """
        from ..export import estimator_to_onnx
        return estimator_to_onnx(self, path, opset=opset)

