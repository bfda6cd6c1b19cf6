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
class Dataset:
    """Features X (n, d) as float64, an optional target y, and the names of both."""

    def __init__(self, X, y, feature_names, target_name, target_index):
        self.X, self.y = X, y
        self.feature_names, self.target_name = feature_names, target_name
        self.target_index = target_index


def read_data(path, target=None, *, need_target=True):
    """Read a CSV (header row), .npz (arrays X and y) or .npy (2-D) file.

    ``target`` names the CSV target column (by name or index) or the .npy column
    (index; default the last). Without ``need_target`` the file may lack the
    target, ``target`` may be None, and a named target column that a CSV has is
    dropped; every other column is a feature.
    """
    if not os.path.isfile(path):
        raise CommandError(f"{path}: " + ("not a regular file" if os.path.exists(path)
                                          else "no such file"))
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".npz":
        return _read_npz(path, need_target)
    if suffix == ".npy":
        return _read_npy(path, target, need_target)
    return _read_csv(path, target, need_target)


def _read_npz(path, need_target):
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
    X = _numeric_2d(path, X, "X")
    names = [f"x{i}" for i in range(X.shape[1])]
    return Dataset(X, y, names, "y", None)


def _read_npy(path, target, need_target):
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise CommandError(f"{path}: cannot read: {error}") from None
    data = _numeric_2d(path, data, "the array")
    if not need_target:
        return Dataset(data, None, [f"x{i}" for i in range(data.shape[1])], None, None)
    index = _column_index(path, "-1" if target is None else target, data.shape[1], None)
    if data.shape[1] < 2:
        raise CommandError(f"{path}: needs at least one feature column besides the target")
    X = np.delete(data, index, axis=1)
    names = [f"x{i}" for i in range(data.shape[1]) if i != index]
    return Dataset(X, data[:, index], names, f"column {index}", index)


def _numeric_2d(path, array, what):
    if array.dtype.kind not in "biuf":
        raise CommandError(f"{path}: {what} must hold numbers, got dtype {array.dtype}")
    if array.ndim == 1:
        array = array.reshape(-1, 1)
    if array.ndim != 2 or array.shape[0] == 0:
        raise CommandError(f"{path}: {what} must be a non-empty 2-D table, got shape "
                           f"{array.shape}")
    array = array.astype(np.float64)
    if not np.isfinite(array).all():
        row, column = np.argwhere(~np.isfinite(array))[0]
        raise CommandError(f"{path}: {what} has a missing or infinite value at row {row}, "
                           f"column {column}")
    return array


def _column_index(path, target, n_columns, header):
    """The index of the target column, given by name (CSV header) or integer index."""
    if header is not None and target in header:
        return header.index(target)
    try:
        index = int(target)
    except ValueError:
        known = f"; columns: {', '.join(header)}" if header is not None else ""
        raise CommandError(f"{path}: no column {target!r}{known}") from None
    if not -n_columns <= index < n_columns:
        raise CommandError(f"{path}: column index {index} is out of range for {n_columns} "
                           "columns")
    return index % n_columns


def _read_csv(path, target, need_target):
    try:
        with open(path, newline="", encoding="utf-8-sig") as file:
            rows = [row for row in csv.reader(file) if row and any(cell.strip() for cell in row)]
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise CommandError(f"{path}: cannot read as CSV: {error}") from None
    if len(rows) < 2:
        raise CommandError(f"{path}: a CSV file needs a header row and at least one data row")
    header = [cell.strip() for cell in rows[0]]
    body = rows[1:]
    for number, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise CommandError(f"{path}: line {number} has {len(row)} fields, the header "
                               f"has {len(header)}")
    index = None
    if target is not None and (need_target or target in header):
        index = _column_index(path, target, len(header), header)
    elif need_target:
        raise CommandError("which column is the target? give --target NAME_OR_INDEX")
    columns = [i for i in range(len(header)) if i != index]
    if not columns:
        raise CommandError(f"{path}: needs at least one feature column besides the target")
    X = np.empty((len(body), len(columns)))
    for j, column in enumerate(columns):
        for i, row in enumerate(body):
            try:
                X[i, j] = float(row[column])
            except ValueError:
                raise CommandError(
                    f"{path}: line {i + 2}, column {header[column]!r}: {row[column]!r} is "
                    "not a number (features must be numeric, with no missing values)") from None
    if not np.isfinite(X).all():
        raise CommandError(f"{path}: features contain NaN or infinity")
    y = None
    if index is not None:
        values = [row[index].strip() for row in body]
        try:
            y = np.array([float(value) for value in values])
        except ValueError:
            y = np.array(values)  # text labels: a classification target
    return Dataset(X, y, [header[i] for i in columns], header[index] if index is not None
                   else None, index)


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
               comm=None):
    """Train one epoch at a time, printing a progress line per epoch; the samples/s.

    ``evaluate()`` returns the (name, value) of the held-out score, or None. One
    ``fit(validation_data=..., metrics=..., verbose=2)`` call could replace this loop,
    but its metrics also score the whole training set every epoch, inside the time
    that its speed reports; here only the training is timed. The data are checked
    once (``fit``'s trainer), then each epoch is one compiled call. With ``comm``
    (``--distributed``), X and y are this rank's shard, and the speed is the job's.
    """
    n_samples = X.shape[0]
    steps_per_epoch = math.ceil(n_samples / batch_size)
    if comm is not None:  # every rank runs the steps of the largest shard
        steps_per_epoch = math.ceil(comm.allreduce(n_samples, op=_mpi().MAX) / batch_size)
        n_samples = comm.allreduce(n_samples)
    elapsed = 0.0
    width = len(str(epochs))
    trainer = network.trainer(X, y, loss=loss, optimizer=optimizer, batch_size=batch_size,
                              shuffle=True, comm=comm)
    for epoch in range(1, epochs + 1):
        start = time.perf_counter()
        history = trainer.run(1)
        elapsed += time.perf_counter() - start
        if quiet:
            continue
        line = f"epoch {epoch:>{width}}/{epochs}  loss {history.history['loss'][-1]:.4f}"
        score = evaluate()
        if score is not None:
            line += f"  {score[0]} {score[1]:.4f}"
        print(line, flush=True)
    samples_per_second = n_samples * epochs / elapsed if elapsed > 0 else float("inf")
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
    data = read_data(args.data, args.target)
    if len(data.y) != len(data.X):
        raise CommandError(f"{args.data}: {len(data.X)} samples but {len(data.y)} targets")
    if data.y.dtype.kind in "biuf" and not np.isfinite(data.y).all():
        raise CommandError(f"{args.data}: the target has missing or infinite values")
    task = infer_task(data.y, args.task)
    train, validation = split_indices(len(data.X), args.validation_split, args.seed)
    X_train = data.X[train]
    # features are standardised with the training part's statistics, kept in the model
    x_mean = X_train.mean(axis=0)
    x_scale = X_train.std(axis=0)
    x_scale[x_scale == 0] = 1.0
    X = ((data.X - x_mean) / x_scale).astype(args.dtype)
    metadata = {"tool": f"bpfast {__version__} train", "task": task,
                "target": data.target_name, "target_index": data.target_index,
                "features": data.feature_names, "x_mean": x_mean.tolist(),
                "x_scale": x_scale.tolist()}
    if task == "classification":
        classes, labels = np.unique(data.y, return_inverse=True)
        if len(classes) < 2:
            raise CommandError("the target has a single class; nothing to learn")
        metadata["classes"] = [_json_value(value) for value in classes]
        target, n_outputs, loss = labels.astype(np.intp), len(classes), CrossEntropy()
    else:
        y = data.y.astype(np.float64).reshape(len(data.y), -1)
        y_mean = y[train].mean(axis=0)
        y_scale = y[train].std(axis=0)
        y_scale[y_scale == 0] = 1.0
        metadata.update(y_mean=y_mean.tolist(), y_scale=y_scale.tolist())
        target, n_outputs, loss = ((y - y_mean) / y_scale).astype(args.dtype), y.shape[1], MSE()
    if args.threads is not None:
        set_num_threads(args.threads)
    if comm is not None:  # this rank's rows of the training part (statistics: all of it)
        train = train[comm.Get_rank()::comm.Get_size()]
    network = build_network(X.shape[1], args.hidden, n_outputs, args.activation, args.dtype,
                            args.seed)
    optimizer = get_optimizer(args.optimizer)
    optimizer.lr = args.lr
    batch_size = min(args.batch_size, len(train))
    if not args.quiet:
        print(f"{args.data}: {len(data.X)} samples, {X.shape[1]} features; {task}"
              + (f" with {n_outputs} classes" if task == "classification" else "")
              + f"; training on {len(train)}, validating on {len(validation)}")
        print(repr(network))

    def evaluate():
        if len(validation) == 0:
            return None
        output = network.predict(X[validation])
        if task == "classification":
            return "val_accuracy", accuracy(output.argmax(axis=1), target[validation])
        return "val_R^2", r2_score(output, target[validation])

    samples_per_second, steps_per_second = train_loop(
        network, X[train], target[train], loss, optimizer, epochs=args.epochs,
        batch_size=batch_size, evaluate=evaluate, quiet=args.quiet, comm=comm)
    score = evaluate()
    if score is not None:
        print(f"validation {score[0][4:]}: {score[1]:.4f}")
    print(f"speed: {samples_per_second:,.0f} samples/s, {steps_per_second:,.0f} steps/s "
          f"(batch size {batch_size})")
    if comm is None or comm.Get_rank() == 0:
        save(network, args.out, optimizer=optimizer, metadata=metadata)
    print(f"saved the model to {args.out}")
    return 0


def command_predict(args):
    try:
        header = read_header(args.model)
        network = load(args.model)
    except (ValueError, OSError) as error:
        raise CommandError(str(error)) from None
    info = _model_metadata(args.model, header["metadata"], network)
    data = read_data(args.data, info.get("target"), need_target=False)
    X = _select_features(args.data, data, info, network.n_inputs)
    if "x_mean" in info:
        X = (X - np.asarray(info["x_mean"])) / np.asarray(info["x_scale"])
    output = network.predict(X).astype(np.float64)
    task = info.get("task")
    if task == "classification":
        classes = info["classes"]
        predictions = [classes[i] for i in output.argmax(axis=1)]
        columns, rows = [info.get("target") or "prediction"], [[value] for value in predictions]
    else:
        if task == "regression":
            output = output * np.asarray(info["y_scale"]) + np.asarray(info["y_mean"])
        name = info.get("target") or "prediction"
        columns = ([name] if output.shape[1] == 1
                   else [f"{name}_{i}" for i in range(output.shape[1])])
        # float32 models: 9 significant digits round-trip; float64: repr's shortest exact
        digits = "{:.9g}" if network.dtype == np.float32 else "{!r}"
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


def _select_features(path, data, info, n_inputs):
    """The model's input columns of data: by name where the file names them."""
    names = info.get("features")
    if names and data.feature_names != names and all(n in data.feature_names for n in names):
        return data.X[:, [data.feature_names.index(name) for name in names]]
    if data.X.shape[1] == n_inputs:
        return data.X
    index = info.get("target_index")
    if data.X.shape[1] == n_inputs + 1 and isinstance(index, int):
        return np.delete(data.X, index, axis=1)  # the file still has the target column
    raise CommandError(f"{path}: has {data.X.shape[1]} feature columns, the model takes "
                       f"{n_inputs}" + (f" ({', '.join(names)})" if names else ""))


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
        return "test_accuracy", accuracy(network.predict(X[test]).argmax(axis=1), y[test])

    samples_per_second, steps_per_second = train_loop(
        network, X[train], y[train], CrossEntropy(), optimizer, epochs=args.epochs,
        batch_size=32, evaluate=evaluate, quiet=args.quiet)
    print(f"test accuracy: {evaluate()[1]:.4f}")
    print(f"speed: {steps_per_second:,.0f} steps/s, {samples_per_second:,.0f} samples/s "
          "(batch size 32)")
    return 0


def command_export(args):
    try:
        header = read_header(args.model)
        network = load(args.model)
    except (ValueError, OSError) as error:
        raise CommandError(str(error)) from None
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
    X = _select_features(args.data, data, info, network.n_inputs)
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

DATA is a CSV file with a header row (--target names the target column, or gives
its index), an .npz file with arrays X (n, d) and y, or an .npy file holding a 2-D
array whose last column (or --target INDEX) is the target. Features must be numbers
without missing values; they are standardised (mean 0, standard deviation 1) with
the training part's statistics, which the model file keeps for `bpfast predict`.

--task auto: a target of text, or of whole numbers with at most {MAX_AUTO_CLASSES}
distinct values, is classification (softmax cross-entropy; any label values,
kept in the model so predictions come back as the original labels); anything
else is regression (mean squared error on the standardised target; R^2 reported).

Every epoch prints the training loss and the validation score (accuracy, or R^2
for regression); at the end the speed in samples and steps per second. The model
is written with bpfast.save (see `python -c "help('bpfast.io')"`), with its
optimizer state.
"""


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
    train.add_argument("--hidden", type=_parse_hidden, default=[64], metavar="SIZES",
                       help="hidden layer sizes, comma-separated (default 64; 'none' for "
                            "a linear model)")
    train.add_argument("--activation", default="relu", choices=_HIDDEN_ACTIVATIONS,
                       metavar="NAME", help="hidden activation (default relu; one of "
                       f"{', '.join(_HIDDEN_ACTIVATIONS)})")
    train.add_argument("--epochs", type=_positive_int, default=20, help="default 20")
    train.add_argument("--batch-size", type=_positive_int, default=32, help="default 32")
    train.add_argument("--optimizer", default="adam", choices=OPTIMIZER_NAMES,
                       help="default adam")
    train.add_argument("--lr", type=_positive_float, default=1e-3,
                       help="learning rate (default 0.001)")
    train.add_argument("--task", default="auto", choices=("auto", "classification",
                                                          "regression"),
                       help="default auto (see above)")
    train.add_argument("--dtype", default="float32", choices=("float32", "float64"),
                       help="default float32")
    train.add_argument("--seed", type=_non_negative_int, default=0,
                       help="seeds the weights, the shuffling and the validation split "
                            "(default 0)")
    train.add_argument("--validation-split", type=_fraction, default=0.1, metavar="FRACTION",
                       help="part of the samples held out for validation (default 0.1; "
                            "0 for none)")
    train.add_argument("--threads", type=_positive_int, help="threads (default: all cores)")
    train.add_argument("--out", default="model.npz", metavar="MODEL",
                       help="where to save the model (default model.npz)")
    train.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    train.add_argument("--distributed", action="store_true",
                       help="data-parallel over MPI: `mpiexec -n 4 bpfast train ... "
                            "--distributed`; each rank trains on its share of the rows "
                            "(--batch-size per rank), rank 0 prints and saves (needs mpi4py)")
    train.set_defaults(handler=command_train)

    predict = commands.add_parser(
        "predict", help="write a saved model's predictions for DATA as CSV",
        description="Predict with a model saved by `bpfast train` (or bpfast.save). DATA "
                    "is read like train's; a target column present is ignored. Writes a "
                    "CSV: class labels for classification, values for regression, raw "
                    "outputs for a model saved from Python.")
    predict.add_argument("model", metavar="MODEL", help="a .npz model file")
    predict.add_argument("data", metavar="DATA", help="CSV, .npz or .npy file")
    predict.add_argument("--out", metavar="FILE", help="CSV file to write (default: stdout)")
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
