"""Models that leave bpfast (and come back): ONNX, PyTorch state dicts and modules, scikit-learn.

Nothing here is imported by ``import bpfast``: onnx, onnxruntime, torch and
scikit-learn are optional and imported inside the functions that need them.
:class:`bpfast.Network` and the :mod:`bpfast.sklearn` estimators expose this
module through thin methods (``to_onnx``, ``from_onnx``, ``state_dict``,
``load_state_dict``, ``to_torch``, ``from_torch``, ``from_sklearn``,
``to_sklearn``).

How layer kinds are converted (one table, one entry per kind)
-------------------------------------------------------------
``LAYER_KINDS`` maps a layer class to a :class:`LayerKind`, which says for that
kind, and only there:

* ``opset(layer)``: the lowest ONNX opset that expresses the layer exactly
  (``to_onnx``'s default opset is the largest over the layers, at least
  ``MIN_OPSET``);
* ``onnx(layer, graph, x, name)``: the ONNX nodes from input ``x``, returning
  the output's name (or raising ValueError naming the layer when the layer
  cannot be expressed exactly at the opset asked for);
* ``torch_modules(layer)``: the ``torch.nn`` modules the layer becomes, in
  order, as ``(class name, constructor arguments, {parameter or buffer name:
  array})``, without importing torch. ``to_torch`` instantiates exactly this
  list and ``state_dict`` enumerates it, so both agree on the indices.

The way back is op-driven: ``_ONNX_ACTIVATIONS`` / ``_TORCH_ACTIVATIONS`` map an
ONNX operator / a torch module class to a bpfast activation (applied by the Dense
before it when that one has none yet, else an :class:`~bpfast.Activation` layer),
Gemm / MatMul(+Add) / ``Linear`` start a new Dense, ``_ONNX_LAYERS`` maps
Dropout, BatchNormalization and LayerNormalization nodes to layers, and
``network_from_torch`` reads Dropout, BatchNorm1d and LayerNorm modules.

Dropout, BatchNorm1d, LayerNorm, Activation
-------------------------------------------
* ``Dropout`` is the identity at inference: the graph has no node for it (as
  ``torch.onnx.export`` writes an ``eval()`` module), so ``from_onnx(to_onnx(net))``
  has no Dropout layers and predicts exactly the same. An ONNX ``Dropout`` node
  (training_mode off) reads back as ``Dropout(ratio)``; torch's ``nn.Dropout(p)``
  both ways.
* ``BatchNorm1d`` is *not* folded into the Gemm before it (folding would round the
  weights and lose the layer: no exact round trip). float32: a
  ``BatchNormalization`` node with the running statistics (``epsilon`` the layer's
  eps, ``momentum`` ONNX's ``1 - momentum``); a non-affine layer writes a Scale of
  ones and a B of zeros, so it reads back affine (the same outputs). float64:
  ``(x - running_mean) * Reciprocal(Sqrt(running_var + eps)) [* weight] [+ bias]``
  with float64 constants (the operator's ``epsilon`` is a float32 attribute), which
  is bpfast's order of operations. ``track_running_stats=False`` (batch statistics at
  inference) is a ValueError naming the layer.
* ``LayerNorm`` float32: ``LayerNormalization`` (opset 17, so such a network's
  default opset is 17; the others keep 13); without elementwise_affine the Scale is
  ones (reads back affine). float64: ReduceMean, Sub, Mul, ReduceMean, then as
  BatchNorm1d's float64 form (bpfast's two passes; opset 13).
* float32 operators take eps as a float32 attribute, read back as its shortest
  decimal: an eps that would not read back the same (``1.2345678912e-5``) is a
  ValueError naming the layer; float64 graphs keep any eps exactly.
* ``Activation`` is its activation's nodes (or torch module; ``nn.Identity`` for
  the identity).

State-dict indices
------------------
``state_dict`` uses the keys of the ``torch.nn.Sequential`` that ``to_torch``
builds: each Dense is a ``Linear`` at the next index, followed, unless its
activation is the identity, by the activation module at the index after it; every
other layer is one module. So ``[Dense(4, 8, "relu"), BatchNorm1d(8), Dense(8, 3)]``
is ``Sequential(Linear, ReLU, BatchNorm1d, Linear)`` with keys ``"0.weight",
"0.bias", "2.weight", "2.bias", "2.running_mean", "2.running_var",
"2.num_batches_tracked", "3.weight", "3.bias"`` (``num_batches_tracked`` an int64
of shape (), as in PyTorch; ``load_state_dict`` takes it as any integer-valued
count).

Exactness
---------
Every activation is exported as bpfast computes it: bpfast's softplus returns
``z`` above 20 (PyTorch's threshold) while ONNX ``Softplus`` has no threshold,
so it is exported as ``Where(z > 20, z, Softplus(z))``; GELU (the erf form, as
bpfast and PyTorch's default compute it) is the ``Gelu`` operator from opset 20
and ``z * 0.5 * (1 + Erf(z * sqrt(1/2)))`` below it. On import, a bare
``Softplus`` node (as other exporters write it) is read as bpfast's softplus,
which differs from it by at most ``log1p(exp(-20)) < 2.1e-9`` (absolute), only
where the input exceeds 20.

float64 graphs write LeakyRelu, Elu and Softplus with elementary operators
(``Where``, ``Greater``, ``Mul``, ``Exp``, ``Tanh``, ``Log``...): an ONNX float
attribute would round the slope or alpha to float32, and ONNX Runtime (1.32)
has no float64 kernel for those three operators. expm1 and log1p are written
without cancellation (``tanh(z/2) * (exp(z) + 1)``, Goldberg's
``u * log(1 + u) / ((1 + u) - 1)``), a few ulps from libm's. ONNX Runtime has
no float64 ``Erf``/``Gelu`` kernel either: a float64 GELU network exports to a
valid graph that ONNX Runtime refuses to run (the tests check it with onnx's
reference evaluator); nothing composed of ONNX operators computes erf exactly.
``from_onnx`` recognises these forms through templates written by the exporter
itself (``_templates``), so reading follows writing.
"""
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import __version__
from .layers import Activation, BatchNorm1d, Dense, Dropout, LayerNorm

__all__ = ["LAYER_KINDS", "MIN_OPSET", "LayerKind", "network_to_onnx", "network_from_onnx",
           "state_dict", "load_state_dict", "network_to_torch", "network_from_torch",
           "estimator_from_sklearn", "estimator_to_sklearn", "estimator_to_onnx",
           "pipeline_to_onnx"]

#: The lowest opset bpfast writes: the first where Softmax normalises along one axis
#: (earlier versions flatten to 2-D) and every operator used has its current definition.
MIN_OPSET = 13
#: Opset of the ``Gelu`` operator; below it GELU is written with ``Erf``.
GELU_OPSET = 20
#: Opset of the ``LayerNormalization`` operator (float32 LayerNorm needs it).
LAYER_NORM_OPSET = 17
#: PyTorch's (and bpfast's) softplus threshold, beta = 1: above it softplus(z) = z.
SOFTPLUS_THRESHOLD = 20.0
_SQRT1_2 = math.sqrt(0.5)


def _import(name, extra):
    try:
        return __import__(name)
    except ImportError:
        raise ImportError(f"this needs {name}: pip install {extra}") from None


# --------------------------------------------------------------------------- ONNX graph
class _Graph:
    """Nodes and initializers being collected for onnx.helper, with unique names."""

    def __init__(self, onnx, dtype, opset):
        self.onnx, self.dtype, self.opset = onnx, np.dtype(dtype), opset
        self.nodes, self.initializers, self._count = [], [], 0

    def constant(self, name, array):
        array = np.asarray(array)
        self.initializers.append(self.onnx.numpy_helper.from_array(array, name))
        return name

    def scalar(self, name, value):
        return self.constant(name, np.asarray(value, dtype=self.dtype))

    def node(self, op, inputs, output=None, **attributes):
        self._count += 1
        output = output or f"{op.lower()}_{self._count}"
        self.nodes.append(self.onnx.helper.make_node(
            op, list(inputs), [output], name=f"{op}_{self._count}", **attributes))
        return output


def _log1p_exp(graph, z, name, prefix):
    """float64 log1p(exp(z)) in nodes: log1p(u) = u * log(w) / (w - 1) with w = 1 + u
    (Goldberg), u where w rounds to 1; the Div's 0/0 only in the branch not taken."""
    u = graph.node("Exp", [z])
    w = graph.node("Add", [u, graph.scalar(f"{name}.{prefix}_one", 1.0)])
    w_minus_1 = graph.node("Sub", [w, graph.scalar(f"{name}.{prefix}_one_", 1.0)])
    ratio = graph.node("Div", [graph.node("Log", [w]), w_minus_1])
    return graph.node("Where", [
        graph.node("Equal", [w_minus_1, graph.scalar(f"{name}.{prefix}_zero", 0.0)]), u,
        graph.node("Mul", [u, ratio])])


def _custom_activation_error(layer, name, target):
    """The error for a layer whose activation is Python code (bpfast.CustomActivation)."""
    return ValueError(f"{name} ({layer!r}) has a custom Python activation "
                      f"{layer.activation!r}: {target} cannot hold Python functions; use a "
                      f"named activation ({', '.join(_TORCH_MODULES)}) to export")


def _activation_onnx(layer, graph, z, name):
    """The nodes applying layer's activation to z (exactly as bpfast computes it)."""
    activation = layer.activation
    if not isinstance(activation, str):
        raise _custom_activation_error(layer, name, "an ONNX graph")
    if activation == "identity":
        return z
    if activation == "silu":  # bpfast's (PyTorch's) formula: z / (1 + exp(-z))
        return graph.node("Div", [z, graph.node("Add", [
            graph.node("Exp", [graph.node("Neg", [z])]), graph.scalar(f"{name}.silu_one", 1.0)])])
    if activation == "mish":  # z * tanh(log1p(exp(z))), no threshold
        softplus = (graph.node("Softplus", [z]) if graph.dtype != np.float64
                    else _log1p_exp(graph, z, name, "mish"))
        return graph.node("Mul", [z, graph.node("Tanh", [softplus])])
    if activation == "hardtanh":
        return graph.node("Clip", [z, graph.scalar(f"{name}.hardtanh_min", -1.0),
                                   graph.scalar(f"{name}.hardtanh_max", 1.0)])
    if activation == "softsign":  # z / (|z| + 1), as bpfast (ONNX Runtime has no
        # float64 Softsign)
        return graph.node("Div", [z, graph.node("Add", [
            graph.node("Abs", [z]), graph.scalar(f"{name}.softsign_one", 1.0)])])
    if activation == "selu":
        if graph.dtype != np.float64:
            return graph.node("Selu", [z], alpha=_SELU_ALPHA, gamma=_SELU_SCALE)
        # float64: the constants as float64 (attributes are float32), expm1 as for elu
        expm1 = graph.node("Mul", [
            graph.node("Tanh", [graph.node("Mul", [z, graph.scalar(f"{name}.selu_half", 0.5)])]),
            graph.node("Add", [graph.node("Exp", [z]), graph.scalar(f"{name}.selu_one", 1.0)])])
        return graph.node("Where", [
            graph.node("Greater", [z, graph.scalar(f"{name}.selu_zero", 0.0)]),
            graph.node("Mul", [z, graph.scalar(f"{name}.selu_scale", _SELU_SCALE)]),
            graph.node("Mul", [expm1, graph.scalar(f"{name}.selu_alpha_scale",
                                                   _SELU_ALPHA * _SELU_SCALE)])])
    simple = {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu"}
    if activation in simple:
        return graph.node(simple[activation], [z])
    double = graph.dtype == np.float64
    if (activation in ("leaky_relu", "elu") and double) or activation == "softplus":
        positive = graph.node("Greater", [z, graph.scalar(
            f"{name}.{activation}_threshold",
            SOFTPLUS_THRESHOLD if activation == "softplus" else 0.0)])
    if activation == "leaky_relu":
        if not double:  # the attribute is a float32, as the float32 kernel uses it
            return graph.node("LeakyRelu", [z], alpha=float(layer.activation_param))
        # float64: the slope as a float64 constant (an attribute would round it to
        # float32), bpfast's formula z > 0 ? z : slope * z
        slope = graph.scalar(f"{name}.negative_slope", layer.activation_param)
        return graph.node("Where", [positive, z, graph.node("Mul", [z, slope])])
    if activation == "elu":
        if not double:
            return graph.node("Elu", [z], alpha=float(layer.activation_param))
        # z > 0 ? z : alpha * expm1(z), expm1(z) = tanh(z/2) * (exp(z) + 1) (no
        # cancellation near 0; exp(z) may overflow only in the branch not taken)
        expm1 = graph.node("Mul", [
            graph.node("Tanh", [graph.node("Mul", [z, graph.scalar(f"{name}.elu_half", 0.5)])]),
            graph.node("Add", [graph.node("Exp", [z]), graph.scalar(f"{name}.elu_one", 1.0)])])
        alpha = graph.scalar(f"{name}.elu_alpha", layer.activation_param)
        return graph.node("Where", [positive, z, graph.node("Mul", [expm1, alpha])])
    if activation == "softplus":
        # ONNX Softplus has no threshold; bpfast's (PyTorch's) returns z above 20
        if not double:
            return graph.node("Where", [positive, z, graph.node("Softplus", [z])])
        return graph.node("Where", [positive, z, _log1p_exp(graph, z, name, "softplus")])
    if activation == "gelu":
        if graph.opset >= GELU_OPSET:
            return graph.node("Gelu", [z], approximate="none")
        # bpfast's formula, operation by operation: z * 0.5 * (1 + erf(z * sqrt(1/2)))
        scaled = graph.node("Mul", [z, graph.scalar(f"{name}.gelu_sqrt1_2", _SQRT1_2)])
        one_plus = graph.node("Add", [graph.node("Erf", [scaled]),
                                      graph.scalar(f"{name}.gelu_one", 1.0)])
        half_z = graph.node("Mul", [z, graph.scalar(f"{name}.gelu_half", 0.5)])
        return graph.node("Mul", [half_z, one_plus])
    if activation == "softmax":
        return graph.node("Softmax", [z], axis=-1)
    raise ValueError(f"{name} ({layer!r}): activation {activation!r} has no ONNX form")


# the torch module of each activation: (class name, constructor arguments(layer))
_TORCH_MODULES = {
    "sigmoid": ("Sigmoid", lambda layer: {}),
    "tanh": ("Tanh", lambda layer: {}),
    "relu": ("ReLU", lambda layer: {}),
    "leaky_relu": ("LeakyReLU", lambda layer: {"negative_slope": layer.activation_param}),
    "elu": ("ELU", lambda layer: {"alpha": layer.activation_param}),
    "softplus": ("Softplus", lambda layer: {"beta": 1.0, "threshold": SOFTPLUS_THRESHOLD}),
    "gelu": ("GELU", lambda layer: {"approximate": "none"}),
    "softmax": ("Softmax", lambda layer: {"dim": -1}),
    "silu": ("SiLU", lambda layer: {}),
    "mish": ("Mish", lambda layer: {}),
    "hardtanh": ("Hardtanh", lambda layer: {}),
    "selu": ("SELU", lambda layer: {}),
    "softsign": ("Softsign", lambda layer: {}),
}
# torch.nn.SELU's constants (bpfast's kernels use the same)
_SELU_ALPHA = 1.6732632423543772848170429916717
_SELU_SCALE = 1.0507009873554804934193349852946


@dataclass(frozen=True)
class LayerKind:
    """How one layer kind converts (see the module docstring)."""

    name: str
    opset: Any
    onnx: Any
    torch_modules: Any


def _dense_opset(layer):
    return MIN_OPSET


def _dense_onnx(layer, graph, x, name):
    weight = graph.constant(f"{name}.weight", layer.weight)
    inputs = [x, weight]
    if layer.use_bias:
        inputs.append(graph.constant(f"{name}.bias", layer.bias))
    z = graph.node("Gemm", inputs, transB=1)
    return _activation_onnx(layer, graph, z, name)


def _dense_torch_modules(layer):
    parameters = {"weight": layer.weight}
    if layer.use_bias:
        parameters["bias"] = layer.bias
    modules = [("Linear", {"in_features": layer.in_features,
                           "out_features": layer.out_features, "bias": layer.use_bias},
                parameters)]
    if not isinstance(layer.activation, str):
        raise _custom_activation_error(layer, "a layer", "a torch module")
    if layer.activation != "identity":
        class_name, arguments = _TORCH_MODULES[layer.activation]
        modules.append((class_name, arguments(layer), {}))
    return modules


def _dropout_onnx(layer, graph, x, name):
    return x  # the identity at inference: no node (as torch.onnx.export in eval mode)


def _float32_eps(layer, graph, name):
    """eps as the float32 attribute of the ONNX operator; refused when reading it back
    would not give the same eps (bpfast adds eps in double, even in float32)."""
    if _shortest_float32(layer.eps) != layer.eps:
        raise ValueError(f"{name} ({layer!r}): eps={layer.eps!r} is not kept by the ONNX "
                         "operator's float32 attribute (it would read back as "
                         f"{_shortest_float32(layer.eps)!r}); use an eps such as 1e-5")
    return float(layer.eps)


def _normalize_onnx(layer, graph, deviation, invstd, name):
    """float64: (x - mean) * invstd [* weight] [+ bias], bpfast's order of operations."""
    y = graph.node("Mul", [deviation, invstd])
    if layer.weight is not None:
        y = graph.node("Mul", [y, graph.constant(f"{name}.weight", layer.weight)])
    if layer.bias is not None:
        y = graph.node("Add", [y, graph.constant(f"{name}.bias", layer.bias)])
    return y


def _invstd_onnx(layer, graph, variance, name):
    """1 / sqrt(variance + eps), eps a float64 constant (bpfast adds it in double)."""
    return graph.node("Reciprocal", [graph.node("Sqrt", [graph.node("Add", [
        variance, graph.scalar(f"{name}.eps", layer.eps)])])])


def _batch_norm_onnx(layer, graph, x, name):
    if layer.running_mean is None:
        raise ValueError(f"{name} ({layer!r}): BatchNorm1d(track_running_stats=False) uses "
                         "each batch's statistics at inference too; ONNX's "
                         "BatchNormalization takes fixed (running) statistics")
    if graph.dtype == np.float32:
        width = layer.num_features
        scale = layer.weight if layer.weight is not None else np.ones(width, graph.dtype)
        shift = layer.bias if layer.bias is not None else np.zeros(width, graph.dtype)
        # ONNX's momentum weighs the running value (PyTorch's the batch's); it only
        # matters to training, kept so that the graph says what the layer was
        extra = {} if layer.momentum is None else {"momentum": 1.0 - layer.momentum}
        return graph.node("BatchNormalization", [
            x, graph.constant(f"{name}.weight", scale), graph.constant(f"{name}.bias", shift),
            graph.constant(f"{name}.running_mean", layer.running_mean),
            graph.constant(f"{name}.running_var", layer.running_var)],
            epsilon=_float32_eps(layer, graph, name), **extra)
    # float64: elementary operators with float64 constants (an attribute would round eps
    # to float32), as bpfast computes it: (x - mean) * (1 / sqrt(var + eps))
    invstd = _invstd_onnx(layer, graph, graph.constant(f"{name}.running_var",
                                                       layer.running_var), name)
    deviation = graph.node("Sub", [x, graph.constant(f"{name}.running_mean",
                                                     layer.running_mean)])
    return _normalize_onnx(layer, graph, deviation, invstd, name)


def _layer_norm_opset(layer):
    network = layer._network
    float64 = network is not None and network.dtype == np.float64
    return MIN_OPSET if float64 else LAYER_NORM_OPSET


def _reduce_mean(graph, x):
    """The mean of each row, kept as a column."""
    if graph.opset >= 18:  # axes became an input
        if "reduce_axes" not in {init.name for init in graph.initializers}:
            graph.constant("reduce_axes", np.array([-1], dtype=np.int64))
        return graph.node("ReduceMean", [x, "reduce_axes"], keepdims=1)
    return graph.node("ReduceMean", [x], axes=[-1], keepdims=1)


def _layer_norm_onnx(layer, graph, x, name):
    if graph.dtype == np.float32:
        width = layer.out_features
        scale = layer.weight if layer.weight is not None else np.ones(width, graph.dtype)
        inputs = [x, graph.constant(f"{name}.weight", scale)]
        if layer.bias is not None:
            inputs.append(graph.constant(f"{name}.bias", layer.bias))
        return graph.node("LayerNormalization", inputs, axis=-1,
                          epsilon=_float32_eps(layer, graph, name))
    # float64: elementary operators (LayerNormalization's eps is a float32 attribute),
    # the row's mean, then the mean of the squared deviations (bpfast's two passes)
    deviation = graph.node("Sub", [x, _reduce_mean(graph, x)])
    variance = _reduce_mean(graph, graph.node("Mul", [deviation, deviation]))
    return _normalize_onnx(layer, graph, deviation, _invstd_onnx(layer, graph, variance, name),
                           name)


def _dropout_torch_modules(layer):
    return [("Dropout", {"p": layer.p}, {})]


def _batch_norm_torch_modules(layer):
    tensors = {}
    if layer.affine:
        tensors.update(weight=layer.weight, bias=layer.bias)
    if layer.track_running_stats:
        tensors.update(running_mean=layer.running_mean, running_var=layer.running_var,
                       num_batches_tracked=layer.num_batches_tracked)
    return [("BatchNorm1d", {"num_features": layer.num_features, "eps": layer.eps,
                             "momentum": layer.momentum, "affine": layer.affine,
                             "track_running_stats": layer.track_running_stats}, tensors)]


def _layer_norm_torch_modules(layer):
    tensors = {name: getattr(layer, name) for name in ("weight", "bias")
               if getattr(layer, name) is not None}
    return [("LayerNorm", {"normalized_shape": layer.out_features, "eps": layer.eps,
                           "elementwise_affine": layer.elementwise_affine,
                           "bias": layer.use_bias}, tensors)]


def _min_opset(layer):
    return MIN_OPSET


def _activation_torch_modules(layer):
    if not isinstance(layer.activation, str):
        raise _custom_activation_error(layer, "a layer", "a torch module")
    if layer.activation == "identity":
        return [("Identity", {}, {})]
    class_name, arguments = _TORCH_MODULES[layer.activation]
    return [(class_name, arguments(layer), {})]


#: layer class -> its conversions; a new layer kind is one more entry
LAYER_KINDS = {
    Dense: LayerKind("dense", _dense_opset, _dense_onnx, _dense_torch_modules),
    Dropout: LayerKind("dropout", _min_opset, _dropout_onnx, _dropout_torch_modules),
    BatchNorm1d: LayerKind("batch_norm1d", _min_opset, _batch_norm_onnx,
                           _batch_norm_torch_modules),
    LayerNorm: LayerKind("layer_norm", _layer_norm_opset, _layer_norm_onnx,
                         _layer_norm_torch_modules),
    Activation: LayerKind("activation", _min_opset, _activation_onnx,
                          _activation_torch_modules),
}


def _kind(layer, index):
    kind = LAYER_KINDS.get(type(layer))
    if kind is None:
        raise ValueError(f"layer {index} ({layer!r}): {type(layer).__name__} cannot be "
                         "exported")
    return kind


def _check_opset(network, opset, onnx):
    lowest = max([MIN_OPSET] + [_kind(layer, index).opset(layer)
                                for index, layer in enumerate(network.layers)])
    if opset is None:
        return lowest
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)) \
            or not lowest <= opset <= newest:
        raise ValueError(f"opset must be an integer from {lowest} (what this network's layers "
                         f"need) to {newest} (the installed onnx's newest), got {opset!r}")
    return int(opset)


def _network_nodes(network, graph, x):
    """Append the network's nodes to graph, from input x; the output's name."""
    index = 0
    for position, layer in enumerate(network.layers):
        # parameter names follow state_dict's keys ("0.weight", "2.bias", ...)
        x = _kind(layer, position).onnx(layer, graph, x, str(index))
        index += len(_kind(layer, position).torch_modules(layer))
    return x


def _value_info(onnx, name, dtype, width):
    element = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    return onnx.helper.make_tensor_value_info(name, element, ["batch", width])


def _finish_model(onnx, graph, inputs, outputs, path, doc, properties):
    """The checked ModelProto (written to path when given)."""
    onnx_graph = onnx.helper.make_graph(graph.nodes, "bpfast", inputs, outputs,
                                        initializer=graph.initializers, doc_string=doc)
    opsets = [onnx.helper.make_opsetid("", graph.opset)]
    model = onnx.helper.make_model(onnx_graph, opset_imports=opsets, producer_name="bpfast",
                                   producer_version=__version__,
                                   ir_version=onnx.helper.find_min_ir_version_for(opsets))
    onnx.helper.set_model_props(model, {"bpfast_version": __version__, **properties})
    onnx.checker.check_model(model, full_check=True)
    if path is not None:
        onnx.save(model, os.fspath(path))
    return model


def network_to_onnx(network, path=None, *, opset=None, input_name="input",
                    output_name="output", metadata=None):
    """See :meth:`bpfast.Network.to_onnx`; ``metadata`` (JSON-able) goes into metadata_props."""
    onnx = _import("onnx", "'bpfast[onnx]'")
    graph = _Graph(onnx, network.dtype, _check_opset(network, opset, onnx))
    output = _network_nodes(network, graph, input_name)
    graph.node("Identity", [output], output_name)
    return _finish_model(
        onnx, graph, [_value_info(onnx, input_name, network.dtype, network.n_inputs)],
        [_value_info(onnx, output_name, network.dtype, network.n_outputs)], path,
        repr(network), {"bpfast_layers": json.dumps(
            [layer.arguments() for layer in network.layers]),
            **({} if metadata is None else {"bpfast_metadata": json.dumps(metadata)})})


# --------------------------------------------------------------------------- ONNX import
_ONNX_DTYPES = {1: np.float32, 11: np.float64}  # TensorProto.FLOAT, DOUBLE


def _load_model(onnx, model):
    if isinstance(model, onnx.ModelProto):
        source = "the model"
    elif isinstance(model, (bytes, bytearray)):
        source = "the model bytes"
        try:
            model = onnx.load_from_string(bytes(model))
        except Exception as error:  # protobuf's DecodeError
            raise ValueError(f"{source}: not a readable ONNX model ({error})") from None
    else:
        source = os.fspath(model)
        try:
            model = onnx.load(source)
        except OSError:
            raise
        except Exception as error:  # protobuf's DecodeError and the like
            raise ValueError(f"{source}: not a readable ONNX model ({error})") from None
    try:
        onnx.checker.check_model(model)
    except Exception as error:
        raise ValueError(f"{source}: not a valid ONNX model: {error}") from None
    return model


def _attributes(onnx, node):
    return {attribute.name: onnx.helper.get_attribute_value(attribute)
            for attribute in node.attribute}


def _describe(node):
    return f"node {node.name or '(unnamed)'!r} ({node.op_type})"


@dataclass
class _LayerSpec:
    """A layer other than Dense read from a graph or a module: make(width) builds it
    (width: its input's, known once the layers around it are), tensors fill it."""

    make: Any
    tensors: dict
    where: str = ""


def _is_dense(spec):
    """Whether a read layer is a Dense: (weight, bias, activation, parameter)."""
    return isinstance(spec, tuple)


def _add_activation(specs, activation, parameter, where):
    """An activation read: the Dense before it applies it, when it has none yet;
    otherwise (after a normalisation layer, a Dropout, another activation, or first)
    it is an Activation layer."""
    if specs and _is_dense(specs[-1]) and specs[-1][2] is None:
        specs[-1] = (*specs[-1][:2], activation, parameter)
        return
    keyword = {"leaky_relu": "negative_slope", "elu": "alpha"}.get(activation)
    arguments = {} if keyword is None else {keyword: float(parameter)}
    specs.append(_LayerSpec(lambda width: Activation(activation, **arguments), {}, where))


class _OnnxReader:
    """Walks an MLP-shaped ONNX graph from its input to one output, into Dense layers."""

    def __init__(self, onnx, model, output):
        self.onnx = onnx
        graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
                          None)
        if self.opset is None:
            raise ValueError("the model imports no standard ONNX opset")
        self.constants = {init.name: onnx.numpy_helper.to_array(init)
                          for init in graph.initializer}
        self.expressions = {}  # constant name -> (op, inputs, attributes) that made it
        inputs = [value for value in graph.input if value.name not in self.constants]
        if len(inputs) != 1:
            raise ValueError(f"an MLP graph has one input, this one has "
                             f"{[value.name for value in inputs]}")
        self.input = inputs[0]
        element = self.input.type.tensor_type.elem_type
        if element not in _ONNX_DTYPES:
            raise ValueError(f"input {self.input.name!r} has element type "
                             f"{onnx.helper.tensor_dtype_to_np_dtype(element)}; bpfast "
                             "takes float32 or float64")
        self.dtype = np.dtype(_ONNX_DTYPES[element])
        outputs = [value.name for value in graph.output]
        if output is None:
            if len(outputs) != 1:
                raise ValueError(f"the graph has outputs {outputs}; say which one the "
                                 "network computes with output=")
            output = outputs[0]
        elif output not in outputs:
            raise ValueError(f"the graph has no output {output!r}; it has {outputs}")
        self.output = output
        self.nodes = self._slice(graph.node)
        self.used = set()

    def _slice(self, nodes):
        """The nodes the output depends on, in graph order; constant ones folded away."""
        producer = {name: node for node in nodes for name in node.output}
        needed, stack = set(), [self.output]
        while stack:
            node = producer.get(stack.pop())
            if node is not None and id(node) not in needed:
                needed.add(id(node))
                stack.extend(name for name in node.input if name)
        kept = []
        for node in nodes:
            if id(node) not in needed:
                continue
            if not self._fold(node):
                kept.append(node)
        return kept

    def _fold(self, node):
        """Evaluate a node whose inputs are all constants, when it is a simple one."""
        attributes = _attributes(self.onnx, node)
        if node.op_type == "Constant":
            if "value" not in attributes:
                raise ValueError(f"{_describe(node)}: only tensor constants are supported")
            self.constants[node.output[0]] = self.onnx.numpy_helper.to_array(
                attributes["value"])
            return True
        if not node.input or not all(name in self.constants for name in node.input):
            return False
        values = [self.constants[name] for name in node.input]
        if node.op_type in _CONSTANT_FUNCTIONS:
            # evaluated in the constants' dtype (IEEE operations, as a runtime does), and
            # remembered: templates match these constant expressions (1 / sqrt(var + eps))
            result = _CONSTANT_FUNCTIONS[node.op_type](*values)
            self.expressions[node.output[0]] = (node.op_type, list(node.input), attributes)
        elif node.op_type == "Identity":
            result = values[0]
        elif node.op_type == "Transpose":
            result = np.transpose(values[0], attributes.get("perm"))
        elif node.op_type == "Cast":
            result = values[0].astype(self.onnx.helper.tensor_dtype_to_np_dtype(
                attributes["to"]))
        else:
            return False
        self.constants[node.output[0]] = result
        return True

    # ------------------------------------------------------------- walking
    def _users(self, name):
        return [node for node in self.nodes if name in node.input and id(node) not in self.used]

    def _use(self, *nodes):
        self.used.update(id(node) for node in nodes)

    def _constant(self, node, name):
        value = self.constants.get(name)
        if value is None:
            raise ValueError(f"{_describe(node)}: input {name!r} must be a constant "
                             "(an initializer) in an MLP graph")
        return value

    def _other_input(self, node, name):
        others = [other for other in node.input if other != name]
        return others[0] if len(others) == 1 and len(node.input) == 2 else None

    def _is_scalar(self, name, value):
        constant = self.constants.get(name)
        return constant is not None and constant.size == 1 and \
            math.isclose(float(constant.ravel()[0]), value, rel_tol=1e-6)

    def read(self):
        """[(weight (out, in), bias or None, activation, activation param or None)]."""
        layers, x = [], self.input.name
        while x != self.output:
            users = self._users(x)
            if not users:
                raise ValueError(f"the graph's output {self.output!r} is not reached from "
                                 f"its input {self.input.name!r} by an MLP chain "
                                 f"(stuck at {x!r})")
            matched = self._template(x, users) or self._gelu_erf(x, users)
            if matched is not None:
                result, x = matched
                if isinstance(result, _LayerSpec):
                    layers.append(result)
                else:
                    self._set_activation(layers, *result, users[0])
                continue
            if len(users) != 1:
                raise ValueError(f"tensor {x!r} feeds {len(users)} nodes "
                                 f"({', '.join(_describe(node) for node in users)}); an MLP "
                                 "graph is a chain")
            x = self._step(layers, users[0], x)
        left = [node for node in self.nodes if id(node) not in self.used]
        if left:
            raise ValueError(f"{_describe(left[0])} is not part of an MLP chain")
        if not layers:
            raise ValueError("the graph has no Gemm or MatMul layer")
        return layers

    def _step(self, layers, node, x):
        self._use(node)
        attributes = _attributes(self.onnx, node)
        op = node.op_type
        if node.input[0] != x and op != "Add":
            raise ValueError(f"{_describe(node)}: takes {x!r} as an unexpected input")
        if op == "Gemm":
            if attributes.get("transA", 0) or attributes.get("alpha", 1.0) != 1.0 \
                    or attributes.get("beta", 1.0) != 1.0:
                raise ValueError(f"{_describe(node)}: only Gemm with transA=0, alpha=1 and "
                                 "beta=1 is a Dense layer")
            weight = self._constant(node, node.input[1])
            weight = weight if attributes.get("transB", 0) else weight.T
            bias = self._constant(node, node.input[2]) if len(node.input) > 2 and \
                node.input[2] else None
            self._add_dense(layers, node, weight, bias)
        elif op == "MatMul":
            self._add_dense(layers, node, self._constant(node, node.input[1]).T, None)
        elif op == "Add":
            other = self._other_input(node, x)
            last = layers[-1] if layers else None
            if other is None or not _is_dense(last) or last[1] is not None \
                    or last[2] is not None:
                raise ValueError(f"{_describe(node)}: an Add must add a bias right after a "
                                 "MatMul")
            bias = self._constant(node, other)
            layers[-1] = (last[0], self._bias(node, bias, last[0].shape[0]), None, None)
        elif op in _ONNX_ACTIVATIONS:
            activation, parameter = _ONNX_ACTIVATIONS[op](self, node, attributes)
            self._set_activation(layers, activation, parameter, node)
        elif op in _ONNX_LAYERS:
            for extra in node.output[1:]:  # masks, saved statistics: training outputs
                if extra and self._users(extra) or extra in self.output:
                    raise ValueError(f"{_describe(node)}: its output {extra!r} is used; only "
                                     "the inference form (one output) is a bpfast layer")
            layers.append(_ONNX_LAYERS[op](self, node, attributes))
        elif op in ("Identity", "Flatten") or (op == "Cast" and self.onnx.helper.
                                               tensor_dtype_to_np_dtype(attributes["to"])
                                               == self.dtype):
            if op == "Flatten" and attributes.get("axis", 1) != 1:
                raise ValueError(f"{_describe(node)}: only Flatten(axis=1) keeps a batch of "
                                 "rows as it is")
        else:
            raise ValueError(f"{_describe(node)}: operator {op} is not supported in an MLP "
                             "graph (Gemm, MatMul+Add and the activations bpfast has)")
        return node.output[0]

    def _bias(self, node, bias, width):
        bias = np.asarray(bias)
        if bias.ndim > 2 or (bias.ndim == 2 and bias.shape[0] != 1) or \
                bias.size not in (1, width):
            raise ValueError(f"{_describe(node)}: bias of shape {bias.shape} does not fit "
                             f"{width} outputs")
        return np.broadcast_to(bias.reshape(-1), (width,))

    def _add_dense(self, layers, node, weight, bias):
        if weight.ndim != 2:
            raise ValueError(f"{_describe(node)}: weight of shape {weight.shape} is not a "
                             "matrix")
        if weight.dtype != self.dtype:
            raise ValueError(f"{_describe(node)}: weight is {weight.dtype}, the input "
                             f"{self.dtype}")
        if bias is not None:
            bias = self._bias(node, bias, weight.shape[0])
        layers.append((weight, bias, None, None))

    def _set_activation(self, layers, activation, parameter, node):
        _add_activation(layers, activation, parameter, _describe(node))

    # ------------------------------------------------------------- multi-node patterns
    def _template(self, z, users):
        """One of the multi-node forms bpfast writes (see ``_templates``): ((activation,
        parameter) or a _LayerSpec, the output's name), or None."""
        for make, nodes, constants in _templates(self.onnx, self.dtype, self.opset):
            # nodes computing constants only (1 / sqrt(var + eps)) are matched through
            # the inputs that read them (self.expressions), the others from z on
            producers = {node.output[0]: node for node in nodes
                         if not _reads_input(node, nodes, constants)}
            mapping, matched, captured = {"z": z}, [], {}
            for pattern in nodes:
                if pattern.output[0] in producers:
                    continue
                anchor = mapping[next(name for name in pattern.input if name in mapping)]
                found = None
                for node in self._users(anchor):
                    if id(node) in map(id, matched) or node.op_type != pattern.op_type or \
                            len(node.input) != len(pattern.input) or \
                            _attributes(self.onnx, node) != _attributes(self.onnx, pattern):
                        continue
                    attempt = dict(captured)
                    if all(mapping[wanted] == actual if wanted in mapping else
                           self._match_constant(wanted, actual, constants, producers, attempt)
                           for wanted, actual in zip(pattern.input, node.input)):
                        found, captured = node, attempt
                        break
                if found is None:
                    break
                mapping[pattern.output[0]] = found.output[0]
                matched.append(found)
            else:
                # a match only if nothing else reads z or the intermediate values
                inner = [z] + [node.output[0] for node in matched[:-1]]
                if all(id(user) in map(id, matched) for name in inner
                       for user in self._users(name)):
                    result = make(captured)
                    if result is not None:
                        self._use(*matched)
                        return result, matched[-1].output[0]
        return None

    def _match_constant(self, wanted, actual, constants, producers, captured):
        """Whether constant `actual` is the template's `wanted` (an expression of
        constants, a fixed scalar, or a value captured into `captured`)."""
        if wanted in producers:
            pattern, expression = producers[wanted], self.expressions.get(actual)
            return expression is not None and expression[0] == pattern.op_type and \
                expression[2] == _attributes(self.onnx, pattern) and \
                len(expression[1]) == len(pattern.input) and \
                all(self._match_constant(inner_wanted, inner_actual, constants, producers,
                                         captured)
                    for inner_wanted, inner_actual in zip(pattern.input, expression[1]))
        value = self.constants.get(actual)
        if value is None:
            return False
        expected = constants[wanted]
        if expected in _CAPTURES:
            key = _CAPTURES[expected]
            if key in captured and not np.array_equal(captured[key], value):
                return False
            captured[key] = value
            return True
        return value.size == 1 and value.ravel()[0] == expected

    def _gelu_erf(self, z, users):
        """z * 0.5 * (1 + Erf(z / sqrt(2))), in the three orders exporters write it."""
        if len(users) != 2:
            return None
        for scale in users:
            other = self._other_input(scale, z)
            if not ((scale.op_type == "Mul" and self._is_scalar(other, _SQRT1_2))
                    or (scale.op_type == "Div" and scale.input[0] == z
                        and self._is_scalar(other, math.sqrt(2.0)))):
                continue
            erf = self._only_user(scale.output[0], "Erf")
            add = erf and self._only_user(erf.output[0], "Add")
            if add is None or not self._is_scalar(self._other_input(add, erf.output[0]), 1.0):
                return None
            first = self._only_user(add.output[0], "Mul")  # multiplies 1 + erf(...)
            if first is None:
                return None
            factor = self._other_input(first, add.output[0])
            (z_user,) = [node for node in users if node is not scale]
            if factor == z or self._is_scalar(factor, 0.5):
                # (z * (1 + erf)) * 0.5  or  z * ((1 + erf) * 0.5)
                second = self._only_user(first.output[0], "Mul")
                if second is None:
                    return None
                last_factor = self._other_input(second, first.output[0])
                want_last, want_user = (0.5, first) if factor == z else (z, second)
                if (last_factor != z if want_last == z
                        else not self._is_scalar(last_factor, 0.5)) or z_user is not want_user:
                    return None
                nodes = [scale, erf, add, first, second]
            else:  # (z * 0.5) * (1 + erf), bpfast's own order
                if z_user.output[0] != factor or z_user.op_type != "Mul" or \
                        not self._is_scalar(self._other_input(z_user, z), 0.5):
                    return None
                second = first
                nodes = [scale, erf, add, z_user, first]
            self._use(*nodes)
            return ("gelu", None), second.output[0]
        return None

    def _only_user(self, name, op):
        users = self._users(name)
        return users[0] if len(users) == 1 and users[0].op_type == op else None


# values no layer is given, standing for what a template captures
_CAPTURES = {-1234.5: "activation_param", -1001.25: "eps", -1002.25: "running_mean",
             -1003.25: "running_var", -1004.25: "weight", -1005.25: "bias"}
_SENTINEL = {key: value for value, key in _CAPTURES.items()}

# operators folded on constants (in the constants' dtype)
_CONSTANT_FUNCTIONS = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply,
                       "Div": np.divide, "Sqrt": np.sqrt, "Reciprocal": np.reciprocal}


def _reads_input(node, nodes, constants):
    """Whether a template node depends on the template's input z (not constants only)."""
    made = {other.output[0]: other for other in nodes}
    return any(name == "z" or (name in made and _reads_input(made[name], nodes, constants))
               for name in node.input)


def _fake_layer(cls, **attributes):
    """A stand-in for a layer of class cls in a template: the attributes given, each a
    sentinel of _CAPTURES (arrays of one) or a fixed value."""
    layer = object.__new__(cls)
    layer.__dict__.update(attributes)
    return layer


def _activation_result(activation):
    def make(captured):
        parameter = captured.get("activation_param")
        if parameter is None:
            return activation, None
        return (activation, float(parameter.ravel()[0])) if parameter.size == 1 else None
    return make


def _normalization_result(cls, affine, bias):
    def make(captured):
        eps = captured["eps"]
        tensors = {key: captured[key].reshape(-1) for key in (
            "running_mean", "running_var", "weight", "bias") if key in captured}
        if eps.size != 1 or len({value.size for value in tensors.values()}) > 1:
            return None
        eps = float(eps.ravel()[0])
        if cls is BatchNorm1d:
            return _LayerSpec(lambda width: BatchNorm1d(width, eps=eps, affine=affine),
                              tensors)
        return _LayerSpec(lambda width: LayerNorm(width, eps=eps, elementwise_affine=affine,
                                                  bias=bias), tensors)
    return make


def _templates(onnx, dtype, opset):
    """[(result from captured values, nodes, {constant name: value})]: bpfast's
    multi-node forms (activations, and float64 normalisation layers).

    Written by the exporter itself for stand-in layers whose parameters are the
    sentinels of ``_CAPTURES``, so reading follows writing by construction.
    """
    key = (np.dtype(dtype), opset)
    if key in _TEMPLATE_CACHE:
        return _TEMPLATE_CACHE[key]
    one = {name: np.array([value], dtype=dtype) for value, name in _CAPTURES.items()}
    stand_ins = [(_activation_result(activation), _activation_onnx,
                  _fake_layer(Dense, activation=activation,
                              activation_param=_SENTINEL["activation_param"]))
                 for activation in ("leaky_relu", "elu", "softplus", "silu", "mish",
                                    "hardtanh", "selu", "softsign")]
    if np.dtype(dtype) == np.float64:
        for affine in (True, False):
            stand_ins.append((_normalization_result(BatchNorm1d, affine, affine),
                              _batch_norm_onnx, _fake_layer(
                                  BatchNorm1d, eps=_SENTINEL["eps"],
                                  running_mean=one["running_mean"],
                                  running_var=one["running_var"],
                                  weight=one["weight"] if affine else None,
                                  bias=one["bias"] if affine else None)))
        # (without elementwise_affine, bias keeps its default: it has no effect)
        for affine, bias in ((True, True), (True, False), (False, True)):
            stand_ins.append((_normalization_result(LayerNorm, affine, bias),
                              _layer_norm_onnx, _fake_layer(
                                  LayerNorm, eps=_SENTINEL["eps"],
                                  weight=one["weight"] if affine else None,
                                  bias=one["bias"] if affine and bias else None)))
    templates = []
    for make, write, layer in stand_ins:
        graph = _Graph(onnx, dtype, opset)
        write(layer, graph, "z", "template")
        # one operator without constants (LeakyRelu, Elu, Selu) is read by its op type
        if len(graph.nodes) > 1 or graph.initializers:
            constants = {init.name: onnx.numpy_helper.to_array(init).ravel()[0]
                         for init in graph.initializers}
            templates.append((make, graph.nodes, constants))
    _TEMPLATE_CACHE[key] = templates
    return templates


_TEMPLATE_CACHE: dict = {}


def _shortest_float32(value):
    """A float32 attribute as the shortest decimal that rounds to it (0.2, not 0.2000000029)."""
    return float(str(np.float32(value)))


def _softmax_axis(reader, node, attributes):
    axis = attributes.get("axis", -1 if reader.opset >= 13 else 1)
    if axis not in (-1, 1):
        raise ValueError(f"{_describe(node)}: Softmax over axis {axis}; bpfast's softmax "
                         "normalises each row (axis -1)")
    return "softmax", None


def _selu(node, attributes):
    alpha = attributes.get("alpha", _SELU_ALPHA)
    gamma = attributes.get("gamma", _SELU_SCALE)
    if np.float32(alpha) != np.float32(_SELU_ALPHA) or \
            np.float32(gamma) != np.float32(_SELU_SCALE):
        raise ValueError(f"{_describe(node)}: Selu(alpha={alpha}, gamma={gamma}); bpfast's "
                         "selu has PyTorch's constants")
    return "selu", None


def _gelu(reader, node, attributes):
    if attributes.get("approximate", b"none") not in (b"none", "none"):
        raise ValueError(f"{_describe(node)}: Gelu(approximate='tanh') is not bpfast's gelu "
                         "(the erf form)")
    return "gelu", None


#: ONNX operator -> (bpfast activation, parameter) from (reader, node, attributes)
_ONNX_ACTIVATIONS = {
    "Sigmoid": lambda reader, node, attributes: ("sigmoid", None),
    "Tanh": lambda reader, node, attributes: ("tanh", None),
    "Relu": lambda reader, node, attributes: ("relu", None),
    "LeakyRelu": lambda reader, node, attributes: (
        "leaky_relu", _shortest_float32(attributes.get("alpha", 0.01))),
    "Elu": lambda reader, node, attributes: (
        "elu", _shortest_float32(attributes.get("alpha", 1.0))),
    # a bare Softplus has no threshold: within 2.1e-9 of bpfast's above 20 (module docstring)
    "Softplus": lambda reader, node, attributes: ("softplus", None),
    "Gelu": _gelu,
    "Softmax": _softmax_axis,
    "Softsign": lambda reader, node, attributes: ("softsign", None),
    "Mish": lambda reader, node, attributes: ("mish", None),
    "Selu": lambda reader, node, attributes: _selu(node, attributes),
}


def _float_attribute(reader, value):
    """A float attribute (a float32) as the value it stands for: the shortest decimal."""
    return _shortest_float32(value)


def _onnx_dropout(reader, node, attributes):
    ratio = 0.5
    if reader.opset < 12:
        ratio = attributes.get("ratio", 0.5)
    elif len(node.input) > 1 and node.input[1]:
        ratio = reader._constant(node, node.input[1])
    if len(node.input) > 2 and node.input[2]:
        training = reader._constant(node, node.input[2])
        if training.size != 1 or bool(training.ravel()[0]):
            raise ValueError(f"{_describe(node)}: training_mode is on; a bpfast Dropout is "
                             "the identity at inference")
    ratio = np.asarray(ratio)
    value = float(ratio.ravel()[0]) if ratio.size == 1 else None
    if value is None:
        raise ValueError(f"{_describe(node)}: ratio of shape {ratio.shape} is not a number")
    if ratio.dtype == np.float32 or reader.opset < 12:
        value = _shortest_float32(value)
    return _LayerSpec(lambda width: Dropout(value), {}, _describe(node))


def _onnx_vector(reader, node, name, what):
    value = reader._constant(node, name)
    if value.ndim != 1 or value.dtype != reader.dtype:
        raise ValueError(f"{_describe(node)}: {what} must be a {reader.dtype} vector, got "
                         f"{value.dtype} of shape {value.shape}")
    return value


def _onnx_batch_norm(reader, node, attributes):
    if attributes.get("training_mode", 0):
        raise ValueError(f"{_describe(node)}: training_mode=1; only the inference form "
                         "(running statistics) is a BatchNorm1d")
    names = ("weight", "bias", "running_mean", "running_var")
    tensors = {key: _onnx_vector(reader, node, name, key)
               for key, name in zip(names, node.input[1:5])}
    eps = _float_attribute(reader, attributes.get("epsilon", 1e-5))
    # ONNX's momentum weighs the running value, PyTorch's (and bpfast's) the batch's
    momentum = round(1.0 - _float_attribute(reader, attributes.get("momentum", 0.9)), 12)
    return _LayerSpec(lambda width: BatchNorm1d(width, eps=eps, momentum=momentum),
                      tensors, _describe(node))


def _onnx_layer_norm(reader, node, attributes):
    if attributes.get("axis", -1) not in (-1, 1):
        raise ValueError(f"{_describe(node)}: LayerNormalization over axis "
                         f"{attributes['axis']}; a bpfast LayerNorm normalises each row "
                         "(axis -1)")
    tensors = {"weight": _onnx_vector(reader, node, node.input[1], "Scale")}
    if len(node.input) > 2 and node.input[2]:
        tensors["bias"] = _onnx_vector(reader, node, node.input[2], "B")
    eps = _float_attribute(reader, attributes.get("epsilon", 1e-5))
    return _LayerSpec(lambda width: LayerNorm(width, eps=eps, bias="bias" in tensors),
                      tensors, _describe(node))


#: ONNX operator -> _LayerSpec from (reader, node, attributes): the other layer kinds
_ONNX_LAYERS = {"Dropout": _onnx_dropout, "BatchNormalization": _onnx_batch_norm,
                "LayerNormalization": _onnx_layer_norm}


def _spec_widths(specs):
    """The input width of each read layer: a Dense's from its weight, the others' from
    their tensors or, without any, the layers around them."""
    widths = [spec[0].shape[1] if _is_dense(spec) else
              next((value.size for value in spec.tensors.values()
                    if value.ndim == 1), None) for spec in specs]
    outs = [spec[0].shape[0] if _is_dense(spec) else widths[index]
            for index, spec in enumerate(specs)]
    for index in range(len(specs)):  # forwards: a layer takes what the one before gives
        if widths[index] is None and index and outs[index - 1] is not None:
            widths[index] = outs[index] = outs[index - 1]
    for index in reversed(range(len(specs))):  # first ones: what the next one takes
        if widths[index] is None and index + 1 < len(specs):
            widths[index] = outs[index] = widths[index + 1]
    return widths


def _build_network(layer_specs, dtype, where):
    """A Network of these read layers: Dense (weight, bias, activation, parameter)
    tuples and _LayerSpec's."""
    from .network import Network
    layers = []
    for spec, width in zip(layer_specs, _spec_widths(layer_specs)):
        if not _is_dense(spec):
            try:
                layers.append(spec.make(width))
            except (TypeError, ValueError) as error:
                raise ValueError(f"{where}: {spec.where}: {error}") from None
            continue
        weight, bias, activation, parameter = spec
        keyword = {}
        if activation == "leaky_relu":
            keyword["negative_slope"] = float(parameter)
        elif activation == "elu":
            keyword["alpha"] = float(parameter)
        layers.append(Dense(weight.shape[1], weight.shape[0], activation, bias=bias is not None,
                            **keyword))
    try:
        network = Network(layers, dtype=dtype)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    for layer, spec in zip(network.layers, layer_specs):
        if _is_dense(spec):
            layer.weight[...] = spec[0]
            if spec[1] is not None:
                layer.bias[...] = spec[1]
            continue
        for name, value in spec.tensors.items():
            target = getattr(layer, name)
            if target is None or np.shape(value) != target.shape:
                raise ValueError(f"{where}: {spec.where}: {name} of shape {np.shape(value)} "
                                 f"does not fit {layer!r}")
            target[...] = value
    return network


def network_from_onnx(model, *, output=None):
    """See :meth:`bpfast.Network.from_onnx`."""
    onnx = _import("onnx", "'bpfast[onnx]'")
    model = _load_model(onnx, model)
    reader = _OnnxReader(onnx, model, output)
    width = reader.input.type.tensor_type.shape.dim
    if len(width) not in (0, 2):
        raise ValueError(f"input {reader.input.name!r} has {len(width)} dimensions; an MLP "
                         "takes a batch of rows (2)")
    network = _build_network(reader.read(), reader.dtype, "the ONNX graph")
    if len(width) == 2 and width[1].HasField("dim_value") and \
            width[1].dim_value != network.n_inputs:
        raise ValueError(f"input {reader.input.name!r} has {width[1].dim_value} features, "
                         f"the first layer takes {network.n_inputs}")
    return network


# --------------------------------------------------------------------------- state dict
def _torch_layout(network):
    """[(index, class name, arguments, {name: array})]: the Sequential to_torch builds."""
    layout, index = [], 0
    for position, layer in enumerate(network.layers):
        for class_name, arguments, tensors in _kind(layer, position).torch_modules(layer):
            layout.append((index, class_name, arguments, tensors))
            index += 1
    return layout


def state_dict(network):
    """See :meth:`bpfast.Network.state_dict`."""
    # num_batches_tracked is an int64 in PyTorch (a float in bpfast's buffers)
    return {f"{index}.{name}": np.array(array, dtype=np.int64)
            if name == "num_batches_tracked" else np.array(array)
            for index, _, _, tensors in _torch_layout(network)
            for name, array in tensors.items()}


def _as_numpy(key, value):
    if type(value).__module__.startswith("torch"):
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise TypeError(f"state_dict[{key!r}] must be a NumPy array or a torch tensor, got "
                        f"{type(value).__name__}")
    if key.endswith("num_batches_tracked"):
        if value.dtype.kind not in "iuf" or value.shape != () or not \
                (np.isfinite(value) and value >= 0 and value == np.floor(value)):
            raise TypeError(f"state_dict[{key!r}] must be a count (a non-negative integer "
                            f"of shape ()), got {value.dtype} {value!r}")
        return value
    if value.dtype.kind != "f":
        raise TypeError(f"state_dict[{key!r}] has dtype {value.dtype}; parameters are "
                        "floating point")
    return value


def load_state_dict(network, values):
    """See :meth:`bpfast.Network.load_state_dict`."""
    if not hasattr(values, "keys") or not hasattr(values, "__getitem__"):
        raise TypeError(f"state_dict must be a mapping of names to arrays, got "
                        f"{type(values).__name__}")
    expected = {f"{index}.{name}": array for index, _, _, tensors in _torch_layout(network)
                for name, array in tensors.items()}
    missing = [key for key in expected if key not in values]
    unexpected = [key for key in values if key not in expected]
    if missing or unexpected:
        raise ValueError(f"state_dict does not fit this network: missing keys {missing}, "
                         f"unexpected keys {unexpected}")
    # everything is checked into copies, then assigned (all or nothing)
    flats = {"parameters": network.parameters.copy(), "buffers": network.buffers.copy()}
    for key, target in expected.items():
        value = _as_numpy(key, values[key])
        if value.shape != target.shape:
            raise ValueError(f"state_dict[{key!r}] has shape {value.shape}, this network's "
                             f"is {target.shape}")
        # each tensor of the layout is a view of a flat array: its offset there
        flat_name = "parameters" if np.shares_memory(target, network.parameters) \
            else "buffers"
        base = getattr(network, flat_name).ctypes.data
        start = (target.ctypes.data - base) // target.itemsize
        flats[flat_name][start:start + target.size] = value.reshape(-1)
    before = network.parameters.copy()
    network.parameters = flats["parameters"]
    if flats["buffers"].size:
        try:
            network.buffers = flats["buffers"]
        except (TypeError, ValueError):
            network.parameters = before  # the buffers refused: leave the network as it was
            raise


# --------------------------------------------------------------------------- torch
def network_to_torch(network):
    """See :meth:`bpfast.Network.to_torch`."""
    torch = _import("torch", "torch")
    modules = []
    for _, class_name, arguments, tensors in _torch_layout(network):
        module = getattr(torch.nn, class_name)(**arguments)
        if tensors:
            module = module.to(getattr(torch, network.dtype.name))
            with torch.no_grad():
                for name, array in tensors.items():
                    getattr(module, name).copy_(torch.from_numpy(np.array(array)))
        modules.append(module)
    return torch.nn.Sequential(*modules)


def _softplus_module(module, where):
    if module.beta != 1 or module.threshold != SOFTPLUS_THRESHOLD:
        raise ValueError(f"{where}: Softplus(beta={module.beta}, threshold={module.threshold})"
                         f"; bpfast's softplus is Softplus(beta=1, threshold=20)")
    return "softplus", None


def _gelu_module(module, where):
    if module.approximate != "none":
        raise ValueError(f"{where}: GELU(approximate={module.approximate!r}); bpfast's gelu "
                         "is the erf form, GELU(approximate='none')")
    return "gelu", None


def _softmax_module(module, where):
    if module.dim not in (-1, 1):
        raise ValueError(f"{where}: Softmax(dim={module.dim}); bpfast's softmax normalises "
                         "each row (dim=-1)")
    return "softmax", None


#: torch module class -> (bpfast activation, parameter) from (module, where)
_TORCH_ACTIVATIONS = {
    "Sigmoid": lambda module, where: ("sigmoid", None),
    "Tanh": lambda module, where: ("tanh", None),
    "ReLU": lambda module, where: ("relu", None),
    "LeakyReLU": lambda module, where: ("leaky_relu", module.negative_slope),
    "ELU": lambda module, where: ("elu", module.alpha),
    "Softplus": _softplus_module,
    "GELU": _gelu_module,
    "Softmax": _softmax_module,
    "SiLU": lambda module, where: ("silu", None),
    "Mish": lambda module, where: ("mish", None),
    "Hardtanh": lambda module, where: _hardtanh_module(module, where),
    "SELU": lambda module, where: ("selu", None),
    "Softsign": lambda module, where: ("softsign", None),
}


def _hardtanh_module(module, where):
    if module.min_val != -1 or module.max_val != 1:
        raise ValueError(f"{where}: Hardtanh(min_val={module.min_val}, "
                         f"max_val={module.max_val}); bpfast's hardtanh clamps to [-1, 1]")
    return "hardtanh", None


def _flat_modules(torch, module, prefix=""):
    if isinstance(module, torch.nn.Sequential):
        for name, child in module.named_children():
            yield from _flat_modules(torch, child, f"{prefix}{name}.")
    else:
        yield prefix.rstrip("."), module


def network_from_torch(module):
    """See :meth:`bpfast.Network.from_torch`."""
    torch = _import("torch", "torch")
    if not isinstance(module, torch.nn.Sequential):
        raise TypeError(f"from_torch takes a torch.nn.Sequential, got {type(module).__name__}")
    specs, dtypes = [], []

    def arrays(child, where, names):
        """{name: ndarray} of the module's tensors that exist, one float dtype for all."""
        found = {}
        for tensor_name in names:
            tensor = getattr(child, tensor_name, None)
            if tensor is None:
                continue
            found[tensor_name] = tensor.detach().cpu().numpy()
            if tensor_name == "num_batches_tracked":
                continue
            dtype = found[tensor_name].dtype
            # (not `dtype in (...)` with None: NumPy takes None for float64 there)
            if dtype not in (np.float32, np.float64) or (dtypes and dtypes[0] != dtype):
                raise ValueError(f"{where}: parameters are {dtype}; bpfast takes one "
                                 "dtype, float32 or float64, for the whole network")
            dtypes.append(dtype)
        return found

    for name, child in _flat_modules(torch, module):
        kind = type(child).__name__
        where = f"module {name} ({kind})"
        if isinstance(child, torch.nn.Linear):
            tensors = arrays(child, where, ("weight", "bias"))
            specs.append((tensors["weight"], tensors.get("bias"), None, None))
        elif isinstance(child, torch.nn.Dropout) and type(child) is torch.nn.Dropout:
            p = float(child.p)
            specs.append(_LayerSpec(lambda width, p=p: Dropout(p), {}, where))
        elif type(child) is torch.nn.BatchNorm1d:
            if child.affine and getattr(child, "bias", None) is None:
                raise ValueError(f"{where}: an affine BatchNorm1d without bias; bpfast's "
                                 "affine BatchNorm1d has both weight and bias")
            tensors = arrays(child, where, ("weight", "bias", "running_mean", "running_var",
                                            "num_batches_tracked"))
            arguments = {"eps": child.eps, "momentum": child.momentum, "affine": child.affine,
                         "track_running_stats": child.track_running_stats}
            specs.append(_LayerSpec(lambda width, arguments=arguments: BatchNorm1d(
                width, **arguments), tensors, where))
        elif type(child) is torch.nn.LayerNorm:
            if len(child.normalized_shape) != 1:
                raise ValueError(f"{where}: normalized_shape={tuple(child.normalized_shape)}; "
                                 "a bpfast LayerNorm normalises the last axis of (batch, "
                                 "features) rows")
            tensors = arrays(child, where, ("weight", "bias"))
            arguments = {"eps": child.eps, "elementwise_affine": child.elementwise_affine,
                         "bias": child.bias is not None or not child.elementwise_affine}
            width = child.normalized_shape[0]
            specs.append(_LayerSpec(lambda _, width=width, arguments=arguments: LayerNorm(
                width, **arguments), tensors, where))
        elif kind in _TORCH_ACTIVATIONS and type(child).__module__.startswith("torch.nn"):
            _add_activation(specs, *_TORCH_ACTIVATIONS[kind](child, where), where)
        elif isinstance(child, torch.nn.Identity) or (
                isinstance(child, torch.nn.Flatten) and child.start_dim in (1, -1)
                and child.end_dim == -1):
            continue
        else:
            raise ValueError(f"{where} is not supported: bpfast takes Linear, Dropout, "
                             f"BatchNorm1d, LayerNorm and the activations "
                             f"{', '.join(_TORCH_ACTIVATIONS)}")
    if not any(_is_dense(spec) for spec in specs):
        raise ValueError("the Sequential has no Linear layer")
    return _build_network(specs, dtypes[0], "the torch module")


# --------------------------------------------------------------------------- scikit-learn
# fitted attributes copied as they are between the two libraries' estimators
_FITTED = ("n_layers_", "n_outputs_", "out_activation_", "n_features_in_", "feature_names_in_",
           "n_iter_", "t_", "validation_scores_", "best_validation_score_")
_LOSSES = ("loss_", "loss_curve_", "best_loss_")


def _loss_factor(estimator):
    """bpfast's regressor reports losses summed over outputs, scikit-learn averaged."""
    from sklearn.base import is_regressor
    return float(estimator.n_outputs_) if is_regressor(estimator) else 1.0


def _scaled_losses(source, target, factor):
    for name in _LOSSES:
        value = getattr(source, name, None)
        if name not in source.__dict__:
            continue
        if isinstance(value, list):
            value = [item * factor for item in value]
        elif value is not None:
            value = value * factor
        target.__dict__[name] = value


def estimator_from_sklearn(cls, fitted):
    """See :meth:`bpfast.sklearn.MLPClassifier.from_sklearn`."""
    from sklearn import neural_network
    from sklearn.utils.validation import check_is_fitted
    wanted = getattr(neural_network, cls.__name__)
    if not isinstance(fitted, wanted):
        raise TypeError(f"{cls.__name__}.from_sklearn takes a fitted "
                        f"sklearn.neural_network.{cls.__name__}, got {type(fitted).__name__}")
    check_is_fitted(fitted)
    if getattr(fitted, "loss", None) == "poisson":
        raise ValueError("loss='poisson' is not available in bpfast.sklearn")
    dtype = np.asarray(fitted.coefs_[0]).dtype
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"the coefficients are {dtype}; bpfast takes float32 or float64")
    ours = set(cls().get_params(deep=False))
    params = {name: value for name, value in fitted.get_params(deep=False).items()
              if name in ours}
    estimator = cls(**params, dtype=dtype.name)
    hidden = {"identity": "identity", "logistic": "sigmoid", "tanh": "tanh",
              "relu": "relu"}[fitted.activation]
    specs = [(np.asarray(coef).T, np.asarray(intercept),
              hidden if index < len(fitted.coefs_) - 1 else None, None)
             for index, (coef, intercept) in enumerate(zip(fitted.coefs_, fitted.intercepts_))]
    network = _build_network(specs, dtype, "the scikit-learn estimator")
    attributes = {name: getattr(fitted, name) for name in _FITTED if hasattr(fitted, name)}
    if hasattr(fitted, "classes_"):
        kind = fitted._label_binarizer.y_type_
        attributes.update(classes_=fitted.classes_.copy(), _target_kind=(
            "multilabel" if kind == "multilabel-indicator" else kind))
    estimator.__dict__.update(attributes, network_=network, _optimizer=None,
                              _no_improvement_count=getattr(fitted, "_no_improvement_count", 0))
    _scaled_losses(fitted, estimator, _loss_factor(estimator))
    return estimator


def estimator_to_sklearn(estimator):
    """See :meth:`bpfast.sklearn.MLPClassifier.to_sklearn`."""
    from sklearn import neural_network
    from sklearn.preprocessing import LabelBinarizer
    from sklearn.utils.validation import check_is_fitted
    check_is_fitted(estimator)
    cls = getattr(neural_network, type(estimator).__name__)
    theirs = set(cls().get_params(deep=False))
    fitted = cls(**{name: value for name, value in estimator.get_params(deep=False).items()
                    if name in theirs})
    network = estimator.network_
    if any(not isinstance(layer, (Dense, Dropout)) for layer in network.layers):
        raise ValueError("this estimator's network has layers that scikit-learn's MLP does "
                         "not have (batch_norm=True); it cannot be converted")
    # Dropout is the identity in inference: scikit-learn's MLP predicts the same
    dense = [layer for layer in network.layers if isinstance(layer, Dense)]
    fitted.coefs_ = [layer.weight.T.copy() for layer in dense]
    fitted.intercepts_ = [layer.bias.copy() for layer in dense]
    for name in _FITTED:
        if name in estimator.__dict__:
            setattr(fitted, name, estimator.__dict__[name])
    if hasattr(estimator, "classes_"):
        fitted.classes_ = estimator.classes_.copy()
        binarizer = LabelBinarizer()
        if estimator._target_kind == "multilabel":
            binarizer.fit(np.eye(len(estimator.classes_), dtype=int))
        else:
            binarizer.fit(estimator.classes_)
        fitted._label_binarizer = binarizer
    _scaled_losses(estimator, fitted, 1.0 / _loss_factor(estimator))
    return fitted


def _label_constant(graph, classes):
    classes = np.asarray(classes)
    if classes.dtype.kind in "biu":
        return graph.constant("classes", classes.astype(np.int64))
    if classes.dtype.kind == "f":
        return graph.constant("classes", classes)
    if classes.dtype.kind in "UO" and all(isinstance(value, str) for value in classes):
        return graph.constant("classes", classes.astype(object))
    raise ValueError(f"classes_ of dtype {classes.dtype} cannot be an ONNX label tensor "
                     "(integers, floats or strings)")


def _classifier_outputs(onnx, graph, logits, kind, classes, n_outputs):
    """Nodes computing "label" and "probabilities" from logits; their value infos.

    kind: "multiclass" (softmax over the columns), "binary" (one logit) or
    "multilabel" (one logit per label); labels are bpfast's predict exactly: the
    first largest logit, or a positive logit (sigmoid above 1/2).
    """
    element = onnx.TensorProto.INT64
    if kind == "multiclass":
        table = _label_constant(graph, classes)
        element = graph.initializers[-1].data_type
        index = graph.node("ArgMax", [logits], axis=1, keepdims=0)
        graph.node("Gather", [table, index], "label", axis=0)
        graph.node("Softmax", [logits], "probabilities", axis=1)
        label_shape = ["batch"]
    else:
        zero = graph.scalar("zero", 0.0)
        positive = graph.node("Cast", [graph.node("Greater", [logits, zero])],
                              to=onnx.TensorProto.INT64)
        probability = graph.node("Sigmoid", [logits])
        if kind == "binary":
            table = _label_constant(graph, classes)
            element = graph.initializers[-1].data_type
            flat = graph.node("Squeeze", [positive, graph.constant(
                "squeeze_axes", np.array([1], dtype=np.int64))])
            graph.node("Gather", [table, flat], "label", axis=0)
            complement = graph.node("Sub", [graph.scalar("one", 1.0), probability])
            graph.node("Concat", [complement, probability], "probabilities", axis=1)
            label_shape = ["batch"]
        else:
            graph.node("Identity", [positive], "label")
            graph.node("Identity", [probability], "probabilities")
            label_shape = ["batch", n_outputs]
    width = n_outputs if kind == "multilabel" else len(classes)
    return [onnx.helper.make_tensor_value_info("label", element, label_shape),
            _value_info(onnx, "probabilities", graph.dtype, width)]


def estimator_to_onnx(estimator, path=None, *, opset=None):
    """See :meth:`bpfast.sklearn.MLPClassifier.to_onnx`."""
    from sklearn.utils.validation import check_is_fitted
    onnx = _import("onnx", "'bpfast[onnx]'")
    check_is_fitted(estimator)
    network = estimator.network_
    dtype = network.dtype
    graph = _Graph(onnx, dtype, _check_opset(network, opset, onnx))
    logits = _network_nodes(network, graph, "input")
    inputs = [_value_info(onnx, "input", dtype, network.n_inputs)]
    if not hasattr(estimator, "classes_"):  # regressor: skl2onnx's output name
        graph.node("Identity", [logits], "variable")
        outputs = [_value_info(onnx, "variable", dtype, network.n_outputs)]
        return _finish_model(onnx, graph, inputs, outputs, path, repr(estimator), {})
    outputs = _classifier_outputs(onnx, graph, logits, estimator._target_kind,
                                  estimator.classes_, network.n_outputs)
    return _finish_model(onnx, graph, inputs, outputs, path, repr(estimator),
                         {"classes": json.dumps([str(c) for c in estimator.classes_])})


def pipeline_to_onnx(network, path=None, *, metadata, opset=None):
    """A model saved by ``bpfast train`` as one ONNX graph that predicts as ``bpfast predict``.

    Input "input": the raw features, standardised in the graph with the saved
    ``x_mean``/``x_scale``. Classification: outputs "label" (the saved classes) and
    "probabilities"; regression: "variable", the network's output mapped back with
    ``y_scale``/``y_mean``. ``metadata`` is the model file's, kept in metadata_props.
    """
    onnx = _import("onnx", "'bpfast[onnx]'")
    dtype = network.dtype
    graph = _Graph(onnx, dtype, _check_opset(network, opset, onnx))
    x = "input"
    if "x_mean" in metadata:
        x = graph.node("Div", [
            graph.node("Sub", [x, graph.constant("x_mean", np.asarray(metadata["x_mean"],
                                                                       dtype))]),
            graph.constant("x_scale", np.asarray(metadata["x_scale"], dtype))])
    output = _network_nodes(network, graph, x)
    inputs = [_value_info(onnx, "input", dtype, network.n_inputs)]
    if metadata.get("task") == "classification":
        outputs = _classifier_outputs(onnx, graph, output, "multiclass", metadata["classes"],
                                      network.n_outputs)
    else:
        if "y_mean" in metadata:
            output = graph.node("Add", [
                graph.node("Mul", [output, graph.constant(
                    "y_scale", np.asarray(metadata["y_scale"], dtype))]),
                graph.constant("y_mean", np.asarray(metadata["y_mean"], dtype))])
        graph.node("Identity", [output], "variable")
        outputs = [_value_info(onnx, "variable", dtype, network.n_outputs)]
    return _finish_model(onnx, graph, inputs, outputs, path, repr(network),
                         {"bpfast_metadata": json.dumps(metadata)})
