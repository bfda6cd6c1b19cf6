# Checks of the arrays callers pass in (type, layout, shape, finiteness). Included by
# _core.pyx.

cdef bint _kernel_ready(object array, int type_num):
    """Whether the kernels may read array as a C array of type_num: an ndarray of exactly
    that type, in native byte order, C-contiguous and aligned."""
    if not cnp.PyArray_Check(array):
        return False
    cdef cnp.ndarray a = <cnp.ndarray>array
    return (cnp.PyArray_TYPE(a) == type_num and cnp.PyArray_ISNOTSWAPPED(a)
            and cnp.PyArray_IS_C_CONTIGUOUS(a) and cnp.PyArray_ISALIGNED(a))


cdef int _check_input(object array, int type_num, str name, Py_ssize_t n_rows=-1,
                      Py_ssize_t n_cols=-2) except -1:
    """Check a caller's array, which must be _kernel_ready for type_num and, where
    given, have n_rows rows (n_rows >= 0) and be 1-D (n_cols == -1) or have n_cols
    columns (n_cols >= 0).

    The Python layer converts every array (bpfast._validation.as_kernel_array) before
    it gets here; this check makes sure that an array that skipped it is refused
    (TypeError, ValueError for a shape, with a message naming it) before the engine
    takes a typed memoryview of it, which would refuse it less clearly.
    """
    if not _kernel_ready(array, type_num):
        expected = cnp.PyArray_DescrFromType(type_num).name
        got = (f"dtype {array.dtype}, C-contiguous {array.flags.c_contiguous}, aligned "
               f"{array.flags.aligned}" if isinstance(array, np.ndarray)
               else type(array).__name__)
        raise TypeError(f"{name} must be a C-contiguous, aligned {expected} array in native "
                        f"byte order for compiled code; got {got}")
    cdef cnp.ndarray a = <cnp.ndarray>array
    cdef int ndim = cnp.PyArray_NDIM(a)
    if n_cols >= -1 and (ndim != (1 if n_cols == -1 else 2)
                         or (n_cols >= 0 and cnp.PyArray_DIMS(a)[1] != n_cols)
                         or (n_rows >= 0 and cnp.PyArray_DIMS(a)[0] != n_rows)):
        raise ValueError(f"{name} has shape {array.shape}, expected "
                         f"{'(' + str(n_rows) + ',)' if n_cols == -1 else (n_rows, n_cols)}"
                         " (-1: any)")
    return 0


cdef int _check_optional_input(object array, int type_num, str name, Py_ssize_t n_rows=-1,
                               Py_ssize_t n_cols=-2) except -1:
    """_check_input for an array that may be None."""
    return 0 if array is None else _check_input(array, type_num, name, n_rows, n_cols)


cdef Py_ssize_t first_nonfinite_index(const floating* x, Py_ssize_t n) noexcept nogil:
    """Index of the first NaN or infinity, or -1.

    A value is NaN or infinite when its exponent bits are all ones. Testing that
    with integer operations lets the compiler vectorize the scan (a floating-point
    sum may not be reordered without -ffast-math); only a block that fails is then
    searched element by element.
    """
    cdef Py_ssize_t begin, end, i
    cdef int bad
    cdef const uint32_t* bits32 = <const uint32_t*>x
    cdef const uint64_t* bits64 = <const uint64_t*>x
    for begin in range(0, n, 1024):
        end = min(begin + 1024, n)
        bad = 0
        if floating is float:
            for i in range(begin, end):
                bad = bad | ((bits32[i] & 0x7f800000u) == 0x7f800000u)
        else:
            for i in range(begin, end):
                bad = bad | ((bits64[i] & 0x7ff0000000000000u) == 0x7ff0000000000000u)
        if bad:
            for i in range(begin, end):
                if not (x[i] - x[i] == 0):
                    return i
    return -1


def ready_array(object array, object dtype, int ndim):
    """True when array needs no conversion or check: an ndarray of exactly dtype, ndim
    dimensions, C-contiguous, non-empty and finite. The fast path of every call."""
    if not cnp.PyArray_CheckExact(array):
        return False
    cdef cnp.ndarray a = <cnp.ndarray>array
    if (cnp.PyArray_NDIM(a) != ndim or not cnp.PyArray_IS_C_CONTIGUOUS(a)
            or not cnp.PyArray_ISALIGNED(a) or cnp.PyArray_SIZE(a) == 0
            or <object>cnp.PyArray_DESCR(a) is not dtype):
        return False
    cdef Py_ssize_t n = cnp.PyArray_SIZE(a), index
    cdef void* data = cnp.PyArray_DATA(a)
    cdef int type_num = cnp.PyArray_TYPE(a)
    if not cnp.PyArray_ISNOTSWAPPED(a):
        return False
    if type_num == cnp.NPY_DOUBLE:
        with nogil:
            index = first_nonfinite_index(<double*>data, n)
    elif type_num == cnp.NPY_FLOAT:
        with nogil:
            index = first_nonfinite_index(<float*>data, n)
    else:
        return False
    return index < 0


def ready_labels(object labels, Py_ssize_t n_rows, Py_ssize_t n_classes):
    """True when labels is a C-contiguous intp ndarray of n_rows labels in [0, n_classes)."""
    if not cnp.PyArray_CheckExact(labels):
        return False
    cdef cnp.ndarray a = <cnp.ndarray>labels
    if (cnp.PyArray_NDIM(a) != 1 or not _kernel_ready(a, cnp.NPY_INTP)
            or cnp.PyArray_DIMS(a)[0] != n_rows):
        return False
    cdef const intp* data = <const intp*>cnp.PyArray_DATA(a)
    cdef Py_ssize_t i
    for i in range(n_rows):
        if data[i] < 0 or data[i] >= n_classes:
            return False
    return n_rows > 0


def first_nonfinite(array):
    """Flat index of the first NaN or infinity in a C-contiguous, aligned float32 or
    float64 array, or -1; TypeError for any other array."""
    if not (isinstance(array, np.ndarray) and array.dtype in (np.float32, np.float64)):
        raise TypeError(f"first_nonfinite needs a float32 or float64 ndarray, got "
                        f"{getattr(array, 'dtype', type(array).__name__)}")
    cdef int type_num = cnp.PyArray_TYPE(<cnp.ndarray>array)
    _check_input(array, type_num, "first_nonfinite's array")
    cdef const void* data = cnp.PyArray_DATA(<cnp.ndarray>array)
    cdef Py_ssize_t n = array.size, index
    with nogil:
        if type_num == cnp.NPY_DOUBLE:
            index = first_nonfinite_index(<const double*>data, n)
        else:
            index = first_nonfinite_index(<const float*>data, n)
    return index
