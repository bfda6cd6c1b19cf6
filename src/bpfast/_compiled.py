"""Load the compiled engine: ``_core``, or ``_core_avx2`` where the CPU has AVX2.

Both modules are built from the same source, ``_core.pyx``; ``_core_avx2`` only on
x86-64, with ``-mavx2``: bpfast's own loops run 8 floats wide. Both are compiled
without fused multiply-adds (``-ffp-contract=off``), so they round every operation
alike and their results are bit-identical (tests/test_engines.py). Which one runs
is decided once, here, from the CPU (CPUID and XGETBV), asked through ``_core``:
importing ``_core_avx2`` on a CPU without AVX2 could already fault.
``BPFAST_ENGINE=baseline`` in the environment forces ``_core``; ``BPFAST_ENGINE=avx2``
requires ``_core_avx2`` and fails if it cannot run. Every other module imports the
engine as ``from ._compiled import core as _core``; nothing may import ``_core_avx2``
directly.
"""
import importlib
import importlib.util
import os
from types import ModuleType
from typing import TYPE_CHECKING

__all__ = ["ENGINE_CHOICES", "core"]

ENGINE_CHOICES = ("auto", "baseline", "avx2")
#: libgomp's spin count for idle workers (see _import_engines): 30,000 spins keep the
#: quiet M step as fast as OpenBLAS's own threads were (10,000: 25% slower on M)
OMP_SPIN_COUNT = 30000


def _import_engines() -> ModuleType:
    """Import _core, then _core_avx2 if wanted and runnable; return the one to use.

    libgomp reads its wait policy once, when the library loads. Its default lets
    idle workers spin for a long while after every parallel region, and with BLAS's
    own threads on the same cores that spinning starved OpenBLAS's spin barriers:
    measured 8 ms instead of 0.5 ms per training step (M shape, 2 cores). Fully
    passive workers cost the other way now that bpfast threads its products itself
    (a futex wake-up per parallel region: the quiet M step on 2 threads 1.5x slower,
    bench/README.md). So workers spin briefly (GOMP_SPINCOUNT, about 10-30 us) and
    then sleep; OMP_WAIT_POLICY=PASSIVE is for OpenMP runtimes other than libgomp.
    A user who sets OMP_WAIT_POLICY or GOMP_SPINCOUNT keeps their choice, and the
    variables are removed again at once, so neither the rest of the process nor its
    children see them.
    """
    choice = os.environ.get("BPFAST_ENGINE", "auto").strip().lower() or "auto"
    if choice not in ENGINE_CHOICES:
        raise ImportError(f"BPFAST_ENGINE must be one of {', '.join(ENGINE_CHOICES)}, "
                          f"got {os.environ['BPFAST_ENGINE']!r}")
    set_policy = "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ
    if set_policy:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        os.environ["GOMP_SPINCOUNT"] = str(OMP_SPIN_COUNT)  # libgomp: it wins over the policy
    try:
        from . import _core
        if choice == "baseline":
            return _core
        if importlib.util.find_spec(f"{__package__}._core_avx2") is None:
            if choice == "avx2":
                raise ImportError("BPFAST_ENGINE=avx2, but this build of bpfast has no "
                                  "_core_avx2 (it is built on x86-64 only, not on Windows)")
            return _core
        if not _core.kernel_info()[1]:
            if choice == "avx2":
                raise ImportError("BPFAST_ENGINE=avx2, but this CPU (or its operating "
                                  "system) does not support AVX2")
            return _core
        return importlib.import_module(f"{__package__}._core_avx2")
    finally:
        if set_policy:
            del os.environ["OMP_WAIT_POLICY"]
            del os.environ["GOMP_SPINCOUNT"]


if TYPE_CHECKING:
    from . import _core as core
else:
    core = _import_engines()
