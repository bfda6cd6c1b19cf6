"""Plain NumPy (bench/numpy_mlp.py); this worker also measures the BLAS GEMM peak through
NumPy and through SciPy (the BLAS bpfast calls via scipy.linalg.cython_blas)."""
import importlib
import itertools
import sys

LIBRARIES = {"scipy": lambda: (importlib.import_module("scipy.linalg.blas")
                               and sys.modules["scipy"])}


def train_step(p, opt):
    from numpy_mlp import NumpyMLP
    if opt == "sgd":
        model = NumpyMLP(p.weights, p.biases, "sgd", lr=0.01, momentum=0.9)
    else:
        model = NumpyMLP(p.weights, p.biases, "adam", lr=1e-3)
    batches = itertools.cycle(p.batches)

    def step():
        X, y = next(batches)
        return model.train_step(X, y)
    return step, 1


def predict(p, n):
    import numpy as np
    from numpy_mlp import NumpyMLP
    model = NumpyMLP(p.weights, p.biases)
    X = np.ascontiguousarray(p.X[:n])
    return lambda: model.forward(X)


def gemm_functions(a, b, out):
    """np.matmul into a preallocated output, and SciPy's sgemm on Fortran-ordered copies
    (no copies inside the timed call)."""
    import numpy as np
    import scipy.linalg.blas
    sgemm = scipy.linalg.blas.sgemm
    af, bf = np.asfortranarray(a), np.asfortranarray(b)
    return {"numpy": lambda: np.matmul(a, b, out=out),
            "scipy": lambda: sgemm(1.0, af, bf)}


TRAIN = {"numpy": train_step}
PREDICT = {"numpy": predict}
