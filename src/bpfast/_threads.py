"""Threads: how many bpfast uses by default and why, one setting for bpfast's OpenMP
and the BLAS it calls, and a description of this build.

The default thread count is the number of CPUs this process may use: the affinity
mask, lowered to a cgroup CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), or
``OMP_NUM_THREADS`` where set. Matrix products are split and threaded by bpfast
itself, each block one single-threaded call into SciPy's OpenBLAS, whose thread
functions are found here (no threadpoolctl needed); _core.pyx explains the policy.
"""
import ctypes
import math
import os
import sys
import threading
import warnings
from contextlib import contextmanager

from ._compiled import core as _core
from ._validation import check_int

# Where the cgroup files are read (tests point it, or BPFAST_CGROUP_ROOT before import,
# at a fake tree) and the file naming this process's cgroups.
CGROUP_ROOT = os.environ.get("BPFAST_CGROUP_ROOT", "/sys/fs/cgroup")
PROC_SELF_CGROUP = "/proc/self/cgroup"

# set_num_threads clamps to this many per CPU of the machine: more only oversubscribes,
# and tens of thousands make the OpenMP runtime fail to start its threads (issue 12).
MAX_THREADS_PER_CPU = 4

_blas = None  # (set, get, description) of the BLAS bpfast calls, or None when unknown
_lock = threading.RLock()  # one change of the counts at a time
# held for a whole `with threads(n)` block: blocks in several threads take turns, or
# one would restore counts another set (and the process keep the wrong ones)
_turns = threading.RLock()


# --------------------------------------------------------------------------- CPUs
def _read(path):
    try:
        with open(path) as file:
            return file.read().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _own_cgroups():
    """{controller list: path} of this process, from /proc/self/cgroup ('' for v2)."""
    groups = {}
    for line in (_read(PROC_SELF_CGROUP) or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) == 3:
            groups[parts[1]] = parts[2]
    return groups


def _with_parents(base, path):
    """base/path, then each parent directory of it up to base itself."""
    parts = [p for p in path.split("/") if p and p != ".."]
    return [os.path.join(base, *parts[:i]) for i in range(len(parts), -1, -1)]


def _quota(quota, period):
    try:
        quota, period = float(quota), float(period)
    except (TypeError, ValueError):
        return None
    return quota / period if quota > 0 and period > 0 else None  # -1 or 'max': none


def cgroup_cpu_limit():
    """The CPU quota of this process's cgroups as (cpus, file), the tightest one; or None.

    Read below ``CGROUP_ROOT``: v2 ``cpu.max`` ("quota period" or "max period") and v1
    ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``, in this process's own cgroup and
    each parent (inside a container its own cgroup is the root).
    """
    found = []
    groups = _own_cgroups()
    for directory in _with_parents(CGROUP_ROOT, groups.get("", "/")):
        text = _read(os.path.join(directory, "cpu.max"))
        if text and len(text.split()) == 2:
            found.append((_quota(*text.split()), os.path.join(directory, "cpu.max")))
    v1 = [(c, p) for c, p in groups.items() if "cpu" in c.split(",")]
    for mount in {c for c, _ in v1} | {"cpu", "cpu,cpuacct"}:
        path = next((p for c, p in v1 if c == mount), "/")
        for directory in _with_parents(os.path.join(CGROUP_ROOT, mount), path):
            quota = _quota(_read(os.path.join(directory, "cpu.cfs_quota_us")),
                           _read(os.path.join(directory, "cpu.cfs_period_us")))
            found.append((quota, os.path.join(directory, "cpu.cfs_quota_us")))
    found = [(cpus, path) for cpus, path in found if cpus is not None]
    return min(found) if found else None


def _omp_num_threads():
    """OMP_NUM_THREADS's first value (it may list one per nesting level), or None."""
    text = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    return int(text) if text.isdigit() and int(text) > 0 else None


def _machine_cpus():
    return os.cpu_count() or 1


def default_num_threads():
    """The default thread count and where it came from, as (count, reason).

    OMP_NUM_THREADS where set; otherwise the CPUs in this process's affinity mask,
    lowered to its cgroup CPU quota (rounded up) where that is smaller.
    """
    omp = _omp_num_threads()
    if omp is not None:
        return _capped(omp), f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    if hasattr(os, "sched_getaffinity"):
        count = len(os.sched_getaffinity(0))
        reason = f"affinity mask: {count} of {_machine_cpus()} CPUs"
    else:  # pragma: no cover - macOS, Windows
        count, reason = _machine_cpus(), f"os.cpu_count(): {_machine_cpus()}"
    limit = cgroup_cpu_limit()
    if limit is not None and math.ceil(limit[0]) < count:
        count = max(1, math.ceil(limit[0]))
        reason = f"cgroup CPU quota {limit[0]:g} CPUs ({limit[1]})"
    return count, reason


def max_num_threads():
    """The most threads set_num_threads gives: MAX_THREADS_PER_CPU per CPU of the machine."""
    return MAX_THREADS_PER_CPU * _machine_cpus()


def _capped(n):
    return min(n, max_num_threads())


# --------------------------------------------------------------------------- BLAS
def _find_blas():
    """SciPy's OpenBLAS thread functions as (set, get, description), or None.

    ``dlsym`` on scipy.linalg.cython_blas's own handle searches that module and the
    libraries it loaded, so the functions found belong to the very BLAS bpfast calls
    (NumPy may have loaded another OpenBLAS). Prefixed names first (SciPy's wheels
    bundle ``scipy_openblas``), then a plain OpenBLAS.
    """
    try:
        from scipy.linalg import cython_blas
        library = ctypes.CDLL(cython_blas.__file__)
    except (ImportError, OSError):  # pragma: no cover - SciPy is a dependency
        return None
    for prefix in ("scipy_openblas", "openblas"):
        try:
            set_threads = getattr(library, f"{prefix}_set_num_threads")
            get_threads = getattr(library, f"{prefix}_get_num_threads")
        except AttributeError:
            continue
        set_threads.argtypes, set_threads.restype = [ctypes.c_int], None
        get_threads.argtypes, get_threads.restype = [], ctypes.c_int
        return set_threads, get_threads, f"OpenBLAS ({prefix}_set_num_threads)"
    return None


def _connect_blas():
    global _blas
    _blas = _find_blas()
    if _blas is None or sys.platform == "win32":
        _blas = None
        _core.set_blas_thread_functions(0, 0)
        return
    address = [ctypes.cast(f, ctypes.c_void_p).value for f in _blas[:2]]
    _core.set_blas_thread_functions(*address)


def _threadpoolctl():
    try:
        import threadpoolctl
    except ImportError:
        return None
    return threadpoolctl


def blas_num_threads():
    """The thread count of the BLAS bpfast calls (SciPy's OpenBLAS), or None if unknown."""
    return None if _blas is None else _blas[1]()


def _set_blas_threads(n):
    threadpoolctl = _threadpoolctl()
    if threadpoolctl is not None:  # every other BLAS of the process too (NumPy's)
        threadpoolctl.threadpool_limits(limits=n, user_api="blas")
    if _blas is not None:  # last: threadpoolctl would set it bypassing bpfast's products
        _core.set_blas_num_threads(n)


# --------------------------------------------------------------------------- public
def set_num_threads(n):
    """Use n threads: bpfast's OpenMP loops, its threaded matrix products, and BLAS.

    Sets SciPy's OpenBLAS (the BLAS bpfast calls) directly, and through threadpoolctl,
    when installed, every other BLAS in the process. More than
    ``4 * os.cpu_count()`` threads only oversubscribe the machine (and tens of
    thousands fail to start): n is clamped to that with a RuntimeWarning.

    Parameters
    ----------
    n : int
        Threads, at least 1.
    """
    n = check_int("n", n, minimum=1)
    if n > max_num_threads():
        warnings.warn(f"set_num_threads({n}): using {max_num_threads()} threads, the most "
                      f"bpfast uses ({MAX_THREADS_PER_CPU} per CPU of this machine, which "
                      f"has {_machine_cpus()})", RuntimeWarning, stacklevel=2)
        n = max_num_threads()
    with _lock:
        _core.set_num_threads(n)
        _set_blas_threads(n)


def get_num_threads():
    """The number of threads bpfast uses (OpenMP loops and threaded products)."""
    return _core.get_num_threads()


@contextmanager
def threads(n):
    """Use n threads inside the ``with`` block, then restore the previous counts.

    Restores bpfast's count and the BLAS's (SciPy's OpenBLAS, and with threadpoolctl
    every BLAS it sees), also when the block raises. The counts belong to the process,
    not to a thread, so blocks in different threads take turns (a process-wide lock),
    each restoring the counts the one before it found; the lock is reentrant, so a
    block inside another one in the same thread nests. bpfast work in other threads
    meanwhile runs with the counts of the block that holds the lock.

    Parameters
    ----------
    n : int
        Threads inside the block, at least 1 (clamped as by :func:`set_num_threads`).

    Examples
    --------
    >>> import bpfast as bp
    >>> with bp.threads(1):
    ...     pass  # fit, predict: one thread here
    """
    n = check_int("n", n, minimum=1)
    with _turns:
        with _lock:
            previous = _core.get_num_threads()
            previous_blas = blas_num_threads()
            threadpoolctl = _threadpoolctl()
            others = (threadpoolctl.threadpool_limits(limits=None, user_api="blas")
                      if threadpoolctl is not None else None)  # remembers every BLAS's count
        try:
            set_num_threads(n)
            yield
        finally:
            with _lock:
                _core.set_num_threads(previous)
                if others is not None:
                    others.restore_original_limits()
                if previous_blas is not None:
                    _core.set_blas_num_threads(previous_blas)


def _blas_info():
    threadpoolctl = _threadpoolctl()
    direct = ("not reachable without threadpoolctl: products are not split, BLAS threads "
              "them itself" if _blas is None else
              f"{_blas[2]}, {blas_num_threads()} threads, held at 1 inside bpfast's products")
    if threadpoolctl is None:
        return direct
    import scipy.linalg  # noqa: F401  (loads SciPy's BLAS so threadpoolctl can see it)
    pools = [p for p in threadpoolctl.threadpool_info() if p.get("user_api") == "blas"]
    seen = "; ".join(f"{p.get('internal_api')} {p.get('version')} "
                     f"({p.get('num_threads')} threads, {os.path.basename(p.get('filepath', ''))})"
                     for p in pools) or "none seen"
    return f"{direct}; threadpoolctl sees: {seen}"


def show_config(file=None):
    """Print bpfast's version, OpenMP status and threads (and why that many), and the BLAS."""
    from . import __version__
    count, reason = default_num_threads()
    lines = [
        f"bpfast {__version__}",
        f"python {sys.version.split()[0]}",
        f"engine: {_core.__name__.rsplit('.', 1)[-1]} ({_core.kernel_info()[0]})",
        f"OpenMP: {'on' if _core.openmp_enabled() else 'off (serial build)'}, "
        f"{_core.get_num_threads()} threads",
        f"default threads: {count} ({reason}); at most {max_num_threads()}",
        "matrix products: " + ("split in blocks, each on one BLAS thread; a training "
                               "step runs on 1 or all threads, whichever is faster for "
                               "its shape (timed)"
                               if _blas is not None else "one BLAS call each"),
        f"BLAS (through scipy.linalg.cython_blas): {_blas_info()}",
    ]
    print("\n".join(lines), file=file)


_connect_blas()
_core.set_num_threads(default_num_threads()[0] if _core.openmp_enabled() else 1)
