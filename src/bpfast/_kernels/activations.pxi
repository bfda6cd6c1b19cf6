# Bias + activation forward and the activation derivative, row blocks under OpenMP.
# Included by _core.pyx.

# torch.nn.SELU's constants (alpha and scale of "Self-Normalizing Neural Networks")
cdef double SELU_ALPHA = 1.6732632423543772848170429916717
cdef double SELU_SCALE = 1.0507009873554804934193349852946

cdef void bias_activation_rows(floating* z, floating* a, const floating* bias,
                               Py_ssize_t row_begin, Py_ssize_t row_end,
                               Py_ssize_t width, int activation,
                               double param) noexcept nogil:
    """z += bias; a = g(z) on rows [row_begin, row_end). a may alias z."""
    cdef Py_ssize_t i, j
    cdef floating *zr
    cdef floating *ar
    cdef floating v, row_max, total, p = <floating>param
    for i in range(row_begin, row_end):
        zr = z + i * width
        ar = a + i * width
        if bias != NULL:
            for j in range(width):
                zr[j] = zr[j] + bias[j]
        if activation == ACT_IDENTITY:
            if ar != zr:
                for j in range(width):
                    ar[j] = zr[j]
        elif activation == ACT_SIGMOID:
            for j in range(width):
                ar[j] = _sigmoid(zr[j])
        elif activation == ACT_TANH:
            for j in range(width):
                ar[j] = _tanh(zr[j])
        elif activation == ACT_RELU:
            # "not <= 0" lets NaN through, as PyTorch's relu does.
            for j in range(width):
                v = zr[j]
                ar[j] = 0 if v <= 0 else v
        elif activation == ACT_LEAKY_RELU:
            for j in range(width):
                v = zr[j]
                ar[j] = v if v > 0 else v * p
        elif activation == ACT_ELU:
            for j in range(width):
                v = zr[j]
                ar[j] = v if v > 0 else p * _expm1(v)
        elif activation == ACT_SOFTPLUS:
            for j in range(width):
                v = zr[j]
                ar[j] = v if v > SOFTPLUS_THRESHOLD else _log1p(_exp(v))
        elif activation == ACT_GELU:
            for j in range(width):
                v = zr[j]
                ar[j] = v * <floating>0.5 * (1 + _erf(v * <floating>SQRT1_2))
        elif activation == ACT_SILU:
            # PyTorch's silu: x / (1 + exp(-x))
            for j in range(width):
                v = zr[j]
                ar[j] = v / (1 + _exp(-v))
        elif activation == ACT_MISH:
            # PyTorch's mish: x * tanh(log1p(exp(x))), softplus without a threshold
            for j in range(width):
                v = zr[j]
                ar[j] = v * _tanh(_log1p(_exp(v)))
        elif activation == ACT_HARDTANH:
            # clamp to [-1, 1]; NaN passes, as torch.clamp's
            for j in range(width):
                v = zr[j]
                ar[j] = -1 if v < -1 else (1 if v > 1 else v)
        elif activation == ACT_SELU:
            # PyTorch's elu kernel with scale: expm1(x) * (alpha * scale) at x <= 0
            for j in range(width):
                v = zr[j]
                ar[j] = (v * <floating>SELU_SCALE if v > 0 else
                         _expm1(v) * (<floating>SELU_ALPHA * <floating>SELU_SCALE))
        elif activation == ACT_SOFTSIGN:
            for j in range(width):
                v = zr[j]
                ar[j] = v / (fabs(v) + 1)
        elif activation == ACT_SOFTMAX:
            row_max = zr[0]
            for j in range(1, width):
                if zr[j] > row_max:
                    row_max = zr[j]
            total = 0
            for j in range(width):
                ar[j] = _exp(zr[j] - row_max)
                total = total + ar[j]
            for j in range(width):
                ar[j] = ar[j] / total


cdef void activation_backward_rows(floating* grad, const floating* a, const floating* z,
                                   Py_ssize_t row_begin, Py_ssize_t row_end,
                                   Py_ssize_t width, int activation,
                                   double param) noexcept nogil:
    """grad = dL/da -> dL/dz in place, on rows [row_begin, row_end).

    Uses the output a where the derivative is a function of it (sigmoid, tanh,
    relu, hardtanh, softmax) and the pre-activation z otherwise (leaky_relu, elu,
    softplus, gelu, silu, mish, selu, softsign), so every derivative is exact for any
    parameter value. For a custom (Python) activation z holds g'(z) itself.
    """
    cdef Py_ssize_t i, j
    cdef floating *gr
    cdef const floating *ar
    cdef const floating *zr
    cdef floating v, e, dot, p = <floating>param
    for i in range(row_begin, row_end):
        gr = grad + i * width
        ar = a + i * width
        zr = z + i * width
        if activation == ACT_SIGMOID:
            for j in range(width):
                gr[j] = gr[j] * (1 - ar[j]) * ar[j]
        elif activation == ACT_TANH:
            for j in range(width):
                gr[j] = gr[j] * (1 - ar[j] * ar[j])
        elif activation == ACT_RELU:
            # selects, not conditional stores, so the loops vectorize
            for j in range(width):
                gr[j] = 0 if ar[j] <= 0 else gr[j]
        elif activation == ACT_LEAKY_RELU:
            for j in range(width):
                gr[j] = gr[j] if zr[j] > 0 else gr[j] * p
        elif activation == ACT_ELU:
            for j in range(width):
                v = zr[j]
                if v <= 0:
                    gr[j] = gr[j] * p * _exp(v)
        elif activation == ACT_SOFTPLUS:
            for j in range(width):
                v = zr[j]
                if not v > SOFTPLUS_THRESHOLD:
                    e = _exp(v)
                    gr[j] = gr[j] * e / (e + 1)
        elif activation == ACT_GELU:
            for j in range(width):
                v = zr[j]
                gr[j] = gr[j] * (<floating>0.5 * (1 + _erf(v * <floating>SQRT1_2))
                                 + v * <floating>GELU_PDF_SCALE * _exp(v * v * <floating>-0.5))
        elif activation == ACT_SILU:
            # PyTorch's silu_backward: s * (1 + x * (1 - s)), s = 1 / (1 + exp(-x))
            for j in range(width):
                v = zr[j]
                e = 1 / (1 + _exp(-v))
                gr[j] = gr[j] * e * (1 + v * (1 - e))
        elif activation == ACT_MISH:
            # PyTorch's mish_backward: t + x * s * (1 - t^2), t = tanh(softplus(x))
            for j in range(width):
                v = zr[j]
                e = 1 / (1 + _exp(-v))
                dot = _tanh(_log1p(_exp(v)))
                gr[j] = gr[j] * (dot + v * e * (1 - dot * dot))
        elif activation == ACT_HARDTANH:
            # PyTorch's hardtanh_backward: 0 at and beyond the bounds; from the output,
            # which is at a bound exactly where the input is
            for j in range(width):
                gr[j] = 0 if (ar[j] <= -1 or ar[j] >= 1) else gr[j]
        elif activation == ACT_SELU:
            # PyTorch's elu_backward on the input: alpha * scale * exp(x) at x <= 0
            for j in range(width):
                v = zr[j]
                gr[j] = (gr[j] * (<floating>SELU_ALPHA * <floating>SELU_SCALE) * _exp(v)
                         if v <= 0 else gr[j] * <floating>SELU_SCALE)
        elif activation == ACT_SOFTSIGN:
            # d/dx x / (1 + |x|) = 1 / (1 + |x|)^2 (1 at 0, as PyTorch's autograd)
            for j in range(width):
                e = fabs(zr[j]) + 1
                gr[j] = gr[j] / (e * e)
        elif activation == ACT_CUSTOM:
            # the forward pass left the derivative g'(z) where z was (custom_activation)
            for j in range(width):
                gr[j] = gr[j] * zr[j]
        elif activation == ACT_SOFTMAX:
            # Jacobian-vector product of softmax: a * (g - <g, a>).
            dot = 0
            for j in range(width):
                dot = dot + gr[j] * ar[j]
            for j in range(width):
                gr[j] = ar[j] * (gr[j] - dot)


# Parallel drivers: split rows (or columns) into one contiguous block per thread.
cdef int bias_activation(floating* z, floating* a, const floating* bias, Py_ssize_t n_rows,
                         Py_ssize_t width, int activation, double param,
                         PyObject* callback) except -1 nogil:
    """z += bias, a = g(z). A custom activation (callback: its PythonCallback) runs as
    one Python call on the whole block; an exception there propagates (-1)."""
    cdef PassTimer timer
    cdef int t, n_threads
    if activation == ACT_CUSTOM:
        # the bias as its own (timed) pass, then the Python call, which is not timed
        if bias != NULL:
            bias_activation(z, z, bias, n_rows, width, ACT_IDENTITY, param, NULL)
        return custom_activation(callback, z, a, n_rows, width)
    n_threads = pass_threads(PASS_BIAS_ACTIVATION, n_rows * width if n_rows > 1 else 0,
                             floating is double, &timer)
    if n_threads == 1:
        bias_activation_rows(z, a, bias, 0, n_rows, width, activation, param)
    else:
        for t in prange(n_threads, num_threads=n_threads, schedule="static"):
            bias_activation_rows(z, a, bias, t * n_rows // n_threads,
                                 (t + 1) * n_rows // n_threads, width, activation, param)
    pass_done(&timer)
    return 0


cdef void activation_backward(floating* grad, const floating* a, const floating* z,
                              Py_ssize_t n_rows, Py_ssize_t width, int activation,
                              double param) noexcept nogil:
    cdef PassTimer timer
    cdef int t, n_threads
    if activation == ACT_IDENTITY:
        return
    n_threads = pass_threads(PASS_ACTIVATION_BACKWARD, n_rows * width if n_rows > 1 else 0,
                             floating is double, &timer)
    if n_threads == 1:
        activation_backward_rows(grad, a, z, 0, n_rows, width, activation, param)
    else:
        for t in prange(n_threads, num_threads=n_threads, schedule="static"):
            activation_backward_rows(grad, a, z, t * n_rows // n_threads,
                                     (t + 1) * n_rows // n_threads, width, activation, param)
    pass_done(&timer)
