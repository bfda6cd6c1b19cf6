"""Data-parallel training over several processes: the ``comm=`` side of training.

``Network.train_step``, ``compute_gradients``, ``fit`` and ``trainer`` take
``comm=``, an mpi4py communicator (or anything with its buffer ``Allreduce`` and
``Bcast``, ``allreduce``, ``Get_rank``, ``Get_size`` and ``Abort``); each process
(rank) passes its own shard of the data. This module never imports mpi4py: the
caller's communicator brings it.

A step with ``comm``
    Each rank runs forward and backward on its batch (one compiled call), then
    all-reduces (batch weight, weight * loss) over the ranks, scales its gradient
    by its share of the total weight (its rows, or the sum of its sample weights),
    and all-reduces the flat gradient buffer in place: one ``Allreduce`` of
    ``n_parameters`` values. Every rank then holds the gradient of the mean loss
    over the union of the ranks' batches, and applies the L2 term, clipping and
    the optimizer update to it (one compiled call), so that parameters stay
    identical everywhere, as Horovod and PyTorch's DistributedDataParallel do.

``fit`` with ``comm``
    * Rank 0's parameters, buffers, optimizer state, step count, learning rate and
      random generator are broadcast first (every ``Trainer.run``).
    * Steps per epoch: every rank runs ceil(n_max / batch_size) steps, n_max being
      the largest shard: smaller shards wrap around (their shuffled order is
      repeated to n_max rows), as PyTorch's ``DistributedSampler`` pads. With equal
      shards that is exactly one pass; ``batch_size=None`` is one step over every
      rank's whole shard (no wrap-around).
    * Shuffling: each epoch draws one seed from the network's generator (the same
      on every rank, since it was broadcast) and shuffles each shard with
      ``default_rng([seed, rank])``: different per rank, reproducible from the seed.
    * The epoch loss is the weighted mean of the steps' global losses; the
      validation loss and the metrics are reduced as (value * count, count) over
      the ranks in one ``Allreduce``. That is exact for losses and for the mean
      metrics (accuracy, mae, mse, log_loss, top-k); for r2, rmse, precision,
      recall, f1 and auc it is the count-weighted mean of the per-shard values.
      Every rank's History is the same.
    * Early stopping, ``ReduceLROnPlateau`` and divergence decide on those same
      values; a stop wanted by any rank stops every rank, and rank 0's learning
      rate is broadcast after each epoch's callbacks.
    * Callbacks that write (``ModelCheckpoint``, ``CSVLogger``, the progress bar
      of ``verbose``, and any callback with ``rank_zero_only = True``) run on
      rank 0 only.
    * Running statistics of normalisation layers (``net.buffers``, where a
      network has them) are averaged over the ranks at the end of each epoch
      (DistributedDataParallel instead broadcasts rank 0's at every forward; the
      average uses every rank's data).

Faults
    An exception on one rank inside these calls is printed (with its rank) and
    ends the whole job with ``comm.Abort(1)``: the other ranks are waiting in a
    collective and would otherwise hang. ``DivergenceError`` is the exception:
    every rank raises it together (it is computed from the same all-reduced
    values). For exceptions in your own code, run ``mpiexec -n 4 python -m
    mpi4py script.py``, which aborts on any uncaught exception.
"""
import contextlib
import math
import sys
import traceback

import numpy as np

from ._training import DivergenceError, Trainer
from .callbacks import Callback, CSVLogger, ModelCheckpoint, ProgressBar

__all__ = ["check_comm", "aborting_on_error", "step", "shard_rng", "DistributedTrainer"]

_COMM_METHODS = ("Allreduce", "Bcast", "allreduce", "Get_rank", "Get_size", "Abort")
# fit's stop reasons, in the order in which one is chosen when ranks differ
_STOP_REASONS = ("diverged", "early_stopping", "converged", "callback")


def check_comm(comm):
    """comm, if it has what bpfast uses of an mpi4py communicator, else TypeError."""
    missing = [name for name in _COMM_METHODS if not callable(getattr(comm, name, None))]
    if missing:
        raise TypeError(f"comm must be an mpi4py communicator (such as MPI.COMM_WORLD) or "
                        f"have its methods; {comm!r} lacks {', '.join(missing)}")
    return comm


@contextlib.contextmanager
def aborting_on_error(comm):
    """Print an exception raised inside, with the rank, and end the job (comm.Abort).

    DivergenceError passes through: every rank raises it at the same step.
    """
    try:
        yield
    except DivergenceError:
        raise
    except BaseException as error:
        rank, size = comm.Get_rank(), comm.Get_size()
        text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
        sys.stdout.flush()
        sys.stderr.write(f"bpfast: rank {rank} of {size} failed; aborting every rank "
                         f"(comm.Abort):\n{text}")
        sys.stderr.flush()
        comm.Abort(1)
        raise  # only if Abort returned (a communicator that cannot abort)


def _in_place():
    """mpi4py's IN_PLACE when mpi4py is loaded (it is, if comm came from it), else None."""
    return getattr(sys.modules.get("mpi4py.MPI"), "IN_PLACE", None)


def allreduce_sum(comm, buffer):
    """buffer = the sum over ranks of buffer, in place (one Allreduce)."""
    in_place = _in_place()
    if in_place is not None:
        comm.Allreduce(in_place, buffer)
    else:  # a duck-typed communicator without mpi4py: out of place, through a copy
        comm.Allreduce(buffer.copy(), buffer)


def _totals(network):
    """A float64 (2,) scratch kept by the network for (weight, weight * loss)."""
    totals = network.__dict__.get("_comm_totals")
    if totals is None:
        totals = network.__dict__["_comm_totals"] = np.zeros(2)
    return totals


def reduced_step(network, comm, X, target, labels, weights, loss, optimizer, options):
    """One data-parallel step on checked arrays: (loss with the L2 term, global weight).

    The local forward/backward gives the gradient of this rank's mean loss; scaled
    by this rank's share of the total weight, the summed gradients are the gradient
    of the mean over every rank's batch. optimizer: an OptimizerConfig or None
    (compute_gradients). options: the engine's (l2, clip_value, clip_norm).
    """
    engine = network._engine
    local = engine.train_step(X, target, labels, weights, loss, None)
    weight = float(X.shape[0]) if weights is None else math.fsum(weights)
    # a summed loss (reduction="sum") over the union is the sum of the ranks' sums:
    # its gradients add up as they are; a mean needs each rank's share of the weight
    summed = loss.reduction == "sum"
    totals = _totals(network)
    totals[0] = weight
    # a NaN loss stays NaN: every rank sees the divergence
    totals[1] = local if summed else weight * local
    allreduce_sum(comm, totals)
    total_weight = float(totals[0])
    if not summed:
        engine.scale_gradients(weight / total_weight if total_weight > 0 else 0.0)
    allreduce_sum(comm, network.gradients)
    if summed:
        value = float(totals[1])
    else:
        value = float(totals[1]) / total_weight if total_weight > 0 else 0.0
    return engine.apply_gradients(value, optimizer, *options), total_weight


def step(network, comm, X, y, loss, optimizer, sample_weight, l2, clip_norm, clip_value):
    """Network.train_step (optimizer given) or compute_gradients (None) with comm."""
    from ._training import finite_or_raise
    from ._validation import check_sample_weight
    check_comm(comm)
    with aborting_on_error(comm):
        loss = network._check_loss(loss)
        X, target, labels = network._prepare_batch(X, y, loss)
        config = None
        if optimizer is not None:
            optimizer = network._get_optimizer(optimizer)
            optimizer._bind_check(network)
            config = optimizer._config
        weights = check_sample_weight(sample_weight, X.shape[0])
        options = network._step_options(l2, clip_norm, clip_value)
        value, _ = reduced_step(network, comm, X, target, labels, weights, loss._config,
                                config, options)
    if optimizer is not None:
        finite_or_raise(value, "training step")
    return value


def _broadcast_rng(comm, rng):
    """Make rng (a PCG64 Generator) rank 0's, on every rank (one Bcast)."""
    words = np.zeros(6, dtype=np.uint64)
    if comm.Get_rank() == 0:
        state = rng.bit_generator.state
        mask = (1 << 64) - 1
        inner = state["state"]
        words[:] = [inner["state"] >> 64, inner["state"] & mask, inner["inc"] >> 64,
                    inner["inc"] & mask, state["has_uint32"], state["uinteger"]]
    comm.Bcast(words, root=0)
    value = [int(word) for word in words]
    rng.bit_generator.state = {
        "bit_generator": "PCG64",
        "state": {"state": (value[0] << 64) | value[1], "inc": (value[2] << 64) | value[3]},
        "has_uint32": value[4], "uinteger": value[5]}


def shard_rng(network, comm):
    """The generator of this rank's validation split: rank 0's network generator is
    broadcast first (so every rank's draws agree), then one seed drawn from it is
    mixed with the rank."""
    _broadcast_rng(comm, network._rng)
    seed = int(network._rng.integers(2**63))
    return np.random.default_rng([seed, comm.Get_rank()])


def broadcast_state(network, optimizer, comm):
    """Rank 0's parameters, buffers, optimizer state, step count, learning rate, epoch
    count and random generator, on every rank."""
    parameters = network.parameters.copy()
    comm.Bcast(parameters, root=0)
    network.parameters = parameters
    buffers = getattr(network, "buffers", None)
    if buffers is not None and buffers.size:
        comm.Bcast(buffers, root=0)
    config = optimizer._config
    config.attach(network._engine)  # the state as the first step would allocate it
    if config.state is not None and config.state.size:
        comm.Bcast(config.state, root=0)
    initial_lr = optimizer.initial_lr
    numbers = np.array([config.step_count, optimizer.lr,
                        math.nan if initial_lr is None else initial_lr,
                        network.epochs_trained], dtype=np.float64)
    comm.Bcast(numbers, root=0)
    config.step_count = int(numbers[0])
    if float(numbers[1]) != optimizer.lr:
        optimizer.lr = float(numbers[1])
    optimizer.initial_lr = None if math.isnan(numbers[2]) else float(numbers[2])
    network.epochs_trained = int(numbers[3])
    _broadcast_rng(comm, network._rng)


def average_buffers(network, comm):
    """Running statistics (net.buffers, where present): the mean over the ranks."""
    buffers = getattr(network, "buffers", None)
    if buffers is not None and buffers.size:
        allreduce_sum(comm, buffers)
        buffers *= 1.0 / comm.Get_size()


class _CollectiveDecisions(Callback):
    """The last callback of a fit with comm: a stop wanted by any rank stops every rank
    (with one reason for all), and rank 0's learning rate becomes every rank's."""

    def __init__(self, comm):
        self.comm = comm
        self._votes = np.zeros(len(_STOP_REASONS) + 1)

    def on_epoch_end(self, epoch, logs):
        reason = self.network.stop_training
        self._votes[:] = 0
        if reason:
            code = _STOP_REASONS.index(reason) if reason in _STOP_REASONS else \
                len(_STOP_REASONS) - 1
            self._votes[code] = 1
        self._votes[-1] = self.optimizer.lr if self.comm.Get_rank() == 0 else 0.0
        allreduce_sum(self.comm, self._votes)
        wanted = np.flatnonzero(self._votes[:-1])
        self.network.stop_training = _STOP_REASONS[wanted[0]] if wanted.size else False
        if float(self._votes[-1]) != self.optimizer.lr:
            self.optimizer.lr = float(self._votes[-1])


class DistributedTrainer(Trainer):
    """A Trainer whose every step is one data-parallel step over comm (see the module).

    The epoch is a Python loop over batches around the compiled step: each step
    all-reduces the gradient, which costs more than the loop's few microseconds.
    """

    def __init__(self, network, data, validation, config, *, options, metrics):
        comm = self.comm = config.comm
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        counts = np.zeros(self.size)
        counts[self.rank] = data.n_samples
        allreduce_sum(comm, counts)
        self.shard_sizes = counts.astype(np.int64)
        self.n_max = int(counts.max())
        super().__init__(network, data, validation, config, options=options, metrics=metrics)
        self.whole_shard = config.batch_size is None
        self.batch_size = data.n_samples if self.whole_shard else \
            min(config.batch_size, self.n_max)
        rows = self.batch_size
        dtype = network.dtype
        # gathered batches, allocated once
        self._x = np.empty((rows, network.n_inputs), dtype=dtype)
        self._dense = None if data.dense is None else np.empty((rows, data.dense.shape[1]),
                                                               dtype=dtype)
        self._labels = None if data.labels is None else np.empty(rows, dtype=np.intp)
        self._weights = None if data.weights is None else np.empty(rows)
        # batch callbacks may stop an epoch: then every rank votes after each batch
        wants = np.array([float(any(c.wants_batches for c in self.callbacks))])
        allreduce_sum(comm, wants)
        self._batch_votes = bool(wants[0])
        self._vote = np.zeros(1)

    def _build_callbacks(self, callbacks, early_stopping, tol, patience, verbose, epochs):
        built = super()._build_callbacks(callbacks, early_stopping, tol, patience, verbose,
                                         epochs)
        if self.comm.Get_rank() != 0:
            built = [c for c in built
                     if not isinstance(c, (ModelCheckpoint, CSVLogger, ProgressBar))
                     and not getattr(c, "rank_zero_only", False)]
        return [*built, _CollectiveDecisions(self.comm)]

    def run(self, epochs):
        """Train for epochs more epochs on every rank; the (same) History on each."""
        with aborting_on_error(self.comm), self.network._fitting():
            broadcast_state(self.network, self.optimizer, self.comm)
            return self._run(epochs)

    def _order(self):
        """This epoch's rows of the shard: shuffled per rank, wrapped to n_max rows."""
        n_samples = self.data.n_samples
        if self.shuffle:
            seed = int(self.network._rng.integers(2**63))  # the same draw on every rank
            order = np.random.default_rng([seed, self.rank]).permutation(n_samples)
        else:
            order = np.arange(n_samples)
        if not self.whole_shard and n_samples < self.n_max:
            order = np.resize(order, self.n_max)
        return order.astype(np.intp)

    def _gather(self, rows):
        """The batch at rows, copied into the preallocated buffers."""
        data, n_rows = self.data, rows.shape[0]
        if self.whole_shard:
            return data.X, data.dense, data.labels, data.weights
        arrays = []
        for source, buffer in ((data.X, self._x), (data.dense, self._dense),
                               (data.labels, self._labels), (data.weights, self._weights)):
            if source is None:
                arrays.append(None)
            else:
                # mode 'clip' (the rows are in range): 'raise' would buffer out, allocating
                np.take(source, rows, axis=0, out=buffer[:n_rows], mode="clip")
                arrays.append(buffer[:n_rows])
        return arrays

    def _train_one_epoch(self, epoch):
        network, optimizer, comm = self.network, self.optimizer, self.comm
        order = self._order()
        n_rows_epoch = order.shape[0]
        batch_size = self.batch_size
        n_batches = 1 if self.whole_shard else -(-n_rows_epoch // batch_size)
        lrs = self._batch_lrs(n_batches)
        self._save_snapshot()
        batch_callbacks = [c for c in self.callbacks if c.wants_batches or c.wants_progress]
        loss_config, config = self.loss._config, optimizer._config
        summed = loss_config.reduction == "sum"
        epoch_lr = config.lr
        loss_sum = weight_sum = 0.0
        rows_done = 0
        try:
            for batch in range(n_batches):
                rows = order[batch * batch_size:(batch + 1) * batch_size]
                if lrs is not None:
                    config.lr = lrs[batch]
                value, batch_weight = reduced_step(
                    network, comm, *self._gather(rows), loss_config, config, self.options)
                if not math.isfinite(value):
                    self._diverged(f"the training loss became NaN or infinite at epoch "
                                   f"{epoch + 1}, batch {batch}",
                                   "the update was skipped and ")
                    if weight_sum == 0 and rows_done == 0:
                        return None
                    break
                loss_sum += value if summed else batch_weight * value
                weight_sum += batch_weight
                rows_done += rows.shape[0]
                self._epoch_totals[:] = (loss_sum, weight_sum, rows_done)
                if batch_callbacks:
                    mean = loss_sum / weight_sum if weight_sum else 0.0
                    logs = {"loss": loss_sum if summed else mean,
                            "samples": rows_done}
                    for callback in batch_callbacks:
                        callback.on_batch_end(batch, logs)
                if self._batch_votes:
                    self._vote[0] = 1.0 if network.stop_training else 0.0
                    allreduce_sum(comm, self._vote)
                    if self._vote[0]:
                        network.stop_training = network.stop_training or "callback"
                        break
        finally:
            config.lr = epoch_lr
        if not self._all_finite():
            self._diverged(f"the parameters became NaN or infinite in epoch {epoch + 1}")
            return None
        if lrs is not None:
            optimizer.lr = float(self.schedule(config.step_count, optimizer.initial_lr))
        average_buffers(network, comm)
        if summed:  # as fit without comm: the epoch's total
            return loss_sum
        return loss_sum / weight_sum if weight_sum else 0.0

    def _evaluate(self):
        """Metrics and validation loss of every rank's shard, reduced as (sum, count)."""
        network, loss = self.network, self.loss
        names, pairs = [], []
        if self.metrics:
            output = network.predict(self.data.X)
            count = float(self.data.n_samples)
            for name, metric in self.metrics:
                names.append(name)
                pairs.append((metric(output, self.data) * count if count else 0.0, count))
        validation = self.validation
        if validation is not None:
            output = network.predict(validation.X)
            weight = float(validation.n_samples) if validation.weights is None else \
                math.fsum(validation.weights)
            value = loss._config.evaluate(output, validation.dense, validation.labels, None,
                                          validation.weights)
            names.append("val_loss")
            pairs.append((value * weight if weight else 0.0, weight))
            count = float(validation.n_samples)
            for name, metric in self.metrics:
                names.append(f"val_{name}")
                pairs.append((metric(output, validation) * count if count else 0.0, count))
        if not names:
            return {}
        sums = np.array(pairs, dtype=np.float64).reshape(-1)
        allreduce_sum(self.comm, sums)
        sums = sums.reshape(-1, 2)
        return {name: float(total / count) if count else 0.0
                for name, (total, count) in zip(names, sums)}
