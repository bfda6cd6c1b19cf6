"""Dense layers, the activation names and custom activations."""
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


class Dense:
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

    in_features: int
    out_features: int
    activation: "str | CustomActivation"
    use_bias: bool
    init: str | None
    activation_param: float
    weight: NDArray[np.floating] | None
    bias: NDArray[np.floating] | None
    grad_weight: NDArray[np.floating] | None
    grad_bias: NDArray[np.floating] | None
    _network: "Network | None"

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

    def engine_row(self, weight_offset: int, bias_offset: int) -> tuple:
        """This layer's row of the engine's layer table (kind code last)."""
        if isinstance(self.activation, CustomActivation):
            return (self.in_features, self.out_features, _core.ACTIVATIONS.index("custom"),
                    0.0, weight_offset, bias_offset, _core.LAYER_KINDS.index("dense"),
                    self.activation)
        return (self.in_features, self.out_features,
                _core.ACTIVATIONS.index(self.activation), self.activation_param,
                weight_offset, bias_offset, _core.LAYER_KINDS.index("dense"))

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


def _dense_arguments(spec):
    arguments = {key: spec[key] for key in ("in_features", "out_features", "activation",
                                            "bias")}
    arguments["init"] = spec.get("init")
    if spec["activation"] == "leaky_relu":
        arguments["negative_slope"] = spec["activation_param"]
    elif spec["activation"] == "elu":
        arguments["alpha"] = spec["activation_param"]
    return arguments


def from_description(spec: dict[str, Any]) -> Dense:
    """The unattached layer that ``spec`` (from a layer's ``describe()``) describes.

    A description without ``"kind"`` (files written before layer kinds) is a Dense.
    TypeError or ValueError for one the constructor refuses.
    """
    kind = spec.get("kind", "dense")
    if kind != "dense":
        raise ValueError(f"unknown layer kind {kind!r}; valid: 'dense'")
    arguments = _dense_arguments(spec)
    return Dense(arguments.pop("in_features"), arguments.pop("out_features"),
                 arguments.pop("activation"), **arguments)
