"""bpfast.sklearn: scikit-learn's estimator checks, agreement with scikit-learn's own MLP,
the fitted attributes, the bookkeeping (convergence, early stopping, schedules), and the
estimators inside scikit-learn's tools.

Oracles: sklearn.utils.estimator_checks; sklearn.neural_network started from the same
initial weights (bpfast.sklearn draws them in scikit-learn's order), which makes lbfgs
(but for multi-output regression) and unshuffled SGD agree to rounding; and formulas
written out here (the loss, the learning-rate schedules).
"""
import contextlib
import copy
import pickle
import subprocess
import sys
import textwrap
import threading
import warnings

import numpy as np
import pytest

sklearn = pytest.importorskip("sklearn", minversion="1.6")

from sklearn.base import clone  # noqa: E402
from sklearn.datasets import (  # noqa: E402
    load_breast_cancer,
    load_digits,
    make_classification,
    make_multilabel_classification,
    make_regression,
)
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.model_selection import GridSearchCV, cross_val_score, train_test_split  # noqa: E402
from sklearn.neural_network import MLPClassifier as SkMLPClassifier  # noqa: E402
from sklearn.neural_network import MLPRegressor as SkMLPRegressor  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

import bpfast as bp  # noqa: E402
from bpfast.sklearn import MLPClassifier, MLPRegressor  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def _one_blas_thread():
    """These problems are tiny: BLAS threads only wait on each other (and on other
    processes on a small CI machine), so both libraries run single-threaded here."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


# float32 networks compute in float32: the checks that compare to 1e-7 or demand
# float64 output cannot hold, by design of the dtype parameter.
_FLOAT32_FAILURES = {
    "check_sample_weight_equivalence_on_dense_data":
        "float32 arithmetic: weighted and repeated fits agree to ~1e-7, not the check's "
        "rtol=1e-7/atol=1e-9",
    "check_regressor_multioutput":
        "dtype='float32' predicts float32 on purpose; the check demands float64",
}


def _expected_failures(estimator):
    if estimator.dtype != "float32":
        return {}
    return {name: reason for name, reason in _FLOAT32_FAILURES.items()
            if name != "check_regressor_multioutput" or isinstance(estimator, MLPRegressor)}


# --------------------------------------------------------------------------- checks
@parametrize_with_checks(
    [MLPClassifier(max_iter=100), MLPRegressor(max_iter=100),
     MLPClassifier(solver="lbfgs", max_iter=40), MLPRegressor(solver="lbfgs", max_iter=40),
     MLPClassifier(solver="sgd", learning_rate="adaptive", max_iter=100),
     MLPRegressor(dtype="float32", max_iter=100)],
    expected_failed_checks=_expected_failures)
def test_sklearn_estimator_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        check(estimator)


def test_no_expected_failures_at_float64():
    # the list above is empty for every float64 configuration
    for estimator in (MLPClassifier(), MLPRegressor(), MLPClassifier(solver="lbfgs")):
        assert _expected_failures(estimator) == {}


# --------------------------------------------------------------------------- import
def test_import_bpfast_does_not_import_sklearn():
    code = ("import sys, bpfast; "
            "assert 'sklearn' not in sys.modules, 'sklearn imported'; "
            "assert 'bpfast.sklearn' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_without_sklearn_says_what_to_install():
    code = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "sklearn" or name.startswith("sklearn."):
                    raise ImportError("blocked for the test")
        sys.meta_path.insert(0, Block())
        import bpfast
        try:
            import bpfast.sklearn
        except ImportError as error:
            print(error)
        else:
            raise SystemExit("imported without scikit-learn")
    """)
    result = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                            text=True)
    assert "scikit-learn 1.6" in result.stdout
    assert "pip install" in result.stdout


# --------------------------------------------------------------------------- data
def _blobs(n=120, n_features=6, n_classes=3, seed=0):
    X, y = make_classification(n_samples=n, n_features=n_features, n_informative=4,
                               n_classes=n_classes, n_clusters_per_class=1, random_state=seed)
    return X, y


@contextlib.contextmanager
def _quiet():
    """Short fits on purpose: their ConvergenceWarning is expected."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        yield


# --------------------------------------------------------------------------- agreement
@pytest.mark.parametrize("problem", ["binary", "multiclass", "multilabel", "regression"])
def test_lbfgs_matches_sklearn(problem):
    """Same initial weights and the same objective: L-BFGS-B takes the same path."""
    if problem == "regression":
        X, y = make_regression(100, 5, noise=1.0, random_state=0)
        y = y / y.std()
        ours, theirs = MLPRegressor, SkMLPRegressor
    elif problem == "multilabel":
        X, y = make_multilabel_classification(100, 6, n_classes=3, random_state=0)
        ours, theirs = MLPClassifier, SkMLPClassifier
    else:
        X, y = _blobs(n_classes=2 if problem == "binary" else 3)
        ours, theirs = MLPClassifier, SkMLPClassifier
    params = dict(solver="lbfgs", hidden_layer_sizes=(8, 5), activation="tanh", alpha=1e-3,
                  max_iter=15, random_state=0)
    with _quiet():
        a = ours(**params).fit(X, y)
        b = theirs(**params).fit(X, y)
    assert a.n_iter_ == b.n_iter_
    np.testing.assert_allclose(a.loss_, b.loss_, rtol=1e-9)
    for ours_array, theirs_array in zip(a.coefs_ + a.intercepts_, b.coefs_ + b.intercepts_):
        np.testing.assert_allclose(ours_array, theirs_array, rtol=1e-7, atol=1e-9)
    if problem == "regression":
        np.testing.assert_allclose(a.predict(X), b.predict(X), rtol=1e-7, atol=1e-9)
    else:
        np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X), atol=1e-9)
        np.testing.assert_array_equal(a.predict(X), b.predict(X))


@pytest.mark.parametrize("schedule", [
    dict(learning_rate="constant"),
    dict(learning_rate="invscaling", learning_rate_init=0.1),
    dict(learning_rate="adaptive", n_iter_no_change=2, tol=0.05, nesterovs_momentum=False),
    dict(learning_rate="constant", momentum=0.0),
])
def test_unshuffled_sgd_matches_sklearn(schedule):
    """SGD steps, momentum across learning-rate changes, schedule and stopping rule."""
    X, y = _blobs(n=100)
    params = dict(solver="sgd", shuffle=False, batch_size=25, max_iter=25, random_state=1,
                  hidden_layer_sizes=(10,), **schedule)
    with _quiet():
        a = MLPClassifier(**params).fit(X, y)
        b = SkMLPClassifier(**params).fit(X, y)
    assert a.n_iter_ == b.n_iter_
    assert a.t_ == b.t_
    np.testing.assert_allclose(a.loss_curve_, b.loss_curve_, rtol=1e-9)
    np.testing.assert_allclose(a.predict_proba(X), b.predict_proba(X), atol=1e-9)


def test_adam_close_to_sklearn():
    # Adam adds epsilon after the bias correction (PyTorch), scikit-learn before it
    X, y = _blobs(n=100)
    params = dict(shuffle=False, batch_size=20, max_iter=30, random_state=0)
    with _quiet():
        a = MLPClassifier(**params).fit(X, y)
        b = SkMLPClassifier(**params).fit(X, y)
    np.testing.assert_allclose(a.loss_curve_, b.loss_curve_, rtol=1e-4)


def test_multioutput_regression_follows_sklearn_steps_and_reports_their_loss():
    """Several outputs: scikit-learn's steps, and a loss_ whose gradient they follow."""
    X, y = make_regression(100, 5, n_targets=3, noise=1.0, random_state=0)
    y = y / y.std()
    params = dict(solver="sgd", shuffle=False, batch_size=25, max_iter=10, random_state=0,
                  hidden_layer_sizes=(10,), alpha=0.0)
    with _quiet():
        a = MLPRegressor(**params).fit(X, y)
        b = SkMLPRegressor(**params).fit(X, y)
    np.testing.assert_allclose(a.predict(X), b.predict(X), rtol=1e-9, atol=1e-12)
    # scikit-learn reports the mean over outputs; the gradient it follows is the sum's
    np.testing.assert_allclose(a.loss_curve_, 3 * np.asarray(b.loss_curve_), rtol=1e-9)


def test_lbfgs_multioutput_regression_does_not_retrace_sklearn():
    """scikit-learn's lbfgs gets the squared error averaged over outputs with the gradient
    of its sum; bpfast gives L-BFGS-B a matching pair. The first steps agree, then their
    line searches part (the README says so; the single-output case agrees above)."""
    X, y = make_regression(100, 5, n_targets=3, noise=1.0, random_state=0)
    y = y / y.std()
    params = dict(solver="lbfgs", hidden_layer_sizes=(8,), alpha=1e-3, random_state=0)
    with _quiet():
        first = [model(max_iter=2, **params).fit(X, y) for model in (MLPRegressor,
                                                                     SkMLPRegressor)]
        later = [model(max_iter=15, **params).fit(X, y) for model in (MLPRegressor,
                                                                      SkMLPRegressor)]
    np.testing.assert_allclose(first[0].predict(X), first[1].predict(X), atol=1e-12)
    assert np.abs(later[0].predict(X) - later[1].predict(X)).max() > 1e-3


@pytest.mark.parametrize("problem", ["multilabel", "regression"])
def test_loss_is_the_objective_whose_gradient_is_followed(problem):
    alpha = 0.01
    if problem == "regression":
        X, y = make_regression(60, 4, n_targets=2, noise=1.0, random_state=0)
        y = y / y.std()
        model = MLPRegressor(solver="lbfgs", alpha=alpha, max_iter=20, random_state=0)
    else:
        X, y = make_multilabel_classification(60, 4, n_classes=3, random_state=0)
        model = MLPClassifier(solver="lbfgs", alpha=alpha, max_iter=20, random_state=0)
    with _quiet():
        model.fit(X, y)
    penalty = 0.5 * alpha * sum(float((W ** 2).sum()) for W in model.coefs_) / len(X)
    if problem == "regression":
        data_loss = 0.5 * ((model.predict(X) - y) ** 2).sum(axis=1).mean()
    else:
        p = np.clip(model.predict_proba(X), 1e-300, 1)
        q = np.clip(1 - model.predict_proba(X), 1e-300, 1)
        data_loss = -(y * np.log(p) + (1 - y) * np.log(q)).sum(axis=1).mean()
    np.testing.assert_allclose(model.loss_, data_loss + penalty, rtol=1e-9)
    # the engine's objective, whose gradient L-BFGS-B followed, is that same number
    loss, scale = model._make_loss()
    value = model.network_.compute_gradients(X, y.astype(float), loss,
                                             l2=alpha / (len(X) * scale))
    np.testing.assert_allclose(scale * value, model.loss_, rtol=1e-12)


# --------------------------------------------------------------------------- accuracy
def _head_to_head(X, y, seeds):
    accuracies = {"bpfast": [], "sklearn": []}
    for seed in seeds:
        X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=0.25,
                                                            random_state=seed, stratify=y)
        scaler = StandardScaler().fit(X_train)
        X_train, X_test = scaler.transform(X_train), scaler.transform(X_test)
        for name, cls in (("bpfast", MLPClassifier), ("sklearn", SkMLPClassifier)):
            model = cls(max_iter=50, random_state=seed).fit(X_train, y_train)
            accuracies[name].append(model.score(X_test, y_test))
    return np.mean(accuracies["bpfast"]), np.mean(accuracies["sklearn"])


@pytest.mark.parametrize("load", [load_digits, load_breast_cancer])
def test_accuracy_within_one_point_of_sklearn(load):
    """Identical hyperparameters (scikit-learn's defaults but 50 epochs, for time), 5 seeds."""
    X, y = load(return_X_y=True)
    with _quiet():
        ours, theirs = _head_to_head(X, y, seeds=range(5))
    assert abs(ours - theirs) <= 0.01, (ours, theirs)
    assert ours > (0.95 if load is load_digits else 0.94)


# --------------------------------------------------------------------------- attributes
def test_fitted_attributes_as_sklearn_names_them():
    X, y = _blobs()
    with _quiet():
        model = MLPClassifier(hidden_layer_sizes=(7, 5), max_iter=5, random_state=0).fit(X, y)
    assert [W.shape for W in model.coefs_] == [(6, 7), (7, 5), (5, 3)]
    assert [b.shape for b in model.intercepts_] == [(7,), (5,), (3,)]
    assert model.n_layers_ == 4 and model.n_outputs_ == 3 and model.n_features_in_ == 6
    assert model.out_activation_ == "softmax"
    assert model.n_iter_ == 5 and model.t_ == 5 * len(X) and len(model.loss_curve_) == 5
    assert model.loss_ == model.loss_curve_[-1] and model.best_loss_ == min(model.loss_curve_)
    assert model.validation_scores_ is None and model.best_validation_score_ is None
    assert isinstance(model.network_, bp.Network)
    assert model.network_.dtype == np.float64
    np.testing.assert_array_equal(model.classes_, [0, 1, 2])


def test_coefs_are_views_that_write_through():
    X, y = _blobs()
    with _quiet():
        model = MLPClassifier(hidden_layer_sizes=(4,), max_iter=3, random_state=0).fit(X, y)
    parameters = model.network_.parameters
    assert all(np.shares_memory(W, parameters) for W in model.coefs_)
    assert all(np.shares_memory(b, parameters) for b in model.intercepts_)
    before = model.predict_proba(X)
    model.coefs_[1][:] = 0.0            # in place, as with scikit-learn's arrays
    model.intercepts_[1][:] = [1.0, 0.0, 0.0]
    np.testing.assert_array_equal(model.network_.layers[1].weight, 0.0)
    assert not np.allclose(model.predict_proba(X), before)
    assert (model.predict(X) == 0).all()
    W = np.arange(24.0).reshape(6, 4)
    model.coefs_[0] = W                 # item assignment copies into the network
    np.testing.assert_array_equal(model.network_.layers[0].weight, W.T)
    model.coefs_ = [np.ones((6, 4)), np.ones((4, 3))]
    np.testing.assert_array_equal(model.coefs_[1], 1.0)
    with pytest.raises(ValueError, match="shape"):
        model.coefs_[0] = np.ones((4, 6))
    with pytest.raises(ValueError, match="2 arrays"):
        model.intercepts_ = [np.zeros(4)]
    with pytest.raises(TypeError):
        model.coefs_.append(np.ones(3))
    assert not hasattr(MLPClassifier(), "coefs_")


def test_assigning_all_layers_checks_them_all_first():
    X, y = _blobs()
    with _quiet():
        model = MLPClassifier(hidden_layer_sizes=(4,), max_iter=3, random_state=0).fit(X, y)
    before = model.network_.parameters.copy()
    # the first array fits, the second does not: neither is written, the message names it
    with pytest.raises(ValueError, match=r"coefs_\[1\] must have shape \(4, 3\)"):
        model.coefs_ = [np.zeros((6, 4)), np.zeros((3, 4))]
    with pytest.raises(ValueError, match=r"intercepts_\[1\] must have shape \(3,\)"):
        model.intercepts_ = [np.zeros(4), np.zeros(4)]
    with pytest.raises(TypeError, match=r"coefs_\[1\] must hold real numbers"):
        model.coefs_ = [np.zeros((6, 4)), np.full((4, 3), "x")]
    np.testing.assert_array_equal(model.network_.parameters, before)
    with pytest.raises(ValueError, match=r"intercepts_\[0\] must have shape"):
        model.intercepts_[0] = np.zeros(5)
    with pytest.raises(TypeError, match="intercepts_"):
        model.intercepts_[:1] = [np.zeros(4)]
    # a copy of the list is a plain list; a deep copy holds copies
    saved = copy.deepcopy(model.coefs_)
    assert type(saved) is list and not np.shares_memory(saved[0], model.network_.parameters)
    assert type(pickle.loads(pickle.dumps(model.intercepts_))) is list
    np.testing.assert_array_equal(saved[1], model.coefs_[1])


def test_initial_network_is_sklearns():
    X, y = _blobs()
    params = dict(hidden_layer_sizes=(5,), activation="logistic", max_iter=1,
                  learning_rate_init=1e-12, random_state=3)
    with _quiet():
        a = MLPClassifier(**params).fit(X, y)
        b = SkMLPClassifier(**params).fit(X, y)
    for ours, theirs in zip(a.coefs_ + a.intercepts_, b.coefs_ + b.intercepts_):
        np.testing.assert_allclose(ours, theirs, atol=1e-9)


# --------------------------------------------------------------------------- classifier
def test_string_labels_binary_and_probabilities():
    X, y = _blobs(n_classes=2)
    labels = np.array(["no", "yes"])[y]
    with _quiet():
        model = MLPClassifier(max_iter=50, random_state=0).fit(X, labels)
    np.testing.assert_array_equal(model.classes_, ["no", "yes"])
    assert model.n_outputs_ == 1 and model.out_activation_ == "logistic"
    proba = model.predict_proba(X)
    assert proba.shape == (len(X), 2)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    np.testing.assert_array_equal(model.predict(X), model.classes_[proba.argmax(axis=1)])
    np.testing.assert_allclose(model.predict_log_proba(X), np.log(proba))
    assert model.score(X, labels) > 0.8


def test_multilabel():
    X, Y = make_multilabel_classification(150, 8, n_classes=4, random_state=0)
    with _quiet():
        model = MLPClassifier(max_iter=100, random_state=0).fit(X, Y)
    np.testing.assert_array_equal(model.classes_, np.arange(4))
    assert model.out_activation_ == "logistic"
    prediction = model.predict(X)
    assert prediction.shape == Y.shape and set(np.unique(prediction)) <= {0, 1}
    proba = model.predict_proba(X)
    np.testing.assert_array_equal(prediction, (proba > 0.5).astype(int))
    with pytest.raises(ValueError, match="multilabel"):
        MLPClassifier(class_weight={0: 2.0}).fit(X, Y)


def test_partial_fit_classes():
    X, y = _blobs()
    model = MLPClassifier(random_state=0)
    with pytest.raises(ValueError, match="classes must be passed"):
        model.partial_fit(X, y)
    first = y < 2          # the first batch lacks class 2
    model.partial_fit(X[first], y[first], classes=[0, 1, 2])
    np.testing.assert_array_equal(model.classes_, [0, 1, 2])
    for _ in range(3):
        model.partial_fit(X, y)
    assert model.n_iter_ == 1 and model.t_ == first.sum() + 3 * len(X)
    assert len(model.loss_curve_) == 4
    with pytest.raises(ValueError, match="not in `self.classes_`"):
        model.partial_fit(X, y + 5)
    with pytest.raises(ValueError, match="not the same"):
        model.partial_fit(X, y, classes=[0, 1])
    assert not hasattr(MLPClassifier(solver="lbfgs"), "partial_fit")
    with pytest.raises(ValueError, match="early_stopping"):
        MLPClassifier(early_stopping=True).partial_fit(X, y, classes=[0, 1, 2])


def test_partial_fit_keeps_the_optimizer_state():
    X, y = _blobs()
    with _quiet():
        once = MLPClassifier(solver="sgd", shuffle=False, max_iter=3, tol=0,
                             random_state=0).fit(X, y)
    stepped = MLPClassifier(solver="sgd", shuffle=False, random_state=0)
    for _ in range(3):
        stepped.partial_fit(X, y, classes=np.unique(y))
    np.testing.assert_allclose(stepped.network_.parameters, once.network_.parameters,
                               rtol=1e-12)


def test_each_fit_checks_its_data_once_and_runs_epochs_on_one_trainer(monkeypatch):
    X, y = _blobs()
    calls = []
    make_trainer = bp.Network.trainer

    def counting(network, X, y, **options):
        calls.append(options["epochs"])
        return make_trainer(network, X, y, **options)

    def refuse(*args, **kwargs):
        raise AssertionError("Network.fit once per epoch re-checks all the data")

    monkeypatch.setattr(bp.Network, "trainer", counting)
    monkeypatch.setattr(bp.Network, "fit", refuse)
    with _quiet():
        model = MLPClassifier(max_iter=5, random_state=0).fit(X, y)
    assert calls == [5] and model.n_iter_ == 5
    assert model.network_.epochs_trained == 5
    np.testing.assert_allclose(model.network_.history.history["loss"], model.loss_curve_,
                               rtol=1e-15)
    model.partial_fit(X, y)
    assert calls == [5, 1] and model.network_.epochs_trained == 6


def test_sample_weight_zero_is_removal_and_integers_are_repetition():
    X, y = _blobs(n=60)
    weights = np.random.default_rng(0).integers(0, 3, len(X))
    weights[:3] = [0, 1, 2]
    kept = weights > 0
    params = dict(solver="lbfgs", max_iter=30, random_state=0, hidden_layer_sizes=(6,))
    with _quiet():
        weighted = MLPClassifier(**params).fit(X, y, sample_weight=weights)
        repeated = MLPClassifier(**params).fit(np.repeat(X, weights, axis=0),
                                               np.repeat(y, weights))
        removed = MLPClassifier(**params).fit(X[kept], y[kept], sample_weight=weights[kept])
    np.testing.assert_allclose(weighted.predict_proba(X), repeated.predict_proba(X),
                               rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(weighted.predict_proba(X), removed.predict_proba(X),
                               rtol=1e-6, atol=1e-8)


def test_class_weight_is_a_sample_weight_per_class():
    X, y = _blobs(n=60)
    class_weight = {0: 3.0, 1: 0.5, 2: 1.0}
    params = dict(solver="lbfgs", max_iter=20, random_state=0, hidden_layer_sizes=(6,))
    with _quiet():
        by_class = MLPClassifier(class_weight=class_weight, **params).fit(X, y)
        by_sample = MLPClassifier(**params).fit(
            X, y, sample_weight=np.array([class_weight[c] for c in y]))
        balanced = MLPClassifier(class_weight="balanced", **params).fit(X[10:], y[10:])
        counts = np.bincount(y[10:])
        by_count = MLPClassifier(**params).fit(
            X[10:], y[10:], sample_weight=len(y[10:]) / (3 * counts[y[10:]]))
    np.testing.assert_allclose(by_class.predict_proba(X), by_sample.predict_proba(X),
                               atol=1e-10)
    np.testing.assert_allclose(balanced.predict_proba(X), by_count.predict_proba(X),
                               atol=1e-10)
    with pytest.raises(ValueError, match="partial_fit"):
        MLPClassifier(class_weight="balanced").partial_fit(X, y, classes=[0, 1, 2])


def test_one_class_is_refused_with_the_word_class():
    X, y = _blobs()
    with pytest.raises(ValueError, match="class"):
        MLPClassifier().fit(X, np.zeros(len(X)))
    with pytest.raises(ValueError, match="class"):
        MLPClassifier().fit(X, y, sample_weight=(y == 1).astype(float))


# --------------------------------------------------------------------------- regressor
def test_regressor_shapes():
    X, y = make_regression(80, 4, n_targets=2, random_state=0)
    with _quiet():
        multi = MLPRegressor(max_iter=20, random_state=0).fit(X, y)
        single = MLPRegressor(max_iter=20, random_state=0).fit(X, y[:, 0])
        column = MLPRegressor(max_iter=20, random_state=0).fit(X, y[:, :1])
    assert multi.predict(X).shape == (80, 2) and multi.n_outputs_ == 2
    assert single.predict(X).shape == (80,) and column.predict(X).shape == (80,)
    assert multi.out_activation_ == "identity"
    with pytest.raises(ValueError, match="poisson"):
        MLPRegressor(loss="poisson").fit(X, y[:, 0])


# --------------------------------------------------------------------------- bookkeeping
def test_max_iter_warns_and_tol_stops_as_sklearn():
    X, y = _blobs()
    with pytest.warns(ConvergenceWarning, match="Maximum iterations"):
        MLPClassifier(max_iter=3, random_state=0).fit(X, y)
    params = dict(max_iter=500, tol=10.0, n_iter_no_change=2, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        model = MLPClassifier(**params).fit(X, y)
        reference = SkMLPClassifier(**params).fit(X, y)
    # the first epoch improves on an infinite best loss; none after it by 10
    assert model.n_iter_ == reference.n_iter_ == 4
    with pytest.warns(ConvergenceWarning, match="lbfgs failed to converge"):
        MLPClassifier(solver="lbfgs", max_iter=2, random_state=0).fit(X, y)


def test_adaptive_divides_the_rate_by_five_as_sklearn():
    X, y = _blobs()
    params = dict(solver="sgd", learning_rate="adaptive", tol=10.0, n_iter_no_change=1,
                  max_iter=7, random_state=0)
    with _quiet():
        model = MLPClassifier(**params).fit(X, y)
        reference = SkMLPClassifier(**params).fit(X, y)
    # no progress from epoch 2 on: the rate drops after epochs 3, 5 and 7
    assert model.n_iter_ == reference.n_iter_ == 7
    assert model._optimizer.lr == pytest.approx(reference._optimizer.learning_rate)
    assert model._optimizer.lr == pytest.approx(1e-3 / 125)


def test_early_stopping_keeps_the_best_network():
    X, y = _blobs(n=300)
    with _quiet():
        model = MLPClassifier(early_stopping=True, n_iter_no_change=3, max_iter=200,
                              learning_rate_init=0.05, random_state=0).fit(X, y)
    scores = model.validation_scores_
    assert len(scores) == model.n_iter_ == len(model.loss_curve_)
    assert model.best_validation_score_ == max(scores)
    assert model.best_loss_ is None
    # the kept network is the one after the first epoch with the best score
    best_epoch = int(np.argmax(scores)) + 1
    with _quiet():
        replay = MLPClassifier(early_stopping=True, n_iter_no_change=np.inf,
                               max_iter=best_epoch, learning_rate_init=0.05,
                               random_state=0).fit(X, y)
    np.testing.assert_array_equal(replay.network_.parameters, model.network_.parameters)


@pytest.mark.parametrize("problem", ["binary", "regression"])
def test_unshuffled_early_stopping_matches_sklearn(problem):
    """The same split (stratified for two classes), scores, stop and restored network."""
    if problem == "regression":
        X, y = make_regression(200, 5, noise=5.0, random_state=0)
        y = y / y.std()
        ours, theirs = MLPRegressor, SkMLPRegressor
    else:
        X, y = _blobs(n=200, n_classes=2)
        ours, theirs = MLPClassifier, SkMLPClassifier
    params = dict(solver="sgd", shuffle=False, early_stopping=True, n_iter_no_change=3,
                  learning_rate_init=0.05, batch_size=30, max_iter=60, random_state=0,
                  hidden_layer_sizes=(10,))
    with _quiet():
        a = ours(**params).fit(X, y)
        b = theirs(**params).fit(X, y)
    assert a.n_iter_ == b.n_iter_ < 60
    np.testing.assert_allclose(a.validation_scores_, b.validation_scores_, rtol=1e-9)
    assert a.best_validation_score_ == pytest.approx(b.best_validation_score_, rel=1e-9)
    prediction = "predict" if problem == "regression" else "predict_proba"
    np.testing.assert_allclose(getattr(a, prediction)(X), getattr(b, prediction)(X),
                               rtol=1e-7, atol=1e-9)


def test_warm_start_continues():
    X, y = _blobs()
    with _quiet():
        model = MLPClassifier(max_iter=4, warm_start=True, random_state=0).fit(X, y)
        after_first = model.network_.parameters.copy()
        network = model.network_
        model.fit(X, y)
    assert model.network_ is network and len(model.loss_curve_) == 8
    assert not np.array_equal(after_first, model.network_.parameters)
    model.set_params(hidden_layer_sizes=(3,))
    with pytest.raises(ValueError, match="warm_start=False"):
        model.fit(X, y)
    with pytest.raises(ValueError, match="same classes"):
        model.set_params(hidden_layer_sizes=(100,)).fit(X[y < 2], y[y < 2])


def test_verbose_prints_each_epoch(capsys):
    X, y = _blobs()
    with _quiet():
        MLPClassifier(max_iter=2, verbose=True, random_state=0).fit(X, y)
    assert capsys.readouterr().out.count("Iteration") == 2


def test_divergence_is_sklearns_non_finite_error():
    X, y = make_regression(50, 3, random_state=0)
    with pytest.raises(ValueError, match="non-finite"), _quiet():
        MLPRegressor(solver="sgd", learning_rate_init=1e3, max_iter=50,
                     random_state=0).fit(X * 1e3, y * 1e6)


def test_warm_start_may_switch_early_stopping():
    X, y = _blobs(n=200)
    with _quiet():
        model = MLPClassifier(max_iter=3, warm_start=True, random_state=0).fit(X, y)
        model.set_params(early_stopping=True).fit(X, y)
    assert len(model.validation_scores_) == 3 and model.best_loss_ is None
    assert model.best_validation_score_ == max(model.validation_scores_)
    with _quiet():
        model.set_params(early_stopping=False).fit(X, y)
    assert model.validation_scores_ is None and model.best_validation_score_ is None
    assert model.best_loss_ == min(model.loss_curve_[-3:])
    assert len(model.loss_curve_) == 9


def test_without_early_stopping_no_best_network_is_kept():
    X, y = _blobs()
    with _quiet():
        model = MLPClassifier(max_iter=2, random_state=0).fit(X, y)
    assert not hasattr(model, "_best_parameters")
    with _quiet():
        model.set_params(early_stopping=True).fit(X, y)
    assert model._best_parameters.shape == model.network_.parameters.shape


# --------------------------------------------------------------------------- failed fits
def _fitted_state(model):
    parameters = model.get_params(deep=False)
    return {name: value for name, value in vars(model).items() if name not in parameters}


@contextlib.contextmanager
def _unchanged(model, X):
    """The body must leave every fitted attribute (and the network) of model as it was."""
    references = _fitted_state(model)
    copies = {name: copy.deepcopy(value) for name, value in references.items()
              if name not in ("network_", "_optimizer")}
    fitted = "network_" in references
    if fitted:
        parameters = model.network_.parameters.copy()
        coefs = [W.copy() for W in model.coefs_ + model.intercepts_]
        output = model.predict_proba(X) if hasattr(model, "predict_proba") else None
        prediction = model.predict(X)
        optimizer = references.get("_optimizer")
        state = {} if optimizer is None else copy.deepcopy(dict(optimizer.state))
    yield
    after = _fitted_state(model)
    assert sorted(after) == sorted(references)
    for name, value in references.items():
        assert after[name] is value, name
    np.testing.assert_equal({name: after[name] for name in copies}, copies)
    if fitted:
        np.testing.assert_array_equal(model.network_.parameters, parameters)
        np.testing.assert_equal([W.copy() for W in model.coefs_ + model.intercepts_], coefs)
        np.testing.assert_array_equal(model.predict(X), prediction)
        if output is not None:
            np.testing.assert_array_equal(model.predict_proba(X), output)
        if optimizer is not None:
            np.testing.assert_equal(dict(optimizer.state), state)


def _refit_failures():
    X, y = _blobs()
    two = np.array(["a", "b"])[y % 2]
    return {
        "negative weights, other classes": (
            {}, lambda m: m.fit(X, two, sample_weight=-np.ones(len(X))), "sample_weight"),
        "weights of one class, other width": (
            {}, lambda m: m.fit(X[:, :4], y % 2, sample_weight=(y % 2).astype(float)),
            "class"),
        "class weights all zero": (
            dict(class_weight={0: 0.0, 1: 0.0}), lambda m: m.fit(X[:, :4], y % 2), "zero"),
        "weights of the wrong shape": (
            {}, lambda m: m.fit(X, y, sample_weight=np.ones(3)), "sample_weight"),
        "validation set too small": (
            dict(early_stopping=True), lambda m: m.fit(X[:9, :4], y[:9] % 2), "too small"),
        "lbfgs to sgd, validation set too small": (
            dict(solver="sgd", early_stopping=True), lambda m: m.fit(X[:9], y[:9]),
            "too small"),
        "warm start, other layer sizes": (
            dict(warm_start=True, hidden_layer_sizes=(3,)), lambda m: m.fit(X, y),
            "warm_start=False"),
        "warm start, other dtype": (
            dict(warm_start=True, dtype="float32"), lambda m: m.fit(X, y), "float32"),
        "partial_fit, unknown class": ({}, lambda m: m.partial_fit(X, y + 5), "classes_"),
        "partial_fit, negative weight": (
            {}, lambda m: m.partial_fit(X, y, sample_weight=-np.ones(len(X))),
            "sample_weight"),
    }


@pytest.mark.parametrize("failure", list(_refit_failures()))
def test_failed_refit_leaves_the_fitted_classifier_as_it_was(failure):
    X, y = _blobs()
    solver = "lbfgs" if failure.startswith("lbfgs") else "adam"
    with _quiet():
        model = MLPClassifier(hidden_layer_sizes=(5,), solver=solver, max_iter=3,
                              random_state=0).fit(X, y)
    parameters, refit, message = _refit_failures()[failure]
    model.set_params(**parameters)
    with _unchanged(model, X), pytest.raises(ValueError, match=message):
        refit(model)
    assert model.predict(X[:3]).shape == (3,)


@pytest.mark.parametrize("early_stopping", [False, True])
def test_failed_refit_leaves_the_fitted_regressor_as_it_was(early_stopping):
    X, y = make_regression(60, 5, random_state=0)
    with _quiet():
        model = MLPRegressor(hidden_layer_sizes=(5,), max_iter=3, random_state=0).fit(X, y)
    model.set_params(early_stopping=early_stopping, validation_fraction=0.01)
    with _unchanged(model, X), pytest.raises(ValueError):
        # two outputs and another width, then a bad weight or too small a validation set
        model.fit(X[:, :3], np.c_[y, y], sample_weight=-np.ones(60) if not early_stopping
                  else None)
    assert model.predict(X).shape == (60,)


def test_failed_first_fit_leaves_the_estimator_unfitted():
    X, y = _blobs()
    random_state = np.random.RandomState(0)
    state = random_state.get_state()
    for model, fit in [
            (MLPClassifier(), lambda m: m.partial_fit(X, y, classes=[0, 1, 2],
                                                      sample_weight=-np.ones(len(X)))),
            (MLPClassifier(early_stopping=True, random_state=random_state),
             lambda m: m.fit(X[:9], y[:9] % 2)),
            (MLPRegressor(), lambda m: m.fit(X, y, sample_weight=np.zeros(len(X))))]:
        with pytest.raises(ValueError):
            fit(model)
        assert _fitted_state(model) == {}, type(model).__name__
    # the RandomState given as random_state is as it was too
    np.testing.assert_equal(random_state.get_state(), state)


# --------------------------------------------------------------------------- parameters
@pytest.mark.parametrize("bad", [
    dict(hidden_layer_sizes=(0,)), dict(hidden_layer_sizes="wide"), dict(activation="elu"),
    dict(solver="newton"), dict(alpha=-1.0), dict(batch_size=0), dict(batch_size="big"),
    dict(learning_rate="cyclic"), dict(learning_rate_init=0.0), dict(max_iter=0),
    dict(momentum=1.5), dict(beta_1=1.0), dict(epsilon=0.0), dict(n_iter_no_change=0),
    dict(validation_fraction=1.0), dict(dtype="float16"), dict(n_threads=0),
    dict(shuffle="yes"), dict(class_weight="uniform"), dict(alpha=np.inf),
    dict(learning_rate_init=np.inf), dict(tol=np.nan), dict(hidden_layer_sizes=(4, 2.5)),
])
def test_bad_parameters_are_refused_by_name(bad):
    X, y = _blobs()
    name = next(iter(bad))
    with pytest.raises((ValueError, TypeError), match=name):
        MLPClassifier(**bad).fit(X, y)


def test_sparse_input_is_refused():
    scipy_sparse = pytest.importorskip("scipy.sparse")
    X, y = _blobs()
    with pytest.raises(TypeError, match="dense data is required"):
        MLPClassifier().fit(scipy_sparse.csr_matrix(X), y)


def test_dtype_float32():
    X, y = _blobs()
    with _quiet():
        model = MLPClassifier(dtype="float32", max_iter=20, random_state=0).fit(X, y)
    assert model.network_.dtype == np.float32
    assert model.predict_proba(X).dtype == np.float32
    assert model.coefs_[0].dtype == np.float32


def test_n_threads_holds_only_during_the_call(monkeypatch):
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads():
        return [pool["num_threads"] for pool in threadpoolctl.threadpool_info()
                if pool["user_api"] == "blas"]

    X, y = _blobs()
    seen = []
    make_optimizer = MLPClassifier._make_optimizer

    def spying(self, scale):  # runs inside fit
        seen.append((bp.get_num_threads(), set(blas_threads())))
        return make_optimizer(self, scale)

    monkeypatch.setattr(MLPClassifier, "_make_optimizer", spying)
    before_omp = bp.get_num_threads()
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"), _quiet():
        before_blas = blas_threads()
        MLPClassifier(n_threads=1, max_iter=2, random_state=0).fit(X, y)
        after_blas = blas_threads()
    assert seen == [(1, {1})]
    assert bp.get_num_threads() == before_omp
    assert after_blas == before_blas


def test_n_threads_of_estimators_fitting_in_two_threads(monkeypatch):
    """The counts are the process's: two estimators take turns, each with its own count,
    and the count before both is the one after both."""
    threadpoolctl = pytest.importorskip("threadpoolctl")

    def blas_threads():
        return {pool["num_threads"] for pool in threadpoolctl.threadpool_info()
                if pool["user_api"] == "blas"}

    X, y = _blobs()
    entered = {1: threading.Event(), 2: threading.Event()}
    seen, errors = [], []
    make_optimizer = MLPClassifier._make_optimizer

    # (OpenBLAS's pthreads build ignores a thread count set outside the main thread, so
    # only bpfast's own OpenMP count is observed inside the fits)
    def spying(self, scale):  # runs inside fit, under the estimator's thread limit
        entered[self.n_threads].set()
        entered[3 - self.n_threads].wait(0.5)  # the other one may start meanwhile
        seen.append((self.n_threads, bp.get_num_threads()))
        return make_optimizer(self, scale)

    def fit(n_threads):
        try:
            MLPClassifier(n_threads=n_threads, max_iter=2, random_state=0).fit(X, y)
        except BaseException as error:  # pragma: no cover - reported below
            errors.append(error)

    monkeypatch.setattr(MLPClassifier, "_make_optimizer", spying)
    original = bp.get_num_threads()
    with threadpoolctl.threadpool_limits(limits=1, user_api="blas"):
        bp.set_num_threads(3)
        try:
            if bp.get_num_threads() != 3:
                pytest.skip("a build without OpenMP has one thread")
            blas_before = blas_threads()
            threads = [threading.Thread(target=fit, args=(n,)) for n in (1, 2)]
            with _quiet():  # the warning filters are the process's: set here, not in the threads
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
            after = bp.get_num_threads()
            blas_after = blas_threads()
        finally:
            bp.set_num_threads(original)
    assert not errors
    assert sorted(seen) == [(1, 1), (2, 2)]
    assert after == 3 and blas_after == blas_before


# --------------------------------------------------------------------------- sklearn tools
def test_pipeline_grid_search_cross_val_score_clone():
    X, y = _blobs(n=150)
    pipeline = make_pipeline(StandardScaler(), MLPClassifier(max_iter=50, random_state=0,
                                                             learning_rate_init=0.02))
    with _quiet():
        scores = cross_val_score(pipeline, X, y, cv=3)
        search = GridSearchCV(pipeline, {"mlpclassifier__alpha": [1e-4, 1e-1],
                                         "mlpclassifier__hidden_layer_sizes": [(5,), (20,)]},
                              cv=3).fit(X, y)
    assert scores.shape == (3,) and scores.mean() > 0.6
    assert search.best_estimator_.score(X, y) > 0.6
    twin = clone(search.best_estimator_)
    assert not hasattr(twin[-1], "network_")
    assert twin.get_params()["mlpclassifier__alpha"] in (1e-4, 1e-1)


@pytest.mark.parametrize("copier", [lambda m: pickle.loads(pickle.dumps(m)), copy.deepcopy])
def test_pickle_and_deepcopy(copier):
    X, y = _blobs()
    with _quiet():
        model = MLPClassifier(max_iter=10, random_state=0).fit(X, y)
    twin = copier(model)
    assert twin.network_ is not model.network_
    np.testing.assert_array_equal(twin.predict_proba(X), model.predict_proba(X))
    assert all(np.shares_memory(W, twin.network_.parameters) for W in twin.coefs_)
    twin.partial_fit(X, y)   # trains on with a fresh optimizer
    assert not np.array_equal(twin.network_.parameters, model.network_.parameters)
    assert len(twin.loss_curve_) == 11 and len(model.loss_curve_) == 10


def test_pandas_feature_names_and_set_output():
    pd = pytest.importorskip("pandas")
    X, y = _blobs()
    frame = pd.DataFrame(X, columns=[f"f{i}" for i in range(X.shape[1])])
    with _quiet():
        model = MLPClassifier(max_iter=10, random_state=0).fit(frame, pd.Series(y))
        pipeline = make_pipeline(StandardScaler(), MLPRegressor(max_iter=10, random_state=0))
        pipeline.set_output(transform="pandas").fit(frame, y.astype(float))
    np.testing.assert_array_equal(model.feature_names_in_, frame.columns)
    np.testing.assert_array_equal(pipeline[-1].feature_names_in_, frame.columns)
    assert pipeline.predict(frame).shape == (len(X),)
    with pytest.warns(UserWarning, match="feature names"):
        model.predict(X)
