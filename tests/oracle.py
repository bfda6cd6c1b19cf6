"""Plain NumPy reference implementation of every bpfast kernel.

This module is the test oracle and the documentation of the formulas. It is
written for clarity, not speed: every function converts its inputs to float64
and computes in float64, whatever dtype it is given. It imports nothing from
bpfast, so the compiled core can be checked against it independently.

Every formula follows PyTorch 2.13 (its activation functions, its 'mean' loss
reductions, and the ``_single_tensor_*`` update functions of ``torch.optim``),
in PyTorch's order of operations. Results agree with PyTorch to a few units in
the last place; they cannot agree bit for bit, because PyTorch's CPU kernels
use fused multiply-adds (``add`` with ``alpha``, ``addcmul``, ``lerp``) and
MKL's vectorised ``sqrt``, neither of which NumPy reproduces.

Contents
--------
Activations
    ``activation_forward(name, z, param=None)`` and
    ``activation_backward(name, grad_a, z, a, param=None)``.
Losses
    ``loss_forward(name, out, target, **params)`` and
    ``loss_gradient(name, out, target, **params)``.
Optimizers
    ``SGD``, ``Adam``, ``AdamW``, ``RMSprop``, ``Adagrad``; each has
    ``step(params, grads)`` that updates a flat 1-D parameter array in place.
Network
    ``network_forward(weights, biases, activations, X)`` and
    ``network_backward(weights, cache, activations, grad_out, X)``.
Dropout, BatchNorm1d, LayerNorm
    ``dropout_scale`` (bpfast's counter-based masks), ``batch_norm_forward/backward``,
    ``layer_norm_forward/backward``; ``sequential_forward/backward`` run a list of
    layers of every kind.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf

__all__ = [
    "ACTIVATIONS",
    "LOSSES",
    "activation_forward",
    "activation_backward",
    "loss_forward",
    "loss_gradient",
    "SGD",
    "Adam",
    "AdamW",
    "RMSprop",
    "Adagrad",
    "network_forward",
    "network_backward",
    "dropout_scale",
    "batch_norm_forward",
    "batch_norm_backward",
    "layer_norm_forward",
    "layer_norm_backward",
    "sequential_forward",
    "sequential_backward",
]

ACTIVATIONS = (
    "identity",
    "sigmoid",
    "tanh",
    "relu",
    "leaky_relu",
    "elu",
    "softplus",
    "gelu",
    "softmax",
    "silu",
    "mish",
    "hardtanh",
    "selu",
    "softsign",
)
"""Activation names understood by :func:`activation_forward`."""

#: torch.nn.SELU's alpha and scale
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946

LOSSES = ("mse", "l1", "huber", "cross_entropy", "binary_cross_entropy")
"""Loss names understood by :func:`loss_forward`."""

#: Default parameter of the parametrised activations (PyTorch's defaults).
ACTIVATION_DEFAULTS = {"leaky_relu": 0.01, "elu": 1.0}

#: PyTorch's softplus threshold (with beta = 1): above it softplus(x) = x.
SOFTPLUS_THRESHOLD = 20.0

#: Lower clamp of log(p) in PyTorch's BCELoss (and our probability cross-entropy).
LOG_CLAMP = -100.0

#: Lower clamp of p in the gradient of the probability-input cross-entropy.
GRAD_EPS = 1e-12

#: Lower clamp of p*(1-p) in the gradient of BCELoss. PyTorch's constant is the
#: float32 literal 1e-12f, i.e. 9.999999960041972e-13 in float64 arithmetic.
BCE_GRAD_EPS = float(np.float32(1e-12))

_SQRT1_2 = math.sqrt(0.5)  # 1/sqrt(2), as M_SQRT1_2 in PyTorch's gelu
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def _f64(x):
    return np.asarray(x, dtype=np.float64)


# ---------------------------------------------------------------------------
# Activations
# ---------------------------------------------------------------------------


def _activation_name(name):
    if name is None:
        return "identity"
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")
    return name


def _activation_param(name, param):
    if name in ACTIVATION_DEFAULTS:
        return ACTIVATION_DEFAULTS[name] if param is None else float(param)
    return None


def sigmoid(z):
    """Numerically stable logistic function 1 / (1 + exp(-z)).

    Parameters
    ----------
    z : array_like

    Returns
    -------
    ndarray (float64)
        ``1/(1+exp(-z))`` for z >= 0 and ``exp(z)/(1+exp(z))`` for z < 0, so
        that no ``exp`` overflows.
    """
    z = _f64(z)
    out = np.empty_like(z)
    pos = z >= 0
    out[pos] = 1.0 / (1.0 + np.exp(-z[pos]))
    ez = np.exp(z[~pos])
    out[~pos] = ez / (1.0 + ez)
    return out


def log_sigmoid(z):
    """Stable log(sigmoid(z)) = min(z, 0) - log1p(exp(-|z|)).

    Parameters
    ----------
    z : array_like

    Returns
    -------
    ndarray (float64)
    """
    z = _f64(z)
    return np.minimum(z, 0.0) - np.log1p(np.exp(-np.abs(z)))


def softmax(z):
    """Row-wise softmax of a 2-D array, computed on ``z - max(z, axis=1)``.

    Parameters
    ----------
    z : array_like, shape (n, k)

    Returns
    -------
    ndarray (float64), shape (n, k)
    """
    z = _f64(z)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def log_softmax(z):
    """Row-wise log-softmax: ``(z - max) - log(sum(exp(z - max)))``.

    Parameters
    ----------
    z : array_like, shape (n, k)

    Returns
    -------
    ndarray (float64), shape (n, k)
    """
    z = _f64(z)
    shifted = z - z.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def activation_forward(name, z, param=None):
    """Apply an activation function elementwise (row-wise for softmax).

    Parameters
    ----------
    name : str or None
        One of :data:`ACTIVATIONS`; None means ``"identity"``.

        - identity: ``z``
        - sigmoid: ``1/(1+exp(-z))`` (stable form, see :func:`sigmoid`)
        - tanh: ``tanh(z)``
        - relu: ``max(z, 0)``
        - leaky_relu: ``z if z > 0 else param*z`` (param = negative_slope, 0.01)
        - elu: ``z if z > 0 else param*(exp(z)-1)`` (param = alpha, 1.0),
          computed with ``expm1``
        - softplus: ``z if z > 20 else log1p(exp(z))`` (PyTorch: beta=1,
          threshold=20)
        - gelu: ``z*0.5*(1+erf(z/sqrt(2)))`` (exact erf form)
        - softmax: ``exp(z - max)/sum(exp(z - max))`` along axis 1
        - silu: ``z / (1 + exp(-z))``
        - mish: ``z * tanh(log1p(exp(z)))`` (no threshold)
        - hardtanh: ``clip(z, -1, 1)``
        - selu: ``scale*z if z > 0 else scale*alpha*expm1(z)``
        - softsign: ``z / (1 + |z|)``
    z : array_like
        Pre-activation; 2-D (n, k) for softmax, any shape otherwise.
    param : float, optional
        negative_slope of leaky_relu or alpha of elu; ignored by the others.

    Returns
    -------
    ndarray (float64)
        The activation ``a``, same shape as ``z``.
    """
    name = _activation_name(name)
    param = _activation_param(name, param)
    z = _f64(z)
    if name == "identity":
        return z.copy()
    if name == "sigmoid":
        return sigmoid(z)
    if name == "tanh":
        return np.tanh(z)
    if name == "relu":
        return np.where(z > 0, z, 0.0)
    if name == "leaky_relu":
        return np.where(z > 0, z, z * param)
    if name == "elu":
        return np.where(z > 0, z, np.expm1(np.minimum(z, 0.0)) * param)
    if name == "softplus":
        # np.minimum keeps exp() from overflowing in the branch not taken.
        return np.where(
            z > SOFTPLUS_THRESHOLD, z, np.log1p(np.exp(np.minimum(z, SOFTPLUS_THRESHOLD)))
        )
    if name == "gelu":
        return z * 0.5 * (1.0 + erf(z * _SQRT1_2))
    if name == "softmax":
        return softmax(z)
    with np.errstate(over="ignore"):  # exp(-z) = inf: silu's limit -0, as PyTorch's
        if name == "silu":
            return z / (1.0 + np.exp(-z))
        if name == "mish":
            return z * np.tanh(np.log1p(np.exp(z)))
    if name == "hardtanh":
        return np.clip(z, -1.0, 1.0)
    if name == "selu":
        return np.where(z > 0, SELU_SCALE * z,
                        SELU_ALPHA * SELU_SCALE * np.expm1(np.minimum(z, 0.0)))
    if name == "softsign":
        return z / (1.0 + np.abs(z))
    raise AssertionError(name)  # pragma: no cover


def activation_derivative(name, z, a=None, param=None):
    """Elementwise derivative g'(z) (not defined for softmax).

    Parameters
    ----------
    name : str or None
        Any of :data:`ACTIVATIONS` except ``"softmax"``.

        - identity: 1
        - sigmoid: ``(1 - a) * a``
        - tanh: ``1 - a*a``
        - relu: ``1 if z > 0 else 0`` (0 at z = 0, as PyTorch)
        - leaky_relu: ``1 if z > 0 else param`` (param at z = 0)
        - elu: ``1 if z > 0 else param*exp(z)`` (param at z = 0)
        - softplus: ``1 if z > 20 else e/(e+1)`` with ``e = exp(z)``
          (that is, sigmoid(z))
        - gelu: ``Phi(z) + z*phi(z)``, Phi the normal CDF, phi its density
        - silu: ``s*(1 + z*(1 - s))``, s = sigmoid(z)
        - mish: ``t + z*s*(1 - t*t)``, t = tanh(softplus(z)), s = sigmoid(z)
        - hardtanh: ``1 if -1 < z < 1 else 0`` (0 at +-1, as PyTorch)
        - selu: ``scale if z > 0 else scale*alpha*exp(z)`` (scale*alpha at 0)
        - softsign: ``1 / (1 + |z|)**2``
    z : array_like
        Pre-activation.
    a : array_like, optional
        The activation ``g(z)``; computed from ``z`` when not given.
    param : float, optional
        As in :func:`activation_forward`.

    Returns
    -------
    ndarray (float64), same shape as ``z``.
    """
    name = _activation_name(name)
    if name == "softmax":
        raise ValueError("softmax has no elementwise derivative; use activation_backward")
    param = _activation_param(name, param)
    z = _f64(z)
    if name == "identity":
        return np.ones_like(z)
    if name in ("sigmoid", "tanh"):
        a = activation_forward(name, z) if a is None else _f64(a)
        return (1.0 - a) * a if name == "sigmoid" else 1.0 - a * a
    if name == "relu":
        return np.where(z > 0, 1.0, 0.0)
    if name == "leaky_relu":
        return np.where(z > 0, 1.0, param)
    if name == "elu":
        return np.where(z > 0, 1.0, param * np.exp(np.minimum(z, 0.0)))
    if name == "softplus":
        e = np.exp(np.minimum(z, SOFTPLUS_THRESHOLD))
        return np.where(z > SOFTPLUS_THRESHOLD, 1.0, e / (e + 1.0))
    if name == "gelu":
        cdf = 0.5 * (1.0 + erf(z * _SQRT1_2))
        pdf = np.exp(-0.5 * z * z) * _INV_SQRT_2PI
        return cdf + z * pdf
    with np.errstate(over="ignore"):
        s = 1.0 / (1.0 + np.exp(-z))
        if name == "silu":
            return s * (1.0 + z * (1.0 - s))
        if name == "mish":
            t = np.tanh(np.log1p(np.exp(z)))
            return t + z * s * (1.0 - t * t)
    if name == "hardtanh":
        return np.where((z > -1.0) & (z < 1.0), 1.0, 0.0)
    if name == "selu":
        return np.where(z > 0, SELU_SCALE, SELU_ALPHA * SELU_SCALE * np.exp(np.minimum(z, 0.0)))
    if name == "softsign":
        return 1.0 / (1.0 + np.abs(z)) ** 2
    raise AssertionError(name)  # pragma: no cover


def activation_backward(name, grad_a, z, a, param=None):
    """Back-propagate through an activation: dL/dz from dL/da.

    Parameters
    ----------
    name : str or None
        One of :data:`ACTIVATIONS`.
    grad_a : array_like
        dL/da, same shape as ``z``.
    z : array_like
        Pre-activation.
    a : array_like or None
        Activation ``g(z)``; recomputed from ``z`` when None.
    param : float, optional
        As in :func:`activation_forward`.

    Returns
    -------
    ndarray (float64)
        ``grad_a * g'(z)`` for the elementwise activations; for softmax the
        Jacobian-vector product ``a * (grad_a - sum(grad_a * a, axis=1))``.
    """
    name = _activation_name(name)
    grad_a = _f64(grad_a)
    if a is None:
        a = activation_forward(name, z, param)
    if name == "softmax":
        a = _f64(a)
        return a * (grad_a - np.sum(grad_a * a, axis=1, keepdims=True))
    return grad_a * activation_derivative(name, z, a, param)


# ---------------------------------------------------------------------------
# Losses ('mean' reduction, as PyTorch's default)
# ---------------------------------------------------------------------------


def _loss_inputs(name, out, target):
    """Return (out, target) as float64 arrays; labels stay integer 1-D arrays."""
    out = _f64(out)
    if out.ndim != 2:
        raise ValueError(f"output must be 2-D (n, k), got shape {out.shape}")
    target = np.asarray(target)
    if name == "cross_entropy" and target.ndim == 1:
        if not np.issubdtype(target.dtype, np.integer):
            raise ValueError("1-D cross-entropy targets must be integer class labels")
        if target.shape[0] != out.shape[0]:
            raise ValueError(f"{target.shape[0]} labels for {out.shape[0]} samples")
        if target.size and (target.min() < 0 or target.max() >= out.shape[1]):
            raise ValueError(f"labels must lie in [0, {out.shape[1]})")
        return out, target.astype(np.intp)
    target = _f64(target)
    if target.ndim == 1 and out.shape[1] == 1:
        target = target.reshape(-1, 1)
    if target.shape != out.shape:
        raise ValueError(f"target shape {target.shape} does not match output shape {out.shape}")
    return out, target


def _one_hot(labels, k):
    y = np.zeros((labels.shape[0], k))
    y[np.arange(labels.shape[0]), labels] = 1.0
    return y


def loss_forward(name, out, target, **params):
    """Value of a loss with PyTorch's 'mean' reduction.

    Parameters
    ----------
    name : str
        One of :data:`LOSSES`:

        - ``"mse"``: ``mean((out - y)**2)`` over all elements; with
          ``half=True`` multiplied by 1/2.
        - ``"l1"``: ``mean(|out - y|)`` over all elements.
        - ``"huber"``: PyTorch HuberLoss, mean over all elements of
          ``0.5*d**2`` if ``|d| < delta`` else ``delta*(|d| - 0.5*delta)``,
          ``d = out - y`` (``delta=1.0``).
        - ``"cross_entropy"``, ``from_logits=True`` (default): ``out`` are
          logits; ``-sum_j y_j * log_softmax(out)_j`` averaged over the n
          samples. ``y`` is integer labels (n,) (one-hot) or class
          probabilities (n, k), used as given even when a row does not sum
          to 1 (PyTorch's semantics).
        - ``"cross_entropy"``, ``from_logits=False``: ``out`` are
          probabilities; ``-sum_j y_j * max(log p_j, -100)`` averaged over n.
        - ``"binary_cross_entropy"``, ``from_logits=True`` (default): PyTorch
          BCEWithLogitsLoss, mean over all elements of
          ``(1 - y)*x - log_sigmoid(x)``.
        - ``"binary_cross_entropy"``, ``from_logits=False``: PyTorch BCELoss,
          mean over all elements of
          ``-(y*max(log p, -100) + (1 - y)*max(log1p(-p), -100))``.
    out : array_like, shape (n, k)
        Network output.
    target : array_like, shape (n, k), or (n,)
        Targets; shape (n,) means integer labels for cross-entropy and a
        single column (k = 1) for the other losses.
    **params
        ``half`` (mse), ``delta`` (huber), ``from_logits`` (the two
        cross-entropies).

    Returns
    -------
    float
    """
    out, y = _loss_inputs(name, out, target)
    if name == "mse":
        value = np.mean((out - y) ** 2)
        return float(0.5 * value if params.get("half", False) else value)
    if name == "l1":
        return float(np.mean(np.abs(out - y)))
    if name == "huber":
        delta = float(params.get("delta", 1.0))
        d = np.abs(out - y)
        return float(np.mean(np.where(d < delta, 0.5 * d * d, delta * (d - 0.5 * delta))))
    if name == "cross_entropy":
        n, k = out.shape
        if y.ndim == 1:
            y = _one_hot(y, k)
        if params.get("from_logits", True):
            logp = log_softmax(out)
        else:
            with np.errstate(divide="ignore"):
                logp = np.maximum(np.log(out), LOG_CLAMP)
        return float(-np.sum(y * logp) / n)
    if name == "binary_cross_entropy":
        if params.get("from_logits", True):
            return float(np.mean((1.0 - y) * out - log_sigmoid(out)))
        with np.errstate(divide="ignore"):
            log_p = np.maximum(np.log(out), LOG_CLAMP)
            log_1mp = np.maximum(np.log1p(-out), LOG_CLAMP)
        return float(np.mean((y - 1.0) * log_1mp - y * log_p))
    raise ValueError(f"unknown loss {name!r}; expected one of {LOSSES}")


def loss_gradient(name, out, target, **params):
    """Gradient of :func:`loss_forward` with respect to ``out``.

    Parameters
    ----------
    name, out, target, **params
        As in :func:`loss_forward`.

    Returns
    -------
    ndarray (float64), shape of ``out``
        With ``numel = n*k`` and ``d = out - y``:

        - mse: ``d * (2/numel)``, or ``d * (1/numel)`` with ``half=True``
        - l1: ``sign(d) / numel`` (0 where d = 0)
        - huber: ``d / numel`` where ``|d| <= delta``, else
          ``delta*sign(d) / numel``
        - cross_entropy, from logits: ``(softmax(out)*sum_j y_j - y) / n``
        - cross_entropy, probabilities: ``-y / max(p, 1e-12) / n``
        - binary_cross_entropy, from logits: ``(sigmoid(x) - y) / numel``
        - binary_cross_entropy, probabilities:
          ``(p - y) / max(p*(1 - p), eps) / numel`` with PyTorch's
          ``eps = float32(1e-12)`` (:data:`BCE_GRAD_EPS`)
    """
    out, y = _loss_inputs(name, out, target)
    numel = out.size
    if name == "mse":
        return (out - y) * ((1.0 if params.get("half", False) else 2.0) / numel)
    if name == "l1":
        return np.sign(out - y) / numel
    if name == "huber":
        delta = float(params.get("delta", 1.0))
        return np.clip(out - y, -delta, delta) / numel
    if name == "cross_entropy":
        n, k = out.shape
        if y.ndim == 1:
            y = _one_hot(y, k)
        if params.get("from_logits", True):
            return (softmax(out) * y.sum(axis=1, keepdims=True) - y) / n
        return -y / np.maximum(out, GRAD_EPS) / n
    if name == "binary_cross_entropy":
        if params.get("from_logits", True):
            return (sigmoid(out) - y) / numel
        return (out - y) / np.maximum((1.0 - out) * out, BCE_GRAD_EPS) / numel
    raise ValueError(f"unknown loss {name!r}; expected one of {LOSSES}")


# ---------------------------------------------------------------------------
# Optimizers: transcriptions of torch.optim's _single_tensor_* functions
# ---------------------------------------------------------------------------


def _lerp(start, end, weight):
    """torch.lerp: ``start + w*(end - start)`` if w < 0.5 else ``end - (end - start)*(1 - w)``."""
    if abs(weight) < 0.5:
        return start + weight * (end - start)
    return end - (end - start) * (1.0 - weight)


def _check(cond, message):
    # `not cond` so that NaN hyperparameters fail every check.
    if not cond:
        raise ValueError(message)


class _Optimizer:
    """State handling shared by the reference optimizers.

    ``step(params, grads)`` reads the flat 1-D ``grads`` and updates the flat
    1-D ``params`` in place; the arithmetic is float64, and the state arrays
    (float64) are created on the first step with the size of ``params``.
    """

    def __init__(self):
        self.state = None
        self.step_count = 0

    def _prepare(self, params, grads):
        if not isinstance(params, np.ndarray) or params.ndim != 1:
            raise ValueError("params must be a 1-D ndarray")
        if np.shape(grads) != params.shape:
            raise ValueError(f"grads shape {np.shape(grads)} != params shape {params.shape}")
        if self.state is None:
            self.state = self._init_state(params.shape[0])
        elif self._size != params.shape[0]:
            raise ValueError("this optimizer's state belongs to parameters of another size")
        self._size = params.shape[0]
        self.step_count += 1
        return params.astype(np.float64), _f64(grads).copy()

    def _init_state(self, n):  # pragma: no cover - overridden
        return {}

    def step(self, params, grads):
        """Apply one update to ``params`` (1-D ndarray, modified in place)."""
        p, g = self._prepare(params, grads)
        params[...] = self._update(p, g)

    def _update(self, p, g):  # pragma: no cover - overridden
        raise NotImplementedError


class SGD(_Optimizer):
    """Stochastic gradient descent, as ``torch.optim.SGD``.

    Per step, with ``g`` the gradient::

        g = g + weight_decay * p                       (if weight_decay != 0)
        if momentum != 0:
            buf = g  (first step)  else  buf = momentum*buf + (1 - dampening)*g
            g = g + momentum*buf  if nesterov  else  buf
        p = p + (-lr) * g

    Parameters
    ----------
    lr : float, default 1e-3
    momentum : float, default 0
    dampening : float, default 0
    nesterov : bool, default False
        Requires ``momentum > 0`` and ``dampening == 0``.
    weight_decay : float, default 0
    """

    def __init__(self, lr=1e-3, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0):
        super().__init__()
        _check(lr >= 0.0, f"Invalid learning rate: {lr}")
        _check(momentum >= 0.0, f"Invalid momentum value: {momentum}")
        _check(weight_decay >= 0.0, f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        self.lr, self.momentum, self.dampening = float(lr), float(momentum), float(dampening)
        self.nesterov, self.weight_decay = bool(nesterov), float(weight_decay)

    def _init_state(self, n):
        return {"momentum_buffer": None}

    def _update(self, p, g):
        if self.weight_decay != 0:
            g = g + self.weight_decay * p
        if self.momentum != 0:
            buf = self.state["momentum_buffer"]
            if buf is None:
                buf = g.copy()
            else:
                buf = buf * self.momentum + (1.0 - self.dampening) * g
            self.state["momentum_buffer"] = buf
            g = g + self.momentum * buf if self.nesterov else buf
        return p + (-self.lr) * g


class Adam(_Optimizer):
    """Adam (and AMSGrad), as ``torch.optim.Adam``.

    Per step ``t`` (from 1), with ``g`` the gradient::

        p = p * (1 - lr*weight_decay)          (AdamW: decoupled weight decay)
        g = g + weight_decay * p               (Adam: L2 penalty in the gradient)
        m = lerp(m, g, 1 - beta1)
        v = v*beta2 + (1 - beta2)*g*g
        step_size = lr / (1 - beta1**t)
        v_hat = max(v_hat, v)  and use v_hat for v        (amsgrad only)
        denom = sqrt(v) / sqrt(1 - beta2**t) + eps
        p = p + (-step_size)*m / denom

    Parameters
    ----------
    lr : float, default 1e-3
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8
    weight_decay : float, default 0
    amsgrad : bool, default False
    """

    _decoupled = False

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False):
        super().__init__()
        _check(lr >= 0.0, f"Invalid learning rate: {lr}")
        _check(eps >= 0.0, f"Invalid epsilon value: {eps}")
        beta1, beta2 = betas
        _check(0.0 <= beta1 < 1.0, f"Invalid beta parameter at index 0: {beta1}")
        _check(0.0 <= beta2 < 1.0, f"Invalid beta parameter at index 1: {beta2}")
        _check(weight_decay >= 0.0, f"Invalid weight_decay value: {weight_decay}")
        self.lr, self.beta1, self.beta2 = float(lr), float(beta1), float(beta2)
        self.eps, self.weight_decay, self.amsgrad = float(eps), float(weight_decay), bool(amsgrad)

    def _init_state(self, n):
        state = {"exp_avg": np.zeros(n), "exp_avg_sq": np.zeros(n)}
        if self.amsgrad:
            state["max_exp_avg_sq"] = np.zeros(n)
        return state

    def _update(self, p, g):
        lr, beta1, beta2, t = self.lr, self.beta1, self.beta2, float(self.step_count)
        if self.weight_decay != 0:
            if self._decoupled:
                p = p * (1.0 - lr * self.weight_decay)
            else:
                g = g + self.weight_decay * p
        s = self.state
        s["exp_avg"] = _lerp(s["exp_avg"], g, 1.0 - beta1)
        s["exp_avg_sq"] = s["exp_avg_sq"] * beta2 + (1.0 - beta2) * g * g
        bias_correction1 = 1.0 - beta1**t
        bias_correction2 = 1.0 - beta2**t
        step_size = lr / bias_correction1
        bias_correction2_sqrt = bias_correction2**0.5
        if self.amsgrad:
            s["max_exp_avg_sq"] = np.maximum(s["max_exp_avg_sq"], s["exp_avg_sq"])
            denom = np.sqrt(s["max_exp_avg_sq"]) / bias_correction2_sqrt + self.eps
        else:
            denom = np.sqrt(s["exp_avg_sq"]) / bias_correction2_sqrt + self.eps
        return p + (-step_size) * s["exp_avg"] / denom


class AdamW(Adam):
    """AdamW: :class:`Adam` with decoupled weight decay, as ``torch.optim.AdamW``.

    ``p *= 1 - lr*weight_decay`` comes first, then the Adam step without any
    L2 term in the gradient.

    Parameters
    ----------
    lr : float, default 1e-3
    betas : (float, float), default (0.9, 0.999)
    eps : float, default 1e-8
    weight_decay : float, default 1e-2
    amsgrad : bool, default False
    """

    _decoupled = True

    def __init__(self, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False):
        super().__init__(lr, betas, eps, weight_decay, amsgrad)


class RMSprop(_Optimizer):
    """RMSprop, as ``torch.optim.RMSprop``.

    Per step, with ``g`` the gradient::

        g = g + weight_decay * p                        (if weight_decay != 0)
        v = v*alpha + (1 - alpha)*g*g
        if centered:  m = lerp(m, g, 1 - alpha);  avg = sqrt(v - m*m) + eps
        else:         avg = sqrt(v) + eps
        if momentum > 0:  buf = buf*momentum + g/avg;  p = p + (-lr)*buf
        else:             p = p + (-lr)*g / avg

    Parameters
    ----------
    lr : float, default 1e-2
    alpha : float, default 0.99
    eps : float, default 1e-8
    weight_decay : float, default 0
    momentum : float, default 0
    centered : bool, default False
    """

    def __init__(self, lr=1e-2, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                 centered=False):
        super().__init__()
        _check(lr >= 0.0, f"Invalid learning rate: {lr}")
        _check(eps >= 0.0, f"Invalid epsilon value: {eps}")
        _check(momentum >= 0.0, f"Invalid momentum value: {momentum}")
        _check(weight_decay >= 0.0, f"Invalid weight_decay value: {weight_decay}")
        _check(alpha >= 0.0, f"Invalid alpha value: {alpha}")
        self.lr, self.alpha, self.eps = float(lr), float(alpha), float(eps)
        self.weight_decay, self.momentum, self.centered = (
            float(weight_decay), float(momentum), bool(centered))

    def _init_state(self, n):
        state = {"square_avg": np.zeros(n)}
        if self.momentum > 0:
            state["momentum_buffer"] = np.zeros(n)
        if self.centered:
            state["grad_avg"] = np.zeros(n)
        return state

    def _update(self, p, g):
        s = self.state
        if self.weight_decay != 0:
            g = g + self.weight_decay * p
        s["square_avg"] = s["square_avg"] * self.alpha + (1.0 - self.alpha) * g * g
        if self.centered:
            s["grad_avg"] = _lerp(s["grad_avg"], g, 1.0 - self.alpha)
            avg = np.sqrt(s["square_avg"] + (-1.0) * s["grad_avg"] * s["grad_avg"])
        else:
            avg = np.sqrt(s["square_avg"])
        avg = avg + self.eps
        if self.momentum > 0:
            s["momentum_buffer"] = s["momentum_buffer"] * self.momentum + g / avg
            return p + (-self.lr) * s["momentum_buffer"]
        return p + (-self.lr) * g / avg


class Adagrad(_Optimizer):
    """Adagrad, as ``torch.optim.Adagrad``.

    Per step ``t`` (from 1), with ``g`` the gradient::

        g = g + weight_decay * p                      (if weight_decay != 0)
        clr = lr / (1 + (t - 1)*lr_decay)
        sum = sum + g*g                               (starts at initial_accumulator_value)
        p = p + (-clr)*g / (sqrt(sum) + eps)

    Parameters
    ----------
    lr : float, default 1e-2
    lr_decay : float, default 0
    weight_decay : float, default 0
    initial_accumulator_value : float, default 0
    eps : float, default 1e-10
    """

    def __init__(self, lr=1e-2, lr_decay=0.0, weight_decay=0.0, initial_accumulator_value=0.0,
                 eps=1e-10):
        super().__init__()
        _check(lr >= 0.0, f"Invalid learning rate: {lr}")
        _check(lr_decay >= 0.0, f"Invalid lr_decay value: {lr_decay}")
        _check(weight_decay >= 0.0, f"Invalid weight_decay value: {weight_decay}")
        _check(initial_accumulator_value >= 0.0,
               f"Invalid initial_accumulator_value value: {initial_accumulator_value}")
        _check(eps >= 0.0, f"Invalid epsilon value: {eps}")
        self.lr, self.lr_decay, self.weight_decay = float(lr), float(lr_decay), float(weight_decay)
        self.initial_accumulator_value, self.eps = float(initial_accumulator_value), float(eps)

    def _init_state(self, n):
        return {"sum": np.full(n, self.initial_accumulator_value)}

    def _update(self, p, g):
        t = float(self.step_count)
        if self.weight_decay != 0:
            g = g + self.weight_decay * p
        clr = self.lr / (1.0 + (t - 1.0) * self.lr_decay)
        self.state["sum"] = self.state["sum"] + g * g
        std = np.sqrt(self.state["sum"]) + self.eps
        return p + (-clr) * g / std


# ---------------------------------------------------------------------------
# Reference multilayer perceptron
# ---------------------------------------------------------------------------


def _activation_spec(spec):
    """An activation given as None, a name, or (name, param) -> (name, param)."""
    if spec is None or isinstance(spec, str):
        return spec, None
    name, param = spec
    return name, param


def network_forward(weights, biases, activations, X):
    """Forward pass of a dense network.

    For each layer ``l``: ``z[l] = a[l-1] @ W[l].T + b[l]`` and
    ``a[l] = g[l](z[l])``, with ``a[0] = X``.

    Parameters
    ----------
    weights : sequence of array_like, shapes (out_l, in_l)
    biases : sequence of array_like (out_l,) or None
        None entries (or ``biases=None``) mean a layer without bias.
    activations : sequence of str, None or (str, float)
        Each layer's activation name (None = identity), optionally with its
        parameter, e.g. ``("leaky_relu", 0.2)``.
    X : array_like, shape (n, in_0)

    Returns
    -------
    list of (z, a)
        One (pre-activation, activation) pair per layer, float64.
    """
    if biases is None:
        biases = [None] * len(weights)
    a = _f64(X)
    cache = []
    for W, b, spec in zip(weights, biases, activations, strict=True):
        z = a @ _f64(W).T
        if b is not None:
            z = z + _f64(b)
        name, param = _activation_spec(spec)
        a = activation_forward(name, z, param)
        cache.append((z, a))
    return cache


def network_backward(weights, cache, activations, grad_out, X, biases=None):
    """Backward pass of a dense network.

    From ``da[L] = grad_out``, for ``l = L..1``::

        dz[l] = activation_backward(g[l], da[l], z[l], a[l])
        dW[l] = dz[l].T @ a[l-1]      db[l] = dz[l].sum(axis=0)
        da[l-1] = dz[l] @ W[l]

    Parameters
    ----------
    weights : sequence of array_like, shapes (out_l, in_l)
    cache : list of (z, a)
        What :func:`network_forward` returned.
    activations : sequence of str, None or (str, float)
        As in :func:`network_forward`.
    grad_out : array_like, shape (n, out_L)
        dL/da[L], the gradient of the loss with respect to the output.
    X : array_like, shape (n, in_0)
        The input of the forward pass.
    biases : sequence, optional
        When given, the bias gradient of a layer whose bias is None is None.

    Returns
    -------
    grad_weights : list of ndarray, shapes (out_l, in_l)
    grad_biases : list of ndarray (out_l,) or None
    grad_X : ndarray, shape (n, in_0)
    """
    n_layers = len(weights)
    if len(cache) != n_layers or len(activations) != n_layers:
        raise ValueError("weights, cache and activations must have the same length")
    grad_weights = [None] * n_layers
    grad_biases = [None] * n_layers
    da = _f64(grad_out)
    for l in range(n_layers - 1, -1, -1):
        z, a = cache[l]
        a_prev = _f64(X) if l == 0 else cache[l - 1][1]
        name, param = _activation_spec(activations[l])
        dz = activation_backward(name, da, z, a, param)
        grad_weights[l] = dz.T @ a_prev
        if biases is None or biases[l] is not None:
            grad_biases[l] = dz.sum(axis=0)
        da = dz @ _f64(weights[l])
    return grad_weights, grad_biases, da


# ---------------------------------------------------------------------------
# Dropout, BatchNorm1d, LayerNorm (PyTorch's nn.Dropout, nn.BatchNorm1d, nn.LayerNorm)
# ---------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def _mix64(z):
    """SplitMix64's output function on uint64 values (wrapping arithmetic)."""
    z = np.asarray(z, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def dropout_scale(key, counter, layer_index, shape, p, dtype=np.float64):
    """The mask bpfast's Dropout draws, as factors: 0 (dropped) or 1/(1-p) in dtype.

    The stream of training pass ``counter`` for the layer at ``layer_index`` is
    SplitMix64 started at ``mix(mix(mix(key + G) + counter) + (layer_index + 1) G)``
    (G the golden-ratio constant); its k-th output (k from 1) decides elements
    2(k-1) (low 32 bits) and 2(k-1)+1 (high 32 bits) of the row-major (n, width)
    mask: dropped when the 32 bits are below ``floor(p * 2**32)``.
    """
    n = int(np.prod(shape))
    start = int(_mix64((int(_mix64((int(_mix64((key + _GOLDEN) & _MASK64)) + counter)
                                   & _MASK64)) + (layer_index + 1) * _GOLDEN) & _MASK64))
    pairs = np.arange(1, (n + 1) // 2 + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        bits = _mix64(np.uint64(start) + pairs * np.uint64(_GOLDEN))
    draws = np.empty(2 * pairs.size, dtype=np.uint64)
    draws[0::2] = bits & np.uint64(0xFFFFFFFF)
    draws[1::2] = bits >> np.uint64(32)
    threshold = np.uint64(int(p * 4294967296.0))
    scale = np.asarray(1, dtype) / np.asarray(1 - p, dtype)  # PyTorch's 1/(1-p) in dtype
    return np.where(draws[:n] < threshold, np.asarray(0, dtype), scale).reshape(shape)


def batch_norm_forward(x, weight, bias, running_mean, running_var, num_batches_tracked, *,
                       training, momentum=0.1, eps=1e-5):
    """BatchNorm1d on x (n, c), as PyTorch computes it.

    Training mode (or no running statistics, ``running_mean=None``): the batch's mean
    and biased variance; in training with running statistics, ``num_batches_tracked``
    is incremented and ``running = (1 - m) * running + m * batch`` with the unbiased
    variance, ``m = momentum`` or ``1 / num_batches_tracked`` for ``momentum=None``.
    Inference with running statistics: those. ``weight``/``bias`` None: no affine.

    Returns (out, cache, (running_mean, running_var, num_batches_tracked)): new arrays.
    """
    x = _f64(x)
    n = x.shape[0]
    tracking = running_mean is not None
    if tracking:
        running_mean, running_var = _f64(running_mean).copy(), _f64(running_var).copy()
    use_batch = training or not tracking
    if use_batch:
        mean = x.mean(axis=0)
        var_sum = ((x - mean) ** 2).sum(axis=0)
        var = var_sum / n
        if training and tracking:
            num_batches_tracked = num_batches_tracked + 1
            factor = 1.0 / num_batches_tracked if momentum is None else momentum
            running_mean = factor * mean + (1 - factor) * running_mean
            running_var = factor * (var_sum / (n - 1)) + (1 - factor) * running_var
    else:
        mean, var = running_mean, running_var
    invstd = 1 / np.sqrt(var + eps)
    xhat = (x - mean) * invstd
    out = xhat * (1 if weight is None else _f64(weight)) + (0 if bias is None else _f64(bias))
    cache = (xhat, invstd, weight, use_batch)
    return out, cache, (running_mean, running_var, num_batches_tracked)


def batch_norm_backward(grad_out, cache):
    """(dL/dx, dL/dweight, dL/dbias) of :func:`batch_norm_forward`. With batch
    statistics: ``dx = (dy - mean(dy) - x_hat mean(dy x_hat)) / std * weight``."""
    xhat, invstd, weight, use_batch = cache
    dy = _f64(grad_out)
    grad_weight = (dy * xhat).sum(axis=0)
    grad_bias = dy.sum(axis=0)
    scale = invstd * (1 if weight is None else _f64(weight))
    if use_batch:
        dx = (dy - dy.mean(axis=0) - xhat * (dy * xhat).mean(axis=0)) * scale
    else:
        dx = dy * scale
    return dx, grad_weight, grad_bias


def layer_norm_forward(x, weight, bias, eps=1e-5):
    """LayerNorm over each row of x (n, c): the row's mean and biased variance."""
    x = _f64(x)
    mean = x.mean(axis=1, keepdims=True)
    rstd = 1 / np.sqrt(((x - mean) ** 2).mean(axis=1, keepdims=True) + eps)
    xhat = (x - mean) * rstd
    out = xhat * (1 if weight is None else _f64(weight)) + (0 if bias is None else _f64(bias))
    return out, (xhat, rstd, weight)


def layer_norm_backward(grad_out, cache):
    """(dL/dx, dL/dweight, dL/dbias) of :func:`layer_norm_forward`:
    ``dx = (g - mean(g) - x_hat mean(g x_hat)) / std`` per row, ``g = dy * weight``."""
    xhat, rstd, weight = cache
    dy = _f64(grad_out)
    g = dy * (1 if weight is None else _f64(weight))
    dx = (g - g.mean(axis=1, keepdims=True)
          - xhat * (g * xhat).mean(axis=1, keepdims=True)) * rstd
    return dx, (dy * xhat).sum(axis=0), dy.sum(axis=0)


def sequential_forward(layers, X, training):
    """Forward pass of a list of layers, each a dict: ``{"kind": "dense", "weight",
    "bias", "activation"}``, ``{"kind": "activation", "activation"}`` (a name or
    (name, param)), ``{"kind": "dropout", "scale"}`` (the mask's factors, or None
    for the identity), ``{"kind": "batch_norm1d", "weight", "bias", "running_mean",
    "running_var", "num_batches_tracked", "momentum", "eps"}`` and ``{"kind":
    "layer_norm", "weight", "bias", "eps"}`` (weight/bias None when off).

    Returns (output, caches); batch-norm layers get their new running statistics
    written back into their dict.
    """
    a = _f64(X)
    caches = []
    for layer in layers:
        kind = layer["kind"]
        x = a
        if kind == "dense":
            z = x @ _f64(layer["weight"]).T
            if layer.get("bias") is not None:
                z = z + _f64(layer["bias"])
            name, param = _activation_spec(layer.get("activation"))
            a = activation_forward(name, z, param)
            cache = (x, z, a)
        elif kind == "activation":
            name, param = _activation_spec(layer["activation"])
            a = activation_forward(name, x, param)
            cache = (x, x, a)
        elif kind == "dropout":
            scale = layer.get("scale") if training else None
            a = x if scale is None else x * scale
            cache = (x, scale)
        elif kind == "batch_norm1d":
            a, cache, stats = batch_norm_forward(
                x, layer["weight"], layer["bias"], layer["running_mean"],
                layer["running_var"], layer["num_batches_tracked"], training=training,
                momentum=layer["momentum"], eps=layer["eps"])
            layer["running_mean"], layer["running_var"], layer["num_batches_tracked"] = stats
        elif kind == "layer_norm":
            a, cache = layer_norm_forward(x, layer["weight"], layer["bias"], layer["eps"])
        else:
            raise ValueError(f"unknown kind {kind!r}")
        caches.append(cache)
    return a, caches


def sequential_backward(layers, caches, grad_out):
    """(gradients, dL/dX): per layer a dict {"weight": ..., "bias": ...} (None where
    the layer has no such parameter), from dL/d(output) of :func:`sequential_forward`."""
    da = _f64(grad_out)
    grads = [None] * len(layers)
    for index in range(len(layers) - 1, -1, -1):
        layer, cache = layers[index], caches[index]
        kind = layer["kind"]
        weight = layer.get("weight")
        bias = layer.get("bias")
        if kind in ("dense", "activation"):
            x, z, a = cache
            name, param = _activation_spec(layer.get("activation"))
            dz = activation_backward(name, da, z, a, param)
            if kind == "dense":
                grads[index] = {"weight": dz.T @ x,
                                "bias": None if bias is None else dz.sum(axis=0)}
                da = dz @ _f64(weight)
            else:
                grads[index] = {"weight": None, "bias": None}
                da = dz
        elif kind == "dropout":
            scale = cache[1]
            grads[index] = {"weight": None, "bias": None}
            da = da if scale is None else da * scale
        else:
            backward = batch_norm_backward if kind == "batch_norm1d" else layer_norm_backward
            da, grad_weight, grad_bias = backward(da, cache)
            grads[index] = {"weight": None if weight is None else grad_weight,
                            "bias": None if bias is None else grad_bias}
    return grads, da
