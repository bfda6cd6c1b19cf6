# The Python-facing side: loss and optimizer configurations and the Engine (the
# network's compiled side, its lock). Included by _core.pyx.

cdef class LossConfig:
    """A loss as the kernels see it: its code and one parameter (MSE scale, Huber delta)."""
    cdef LossParams p

    def __init__(self, str name, double param=1.0):
        self.p.kind = LOSSES.index(name)
        self.p.param = param

    @property
    def name(self):
        return LOSSES[self.p.kind]

    def evaluate(self, out, target, labels, grad, weights=None):
        """Mean loss of out (n, k) against target (n, k) or labels (n,); fills grad if given.

        Arrays are C-contiguous, out/target/grad of one float dtype, labels intp,
        weights (n,) float64 or None: the caller checks.
        """
        cdef bint is_double = isinstance(out, np.ndarray) and out.dtype == np.float64
        cdef int float_type = _float_type(is_double)
        cdef void* out_ptr = _input_data(out, float_type, "out")
        if out.ndim != 2 or out.shape[1] < 1:
            raise ValueError(f"out must be 2-D with at least one column, got {out.shape}")
        cdef Py_ssize_t n_rows = out.shape[0], width = out.shape[1]
        cdef object row_loss = np.empty(n_rows)
        cdef double* row_loss_ptr = <double*>_data(row_loss)
        cdef void* target_ptr = _input_data_or_null(target, float_type, "target", n_rows, width)
        cdef intp* label_ptr = <intp*>_input_data_or_null(labels, cnp.NPY_INTP, "labels",
                                                          n_rows, -1)
        cdef void* grad_ptr = _input_data_or_null(grad, float_type, "grad", n_rows, width)
        cdef double* weight_ptr = <double*>_input_data_or_null(weights, cnp.NPY_DOUBLE,
                                                               "weights", n_rows, -1)
        if target_ptr == NULL and label_ptr == NULL:
            raise ValueError("evaluate needs a target or labels")
        cdef double value
        with nogil:
            if is_double:
                value = loss_and_gradient(&self.p, <double*>out_ptr, <double*>target_ptr,
                                          label_ptr, weight_ptr, <double*>grad_ptr,
                                          row_loss_ptr, n_rows, width)
            else:
                value = loss_and_gradient(&self.p, <float*>out_ptr, <float*>target_ptr,
                                          label_ptr, weight_ptr, <float*>grad_ptr,
                                          row_loss_ptr, n_rows, width)
        return value


cdef class OptimizerConfig:
    """An optimizer's hyperparameters, step count and state, as the kernels see them.

    The state is one (n_states, n_parameters) array, allocated when the optimizer
    first steps a network; from then on it belongs to that network's Engine.
    """
    cdef OptimizerParams p
    cdef public long long step_count
    cdef readonly object state
    cdef readonly tuple state_names
    cdef readonly object owner
    cdef double initial_accumulator_value

    def __init__(self, str name, *, double lr, double momentum=0.0, double dampening=0.0,
                 bint nesterov=False, double weight_decay=0.0, double beta1=0.9,
                 double beta2=0.999, double eps=1e-8, bint amsgrad=False, double alpha=0.99,
                 bint centered=False, double lr_decay=0.0,
                 double initial_accumulator_value=0.0, bint decoupled_weight_decay=False):
        cdef int kind = OPTIMIZERS.index(name)
        self.p = OptimizerParams(
            kind=kind, lr=lr, momentum=momentum, dampening=dampening,
            weight_decay=weight_decay, beta1=beta1, beta2=beta2, eps=eps, alpha=alpha,
            lr_decay=lr_decay, nesterov=nesterov, amsgrad=amsgrad, centered=centered,
            decoupled_weight_decay=decoupled_weight_decay, momentum_buffer=-1, exp_avg=-1,
            exp_avg_sq=-1, max_exp_avg_sq=-1, square_avg=-1, grad_avg=-1, sum=-1)
        # the rows of the state array, named as PyTorch names its state
        names = []
        if kind == OPT_SGD and momentum != 0:
            names = ["momentum_buffer"]
        elif kind == OPT_ADAM:
            names = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
        elif kind == OPT_RMSPROP:
            names = (["square_avg"] + (["momentum_buffer"] if momentum > 0 else [])
                     + (["grad_avg"] if centered else []))
        elif kind == OPT_ADAGRAD:
            names = ["sum"]
        self.state_names = tuple(names)
        row = {name: i for i, name in enumerate(names)}.get
        self.p.momentum_buffer = row("momentum_buffer", -1)
        self.p.exp_avg = row("exp_avg", -1)
        self.p.exp_avg_sq = row("exp_avg_sq", -1)
        self.p.max_exp_avg_sq = row("max_exp_avg_sq", -1)
        self.p.square_avg = row("square_avg", -1)
        self.p.grad_avg = row("grad_avg", -1)
        self.p.sum = row("sum", -1)
        self.initial_accumulator_value = initial_accumulator_value
        self.step_count = 0
        self.state = None
        self.owner = None

    @property
    def lr(self):
        return self.p.lr

    @lr.setter
    def lr(self, double value):
        self.p.lr = value

    def check_owner(self, Engine engine):
        """Refuse an engine other than the one this optimizer already steps."""
        if self.owner is not None and self.owner is not engine:
            raise ValueError("this optimizer already steps another Network; an optimizer "
                             "keeps per-parameter state, so create one per network")

    cdef int bind(self, Engine engine) except -1:
        """Belong to engine (allocating the state on first use) or refuse another one."""
        if self.owner is engine:
            return 0
        self.check_owner(engine)
        state = np.full((len(self.state_names), engine.n_parameters),
                        self.initial_accumulator_value, dtype=engine.dtype)
        # the allocation may let another thread bind this optimizer meanwhile
        self.check_owner(engine)
        if self.owner is None:
            self.state = state
            self.owner = engine
        return 0

    def attach(self, Engine engine):
        """Belong to engine now, allocating the state (as the first step would)."""
        self.bind(engine)

    def step(self, Engine engine):
        """One update of engine's parameters from its gradients."""
        cdef void* state
        engine.acquire()
        try:
            self.bind(engine)
            state = _data(self.state)
            self.step_count += 1
            with nogil:
                if engine.is_double:
                    optimizer_update(&self.p, self.step_count, <double*>engine.params_ptr,
                                     <double*>engine.grads_ptr, <double*>state,
                                     engine.n_parameters)
                else:
                    optimizer_update(&self.p, self.step_count, <float*>engine.params_ptr,
                                     <float*>engine.grads_ptr, <float*>state,
                                     engine.n_parameters)
        finally:
            engine.release()


# --------------------------------------------------------------------------- who may run
cdef extern from "pythread.h":
    unsigned long PyThread_get_thread_ident()

import threading

BUSY_MESSAGE = ("this Network is already running a computation in another thread; use "
                "one Network per thread")
FITTING_MESSAGE = ("this Network is already training (fit) in another thread and belongs "
                   "to that fit until it returns; use one Network per thread")
# Waits sleep on a condition and are woken by the thread that ends the wait; this poll is
# only a safety net (a wake-up lost to an exception costs this much, never a hang).
cdef double WAIT_POLL_SECONDS = 0.05


cdef class Engine:
    """A network's compiled side: its layer table, flat buffers and workspaces.

    Workspaces are sized for `capacity` rows and grow (never per step) when a
    larger batch arrives.

    Who may run (every flag changes with the GIL held, and no Python code runs
    between a flag's check and its change, so each check-and-set is atomic):

    * Writers (train_step, train_epoch, forward, backward, assign_parameters, an
      optimizer step) run one at a time: a writer from another thread while one
      runs gets RuntimeError at once, never shared scratch.
    * Readers (predict, snapshot, layer_output) run together. A writer that finds
      readers waits for them (they are short), and readers arriving meanwhile queue
      behind it; when a writer ends, the readers queued then go before the next
      writer. So neither side starves the other, and no call is refused because of
      a reader.
    * claim(): a fit() owns the network until it returns: writers and snapshots
      from other threads get RuntimeError (predict still runs between its batches).
    * Results are copied out before the engine is released: nothing is read from
      shared state after release (the _after_release hook lets tests prove it).
    """
    cdef LayerSpec* layers
    cdef readonly int n_layers
    cdef readonly Py_ssize_t n_parameters, n_inputs, n_outputs, capacity
    cdef readonly object dtype, parameters, gradients
    cdef readonly Py_ssize_t forward_rows   # rows cached by the last forward(), -1: none
    cdef bint is_double
    cdef bint busy             # a writer runs
    cdef int readers           # readers running
    cdef bint writer_waiting   # a writer waits for the readers to finish; new ones queue
    cdef int readers_waiting   # readers queued behind a writer
    cdef int admitted          # queued readers that go before the next writer
    cdef bint owned            # a fit() owns the network: only its thread may write
    cdef unsigned long owner   # that thread
    cdef int owner_depth       # nested fit()s (callbacks, Trainer.run) of that thread
    cdef object turn           # the threading.Condition waits sleep on
    # tests: called after every release, to run "another thread" exactly there
    cdef public object _after_release
    cdef Py_ssize_t itemsize
    cdef void* params_ptr
    cdef void* grads_ptr
    cdef Py_ssize_t a_width, z_width, max_width
    cdef Workspace ws
    cdef object acts, zs, delta, row_loss, x_batch, target_batch, label_batch, weight_batch
    cdef object partials   # one double per REDUCTION_BLOCK parameters (L2, gradient norm)

    def __cinit__(self):
        self.layers = NULL

    def __dealloc__(self):
        free(self.layers)

    def __init__(self, layer_table, parameters, gradients):
        """layer_table rows: (n_in, n_out, activation code, param, weight_offset, bias_offset)."""
        cdef int l, n = len(layer_table)
        cdef LayerSpec* spec
        self.layers = <LayerSpec*>malloc(n * sizeof(LayerSpec))
        if self.layers == NULL:
            raise MemoryError()
        self.n_layers = n
        self.parameters = parameters
        self.gradients = gradients
        self.params_ptr = _data(parameters)
        self.grads_ptr = _data(gradients)
        self.dtype = parameters.dtype
        self.is_double = self.dtype == np.float64
        self.itemsize = self.dtype.itemsize
        self.n_parameters = parameters.shape[0]
        self.a_width = self.z_width = self.max_width = 0
        for l in range(n):
            spec = &self.layers[l]
            (spec.n_in, spec.n_out, spec.activation, spec.param, spec.weight_offset,
             spec.bias_offset) = layer_table[l]
            spec.a_column = self.a_width
            self.a_width += spec.n_out
            self.max_width = max(self.max_width, spec.n_in, spec.n_out)
            # keep z where the derivative needs it, and for a softmax or sigmoid
            # output, whose fused cross-entropy works from the logits
            if (spec.activation in (ACT_LEAKY_RELU, ACT_ELU, ACT_SOFTPLUS, ACT_GELU)
                    or (l == n - 1 and spec.activation in (ACT_SOFTMAX, ACT_SIGMOID))):
                spec.z_column = self.z_width
                self.z_width += spec.n_out
            else:
                spec.z_column = -1
        self.n_inputs = self.layers[0].n_in
        self.n_outputs = self.layers[n - 1].n_out
        self.partials = np.empty(self.n_parameters // REDUCTION_BLOCK + 1, dtype=np.float64)
        self.capacity = 0
        self.forward_rows = -1
        self.busy = self.writer_waiting = self.owned = False
        self.readers = self.readers_waiting = self.admitted = self.owner_depth = 0
        self.owner = 0
        self.turn = threading.Condition(threading.Lock())
        self._after_release = None
        self.grow(1)

    def reserve(self, Py_ssize_t n_rows):
        """Make the workspaces hold batches of n_rows rows (they only grow)."""
        self.acquire()
        try:
            self.grow(n_rows)
        finally:
            self.release()

    cdef int grow(self, Py_ssize_t n_rows) except -1:
        # only for a writer that holds the engine: this frees the old workspaces
        if n_rows <= self.capacity:
            return 0
        self.acts = np.empty(n_rows * self.a_width, dtype=self.dtype)
        self.zs = np.empty(max(1, n_rows * self.z_width), dtype=self.dtype)
        self.delta = np.empty(2 * n_rows * self.max_width, dtype=self.dtype)
        self.row_loss = np.empty(n_rows, dtype=np.float64)
        self.x_batch = np.empty((n_rows, self.n_inputs), dtype=self.dtype)
        self.target_batch = np.empty((n_rows, self.n_outputs), dtype=self.dtype)
        self.label_batch = np.empty(n_rows, dtype=np.intp)
        self.weight_batch = np.empty(n_rows, dtype=np.float64)
        self.capacity = n_rows
        self.ws.capacity = n_rows
        self.ws.max_width = self.max_width
        self.ws.acts = _data(self.acts)
        self.ws.zs = _data(self.zs)
        self.ws.delta = _data(self.delta)
        self.ws.row_loss = <double*>_data(self.row_loss)
        self.forward_rows = -1

    # ------------------------------------------------------------ who may run
    cdef int acquire(self) except -1:
        """Start a writer, or raise RuntimeError (another writer, or another thread's fit)."""
        if self.owned and self.owner != PyThread_get_thread_ident():
            raise RuntimeError(FITTING_MESSAGE)
        if self.busy or self.writer_waiting:
            raise RuntimeError(BUSY_MESSAGE)
        if self.readers == 0 and self.admitted == 0:
            self.busy = True
            return 0
        # readers run: wait for them (they are short); new ones queue behind this writer,
        # so none can start between the end of the wait and busy below
        self.writer_waiting = True
        try:
            with self.turn:
                while self.readers or self.admitted:
                    self.turn.wait(WAIT_POLL_SECONDS)
        except BaseException:  # interrupted (Ctrl-C): let the queued readers go
            self.writer_waiting = False
            self.wake()
            raise
        self.busy = True
        self.writer_waiting = False
        return 0

    cdef int release(self) except -1:
        """End a writer; the readers queued now go before the next writer."""
        self.busy = False
        if self.readers_waiting:
            self.admitted = self.readers_waiting
            self.wake()
        if self._after_release is not None:
            self._after_release()
        return 0

    cdef int enter_reader(self, bint refuse_foreign_fit) except -1:
        """Start a reader: at once, or after the running or waiting writer."""
        if refuse_foreign_fit and self.owned \
                and self.owner != PyThread_get_thread_ident():
            raise RuntimeError(FITTING_MESSAGE)
        if not self.busy and not self.writer_waiting:
            self.readers += 1
            return 0
        cdef bint entered = False
        self.readers_waiting += 1
        try:
            with self.turn:
                while self.busy or not (self.admitted or not self.writer_waiting):
                    self.turn.wait(WAIT_POLL_SECONDS)
                if self.admitted:
                    self.admitted -= 1
                # a fit may have claimed the network while this reader queued
                if refuse_foreign_fit and self.owned \
                        and self.owner != PyThread_get_thread_ident():
                    raise RuntimeError(FITTING_MESSAGE)
                self.readers += 1
                entered = True
        except BaseException:
            if entered:  # interrupted on the way out of the wait: not entered after all
                self.readers -= 1
            raise
        finally:
            self.readers_waiting -= 1
            if self.admitted > self.readers_waiting:
                self.admitted = self.readers_waiting
            if self.writer_waiting:  # this reader may be the one the writer waits for
                self.wake()
        return 0

    cdef int exit_reader(self) except -1:
        self.readers -= 1
        if self.readers == 0 and self.writer_waiting:
            self.wake()
        if self._after_release is not None:
            self._after_release()
        return 0

    cdef int wake(self) except -1:
        with self.turn:
            self.turn.notify_all()
        return 0

    def claim(self):
        """Make the calling thread (a fit()) the only one that may change the network.

        Waits for running readers like a writer; RuntimeError if another thread's
        writer runs or its fit owns the network. Nested claims of the owner count;
        each claim() needs one unclaim().
        """
        cdef unsigned long me = PyThread_get_thread_ident()
        if self.owned and self.owner == me:
            self.owner_depth += 1
            return
        self.acquire()
        self.owned = True
        self.owner = me
        self.owner_depth = 1
        self.release()

    def check_owner(self):
        """RuntimeError if another thread's fit() owns the network (for early refusals)."""
        if self.owned and self.owner != PyThread_get_thread_ident():
            raise RuntimeError(FITTING_MESSAGE)

    def unclaim(self):
        """End the calling thread's claim()."""
        if not self.owned or self.owner != PyThread_get_thread_ident():
            raise RuntimeError("unclaim() without claim() in this thread")
        self.owner_depth -= 1
        if self.owner_depth == 0:
            self.owned = False

    @property
    def lock_state(self):
        """The flags of the lock, for tests: a dict."""
        return {"busy": bool(self.busy), "readers": self.readers,
                "writer_waiting": bool(self.writer_waiting),
                "readers_waiting": self.readers_waiting, "admitted": self.admitted,
                "owned": bool(self.owned), "owner_depth": self.owner_depth}

    def snapshot(self, OptimizerConfig optimizer=None, read=None):
        """(parameters, optimizer state or None, its step count, read()) taken together.

        A reader: waits for a running step and never sees part of one. Refused with
        RuntimeError while another thread's fit() owns the network: its parameters,
        RNG and epoch count agree only at that fit's own epoch boundaries (a
        callback of the fit may snapshot). read: a callable run inside, for the
        Python-side state (RNG, epoch count) that must agree with the arrays.
        """
        self.enter_reader(True)
        try:
            parameters = self.parameters.copy()
            state, step_count = None, 0
            if optimizer is not None:
                if optimizer.owner is self and optimizer.state is not None:
                    state = optimizer.state.copy()
                step_count = optimizer.step_count
            extra = None if read is None else read()
        finally:
            self.exit_reader()
        return parameters, state, step_count, extra

    # ------------------------------------------------------------ computations
    def assign_parameters(self, values):
        """parameters[...] = values, never while a computation (or predict) runs.

        values: (n_parameters,) of the engine's dtype, checked by the caller.
        """
        self.acquire()
        try:
            self.parameters[...] = values
        finally:
            self.release()

    def layer_output(self, int layer):
        """A copy of a layer's output cached by the last forward() (for tests and debugging)."""
        self.enter_reader(False)
        try:
            return self.copy_layer_output(layer)
        finally:
            self.exit_reader()

    cdef object copy_layer_output(self, int layer):
        # only while this thread holds the engine (reader or writer)
        if self.forward_rows < 0:
            raise ValueError("no forward pass is cached")
        cdef LayerSpec* spec = &self.layers[layer]
        cdef Py_ssize_t start = self.capacity * spec.a_column
        return self.acts[start:start + self.forward_rows * spec.n_out].reshape(
            self.forward_rows, spec.n_out).copy()

    cdef StepOptions* step_options(self, StepOptions* options, double l2, double clip_value,
                                   double clip_norm):
        """options filled in, or NULL when all are off (the plain step skips that pass)."""
        if l2 <= 0 and clip_value <= 0 and clip_norm <= 0:
            return NULL
        options.l2 = l2
        options.clip_value = clip_value
        options.clip_norm = clip_norm
        options.partials = <double*>_data(self.partials)
        return options

    def train_step(self, x, target, labels, weights, LossConfig loss,
                   OptimizerConfig optimizer, double l2=0.0, double clip_value=0.0,
                   double clip_norm=0.0):
        """Forward + loss + backward (+ one update unless optimizer is None); the loss.

        x: (n, n_in) C-contiguous of the engine's dtype; target: (n, n_out) of that
        dtype, or labels: (n,) intp, the other None; weights: (n,) float64 or None.
        The caller checks. A loss that is not finite skips the update (and does not
        count as an optimizer step).
        """
        cdef int float_type = _float_type(self.is_double)
        cdef void* x_ptr = _input_data(x, float_type, "x", -1, self.n_inputs)
        cdef Py_ssize_t n_rows = x.shape[0]
        cdef void* target_ptr = _input_data_or_null(target, float_type, "target", n_rows,
                                                    self.n_outputs)
        cdef intp* label_ptr = <intp*>_input_data_or_null(labels, cnp.NPY_INTP, "labels",
                                                          n_rows, -1)
        cdef double* weight_ptr = <double*>_input_data_or_null(weights, cnp.NPY_DOUBLE,
                                                               "weights", n_rows, -1)
        cdef const OptimizerParams* opt_params = NULL
        cdef StepOptions options
        cdef StepOptions* options_ptr = self.step_options(&options, l2, clip_value,
                                                          clip_norm)
        cdef void* state = NULL
        cdef double value
        # acquire first: nothing may reallocate the workspaces of a running step
        self.acquire()
        try:
            if optimizer is not None:
                optimizer.bind(self)
                opt_params = &optimizer.p
                state = _data(optimizer.state)
            if n_rows > self.capacity:
                self.grow(n_rows)
            self.forward_rows = -1
            if optimizer is not None:
                optimizer.step_count += 1
            with nogil:
                if self.is_double:
                    value = training_step(self.layers, self.n_layers, &self.ws,
                                          <double*>self.params_ptr, <double*>self.grads_ptr,
                                          <double*>x_ptr, <double*>target_ptr, label_ptr,
                                          weight_ptr, n_rows, &loss.p, options_ptr, opt_params,
                                          optimizer.step_count if opt_params != NULL else 0,
                                          <double*>state, self.n_parameters)
                else:
                    value = training_step(self.layers, self.n_layers, &self.ws,
                                          <float*>self.params_ptr, <float*>self.grads_ptr,
                                          <float*>x_ptr, <float*>target_ptr, label_ptr,
                                          weight_ptr, n_rows, &loss.p, options_ptr, opt_params,
                                          optimizer.step_count if opt_params != NULL else 0,
                                          <float*>state, self.n_parameters)
            if optimizer is not None and not isfinite(value):
                optimizer.step_count -= 1
        finally:
            self.release()
        return value

    def train_epoch(self, x, target, labels, weights, order, Py_ssize_t batch_size,
                    LossConfig loss, OptimizerConfig optimizer, double l2=0.0,
                    double clip_value=0.0, double clip_norm=0.0, batch_lrs=None,
                    bint check_signals=True, totals=None):
        """Mini-batch steps over x (in `order` if given) in compiled code.

        order: intp row indices (a permutation, or a slice of one), or None for
        consecutive batches; batch_lrs: float64 learning rate per batch, or None.
        Returns (loss_sum, weight_sum, n_rows, diverged): the batch losses summed
        with their batch weights, so that chunks of an epoch combine exactly.
        totals, a float64 (3,) array or None, gets those three sums added before
        this returns: a Ctrl-C that arrived during the last batch raises
        KeyboardInterrupt as soon as the result reaches Python, which loses it, but
        not what totals holds. KeyboardInterrupt propagates at a batch boundary.
        """
        cdef double* totals_ptr = <double*>_input_data_or_null(totals, cnp.NPY_DOUBLE,
                                                               "totals", 3, -1)
        cdef int float_type = _float_type(self.is_double)
        cdef void* x_ptr = _input_data(x, float_type, "x", -1, self.n_inputs)
        cdef Py_ssize_t n_x = x.shape[0]
        cdef void* target_ptr = _input_data_or_null(target, float_type, "target", n_x,
                                                    self.n_outputs)
        cdef intp* label_ptr = <intp*>_input_data_or_null(labels, cnp.NPY_INTP, "labels",
                                                          n_x, -1)
        cdef double* weight_ptr = <double*>_input_data_or_null(weights, cnp.NPY_DOUBLE,
                                                               "weights", n_x, -1)
        cdef intp* order_ptr = <intp*>_input_data_or_null(order, cnp.NPY_INTP, "order", -1, -1)
        cdef Py_ssize_t n_samples = n_x if order is None else order.shape[0]
        cdef double* lr_ptr = <double*>_input_data_or_null(batch_lrs, cnp.NPY_DOUBLE,
                                                           "batch_lrs", -1, -1)
        if batch_size < 1 or (batch_lrs is not None and batch_lrs.shape[0]
                              < (n_samples + batch_size - 1) // batch_size):
            raise ValueError("batch_size must be >= 1 and batch_lrs must hold one rate per batch")
        cdef StepOptions options
        cdef StepOptions* options_ptr = self.step_options(&options, l2, clip_value,
                                                          clip_norm)
        cdef EpochResult result
        cdef void* state
        cdef void* x_batch
        cdef void* target_batch
        cdef intp* label_batch
        cdef double* weight_batch
        self.acquire()
        try:
            optimizer.bind(self)
            state = _data(optimizer.state)
            if batch_size > self.capacity:
                self.grow(batch_size)
            x_batch = _data(self.x_batch)
            target_batch = _data(self.target_batch)
            label_batch = <intp*>_data(self.label_batch)
            weight_batch = <double*>_data(self.weight_batch)
            self.forward_rows = -1
            with nogil:
                if self.is_double:
                    training_epoch(self.layers, self.n_layers, &self.ws,
                                   <double*>self.params_ptr, <double*>self.grads_ptr,
                                   <double*>x_ptr, <double*>target_ptr, label_ptr, weight_ptr,
                                   n_samples, order_ptr, batch_size, <double*>x_batch,
                                   <double*>target_batch, label_batch, weight_batch, &loss.p,
                                   options_ptr, &optimizer.p, lr_ptr, check_signals,
                                   &optimizer.step_count, <double*>state, self.n_parameters,
                                   &result)
                else:
                    training_epoch(self.layers, self.n_layers, &self.ws,
                                   <float*>self.params_ptr, <float*>self.grads_ptr,
                                   <float*>x_ptr, <float*>target_ptr, label_ptr, weight_ptr,
                                   n_samples, order_ptr, batch_size, <float*>x_batch,
                                   <float*>target_batch, label_batch, weight_batch, &loss.p,
                                   options_ptr, &optimizer.p, lr_ptr, check_signals,
                                   &optimizer.step_count, <float*>state, self.n_parameters,
                                   &result)
            if totals_ptr != NULL:
                totals_ptr[0] += result.loss_sum
                totals_ptr[1] += result.weight_sum
                totals_ptr[2] += result.n_rows
        finally:
            self.release()
        return result.loss_sum, result.weight_sum, result.n_rows, bool(result.diverged)

    def forward(self, x):
        """Forward pass keeping every layer's output for backward(); a copy of the output.

        x is copied into the workspace, so the caller may change it before backward().
        """
        cdef void* x_ptr = _input_data(x, _float_type(self.is_double), "x", -1, self.n_inputs)
        cdef Py_ssize_t n_rows = x.shape[0]
        cdef void* x_batch
        cdef Py_ssize_t x_bytes = x.nbytes
        self.acquire()
        try:
            if n_rows > self.capacity:
                self.grow(n_rows)
            x_batch = _data(self.x_batch)
            with nogil:
                memcpy(x_batch, x_ptr, x_bytes)
                if self.is_double:
                    network_forward(self.layers, self.n_layers, &self.ws,
                                    <double*>self.params_ptr, <double*>x_batch, n_rows)
                else:
                    network_forward(self.layers, self.n_layers, &self.ws,
                                    <float*>self.params_ptr, <float*>x_batch, n_rows)
            self.forward_rows = n_rows
            # copied before release: another thread's forward may overwrite it after
            output = self.copy_layer_output(self.n_layers - 1)
        finally:
            self.release()
        return output

    def backward(self, grad_output, bint want_grad_input):
        """Back-propagate dL/d(output) of the cached forward pass into the gradients.

        grad_output: (forward_rows, n_outputs) C-contiguous of the engine's dtype.
        Returns dL/dx (a new array) if want_grad_input, else None.
        """
        cdef Py_ssize_t n_rows
        cdef const LayerSpec* last = &self.layers[self.n_layers - 1]
        cdef void* grad_x
        cdef void* grad_out = _input_data(grad_output, _float_type(self.is_double),
                                          "grad_output", -1, self.n_outputs)
        cdef void* x_batch
        cdef void* out
        cdef void* z
        self.acquire()
        try:
            # checked again here, under the busy flag: another thread's forward() may
            # have changed the cached pass since the caller looked
            n_rows = self.forward_rows
            if n_rows < 0 or grad_output.shape[0] != n_rows \
                    or grad_output.shape[1] != last.n_out:
                raise ValueError("the cached forward pass changed; call forward() again")
            grad_input = (np.empty((n_rows, self.n_inputs), dtype=self.dtype)
                          if want_grad_input else None)
            grad_x = _data_or_null(grad_input)
            x_batch = _data(self.x_batch)
            out = <char*>self.ws.acts + self.capacity * last.a_column * self.itemsize
            z = (out if last.z_column < 0 else
                 <char*>self.ws.zs + self.capacity * last.z_column * self.itemsize)
            with nogil:
                memcpy(self.ws.delta, grad_out, n_rows * last.n_out * self.itemsize)
                if self.is_double:
                    activation_backward(<double*>self.ws.delta, <double*>out, <double*>z,
                                        n_rows, last.n_out, last.activation, last.param)
                    network_backward(self.layers, self.n_layers, &self.ws,
                                     <double*>self.params_ptr, <double*>self.grads_ptr,
                                     <double*>x_batch, n_rows, <double*>grad_x)
                else:
                    activation_backward(<float*>self.ws.delta, <float*>out, <float*>z,
                                        n_rows, last.n_out, last.activation, last.param)
                    network_backward(self.layers, self.n_layers, &self.ws,
                                     <float*>self.params_ptr, <float*>self.grads_ptr,
                                     <float*>x_batch, n_rows, <float*>grad_x)
        finally:
            self.release()
        return grad_input

    def predict(self, x, Py_ssize_t chunk_rows):
        """Inference in chunks of chunk_rows rows, caching nothing; a new (n, n_outputs) array.

        Uses its own scratch, so it never disturbs a cached forward pass.
        """
        cdef char* x_ptr = <char*>_input_data(x, _float_type(self.is_double), "x", -1,
                                              self.n_inputs)
        cdef Py_ssize_t n_rows = x.shape[0], begin, rows
        chunk_rows = max(1, min(chunk_rows, n_rows))
        out = np.empty((n_rows, self.n_outputs), dtype=self.dtype)
        scratch = np.empty(max(1, 2 * chunk_rows * self.max_width), dtype=self.dtype)
        cdef char* out_ptr = <char*>_data(out)
        cdef void* scratch_ptr = _data(scratch)
        cdef Py_ssize_t item = self.itemsize
        # predictions run together (they only read the parameters), never while a
        # writer changes them
        self.enter_reader(False)
        try:
            with nogil:
                begin = 0
                while begin < n_rows:
                    rows = min(chunk_rows, n_rows - begin)
                    if self.is_double:
                        predict_chunk(self.layers, self.n_layers, <double*>self.params_ptr,
                                      <double*>(x_ptr + begin * self.n_inputs * item), rows,
                                      <double*>scratch_ptr, self.max_width,
                                      <double*>(out_ptr + begin * self.n_outputs * item))
                    else:
                        predict_chunk(self.layers, self.n_layers, <float*>self.params_ptr,
                                      <float*>(x_ptr + begin * self.n_inputs * item), rows,
                                      <float*>scratch_ptr, self.max_width,
                                      <float*>(out_ptr + begin * self.n_outputs * item))
                    begin += rows
        finally:
            self.exit_reader()
        return out
