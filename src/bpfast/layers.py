"""The layers: Dense, Dropout, BatchNorm1d, LayerNorm, Activation; the activation names
and custom activations."""
import inspect
import numbers
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from ._compiled import core as _core
from ._validation import canonical_name, check_bool, check_choice, check_int, check_real

if TYPE_CHECKING:
    from .network import Network

#: Activation names a Dense layer accepts, in any case (``None`` means "identity").
ACTIVATIONS = tuple(name for name in _core.ACTIVATIONS if name != "custom")
#: other spellings of those names (lower case, "-" or " " read as "_")
ACTIVATION_ALIASES = {"linear": "identity", "none": "identity", "logistic": "sigmoid",
                      "leakyrelu": "leaky_relu", "lrelu": "leaky_relu", "swish": "silu",
                      "hard_tanh": "hardtanh", "soft_sign": "softsign",
                      "soft_plus": "softplus"}


class CustomActivation:
    """A custom elementwise activation from two NumPy functions, for ``Dense``.

    Parameters
    ----------
    fn : callable ``z -> array``
        The activation, elementwise: given the (n, width) pre-activations of a batch
        (a read-only array of the network's dtype, valid during the call only), an
        array of the same shape.
    derivative : callable ``z -> array``
        Its derivative ``fn'(z)``, elementwise, same shape.
    name : str, optional
        Shown by ``repr`` and ``Network.summary`` (default: fn's ``__name__``).
    check_gradient : bool
        When a Network is first built with it, compare ``derivative`` with central
        differences of ``fn`` on a grid of points in [-6, 6] (kinks, where the one-sided
        differences disagree, are skipped); a mismatch is a ValueError naming the worst
        point.

    Notes
    -----
    The compiled step calls ``fn`` and (in training) ``derivative`` once per batch
    and layer, and keeps ``derivative(z)`` for the backward pass, which stays
    compiled. A network with a custom activation pickles (its functions by
    reference, so module-level functions, not lambdas) but cannot be saved with
    ``bpfast.save`` or exported to ONNX or PyTorch.

    Examples
    --------
    >>> import numpy as np
    >>> import bpfast as bp
    >>> def cube(z):
    ...     return z ** 3
    >>> def cube_derivative(z):
    ...     return 3 * z ** 2
    >>> net = bp.Network([bp.Dense(2, 4, bp.CustomActivation(cube, cube_derivative)),
    ...                   bp.Dense(4, 1)], seed=0)
    >>> net.predict(np.zeros((1, 2))).shape
    (1, 1)
    """

    def __init__(self, fn: Callable[[Any], Any], derivative: Callable[[Any], Any], *,
                 name: str | None = None, check_gradient: bool = True) -> None:
        if not callable(fn) or not callable(derivative):
            raise TypeError("CustomActivation(fn, derivative) takes two functions of z")
        self.fn = fn
        self.derivative = derivative
        self.name = str(name) if name is not None else getattr(fn, "__name__", "custom")
        self.check_gradient = check_bool("check_gradient", check_gradient)
        self._checked = False

    def __call__(self, z: Any) -> Any:
        return self.fn(z)

    def _check_on_first_use(self) -> None:
        """derivative against central differences of fn, once (see check_gradient)."""
        if self._checked or not self.check_gradient:
            return
        z = np.concatenate([np.linspace(-6.0, 6.0, 241), np.linspace(-0.5, 0.5, 41)[1:-1]
                            + 0.0123]).reshape(-1, 4)
        z.flags.writeable = False  # as the compiled loop hands it
        values = np.asarray(self.fn(z), dtype=np.float64)
        derivative = np.asarray(self.derivative(z), dtype=np.float64)
        for what, array in (("fn", values), ("derivative", derivative)):
            if array.shape != z.shape:
                raise ValueError(f"{self!r}: {what} must return an array of its input's "
                                 f"shape (it works elementwise): got {array.shape} for "
                                 f"{z.shape}")
        step = 1e-6 * np.maximum(1.0, np.abs(z))
        plus = np.asarray(self.fn(z + step), dtype=np.float64)
        minus = np.asarray(self.fn(z - step), dtype=np.float64)
        central = (plus - minus) / (2 * step)
        smooth = np.abs((plus - values) - (values - minus)) / step <= \
            1e-3 * np.maximum(1.0, np.abs(central))
        excess = np.where(smooth & np.isfinite(central),
                          np.abs(derivative - central) - 1e-4 * np.maximum(1.0, np.abs(central)),
                          -np.inf)
        worst = np.unravel_index(np.argmax(excess), z.shape)
        if excess[worst] > 0 or not np.isfinite(derivative[smooth]).all():
            raise ValueError(
                f"{self!r}: derivative does not match central differences of fn: worst at "
                f"z = {z[worst]:.6g}, where derivative gives {derivative[worst]:.6g} and "
                f"central differences {central[worst]:.6g}. Fix derivative, or pass "
                "check_gradient=False to skip this check")
        self._checked = True

    def __repr__(self):
        return f"CustomActivation({self.name!r})"

    def __str__(self):
        return self.name


def check_activation(activation):
    """An activation name (canonical) or a CustomActivation; ValueError listing the names."""
    if isinstance(activation, CustomActivation):
        return activation
    name = canonical_name("identity" if activation is None else activation, ACTIVATIONS,
                          ACTIVATION_ALIASES)
    if name is None:
        raise ValueError(f"unknown activation {activation!r}; valid: {', '.join(ACTIVATIONS)} "
                         "(any case; also 'swish', 'linear', 'logistic'), or "
                         "bpfast.CustomActivation(fn, derivative)")
    return name

#: Weight initialisations by name; ``None`` picks He for the relu family, Glorot otherwise.
INITS = ("he", "glorot", "normal", "pytorch")

_RELU_FAMILY = ("relu", "leaky_relu", "elu")


class Layer:
    """What every layer kind has: sizes, parameter and buffer counts, a description.

    ``in_features`` and ``out_features`` are the widths of the layer's input and
    output; ``activation`` is applied last (``"identity"`` for the kinds without
    one). ``n_parameters`` trainable values live in the network's ``parameters``,
    ``n_buffers`` non-trainable ones (running statistics) in its ``buffers``.
    """

    kind: str = ""
    in_features: int
    out_features: int
    activation: "str | CustomActivation" = "identity"
    activation_param: float = 0.0
    _network: "Network | None"

    @property
    def n_parameters(self) -> int:
        return 0

    @property
    def n_buffers(self) -> int:
        return 0

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def arguments(self) -> dict[str, Any]:
        """The constructor's arguments that make an equal, unattached layer."""
        arguments = self.describe()
        del arguments["kind"]
        return arguments

    def _attach_views(self, parameters, gradients, buffers, offset, buffer_offset):
        """Take this layer's views of the network's flat arrays, from these offsets."""
        raise NotImplementedError

    def engine_row(self, weight_offset: int, bias_offset: int, buffer_offset: int = -1,
                   ) -> tuple:
        """This layer's row of the engine's layer table: (n_in, n_out, activation code,
        activation parameter, weight offset, bias offset, kind code, eps, momentum
        (-1: cumulative average), dropout p, buffer offset (-1: none)[, the
        CustomActivation for the code "custom"])."""
        if isinstance(self.activation, CustomActivation):
            return (self.in_features, self.out_features, _core.ACTIVATIONS.index("custom"),
                    0.0, weight_offset, bias_offset, _core.LAYER_KINDS.index(self.kind),
                    *self._engine_fields(), buffer_offset, self.activation)
        return (self.in_features, self.out_features,
                _core.ACTIVATIONS.index(self.activation), self.activation_param,
                weight_offset, bias_offset, _core.LAYER_KINDS.index(self.kind),
                *self._engine_fields(), buffer_offset)

    def _engine_fields(self) -> tuple:
        return (0.0, 0.0, 0.0)


class Dense(Layer):
    """A fully connected layer: ``y = g(x @ weight.T + bias)``.

    Parameters
    ----------
    in_features, out_features : int
        Sizes of the input and output.
    activation : str, CustomActivation or None
        One of :data:`ACTIVATIONS` (any case; "swish" is "silu"); ``None`` is the
        identity (logits). ``"softmax"`` is only allowed on a network's last layer.
        A :class:`CustomActivation` is a custom one written in NumPy.
    bias : bool
        Whether the layer has a bias vector.
    init : {"he", "glorot", "normal", "pytorch"} or None
        Weight initialisation. ``None``: He normal for relu/leaky_relu/elu,
        Glorot uniform otherwise. ``"normal"`` is the textbook N(0, 0.01^2);
        ``"pytorch"`` is torch.nn.Linear's U(-1/sqrt(in), 1/sqrt(in)), bias too.
        Biases are zero except for ``"pytorch"``.
    negative_slope : float, optional
        Slope of ``leaky_relu`` for negative inputs (default 0.01).
    alpha : float, optional
        The ``elu`` parameter (default 1.0).

    Attributes
    ----------
    weight : ndarray of shape (out_features, in_features)
        A writable view into the owning network's ``parameters``.
    bias : ndarray of shape (out_features,) or None
    grad_weight, grad_bias : ndarray
        Views into the network's ``gradients``.

    The arrays exist once the layer is part of a :class:`~bpfast.Network`; a
    layer belongs to one network.
    """

    kind = "dense"
    use_bias: bool
    init: str | None
    weight: NDArray[np.floating] | None
    bias: NDArray[np.floating] | None
    grad_weight: NDArray[np.floating] | None
    grad_bias: NDArray[np.floating] | None

    def __init__(self, in_features: int, out_features: int,
                 activation: "str | CustomActivation | None" = None, *,
                 bias: bool = True, init: str | None = None, negative_slope: float | None = None,
                 alpha: float | None = None) -> None:
        self.in_features = check_int("in_features", in_features, minimum=1)
        self.out_features = check_int("out_features", out_features, minimum=1)
        self.activation = check_activation(activation)
        self.use_bias = check_bool("bias", bias)
        self.init = None if init is None else check_choice("init", init, INITS)
        if negative_slope is not None and self.activation != "leaky_relu":
            raise ValueError("negative_slope is only for activation='leaky_relu'")
        if alpha is not None and self.activation != "elu":
            raise ValueError("alpha is only for activation='elu'")
        if self.activation == "leaky_relu":
            self.activation_param = check_real(
                "negative_slope", 0.01 if negative_slope is None else negative_slope)
        elif self.activation == "elu":
            self.activation_param = check_real("alpha", 1.0 if alpha is None else alpha)
        else:
            self.activation_param = 0.0
        self.weight = self.bias = self.grad_weight = self.grad_bias = None
        self._network = None

    @property
    def n_parameters(self) -> int:
        return self.out_features * (self.in_features + self.use_bias)

    #: The fields of :meth:`describe` that a model file stores (``init`` only matters
    #: before training, so files leave it out; pickles keep it).
    FILE_FIELDS = ("in_features", "out_features", "activation", "bias", "activation_param")

    def describe(self) -> dict[str, Any]:
        """The layer as plain JSON-able values: the one description that the engine's
        layer table, saving, pickling and export all read (see :func:`from_description`)."""
        return {"kind": "dense", "in_features": self.in_features,
                "out_features": self.out_features, "activation": self.activation,
                "bias": self.use_bias, "activation_param": self.activation_param,
                "init": self.init}

    def arguments(self) -> dict[str, Any]:
        """The constructor's arguments that make an equal, unattached Dense."""
        return _dense_arguments(self.describe())

    def _attach_views(self, parameters, gradients, buffers, offset, buffer_offset):
        n_weights = self.out_features * self.in_features
        shape = (self.out_features, self.in_features)
        self.weight = parameters[offset:offset + n_weights].reshape(shape)
        self.grad_weight = gradients[offset:offset + n_weights].reshape(shape)
        bias_offset = offset + n_weights if self.use_bias else -1
        if self.use_bias:
            self.bias = parameters[bias_offset:bias_offset + self.out_features]
            self.grad_bias = gradients[bias_offset:bias_offset + self.out_features]
        return offset, bias_offset

    def initial_values(self, rng):
        """Fresh float64 (weight, bias) drawn from rng by this layer's init scheme."""
        fan_in, fan_out = self.in_features, self.out_features
        shape = (fan_out, fan_in)
        scheme = self.init or ("he" if self.activation in _RELU_FAMILY else "glorot")
        bias = np.zeros(fan_out)
        if scheme == "he":
            weight = rng.normal(0.0, np.sqrt(2.0 / fan_in), size=shape)
        elif scheme == "glorot":
            limit = np.sqrt(6.0 / (fan_in + fan_out))
            weight = rng.uniform(-limit, limit, size=shape)
        elif scheme == "normal":
            weight = rng.normal(0.0, 0.01, size=shape)
        else:  # "pytorch"
            limit = 1.0 / np.sqrt(fan_in)
            weight = rng.uniform(-limit, limit, size=shape)
            bias = rng.uniform(-limit, limit, size=fan_out)
        return weight, bias

    def __repr__(self):
        extra = "" if self.use_bias else ", bias=False"
        if self.init is not None:
            extra += f", init={self.init!r}"
        if self.activation == "leaky_relu":
            extra += f", negative_slope={self.activation_param}"
        elif self.activation == "elu":
            extra += f", alpha={self.activation_param}"
        return (f"Dense({self.in_features}, {self.out_features}, "
                f"activation={self.activation!r}{extra})")


class Dropout(Layer):
    """Inverted dropout, as ``torch.nn.Dropout``: in training mode each element is
    zeroed with probability ``p`` and the survivors are scaled by ``1 / (1 - p)``;
    in inference mode (``predict``, ``forward(training=False)``) the identity.

    Parameters
    ----------
    p : float in [0, 1)
        The probability of zeroing an element (0: the identity in both modes).

    Notes
    -----
    The width is the previous layer's output width (the next layer's input width
    when the dropout comes first), set when the layer joins a network.
    The masks come from a counter-based random stream seeded by the network's
    ``seed``: the element in row i, column j of the k-th training pass is kept or
    dropped by a hash of (seed, k, layer, i, j), so the masks do not depend on
    the thread count, and the stream's position is saved with the network.
    """

    kind = "dropout"
    p: float

    def __init__(self, p: float = 0.5) -> None:
        self.p = check_real("p", p, minimum=0.0, maximum=1.0, max_inclusive=False)
        self.in_features = self.out_features = 0  # set by the network
        self._network = None

    def describe(self) -> dict[str, Any]:
        """The layer as plain JSON-able values (see :func:`from_description`)."""
        return {"kind": "dropout", "p": self.p}

    def _attach_views(self, parameters, gradients, buffers, offset, buffer_offset):
        return -1, -1

    def _engine_fields(self) -> tuple:
        return (0.0, 0.0, self.p)

    def __repr__(self):
        return f"Dropout(p={self.p})"


class BatchNorm1d(Layer):
    """Batch normalisation over the features of (batch, num_features) inputs, as
    ``torch.nn.BatchNorm1d``: ``y = (x - mean) / sqrt(var + eps) * weight + bias``.

    In training mode, mean and var are the batch's (var biased, divided by n), and
    the running statistics are updated:
    ``running = (1 - momentum) * running + momentum * batch`` with the *unbiased*
    batch variance (divided by n - 1); ``momentum=None`` makes them the cumulative
    average of every batch so far (``momentum = 1 / num_batches_tracked``). In
    inference mode the running statistics are used. With
    ``track_running_stats=False`` there are none, and both modes use the batch's.

    Parameters
    ----------
    num_features : int
        The width of the input (the previous layer's output width).
    eps : float > 0
        Added to the variance inside the square root.
    momentum : float in [0, 1] or None
    affine : bool
        Whether the layer has the trainable ``weight`` (ones) and ``bias`` (zeros).
    track_running_stats : bool

    Attributes
    ----------
    weight, bias : ndarray (num_features,) or None
        Views into the network's ``parameters`` (None without affine).
    grad_weight, grad_bias : ndarray or None
        Views into the network's ``gradients``.
    running_mean, running_var : ndarray (num_features,) or None
        Views into the network's ``buffers`` (None without track_running_stats).
    num_batches_tracked : ndarray of shape () or None
        A view into ``buffers``: the training batches seen (exact up to 2**24 in
        float32).

    A training batch of one row is a ValueError, as in PyTorch (its variance is 0).
    """

    kind = "batch_norm1d"
    num_features: int
    eps: float
    momentum: float | None
    affine: bool
    track_running_stats: bool
    weight: NDArray[np.floating] | None
    bias: NDArray[np.floating] | None
    grad_weight: NDArray[np.floating] | None
    grad_bias: NDArray[np.floating] | None
    running_mean: NDArray[np.floating] | None
    running_var: NDArray[np.floating] | None
    num_batches_tracked: NDArray[np.floating] | None

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True) -> None:
        self.num_features = check_int("num_features", num_features, minimum=1)
        self.eps = check_real("eps", eps, minimum=0.0, min_inclusive=False)
        self.momentum = None if momentum is None else check_real(
            "momentum", momentum, minimum=0.0, maximum=1.0)
        self.affine = check_bool("affine", affine)
        self.track_running_stats = check_bool("track_running_stats", track_running_stats)
        self.in_features = self.out_features = self.num_features
        self.weight = self.bias = self.grad_weight = self.grad_bias = None
        self.running_mean = self.running_var = self.num_batches_tracked = None
        self._network = None

    @property
    def n_parameters(self) -> int:
        return 2 * self.num_features if self.affine else 0

    @property
    def n_buffers(self) -> int:
        return 2 * self.num_features + 1 if self.track_running_stats else 0

    def describe(self) -> dict[str, Any]:
        """The layer as plain JSON-able values (see :func:`from_description`)."""
        return {"kind": "batch_norm1d", "num_features": self.num_features, "eps": self.eps,
                "momentum": self.momentum, "affine": self.affine,
                "track_running_stats": self.track_running_stats}

    def _attach_views(self, parameters, gradients, buffers, offset, buffer_offset):
        n = self.num_features
        weight_offset = bias_offset = -1
        if self.affine:
            weight_offset, bias_offset = offset, offset + n
            self.weight = parameters[offset:offset + n]
            self.bias = parameters[offset + n:offset + 2 * n]
            self.grad_weight = gradients[offset:offset + n]
            self.grad_bias = gradients[offset + n:offset + 2 * n]
            self.weight[...] = 1
            self.bias[...] = 0
        if self.track_running_stats:
            self.running_mean = buffers[buffer_offset:buffer_offset + n]
            self.running_var = buffers[buffer_offset + n:buffer_offset + 2 * n]
            self.num_batches_tracked = buffers[buffer_offset + 2 * n:
                                               buffer_offset + 2 * n + 1].reshape(())
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked[...] = 0
        return weight_offset, bias_offset

    def _engine_fields(self) -> tuple:
        return (self.eps, -1.0 if self.momentum is None else self.momentum, 0.0)

    def __repr__(self):
        extra = "".join(
            f", {name}={getattr(self, name)!r}" for name, default in (
                ("eps", 1e-5), ("momentum", 0.1), ("affine", True),
                ("track_running_stats", True)) if getattr(self, name) != default
            or (name == "momentum" and self.momentum is None))
        return f"BatchNorm1d({self.num_features}{extra})"


class LayerNorm(Layer):
    """Layer normalisation over each row's features, as ``torch.nn.LayerNorm`` on
    (batch, features) inputs: ``y = (x - mean) / sqrt(var + eps) * weight + bias``
    with the row's mean and biased variance, the same in training and inference.

    Parameters
    ----------
    normalized_shape : int or a tuple of one int
        The width of the input (only the last axis is normalised: inputs are 2-D).
    eps : float > 0
    elementwise_affine : bool
        Whether the layer has the trainable ``weight`` (ones) and ``bias`` (zeros).
    bias : bool
        Whether the affine part has the ``bias`` (with ``elementwise_affine``).

    Attributes
    ----------
    weight, bias : ndarray (features,) or None
        Views into the network's ``parameters``.
    grad_weight, grad_bias : ndarray or None
    """

    kind = "layer_norm"
    normalized_shape: tuple[int]
    eps: float
    elementwise_affine: bool
    use_bias: bool
    weight: NDArray[np.floating] | None
    bias: NDArray[np.floating] | None
    grad_weight: NDArray[np.floating] | None
    grad_bias: NDArray[np.floating] | None

    def __init__(self, normalized_shape: int | tuple[int] | list[int], eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True) -> None:
        if isinstance(normalized_shape, (tuple, list)):
            if len(normalized_shape) != 1:
                raise ValueError(f"normalized_shape must be one width (inputs are 2-D: "
                                 f"(batch, features)), got {tuple(normalized_shape)!r}")
            width = normalized_shape[0]
        else:
            width = normalized_shape
        if not isinstance(width, numbers.Integral) or isinstance(width, (bool, np.bool_)):
            raise TypeError(f"normalized_shape must be an integer or a tuple of one, got "
                            f"{normalized_shape!r}")
        self.normalized_shape = (check_int("normalized_shape", width, minimum=1),)
        self.eps = check_real("eps", eps, minimum=0.0, min_inclusive=False)
        self.elementwise_affine = check_bool("elementwise_affine", elementwise_affine)
        self.use_bias = check_bool("bias", bias)
        self.in_features = self.out_features = self.normalized_shape[0]
        self.weight = self.bias = self.grad_weight = self.grad_bias = None
        self._network = None

    @property
    def n_parameters(self) -> int:
        return self.out_features * (self.elementwise_affine * (1 + self.use_bias))

    def describe(self) -> dict[str, Any]:
        """The layer as plain JSON-able values (see :func:`from_description`);
        ``normalized_shape`` is a list of one int."""
        return {"kind": "layer_norm", "normalized_shape": list(self.normalized_shape),
                "eps": self.eps, "elementwise_affine": self.elementwise_affine,
                "bias": self.use_bias}

    def _attach_views(self, parameters, gradients, buffers, offset, buffer_offset):
        n = self.out_features
        weight_offset = bias_offset = -1
        if self.elementwise_affine:
            weight_offset = offset
            self.weight = parameters[offset:offset + n]
            self.grad_weight = gradients[offset:offset + n]
            self.weight[...] = 1
            if self.use_bias:
                bias_offset = offset + n
                self.bias = parameters[offset + n:offset + 2 * n]
                self.grad_bias = gradients[offset + n:offset + 2 * n]
                self.bias[...] = 0
        return weight_offset, bias_offset

    def _engine_fields(self) -> tuple:
        return (self.eps, 0.0, 0.0)

    def __repr__(self):
        extra = "".join(
            f", {name}={value!r}" for name, value, default in (
                ("eps", self.eps, 1e-5), ("elementwise_affine", self.elementwise_affine, True),
                ("bias", self.use_bias, True)) if value != default)
        return f"LayerNorm({self.out_features}{extra})"


class Activation(Layer):
    """An activation function as a layer of its own, as ``torch.nn.ReLU`` and Keras'
    ``Activation`` are: for the "Dense(activation=None), BatchNorm1d, activation"
    recipe (normalisation layers take no activation).

    Parameters
    ----------
    activation : str or CustomActivation
        One of :data:`ACTIVATIONS` (any case; "swish" is "silu"); ``"softmax"``
        only as a network's last layer. A :class:`CustomActivation` makes a layer
        applying it.
    negative_slope, alpha : float, optional
        As for :class:`Dense`.

    Notes
    -----
    The width is the previous layer's output width (the next layer's input width
    when it comes first), set when the layer joins a network.

    ``Activation(fn, derivative, name=..., check_gradient=...)``, with a function
    first, is a shorthand for ``CustomActivation(fn, derivative, ...)`` and returns
    that CustomActivation, an activation function (not a layer), as
    ``pathlib.Path(...)`` returns a ``PosixPath``: give it to ``Dense(...,
    activation=act)`` or make it a layer with ``Activation(act)``.

    Examples
    --------
    >>> import numpy as np
    >>> import bpfast as bp
    >>> act = bp.Activation(np.tanh, lambda z: 1 - np.tanh(z) ** 2, name="my_tanh")
    >>> type(act).__name__
    'CustomActivation'
    >>> net = bp.Network([bp.Dense(2, 4, act), bp.Dense(4, 4), bp.Activation(act),
    ...                   bp.Dense(4, 1)], seed=0)
    >>> net.predict(np.zeros((1, 2))).shape
    (1, 1)
    """

    kind = "activation"

    def __new__(cls, activation: Any = None, *args: Any, **kwargs: Any) -> Any:
        # a function (not a name, not a CustomActivation): the CustomActivation shorthand
        if callable(activation) and not isinstance(activation, (str, CustomActivation)):
            return CustomActivation(activation, *args, **kwargs)
        return super().__new__(cls)

    def __init__(self, activation: "str | CustomActivation", *,
                 negative_slope: float | None = None, alpha: float | None = None) -> None:
        probe = Dense(1, 1, activation, negative_slope=negative_slope, alpha=alpha)
        self.activation, self.activation_param = probe.activation, probe.activation_param
        self.in_features = self.out_features = 0  # set by the network
        self._network = None

    def describe(self) -> dict[str, Any]:
        """The layer as plain JSON-able values (see :func:`from_description`)."""
        return {"kind": "activation", "activation": self.activation,
                "activation_param": self.activation_param}

    def arguments(self) -> dict[str, Any]:
        arguments: dict[str, Any] = {"activation": self.activation}
        if self.activation == "leaky_relu":
            arguments["negative_slope"] = self.activation_param
        elif self.activation == "elu":
            arguments["alpha"] = self.activation_param
        return arguments

    def _attach_views(self, parameters, gradients, buffers, offset, buffer_offset):
        return -1, -1

    def __repr__(self):
        extra = ""
        if self.activation == "leaky_relu":
            extra = f", negative_slope={self.activation_param}"
        elif self.activation == "elu":
            extra = f", alpha={self.activation_param}"
        return f"Activation({self.activation!r}{extra})"


#: The layer classes by their ``describe()["kind"]``.
# The signature that help(), Sphinx and numpydoc show is the layer's (__init__'s), not
# the shorthand-dispatching __new__'s (activation, *args, **kwargs).
Activation.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
    list(inspect.signature(Activation.__init__).parameters.values())[1:])


LAYER_CLASSES: dict[str, type[Layer]] = {
    "dense": Dense, "dropout": Dropout, "batch_norm1d": BatchNorm1d, "layer_norm": LayerNorm,
    "activation": Activation}

#: The kinds whose width is the layer's input width, taken from the network.
WIDTH_FROM_NETWORK = (Dropout, Activation)


def _dense_arguments(spec):
    arguments = {key: spec[key] for key in ("in_features", "out_features", "activation",
                                            "bias")}
    arguments["init"] = spec.get("init")
    if spec["activation"] == "leaky_relu":
        arguments["negative_slope"] = spec["activation_param"]
    elif spec["activation"] == "elu":
        arguments["alpha"] = spec["activation_param"]
    return arguments


def from_description(spec: dict[str, Any]) -> Layer:
    """The unattached layer that ``spec`` (from a layer's ``describe()``) describes.

    A description without ``"kind"`` (files written before layer kinds) is a Dense.
    TypeError or ValueError for one the constructor refuses.
    """
    kind = spec.get("kind", "dense")
    if kind not in LAYER_CLASSES:
        raise ValueError(f"unknown layer kind {kind!r}; valid: "
                         f"{', '.join(map(repr, LAYER_CLASSES))}")
    if kind == "dense":
        arguments = _dense_arguments(spec)
        return Dense(arguments.pop("in_features"), arguments.pop("out_features"),
                     arguments.pop("activation"), **arguments)
    if kind == "activation":
        keywords = {key: value for key, value in spec.items()
                    if key not in ("kind", "activation", "activation_param")}
        if keywords:
            raise TypeError(f"unexpected fields for an activation layer: {sorted(keywords)}")
        name = spec["activation"]
        param = spec.get("activation_param", 0.0)
        return Activation(name, **({"negative_slope": param} if name == "leaky_relu" else
                                   {"alpha": param} if name == "elu" else {}))
    arguments = {key: value for key, value in spec.items() if key != "kind"}
    return LAYER_CLASSES[kind](**arguments)
