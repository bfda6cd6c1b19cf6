"""Network: the flat parameter buffers and the training API around the compiled core."""
import contextlib
import dataclasses
import sys
from collections.abc import Callable, Sequence
from os import PathLike
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from . import distributed
from ._compiled import core as _core
from ._training import (
    Data,
    DivergenceError,
    FitConfig,
    Trainer,
    combined_weights,
    finite_or_raise,
    resolve_metrics,
    split_validation,
)
from ._validation import (
    MAX_BATCH_ROWS,
    as_float_array,
    check_batch_rows,
    check_bool,
    check_dtype,
    check_int,
    check_memory,
    check_real,
    check_sample_weight,
    format_bytes,
)
from .callbacks import Callback, EarlyStopping, History
from .layers import (
    WIDTH_FROM_NETWORK,
    BatchNorm1d,
    CustomActivation,
    Dense,
    Layer,
    LayerNorm,
    from_description,
)
from .losses import Loss, get_loss
from .optimizers import Optimizer, get_optimizer
from .schedules import Schedule

__all__ = ["Network", "History", "DivergenceError"]

# predict() works in chunks whose scratch stays around this many elements.
_PREDICT_CHUNK_ELEMENTS = 1 << 20


class Network:
    """A multilayer perceptron whose parameters live in one flat buffer.

    Parameters
    ----------
    layers : list of Dense, Dropout, BatchNorm1d, LayerNorm, Activation
        Consecutive layers; each one's input width (``in_features``,
        ``num_features``, ``normalized_shape``) must equal the previous one's
        output width (Dropout and Activation take it). At least one Dense; a
        normalisation layer may come first (normalising the raw input).
        ``"softmax"`` may only be the last activation.
    dtype : {"float32", "float64"}
        The dtype of parameters and of all computation; never changed later.
    seed : int or None
        Seeds the weight initialisation, the shuffling in ``fit`` and Dropout's
        masks (a counter-based stream, see docs/layers.rst).

    Attributes
    ----------
    parameters : ndarray (n_parameters,)
        Every weight and bias, layer by layer (weight then bias); each layer's
        ``weight``/``bias`` are views of it.
    gradients : ndarray (n_parameters,)
        The gradient of the last backward pass, same layout.
    buffers : ndarray (n_buffers,)
        The non-trainable values (BatchNorm1d's running statistics), layer by
        layer; never changed by optimizers (see docs/layers.rst).
    epochs_trained : int
        Epochs run by ``fit`` and ``partial_fit`` so far; epoch numbers, schedules
        and callbacks continue from it across calls.
    history : History or None
        The record of the last ``fit`` (kept when it was interrupted).

    Notes
    -----
    Threads: ``predict`` calls run together. Calls that change the network
    (``train_step``, ``compute_gradients``, ``forward``, ``backward``, assigning
    ``parameters``, an optimizer's ``step``) run one at a time: a second one from
    another thread gets ``RuntimeError``. A changing call waits for running
    predictions, and predictions that arrive meanwhile wait for it, so neither
    side starves. While ``fit`` runs, the network belongs to it: those calls,
    ``fit`` and ``bpfast.save`` from other threads get ``RuntimeError`` (the fit
    is never the one interrupted); ``predict`` still runs, between batches.
    ``parameters`` and ``gradients`` are the live buffers: for a consistent copy
    while another thread trains, use ``bpfast.save`` or ``copy.deepcopy``.
    """

    def __init__(self, layers: Sequence[Layer], *,
                 dtype: DTypeLike = "float32", seed: int | None = None) -> None:
        layer_list = list(layers) if isinstance(layers, (list, tuple)) else None
        for index, layer in enumerate(layer_list or ()):
            if isinstance(layer, CustomActivation):
                raise TypeError(
                    f"layer {index} is {layer!r}, an activation function, not a layer: "
                    "give it to a layer, as bpfast.Activation(act) (an activation layer) or "
                    "bpfast.Dense(n_in, n_out, activation=act), act being that "
                    "CustomActivation")
        if not layer_list or not all(isinstance(layer, Layer) for layer in layer_list):
            raise TypeError("layers must be a non-empty list of bpfast layers (Dense, "
                            "Dropout, BatchNorm1d, LayerNorm, Activation)")
        self.dtype = check_dtype(dtype)
        if seed is not None:
            seed = check_int("seed", seed, minimum=0)
        layers = layer_list
        widths = _layer_widths(layers)  # checks everything before a layer changes
        for layer in layers:
            if isinstance(layer.activation, CustomActivation):
                layer.activation._check_on_first_use()
        self.layers = layers
        self.seed = seed
        before = [(layer.in_features, layer.out_features) for layer in layers]
        for layer, (n_in, n_out) in zip(layers, widths):
            layer.in_features, layer.out_features = n_in, n_out
        n_parameters = sum(layer.n_parameters for layer in layers)
        n_buffers = sum(layer.n_buffers for layer in layers)
        try:
            self._check_size(n_parameters)
        except BaseException:
            for layer, (n_in, n_out) in zip(layers, before):
                layer.in_features, layer.out_features = n_in, n_out
            raise
        self._rng = np.random.default_rng(seed)
        # Dropout's counter-based stream: its key (from the seed, any size, or fresh
        # entropy) and the number of training passes so far, both kept by the engine
        stream_key = int(np.random.SeedSequence(seed).generate_state(1, np.uint64)[0])
        self._parameters = np.zeros(n_parameters, dtype=self.dtype)
        self._gradients = np.zeros(n_parameters, dtype=self.dtype)
        self._buffers = np.zeros(n_buffers, dtype=self.dtype)
        table, offset, buffer_offset = [], 0, 0
        for layer in layers:
            weight_offset, bias_offset = layer._attach_views(
                self._parameters, self._gradients, self._buffers, offset,
                buffer_offset if layer.n_buffers else -1)
            if isinstance(layer, Dense):
                weight, bias = layer.initial_values(self._rng)
                self._parameters[offset:offset + weight.size] = weight.ravel()
                if layer.bias is not None:  # set above exactly when use_bias
                    layer.bias[...] = bias
            table.append(layer.engine_row(weight_offset, bias_offset,
                                          buffer_offset if layer.n_buffers else -1))
            offset += layer.n_parameters
            buffer_offset += layer.n_buffers
            layer._network = self
        self._engine = _core.ENGINES[self._parameters.dtype](
            table, self._parameters, self._gradients, self._buffers)
        self._engine.stream = (stream_key, 0)
        self.epochs_trained = 0
        self.history = None
        self.stop_training = False

    # ------------------------------------------------------------------ buffers
    @property
    def parameters(self) -> NDArray[np.floating]:
        return self._parameters

    @parameters.setter
    def parameters(self, values: ArrayLike) -> None:
        values = self._flat_values("parameters", values, self._parameters)
        self._engine.assign_parameters(values)  # not while another thread computes

    @property
    def gradients(self) -> NDArray[np.floating]:
        return self._gradients

    @property
    def buffers(self) -> NDArray[np.floating]:
        """Every non-trainable value (BatchNorm1d's running statistics), layer by layer:
        running_mean, running_var, num_batches_tracked. Optimizers never change it;
        training-mode passes update it. Empty without such layers."""
        return self._buffers

    @buffers.setter
    def buffers(self, values: ArrayLike) -> None:
        values = self._flat_values("buffers", values, self._buffers)
        if values.shape[0] > 0:
            self._engine.assign_buffers(values)  # checked there, under the lock

    def _flat_values(self, name: str, values: ArrayLike,
                     current: NDArray[np.floating]) -> NDArray[np.floating]:
        """values for the flat array `current`: its shape, this network's dtype, finite
        (nothing to convert when it is empty)."""
        values = np.asarray(values)
        if values.shape != current.shape:
            raise ValueError(f"{name} must have shape {current.shape}, got {values.shape}")
        return as_float_array(name, values, self.dtype, 1, "index") if values.size else values

    @property
    def n_parameters(self) -> int:
        return self._parameters.shape[0]

    @property
    def n_inputs(self) -> int:
        return self.layers[0].in_features

    @property
    def n_outputs(self) -> int:
        return self.layers[-1].out_features

    # ------------------------------------------------------------------ checks
    def _check_size(self, n_parameters):
        """Refuse, before allocating, a network that cannot fit in memory or in BLAS's int
        sizes: parameters and gradients, and the float64 draw of the largest layer's
        initial weights (the optimizer's state is checked when it binds, workspaces
        when a batch needs them)."""
        for index, layer in enumerate(self.layers):
            if max(layer.in_features, layer.out_features) > MAX_BATCH_ROWS:
                raise ValueError(f"layer {index} ({layer!r}) is wider than {MAX_BATCH_ROWS} "
                                 "(2**31 - 1, BLAS's int sizes)")
        largest = max(layer.n_parameters for layer in self.layers)
        check_memory(f"a network of {n_parameters} {self.dtype.name} parameters "
                     f"({format_bytes(n_parameters * self.dtype.itemsize)} each for the "
                     f"parameters and the gradients, and its initialisation)",
                     2 * n_parameters * self.dtype.itemsize + 8 * largest)

    def _check_workspace(self, n_rows):
        """Refuse a batch of n_rows rows that is too large for BLAS or whose workspaces
        (grown by the engine, once, for the largest batch so far) cannot fit in memory.
        An estimate from above: every layer's output and pre-activation, the two
        largest gradient blocks, a batch of inputs and targets, three per-row values."""
        check_batch_rows("a batch", n_rows)
        widths = sum(layer.out_features for layer in self.layers)
        widest = max(max(layer.in_features, layer.out_features) for layer in self.layers)
        per_row = (2 * widths + 2 * widest + self.n_inputs + self.n_outputs) * \
            self.dtype.itemsize + 24
        check_memory(f"the workspaces for a batch of {n_rows} rows", n_rows * per_row)

    def _check_fit_batch(self, n_samples, batch_size):
        """fit's batches of batch_size (None: all n_samples) rows: _check_workspace."""
        rows = n_samples if batch_size is None else min(batch_size, n_samples)
        if rows > MAX_BATCH_ROWS:
            check_batch_rows(f"a batch of fit (batch_size={batch_size}, {n_samples} samples)",
                             rows)
        if rows > self._engine.capacity:
            self._check_workspace(rows)

    def _check_batch_norm_batches(self, n_samples, batch_size):
        """A BatchNorm1d cannot train on a batch of one row: refuse a fit that would."""
        if n_samples == 0 or not any(isinstance(layer, BatchNorm1d) for layer in self.layers):
            return
        rows = n_samples if batch_size is None else min(batch_size, n_samples)
        if rows == 1 or (batch_size is not None and n_samples % batch_size == 1):
            raise ValueError(
                f"with {n_samples} training samples and batch_size={batch_size} a batch has "
                f"one row, which BatchNorm1d cannot train on (the variance of one value is "
                f"0; PyTorch refuses it too); choose another batch_size")

    def _check_input(self, X, name="X", batch=True) -> NDArray[np.floating]:
        """X converted (as_float_array); with batch, also one batch of an engine step
        (rows and workspaces checked where the engine must grow: its capacity is never
        above MAX_BATCH_ROWS)."""
        X = as_float_array(name, X, self.dtype, 2, max_rows=MAX_BATCH_ROWS if batch else None)
        if X.shape[1] != self.n_inputs:
            raise ValueError(f"{name} has {X.shape[1]} features, but the network takes "
                             f"{self.n_inputs}")
        if batch and X.shape[0] > self._engine.capacity:
            self._check_workspace(X.shape[0])
        return X

    def _check_loss(self, loss) -> Loss:
        """The Loss for loss; refuses a softmax/sigmoid output fed to a loss on logits."""
        loss = get_loss(loss)
        activation = self.layers[-1].activation
        if activation in ("softmax", "sigmoid") and getattr(loss, "from_logits", False) \
                and loss.output_activation == activation:
            raise ValueError(
                f"the last layer applies {activation}, but {loss!r} expects logits and would "
                f"apply it again; use {type(loss).__name__}(from_logits=False)")
        return loss

    def _get_optimizer(self, optimizer) -> Optimizer:
        """The Optimizer for optimizer; a name gives the one this network keeps for it.

        An optimizer given by name ("adam") is made once per network and class, with
        its default hyperparameters, and kept: later fit, partial_fit and train_step
        calls that name it continue its state and step count, as passing the same
        instance does. Losses have no state to keep.
        """
        if not isinstance(optimizer, str):
            return get_optimizer(optimizer)
        made = get_optimizer(optimizer)
        named = self.__dict__.setdefault("_named_optimizers", {})
        # keyed by class: every spelling of a name continues the same optimizer
        return named.setdefault(type(made), made)

    def _prepare_batch(self, X, y, loss) -> tuple[
            NDArray[np.floating], NDArray[np.floating] | None, NDArray[np.intp] | None]:
        X = self._check_input(X)
        target, labels = loss.prepare_target(y, X.shape[0], self.n_outputs, self.dtype)
        self._check_custom_loss(loss, X, target)
        return X, target, labels

    def _check_custom_loss(self, loss, X, target):
        """A custom loss's gradient check on its first use (Loss.check_gradient), on
        this network's output for the first rows of X."""
        if loss.is_custom and loss.check_gradient and \
                not loss.__dict__.get("_gradient_checked"):
            loss._check_gradient_on(self.predict(X[:16]), target[:16])

    # ------------------------------------------------------------------ step by step
    def forward(self, X: ArrayLike, training: bool = True) -> NDArray[np.floating]:
        """The network's output for X (n, n_inputs); keeps what ``backward`` needs.

        ``training=True`` (the default) is training mode: Dropout draws its masks,
        BatchNorm1d normalises by the batch's statistics and updates its running ones
        (a batch of one row is a ValueError). ``training=False`` is inference mode,
        as in ``predict``. Returns a new array of shape (n, n_outputs) that the
        caller owns.
        """
        training = check_bool("training", training)
        return self._engine.forward(self._check_input(X), training)

    def backward(self, grad_output: ArrayLike) -> NDArray[np.floating]:
        """Back-propagate dL/d(output) of the last ``forward``.

        Overwrites ``gradients`` (it does not accumulate) and returns dL/dX.
        """
        self._engine.check_owner()  # another thread's fit: its error, not the one below
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
    def _step_options(self, l2, clip_norm, clip_value):
        """(l2, clip_value, clip_norm) as the engine takes them (0 = off)."""
        l2 = check_real("l2", l2, minimum=0)
        clip_norm = 0.0 if clip_norm is None else check_real(
            "clip_norm", clip_norm, minimum=0, min_inclusive=False)
        clip_value = 0.0 if clip_value is None else check_real(
            "clip_value", clip_value, minimum=0, min_inclusive=False)
        return l2, clip_value, clip_norm

    def compute_gradients(self, X: ArrayLike, y: ArrayLike, loss: Loss | str, *,
                          sample_weight: ArrayLike | None = None, l2: float = 0.0,
                          comm: Any = None) -> float:
        """Forward, loss and backward in one compiled call; fills ``gradients``; the loss.

        ``sample_weight`` (n,) weights the mean loss; ``l2`` adds
        ``l2 / 2 * sum(W**2)`` over the weights (Dense and normalisation layers'
        ``weight``, not biases) to the loss and ``l2 * W`` to their gradients. With
        ``comm`` (an mpi4py communicator), each rank passes its shard of the batch and
        every rank gets the gradient and loss of the whole batch (one in-place
        all-reduce; see :mod:`bpfast.distributed`).
        """
        if comm is not None:
            return distributed.step(self, comm, X, y, loss, None, sample_weight, l2, None,
                                    None)
        loss = self._check_loss(loss)
        X, target, labels = self._prepare_batch(X, y, loss)
        weights = check_sample_weight(sample_weight, X.shape[0])
        l2, _, _ = self._step_options(l2, None, None)
        return self._engine.train_step(X, target, labels, weights, loss._config, None, l2)

    def train_step(self, X: ArrayLike, y: ArrayLike, loss: Loss | str,
                   optimizer: Optimizer | str, *, sample_weight: ArrayLike | None = None,
                   l2: float = 0.0, clip_norm: float | None = None,
                   clip_value: float | None = None, comm: Any = None) -> float:
        """One training step (forward, loss, backward, update) in one compiled call.

        Returns the loss of the forward pass, before the update. ``sample_weight``,
        ``l2``, ``clip_norm`` and ``clip_value`` are as in :meth:`fit`. If the loss
        is NaN or infinite the update is skipped and :class:`DivergenceError` is
        raised, with the parameters unchanged. With ``comm`` (an mpi4py
        communicator), each rank passes its shard of the batch: the step is that of
        the whole batch on every rank (see :mod:`bpfast.distributed`).
        """
        if comm is not None:
            return distributed.step(self, comm, X, y, loss, optimizer, sample_weight, l2,
                                    clip_norm, clip_value)
        loss = self._check_loss(loss)
        X, target, labels = self._prepare_batch(X, y, loss)
        optimizer = self._get_optimizer(optimizer)
        if optimizer._config.owner is not self._engine:
            optimizer._bind_check(self)  # its first step: hyperparameters in our dtype
        # the plain step (no weights, no l2, no clipping) skips those checks: this
        # wrapper is a measurable part of a small network's step
        if sample_weight is None and clip_norm is None and clip_value is None \
                and type(l2) is float and l2 == 0.0:
            value = self._engine.train_step(X, target, labels, None, loss._config,
                                            optimizer._config)
        else:
            weights = check_sample_weight(sample_weight, X.shape[0])
            value = self._engine.train_step(X, target, labels, weights, loss._config,
                                            optimizer._config,
                                            *self._step_options(l2, clip_norm, clip_value))
        if value - value != 0:  # NaN or infinite, without a call in the common case
            finite_or_raise(value, "training step")
        return value

    def _data(self, X, y, loss, sample_weight=None, class_weight=None, name="X"):
        X = self._check_input(X, name, batch=False)  # fit checks its batch size
        dense, labels = loss.prepare_target(y, X.shape[0], self.n_outputs, self.dtype)
        weights = combined_weights(loss, dense, labels, sample_weight, class_weight,
                                   X.shape[0], self.n_outputs)
        return Data(X, dense, labels, weights, y)

    def fit(self, X: ArrayLike, y: ArrayLike, *, loss: Loss | str, optimizer: Optimizer | str,
            epochs: int = 1, batch_size: int | None = 32, shuffle: bool = True,
            sample_weight: ArrayLike | None = None,
            class_weight: dict[int, float] | Literal["balanced"] | None = None,
            l2: float = 0.0, clip_norm: float | None = None, clip_value: float | None = None,
            validation_data: tuple[ArrayLike, ...] | None = None,
            validation_split: float | None = None,
            metrics: Sequence[str | Callable[[Any, Any], float]] | None = None,
            schedule: Schedule | Callable[[int], float] | None = None,
            callbacks: Sequence[Callback] | None = None,
            early_stopping: bool | EarlyStopping = False, tol: float | None = None,
            patience: int = 10, verbose: int = 0,
            on_divergence: Literal["raise", "warn"] = "raise", comm: Any = None) -> History:
        """Train by gradient descent; returns a :class:`History` of per-epoch records.

        Each epoch runs in compiled code (one call, or one per chunk of batches
        when a callback wants batches). Every argument is checked before
        anything changes. Calling ``fit`` again continues from the current
        parameters and optimizer state, and the epoch count continues.

        Parameters
        ----------
        X : array (n_samples, n_inputs)
        y : targets for ``loss`` (class labels (n,) or an (n, n_outputs) array)
        loss : Loss or str
            A name in any case ("mse", "CrossEntropy", "categorical_crossentropy",
            ...), a built-in Loss, or a custom one written in NumPy (a Loss subclass
            or ``bpfast.CustomLoss``; see docs/extending.rst).
        optimizer : Optimizer or str
            A name ("adam") gives an optimizer with its default hyperparameters that
            this network keeps: fit, partial_fit and train_step calls with that name
            continue its state, so two ``fit(..., optimizer="adam", epochs=1)`` are
            one 2-epoch fit. It is not saved (``bpfast.save(optimizer=...)`` needs an
            instance) nor copied with the network.
        epochs : int
        batch_size : int or None
            Samples per step: 32 by default (Keras' default); k: mini-batches of k
            (the last one partial); 1: stochastic; None: batch gradient descent
            (all samples per step).
        shuffle : bool
            Visit the samples in a new random order each epoch (from the network's seed).
        sample_weight : array (n_samples,), optional
            Non-negative weights; each batch's loss is ``sum(w * loss) / sum(w)``.
        class_weight : dict or "balanced", optional
            A weight per class index (multiplies sample_weight); "balanced" gives
            ``n_samples / (n_classes * count)``. Classification losses only.
        l2 : float
            Adds ``l2 / 2 * sum(W**2)`` over all weights (Dense and normalisation
            layers' ``weight``; not biases) to the loss,
            unlike the optimizers' PyTorch-style ``weight_decay``.
        clip_norm, clip_value : float, optional
            Clip each gradient element to [-clip_value, clip_value], then scale the
            whole gradient to a global L2 norm of at most clip_norm (PyTorch's
            ``clip_grad_value_`` and ``clip_grad_norm_``), inside the compiled step.
        validation_data : (X_val, y_val) or (X_val, y_val, sample_weight_val), optional
        validation_split : float in (0, 1), optional
            Hold out this fraction of the samples (stratified by class for
            classification losses, drawn from the network's RNG) for validation.
        metrics : list of metric names or callables ``f(y_true, y_pred) -> float``
            "accuracy", "mae", "mse", "rmse", "r2", "log_loss", "top_k_accuracy"
            (k=5; "top_3_accuracy" for k=3), "precision", "recall", "f1" (binary
            for two classes, else macro; "f1_macro", "f1_binary" to choose), "auc";
            each gives scikit-learn's value (see :mod:`bpfast.metrics`).
            Recorded per epoch on the training data (after the epoch, one extra
            forward pass) and, with validation, as "val_<name>". A callable gets y
            as given and the network's output (``predict``: logits or
            probabilities, not labels), and is named by its ``__name__``.
        schedule : bpfast.schedules.Schedule or callable ``epoch -> lr``, optional
        callbacks : list of bpfast.callbacks.Callback, optional
        early_stopping : bool or EarlyStopping
            True: stop when "val_loss" (or "loss" without validation) has not
            improved by more than ``tol`` for more than ``patience`` epochs (counted
            as PyTorch and scikit-learn count), and restore the best weights.
        tol : float, optional
            Without early stopping: stop when the training loss has not decreased
            by more than ``tol`` for more than ``patience`` epochs (convergence).
        patience : int
        verbose : {0, 1, 2}
            0 silent; 1 a progress bar per epoch (tqdm if installed); 2 one line per epoch.
        on_divergence : {"raise", "warn"}
            When the loss becomes NaN or infinite, or an epoch's updates leave
            non-finite parameters (checked at the end of every epoch, so also after
            the last update): raise :class:`DivergenceError`, or warn and stop.
            Either way the network keeps finite parameters (from before the update,
            or the epoch's start); the history so far is in ``self.history``.
        comm : mpi4py communicator, optional
            Data-parallel training: each rank passes its own shard of the data
            (``batch_size`` is per rank); rank 0's parameters and optimizer state
            are broadcast first, every step all-reduces the gradient, and every rank
            ends with the same parameters and History. See :mod:`bpfast.distributed`.

        Returns
        -------
        History
            ``history.history["loss"]`` is the mean over the epoch's batches of each
            batch's loss before its update (with the l2 term), weighted by batch
            weight (for a loss with ``reduction="sum"``: the sum of the batch losses);
            "val_loss" (data loss only) and metrics when asked for; "lr".

        Notes
        -----
        Ctrl-C stops at the next batch boundary: every finished update is kept,
        ``self.history`` holds the finished epochs (one whose last batch was running
        counts, with NaN for the metrics it did not compute), and KeyboardInterrupt
        is raised.

        Optimizer hyperparameters must be representable in the network's dtype
        (``SGD(lr=1e39)`` is refused for float32); a network, optimizer state or
        batch that cannot fit in the available memory is a MemoryError, before
        anything is allocated.
        """
        # held from the checks to the end, so that a fit refused because another
        # thread is training this network changes nothing (not even the RNG)
        with self._fitting():
            trainer = self._checked_trainer(X, y, FitConfig(
                loss=loss, optimizer=optimizer, epochs=epochs, batch_size=batch_size,
                shuffle=shuffle, sample_weight=sample_weight, class_weight=class_weight,
                l2=l2, clip_norm=clip_norm, clip_value=clip_value,
                validation_data=validation_data, validation_split=validation_split,
                metrics=metrics, schedule=schedule, callbacks=callbacks,
                early_stopping=early_stopping, tol=tol, patience=patience, verbose=verbose,
                on_divergence=on_divergence, comm=comm))
            return trainer.run(trainer.epochs)

    @contextlib.contextmanager
    def _fitting(self):
        """Own this network for a fit (re-entrant), or raise RuntimeError at once.

        While it is owned, other threads' train_step, compute_gradients, forward,
        backward, parameter assignment, optimizer steps, fit and save get
        RuntimeError (their predict still runs, between batches): the fit is never
        the one interrupted.
        """
        self._engine.claim()
        try:
            yield
        finally:
            self._engine.unclaim()

    def partial_fit(self, X: ArrayLike, y: ArrayLike, *, loss: Loss | str,
                    optimizer: Optimizer | str, batch_size: int | None = 32,
                    shuffle: bool = True, sample_weight: ArrayLike | None = None,
                    class_weight: dict[int, float] | Literal["balanced"] | None = None,
                    l2: float = 0.0, clip_norm: float | None = None,
                    clip_value: float | None = None) -> float:
        """One pass over (X, y), keeping the optimizer's state; the epoch's mean loss.

        The same as ``fit(..., epochs=1)`` without validation or callbacks.
        """
        with self._fitting():
            trainer = self._checked_trainer(X, y, FitConfig(
                loss=loss, optimizer=optimizer, epochs=1, batch_size=batch_size,
                shuffle=shuffle, sample_weight=sample_weight, class_weight=class_weight,
                l2=l2, clip_norm=clip_norm, clip_value=clip_value))
            history = trainer.run(trainer.epochs)
        return float(history.history["loss"][-1])

    def trainer(self, X: ArrayLike, y: ArrayLike, **options: Any) -> Trainer:
        """Check the data and every option of ``fit`` once: a Trainer to run epochs with.

        For code that trains epoch by epoch (the command line, bpfast.sklearn) and
        would otherwise re-check all the data in every ``fit(epochs=1)``.

        Parameters
        ----------
        X, y : the training data, as ``fit`` takes them
        **options
            The keyword arguments of :meth:`fit` (``loss`` and ``optimizer`` required).

        Returns
        -------
        Trainer
            ``trainer.run(k)`` trains k more epochs and may be called again (the epoch
            count and the History continue); it returns the History. Building it changes
            nothing (a refused one raises ValueError or TypeError, as fit does).
        """
        return self._checked_trainer(X, y, FitConfig(**options))

    def _checked_trainer(self, X, y, config):
        """Check config against this network and the data, split the data: a Trainer."""
        if config.comm is not None:  # an error on one rank must not leave others waiting
            with distributed.aborting_on_error(distributed.check_comm(config.comm)):
                return self._checked_trainer_for(X, y, config)
        return self._checked_trainer_for(X, y, config)

    def _checked_trainer_for(self, X, y, config):
        loss = self._check_loss(config.loss)
        optimizer = self._get_optimizer(config.optimizer)
        config = dataclasses.replace(
            config, loss=loss, optimizer=optimizer,
            epochs=check_int("epochs", config.epochs, minimum=0),
            batch_size=check_int("batch_size", config.batch_size, minimum=1, allow_none=True),
            shuffle=check_bool("shuffle", config.shuffle),
            patience=check_int("patience", config.patience, minimum=0))
        batch_size = config.batch_size
        options = self._step_options(config.l2, config.clip_norm, config.clip_value)
        if isinstance(X, np.ndarray) and X.ndim:  # before X and y are copied
            self._check_fit_batch(X.shape[0], batch_size)
        data = self._data(X, y, loss, config.sample_weight, config.class_weight)
        metrics = resolve_metrics(config.metrics, loss, self.n_outputs)
        validation_data, validation_split = config.validation_data, config.validation_split
        validation = None
        if validation_data is not None:
            if not isinstance(validation_data, (tuple, list)) or \
                    len(validation_data) not in (2, 3):
                raise TypeError("validation_data must be (X_val, y_val) or "
                                "(X_val, y_val, sample_weight_val)")
            try:
                validation = self._data(*validation_data[:2], loss, *validation_data[2:],
                                        name="X_val")
            except (TypeError, ValueError) as error:
                raise type(error)(f"validation_data: {error}") from None
        optimizer._bind_check(self)
        self._check_fit_batch(data.n_samples, batch_size)
        self._check_custom_loss(loss, data.X, data.dense)
        rng_state = self._rng.bit_generator.state
        try:
            if validation_split is not None:
                if validation is not None:
                    raise ValueError("give validation_data or validation_split, not both")
                classes = loss.class_indices(data.dense, data.labels)
                # with comm, each rank splits its shard with its own stream
                rng = self._rng if config.comm is None else \
                    distributed.shard_rng(self, config.comm)
                train_rows, validation_rows = split_validation(
                    data.n_samples, validation_split, classes, rng)
                data, validation = data.take(train_rows), data.take(validation_rows)
            self._check_batch_norm_batches(data.n_samples, batch_size)
            trainer_class = Trainer if config.comm is None else distributed.DistributedTrainer
            trainer = trainer_class(self, data, validation, config, options=options,
                                    metrics=metrics)
        except BaseException:
            self._rng.bit_generator.state = rng_state  # a refused call changes nothing
            raise
        return trainer

    def predict(self, X: ArrayLike) -> NDArray[np.floating]:
        """Inference without caches, in chunks for large X; a new (n, n_outputs) array."""
        X = self._check_input(X, batch=False)  # in chunks: any number of rows
        widest = max(max(layer.in_features, layer.out_features) for layer in self.layers)
        if X.shape[0] * self.n_outputs > _PREDICT_CHUNK_ELEMENTS:
            check_memory(f"the predictions for {X.shape[0]} rows",
                         X.shape[0] * self.n_outputs * self.dtype.itemsize)
        chunk_rows = max(1, _PREDICT_CHUNK_ELEMENTS // widest)
        if any(isinstance(layer, BatchNorm1d) and not layer.track_running_stats
               for layer in self.layers):
            chunk_rows = max(1, X.shape[0])  # batch statistics: of all rows at once
        return self._engine.predict(X, chunk_rows)

    def __call__(self, X: ArrayLike) -> NDArray[np.floating]:
        """``net(X)`` is ``net.predict(X)`` (inference mode; keeps nothing for backward)."""
        return self.predict(X)

    def predict_proba(self, X: ArrayLike) -> NDArray[np.floating]:
        """Class probabilities (n, n_outputs): what a classifier's output means.

        A softmax or sigmoid last layer already gives probabilities: they are
        returned as they are. A last layer without activation gives logits: softmax
        over the outputs when there are several (CrossEntropy), the sigmoid of each
        when there is one (BinaryCrossEntropy: P(class 1), shape (n, 1), as Keras
        gives it). Several independent sigmoid outputs (multi-label) need a sigmoid
        last layer. Any other last activation (relu, tanh, ...) is a regression
        output, and a ValueError.
        """
        activation = self.layers[-1].activation
        if activation not in ("softmax", "sigmoid", "identity"):
            raise ValueError(f"predict_proba needs a classifier: a last layer with softmax, "
                             f"sigmoid or no activation (logits); this network's applies "
                             f"{activation!r}, a regression output; use predict")
        output = self.predict(X)
        if activation != "identity":
            return output
        if output.shape[1] == 1:
            # sigmoid, written so that large logits neither overflow nor warn
            np.tanh(0.5 * output, out=output)
            output += 1
            output *= 0.5
            return output
        output -= output.max(axis=1, keepdims=True)
        np.exp(output, out=output)
        output /= output.sum(axis=1, keepdims=True)
        return output

    def evaluate(self, X: ArrayLike, y: ArrayLike, *, loss: Loss | str | None = None,
                 metrics: Sequence[str | Callable[[Any, Any], float]] | None = None,
                 sample_weight: ArrayLike | None = None) -> dict[str, float]:
        """The loss and metrics of the network on (X, y), in inference mode.

        Parameters
        ----------
        X, y : data and targets, as ``fit`` takes them
        loss : Loss or str, optional
            Gives "loss": the data loss (without ``fit``'s l2 term), weighted by
            ``sample_weight``, as fit's "val_loss". Needed for the classification
            metrics to know what the outputs are (logits or probabilities); without
            it the outputs are compared with y as a regression (MSE).
        metrics : list of names or callables, optional
            As ``fit``'s ``metrics`` (see :mod:`bpfast.metrics`); unweighted.
        sample_weight : array (n_samples,), optional

        Returns
        -------
        dict
            {"loss": ..., <metric name>: ...} as Python floats, in that order.
        """
        resolved_loss = self._check_loss(get_loss("mse") if loss is None else loss)
        try:
            resolved = resolve_metrics(metrics, resolved_loss, self.n_outputs)
        except ValueError as error:
            if loss is None and "classification loss" in str(error):
                raise ValueError(f"{error}: pass loss= (e.g. 'cross_entropy') so that "
                                 f"evaluate knows what the outputs are") from None
            raise
        if loss is None and not resolved:
            raise ValueError("evaluate needs a loss or some metrics")
        data = self._data(X, y, resolved_loss, sample_weight)
        output = self.predict(data.X)  # in chunks, without caches
        results = {}
        if loss is not None:
            results["loss"] = resolved_loss._config.evaluate(
                output, data.dense, data.labels, None, data.weights)
        for name, metric in resolved:
            results[name] = metric(output, data)
        return results

    # ---------------------------------------------------------------- state protocol
    # Saving (bpfast.io) and pickling describe a network the same way: _get_state takes
    # one snapshot, _from_state rebuilds from it through the public constructor.
    def _get_state(self, optimizer=None):
        """This network (and optimizer's hyperparameters and state) as plain values.

        One consistent snapshot under the engine's lock: a step running in another
        thread is waited for, never half-read; RuntimeError while another thread's fit
        owns the network. Returns a dict: "layers" (a dict of constructor values per
        layer, ``describe()``), "dtype", "seed", "rng_state", "epochs_trained",
        "stream" ([key, training passes so far] of Dropout's stream) and "optimizer"
        (optimizer._get_state's record, or None), all JSON-able; "parameters",
        "buffers" and "optimizer_state" (None before the optimizer's first step), new
        arrays.
        """
        record = None if optimizer is None else optimizer._get_state(self)
        parameters, state, step_count, extra = self._engine.snapshot(
            None if optimizer is None else optimizer._config,
            lambda: (self._rng_state(), getattr(self, "epochs_trained", None),
                     self._buffers.copy(), list(self._engine.stream)))
        rng_state, epochs_trained, buffers, stream = extra
        if record is not None:  # the step count and state of the snapshot
            record = {**record, "step_count": int(step_count), "has_state": state is not None}
        layers = [layer.describe() for layer in self.layers]
        return {"layers": layers, "dtype": self.dtype.name, "seed": self.seed,
                "rng_state": rng_state, "epochs_trained": epochs_trained, "stream": stream,
                "optimizer": record, "parameters": parameters, "buffers": buffers,
                "optimizer_state": state}

    @classmethod
    def _from_state(cls, state):
        """The network that ``state`` (from _get_state) describes; TypeError or
        ValueError for a description the constructor refuses."""
        layers = [from_description(spec) for spec in state["layers"]]
        network = cls(layers, dtype=state["dtype"], seed=state["seed"])
        network.parameters = state["parameters"]
        if state.get("buffers") is not None and len(state["buffers"]):
            network.buffers = state["buffers"]
        if state.get("stream") is not None:
            key, counter = state["stream"]
            network._engine.stream = (key, counter)
        network._restore_rng(state.get("rng_state"))
        if state.get("epochs_trained") is not None:
            try:
                network.epochs_trained = state["epochs_trained"]
            except AttributeError:
                pass  # a Network that computes the count itself
        return network

    def _rng_state(self):
        rng = getattr(self, "_rng", None)
        return rng.bit_generator.state if isinstance(rng, np.random.Generator) else None

    def _restore_rng(self, state):
        rng = getattr(self, "_rng", None)
        if not isinstance(state, dict) or not isinstance(rng, np.random.Generator):
            return
        if state.get("bit_generator") == type(rng.bit_generator).__name__:
            rng.bit_generator.state = state  # bpfast.io checks a file's state first

    def __reduce__(self):
        # pickle and copy.deepcopy: the state protocol, rebuilt through the public
        # constructor (the compiled engine holds raw pointers, no state of its own worth
        # keeping). Optimizers are not included: save() keeps those.
        return (Network._from_state, (self._get_state(),))

    def __repr__(self):
        body = ",\n  ".join(repr(layer) for layer in self.layers)
        return f"Network([\n  {body}\n], dtype={self.dtype.name!r})"

    def summary(self, file: Any = None) -> None:
        """Print the layers, their output shapes and parameter counts, as Keras does.

        Parameters
        ----------
        file : a writable text file, optional
            Where to print (default ``sys.stdout``); ``io.StringIO()`` keeps the text.
        """
        rows = [("Layer (type)", "Output Shape", "Activation", "Param #")]
        for index, layer in enumerate(self.layers):
            name = type(layer).__name__
            rows.append((f"{layer.kind}_{index} ({name})", f"(None, {layer.out_features})",
                         str(layer.activation), f"{layer.n_parameters:,}"))
        widths = [max(len(row[column]) for row in rows) + 3 for column in range(4)]
        rule = "=" * sum(widths)

        def line(row):
            return "".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip()

        n_bytes = self.n_parameters * self.dtype.itemsize
        text = [f'Network ({self.n_inputs} inputs, {self.dtype.name})', rule, line(rows[0]),
                rule, *(line(row) for row in rows[1:]), rule,
                f"Total params: {self.n_parameters:,} ({format_bytes(n_bytes)})",
                f"Trainable params: {self.n_parameters:,}",
                f"Non-trainable params: {self._buffers.shape[0]:,}"]
        print("\n".join(text), file=sys.stdout if file is None else file)

    def save(self, path: str | PathLike[str], *, optimizer: Optimizer | None = None,
             metadata: dict[str, Any] | None = None) -> None:
        """Write this network (and optionally its optimizer) to an .npz file; see bpfast.save."""
        from .io import save
        save(self, path, optimizer=optimizer, metadata=metadata)

    # ------------------------------------------------------------------ interchange
    # thin wrappers: the conversions live in bpfast.export, which imports onnx/torch lazily
    def to_onnx(self, path: str | PathLike[str] | None = None, *,
                opset: int | None = None) -> Any:
        """This network as an ONNX model (``onnx.ModelProto``), written to path if given.

        Input "input" and output "output" of shape (batch, features) in the network's
        dtype, with a dynamic batch axis; checked with ``onnx.checker`` (full check).
        ``opset`` defaults to the lowest that expresses every layer exactly (13; 17
        with a float32 LayerNorm, for LayerNormalization; GELU uses the ``Gelu``
        operator from opset 20, ``Erf`` below). Dropout has no node (the identity at
        inference); BatchNorm1d is a BatchNormalization with the running statistics,
        not folded.
        ONNX Runtime runs every float32 graph and every float64 one but GELU (it has
        no float64 Erf/Gelu kernel). Needs ``onnx`` (``pip install 'bpfast[onnx]'``).
        See :mod:`bpfast.export`.
        """
        from .export import network_to_onnx
        return network_to_onnx(self, path, opset=opset)

    @classmethod
    def from_onnx(cls, model: Any, *, output: str | None = None) -> "Network":
        """A Network from an MLP-shaped ONNX graph (a path, bytes or an ``onnx.ModelProto``).

        Gemm (or MatMul + Add) layers and activations (Sigmoid, Tanh, Relu,
        LeakyRelu, Elu, Softplus, Gelu or its Erf form, Softmax on the last axis),
        Dropout, BatchNormalization and LayerNormalization nodes, and the float64
        forms ``to_onnx`` writes; an activation right after a Gemm is that Dense's,
        any other an Activation layer. Identity and Flatten(axis=1) are skipped. ``output`` names
        the graph output to follow when there are several (e.g. "probabilities");
        nodes that it does not depend on are ignored. Anything else is a ValueError
        naming the node.
        """
        from .export import network_from_onnx
        return network_from_onnx(model, output=output)

    def state_dict(self) -> dict[str, NDArray[np.floating]]:
        """Copies of the parameters under the keys of ``to_torch()``'s nn.Sequential.

        Each Dense is a ``Linear`` at the next index, followed by its activation
        module at the index after it unless the activation is the identity; every
        other layer is one module: ``{"0.weight": (out, in), "0.bias": (out,),
        "2.weight": ...}``, BatchNorm1d's ``running_mean``, ``running_var`` and
        ``num_batches_tracked`` (int64) included.
        """
        from .export import state_dict
        return state_dict(self)

    def load_state_dict(self, state_dict: Any) -> None:
        """Set the parameters from a ``state_dict`` (NumPy arrays or torch tensors).

        Keys and shapes must be exactly this network's; floating values are cast to
        the network's dtype (as torch's ``load_state_dict`` copies them). Everything
        is checked before anything changes: on error the network is as it was.
        """
        from .export import load_state_dict
        load_state_dict(self, state_dict)

    def to_torch(self) -> Any:
        """The equivalent ``torch.nn.Sequential`` (same parameters, same dtype, copies)."""
        from .export import network_to_torch
        return network_to_torch(self)

    @classmethod
    def from_torch(cls, module: Any) -> "Network":
        """A Network from a ``torch.nn.Sequential`` of Linear, Dropout, BatchNorm1d,
        LayerNorm and bpfast's activations.

        Activations: Sigmoid, Tanh, ReLU, LeakyReLU, ELU, Softplus(beta=1,
        threshold=20), GELU(approximate='none'), Softmax(dim=-1); one right after a
        Linear is that Dense's, any other an Activation layer. Identity and Flatten
        are skipped; anything else is a ValueError naming the module. Parameters are copied; the
        dtype is the module's (float32 or float64).
        """
        from .export import network_from_torch
        return network_from_torch(module)


def _layer_widths(layers):
    """(in_features, out_features) of each layer, checked: a layer may join one network
    only; widths must chain (a Dropout takes the width around it); softmax only last.
    Nothing is changed: ValueError naming the layer."""
    for index, layer in enumerate(layers):
        if layer._network is not None or layers.index(layer) != index:
            raise ValueError(f"layer {index} ({layer!r}) already belongs to a Network; "
                             "create a new layer for each network")
    if not any(isinstance(layer, Dense) for layer in layers):
        raise ValueError("a network needs at least one Dense layer")
    widths: list[int | None] = [None if isinstance(layer, WIDTH_FROM_NETWORK)
                                else layer.in_features for layer in layers]
    # a Dropout passes its input width on: take it from the layer before, or, first in
    # the network, from the first layer after it with a width of its own
    known = next(width for width in widths if width is not None)
    for index, layer in enumerate(layers):
        if widths[index] is None:
            widths[index] = known
        else:
            known = layer.out_features
    result = []
    for index, layer in enumerate(layers):
        n_in = widths[index]
        n_out = n_in if isinstance(layer, WIDTH_FROM_NETWORK) else layer.out_features
        if index and n_in != result[-1][1]:
            previous = layers[index - 1]
            what = ("num_features" if isinstance(layer, BatchNorm1d) else "normalized_shape"
                    if isinstance(layer, LayerNorm) else "in_features")
            raise ValueError(f"layer {index} takes {n_in} inputs but layer {index - 1} gives "
                             f"{result[-1][1]} outputs ({layer!r}'s {what} must be the "
                             f"output width of {previous!r})")
        if layer.activation == "softmax" and index != len(layers) - 1:
            raise ValueError(f"softmax is only allowed on the last layer (layer {index} "
                             "is hidden)")
        result.append((n_in, n_out))
    return result


def _rebuild_network(layers, dtype, seed, parameters, rng_state, epochs_trained):
    """What pickles made before the state protocol call to rebuild a Network."""
    network = Network([Dense(**arguments) for arguments in layers], dtype=dtype, seed=seed)
    network.parameters = parameters
    network._rng.bit_generator.state = rng_state
    network.epochs_trained = epochs_trained
    return network
