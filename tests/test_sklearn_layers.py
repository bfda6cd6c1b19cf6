"""The scikit-learn estimators' dropout= and batch_norm= (bpfast's Dropout and
BatchNorm1d inside MLPClassifier/MLPRegressor)."""
import pickle

import numpy as np
import pytest

pytest.importorskip("sklearn")

from training_data import digits  # noqa: E402

import bpfast as bp  # noqa: E402
from bpfast.sklearn import MLPClassifier, MLPRegressor  # noqa: E402

# short fits on purpose: the same for the networks compared
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


def _data():
    X, y = digits()
    return X[:600], y[:600]


def test_defaults_build_the_plain_network():
    X, y = _data()
    plain = MLPClassifier((16,), max_iter=3, random_state=0).fit(X, y)
    assert [type(layer) for layer in plain.network_.layers] == [bp.Dense, bp.Dense]
    explicit = MLPClassifier((16,), max_iter=3, random_state=0, dropout=0.0,
                             batch_norm=False).fit(X, y)
    np.testing.assert_array_equal(plain.network_.parameters, explicit.network_.parameters)


def test_layers_and_inference_mode_in_predict_and_score():
    X, y = _data()
    est = MLPClassifier((32, 16), max_iter=5, random_state=0, dropout=0.3,
                        batch_norm=True).fit(X, y)
    kinds = [layer.kind for layer in est.network_.layers]
    assert kinds == ["dense", "batch_norm1d", "activation", "dropout",
                     "dense", "batch_norm1d", "activation", "dropout", "dense"]
    assert [c.shape for c in est.coefs_] == [(64, 32), (32, 16), (16, 10)]
    assert len(est.intercepts_) == 3
    net = est.network_
    # predict is the network's inference mode, the same on every call
    expected = net.forward(X, training=False).argmax(axis=1)
    np.testing.assert_array_equal(est.predict(X), est.classes_[expected])
    np.testing.assert_array_equal(est.predict_proba(X), est.predict_proba(X))
    assert est.score(X, y) == (est.predict(X) == y).mean()
    assert net.layers[1].num_batches_tracked > 0


def test_early_stopping_scores_in_inference_mode_and_restores_buffers():
    X, y = _data()
    est = MLPClassifier((16,), max_iter=8, random_state=0, dropout=0.5, batch_norm=True,
                        early_stopping=True, n_iter_no_change=2).fit(X, y)
    assert est.best_validation_score_ == max(est.validation_scores_)
    np.testing.assert_array_equal(est.network_.buffers, est._best_buffers)


def test_regressor_and_pickle_and_warm_start():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 5))
    y = X @ rng.normal(size=5) + 0.1 * rng.normal(size=300)
    est = MLPRegressor(hidden_layer_sizes=(16,), max_iter=20, random_state=0, batch_norm=True,
                       dropout=0.1, solver="sgd", learning_rate_init=0.01).fit(X, y)
    assert est.score(X, y) > 0.5
    copy = pickle.loads(pickle.dumps(est))
    np.testing.assert_array_equal(copy.predict(X), est.predict(X))
    np.testing.assert_array_equal(copy.network_.buffers, est.network_.buffers)
    est.set_params(warm_start=True, max_iter=2)
    est.fit(X, y)
    est.set_params(dropout=0.2)
    with pytest.raises(ValueError, match="dropout or batch_norm changed"):
        est.fit(X, y)


def test_bad_values_are_refused():
    X, y = _data()
    for dropout in (1.0, -0.5):
        with pytest.raises(ValueError, match="dropout"):
            MLPClassifier(dropout=dropout).fit(X, y)
    with pytest.raises(TypeError, match="batch_norm"):
        MLPClassifier(batch_norm=1).fit(X, y)
    with pytest.raises(ValueError, match="stochastic solver"):
        MLPClassifier(solver="lbfgs", dropout=0.1).fit(X, y)
    with pytest.raises(ValueError, match="one row"):
        MLPClassifier((8,), batch_norm=True, batch_size=599).fit(X, y)
    est = MLPClassifier((8,), batch_norm=True, max_iter=2).fit(X, y)
    with pytest.raises(ValueError, match="batch_norm"):
        est.to_sklearn()


def test_dropout_estimator_converts_to_sklearn():
    pytest.importorskip("sklearn.neural_network")
    X, y = _data()
    est = MLPClassifier((16,), dropout=0.2, max_iter=3, random_state=0).fit(X, y)
    np.testing.assert_allclose(est.to_sklearn().predict_proba(X), est.predict_proba(X),
                               rtol=1e-12)


def test_digits_dropout_and_batch_norm_reach_the_plain_accuracy():
    X, y = digits()
    order = np.random.default_rng(1).permutation(len(X))
    train, test = order[:1200], order[1200:]

    def accuracy(seed, **extra):
        est = MLPClassifier((128,), max_iter=30, random_state=seed, **extra)
        return est.fit(X[train], y[train]).score(X[test], y[test])

    plain = np.mean([accuracy(seed) for seed in range(3)])
    regularised = np.mean([accuracy(seed, dropout=0.2, batch_norm=True) for seed in range(3)])
    print(f"digits, MLPClassifier((128,)), mean of 3 seeds: plain {plain:.4f}, "
          f"dropout=0.2 + batch_norm {regularised:.4f}")
    assert regularised >= plain and regularised > 0.95
