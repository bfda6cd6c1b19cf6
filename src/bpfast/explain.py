"""The chain-rule trace: one training step of a real network, explained.

``bp.explain(net, X, y, loss, optimizer)`` runs one step on a copy of ``net`` and
returns an :class:`ExplainTrace`: the forward pass layer by layer, the loss, the
backward pass from the output (dL/da, the activation's derivative, delta, and for
every parameter the chain-rule product with its factors and values) and the update.
``print(trace)`` writes it in the textbook's notation; ``to_markdown()`` with LaTeX
formulas; ``to_dot()`` as a Graphviz graph of values and gradients.

Every number comes from bpfast's compiled kernels, not from a second
implementation here: the loss and the gradients of the whole network from
``Network.compute_gradients`` (the step ``train_step`` runs), the layers' outputs
from ``Network.forward``, and the per-layer intermediates (z, delta, dL/da, the
activation's derivative) from one-layer networks that run the same layer kernels
on the same inputs. The trace checks that its layer-by-layer gradients equal the
engine's bit for bit (``gradients_match_engine``). The update is the optimizer's
compiled step on the copy. The network is left unchanged unless ``apply=True``.
"""
import dataclasses
from fractions import Fraction
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._validation import check_bool, check_int, check_sample_weight
from .layers import Dense
from .losses import BinaryCrossEntropy, CrossEntropy, Loss
from .network import Network
from .optimizers import SGD, Optimizer, get_optimizer

__all__ = ["explain", "ExplainTrace", "LayerForward", "LayerBackward", "LayerUpdate"]

#: Above this many samples the walk-through shows matrices, never one line per value.
MAX_LISTED_ROWS = 8


@dataclasses.dataclass
class LayerForward:
    """One layer's forward pass: ``z = a_prev W^T + b``, ``a = g(z)``; arrays (n, width).

    ``weight`` and ``bias`` are the parameters of the pass (copies, before any update).
    """

    index: int
    layer: Dense
    weight: NDArray[np.floating]
    bias: NDArray[np.floating] | None
    input: NDArray[np.floating]
    z: NDArray[np.floating]
    a: NDArray[np.floating]


@dataclasses.dataclass
class LayerBackward:
    """One layer's backward pass.

    ``grad_output`` is dL/da (None where the loss is fused with the output's softmax or
    sigmoid and gives delta directly), ``activation_derivative`` g'(z) (None for
    softmax, whose derivative is a matrix), ``delta`` dL/dz, ``dW`` and ``db`` the
    parameter gradients (``db`` None without bias), ``grad_input`` dL/d(the layer's
    input).
    """

    index: int
    grad_output: NDArray[np.floating] | None
    activation_derivative: NDArray[np.floating] | None
    delta: NDArray[np.floating]
    dW: NDArray[np.floating]
    db: NDArray[np.floating] | None
    grad_input: NDArray[np.floating]


@dataclasses.dataclass
class LayerUpdate:
    """One layer's parameters before and after the optimizer's step."""

    index: int
    weight_before: NDArray[np.floating]
    weight: NDArray[np.floating]
    bias_before: NDArray[np.floating] | None
    bias: NDArray[np.floating] | None


class _Expr:
    """A formula piece in two renderings: plain text and LaTeX."""

    __slots__ = ("text", "tex")

    def __init__(self, text: str, tex: str | None = None) -> None:
        self.text = text
        self.tex = text if tex is None else tex


def _join(pieces, text_sep, tex_sep):
    return _Expr(text_sep.join(p.text for p in pieces), tex_sep.join(p.tex for p in pieces))


def _product(*factors):
    return _join(factors, " * ", r" \cdot ")


def _sum(*terms):
    return _join(terms, " + ", " + ")


def _equation(*sides):
    return _join(sides, " = ", " = ")


class _Names:
    """The textbook's names: inputs x, hidden units h, outputs y, targets t, weights
    w1, w2, ... and biases b1, b2, ... numbered in the order of ``net.parameters``."""

    def __init__(self, network):
        layers = network.layers
        n_hidden = len(layers) - 1
        self.units = [self._layer_names("x", layers[0].in_features, "")]
        for index, layer in enumerate(layers):
            if index == len(layers) - 1:
                self.units.append(self._layer_names("y", layer.out_features, ""))
            else:
                self.units.append(self._layer_names(
                    "h", layer.out_features, str(index + 1) if n_hidden > 1 else ""))
        self.targets = self._layer_names("t", layers[-1].out_features, "")
        self.weights, self.biases = [], []
        n_weights = n_biases = 0
        for layer in layers:
            count = layer.out_features * layer.in_features
            self.weights.append(np.array([f"w{n_weights + i + 1}" for i in range(count)])
                                .reshape(layer.out_features, layer.in_features))
            n_weights += count
            if layer.use_bias:
                self.biases.append([f"b{n_biases + j + 1}" for j in range(layer.out_features)])
                n_biases += layer.out_features
            else:
                self.biases.append(None)

    @staticmethod
    def _layer_names(letter, width, layer):
        if width == 1:
            return [f"{letter}{layer}"]
        separator = "_" if layer else ""
        return [f"{letter}{layer}{separator}{j + 1}" for j in range(width)]


def _tex_name(name):
    """h1 -> h_{1}, h2_3 -> h_{2,3}, z_h1 -> z_{h_{1}}, w12 -> w_{12}."""
    if name.startswith("z_"):
        return "z_{" + _tex_name(name[2:]) + "}"
    if name.startswith("delta_"):
        return r"\delta_{" + _tex_name(name[6:]) + "}"
    letters = name.rstrip("0123456789_")
    rest = name[len(letters):]
    return f"{letters}_{{{rest.replace('_', ',')}}}" if rest else letters


def _sym(name):
    return _Expr(name, _tex_name(name))


def _partial(top, bottom):
    return _Expr(f"d{top}/d{bottom}",
                 rf"\frac{{\partial {_tex_name(top)}}}{{\partial {_tex_name(bottom)}}}")


# --------------------------------------------------------------------------- the step
def explain(net: Network, X: ArrayLike, y: ArrayLike, loss: Loss | str,
            optimizer: Optimizer | str | None = None, *, apply: bool = False,
            max_terms: int = 50, sample_weight: ArrayLike | None = None) -> "ExplainTrace":
    """One training step of ``net`` on (X, y), explained with the chain rule.

    Parameters
    ----------
    net : Network
        The network; it is left unchanged unless ``apply=True``.
    X : array_like (n, n_inputs)
    y : targets for ``loss``, as in :meth:`Network.train_step`
    loss : Loss or str
    optimizer : Optimizer or str, optional
        With an optimizer the trace shows the update ``w <- w - lr * dL/dw`` (its
        own rule for the others), made by the optimizer's compiled step on a copy
        of the network and of the optimizer's state.
    apply : bool
        True: also take the step on ``net`` itself (``net.train_step``, or
        ``net.compute_gradients`` without an optimizer), which then holds the
        trace's gradients and updated parameters.
    max_terms : int
        Networks with at most this many parameters (and batches of at most
        8 samples) are written out value by value; larger ones as per-layer
        matrix formulas with shapes and summary numbers (norms, largest terms).
    sample_weight : array_like (n,), optional
        As in :meth:`Network.train_step`.

    Returns
    -------
    ExplainTrace
        ``print(trace)`` for the walk-through; ``trace.forward``,
        ``trace.backward``, ``trace.update`` for the values per layer.
    """
    if not isinstance(net, Network):
        raise TypeError(f"net must be a bpfast.Network, got {type(net).__name__}")
    apply = check_bool("apply", apply)
    max_terms = check_int("max_terms", max_terms, minimum=0)
    loss = net._check_loss(loss)
    X = net._check_input(X)
    target, labels = loss.prepare_target(y, X.shape[0], net.n_outputs, net.dtype)
    weights = check_sample_weight(sample_weight, X.shape[0])
    if optimizer is not None and not isinstance(optimizer, Optimizer):
        made = get_optimizer(optimizer)  # a name: the one the network keeps, if any
        optimizer = net.__dict__.get("_named_optimizers", {}).get(type(made), made)
    targets = labels if labels is not None else target

    # the copy, with the optimizer's state: the state protocol of bpfast.save
    state = net._get_state(optimizer)
    work = Network._from_state(state)
    work_optimizer = None
    if optimizer is not None:
        work_optimizer = Optimizer._from_state(state["optimizer"])
        if state["optimizer_state"] is not None:
            work_optimizer._restore(work, state["optimizer_state"],
                                    state["optimizer"]["step_count"])
        work_optimizer._bind_check(work)

    # the engine's step (train_step's forward, loss and backward, one compiled call)
    loss_value = work.compute_gradients(X, targets, loss, sample_weight=weights)
    engine_gradients = work.gradients.copy()
    output = work.forward(X)
    outputs = [work._engine.layer_output(index) for index in range(len(work.layers))]

    forward, backward = _layer_passes(work, X, outputs, loss, targets, weights)
    chained = np.concatenate([np.concatenate([b.dW.ravel()] + ([] if b.db is None else [b.db]))
                              for b in backward])
    matches = bool(np.array_equal(chained, engine_gradients))

    update, loss_after = [], None
    if work_optimizer is not None:
        before = [(layer.weight.copy(), None if layer.bias is None else layer.bias.copy())
                  for layer in work.layers]
        work.parameters = state["parameters"]
        work.gradients[...] = engine_gradients
        work_optimizer.step(work)  # the compiled update on the engine's gradients
        for index, layer in enumerate(work.layers):
            update.append(LayerUpdate(index, before[index][0], layer.weight.copy(),
                                      before[index][1],
                                      None if layer.bias is None else layer.bias.copy()))
        loss_after = loss(work.predict(X), targets, weights)
    if apply:
        if optimizer is not None:
            net.train_step(X, targets, loss, optimizer, sample_weight=weights)
        else:
            net.compute_gradients(X, targets, loss, sample_weight=weights)
    return ExplainTrace(
        network=work, X=X, target=target, labels=labels, sample_weight=weights, loss=loss,
        optimizer=work_optimizer, loss_value=float(loss_value), output=output,
        forward=forward, backward=backward, update=update, loss_after=loss_after,
        gradients=engine_gradients, gradients_match_engine=matches, max_terms=max_terms)


def _probe(layer, dtype, activation, weight, bias):
    """A one-layer network running ``layer``'s kernels with the given parameters."""
    arguments = layer.arguments()
    arguments.update(activation=activation, bias=bias is not None, init=None)
    if activation != layer.activation:
        arguments.pop("negative_slope", None)
        arguments.pop("alpha", None)
    in_features = weight.shape[1]
    probe = Network([Dense(in_features, weight.shape[0], **{
        key: value for key, value in arguments.items()
        if key not in ("in_features", "out_features")})], dtype=dtype)
    probe.layers[0].weight[...] = weight
    if bias is not None:
        probe.layers[0].bias[...] = bias
    return probe


def _layer_passes(work, X, outputs, loss, targets, weights):
    """Every layer's z, a, dL/da, g'(z), delta, dW, db and dL/d(input), from the kernels."""
    layers, dtype = work.layers, work.dtype
    forward = []
    for index, layer in enumerate(layers):
        layer_input = X if index == 0 else outputs[index - 1]
        linear = _probe(layer, dtype, "identity", layer.weight, layer.bias)
        forward.append(LayerForward(index, layer, layer.weight.copy(),
                                    None if layer.bias is None else layer.bias.copy(),
                                    layer_input, linear.predict(layer_input), outputs[index]))
    last = layers[-1]
    fused = (isinstance(loss, (CrossEntropy, BinaryCrossEntropy)) and not loss.from_logits
             and last.activation == loss.output_activation)
    if fused:  # the engine's fused output: the loss on logits, from z
        on_logits = type(loss)(from_logits=True, reduction=loss.reduction)
        delta_out = on_logits.gradient(forward[-1].z, targets, weights)
        grad_output = None
    else:
        # Loss.gradient: dL/da as the engine takes it (a custom loss's own gradient
        # method is the user's per-sample function)
        grad_output = Loss.gradient(loss, outputs[-1], targets, weights)
    backward: list[Any] = [None] * len(layers)
    for index in range(len(layers) - 1, -1, -1):
        layer, passed = layers[index], forward[index]
        derivative = None
        if index == len(layers) - 1 and fused:
            delta = delta_out
        else:
            # delta = dL/da * g'(z): the activation's backward kernel, on an identity layer
            width = layer.out_features
            unit = _probe(layer, dtype, layer.activation, np.eye(width), None)
            unit.forward(passed.z)
            delta = unit.backward(grad_output)
            if layer.activation != "softmax":
                unit.forward(passed.z)
                derivative = unit.backward(np.ones_like(grad_output))
        linear = _probe(layer, dtype, "identity", layer.weight, layer.bias)
        linear.forward(passed.input)
        grad_input = linear.backward(delta)
        backward[index] = LayerBackward(
            index, grad_output, derivative, delta, linear.layers[0].grad_weight.copy(),
            None if layer.bias is None else linear.layers[0].grad_bias.copy(), grad_input)
        grad_output = grad_input
    return forward, backward


# --------------------------------------------------------------------------- the trace
class ExplainTrace:
    """The result of :func:`explain`: the values of one training step, per layer.

    Attributes
    ----------
    forward : list of LayerForward
        Per layer: ``input``, ``z``, ``a``.
    backward : list of LayerBackward
        Per layer (in layer order): ``grad_output`` (dL/da), ``activation_derivative``,
        ``delta`` (dL/dz), ``dW``, ``db``, ``grad_input``.
    update : list of LayerUpdate
        Per layer, the parameters before and after the step; empty without an optimizer.
    loss_value : float
        The loss of the forward pass (the engine's).
    loss_after : float or None
        The loss after the update, with the same data.
    gradients : ndarray
        The flat gradient from ``Network.compute_gradients`` (the engine's).
    gradients_match_engine : bool
        Whether the layer-by-layer gradients equal ``gradients`` bit for bit.
    """

    def __init__(self, *, network, X, target, labels, sample_weight, loss, optimizer,
                 loss_value, output, forward, backward, update, loss_after, gradients,
                 gradients_match_engine, max_terms):
        self.network, self.X, self.target, self.labels = network, X, target, labels
        self.sample_weight, self.loss, self.optimizer = sample_weight, loss, optimizer
        self.loss_value, self.output, self.loss_after = loss_value, output, loss_after
        self.forward, self.backward, self.update = forward, backward, update
        self.gradients = gradients
        self.gradients_match_engine = gradients_match_engine
        self.max_terms = max_terms
        self.names = _Names(network)
        self.note: str | None = None  # a remark printed at the end (the examples' sources)

    @property
    def detailed(self) -> bool:
        """Whether the walk-through writes every value (else matrix formulas)."""
        return (self.network.n_parameters <= self.max_terms
                and self.X.shape[0] <= MAX_LISTED_ROWS)

    def __str__(self) -> str:
        return self.format()

    def __repr__(self) -> str:
        return (f"<ExplainTrace: {len(self.forward)} layers, {self.X.shape[0]} samples, "
                f"loss {self.loss_value:.6g}>")

    def format(self, digits: int = 6) -> str:
        """The walk-through as text, numbers with ``digits`` decimals."""
        return "\n".join(text for text, _ in self._lines(digits)) + "\n"

    def to_markdown(self, digits: int = 6) -> str:
        """The walk-through as Markdown with LaTeX formulas (``$$ ... $$``), for notebooks."""
        out = []
        for text, tex in self._lines(digits):
            if tex is None:
                out.append(text.strip())
            elif tex.startswith("#") or tex == "":
                out.append(tex)
            else:
                out.append(f"$$ {tex} $$")
        return "\n\n".join(line for line in out if line) + "\n"

    # ---------------------------------------------------------------- the lines
    def _lines(self, digits):
        """(text, LaTeX or None) pairs: None is prose, the same in both; a LaTeX starting
        with '#' is a heading."""
        writer = _Writer(self, digits)
        return writer.lines()

    # ---------------------------------------------------------------- the graph
    def to_dot(self, digits: int = 4) -> str:
        """The network as a Graphviz DOT graph: a node per neuron (or, for large
        networks, per layer) and per value (inputs, targets, loss), each a record
        "value | grad" as micrograd draws them; edges carry the weights and their
        gradients."""
        return _dot(self, digits)


def _number(value, digits):
    text = f"{float(value):.{digits}f}"
    return "0." + "0" * digits if text == "-0." + "0" * digits else text


class _Writer:
    """Builds the walk-through's lines for one trace."""

    def __init__(self, trace, digits):
        self.trace, self.digits = trace, digits
        self.names = trace.names
        self.single = trace.X.shape[0] == 1
        self.out: list[tuple[str, str | None]] = []

    def num(self, value):
        text = _number(value, self.digits)
        return _Expr(f"({text})" if text.startswith("-") else text)

    def values(self, array):
        """A per-sample value: a number for one sample, else [v1, v2, ...]."""
        array = np.asarray(array).ravel()
        if array.size == 1:
            return self.num(array[0])
        body = ", ".join(_number(v, self.digits) for v in array)
        return _Expr(f"[{body}]", rf"\left[{body}\right]")

    def prose(self, text):
        self.out.append((text, None))

    def heading(self, text):
        self.out.append(("", None) if not self.out else ("", ""))
        self.out.append((text, f"### {text}"))

    def formula(self, expr, indent=2):
        self.out.append((" " * indent + expr.text, expr.tex))

    def lines(self):
        trace = self.trace
        net = trace.network
        shape = " -> ".join([str(net.n_inputs)] + [
            f"{layer.out_features} {layer.activation}" for layer in net.layers])
        self.prose(f"One training step of a {net.dtype.name} network ({shape}), "
                   f"{trace.X.shape[0]} sample{'s' if trace.X.shape[0] != 1 else ''}, "
                   f"explained with the chain rule")
        self.prose(f"loss {trace.loss!r}; " + (f"optimizer {trace.optimizer!r}"
                                               if trace.optimizer else "no optimizer"))
        if trace.detailed:
            self.prose("names: inputs x, hidden units h, outputs y, targets t; weights w "
                       "and biases b numbered in the order of net.parameters (each weight "
                       "matrix row by row, (out, in))")
            self.detailed_lines()
        else:
            self.summary_lines()
        self.heading("Check")
        if trace.gradients_match_engine:
            self.prose("These gradients, taken layer by layer, are bit for bit the ones "
                       "Network.compute_gradients gives (the engine's train_step).")
        else:
            difference = np.max(np.abs(self.layer_gradients() - trace.gradients))
            self.prose("The layer-by-layer gradients differ from Network.compute_gradients "
                       f"by up to {difference:.3g} (rounding); the trace's dW and db are "
                       "the layer-by-layer ones.")
        if trace.note:
            self.heading("Note")
            self.prose(trace.note)
        return self.out

    def layer_gradients(self):
        return np.concatenate([np.concatenate([b.dW.ravel()] + ([] if b.db is None else [b.db]))
                               for b in self.trace.backward])

    # ---------------------------------------------------------------- value by value
    def detailed_lines(self):
        trace, names = self.trace, self.names
        n_layers = len(trace.forward)
        self.heading("Forward pass: z = W a + b, a = g(z)")
        for passed in trace.forward:
            layer, index = passed.layer, passed.index
            inputs, units = names.units[index], names.units[index + 1]
            self.prose(f"  layer {index + 1} ({layer.activation}):")
            for j, unit in enumerate(units):
                terms = [_product(_sym(names.weights[index][j, k]), _sym(inputs[k]))
                         for k in range(layer.in_features)]
                numbers = [_product(self.num(passed.weight[j, k]),
                                    self.values(passed.input[:, k]))
                           for k in range(layer.in_features)]
                if layer.use_bias:
                    terms.append(_sym(names.biases[index][j]))
                    numbers.append(self.num(passed.bias[j]))
                sides = [_sym(f"z_{unit}"), _sum(*terms)]
                if self.single:
                    sides.append(_sum(*numbers))
                sides.append(self.values(passed.z[:, j]))
                self.formula(_equation(*sides), 4)
            for j, unit in enumerate(units):
                self.formula(_equation(_sym(unit), self.activation_of(layer, f"z_{unit}"),
                                       self.values(passed.a[:, j])), 4)
        self.loss_lines()
        self.heading("Backward pass: the chain rule, from the output")
        for index in range(n_layers - 1, -1, -1):
            self.backward_layer(index, index == n_layers - 1)
        if trace.update:
            self.update_lines()

    def activation_of(self, layer, z_name):
        name = str(layer.activation)  # a CustomActivation's name
        if name == "identity":
            return _sym(z_name)
        tex = {"sigmoid": r"\sigma", "tanh": r"\tanh", "softmax": r"\mathrm{softmax}"}.get(
            name, rf"\mathrm{{{name.replace('_', '')}}}")
        return _Expr(f"{name}({z_name})", rf"{tex}({_tex_name(z_name)})")

    def loss_lines(self):
        trace = self.trace
        self.heading("Loss")
        formula = _loss_formula(trace, self)
        self.formula(formula, 2)
        if trace.loss.reduction == "mean" and trace.sample_weight is not None:
            self.prose("  (weighted by sample_weight: sum(w_i * loss_i) / sum(w_i))")

    def backward_layer(self, index, is_output):
        trace, names = self.trace, self.names
        passed, grads = trace.forward[index], trace.backward[index]
        layer = passed.layer
        units, inputs = names.units[index + 1], names.units[index]
        self.prose(f"  layer {index + 1} ({layer.activation}):")
        fused = grads.grad_output is None
        derivative_symbols = []
        for j, unit in enumerate(units):
            if fused:
                self.formula(_equation(_sym(f"delta_{unit}"), _partial("L", f"z_{unit}"),
                                       *_fused_delta(trace, j, self),
                                       self.values(grads.delta[:, j])), 4)
                derivative_symbols.append(None)
                continue
            if is_output:
                self.formula(_equation(_partial("L", unit), *_output_gradient(trace, j, self),
                                       self.values(grads.grad_output[:, j])), 4)
            else:
                following = trace.forward[index + 1]
                nxt = names.units[index + 2]
                symbols = [_product(_partial("L", f"z_{nxt[i]}"),
                                    _sym(names.weights[index + 1][i, j]))
                           for i in range(following.layer.out_features)]
                sides = [_partial("L", unit), _sum(*symbols)]
                if self.single:
                    sides.append(_sum(*[
                        _product(self.values(trace.backward[index + 1].delta[:, i]),
                                 self.num(following.weight[i, j]))
                        for i in range(following.layer.out_features)]))
                sides.append(self.values(grads.grad_output[:, j]))
                self.formula(_equation(*sides), 4)
            if grads.activation_derivative is None:  # softmax: a matrix, delta directly
                self.formula(_equation(
                    _sym(f"delta_{unit}"),
                    _Expr(f"{unit} * (dL/d{unit} - sum_k y_k dL/dy_k)",
                          rf"{_tex_name(unit)} \left(\frac{{\partial L}}{{\partial "
                          rf"{_tex_name(unit)}}} - \sum_k y_k \frac{{\partial L}}"
                          rf"{{\partial y_k}}\right)"),
                    self.values(grads.delta[:, j])), 4)
                derivative_symbols.append(None)
                continue
            if layer.activation == "identity":
                self.formula(_equation(
                    _sym(f"delta_{unit}"), _partial("L", f"z_{unit}"),
                    _Expr(f"dL/d{unit} (identity: d{unit}/dz_{unit} = 1)",
                          rf"\frac{{\partial L}}{{\partial {_tex_name(unit)}}}"),
                    self.values(grads.delta[:, j])), 4)
                derivative_symbols.append(None)
                continue
            derivative = _derivative_formula(layer, unit, self, passed.a[:, j], passed.z[:, j])
            self.formula(_equation(_partial(unit, f"z_{unit}"), *derivative,
                                   self.values(grads.activation_derivative[:, j])), 4)
            sides = [_sym(f"delta_{unit}"), _partial("L", f"z_{unit}"),
                     _product(_partial("L", unit), _partial(unit, f"z_{unit}"))]
            if self.single:
                sides.append(_product(self.values(grads.grad_output[:, j]),
                                      self.values(grads.activation_derivative[:, j])))
            sides.append(self.values(grads.delta[:, j]))
            self.formula(_equation(*sides), 4)
            derivative_symbols.append(
                derivative[0] if layer.activation in ("sigmoid", "tanh") else _Expr(
                    f"{layer.activation}'(z_{unit})",
                    rf"\mathrm{{{str(layer.activation).replace('_', '')}}}'"
                    rf"({_tex_name('z_' + unit)})"))
        for j, unit in enumerate(units):
            for k in range(layer.in_features):
                self.parameter_line(index, j, unit, names.weights[index][j, k], inputs[k],
                                    passed.input[:, k], grads.dW[j, k], is_output,
                                    grads, derivative_symbols[j])
            if layer.use_bias:
                self.parameter_line(index, j, unit, names.biases[index][j], None, None,
                                    grads.db[j], is_output, grads, derivative_symbols[j])

    def parameter_line(self, index, j, unit, parameter, source, source_values, gradient,
                       is_output, grads, derivative_symbol):
        """dL/dw = dL/da * da/dz * dz/dw = (symbols) = (numbers) = value."""
        trace = self.trace
        activation = trace.forward[index].layer.activation
        fused = grads.grad_output is None
        source_symbol = _sym(source) if source is not None else _Expr("1")
        if fused or activation == "softmax":
            chain = [_partial("L", f"z_{unit}"), _partial(f"z_{unit}", parameter)]
            symbols = [_sym(f"delta_{unit}"), source_symbol]
            numbers = [self.values(grads.delta[:, j])]
        elif activation == "identity":
            chain = [_partial("L", unit), _partial(unit, parameter)]
            first = _output_gradient(trace, j, self)[0] if is_output else _partial("L", unit)
            symbols = [first, source_symbol]
            numbers = [self.values(grads.grad_output[:, j])]
        else:
            chain = [_partial("L", unit), _partial(unit, f"z_{unit}"),
                     _partial(f"z_{unit}", parameter)]
            first = _output_gradient(trace, j, self)[0] if is_output else _partial("L", unit)
            symbols = [first, derivative_symbol, source_symbol]
            numbers = [self.values(grads.grad_output[:, j]),
                       self.values(grads.activation_derivative[:, j])]
        numbers.append(self.num(1.0) if source is None else self.values(source_values))
        sides = [_partial("L", parameter), _product(*chain), _product(*symbols)]
        if self.single:
            sides.append(_product(*numbers))
        else:
            sides[-1] = _Expr(f"sum over samples of {sides[-1].text}",
                              rf"\sum_{{s}} {sides[-1].tex}")
        sides.append(self.num(gradient))
        self.formula(_equation(*sides), 4)

    def update_lines(self):
        trace, names = self.trace, self.names
        optimizer = trace.optimizer
        plain = isinstance(optimizer, SGD) and all(
            not value for key, value in optimizer._hyperparameters.items()
            if key in ("momentum", "weight_decay"))
        if plain:
            self.heading(f"Update: w <- w - lr * dL/dw (SGD, lr = {optimizer.lr:g})")
        else:
            self.heading(f"Update: {type(optimizer).__name__}'s rule (PyTorch's), "
                         "w <- w + step")
        lr = _Expr(f"{optimizer.lr:g}")
        for update, grads in zip(trace.update, trace.backward, strict=True):
            pairs = [(names.weights[update.index].ravel(), update.weight_before.ravel(),
                      update.weight.ravel(), grads.dW.ravel())]
            if update.bias is not None:
                pairs.append((names.biases[update.index], update.bias_before, update.bias,
                              grads.db))
            for labels, before, after, gradient in pairs:
                for label, old, new, grad in zip(labels, before, after, gradient, strict=True):
                    if plain:
                        sides = [_Expr(f"{label} <- {label} - lr * dL/d{label}",
                                       rf"{_tex_name(label)} \leftarrow {_tex_name(label)} "
                                       rf"- \eta \frac{{\partial L}}{{\partial "
                                       rf"{_tex_name(label)}}}"),
                                 _Expr(f"{self.num(old).text} - {lr.text} * "
                                       f"{self.num(grad).text}",
                                       rf"{self.num(old).tex} - {lr.tex} \cdot "
                                       rf"{self.num(grad).tex}"),
                                 self.num(new)]
                    else:
                        sides = [_Expr(f"{label} <- {label} + step",
                                       rf"{_tex_name(label)} \leftarrow {_tex_name(label)} "
                                       r"+ \Delta"),
                                 _Expr(f"{self.num(old).text} + {self.num(new - old).text}"),
                                 self.num(new)]
                    self.formula(_equation(*sides), 2)
        self.prose(f"  loss after the update: {_number(trace.loss_after, self.digits)}")

    # ---------------------------------------------------------------- matrices
    def summary_lines(self):
        trace = self.trace
        n = trace.X.shape[0]
        self.prose(f"{trace.network.n_parameters} parameters: the walk-through shows each "
                   "layer's matrix formulas with shapes, norms (||.||, Frobenius) and the "
                   "largest terms")
        self.heading("Forward pass: Z = A W^T + b, A = g(Z) (rows are samples)")
        for passed in trace.forward:
            layer, label = passed.layer, passed.index + 1
            self.prose(f"  layer {label}: {layer!r}")
            self.formula(_Expr(
                f"Z{label} = A{label - 1} W{label}^T" + (f" + b{label}" if layer.use_bias else "")
                + f"   {passed.z.shape} = {passed.input.shape} x {layer.weight.shape[::-1]}",
                rf"Z^{{[{label}]}} = A^{{[{label - 1}]}} W^{{[{label}]\top}}"
                + (rf" + b^{{[{label}]}}" if layer.use_bias else "")), 4)
            low, high = (_number(v, self.digits) for v in (passed.z.min(), passed.z.max()))
            self.prose(f"    ||Z{label}|| = {self.norm(passed.z)}, range [{low}, {high}]")
            self.formula(_Expr(f"A{label} = {layer.activation}(Z{label})   {passed.a.shape}",
                               rf"A^{{[{label}]}} = g(Z^{{[{label}]}})"), 4)
            self.prose(f"    ||A{label}|| = {self.norm(passed.a)}")
        self.heading("Loss")
        self.prose(f"  L = {trace.loss!r} over {n} samples = "
                   f"{_number(trace.loss_value, self.digits)}")
        self.heading("Backward pass: the chain rule, from the output")
        for index in range(len(trace.forward) - 1, -1, -1):
            grads, passed = trace.backward[index], trace.forward[index]
            label = index + 1
            self.prose(f"  layer {label}: {passed.layer!r}")
            if grads.grad_output is None:
                self.formula(_Expr(f"delta{label} = dL/dZ{label} = {_fused_text(trace)}",
                                   rf"\delta^{{[{label}]}} = \frac{{\partial L}}"
                                   rf"{{\partial Z^{{[{label}]}}}} = {_fused_tex(trace)}"), 4)
            else:
                self.formula(_Expr(
                    f"delta{label} = dL/dA{label} * g'(Z{label})   {grads.delta.shape}",
                    rf"\delta^{{[{label}]}} = \frac{{\partial L}}{{\partial A^{{[{label}]}}}}"
                    rf" \odot g'(Z^{{[{label}]}})"), 4)
                self.prose(f"    ||dL/dA{label}|| = {self.norm(grads.grad_output)}")
            self.prose(f"    ||delta{label}|| = {self.norm(grads.delta)}")
            self.formula(_Expr(f"dW{label} = delta{label}^T A{label - 1}   {grads.dW.shape}",
                               rf"\frac{{\partial L}}{{\partial W^{{[{label}]}}}} = "
                               rf"\delta^{{[{label}]\top}} A^{{[{label - 1}]}}"), 4)
            self.prose(f"    ||dW{label}|| = {self.norm(grads.dW)}; largest: "
                       + self.largest(grads.dW, f"dW{label}"))
            if grads.db is not None:
                self.formula(_Expr(f"db{label} = column sums of delta{label}   "
                                   f"{grads.db.shape}",
                                   rf"\frac{{\partial L}}{{\partial b^{{[{label}]}}}} = "
                                   rf"\textstyle\sum_s \delta^{{[{label}]}}_s"), 4)
                self.prose(f"    ||db{label}|| = {self.norm(grads.db)}")
            if index:
                self.formula(_Expr(f"dL/dA{label - 1} = delta{label} W{label}   "
                                   f"{grads.grad_input.shape}",
                                   rf"\frac{{\partial L}}{{\partial A^{{[{label - 1}]}}}} = "
                                   rf"\delta^{{[{label}]}} W^{{[{label}]}}"), 4)
        if trace.update:
            self.heading(f"Update: {trace.optimizer!r}")
            for update in trace.update:
                label = update.index + 1
                step = update.weight - update.weight_before
                self.prose(f"  W{label} <- W{label} + step: ||step|| = {self.norm(step)}, "
                           f"||W{label}|| {self.norm(update.weight_before)} -> "
                           f"{self.norm(update.weight)}")
            self.prose(f"  loss after the update: {_number(trace.loss_after, self.digits)}")

    def norm(self, array):
        return _number(np.linalg.norm(np.asarray(array, dtype=np.float64)), self.digits)

    def largest(self, array, name, count=3):
        flat = np.abs(array).ravel()
        order = np.argsort(-flat, kind="stable")[:count]
        return ", ".join(f"{name}[{i // array.shape[1]}, {i % array.shape[1]}] = "
                         f"{_number(array.flat[i], self.digits)}" for i in order)


# --------------------------------------------------------------------------- loss formulas
def _scale(trace, terms_per_sample):
    """The mean's denominator as a Fraction: 1 for "sum", else samples (x outputs);
    None with sample weights (see _weighting)."""
    if trace.sample_weight is not None:
        return None
    if trace.loss.reduction == "sum":
        return Fraction(1)
    return Fraction(trace.X.shape[0] * terms_per_sample)


def _weighting(trace, terms_per_sample):
    """With sample weights: (factor, divisor) texts, "w " and "" for a sum, "w " and
    " / (m sum w)" for the weighted mean."""
    if trace.loss.reduction == "sum":
        return "w ", ""
    per = "" if terms_per_sample == 1 else f"{terms_per_sample} "
    return "w ", f" / ({per}sum w)"


def _fraction_text(value):
    return "" if value == 1 else f"{value.numerator}/{value.denominator} "


def _fraction_tex(value):
    return "" if value == 1 else rf"\frac{{{value.numerator}}}{{{value.denominator}}}"


def _loss_formula(trace, writer):
    loss, n_out = trace.loss, trace.network.n_outputs
    name = type(loss).__name__
    value = writer.num(trace.loss_value)
    ys, ts = trace.names.units[-1], trace.names.targets
    per_sample = 1 if isinstance(loss, CrossEntropy) else n_out
    scale = _scale(trace, per_sample)
    coefficient = None
    if scale is not None:
        coefficient = Fraction(1, 1) / scale
        if name == "MSE" and loss.half:
            coefficient /= 2
    sum_text = "" if per_sample * trace.X.shape[0] == 1 else "sum "
    sum_tex = "" if per_sample * trace.X.shape[0] == 1 else r"\sum "
    if coefficient is None:
        half = "1/2 " if name == "MSE" and loss.half else ""
        if loss.reduction == "sum":
            lead_text, lead_tex = f"{half}sum w ", f"{half}\\sum w "
        else:
            divisor = "sum w" if per_sample == 1 else f"({per_sample} sum w)"
            lead_text = f"sum w l / {divisor}, l = {half}"
            lead_tex = rf"\textstyle\sum w\,l / \sum w,\ l = {half}"
        lead_tex = lead_tex.replace("1/2 ", r"\frac{1}{2}")
    else:
        lead_text, lead_tex = _fraction_text(coefficient) + sum_text, \
            _fraction_tex(coefficient) + sum_tex
    if name == "MSE":
        formula = _Expr(f"L = {lead_text}(y - t)^2", f"L = {lead_tex}(y - t)^2")
        if writer.single and coefficient is not None:
            terms = [f"({_number(trace.output[0, j], writer.digits)} - "
                     f"{_number(trace.target[0, j], writer.digits)})^2" for j in range(n_out)]
            numbers = " + ".join(terms)
            numbers = f"[{numbers}]" if n_out > 1 else numbers
            text = f"{_fraction_text(coefficient)}{numbers}"
            return _equation(formula, _Expr(text, text.replace("1/2 ", r"\frac{1}{2}")),
                             value)
        del ys, ts
        return _equation(formula, value)
    if isinstance(loss, CrossEntropy):
        formula = _Expr(f"L = {lead_text}(-sum_j t_j log p_j)",
                        rf"L = {lead_tex}\left(-\sum_j t_j \log p_j\right)")
        if writer.single and trace.labels is not None:
            label = int(trace.labels[0])
            probability = trace.forward[-1].a[0, label] if not loss.from_logits else None
            if probability is not None:
                return _equation(formula, _Expr(f"-log p_{label + 1} = -log "
                                                f"{_number(probability, writer.digits)}",
                                                rf"-\log p_{{{label + 1}}}"), value)
        return _equation(formula, value)
    if isinstance(loss, BinaryCrossEntropy):
        return _equation(_Expr(f"L = {lead_text}-[t log p + (1 - t) log(1 - p)]",
                               rf"L = {lead_tex}-\left[t \log p + (1 - t)\log(1 - p)\right]"),
                         value)
    if name == "L1":
        return _equation(_Expr(f"L = {lead_text}|y - t|", f"L = {lead_tex}|y - t|"), value)
    if name == "Huber":
        return _equation(_Expr(f"L = {lead_text}huber_{loss.delta:g}(y - t)",
                               rf"L = {lead_tex}\mathrm{{huber}}_{{{loss.delta:g}}}(y - t)"),
                         value)
    return _equation(_Expr(f"L = {loss!r}"), value)


def _output_gradient(trace, j, writer):
    """dL/dy_j: its formula (with numbers for one sample) as equation sides."""
    loss = trace.loss
    y, t = trace.names.units[-1][j], trace.names.targets[j]
    per_sample = 1 if isinstance(loss, CrossEntropy) else trace.network.n_outputs
    scale = _scale(trace, per_sample)
    if type(loss).__name__ == "MSE" and scale is None:
        factor, divisor = _weighting(trace, per_sample)
        constant = "" if loss.half else "2 "
        return [_Expr(f"{constant}{factor}({y} - {t}){divisor}")]
    if type(loss).__name__ == "MSE":
        coefficient = Fraction(1 if loss.half else 2) / scale
        symbolic = _Expr(f"{_fraction_text(coefficient)}({y} - {t})",
                         f"{_fraction_tex(coefficient)}({_tex_name(y)} - {_tex_name(t)})")
        if writer.single:
            output = _number(trace.output[0, j], writer.digits)
            numbers = (f"{_fraction_text(coefficient)}({output}"
                       f" - {_number(trace.target[0, j], writer.digits)})")
            return [symbolic, _Expr(numbers)]
        return [symbolic]
    text = {"L1": f"sign({y} - {t}) / N", "Huber": f"clip({y} - {t}, -delta, delta) / N",
            "CrossEntropy": f"(softmax(y)_{j + 1} - {t}) / n" if loss_from_logits(loss)
            else f"-{t} / {y} / n",
            "BinaryCrossEntropy": f"(sigmoid({y}) - {t}) / N" if loss_from_logits(loss)
            else f"({y} - {t}) / ({y} (1 - {y})) / N"}.get(type(loss).__name__, f"dL/d{y}")
    if loss.reduction == "sum" or scale is None:
        text = text.replace(" / N", "").replace(" / n", "")
    if scale is None:
        factor, divisor = _weighting(trace, per_sample)
        text = f"{factor}{text}{divisor}"
    return [_Expr(text)]


def loss_from_logits(loss):
    return bool(getattr(loss, "from_logits", False))


def _fused_text(trace):
    divisor = "" if trace.loss.reduction == "sum" else " / n" if isinstance(
        trace.loss, CrossEntropy) else " / N"
    activation = "softmax" if isinstance(trace.loss, CrossEntropy) else "sigmoid"
    return f"(p - t){divisor}   ({activation} + cross-entropy, fused)"


def _fused_tex(trace):
    divisor = "" if trace.loss.reduction == "sum" else r" / n"
    return rf"(p - t){divisor}"


def _fused_delta(trace, j, writer):
    """delta_y = (p - t) / n for softmax (sigmoid) with cross-entropy: equation sides."""
    y, t = trace.names.units[-1][j], trace.names.targets[j]
    scale = _scale(trace, 1 if isinstance(trace.loss, CrossEntropy)
                   else trace.network.n_outputs)
    coefficient = Fraction(1) / scale if scale is not None else None
    if coefficient is None:
        factor, divisor = _weighting(trace, 1 if isinstance(trace.loss, CrossEntropy)
                                     else trace.network.n_outputs)
        return [_Expr(f"{factor}({y} - {t}){divisor}")]
    lead_text = _fraction_text(coefficient)
    lead_tex = _fraction_tex(coefficient)
    sides = [_Expr(f"{lead_text}({y} - {t})", f"{lead_tex}({_tex_name(y)} - {_tex_name(t)})")]
    if writer.single and coefficient is not None:
        target = (float(trace.labels[0] == j) if trace.labels is not None
                  else trace.target[0, j])
        sides.append(_Expr(f"{lead_text}({_number(trace.forward[-1].a[0, j], writer.digits)} - "
                           f"{_number(target, writer.digits)})"))
    return sides


def _derivative_formula(layer, unit, writer, a, z):
    """g'(z) of an elementwise activation: [symbolic, with numbers (one sample)]."""
    name, u, tu = layer.activation, unit, _tex_name(unit)
    zu = _tex_name(f"z_{unit}")
    one = writer.single
    a_text = writer.num(a[0]).text if one else ""
    z_text = writer.num(z[0]).text if one else ""
    symbolic, numbers = {
        "identity": (_Expr("1"), None),
        "sigmoid": (_Expr(f"{u} (1 - {u})", f"{tu}(1 - {tu})"),
                    _Expr(f"{a_text} * (1 - {a_text})", rf"{a_text} \cdot (1 - {a_text})")),
        "tanh": (_Expr(f"(1 - {u}^2)", f"(1 - {tu}^2)"), _Expr(f"1 - {a_text}^2")),
        "relu": (_Expr(f"1 if z_{u} > 0 else 0", rf"[{zu} > 0]"), None),
        "leaky_relu": (_Expr(f"1 if z_{u} > 0 else {layer.activation_param:g}",
                             rf"1 \text{{ or }} {layer.activation_param:g}"), None),
        "elu": (_Expr(f"1 if z_{u} > 0 else {u} + {layer.activation_param:g}",
                      rf"1 \text{{ or }} {tu} + {layer.activation_param:g}"), None),
        "softplus": (_Expr(f"sigmoid(z_{u})", rf"\sigma({zu})"),
                     _Expr(f"sigmoid({z_text})")),
        "gelu": (_Expr(f"Phi(z_{u}) + z_{u} phi(z_{u})", rf"\Phi({zu}) + {zu}\,\varphi({zu})"),
                 None),
    }.get(name, (_Expr(f"{name}'(z_{u})", rf"\mathrm{{{str(name).replace('_', '')}}}'({zu})"),
                 None))  # silu, mish, ..., and custom activations: g' by name
    return [symbolic] + ([numbers] if one and numbers is not None else [])


# --------------------------------------------------------------------------- DOT
def _dot_escape(text):
    for character in "\\{}|<>\"":
        text = text.replace(character, "\\" + character)
    return text


def _dot(trace, digits):
    def num(value):
        array = np.asarray(value).ravel()
        if array.size == 1:
            return _number(array[0], digits)
        if array.size <= MAX_LISTED_ROWS:
            return "[" + ", ".join(_number(v, digits) for v in array) + "]"
        return f"({array.size} values)"

    lines = ["digraph backprop {", "  rankdir=LR;",
             '  node [shape=record, fontname="Helvetica", fontsize=10];',
             '  edge [fontname="Helvetica", fontsize=9];']
    names = trace.names
    if trace.detailed:
        for k, name in enumerate(names.units[0]):
            grad = trace.backward[0].grad_input[:, k]
            lines.append(f'  "{name}" [label="{_dot_escape(name)} | value '
                         f'{num(trace.X[:, k])} | grad {num(grad)}"];')
        for passed, grads in zip(trace.forward, trace.backward, strict=True):
            layer, index = passed.layer, passed.index
            for j, unit in enumerate(names.units[index + 1]):
                fields = [unit, f"z {num(passed.z[:, j])}", f"value {num(passed.a[:, j])}"]
                if grads.grad_output is not None:
                    fields.append(f"grad {num(grads.grad_output[:, j])}")
                fields.append(f"delta {num(grads.delta[:, j])}")
                if layer.use_bias:
                    bias = names.biases[index][j]
                    fields.append(f"{bias} {num(passed.bias[j])} grad {num(grads.db[j])}")
                label = " | ".join(_dot_escape(f) for f in fields)
                lines.append(f'  "{unit}" [label="{label}"];')
                for k, source in enumerate(names.units[index]):
                    weight = names.weights[index][j, k]
                    lines.append(f'  "{source}" -> "{unit}" [label="{weight} = '
                                 f'{num(passed.weight[j, k])}\\ngrad {num(grads.dW[j, k])}"];')
        last = names.units[-1]
    else:
        lines.append(f'  "x" [label="x | value ({trace.X.shape[0]}, {trace.X.shape[1]}) '
                     f'| grad norm {num(np.linalg.norm(trace.backward[0].grad_input))}"];')
        previous = "x"
        for passed, grads in zip(trace.forward, trace.backward, strict=True):
            node = f"layer{passed.index + 1}"
            fields = [f"layer {passed.index + 1}: {passed.layer!r}",
                      f"value norm {num(np.linalg.norm(passed.a))}",
                      f"delta norm {num(np.linalg.norm(grads.delta))}",
                      f"dW norm {num(np.linalg.norm(grads.dW))}"]
            label = " | ".join(_dot_escape(f) for f in fields)
            lines.append(f'  "{node}" [label="{label}"];')
            lines.append(f'  "{previous}" -> "{node}" [label="W{passed.index + 1} '
                         f'{passed.layer.weight.shape}"];')
            previous = node
        last = [previous]
    lines.append(f'  "L" [label="L | value {num(trace.loss_value)} | grad 1", '
                 'style=filled, fillcolor="#f2f2f2"];')
    for j, unit in enumerate(last):
        target = (names.targets[j] if trace.detailed else "t")
        if trace.detailed:
            value = (trace.labels == j).astype(float) if trace.labels is not None \
                else trace.target[:, j]
            lines.append(f'  "{target}" [label="{target} | value {num(value)}"];')
            lines.append(f'  "{target}" -> "L";')
        lines.append(f'  "{unit}" -> "L";')
    lines.append("}")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- examples
def example(name: str = "textbook") -> dict[str, Any]:
    """A worked example for :func:`explain` (and ``bpfast explain --example NAME``).

    ``"textbook"``: one input, a sigmoid hidden unit, a linear output, no biases,
    x = 1, t = 0, w1 = w2 = 0.5, half squared error, SGD with lr 0.1.
    ``"mazur"``: the two-input, two-hidden, two-output sigmoid network of Matt
    Mazur's "A Step by Step Backpropagation Example" (inputs 0.05, 0.10, targets
    0.01, 0.99, w1..w8 = .15 .20 .25 .30 .40 .45 .50 .55, b1 = .35, b2 = .60 for
    every unit of its layer, E = 1/2 sum (t - o)^2, lr 0.5).
    ``"softmax"``: a 2-3-3 classifier, tanh hidden layer, softmax output with
    cross-entropy (dL/dz = p - t), one sample of class 3, lr 0.1.

    Returns a dict with ``net``, ``X``, ``y``, ``loss``, ``optimizer``, ``digits`` and
    ``note`` (the published values, for the command line).
    """
    if name == "textbook":
        net = Network([Dense(1, 1, "sigmoid", bias=False), Dense(1, 1, bias=False)],
                      dtype="float64")
        net.parameters = [0.5, 0.5]
        from .losses import MSE
        return dict(net=net, X=[[1.0]], y=[[0.0]], loss=MSE(half=True),
                    optimizer=SGD(lr=0.1), digits=6, note=(
                        "The textbook's worked example (x = 1, t = 0, w1 = w2 = 0.5, lr 0.1, "
                        "E = 1/2 (y - t)^2) publishes h = 0.6225, y = 0.3112, E = 0.0484, "
                        "dE/dw2 = 0.1938, dE/dw1 = 0.0365, w2 = 0.4806, w1 = 0.4963 and a new "
                        "error of 0.0447: it rounded its intermediates, so three of these "
                        "differ in the fourth decimal from the exact 0.193728, 0.036570 and "
                        "0.044628 above."))
    if name == "mazur":
        net = Network([Dense(2, 2, "sigmoid"), Dense(2, 2, "sigmoid")], dtype="float64")
        net.parameters = [0.15, 0.20, 0.25, 0.30, 0.35, 0.35,
                          0.40, 0.45, 0.50, 0.55, 0.60, 0.60]
        from .losses import MSE
        return dict(net=net, X=[[0.05, 0.10]], y=[[0.01, 0.99]],
                    loss=MSE(half=True, reduction="sum"), optimizer=SGD(lr=0.5), digits=9,
                    note=(
                        "Matt Mazur, \"A Step by Step Backpropagation Example\" (2015), "
                        "publishes out_h1 = 0.593269992, out_o1 = 0.75136507, E_total = "
                        "0.298371109, dE/dw5 = 0.082167041, w5+ = 0.35891648, w6+ = "
                        "0.408666186, w7+ = 0.511301270, w8+ = 0.561370121, w1+ = "
                        "0.149780716, w2+ = 0.19956143, w3+ = 0.24975114, w4+ = 0.29950229. "
                        "His o1, o2 are y1, y2 here, his net_ is z_. He shares one bias per "
                        "layer (b1, b2) and does not update them; bpfast has one per unit "
                        "(b1 = b2 = 0.35, b3 = b4 = 0.60 here) and updates them, which "
                        "changes none of the weights' updates."))
    if name == "softmax":
        net = Network([Dense(2, 3, "tanh"), Dense(3, 3, "softmax")], dtype="float64")
        net.parameters = [0.1, -0.2, 0.4, 0.3, -0.5, 0.2, 0.0, 0.1, -0.1,
                          0.3, -0.2, 0.5, 0.1, 0.4, -0.3, -0.2, 0.2, 0.1, 0.0, 0.1, -0.1]
        return dict(net=net, X=[[1.0, 2.0]], y=[2], loss=CrossEntropy(from_logits=False),
                    optimizer=SGD(lr=0.1), digits=6, note=(
                        "Softmax with cross-entropy: dL/dz = p - t at the output, the fused "
                        "gradient the engine uses (stable where log p is not)."))
    raise ValueError(f"unknown example {name!r}; valid: textbook, mazur, softmax")


EXAMPLES = ("textbook", "mazur", "softmax")
