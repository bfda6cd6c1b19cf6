"""The command line: train, predict, info and demo, in-process and as `python -m bpfast`."""
import contextlib
import csv
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

import bpfast as bp
from bpfast import cli


def blobs(n_per_class=40, seed=0):
    """Three well separated clusters in 3-D, labelled by name."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0, 0, 0], [6, 6, 0], [0, 6, 6]], dtype=float)
    X = np.concatenate([centre + rng.normal(size=(n_per_class, 3)) for centre in centres])
    names = np.repeat(["setosa", "versicolor", "virginica"], n_per_class)
    return X, names


def write_csv(path, header, rows):
    with open(path, "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(header)
        writer.writerows(rows)


def read_csv(path_or_text, is_text=False):
    lines = path_or_text.splitlines() if is_text else open(path_or_text).read().splitlines()
    rows = list(csv.reader(lines))
    return rows[0], rows[1:]


@pytest.fixture
def classification_csv(tmp_path):
    X, names = blobs()
    path = tmp_path / "flowers.csv"
    # the target sits in the middle, to check it is taken out by name
    write_csv(path, ["a", "species", "b", "c"],
              [[x[0], name, x[1], x[2]] for x, name in zip(X, names, strict=True)])
    return path, names


def test_train_then_predict_classification(tmp_path, classification_csv, capsys):
    path, names = classification_csv
    model = tmp_path / "model.npz"
    status = cli.main(["train", str(path), "--target", "species", "--hidden", "16,8",
                       "--epochs", "15", "--lr", "0.01", "--batch-size", "16",
                       "--out", str(model), "--seed", "1"])
    out = capsys.readouterr().out
    assert status == 0
    assert "classification with 3 classes" in out
    assert "epoch 15/15" in out and "val_accuracy" in out
    accuracy = float(out.split("validation accuracy:")[1].split()[0])
    assert accuracy >= 0.9
    assert "samples/s" in out and "steps/s" in out
    header = bp.io.read_header(model)
    assert header["metadata"]["classes"] == ["setosa", "versicolor", "virginica"]
    assert header["metadata"]["features"] == ["a", "b", "c"]
    assert header["optimizer"]["name"] == "Adam"
    net = bp.load(model)
    assert [layer.out_features for layer in net.layers] == [16, 8, 3]

    # predict reads the same file (its target column is ignored) and maps labels back
    assert cli.main(["predict", str(model), str(path)]) == 0
    columns, rows = read_csv(capsys.readouterr().out, is_text=True)
    assert columns == ["species"]
    predicted = np.array([row[0] for row in rows])
    assert np.mean(predicted == names) >= 0.9

    # and a file with only the features, in another order, written to --out
    features_only = tmp_path / "new.csv"
    X, _ = blobs(seed=5)
    write_csv(features_only, ["c", "b", "a"], [[x[2], x[1], x[0]] for x in X])
    out_file = tmp_path / "predictions.csv"
    assert cli.main(["predict", str(model), str(features_only), "--out", str(out_file)]) == 0
    columns, rows = read_csv(out_file)
    assert columns == ["species"] and len(rows) == len(X)
    assert np.mean(np.array([r[0] for r in rows]) == names) >= 0.9


def test_regression_from_npy_and_npz(tmp_path, capsys):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(300, 4)) * [1, 10, 100, 0.1]  # features on very different scales
    y = 3.0 * X[:, 0] - 0.2 * X[:, 1] + 0.01 * X[:, 2] + 500.0
    np.save(tmp_path / "table.npy", np.column_stack([X, y]))
    model = tmp_path / "reg.npz"
    assert cli.main(["train", str(tmp_path / "table.npy"), "--epochs", "40", "--hidden", "none",
                     "--lr", "0.05", "--out", str(model), "--quiet",
                     "--dtype", "float64"]) == 0
    out = capsys.readouterr().out
    assert "epoch" not in out  # --quiet
    assert float(out.split("validation R^2:")[1].split()[0]) > 0.99

    np.savez(tmp_path / "new.npz", X=X[:20])
    assert cli.main(["predict", str(model), str(tmp_path / "new.npz")]) == 0
    columns, rows = read_csv(capsys.readouterr().out, is_text=True)
    assert columns == ["column 4"]
    np.testing.assert_allclose([float(r[0]) for r in rows], y[:20], rtol=0.02)
    # the .npy with its target column still in place predicts the same
    assert cli.main(["predict", str(model), str(tmp_path / "table.npy")]) == 0
    _, rows_npy = read_csv(capsys.readouterr().out, is_text=True)
    assert rows_npy[:20] == rows

    # an .npz training file, integer labels 0/1 of few values: classification
    labels = (X[:, 0] > 0).astype(int)
    np.savez(tmp_path / "train.npz", X=X, y=labels)
    assert cli.main(["train", str(tmp_path / "train.npz"), "--epochs", "5", "--quiet",
                     "--out", str(tmp_path / "clf.npz")]) == 0
    assert "validation accuracy" in capsys.readouterr().out
    assert bp.io.read_header(tmp_path / "clf.npz")["metadata"]["classes"] == [0, 1]
    # --task regression overrides the inference
    assert cli.main(["train", str(tmp_path / "train.npz"), "--epochs", "2", "--quiet",
                     "--task", "regression", "--validation-split", "0",
                     "--out", str(tmp_path / "r.npz")]) == 0
    assert bp.io.read_header(tmp_path / "r.npz")["metadata"]["task"] == "regression"


def test_task_inference():
    assert cli.infer_task(np.array([1.0, 2.0, 1.0]), "auto") == "classification"
    assert cli.infer_task(np.array(["a", "b"]), "auto") == "classification"
    assert cli.infer_task(np.array([0.5, 1.0, 2.0]), "auto") == "regression"
    assert cli.infer_task(np.arange(100.0), "auto") == "regression"  # too many values
    assert cli.infer_task(np.zeros((3, 2)), "auto") == "regression"
    assert cli.infer_task(np.arange(100.0), "classification") == "classification"


def test_predict_with_a_model_saved_from_python(tmp_path, capsys):
    net = bp.Network([bp.Dense(2, 3)], seed=0)
    net.save(tmp_path / "raw.npz")
    np.save(tmp_path / "x.npy", np.ones((4, 2)))
    assert cli.main(["predict", str(tmp_path / "raw.npz"), str(tmp_path / "x.npy")]) == 0
    columns, rows = read_csv(capsys.readouterr().out, is_text=True)
    assert columns == ["prediction_0", "prediction_1", "prediction_2"]
    np.testing.assert_allclose(np.array(rows, dtype=float), net.predict(np.ones((4, 2))),
                               rtol=1e-6)


@pytest.mark.parametrize("argv, message", [
    (["train", "{csv}", "--target", "nope"], "no column 'nope'"),
    (["train", "{csv}"], "--target"),
    (["train", "{missing}", "--target", "x"], "no such file"),
    (["predict", "{missing}", "{csv}"], "missing.csv: no such file"),
    (["predict", "{csv}", "{csv}"], "not an .npz"),
])
def test_errors_are_one_line(tmp_path, classification_csv, capsys, argv, message):
    path, _ = classification_csv
    argv = [a.format(csv=path, missing=tmp_path / "missing.csv") for a in argv]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1


def test_bad_values_in_a_csv(tmp_path, capsys):
    write_csv(tmp_path / "bad.csv", ["x", "y"], [[1, 2], ["", 3]])
    assert cli.main(["train", str(tmp_path / "bad.csv"), "--target", "y"]) == 1
    assert "column 'x' has 1 missing value(s), the first on line 3" in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--hidden", "64,x"], ["--epochs", "0"],
                                    ["--validation-split", "1.5"], ["--lr", "-1"],
                                    ["--optimizer", "lbfgs"]])
def test_bad_options_are_usage_errors(classification_csv, option, capsys):
    path, _ = classification_csv
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", str(path), "--target", "species", *option])
    assert exit_info.value.code == 2


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"bpfast {bp.__version__}" in out and "OpenMP" in out


def test_demo(capsys):
    assert cli.main(["demo", "--epochs", "3"]) == 0
    out = capsys.readouterr().out
    assert "epoch 3/3" in out and "1797 images" in out
    assert float(out.split("test accuracy:")[1].split()[0]) > 0.8
    assert "steps/s" in out


def test_demo_data_without_scikit_learn(monkeypatch):
    pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    expected = load_digits()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import now fails
    X, y, source = cli.load_digits()
    assert source == "bpfast's copy"
    np.testing.assert_array_equal(X, expected.data)
    np.testing.assert_array_equal(y, expected.target)


def run_module(*args):
    """`python -m bpfast ...` in a child process, importing this same bpfast."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(bp.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_parent,
                                                      env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "bpfast", *args], capture_output=True,
                          text=True, env=env, timeout=120)


def test_python_dash_m_info():
    result = run_module("info")
    assert result.returncode == 0, result.stderr
    assert f"bpfast {bp.__version__}" in result.stdout


def test_python_dash_m_help_and_errors():
    result = run_module("--help")
    assert result.returncode == 0 and "train" in result.stdout and "demo" in result.stdout
    result = run_module("train", "no-such-file.csv", "--target", "y")
    assert result.returncode == 1 and "no such file" in result.stderr


# --------------------------------------------------------------------------- failures are one line
def one_line_error(capsys, command):
    """The one stderr line of a failed in-process command, checked for its form."""
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert err.startswith(f"bpfast {command}: error: "), err
    return err


@pytest.fixture
def python_model(tmp_path):
    """A 2-input, 3-output network and data for it; save(metadata) -> the model's path."""
    net = bp.Network([bp.Dense(2, 3)], seed=0)
    np.save(tmp_path / "x.npy", np.ones((4, 2)))

    def save(metadata):
        bp.save(net, tmp_path / "model.npz", metadata=metadata)
        return str(tmp_path / "model.npz")
    return save


@pytest.mark.parametrize("metadata, message", [
    ({"task": "classification"}, "3 class labels"),  # was KeyError
    ({"task": "classification", "classes": ["a", "b"]}, "3 class labels"),  # IndexError
    ({"task": "classification", "classes": [["a"], "b", "c"]}, "strings or numbers"),
    ({"task": "regression", "y_mean": [0, 0, 0]}, "y_scale"),  # KeyError
    ({"task": "regression", "y_mean": [0, 0, 0], "y_scale": [1, "x", 1]}, "y_scale"),
    ({"task": "regression", "y_mean": [0, 0], "y_scale": [1, 1, 1]}, "y_mean"),
    ({"x_mean": [0, 0], "x_scale": [1]}, "x_scale must be a list of 2"),  # broadcast error
    ({"x_mean": [0, 0], "x_scale": [1, 0]}, "x_scale has a zero"),  # silent inf
    ({"x_mean": [0, 0]}, "x_scale"),  # KeyError
    ({"x_scale": [1, 1]}, "x_mean"),
    ({"task": "clustering"}, "task 'clustering'"),
    ({"features": ["a"]}, "features"),
    ({"target_index": "0"}, "target_index"),
])
def test_unexpected_metadata_is_a_one_line_error(python_model, tmp_path, capsys, metadata,
                                                 message):
    model = python_model(metadata)
    assert cli.main(["predict", model, str(tmp_path / "x.npy")]) == 1
    err = one_line_error(capsys, "predict")
    assert message in err and model in err


def test_metadata_that_predict_can_use(python_model, tmp_path, capsys):
    model = python_model({"task": "classification", "classes": ["a", "b", 7],
                          "x_mean": [0.5, 0], "x_scale": [2, 1]})
    assert cli.main(["predict", model, str(tmp_path / "x.npy")]) == 0
    _, rows = read_csv(capsys.readouterr().out, is_text=True)
    net = bp.load(model)
    expected = net.predict(np.array([[0.25, 1.0]] * 4)).argmax(axis=1)
    assert [row[0] for row in rows] == [["a", "b", "7"][i] for i in expected]


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")
def test_load_errors_are_one_line(tmp_path, capsys, classification_csv):
    path, _ = classification_csv
    fifo = tmp_path / "fifo.npz"
    os.mkfifo(fifo)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04" + bytes(100))
    for model, message in ((fifo, "not a regular file"), (tmp_path, "is a directory"),
                           (garbage, "not a bpfast model file")):
        assert cli.main(["predict", str(model), str(path)]) == 1
        assert message in one_line_error(capsys, "predict")
    assert cli.main(["predict", str(garbage), str(fifo)]) == 1  # the data file: refused too
    one_line_error(capsys, "predict")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs FIFOs (POSIX)")
def test_train_to_a_special_file_is_one_line(tmp_path, capsys, classification_csv):
    path, _ = classification_csv
    fifo = tmp_path / "out.npz"
    os.mkfifo(fifo)
    status = cli.main(["train", str(path), "--target", "species", "--epochs", "1", "--quiet",
                       "--out", str(fifo)])
    assert status == 1
    assert "not a regular file" in one_line_error(capsys, "train")


@pytest.mark.parametrize("error, message", [
    (MemoryError(), "out of memory"),
    (MemoryError("cannot allocate 8.0 TiB"), "out of memory: cannot allocate 8.0 TiB"),
    (KeyError("surprise"), "unexpected KeyError"),
    (OverflowError("int too large\nsecond line"), "unexpected OverflowError: int too large "
                                                  "second line"),
])
def test_any_exception_is_one_line(python_model, tmp_path, capsys, monkeypatch, error,
                                   message):
    model = python_model({})

    def fail(*args, **kwargs):
        raise error
    monkeypatch.setattr(cli, "load", fail)
    assert cli.main(["predict", model, str(tmp_path / "x.npy")]) == 1
    assert message in one_line_error(capsys, "predict")


def test_unexpected_metadata_in_a_child_process(python_model, tmp_path):
    model = python_model({"task": "classification"})
    result = run_module("predict", model, str(tmp_path / "x.npy"))
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.startswith("bpfast predict: error: ") and result.stderr.count(
        "\n") == 1, result.stderr


@pytest.mark.skipif(os.name != "posix", reason="a POSIX pipe and head(1)")
@pytest.mark.parametrize("data, options, first", [
    ("x.npy", [], b"prediction_0,prediction_1\n"),
    ("x.csv", ["--proba"], b"cat,dog\n")])
def test_a_closed_pipe_ends_quietly(tmp_path, data, options, first):
    # `bpfast predict model data | head -1`: far more output than a pipe holds, so the
    # writer meets the closed pipe; it stops with status 141 and says nothing
    net = bp.Network([bp.Dense(3, 2)], seed=0)
    X = np.random.default_rng(0).normal(size=(50_000, 3))
    if data.endswith(".csv"):
        bp.save(net, tmp_path / "model.npz", metadata={"task": "classification",
                                                      "classes": ["cat", "dog"]})
        np.savetxt(tmp_path / data, X, delimiter=",", header="a,b,c", comments="")
    else:
        bp.save(net, tmp_path / "model.npz")
        np.save(tmp_path / data, X)
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(bp.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [package_parent, os.environ.get("PYTHONPATH")])))
    producer = subprocess.Popen(
        [sys.executable, "-m", "bpfast", "predict", str(tmp_path / "model.npz"),
         str(tmp_path / data), *options], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=env)
    head = subprocess.Popen(["head", "-1"], stdin=producer.stdout, stdout=subprocess.PIPE)
    producer.stdout.close()  # only head reads the pipe now
    first_line, _ = head.communicate(timeout=120)
    stderr = producer.communicate(timeout=120)[1].decode()
    assert first_line == first
    assert stderr == "" and producer.returncode == cli.EXIT_CLOSED_PIPE


# --------------------------------------------------------------------------- CSV files, end to end
def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def two_moons_table(n=120, seed=0):
    """Features (n, 2) and text labels of two noisy classes."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 2)) * [1.0, 3.0] + [5.0, -2.0]
    labels = np.where(X[:, 0] - 5.0 + (X[:, 1] + 2.0) / 3 > 0, "yes", "no")
    return X, labels


def training_part(n, seed=0, fraction=0.1):
    return cli.split_indices(n, fraction, seed)


def bpfast(*args, child=False):
    """Run the command line: in this process (fast), or with child=True as `python -m
    bpfast` in a child process (the end-to-end check); the exit status and the output."""
    if child:
        return run_module(*args)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            status = cli.main(list(args))
        except SystemExit as exit_info:  # a usage error
            status = exit_info.code
    return subprocess.CompletedProcess(args, status, out.getvalue(), err.getvalue())


def bpfast_ok(*args, child=False):
    result = bpfast(*args, child=child)
    assert result.returncode == 0, result.stderr
    return result


def bpfast_fails(*args, child=False):
    """A failed run: its error line (the last line of stderr; any before are warnings),
    after checking the form."""
    result = bpfast(*args, child=child)
    assert result.returncode == 1, (result.stdout, result.stderr)
    *warnings, error = result.stderr.splitlines(keepends=True)
    assert all(line.startswith(f"bpfast {args[0]}: warning: ") for line in warnings)
    assert "Traceback" not in result.stderr and error.count("\n") == 1, result.stderr
    assert error.startswith(f"bpfast {args[0]}: error: "), result.stderr
    return error


def test_header_rule():
    rule = cli._first_row_is_header
    assert rule([["a", "b"], ["1", "2"]])                # names above numbers
    assert not rule([["1", "2.5"], ["3", "4"]])           # all numbers: data
    assert not rule([["1.5", "yes"], ["2", "no"]])        # text above text: data
    assert rule([["x", "label"], ["1", "yes"]])           # "x" above numbers
    assert rule([["", "a"], ["0", "1"]])                  # pandas' unnamed index column
    assert rule([["species", "color"], ["cat", "red"]])   # nothing numeric at all
    assert not rule([["NA", "3"], ["1", "2"]])            # a missing cell is no name


@pytest.mark.parametrize("with_header", [True, False])
def test_csv_with_and_without_header_row(tmp_path, with_header):
    """A file without a header row loses no row: the model's feature means are those of
    every training row, and the labels come back in the same order."""
    X, labels = two_moons_table()
    rows = [f"{a!r},{b!r},{label}" for (a, b), label in zip(X.tolist(), labels, strict=True)]
    data = write_lines(tmp_path / "data.csv", (["f1,f2,label"] if with_header else []) + rows)
    target = "label" if with_header else "2"
    model = str(tmp_path / "model.npz")
    out = bpfast_ok("train", data, "--target", target, "--epochs", "30", "--lr", "0.02",
                    "--out", model, child=not with_header).stdout
    assert f"{len(X)} samples, 2 features" in out
    metadata = bp.io.read_header(model)["metadata"]
    train, _ = training_part(len(X))
    np.testing.assert_allclose(metadata["x_mean"], X[train].mean(axis=0), rtol=1e-12)
    assert metadata["features"] == (["f1", "f2"] if with_header else None)
    assert metadata["classes"] == ["no", "yes"]
    predicted = bpfast_ok("predict", model, data).stdout.splitlines()
    assert predicted[0] == ("label" if with_header else "column 2")
    assert len(predicted) == len(X) + 1
    assert np.mean(np.array(predicted[1:]) == labels) > 0.9


def test_header_options_force_the_rule(tmp_path):
    # a header of numbers looks like data: --header says it is not
    lines = ["1,2,3"] + [f"{i},{2 * i},{i % 2}" for i in range(40)]
    data = write_lines(tmp_path / "years.csv", lines)
    model = str(tmp_path / "m.npz")
    out = bpfast_ok("train", data, "--header", "--target", "3", "--epochs", "1",
                    "--out", model, child=True).stdout
    assert "40 samples" in out
    assert bp.io.read_header(model)["metadata"]["features"] == ["1", "2"]
    out = bpfast_ok("train", data, "--target", "2", "--epochs", "1", "--out", model).stdout
    assert "41 samples" in out  # detected: the numbers are data
    # --no-header on a file that has one: the names are read as data, and refused
    named = write_lines(tmp_path / "named.csv", ["a,b,c"] + lines[1:])
    err = bpfast_fails("train", named, "--no-header", "--target", "2")
    assert "line 1, column 0: 'a' is not a number" in err and "drop --no-header" in err
    err = bpfast_fails("train", data, "--target", "label")
    assert "no header row" in err and "--header" in err


@pytest.mark.parametrize("delimiter, option", [(";", None), ("\t", None), (";", ";"),
                                               ("\t", "tab"), ("|", "|")])
def test_delimiters(tmp_path, delimiter, option):
    X, labels = two_moons_table(60)
    lines = [delimiter.join(["a", "b", "label"])] + [
        delimiter.join([repr(a), repr(b), label]) for (a, b), label in zip(X.tolist(), labels,
                                                                            strict=True)]
    data = write_lines(tmp_path / "data.txt", lines)
    model = str(tmp_path / "m.npz")
    bpfast_ok("train", data, "--target", "label", "--epochs", "1", "--out", model, "--quiet",
              *(["--delimiter", option] if option else []), child=option == "tab")
    metadata = bp.io.read_header(model)["metadata"]
    train, _ = training_part(len(X))
    assert metadata["features"] == ["a", "b"]
    np.testing.assert_allclose(metadata["x_mean"], X[train].mean(axis=0), rtol=1e-12)


def test_a_wrong_delimiter_is_explained(tmp_path):
    data = write_lines(tmp_path / "d.csv", ["a;b;y", "1;2;0", "3;4;1"])
    err = bpfast_fails("train", data, "--delimiter", ",", "--target", "y")
    assert "no column 'y'; columns: a;b;y" in err


def test_missing_values_and_text_columns_name_the_column(tmp_path):
    X, labels = two_moons_table(50)
    cells = [[repr(a), repr(b), label] for (a, b), label in zip(X.tolist(), labels, strict=True)]
    cells[6][1] = "NA"
    cells[9][1] = ""
    data = write_lines(tmp_path / "gaps.csv", ["a,b,label"] + [",".join(c) for c in cells])
    err = bpfast_fails("train", data, "--target", "label", child=True)
    assert "column 'b' has 2 missing value(s), the first on line 8" in err
    assert "--impute mean" in err
    cells[6][1], cells[9][1] = "1.0", "2.0"
    cells[3][2] = ""
    data = write_lines(tmp_path / "no_label.csv", ["a,b,label"] + [",".join(c) for c in cells])
    assert "target column 'label' has 1 missing" in bpfast_fails("train", data, "--target",
                                                                 "label")
    text = write_lines(tmp_path / "text.csv", ["a,colour,label"] + [
        f"{a!r},{colour},{label}" for (a, _), colour, label in zip(
            X.tolist(), ["red", "blue"] * 25, labels, strict=True)])
    err = bpfast_fails("train", text, "--target", "label")
    assert "column 'colour' holds text ('red' on line 2)" in err
    # predict reads the same way
    model = str(tmp_path / "m.npz")
    bp.save(bp.Network([bp.Dense(2, 2)]), model)
    assert "column 'colour' holds text" in bpfast_fails("predict", model, text)


def test_impute_mean(tmp_path):
    """--impute mean fills a gap with the training part's mean, in train and predict."""
    X, labels = two_moons_table(80)
    holes = np.zeros(X.shape, dtype=bool)
    holes[[3, 17, 40], 0] = True
    holes[[5, 17], 1] = True
    cells = [["" if hole else repr(value) for value, hole in zip(row, row_holes, strict=True)]
             + [label] for row, row_holes, label in zip(X.tolist(), holes, labels, strict=True)]
    data = write_lines(tmp_path / "gaps.csv", ["a,b,label"] + [",".join(c) for c in cells])
    model = str(tmp_path / "m.npz")
    bpfast_ok("train", data, "--target", "label", "--impute", "mean", "--epochs", "3",
              "--out", model, "--quiet")
    metadata = bp.io.read_header(model)["metadata"]
    assert metadata["impute"] == "mean"
    train, _ = training_part(len(X))
    with_nan = np.where(holes, np.nan, X)
    mean = np.nanmean(with_nan[train], axis=0)
    np.testing.assert_allclose(metadata["x_mean"], mean, rtol=1e-12)
    np.testing.assert_allclose(metadata["x_scale"], np.nanstd(with_nan[train], axis=0),
                               rtol=1e-12)
    # predictions with gaps are the predictions of the same rows with the means filled in
    filled = np.where(holes, mean, X)
    np.savez(tmp_path / "filled.npz", X=filled)
    with_gaps = bpfast_ok("predict", model, data, "--proba", child=True).stdout
    complete = bpfast_ok("predict", model, str(tmp_path / "filled.npz"), "--proba").stdout
    np.testing.assert_allclose(np.loadtxt(with_gaps.splitlines()[1:], delimiter=","),
                               np.loadtxt(complete.splitlines()[1:], delimiter=","),
                               rtol=1e-6)
    # a model trained on complete data: predict fills gaps only when asked to
    np.savez(tmp_path / "complete.npz", X=X, y=labels)
    bpfast_ok("train", str(tmp_path / "complete.npz"), "--epochs", "2", "--out", model,
              "--quiet")
    features = write_lines(tmp_path / "features.csv",
                           ["a,b"] + [",".join(c[:2]) for c in cells])
    assert "column 'a' has 3 missing value(s)" in bpfast_fails("predict", model, features)
    with_gaps = bpfast_ok("predict", model, features, "--proba", "--impute", "mean").stdout
    complete = bpfast_ok("predict", model, str(tmp_path / "filled.npz"), "--proba").stdout
    assert with_gaps != complete  # other means: those of this model's training part
    x_mean = np.asarray(bp.io.read_header(model)["metadata"]["x_mean"])
    np.savez(tmp_path / "filled.npz", X=np.where(holes, x_mean, X))
    complete = bpfast_ok("predict", model, str(tmp_path / "filled.npz"), "--proba").stdout
    np.testing.assert_allclose(np.loadtxt(with_gaps.splitlines()[1:], delimiter=","),
                               np.loadtxt(complete.splitlines()[1:], delimiter=","),
                               rtol=1e-6)


# --------------------------------------------------------------------------- training options
def standardised(metadata, X):
    return (X - np.asarray(metadata["x_mean"])) / np.asarray(metadata["x_scale"])


def printed_values(out, key):
    """The per-epoch values of key in train's progress lines, by epoch number."""
    values = {}
    for line in out.splitlines():
        if line.startswith("epoch "):
            fields = line.split()
            values[int(fields[1].split("/")[0])] = float(fields[fields.index(key) + 1])
    return values


@pytest.fixture
def noisy_csv(tmp_path):
    """Few, noisy samples: a wide network overfits them, so val_loss turns up."""
    rng = np.random.default_rng(4)
    X = rng.normal(size=(80, 5))
    labels = np.where(X[:, 0] + rng.normal(scale=1.5, size=80) > 0, "b", "a")
    path = tmp_path / "noisy.csv"
    write_csv(path, ["x0", "x1", "x2", "x3", "x4", "y"],
              [[*row, label] for row, label in zip(X, labels, strict=True)])
    return str(path), X, labels


def validation_loss(model, X, labels, fraction=0.3):
    """The cross-entropy of the saved model on train's validation rows."""
    metadata = bp.io.read_header(model)["metadata"]
    _, validation = training_part(len(X), fraction=fraction)
    codes = np.searchsorted(metadata["classes"], labels[validation])
    output = bp.load(model).predict(standardised(metadata, X[validation]))
    return bp.CrossEntropy()(output, codes)


def test_early_stopping_restores_the_best_epoch(tmp_path, noisy_csv):
    data, X, labels = noisy_csv
    model = str(tmp_path / "m.npz")
    out = bpfast_ok("train", data, "--target", "y", "--hidden", "128,128", "--lr", "0.01",
                    "--epochs", "200", "--validation-split", "0.3", "--early-stopping",
                    "--patience", "3", "--out", model, child=True).stdout
    losses = printed_values(out, "val_loss")
    best_epoch = min(losses, key=losses.get)
    last_epoch = max(losses)
    assert last_epoch < 200 and last_epoch == best_epoch + 3  # Keras' patience count
    assert f"early stopping after epoch {last_epoch}" in out
    assert f"restored the weights of epoch {best_epoch}" in out
    assert validation_loss(model, X, labels) == pytest.approx(losses[best_epoch], abs=6e-5)


def test_save_best_keeps_the_best_epoch(tmp_path, noisy_csv):
    data, X, labels = noisy_csv
    model = str(tmp_path / "m.npz")
    out = bpfast_ok("train", data, "--target", "y", "--hidden", "128,128", "--lr", "0.01",
                    "--epochs", "25", "--validation-split", "0.3", "--save-best",
                    "--out", model, child=True).stdout
    losses = printed_values(out, "val_loss")
    best_epoch = min(losses, key=losses.get)
    assert max(losses) == 25 and best_epoch < 25  # it ran on, past the best epoch
    assert f"saved the model of epoch {best_epoch}" in out
    assert validation_loss(model, X, labels) == pytest.approx(losses[best_epoch], abs=6e-5)
    assert bp.io.read_header(model)["epochs_trained"] == best_epoch
    err = bpfast_fails("train", data, "--target", "y", "--save-best",
                       "--validation-split", "0")
    assert "--save-best needs validation samples" in err


def test_resume_continues_exactly(tmp_path, classification_csv):
    """2 epochs, then --resume for 3 more, is the 5-epoch run: weights, optimizer state,
    epoch count and the shuffling continue."""
    path, _ = classification_csv
    common = ("--target", "species", "--hidden", "8", "--seed", "3", "--quiet")
    whole, part = str(tmp_path / "whole.npz"), str(tmp_path / "part.npz")
    bpfast_ok("train", str(path), *common, "--epochs", "5", "--out", whole)
    bpfast_ok("train", str(path), *common, "--epochs", "2", "--out", part)
    first = bp.load(part).parameters
    out = bpfast_ok("train", str(path), "--resume", part, "--epochs", "3", child=True).stdout
    assert "resuming" in out and "after 2 epochs" in out and "epoch 5/5" in out
    assert f"saved the model to {part}" in out
    (a, opt_a), (b, opt_b) = (bp.load(f, with_optimizer=True) for f in (whole, part))
    assert not np.array_equal(first, b.parameters)
    np.testing.assert_array_equal(a.parameters, b.parameters)
    np.testing.assert_array_equal(opt_a._config.state, opt_b._config.state)
    assert b.epochs_trained == 5
    # the network is fixed; labels the model does not know are refused
    assert "--hidden cannot change it" in bpfast_fails("train", str(path), "--resume", part,
                                                       "--hidden", "4")
    other = tmp_path / "other.csv"
    write_csv(other, ["a", "species", "b", "c"], [[0, "rose", 1, 2], [1, "setosa", 2, 3]])
    assert "labels the model does not know: ['rose']" in bpfast_fails(
        "train", str(other), "--resume", part)


def test_predict_proba(tmp_path, classification_csv):
    path, names = classification_csv
    model = str(tmp_path / "m.npz")
    bpfast_ok("train", str(path), "--target", "species", "--epochs", "5", "--out", model,
              "--quiet", "--dtype", "float64")
    lines = bpfast_ok("predict", model, str(path), "--proba", child=True).stdout.splitlines()
    assert lines[0] == "setosa,versicolor,virginica"
    probabilities = np.loadtxt(lines[1:], delimiter=",")
    metadata = bp.io.read_header(model)["metadata"]
    X = np.loadtxt(path, delimiter=",", skiprows=1, usecols=(0, 2, 3))
    logits = bp.load(model).predict(standardised(metadata, X))
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probabilities, expected, rtol=1e-12)
    labels = bpfast_ok("predict", model, str(path)).stdout.splitlines()[1:]
    assert labels == [metadata["classes"][i] for i in probabilities.argmax(axis=1)]
    # a regression model has no probabilities
    reg = tmp_path / "r.npz"
    bp.save(bp.Network([bp.Dense(3, 1)]), reg, metadata={"task": "regression",
                                                         "y_mean": [0], "y_scale": [1]})
    assert "--proba needs a classification model" in bpfast_fails(
        "predict", str(reg), str(path), "--proba")


def test_predict_warns_when_the_feature_names_differ(tmp_path, classification_csv):
    path, _ = classification_csv
    model = str(tmp_path / "m.npz")
    bpfast_ok("train", str(path), "--target", "species", "--epochs", "3", "--out", model,
              "--quiet")
    X, _ = blobs(seed=9)
    same = tmp_path / "same.csv"
    write_csv(same, ["a", "b", "c"], X)
    renamed = tmp_path / "renamed.csv"
    write_csv(renamed, ["p", "q", "r"], X)
    expected = bpfast_ok("predict", model, str(same))
    assert expected.stderr == ""
    result = bpfast_ok("predict", model, str(renamed), child=True)
    assert result.stdout == expected.stdout  # by position
    assert result.stderr.startswith("bpfast predict: warning: ")
    assert "['p', 'q', 'r'] are not the model's features ['a', 'b', 'c']" in result.stderr
    assert "by position" in result.stderr


def test_divergence_names_the_epoch_and_a_flag_that_exists(tmp_path, classification_csv):
    path, _ = classification_csv
    model = str(tmp_path / "m.npz")
    bpfast_ok("train", str(path), "--target", "species", "--epochs", "2", "--out", model,
              "--quiet")
    # two epochs done: the third, numbered as the progress lines number it, diverges
    err = bpfast_fails("train", str(path), "--resume", model, "--optimizer", "sgd",
                       "--lr", "1e30", "--epochs", "3", child=True)
    assert "training diverged in epoch 3" in err and "--clip-norm 1.0" in err
    # weights that stay finite but give infinite outputs (was: "output contains -inf")
    err = bpfast_fails("train", str(path), "--target", "species", "--optimizer", "sgd",
                       "--lr", "1e30", "--batch-size", "200")
    assert "training diverged in epoch 1" in err
    # which train accepts, and which bounds each step: SGD moves the weights by lr * 1e-3
    rows = [line.split(",") for line in path.read_text().splitlines()[1:]]
    X = np.array([[float(r[0]), float(r[2]), float(r[3])] for r in rows])
    before = cli.build_network(3, [], 3, "relu", "float64", 0).parameters
    bpfast_ok("train", str(path), "--target", "species", "--hidden", "none", "--epochs", "1",
              "--optimizer", "sgd", "--lr", "0.5", "--clip-norm", "1e-3", "--batch-size",
              str(len(X)), "--validation-split", "0", "--dtype", "float64", "--out", model,
              "--quiet")
    step = bp.load(model).parameters - before
    # PyTorch's clip_grad_norm_ scales by max_norm / (norm + 1e-6)
    assert np.linalg.norm(step) == pytest.approx(0.5 * 1e-3, rel=1e-4)


@pytest.mark.parametrize("lr, warning", [("5", "unusually large"), ("1e-9", "unusually small"),
                                         ("0.01", None)])
def test_learning_rate_range(tmp_path, classification_csv, lr, warning):
    path, _ = classification_csv
    result = bpfast_ok("train", str(path), "--target", "species", "--epochs", "1", "--lr", lr,
                       "--out", str(tmp_path / "m.npz"), "--quiet", child=lr == "5")
    if warning is None:
        assert result.stderr == ""
    else:
        assert result.stderr.startswith(f"bpfast train: warning: --lr {float(lr):g} is "
                                        f"{warning}")
    result = bpfast("train", str(path), "--target", "species", "--lr", "0")
    assert result.returncode == 2


def test_file_errors_have_one_style(tmp_path, classification_csv):
    path, _ = classification_csv
    missing = str(tmp_path / "missing.npz")
    folder = str(tmp_path)
    model = str(tmp_path / "m.npz")
    bp.save(bp.Network([bp.Dense(3, 2)]), model)
    assert bpfast_fails("train", str(tmp_path / "missing.csv"), "--target", "y") == \
        f"bpfast train: error: {tmp_path / 'missing.csv'}: no such file\n"
    assert bpfast_fails("predict", missing, str(path), child=True) == \
        f"bpfast predict: error: {missing}: no such file\n"
    assert bpfast_fails("predict", model, folder) == \
        f"bpfast predict: error: {folder}: is a directory, not a file\n"
    assert bpfast_fails("train", folder, "--target", "y") == \
        f"bpfast train: error: {folder}: is a directory, not a file\n"
    assert bpfast_fails("train", str(path), "--resume", missing) == \
        f"bpfast train: error: {missing}: no such file\n"


# --------------------------------------------------------------------------- docs/cli.rst
CLI_PAGE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs",
                        "cli.rst")


def code_blocks(text):
    """(language, caption or None, body lines) of each ``.. code-block::`` of a page."""
    lines, blocks, i = text.splitlines(), [], 0
    while i < len(lines):
        match = re.match(r"\.\. code-block:: (\w+)\s*$", lines[i])
        i += 1
        if not match:
            continue
        caption = None
        while i < len(lines) and lines[i].strip().startswith(":"):
            if lines[i].strip().startswith(":caption:"):
                caption = lines[i].split(":caption:")[1].strip()
            i += 1
        body = []
        while i < len(lines) and (not lines[i].strip() or lines[i].startswith("   ")):
            body.append(lines[i][3:])
            i += 1
        blocks.append((match.group(1), caption, "\n".join(body).strip("\n").splitlines()))
    return blocks


def up_to_numbers(line):
    """A line with every number as #: the page shows one run's numbers."""
    return re.sub(r"\d[\d,]*(\.\d+)?(e[+-]?\d+)?", "#", line.rstrip())


def shows(shown, actual):
    """Whether the shown lines appear in the actual ones, in order, up to the numbers;
    "..." stands for any lines, and without it nothing may be left out."""
    actual = [up_to_numbers(line) for line in actual]
    wanted = [up_to_numbers(line) for line in shown if line != "..."]
    if "..." not in shown and len(wanted) != len(actual):
        return False
    position = 0
    for line in wanted:
        try:
            position = actual.index(line, position) + 1
        except ValueError:
            return False
    return True


def test_the_cli_page_runs(tmp_path, monkeypatch):
    """Every command of docs/cli.rst, in order, in a folder holding the page's files:
    its exit status, and its output as the page shows it (up to the numbers)."""
    if not os.path.exists(CLI_PAGE):  # tests/ copied alone (tools/test_lower_bounds.sh)
        pytest.skip("docs/cli.rst is not beside this copy of the tests")
    with open(CLI_PAGE, encoding="utf-8") as file:
        blocks = code_blocks(file.read())
    monkeypatch.chdir(tmp_path)
    commands = 0
    for language, caption, body in blocks:
        if caption:
            (tmp_path / caption).write_text("\n".join(body) + "\n")
        if language != "console":
            continue
        starts = [i for i, line in enumerate(body) if line.startswith("$ ")] + [len(body)]
        for start, end in zip(starts[:-1], starts[1:], strict=True):
            command, shown = body[start][2:], body[start + 1:end]
            words = shlex.split(command.split("|")[0])
            assert words[0] == "bpfast", command
            if words[1] == "export" and importlib.util.find_spec("onnx") is None:
                continue
            result = bpfast(*words[1:])
            expected_status = 1 if any(": error: " in line for line in shown) else 0
            assert result.returncode == expected_status, (command, result.stderr)
            out = result.stdout.splitlines()
            if "| head -" in command:
                out = out[:int(command.rsplit("-", 1)[1])]
            prefix = f"bpfast {words[1]}: "
            assert shows([line for line in shown if line.startswith(prefix)],
                         result.stderr.splitlines()), (command, result.stderr)
            assert shows([line for line in shown if not line.startswith(prefix)], out), \
                (command, result.stdout)
            commands += 1
    assert commands >= 15
