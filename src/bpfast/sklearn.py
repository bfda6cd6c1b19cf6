"""scikit-learn estimators that train on bpfast's engine: MLPClassifier and MLPRegressor.

They take scikit-learn's ``sklearn.neural_network`` parameters with the same
names and meanings, expose the same fitted attributes, and pass scikit-learn's
``check_estimator``. What runs underneath is a :class:`bpfast.Network`: each
``fit``/``partial_fit`` of ``sgd``/``adam`` checks its data once and then runs
every epoch as one compiled call (one ``Trainer.run(1)`` of the network's
training loop), every ``lbfgs`` function evaluation is one compiled
forward-and-backward (``Network.compute_gradients``) on the flat parameter
vector. Only scikit-learn's per-epoch bookkeeping (loss curve, convergence test,
early stopping, learning-rate schedule) runs in Python here.

A failed ``fit``/``partial_fit`` (bad parameters, data, weights, or a validation
split that cannot be made) leaves a fitted estimator as it was: everything is
checked and the new network is built before any fitted attribute is assigned.

scikit-learn is an optional dependency of bpfast: ``import bpfast`` never imports
this module, and importing this module needs scikit-learn 1.6 or newer.

Where the arithmetic differs from scikit-learn
----------------------------------------------
* Several outputs of a regression: scikit-learn reports the squared error
  averaged over outputs but follows the gradient of its *sum* over outputs. Here
  the loss that is reported (``loss_``, ``loss_curve_``) is the one whose gradient
  is followed: summed over outputs, averaged over samples, so ``loss_`` is
  ``n_outputs_`` times scikit-learn's. ``sgd``/``adam`` take scikit-learn's steps;
  ``lbfgs`` does not retrace scikit-learn's fit there, because scikit-learn hands
  L-BFGS-B a loss and a gradient that do not match (its line searches see the
  averaged loss) and bpfast a matching pair. Multilabel log-loss is summed over
  labels in both, so there both agree.
* The optimizers are bpfast's (PyTorch's update rules). SGD with (Nesterov)
  momentum takes scikit-learn's steps, also when ``learning_rate`` changes the rate
  (the momentum buffer is rescaled then, see ``_set_learning_rate``). Adam adds
  ``epsilon`` after the bias correction of the second moment, scikit-learn before
  it (a difference of order ``epsilon``).
* The L2 penalty of a mini-batch is ``0.5 * alpha * ||W||^2 / batch_size`` for
  every batch, also the last, smaller one (scikit-learn divides by that batch's
  size); with sample weights ``batch_size`` becomes ``batch_size * mean(weight)``,
  scikit-learn's batch weight sum on average.
"""
import numbers
import threading
import warnings
from contextlib import contextmanager
from itertools import pairwise

import numpy as np
import scipy.optimize
from scipy.special import expit, softmax

try:
    from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.metrics import accuracy_score, r2_score
    from sklearn.model_selection import train_test_split
    from sklearn.utils import check_random_state, column_or_1d
    from sklearn.utils.class_weight import compute_sample_weight
    from sklearn.utils.metaestimators import available_if
    from sklearn.utils.multiclass import check_classification_targets, type_of_target
    from sklearn.utils.validation import check_is_fitted, validate_data
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError(
        "bpfast.sklearn needs scikit-learn 1.6 or newer (it uses "
        "sklearn.utils.validation.validate_data); install it with "
        "`pip install 'scikit-learn>=1.6'`. The rest of bpfast works without it."
    ) from error

from ._threads import threads
from ._validation import check_bool, check_choice, check_int, check_real, check_sample_weight
from .layers import Dense
from .losses import MSE, BinaryCrossEntropy, CrossEntropy
from .network import DivergenceError, Network
from .optimizers import SGD, Adam

__all__ = ["MLPClassifier", "MLPRegressor"]

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
                  "_no_improvement_count", "_best_parameters")
# the thread counts are process-wide: estimators that set n_threads take turns
_THREAD_LOCK = threading.RLock()


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


@contextmanager
def _thread_limit(n_threads):
    """Run the body with n_threads threads (bpfast's and BLAS's), then restore both.

    None leaves the process's counts alone: bpfast's default policy (the CPUs this
    process may use, with large products threaded only while that is faster, see
    bpfast.threads) applies, and in joblib's worker processes (GridSearchCV(n_jobs=k))
    the default follows the OMP_NUM_THREADS joblib sets there, cpu_count // k. Both
    counts belong to the process, not to a thread, so the body runs under a
    module-wide lock: estimators that set n_threads fit and predict one at a time,
    and each restores the counts the one before it found. The lock is reentrant,
    so a limited call inside another one (same thread) nests.
    """
    if n_threads is None:
        yield
        return
    with _THREAD_LOCK, threads(n_threads):
        yield


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


# --------------------------------------------------------------------------- base
class _BaseMLP(BaseEstimator):
    """What MLPClassifier and MLPRegressor share: checks, network, solvers, bookkeeping.

    A subclass defines ``__init__`` (its parameters), ``_encode_targets`` (y -> what
    the network trains on, and the target attributes), ``_make_loss`` and
    ``_validation_score``.
    """

    #: whether validate_data converts y to numbers (regression) or keeps labels
    _y_numeric = False

    # ------------------------------------------------------------- fitted attributes
    @property
    def coefs_(self):
        """list of ndarray (fan_in, fan_out): each layer's weights, views into ``network_``.

        The arrays are transposed views of the network's weights (``layer.weight.T``),
        so reading them copies nothing and editing them in place edits the model.
        """
        network = self._network_or_raise("coefs_")
        return _LayerViews((layer.weight.T for layer in network.layers), "coefs_")

    @coefs_.setter
    def coefs_(self, values):
        _assign_layers(self.coefs_, values, "coefs_")

    @property
    def intercepts_(self):
        """list of ndarray (fan_out,): each layer's bias, views into ``network_``."""
        network = self._network_or_raise("intercepts_")
        return _LayerViews((layer.bias for layer in network.layers), "intercepts_")

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

        A value of the wrong type is a TypeError, one out of range a ValueError
        (bpfast's checks, shared with Network.fit).
        """
        check_choice("activation", self.activation, tuple(_HIDDEN_ACTIVATIONS))
        check_choice("solver", self.solver, _SOLVERS)
        check_real("alpha", self.alpha, minimum=0)
        if not (isinstance(self.batch_size, str) and self.batch_size == "auto"):
            if isinstance(self.batch_size, str):
                raise ValueError(f"batch_size must be 'auto' or an integer >= 1, got "
                                 f"{self.batch_size!r}")
            check_int("batch_size", self.batch_size, minimum=1)
        check_choice("learning_rate", self.learning_rate, _LEARNING_RATES)
        check_real("learning_rate_init", self.learning_rate_init, minimum=0,
                   min_inclusive=False)
        check_real("power_t", self.power_t, minimum=0)
        check_int("max_iter", self.max_iter, minimum=1)
        check_bool("shuffle", self.shuffle)
        check_real("tol", self.tol, minimum=0)
        if not isinstance(self.verbose, (bool, np.bool_, numbers.Integral)):
            raise TypeError(f"verbose must be a bool or an integer, got {self.verbose!r}")
        check_bool("warm_start", self.warm_start)
        check_real("momentum", self.momentum, minimum=0, maximum=1)
        check_bool("nesterovs_momentum", self.nesterovs_momentum)
        early_stopping = check_bool("early_stopping", self.early_stopping)
        check_real("validation_fraction", self.validation_fraction, minimum=0, maximum=1,
                   min_inclusive=not early_stopping, max_inclusive=False)
        check_real("beta_1", self.beta_1, minimum=0, maximum=1, max_inclusive=False)
        check_real("beta_2", self.beta_2, minimum=0, maximum=1, max_inclusive=False)
        check_real("epsilon", self.epsilon, minimum=0, min_inclusive=False)
        if not (isinstance(self.n_iter_no_change, numbers.Real)
                and self.n_iter_no_change == np.inf):
            check_int("n_iter_no_change", self.n_iter_no_change, minimum=1)
        check_int("max_fun", self.max_fun, minimum=1)
        check_choice("dtype", self.dtype, _DTYPES)
        check_int("n_threads", self.n_threads, minimum=1, allow_none=True)

    # ------------------------------------------------------------- fit
    def _fit(self, X, y, sample_weight, incremental, classes=None):
        self._check_parameters()
        with _thread_limit(self.n_threads):
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
        activation = _HIDDEN_ACTIVATIONS[self.activation]
        layers = [Dense(fan_in, fan_out, activation=activation)
                  for fan_in, fan_out in pairwise(layer_sizes[:-1])]
        layers.append(Dense(layer_sizes[-2], layer_sizes[-1]))  # identity: logits or values
        network = Network(layers, dtype=self.dtype, seed=shuffle_seed)
        for layer, (coef, intercept) in zip(network.layers, initial):
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
                                   _best_parameters=network.parameters.copy())
        else:
            plan.attributes.update(best_loss_=np.inf, validation_scores_=None,
                                   best_validation_score_=None)
            plan.removed.add("_best_parameters")

    def _check_compatible(self, layer_sizes):
        """warm_start and partial_fit continue the fitted network; it must fit the data."""
        network = self.network_
        fitted_sizes = [network.n_inputs] + [layer.out_features for layer in network.layers]
        if fitted_sizes != layer_sizes:
            raise ValueError(
                f"the fitted network has layer sizes {fitted_sizes}, but these data and "
                f"parameters need {layer_sizes}; refit with warm_start=False")
        if network.dtype.name != self.dtype:
            raise ValueError(f"the fitted network is {network.dtype.name}, but dtype="
                             f"{self.dtype!r}; refit with warm_start=False")
        if network.layers[0].activation != _HIDDEN_ACTIVATIONS[self.activation] and \
                len(network.layers) > 1:
            raise ValueError("activation changed since the network was fitted; refit "
                             "with warm_start=False")

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
        trainer = network._trainer(
            X_train, target_train, loss, optimizer, epochs, batch_size, self.shuffle,
            weight_train, None, l2, None, None, None, None, None, None, None, False, None,
            1, 0, "raise")

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
        else:
            last_loss = self.loss_curve_[-1]
            if last_loss > self.best_loss_ - self.tol:
                self._no_improvement_count += 1
            else:
                self._no_improvement_count = 0
            self.best_loss_ = min(self.best_loss_, last_loss)

    # ------------------------------------------------------------- prediction
    def _raw_output(self, X):
        """The network's last-layer output (logits or values) for validated X."""
        check_is_fitted(self)
        X = validate_data(self, X, accept_sparse=False, dtype=self.network_.dtype.name,
                          order="C", reset=False)
        with _thread_limit(self.n_threads):
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
        if network is not None:
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
        super().__setstate__(state)
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
        from .export import estimator_from_sklearn
        return estimator_from_sklearn(cls, fitted)

    def to_sklearn(self):
        """The equivalent fitted scikit-learn estimator (weights copied).

        bpfast's own parameters (``dtype``, ``n_threads``, ``class_weight``) have no
        scikit-learn counterpart and are left out; predictions are the same.
        """
        from .export import estimator_to_sklearn
        return estimator_to_sklearn(self)

    def to_onnx(self, path=None, *, opset=None):
        """This estimator as an ONNX model, written to path if given, in skl2onnx's layout.

        Input "input" (batch, n_features). A classifier has the outputs "label"
        (the ``classes_`` values, or the 0/1 indicator matrix for multilabel
        targets) and "probabilities" (batch, n_classes), as skl2onnx writes them
        without ZipMap; a regressor has "variable" (batch, n_outputs).
        """
        from .export import estimator_to_onnx
        return estimator_to_onnx(self, path, opset=opset)


def _is_stochastic(estimator):
    if estimator.solver not in ("sgd", "adam"):
        raise AttributeError(f"partial_fit is only available for stochastic optimizers. "
                             f"{estimator.solver} is not stochastic.")
    return True


# --------------------------------------------------------------------------- classifier
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

    def __init__(self, hidden_layer_sizes=(100,), activation="relu", *, solver="adam",
                 alpha=0.0001, batch_size="auto", learning_rate="constant",
                 learning_rate_init=0.001, power_t=0.5, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9,
                 nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=10, max_fun=15000,
                 dtype="float64", n_threads=None, class_weight=None):
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.max_fun = max_fun
        self.dtype = dtype
        self.n_threads = n_threads
        self.class_weight = class_weight

    def fit(self, X, y, sample_weight=None):
        """Fit the network to X and the class labels (or label indicator matrix) y.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_labels)
            Class labels (any sortable values, strings included), or a 0/1 label
            indicator matrix for multilabel classification.
        sample_weight : array-like of shape (n_samples,), optional
            Non-negative weights: the loss is the weighted mean over samples.

        Returns
        -------
        self : MLPClassifier
        """
        return self._fit(X, y, sample_weight, incremental=False)

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

    def _check_parameters(self):
        super()._check_parameters()
        weights = self.class_weight
        if not (weights is None or isinstance(weights, dict)
                or (isinstance(weights, str) and weights == "balanced")):
            raise ValueError(f"class_weight must be a dict, 'balanced' or None, got "
                             f"{weights!r}")

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

    def _validation_score(self, X_val, score_val, weight_val):
        output = self.network_.predict(X_val)
        if not np.isfinite(output).all():
            return np.nan
        return float(accuracy_score(score_val, self._encoded_prediction(output),
                                    sample_weight=weight_val))

    # ------------------------------------------------------------- prediction
    def predict(self, X):
        """The predicted class of each sample (a 0/1 indicator row for multilabel).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        y : ndarray of shape (n_samples,) or (n_samples, n_labels)
        """
        encoded = self._encoded_prediction(self._raw_output(X))
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


# --------------------------------------------------------------------------- regressor
class MLPRegressor(RegressorMixin, _BaseMLP):
    """Multilayer perceptron regressor, scikit-learn's API on bpfast's engine.

    A drop-in replacement for :class:`sklearn.neural_network.MLPRegressor`. It
    minimises half the squared error, summed over outputs and averaged over samples,
    plus ``0.5 * alpha * ||W||^2 / n_samples``; the last layer is linear.

    Parameters
    ----------
    loss : {"squared_error"}, default="squared_error"
        The loss; scikit-learn's "poisson" is not available in bpfast.
    hidden_layer_sizes, activation, solver, alpha, batch_size, learning_rate, \
learning_rate_init, power_t, max_iter, shuffle, random_state, tol, verbose, \
warm_start, momentum, nesterovs_momentum, early_stopping, validation_fraction, \
beta_1, beta_2, epsilon, n_iter_no_change, max_fun, dtype, n_threads
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

    def __init__(self, loss="squared_error", hidden_layer_sizes=(100,), activation="relu", *,
                 solver="adam", alpha=0.0001, batch_size="auto", learning_rate="constant",
                 learning_rate_init=0.001, power_t=0.5, max_iter=200, shuffle=True,
                 random_state=None, tol=1e-4, verbose=False, warm_start=False, momentum=0.9,
                 nesterovs_momentum=True, early_stopping=False, validation_fraction=0.1,
                 beta_1=0.9, beta_2=0.999, epsilon=1e-8, n_iter_no_change=10, max_fun=15000,
                 dtype="float64", n_threads=None):
        self.loss = loss
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.warm_start = warm_start
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.max_fun = max_fun
        self.dtype = dtype
        self.n_threads = n_threads

    def fit(self, X, y, sample_weight=None):
        """Fit the network to X and the real targets y.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,) or (n_samples, n_outputs)
        sample_weight : array-like of shape (n_samples,), optional
            Non-negative weights: the loss is the weighted mean over samples.

        Returns
        -------
        self : MLPRegressor
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
        self : MLPRegressor
        """
        return self._fit(X, y, sample_weight, incremental=True)

    def _check_parameters(self):
        if self.loss == "poisson":
            raise ValueError("loss='poisson' is not available in bpfast.sklearn; use "
                             "loss='squared_error' or scikit-learn's MLPRegressor")
        check_choice("loss", self.loss, ("squared_error",))
        super()._check_parameters()

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
        targets = self.__dict__ if targets is None else targets
        return MSE(half=True), float(targets["n_outputs_"])

    def _validation_score(self, X_val, score_val, weight_val):
        output = self.network_.predict(X_val)
        if not np.isfinite(output).all():
            return np.nan
        return float(r2_score(score_val, output, sample_weight=weight_val))

    def predict(self, X):
        """The predicted targets.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

        Returns
        -------
        y : ndarray of shape (n_samples,) or (n_samples, n_outputs)
        """
        output = self._raw_output(X)
        return output.ravel() if self.n_outputs_ == 1 else output

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        return tags
