# The layer table: each layer has a kind, and each kind one forward and one backward
# kernel, reached through layer_forward and layer_backward. A new kind of layer is an
# entry in the kind enum (_core.pyx), its two kernels here, and a case in each of the
# two dispatchers. Included by _core.pyx.

cdef struct LayerSpec:
    int kind                   # KIND_*: which kernels run this layer
    int index                  # position in the network (keys Dropout's stream)
    int n_in, n_out
    int activation
    double param               # leaky_relu slope or elu alpha
    PyObject* callback         # ACT_CUSTOM: its PythonCallback (the Engine keeps it alive)
    Py_ssize_t weight_offset   # into the flat parameter / gradient buffers; -1: none
    Py_ssize_t bias_offset     # -1: no bias
    Py_ssize_t n_weights       # the weights l2 applies to, from weight_offset
    Py_ssize_t a_column        # start of this layer's block in the activation workspace
    Py_ssize_t z_column        # same in the pre-activation workspace; -1: z not kept
    double eps                 # batch and layer norm: added to the variance
    double momentum            # batch norm; < 0: cumulative average (momentum=None)
    double p                   # dropout probability
    Py_ssize_t buffer_offset   # batch norm: running_mean, running_var (+n_out) and
    #                            num_batches_tracked (+2 n_out) in the buffers; -1: none
    Py_ssize_t stats_offset    # batch norm: its mean and 1/std (+n_out) in the stats


cdef struct Workspace:
    # The sizes of the engine's workspaces, which the kernels get as typed pointers:
    # acts and zs hold per-layer blocks of `capacity` rows each (layer l's output is
    # the row-major (m, n_out) matrix at acts + capacity * a_column); delta holds two
    # (capacity, max_width) ping-pong buffers of dL/dz.
    Py_ssize_t capacity
    Py_ssize_t max_width
    double* row_loss


cdef struct PassMode:
    # How a pass runs: training mode (dropout on, batch statistics, running statistics
    # updated) or inference mode; and Dropout's counter-based stream: its key and the
    # number of training passes so far, which picks this pass's masks.
    bint training
    uint64_t stream_key
    uint64_t stream_counter


cdef inline floating* _layer_output(const LayerSpec* layer, const Workspace* ws,
                                    floating* acts) noexcept nogil:
    return acts + ws.capacity * layer.a_column


cdef inline floating* _layer_z(const LayerSpec* layer, const Workspace* ws, floating* acts,
                               floating* zs) noexcept nogil:
    # the pre-activation z, or the output itself where z is not kept (computed in place)
    if layer.z_column < 0:
        return _layer_output(layer, ws, acts)
    return zs + ws.capacity * layer.z_column


cdef int dense_forward(const LayerSpec* layer, const floating* params, const floating* x,
                       Py_ssize_t n_rows, floating* z, floating* a) except -1 nogil:
    """z = x W^T + b, a = g(z); a may alias z. One GEMM (GEMV for one row), one pass over z."""
    if n_rows == 1:
        matvec(params + layer.weight_offset, layer.n_out, layer.n_in, x, z)
    else:
        gemm(False, True, <int>n_rows, layer.n_out, layer.n_in, x, layer.n_in,
             params + layer.weight_offset, layer.n_in, 0, z, layer.n_out)
    return bias_activation(z, a, params + layer.bias_offset if layer.bias_offset >= 0 else NULL,
                           n_rows, layer.n_out, layer.activation, layer.param, layer.callback)


cdef void dense_backward(const LayerSpec* layer, const floating* params, floating* grads,
                         const floating* x, const floating* a, const floating* z,
                         Py_ssize_t n_rows, floating* dz, bint delta_is_dz,
                         floating* grad_x) noexcept nogil:
    """dz = dL/da * g'(z) in place (unless delta_is_dz: it already is dL/dz), then
    dW = dz^T x, db = column sums of dz, and (if grad_x != NULL) dx = dz W."""
    if not delta_is_dz:
        activation_backward(dz, a, z, n_rows, layer.n_out, layer.activation, layer.param)
    gemm(True, False, layer.n_out, layer.n_in, <int>n_rows, dz, layer.n_out, x, layer.n_in,
         0, grads + layer.weight_offset, layer.n_in)
    if layer.bias_offset >= 0:
        bias_gradient(dz, grads + layer.bias_offset, n_rows, layer.n_out)
    if grad_x != NULL:
        gemm(False, False, <int>n_rows, layer.n_in, layer.n_out, dz, layer.n_out,
             params + layer.weight_offset, layer.n_in, 0, grad_x, layer.n_in)


cdef void column_sums(const floating* x, floating* sums, Py_ssize_t n_rows,
                      Py_ssize_t width, Py_ssize_t col_begin,
                      Py_ssize_t col_end) noexcept nogil:
    """sums[j] = sum_i x[i, j] for j in [col_begin, col_end), rows in order 0..n-1."""
    cdef Py_ssize_t i, j
    cdef const floating* xr
    for j in range(col_begin, col_end):
        sums[j] = 0
    for i in range(n_rows):
        xr = x + i * width
        for j in range(col_begin, col_end):
            sums[j] = sums[j] + xr[j]


cdef void bias_gradient(const floating* dz, floating* grad_bias, Py_ssize_t n_rows,
                        Py_ssize_t width) noexcept nogil:
    # Split over columns, never over rows: every thread count sums in one order.
    cdef PassTimer timer
    cdef int t, n_threads = pass_threads(PASS_BIAS_GRADIENT,
                                         n_rows * width if width >= 64 else 0,
                                         floating is double, &timer)
    if n_threads == 1:
        column_sums(dz, grad_bias, n_rows, width, 0, width)
    else:
        for t in prange(n_threads, num_threads=n_threads, schedule="static"):
            column_sums(dz, grad_bias, n_rows, width, t * width // n_threads,
                        (t + 1) * width // n_threads)
    pass_done(&timer)


# --------------------------------------------------------------------------- dropout
# The masks come from a counter-based stream: pass k's stream for layer l is SplitMix64
# (Steele, Lea and Flood, 2014) started at a hash of (key, k, l), and its n-th output
# decides elements 2n and 2n+1 (32 bits each). Any element's draw is a function of its
# position alone, so masks do not depend on how rows are split among threads.
cdef enum:
    STREAM_BLOCK = 1 << 12     # pairs of elements per parallel block


cdef inline uint64_t mix64(uint64_t z) noexcept nogil:
    # SplitMix64's output function: a bijection in which every output bit depends on
    # every input bit
    z = (z ^ (z >> 30)) * <uint64_t>0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * <uint64_t>0x94D049BB133111EBULL
    return z ^ (z >> 31)


cdef inline uint64_t dropout_key(const LayerSpec* layer, const PassMode* mode) noexcept nogil:
    """The start of this layer's stream in this training pass."""
    cdef uint64_t golden = <uint64_t>0x9E3779B97F4A7C15ULL
    return mix64(mix64(mix64(mode.stream_key + golden) + mode.stream_counter)
                 + <uint64_t>(layer.index + 1) * golden)


cdef void dropout_pairs(const floating* x, floating* mask, floating* a, Py_ssize_t n,
                        uint64_t key, uint64_t threshold, floating scale,
                        Py_ssize_t pair_begin, Py_ssize_t pair_end) noexcept nogil:
    """For the elements of pairs [pair_begin, pair_end) (of n elements): mask = 0
    (dropped) or scale, a = x * mask. Branch-free: the draws are random, so branches
    on them would be mispredicted half the time."""
    cdef Py_ssize_t k, e
    cdef uint64_t bits
    cdef floating low, high
    for k in range(pair_begin, pair_end):
        bits = mix64(key + <uint64_t>(k + 1) * <uint64_t>0x9E3779B97F4A7C15ULL)
        low = scale * <floating>((bits & 0xFFFFFFFFULL) >= threshold)
        high = scale * <floating>((bits >> 32) >= threshold)
        e = 2 * k
        if e + 1 < n:
            mask[e] = low
            mask[e + 1] = high
            a[e] = x[e] * low
            a[e + 1] = x[e + 1] * high
        else:  # the last of an odd number of elements
            mask[e] = low
            a[e] = x[e] * low


cdef void multiply_rows(const floating* x, const floating* factor, floating* out,
                        Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t e
    for e in range(n):
        out[e] = x[e] * factor[e]


cdef void dropout_forward(const LayerSpec* layer, const PassMode* mode, const floating* x,
                          Py_ssize_t n_rows, floating* mask, floating* a) noexcept nogil:
    """Training: mask = 0 with probability p, else 1/(1-p); a = x * mask (PyTorch's
    x * (1/(1-p)), in the network's dtype). Inference, or p = 0: a = x."""
    cdef Py_ssize_t n = n_rows * layer.n_out, n_pairs = (n + 1) // 2, b, n_blocks
    cdef int n_threads
    cdef uint64_t key, threshold
    cdef floating scale
    if not mode.training or layer.p == 0:
        if a != x:
            memcpy(a, x, n * sizeof(floating))
        return
    key = dropout_key(layer, mode)
    # drop when the 32 bits are below p * 2**32 (p < 1, so this fits in 32 bits)
    threshold = <uint64_t>(layer.p * 4294967296.0)
    scale = <floating>1 / <floating>(1 - layer.p)
    n_threads = _threads_for(n)
    n_blocks = (n_pairs + STREAM_BLOCK - 1) // STREAM_BLOCK
    if n_threads == 1 or n_blocks < 2:
        dropout_pairs(x, mask, a, n, key, threshold, scale, 0, n_pairs)
        return
    for b in prange(n_blocks, num_threads=n_threads, schedule="static"):
        dropout_pairs(x, mask, a, n, key, threshold, scale, b * STREAM_BLOCK,
                      min(n_pairs, (b + 1) * STREAM_BLOCK))


cdef void dropout_backward(const LayerSpec* layer, const PassMode* mode,
                           const floating* mask, Py_ssize_t n_rows, const floating* delta,
                           floating* grad_x) noexcept nogil:
    """dL/dx = dL/da * mask (the forward pass's 0 or 1/(1-p)); dL/da where it was the
    identity."""
    cdef Py_ssize_t n = n_rows * layer.n_out
    if grad_x == NULL:
        return
    if not mode.training or layer.p == 0:
        memcpy(grad_x, delta, n * sizeof(floating))
    else:
        multiply_rows(delta, mask, grad_x, n)


# --------------------------------------------------------------------------- normalisation
# Statistics are summed in double over rows in order (columns split among threads for
# BatchNorm1d, rows for LayerNorm), so they do not depend on the thread count. Both
# keep x_hat = (x - mean) / sqrt(var + eps) in z for the backward pass.

cdef void batch_norm_columns(const LayerSpec* layer, const floating* params,
                             floating* buffers, double* stats, bint batch_stats,
                             double factor, const floating* x, Py_ssize_t n_rows,
                             floating* z, floating* a, Py_ssize_t col_begin,
                             Py_ssize_t col_end) noexcept nogil:
    """BatchNorm1d forward on columns [col_begin, col_end): the batch's statistics
    (batch_stats; running ones updated by factor if factor > 0) or the running ones."""
    cdef Py_ssize_t i, j, width = layer.n_out
    cdef double* mean = stats + layer.stats_offset
    cdef double* invstd = mean + width
    cdef floating* running_mean = NULL
    cdef floating* running_var = NULL
    cdef const floating* xr
    cdef floating* zr
    cdef floating* ar
    cdef double deviation
    cdef floating xhat
    cdef const floating* weight = params + layer.weight_offset if layer.weight_offset >= 0 \
        else NULL
    cdef const floating* bias = params + layer.bias_offset if layer.bias_offset >= 0 \
        else NULL
    if layer.buffer_offset >= 0:
        running_mean = buffers + layer.buffer_offset
        running_var = running_mean + width
    if batch_stats:
        for j in range(col_begin, col_end):
            mean[j] = 0
            invstd[j] = 0
        for i in range(n_rows):
            xr = x + i * width
            for j in range(col_begin, col_end):
                mean[j] += xr[j]
        for j in range(col_begin, col_end):
            mean[j] = <floating>(mean[j] / n_rows)   # PyTorch keeps the mean in the dtype
        for i in range(n_rows):
            xr = x + i * width
            for j in range(col_begin, col_end):
                deviation = <double>xr[j] - mean[j]
                invstd[j] += deviation * deviation      # the sum of squares, for now
        for j in range(col_begin, col_end):
            if factor > 0:
                # PyTorch's order: momentum * batch + (1 - momentum) * running, with the
                # unbiased variance
                running_mean[j] = <floating>(factor * mean[j]
                                             + (1 - factor) * running_mean[j])
                running_var[j] = <floating>(factor * (invstd[j] / (n_rows - 1))
                                            + (1 - factor) * running_var[j])
            invstd[j] = 1 / sqrt(invstd[j] / n_rows + layer.eps)
    else:
        for j in range(col_begin, col_end):
            mean[j] = running_mean[j]
            invstd[j] = 1 / sqrt(<double>running_var[j] + layer.eps)
    for i in range(n_rows):
        xr = x + i * width
        zr = z + i * width
        ar = a + i * width
        for j in range(col_begin, col_end):
            xhat = (xr[j] - <floating>mean[j]) * <floating>invstd[j]
            zr[j] = xhat
            if weight != NULL:
                xhat = xhat * weight[j]
            if bias != NULL:
                xhat = xhat + bias[j]
            ar[j] = xhat


cdef inline bint batch_norm_uses_batch(const LayerSpec* layer,
                                       const PassMode* mode) noexcept nogil:
    # the batch's statistics: in training, and always without running ones
    return mode.training or layer.buffer_offset < 0


cdef void batch_norm_forward(const LayerSpec* layer, const floating* params,
                             floating* buffers, double* stats, const PassMode* mode,
                             const floating* x, Py_ssize_t n_rows, floating* z,
                             floating* a) noexcept nogil:
    cdef int t, n_threads = _threads_for(n_rows * layer.n_out)
    cdef Py_ssize_t width = layer.n_out
    cdef double factor = 0
    cdef floating* tracked
    if mode.training and layer.buffer_offset >= 0:
        tracked = buffers + layer.buffer_offset + 2 * width
        tracked[0] = tracked[0] + 1
        factor = layer.momentum if layer.momentum >= 0 else 1.0 / <double>tracked[0]
    if n_threads == 1 or width < 64:
        batch_norm_columns(layer, params, buffers, stats, batch_norm_uses_batch(layer, mode),
                           factor, x, n_rows, z, a, 0, width)
        return
    for t in prange(n_threads, num_threads=n_threads, schedule="static"):
        batch_norm_columns(layer, params, buffers, stats, batch_norm_uses_batch(layer, mode),
                           factor, x, n_rows, z, a, t * width // n_threads,
                           (t + 1) * width // n_threads)


cdef void batch_norm_backward_columns(const LayerSpec* layer, const floating* params,
                                      floating* grads, double* stats, bint batch_stats,
                                      const floating* xhat, Py_ssize_t n_rows,
                                      const floating* delta, floating* grad_x,
                                      Py_ssize_t col_begin, Py_ssize_t col_end) noexcept nogil:
    """Parameter gradients and dL/dx on columns [col_begin, col_end). With batch
    statistics, dx = (dy - mean(dy) - x_hat * mean(dy x_hat)) / std * weight."""
    cdef Py_ssize_t i, j, width = layer.n_out
    cdef const double* invstd = stats + layer.stats_offset + width
    cdef double* sum_dy = stats + layer.stats_offset + 2 * width
    cdef double* sum_dy_xhat = sum_dy + width
    cdef const floating* weight = params + layer.weight_offset if layer.weight_offset >= 0 \
        else NULL
    cdef floating scale, mean_dy, mean_dy_xhat
    weighted_column_sums(delta, xhat, sum_dy_xhat, sum_dy, n_rows, width, col_begin, col_end)
    for j in range(col_begin, col_end):
        if layer.weight_offset >= 0:
            grads[layer.weight_offset + j] = <floating>sum_dy_xhat[j]
        if layer.bias_offset >= 0:
            grads[layer.bias_offset + j] = <floating>sum_dy[j]
    if grad_x == NULL:
        return
    for i in range(n_rows):
        for j in range(col_begin, col_end):
            scale = <floating>invstd[j]
            if weight != NULL:
                scale = scale * weight[j]
            if batch_stats:
                mean_dy = <floating>(sum_dy[j] / n_rows)
                mean_dy_xhat = <floating>(sum_dy_xhat[j] / n_rows)
                grad_x[i * width + j] = (delta[i * width + j] - mean_dy
                                         - xhat[i * width + j] * mean_dy_xhat) * scale
            else:
                grad_x[i * width + j] = delta[i * width + j] * scale


cdef void batch_norm_backward(const LayerSpec* layer, const floating* params,
                              floating* grads, double* stats, const PassMode* mode,
                              const floating* xhat, Py_ssize_t n_rows, const floating* delta,
                              floating* grad_x) noexcept nogil:
    cdef int t, n_threads = _threads_for(n_rows * layer.n_out)
    cdef Py_ssize_t width = layer.n_out
    if n_threads == 1 or width < 64:
        batch_norm_backward_columns(layer, params, grads, stats,
                                    batch_norm_uses_batch(layer, mode), xhat, n_rows, delta,
                                    grad_x, 0, width)
        return
    for t in prange(n_threads, num_threads=n_threads, schedule="static"):
        batch_norm_backward_columns(layer, params, grads, stats,
                                    batch_norm_uses_batch(layer, mode), xhat, n_rows, delta,
                                    grad_x, t * width // n_threads,
                                    (t + 1) * width // n_threads)


cdef void layer_norm_rows(const LayerSpec* layer, const floating* params, const floating* x,
                          floating* z, floating* a, floating* rstd_out,
                          Py_ssize_t row_begin, Py_ssize_t row_end) noexcept nogil:
    """LayerNorm forward on rows [row_begin, row_end); 1/std of each row into rstd_out
    unless it is NULL."""
    cdef Py_ssize_t i, j, width = layer.n_out
    cdef const floating* weight = params + layer.weight_offset if layer.weight_offset >= 0 \
        else NULL
    cdef const floating* bias = params + layer.bias_offset if layer.bias_offset >= 0 \
        else NULL
    cdef const floating* xr
    cdef floating* zr
    cdef floating* ar
    cdef double total, deviation
    cdef floating mean, rstd, xhat
    for i in range(row_begin, row_end):
        xr = x + i * width
        zr = z + i * width
        ar = a + i * width
        total = 0
        for j in range(width):
            total += xr[j]
        mean = <floating>(total / width)
        total = 0
        for j in range(width):
            deviation = <double>xr[j] - mean
            total += deviation * deviation
        rstd = <floating>(1 / sqrt(total / width + layer.eps))
        if rstd_out != NULL:
            rstd_out[i] = rstd
        for j in range(width):
            xhat = (xr[j] - mean) * rstd
            zr[j] = xhat
            if weight != NULL:
                xhat = xhat * weight[j]
            if bias != NULL:
                xhat = xhat + bias[j]
            ar[j] = xhat


cdef void layer_norm_forward(const LayerSpec* layer, const floating* params,
                             const floating* x, Py_ssize_t n_rows, floating* z, floating* a,
                             floating* rstd) noexcept nogil:
    cdef int t, n_threads = _threads_for(n_rows * layer.n_out)
    if n_threads == 1 or n_rows < 2:
        layer_norm_rows(layer, params, x, z, a, rstd, 0, n_rows)
        return
    for t in prange(n_threads, num_threads=n_threads, schedule="static"):
        layer_norm_rows(layer, params, x, z, a, rstd, t * n_rows // n_threads,
                        (t + 1) * n_rows // n_threads)


cdef void weighted_column_sums(const floating* delta, const floating* xhat,
                               double* sum_dy_xhat, double* sum_dy, Py_ssize_t n_rows,
                               Py_ssize_t width, Py_ssize_t col_begin,
                               Py_ssize_t col_end) noexcept nogil:
    """sum_dy_xhat[j] = sum_i delta * xhat and sum_dy[j] = sum_i delta on columns
    [col_begin, col_end), in double, rows in order."""
    cdef Py_ssize_t i, j
    cdef const floating* dr
    cdef const floating* hr
    for j in range(col_begin, col_end):
        sum_dy[j] = 0
        sum_dy_xhat[j] = 0
    for i in range(n_rows):
        dr = delta + i * width
        hr = xhat + i * width
        for j in range(col_begin, col_end):
            sum_dy[j] += dr[j]
            sum_dy_xhat[j] += <double>dr[j] * hr[j]


cdef void layer_norm_grad_rows(const LayerSpec* layer, const floating* params,
                               const floating* xhat, const floating* rstd,
                               const floating* delta, floating* grad_x,
                               Py_ssize_t row_begin, Py_ssize_t row_end) noexcept nogil:
    """dx = (g - mean(g) - x_hat * mean(g x_hat)) / std with g = dy * weight, per row."""
    cdef Py_ssize_t i, j, width = layer.n_out
    cdef const floating* weight = params + layer.weight_offset if layer.weight_offset >= 0 \
        else NULL
    cdef const floating* dr
    cdef const floating* hr
    cdef floating* gr
    cdef double sum_g, sum_g_xhat
    cdef floating g, mean_g, mean_g_xhat
    for i in range(row_begin, row_end):
        dr = delta + i * width
        hr = xhat + i * width
        gr = grad_x + i * width
        sum_g = 0
        sum_g_xhat = 0
        for j in range(width):
            g = dr[j] * weight[j] if weight != NULL else dr[j]
            sum_g += g
            sum_g_xhat += <double>g * hr[j]
        mean_g = <floating>(sum_g / width)
        mean_g_xhat = <floating>(sum_g_xhat / width)
        for j in range(width):
            g = dr[j] * weight[j] if weight != NULL else dr[j]
            gr[j] = (g - mean_g - hr[j] * mean_g_xhat) * rstd[i]


cdef void layer_norm_backward(const LayerSpec* layer, const floating* params,
                              floating* grads, double* stats, const floating* xhat,
                              const floating* rstd, Py_ssize_t n_rows, const floating* delta,
                              floating* grad_x) noexcept nogil:
    cdef int t, n_threads = _threads_for(n_rows * layer.n_out)
    cdef Py_ssize_t j, width = layer.n_out
    cdef double* sum_dy_xhat = stats + layer.stats_offset
    cdef double* sum_dy = sum_dy_xhat + width
    if layer.weight_offset >= 0:
        if n_threads == 1 or width < 64:
            weighted_column_sums(delta, xhat, sum_dy_xhat, sum_dy, n_rows, width, 0, width)
        else:
            for t in prange(n_threads, num_threads=n_threads, schedule="static"):
                weighted_column_sums(delta, xhat, sum_dy_xhat, sum_dy, n_rows, width,
                                     t * width // n_threads, (t + 1) * width // n_threads)
        for j in range(width):
            grads[layer.weight_offset + j] = <floating>sum_dy_xhat[j]
            if layer.bias_offset >= 0:
                grads[layer.bias_offset + j] = <floating>sum_dy[j]
    if grad_x == NULL:
        return
    if n_threads == 1 or n_rows < 2:
        layer_norm_grad_rows(layer, params, xhat, rstd, delta, grad_x, 0, n_rows)
        return
    for t in prange(n_threads, num_threads=n_threads, schedule="static"):
        layer_norm_grad_rows(layer, params, xhat, rstd, delta, grad_x,
                             t * n_rows // n_threads, (t + 1) * n_rows // n_threads)


# --------------------------------------------------------------------------- activation
cdef int activation_layer_forward(const LayerSpec* layer, const floating* x,
                                  Py_ssize_t n_rows, floating* z, floating* a) except -1 nogil:
    """a = g(x); z (a copy of x) where the kind keeps it, else computed in place in a.
    -1: a custom activation raised."""
    memcpy(z, x, n_rows * layer.n_out * sizeof(floating))
    return bias_activation(z, a, <const floating*>NULL, n_rows, layer.n_out,
                           layer.activation, layer.param, layer.callback)


cdef void activation_layer_backward(const LayerSpec* layer, const floating* a,
                                    const floating* z, Py_ssize_t n_rows, floating* delta,
                                    bint delta_is_dz, floating* grad_x) noexcept nogil:
    if not delta_is_dz:
        activation_backward(delta, a, z, n_rows, layer.n_out, layer.activation, layer.param)
    if grad_x != NULL:
        memcpy(grad_x, delta, n_rows * layer.n_out * sizeof(floating))


# --------------------------------------------------------------------------- dispatch
cdef inline int layer_forward(const LayerSpec* layer, const floating* params,
                              floating* buffers, double* stats, const PassMode* mode,
                              const Workspace* ws, const floating* x, Py_ssize_t n_rows,
                              floating* z, floating* a) except -1 nogil:
    """a = the layer applied to x (n_rows rows); z: what the backward pass needs
    (Dense's pre-activation, Dropout's mask, x_hat), or a itself where nothing is kept
    (inference). ws is NULL in inference (nothing kept beyond z); stats: the batch
    statistics of BatchNorm1d (scratch in inference). -1: a custom activation raised."""
    if layer.kind == KIND_DENSE:
        return dense_forward(layer, params, x, n_rows, z, a)
    elif layer.kind == KIND_DROPOUT:
        dropout_forward(layer, mode, x, n_rows, z, a)
    elif layer.kind == KIND_BATCH_NORM1D:
        batch_norm_forward(layer, params, buffers, stats, mode, x, n_rows, z, a)
    elif layer.kind == KIND_LAYER_NORM:
        # each row's 1/std after the x_hat block, where the backward pass will need it
        layer_norm_forward(layer, params, x, n_rows, z, a,
                           z + ws.capacity * layer.n_out if ws != NULL else NULL)
    elif layer.kind == KIND_ACTIVATION:
        return activation_layer_forward(layer, x, n_rows, z, a)
    return 0


cdef inline void layer_backward(const LayerSpec* layer, const floating* params,
                                floating* grads, double* stats, const PassMode* mode,
                                const Workspace* ws, const floating* x, const floating* a,
                                const floating* z, Py_ssize_t n_rows, floating* delta,
                                bint delta_is_dz, floating* grad_x) noexcept nogil:
    """From delta = dL/d(the layer's output) (overwritten), or dL/dz where delta_is_dz
    (the loss fused the activation), the layer's parameter gradients and, unless
    grad_x is NULL, dL/dx. x, a, z: the layer's input, output and kept z; mode: the
    mode the forward pass ran in."""
    if layer.kind == KIND_DENSE:
        dense_backward(layer, params, grads, x, a, z, n_rows, delta, delta_is_dz, grad_x)
    elif layer.kind == KIND_DROPOUT:
        dropout_backward(layer, mode, z, n_rows, delta, grad_x)
    elif layer.kind == KIND_BATCH_NORM1D:
        batch_norm_backward(layer, params, grads, stats, mode, z, n_rows, delta, grad_x)
    elif layer.kind == KIND_LAYER_NORM:
        layer_norm_backward(layer, params, grads, stats, z, z + ws.capacity * layer.n_out,
                            n_rows, delta, grad_x)
    elif layer.kind == KIND_ACTIVATION:
        activation_layer_backward(layer, a, z, n_rows, delta, delta_is_dz, grad_x)
