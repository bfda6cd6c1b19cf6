"""bp.explain: the chain-rule trace against the published worked examples, the engine's
own gradients (bit for bit), PyTorch's autograd, and Graphviz."""
import copy
import re
import shutil
import subprocess

import numpy as np
import pytest
from test_textbook import DW1, DW2, LOSS, NEW_LOSS, OUT, W1_NEW, W2_NEW, H

import bpfast as bp
from bpfast.cli import main
from bpfast.explain import example


def run_example(name):
    case = example(name)
    trace = bp.explain(case["net"], case["X"], case["y"], case["loss"], case["optimizer"])
    return case, trace


# --------------------------------------------------------------------------- the textbook
def test_textbook_example_prints_its_numbers():
    case, trace = run_example("textbook")
    text = str(trace)
    for number in ("0.622459", "0.311230", "0.048432", "0.193728", "0.036570", "0.480627",
                   "0.496343", "0.044628"):
        assert number in text, number
    assert "dL/dw2 = dL/dy * dy/dw2 = (y - t) * h = 0.311230 * 0.622459 = 0.193728" in text
    assert ("dL/dw1 = dL/dh * dh/dz_h * dz_h/dw1 = dL/dh * h (1 - h) * x = "
            "0.155615 * 0.235004 * 1.000000 = 0.036570") in text
    assert "w2 <- w2 - lr * dL/dw2 = 0.500000 - 0.1 * 0.193728 = 0.480627" in text
    # the values, exactly (the closed form of tests/test_textbook.py)
    assert trace.forward[0].a[0, 0] == pytest.approx(H, abs=1e-15)
    assert trace.output[0, 0] == pytest.approx(OUT, abs=1e-15)
    assert trace.loss_value == pytest.approx(LOSS, abs=1e-15)
    assert trace.backward[1].dW[0, 0] == pytest.approx(DW2, abs=1e-15)
    assert trace.backward[0].dW[0, 0] == pytest.approx(DW1, abs=1e-15)
    assert trace.update[1].weight[0, 0] == pytest.approx(W2_NEW, abs=1e-15)
    assert trace.update[0].weight[0, 0] == pytest.approx(W1_NEW, abs=1e-15)
    assert trace.loss_after == pytest.approx(NEW_LOSS, abs=1e-15)
    np.testing.assert_array_equal(case["net"].parameters, [0.5, 0.5])  # unchanged


def test_command_line_with_no_arguments_explains_the_textbook_example(capsys):
    assert main(["explain"]) == 0
    text = capsys.readouterr().out
    for number in ("0.622459", "0.311230", "0.048432", "0.193728", "0.036570", "0.480627",
                   "0.496343"):
        assert number in text, number
    # and states the published, rounded values
    for published in ("0.6225", "0.3112", "0.0484", "0.1938", "0.0365", "0.4806", "0.4963",
                      "0.0447"):
        assert published in text.split("Note")[1], published


# --------------------------------------------------------------------------- Mazur
# Matt Mazur, "A Step by Step Backpropagation Example" (2015): the published numbers
MAZUR = {"out_h1": "0.593269992", "out_h2": "0.596884378", "out_o1": "0.75136507",
         "out_o2": "0.772928465", "E_total": "0.298371109", "dE/dw5": "0.082167041",
         "w5": "0.35891648", "w6": "0.408666186", "w7": "0.511301270", "w8": "0.561370121",
         "w1": "0.149780716", "w2": "0.19956143", "w3": "0.24975114", "w4": "0.29950229"}


def within_printed_precision(value, published):
    decimals = len(published.split(".")[1])
    return abs(value - float(published)) <= 0.5 * 10.0 ** -decimals


def test_mazur_network_reproduces_the_published_numbers():
    _, trace = run_example("mazur")
    hidden, output = trace.forward[0].a[0], trace.forward[1].a[0]
    new_w = np.concatenate([u.weight.ravel() for u in trace.update])
    got = {"out_h1": hidden[0], "out_h2": hidden[1], "out_o1": output[0],
           "out_o2": output[1], "E_total": trace.loss_value,
           "dE/dw5": trace.backward[1].dW[0, 0],
           **{f"w{i + 1}": new_w[i] for i in range(8)}}
    for key, published in MAZUR.items():
        assert within_printed_precision(got[key], published), (key, got[key], published)
    text = trace.format(9)
    for key in ("out_h1", "out_o1", "E_total", "dE/dw5", "w5", "w6", "w7", "w8", "w1"):
        assert MAZUR[key] in text, key
    assert ("dL/dw5 = dL/dy1 * dy1/dz_y1 * dz_y1/dw5 = (y1 - t1) * y1 (1 - y1) * h1 = "
            "0.741365070 * 0.186815602 * 0.593269992 = 0.082167041") in text


def test_command_line_examples_and_dot(tmp_path, capsys):
    dot_file = tmp_path / "mazur.dot"
    assert main(["explain", "--example", "mazur", "--dot", str(dot_file)]) == 0
    text = capsys.readouterr().out
    assert "0.298371109" in text and "0.35891648" in text
    assert dot_file.read_text().startswith("digraph")
    assert main(["explain", "--example", "softmax", "--digits", "4"]) == 0
    text = capsys.readouterr().out
    assert "delta_y3 = dL/dz_y3 = (y3 - t3)" in text


# --------------------------------------------------------------------------- the engine's
NETWORKS = {
    "sigmoid-mse": (lambda: [bp.Dense(3, 4, "sigmoid"), bp.Dense(4, 2)], "mse", "real"),
    "tanh-softmax-ce": (lambda: [bp.Dense(3, 5, "tanh"), bp.Dense(5, 3, "softmax")],
                        bp.CrossEntropy(from_logits=False), "labels"),
    "relu-logits-ce": (lambda: [bp.Dense(3, 4, "relu"), bp.Dense(4, 4, "gelu", bias=False),
                                bp.Dense(4, 3)], bp.CrossEntropy(reduction="sum"), "labels"),
    "elu-sigmoid-bce": (lambda: [bp.Dense(3, 4, "elu", alpha=0.5), bp.Dense(4, 2, "sigmoid")],
                        bp.BinaryCrossEntropy(from_logits=False), "binary"),
    "softplus-softmax-mse": (lambda: [bp.Dense(3, 4, "softplus"),
                                      bp.Dense(4, 3, "leaky_relu", negative_slope=0.2),
                                      bp.Dense(3, 3, "softmax")],
                             bp.MSE(half=True, reduction="sum"), "real3"),
    "wide": (lambda: [bp.Dense(3, 16, "tanh"), bp.Dense(16, 8, "relu"), bp.Dense(8, 2)],
             bp.Huber(), "real"),
}


def make_case(name, dtype, n_rows, seed=0):
    make_layers, loss, target_kind = NETWORKS[name]
    net = bp.Network(make_layers(), dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n_rows, 3))
    n_out = net.n_outputs
    y = {"real": rng.standard_normal((n_rows, n_out)),
         "real3": rng.random((n_rows, n_out)),
         "labels": rng.integers(0, n_out, n_rows),
         "binary": rng.integers(0, 2, (n_rows, n_out)).astype(float)}[target_kind]
    return net, X, y, loss


@pytest.mark.parametrize("weighted", [False, True], ids=["unweighted", "weighted"])
@pytest.mark.parametrize("n_rows", [1, 5, 40])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("name", NETWORKS)
def test_every_gradient_is_the_engines_bit_for_bit(name, dtype, n_rows, weighted):
    net, X, y, loss = make_case(name, dtype, n_rows)
    weights = np.random.default_rng(1).random(n_rows) + 0.1 if weighted else None
    trace = bp.explain(net, X, y, loss, sample_weight=weights)
    twin = copy.deepcopy(net)
    value = twin.compute_gradients(X, y, loss, sample_weight=weights)
    assert trace.gradients_match_engine
    assert trace.loss_value == value
    for layer, grads in zip(twin.layers, trace.backward, strict=True):
        np.testing.assert_array_equal(grads.dW, layer.grad_weight)
        if layer.bias is not None:
            np.testing.assert_array_equal(grads.db, layer.grad_bias)
    np.testing.assert_array_equal(trace.gradients, twin.gradients)
    np.testing.assert_array_equal(trace.output, twin.predict(X))


@pytest.mark.parametrize("name", NETWORKS)
def test_intermediates_match_torch_autograd(name):
    """z, a, dL/da and delta of every layer against PyTorch's autograd (float64)."""
    torch = pytest.importorskip("torch")
    net, X, y, loss = make_case(name, "float64", 4, seed=2)
    trace = bp.explain(net, X, y, loss)
    loss = bp.losses.get_loss(loss)
    module = net.to_torch()
    current = torch.tensor(X)
    zs, outputs = [], []
    modules = list(module)
    position = 0
    for layer in net.layers:
        z = modules[position](current)
        z.retain_grad()
        position += 1
        a = z
        if layer.activation != "identity":
            a = modules[position](z)
            position += 1
        a.retain_grad()
        zs.append(z)
        outputs.append(a)
        current = a
    out = outputs[-1]
    target = torch.tensor(y)
    if isinstance(loss, bp.CrossEntropy):
        value = -(torch.log(out) if not loss.from_logits else torch.log_softmax(out, 1))[
            torch.arange(len(y)), target].sum()
    elif isinstance(loss, bp.BinaryCrossEntropy):
        value = torch.nn.functional.binary_cross_entropy(out, target, reduction="sum")
    elif isinstance(loss, bp.Huber):
        value = torch.nn.functional.huber_loss(out, target, reduction="sum")
    else:
        value = ((out - target) ** 2).sum() * (0.5 if loss.half else 1.0)
    if loss.reduction == "mean":
        value = value / (len(y) if isinstance(loss, bp.CrossEntropy) else out.numel())
    value.backward()
    assert trace.loss_value == pytest.approx(value.item(), rel=1e-12)
    for passed, grads, z, a in zip(trace.forward, trace.backward, zs, outputs, strict=True):
        np.testing.assert_allclose(passed.z, z.detach().numpy(), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(passed.a, a.detach().numpy(), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(grads.delta, z.grad.numpy(), rtol=1e-10, atol=1e-15)
        if grads.grad_output is not None:
            np.testing.assert_allclose(grads.grad_output, a.grad.numpy(), rtol=1e-10,
                                       atol=1e-15)
        if grads.activation_derivative is not None:
            expected = torch.autograd.functional.jacobian(
                lambda t, m=passed: _activation(torch, m.layer, t), z[0].detach())
            np.testing.assert_allclose(grads.activation_derivative[0],
                                       torch.diagonal(expected).numpy(), rtol=1e-10,
                                       atol=1e-15)


def _activation(torch, layer, z):
    F = torch.nn.functional
    return {"identity": lambda: z, "sigmoid": lambda: torch.sigmoid(z),
            "tanh": lambda: torch.tanh(z), "relu": lambda: F.relu(z),
            "leaky_relu": lambda: F.leaky_relu(z, layer.activation_param),
            "elu": lambda: F.elu(z, layer.activation_param), "softplus": lambda: F.softplus(z),
            "gelu": lambda: F.gelu(z)}[layer.activation]()


# --------------------------------------------------------------------------- the step
@pytest.mark.parametrize("make_optimizer", [lambda: bp.SGD(lr=0.1),
                                            lambda: bp.SGD(lr=0.1, momentum=0.9),
                                            lambda: bp.Adam(lr=0.01)],
                         ids=["sgd", "momentum", "adam"])
def test_explain_changes_nothing_unless_apply(make_optimizer):
    net, X, y, loss = make_case("tanh-softmax-ce", "float32", 6)
    optimizer = make_optimizer()
    net.train_step(X, y, loss, optimizer)  # an optimizer with state and steps
    net.compute_gradients(X[:2], y[:2], loss)
    before = (net.parameters.copy(), net.gradients.copy(), optimizer.step_count,
              {k: v.copy() for k, v in optimizer.state.items()}, net._rng_state())
    twin, twin_optimizer = _twin(net, optimizer)
    trace = bp.explain(net, X, y, loss, optimizer)
    np.testing.assert_array_equal(net.parameters, before[0])
    np.testing.assert_array_equal(net.gradients, before[1])
    assert optimizer.step_count == before[2] and net._rng_state() == before[4]
    for key, value in optimizer.state.items():
        np.testing.assert_array_equal(value, before[3][key])
    # the trace's update is the engine's train_step, bit for bit
    twin.train_step(X, y, loss, twin_optimizer)
    new = np.concatenate([np.concatenate([u.weight.ravel(), u.bias]) for u in trace.update])
    np.testing.assert_array_equal(new, twin.parameters)
    # apply=True takes that step on the network itself
    bp.explain(net, X, y, loss, optimizer, apply=True)
    np.testing.assert_array_equal(net.parameters, twin.parameters)
    assert optimizer.step_count == before[2] + 1


def _twin(net, optimizer):
    """An independent copy of the network and its optimizer with its state (a save and
    load, in memory)."""
    state = net._get_state(optimizer)
    twin = bp.Network._from_state(state)
    twin_optimizer = bp.Optimizer._from_state(state["optimizer"])
    twin_optimizer._restore(twin, state["optimizer_state"], state["optimizer"]["step_count"])
    return twin, twin_optimizer


def test_apply_without_optimizer_fills_the_gradients():
    net, X, y, loss = make_case("sigmoid-mse", "float64", 3)
    parameters = net.parameters.copy()
    trace = bp.explain(net, X, y, loss, apply=True)
    np.testing.assert_array_equal(net.gradients, trace.gradients)
    np.testing.assert_array_equal(net.parameters, parameters)
    assert trace.update == [] and "Update" not in str(trace)


# --------------------------------------------------------------------------- forms
def test_large_network_uses_the_summary_form():
    net, X, y, loss = make_case("wide", "float64", 12)
    assert net.n_parameters > 50
    trace = bp.explain(net, X, y, loss, bp.SGD(lr=0.1))
    text = str(trace)
    assert not trace.detailed
    assert "dW1 = delta1^T A0   (16, 3)" in text and "largest" in text
    assert not re.search(r"dL/dw\d+ =", text)
    norm = np.linalg.norm(trace.backward[0].dW)
    assert f"||dW1|| = {norm:.6f}" in text
    small = bp.explain(net, X[:1], y[:1], loss, max_terms=10_000)
    assert small.detailed and "dL/dw1 =" in str(small)


def test_markdown_has_latex_formulas():
    _, trace = run_example("textbook")
    markdown = trace.to_markdown()
    assert "### Backward pass" in markdown
    assert (r"$$ \frac{\partial L}{\partial w_{2}} = \frac{\partial L}{\partial y} \cdot "
            r"\frac{\partial y}{\partial w_{2}} = (y - t) \cdot h = 0.311230 \cdot 0.622459 "
            r"= 0.193728 $$") in markdown


@pytest.mark.parametrize("case", ["textbook", "mazur", "softmax", "wide"])
def test_dot_is_valid_graphviz(case, tmp_path):
    if case == "wide":
        net, X, y, loss = make_case("wide", "float64", 12)
        trace = bp.explain(net, X, y, loss)
    else:
        trace = run_example(case)[1]
    text = trace.to_dot()
    assert text.startswith("digraph backprop {") and text.rstrip().endswith("}")
    assert text.count("{") == text.count("}")
    if shutil.which("dot") is None:
        pytest.skip("Graphviz's dot is not installed")
    result = subprocess.run(["dot", "-Tsvg"], input=text, capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert "<svg" in result.stdout and result.stderr == ""


# --------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_before_anything_changes():
    net, X, y, loss = make_case("sigmoid-mse", "float64", 3)
    parameters = net.parameters.copy()
    with pytest.raises(TypeError, match="bpfast.Network"):
        bp.explain("net", X, y, loss)
    with pytest.raises(ValueError, match="features"):
        bp.explain(net, X[:, :2], y, loss)
    with pytest.raises(ValueError, match="target"):
        bp.explain(net, X, y[:, :1], loss)
    with pytest.raises(ValueError, match="max_terms"):
        bp.explain(net, X, y, loss, max_terms=-1)
    other = bp.Network([bp.Dense(3, 2)], seed=0)
    busy = bp.SGD(lr=0.1)
    other.train_step(np.ones((1, 3), np.float32), np.ones((1, 2), np.float32), "mse", busy)
    with pytest.raises(ValueError, match="another Network"):
        bp.explain(net, X, y, loss, busy, apply=True)
    np.testing.assert_array_equal(net.parameters, parameters)


def test_command_line_explains_a_saved_model_on_a_csv_row(tmp_path, capsys):
    rng = np.random.default_rng(4)
    X = rng.standard_normal((30, 2))
    data = tmp_path / "data.csv"
    rows = ["a,b,label"] + [f"{a},{b},{'yes' if a + b > 0 else 'no'}" for a, b in X]
    data.write_text("\n".join(rows) + "\n")
    model = tmp_path / "model.npz"
    assert main(["train", str(data), "--target", "label", "--hidden", "2", "--epochs", "2",
                 "--quiet", "--out", str(model)]) == 0
    capsys.readouterr()
    assert main(["explain", "--model", str(model), "--data", str(data), "--row", "3"]) == 0
    text = capsys.readouterr().out
    assert "CrossEntropy" in text and "dL/dw1 =" in text and "bit for bit" in text
    assert main(["explain", "--model", str(model)]) == 1
    assert "--model needs --data" in capsys.readouterr().err
