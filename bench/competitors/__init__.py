"""One module per implementation that bench/run.py times, each run in its own worker
process (bench/common.py). Every module holds:

- ``LIBRARIES``: name -> function importing that library (the first one is the
  competitor itself; each is optional, a missing one is reported as skipped);
- ``TRAIN``: table row -> ``f(problem, optimizer) -> (call, steps per call)``;
- ``PREDICT``: table row -> ``f(problem, n) -> call``;
- optionally ``gemm_functions(a, b, out)``: name -> one float32 product with its library.

The library itself is imported inside those functions, never at the top of the module,
so that the worker sets its thread counts before any pool starts.
"""
import importlib

MODULES = {  # worker name -> module
    "bpfast": "bpfast_steps",
    "torch": "torch_eager",
    "jax": "jax_jit",
    "sklearn": "sklearn_mlp",
    "numpy": "numpy_plain",
}


def load(worker):
    return importlib.import_module(f"{__name__}.{MODULES[worker]}")
