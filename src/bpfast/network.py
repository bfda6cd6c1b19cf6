"""Network: the flat parameter buffers and the training API around the compiled core."""
import numpy as np

from . import _core
from ._validation import as_float_array, check_bool, check_dtype, check_int
from .layers import Dense
from .losses import get_loss
from .optimizers import get_optimizer

__all__ = ["Network", "History"]

# predict() works in chunks whose scratch stays around this many elements.
_PREDICT_CHUNK_ELEMENTS = 1 << 20


class History:
    """What ``fit`` records: ``history`` maps "loss" (and later metrics) to per-epoch lists."""

    def __init__(self):
        self.history = {"loss": []}
        self.epoch = []

    def append(self, epoch, **values):
        self.epoch.append(epoch)
        for key, value in values.items():
            self.history.setdefault(key, []).append(value)

    def __repr__(self):
        return f"History(epochs={len(self.epoch)}, keys={list(self.history)})"


class Network:
    """A multilayer perceptron whose parameters live in one flat buffer.

    Parameters
    ----------
    layers : list of Dense
        Consecutive layers; each one's in_features must equal the previous
        out_features. ``"softmax"`` may only be the last activation.
    dtype : {"float32", "float64"}
        The dtype of parameters and of all computation; never changed later.
    seed : int or None
        Seeds the weight initialisation and the shuffling in ``fit``.

    Attributes
    ----------
    parameters : ndarray (n_parameters,)
        Every weight and bias, layer by layer (weight then bias); each layer's
        ``weight``/``bias`` are views of it.
    gradients : ndarray (n_parameters,)
        The gradient of the last backward pass, same layout.
    """

    def __init__(self, layers, *, dtype="float32", seed=None):
        layers = list(layers) if isinstance(layers, (list, tuple)) else None
        if not layers or not all(isinstance(layer, Dense) for layer in layers):
            raise TypeError("layers must be a non-empty list of bpfast.Dense")
        self.dtype = check_dtype(dtype)
        if seed is not None:
            seed = check_int("seed", seed, minimum=0)
        for index, layer in enumerate(layers):
            if layer._network is not None or layers.index(layer) != index:
                raise ValueError(f"layer {index} ({layer!r}) already belongs to a Network; "
                                 "create a new Dense for each network")
            if index and layer.in_features != layers[index - 1].out_features:
                raise ValueError(
                    f"layer {index} takes {layer.in_features} inputs but layer {index - 1} "
                    f"gives {layers[index - 1].out_features} outputs")
            if layer.activation == "softmax" and index != len(layers) - 1:
                raise ValueError(f"softmax is only allowed on the last layer (layer {index} "
                                 "is hidden)")
        self.layers = layers
        self.seed = seed
        self._rng = np.random.default_rng(seed)
        n_parameters = sum(layer.n_parameters for layer in layers)
        self._parameters = np.zeros(n_parameters, dtype=self.dtype)
        self._gradients = np.zeros(n_parameters, dtype=self.dtype)
        table, offset = [], 0
        for layer in layers:
            n_weights = layer.out_features * layer.in_features
            weight_shape = (layer.out_features, layer.in_features)
            bias_offset = offset + n_weights if layer.use_bias else -1
            layer.weight = self._parameters[offset:offset + n_weights].reshape(weight_shape)
            layer.grad_weight = self._gradients[offset:offset + n_weights].reshape(weight_shape)
            if layer.use_bias:
                layer.bias = self._parameters[bias_offset:bias_offset + layer.out_features]
                layer.grad_bias = self._gradients[bias_offset:bias_offset + layer.out_features]
            weight, bias = layer.initial_values(self._rng)
            layer.weight[...] = weight
            if layer.use_bias:
                layer.bias[...] = bias
            table.append((layer.in_features, layer.out_features,
                          _core.ACTIVATIONS.index(layer.activation), layer.activation_param,
                          offset, bias_offset))
            offset += layer.n_parameters
            layer._network = self
        self._engine = _core.Engine(table, self._parameters, self._gradients)

    # ------------------------------------------------------------------ buffers
    @property
    def parameters(self):
        return self._parameters

    @parameters.setter
    def parameters(self, values):
        values = np.asarray(values)
        if values.shape != self._parameters.shape:
            raise ValueError(f"parameters must have shape {self._parameters.shape}, "
                             f"got {values.shape}")
        self._parameters[...] = as_float_array("parameters", values, self.dtype, 1)

    @property
    def gradients(self):
        return self._gradients

    @property
    def n_parameters(self):
        return self._parameters.shape[0]

    @property
    def n_inputs(self):
        return self.layers[0].in_features

    @property
    def n_outputs(self):
        return self.layers[-1].out_features

    # ------------------------------------------------------------------ checks
    def _check_input(self, X, name="X"):
        X = as_float_array(name, X, self.dtype, 2)
        if X.shape[1] != self.n_inputs:
            raise ValueError(f"{name} has {X.shape[1]} features, but the network takes "
                             f"{self.n_inputs}")
        return X

    def _check_loss(self, loss):
        """The Loss for loss; refuses a softmax/sigmoid output fed to a loss on logits."""
        loss = get_loss(loss)
        activation = self.layers[-1].activation
        if activation in ("softmax", "sigmoid") and getattr(loss, "from_logits", False) \
                and loss.output_activation == activation:
            raise ValueError(
                f"the last layer applies {activation}, but {loss!r} expects logits and would "
                f"apply it again; use {type(loss).__name__}(from_logits=False)")
        return loss

    def _prepare_batch(self, X, y, loss):
        X = self._check_input(X)
        target, labels = loss.prepare_target(y, X.shape[0], self.n_outputs, self.dtype)
        return X, target, labels

    # ------------------------------------------------------------------ step by step
    def forward(self, X):
        """The network's output for X (n, n_inputs); keeps what ``backward`` needs.

        Returns a new array of shape (n, n_outputs) that the caller owns.
        """
        return self._engine.forward(self._check_input(X))

    def backward(self, grad_output):
        """Back-propagate dL/d(output) of the last ``forward``.

        Overwrites ``gradients`` (it does not accumulate) and returns dL/dX.
        """
        n_rows = self._engine.forward_rows
        if n_rows < 0:
            raise ValueError("backward() needs a preceding forward(); train_step, fit and "
                             "compute_gradients do not leave one")
        grad_output = as_float_array("grad_output", grad_output, self.dtype, 2)
        if grad_output.shape != (n_rows, self.n_outputs):
            raise ValueError(f"grad_output has shape {grad_output.shape}, but the last "
                             f"forward() gave ({n_rows}, {self.n_outputs})")
        return self._engine.backward(grad_output, True)

    # ------------------------------------------------------------------ fused
    def compute_gradients(self, X, y, loss):
        """Forward, loss and backward in one compiled call; fills ``gradients``; the loss."""
        loss = self._check_loss(loss)
        X, target, labels = self._prepare_batch(X, y, loss)
        return self._engine.train_step(X, target, labels, loss._config, None)

    def train_step(self, X, y, loss, optimizer):
        """One training step (forward, loss, backward, update) in one compiled call.

        Returns the loss of the forward pass, before the update.
        """
        loss = self._check_loss(loss)
        X, target, labels = self._prepare_batch(X, y, loss)
        return self._engine.train_step(X, target, labels, loss._config,
                                       get_optimizer(optimizer)._config)

    def fit(self, X, y, *, loss, optimizer, epochs=1, batch_size=None, shuffle=True):
        """Train by gradient descent; a :class:`History` of the per-epoch mean loss.

        Parameters
        ----------
        X : array (n_samples, n_inputs)
        y : targets for ``loss`` (class labels (n,) or an (n, n_outputs) array)
        loss : Loss or str
        optimizer : Optimizer or str
        epochs : int
        batch_size : int or None
            None: batch gradient descent (all samples per step); 1: stochastic;
            k: mini-batches of k (the last one partial).
        shuffle : bool
            Visit the samples in a new random order each epoch (from the network's seed).

        Each epoch runs in compiled code; the recorded loss is the mean over the
        epoch's batches of each batch's loss before its update, weighted by batch size.
        """
        loss = self._check_loss(loss)
        optimizer = get_optimizer(optimizer)
        epochs = check_int("epochs", epochs, minimum=0)
        batch_size = check_int("batch_size", batch_size, minimum=1, allow_none=True)
        shuffle = check_bool("shuffle", shuffle)
        X, target, labels = self._prepare_batch(X, y, loss)
        optimizer._config.check_owner(self._engine)  # before the shuffle draws anything
        n_samples = X.shape[0]
        batch_size = n_samples if batch_size is None else min(batch_size, n_samples)
        history = History()
        for epoch in range(epochs):
            order = self._rng.permutation(n_samples).astype(np.intp) if shuffle else None
            value = self._engine.train_epoch(X, target, labels, order, batch_size,
                                             loss._config, optimizer._config)
            history.append(epoch, loss=value)
        return history

    def predict(self, X):
        """Inference without caches, in chunks for large X; a new (n, n_outputs) array."""
        X = self._check_input(X)
        widest = max(max(layer.in_features, layer.out_features) for layer in self.layers)
        return self._engine.predict(X, max(1, _PREDICT_CHUNK_ELEMENTS // widest))

    def __repr__(self):
        body = ",\n  ".join(repr(layer) for layer in self.layers)
        return f"Network([\n  {body}\n], dtype={self.dtype.name!r})"
