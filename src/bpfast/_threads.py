"""Thread settings: one call sets bpfast's OpenMP threads and, through threadpoolctl
when it is installed, the BLAS threads; and a description of this build."""
import os
import sys

from ._compiled import core as _core
from ._validation import check_int

_blas_limiter = None


def _threadpoolctl():
    try:
        import threadpoolctl
    except ImportError:
        return None
    return threadpoolctl


def set_num_threads(n):
    """Use n threads in bpfast's OpenMP loops and (with threadpoolctl) in BLAS.

    Without threadpoolctl, BLAS keeps the count it read from OMP_NUM_THREADS /
    OPENBLAS_NUM_THREADS at start-up.
    """
    global _blas_limiter
    n = check_int("n", n, minimum=1)
    _core.set_num_threads(n)
    threadpoolctl = _threadpoolctl()
    if threadpoolctl is not None:
        _blas_limiter = threadpoolctl.threadpool_limits(limits=n, user_api="blas")


def get_num_threads():
    """The number of threads bpfast's OpenMP loops use."""
    return _core.get_num_threads()


def _blas_info():
    threadpoolctl = _threadpoolctl()
    if threadpoolctl is None:
        return "unknown (install threadpoolctl to see and control BLAS threads)"
    import scipy.linalg  # noqa: F401  (loads SciPy's BLAS so threadpoolctl can see it)
    pools = [p for p in threadpoolctl.threadpool_info() if p.get("user_api") == "blas"]
    if not pools:
        return "not found"
    return "; ".join(f"{p.get('internal_api')} {p.get('version')} "
                     f"({p.get('num_threads')} threads, {os.path.basename(p.get('filepath', ''))})"
                     for p in pools)


def show_config(file=None):
    """Print bpfast's version, OpenMP status and threads, and the BLAS in use."""
    from . import __version__
    lines = [
        f"bpfast {__version__}",
        f"python {sys.version.split()[0]}",
        f"engine: {_core.__name__.rsplit('.', 1)[-1]} ({_core.kernel_info()[0]})",
        f"OpenMP: {'on' if _core.openmp_enabled() else 'off (serial build)'}, "
        f"{_core.get_num_threads()} threads",
        f"BLAS (through scipy.linalg.cython_blas): {_blas_info()}",
    ]
    print("\n".join(lines), file=file)
