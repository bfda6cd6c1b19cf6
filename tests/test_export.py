"""Models leaving bpfast and coming back: ONNX (checked by ONNX Runtime), PyTorch, scikit-learn.

Oracles: ONNX Runtime running the exported graph, onnx's reference evaluator where
ONNX Runtime has no float64 kernel, PyTorch modules and optimizers, scikit-learn's
own estimators.
"""
import importlib.util
import io
import subprocess
import sys
import warnings

import numpy as np
import pytest

import bpfast as bp

try:  # optional: without them the ONNX tests skip and the PyTorch/scikit-learn ones run
    import onnx
    import onnxruntime as ort
except ImportError:
    onnx = ort = None
needs_onnx = pytest.mark.skipif(ort is None, reason="needs onnx and onnxruntime")

# ONNX Runtime 1.32 has no float64 kernel for Erf or Gelu: float64 GELU graphs are
# valid ONNX (full check) and run on onnx's reference evaluator
ORT_NO_FLOAT64 = {"gelu"}
HIDDEN = [name for name in bp.ACTIVATIONS if name != "softmax"]


def make_network(activation, bias=True, dtype="float64", seed=0, widths=(5, 8, 6, 3)):
    hidden = "tanh" if activation == "softmax" else activation
    layers = [bp.Dense(i, o, hidden, bias=bias) for i, o in zip(widths[:-2], widths[1:-1])]
    last = activation if activation != "leaky_relu" else "identity"
    layers.append(bp.Dense(widths[-2], widths[-1], last, bias=bias))
    if activation == "leaky_relu":
        layers[0] = bp.Dense(widths[0], widths[1], "leaky_relu", bias=bias, negative_slope=0.2)
    if activation == "elu":
        layers[0] = bp.Dense(widths[0], widths[1], "elu", bias=bias, alpha=0.7)
    network = bp.Network(layers, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed)
    for layer in network.layers:  # non-zero biases, so with/without bias differ
        if layer.use_bias:
            layer.bias[...] = rng.normal(size=layer.out_features)
    return network


def run_onnx(model, X, activation=None):
    if X.dtype == np.float64 and activation in ORT_NO_FLOAT64:
        from onnx.reference import ReferenceEvaluator
        from onnx.reference.op_run import OpRun
        from scipy.special import erf

        class Erf(OpRun):
            """Erf in the input's precision (onnx's reference Erf rounds to float32)."""

            def _run(self, x):
                return (erf(x),)

        class Gelu(OpRun):
            """The operator's definition in float64 (onnx's function body has float32
            constants)."""

            def _run(self, x, approximate="none"):
                return (0.5 * x * (1 + erf(x / np.sqrt(2.0))),)

        return ReferenceEvaluator(model, new_ops=[Erf, Gelu]).run(None, {"input": X})
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"input": X})


def inputs(n_rows, n_features, dtype, seed=1):
    # scale 8: softplus crosses its threshold (20) and the saturating activations saturate
    return (8 * np.random.default_rng(seed).normal(size=(n_rows, n_features))).astype(dtype)


def assert_close(actual, expected, dtype):
    if np.dtype(dtype) == np.float64:
        np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=1e-13)
    else:
        # 1e-5 relative; the absolute floor covers outputs that cancel to near 0 (gelu
        # of a negative input: erf near -1), where both runtimes' float32 erf differ by ulps
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- ONNX export
@needs_onnx
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("activation", bp.ACTIVATIONS)
def test_onnx_runtime_matches_predict(activation, bias, dtype):
    network = make_network(activation, bias, dtype)
    model = network.to_onnx()
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 13
    props = {prop.key: prop.value for prop in model.metadata_props}
    assert props["bpfast_version"] == bp.__version__
    element = model.graph.input[0].type.tensor_type.elem_type
    assert onnx.helper.tensor_dtype_to_np_dtype(element) == np.dtype(dtype)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    for n_rows in (1, 7, 1000):
        X = inputs(n_rows, network.n_inputs, dtype, seed=n_rows)
        (output,) = run_onnx(model, X, activation)
        assert output.dtype == np.dtype(dtype) and output.shape == (n_rows, network.n_outputs)
        assert_close(output, network.predict(X), dtype)
    again = bp.Network.from_onnx(model)
    assert again.dtype == network.dtype and repr(again) == repr(network)
    X = inputs(50, network.n_inputs, dtype)
    assert np.array_equal(again.predict(X), network.predict(X))


@needs_onnx
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_gelu_operator_from_opset_20(dtype):
    network = make_network("gelu", dtype=dtype)
    low, high = network.to_onnx(), network.to_onnx(opset=20)
    assert "Erf" in {node.op_type for node in low.graph.node}
    assert "Gelu" in {node.op_type for node in high.graph.node}
    X = inputs(7, network.n_inputs, dtype)
    assert_close(run_onnx(high, X, "gelu")[0], network.predict(X), dtype)
    assert np.array_equal(bp.Network.from_onnx(high).predict(X), network.predict(X))


@needs_onnx
@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softplus_above_its_threshold_is_exact(dtype):
    # bpfast returns z above 20; a bare ONNX Softplus would give log1p(exp(z)), off by
    # up to 2.1e-9 (visible in float64): the export gives z itself
    network = bp.Network([bp.Dense(1, 1, "softplus")], dtype=dtype)
    network.layers[0].weight[...] = 1.0
    network.layers[0].bias[...] = 0.0
    X = np.array([[-800.0], [-40.0], [-1e-9], [0.0], [19.5], [20.0], [20.5], [21.0], [80.0],
                  [800.0]], dtype)
    (output,) = run_onnx(network.to_onnx(), X)
    assert np.array_equal(output[X[:, 0] > 20], X[X[:, 0] > 20])
    assert_close(output, network.predict(X), dtype)
    assert np.isfinite(output).all()


@needs_onnx
def test_to_onnx_writes_a_file_and_refuses_a_bad_opset(tmp_path):
    network = make_network("relu")
    path = tmp_path / "model.onnx"
    assert network.to_onnx(path) is not None and path.exists()
    X = inputs(3, network.n_inputs, "float64")
    assert np.array_equal(bp.Network.from_onnx(path).predict(X), network.predict(X))
    assert np.array_equal(bp.Network.from_onnx(str(path)).predict(X), network.predict(X))
    for opset in (12, 10_000, 13.0, "17", True):
        with pytest.raises(ValueError, match="opset must be an integer from 13"):
            network.to_onnx(opset=opset)
    assert network.to_onnx(opset=17).opset_import[0].version == 17


# --------------------------------------------------------------------------- ONNX import
def graph_model(nodes, initializers, n_in=3, n_out=2, opset=13, element=None, outputs=None):
    element = element or onnx.TensorProto.DOUBLE
    graph = onnx.helper.make_graph(
        nodes, "g", [onnx.helper.make_tensor_value_info("x", element, ["n", n_in])],
        outputs or [onnx.helper.make_tensor_value_info("y", element, ["n", n_out])],
        initializer=[onnx.numpy_helper.from_array(value, name)
                     for name, value in initializers.items()])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])


@needs_onnx
def test_matmul_add_chain_with_identity_and_flatten():
    rng = np.random.default_rng(0)
    W1, b1, W2 = rng.normal(size=(3, 4)), rng.normal(size=(1, 4)), rng.normal(size=(4, 2))
    make = onnx.helper.make_node
    model = graph_model([make("Flatten", ["x"], ["f"], axis=1), make("MatMul", ["f", "W1"], ["m"]),
                         make("Add", ["b1", "m"], ["a"]), make("Tanh", ["a"], ["t"]),
                         make("Identity", ["t"], ["i"]), make("MatMul", ["i", "W2"], ["y"])],
                        {"W1": W1, "b1": b1, "W2": W2})
    network = bp.Network.from_onnx(model)
    assert [layer.activation for layer in network.layers] == ["tanh", "identity"]
    assert network.layers[1].bias is None
    X = rng.normal(size=(6, 3))
    np.testing.assert_allclose(network.predict(X), np.tanh(X @ W1 + b1) @ W2, rtol=1e-13)


@needs_onnx
def test_torch_onnx_export_loads():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.GELU(), torch.nn.Linear(6, 5),
                                 torch.nn.LeakyReLU(0.3), torch.nn.Linear(5, 3),
                                 torch.nn.Softmax(dim=-1)).eval()
    X = torch.randn(9, 4)
    for opset in (17, 20):  # GELU as Erf nodes (17) and as the Gelu operator (20)
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                torch.onnx.export(module, (X,), buffer, dynamo=False, opset_version=opset,
                                  input_names=["x"], output_names=["y"],
                                  dynamic_axes={"x": {0: "batch"}})
            except Exception as error:  # exporter needing packages not installed here
                pytest.skip(f"torch.onnx.export does not work here: {error}")
        network = bp.Network.from_onnx(onnx.load_from_string(buffer.getvalue()))
        assert [layer.activation for layer in network.layers] == ["gelu", "leaky_relu",
                                                                  "softmax"]
        with torch.no_grad():
            expected = module(X).numpy()
        np.testing.assert_allclose(network.predict(X.numpy()), expected, rtol=1e-5, atol=1e-7)


@needs_onnx
def test_skl2onnx_classifier_loads():
    pytest.importorskip("sklearn")
    skl2onnx = pytest.importorskip("skl2onnx")
    from skl2onnx.common.data_types import FloatTensorType
    from sklearn.neural_network import MLPClassifier
    rng = np.random.default_rng(0)
    X = rng.normal(size=(80, 4))
    y = rng.integers(0, 3, 80)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        classifier = MLPClassifier((7,), activation="tanh", max_iter=50, random_state=0).fit(X, y)
    model = skl2onnx.convert_sklearn(classifier, initial_types=[("X", FloatTensorType([None, 4]))],
                                     options={id(classifier): {"zipmap": False}})
    with pytest.raises(ValueError, match="say which one"):
        bp.Network.from_onnx(model)
    network = bp.Network.from_onnx(model, output="probabilities")
    assert network.dtype == np.float32
    np.testing.assert_allclose(network.predict(X.astype(np.float32)),
                               classifier.predict_proba(X), rtol=1e-5, atol=1e-6)


def corrupt_cases():
    make = onnx.helper.make_node
    W = np.ones((3, 2))
    yield "Conv", graph_model([make("Conv", ["x", "W"], ["y"])], {"W": W}), "operator Conv"
    yield "tanh Gelu", graph_model([make("Gemm", ["x", "W"], ["z"]),
                                    make("Gelu", ["z"], ["y"], approximate="tanh")],
                                   {"W": W}, opset=20), "approximate='tanh'"
    yield "hidden softmax", graph_model([make("MatMul", ["x", "W"], ["z"]),
                                         make("Softmax", ["z"], ["r"]),
                                         make("MatMul", ["r", "W2"], ["y"])],
                                        {"W": W, "W2": np.ones((2, 2))}), "softmax is only"
    yield "alpha", graph_model([make("Gemm", ["x", "W"], ["y"], alpha=2.0)], {"W": W}), "alpha=1"
    yield "branch", graph_model([make("MatMul", ["x", "W"], ["z"]), make("Relu", ["z"], ["r"]),
                                 make("Add", ["z", "r"], ["y"])], {"W": W}), "feeds 2 nodes"
    yield "weight input", graph_model([make("MatMul", ["x", "x"], ["y"])], {}), "constant"
    yield "int input", graph_model([make("MatMul", ["x", "W"], ["y"])], {"W": W},
                                   element=onnx.TensorProto.INT64), "float32 or float64"
    yield "softmax axis", graph_model([make("MatMul", ["x", "W"], ["z"]),
                                       make("Softmax", ["z"], ["y"], axis=0)],
                                      {"W": W}), "axis 0"


@needs_onnx
@pytest.mark.parametrize("case", list(corrupt_cases()) if onnx else [],
                         ids=lambda case: case[0])
def test_unsupported_graphs_are_named(case):
    _, model, message = case
    with pytest.raises(ValueError, match=message):
        bp.Network.from_onnx(model)


@needs_onnx
def test_corrupt_onnx_file(tmp_path):
    path = tmp_path / "bad.onnx"
    good = make_network("relu").to_onnx().SerializeToString()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="bad.onnx"):
        bp.Network.from_onnx(path)
    path.write_bytes(b"not onnx at all")
    with pytest.raises(ValueError, match="bad.onnx"):
        bp.Network.from_onnx(path)
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        bp.Network.from_onnx(good[: len(good) // 2])
    with pytest.raises(FileNotFoundError):
        bp.Network.from_onnx(tmp_path / "missing.onnx")
    network = bp.Network.from_onnx(good)  # bytes
    assert network.n_inputs == 5


# --------------------------------------------------------------------------- state dict
def test_state_dict_keys_follow_sequential_and_load_round_trips():
    network = make_network("relu", widths=(4, 6, 5, 3))
    sd = network.state_dict()
    assert list(sd) == ["0.weight", "0.bias", "2.weight", "2.bias", "4.weight", "4.bias"]
    assert sd["2.weight"].shape == (5, 6)
    sd["0.weight"][0, 0] += 1.0  # a copy: the network is unchanged
    assert network.layers[0].weight[0, 0] != sd["0.weight"][0, 0]
    other = make_network("relu", widths=(4, 6, 5, 3), seed=9)
    other.load_state_dict(sd)
    assert other.layers[0].weight[0, 0] == sd["0.weight"][0, 0]
    assert np.array_equal(other.layers[2].bias, network.layers[2].bias)


def test_load_state_dict_refuses_and_changes_nothing():
    network = make_network("tanh", widths=(4, 6, 3))
    before = network.parameters.copy()
    good = network.state_dict()
    bad_cases = [
        ({**good, "1.weight": good["0.weight"]}, ValueError, "unexpected keys"),
        ({k: v for k, v in good.items() if k != "2.bias"}, ValueError, "missing keys"),
        ({**good, "2.bias": np.zeros(4)}, ValueError, "shape"),
        ({**good, "0.weight": good["0.weight"].T}, ValueError, "shape"),
        ({**good, "2.bias": np.zeros(3, dtype=int)}, TypeError, "dtype"),
        ({**good, "2.bias": [0.0, 0.0, 0.0]}, TypeError, "NumPy array"),
        (list(good.items()), TypeError, "mapping"),
    ]
    for values, error, message in bad_cases:
        # the first entry is valid new data: it must not be applied when a later one fails
        if isinstance(values, dict):
            values = {**values, "0.bias": np.full(6, 5.0)} if "0.bias" in values else values
        with pytest.raises(error, match=message):
            network.load_state_dict(values)
        assert np.array_equal(network.parameters, before)


# --------------------------------------------------------------------------- torch
torch_cases = [(activation, bias) for activation in bp.ACTIVATIONS for bias in (True, False)]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("activation,bias", torch_cases)
def test_to_torch_and_from_torch(activation, bias, dtype):
    torch = pytest.importorskip("torch")
    network = make_network(activation, bias, dtype)
    module = network.to_torch().eval()
    assert list(module.state_dict()) == list(network.state_dict())
    X = inputs(7, network.n_inputs, dtype)
    with torch.no_grad():
        output = module(torch.from_numpy(X)).numpy()
    # relative to each value, with a floor relative to the outputs' scale (float32 sums
    # of 8 products in another order differ by a few ulps of the largest term)
    scale = np.abs(output).max()
    tolerance = 1e-6 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(network.predict(X), output, rtol=tolerance,
                               atol=tolerance * scale)
    back = bp.Network.from_torch(module)
    assert repr(back) == repr(network)
    assert np.array_equal(back.parameters, network.parameters)
    # and a module built in torch, loaded by its state dict as well
    network.load_state_dict(module.state_dict())
    assert np.array_equal(back.parameters, network.parameters)


def test_from_torch_refuses_what_bpfast_cannot_represent():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    cases = [
        (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm2d(4)), "BatchNorm2d"),
        (nn.Sequential(nn.Linear(3, 4), nn.AlphaDropout(0.1)), "AlphaDropout"),
        (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, bias=False)), "without bias"),
        (nn.Sequential(nn.Linear(3, 4), nn.LayerNorm((2, 2))), "normalized_shape"),
        (nn.Sequential(nn.Linear(3, 4), nn.Dropout(1.0)), r"module 1 \(Dropout\).*p"),
        (nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(5)), "takes 5 inputs"),
        (nn.Sequential(nn.Linear(3, 4), nn.Softplus(beta=2)), "beta=1, threshold=20"),
        (nn.Sequential(nn.Linear(3, 4), nn.GELU(approximate="tanh")), "approximate"),
        (nn.Sequential(nn.Linear(3, 4), nn.Softmax(dim=0)), "dim=0"),
        (nn.Sequential(nn.Linear(3, 4).double(), nn.Linear(4, 2)), "one dtype"),
        (nn.Sequential(nn.Linear(3, 4), nn.Softmax(dim=-1), nn.Linear(4, 2)), "softmax"),
        (nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Softmax(dim=-1), nn.Linear(4, 2)),
         "softmax"),
        (nn.Sequential(), "no Linear"),
    ]
    for module, message in cases:
        with pytest.raises(ValueError, match=message):
            bp.Network.from_torch(module)
    with pytest.raises(TypeError, match="Sequential"):
        bp.Network.from_torch(nn.Linear(3, 4))



# the data of the side-by-side trajectories: 4 batches of 8 rows, 5 features, 3 classes
_trajectory_rng = np.random.default_rng(3)
TRAJECTORY_X = _trajectory_rng.normal(size=(32, 5))
TRAJECTORY_Y = _trajectory_rng.integers(0, 3, 32)


def _train_side_by_side(torch, ours, bp_optimizer, module, torch_optimizer):
    """20 steps of cross-entropy on the same batches in bpfast and in torch; torch's
    state_dict afterwards, as NumPy arrays."""
    X, y = TRAJECTORY_X, TRAJECTORY_Y
    loss_function = torch.nn.CrossEntropyLoss()
    for step in range(20):
        rows = slice(8 * (step % 4), 8 * (step % 4) + 8)
        ours.train_step(X[rows], y[rows], bp.CrossEntropy(), bp_optimizer)
        torch_optimizer.zero_grad()
        loss_function(module(torch.from_numpy(X[rows])), torch.from_numpy(y[rows])).backward()
        torch_optimizer.step()
    return {key: value.detach().numpy() for key, value in module.state_dict().items()}


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_torch_round_trip_then_same_training_trajectory(optimizer):
    torch = pytest.importorskip("torch")
    network = make_network("tanh", widths=(5, 16, 8, 3))
    module = network.to_torch()
    ours = bp.Network.from_torch(bp.Network.from_torch(module).to_torch())
    if optimizer == "sgd":
        bp_optimizer = bp.SGD(lr=0.05, momentum=0.9)
        torch_optimizer = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    else:
        bp_optimizer = bp.Adam(lr=0.01)
        torch_optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
    trained = _train_side_by_side(torch, ours, bp_optimizer, module, torch_optimizer)
    assert not np.allclose(trained["0.weight"], network.state_dict()["0.weight"])
    for key, value in ours.state_dict().items():
        np.testing.assert_allclose(value, trained[key], rtol=1e-10, atol=1e-12)


# --------------------------------------------------------------------------- scikit-learn
def sklearn_cases():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 4))
    yield "binary", "classifier", X, np.where(X[:, 0] + X[:, 1] > 0, "yes", "no")
    yield "multiclass", "classifier", X, np.array([3, 7, 9])[rng.integers(0, 3, 60)]
    yield "multilabel", "classifier", X, (X[:, :3] > 0).astype(int)
    yield "regression", "regressor", X, X @ rng.normal(size=4)
    yield "multi-output", "regressor", X, X @ rng.normal(size=(4, 2))


@pytest.mark.parametrize("case", list(sklearn_cases()), ids=lambda case: case[0])
def test_sklearn_interchange(case):
    pytest.importorskip("sklearn")
    from sklearn import neural_network

    import bpfast.sklearn as bpsk
    name, kind, X, y = case
    theirs_class = neural_network.MLPClassifier if kind == "classifier" \
        else neural_network.MLPRegressor
    ours_class = bpsk.MLPClassifier if kind == "classifier" else bpsk.MLPRegressor
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fitted = theirs_class(hidden_layer_sizes=(6,), activation="tanh", max_iter=40,
                              random_state=0).fit(X, y)
    ours = ours_class.from_sklearn(fitted)
    back = ours.to_sklearn()
    assert type(back) is theirs_class
    for estimator in (ours, back):
        assert np.array_equal(estimator.predict(X), fitted.predict(X)) if kind == "classifier" \
            else np.allclose(estimator.predict(X), fitted.predict(X), rtol=1e-12, atol=1e-12)
        if kind == "classifier":
            np.testing.assert_allclose(estimator.predict_proba(X), fitted.predict_proba(X),
                                       rtol=1e-12, atol=1e-12)
            assert np.array_equal(estimator.classes_, fitted.classes_)
    # bpfast's regressor reports the loss summed over outputs (bpfast.sklearn's docstring)
    factor = y.shape[1] if name == "multi-output" else 1
    np.testing.assert_allclose(ours.loss_curve_, np.multiply(fitted.loss_curve_, factor),
                               rtol=1e-12)
    np.testing.assert_allclose(back.loss_curve_, fitted.loss_curve_, rtol=1e-12)
    assert ours.n_iter_ == back.n_iter_ == fitted.n_iter_


def fitted_estimator(case):
    import bpfast.sklearn as bpsk
    name, kind, X, y = case
    ours_class = bpsk.MLPClassifier if kind == "classifier" else bpsk.MLPRegressor
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return ours_class(hidden_layer_sizes=(6,), activation="relu", max_iter=40,
                          random_state=0).fit(X, y)


@needs_onnx
@pytest.mark.parametrize("case", list(sklearn_cases()), ids=lambda case: case[0])
def test_estimator_to_onnx(case):
    pytest.importorskip("sklearn")
    name, kind, X, y = case
    ours = fitted_estimator(case)
    model = ours.to_onnx()
    outputs = run_onnx(model, X)
    if kind == "classifier":
        label, probabilities = outputs
        assert [value.name for value in model.graph.output] == ["label", "probabilities"]
        assert np.array_equal(label, ours.predict(X))
        np.testing.assert_allclose(probabilities, ours.predict_proba(X), rtol=1e-12,
                                   atol=1e-13)
    else:
        assert [value.name for value in model.graph.output] == ["variable"]
        np.testing.assert_allclose(outputs[0].reshape(ours.predict(X).shape), ours.predict(X),
                                   rtol=1e-12, atol=1e-12)


@needs_onnx
@pytest.mark.parametrize("case", [case for case in sklearn_cases() if case[0] in (
    "multiclass", "multilabel", "multi-output")], ids=lambda case: case[0])
def test_estimator_with_batch_norm_and_dropout_to_onnx(case):
    pytest.importorskip("sklearn")
    import bpfast.sklearn as bpsk
    name, kind, X, y = case
    ours_class = bpsk.MLPClassifier if kind == "classifier" else bpsk.MLPRegressor
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = ours_class(hidden_layer_sizes=(6, 5), batch_norm=True, dropout=0.2,
                          max_iter=20, random_state=0).fit(X, y)
    model = ours.to_onnx()
    outputs = run_onnx(model, X)
    if kind == "classifier":
        assert np.array_equal(outputs[0], ours.predict(X))
        assert_close(outputs[1], ours.predict_proba(X), "float64")
    else:
        assert_close(outputs[0], ours.predict(X), "float64")


def test_from_sklearn_refuses_other_estimators():
    pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPRegressor

    import bpfast.sklearn as bpsk
    with pytest.raises(TypeError, match="sklearn.neural_network.MLPClassifier"):
        bpsk.MLPClassifier.from_sklearn(LogisticRegression())
    with pytest.raises(TypeError, match="MLPClassifier"):
        bpsk.MLPClassifier.from_sklearn(MLPRegressor())


# --------------------------------------------------------------------------- the rest
def test_import_bpfast_imports_neither_onnx_nor_torch():
    code = ("import sys, bpfast, bpfast.export, bpfast.sklearn; "
            "print(sorted({'onnx', 'onnxruntime', 'torch', 'skl2onnx'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True, timeout=120)
    assert result.stdout.strip() == "[]"


@needs_onnx
def test_cli_export(tmp_path, capsys):
    from bpfast import cli
    network = make_network("relu", dtype="float32")
    network.save(tmp_path / "model.npz", metadata={"x_mean": [0.0] * 5, "x_scale": [1.0] * 5})
    assert cli.main(["export", str(tmp_path / "model.npz"), str(tmp_path / "m.onnx")]) == 0
    X = inputs(7, 5, "float32")
    model = onnx.load(tmp_path / "m.onnx")
    assert_close(run_onnx(model, X)[0], network.predict(X), "float32")
    assert "bpfast_metadata" in {prop.key for prop in model.metadata_props}
    assert cli.main(["export", str(tmp_path / "missing.npz"), str(tmp_path / "x.onnx")]) == 1
    assert "bpfast export: error:" in capsys.readouterr().err
    torch = pytest.importorskip("torch")
    assert cli.main(["export", str(tmp_path / "model.npz"), str(tmp_path / "m.pt"),
                     "--format", "torch"]) == 0
    loaded = network.to_torch()
    loaded.load_state_dict(torch.load(tmp_path / "m.pt"))
    assert np.array_equal(bp.Network.from_torch(loaded).parameters, network.parameters)


@needs_onnx
@pytest.mark.parametrize("task", ["classification", "regression"])
def test_cli_export_of_a_trained_model_predicts_as_bpfast_predict(task, tmp_path, capsys):
    from bpfast import cli
    rng = np.random.default_rng(0)
    X = 5 + 3 * rng.normal(size=(90, 3))  # far from standardised, so the scaling matters
    y = np.array(["low", "mid", "high"])[(X[:, 0] > 5).astype(int) + (X[:, 1] > 5)] \
        if task == "classification" else 100 + 10 * X @ [1.0, -2.0, 0.5]
    np.savez(tmp_path / "data.npz", X=X, y=y)
    assert cli.main(["train", str(tmp_path / "data.npz"), "--epochs", "3", "--quiet",
                     "--hidden", "6", "--dtype", "float64",
                     "--out", str(tmp_path / "model.npz")]) == 0
    assert cli.main(["predict", str(tmp_path / "model.npz"), str(tmp_path / "data.npz"),
                     "--out", str(tmp_path / "predicted.csv")]) == 0
    assert cli.main(["export", str(tmp_path / "model.npz"), str(tmp_path / "model.onnx")]) == 0
    capsys.readouterr()
    predicted = np.loadtxt(tmp_path / "predicted.csv", skiprows=1, delimiter=",",
                           dtype=str if task == "classification" else float)
    outputs = run_onnx(onnx.load(tmp_path / "model.onnx"), X)
    if task == "classification":
        assert np.array_equal(outputs[0], predicted)
        np.testing.assert_allclose(outputs[1].sum(axis=1), 1.0, rtol=1e-12)
    else:
        np.testing.assert_allclose(outputs[0].ravel(), predicted, rtol=1e-12)


# --------------------------------------------------------------------------- other layer kinds
# (kind, constructor): each goes between Dense(5, 8, "tanh") and Dense(8, 3)
LAYER_CASES = {
    "dropout": lambda: bp.Dropout(0.3),
    "batch_norm1d": lambda: bp.BatchNorm1d(8),
    "batch_norm1d_plain": lambda: bp.BatchNorm1d(8, affine=False, eps=1e-3),
    "layer_norm": lambda: bp.LayerNorm(8),
    "layer_norm_no_bias": lambda: bp.LayerNorm(8, bias=False),
    "layer_norm_plain": lambda: bp.LayerNorm(8, elementwise_affine=False),
    "activation": lambda: bp.Activation("leaky_relu", negative_slope=0.2),
}


def make_layer_network(case, dtype, seed=0):
    network = bp.Network([bp.Dense(5, 8, "tanh"), LAYER_CASES[case](), bp.Dense(8, 3)],
                         dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed)
    layer = network.layers[1]
    for name in ("weight", "bias", "running_mean"):  # away from the initial 1s and 0s
        if getattr(layer, name, None) is not None:
            getattr(layer, name)[...] = rng.normal(size=getattr(layer, name).shape)
    if getattr(layer, "running_var", None) is not None:
        layer.running_var[...] = rng.uniform(0.05, 3.0, size=layer.running_var.shape)
        layer.num_batches_tracked[...] = 17
    return network


def expected_after_onnx(network):
    """What from_onnx(to_onnx(network)) gives: no Dropout (the graph is the inference
    model); float32 normalisation operators carry a Scale (and BatchNormalization a B)
    always, so those come back affine."""
    layers = []
    for layer in network.layers:
        if isinstance(layer, bp.Dropout):
            continue
        if network.dtype == np.float32 and isinstance(layer, bp.BatchNorm1d):
            layer = bp.BatchNorm1d(layer.num_features, eps=layer.eps)
        elif network.dtype == np.float32 and isinstance(layer, bp.LayerNorm):
            layer = bp.LayerNorm(layer.out_features, eps=layer.eps,
                                 bias=layer.use_bias and layer.elementwise_affine)
        else:
            layer = type(layer)(**layer.arguments())
        layers.append(layer)
    return repr(bp.Network(layers, dtype=network.dtype))


@needs_onnx
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_layer_kinds_through_onnx_runtime(case, dtype):
    network = make_layer_network(case, dtype)
    model = network.to_onnx()
    onnx.checker.check_model(model, full_check=True)
    ops = [node.op_type for node in model.graph.node]
    # LayerNormalization (opset 17) only where it is used: float32 LayerNorm
    uses_layer_norm = case.startswith("layer_norm") and dtype == "float32"
    assert model.opset_import[0].version == (17 if uses_layer_norm else 13)
    assert ("LayerNormalization" in ops) == uses_layer_norm
    assert ("BatchNormalization" in ops) == (case.startswith("batch") and dtype == "float32")
    assert "Dropout" not in ops
    for n_rows in (1, 7, 1000):
        X = inputs(n_rows, network.n_inputs, dtype, seed=n_rows)
        (output,) = run_onnx(model, X)
        assert output.dtype == np.dtype(dtype) and output.shape == (n_rows, 3)
        assert_close(output, network.predict(X), dtype)
    again = bp.Network.from_onnx(model)
    assert repr(again) == expected_after_onnx(network)
    X = inputs(50, network.n_inputs, dtype)
    assert np.array_equal(again.predict(X), network.predict(X))


@needs_onnx
def test_layer_norm_float64_at_opset_18_and_every_kind_in_one_graph():
    # ReduceMean takes its axes as an input from opset 18
    network = bp.Network([bp.Dropout(0.1), bp.Dense(5, 8), bp.BatchNorm1d(8),
                          bp.Activation("relu"), bp.LayerNorm(8), bp.Dense(8, 6, "elu", alpha=0.5),
                          bp.LayerNorm(6, bias=False), bp.Dropout(0.2), bp.Dense(6, 3)],
                         dtype="float64", seed=2)
    for opset in (13, 18):
        model = network.to_onnx(opset=opset)
        X = inputs(20, 5, "float64")
        assert_close(run_onnx(model, X)[0], network.predict(X), "float64")
        again = bp.Network.from_onnx(model)
        assert [type(layer).__name__ for layer in again.layers] == [
            "Dense", "BatchNorm1d", "Activation", "LayerNorm", "Dense", "LayerNorm", "Dense"]
        assert np.array_equal(again.predict(X), network.predict(X))


@needs_onnx
def test_layer_kinds_that_onnx_cannot_hold_are_named():
    network = bp.Network([bp.Dense(3, 4), bp.BatchNorm1d(4, track_running_stats=False)])
    with pytest.raises(ValueError, match=r"1 \(BatchNorm1d.*track_running_stats=False"):
        network.to_onnx()
    # float32 operators take eps as a float32 attribute: refused unless it reads back
    network = bp.Network([bp.Dense(3, 4), bp.LayerNorm(4, eps=1.2345678912e-5)])
    with pytest.raises(ValueError, match=r"1 \(LayerNorm.*eps=1.2345678912e-05"):
        network.to_onnx()
    network = bp.Network([bp.Dense(3, 4), bp.LayerNorm(4, eps=1.2345678912e-5)],
                         dtype="float64")  # float64: a float64 constant, exact
    assert bp.Network.from_onnx(network.to_onnx()).layers[1].eps == 1.2345678912e-5
    network = bp.Network([bp.Dense(3, 4), bp.LayerNorm(4)])
    with pytest.raises(ValueError, match="opset must be an integer from 17"):
        network.to_onnx(opset=13)

    class MyDropout(bp.Dropout):
        """A layer kind the exporter does not know (its behaviour could be anything)."""

    network = bp.Network([bp.Dense(3, 4), MyDropout(0.5)])
    has_torch = importlib.util.find_spec("torch") is not None
    for convert in [network.to_onnx, network.state_dict] + [network.to_torch] * has_torch:
        with pytest.raises(ValueError, match=r"layer 1 \(Dropout\(p=0.5\)\): MyDropout"):
            convert()


@needs_onnx
def test_onnx_normalization_and_dropout_nodes_from_elsewhere():
    make = onnx.helper.make_node
    rng = np.random.default_rng(0)
    W = rng.normal(size=(4, 3)).astype(np.float32)
    stats = {name: rng.uniform(0.5, 2, size=4).astype(np.float32)
             for name in ("s", "b", "m", "v")}
    element = onnx.TensorProto.FLOAT
    model = graph_model([make("Gemm", ["x", "W"], ["g"], transB=1),
                         make("Dropout", ["g", "ratio"], ["d"]),
                         make("BatchNormalization", ["d", "s", "b", "m", "v"], ["n"],
                              epsilon=1e-3, momentum=0.8),
                         make("LayerNormalization", ["n", "s"], ["y"], epsilon=1e-4)],
                        {"W": W, "ratio": np.array(0.25, np.float32), **stats},
                        n_out=4, opset=17, element=element)
    network = bp.Network.from_onnx(model)
    assert repr(network.layers[1:]) == repr([bp.Dropout(0.25), bp.BatchNorm1d(4, eps=1e-3,
                                             momentum=0.2), bp.LayerNorm(4, eps=1e-4,
                                                                         bias=False)])
    X = inputs(9, 3, "float32")
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    assert_close(network.predict(X), session.run(None, {"x": X})[0], "float32")
    training = graph_model([make("Gemm", ["x", "W"], ["g"], transB=1),
                            make("Dropout", ["g", "ratio", "on"], ["y"])],
                           {"W": W, "ratio": np.array(0.25, np.float32),
                            "on": np.array(True)}, n_out=4, opset=17, element=element)
    with pytest.raises(ValueError, match="training_mode is on"):
        bp.Network.from_onnx(training)
    axis = graph_model([make("Gemm", ["x", "W"], ["g"], transB=1),
                        make("LayerNormalization", ["g", "s"], ["y"], axis=0)],
                       {"W": W, "s": stats["s"]}, n_out=4, opset=17, element=element)
    with pytest.raises(ValueError, match="axis 0"):
        bp.Network.from_onnx(axis)


def test_activations_that_no_linear_takes_become_activation_layers():
    torch = pytest.importorskip("torch")
    nn = torch.nn
    module = nn.Sequential(nn.ReLU(), nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ELU(0.5),
                           nn.Linear(4, 2), nn.Tanh(), nn.Sigmoid()).double().eval()
    network = bp.Network.from_torch(module)
    assert repr(network.layers) == repr([
        bp.Activation("relu"), bp.Dense(3, 4), bp.BatchNorm1d(4), bp.Activation("elu", alpha=0.5),
        bp.Dense(4, 2, "tanh"), bp.Activation("sigmoid")])
    X = inputs(6, 3, "float64")
    with torch.no_grad():
        np.testing.assert_allclose(network.predict(X), module(torch.from_numpy(X)).numpy(),
                                   rtol=1e-12)
    assert list(network.state_dict()) == list(module.state_dict())


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("case", list(LAYER_CASES))
def test_layer_kinds_to_torch_and_back(case, dtype):
    torch = pytest.importorskip("torch")
    network = make_layer_network(case, dtype)
    module = network.to_torch().eval()
    assert list(module.state_dict()) == list(network.state_dict())
    X = inputs(7, network.n_inputs, dtype)
    with torch.no_grad():
        output = module(torch.from_numpy(X)).numpy()
    tolerance = 1e-6 if dtype == "float32" else 1e-12
    np.testing.assert_allclose(network.predict(X), output, rtol=tolerance,
                               atol=tolerance * np.abs(output).max())
    back = bp.Network.from_torch(module)
    assert repr(back) == repr(network)
    assert np.array_equal(back.parameters, network.parameters)
    assert np.array_equal(back.buffers, network.buffers)
    other = make_layer_network(case, dtype, seed=5)
    other.load_state_dict(module.state_dict())  # torch tensors, num_batches_tracked int64
    assert np.array_equal(other.parameters, network.parameters)
    assert np.array_equal(other.buffers, network.buffers)


def test_batch_norm_state_dict_checks_and_changes_nothing():
    network = make_layer_network("batch_norm1d", "float64")
    sd = network.state_dict()
    assert list(sd) == ["0.weight", "0.bias", "2.weight", "2.bias", "2.running_mean",
                        "2.running_var", "2.num_batches_tracked", "3.weight", "3.bias"]
    assert sd["2.num_batches_tracked"].dtype == np.int64 and sd["2.num_batches_tracked"] == 17
    before = network.parameters.copy(), network.buffers.copy()
    for key, value, error in [("2.running_var", np.ones(7), ValueError),
                              ("2.num_batches_tracked", np.array(-1), TypeError),
                              ("2.num_batches_tracked", np.array(2.5), TypeError),
                              ("2.num_batches_tracked", np.array([3]), TypeError)]:
        # the other entries are valid new values: none may be applied
        values = {name: array + 1 for name, array in sd.items()}
        values[key] = value
        with pytest.raises(error, match=key.replace(".", r"\.")):
            network.load_state_dict(values)
        assert np.array_equal(network.parameters, before[0])
        assert np.array_equal(network.buffers, before[1])


def test_torch_round_trip_with_normalization_then_same_training_trajectory():
    torch = pytest.importorskip("torch")
    network = bp.Network([bp.Dense(5, 16, "tanh"), bp.BatchNorm1d(16), bp.Dense(16, 8, "relu"),
                          bp.LayerNorm(8), bp.Dense(8, 3)], dtype="float64", seed=1)
    module = network.to_torch()
    ours = bp.Network.from_torch(bp.Network.from_torch(module).to_torch())
    bp_optimizer = bp.SGD(lr=0.05, momentum=0.9)
    torch_optimizer = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9)
    module.train()
    trained = _train_side_by_side(torch, ours, bp_optimizer, module, torch_optimizer)
    assert trained["2.num_batches_tracked"] == 20
    for key, value in ours.state_dict().items():
        np.testing.assert_allclose(value, trained[key], rtol=1e-10, atol=1e-12, err_msg=key)
    module.eval()
    with torch.no_grad():
        X = TRAJECTORY_X
        np.testing.assert_allclose(ours.predict(X), module(torch.from_numpy(X)).numpy(),
                                   rtol=1e-10, atol=1e-12)


@needs_onnx
def test_torch_onnx_export_with_normalization_and_dropout_loads():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    nn = torch.nn
    module = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.BatchNorm1d(6), nn.Dropout(0.2),
                           nn.Linear(6, 5), nn.Tanh(), nn.LayerNorm(5), nn.Linear(5, 3))
    with torch.no_grad():  # running statistics away from 0 and 1
        module[2].running_mean.uniform_(-1, 1)
        module[2].running_var.uniform_(0.5, 2)
    module.eval()
    X = torch.randn(9, 4)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(module, (X,), buffer, dynamo=False, opset_version=17,
                              input_names=["x"], output_names=["y"],
                              dynamic_axes={"x": {0: "batch"}})
        except Exception as error:  # exporter needing packages not installed here
            pytest.skip(f"torch.onnx.export does not work here: {error}")
    network = bp.Network.from_onnx(onnx.load_from_string(buffer.getvalue()))
    with torch.no_grad():
        expected = module(X).numpy()
    np.testing.assert_allclose(network.predict(X.numpy()), expected, rtol=1e-5, atol=1e-6)
