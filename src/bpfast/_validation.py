"""Argument checks shared by the public classes.

Every check raises before anything changes, with a message that names the
argument and says what is wrong. Kept in one place so losses, optimizers and
the network refuse bad input with the same words.
"""
import numbers
import os

import numpy as np
from numpy.typing import NDArray

from ._compiled import core as _core

DTYPES = {"float32": np.dtype(np.float32), "float64": np.dtype(np.float64)}


def check_dtype(dtype):
    """The numpy dtype for "float32"/"float64" (or those dtypes); anything else is an error."""
    try:
        # np.dtype(None) is float64: None is refused rather than taken as that
        key = None if dtype is None else np.dtype(dtype).name
    except TypeError:
        key = None
    if key not in DTYPES:
        raise ValueError(f"dtype must be 'float32' or 'float64', got {dtype!r}")
    return DTYPES[key]


def check_int(name, value, minimum=None, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_real(name, value, minimum=None, maximum=None, min_inclusive=True,
               max_inclusive=True):
    """A finite real number within the bounds; bools, strings and NaN are refused."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not np.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if minimum is not None and (value < minimum or (value == minimum and not min_inclusive)):
        bound = ">=" if min_inclusive else ">"
        raise ValueError(f"{name} must be {bound} {minimum}, got {value}")
    if maximum is not None and (value > maximum or (value == maximum and not max_inclusive)):
        bound = "<=" if max_inclusive else "<"
        raise ValueError(f"{name} must be {bound} {maximum}, got {value}")
    return value


def check_bool(name, value):
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return bool(value)


def check_choice(name, value, choices):
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {name} {value!r}; valid: {', '.join(choices)}")
    return value


def canonical_name(value, names, aliases=None):
    """The name in names that value spells, in any case and with "-" or " " for "_",
    directly or through aliases ({other spelling: name}); None if it spells none."""
    if not isinstance(value, str):
        return None
    key = value.strip().lower().replace("-", "_").replace(" ", "_")
    if key in names:
        return key
    key = (aliases or {}).get(key, key)
    if key in names:
        return key
    return None


def instance_by_name(what, value, base, by_name, aliases=None):
    """value if it is a base instance, else a default instance for the name value (any
    case; aliases: {other spelling: name})."""
    if isinstance(value, base):
        return value
    name = canonical_name(value, by_name, aliases)
    if name is not None:
        return by_name[name]()
    if isinstance(value, type) and issubclass(value, base):
        raise ValueError(f"unknown {what} {value!r}: a class, not an instance (write "
                         f"{value.__name__}()); valid: a {base.__name__} instance or one of "
                         f"{', '.join(by_name)}")
    also = f" (or {', '.join(sorted(aliases))})" if aliases else ""
    raise ValueError(f"unknown {what} {value!r}; valid: a {base.__name__} instance or one of "
                     f"{', '.join(by_name)}{also}")


def as_kernel_array(array, dtype):
    """array as compiled code reads it: an ndarray of exactly dtype in native byte order,
    C-contiguous and aligned; a copy only where array is not that already.

    Every array a caller gives reaches the kernels through this function (through
    as_float_array for float data), whatever its dtype (float16 to longdouble),
    strides, byte order, alignment or storage (a memory map): the compiled side
    assumes this layout and refuses anything else with a TypeError.
    """
    return np.require(array, dtype=dtype, requirements=["C_CONTIGUOUS", "ALIGNED"])


def check_finite(name, array, position_name="row"):
    """Refuse NaN and infinity, naming the position of the first one.

    array comes from as_kernel_array. A 1-D array's position is a "row" (per-sample
    labels and weights) unless position_name says otherwise.
    """
    index = _core.first_nonfinite(array)
    if index >= 0:
        position = np.unravel_index(index, array.shape)
        where = (f"row {position[0]}, column {position[1]}" if array.ndim == 2
                 else f"{position_name} {position[0]}")
        raise ValueError(f"{name} contains {array.flat[index]} at {where}; "
                         "it must be finite")


def as_array(name, value):
    """np.asarray(value), with NumPy's errors for ragged or odd input naming the argument."""
    try:
        return np.asarray(value)
    except (ValueError, TypeError) as error:
        raise type(error)(f"{name} is not an array of numbers: {error}") from None


def as_float_array(name, value, dtype, ndim, position_name="row",
                   max_rows=None) -> NDArray[np.floating]:
    """A C-contiguous array of dtype with ndim dimensions, finite; copied only if needed.

    Integer input is converted; bool, complex, string and object arrays are refused.
    With max_rows, more rows than that are refused (check_batch_rows) before any copy
    (an array that needs none is the caller's to check); a copy that cannot fit in
    memory is a MemoryError (check_memory).
    """
    if _core.ready_array(value, dtype, ndim):
        return value  # the fast path of a training step: no copy, no conversion, checked in C
    array = as_array(name, value)
    if array.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers, got an array of dtype {array.dtype}")
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {array.shape}")
    if max_rows is not None:
        check_batch_rows(name, array.shape[0])
    dtype = np.dtype(dtype)
    copied = not (array.dtype == dtype and array.flags.c_contiguous and array.flags.aligned)
    if copied and array.size * dtype.itemsize > 1 << 26:  # large: worth the system calls
        check_memory(f"a C-contiguous {dtype.name} copy of {name} {array.shape}",
                     array.size * dtype.itemsize)
    # aligned too: the kernels read whole floats (np.ascontiguousarray keeps a misaligned
    # buffer that is contiguous)
    array = as_kernel_array(array, dtype)
    if array.size == 0:
        raise ValueError(f"{name} is empty (shape {array.shape})")
    check_finite(name, array, position_name)
    return array


def check_sample_weight(sample_weight, n_samples, name="sample_weight"):
    """None, or a C-contiguous float64 (n_samples,) array of finite weights >= 0, not all 0."""
    if sample_weight is None:
        return None
    array = as_array(name, sample_weight)
    if array.dtype.kind not in "fiu":
        raise TypeError(f"{name} must hold real numbers, got an array of dtype {array.dtype}")
    if array.shape != (n_samples,):
        raise ValueError(f"{name} must have shape ({n_samples},), one weight per sample, "
                         f"got {array.shape}")
    array = as_float_array(name, array, np.float64, 1)
    if n_samples and array.min() < 0:
        index = int(np.argmin(array))
        raise ValueError(f"{name} must be >= 0, got {array[index]} at row {index}")
    if n_samples and not array.any():
        raise ValueError(f"{name} is zero everywhere; at least one sample must count")
    return array


# --------------------------------------------------------------------------- memory
#: the most rows one batch may have: BLAS takes matrix sizes as a C int
MAX_BATCH_ROWS = 2 ** 31 - 1


def _read_bytes(path):
    """An integer from a one-line file, or None (absent, unreadable, or "max")."""
    try:
        with open(path) as file:
            text = file.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_room():
    """Bytes left under this process's cgroup memory limit (v2, then v1), or None."""
    try:
        with open("/proc/self/cgroup") as file:
            lines = file.read().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: memory.max and memory.current
            names, base = ("memory.max", "memory.current"), "/sys/fs/cgroup"
        elif "memory" in controllers.split(","):  # v1
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes")
            base = "/sys/fs/cgroup/memory"
        else:
            continue
        # the process's own group where it is mounted, else the root (inside a container)
        for directory in (base + path.rstrip("/"), base):
            limit, usage = (_read_bytes(f"{directory}/{name}") for name in names)
            if limit is not None and usage is not None:
                rooms.append(max(0, limit - usage))
                break
    return min(rooms) if rooms else None


def available_memory():
    """Bytes this process can still allocate, as far as the system says, or None.

    The smaller of /proc/meminfo's MemAvailable and the room left under the cgroup's
    memory limit (memory.max less memory.current in v2, limit_in_bytes less
    usage_in_bytes in v1). Where neither exists (not Linux), the physical memory
    (os.sysconf), else None: unknown, nothing is refused. An estimate: other
    processes allocate too, and the kernel may overcommit; it only stops a request
    that cannot fit anyway before it is OOM-killed.
    """
    candidates = [_cgroup_room()]
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    candidates = [value for value in candidates if value is not None]
    if not candidates:
        try:
            candidates.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            return None
    return min(candidates)


def format_bytes(n_bytes):
    """A size for messages: '1.5 GiB'."""
    size = float(n_bytes)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if size < 1024 or unit == "PiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024


def check_memory(what, n_bytes):
    """Refuse, with a MemoryError naming what and its size, an allocation of n_bytes
    that cannot fit in available_memory(); before anything is allocated."""
    available = available_memory()
    if available is not None and n_bytes > available:
        raise MemoryError(f"{what} needs {format_bytes(n_bytes)}, but only "
                          f"{format_bytes(available)} of memory is available")


def check_batch_rows(name, n_rows):
    """Refuse a batch of more rows than BLAS can take (a ValueError naming the limit)."""
    if n_rows > MAX_BATCH_ROWS:
        raise ValueError(f"{name} has {n_rows} rows; one batch may have at most "
                         f"{MAX_BATCH_ROWS} (2**31 - 1, BLAS's int sizes): use fit with a "
                         "batch_size, or smaller parts")
