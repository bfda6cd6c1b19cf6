# cython: language_level=3, boundscheck=False, wraparound=False
# cython: cdivision=True, initializedcheck=False
"""bpfast's compiled core: every arithmetic loop of training and inference.

The kernels (``_kernels/*.pxi``, one file per concern) are written once over
``cython.floating`` and work on raw row-major buffers (pointer + sizes), the way BLAS
does, without the GIL. Above them, the typed engines ``Engine32`` and ``Engine64``
(rendered from one template, ``_engine.pxi.tp``) hold typed memoryviews of every
buffer they own, taken once when it is allocated, and take the caller's arrays as
typed memoryviews after checking them; the kernels get pointers from those views.
One training step is a single Python call. The Python layer validates every
argument before anything here runs; the engines check types and shapes again so
that a wrong array is refused, never misread.

Threads: matrix products go to BLAS, which threads itself. Elementwise passes and
the optimizer run under OpenMP ``prange`` only above ``PARALLEL_MIN_WORK``
elements, split into contiguous blocks, never around a BLAS call. Reductions
(bias gradients, loss sums) keep one summation order whatever the thread count.
"""

from cython cimport floating
from cython.parallel cimport prange
from libc.math cimport (exp, expf, log, log1p, log1pf, expm1, expm1f, tanh,
                        tanhf, erf, erff, sqrt, sqrtf, fabs, pow, isfinite)
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy
from libc.stdlib cimport malloc, free
from scipy.linalg.cython_blas cimport sgemm, dgemm, sgemv, dgemv

import numpy as np
cimport numpy as cnp

cnp.import_array()

cdef extern from "Python.h":
    # raises (returns -1) when a signal handler did, e.g. KeyboardInterrupt on Ctrl-C
    int PyErr_CheckSignals() except -1

ctypedef cnp.npy_intp intp

cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define BPFAST_OPENMP 1
    #else
    #define BPFAST_OPENMP 0
    static int omp_get_max_threads(void) { return 1; }
    #endif
    """
    int BPFAST_OPENMP
    int omp_get_max_threads() noexcept nogil

cdef extern from *:
    """
    /* 1 in the copy of this module built with AVX2 (_core_avx2), 0 here */
    #ifndef BPFAST_AVX2
    #define BPFAST_AVX2 0
    #endif
    #if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    /* CPUID and XGETBV directly: __builtin_cpu_supports needs libgcc's __cpu_model,
       which Apple's toolchain does not provide. AVX2 is usable when the CPU has it
       (leaf 7, EBX bit 5) and the OS saves the YMM registers (OSXSAVE, then XCR0
       bits 1 and 2). */
    #include <cpuid.h>
    static int bpfast_cpu_has_avx2(void) {
        unsigned int eax, ebx, ecx, edx, xcr0_low, xcr0_high;
        if (!__get_cpuid(1, &eax, &ebx, &ecx, &edx) || !(ecx & (1u << 27))
                || !(ecx & (1u << 28)))
            return 0;
        __asm__ volatile("xgetbv" : "=a"(xcr0_low), "=d"(xcr0_high) : "c"(0));
        if ((xcr0_low & 6u) != 6u)
            return 0;
        if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx))
            return 0;
        return (ebx & (1u << 5)) != 0;
    }
    #else
    static int bpfast_cpu_has_avx2(void) { return 0; }
    #endif
    """
    int BPFAST_AVX2
    int bpfast_cpu_has_avx2() noexcept nogil


# --------------------------------------------------------------------------- codes
# The one table of names: the kernels switch on these codes, and every Python list of
# names (ACTIVATIONS, LOSSES, OPTIMIZERS, LAYER_KINDS below, and through them
# bpfast.layers, losses, optimizers, io and cli) is derived from these enums: a
# member's name without its prefix, in lower case, in the order of the codes.
cpdef enum Activation:
    ACT_IDENTITY, ACT_SIGMOID, ACT_TANH, ACT_RELU, ACT_LEAKY_RELU, ACT_ELU
    ACT_SOFTPLUS, ACT_GELU, ACT_SOFTMAX
    ACT_SILU, ACT_MISH, ACT_HARDTANH, ACT_SELU, ACT_SOFTSIGN
    # a Python function (bpfast.CustomActivation) called from the kernel: not a name users give
    ACT_CUSTOM

cpdef enum Loss:
    # the *_PROBS losses take probabilities (a softmax or sigmoid output), the others
    # logits: cross-entropy from logits is log-sum-exp, stable where log(p) is not
    LOSS_MSE, LOSS_L1, LOSS_HUBER, LOSS_CROSS_ENTROPY, LOSS_CROSS_ENTROPY_PROBS
    LOSS_BINARY_CROSS_ENTROPY, LOSS_BINARY_CROSS_ENTROPY_PROBS
    # a Python loss (a bpfast.Loss subclass) called from the kernel
    LOSS_CUSTOM

cpdef enum Reduction:
    # how a loss combines its terms, as PyTorch's reduction= (the default is the mean)
    REDUCTION_MEAN, REDUCTION_SUM

cpdef enum Optimizer:
    OPT_SGD, OPT_ADAM, OPT_RMSPROP, OPT_ADAGRAD

cpdef enum LayerKind:
    # the kinds of layer the engine's layer table runs (_kernels/layers.pxi)
    KIND_DENSE, KIND_DROPOUT, KIND_BATCH_NORM1D, KIND_LAYER_NORM, KIND_ACTIVATION


def _names(enum, str prefix):
    """The Python names of an enum's members in code order: ACT_LEAKY_RELU -> "leaky_relu"."""
    members = sorted(enum)
    if [int(member) for member in members] != list(range(len(members))):
        raise ImportError(f"{enum.__name__}'s codes must be 0, 1, 2, ...")  # names index codes
    return tuple(member.name[len(prefix):].lower() for member in members)


ACTIVATIONS = _names(Activation, "ACT_")
LOSSES = _names(Loss, "LOSS_")
REDUCTIONS = _names(Reduction, "REDUCTION_")
OPTIMIZERS = _names(Optimizer, "OPT_")
LAYER_KINDS = _names(LayerKind, "KIND_")

# Below this many elements an elementwise pass runs on one thread: waking the
# (passive) OpenMP workers costs more than the pass saves (bench/README.md).
PARALLEL_MIN_WORK = 1 << 17
# Sums over the parameters (L2 penalty, gradient norm) add fixed blocks of this many
# elements in order, so they do not depend on the thread count.
cdef enum:
    REDUCTION_BLOCK = 1 << 14
cdef Py_ssize_t _parallel_min_work = PARALLEL_MIN_WORK
cdef int _n_threads = omp_get_max_threads()
# False while the last product timed ran faster on one thread (see gemm)
cdef bint _passes_threaded = True

# PyTorch's constants: BCELoss clamps log at -100 and divides by max(p(1-p), 1e-12).
cdef double LOG_CLAMP = -100.0
cdef double PROB_EPS = 1e-12
# BCELoss's gradient clamp is the float literal 1e-12f in PyTorch's kernel.
cdef double BCE_GRAD_EPS = <double><float>1e-12
cdef double SOFTPLUS_THRESHOLD = 20.0
cdef double SQRT1_2 = 0.70710678118654752440
cdef double GELU_PDF_SCALE = 0.39894228040143267794  # 1 / sqrt(2 pi)


def openmp_enabled():
    """Whether this build was compiled with OpenMP."""
    return bool(BPFAST_OPENMP)


def set_num_threads(int n):
    """Set the OpenMP thread count used by bpfast's elementwise kernels."""
    global _n_threads
    _n_threads = max(1, n) if BPFAST_OPENMP else 1


def kernel_info():
    """(this build's instruction set, whether this CPU can run the AVX2 build)."""
    return ("avx2" if BPFAST_AVX2 else "baseline"), bool(bpfast_cpu_has_avx2())


def get_num_threads():
    """The OpenMP thread count used by bpfast's elementwise kernels."""
    return _n_threads


# --------------------------------------------------------------------------- kernels
# Each concern in its own file, written once over `floating`; the order is the order
# of dependence.
include "_kernels/math.pxi"
include "_kernels/blas.pxi"
include "_kernels/callbacks.pxi"
include "_kernels/activations.pxi"
include "_kernels/losses.pxi"
include "_kernels/optimizers.pxi"
include "_kernels/layers.pxi"
include "_kernels/regularization.pxi"
include "_kernels/network.pxi"
include "_kernels/checks.pxi"

# --------------------------------------------------------------------------- engines
include "_engine.pxi"
