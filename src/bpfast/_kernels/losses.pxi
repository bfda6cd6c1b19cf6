# Losses: the value, and dL/d(output) (or dL/dz where fused). Included by _core.pyx.

cdef struct LossParams:
    int kind
    double param          # MSE: 1 or 1/2 (half); Huber: delta
    int reduction         # REDUCTION_MEAN or REDUCTION_SUM
    PyObject* callback    # LOSS_CUSTOM: its PythonCallback (the LossConfig keeps it alive)


cdef void loss_rows(const LossParams* loss, const floating* out, const floating* target,
                    const intp* labels, const double* weights, floating* grad,
                    double* row_loss, Py_ssize_t row_begin, Py_ssize_t row_end,
                    Py_ssize_t width, double grad_scale) noexcept nogil:
    """Per-row loss sums into row_loss and, if grad != NULL, grad_scale * dloss/dout.

    target is (n, width) for every loss but cross-entropy with labels (n,).
    With weights != NULL, row i's loss and gradient are multiplied by weights[i].
    Sums are accumulated in double.
    """
    cdef Py_ssize_t i, j
    cdef const floating *o
    cdef const floating *t
    cdef floating *g
    cdef floating d, v, row_max, scale = <floating>grad_scale
    cdef floating delta = <floating>loss.param, prob, target_sum
    cdef double acc, total, lse
    cdef int kind = loss.kind
    for i in range(row_begin, row_end):
        o = out + i * width
        t = target + i * width if target != NULL else NULL
        g = grad + i * width if grad != NULL else NULL
        if weights != NULL:
            scale = <floating>(grad_scale * weights[i])
        acc = 0
        if kind == LOSS_MSE:
            for j in range(width):
                d = o[j] - t[j]
                acc += d * d
                if g != NULL:
                    g[j] = scale * d
        elif kind == LOSS_L1:
            for j in range(width):
                d = o[j] - t[j]
                acc += fabs(d)
                if g != NULL:
                    g[j] = scale if d > 0 else (-scale if d < 0 else 0 * d)
        elif kind == LOSS_HUBER:
            for j in range(width):
                d = o[j] - t[j]
                v = fabs(d)
                acc += <floating>0.5 * v * v if v < delta else delta * (v - <floating>0.5 * delta)
                if g != NULL:
                    g[j] = scale * (-delta if d < -delta else (delta if d > delta else d))
        elif kind == LOSS_CROSS_ENTROPY:
            # log-sum-exp with the row max subtracted; gradient softmax * sum(y) - y.
            row_max = o[0]
            for j in range(1, width):
                if o[j] > row_max:
                    row_max = o[j]
            # one exp per element, kept in grad until the sum is known
            total = 0
            for j in range(width):
                v = _exp(o[j] - row_max)
                total += v
                if g != NULL:
                    g[j] = v
            lse = log(total)
            if labels != NULL:
                acc = lse - (o[labels[i]] - row_max)
                target_sum = 1
            else:
                target_sum = 0
                for j in range(width):
                    acc -= t[j] * ((o[j] - row_max) - lse)
                    target_sum = target_sum + t[j]
            if g != NULL:
                if labels != NULL:
                    for j in range(width):
                        g[j] = scale * <floating>(g[j] / total)
                    g[labels[i]] = g[labels[i]] - scale
                else:
                    for j in range(width):
                        g[j] = scale * (<floating>(g[j] / total) * target_sum - t[j])
        elif kind == LOSS_CROSS_ENTROPY_PROBS:
            # outputs are probabilities (a softmax already applied by the caller)
            for j in range(width):
                v = t[j] if labels == NULL else (1 if j == labels[i] else 0)
                prob = o[j]
                if v != 0:
                    acc -= v * max(log(prob), LOG_CLAMP)
                if g != NULL:
                    g[j] = -scale * v / (prob if prob > PROB_EPS else <floating>PROB_EPS)
        elif kind == LOSS_BINARY_CROSS_ENTROPY:
            for j in range(width):
                acc += (1 - t[j]) * o[j] - _log_sigmoid(o[j])
                if g != NULL:
                    g[j] = scale * (_sigmoid(o[j]) - t[j])
        elif kind == LOSS_BINARY_CROSS_ENTROPY_PROBS:
            for j in range(width):
                prob = o[j]
                acc += ((t[j] - 1) * max(log1p(-prob), LOG_CLAMP)
                        - t[j] * max(log(prob), LOG_CLAMP))
                if g != NULL:
                    v = (1 - prob) * prob
                    v = v if v > BCE_GRAD_EPS else <floating>BCE_GRAD_EPS
                    g[j] = scale * (prob - t[j]) / v
        row_loss[i] = acc if weights == NULL else acc * weights[i]


cdef double weight_sum(const double* weights, Py_ssize_t n_rows) noexcept nogil:
    """The total weight of a batch: n_rows when unweighted."""
    cdef Py_ssize_t i
    cdef double total = 0
    if weights == NULL:
        return <double>n_rows
    for i in range(n_rows):
        total += weights[i]
    return total


cdef double loss_and_gradient(const LossParams* loss, const floating* out,
                              const floating* target, const intp* labels,
                              const double* weights, floating* grad, double* row_loss,
                              Py_ssize_t n_rows, Py_ssize_t width) noexcept nogil:
    """The loss with PyTorch's reduction and, if grad != NULL, its gradient dL/dout.

    "mean": with per-row weights the mean is weighted, sum(w_i * loss_i) / sum(w_i),
    as PyTorch weights cross-entropy by class; a batch whose weights are all zero
    has loss 0 and a zero gradient. "sum": sum(w_i * loss_i), no division.
    """
    cdef PassTimer timer
    cdef int t, n_threads = pass_threads(PASS_LOSS, n_rows * width * 8 if n_rows > 1 else 0,
                                         floating is double, &timer)
    cdef Py_ssize_t i
    cdef double total = 0, denominator = 1.0, grad_scale
    if loss.reduction == REDUCTION_MEAN:
        # cross-entropy averages over samples, every other loss over all elements
        denominator = weight_sum(weights, n_rows)
        if not (loss.kind == LOSS_CROSS_ENTROPY or loss.kind == LOSS_CROSS_ENTROPY_PROBS):
            denominator *= <double>width
    grad_scale = 2.0 * loss.param if loss.kind == LOSS_MSE else 1.0
    grad_scale = grad_scale / denominator if denominator > 0 else 0.0
    if n_threads == 1:
        loss_rows(loss, out, target, labels, weights, grad, row_loss, 0, n_rows, width,
                  grad_scale)
    else:
        for t in prange(n_threads, num_threads=n_threads, schedule="static"):
            loss_rows(loss, out, target, labels, weights, grad, row_loss,
                      t * n_rows // n_threads, (t + 1) * n_rows // n_threads, width,
                      grad_scale)
    pass_done(&timer)
    for i in range(n_rows):  # one summation order for any thread count
        total += row_loss[i]
    if loss.kind == LOSS_MSE:
        total *= loss.param
    return total / denominator if denominator > 0 else 0.0
