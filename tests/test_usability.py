"""What a Keras or PyTorch user expects of the API: metrics (against scikit-learn's
functions on random predictions, float32 and float64, with ties), evaluate, predict_proba,
reprs and summary, and the keyword spellings they bring along.
"""
import numpy as np
import pytest

import bpfast as bp
from bpfast._training import Data
from bpfast.metrics import get_metric, top_k_accuracy

sk_metrics = pytest.importorskip("sklearn.metrics")
DTYPES = ["float32", "float64"]


def metric_value(name, loss, output, y):
    """The bpfast metric name on (output, y), through the same Data that fit builds."""
    loss = bp.losses.get_loss(loss)
    dense, labels = loss.prepare_target(y, output.shape[0], output.shape[1], output.dtype)
    _, function = get_metric(name, loss, output.shape[1])
    return function(output, Data(None, dense, labels, None, y))


def softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, np.float64)))


def tolerance(dtype):
    return 1e-5 if dtype == "float32" else 1e-12


# --------------------------------------------------------------------------- metrics
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n_outputs", [1, 3])
def test_regression_metrics_are_scikit_learns(dtype, n_outputs):
    rng = np.random.default_rng(n_outputs)
    y = rng.normal(size=(200, n_outputs)).astype(dtype)
    output = (y + rng.normal(scale=0.7, size=y.shape)).astype(dtype)
    expected = {"mae": sk_metrics.mean_absolute_error, "mse": sk_metrics.mean_squared_error,
                "rmse": sk_metrics.root_mean_squared_error, "r2": sk_metrics.r2_score}
    for name, oracle in expected.items():
        want = oracle(y.astype(np.float64), output.astype(np.float64))
        got = metric_value(name, "mse", output, y)
        assert got == pytest.approx(want, rel=tolerance(dtype), abs=1e-12), name


def test_r2_of_a_constant_target_is_scikit_learns():
    y = np.ones((10, 2))
    output = np.ones((10, 2))
    output[0, 1] = 2.0
    assert metric_value("r2", "mse", output, y) == sk_metrics.r2_score(y, output) == 0.5


@pytest.mark.parametrize("dtype", DTYPES)
def test_multiclass_metrics_are_scikit_learns(dtype):
    rng = np.random.default_rng(1)
    n_classes = 5
    y = rng.integers(0, n_classes - 1, size=300)  # class 4 never true: a zero division
    output = rng.normal(size=(300, n_classes)).astype(dtype)
    output[:40] = np.round(output[:40])  # ties inside rows
    predicted = output.argmax(axis=1)
    for kind in ("precision", "recall", "f1"):
        oracle = getattr(sk_metrics, f"{kind}_score")
        want = oracle(y, predicted, average="macro", zero_division=0)
        assert metric_value(kind, "cross_entropy", output, y) == pytest.approx(want, 1e-12)
        assert metric_value(f"{kind}_macro", "cross_entropy", output, y) == pytest.approx(
            want, rel=1e-12)
    probabilities = softmax(output)
    assert metric_value("log_loss", "cross_entropy", output, y) == pytest.approx(
        sk_metrics.log_loss(y, probabilities, labels=range(n_classes)),
        rel=tolerance(dtype))
    for k in (1, 2, 3, 4):
        want = sk_metrics.top_k_accuracy_score(y, output, k=k, labels=range(n_classes))
        assert metric_value(top_k_accuracy(k), "cross_entropy", output, y) == want
    assert metric_value("top_k_accuracy", "cross_entropy", output, y) == 1.0  # k=5 of 5
    assert metric_value("accuracy", "cross_entropy", output, y) == sk_metrics.accuracy_score(
        y, predicted)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("from_logits", [True, False])
def test_binary_metrics_are_scikit_learns(dtype, from_logits):
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, size=400)
    logits = np.round(rng.normal(size=(400, 1)) * 2, 1)  # many equal scores: auc ties
    output = (logits if from_logits else sigmoid(logits)).astype(dtype)
    loss = bp.BinaryCrossEntropy(from_logits=from_logits)
    probability = sigmoid(output) if from_logits else output.astype(np.float64)
    predicted = (probability[:, 0] > 0.5).astype(int)
    for kind in ("precision", "recall", "f1"):
        oracle = getattr(sk_metrics, f"{kind}_score")
        assert metric_value(kind, loss, output, y) == pytest.approx(
            oracle(y, predicted), rel=1e-12)
        assert metric_value(f"{kind}_binary", loss, output, y) == pytest.approx(
            oracle(y, predicted), rel=1e-12)
        assert metric_value(f"{kind}_macro", loss, output, y) == pytest.approx(
            oracle(y, predicted, average="macro"), rel=1e-12)
    assert metric_value("auc", loss, output, y) == pytest.approx(
        sk_metrics.roc_auc_score(y, probability[:, 0]), rel=1e-12)
    assert metric_value("log_loss", loss, output, y) == pytest.approx(
        sk_metrics.log_loss(y, probability[:, 0]), rel=tolerance(dtype))


def test_auc_of_a_two_output_cross_entropy_is_scikit_learns():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, size=100)
    output = np.round(rng.normal(size=(100, 2)), 1)
    assert metric_value("auc", "cross_entropy", output, y) == pytest.approx(
        sk_metrics.roc_auc_score(y, softmax(output)[:, 1]), rel=1e-12)
    assert np.isnan(metric_value("auc", "cross_entropy", output, np.zeros(100, int)))


@pytest.mark.parametrize("metric, loss, n_outputs, match", [
    ("mae", "cross_entropy", 3, "regression loss"),
    ("f1", "mse", 1, "classification loss"),
    ("auc", "cross_entropy", 3, "two classes"),
    ("f1", "binary_cross_entropy", 2, "one output"),
    ("top_0_accuracy", "cross_entropy", 3, "k >= 1"),
    ("top_2_accuracy", "binary_cross_entropy", 1, "CrossEntropy"),
    ("f2", "mse", 1, "unknown metric 'f2'.*r2"),
])
def test_a_metric_that_does_not_fit_is_refused_by_name(metric, loss, n_outputs, match):
    with pytest.raises(ValueError, match=match):
        get_metric(metric, bp.losses.get_loss(loss), n_outputs)


def test_fit_records_the_new_metrics_and_callables():
    rng = np.random.default_rng(4)
    X = rng.normal(size=(120, 4))
    y = (X[:, 0] + X[:, 1] > 0).astype(int)
    net = bp.Network([bp.Dense(4, 8, "tanh"), bp.Dense(8, 1)], seed=0)
    history = net.fit(X, y, loss="binary_cross_entropy", optimizer=bp.Adam(lr=0.01),
                      epochs=3, batch_size=None, validation_data=(X, y),
                      metrics=["auc", "f1", lambda y_true, y_pred: 7.0])
    assert set(history.history) >= {"auc", "val_auc", "f1", "val_f1", "<lambda>"}
    probability = sigmoid(net.predict(X))[:, 0]
    assert history.history["val_auc"][-1] == pytest.approx(
        sk_metrics.roc_auc_score(y, probability), rel=1e-12)
    assert history.history["<lambda>"] == [7.0] * 3
    with pytest.raises(ValueError, match="regression loss"):
        net.fit(X, y, loss="binary_cross_entropy", optimizer="sgd", metrics=["r2"])


# --------------------------------------------------------------------------- evaluate
def classifier(n_outputs, last=None, dtype="float64"):
    return bp.Network([bp.Dense(4, 6, "tanh"), bp.Dense(6, n_outputs, last)],
                      dtype=dtype, seed=1)


@pytest.mark.parametrize("dtype", DTYPES)
def test_evaluate_gives_the_loss_and_metrics_of_predict(dtype):
    rng = np.random.default_rng(5)
    X = rng.normal(size=(50, 4)).astype(dtype)
    y = rng.integers(0, 3, size=50)
    weights = rng.uniform(0.5, 2, size=50)
    net = classifier(3, dtype=dtype)
    before = net.parameters.copy()
    results = net.evaluate(X, y, loss="cross_entropy", metrics=["accuracy", "log_loss"],
                           sample_weight=weights)
    assert list(results) == ["loss", "accuracy", "log_loss"]
    output = net(X)
    assert results["loss"] == bp.CrossEntropy()(output, y, sample_weight=weights)
    assert results["accuracy"] == sk_metrics.accuracy_score(y, output.argmax(axis=1))
    assert results["log_loss"] == pytest.approx(sk_metrics.log_loss(
        y, softmax(output), labels=range(3)), rel=tolerance(dtype))
    np.testing.assert_array_equal(net.parameters, before)
    regression = net.evaluate(X, np.zeros((50, 3)), metrics=["mse"])
    assert regression == {"mse": pytest.approx(np.mean(output.astype(np.float64) ** 2),
                                               rel=1e-12)}
    with pytest.raises(ValueError, match="a loss or some metrics"):
        net.evaluate(X, y)
    with pytest.raises(ValueError, match="pass loss="):
        net.evaluate(X, y, metrics=["accuracy"])


def test_net_call_is_predict():
    X = np.random.default_rng(6).normal(size=(7, 4))
    net = classifier(2)
    np.testing.assert_array_equal(net(X), net.predict(X))


# --------------------------------------------------------------------------- predict_proba
@pytest.mark.parametrize("dtype", DTYPES)
def test_predict_proba_applies_softmax_or_sigmoid_to_logits(dtype):
    torch = pytest.importorskip("torch")
    X = np.random.default_rng(7).normal(size=(9, 4)).astype(dtype) * 30  # large logits
    for n_outputs, oracle in ((3, lambda z: torch.softmax(z, dim=1)), (1, torch.sigmoid)):
        net = classifier(n_outputs, dtype=dtype)
        probabilities = net.predict_proba(X)
        assert probabilities.dtype == np.dtype(dtype)
        want = oracle(torch.from_numpy(net(X).astype(np.float64))).numpy()
        np.testing.assert_allclose(probabilities, want, rtol=tolerance(dtype) * 10,
                                   atol=1e-7 if dtype == "float32" else 1e-15)
        assert np.all(np.isfinite(probabilities))


def test_predict_proba_keeps_probability_outputs_and_refuses_regression_outputs():
    X = np.random.default_rng(8).normal(size=(5, 4))
    for last, n_outputs in (("softmax", 3), ("sigmoid", 2)):
        net = classifier(n_outputs, last)
        np.testing.assert_array_equal(net.predict_proba(X), net(X))
    with pytest.raises(ValueError, match="regression output"):
        classifier(1, "relu").predict_proba(X)


# --------------------------------------------------------------------------- reprs
NAMESPACE = {name: getattr(bp, name) for name in bp.__all__}


@pytest.mark.parametrize("thing", [
    bp.Adam(), bp.AdamW(lr=0.01, betas=(0.8, 0.99), amsgrad=True),
    bp.SGD(lr=0.1, momentum=0.9, nesterov=True), bp.RMSprop(centered=True),
    bp.Adagrad(lr_decay=0.1), bp.MSE(half=True), bp.L1(), bp.Huber(delta=2.5),
    bp.CrossEntropy(from_logits=False), bp.BinaryCrossEntropy(),
    bp.Dense(3, 4, "leaky_relu", negative_slope=0.2, bias=False, init="he"),
])
def test_repr_is_the_constructor_call_with_every_hyperparameter(thing):
    text = repr(thing)
    assert " object at 0x" not in text
    rebuilt = eval(text, NAMESPACE)  # noqa: S307 (our own repr)
    assert type(rebuilt) is type(thing) and repr(rebuilt) == text
    if isinstance(thing, bp.Optimizer):
        assert rebuilt._arguments() == thing._arguments()
    elif isinstance(thing, bp.Dense):
        assert rebuilt.arguments() == thing.arguments()
    else:
        assert vars(rebuilt).keys() == vars(thing).keys()


def test_optimizer_repr_reads_as_pytorchs_and_follows_lr():
    optimizer = bp.Adam()
    assert repr(optimizer) == ("Adam(lr=0.001, betas=(0.9, 0.999), eps=1e-08, "
                               "weight_decay=0.0, amsgrad=False)")
    optimizer.lr = 0.5
    assert repr(optimizer).startswith("Adam(lr=0.5, ")


def test_network_repr_rebuilds_the_architecture():
    net = bp.Network([bp.Dense(4, 8, "relu"), bp.Dense(8, 2, "softmax")], dtype="float64",
                     seed=7)
    rebuilt = eval(repr(net), NAMESPACE)  # noqa: S307 (our own repr)
    assert repr(rebuilt) == repr(net) and rebuilt.n_parameters == net.n_parameters


def test_summary_lists_layers_output_shapes_and_parameter_counts(capsys):
    import io
    net = bp.Network([bp.Dense(5, 16, "relu"), bp.Dense(16, 8, "tanh", bias=False),
                      bp.Dense(8, 3)], seed=0)
    buffer = io.StringIO()
    assert net.summary(file=buffer) is None
    text = buffer.getvalue()
    rows = [line.split() for line in text.splitlines() if line.startswith("dense_")]
    assert [(row[2] + row[3], row[4], int(row[5].replace(",", ""))) for row in rows] == [
        (f"(None,{layer.out_features})", layer.activation, layer.n_parameters)
        for layer in net.layers]
    assert f"Total params: {net.n_parameters:,}" in text
    assert sum(layer.n_parameters for layer in net.layers) == net.n_parameters == 96 + 128 + 27
    net.summary()
    assert capsys.readouterr().out == text


# --------------------------------------------------------------------------- Keras habits
def small_problem(n=60, seed=9):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4))
    return X, (X[:, 0] > 0).astype(int)


def scripted(values):
    calls = iter(values)

    def score(y_true, y_pred):
        return next(calls)
    return score


def test_early_stopping_takes_keras_restore_best_weights():
    assert bp.callbacks.EarlyStopping(restore_best_weights=False).restore_best is False
    assert bp.callbacks.EarlyStopping(restore_best_weights=True).restore_best is True
    with pytest.raises(ValueError, match="not both"):
        bp.callbacks.EarlyStopping(restore_best=False, restore_best_weights=True)


@pytest.mark.parametrize("patience", [0, 1, 2, 3])
def test_early_stopping_counts_patience_as_keras(patience):
    """Keras' rule written out: wait += 1 after each epoch without improvement, stop
    when wait >= patience. The scripted score is best at epoch 3, then flat."""
    values = [5.0, 4.0, 3.0] + [3.0] * 10
    wait, expected = 0, len(values)
    for number, value in enumerate(values, start=1):
        if number > 1 and value < min(values[:number - 1]):
            wait = 0
            continue
        if number > 1:
            wait += 1
            if wait >= patience:
                expected = number
                break
    X, y = small_problem()
    net = bp.Network([bp.Dense(4, 2)], seed=0)
    stopper = bp.callbacks.EarlyStopping("score", mode="min", patience=patience,
                                         restore_best_weights=False)
    history = net.fit(X, y, loss="cross_entropy", optimizer="sgd", epochs=len(values),
                      metrics=[scripted(values)], callbacks=[stopper])
    assert len(history.epoch) == expected == 3 + patience if patience else expected
    assert stopper.stopped_epoch == history.epoch[-1] and stopper.best_epoch == 3


def test_epoch_numbers_are_the_same_everywhere(tmp_path, capsys):
    import csv
    X, y = small_problem()
    net = bp.Network([bp.Dense(4, 2)], seed=0)
    net.fit(X, y, loss="cross_entropy", optimizer="sgd", epochs=2, batch_size=None)
    history = net.fit(X, y, loss="cross_entropy", optimizer="sgd", epochs=2, verbose=2,
                      batch_size=None, callbacks=[
                          bp.callbacks.CSVLogger(tmp_path / "log.csv"),
                          bp.callbacks.ModelCheckpoint(tmp_path / "m{epoch}.npz", "loss",
                                                       save_best_only=False)])
    assert history.epoch == [3, 4] and net.epochs_trained == 4  # from 1, across fits
    with open(tmp_path / "log.csv", newline="") as handle:
        assert [int(row["epoch"]) for row in csv.DictReader(handle)] == [3, 4]
    assert sorted(p.name for p in tmp_path.glob("*.npz")) == ["m3.npz", "m4.npz"]
    captured = capsys.readouterr()
    assert captured.out == ""  # progress goes to stderr
    assert [line.split()[1] for line in captured.err.splitlines() if line.strip()] == [
        "3/4", "4/4"], captured.err
    with pytest.warns(RuntimeWarning, match=r"epoch 5\b"):
        net.fit(X * 1e18, y, loss="cross_entropy", optimizer=bp.SGD(lr=1e30), epochs=3,
                batch_size=10, on_divergence="warn")
    assert net.history.stop_reason == "diverged"


def test_history_plot_axis_is_the_epoch_numbers(tmp_path):
    pytest.importorskip("matplotlib")
    X, y = small_problem()
    net = bp.Network([bp.Dense(4, 2)], seed=0)
    history = net.fit(X, y, loss="cross_entropy", optimizer="sgd", epochs=3)
    ax = history.plot(tmp_path / "plot.png")
    assert list(ax.lines[0].get_xdata()) == [1, 2, 3]


def test_model_checkpoint_into_a_missing_folder_fails_at_construction(tmp_path):
    path = tmp_path / "nodir" / "x.npz"
    with pytest.raises(FileNotFoundError, match=str(path).replace("\\", "\\\\")):
        bp.callbacks.ModelCheckpoint(path)
    bp.callbacks.ModelCheckpoint(tmp_path / "x.npz")  # an existing folder is fine
    bp.callbacks.ModelCheckpoint("x.npz")  # the current one too


# --------------------------------------------------------------------------- named optimizers
@pytest.mark.parametrize("name", ["adam", "sgd", "rmsprop"])
def test_an_optimizer_by_name_keeps_its_state_across_fit_calls(name):
    X, y = small_problem(90)
    a = bp.Network([bp.Dense(4, 8, "tanh"), bp.Dense(8, 2)], seed=3)
    b = bp.Network([bp.Dense(4, 8, "tanh"), bp.Dense(8, 2)], seed=3)
    first = a.fit(X, y, loss="cross_entropy", optimizer=name, epochs=1, batch_size=16)
    second = a.fit(X, y, loss="cross_entropy", optimizer=name, epochs=1, batch_size=16)
    whole = b.fit(X, y, loss="cross_entropy", optimizer=name, epochs=2, batch_size=16)
    assert a.parameters.tobytes() == b.parameters.tobytes()
    assert first.history["loss"] + second.history["loss"] == whole.history["loss"]
    # train_step and partial_fit by name continue the same optimizer
    a.partial_fit(X, y, loss="cross_entropy", optimizer=name, batch_size=16)
    a.train_step(X, y, "cross_entropy", name)
    b.partial_fit(X, y, loss="cross_entropy", optimizer=name, batch_size=16)
    b.train_step(X, y, "cross_entropy", name)
    assert a.parameters.tobytes() == b.parameters.tobytes()
    kept, = a._named_optimizers.values()
    assert kept.step_count == 3 * 6 + 1


def test_an_optimizer_instance_is_not_replaced_by_the_named_one():
    X, y = small_problem(30)
    net = bp.Network([bp.Dense(4, 2)], seed=0)
    net.fit(X, y, loss="cross_entropy", optimizer="adam", epochs=1)
    mine = bp.Adam()
    net.fit(X, y, loss="cross_entropy", optimizer=mine, epochs=1, batch_size=None)
    assert mine.step_count == 1


# --------------------------------------------------------------------------- fit's default
def test_fit_takes_batches_of_32_by_default_and_none_is_the_whole_set():
    X, y = small_problem(100)
    net = bp.Network([bp.Dense(4, 2)], seed=0)
    optimizer = bp.SGD(lr=0.1)
    net.fit(X, y, loss="cross_entropy", optimizer=optimizer, epochs=2)
    assert optimizer.step_count == 2 * 4  # 32 + 32 + 32 + 4 per epoch
    net.partial_fit(X, y, loss="cross_entropy", optimizer=optimizer)
    assert optimizer.step_count == 3 * 4
    net.fit(X, y, loss="cross_entropy", optimizer=optimizer, epochs=2, batch_size=None)
    assert optimizer.step_count == 3 * 4 + 2
