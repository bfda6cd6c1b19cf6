"""The loop behind ``Network.fit``: validation, metrics, schedules, callbacks, divergence.

Each epoch is one compiled call (``Engine.train_epoch``) unless a callback asks
for batches: then the epoch runs in chunks of batches, whose results combine
(the engine returns weighted loss sums, not means; the parameters are the same
bit for bit, the epoch's mean loss up to the rounding of its sum). Everything
here is per epoch or per chunk; nothing is per batch.
"""
import dataclasses
import math
import sys
import time
import warnings
from typing import Any

import numpy as np

from ._compiled import core as _core
from ._validation import check_choice, check_real, check_sample_weight
from .callbacks import Callback, EarlyStopping, History, ProgressBar, ReduceLROnPlateau
from .losses import CrossEntropy
from .metrics import get_metric
from .schedules import as_schedule

__all__ = ["DivergenceError", "FitConfig", "Trainer"]

# With progress callbacks, chunks of batches aim at this many seconds each.
_PROGRESS_INTERVAL = 0.1


class DivergenceError(FloatingPointError):
    """Training stopped because the loss (or the gradient norm) became NaN or infinite.

    The network is left with finite parameters: those before the update that
    diverged, or, if they were no longer finite, those of the start of the epoch.
    """


# --------------------------------------------------------------------------- inputs
class Data:
    """Checked training or validation data: X, the loss's target form, and weights."""

    def __init__(self, X, dense, labels, weights, y):
        self.X, self.dense, self.labels, self.weights, self.y = X, dense, labels, weights, y

    @property
    def n_samples(self):
        return self.X.shape[0]

    def take(self, rows):
        """The samples at rows (copies, C-contiguous)."""
        def pick(array):
            return None if array is None else np.ascontiguousarray(array[rows])
        y = self.y[rows] if isinstance(self.y, np.ndarray) else np.asarray(self.y)[rows]
        return Data(pick(self.X), pick(self.dense), pick(self.labels), pick(self.weights), y)


def combined_weights(loss, dense, labels, sample_weight, class_weight, n_samples, n_outputs):
    """sample_weight times the class weight of each sample's class (float64) or None."""
    weights = check_sample_weight(sample_weight, n_samples)
    if class_weight is None:
        return weights
    classes = loss.class_indices(dense, labels)
    if classes is None:
        raise ValueError(f"class_weight needs a classification loss with one class per "
                         f"sample (CrossEntropy, or BinaryCrossEntropy with one output); "
                         f"got {loss!r} with these targets")
    n_classes = n_outputs if isinstance(loss, CrossEntropy) else 2
    counts = np.bincount(classes, minlength=n_classes)
    if isinstance(class_weight, str):
        check_choice("class_weight", class_weight, ("balanced",))
        present = np.flatnonzero(counts)
        # scikit-learn's "balanced": n_samples / (n_classes * count of the class)
        table = np.zeros(counts.shape[0])
        table[present] = n_samples / (present.shape[0] * counts[present])
    elif isinstance(class_weight, dict):
        table = np.ones(counts.shape[0])
        for key, value in class_weight.items():
            if isinstance(key, (bool, np.bool_)) or not isinstance(key, (int, np.integer)) \
                    or not 0 <= key < n_classes:
                raise ValueError(f"class_weight keys must be class indices in "
                                 f"[0, {n_classes - 1}], got {key!r}")
            table[key] = check_real(f"class_weight[{key}]", value, minimum=0)
    else:
        raise TypeError(f"class_weight must be a dict {{class: weight}} or 'balanced', "
                        f"got {class_weight!r}")
    per_sample = table[classes]
    weights = per_sample if weights is None else weights * per_sample
    return check_sample_weight(weights, n_samples, name="sample_weight * class_weight")


def split_validation(n_samples, fraction, classes, rng):
    """(train rows, validation rows): a random split, stratified by classes if given."""
    fraction = check_real("validation_split", fraction, minimum=0, maximum=1,
                          min_inclusive=False, max_inclusive=False)
    if classes is None:
        order = rng.permutation(n_samples)
        picked = order[:int(round(fraction * n_samples))]
    else:
        picked = []
        for value in np.unique(classes):
            members = np.flatnonzero(classes == value)
            rng.shuffle(members)
            picked.append(members[:int(round(fraction * members.shape[0]))])
        picked = np.concatenate(picked)
    if picked.shape[0] == 0 or picked.shape[0] == n_samples:
        raise ValueError(f"validation_split={fraction} of {n_samples} samples leaves "
                         f"{picked.shape[0]} for validation and "
                         f"{n_samples - picked.shape[0]} for training; both need some")
    is_validation = np.zeros(n_samples, dtype=bool)
    is_validation[picked] = True
    return np.flatnonzero(~is_validation), np.flatnonzero(is_validation)


def resolve_metrics(metrics, loss, n_outputs):
    """[(name, function(output, data) -> float)] for metrics=["accuracy", callable, ...]
    (see bpfast.metrics), checked against loss and the network's n_outputs."""
    if metrics is None:
        return []
    if isinstance(metrics, str) or callable(metrics):
        metrics = [metrics]
    resolved = [get_metric(metric, loss, n_outputs) for metric in metrics]
    names = [name for name, _ in resolved]
    if len(set(names)) != len(names):
        raise ValueError(f"metric names must be distinct, got {names}")
    return resolved


@dataclasses.dataclass(frozen=True)
class FitConfig:
    """The options of one ``Network.fit``, as its keywords name them (see its docstring).

    ``Network.fit``, ``Network.partial_fit`` and ``Network.trainer`` build one; the
    network checks it once, against itself and the data, when it makes the
    :class:`Trainer` (``Network._checked_trainer``), and the Trainer reads it from there.
    """

    loss: Any
    optimizer: Any
    epochs: int = 1
    batch_size: int | None = 32  # fit's default (Keras'); None: the whole set per step
    shuffle: bool = True
    sample_weight: Any = None
    class_weight: Any = None
    l2: float = 0.0
    clip_norm: float | None = None
    clip_value: float | None = None
    validation_data: Any = None
    validation_split: float | None = None
    metrics: Any = None
    schedule: Any = None
    callbacks: Any = None
    early_stopping: Any = False
    tol: float | None = None
    patience: int = 10
    verbose: int = 0
    on_divergence: str = "raise"
    comm: Any = None  # an mpi4py communicator: data-parallel (bpfast.distributed)


# --------------------------------------------------------------------------- the loop
class Trainer:
    """A checked ``fit``: built before anything changes; ``run(k)`` trains k more epochs.

    Made by ``Network.trainer`` (and inside ``fit``), never directly: ``config`` is a
    :class:`FitConfig` whose loss, optimizer and numbers the network has checked and
    resolved, ``options`` the engine's (l2, clip_value, clip_norm) and ``metrics`` the
    resolved (name, function) pairs.
    """

    def __init__(self, network, data, validation, config, *, options, metrics):
        self.network = network
        self.engine = network._engine
        self.loss = config.loss
        self.optimizer = config.optimizer
        self.data = data
        self.validation = validation
        n_samples = data.n_samples
        batch_size = config.batch_size
        self.batch_size = n_samples if batch_size is None else min(batch_size, n_samples)
        self.epochs = config.epochs
        self.shuffle = config.shuffle
        self.options = options            # (l2, clip_value, clip_norm) for the engine
        self.metrics = metrics
        self.schedule = as_schedule(config.schedule)
        self.on_divergence = check_choice("on_divergence", config.on_divergence,
                                          ("raise", "warn"))
        self.history = History()
        self._snapshot = None  # [parameters, optimizer state, step count], reused per epoch
        # the loss sum, weight sum and rows of the current epoch's finished batches, which
        # the engine adds to in compiled code (see Engine.train_epoch: survives a Ctrl-C)
        self._epoch_totals = np.zeros(3)
        self.callbacks = self._build_callbacks(config.callbacks, config.early_stopping,
                                               config.tol, config.patience, config.verbose,
                                               config.epochs)
        keys = {"loss", "lr"} | {name for name, _ in metrics}
        if validation is not None:
            keys |= {"val_loss"} | {f"val_{name}" for name, _ in metrics}
        for callback in self.callbacks:
            callback.check_keys(keys)
        self._log_keys = keys
        if self.schedule is not None and any(
                isinstance(c, ReduceLROnPlateau) for c in self.callbacks):
            raise ValueError("use either schedule= or a ReduceLROnPlateau callback: "
                             "both would set the learning rate")

    def _build_callbacks(self, callbacks, early_stopping, tol, patience, verbose, epochs):
        if callbacks is None:
            callbacks = []
        elif isinstance(callbacks, Callback):
            callbacks = [callbacks]
        else:
            callbacks = list(callbacks)
        for callback in callbacks:
            if not isinstance(callback, Callback):
                raise TypeError(f"callbacks must be bpfast.callbacks.Callback instances, "
                                f"got {callback!r}")
        if tol is not None:
            tol = check_real("tol", tol, minimum=0)
        if isinstance(early_stopping, EarlyStopping):
            callbacks.append(early_stopping)
        elif early_stopping is True:
            monitor = "val_loss" if self.validation is not None else "loss"
            # fit's patience is scikit-learn's n_iter_no_change: stop after more than
            # patience epochs without improvement; EarlyStopping counts as Keras
            callbacks.append(EarlyStopping(monitor, patience=patience + 1,
                                           min_delta=tol or 0.0))
        elif early_stopping is not False:
            raise TypeError(f"early_stopping must be True, False or an EarlyStopping, "
                            f"got {early_stopping!r}")
        elif tol is not None:
            # the textbook stopping rule: the training cost no longer decreases
            converged = EarlyStopping("loss", patience=patience + 1, min_delta=tol,
                                      restore_best=False)
            converged.stop_reason = "converged"
            callbacks.append(converged)
        if verbose not in (0, 1, 2) or isinstance(verbose, bool):
            raise ValueError(f"verbose must be 0, 1 or 2, got {verbose!r}")
        if verbose:
            callbacks.append(ProgressBar(epochs, per_epoch_line=verbose == 2))
        return [self.history, *callbacks]

    # ---------------------------------------------------------------- running
    def run(self, epochs):
        """Train for epochs more epochs; may be called again to continue. The History."""
        with self.network._fitting():
            return self._run(epochs)

    def _run(self, epochs):
        network, optimizer = self.network, self.optimizer
        network.history = self.history
        network.stop_training = False
        for callback in self.callbacks:
            callback.network, callback.optimizer = network, optimizer
        if self.schedule is not None and optimizer.initial_lr is None:
            optimizer.initial_lr = optimizer.lr
        end_logs = {"n_samples": self.data.n_samples}
        epoch = epoch_lr = None  # the epoch under way, for a Ctrl-C
        try:
            for callback in self.callbacks:
                callback.on_train_begin(end_logs)
            for _ in range(epochs):
                self._epoch_totals[:] = 0  # before epoch changes: see _count_interrupted
                epoch = network.epochs_trained
                epoch_lr = None
                if self.schedule is not None:
                    # a per-step schedule's rate for the epoch's first step, for the logs
                    t = epoch if self.schedule.per == "epoch" else optimizer.step_count
                    optimizer.lr = float(self.schedule(t, optimizer.initial_lr))
                    optimizer._bind_check(network)  # the rate, before the first step
                epoch_lr = optimizer.lr
                logs = {"lr": epoch_lr}
                for callback in self.callbacks:
                    callback.on_epoch_begin(epoch + 1, logs)  # users count from 1
                loss = self._train_one_epoch(epoch)
                if loss is None:  # diverged before any update of this epoch ("warn")
                    self.history.stop_reason = "diverged"
                    break
                # every update of the epoch is applied: it counts, even if Ctrl-C comes next
                network.epochs_trained += 1
                logs = {"loss": loss, **self._evaluate(), "lr": epoch_lr}
                for callback in self.callbacks:
                    callback.on_epoch_end(epoch + 1, logs)
                if network.stop_training:
                    reason = network.stop_training
                    self.history.stop_reason = reason if isinstance(reason, str) else "callback"
                    break
        except KeyboardInterrupt:
            self.history.stop_reason = "interrupted"
            if epoch_lr is not None:
                self._count_interrupted(epoch, epoch_lr)
            raise
        except DivergenceError:
            self.history.stop_reason = "diverged"
            raise
        finally:
            end_logs["stop_reason"] = self.history.stop_reason
            self._end_callbacks(end_logs)
        return self.history

    def _count_interrupted(self, epoch, lr):
        """Count and record an epoch whose every batch was applied when Ctrl-C came.

        A Ctrl-C during an epoch's last batch is raised only once the compiled epoch
        has returned, which loses its result (Engine.train_epoch keeps the sums in
        _epoch_totals), or anywhere later in the loop. Such an epoch is done: it
        counts in epochs_trained and gets a History record (its loss and rate; the
        keys not computed yet are NaN), unless its updates overflowed (then the
        network goes back to the epoch's start, as the end-of-epoch check does).
        """
        loss_sum, weight_sum, n_rows = self._epoch_totals
        if self.network.epochs_trained == epoch:  # not counted yet
            if n_rows != self.data.n_samples:
                return  # a partial epoch: its batches are counted in step_count only
            if not self._all_finite():
                self._restore_after_divergence()
                return
            self.network.epochs_trained += 1
        if self.history.epoch and self.history.epoch[-1] == epoch + 1:
            return  # recorded already
        record = dict.fromkeys(self._log_keys, math.nan)
        record.update(loss=self._epoch_loss(loss_sum, weight_sum), lr=lr)
        self.history.on_epoch_end(epoch + 1, record)

    def _end_callbacks(self, logs):
        """Every callback's on_train_end, even if one raises (files close, weights are
        restored); the first error is raised after, unless another one is in flight."""
        in_flight = sys.exc_info()[1]
        first_error = None
        for callback in self.callbacks:
            try:
                callback.on_train_end(logs)
            except Exception as error:
                first_error = first_error or error
        if first_error is not None and in_flight is None:
            raise first_error

    def _evaluate(self):
        """Metrics on the training data and loss and metrics on the validation data."""
        logs = {}
        if self.metrics:
            output = self.network.predict(self.data.X)
            for name, metric in self.metrics:
                logs[name] = metric(output, self.data)
        if self.validation is not None:
            validation = self.validation
            output = self.network.predict(validation.X)
            logs["val_loss"] = self.loss._config.evaluate(
                output, validation.dense, validation.labels, None, validation.weights)
            for name, metric in self.metrics:
                logs[f"val_{name}"] = metric(output, validation)
        return logs

    def _save_snapshot(self):
        """Keep the epoch's starting parameters and optimizer state for a divergence.

        Only finite ones: an update that overflowed at the end of the last epoch is
        only seen at the next loss, and must not replace the last finite snapshot.
        """
        parameters = self.network.parameters
        state = self.optimizer._config.state
        if not self._all_finite():
            return
        if self._snapshot is None:
            self._snapshot = [parameters.copy(), None if state is None else state.copy(), 0]
        else:
            np.copyto(self._snapshot[0], parameters)
            if state is not None:
                if self._snapshot[1] is None:
                    self._snapshot[1] = state.copy()
                else:
                    np.copyto(self._snapshot[1], state)
        self._snapshot[2] = self.optimizer._config.step_count

    def _all_finite(self):
        """Whether the parameters and the optimizer state are all finite."""
        state = self.optimizer._config.state
        return _core.first_nonfinite(self.network.parameters) < 0 and (
            state is None or _core.first_nonfinite(state.reshape(-1)) < 0)

    def _restore_after_divergence(self):
        """Keep the current parameters if finite (the diverging update was skipped), else
        go back to the last finite epoch start. Returns a description for the message."""
        config = self.optimizer._config
        if self._all_finite():
            return "the network keeps the parameters from before that update"
        if self._snapshot is None:
            return "the parameters are no longer finite (they were not at the start either)"
        parameters, state, step_count = self._snapshot
        self.network.parameters = parameters
        if state is not None and config.state is not None:
            config.state[...] = state
        config.step_count = step_count
        return ("the network was restored to its parameters at the start of the last epoch "
                "that began with finite ones")

    def _batch_lrs(self, n_batches):
        if self.schedule is None or self.schedule.per != "step":
            return None
        steps = self.optimizer._config.step_count + np.arange(n_batches)
        lrs = np.ascontiguousarray(self.schedule(steps, self.optimizer.initial_lr),
                                   dtype=np.float64)
        with np.errstate(over="ignore", under="ignore"):
            in_dtype = lrs.astype(self.network.dtype)
        # finite and >= 0, and so in the network's dtype, where 0 only if it is 0
        bad = ~(np.isfinite(in_dtype) & (lrs >= 0) & ((in_dtype == 0) == (lrs == 0)))
        if bad.any():
            raise ValueError(f"the schedule gave the learning rate {lrs[bad][0]}; it must be "
                             f"finite and >= 0 in the network's dtype "
                             f"{self.network.dtype.name}")
        return lrs

    def _train_one_epoch(self, epoch):
        data, engine, batch_size = self.data, self.engine, self.batch_size
        n_samples = data.n_samples
        n_batches = -(-n_samples // batch_size)
        order = self.network._rng.permutation(n_samples).astype(np.intp) \
            if self.shuffle else None
        lrs = self._batch_lrs(n_batches)
        self._save_snapshot()
        batch_callbacks = [c for c in self.callbacks if c.wants_batches or c.wants_progress]
        per_batch = any(c.wants_batches for c in self.callbacks)
        chunk = 1 if batch_callbacks else n_batches
        loss_sum = weight_sum = 0.0
        rows_done = 0
        batch = 0
        started = time.perf_counter()
        while batch < n_batches:
            end = min(n_batches, batch + chunk)
            rows = slice(batch * batch_size, min(n_samples, end * batch_size))
            if order is None:
                args = (data.X[rows], *(None if a is None else a[rows]
                                        for a in (data.dense, data.labels, data.weights)),
                        None)
            else:
                args = (data.X, data.dense, data.labels, data.weights, order[rows])
            part_loss, part_weight, part_rows, diverged = engine.train_epoch(
                *args, batch_size, self.loss._config, self.optimizer._config, *self.options,
                None if lrs is None else lrs[batch:end], totals=self._epoch_totals)
            loss_sum += part_loss
            weight_sum += part_weight
            rows_done += part_rows
            if diverged:
                self._diverged(f"the training loss became NaN or infinite at epoch {epoch + 1}, "
                               f"batch {batch + part_rows // batch_size}",
                               "the update was skipped and ")
                if weight_sum == 0 and rows_done == 0:
                    return None  # nothing of this epoch was applied: it does not count
                break
            batch = end
            if batch_callbacks:
                logs = {"loss": self._epoch_loss(loss_sum, weight_sum),
                        "samples": rows_done}
                for callback in batch_callbacks:
                    callback.on_batch_end(batch - 1, logs)
                if self.network.stop_training:
                    break
                if not per_batch:
                    # progress only: grow chunks to about _PROGRESS_INTERVAL seconds each
                    elapsed = time.perf_counter() - started
                    chunk = max(1, int(_PROGRESS_INTERVAL * batch / max(elapsed, 1e-9)))
        if not self._all_finite():
            # an update overflowed. Within an epoch the next batch's loss shows that; the
            # last update has no next loss, and a fit must not end with such parameters
            self._diverged(f"the parameters became NaN or infinite in epoch {epoch + 1}")
            return None  # undone (back to the epoch's start): it does not count
        if lrs is not None:
            self.optimizer.lr = float(self.schedule(self.optimizer._config.step_count,
                                                    self.optimizer.initial_lr))
        return self._epoch_loss(loss_sum, weight_sum)

    def _epoch_loss(self, loss_sum, weight_sum):
        """The epoch's loss from the compiled epoch's sums: the weighted mean of the batch
        losses, or for a "sum" reduction their total (the loss summed over the epoch)."""
        if self.loss._config.reduction == "sum":
            return loss_sum
        # an epoch whose samples all weigh 0 has loss 0 (as each of its batches)
        return loss_sum / weight_sum if weight_sum else 0.0

    def _diverged(self, what, skipped=""):
        where = self._restore_after_divergence()
        message = (f"{what} (lr {self.optimizer.lr:g}); {skipped}{where}. "
                   "Try a lower learning rate, clip_norm=, or scaled inputs.")
        if self.on_divergence == "raise":
            raise DivergenceError(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)
        self.network.stop_training = "diverged"


def finite_or_raise(value, what):
    """value if finite, else a DivergenceError (a train_step whose loss overflowed)."""
    if not math.isfinite(value):
        raise DivergenceError(f"the loss of this {what} is {value}; the update was skipped "
                              "and the parameters are unchanged. Try a lower learning rate, "
                              "clip_norm=, or scaled inputs.")
    return value
