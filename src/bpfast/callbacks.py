"""Callbacks for ``Network.fit``: the History, early stopping, checkpoints, logs, progress.

The protocol is small. ``fit`` gives each callback ``callback.network`` and
``callback.optimizer``, then calls

- ``on_train_begin(logs)``
- ``on_epoch_begin(epoch, logs)``
- ``on_batch_end(batch, logs)``: only if some callback sets ``wants_batches``
  (then the epoch runs one compiled call per batch instead of one per epoch)
- ``on_epoch_end(epoch, logs)``: logs holds "loss", "lr", and "val_loss" and
  metrics ("accuracy", "val_accuracy", ...) when asked for
- ``on_train_end(logs)``: always, also after an error or Ctrl-C (logs then has
  "stop_reason")

``epoch`` is the epoch's number as users see it everywhere (progress bars,
``History.epoch``, CSV logs, ``{epoch}`` in checkpoint names, error messages):
counted from 1, as Keras shows it, and across ``fit`` calls (the epoch that
ends has number ``network.epochs_trained``). (A schedule's ``epoch -> lr``
function gets the 0-based count of finished epochs, as Keras' and PyTorch's
schedulers do.) A callback
stops training by setting ``network.stop_training = True``. Per-epoch
callbacks cost one Python call per epoch: training itself stays compiled.
"""
import csv
import math
import os
import sys
import time

import numpy as np

from ._validation import check_bool, check_int, check_real

__all__ = ["Callback", "History", "EarlyStopping", "ReduceLROnPlateau", "ModelCheckpoint",
           "CSVLogger", "ProgressBar"]


class Callback:
    """Base class: every hook does nothing."""

    #: set True to receive on_batch_end after every batch (slower: one call per batch)
    wants_batches = False
    #: set True to receive on_batch_end now and then (a few times per second)
    wants_progress = False

    network = None
    optimizer = None

    def check_keys(self, keys):
        """Raise ValueError if this callback needs a log key that fit will not produce."""

    def on_train_begin(self, logs):
        pass

    def on_epoch_begin(self, epoch, logs):
        pass

    def on_batch_end(self, batch, logs):
        pass

    def on_epoch_end(self, epoch, logs):
        pass

    def on_train_end(self, logs):
        pass


class History(Callback):
    """What ``fit`` records: ``history[key]`` is the per-epoch list of each log value.

    Attributes
    ----------
    history : dict of str to list
        "loss" (mean training loss of the epoch), "lr" (the rate the epoch
        started with), and "val_loss" and metrics when asked for.
    epoch : list of int
        The epoch numbers, from 1 and counting across ``fit`` calls.
    stop_reason : str or None
        Why training ended before ``epochs``: "early_stopping", "converged",
        "callback", "diverged" or "interrupted" (Ctrl-C); None if it ran them all.
    """

    def __init__(self):
        self.history = {"loss": []}
        self.epoch = []
        self.stop_reason = None

    def on_epoch_end(self, epoch, logs):
        self.append(epoch, **logs)

    def append(self, epoch, **values):
        self.epoch.append(epoch)
        for key, value in values.items():
            self.history.setdefault(key, []).append(value)

    def plot(self, path=None, keys=None, ax=None):
        """Draw the loss curves (and any other keys) against the epoch with matplotlib.

        Parameters
        ----------
        path : str or path-like, optional
            Save the figure there (format from the extension) instead of showing it.
        keys : list of str, optional
            Which records to draw; default every loss ("loss", "val_loss").
        ax : matplotlib Axes, optional
            Draw into it instead of a new figure (then nothing is shown).

        Returns
        -------
        The matplotlib Axes.
        """
        try:
            from matplotlib.figure import Figure
            from matplotlib.ticker import MaxNLocator
        except ImportError as error:
            raise ImportError("History.plot needs matplotlib: pip install "
                              "'bpfast[plot]'") from error
        keys = [key for key in self.history if key.endswith("loss")] if keys is None else keys
        unknown = [key for key in keys if key not in self.history]
        if unknown:
            raise ValueError(f"no record {unknown[0]!r}; recorded: {sorted(self.history)}")
        show = ax is None and path is None
        if ax is None:
            if path is not None:
                # a figure of its own: no pyplot, so no global backend or state changes
                ax = Figure(figsize=(6, 4)).add_subplot()
            else:
                import matplotlib.pyplot as plt
                ax = plt.figure(figsize=(6, 4)).add_subplot()
        for key in keys:
            ax.plot(self.epoch, self.history[key], label=key)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel("loss" if all(key.endswith("loss") for key in keys) else "value")
        ax.legend()
        if path is not None:
            ax.figure.savefig(os.fspath(path), dpi=100, bbox_inches="tight")
        elif show:
            plt.show()
        return ax

    def __repr__(self):
        return f"History(epochs={len(self.epoch)}, keys={list(self.history)})"


class _Monitor(Callback):
    """Shared by callbacks that watch one log value for improvement."""

    def __init__(self, monitor, mode, min_delta):
        if not isinstance(monitor, str):
            raise TypeError(f"monitor must be a log name such as 'val_loss', got {monitor!r}")
        if mode not in ("auto", "min", "max"):
            raise ValueError(f"mode must be 'auto', 'min' or 'max', got {mode!r}")
        self.monitor = monitor
        self.mode = mode
        self.min_delta = check_real("min_delta", min_delta, minimum=0)
        self.best = None

    @property
    def _sign(self):
        # losses are minimised; anything else (accuracy, R^2, ...) maximised in "auto"
        if self.mode == "auto":
            return 1.0 if self.monitor.endswith("loss") else -1.0
        return 1.0 if self.mode == "min" else -1.0

    def check_keys(self, keys):
        if self.monitor not in keys:
            hint = " (pass validation_data or validation_split)" if \
                self.monitor.startswith("val_") else ""
            raise ValueError(f"{type(self).__name__} monitors {self.monitor!r}, which fit "
                             f"will not record{hint}; it records {sorted(keys)}")

    def _improved(self, logs):
        """Whether logs[monitor] beats the best by more than min_delta (and keep it)."""
        value = self._sign * logs[self.monitor]
        if math.isnan(value):
            return False
        if self.best is None or value < self.best - self.min_delta:
            self.best = value
            return True
        return False

    @property
    def best_value(self):
        """The best monitored value seen, in its own sign."""
        return None if self.best is None else self._sign * self.best


class EarlyStopping(_Monitor):
    """Stop when a monitored value stops improving; optionally put back the best weights.

    Parameters
    ----------
    monitor : str
        A log name: "val_loss" (default), "loss", "val_accuracy", ...
    patience : int
        Training stops after ``patience`` epochs in a row without improvement
        (Keras' count: with patience=2, best at epoch 3, training stops after
        epoch 5). ``fit(early_stopping=True, patience=...)`` and ``tol`` count as
        scikit-learn's ``n_iter_no_change`` instead: more than ``patience``.
    min_delta : float
        The smallest change that counts as an improvement.
    mode : {"auto", "min", "max"}
        "auto" minimises names ending in "loss" and maximises the rest.
    restore_best : bool
        At the end of training, set the network's parameters (and buffers: running
        statistics) to those of the best epoch (copied when it happened).
    restore_best_weights : bool, optional
        Keras' name for ``restore_best`` (give one or the other).

    Attributes
    ----------
    best_epoch : int or None
        The number (from 1) of the best epoch.
    stopped_epoch : int or None
        The epoch after which training stopped, or None.
    """

    def __init__(self, monitor="val_loss", *, patience=10, min_delta=0.0, mode="auto",
                 restore_best=True, restore_best_weights=None):
        super().__init__(monitor, mode, min_delta)
        self.patience = check_int("patience", patience, minimum=0)
        self.restore_best = check_bool("restore_best", restore_best)
        if restore_best_weights is not None:
            restore_best_weights = check_bool("restore_best_weights", restore_best_weights)
            if restore_best is not True and restore_best != restore_best_weights:
                raise ValueError("give restore_best or restore_best_weights (Keras' name), "
                                 "not both")
            self.restore_best = restore_best_weights
        self.stop_reason = "early_stopping"

    def on_train_begin(self, logs):
        self.best = None
        self.best_epoch = None
        self.stopped_epoch = None
        self._wait = 0
        self._best_parameters = None

    def on_epoch_end(self, epoch, logs):
        if self._improved(logs):
            self.best_epoch = epoch
            self._wait = 0
            if self.restore_best:
                if self._best_parameters is None:
                    self._best_parameters = self.network.parameters.copy()
                    self._best_buffers = self.network.buffers.copy()
                else:
                    np.copyto(self._best_parameters, self.network.parameters)
                    np.copyto(self._best_buffers, self.network.buffers)
            return
        self._wait += 1
        if self._wait >= self.patience:
            self.stopped_epoch = epoch
            self.network.stop_training = self.stop_reason

    def on_train_end(self, logs):
        if self.restore_best and self._best_parameters is not None:
            self.network.parameters = self._best_parameters
            self.network.buffers = self._best_buffers  # BatchNorm1d's running statistics


class ReduceLROnPlateau(_Monitor):
    """Multiply the learning rate by ``factor`` when a monitored value stops improving.

    Follows PyTorch's ReduceLROnPlateau (threshold as an absolute ``min_delta``).

    Parameters
    ----------
    monitor : str
    factor : float in (0, 1)
    patience : int
        Epochs without improvement before reducing.
    min_delta : float
    cooldown : int
        Epochs to wait after a reduction before counting again.
    min_lr : float
    mode : {"auto", "min", "max"}
    """

    def __init__(self, monitor="val_loss", *, factor=0.1, patience=10, min_delta=1e-4,
                 cooldown=0, min_lr=0.0, mode="auto"):
        super().__init__(monitor, mode, min_delta)
        self.factor = check_real("factor", factor, minimum=0, maximum=1, min_inclusive=False,
                                 max_inclusive=False)
        self.patience = check_int("patience", patience, minimum=0)
        self.cooldown = check_int("cooldown", cooldown, minimum=0)
        self.min_lr = check_real("min_lr", min_lr, minimum=0)

    def on_train_begin(self, logs):
        self.best = None
        self._wait = 0
        self._cooldown_left = 0

    def on_epoch_end(self, epoch, logs):
        # PyTorch's order: count the epoch, then let a running cooldown clear the count
        self._wait = 0 if self._improved(logs) else self._wait + 1
        if self._cooldown_left > 0:
            self._cooldown_left -= 1
            self._wait = 0
        if self._wait > self.patience:
            self.optimizer.lr = max(self.optimizer.lr * self.factor, self.min_lr)
            self._cooldown_left = self.cooldown
            self._wait = 0


class ModelCheckpoint(_Monitor):
    """Save the network (``Network.save``) when the monitored value improves, or every epoch.

    Parameters
    ----------
    path : str or path-like
        May contain ``{epoch}`` (the epoch's number, from 1) and any log name, e.g.
        ``"model-{epoch:03d}.npz"``. Its folder must exist (checked here).
    monitor : str
    save_best_only : bool
        Only save when the monitored value improves (the default); else every epoch.
    save_optimizer : bool
        Save the optimizer state too, so that training can resume exactly.
    mode : {"auto", "min", "max"}
    """

    def __init__(self, path, monitor="val_loss", *, save_best_only=True,
                 save_optimizer=False, mode="auto"):
        super().__init__(monitor, mode, 0.0)
        self.path = os.fspath(path)
        # a missing or read-only folder fails now, naming the user's path, not after the
        # first epoch with the name of a temporary file
        folder = os.path.dirname(self.path)
        if folder and "{" not in folder:
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"ModelCheckpoint({self.path!r}): the folder "
                                        f"{folder!r} does not exist")
            if not os.access(folder, os.W_OK):
                raise PermissionError(f"ModelCheckpoint({self.path!r}): the folder "
                                      f"{folder!r} is not writable")
        self.save_best_only = check_bool("save_best_only", save_best_only)
        self.save_optimizer = check_bool("save_optimizer", save_optimizer)

    def check_keys(self, keys):
        if self.save_best_only:
            super().check_keys(keys)

    def on_train_begin(self, logs):
        self.best = None

    def on_epoch_end(self, epoch, logs):
        if self.save_best_only and not self._improved(logs):
            return
        path = self.path.format(epoch=epoch, **logs)
        self.network.save(path, optimizer=self.optimizer if self.save_optimizer else None)


class CSVLogger(Callback):
    """Write one CSV row per epoch: the epoch and every log value.

    Parameters
    ----------
    path : str or path-like
    append : bool
        Add to an existing file (no second header) instead of replacing it.
    """

    def __init__(self, path, *, append=False):
        self.path = os.fspath(path)
        self.append = check_bool("append", append)
        self._file = None

    def on_train_begin(self, logs):
        exists = self.append and os.path.exists(self.path) and os.path.getsize(self.path) > 0
        self._file = open(self.path, "a" if self.append else "w", newline="")
        self._writer = None
        self._header_written = exists

    def on_epoch_end(self, epoch, logs):
        if self._writer is None:
            self._writer = csv.DictWriter(self._file, fieldnames=["epoch", *logs])
            if not self._header_written:
                self._writer.writeheader()
        self._writer.writerow({"epoch": epoch, **logs})
        self._file.flush()

    def on_train_end(self, logs):
        if self._file is not None:
            self._file.close()
            self._file = None


class ProgressBar(Callback):
    """A progress bar per epoch with loss, validation loss and samples per second.

    Uses tqdm when it is installed, else one line redrawn in place. ``fit(verbose=1)``
    adds one; ``verbose=2`` prints one line per epoch instead of a bar. Writes to
    ``file``, by default ``sys.stderr`` (tqdm's default), and labels each epoch
    with its number as in ``History.epoch`` ("epoch 6/8": epoch 6 of a fit that
    ends with epoch 8).
    """

    wants_progress = True

    def __init__(self, epochs, *, per_epoch_line=False, file=None):
        self.epochs = check_int("epochs", epochs, minimum=0)
        self.per_epoch_line = check_bool("per_epoch_line", per_epoch_line)
        self.wants_progress = not per_epoch_line
        self.file = file
        self._bar = None

    @property
    def _out(self):
        # stderr by default, as tqdm: verbose output piped to a file keeps stdout clean
        return self.file if self.file is not None else sys.stderr

    def on_train_begin(self, logs):
        self.n_samples = logs["n_samples"]
        self._first_epoch = None
        self._line_length = 0
        # a bar redrawn in place only makes sense on a terminal (or with tqdm)
        if not self.per_epoch_line:
            isatty = getattr(self._out, "isatty", None)
            self.wants_progress = self._has_tqdm() or bool(isatty and isatty())

    @staticmethod
    def _has_tqdm():
        try:
            import tqdm  # noqa: F401
        except ImportError:
            return False
        return True

    def on_epoch_begin(self, epoch, logs):
        if self._first_epoch is None:
            self._first_epoch = epoch
        # the epoch's own number (as in History and logs) of this fit's last one
        self._label = f"epoch {epoch}/{self._first_epoch + self.epochs - 1}"
        self._start = time.perf_counter()
        self._bar = None
        if not self.wants_progress:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:
            return
        self._bar = tqdm(total=self.n_samples, desc=self._label, unit="sample",
                         file=self._out, leave=True, dynamic_ncols=True)

    def _speed(self, samples):
        elapsed = time.perf_counter() - self._start
        return samples / elapsed if elapsed > 0 else float("inf")

    def on_batch_end(self, batch, logs):
        samples = logs["samples"]
        if self._bar is not None:
            self._bar.update(samples - self._bar.n)
            self._bar.set_postfix(loss=f"{logs['loss']:.4g}", refresh=False)
            return
        width = 30
        done = int(width * samples / max(1, self.n_samples))
        self._redraw(f"{self._label} [{'#' * done}{'.' * (width - done)}] "
                     f"loss {logs['loss']:.4g}  {self._speed(samples):,.0f} samples/s")

    def _redraw(self, line, end=""):
        padding = " " * max(0, self._line_length - len(line))
        self._out.write(f"\r{line}{padding}{end}")
        self._line_length = 0 if end else len(line)
        self._out.flush()

    def on_epoch_end(self, epoch, logs):
        speed = self._speed(self.n_samples)
        values = "  ".join(f"{key} {value:.4g}" for key, value in logs.items() if key != "lr")
        if self._bar is not None:
            self._bar.set_postfix_str(values)  # tqdm shows the speed itself
            self._bar.close()
            self._bar = None
            return
        self._redraw(f"{self._label}  {values}  {speed:,.0f} samples/s", end="\n")

    def on_train_end(self, logs):
        if self._bar is not None:
            self._bar.close()
            self._bar = None
