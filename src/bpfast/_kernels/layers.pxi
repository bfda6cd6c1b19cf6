# The layer table: each layer has a kind, and each kind one forward and one backward
# kernel, reached through layer_forward and layer_backward. A new kind of layer is an
# entry in the kind enum (_core.pyx), its two kernels here, and a case in each of the
# two dispatchers. Included by _core.pyx.

cdef struct LayerSpec:
    int kind                   # KIND_*: which kernels run this layer
    int n_in, n_out
    int activation
    double param               # leaky_relu slope or elu alpha
    PyObject* callback         # ACT_CUSTOM: its PythonCallback (the Engine keeps it alive)
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
    cdef int t, n_threads = _threads_for(n_rows * width)
    if n_threads == 1 or width < 64:
        column_sums(dz, grad_bias, n_rows, width, 0, width)
        return
    for t in prange(n_threads, num_threads=n_threads, schedule="static"):
        column_sums(dz, grad_bias, n_rows, width, t * width // n_threads,
                    (t + 1) * width // n_threads)


# --------------------------------------------------------------------------- dispatch
cdef inline int layer_forward(const LayerSpec* layer, const floating* params,
                              const floating* x, Py_ssize_t n_rows, floating* z,
                              floating* a) except -1 nogil:
    """a = the layer applied to x (n_rows rows); z: its pre-activation where the kind
    keeps one (z may alias a). -1: a custom activation raised."""
    if layer.kind == KIND_DENSE:
        return dense_forward(layer, params, x, n_rows, z, a)
    return 0


cdef inline void layer_backward(const LayerSpec* layer, const floating* params,
                                floating* grads, const floating* x, const floating* a,
                                const floating* z, Py_ssize_t n_rows, floating* delta,
                                bint delta_is_dz, floating* grad_x) noexcept nogil:
    """From delta = dL/d(the layer's output) (overwritten), or dL/dz where delta_is_dz
    (the loss fused the activation), the layer's parameter gradients and, unless
    grad_x is NULL, dL/dx. x, a, z: the layer's input, output and kept z."""
    if layer.kind == KIND_DENSE:
        dense_backward(layer, params, grads, x, a, z, n_rows, delta, delta_is_dz, grad_x)
