# cython: language_level=3, boundscheck=False, wraparound=False
# cython: cdivision=True, initializedcheck=False
"""bpfast's compiled core: every arithmetic loop of training and inference.

Each kernel is written once over ``cython.floating`` and works on raw row-major
buffers (pointer + sizes), the way BLAS does; memoryview-free so that one training
step costs a single Python call and no buffer acquisition. The Python layer
validates every argument before anything here runs: these functions trust their
inputs.

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
# The Python layer refers to activations, losses and optimizers by these names;
# the index in each tuple is the code the kernels switch on.
ACTIVATIONS = ("identity", "sigmoid", "tanh", "relu", "leaky_relu", "elu",
               "softplus", "gelu", "softmax")
cdef enum:
    ACT_IDENTITY, ACT_SIGMOID, ACT_TANH, ACT_RELU, ACT_LEAKY_RELU, ACT_ELU
    ACT_SOFTPLUS, ACT_GELU, ACT_SOFTMAX

LOSSES = ("mse", "l1", "huber", "cross_entropy", "cross_entropy_probs",
          "binary_cross_entropy", "binary_cross_entropy_probs")
cdef enum:
    LOSS_MSE, LOSS_L1, LOSS_HUBER, LOSS_CE_LOGITS, LOSS_CE_PROBS
    LOSS_BCE_LOGITS, LOSS_BCE_PROBS

OPTIMIZERS = ("sgd", "adam", "rmsprop", "adagrad")
cdef enum:
    OPT_SGD, OPT_ADAM, OPT_RMSPROP, OPT_ADAGRAD

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


cdef inline int _threads_for(Py_ssize_t work) noexcept nogil:
    # and one thread while the threaded products lose (a busy machine, see gemm):
    # joining this pass's threads would wait for a descheduled worker just the same
    return 1 if work < _parallel_min_work or not _passes_threaded else _n_threads


# --------------------------------------------------------------------------- math
cdef inline floating _exp(floating x) noexcept nogil:
    if floating is float:
        return expf(x)
    else:
        return exp(x)

cdef inline floating _log1p(floating x) noexcept nogil:
    if floating is float:
        return log1pf(x)
    else:
        return log1p(x)

cdef inline floating _expm1(floating x) noexcept nogil:
    if floating is float:
        return expm1f(x)
    else:
        return expm1(x)

cdef inline floating _tanh(floating x) noexcept nogil:
    if floating is float:
        return tanhf(x)
    else:
        return tanh(x)

cdef inline floating _erf(floating x) noexcept nogil:
    if floating is float:
        return erff(x)
    else:
        return erf(x)

cdef inline floating _sqrt(floating x) noexcept nogil:
    if floating is float:
        return sqrtf(x)
    else:
        return sqrt(x)

cdef inline floating _sigmoid(floating x) noexcept nogil:
    # exp of a non-positive argument only, so it never overflows.
    cdef floating e
    if x >= 0:
        return 1 / (1 + _exp(-x))
    e = _exp(x)
    return e / (1 + e)

cdef inline floating _log_sigmoid(floating x) noexcept nogil:
    # log(sigmoid(x)) = min(x, 0) - log1p(exp(-|x|)), as PyTorch's log_sigmoid.
    return (x if x < 0 else 0) - _log1p(_exp(-fabs(x)))


# --------------------------------------------------------------------------- BLAS
# Thread policy for matrix products (bench/README.md, "Threads under load").
#
# bpfast threads its products itself: a product large enough to gain is split into
# fixed column (or row) blocks, each one single-threaded BLAS call, and the blocks run
# either one after the other in the calling thread or under OpenMP. The blocks depend
# on the shape only, so both ways (and any thread count) give the same bits. Which way
# is faster depends on the load: on a quiet machine the threads win up to 1.7x, but
# when other processes keep the cores busy every join waits a scheduler slice for a
# descheduled worker and the threaded product is up to 10x slower. So each shape keeps
# a running time of both ways and uses the faster: it starts on one thread and times
# the other way again once PROBE_RATIO times that way's estimated cost (at least
# PROBE_FLOOR_S) has been spent on the chosen one, so probing costs about
# 1/PROBE_RATIO of the time. SciPy's OpenBLAS is held at one thread
# while bpfast calls it (through the set/get functions _threads.py finds); where those
# are unknown (another BLAS), products are not split and BLAS threads itself.
cdef extern from *:
    """
    #include <time.h>
    typedef void (*bpfast_blas_set_fn)(int);
    typedef int (*bpfast_blas_get_fn)(void);
    static bpfast_blas_set_fn bpfast_blas_set = NULL;
    static bpfast_blas_get_fn bpfast_blas_get = NULL;
    #ifdef _WIN32
    static double bpfast_seconds(void) {
        struct timespec ts; timespec_get(&ts, TIME_UTC);
        return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
    }
    /* Windows: the BLAS functions are never looked up, so this is never reached */
    static void bpfast_blas_enter(void) {}
    static void bpfast_blas_leave(void) {}
    static void bpfast_blas_set_count(int n) {}
    #else
    #include <pthread.h>
    static double bpfast_seconds(void) {
        struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
    }
    /* The BLAS thread count belongs to the process: the first bpfast product to start
       saves it and sets one thread, the last to finish restores it. */
    static pthread_mutex_t bpfast_blas_lock = PTHREAD_MUTEX_INITIALIZER;
    static int bpfast_blas_users = 0, bpfast_blas_saved = 1;
    static void bpfast_blas_enter(void) {
        pthread_mutex_lock(&bpfast_blas_lock);
        if (bpfast_blas_users++ == 0) {
            bpfast_blas_saved = bpfast_blas_get();
            if (bpfast_blas_saved != 1) bpfast_blas_set(1);
        }
        pthread_mutex_unlock(&bpfast_blas_lock);
    }
    static void bpfast_blas_leave(void) {
        pthread_mutex_lock(&bpfast_blas_lock);
        if (--bpfast_blas_users == 0 && bpfast_blas_saved != 1)
            bpfast_blas_set(bpfast_blas_saved);
        pthread_mutex_unlock(&bpfast_blas_lock);
    }
    /* a new count while products run is the one the last of them restores */
    static void bpfast_blas_set_count(int n) {
        pthread_mutex_lock(&bpfast_blas_lock);
        if (bpfast_blas_users > 0) bpfast_blas_saved = n; else bpfast_blas_set(n);
        pthread_mutex_unlock(&bpfast_blas_lock);
    }
    #endif
    """
    ctypedef void (*bpfast_blas_set_fn)(int) noexcept nogil
    ctypedef int (*bpfast_blas_get_fn)() noexcept nogil
    bpfast_blas_set_fn bpfast_blas_set
    bpfast_blas_get_fn bpfast_blas_get
    double bpfast_seconds() noexcept nogil
    void bpfast_blas_enter() noexcept nogil
    void bpfast_blas_leave() noexcept nogil
    void bpfast_blas_set_count(int n) noexcept nogil

# A product is split when m n k reaches SPLIT_MIN_WORK (OpenBLAS's own threshold for
# threading a GEMM): its longer side (rows or columns of C) into blocks of about
# BLOCK_WIDTH (two halves from BLOCK_WIDTH up), at most MAX_BLOCKS of them. Narrower
# blocks cost more in one thread: 64 columns 5-15% over one call, 128 columns 3-6%
# (SGEMM/DGEMM of the L shapes, bench/README.md).
cdef enum:
    SPLIT_MIN_WORK = 1 << 18
    BLOCK_WIDTH = 128
    MAX_BLOCKS = 64
    PROBE_RATIO = 16
    TIMING_SLOTS = 256  # shapes remembered (a network has 3 per layer, and a last batch)
cdef double PROBE_FLOOR_S = 1e-3
# for tests: (SPLIT_MIN_WORK, BLOCK_WIDTH, MAX_BLOCKS)
PRODUCT_SPLIT = (SPLIT_MIN_WORK, BLOCK_WIDTH, MAX_BLOCKS)

ctypedef struct ShapeTiming:
    int m, n, k, flags        # the product; flags: transposes, dtype; 0 = empty slot
    double serial_s           # running time per call, blocks one after the other
    double parallel_s         # the same under OpenMP; 0 = not timed yet
    double since_probe_s      # time spent on the chosen way since the other was timed
    bint parallel             # the chosen way

# Racy by design: threads may update one slot at once. A torn update only misleads
# the choice for a while; the result is the same either way.
cdef ShapeTiming _timings[TIMING_SLOTS]
cdef bint _adaptive = True
cdef bint _split_products = False  # True once _threads.py found the BLAS's thread functions


def set_blas_thread_functions(size_t set_address, size_t get_address):
    """Give the engine the BLAS's set_num_threads/get_num_threads (C addresses; 0, 0: none).

    With them, products are split and threaded by bpfast (see the BLAS section of
    _core.pyx); without, BLAS threads its own products.
    """
    global bpfast_blas_set, bpfast_blas_get, _split_products
    bpfast_blas_set = <bpfast_blas_set_fn>set_address
    bpfast_blas_get = <bpfast_blas_get_fn>get_address
    _split_products = set_address != 0 and get_address != 0


def set_blas_num_threads(int n):
    """Set the BLAS's thread count (found by set_blas_thread_functions), also while
    bpfast's products hold it at one: the last of them to finish restores n."""
    if _split_products:
        bpfast_blas_set_count(max(1, n))


def set_adaptive(bint adaptive):
    """True: time both ways of running split products and use the faster (the default);
    False: always run them on get_num_threads() threads (benchmarks use it)."""
    global _adaptive, _passes_threaded
    _adaptive = adaptive
    _passes_threaded = True


def product_timings():
    """The shapes timed so far: (m, n, k, serial_s, parallel_s, uses_threads) each."""
    return [(t.m, t.n, t.k, t.serial_s, t.parallel_s, bool(t.parallel))
            for t in _timings[:TIMING_SLOTS] if t.flags != 0]


cdef ShapeTiming* _timing_for(int m, int n, int k, int flags) noexcept nogil:
    cdef uint64_t h = (<uint64_t>m * 0x9E3779B97F4A7C15ULL) ^ (<uint64_t>n * 0xC2B2AE3D27D4EB4FULL)
    h ^= (<uint64_t>k * 0x165667B19E3779F9ULL) ^ <uint64_t>flags
    h ^= h >> 29
    cdef int probe, slot = <int>(h % TIMING_SLOTS)
    cdef ShapeTiming* t
    for probe in range(4):
        t = &_timings[(slot + probe) % TIMING_SLOTS]
        if t.flags == flags and t.m == m and t.n == n and t.k == k:
            return t
        if t.flags == 0:
            break
    # a new shape: the empty slot found, or (these four being taken) the last of them
    t.m, t.n, t.k, t.flags = m, n, k, flags
    t.serial_s = t.parallel_s = t.since_probe_s = 0
    t.parallel = False
    return t


cdef inline void _blas_gemm(char ta, char tb, int m, int n, int k, const floating* a, int lda,
                            const floating* b, int ldb, floating beta, floating* c,
                            int ldc) noexcept nogil:
    # column-major C (n x m as bpfast sees it): see gemm
    cdef floating one = 1
    if floating is float:
        sgemm(&tb, &ta, &n, &m, &k, &one, <float*>b, &ldb, <float*>a, &lda, &beta, c, &ldc)
    else:
        dgemm(&tb, &ta, &n, &m, &k, &one, <double*>b, &ldb, <double*>a, &lda, &beta, c, &ldc)


cdef void _gemm_block(bint trans_a, bint trans_b, bint split_rows, int block, int n_blocks,
                      int m, int n, int k, const floating* a, int lda, const floating* b,
                      int ldb, floating beta, floating* c, int ldc) noexcept nogil:
    """Block `block` of n_blocks of the rows (split_rows) or columns of C = op(A) op(B)."""
    cdef char ta = b'T' if trans_a else b'N'
    cdef char tb = b'T' if trans_b else b'N'
    cdef int size = m if split_rows else n
    cdef int begin = <int>(<long long>block * size // n_blocks)
    cdef int end = <int>(<long long>(block + 1) * size // n_blocks)
    cdef Py_ssize_t offset
    if split_rows:  # rows of op(A): rows of A, or its columns when transposed
        offset = begin if trans_a else <Py_ssize_t>begin * lda
        _blas_gemm(ta, tb, end - begin, n, k, a + offset, lda, b, ldb, beta,
                   c + <Py_ssize_t>begin * ldc, ldc)
    else:  # columns of op(B): columns of B, or its rows when transposed
        offset = <Py_ssize_t>begin * ldb if trans_b else begin
        _blas_gemm(ta, tb, m, end - begin, k, a, lda, b + offset, ldb, beta, c + begin, ldc)


cdef void gemm(bint trans_a, bint trans_b, int m, int n, int k,
               const floating* a, int lda, const floating* b, int ldb,
               floating beta, floating* c, int ldc) noexcept nogil:
    """Row-major C (m x n) = op(A) op(B) + beta C, with op(X) = X.T when trans_X.

    A row-major matrix is the column-major storage of its transpose, so C.T =
    op(B).T op(A).T is one column-major BLAS call with the operands swapped:
    no copies, whatever the transposes. Large products run in blocks (see above).
    """
    cdef char ta = b'T' if trans_a else b'N'
    cdef char tb = b'T' if trans_b else b'N'
    cdef bint split_rows = m > n
    cdef int n_blocks = (m if split_rows else n) // BLOCK_WIDTH
    cdef int block, n_threads = _n_threads, flags
    cdef bint parallel
    cdef double start, elapsed, other_s
    cdef ShapeTiming* timing = NULL
    if n_blocks > MAX_BLOCKS:
        n_blocks = MAX_BLOCKS
    elif n_blocks == 1 and (m if split_rows else n) >= BLOCK_WIDTH:
        n_blocks = 2  # two halves of at least BLOCK_WIDTH / 2
    if not _split_products or n_blocks < 2 or <double>m * n * k < SPLIT_MIN_WORK:
        if _split_products:
            bpfast_blas_enter()
        _blas_gemm(ta, tb, m, n, k, a, lda, b, ldb, beta, c, ldc)
        if _split_products:
            bpfast_blas_leave()
        return
    bpfast_blas_enter()
    parallel = n_threads > 1
    if parallel and _adaptive:
        flags = 1 + trans_a + 2 * trans_b + (4 if floating is float else 8)
        timing = _timing_for(m, n, k, flags)
        if timing.serial_s == 0:
            parallel = False
        else:
            # an untimed way counts as costing PROBE_FLOOR_S: under load one threaded
            # call can wait a scheduler slice, whatever its size
            other_s = timing.serial_s if timing.parallel else timing.parallel_s
            if timing.since_probe_s >= PROBE_RATIO * max(other_s, PROBE_FLOOR_S):
                parallel = not timing.parallel
            else:
                parallel = timing.parallel
        start = bpfast_seconds()
    if parallel:
        for block in prange(n_blocks, num_threads=n_threads, schedule="dynamic"):
            _gemm_block(trans_a, trans_b, split_rows, block, n_blocks, m, n, k, a, lda, b,
                        ldb, beta, c, ldc)
    else:
        for block in range(n_blocks):
            _gemm_block(trans_a, trans_b, split_rows, block, n_blocks, m, n, k, a, lda, b,
                        ldb, beta, c, ldc)
    if timing != NULL:
        elapsed = bpfast_seconds() - start
        _record(timing, parallel, elapsed)
    bpfast_blas_leave()


cdef inline double _running(double previous, double sample, double weight) noexcept nogil:
    return sample if previous == 0 else previous + weight * (sample - previous)


cdef void _record(ShapeTiming* timing, bint parallel, double elapsed) noexcept nogil:
    global _passes_threaded
    # the chosen way is timed every call (weight 1/4); a probe of the other counts 1/2
    if parallel == timing.parallel:
        timing.since_probe_s += elapsed
    else:
        timing.since_probe_s = 0
    if parallel:
        timing.parallel_s = _running(timing.parallel_s, elapsed,
                                     0.25 if timing.parallel else 0.5)
    else:
        timing.serial_s = _running(timing.serial_s, elapsed,
                                   0.5 if timing.parallel else 0.25)
    timing.parallel = timing.parallel_s != 0 and timing.parallel_s < timing.serial_s
    if timing.parallel_s != 0:
        _passes_threaded = timing.parallel


cdef inline void matvec(const floating* w, int n_out, int n_in, const floating* x,
                        floating* y) noexcept nogil:
    """y = W x for a row-major W (n_out, n_in): one GEMV on the column-major W^T.

    A one-row product through GEMM would pack all of W first (measured: 95% of a
    one-sample predict); GEMV streams W once.
    """
    cdef char trans = b'T'
    cdef int one = 1
    cdef floating alpha = 1, beta = 0
    if _split_products:  # one BLAS thread, as for the products (see gemm)
        bpfast_blas_enter()
    if floating is float:
        sgemv(&trans, &n_in, &n_out, &alpha, <float*>w, &n_in, <float*>x, &one, &beta, y,
              &one)
    else:
        dgemv(&trans, &n_in, &n_out, &alpha, <double*>w, &n_in, <double*>x, &one, &beta, y,
              &one)
    if _split_products:
        bpfast_blas_leave()


# --------------------------------------------------------------------------- activations
cdef void bias_activation_rows(floating* z, floating* a, const floating* bias,
                               Py_ssize_t row_begin, Py_ssize_t row_end,
                               Py_ssize_t width, int activation,
                               double param) noexcept nogil:
    """z += bias; a = g(z) on rows [row_begin, row_end). a may alias z."""
    cdef Py_ssize_t i, j
    cdef floating *zr
    cdef floating *ar
    cdef floating v, row_max, total, p = <floating>param
    for i in range(row_begin, row_end):
        zr = z + i * width
        ar = a + i * width
        if bias != NULL:
            for j in range(width):
                zr[j] = zr[j] + bias[j]
        if activation == ACT_IDENTITY:
            if ar != zr:
                for j in range(width):
                    ar[j] = zr[j]
        elif activation == ACT_SIGMOID:
            for j in range(width):
                ar[j] = _sigmoid(zr[j])
        elif activation == ACT_TANH:
            for j in range(width):
                ar[j] = _tanh(zr[j])
        elif activation == ACT_RELU:
            # "not <= 0" lets NaN through, as PyTorch's relu does.
            for j in range(width):
                v = zr[j]
                ar[j] = 0 if v <= 0 else v
        elif activation == ACT_LEAKY_RELU:
            for j in range(width):
                v = zr[j]
                ar[j] = v if v > 0 else v * p
        elif activation == ACT_ELU:
            for j in range(width):
                v = zr[j]
                ar[j] = v if v > 0 else p * _expm1(v)
        elif activation == ACT_SOFTPLUS:
            for j in range(width):
                v = zr[j]
                ar[j] = v if v > SOFTPLUS_THRESHOLD else _log1p(_exp(v))
        elif activation == ACT_GELU:
            for j in range(width):
                v = zr[j]
                ar[j] = v * <floating>0.5 * (1 + _erf(v * <floating>SQRT1_2))
        elif activation == ACT_SOFTMAX:
            row_max = zr[0]
            for j in range(1, width):
                if zr[j] > row_max:
                    row_max = zr[j]
            total = 0
            for j in range(width):
                ar[j] = _exp(zr[j] - row_max)
                total = total + ar[j]
            for j in range(width):
                ar[j] = ar[j] / total


cdef void activation_backward_rows(floating* grad, const floating* a, const floating* z,
                                   Py_ssize_t row_begin, Py_ssize_t row_end,
                                   Py_ssize_t width, int activation,
                                   double param) noexcept nogil:
    """grad = dL/da -> dL/dz in place, on rows [row_begin, row_end).

    Uses the output a where the derivative is a function of it (sigmoid, tanh,
    relu, softmax) and the pre-activation z otherwise (leaky_relu, elu, softplus,
    gelu), so every derivative is exact for any parameter value.
    """
    cdef Py_ssize_t i, j
    cdef floating *gr
    cdef const floating *ar
    cdef const floating *zr
    cdef floating v, e, dot, p = <floating>param
    for i in range(row_begin, row_end):
        gr = grad + i * width
        ar = a + i * width
        zr = z + i * width
        if activation == ACT_SIGMOID:
            for j in range(width):
                gr[j] = gr[j] * (1 - ar[j]) * ar[j]
        elif activation == ACT_TANH:
            for j in range(width):
                gr[j] = gr[j] * (1 - ar[j] * ar[j])
        elif activation == ACT_RELU:
            # selects, not conditional stores, so the loops vectorize
            for j in range(width):
                gr[j] = 0 if ar[j] <= 0 else gr[j]
        elif activation == ACT_LEAKY_RELU:
            for j in range(width):
                gr[j] = gr[j] if zr[j] > 0 else gr[j] * p
        elif activation == ACT_ELU:
            for j in range(width):
                v = zr[j]
                if v <= 0:
                    gr[j] = gr[j] * p * _exp(v)
        elif activation == ACT_SOFTPLUS:
            for j in range(width):
                v = zr[j]
                if not v > SOFTPLUS_THRESHOLD:
                    e = _exp(v)
                    gr[j] = gr[j] * e / (e + 1)
        elif activation == ACT_GELU:
            for j in range(width):
                v = zr[j]
                gr[j] = gr[j] * (<floating>0.5 * (1 + _erf(v * <floating>SQRT1_2))
                                 + v * <floating>GELU_PDF_SCALE * _exp(v * v * <floating>-0.5))
        elif activation == ACT_SOFTMAX:
            # Jacobian-vector product of softmax: a * (g - <g, a>).
            dot = 0
            for j in range(width):
                dot = dot + gr[j] * ar[j]
            for j in range(width):
                gr[j] = ar[j] * (gr[j] - dot)


cdef void column_sums(const floating* x, floating* sums, Py_ssize_t n_rows,
                      Py_ssize_t width, Py_ssize_t col_begin,
                      Py_ssize_t col_end) noexcept nogil:
    """sums[j] = sum_i x[i, j] for j in [col_begin, col_end), rows in order 0..n-1."""
    cdef Py_ssize_t i, j
    cdef const floating* xr
    for j in range(col_begin, col_end):
        sums[j] = 0
    for i in range(n_rows):
        xr = x + i * width
        for j in range(col_begin, col_end):
            sums[j] = sums[j] + xr[j]


# Parallel drivers: split rows (or columns) into one contiguous block per thread.
cdef void bias_activation(floating* z, floating* a, const floating* bias, Py_ssize_t n_rows,
                          Py_ssize_t width, int activation, double param) noexcept nogil:
    cdef int t, n_threads = _threads_for(n_rows * width)
    if n_threads == 1 or n_rows < 2:
        bias_activation_rows(z, a, bias, 0, n_rows, width, activation, param)
        return
    for t in prange(n_threads, num_threads=n_threads, schedule="static"):
        bias_activation_rows(z, a, bias, t * n_rows // n_threads,
                             (t + 1) * n_rows // n_threads, width, activation, param)


cdef void activation_backward(floating* grad, const floating* a, const floating* z,
                              Py_ssize_t n_rows, Py_ssize_t width, int activation,
                              double param) noexcept nogil:
    cdef int t, n_threads
    if activation == ACT_IDENTITY:
        return
    n_threads = _threads_for(n_rows * width)
    if n_threads == 1 or n_rows < 2:
        activation_backward_rows(grad, a, z, 0, n_rows, width, activation, param)
        return
    for t in prange(n_threads, num_threads=n_threads, schedule="static"):
        activation_backward_rows(grad, a, z, t * n_rows // n_threads,
                                 (t + 1) * n_rows // n_threads, width, activation, param)


cdef void bias_gradient(const floating* dz, floating* grad_bias, Py_ssize_t n_rows,
                        Py_ssize_t width) noexcept nogil:
    # Split over columns, never over rows: every thread count sums in one order.
    cdef int t, n_threads = _threads_for(n_rows * width)
    if n_threads == 1 or width < 64:
        column_sums(dz, grad_bias, n_rows, width, 0, width)
        return
    for t in prange(n_threads, num_threads=n_threads, schedule="static"):
        column_sums(dz, grad_bias, n_rows, width, t * width // n_threads,
                    (t + 1) * width // n_threads)


# --------------------------------------------------------------------------- losses
cdef struct LossParams:
    int kind
    double param          # MSE: 1 or 1/2 (half); Huber: delta


cdef void loss_rows(const LossParams* loss, const floating* out, const floating* target,
                    const intp* labels, const double* weights, floating* grad,
                    double* row_loss, Py_ssize_t row_begin, Py_ssize_t row_end,
                    Py_ssize_t width, double grad_scale) noexcept nogil:
    """Per-row loss sums into row_loss and, if grad != NULL, grad_scale * dloss/dout.

    target is (n, width) for every loss but cross-entropy with labels (n,).
    With weights != NULL, row i's loss and gradient are multiplied by weights[i].
    Sums are accumulated in double.
    """
    cdef Py_ssize_t i, j
    cdef const floating *o
    cdef const floating *t
    cdef floating *g
    cdef floating d, v, row_max, scale = <floating>grad_scale
    cdef floating delta = <floating>loss.param, prob, target_sum
    cdef double acc, total, lse
    cdef int kind = loss.kind
    for i in range(row_begin, row_end):
        o = out + i * width
        t = target + i * width if target != NULL else NULL
        g = grad + i * width if grad != NULL else NULL
        if weights != NULL:
            scale = <floating>(grad_scale * weights[i])
        acc = 0
        if kind == LOSS_MSE:
            for j in range(width):
                d = o[j] - t[j]
                acc += d * d
                if g != NULL:
                    g[j] = scale * d
        elif kind == LOSS_L1:
            for j in range(width):
                d = o[j] - t[j]
                acc += fabs(d)
                if g != NULL:
                    g[j] = scale if d > 0 else (-scale if d < 0 else 0 * d)
        elif kind == LOSS_HUBER:
            for j in range(width):
                d = o[j] - t[j]
                v = fabs(d)
                acc += <floating>0.5 * v * v if v < delta else delta * (v - <floating>0.5 * delta)
                if g != NULL:
                    g[j] = scale * (-delta if d < -delta else (delta if d > delta else d))
        elif kind == LOSS_CE_LOGITS:
            # log-sum-exp with the row max subtracted; gradient softmax * sum(y) - y.
            row_max = o[0]
            for j in range(1, width):
                if o[j] > row_max:
                    row_max = o[j]
            # one exp per element, kept in grad until the sum is known
            total = 0
            for j in range(width):
                v = _exp(o[j] - row_max)
                total += v
                if g != NULL:
                    g[j] = v
            lse = log(total)
            if labels != NULL:
                acc = lse - (o[labels[i]] - row_max)
                target_sum = 1
            else:
                target_sum = 0
                for j in range(width):
                    acc -= t[j] * ((o[j] - row_max) - lse)
                    target_sum = target_sum + t[j]
            if g != NULL:
                if labels != NULL:
                    for j in range(width):
                        g[j] = scale * <floating>(g[j] / total)
                    g[labels[i]] = g[labels[i]] - scale
                else:
                    for j in range(width):
                        g[j] = scale * (<floating>(g[j] / total) * target_sum - t[j])
        elif kind == LOSS_CE_PROBS:
            # outputs are probabilities (a softmax already applied by the caller)
            for j in range(width):
                v = t[j] if labels == NULL else (1 if j == labels[i] else 0)
                prob = o[j]
                if v != 0:
                    acc -= v * max(log(prob), LOG_CLAMP)
                if g != NULL:
                    g[j] = -scale * v / (prob if prob > PROB_EPS else <floating>PROB_EPS)
        elif kind == LOSS_BCE_LOGITS:
            for j in range(width):
                acc += (1 - t[j]) * o[j] - _log_sigmoid(o[j])
                if g != NULL:
                    g[j] = scale * (_sigmoid(o[j]) - t[j])
        elif kind == LOSS_BCE_PROBS:
            for j in range(width):
                prob = o[j]
                acc += ((t[j] - 1) * max(log1p(-prob), LOG_CLAMP)
                        - t[j] * max(log(prob), LOG_CLAMP))
                if g != NULL:
                    v = (1 - prob) * prob
                    v = v if v > BCE_GRAD_EPS else <floating>BCE_GRAD_EPS
                    g[j] = scale * (prob - t[j]) / v
        row_loss[i] = acc if weights == NULL else acc * weights[i]


cdef double weight_sum(const double* weights, Py_ssize_t n_rows) noexcept nogil:
    """The total weight of a batch: n_rows when unweighted."""
    cdef Py_ssize_t i
    cdef double total = 0
    if weights == NULL:
        return <double>n_rows
    for i in range(n_rows):
        total += weights[i]
    return total


cdef double loss_and_gradient(const LossParams* loss, const floating* out,
                              const floating* target, const intp* labels,
                              const double* weights, floating* grad, double* row_loss,
                              Py_ssize_t n_rows, Py_ssize_t width) noexcept nogil:
    """Mean loss (PyTorch's reduction) and, if grad != NULL, its gradient dL/dout.

    With per-row weights the mean is weighted: sum(w_i * loss_i) / sum(w_i), as
    PyTorch weights cross-entropy by class; a batch whose weights are all zero
    has loss 0 and a zero gradient.
    """
    cdef int t, n_threads = _threads_for(n_rows * width * 8)
    cdef Py_ssize_t i
    cdef double total = 0, denominator, grad_scale
    # cross-entropy averages over samples, every other loss over all elements
    denominator = weight_sum(weights, n_rows)
    if not (loss.kind == LOSS_CE_LOGITS or loss.kind == LOSS_CE_PROBS):
        denominator *= <double>width
    grad_scale = 2.0 * loss.param if loss.kind == LOSS_MSE else 1.0
    grad_scale = grad_scale / denominator if denominator > 0 else 0.0
    if n_threads == 1 or n_rows < 2:
        loss_rows(loss, out, target, labels, weights, grad, row_loss, 0, n_rows, width,
                  grad_scale)
    else:
        for t in prange(n_threads, num_threads=n_threads, schedule="static"):
            loss_rows(loss, out, target, labels, weights, grad, row_loss,
                      t * n_rows // n_threads, (t + 1) * n_rows // n_threads, width,
                      grad_scale)
    for i in range(n_rows):  # one summation order for any thread count
        total += row_loss[i]
    if loss.kind == LOSS_MSE:
        total *= loss.param
    return total / denominator if denominator > 0 else 0.0


# --------------------------------------------------------------------------- optimizers
cdef struct OptimizerParams:
    int kind
    double lr, momentum, dampening, weight_decay, beta1, beta2, eps, alpha, lr_decay
    bint nesterov, amsgrad, centered, decoupled_weight_decay
    # row of each state buffer in the (n_states, n_parameters) state array, -1 if absent
    int momentum_buffer, exp_avg, exp_avg_sq, max_exp_avg_sq, square_avg, grad_avg, sum


cdef void optimizer_update_range(const OptimizerParams* o, long long step,
                                 floating* param, const floating* grad, floating* state,
                                 Py_ssize_t n, Py_ssize_t begin,
                                 Py_ssize_t end) noexcept nogil:
    """One update of param[begin:end], PyTorch's single-tensor formulas, in its order."""
    cdef Py_ssize_t i
    cdef floating g, p, m, v, avg, denom
    cdef floating lr = <floating>o.lr, wd = <floating>o.weight_decay
    cdef floating momentum = <floating>o.momentum
    cdef floating one_minus_dampening = <floating>(1.0 - o.dampening)
    cdef floating beta1 = <floating>o.beta1, beta2 = <floating>o.beta2
    cdef floating eps = <floating>o.eps, alpha = <floating>o.alpha
    cdef floating step_size, bias_correction2_sqrt, clr, decay
    cdef floating *buf = state + o.momentum_buffer * n
    cdef floating *exp_avg = state + o.exp_avg * n
    cdef floating *exp_avg_sq = state + o.exp_avg_sq * n
    cdef floating *max_exp_avg_sq = state + o.max_exp_avg_sq * n
    cdef floating *square_avg = state + o.square_avg * n
    cdef floating *grad_avg = state + o.grad_avg * n
    cdef floating *state_sum = state + o.sum * n
    cdef floating lerp_weight = 1 - beta1
    # flags as locals: read through `o` they could alias the stores below, which
    # keeps the compiler from hoisting the branches and vectorizing the loops
    cdef bint nesterov = o.nesterov, amsgrad = o.amsgrad, centered = o.centered
    cdef bint first_step = step == 1
    if o.kind == OPT_SGD:
        for i in range(begin, end):
            g = grad[i]
            if wd != 0:
                g = g + wd * param[i]
            if momentum != 0:
                m = g if first_step else buf[i] * momentum + one_minus_dampening * g
                buf[i] = m
                g = g + momentum * m if nesterov else m
            param[i] = param[i] + (-lr) * g
    elif o.kind == OPT_ADAM:
        step_size = <floating>(o.lr / (1.0 - pow(o.beta1, <double>step)))
        bias_correction2_sqrt = <floating>sqrt(1.0 - pow(o.beta2, <double>step))
        # AdamW's decay multiplies by exactly 1 when it is off; Adam's L2 term is
        # added only when on. Branches left in the loop are invariant (vectorizable).
        decay = <floating>(1.0 - o.lr * o.weight_decay) if o.decoupled_weight_decay else 1
        if o.decoupled_weight_decay:
            wd = 0
        for i in range(begin, end):
            p = param[i] * decay
            g = grad[i]
            if wd != 0:
                g = g + wd * p
            # exp_avg.lerp_(g, 1 - beta1), with torch.lerp's two formulas
            m = exp_avg[i]
            m = m + lerp_weight * (g - m) if lerp_weight < 0.5 else g - (g - m) * (1 - lerp_weight)
            exp_avg[i] = m
            v = exp_avg_sq[i] * beta2 + (1 - beta2) * (g * g)
            exp_avg_sq[i] = v
            if amsgrad:
                v = max_exp_avg_sq[i] if max_exp_avg_sq[i] >= v else v
                max_exp_avg_sq[i] = v
            denom = _sqrt(v) / bias_correction2_sqrt + eps
            param[i] = p + (-step_size) * (m / denom)
    elif o.kind == OPT_RMSPROP:
        lerp_weight = 1 - alpha
        for i in range(begin, end):
            g = grad[i]
            if wd != 0:
                g = g + wd * param[i]
            v = square_avg[i] * alpha + (1 - alpha) * (g * g)
            square_avg[i] = v
            if centered:
                m = grad_avg[i]
                m = m + lerp_weight * (g - m) if lerp_weight < 0.5 else g - (g - m) * alpha
                grad_avg[i] = m
                v = v + (-1) * (m * m)
            avg = _sqrt(v) + eps
            if momentum > 0:
                m = buf[i] * momentum + g / avg
                buf[i] = m
                param[i] = param[i] + (-lr) * m
            else:
                param[i] = param[i] + (-lr) * (g / avg)
    elif o.kind == OPT_ADAGRAD:
        clr = <floating>(o.lr / (1.0 + (step - 1) * o.lr_decay))
        for i in range(begin, end):
            g = grad[i]
            if wd != 0:
                g = g + wd * param[i]
            state_sum[i] = state_sum[i] + g * g
            param[i] = param[i] + (-clr) * (g / (_sqrt(state_sum[i]) + eps))


cdef void optimizer_update(const OptimizerParams* o, long long step, floating* param,
                           const floating* grad, floating* state,
                           Py_ssize_t n) noexcept nogil:
    cdef int t, n_threads = _threads_for(n)
    if n_threads == 1:
        optimizer_update_range(o, step, param, grad, state, n, 0, n)
        return
    for t in prange(n_threads, num_threads=n_threads, schedule="static"):
        optimizer_update_range(o, step, param, grad, state, n, t * n // n_threads,
                               (t + 1) * n // n_threads)


# --------------------------------------------------------------------------- the network
cdef struct LayerSpec:
    int n_in, n_out
    int activation
    double param               # leaky_relu slope or elu alpha
    Py_ssize_t weight_offset   # into the flat parameter / gradient buffers
    Py_ssize_t bias_offset     # -1: no bias
    Py_ssize_t a_column        # start of this layer's block in the activation workspace
    Py_ssize_t z_column        # same in the pre-activation workspace; -1: z not kept


cdef struct Workspace:
    # Per-layer blocks of `capacity` rows each: layer l's output is the row-major
    # (m, n_out) matrix at acts + capacity * a_column.
    Py_ssize_t capacity
    Py_ssize_t max_width
    void* acts
    void* zs
    void* delta        # two (capacity, max_width) ping-pong buffers of dL/dz
    double* row_loss


cdef inline floating* _layer_output(const LayerSpec* layer, const Workspace* ws,
                                    floating* acts) noexcept nogil:
    return acts + ws.capacity * layer.a_column


cdef inline floating* _layer_z(const LayerSpec* layer, const Workspace* ws, floating* acts,
                               floating* zs) noexcept nogil:
    # the pre-activation z, or the output itself where z is not kept (computed in place)
    if layer.z_column < 0:
        return _layer_output(layer, ws, acts)
    return zs + ws.capacity * layer.z_column


cdef void dense_forward(const LayerSpec* layer, const floating* params, const floating* x,
                        Py_ssize_t n_rows, floating* z, floating* a) noexcept nogil:
    """z = x W^T + b, a = g(z); a may alias z. One GEMM (GEMV for one row), one pass over z."""
    if n_rows == 1:
        matvec(params + layer.weight_offset, layer.n_out, layer.n_in, x, z)
    else:
        gemm(False, True, <int>n_rows, layer.n_out, layer.n_in, x, layer.n_in,
             params + layer.weight_offset, layer.n_in, 0, z, layer.n_out)
    bias_activation(z, a, params + layer.bias_offset if layer.bias_offset >= 0 else NULL,
                    n_rows, layer.n_out, layer.activation, layer.param)


cdef void dense_backward(const LayerSpec* layer, const floating* params, floating* grads,
                         const floating* x, Py_ssize_t n_rows, const floating* dz,
                         floating* grad_x) noexcept nogil:
    """dW = dz^T x, db = column sums of dz, and (if grad_x != NULL) dx = dz W."""
    gemm(True, False, layer.n_out, layer.n_in, <int>n_rows, dz, layer.n_out, x, layer.n_in,
         0, grads + layer.weight_offset, layer.n_in)
    if layer.bias_offset >= 0:
        bias_gradient(dz, grads + layer.bias_offset, n_rows, layer.n_out)
    if grad_x != NULL:
        gemm(False, False, <int>n_rows, layer.n_in, layer.n_out, dz, layer.n_out,
             params + layer.weight_offset, layer.n_in, 0, grad_x, layer.n_in)


cdef void network_forward(const LayerSpec* layers, int n_layers, const Workspace* ws,
                          const floating* params, const floating* x,
                          Py_ssize_t n_rows) noexcept nogil:
    cdef int l
    cdef floating* acts = <floating*>ws.acts
    cdef floating* zs = <floating*>ws.zs
    cdef const floating* inp = x
    for l in range(n_layers):
        dense_forward(&layers[l], params, inp, n_rows, _layer_z(&layers[l], ws, acts, zs),
                      _layer_output(&layers[l], ws, acts))
        inp = _layer_output(&layers[l], ws, acts)


cdef void network_backward(const LayerSpec* layers, int n_layers, const Workspace* ws,
                           const floating* params, floating* grads, const floating* x,
                           Py_ssize_t n_rows, floating* grad_x) noexcept nogil:
    """Back-propagate dL/dz of the last layer (in delta buffer 0) through every layer.

    Fills every weight and bias gradient, and dL/dx into grad_x unless it is NULL.
    """
    cdef int l
    cdef floating* acts = <floating*>ws.acts
    cdef floating* zs = <floating*>ws.zs
    cdef floating* dz = <floating*>ws.delta
    cdef floating* spare = dz + ws.capacity * ws.max_width
    cdef floating* swap
    cdef const LayerSpec* below
    for l in range(n_layers - 1, 0, -1):
        below = &layers[l - 1]
        dense_backward(&layers[l], params, grads, _layer_output(below, ws, acts), n_rows,
                       dz, spare)
        activation_backward(spare, _layer_output(below, ws, acts),
                            _layer_z(below, ws, acts, zs), n_rows, below.n_out,
                            below.activation, below.param)
        swap = dz
        dz = spare
        spare = swap
    dense_backward(&layers[0], params, grads, x, n_rows, dz, grad_x)


cdef double output_loss_gradient(const LayerSpec* layers, int n_layers, const Workspace* ws,
                                 const LossParams* loss, const floating* target,
                                 const intp* labels, const double* weights,
                                 Py_ssize_t n_rows) noexcept nogil:
    """The loss of the last forward pass, and dL/dz of the last layer in delta buffer 0.

    softmax + cross-entropy on probabilities and sigmoid + binary cross-entropy on
    probabilities are fused: the loss is taken from the logits z by log-sum-exp and
    dL/dz = (p * sum(y) - y) / n directly, stable where log(p) is not. Every other
    pairing computes dL/da and multiplies by the exact activation derivative.
    """
    cdef const LayerSpec* last = &layers[n_layers - 1]
    cdef floating* acts = <floating*>ws.acts
    cdef floating* out = _layer_output(last, ws, acts)
    cdef floating* z = _layer_z(last, ws, acts, <floating*>ws.zs)
    cdef floating* dz = <floating*>ws.delta
    cdef LossParams fused = loss[0]
    cdef double value
    if loss.kind == LOSS_CE_PROBS and last.activation == ACT_SOFTMAX:
        fused.kind = LOSS_CE_LOGITS
    elif loss.kind == LOSS_BCE_PROBS and last.activation == ACT_SIGMOID:
        fused.kind = LOSS_BCE_LOGITS
    if fused.kind != loss.kind:
        return loss_and_gradient(&fused, z, target, labels, weights, dz, ws.row_loss, n_rows,
                                 last.n_out)
    value = loss_and_gradient(loss, out, target, labels, weights, dz, ws.row_loss, n_rows,
                              last.n_out)
    activation_backward(dz, out, z, n_rows, last.n_out, last.activation, last.param)
    return value


# --------------------------------------------------------------------------- regularisation
cdef struct StepOptions:
    double l2            # loss += l2 / 2 * sum of squared weights (not biases); 0: off
    double clip_value    # clamp each gradient to [-clip_value, clip_value]; <= 0: off
    double clip_norm     # rescale the gradient to this global L2 norm at most; <= 0: off
    double* partials     # scratch of one double per REDUCTION_BLOCK parameters


cdef double block_sum_squares(const floating* x, floating* axpy, floating coef,
                              Py_ssize_t begin, Py_ssize_t end) noexcept nogil:
    """sum(x[begin:end]**2) in double; if axpy != NULL also axpy += coef * x there."""
    cdef Py_ssize_t i
    cdef double acc = 0
    for i in range(begin, end):
        acc += <double>x[i] * <double>x[i]
    if axpy != NULL:
        for i in range(begin, end):
            axpy[i] = axpy[i] + coef * x[i]
    return acc


cdef double sum_squares(const floating* x, floating* axpy, double coef, Py_ssize_t n,
                        double* partials) noexcept nogil:
    """sum(x**2) (and axpy += coef * x) over fixed blocks, in parallel above the threshold.

    The blocks do not depend on the thread count, and their sums are added in
    order, so the result is the same with any number of threads.
    """
    cdef Py_ssize_t b, n_blocks = (n + REDUCTION_BLOCK - 1) // REDUCTION_BLOCK
    cdef int n_threads = _threads_for(n)
    cdef double total = 0
    if n_threads == 1:
        for b in range(n_blocks):
            partials[b] = block_sum_squares(x, axpy, <floating>coef, b * REDUCTION_BLOCK,
                                            min(n, (b + 1) * REDUCTION_BLOCK))
    else:
        for b in prange(n_blocks, num_threads=n_threads, schedule="static"):
            partials[b] = block_sum_squares(x, axpy, <floating>coef, b * REDUCTION_BLOCK,
                                            min(n, (b + 1) * REDUCTION_BLOCK))
    for b in range(n_blocks):
        total += partials[b]
    return total


cdef void clip_range(floating* grad, floating limit, floating scale, Py_ssize_t begin,
                     Py_ssize_t end) noexcept nogil:
    """grad = clamp(grad, -limit, limit) if limit > 0, then grad *= scale if scale != 1."""
    cdef Py_ssize_t i
    cdef floating g
    if limit > 0:
        for i in range(begin, end):
            g = grad[i]
            # written so that NaN passes through: clipping must not hide a divergence
            if g > limit:
                g = limit
            elif g < -limit:
                g = -limit
            grad[i] = g
    if scale != 1:
        for i in range(begin, end):
            grad[i] = grad[i] * scale


cdef void clip(floating* grad, Py_ssize_t n, double limit, double scale) noexcept nogil:
    cdef int t, n_threads = _threads_for(n)
    if n_threads == 1:
        clip_range(grad, <floating>limit, <floating>scale, 0, n)
        return
    for t in prange(n_threads, num_threads=n_threads, schedule="static"):
        clip_range(grad, <floating>limit, <floating>scale, t * n // n_threads,
                   (t + 1) * n // n_threads)


cdef double regularize_and_clip(const LayerSpec* layers, int n_layers,
                                const StepOptions* options, const floating* params,
                                floating* grads, Py_ssize_t n_params) noexcept nogil:
    """Add the L2 term to the weight gradients, then clip by value and by global norm.

    Returns the L2 term of the loss (0 without it); NaN if the gradient norm is not
    finite, so that the step is treated as diverged instead of updating with it.
    """
    cdef int l
    cdef double penalty = 0, norm, scale
    cdef Py_ssize_t n_weights
    if options.l2 > 0:
        for l in range(n_layers):
            n_weights = <Py_ssize_t>layers[l].n_in * layers[l].n_out
            penalty += sum_squares(params + layers[l].weight_offset,
                                   grads + layers[l].weight_offset, options.l2, n_weights,
                                   options.partials)
        penalty *= 0.5 * options.l2
    if options.clip_value > 0:
        clip(grads, n_params, options.clip_value, 1.0)
    if options.clip_norm > 0:
        norm = sqrt(sum_squares(grads, <floating*>NULL, 0.0, n_params, options.partials))
        if not isfinite(norm):
            return norm
        # PyTorch's clip_grad_norm_: scale by max_norm / (norm + 1e-6) when that is < 1
        scale = options.clip_norm / (norm + 1e-6)
        if scale < 1.0:
            clip(grads, n_params, 0.0, scale)
    return penalty


# --------------------------------------------------------------------------- training
cdef double training_step(const LayerSpec* layers, int n_layers, const Workspace* ws,
                          floating* params, floating* grads, const floating* x,
                          const floating* target, const intp* labels, const double* weights,
                          Py_ssize_t n_rows, const LossParams* loss,
                          const StepOptions* options, const OptimizerParams* optimizer,
                          long long step, floating* state,
                          Py_ssize_t n_params) noexcept nogil:
    """Forward, loss, backward and (if optimizer != NULL) one update: one training step.

    Returns the loss of the forward pass (with the L2 term), before the update. When
    that loss (or the clipped gradient's norm) is not finite the update is skipped:
    the parameters stay as they were, for the caller to report the divergence.
    """
    cdef double value
    network_forward(layers, n_layers, ws, params, x, n_rows)
    value = output_loss_gradient(layers, n_layers, ws, loss, target, labels, weights, n_rows)
    network_backward(layers, n_layers, ws, params, grads, x, n_rows, <floating*>NULL)
    if options != NULL:
        value += regularize_and_clip(layers, n_layers, options, params, grads, n_params)
    if optimizer != NULL and isfinite(value):
        optimizer_update(optimizer, step, params, grads, state, n_params)
    return value


cdef void gather_rows(const floating* source, const intp* rows, Py_ssize_t n_rows,
                      Py_ssize_t width, floating* dest) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n_rows):
        memcpy(dest + i * width, source + rows[i] * width, width * sizeof(floating))


cdef void gather_labels(const intp* source, const intp* rows, Py_ssize_t n_rows,
                        intp* dest) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n_rows):
        dest[i] = source[rows[i]]


cdef void gather_weights(const double* source, const intp* rows, Py_ssize_t n_rows,
                         double* dest) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n_rows):
        dest[i] = source[rows[i]]


cdef struct EpochResult:
    double loss_sum      # sum over finished batches of (batch weight * batch loss)
    double weight_sum    # sum of those batch weights (rows, when unweighted)
    Py_ssize_t n_rows    # rows of the finished batches
    bint diverged        # a batch's loss was not finite; its update was skipped


cdef int training_epoch(const LayerSpec* layers, int n_layers, const Workspace* ws,
                        floating* params, floating* grads, const floating* x,
                        const floating* target, const intp* labels, const double* weights,
                        Py_ssize_t n_samples, const intp* order, Py_ssize_t batch_size,
                        floating* x_batch, floating* target_batch, intp* label_batch,
                        double* weight_batch, const LossParams* loss,
                        const StepOptions* options, const OptimizerParams* optimizer,
                        const double* batch_lrs, bint check_signals, long long* step,
                        floating* state, Py_ssize_t n_params,
                        EpochResult* result) except -1 nogil:
    """One pass over the data in batches (the last one partial), into result.

    With order == NULL the batches are consecutive rows of x, used in place;
    otherwise each batch's rows are gathered from x in that order. batch_lrs, if
    given, is the learning rate of each batch (a per-step schedule). Stops after a
    batch whose loss is not finite (result.diverged). With check_signals, Python's
    signal handlers run between batches, so Ctrl-C raises KeyboardInterrupt at a
    batch boundary, with every finished batch's update applied.
    """
    cdef Py_ssize_t begin = 0, n_rows, batch = 0
    cdef int n_in = layers[0].n_in, n_out = layers[n_layers - 1].n_out
    cdef const floating* xb
    cdef const floating* tb
    cdef const intp* lb
    cdef const double* wb
    cdef double value, batch_weight
    cdef OptimizerParams scheduled = optimizer[0]
    result.loss_sum = 0
    result.weight_sum = 0
    result.n_rows = 0
    result.diverged = False
    while begin < n_samples:
        if check_signals and begin > 0:
            with gil:
                PyErr_CheckSignals()
        n_rows = min(batch_size, n_samples - begin)
        if order == NULL:
            xb = x + begin * n_in
            tb = target + begin * n_out if target != NULL else NULL
            lb = labels + begin if labels != NULL else NULL
            wb = weights + begin if weights != NULL else NULL
        else:
            gather_rows(x, order + begin, n_rows, n_in, x_batch)
            xb = x_batch
            tb = NULL
            lb = NULL
            wb = NULL
            if target != NULL:
                gather_rows(target, order + begin, n_rows, n_out, target_batch)
                tb = target_batch
            if labels != NULL:
                gather_labels(labels, order + begin, n_rows, label_batch)
                lb = label_batch
            if weights != NULL:
                gather_weights(weights, order + begin, n_rows, weight_batch)
                wb = weight_batch
        if batch_lrs != NULL:
            scheduled.lr = batch_lrs[batch]
        step[0] += 1
        value = training_step(layers, n_layers, ws, params, grads, xb, tb, lb, wb, n_rows,
                              loss, options, &scheduled, step[0], state, n_params)
        if not isfinite(value):
            step[0] -= 1   # the update was skipped
            result.diverged = True
            return 0
        batch_weight = weight_sum(wb, n_rows)
        result.loss_sum += batch_weight * value
        result.weight_sum += batch_weight
        result.n_rows += n_rows
        begin += n_rows
        batch += 1
    return 0


cdef void predict_chunk(const LayerSpec* layers, int n_layers, const floating* params,
                        const floating* x, Py_ssize_t n_rows, floating* scratch,
                        Py_ssize_t scratch_width, floating* out) noexcept nogil:
    """Inference on n_rows rows: hidden layers ping-pong in scratch, the last into out."""
    cdef int l
    cdef const floating* inp = x
    cdef floating* dest
    for l in range(n_layers):
        if l == n_layers - 1:
            dest = out
        else:
            dest = scratch + (l % 2) * n_rows * scratch_width
        dense_forward(&layers[l], params, inp, n_rows, dest, dest)
        inp = dest


# --------------------------------------------------------------------------- Python-facing
cdef inline void* _data(object array):
    """The data of an array the engine allocated itself (its layout is known)."""
    return cnp.PyArray_DATA(<cnp.ndarray>array)


cdef inline void* _data_or_null(object array):
    return NULL if array is None else cnp.PyArray_DATA(<cnp.ndarray>array)


cdef inline int _float_type(bint is_double) noexcept:
    return cnp.NPY_DOUBLE if is_double else cnp.NPY_FLOAT


cdef bint _kernel_ready(object array, int type_num):
    """Whether the kernels may read array as a C array of type_num: an ndarray of exactly
    that type, in native byte order, C-contiguous and aligned."""
    if not cnp.PyArray_Check(array):
        return False
    cdef cnp.ndarray a = <cnp.ndarray>array
    return (cnp.PyArray_TYPE(a) == type_num and cnp.PyArray_ISNOTSWAPPED(a)
            and cnp.PyArray_IS_C_CONTIGUOUS(a) and cnp.PyArray_ISALIGNED(a))


cdef void* _input_data(object array, int type_num, str name, Py_ssize_t n_rows=-1,
                       Py_ssize_t n_cols=-2) except? NULL:
    """The data of a caller's array, which must be _kernel_ready for type_num and, where
    given, have n_rows rows (n_rows >= 0) and be 1-D (n_cols == -1) or have n_cols
    columns (n_cols >= 0).

    The Python layer converts every array (bpfast._validation.as_kernel_array) before
    it gets here; this check makes sure that an array that skipped it is refused
    (TypeError, ValueError for a shape) instead of read as the wrong type or length.
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
    return cnp.PyArray_DATA(a)


cdef void* _input_data_or_null(object array, int type_num, str name, Py_ssize_t n_rows=-1,
                               Py_ssize_t n_cols=-2) except? NULL:
    return NULL if array is None else _input_data(array, type_num, name, n_rows, n_cols)


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
    cdef bint is_double = array.dtype == np.float64
    cdef void* data = _input_data(array, _float_type(is_double), "first_nonfinite's array")
    cdef Py_ssize_t n = array.size, index
    with nogil:
        if is_double:
            index = first_nonfinite_index(<double*>data, n)
        else:
            index = first_nonfinite_index(<float*>data, n)
    return index


cdef class LossConfig:
    """A loss as the kernels see it: its code and one parameter (MSE scale, Huber delta)."""
    cdef LossParams p

    def __init__(self, str name, double param=1.0):
        self.p.kind = LOSSES.index(name)
        self.p.param = param

    @property
    def name(self):
        return LOSSES[self.p.kind]

    def evaluate(self, out, target, labels, grad, weights=None):
        """Mean loss of out (n, k) against target (n, k) or labels (n,); fills grad if given.

        Arrays are C-contiguous, out/target/grad of one float dtype, labels intp,
        weights (n,) float64 or None: the caller checks.
        """
        cdef bint is_double = isinstance(out, np.ndarray) and out.dtype == np.float64
        cdef int float_type = _float_type(is_double)
        cdef void* out_ptr = _input_data(out, float_type, "out")
        if out.ndim != 2 or out.shape[1] < 1:
            raise ValueError(f"out must be 2-D with at least one column, got {out.shape}")
        cdef Py_ssize_t n_rows = out.shape[0], width = out.shape[1]
        cdef object row_loss = np.empty(n_rows)
        cdef double* row_loss_ptr = <double*>_data(row_loss)
        cdef void* target_ptr = _input_data_or_null(target, float_type, "target", n_rows, width)
        cdef intp* label_ptr = <intp*>_input_data_or_null(labels, cnp.NPY_INTP, "labels",
                                                          n_rows, -1)
        cdef void* grad_ptr = _input_data_or_null(grad, float_type, "grad", n_rows, width)
        cdef double* weight_ptr = <double*>_input_data_or_null(weights, cnp.NPY_DOUBLE,
                                                               "weights", n_rows, -1)
        if target_ptr == NULL and label_ptr == NULL:
            raise ValueError("evaluate needs a target or labels")
        cdef double value
        with nogil:
            if is_double:
                value = loss_and_gradient(&self.p, <double*>out_ptr, <double*>target_ptr,
                                          label_ptr, weight_ptr, <double*>grad_ptr,
                                          row_loss_ptr, n_rows, width)
            else:
                value = loss_and_gradient(&self.p, <float*>out_ptr, <float*>target_ptr,
                                          label_ptr, weight_ptr, <float*>grad_ptr,
                                          row_loss_ptr, n_rows, width)
        return value


cdef class OptimizerConfig:
    """An optimizer's hyperparameters, step count and state, as the kernels see them.

    The state is one (n_states, n_parameters) array, allocated when the optimizer
    first steps a network; from then on it belongs to that network's Engine.
    """
    cdef OptimizerParams p
    cdef public long long step_count
    cdef readonly object state
    cdef readonly tuple state_names
    cdef readonly object owner
    cdef double initial_accumulator_value

    def __init__(self, str name, *, double lr, double momentum=0.0, double dampening=0.0,
                 bint nesterov=False, double weight_decay=0.0, double beta1=0.9,
                 double beta2=0.999, double eps=1e-8, bint amsgrad=False, double alpha=0.99,
                 bint centered=False, double lr_decay=0.0,
                 double initial_accumulator_value=0.0, bint decoupled_weight_decay=False):
        cdef int kind = OPTIMIZERS.index(name)
        self.p = OptimizerParams(
            kind=kind, lr=lr, momentum=momentum, dampening=dampening,
            weight_decay=weight_decay, beta1=beta1, beta2=beta2, eps=eps, alpha=alpha,
            lr_decay=lr_decay, nesterov=nesterov, amsgrad=amsgrad, centered=centered,
            decoupled_weight_decay=decoupled_weight_decay, momentum_buffer=-1, exp_avg=-1,
            exp_avg_sq=-1, max_exp_avg_sq=-1, square_avg=-1, grad_avg=-1, sum=-1)
        # the rows of the state array, named as PyTorch names its state
        names = []
        if kind == OPT_SGD and momentum != 0:
            names = ["momentum_buffer"]
        elif kind == OPT_ADAM:
            names = ["exp_avg", "exp_avg_sq"] + (["max_exp_avg_sq"] if amsgrad else [])
        elif kind == OPT_RMSPROP:
            names = (["square_avg"] + (["momentum_buffer"] if momentum > 0 else [])
                     + (["grad_avg"] if centered else []))
        elif kind == OPT_ADAGRAD:
            names = ["sum"]
        self.state_names = tuple(names)
        row = {name: i for i, name in enumerate(names)}.get
        self.p.momentum_buffer = row("momentum_buffer", -1)
        self.p.exp_avg = row("exp_avg", -1)
        self.p.exp_avg_sq = row("exp_avg_sq", -1)
        self.p.max_exp_avg_sq = row("max_exp_avg_sq", -1)
        self.p.square_avg = row("square_avg", -1)
        self.p.grad_avg = row("grad_avg", -1)
        self.p.sum = row("sum", -1)
        self.initial_accumulator_value = initial_accumulator_value
        self.step_count = 0
        self.state = None
        self.owner = None

    @property
    def lr(self):
        return self.p.lr

    @lr.setter
    def lr(self, double value):
        self.p.lr = value

    def check_owner(self, Engine engine):
        """Refuse an engine other than the one this optimizer already steps."""
        if self.owner is not None and self.owner is not engine:
            raise ValueError("this optimizer already steps another Network; an optimizer "
                             "keeps per-parameter state, so create one per network")

    cdef int bind(self, Engine engine) except -1:
        """Belong to engine (allocating the state on first use) or refuse another one."""
        if self.owner is engine:
            return 0
        self.check_owner(engine)
        state = np.full((len(self.state_names), engine.n_parameters),
                        self.initial_accumulator_value, dtype=engine.dtype)
        # the allocation may let another thread bind this optimizer meanwhile
        self.check_owner(engine)
        if self.owner is None:
            self.state = state
            self.owner = engine
        return 0

    def attach(self, Engine engine):
        """Belong to engine now, allocating the state (as the first step would)."""
        self.bind(engine)

    def step(self, Engine engine):
        """One update of engine's parameters from its gradients."""
        cdef void* state
        engine.acquire()
        try:
            self.bind(engine)
            state = _data(self.state)
            self.step_count += 1
            with nogil:
                if engine.is_double:
                    optimizer_update(&self.p, self.step_count, <double*>engine.params_ptr,
                                     <double*>engine.grads_ptr, <double*>state,
                                     engine.n_parameters)
                else:
                    optimizer_update(&self.p, self.step_count, <float*>engine.params_ptr,
                                     <float*>engine.grads_ptr, <float*>state,
                                     engine.n_parameters)
        finally:
            engine.release()


# --------------------------------------------------------------------------- who may run
cdef extern from "pythread.h":
    unsigned long PyThread_get_thread_ident()

import threading

BUSY_MESSAGE = ("this Network is already running a computation in another thread; use "
                "one Network per thread")
FITTING_MESSAGE = ("this Network is already training (fit) in another thread and belongs "
                   "to that fit until it returns; use one Network per thread")
# Waits sleep on a condition and are woken by the thread that ends the wait; this poll is
# only a safety net (a wake-up lost to an exception costs this much, never a hang).
cdef double WAIT_POLL_SECONDS = 0.05


cdef class Engine:
    """A network's compiled side: its layer table, flat buffers and workspaces.

    Workspaces are sized for `capacity` rows and grow (never per step) when a
    larger batch arrives.

    Who may run (every flag changes with the GIL held, and no Python code runs
    between a flag's check and its change, so each check-and-set is atomic):

    * Writers (train_step, train_epoch, forward, backward, assign_parameters, an
      optimizer step) run one at a time: a writer from another thread while one
      runs gets RuntimeError at once, never shared scratch.
    * Readers (predict, snapshot, layer_output) run together. A writer that finds
      readers waits for them (they are short), and readers arriving meanwhile queue
      behind it; when a writer ends, the readers queued then go before the next
      writer. So neither side starves the other, and no call is refused because of
      a reader.
    * claim(): a fit() owns the network until it returns: writers and snapshots
      from other threads get RuntimeError (predict still runs between its batches).
    * Results are copied out before the engine is released: nothing is read from
      shared state after release (the _after_release hook lets tests prove it).
    """
    cdef LayerSpec* layers
    cdef readonly int n_layers
    cdef readonly Py_ssize_t n_parameters, n_inputs, n_outputs, capacity
    cdef readonly object dtype, parameters, gradients
    cdef readonly Py_ssize_t forward_rows   # rows cached by the last forward(), -1: none
    cdef bint is_double
    cdef bint busy             # a writer runs
    cdef int readers           # readers running
    cdef bint writer_waiting   # a writer waits for the readers to finish; new ones queue
    cdef int readers_waiting   # readers queued behind a writer
    cdef int admitted          # queued readers that go before the next writer
    cdef bint owned            # a fit() owns the network: only its thread may write
    cdef unsigned long owner   # that thread
    cdef int owner_depth       # nested fit()s (callbacks, Trainer.run) of that thread
    cdef object turn           # the threading.Condition waits sleep on
    # tests: called after every release, to run "another thread" exactly there
    cdef public object _after_release
    cdef Py_ssize_t itemsize
    cdef void* params_ptr
    cdef void* grads_ptr
    cdef Py_ssize_t a_width, z_width, max_width
    cdef Workspace ws
    cdef object acts, zs, delta, row_loss, x_batch, target_batch, label_batch, weight_batch
    cdef object partials   # one double per REDUCTION_BLOCK parameters (L2, gradient norm)

    def __cinit__(self):
        self.layers = NULL

    def __dealloc__(self):
        free(self.layers)

    def __init__(self, layer_table, parameters, gradients):
        """layer_table rows: (n_in, n_out, activation code, param, weight_offset, bias_offset)."""
        cdef int l, n = len(layer_table)
        cdef LayerSpec* spec
        self.layers = <LayerSpec*>malloc(n * sizeof(LayerSpec))
        if self.layers == NULL:
            raise MemoryError()
        self.n_layers = n
        self.parameters = parameters
        self.gradients = gradients
        self.params_ptr = _data(parameters)
        self.grads_ptr = _data(gradients)
        self.dtype = parameters.dtype
        self.is_double = self.dtype == np.float64
        self.itemsize = self.dtype.itemsize
        self.n_parameters = parameters.shape[0]
        self.a_width = self.z_width = self.max_width = 0
        for l in range(n):
            spec = &self.layers[l]
            (spec.n_in, spec.n_out, spec.activation, spec.param, spec.weight_offset,
             spec.bias_offset) = layer_table[l]
            spec.a_column = self.a_width
            self.a_width += spec.n_out
            self.max_width = max(self.max_width, spec.n_in, spec.n_out)
            # keep z where the derivative needs it, and for a softmax or sigmoid
            # output, whose fused cross-entropy works from the logits
            if (spec.activation in (ACT_LEAKY_RELU, ACT_ELU, ACT_SOFTPLUS, ACT_GELU)
                    or (l == n - 1 and spec.activation in (ACT_SOFTMAX, ACT_SIGMOID))):
                spec.z_column = self.z_width
                self.z_width += spec.n_out
            else:
                spec.z_column = -1
        self.n_inputs = self.layers[0].n_in
        self.n_outputs = self.layers[n - 1].n_out
        self.partials = np.empty(self.n_parameters // REDUCTION_BLOCK + 1, dtype=np.float64)
        self.capacity = 0
        self.forward_rows = -1
        self.busy = self.writer_waiting = self.owned = False
        self.readers = self.readers_waiting = self.admitted = self.owner_depth = 0
        self.owner = 0
        self.turn = threading.Condition(threading.Lock())
        self._after_release = None
        self.grow(1)

    def reserve(self, Py_ssize_t n_rows):
        """Make the workspaces hold batches of n_rows rows (they only grow)."""
        self.acquire()
        try:
            self.grow(n_rows)
        finally:
            self.release()

    cdef int grow(self, Py_ssize_t n_rows) except -1:
        # only for a writer that holds the engine: this frees the old workspaces
        if n_rows <= self.capacity:
            return 0
        self.acts = np.empty(n_rows * self.a_width, dtype=self.dtype)
        self.zs = np.empty(max(1, n_rows * self.z_width), dtype=self.dtype)
        self.delta = np.empty(2 * n_rows * self.max_width, dtype=self.dtype)
        self.row_loss = np.empty(n_rows, dtype=np.float64)
        self.x_batch = np.empty((n_rows, self.n_inputs), dtype=self.dtype)
        self.target_batch = np.empty((n_rows, self.n_outputs), dtype=self.dtype)
        self.label_batch = np.empty(n_rows, dtype=np.intp)
        self.weight_batch = np.empty(n_rows, dtype=np.float64)
        self.capacity = n_rows
        self.ws.capacity = n_rows
        self.ws.max_width = self.max_width
        self.ws.acts = _data(self.acts)
        self.ws.zs = _data(self.zs)
        self.ws.delta = _data(self.delta)
        self.ws.row_loss = <double*>_data(self.row_loss)
        self.forward_rows = -1

    # ------------------------------------------------------------ who may run
    cdef int acquire(self) except -1:
        """Start a writer, or raise RuntimeError (another writer, or another thread's fit)."""
        if self.owned and self.owner != PyThread_get_thread_ident():
            raise RuntimeError(FITTING_MESSAGE)
        if self.busy or self.writer_waiting:
            raise RuntimeError(BUSY_MESSAGE)
        if self.readers == 0 and self.admitted == 0:
            self.busy = True
            return 0
        # readers run: wait for them (they are short); new ones queue behind this writer,
        # so none can start between the end of the wait and busy below
        self.writer_waiting = True
        try:
            with self.turn:
                while self.readers or self.admitted:
                    self.turn.wait(WAIT_POLL_SECONDS)
        except BaseException:  # interrupted (Ctrl-C): let the queued readers go
            self.writer_waiting = False
            self.wake()
            raise
        self.busy = True
        self.writer_waiting = False
        return 0

    cdef int release(self) except -1:
        """End a writer; the readers queued now go before the next writer."""
        self.busy = False
        if self.readers_waiting:
            self.admitted = self.readers_waiting
            self.wake()
        if self._after_release is not None:
            self._after_release()
        return 0

    cdef int enter_reader(self, bint refuse_foreign_fit) except -1:
        """Start a reader: at once, or after the running or waiting writer."""
        if refuse_foreign_fit and self.owned \
                and self.owner != PyThread_get_thread_ident():
            raise RuntimeError(FITTING_MESSAGE)
        if not self.busy and not self.writer_waiting:
            self.readers += 1
            return 0
        cdef bint entered = False
        self.readers_waiting += 1
        try:
            with self.turn:
                while self.busy or not (self.admitted or not self.writer_waiting):
                    self.turn.wait(WAIT_POLL_SECONDS)
                if self.admitted:
                    self.admitted -= 1
                # a fit may have claimed the network while this reader queued
                if refuse_foreign_fit and self.owned \
                        and self.owner != PyThread_get_thread_ident():
                    raise RuntimeError(FITTING_MESSAGE)
                self.readers += 1
                entered = True
        except BaseException:
            if entered:  # interrupted on the way out of the wait: not entered after all
                self.readers -= 1
            raise
        finally:
            self.readers_waiting -= 1
            if self.admitted > self.readers_waiting:
                self.admitted = self.readers_waiting
            if self.writer_waiting:  # this reader may be the one the writer waits for
                self.wake()
        return 0

    cdef int exit_reader(self) except -1:
        self.readers -= 1
        if self.readers == 0 and self.writer_waiting:
            self.wake()
        if self._after_release is not None:
            self._after_release()
        return 0

    cdef int wake(self) except -1:
        with self.turn:
            self.turn.notify_all()
        return 0

    def claim(self):
        """Make the calling thread (a fit()) the only one that may change the network.

        Waits for running readers like a writer; RuntimeError if another thread's
        writer runs or its fit owns the network. Nested claims of the owner count;
        each claim() needs one unclaim().
        """
        cdef unsigned long me = PyThread_get_thread_ident()
        if self.owned and self.owner == me:
            self.owner_depth += 1
            return
        self.acquire()
        self.owned = True
        self.owner = me
        self.owner_depth = 1
        self.release()

    def check_owner(self):
        """RuntimeError if another thread's fit() owns the network (for early refusals)."""
        if self.owned and self.owner != PyThread_get_thread_ident():
            raise RuntimeError(FITTING_MESSAGE)

    def unclaim(self):
        """End the calling thread's claim()."""
        if not self.owned or self.owner != PyThread_get_thread_ident():
            raise RuntimeError("unclaim() without claim() in this thread")
        self.owner_depth -= 1
        if self.owner_depth == 0:
            self.owned = False

    @property
    def lock_state(self):
        """The flags of the lock, for tests: a dict."""
        return {"busy": bool(self.busy), "readers": self.readers,
                "writer_waiting": bool(self.writer_waiting),
                "readers_waiting": self.readers_waiting, "admitted": self.admitted,
                "owned": bool(self.owned), "owner_depth": self.owner_depth}

    def snapshot(self, OptimizerConfig optimizer=None, read=None):
        """(parameters, optimizer state or None, its step count, read()) taken together.

        A reader: waits for a running step and never sees part of one. Refused with
        RuntimeError while another thread's fit() owns the network: its parameters,
        RNG and epoch count agree only at that fit's own epoch boundaries (a
        callback of the fit may snapshot). read: a callable run inside, for the
        Python-side state (RNG, epoch count) that must agree with the arrays.
        """
        self.enter_reader(True)
        try:
            parameters = self.parameters.copy()
            state, step_count = None, 0
            if optimizer is not None:
                if optimizer.owner is self and optimizer.state is not None:
                    state = optimizer.state.copy()
                step_count = optimizer.step_count
            extra = None if read is None else read()
        finally:
            self.exit_reader()
        return parameters, state, step_count, extra

    # ------------------------------------------------------------ computations
    def assign_parameters(self, values):
        """parameters[...] = values, never while a computation (or predict) runs.

        values: (n_parameters,) of the engine's dtype, checked by the caller.
        """
        self.acquire()
        try:
            self.parameters[...] = values
        finally:
            self.release()

    def layer_output(self, int layer):
        """A copy of a layer's output cached by the last forward() (for tests and debugging)."""
        self.enter_reader(False)
        try:
            return self.copy_layer_output(layer)
        finally:
            self.exit_reader()

    cdef object copy_layer_output(self, int layer):
        # only while this thread holds the engine (reader or writer)
        if self.forward_rows < 0:
            raise ValueError("no forward pass is cached")
        cdef LayerSpec* spec = &self.layers[layer]
        cdef Py_ssize_t start = self.capacity * spec.a_column
        return self.acts[start:start + self.forward_rows * spec.n_out].reshape(
            self.forward_rows, spec.n_out).copy()

    cdef StepOptions* step_options(self, StepOptions* options, double l2, double clip_value,
                                   double clip_norm):
        """options filled in, or NULL when all are off (the plain step skips that pass)."""
        if l2 <= 0 and clip_value <= 0 and clip_norm <= 0:
            return NULL
        options.l2 = l2
        options.clip_value = clip_value
        options.clip_norm = clip_norm
        options.partials = <double*>_data(self.partials)
        return options

    def train_step(self, x, target, labels, weights, LossConfig loss,
                   OptimizerConfig optimizer, double l2=0.0, double clip_value=0.0,
                   double clip_norm=0.0):
        """Forward + loss + backward (+ one update unless optimizer is None); the loss.

        x: (n, n_in) C-contiguous of the engine's dtype; target: (n, n_out) of that
        dtype, or labels: (n,) intp, the other None; weights: (n,) float64 or None.
        The caller checks. A loss that is not finite skips the update (and does not
        count as an optimizer step).
        """
        cdef int float_type = _float_type(self.is_double)
        cdef void* x_ptr = _input_data(x, float_type, "x", -1, self.n_inputs)
        cdef Py_ssize_t n_rows = x.shape[0]
        cdef void* target_ptr = _input_data_or_null(target, float_type, "target", n_rows,
                                                    self.n_outputs)
        cdef intp* label_ptr = <intp*>_input_data_or_null(labels, cnp.NPY_INTP, "labels",
                                                          n_rows, -1)
        cdef double* weight_ptr = <double*>_input_data_or_null(weights, cnp.NPY_DOUBLE,
                                                               "weights", n_rows, -1)
        cdef const OptimizerParams* opt_params = NULL
        cdef StepOptions options
        cdef StepOptions* options_ptr = self.step_options(&options, l2, clip_value,
                                                          clip_norm)
        cdef void* state = NULL
        cdef double value
        # acquire first: nothing may reallocate the workspaces of a running step
        self.acquire()
        try:
            if optimizer is not None:
                optimizer.bind(self)
                opt_params = &optimizer.p
                state = _data(optimizer.state)
            if n_rows > self.capacity:
                self.grow(n_rows)
            self.forward_rows = -1
            if optimizer is not None:
                optimizer.step_count += 1
            with nogil:
                if self.is_double:
                    value = training_step(self.layers, self.n_layers, &self.ws,
                                          <double*>self.params_ptr, <double*>self.grads_ptr,
                                          <double*>x_ptr, <double*>target_ptr, label_ptr,
                                          weight_ptr, n_rows, &loss.p, options_ptr, opt_params,
                                          optimizer.step_count if opt_params != NULL else 0,
                                          <double*>state, self.n_parameters)
                else:
                    value = training_step(self.layers, self.n_layers, &self.ws,
                                          <float*>self.params_ptr, <float*>self.grads_ptr,
                                          <float*>x_ptr, <float*>target_ptr, label_ptr,
                                          weight_ptr, n_rows, &loss.p, options_ptr, opt_params,
                                          optimizer.step_count if opt_params != NULL else 0,
                                          <float*>state, self.n_parameters)
            if optimizer is not None and not isfinite(value):
                optimizer.step_count -= 1
        finally:
            self.release()
        return value

    def train_epoch(self, x, target, labels, weights, order, Py_ssize_t batch_size,
                    LossConfig loss, OptimizerConfig optimizer, double l2=0.0,
                    double clip_value=0.0, double clip_norm=0.0, batch_lrs=None,
                    bint check_signals=True, totals=None):
        """Mini-batch steps over x (in `order` if given) in compiled code.

        order: intp row indices (a permutation, or a slice of one), or None for
        consecutive batches; batch_lrs: float64 learning rate per batch, or None.
        Returns (loss_sum, weight_sum, n_rows, diverged): the batch losses summed
        with their batch weights, so that chunks of an epoch combine exactly.
        totals, a float64 (3,) array or None, gets those three sums added before
        this returns: a Ctrl-C that arrived during the last batch raises
        KeyboardInterrupt as soon as the result reaches Python, which loses it, but
        not what totals holds. KeyboardInterrupt propagates at a batch boundary.
        """
        cdef double* totals_ptr = <double*>_input_data_or_null(totals, cnp.NPY_DOUBLE,
                                                               "totals", 3, -1)
        cdef int float_type = _float_type(self.is_double)
        cdef void* x_ptr = _input_data(x, float_type, "x", -1, self.n_inputs)
        cdef Py_ssize_t n_x = x.shape[0]
        cdef void* target_ptr = _input_data_or_null(target, float_type, "target", n_x,
                                                    self.n_outputs)
        cdef intp* label_ptr = <intp*>_input_data_or_null(labels, cnp.NPY_INTP, "labels",
                                                          n_x, -1)
        cdef double* weight_ptr = <double*>_input_data_or_null(weights, cnp.NPY_DOUBLE,
                                                               "weights", n_x, -1)
        cdef intp* order_ptr = <intp*>_input_data_or_null(order, cnp.NPY_INTP, "order", -1, -1)
        cdef Py_ssize_t n_samples = n_x if order is None else order.shape[0]
        cdef double* lr_ptr = <double*>_input_data_or_null(batch_lrs, cnp.NPY_DOUBLE,
                                                           "batch_lrs", -1, -1)
        if batch_size < 1 or (batch_lrs is not None and batch_lrs.shape[0]
                              < (n_samples + batch_size - 1) // batch_size):
            raise ValueError("batch_size must be >= 1 and batch_lrs must hold one rate per batch")
        cdef StepOptions options
        cdef StepOptions* options_ptr = self.step_options(&options, l2, clip_value,
                                                          clip_norm)
        cdef EpochResult result
        cdef void* state
        cdef void* x_batch
        cdef void* target_batch
        cdef intp* label_batch
        cdef double* weight_batch
        self.acquire()
        try:
            optimizer.bind(self)
            state = _data(optimizer.state)
            if batch_size > self.capacity:
                self.grow(batch_size)
            x_batch = _data(self.x_batch)
            target_batch = _data(self.target_batch)
            label_batch = <intp*>_data(self.label_batch)
            weight_batch = <double*>_data(self.weight_batch)
            self.forward_rows = -1
            with nogil:
                if self.is_double:
                    training_epoch(self.layers, self.n_layers, &self.ws,
                                   <double*>self.params_ptr, <double*>self.grads_ptr,
                                   <double*>x_ptr, <double*>target_ptr, label_ptr, weight_ptr,
                                   n_samples, order_ptr, batch_size, <double*>x_batch,
                                   <double*>target_batch, label_batch, weight_batch, &loss.p,
                                   options_ptr, &optimizer.p, lr_ptr, check_signals,
                                   &optimizer.step_count, <double*>state, self.n_parameters,
                                   &result)
                else:
                    training_epoch(self.layers, self.n_layers, &self.ws,
                                   <float*>self.params_ptr, <float*>self.grads_ptr,
                                   <float*>x_ptr, <float*>target_ptr, label_ptr, weight_ptr,
                                   n_samples, order_ptr, batch_size, <float*>x_batch,
                                   <float*>target_batch, label_batch, weight_batch, &loss.p,
                                   options_ptr, &optimizer.p, lr_ptr, check_signals,
                                   &optimizer.step_count, <float*>state, self.n_parameters,
                                   &result)
            if totals_ptr != NULL:
                totals_ptr[0] += result.loss_sum
                totals_ptr[1] += result.weight_sum
                totals_ptr[2] += result.n_rows
        finally:
            self.release()
        return result.loss_sum, result.weight_sum, result.n_rows, bool(result.diverged)

    def forward(self, x):
        """Forward pass keeping every layer's output for backward(); a copy of the output.

        x is copied into the workspace, so the caller may change it before backward().
        """
        cdef void* x_ptr = _input_data(x, _float_type(self.is_double), "x", -1, self.n_inputs)
        cdef Py_ssize_t n_rows = x.shape[0]
        cdef void* x_batch
        cdef Py_ssize_t x_bytes = x.nbytes
        self.acquire()
        try:
            if n_rows > self.capacity:
                self.grow(n_rows)
            x_batch = _data(self.x_batch)
            with nogil:
                memcpy(x_batch, x_ptr, x_bytes)
                if self.is_double:
                    network_forward(self.layers, self.n_layers, &self.ws,
                                    <double*>self.params_ptr, <double*>x_batch, n_rows)
                else:
                    network_forward(self.layers, self.n_layers, &self.ws,
                                    <float*>self.params_ptr, <float*>x_batch, n_rows)
            self.forward_rows = n_rows
            # copied before release: another thread's forward may overwrite it after
            output = self.copy_layer_output(self.n_layers - 1)
        finally:
            self.release()
        return output

    def backward(self, grad_output, bint want_grad_input):
        """Back-propagate dL/d(output) of the cached forward pass into the gradients.

        grad_output: (forward_rows, n_outputs) C-contiguous of the engine's dtype.
        Returns dL/dx (a new array) if want_grad_input, else None.
        """
        cdef Py_ssize_t n_rows
        cdef const LayerSpec* last = &self.layers[self.n_layers - 1]
        cdef void* grad_x
        cdef void* grad_out = _input_data(grad_output, _float_type(self.is_double),
                                          "grad_output", -1, self.n_outputs)
        cdef void* x_batch
        cdef void* out
        cdef void* z
        self.acquire()
        try:
            # checked again here, under the busy flag: another thread's forward() may
            # have changed the cached pass since the caller looked
            n_rows = self.forward_rows
            if n_rows < 0 or grad_output.shape[0] != n_rows \
                    or grad_output.shape[1] != last.n_out:
                raise ValueError("the cached forward pass changed; call forward() again")
            grad_input = (np.empty((n_rows, self.n_inputs), dtype=self.dtype)
                          if want_grad_input else None)
            grad_x = _data_or_null(grad_input)
            x_batch = _data(self.x_batch)
            out = <char*>self.ws.acts + self.capacity * last.a_column * self.itemsize
            z = (out if last.z_column < 0 else
                 <char*>self.ws.zs + self.capacity * last.z_column * self.itemsize)
            with nogil:
                memcpy(self.ws.delta, grad_out, n_rows * last.n_out * self.itemsize)
                if self.is_double:
                    activation_backward(<double*>self.ws.delta, <double*>out, <double*>z,
                                        n_rows, last.n_out, last.activation, last.param)
                    network_backward(self.layers, self.n_layers, &self.ws,
                                     <double*>self.params_ptr, <double*>self.grads_ptr,
                                     <double*>x_batch, n_rows, <double*>grad_x)
                else:
                    activation_backward(<float*>self.ws.delta, <float*>out, <float*>z,
                                        n_rows, last.n_out, last.activation, last.param)
                    network_backward(self.layers, self.n_layers, &self.ws,
                                     <float*>self.params_ptr, <float*>self.grads_ptr,
                                     <float*>x_batch, n_rows, <float*>grad_x)
        finally:
            self.release()
        return grad_input

    def predict(self, x, Py_ssize_t chunk_rows):
        """Inference in chunks of chunk_rows rows, caching nothing; a new (n, n_outputs) array.

        Uses its own scratch, so it never disturbs a cached forward pass.
        """
        cdef char* x_ptr = <char*>_input_data(x, _float_type(self.is_double), "x", -1,
                                              self.n_inputs)
        cdef Py_ssize_t n_rows = x.shape[0], begin, rows
        chunk_rows = max(1, min(chunk_rows, n_rows))
        out = np.empty((n_rows, self.n_outputs), dtype=self.dtype)
        scratch = np.empty(max(1, 2 * chunk_rows * self.max_width), dtype=self.dtype)
        cdef char* out_ptr = <char*>_data(out)
        cdef void* scratch_ptr = _data(scratch)
        cdef Py_ssize_t item = self.itemsize
        # predictions run together (they only read the parameters), never while a
        # writer changes them
        self.enter_reader(False)
        try:
            with nogil:
                begin = 0
                while begin < n_rows:
                    rows = min(chunk_rows, n_rows - begin)
                    if self.is_double:
                        predict_chunk(self.layers, self.n_layers, <double*>self.params_ptr,
                                      <double*>(x_ptr + begin * self.n_inputs * item), rows,
                                      <double*>scratch_ptr, self.max_width,
                                      <double*>(out_ptr + begin * self.n_outputs * item))
                    else:
                        predict_chunk(self.layers, self.n_layers, <float*>self.params_ptr,
                                      <float*>(x_ptr + begin * self.n_inputs * item), rows,
                                      <float*>scratch_ptr, self.max_width,
                                      <float*>(out_ptr + begin * self.n_outputs * item))
                    begin += rows
        finally:
            self.exit_reader()
        return out
