# The layer table and the dense layer's forward and backward kernels. Included by
# _core.pyx.

cdef struct LayerSpec:
    int n_in, n_out
    int activation
    double param               # leaky_relu slope or elu alpha
    Py_ssize_t weight_offset   # into the flat parameter / gradient buffers
    Py_ssize_t bias_offset     # -1: no bias
    Py_ssize_t a_column        # start of this layer's block in the activation workspace
    Py_ssize_t z_column        # same in the pre-activation workspace; -1: z not kept


cdef struct Workspace:
    # The sizes of the engine's workspaces, which the kernels get as typed pointers:
    # acts and zs hold per-layer blocks of `capacity` rows each (layer l's output is
    # the row-major (m, n_out) matrix at acts + capacity * a_column); delta holds two
    # (capacity, max_width) ping-pong buffers of dL/dz.
    Py_ssize_t capacity
    Py_ssize_t max_width
    double* row_loss


cdef inline floating* _layer_output(const LayerSpec* layer, const Workspace* ws,
                                    floating* acts) noexcept nogil:
    return acts + ws.capacity * layer.a_column


cdef inline floating* _layer_z(const LayerSpec* layer, const Workspace* ws, floating* acts,
                               floating* zs) noexcept nogil:
    # the pre-activation z, or the output itself where z is not kept (computed in place)
    if layer.z_column < 0:
        return _layer_output(layer, ws, acts)
    return zs + ws.capacity * layer.z_column


cdef void dense_forward(const LayerSpec* layer, const floating* params, const floating* x,
                        Py_ssize_t n_rows, floating* z, floating* a) noexcept nogil:
    """z = x W^T + b, a = g(z); a may alias z. One GEMM (GEMV for one row), one pass over z."""
    if n_rows == 1:
        matvec(params + layer.weight_offset, layer.n_out, layer.n_in, x, z)
    else:
        gemm(False, True, <int>n_rows, layer.n_out, layer.n_in, x, layer.n_in,
             params + layer.weight_offset, layer.n_in, 0, z, layer.n_out)
    bias_activation(z, a, params + layer.bias_offset if layer.bias_offset >= 0 else NULL,
                    n_rows, layer.n_out, layer.activation, layer.param)


cdef void dense_backward(const LayerSpec* layer, const floating* params, floating* grads,
                         const floating* x, Py_ssize_t n_rows, const floating* dz,
                         floating* grad_x) noexcept nogil:
    """dW = dz^T x, db = column sums of dz, and (if grad_x != NULL) dx = dz W."""
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
    cdef int t, n_threads = _threads_for(n_rows * width)
    if n_threads == 1 or width < 64:
        column_sums(dz, grad_bias, n_rows, width, 0, width)
        return
    for t in prange(n_threads, num_threads=n_threads, schedule="static"):
        column_sums(dz, grad_bias, n_rows, width, t * width // n_threads,
                    (t + 1) * width // n_threads)
