"""The central-difference oracle the gradient tests share."""
import numpy as np


def numerical_gradient(f, values, h=1e-6):
    """d f() / d values by central differences, perturbing values in place (restored)."""
    grad = np.empty_like(values)
    for i in range(values.size):
        saved = values[i]
        values[i] = saved + h
        plus = f()
        values[i] = saved - h
        minus = f()
        values[i] = saved
        grad[i] = (plus - minus) / (2 * h)
    return grad


def relative_error(a, b):
    """|a - b| / (|a| + |b|), 0 when both are 0."""
    return np.linalg.norm(a - b) / max(np.linalg.norm(a) + np.linalg.norm(b), 1e-300)
