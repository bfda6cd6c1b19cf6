# Python callbacks: a user's custom loss or activation, written in NumPy, called once
# per batch (per layer) from the compiled loop; the rest of the step stays compiled.
# Included by _core.pyx before the kernels that call them (activations, losses).
#
# The kernel takes the GIL, hands the function read-only NumPy views of its own
# buffers (made once per buffer and shape, not per step), and copies what the
# function returns into the workspace (a copy of the result is made only when it is
# not already a C-contiguous array of the network's dtype). An exception in the
# function propagates from the kernel (except -1) before any parameter, gradient or
# optimizer state changes.

cimport cython
from cpython.ref cimport PyObject
from libc.stdint cimport uintptr_t
from libc.string cimport memmove

# the view slots of a PythonCallback
cdef enum:
    VIEW_OUTPUT = 0    # a loss's output, an activation's input z
    VIEW_TARGET = 1
    N_VIEW_SLOTS = 2


@cython.auto_pickle(False)  # holds views of one engine's buffers: nothing to pickle
cdef class PythonCallback:
    """A user's Python object called from the compiled loop, and the views it is handed.

    function: a custom Loss (its value and gradient methods) or a bpfast.CustomActivation
    (its fn and derivative). The views are read-only arrays over bpfast's buffers,
    valid only during the call (a function must copy what it keeps).
    """
    cdef readonly object function
    cdef uintptr_t address[N_VIEW_SLOTS]
    cdef Py_ssize_t rows[N_VIEW_SLOTS]
    cdef Py_ssize_t cols[N_VIEW_SLOTS]
    cdef int type_num[N_VIEW_SLOTS]
    cdef list views

    def __init__(self, function):
        self.function = function
        self.views = [None] * N_VIEW_SLOTS
        for slot in range(N_VIEW_SLOTS):
            self.address[slot] = 0


cdef object buffer_view(PythonCallback callback, int slot, const floating* data,
                        Py_ssize_t rows, Py_ssize_t cols):
    """A read-only (rows, cols) NumPy array over data, not owning it; the same object
    as last time for the same buffer and shape."""
    cdef int type_num = cnp.NPY_FLOAT if floating is float else cnp.NPY_DOUBLE
    cdef cnp.npy_intp dims[2]
    if (callback.address[slot] == <uintptr_t>data and callback.rows[slot] == rows
            and callback.cols[slot] == cols and callback.type_num[slot] == type_num):
        return callback.views[slot]
    dims[0] = rows
    dims[1] = cols
    view = cnp.PyArray_SimpleNewFromData(2, dims, type_num, <floating*>data)
    cnp.PyArray_CLEARFLAGS(view, cnp.NPY_ARRAY_WRITEABLE)
    callback.views[slot] = view
    callback.address[slot] = <uintptr_t>data
    callback.rows[slot] = rows
    callback.cols[slot] = cols
    callback.type_num[slot] = type_num
    return view


cdef cnp.ndarray checked_result(object result, int type_num, Py_ssize_t rows,
                                Py_ssize_t cols, str what):
    """result as a C-contiguous array of type_num, shape (rows, cols), or (rows,) where
    cols < 0 is allowed to mean "one per row"; copied only if it is not one already.
    TypeError or ValueError naming what otherwise."""
    cdef cnp.ndarray array
    if not (cnp.PyArray_Check(result)
            and cnp.PyArray_TYPE(<cnp.ndarray>result) == type_num
            and cnp.PyArray_ISCARRAY_RO(<cnp.ndarray>result)):
        try:
            array = np.asarray(result)
        except Exception as error:
            raise TypeError(f"{what} must return a NumPy array, got {type(result).__name__}"
                            f" ({error})") from None
        if array.dtype.kind not in "fiu":
            raise TypeError(f"{what} must return an array of real numbers, got dtype "
                            f"{array.dtype}")
        result = np.ascontiguousarray(array, dtype=cnp.PyArray_DescrFromType(type_num))
    array = <cnp.ndarray>result
    if array.ndim == 2 and array.shape[0] == rows and array.shape[1] == abs(cols):
        return array
    if cols < 0 and array.ndim == 1 and array.shape[0] == rows:
        return array
    expected = (f"({rows},) or ({rows}, {-cols})" if cols < 0 else f"({rows}, {cols})")
    raise ValueError(f"{what} returned shape {(<object>array).shape}, expected {expected}")


# --------------------------------------------------------------------------- activations
cdef int custom_activation(PyObject* callback, floating* z, floating* a, Py_ssize_t n_rows,
                           Py_ssize_t width) except -1 nogil:
    """a = fn(z) by the user's function; where a is not z (training: backward follows),
    z is then overwritten by derivative(z), which the backward pass multiplies by."""
    with gil:
        return _custom_activation(<PythonCallback>callback, z, a, n_rows, width)


cdef int _custom_activation(PythonCallback callback, floating* z, floating* a,
                            Py_ssize_t n_rows, Py_ssize_t width) except -1:
    cdef int type_num = cnp.NPY_FLOAT if floating is float else cnp.NPY_DOUBLE
    cdef Py_ssize_t size = n_rows * width * sizeof(floating)
    activation = callback.function
    inputs = buffer_view(callback, VIEW_OUTPUT, z, n_rows, width)
    values = checked_result(activation.fn(inputs), type_num, n_rows, width,
                            f"{activation!r}'s fn")
    derivative = None
    if a != z:  # both before either is written: z is their input
        derivative = checked_result(activation.derivative(inputs), type_num, n_rows, width,
                                    f"{activation!r}'s derivative")
    memmove(a, cnp.PyArray_DATA(values), size)
    if derivative is not None:
        memmove(z, cnp.PyArray_DATA(derivative), size)
    return 0


# --------------------------------------------------------------------------- losses
cdef int custom_loss(PyObject* callback, bint sum_reduction, const floating* out,
                     const floating* target, const double* weights, floating* grad,
                     Py_ssize_t n_rows, Py_ssize_t width, double* value) except -1 nogil:
    """value[0] = the weighted mean of the user's per-sample (or per-element) losses,
    and, if grad != NULL, its gradient: the user's gradient row i times
    w_i / (sum(w) * (width if per element else 1)). sum_reduction (reduction="sum"):
    the weighted sum sum(w_i * loss_i) and the user's gradient row i times w_i."""
    with gil:
        return _custom_loss(<PythonCallback>callback, sum_reduction, out, target, weights,
                            grad, n_rows, width, value)


cdef int _custom_loss(PythonCallback callback, bint sum_reduction, const floating* out,
                      const floating* target, const double* weights, floating* grad,
                      Py_ssize_t n_rows, Py_ssize_t width, double* value) except -1:
    cdef int type_num = cnp.NPY_FLOAT if floating is float else cnp.NPY_DOUBLE
    cdef const floating* losses
    cdef const floating* user_grad
    cdef Py_ssize_t i, j, per_row
    cdef double total = 0, row, denominator, scale
    cdef floating row_scale
    loss = callback.function
    output = buffer_view(callback, VIEW_OUTPUT, out, n_rows, width)
    target_view = buffer_view(callback, VIEW_TARGET, target, n_rows, width)
    # both calls before anything is written: an exception in either changes nothing
    values = checked_result(loss.value(output, target_view), type_num, n_rows, -width,
                            f"{type(loss).__name__}.value")
    gradient = None
    if grad != NULL:
        gradient = checked_result(loss.gradient(output, target_view), type_num, n_rows,
                                  width, f"{type(loss).__name__}.gradient")
    losses = <const floating*>cnp.PyArray_DATA(values)
    per_row = width if values.ndim == 2 else 1
    with nogil:
        denominator = 1.0 if sum_reduction else weight_sum(weights, n_rows) * per_row
        for i in range(n_rows):  # in row order, in double, as the built-in losses
            row = 0
            for j in range(per_row):
                row += losses[i * per_row + j]
            total += row if weights == NULL else row * weights[i]
        value[0] = total / denominator if denominator > 0 else 0.0
        if grad != NULL:
            user_grad = <const floating*>cnp.PyArray_DATA(gradient)
            scale = 1.0 / denominator if denominator > 0 else 0.0
            for i in range(n_rows):
                row_scale = <floating>(scale if weights == NULL else scale * weights[i])
                for j in range(width):
                    grad[i * width + j] = row_scale * user_grad[i * width + j]
    return 0
