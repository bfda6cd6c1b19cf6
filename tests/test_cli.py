"""The command line: train, predict, info and demo, in-process and as `python -m bpfast`."""
import csv
import os
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
def test_a_closed_pipe_ends_quietly(tmp_path):
    # `bpfast predict model data | head -1`: far more output than a pipe holds, so the
    # writer meets the closed pipe; it stops with status 141 and says nothing
    net = bp.Network([bp.Dense(3, 2)], seed=0)
    bp.save(net, tmp_path / "model.npz")
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(50_000, 3)))
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(bp.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [package_parent, os.environ.get("PYTHONPATH")])))
    producer = subprocess.Popen(
        [sys.executable, "-m", "bpfast", "predict", str(tmp_path / "model.npz"),
         str(tmp_path / "x.npy")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    head = subprocess.Popen(["head", "-1"], stdin=producer.stdout, stdout=subprocess.PIPE)
    producer.stdout.close()  # only head reads the pipe now
    first_line, _ = head.communicate(timeout=120)
    stderr = producer.communicate(timeout=120)[1].decode()
    assert first_line == b"prediction_0,prediction_1\n"
    assert stderr == "" and producer.returncode == cli.EXIT_CLOSED_PIPE
