"""The ``bpfast`` command line: train on a data file, predict, show the build, run a demo.

Run ``bpfast --help`` (or ``python -m bpfast --help``) for the usage; plain
``python -m bpfast`` runs the demo.
"""
import argparse
import contextlib
import csv
import math
import os
import sys
import time
import zipfile
from importlib import resources

import numpy as np

from . import __version__
from ._threads import set_num_threads, show_config
from ._training import DivergenceError
from .callbacks import EarlyStopping
from .io import load, read_header, save
from .layers import ACTIVATIONS, Dense
from .losses import MSE, CrossEntropy
from .network import Network
from .optimizers import OPTIMIZER_NAMES, get_optimizer

__all__ = ["main"]

# A target is taken for class labels when it holds strings, or whole numbers with
# at most this many distinct values; otherwise it is a regression target.
MAX_AUTO_CLASSES = 20

_HIDDEN_ACTIVATIONS = tuple(name for name in ACTIVATIONS if name != "softmax")


class CommandError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


# --------------------------------------------------------------------------- data files
#: CSV cells that mean "no value" (compared after stripping, ignoring case).
MISSING_MARKERS = frozenset({"", "na", "n/a", "nan", "null", "none", "?"})

#: The delimiters that a CSV file's first lines are tried with, when none is given.
CSV_DELIMITERS = (",", "\t", ";", "|")


class Dataset:
    """Features X (n, d) as float64, an optional target y, and the names of both.

    ``named``: the feature names come from the file (a CSV header row), not made up.
    X holds NaN for the missing values that the reader was asked to let through.
    """

    def __init__(self, X, y, feature_names, target_name, target_index, named=False):
        self.X, self.y = X, y
        self.feature_names, self.target_name = feature_names, target_name
        self.target_index = target_index
        self.named = named


def check_file(path):
    """Refuse a path that is not a regular file, in the style of every file error here."""
    if os.path.isfile(path):
        return
    if os.path.isdir(path):
        raise CommandError(f"{path}: is a directory, not a file")
    raise CommandError(f"{path}: " + ("not a regular file" if os.path.exists(path)
                                      else "no such file"))


def read_data(path, target=None, *, need_target=True, header=None, delimiter=None,
              allow_missing=False, target_index=None, n_features=None):
    """Read a CSV, .npz (arrays X and y) or .npy (2-D) file.

    ``target`` names the CSV target column (by name or index) or the .npy column
    (index; default the last). Without ``need_target`` the file may lack the
    target, ``target`` may be None, and a named target column that a CSV has is
    dropped; every other column is a feature. ``header`` (None: detect) and
    ``delimiter`` (None: detect) are for CSV files (see TRAIN_HELP); with
    ``allow_missing`` missing feature values are NaN in X instead of an error.
    Without ``need_target``, a CSV file with ``n_features`` + 1 columns that does not
    name the target column drops column ``target_index`` (the model's target).
    """
    check_file(path)
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npz":
        return _read_npz(path, need_target, allow_missing)
    if suffix == ".npy":
        return _read_npy(path, target, need_target, allow_missing)
    return _read_csv(path, target, need_target, header, delimiter, allow_missing,
                     target_index, n_features)


def _read_npz(path, need_target, allow_missing):
    try:
        with np.load(path, allow_pickle=False) as archive:
            if "X" not in archive:
                raise CommandError(f"{path}: an .npz data file needs an array 'X' "
                                   f"(and 'y' to train); it has {', '.join(archive.files)}")
            X = archive["X"]
            y = archive["y"] if "y" in archive else None
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as error:
        raise CommandError(f"{path}: cannot read: {error}") from None
    if need_target and y is None:
        raise CommandError(f"{path}: an .npz file to train on needs an array 'y'")
    X = _numeric_2d(path, X, "X", allow_missing)
    names = [f"x{i}" for i in range(X.shape[1])]
    return Dataset(X, y, names, "y", None)


def _read_npy(path, target, need_target, allow_missing):
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise CommandError(f"{path}: cannot read: {error}") from None
    data = _numeric_2d(path, data, "the array", allow_missing)
    if not need_target:
        return Dataset(data, None, [f"x{i}" for i in range(data.shape[1])], None, None)
    index = _column_index(path, "-1" if target is None else target, data.shape[1], None)
    if data.shape[1] < 2:
        raise CommandError(f"{path}: needs at least one feature column besides the target")
    X = np.delete(data, index, axis=1)
    names = [f"x{i}" for i in range(data.shape[1]) if i != index]
    return Dataset(X, data[:, index], names, f"column {index}", index)


def _numeric_2d(path, array, what, allow_missing=False):
    if array.dtype.kind not in "biuf":
        raise CommandError(f"{path}: {what} must hold numbers, got dtype {array.dtype}")
    if array.ndim == 1:
        array = array.reshape(-1, 1)
    if array.ndim != 2 or array.shape[0] == 0:
        raise CommandError(f"{path}: {what} must be a non-empty 2-D table, got shape "
                           f"{array.shape}")
    array = array.astype(np.float64)
    bad = np.isinf(array) if allow_missing else ~np.isfinite(array)
    if bad.any():
        row, column = np.argwhere(bad)[0]
        raise CommandError(f"{path}: {what} has a missing or infinite value at row {row}, "
                           f"column {column}" + ("" if allow_missing else
                                                 " (--impute mean fills missing values)"))
    return array


def _column_index(path, target, n_columns, header):
    """The index of the target column, given by name (CSV header) or integer index."""
    if header is not None and target in header:
        return header.index(target)
    try:
        index = int(target)
    except ValueError:
        known = (f"; columns: {', '.join(header)}" if header is not None else
                 "; it has no header row, so give the column's index (0 is the first)")
        raise CommandError(f"{path}: no column {target!r}{known}") from None
    if not -n_columns <= index < n_columns:
        raise CommandError(f"{path}: column index {index} is out of range for {n_columns} "
                           "columns")
    return index % n_columns


def _is_missing(cell):
    return cell.strip().lower() in MISSING_MARKERS


def _is_number(cell):
    try:
        return not math.isnan(float(cell))
    except ValueError:
        return False


def _parse_numbers(cells):
    """cells as float64 (NaN where missing), or (None, the index of the first text cell)."""
    try:
        return np.array(cells, dtype=np.float64), None  # the common case, in one call
    except ValueError:
        pass
    values = np.empty(len(cells))
    for i, cell in enumerate(cells):
        try:
            values[i] = float(cell)
        except ValueError:
            if not _is_missing(cell):
                return None, i
            values[i] = math.nan
    return values, None


def _split_lines(path, delimiter):
    """The non-blank rows of the CSV file, as (line number, cells) pairs."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:
            if delimiter is None:
                delimiter = _detect_delimiter(file.read(65536))
                file.seek(0)
            reader = csv.reader(file, delimiter=delimiter)
            # only blank lines are skipped: "," is a row of missing values
            return [(reader.line_num, row) for row in reader
                    if len(row) > 1 or (row and row[0].strip())]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise CommandError(f"{path}: cannot read as CSV: {error}") from None


def _detect_delimiter(sample):
    """The first of CSV_DELIMITERS that splits the sample's first lines into the most
    fields, the same number (more than one) on each line; "," when none does."""
    lines = [line for line in sample.splitlines() if line.strip()][:5]
    if len(lines) > 1 and not sample.endswith(("\n", "\r")) and len(sample) == 65536:
        lines = lines[:-1]  # the last line may be cut off
    best, most = ",", 1
    for delimiter in CSV_DELIMITERS:
        counts = {len(row) for row in csv.reader(lines, delimiter=delimiter)}
        if len(counts) == 1 and (fields := counts.pop()) > most:
            best, most = delimiter, fields
    return best


def _first_row_is_header(rows):
    """The header rule (TRAIN_HELP): the first row is a header when one of its cells is
    text above a column of numbers; else data when one of its cells is a number."""
    first, body = rows[0], rows[1:]
    has_number = False
    for column, cell in enumerate(first):
        if _is_number(cell):
            has_number = True
            continue
        if _is_missing(cell):
            continue
        below, text_at = _parse_numbers([row[column] for row in body if column < len(row)])
        if text_at is None and below is not None and not np.isnan(below).all():
            return True
    return not has_number


def _read_csv(path, target, need_target, header, delimiter, allow_missing, target_index,
              n_features):
    lines = _split_lines(path, delimiter)
    if not lines:
        raise CommandError(f"{path}: no data rows")
    rows = [row for _, row in lines]
    no_header_given = header is False
    if header is None:
        header = _first_row_is_header(rows)
    if header:
        names = [cell.strip() for cell in rows[0]]
        lines = lines[1:]
        if not lines:
            raise CommandError(f"{path}: a header row and no data rows (--no-header reads "
                               "the first row as data)")
        expected = "the header has"
    else:
        names = [f"column {i}" for i in range(len(rows[0]))]
        expected = "the first row has"
    for number, row in lines:
        if len(row) != len(names):
            raise CommandError(f"{path}: line {number} has {len(row)} fields, {expected} "
                               f"{len(names)}" + (" (is --delimiter right?)"
                                                  if delimiter is None else ""))
    index = None
    if target is not None and not header and need_target and not target.lstrip("-").isdigit():
        raise CommandError(f"{path}: no column {target!r}: the file has no header row (its "
                           "first row looks like data), so give --target as a column index "
                           "(0 is the first), or --header if the first row is the header")
    if target is not None and need_target:
        index = _column_index(path, target, len(names), names if header else None)
    elif need_target:
        raise CommandError("which column is the target? give --target NAME_OR_INDEX")
    elif target is not None and target in names:
        index = names.index(target)  # the target column, which predict does not use
    elif n_features is not None and len(names) == n_features + 1 and target_index is not None \
            and 0 <= target_index < len(names):
        index = target_index  # the model's target column, in a file that does not name it

    def describe(column):
        return f"column {names[column]!r}" if header else names[column]
    columns = [i for i in range(len(names)) if i != index]
    if not columns:
        raise CommandError(f"{path}: needs at least one feature column besides the target")
    X = np.empty((len(lines), len(columns)))
    for j, column in enumerate(columns):
        X[:, j] = _feature_column(path, lines, column, describe(column), allow_missing,
                                  no_header_given)
    y = None if index is None else _target_column(path, lines, index, describe(index))
    return Dataset(X, y, [names[i] for i in columns], names[index] if index is not None
                   else None, index, named=bool(header))


def _feature_column(path, lines, column, column_name, allow_missing, no_header_given):
    """One feature column as numbers, or a one-line error naming the column
    (column_name: "column 'price'", or "column 3" in a file without a header row)."""
    values, text_at = _parse_numbers([row[column] for _, row in lines])
    if values is None:
        cell = lines[text_at][1][column]
        if not any(_is_number(row[column]) for _, row in lines):
            raise CommandError(
                f"{path}: {column_name} holds text ({cell!r} on line {lines[text_at][0]}); "
                "features must be numbers: encode the column as numbers (one-hot for "
                "categories) or remove it, or name it with --target if it is the target")
        hint = " (is the first row a header? then drop --no-header)" \
            if no_header_given and text_at == 0 else ""
        raise CommandError(f"{path}: line {lines[text_at][0]}, {column_name}: {cell!r} is "
                           f"not a number (features must be numbers){hint}")
    if np.isinf(values).any():
        line = lines[int(np.argmax(np.isinf(values)))][0]
        raise CommandError(f"{path}: line {line}, {column_name}: an infinite value")
    missing = np.isnan(values)
    if missing.any() and not allow_missing:
        line = lines[int(np.argmax(missing))][0]
        raise CommandError(f"{path}: {column_name} has {int(missing.sum())} missing "
                           f"value(s), the first on line {line}; fill them in, remove those "
                           "rows, or pass --impute mean")
    return values


def _target_column(path, lines, column, column_name):
    """The target: numbers, else text labels; a missing value is an error, naming its line."""
    cells = [row[column].strip() for _, row in lines]
    values, _ = _parse_numbers(cells)
    if values is not None:
        bad = ~np.isfinite(values)
    else:  # text labels: only an empty cell is missing ("NA" may be a class)
        values = np.array(cells)
        bad = values == ""
    if bad.any():
        line = lines[int(np.argmax(bad))][0]
        raise CommandError(f"{path}: the target {column_name} has {int(bad.sum())} "
                           f"missing or infinite value(s), the first on line {line}; remove "
                           "those rows")
    return values


# --------------------------------------------------------------------------- the task
def infer_task(y, task):
    """"classification" or "regression" for target y (task "auto" decides, see --help)."""
    if task != "auto":
        if task == "regression" and y.dtype.kind not in "biuf":
            raise CommandError("the target holds text, so it cannot be a regression target")
        if task == "classification" and y.ndim != 1:
            raise CommandError("a classification target must be one column of labels")
        return task
    if y.ndim != 1:
        return "regression"
    if y.dtype.kind not in "biuf":
        return "classification"
    values = np.unique(y)
    if len(values) <= MAX_AUTO_CLASSES and np.array_equal(values, np.round(values)):
        return "classification"
    return "regression"


def _json_value(value):
    """A class label as a JSON value: an int, a float or a str."""
    if isinstance(value, (np.integer, int)):
        return int(value)
    if isinstance(value, (np.floating, float)):
        return int(value) if float(value).is_integer() else float(value)
    return str(value)


def accuracy(predicted, labels):
    return float(np.mean(predicted == labels))


def r2_score(predicted, target):
    """The coefficient of determination, averaged over outputs (1 is perfect)."""
    predicted, target = predicted.reshape(len(predicted), -1), target.reshape(len(target), -1)
    residual = ((target - predicted) ** 2).sum(axis=0)
    total = ((target - target.mean(axis=0)) ** 2).sum(axis=0)
    scores = np.where(total > 0, 1 - residual / np.where(total > 0, total, 1), 0.0)
    return float(scores.mean())


def split_indices(n_samples, fraction, seed):
    """(train, validation) index arrays; validation holds round(fraction * n) samples."""
    order = np.random.default_rng(seed).permutation(n_samples)
    n_validation = int(round(fraction * n_samples))
    if fraction > 0 and n_validation == 0:
        n_validation = 1
    if n_validation >= n_samples:
        raise CommandError(f"--validation-split {fraction} leaves no training samples "
                           f"out of {n_samples}")
    return order[n_validation:], order[:n_validation]


# --------------------------------------------------------------------------- training
def train_loop(network, X, y, loss, optimizer, *, epochs, batch_size, evaluate, quiet,
               clip_norm=None, after_epoch=None, comm=None):
    """Train one epoch at a time, printing a progress line per epoch; the samples/s.

    ``evaluate()`` returns a dict of held-out scores ({} for none), shown after the
    loss. ``after_epoch(epoch, scores)``, optional, sees every epoch's scores and
    returns True to stop. Epochs are numbered from 1 over the network's whole
    training (a resumed network continues its count), as fit's callbacks number them.
    One ``fit(validation_data=..., metrics=..., verbose=2)`` call could replace this
    loop, but its metrics also score the whole training set every epoch, inside the
    time that its speed reports; here only the training is timed. The data are
    checked once (``fit``'s trainer), then each epoch is one compiled call. With
    ``comm`` (``--distributed``), X and y are this rank's shard, and the speed is the
    job's.
    """
    n_samples = X.shape[0]
    steps_per_epoch = math.ceil(n_samples / batch_size)
    if comm is not None:  # every rank runs the steps of the largest shard
        steps_per_epoch = math.ceil(comm.allreduce(n_samples, op=_mpi().MAX) / batch_size)
        n_samples = comm.allreduce(n_samples)
    elapsed = 0.0
    last = network.epochs_trained + epochs
    width = len(str(last))
    trainer = network.trainer(X, y, loss=loss, optimizer=optimizer, batch_size=batch_size,
                              shuffle=True, clip_norm=clip_norm, comm=comm)
    epochs_run = 0
    for _ in range(epochs):
        start = time.perf_counter()
        history = trainer.run(1)
        elapsed += time.perf_counter() - start
        epochs_run += 1
        if quiet and after_epoch is None:
            continue
        epoch = network.epochs_trained
        scores = evaluate()
        if not quiet:
            line = f"epoch {epoch:>{width}}/{last}  loss {history.history['loss'][-1]:.4f}"
            print(line + "".join(f"  {name} {value:.4f}" for name, value in scores.items()),
                  flush=True)
        if after_epoch is not None and after_epoch(epoch, scores):
            break
    samples_per_second = (n_samples * epochs_run / elapsed if elapsed > 0
                          else float("inf"))
    return samples_per_second, samples_per_second / n_samples * steps_per_epoch


def build_network(n_inputs, hidden, n_outputs, activation, dtype, seed):
    sizes = [n_inputs, *hidden]
    layers = [Dense(a, b, activation=activation)
              for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    layers.append(Dense(sizes[-1], n_outputs))
    return Network(layers, dtype=dtype, seed=seed)


def _parse_hidden(text):
    if text.strip().lower() in ("", "none", "0"):
        return []
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--hidden takes layer sizes separated by commas, like 64,32; got {text!r}") from None
    if any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(f"--hidden sizes must be positive, got {text!r}")
    return sizes


#: train's defaults, for the options that --resume takes from the model instead.
TRAIN_DEFAULTS = {"hidden": [64], "activation": "relu", "optimizer": "adam", "lr": 1e-3,
                  "dtype": "float32", "seed": 0, "validation_split": 0.1}

#: --lr outside this range gets a warning (not an error: it may be meant).
USUAL_LEARNING_RATES = (1e-7, 1.0)


def warn(args, message):
    """One warning line on standard error, in the style of the error lines."""
    print(f"bpfast {args.command}: warning: {' '.join(message.split())}", file=sys.stderr)


def load_model(path, *, with_optimizer=False):
    """(header, network, optimizer or None) of a model file; a bad file is one line."""
    check_file(path)
    try:
        header = read_header(path)
        if with_optimizer:
            network, optimizer = load(path, with_optimizer=True)
        else:
            network, optimizer = load(path), None
    except (ValueError, OSError) as error:
        raise CommandError(str(error)) from None
    return header, network, optimizer


class Resumed:
    """A `bpfast train` model that --resume continues: network, optimizer, metadata."""

    def __init__(self, args):
        header, self.network, self.optimizer = load_model(args.resume, with_optimizer=True)
        self.metadata = _model_metadata(args.resume, header["metadata"], self.network)
        task = self.metadata.get("task")
        if task is None or "x_mean" not in self.metadata:
            raise CommandError(f"{args.resume}: --resume continues a model saved by `bpfast "
                               "train`; this one has no task and feature scaling in its "
                               "metadata")
        fixed = [f"--{name}" for name in ("hidden", "activation", "dtype")
                 if getattr(args, name) is not None]
        if fixed:
            raise CommandError(f"--resume continues the saved network as it is; "
                               f"{', '.join(fixed)} cannot change it")
        if args.task not in ("auto", task):
            raise CommandError(f"{args.resume} is a {task} model; --task {args.task} "
                               "cannot change that")
        self.task = task

    def default_target(self):
        """The model's target column: by name where the training file named it."""
        if self.metadata.get("features") or self.metadata.get("target_index") is None:
            return self.metadata.get("target")
        return str(self.metadata["target_index"])

    def labels(self, path, y):
        """The class indices of labels y, in the model's classes."""
        classes = self.metadata["classes"]
        index = {value: i for i, value in enumerate(classes)}
        values, inverse = np.unique(y, return_inverse=True)
        unknown = [_json_value(value) for value in values if _json_value(value) not in index]
        if unknown:
            raise CommandError(f"{path}: the target has labels the model does not know: "
                               f"{_brief(unknown)}; its classes are {_brief(classes)}")
        codes = np.array([index[_json_value(value)] for value in values], dtype=np.intp)
        return codes[inverse.reshape(-1)]


def check_learning_rate(args, lr):
    """Warn about a learning rate outside USUAL_LEARNING_RATES (argparse refuses <= 0)."""
    low, high = USUAL_LEARNING_RATES
    if lr > high:
        warn(args, f"--lr {lr:g} is unusually large (most training uses 1e-5 to 0.1); "
                   "training may diverge")
    elif lr < low:
        warn(args, f"--lr {lr:g} is unusually small (most training uses 1e-5 to 0.1); "
                   "the weights will barely change")


def divergence_message(args, epoch, lr, saved_best):
    """What to say when training diverged, with the options that can help."""
    advice = f"try a smaller --lr (now {lr:g}; say {lr / 10:g})"
    advice += (" or --clip-norm 1.0" if args.clip_norm is None
               else f" or a smaller --clip-norm (now {args.clip_norm:g})")
    message = (f"training diverged in epoch {epoch}: the loss, the weights or the outputs "
               f"became NaN or infinite; {advice}")
    if saved_best is not None:
        message += f"; {args.out} holds the best model so far (epoch {saved_best})"
    return message


def _standardise(path, data, train, resumed):
    """(X standardised, x_mean, x_scale): the training part's statistics, or the
    resumed model's; missing values (NaN, with --impute mean) become the mean, 0."""
    if resumed is not None:
        x_mean = np.asarray(resumed.metadata["x_mean"], dtype=np.float64)
        x_scale = np.asarray(resumed.metadata["x_scale"], dtype=np.float64)
    else:
        X_train = data.X[train]
        empty = np.isnan(X_train).all(axis=0)
        if empty.any():
            raise CommandError(f"{path}: column {data.feature_names[np.argmax(empty)]!r} has "
                               "no values in the training part, so --impute mean has no mean")
        x_mean = np.nanmean(X_train, axis=0)
        x_scale = np.nanstd(X_train, axis=0)
        x_scale[x_scale == 0] = 1.0
    X = (data.X - x_mean) / x_scale
    X[np.isnan(X)] = 0.0
    return X, x_mean, x_scale


def _train_options(args, resumed):
    """The TRAIN_DEFAULTS options as given, else as the resumed model's first run had
    them (its seed and validation split: the same validation samples), else the default."""
    options = {name: getattr(args, name) for name in TRAIN_DEFAULTS}
    for name, value in TRAIN_DEFAULTS.items():
        if options[name] is None:
            kept = resumed.metadata.get(name) if resumed and name in (
                "seed", "validation_split") else None
            options[name] = value if kept is None else kept
    return options


def _training_target(args, data, task, train, resumed, metadata):
    """(target, n_outputs, loss) for the network; the classes or the target's scaling go
    into metadata (a resumed model's are kept)."""
    if task == "classification":
        if resumed:
            labels = resumed.labels(args.data, data.y)
            n_outputs = len(metadata["classes"])
        else:
            classes, labels = np.unique(data.y, return_inverse=True)
            if len(classes) < 2:
                raise CommandError("the target has a single class; nothing to learn")
            metadata["classes"] = [_json_value(value) for value in classes]
            n_outputs = len(classes)
        return labels.astype(np.intp).reshape(-1), n_outputs, CrossEntropy()
    y = data.y.astype(np.float64).reshape(len(data.y), -1)
    if resumed:
        y_mean, y_scale = (np.asarray(metadata[key]) for key in ("y_mean", "y_scale"))
    else:
        y_mean = y[train].mean(axis=0)
        y_scale = y[train].std(axis=0)
        y_scale[y_scale == 0] = 1.0
        metadata.update(y_mean=y_mean.tolist(), y_scale=y_scale.tolist())
    return (y - y_mean) / y_scale, y.shape[1], MSE()


def _network_and_optimizer(args, options, resumed, n_inputs, n_outputs):
    """A new network and optimizer, or the resumed ones (--optimizer: a fresh one)."""
    if resumed is None:
        network = build_network(n_inputs, options["hidden"], n_outputs,
                                options["activation"], options["dtype"], options["seed"])
        optimizer = get_optimizer(options["optimizer"])
        optimizer.lr = options["lr"]
        return network, optimizer
    network, optimizer = resumed.network, resumed.optimizer
    if n_outputs != network.n_outputs:
        raise CommandError(f"{args.data}: the target has {n_outputs} columns, the model "
                           f"{network.n_outputs} outputs")
    if args.optimizer is not None or optimizer is None:
        optimizer = get_optimizer(options["optimizer"])  # a fresh state
        optimizer.lr = options["lr"]
    elif args.lr is not None:
        optimizer.lr = args.lr
    return network, optimizer


def _mpi():
    """mpi4py's MPI module (``--distributed``), or a CommandError saying how to get it."""
    try:
        from mpi4py import MPI
    except ImportError:
        raise CommandError("--distributed needs mpi4py (pip install 'bpfast[mpi]') and an "
                           "MPI launcher: mpiexec -n 4 bpfast train ... --distributed") from None
    return MPI


def command_train(args):
    comm = _mpi().COMM_WORLD if getattr(args, "distributed", False) else None
    if comm is not None and comm.Get_rank() != 0:
        # every rank trains; rank 0 alone prints and saves
        with open(os.devnull, "w") as devnull, contextlib.redirect_stdout(devnull):
            return _command_train(args, comm)
    return _command_train(args, comm)


def _command_train(args, comm):
    resumed = Resumed(args) if args.resume else None
    options = _train_options(args, resumed)
    out = args.out = args.out or args.resume or "model.npz"
    if args.lr is not None:
        check_learning_rate(args, args.lr)
    impute = args.impute or (resumed.metadata.get("impute") if resumed else None)
    target = args.target if args.target is not None or resumed is None \
        else resumed.default_target()
    data = read_data(args.data, target, header=args.header, delimiter=args.delimiter,
                     allow_missing=impute == "mean")
    if len(data.y) != len(data.X):
        raise CommandError(f"{args.data}: {len(data.X)} samples but {len(data.y)} targets")
    if data.y.dtype.kind in "biuf" and not np.isfinite(data.y).all():
        raise CommandError(f"{args.data}: the target has missing or infinite values")
    if resumed is not None:
        data.X = _select_features(args.data, data, resumed.metadata, resumed.network.n_inputs,
                                  lambda m: warn(args, m), may_hold_target=False)
    task = resumed.task if resumed else infer_task(data.y, args.task)
    train, validation = split_indices(len(data.X), options["validation_split"],
                                      options["seed"])
    if (args.early_stopping or args.save_best) and len(validation) == 0:
        raise CommandError(f"--{'early-stopping' if args.early_stopping else 'save-best'} "
                           "needs validation samples: a --validation-split above 0")
    # features are standardised with the training part's statistics, kept in the model
    X, x_mean, x_scale = _standardise(args.data, data, train, resumed)
    metadata = dict(resumed.metadata) if resumed else {
        "task": task, "target": data.target_name, "target_index": data.target_index,
        "features": data.feature_names if data.named else None,
        "x_mean": x_mean.tolist(), "x_scale": x_scale.tolist()}
    metadata.update(tool=f"bpfast {__version__} train", seed=options["seed"],
                    validation_split=options["validation_split"])
    if impute:
        metadata["impute"] = impute
    target, n_outputs, loss = _training_target(args, data, task, train, resumed, metadata)
    if args.threads is not None:
        set_num_threads(args.threads)
    if comm is not None:  # this rank's rows of the training part (statistics: all of it)
        train = train[comm.Get_rank()::comm.Get_size()]
    network, optimizer = _network_and_optimizer(args, options, resumed, X.shape[1],
                                                n_outputs)
    X = X.astype(network.dtype)
    if task == "regression":
        target = target.astype(network.dtype)
    batch_size = min(args.batch_size, len(train))
    if not args.quiet:
        print(f"{args.data}: {len(data.X)} samples, {X.shape[1]} features; {task}"
              + (f" with {n_outputs} classes" if task == "classification" else "")
              + f"; training on {len(train)}, validating on {len(validation)}")
        if resumed:
            state = ("its saved state" if optimizer is resumed.optimizer
                     else "a fresh state")
            print(f"resuming {args.resume} after {network.epochs_trained} epochs; "
                  f"{type(optimizer).__name__} (lr {optimizer.lr:g}) with {state}")
        print(repr(network))

    def diverged(epoch):
        return CommandError(divergence_message(args, epoch, optimizer.lr,
                                               best.best_epoch if args.save_best else None))

    def evaluate():
        if len(validation) == 0:
            return {}
        output = network.predict(X[validation])
        if not np.isfinite(output).all():  # weights finite, but too large to use
            raise diverged(network.epochs_trained)
        scores = {"val_loss": loss(output, target[validation])}
        if task == "classification":
            scores["val_accuracy"] = accuracy(output.argmax(axis=1), target[validation])
        else:
            scores["val_R^2"] = r2_score(output, target[validation])
        return scores

    best = _best_epoch_watch(args, network)
    rank_zero = comm is None or comm.Get_rank() == 0

    def after_epoch(epoch, scores):
        best.on_epoch_end(epoch, scores)
        if args.save_best and best.best_epoch == epoch and rank_zero:
            save(network, out, optimizer=optimizer, metadata=metadata)
        return best.stopped_epoch is not None

    try:
        samples_per_second, steps_per_second = train_loop(
            network, X[train], target[train], loss, optimizer, epochs=args.epochs,
            batch_size=batch_size, evaluate=evaluate, quiet=args.quiet,
            clip_norm=args.clip_norm, after_epoch=None if best is None else after_epoch,
            comm=comm)
    except DivergenceError:
        raise diverged(network.epochs_trained + 1) from None  # that epoch does not count
    if best is not None:
        best.on_train_end({})  # --early-stopping: back to the best epoch's weights
        _report_best_epoch(args, best, network.epochs_trained)
    scores = evaluate()
    for name, value in scores.items():
        if name != "val_loss":
            print(f"validation {name[4:]}: {value:.4f}")
    print(f"speed: {samples_per_second:,.0f} samples/s, {steps_per_second:,.0f} steps/s "
          f"(batch size {batch_size})")
    if args.save_best and best.best_epoch is not None:
        print(f"saved the model of epoch {best.best_epoch} (best val_loss) to {out}")
    else:
        if rank_zero:
            save(network, out, optimizer=optimizer, metadata=metadata)
        print(f"saved the model to {out}")
    return 0


def _best_epoch_watch(args, network):
    """For --early-stopping and --save-best: fit's EarlyStopping, driven epoch by epoch
    on val_loss (so both count epochs as fit does); None when neither is asked for."""
    if not (args.early_stopping or args.save_best):
        return None
    # --save-best alone never stops: a patience longer than the run
    watch = EarlyStopping("val_loss", patience=args.patience if args.early_stopping
                          else args.epochs + 1, restore_best=args.early_stopping)
    watch.network = network
    watch.on_train_begin({})
    return watch


def _report_best_epoch(args, watch, last_epoch):
    if args.quiet or watch.best_epoch is None:
        return
    if watch.stopped_epoch is not None:
        print(f"early stopping after epoch {watch.stopped_epoch}: val_loss did not improve "
              f"for {args.patience} epochs")
    if args.early_stopping and watch.best_epoch != last_epoch:
        print(f"restored the weights of epoch {watch.best_epoch} (val_loss "
              f"{watch.best_value:.4f})")


def command_predict(args):
    header, network, _ = load_model(args.model)
    info = _model_metadata(args.model, header["metadata"], network)
    task = info.get("task")
    impute = args.impute or info.get("impute")
    if impute and "x_mean" not in info:
        raise CommandError(f"{args.model}: --impute mean needs the model's feature means "
                           "(x_mean in its metadata, as `bpfast train` saves them)")
    if args.proba and task == "regression":
        raise CommandError(f"{args.model}: --proba needs a classification model; this one "
                           "is a regression model")
    data = read_data(args.data, info.get("target"), need_target=False, header=args.header,
                     delimiter=args.delimiter, allow_missing=impute == "mean",
                     target_index=info.get("target_index"), n_features=network.n_inputs)
    X = _select_features(args.data, data, info, network.n_inputs, lambda m: warn(args, m))
    if "x_mean" in info:
        X = (X - np.asarray(info["x_mean"])) / np.asarray(info["x_scale"])
    X[np.isnan(X)] = 0.0  # --impute mean: the training mean, standardised
    # float32 models: 9 significant digits round-trip; float64: repr's shortest exact
    digits = "{:.9g}" if network.dtype == np.float32 else "{!r}"
    if args.proba:
        output = network.predict_proba(X).astype(np.float64)
        columns = ([str(label) for label in info["classes"]] if task == "classification"
                   else ["probability"] if output.shape[1] == 1
                   else [f"probability_{i}" for i in range(output.shape[1])])
        rows = [[digits.format(float(value)) for value in row] for row in output]
    elif task == "classification":
        output = network.predict(X)
        classes = info["classes"]
        predictions = [classes[i] for i in output.argmax(axis=1)]
        columns, rows = [info.get("target") or "prediction"], [[value] for value in predictions]
    else:
        output = network.predict(X).astype(np.float64)
        if task == "regression":
            output = output * np.asarray(info["y_scale"]) + np.asarray(info["y_mean"])
        name = info.get("target") or "prediction"
        columns = ([name] if output.shape[1] == 1
                   else [f"{name}_{i}" for i in range(output.shape[1])])
        rows = [[digits.format(float(value)) for value in row] for row in output]
    if args.out:
        with open(args.out, "w", newline="", encoding="utf-8") as file:
            _write_csv(file, columns, rows)
        print(f"wrote {len(rows)} predictions to {args.out}", file=sys.stderr)
    else:
        _write_csv(sys.stdout, columns, rows)
    return 0


def _model_metadata(path, info, network):
    """The metadata predict uses, checked against the network: a model saved from
    Python may carry any JSON, and what predict cannot use is a one-line error."""
    def fail(message):
        raise CommandError(f"{path}: the model's metadata {message}")

    task = info.get("task")
    if task not in (None, "classification", "regression"):
        fail(f"has task {task!r}; predict knows 'classification' and 'regression'")
    if task == "classification":
        classes = info.get("classes")
        if not isinstance(classes, list) or len(classes) != network.n_outputs:
            fail(f"must list the {network.n_outputs} class labels (one per output) for a "
                 f"classification model, got {_brief(classes)}")
        if not all(isinstance(label, (str, int, float)) for label in classes):
            fail("class labels must be strings or numbers")
    if task == "regression":
        for key in ("y_mean", "y_scale"):
            _check_numbers(fail, info, key, network.n_outputs, "output")
    if "x_mean" in info or "x_scale" in info:
        for key in ("x_mean", "x_scale"):
            _check_numbers(fail, info, key, network.n_inputs, "input feature")
        if not all(info["x_scale"]):
            fail("x_scale has a zero: features cannot be divided by it")
    for key, kind in (("target", str), ("target_index", int)):
        value = info.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            fail(f"{key} must be {'a string' if kind is str else 'an integer'} or null")
    names = info.get("features")
    if names is not None and (not isinstance(names, list) or len(names) != network.n_inputs
                              or not all(isinstance(name, str) for name in names)):
        fail(f"features must name the {network.n_inputs} inputs, got {_brief(names)}")
    return info


def _check_numbers(fail, info, key, length, what):
    values = info.get(key)
    if (not isinstance(values, list) or len(values) != length
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                       and math.isfinite(v) for v in values)):
        fail(f"{key} must be a list of {length} finite numbers (one per {what}), got "
             f"{_brief(values)}")


def _brief(value, limit=60):
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _select_features(path, data, info, n_inputs, warn, *, may_hold_target=True):
    """The model's input columns of data: by name where both name them, else by position
    (with a warning, through warn(message), when the names differ). With may_hold_target,
    one column too many is the model's target column (at its target_index)."""
    names = info.get("features")
    if names and data.feature_names != names and all(n in data.feature_names for n in names):
        return data.X[:, [data.feature_names.index(name) for name in names]]
    mismatch = bool(names) and data.named and data.feature_names != names
    index = info.get("target_index") if may_hold_target else None
    if data.X.shape[1] == n_inputs:
        X = data.X
    elif data.X.shape[1] == n_inputs + 1 and isinstance(index, int):
        X = np.delete(data.X, index, axis=1)  # the file still has the target column
    else:
        raise CommandError(f"{path}: has {data.X.shape[1]} feature columns, the model takes "
                           f"{n_inputs}" + (f" ({', '.join(names)})" if names else ""))
    if mismatch:
        warn(f"{path}: the columns {_brief(data.feature_names)} are not the model's features "
             f"{_brief(names)}; using them by position")
    return X


def _write_csv(file, columns, rows):
    writer = csv.writer(file, lineterminator="\n")
    writer.writerow(columns)
    writer.writerows(rows)


def load_digits():
    """The 8x8 digits (X as float64 pixels 0..16, y labels 0..9) and where they came from.

    From scikit-learn when it is installed, else from the copy bpfast carries
    (made by tools/make_digits_data.py from scikit-learn's data: BSD-3-Clause;
    originally the UCI "Optical Recognition of Handwritten Digits", CC BY 4.0).
    """
    try:
        from sklearn.datasets import load_digits as sklearn_load_digits
    except ImportError:
        pass
    else:
        digits = sklearn_load_digits()
        return digits.data.astype(np.float64), digits.target.astype(np.intp), "scikit-learn"
    with resources.files("bpfast").joinpath("data", "digits.npz").open("rb") as file:
        with np.load(file, allow_pickle=False) as archive:
            return (archive["X"].astype(np.float64), archive["y"].astype(np.intp),
                    "bpfast's copy")


def command_demo(args):
    X, y, source = load_digits()
    X = (X / 16.0).astype(np.float32)  # pixels 0..16 to 0..1
    train, test = split_indices(len(X), 0.2, args.seed)
    print(f"bpfast {__version__} demo: 8x8 handwritten digits ({len(X)} images, from "
          f"{source}); training on {len(train)}, testing on {len(test)}")
    if args.threads is not None:
        set_num_threads(args.threads)
    network = build_network(64, [64], 10, "relu", "float32", args.seed)
    optimizer = get_optimizer("adam")
    print(repr(network))

    def evaluate():
        return {"test_accuracy": accuracy(network.predict(X[test]).argmax(axis=1), y[test])}

    samples_per_second, steps_per_second = train_loop(
        network, X[train], y[train], CrossEntropy(), optimizer, epochs=args.epochs,
        batch_size=32, evaluate=evaluate, quiet=args.quiet)
    print(f"test accuracy: {evaluate()['test_accuracy']:.4f}")
    print(f"speed: {steps_per_second:,.0f} steps/s, {samples_per_second:,.0f} samples/s "
          "(batch size 32)")
    return 0


def command_export(args):
    header, network, _ = load_model(args.model)
    metadata = header["metadata"]
    try:
        trained = metadata.get("task") in ("classification", "regression")
        if args.format == "onnx" and trained and not args.network_only:
            from .export import pipeline_to_onnx
            pipeline_to_onnx(network, args.out, metadata=metadata)
        elif args.format == "onnx":
            from .export import network_to_onnx
            network_to_onnx(network, args.out, metadata=metadata or None)
        else:
            import torch
            torch.save({key: torch.from_numpy(value)
                        for key, value in network.state_dict().items()}, args.out)
    except ImportError as error:
        needs = "onnx (pip install 'bpfast[onnx]')" if args.format == "onnx" else "torch"
        raise CommandError(f"--format {args.format} needs {needs}: {error}") from None
    except ValueError as error:
        raise CommandError(f"{args.model}: {error}") from None
    print(f"wrote {args.out} ({args.format}, {network.n_inputs} inputs, "
          f"{network.n_outputs} outputs)")
    if "x_mean" in metadata and (args.format == "torch" or args.network_only):
        print("note: the network takes standardised features, (X - x_mean) / x_scale, "
              "with the statistics in MODEL's metadata")
    return 0


def command_explain(args):
    """One training step explained (bpfast.explain): an example, or a saved model on a
    row of a data file."""
    from .explain import example, explain
    from .optimizers import SGD
    if args.model is None:
        if args.data is not None:
            raise CommandError("--data needs --model")
        case = example(args.example)
        net, X, y, loss = case["net"], case["X"], case["y"], case["loss"]
        optimizer = case["optimizer"] if args.lr is None else SGD(lr=args.lr)
        digits, note = case["digits"], case["note"]
    else:
        if args.data is None:
            raise CommandError("--model needs --data (a file with the row to explain)")
        net, X, y, loss = _explain_inputs(args)
        optimizer, digits, note = SGD(lr=0.01 if args.lr is None else args.lr), 6, None
    trace = explain(net, X, y, loss, optimizer, max_terms=args.max_terms)
    trace.note = note
    print(trace.format(args.digits if args.digits is not None else digits), end="")
    if args.dot:
        with open(args.dot, "w", encoding="utf-8") as file:
            file.write(trace.to_dot())
        print(f"wrote the graph to {args.dot} (render: dot -Tsvg {args.dot} -o graph.svg)")
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as file:
            file.write(trace.to_markdown(args.digits if args.digits is not None else digits))
        print(f"wrote the walk-through with LaTeX formulas to {args.markdown}")
    return 0


def _explain_inputs(args):
    """(network, x, y, loss) for one row of a data file and a saved model: features
    scaled and targets encoded as `bpfast train` did."""
    try:
        header = read_header(args.model)
        network = load(args.model)
    except (ValueError, OSError) as error:
        raise CommandError(str(error)) from None
    info = _model_metadata(args.model, header["metadata"], network)
    data = read_data(args.data, args.target or info.get("target"))
    X = _select_features(args.data, data, info, network.n_inputs, lambda m: warn(args, m))
    if not -len(X) <= args.row < len(X):
        raise CommandError(f"{args.data}: --row {args.row} is out of range for {len(X)} rows")
    x = X[args.row:args.row + 1 or None]
    if "x_mean" in info:
        x = (x - np.asarray(info["x_mean"])) / np.asarray(info["x_scale"])
    value = data.y[args.row]
    if info.get("task") == "classification":
        classes = info["classes"]
        if _json_value(value) not in classes:
            raise CommandError(f"{args.data}: row {args.row}'s class {value!r} is not one of "
                               f"the model's classes {classes}")
        return network, x, np.array([classes.index(_json_value(value))]), CrossEntropy()
    try:
        y = np.asarray(value, dtype=np.float64).reshape(1, -1)
    except ValueError:
        raise CommandError(f"{args.data}: the target {value!r} is not a number") from None
    if info.get("task") == "regression":
        y = (y - np.asarray(info["y_mean"])) / np.asarray(info["y_scale"])
    return network, x, y, MSE()


def command_info(args):
    show_config()
    return 0


# --------------------------------------------------------------------------- arguments
def _number(kind, accept, description):
    """An argparse type: text -> kind(text), refused unless accept(value)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not accept(value):
            raise argparse.ArgumentTypeError(f"expected {description}, got {text!r}")
        return value
    parse.__name__ = description  # argparse names the type in its messages
    return parse


_positive_int = _number(int, lambda v: v >= 1, "a positive integer")
_non_negative_int = _number(int, lambda v: v >= 0, "a non-negative integer")
_fraction = _number(float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")
_positive_float = _number(float, lambda v: v > 0 and math.isfinite(v), "a positive number")


TRAIN_HELP = f"""\
Train a multilayer perceptron on DATA and save it.

DATA is a CSV file (--target names the target column, or gives its index from 0),
an .npz file with arrays X (n, d) and y, or an .npy file holding a 2-D array whose
last column (or --target INDEX) is the target. Features must be numbers; they are
standardised (mean 0, standard deviation 1) with the training part's statistics,
which the model file keeps for `bpfast predict`.

CSV files: the first row is the header when one of its cells is text above a
column of numbers (a name over values); otherwise it is data if it holds a number
(so a first row of numbers is always data) and the header if it is all text.
--header or --no-header overrides this rule; without a header row the columns
are numbered from 0 (--target 3), and a row is never dropped. The delimiter is the
one of , tab ; | that splits the first lines into the same number of fields,
else ","; --delimiter sets it. Empty cells and NA, N/A, NaN, null, none, ? are
missing values: an error naming the column, unless --impute mean fills them with
the column's mean on the training part (the model keeps it, and predict fills
them the same way). A text feature column is an error naming it.

--task auto: a target of text, or of whole numbers with at most {MAX_AUTO_CLASSES}
distinct values, is classification (softmax cross-entropy; any label values,
kept in the model so predictions come back as the original labels); anything
else is regression (mean squared error on the standardised target; R^2 reported).

Every epoch prints the training loss, the validation loss and score (accuracy,
or R^2 for regression); at the end the speed in samples and steps per second.
The model is written with bpfast.save (see `python -c "help('bpfast.io')"`),
with its optimizer state.

--early-stopping stops when val_loss has not improved for --patience epochs in a
row (Keras' count) and puts back the best epoch's weights; --save-best writes
MODEL at every epoch that improves val_loss, so it holds the best model even if
training is interrupted. --resume MODEL continues training a saved model (its
network, feature scaling, classes, optimizer state, epoch count, and the seed and
validation split of its first run, so the same samples stay held out, and its
target column); --lr and --optimizer (a fresh state) may change, the network may
not.
"""


def _delimiter(text):
    """An argparse type: one character; "tab" or a typed backslash-t is a tab."""
    text = "\t" if text.lower() in ("tab", "\\t") else text
    if len(text) != 1:
        raise argparse.ArgumentTypeError(f"expected one character (or 'tab'), got {text!r}")
    return text


def _add_data_options(parser, rules, impute_default):
    """The options of reading DATA, the same for train and predict."""
    group = parser.add_argument_group(f"reading a CSV file (the rules: {rules})")
    header = group.add_mutually_exclusive_group()
    header.add_argument("--header", dest="header", action="store_const", const=True,
                        help="the first row is the header (default: detected)")
    header.add_argument("--no-header", dest="header", action="store_const", const=False,
                        help="the first row is data; columns are numbered from 0")
    group.add_argument("--delimiter", type=_delimiter, metavar="CHAR",
                       help="the field separator, e.g. ';' or tab (default: detected)")
    group.add_argument("--impute", choices=("mean",),
                       help="fill missing feature values with the training part's mean "
                            f"(default: {impute_default})")


def build_parser():
    parser = argparse.ArgumentParser(
        prog="bpfast", description="Fast, exact backpropagation for dense networks on the CPU.",
        epilog="With no command, runs the demo.")
    parser.add_argument("--version", action="version", version=f"bpfast {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    train = commands.add_parser("train", help="train on a CSV/.npz/.npy file and save the model",
                                description=TRAIN_HELP,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("data", metavar="DATA", help="CSV, .npz or .npy file")
    train.add_argument("--target", metavar="COLUMN",
                       help="target column: a CSV header name or a column index "
                            "(.npy default: the last column; not used for .npz)")
    train.add_argument("--hidden", type=_parse_hidden, metavar="SIZES",
                       help="hidden layer sizes, comma-separated (default 64; 'none' for "
                            "a linear model)")
    train.add_argument("--activation", choices=_HIDDEN_ACTIVATIONS,
                       metavar="NAME", help="hidden activation (default relu; one of "
                       f"{', '.join(_HIDDEN_ACTIVATIONS)})")
    train.add_argument("--epochs", type=_positive_int, default=20, help="default 20")
    train.add_argument("--batch-size", type=_positive_int, default=32, help="default 32")
    train.add_argument("--optimizer", choices=OPTIMIZER_NAMES, help="default adam")
    train.add_argument("--lr", type=_positive_float,
                       help="learning rate (default 0.001); above 1 or below 1e-7 warns")
    train.add_argument("--clip-norm", type=_positive_float, metavar="MAX",
                       help="scale each step's gradient to an L2 norm of at most MAX (as "
                            "PyTorch's clip_grad_norm_); helps when training diverges")
    train.add_argument("--task", default="auto", choices=("auto", "classification",
                                                          "regression"),
                       help="default auto (see above)")
    train.add_argument("--dtype", choices=("float32", "float64"),
                       help="default float32")
    train.add_argument("--seed", type=_non_negative_int,
                       help="seeds the weights, the shuffling and the validation split "
                            "(default 0; with --resume, the first run's)")
    train.add_argument("--validation-split", type=_fraction, metavar="FRACTION",
                       help="part of the samples held out for validation (default 0.1, "
                            "with --resume the first run's; 0 for none)")
    train.add_argument("--threads", type=_positive_int, help="threads (default: all cores)")
    train.add_argument("--out", metavar="MODEL",
                       help="where to save the model (default model.npz; with --resume, "
                            "the resumed file)")
    train.add_argument("--early-stopping", action="store_true",
                       help="stop when val_loss stops improving, keep the best weights")
    train.add_argument("--patience", type=_positive_int, default=5, metavar="EPOCHS",
                       help="--early-stopping's epochs without improvement (default 5)")
    train.add_argument("--save-best", action="store_true",
                       help="save MODEL at each epoch that improves val_loss (the file "
                            "ends with the best epoch's model, not the last)")
    train.add_argument("--resume", metavar="MODEL",
                       help="continue training this model (saved by `bpfast train`)")
    train.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    _add_data_options(train, "above", "a missing value is an error")
    train.add_argument("--distributed", action="store_true",
                       help="data-parallel over MPI: `mpiexec -n 4 bpfast train ... "
                            "--distributed`; each rank trains on its share of the rows "
                            "(--batch-size per rank), rank 0 prints and saves (needs mpi4py)")
    train.set_defaults(handler=command_train)

    predict = commands.add_parser(
        "predict", help="write a saved model's predictions for DATA as CSV",
        description="Predict with a model saved by `bpfast train` (or bpfast.save). DATA "
                    "is read like train's (a CSV by the same rules); a target column "
                    "present is ignored. Columns are matched to the model's features by "
                    "name when both have names (a warning when they differ, then by "
                    "position). Writes a CSV: class labels for classification, values "
                    "for regression, raw outputs for a model saved from Python; with "
                    "--proba one probability column per class, headed by its label.")
    predict.add_argument("model", metavar="MODEL", help="a .npz model file")
    predict.add_argument("data", metavar="DATA", help="CSV, .npz or .npy file")
    predict.add_argument("--out", metavar="FILE", help="CSV file to write (default: stdout)")
    predict.add_argument("--proba", action="store_true",
                         help="write class probabilities instead of labels")
    _add_data_options(predict, "bpfast train --help",
                      "as the model was trained, else a missing value is an error")
    predict.set_defaults(handler=command_predict)

    export = commands.add_parser(
        "export", help="write a saved model as ONNX or a PyTorch state dict",
        description="Export a model saved by `bpfast train` (or bpfast.save) as ONNX (needs "
                    "onnx) or as a PyTorch state dict .pt for the torch.nn.Sequential of "
                    "Network.to_torch() (needs torch). The ONNX graph of a `bpfast train` "
                    "model predicts as `bpfast predict` does: it standardises the raw "
                    "features and outputs 'label' and 'probabilities' (classification) or "
                    "'variable' in the target's units (regression); --network-only writes "
                    "the bare network (input 'input', output 'output').")
    export.add_argument("model", metavar="MODEL", help="a .npz model file")
    export.add_argument("out", metavar="OUT", help="the file to write (.onnx or .pt)")
    export.add_argument("--format", choices=("onnx", "torch"), default="onnx",
                        help="default onnx")
    export.add_argument("--network-only", action="store_true",
                        help="ONNX: the network alone, without the feature scaling and the "
                             "class labels of a `bpfast train` model")
    export.set_defaults(handler=command_export)

    explain = commands.add_parser(
        "explain", help="one training step explained with the chain rule",
        description="Print one training step (forward pass, loss, backward pass, update) "
                    "in the textbook's notation, every number from bpfast's kernels (see "
                    "bpfast.explain). With no arguments: the textbook's worked example "
                    "(x = 1, t = 0, w1 = w2 = 0.5, lr 0.1). --model and --data explain a "
                    "saved model on one row of a data file (scaled as `bpfast train` did; "
                    "cross-entropy for a classifier, squared error otherwise; SGD).")
    explain.add_argument("--example", default="textbook",
                         choices=("textbook", "mazur", "softmax"),
                         help="textbook (default); mazur: Matt Mazur's 2-2-2 sigmoid "
                              "network; softmax: a small softmax classifier")
    explain.add_argument("--model", metavar="MODEL", help="a .npz model file to explain")
    explain.add_argument("--data", metavar="DATA", help="CSV, .npz or .npy file (with --model)")
    explain.add_argument("--row", type=int, default=0, help="the row of DATA (default 0)")
    explain.add_argument("--target", metavar="COLUMN",
                         help="target column (default: the model's)")
    explain.add_argument("--lr", type=_positive_float,
                         help="SGD learning rate (default: the example's; 0.01 for a model)")
    explain.add_argument("--digits", type=_non_negative_int,
                         help="decimals (default: the example's, 6 for a model)")
    explain.add_argument("--max-terms", type=_non_negative_int, default=50, metavar="N",
                         help="write every value for networks of at most N parameters "
                              "(default 50), else per-layer matrix formulas")
    explain.add_argument("--dot", metavar="FILE",
                         help="also write the graph of values and gradients as Graphviz DOT")
    explain.add_argument("--markdown", metavar="FILE",
                         help="also write the walk-through as Markdown with LaTeX formulas")
    explain.set_defaults(handler=command_explain)

    info = commands.add_parser("info", help="print the version, OpenMP, threads and BLAS")
    info.set_defaults(handler=command_info)

    demo = commands.add_parser("demo", help="train on the 8x8 handwritten digits (no download)")
    demo.add_argument("--epochs", type=_positive_int, default=20, help="default 20")
    demo.add_argument("--seed", type=_non_negative_int, default=0, help="default 0")
    demo.add_argument("--threads", type=_positive_int, help="threads (default: all cores)")
    demo.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    demo.set_defaults(handler=command_demo)
    return parser


#: The exit status when standard output is a pipe closed early (``bpfast predict ... |
#: head -1``): 128 + SIGPIPE, what a tool that the signal ends reports, with no message.
EXIT_CLOSED_PIPE = 141


def main(argv=None):
    """Run the command line with argv (default sys.argv[1:]); the exit status.

    Every failure is one line on standard error, ``bpfast COMMAND: error: ...``,
    and status 1 (2 for a usage error, 130 after Ctrl-C); never a traceback. When
    standard output is a pipe that the reader closed, the command stops quietly
    with status 141 (``EXIT_CLOSED_PIPE``), like the tools a SIGPIPE ends.
    """
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.command is None:
        args = parser.parse_args(["demo"])
    try:
        status = args.handler(args)
        sys.stdout.flush()  # a closed pipe shows here, while it can still be handled
        return status
    except BrokenPipeError:
        _discard_standard_output()
        return EXIT_CLOSED_PIPE
    except (CommandError, OSError, DivergenceError, ValueError) as error:
        message = str(error) or type(error).__name__
    except MemoryError as error:
        message = f"out of memory: {error}" if str(error) else "out of memory"
    except KeyboardInterrupt:
        print(f"bpfast {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - a bug, but still one line, not a traceback
        message = f"unexpected {type(error).__name__}: {error} (please report this)"
    print(f"bpfast {args.command}: error: {' '.join(message.split())}", file=sys.stderr)
    return 1


def _discard_standard_output():
    """After a closed pipe: point stdout at os.devnull, so that the interpreter's flush
    at exit (of what is still buffered) cannot fail again and print a warning; see the
    Python documentation, signal module, "Note on SIGPIPE"."""
    try:
        descriptor = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    try:
        os.dup2(descriptor, sys.stdout.fileno())
    except (OSError, ValueError):  # no file behind sys.stdout (captured): nothing to do
        pass
    finally:
        os.close(descriptor)
