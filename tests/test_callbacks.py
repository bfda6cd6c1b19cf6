"""Callbacks, progress output and History.plot for Network.fit.

Oracles: a recording callback (hook order, batch counts), replays of the same
steps with train_step, the History itself (CSV contents, checkpoints reloaded with
bpfast.load), and PyTorch's ReduceLROnPlateau rule (written out, and torch itself
when installed).
"""
import csv
import io
import sys

import numpy as np
import pytest
from training_data import Recorder, batches, diabetes, digits, mlp, twins, unchanged

import bpfast as bp
from bpfast.callbacks import CSVLogger, EarlyStopping, ModelCheckpoint, ReduceLROnPlateau

CE = bp.CrossEntropy()


def small_digits(n=100):
    X, y = digits()
    return X[:n], y[:n]


# =========================================================================== the protocol
def test_hook_order_with_the_compiled_epoch():
    X, y = small_digits()
    net = mlp((64, 8, 10))
    opt = bp.Adam(lr=0.01)
    recorder = Recorder()
    history = net.fit(X, y, loss=CE, optimizer=opt, epochs=3, batch_size=32,
                      callbacks=[recorder])
    expected = [("train_begin", None)]
    for epoch in range(1, 4):  # numbered from 1
        expected += [("epoch_begin", epoch), ("epoch_end", epoch)]
    expected.append(("train_end", None))
    assert recorder.events == expected  # no on_batch_end without wants_batches
    assert recorder.network is net and recorder.optimizer is opt
    for epoch in range(3):
        assert recorder.epoch_logs[epoch + 1] == {key: values[epoch]
                                              for key, values in history.history.items()}
    assert recorder.train_begin_logs["n_samples"] == 100
    assert recorder.train_end_logs["stop_reason"] is None


def test_on_batch_end_once_per_batch_when_wanted_and_results_unchanged():
    X, y = small_digits()
    a, b = twins((64, 8, 10), seed=1)
    opt_a, opt_b = bp.Adam(lr=0.01), bp.Adam(lr=0.01)
    per_batch, per_epoch = Recorder(wants_batches=True), Recorder()
    ha = a.fit(X, y, loss=CE, optimizer=opt_a, epochs=2, batch_size=32,
               callbacks=[per_batch, per_epoch])
    hb = b.fit(X, y, loss=CE, optimizer=opt_b, epochs=2, batch_size=32)
    expected = [("train_begin", None)]
    for epoch in range(1, 3):
        expected += [("epoch_begin", epoch)] + [("batch_end", i) for i in range(4)] + \
            [("epoch_end", epoch)]
    expected.append(("train_end", None))
    assert per_batch.events == expected
    assert "batch_end" not in {event for event, _ in per_epoch.events}
    assert [logs["samples"] for logs in per_batch.batch_logs] == [32, 64, 96, 100] * 2
    # the running loss at the last batch is the epoch's loss
    assert per_batch.batch_logs[3]["loss"] == pytest.approx(ha.history["loss"][0], rel=1e-15)
    # one compiled call per batch gives exactly what one call per epoch gives
    np.testing.assert_array_equal(a.parameters, b.parameters)
    np.testing.assert_allclose(ha.history["loss"], hb.history["loss"], rtol=1e-15)
    assert opt_a.step_count == opt_b.step_count == 8


def test_validation_and_early_stopping_keep_the_compiled_epoch():
    X, y = small_digits(300)
    recorder = Recorder()
    net = mlp((64, 8, 10))
    net.fit(X[:200], y[:200], loss=CE, optimizer=bp.Adam(lr=0.01), epochs=4, batch_size=20,
            validation_data=(X[200:], y[200:]), metrics=["accuracy"], early_stopping=True,
            schedule=bp.schedules.StepDecay(2, 0.5), callbacks=[recorder])
    assert not [event for event in recorder.events if event[0] == "batch_end"]
    assert len([event for event in recorder.events if event[0] == "epoch_end"]) == 4


def test_a_single_callback_and_bad_callbacks():
    X, y = small_digits()
    net = mlp((64, 8, 10))
    opt = bp.SGD(lr=0.1)
    recorder = Recorder()
    net.fit(X, y, loss=CE, optimizer=opt, epochs=1, callbacks=recorder)
    assert recorder.events[-1] == ("train_end", None)
    for bad in ([object()], [lambda epoch, logs: None], "history"):
        with unchanged(net, opt):
            with pytest.raises(TypeError):
                net.fit(X, y, loss=CE, optimizer=opt, callbacks=bad)


# =========================================================================== stopping
class StopAt(bp.callbacks.Callback):
    def __init__(self, epoch=None, batch=None, reason=True):
        self.epoch, self.batch, self.reason = epoch, batch, reason
        self.wants_batches = batch is not None
        self._current = None

    def on_epoch_begin(self, epoch, logs):
        self._current = epoch

    def on_batch_end(self, batch, logs):
        if self._current == self.epoch and batch == self.batch:
            self.network.stop_training = self.reason

    def on_epoch_end(self, epoch, logs):
        if self.batch is None and epoch == self.epoch:
            self.network.stop_training = self.reason


@pytest.mark.parametrize("reason,expected", [(True, "callback"), ("enough", "enough")])
def test_stop_training_from_on_epoch_end(reason, expected):
    X, y = small_digits()
    a, b = twins((64, 8, 10), seed=2)
    opt_a, opt_b = bp.SGD(lr=0.1), bp.SGD(lr=0.1)
    history = a.fit(X, y, loss=CE, optimizer=opt_a, epochs=20, batch_size=25,
                    callbacks=[StopAt(epoch=3, reason=reason)])
    assert history.epoch == [1, 2, 3] and history.stop_reason == expected
    assert a.epochs_trained == 3 and opt_a.step_count == 12
    b.fit(X, y, loss=CE, optimizer=opt_b, epochs=3, batch_size=25)
    np.testing.assert_array_equal(a.parameters, b.parameters)
    # the flag does not leak into the next fit
    assert len(a.fit(X, y, loss=CE, optimizer=opt_a, epochs=2).epoch) == 2


def test_stop_training_from_on_batch_end_stops_after_that_batch():
    X, y = small_digits()
    a, b = twins((64, 8, 10), seed=3)
    opt_a, opt_b = bp.Adam(lr=0.01), bp.Adam(lr=0.01)
    history = a.fit(X, y, loss=CE, optimizer=opt_a, epochs=20, batch_size=25, shuffle=False,
                    callbacks=[StopAt(epoch=2, batch=2)])
    assert history.stop_reason == "callback" and history.epoch == [1, 2]
    assert opt_a.step_count == 4 + 3
    b.fit(X, y, loss=CE, optimizer=opt_b, epochs=1, batch_size=25, shuffle=False)
    losses = [b.train_step(X[rows], y[rows], CE, opt_b) for rows in batches(100, 25)[:3]]
    np.testing.assert_array_equal(a.parameters, b.parameters)
    # the partial epoch's loss is the mean over its finished batches
    assert history.history["loss"][1] == pytest.approx(np.mean(losses), rel=1e-14)


# =========================================================================== CSVLogger
def test_csv_logger_writes_the_history(tmp_path):
    X, y = small_digits(300)
    path = tmp_path / "log.csv"
    net = mlp((64, 8, 10))
    history = net.fit(X[:200], y[:200], loss=CE, optimizer=bp.Adam(lr=0.01), epochs=3,
                      validation_data=(X[200:], y[200:]), metrics=["accuracy"],
                      callbacks=[CSVLogger(path)])
    with open(path, newline="") as handle:
        header = next(csv.reader(handle))
    assert header[0] == "epoch" and set(header[1:]) == set(history.history)
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["epoch"]) for row in rows] == history.epoch
    for key, values in history.history.items():
        assert [float(row[key]) for row in rows] == values  # exact: repr round-trips

    # append=True continues the file with one header; append=False replaces it
    more = net.fit(X[:200], y[:200], loss=CE, optimizer=bp.Adam(lr=0.01), epochs=2,
                   validation_data=(X[200:], y[200:]), metrics=["accuracy"],
                   callbacks=[CSVLogger(path, append=True)])
    with open(path, newline="") as handle:
        lines = handle.read().splitlines()
    assert len(lines) == 1 + 5 and sum(line.startswith("epoch") for line in lines) == 1
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(row["epoch"]) for row in rows] == [1, 2, 3, 4, 5]
    assert [float(row["loss"]) for row in rows[3:]] == more.history["loss"]
    net.fit(X, y, loss=CE, optimizer=bp.Adam(lr=0.01), epochs=1, callbacks=[CSVLogger(path)])
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 1 and set(rows[0]) == {"epoch", "loss", "lr"}


# =========================================================================== ModelCheckpoint
needs_save = pytest.mark.skipif(not hasattr(bp.Network, "save"), reason="no Network.save")


@needs_save
def test_model_checkpoint_keeps_the_best_model(tmp_path):
    X, y = digits()
    X_val, y_val = X[1000:1200], y[1000:1200]
    net = mlp((64, 64, 10))
    recorder = Recorder(keep_parameters=True)
    path = tmp_path / "best.npz"
    history = net.fit(X[:20], y[:20], loss=CE, optimizer=bp.Adam(lr=0.01), epochs=40,
                      validation_data=(X_val, y_val),
                      callbacks=[recorder, ModelCheckpoint(path, save_optimizer=True)])
    val_loss = history.history["val_loss"]
    best = int(np.argmin(val_loss))
    assert 0 < best < 39  # the crafted case overfits: the best is not the last
    loaded, optimizer = bp.load(path, with_optimizer=True)
    np.testing.assert_array_equal(loaded.parameters, recorder.parameters[best + 1])
    assert CE(loaded.predict(X_val), y_val) == pytest.approx(val_loss[best], rel=1e-14)
    assert optimizer.step_count == best + 1


@needs_save
def test_model_checkpoint_every_epoch_with_a_name_template(tmp_path):
    X, y = small_digits()
    net = mlp((64, 8, 10))
    recorder = Recorder(keep_parameters=True)
    net.fit(X, y, loss=CE, optimizer=bp.SGD(lr=0.1), epochs=3,
            callbacks=[recorder, ModelCheckpoint(tmp_path / "model-{epoch:02d}.npz",
                                                 monitor="loss", save_best_only=False)])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "model-01.npz", "model-02.npz", "model-03.npz"]  # {epoch} from 1, as Keras
    for epoch in range(1, 4):
        loaded = bp.load(tmp_path / f"model-{epoch:02d}.npz")
        np.testing.assert_array_equal(loaded.parameters, recorder.parameters[epoch])


def test_model_checkpoint_on_val_loss_needs_validation(tmp_path):
    X, y = small_digits()
    net = mlp((64, 8, 10))
    opt = bp.SGD(lr=0.1)
    with unchanged(net, opt):
        with pytest.raises(ValueError, match="val_loss"):
            net.fit(X, y, loss=CE, optimizer=opt, callbacks=[ModelCheckpoint(tmp_path / "m")])
    assert not list(tmp_path.iterdir())


# =========================================================================== ReduceLROnPlateau
def plateau_reference(values, lr, factor, patience, threshold, cooldown, min_lr):
    """torch.optim.lr_scheduler.ReduceLROnPlateau(mode="min", threshold_mode="abs"),
    written out: the learning rate each epoch starts with, and the final one."""
    best, bad, cooldown_counter, lrs = float("inf"), 0, 0, []
    for value in values:
        lrs.append(lr)
        if value < best - threshold:
            best, bad = value, 0
        else:
            bad += 1
        if cooldown_counter > 0:
            cooldown_counter -= 1
            bad = 0
        if bad > patience:
            new_lr = max(lr * factor, min_lr)
            if lr - new_lr > 1e-8:
                lr = new_lr
            cooldown_counter, bad = cooldown, 0
    return lrs, lr


def scripted_metric(values):
    """A metric that returns the given values, one per epoch, to script a plateau."""
    calls = iter(values)

    def scripted(y_true, output):
        return next(calls)

    return scripted


def test_reduce_lr_on_plateau_on_a_real_plateau():
    """SGD with a tiny rate: the training loss moves by far less than min_delta."""
    X, y = diabetes()
    net = mlp((10, 8, 1))
    opt = bp.SGD(lr=1e-5)
    recorder = Recorder()
    reducer = ReduceLROnPlateau("loss", factor=0.5, patience=2)
    history = net.fit(X, y, loss=bp.MSE(), optimizer=opt, epochs=10, batch_size=None,
                      callbacks=[reducer, recorder])
    losses = history.history["loss"]
    assert max(losses) - min(losses) < 1e-4
    lrs, final = plateau_reference(losses, 1e-5, 0.5, 2, 1e-4, 0, 0.0)
    assert lrs == [1e-5] * 4 + [5e-6] * 3 + [2.5e-6] * 3  # patience 2: the third bad epoch
    assert history.history["lr"] == pytest.approx(lrs, rel=1e-15)
    assert [recorder.lr_at_begin[e] for e in range(1, 11)] == history.history["lr"]
    assert opt.lr == pytest.approx(final, rel=1e-15)


CASES = {
    "plain": dict(values=[5, 4, 4, 4, 4, 4, 3, 3, 3, 3, 3, 3, 2, 2.5, 2.5],
                  factor=0.5, patience=1, min_delta=0.0, cooldown=0, min_lr=0.0),
    "cooldown": dict(values=[5, 4, 4, 4, 4, 4, 3, 3, 3, 3, 3, 3, 2, 2.5, 2.5],
                     factor=0.5, patience=1, min_delta=0.0, cooldown=1, min_lr=0.0),
    "cooldown2_min_lr": dict(values=[3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3],
                             factor=0.3, patience=0, min_delta=0.0, cooldown=2, min_lr=0.004),
    "min_delta": dict(values=[1.0, 0.95, 0.93, 0.92, 0.8, 0.79, 0.78, 0.7, 0.69, 0.68],
                      factor=0.1, patience=1, min_delta=0.05, cooldown=0, min_lr=0.0),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_reduce_lr_on_plateau_follows_pytorch(case):
    spec = dict(CASES[case])
    values = spec.pop("values")
    X, y = small_digits(40)
    net = mlp((64, 4, 10))
    opt = bp.SGD(lr=0.1)
    reducer = ReduceLROnPlateau("scripted", mode="min", **spec)
    history = net.fit(X, y, loss=CE, optimizer=opt, epochs=len(values),
                      metrics=[scripted_metric(values)], callbacks=[reducer])
    assert history.history["scripted"] == values
    expected, final = plateau_reference(values, 0.1, spec["factor"], spec["patience"],
                                        spec["min_delta"], spec["cooldown"], spec["min_lr"])
    assert history.history["lr"] == pytest.approx(expected, rel=1e-15)
    assert opt.lr == pytest.approx(final, rel=1e-15)


@pytest.mark.parametrize("case", sorted(CASES))
def test_plateau_reference_is_torchs(case):
    torch = pytest.importorskip("torch")
    spec = CASES[case]
    param = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([param], lr=0.1)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
        opt, mode="min", factor=spec["factor"], patience=spec["patience"],
        threshold=spec["min_delta"], threshold_mode="abs", cooldown=spec["cooldown"],
        min_lr=spec["min_lr"])
    lrs = []
    for value in spec["values"]:
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        scheduler.step(value)
    expected, final = plateau_reference(spec["values"], 0.1, spec["factor"],
                                        spec["patience"], spec["min_delta"],
                                        spec["cooldown"], spec["min_lr"])
    assert lrs == pytest.approx(expected, rel=1e-15)
    assert opt.param_groups[0]["lr"] == pytest.approx(final, rel=1e-15)


def test_schedule_and_reduce_lr_on_plateau_together_raise():
    X, y = small_digits()
    net = mlp((64, 8, 10))
    opt = bp.SGD(lr=0.1)
    with unchanged(net, opt):
        with pytest.raises(ValueError, match="ReduceLROnPlateau"):
            net.fit(X, y, loss=CE, optimizer=opt, schedule=bp.schedules.ExponentialDecay(0.9),
                    callbacks=[ReduceLROnPlateau("loss")])
    assert getattr(opt, "initial_lr", None) is None


@pytest.mark.parametrize("callback", [
    lambda: EarlyStopping("val_acc"), lambda: ReduceLROnPlateau("accuracy"),
])
def test_monitor_of_a_value_fit_does_not_record_raises(callback):
    X, y = small_digits()
    net = mlp((64, 8, 10))
    opt = bp.SGD(lr=0.1)
    with unchanged(net, opt):
        with pytest.raises(ValueError, match="records"):
            net.fit(X, y, loss=CE, optimizer=opt, callbacks=[callback()],
                    validation_data=(X, y))


# =========================================================================== progress
@pytest.mark.parametrize("verbose", [1, 2])
def test_verbose_prints_epoch_and_loss(capsys, verbose):
    X, y = small_digits(200)
    net = mlp((64, 8, 10))
    net.fit(X[:150], y[:150], loss=CE, optimizer=bp.Adam(lr=0.01), epochs=3, batch_size=10,
            validation_data=(X[150:], y[150:]), verbose=verbose)
    captured = capsys.readouterr()
    assert captured.out == ""  # progress goes to stderr, as tqdm's
    out = captured.err
    assert "epoch" in out and "loss" in out and "val_loss" in out
    assert "epoch 3/3" in out
    if verbose == 2:
        lines = [line for line in out.splitlines() if line.strip()]
        assert len(lines) == 3 and all("loss" in line for line in lines)


def test_verbose_0_prints_nothing(capsys):
    X, y = small_digits()
    net = mlp((64, 8, 10))
    net.fit(X, y, loss=CE, optimizer=bp.Adam(lr=0.01), epochs=3, batch_size=10,
            validation_data=(X, y), metrics=["accuracy"], early_stopping=True, verbose=0)
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""


@pytest.mark.parametrize("verbose", [-1, 3, True, "1"])
def test_bad_verbose_raises(verbose):
    X, y = small_digits()
    net = mlp((64, 8, 10))
    opt = bp.SGD(lr=0.1)
    with unchanged(net, opt):
        with pytest.raises(ValueError, match="verbose"):
            net.fit(X, y, loss=CE, optimizer=opt, verbose=verbose)


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def hide_package(monkeypatch, package):
    """Make ``import package`` (and its submodules) fail, as if it were not installed."""
    for name in list(sys.modules):
        if name.startswith(package + "."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, package, None)


def test_progress_bar_on_a_terminal_does_not_change_training(monkeypatch):
    # the plain fallback (no tqdm) redraws one line per epoch in place
    hide_package(monkeypatch, "tqdm")
    X, y = small_digits(300)
    a, b = twins((64, 8, 10), seed=4)
    terminal = FakeTerminal()
    bar = bp.callbacks.ProgressBar(2, file=terminal)
    ha = a.fit(X, y, loss=CE, optimizer=bp.Adam(lr=0.01), epochs=2, batch_size=1,
               callbacks=[bar])
    hb = b.fit(X, y, loss=CE, optimizer=bp.Adam(lr=0.01), epochs=2, batch_size=1)
    np.testing.assert_array_equal(a.parameters, b.parameters)
    np.testing.assert_allclose(ha.history["loss"], hb.history["loss"], rtol=1e-14)
    text = terminal.getvalue()
    assert "epoch 1/2" in text and "epoch 2/2" in text and "samples/s" in text
    assert text.count("\n") == 2


def test_progress_bar_with_tqdm(capsys):
    pytest.importorskip("tqdm")
    X, y = small_digits(200)
    a, b = twins((64, 8, 10), seed=5)
    ha = a.fit(X, y, loss=CE, optimizer=bp.Adam(lr=0.01), epochs=2, batch_size=1, verbose=1)
    hb = b.fit(X, y, loss=CE, optimizer=bp.Adam(lr=0.01), epochs=2, batch_size=1)
    np.testing.assert_array_equal(a.parameters, b.parameters)
    np.testing.assert_allclose(ha.history["loss"], hb.history["loss"], rtol=1e-14)
    captured = capsys.readouterr()
    assert "epoch 2/2" in captured.out + captured.err and "loss" in captured.out + captured.err


# =========================================================================== History.plot
def test_history_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    X, y = small_digits(200)
    net = mlp((64, 8, 10))
    history = net.fit(X[:150], y[:150], loss=CE, optimizer=bp.Adam(lr=0.01), epochs=3,
                      validation_data=(X[150:], y[150:]))
    path = tmp_path / "loss.png"
    ax = history.plot(path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert {line.get_label() for line in ax.get_lines()} == {"loss", "val_loss"}
    with pytest.raises(ValueError, match="accuracy"):
        history.plot(tmp_path / "other.png", keys=["accuracy"])


def test_history_plot_without_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    X, y = small_digits()
    net = mlp((64, 8, 10))
    history = net.fit(X, y, loss=CE, optimizer=bp.SGD(lr=0.1), epochs=2)
    hide_package(monkeypatch, "matplotlib")
    with pytest.raises(ImportError, match=r"bpfast\[plot\]"):
        history.plot(tmp_path / "loss.png")
    assert not list(tmp_path.iterdir())


class _FailingEnd(bp.callbacks.Callback):
    def on_train_end(self, logs):
        raise RuntimeError("on_train_end failed")


class _InterruptAtEpoch(bp.callbacks.Callback):
    def on_epoch_end(self, epoch, logs):
        raise KeyboardInterrupt


def test_every_on_train_end_runs_even_if_one_raises(tmp_path):
    X, y = small_digits()
    logger = CSVLogger(tmp_path / "log.csv")
    net = mlp((64, 16, 10), seed=0)
    with pytest.raises(RuntimeError, match="on_train_end failed"):
        net.fit(X, y, loss=CE, optimizer=bp.Adam(lr=0.01), epochs=2,
                callbacks=[_FailingEnd(), logger])
    assert logger._file is None  # closed although an earlier callback raised
    # an error already in flight (Ctrl-C) is the one that comes out
    logger = CSVLogger(tmp_path / "log2.csv")
    with pytest.raises(KeyboardInterrupt):
        net.fit(X, y, loss=CE, optimizer=bp.Adam(lr=0.01), epochs=5,
                callbacks=[_FailingEnd(), _InterruptAtEpoch(), logger])
    assert logger._file is None


def test_a_fit_refused_by_another_threads_fit_changes_nothing():
    import threading
    X, y = small_digits()
    net = mlp((64, 16, 10), seed=0)
    started, release = threading.Event(), threading.Event()

    class Hold(bp.callbacks.Callback):
        def on_epoch_end(self, epoch, logs):
            started.set()
            release.wait(10)

    worker = threading.Thread(target=lambda: net.fit(
        X, y, loss=CE, optimizer=bp.Adam(lr=0.01), epochs=2, callbacks=[Hold()]))
    worker.start()
    try:
        assert started.wait(10)
        history, rng = net.history, net._rng.bit_generator.state
        with pytest.raises(RuntimeError, match="already training"):
            net.fit(X, y, loss=CE, optimizer=bp.Adam(lr=0.01), epochs=1,
                    validation_split=0.2)
        assert net.history is history and net._rng.bit_generator.state == rng
    finally:
        release.set()
        worker.join()
    assert len(net.history.epoch) == 2
