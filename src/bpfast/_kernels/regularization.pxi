# L2 penalty and gradient clipping, summed in blocks independent of the thread count.
# Included by _core.pyx.

cdef struct StepOptions:
    double l2            # loss += l2 / 2 * sum of squared weights (not biases); 0: off
    double clip_value    # clamp each gradient to [-clip_value, clip_value]; <= 0: off
    double clip_norm     # rescale the gradient to this global L2 norm at most; <= 0: off
    double* partials     # scratch of one double per REDUCTION_BLOCK parameters


cdef double block_sum_squares(const floating* x, floating* axpy, floating coef,
                              Py_ssize_t begin, Py_ssize_t end) noexcept nogil:
    """sum(x[begin:end]**2) in double; if axpy != NULL also axpy += coef * x there."""
    cdef Py_ssize_t i
    cdef double acc = 0
    for i in range(begin, end):
        acc += <double>x[i] * <double>x[i]
    if axpy != NULL:
        for i in range(begin, end):
            axpy[i] = axpy[i] + coef * x[i]
    return acc


cdef double sum_squares(const floating* x, floating* axpy, double coef, Py_ssize_t n,
                        double* partials) noexcept nogil:
    """sum(x**2) (and axpy += coef * x) over fixed blocks, in parallel above the threshold.

    The blocks do not depend on the thread count, and their sums are added in
    order, so the result is the same with any number of threads.
    """
    cdef Py_ssize_t b, n_blocks = (n + REDUCTION_BLOCK - 1) // REDUCTION_BLOCK
    cdef PassTimer timer
    cdef int n_threads = pass_threads(PASS_SUM_SQUARES, n, floating is double, &timer)
    cdef double total = 0
    if n_threads == 1:
        for b in range(n_blocks):
            partials[b] = block_sum_squares(x, axpy, <floating>coef, b * REDUCTION_BLOCK,
                                            min(n, (b + 1) * REDUCTION_BLOCK))
    else:
        for b in prange(n_blocks, num_threads=n_threads, schedule="static"):
            partials[b] = block_sum_squares(x, axpy, <floating>coef, b * REDUCTION_BLOCK,
                                            min(n, (b + 1) * REDUCTION_BLOCK))
    pass_done(&timer)
    for b in range(n_blocks):
        total += partials[b]
    return total


cdef void clip_range(floating* grad, floating limit, floating scale, Py_ssize_t begin,
                     Py_ssize_t end) noexcept nogil:
    """grad = clamp(grad, -limit, limit) if limit > 0, then grad *= scale if scale != 1."""
    cdef Py_ssize_t i
    cdef floating g
    if limit > 0:
        for i in range(begin, end):
            g = grad[i]
            # written so that NaN passes through: clipping must not hide a divergence
            if g > limit:
                g = limit
            elif g < -limit:
                g = -limit
            grad[i] = g
    if scale != 1:
        for i in range(begin, end):
            grad[i] = grad[i] * scale


cdef void clip(floating* grad, Py_ssize_t n, double limit, double scale) noexcept nogil:
    cdef PassTimer timer
    cdef int t, n_threads = pass_threads(PASS_CLIP, n, floating is double, &timer)
    if n_threads == 1:
        clip_range(grad, <floating>limit, <floating>scale, 0, n)
    else:
        for t in prange(n_threads, num_threads=n_threads, schedule="static"):
            clip_range(grad, <floating>limit, <floating>scale, t * n // n_threads,
                       (t + 1) * n // n_threads)
    pass_done(&timer)


cdef double regularize_and_clip(const LayerSpec* layers, int n_layers,
                                const StepOptions* options, const floating* params,
                                floating* grads, Py_ssize_t n_params) noexcept nogil:
    """Add the L2 term to the weight gradients, then clip by value and by global norm.

    Returns the L2 term of the loss (0 without it); NaN if the gradient norm is not
    finite, so that the step is treated as diverged instead of updating with it.
    """
    cdef int l
    cdef double penalty = 0, norm, scale
    cdef Py_ssize_t n_weights
    if options.l2 > 0:
        for l in range(n_layers):
            n_weights = <Py_ssize_t>layers[l].n_in * layers[l].n_out
            penalty += sum_squares(params + layers[l].weight_offset,
                                   grads + layers[l].weight_offset, options.l2, n_weights,
                                   options.partials)
        penalty *= 0.5 * options.l2
    if options.clip_value > 0:
        clip(grads, n_params, options.clip_value, 1.0)
    if options.clip_norm > 0:
        norm = sqrt(sum_squares(grads, <floating*>NULL, 0.0, n_params, options.partials))
        if not isfinite(norm):
            return norm
        # PyTorch's clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is < 1
        scale = options.clip_norm / (norm + 1e-6)
        if scale < 1.0:
            clip(grads, n_params, 0.0, scale)
    return penalty
