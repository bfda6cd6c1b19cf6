# Optimizer updates: one loop over the flat parameter buffer. Included by _core.pyx.

cdef struct OptimizerParams:
    int kind
    double lr, momentum, dampening, weight_decay, beta1, beta2, eps, alpha, lr_decay
    bint nesterov, amsgrad, centered, decoupled_weight_decay
    # row of each state buffer in the (n_states, n_parameters) state array, -1 if absent
    int momentum_buffer, exp_avg, exp_avg_sq, max_exp_avg_sq, square_avg, grad_avg, sum


cdef void optimizer_update_range(const OptimizerParams* o, long long step,
                                 floating* param, const floating* grad, floating* state,
                                 Py_ssize_t n, Py_ssize_t begin,
                                 Py_ssize_t end) noexcept nogil:
    """One update of param[begin:end], PyTorch's single-tensor formulas, in its order."""
    cdef Py_ssize_t i
    cdef floating g, p, m, v, avg, denom
    cdef floating lr = <floating>o.lr, wd = <floating>o.weight_decay
    cdef floating momentum = <floating>o.momentum
    cdef floating one_minus_dampening = <floating>(1.0 - o.dampening)
    cdef floating beta1 = <floating>o.beta1, beta2 = <floating>o.beta2
    cdef floating eps = <floating>o.eps, alpha = <floating>o.alpha
    cdef floating step_size, bias_correction2_sqrt, clr, decay
    cdef floating *buf = state + o.momentum_buffer * n
    cdef floating *exp_avg = state + o.exp_avg * n
    cdef floating *exp_avg_sq = state + o.exp_avg_sq * n
    cdef floating *max_exp_avg_sq = state + o.max_exp_avg_sq * n
    cdef floating *square_avg = state + o.square_avg * n
    cdef floating *grad_avg = state + o.grad_avg * n
    cdef floating *state_sum = state + o.sum * n
    cdef floating lerp_weight = 1 - beta1
    # flags as locals: read through `o` they could alias the stores below, which
    # keeps the compiler from hoisting the branches and vectorizing the loops
    cdef bint nesterov = o.nesterov, amsgrad = o.amsgrad, centered = o.centered
    cdef bint first_step = step == 1
    if o.kind == OPT_SGD:
        for i in range(begin, end):
            g = grad[i]
            if wd != 0:
                g = g + wd * param[i]
            if momentum != 0:
                m = g if first_step else buf[i] * momentum + one_minus_dampening * g
                buf[i] = m
                g = g + momentum * m if nesterov else m
            param[i] = param[i] + (-lr) * g
    elif o.kind == OPT_ADAM:
        step_size = <floating>(o.lr / (1.0 - pow(o.beta1, <double>step)))
        bias_correction2_sqrt = <floating>sqrt(1.0 - pow(o.beta2, <double>step))
        # AdamW's decay multiplies by exactly 1 when it is off; Adam's L2 term is
        # added only when on. Branches left in the loop are invariant (vectorizable).
        decay = <floating>(1.0 - o.lr * o.weight_decay) if o.decoupled_weight_decay else 1
        if o.decoupled_weight_decay:
            wd = 0
        for i in range(begin, end):
            p = param[i] * decay
            g = grad[i]
            if wd != 0:
                g = g + wd * p
            # exp_avg.lerp_(g, 1 - beta1), with torch.lerp's two formulas
            m = exp_avg[i]
            m = m + lerp_weight * (g - m) if lerp_weight < 0.5 else g - (g - m) * (1 - lerp_weight)
            exp_avg[i] = m
            v = exp_avg_sq[i] * beta2 + (1 - beta2) * (g * g)
            exp_avg_sq[i] = v
            if amsgrad:
                v = max_exp_avg_sq[i] if max_exp_avg_sq[i] >= v else v
                max_exp_avg_sq[i] = v
            denom = _sqrt(v) / bias_correction2_sqrt + eps
            param[i] = p + (-step_size) * (m / denom)
    elif o.kind == OPT_RMSPROP:
        lerp_weight = 1 - alpha
        for i in range(begin, end):
            g = grad[i]
            if wd != 0:
                g = g + wd * param[i]
            v = square_avg[i] * alpha + (1 - alpha) * (g * g)
            square_avg[i] = v
            if centered:
                m = grad_avg[i]
                m = m + lerp_weight * (g - m) if lerp_weight < 0.5 else g - (g - m) * alpha
                grad_avg[i] = m
                v = v + (-1) * (m * m)
            avg = _sqrt(v) + eps
            if momentum > 0:
                m = buf[i] * momentum + g / avg
                buf[i] = m
                param[i] = param[i] + (-lr) * m
            else:
                param[i] = param[i] + (-lr) * (g / avg)
    elif o.kind == OPT_ADAGRAD:
        clr = <floating>(o.lr / (1.0 + (step - 1) * o.lr_decay))
        for i in range(begin, end):
            g = grad[i]
            if wd != 0:
                g = g + wd * param[i]
            state_sum[i] = state_sum[i] + g * g
            param[i] = param[i] + (-clr) * (g / (_sqrt(state_sum[i]) + eps))


cdef void optimizer_update(const OptimizerParams* o, long long step, floating* param,
                           const floating* grad, floating* state,
                           Py_ssize_t n) noexcept nogil:
    cdef PassTimer timer
    cdef int t, n_threads = pass_threads(PASS_OPTIMIZER, n, floating is double, &timer)
    if n_threads == 1:
        optimizer_update_range(o, step, param, grad, state, n, 0, n)
    else:
        for t in prange(n_threads, num_threads=n_threads, schedule="static"):
            optimizer_update_range(o, step, param, grad, state, n, t * n // n_threads,
                                   (t + 1) * n // n_threads)
    pass_done(&timer)
