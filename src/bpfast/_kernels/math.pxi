# Scalar math over `floating`: the float or double libm function, stable sigmoids.
# Included by _core.pyx.

cdef inline floating _exp(floating x) noexcept nogil:
    if floating is float:
        return expf(x)
    else:
        return exp(x)

cdef inline floating _log1p(floating x) noexcept nogil:
    if floating is float:
        return log1pf(x)
    else:
        return log1p(x)

cdef inline floating _expm1(floating x) noexcept nogil:
    if floating is float:
        return expm1f(x)
    else:
        return expm1(x)

cdef inline floating _tanh(floating x) noexcept nogil:
    if floating is float:
        return tanhf(x)
    else:
        return tanh(x)

cdef inline floating _erf(floating x) noexcept nogil:
    if floating is float:
        return erff(x)
    else:
        return erf(x)

cdef inline floating _sqrt(floating x) noexcept nogil:
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)

cdef inline floating _sigmoid(floating x) noexcept nogil:
    # exp of a non-positive argument only, so it never overflows.
    cdef floating e
    if x >= 0:
        return 1 / (1 + _exp(-x))
    e = _exp(x)
    return e / (1 + e)

cdef inline floating _log_sigmoid(floating x) noexcept nogil:
    # log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|)), as PyTorch's log_sigmoid.
    return (x if x < 0 else 0) - _log1p(_exp(-fabs(x)))
