# Whole-network passes: forward, backward, loss at the output, the training step and
# epoch, inference in chunks. Included by _core.pyx.

cdef int network_forward(const LayerSpec* layers, int n_layers, const Workspace* ws,
                         floating* acts, floating* zs, const floating* params,
                         floating* buffers, double* stats, PassMode* mode,
                         const floating* x, Py_ssize_t n_rows) except -1 nogil:
    """Every layer's output (and what its backward pass needs) into the workspaces, in
    mode; a training pass moves Dropout's stream on by one. -1 when a custom activation
    raised (the stream is then not moved on)."""
    cdef int l
    cdef const floating* inp = x
    for l in range(n_layers):
        layer_forward(&layers[l], params, buffers, stats, mode, ws, inp, n_rows,
                      _layer_z(&layers[l], ws, acts, zs), _layer_output(&layers[l], ws, acts))
        inp = _layer_output(&layers[l], ws, acts)
    if mode.training:
        mode.stream_counter += 1
    return 0


cdef void network_backward(const LayerSpec* layers, int n_layers, const Workspace* ws,
                           floating* acts, floating* zs, floating* delta,
                           const floating* params, floating* grads, double* stats,
                           const PassMode* mode, const floating* x, Py_ssize_t n_rows,
                           bint output_is_dz, floating* grad_x) noexcept nogil:
    """Back-propagate delta buffer 0 through every layer: dL/d(the network's output), or
    dL/dz of the last layer where output_is_dz (the loss fused its activation).

    Fills every weight and bias gradient, and dL/dx into grad_x unless it is NULL.
    mode: the mode of the forward pass.
    """
    cdef int l
    cdef floating* dz = delta
    cdef floating* spare = dz + ws.capacity * ws.max_width
    cdef floating* swap
    cdef floating* grad_input
    cdef const floating* inp
    for l in range(n_layers - 1, -1, -1):
        if l == 0:
            inp = x
            grad_input = grad_x
        else:
            inp = _layer_output(&layers[l - 1], ws, acts)
            grad_input = spare
        layer_backward(&layers[l], params, grads, stats, mode, ws, inp,
                       _layer_output(&layers[l], ws, acts),
                       _layer_z(&layers[l], ws, acts, zs), n_rows, dz,
                       output_is_dz and l == n_layers - 1, grad_input)
        swap = dz
        dz = spare
        spare = swap


cdef int output_loss_gradient(const LayerSpec* layers, int n_layers, const Workspace* ws,
                              floating* acts, floating* zs, floating* delta,
                              const LossParams* loss, const floating* target,
                              const intp* labels, const double* weights,
                              Py_ssize_t n_rows, bint* fused_out,
                              double* value) except -1 nogil:
    """The loss of the last forward pass into value[0], and its gradient in delta
    buffer 0; -1 when a custom loss raised.

    softmax + cross-entropy on probabilities and sigmoid + binary cross-entropy on
    probabilities are fused: the loss is taken from the logits z by log-sum-exp and
    dL/dz = (p * sum(y) - y) / n directly, stable where log(p) is not (fused_out[0]
    is then True). Every other pairing leaves dL/da, which the last layer's backward
    kernel multiplies by the exact activation derivative.
    """
    cdef const LayerSpec* last = &layers[n_layers - 1]
    cdef floating* out = _layer_output(last, ws, acts)
    cdef floating* z = _layer_z(last, ws, acts, zs)
    cdef floating* dz = delta
    cdef LossParams fused = loss[0]
    if loss.kind == LOSS_CROSS_ENTROPY_PROBS and last.activation == ACT_SOFTMAX:
        fused.kind = LOSS_CROSS_ENTROPY
    elif loss.kind == LOSS_BINARY_CROSS_ENTROPY_PROBS and last.activation == ACT_SIGMOID:
        fused.kind = LOSS_BINARY_CROSS_ENTROPY
    fused_out[0] = fused.kind != loss.kind
    if loss.kind == LOSS_CUSTOM:
        return custom_loss(loss.callback, loss.reduction == REDUCTION_SUM, out, target,
                           weights, dz, n_rows, last.n_out, value)
    if fused_out[0]:
        value[0] = loss_and_gradient(&fused, z, target, labels, weights, dz, ws.row_loss,
                                     n_rows, last.n_out)
    else:
        value[0] = loss_and_gradient(loss, out, target, labels, weights, dz, ws.row_loss,
                                     n_rows, last.n_out)
    return 0


cdef int training_step(const LayerSpec* layers, int n_layers, const Workspace* ws,
                       floating* acts, floating* zs, floating* delta, floating* params,
                       floating* grads, floating* buffers, double* stats, PassMode* mode,
                       const floating* x,
                       const floating* target, const intp* labels, const double* weights,
                       Py_ssize_t n_rows, const LossParams* loss,
                       const StepOptions* options, const OptimizerParams* optimizer,
                       long long step, floating* state,
                       Py_ssize_t n_params, double* value) except -1 nogil:
    """Forward, loss, backward and (if optimizer != NULL) one update: one training step.

    value[0] is the loss of the forward pass (with the L2 term), before the update.
    When that loss (or the clipped gradient's norm) is not finite the update is
    skipped: the parameters stay as they were, for the caller to report the
    divergence. -1: a custom loss or activation raised, in the forward pass or the
    loss, before any gradient, parameter or optimizer state changed, and with
    Dropout's stream where it was (BatchNorm1d layers before a custom activation
    that raised, or before a custom loss that raised, have counted the batch in
    their running statistics).
    """
    cdef bint output_is_dz, loss_done = False, completed = False
    cdef StepTimer timer
    step_begin(&timer, n_rows, n_params, n_layers, floating is double)
    try:
        network_forward(layers, n_layers, ws, acts, zs, params, buffers, stats, mode, x,
                        n_rows)
        try:
            output_loss_gradient(layers, n_layers, ws, acts, zs, delta, loss, target,
                                 labels, weights, n_rows, &output_is_dz, value)
            loss_done = True
        finally:
            # a custom loss raised: Dropout's stream does not count this pass either
            if not loss_done and mode.training:
                mode.stream_counter -= 1
        network_backward(layers, n_layers, ws, acts, zs, delta, params, grads, stats, mode,
                         x, n_rows, output_is_dz, <floating*>NULL)
        if options != NULL:
            value[0] += regularize_and_clip(layers, n_layers, options, params, grads,
                                            n_params)
        if optimizer != NULL and isfinite(value[0]):
            optimizer_update(optimizer, step, params, grads, state, n_params)
        completed = True
    finally:
        step_end(&timer, completed)
    return 0


cdef void gather_rows(const floating* source, const intp* rows, Py_ssize_t n_rows,
                      Py_ssize_t width, floating* dest) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n_rows):
        memcpy(dest + i * width, source + rows[i] * width, width * sizeof(floating))


cdef void gather_labels(const intp* source, const intp* rows, Py_ssize_t n_rows,
                        intp* dest) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n_rows):
        dest[i] = source[rows[i]]


cdef void gather_weights(const double* source, const intp* rows, Py_ssize_t n_rows,
                         double* dest) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n_rows):
        dest[i] = source[rows[i]]


cdef struct EpochResult:
    # sum over finished batches of (batch weight * batch loss); of the batch losses
    # themselves for a "sum" reduction
    double loss_sum
    double weight_sum    # sum of those batch weights (rows, when unweighted)
    Py_ssize_t n_rows    # rows of the finished batches
    bint diverged        # a batch's loss was not finite; its update was skipped


cdef int training_epoch(const LayerSpec* layers, int n_layers, const Workspace* ws,
                        floating* acts, floating* zs, floating* delta, floating* params,
                        floating* grads, floating* buffers, double* stats, PassMode* mode,
                        const floating* x,
                        const floating* target, const intp* labels, const double* weights,
                        Py_ssize_t n_samples, const intp* order, Py_ssize_t batch_size,
                        floating* x_batch, floating* target_batch, intp* label_batch,
                        double* weight_batch, const LossParams* loss,
                        const StepOptions* options, const OptimizerParams* optimizer,
                        const double* batch_lrs, bint check_signals, long long* step,
                        floating* state, Py_ssize_t n_params,
                        EpochResult* result) except -1 nogil:
    """One pass over the data in batches (the last one partial), into result.

    With order == NULL the batches are consecutive rows of x, used in place;
    otherwise each batch's rows are gathered from x in that order. batch_lrs, if
    given, is the learning rate of each batch (a per-step schedule). Stops after a
    batch whose loss is not finite (result.diverged). With check_signals, Python's
    signal handlers run between batches, so Ctrl-C raises KeyboardInterrupt at a
    batch boundary, with every finished batch's update applied; so does an exception
    from a custom loss or activation (-1), the batch that raised it changing nothing.
    """
    cdef Py_ssize_t begin = 0, n_rows, batch = 0
    cdef int n_in = layers[0].n_in, n_out = layers[n_layers - 1].n_out
    cdef const floating* xb
    cdef const floating* tb
    cdef const intp* lb
    cdef const double* wb
    cdef double value, batch_weight
    cdef OptimizerParams scheduled = optimizer[0]
    result.loss_sum = 0
    result.weight_sum = 0
    result.n_rows = 0
    result.diverged = False
    while begin < n_samples:
        if check_signals and begin > 0:
            with gil:
                PyErr_CheckSignals()
        n_rows = min(batch_size, n_samples - begin)
        if order == NULL:
            xb = x + begin * n_in
            tb = target + begin * n_out if target != NULL else NULL
            lb = labels + begin if labels != NULL else NULL
            wb = weights + begin if weights != NULL else NULL
        else:
            gather_rows(x, order + begin, n_rows, n_in, x_batch)
            xb = x_batch
            tb = NULL
            lb = NULL
            wb = NULL
            if target != NULL:
                gather_rows(target, order + begin, n_rows, n_out, target_batch)
                tb = target_batch
            if labels != NULL:
                gather_labels(labels, order + begin, n_rows, label_batch)
                lb = label_batch
            if weights != NULL:
                gather_weights(weights, order + begin, n_rows, weight_batch)
                wb = weight_batch
        if batch_lrs != NULL:
            scheduled.lr = batch_lrs[batch]
        # counted once it ran: an exception from a custom loss or activation propagates
        # from here (except -1) with no update made and the count unchanged
        training_step(layers, n_layers, ws, acts, zs, delta, params, grads, buffers, stats,
                      mode, xb, tb, lb, wb, n_rows, loss, options, &scheduled, step[0] + 1,
                      state, n_params, &value)
        step[0] += 1
        if not isfinite(value):
            step[0] -= 1   # the update was skipped
            result.diverged = True
            return 0
        batch_weight = weight_sum(wb, n_rows)
        # "mean": the epoch's weighted mean; "sum": the epoch's total (see EpochResult)
        result.loss_sum += value if loss.reduction == REDUCTION_SUM else batch_weight * value
        result.weight_sum += batch_weight
        result.n_rows += n_rows
        begin += n_rows
        batch += 1
    return 0


cdef int predict_chunk(const LayerSpec* layers, int n_layers, const floating* params,
                       floating* buffers, double* stats, const floating* x,
                       Py_ssize_t n_rows, floating* scratch, Py_ssize_t scratch_width,
                       floating* out) except -1 nogil:
    """Inference on n_rows rows: hidden layers ping-pong in scratch, the last into out.
    buffers are only read; stats is the caller's own scratch. -1: a custom activation
    raised."""
    cdef PassMode inference
    inference.training = False
    inference.stream_key = 0
    inference.stream_counter = 0
    cdef int l
    cdef const floating* inp = x
    cdef floating* dest
    for l in range(n_layers):
        if l == n_layers - 1:
            dest = out
        else:
            dest = scratch + (l % 2) * n_rows * scratch_width
        layer_forward(&layers[l], params, buffers, stats, &inference, <const Workspace*>NULL,
                      inp, n_rows, dest, dest)
        inp = dest
    return 0
