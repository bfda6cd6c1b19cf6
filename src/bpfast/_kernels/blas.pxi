# Matrix products through SciPy's BLAS (gemm, matvec) and the thread policy of
# bpfast's own passes (pass_threads). Included by _core.pyx.


# Thread policy for matrix products (bench/README.md, "Threads under load").
#
# bpfast threads its products itself: a product large enough to gain is split into
# fixed column (or row) blocks, each one single-threaded BLAS call, and the blocks run
# either one after the other in the calling thread or under OpenMP. The blocks depend
# on the shape only, so both ways (and any thread count) give the same bits. Which way
# is faster depends on the load: on a quiet machine the threads win up to 1.7x, but
# when other processes keep the cores busy every join waits a scheduler slice for a
# descheduled worker and the threaded product is up to 10x slower. So a training step
# (step_begin) keeps a running time of both ways, for the whole step, and uses the
# faster; outside steps (forward, predict) each product shape and elementwise pass
# does the same on its own. Either starts on one thread and times the other way again
# once PROBE_RATIO times that way's estimated cost (at least PROBE_FLOOR_S) has been
# spent on the chosen one, so probing costs about 1/PROBE_RATIO of the time. SciPy's
# OpenBLAS is held at one thread
# while bpfast calls it (through the set/get functions _threads.py finds); where those
# are unknown (another BLAS), products are not split and BLAS threads itself. A
# lower BLAS count set from outside (threadpoolctl) caps the products' threads too.
cdef extern from *:
    """
    #include <time.h>
    /* the way of the training step the calling thread runs (step_begin): 0 none */
    #if defined(_MSC_VER)
    static __declspec(thread) int bpfast_step_way = 0;
    #else
    static __thread int bpfast_step_way = 0;
    #endif
    static int bpfast_get_step_way(void) { return bpfast_step_way; }
    static void bpfast_set_step_way(int way) { bpfast_step_way = way; }
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
    static int bpfast_blas_enter(void) { return 1; }
    static void bpfast_blas_leave(void) {}
    static void bpfast_blas_set_count(int n) {}
    #else
    #include <pthread.h>
    static double bpfast_seconds(void) {
        struct timespec ts; clock_gettime(CLOCK_MONOTONIC, &ts);
        return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
    }
    /* The BLAS thread count belongs to the process: the first bpfast product to start
       saves it and sets one thread, the last to finish restores it. Returns the saved
       count: a limit set from outside (threadpoolctl) also limits bpfast's products. */
    static pthread_mutex_t bpfast_blas_lock = PTHREAD_MUTEX_INITIALIZER;
    static int bpfast_blas_users = 0, bpfast_blas_saved = 1;
    static int bpfast_blas_enter(void) {
        int saved;
        pthread_mutex_lock(&bpfast_blas_lock);
        if (bpfast_blas_users++ == 0) {
            bpfast_blas_saved = bpfast_blas_get();
            if (bpfast_blas_saved != 1) bpfast_blas_set(1);
        }
        saved = bpfast_blas_saved;
        pthread_mutex_unlock(&bpfast_blas_lock);
        return saved;
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
    int bpfast_get_step_way() noexcept nogil
    void bpfast_set_step_way(int way) noexcept nogil
    int bpfast_blas_enter() noexcept nogil
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
# Running times: the chosen way is timed every call and moves its estimate by 1/16 of
# each sample, so that the scheduler ticks a busy machine adds to some calls (4 ms on a
# 1 ms step) do not flip the choice; a probe of the other way moves it by 1/2, so a
# change of load shows at once.
cdef double CHOSEN_WEIGHT = 1.0 / 16
cdef double PROBE_WEIGHT = 0.5
# the ways a training step runs (step_begin below)
cdef enum:
    STEP_NONE = 0       # not in a training step: each product and pass chooses
    STEP_SERIAL = 1
    STEP_THREADED = 2
# for tests: (SPLIT_MIN_WORK, BLOCK_WIDTH, MAX_BLOCKS)
PRODUCT_SPLIT = (SPLIT_MIN_WORK, BLOCK_WIDTH, MAX_BLOCKS)

ctypedef struct ShapeTiming:
    int m, n, k, flags        # the product; flags: transposes, dtype; 0 = empty slot
    double serial_s           # running time per call, blocks one after the other
    double parallel_s         # the same under OpenMP; 0 = not timed yet
    double since_probe_s      # time spent on the chosen way since the other was timed
    int serial_calls, parallel_calls  # calls timed each way (counted up to 2)
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
    """The shapes timed so far: (m, n, k, serial_s, parallel_s, uses_threads) each.

    An elementwise pass over `work` elements appears as (work, 0, pass), pass i + 1
    being ELEMENTWISE_PASSES[i] (work below 2**30); a training step as (batch rows,
    parameters, layers), serial_s/parallel_s being its time on one thread/threaded."""
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
    t.serial_calls = t.parallel_calls = 0
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
    cdef int block, n_threads = _n_threads, flags, way
    cdef bint parallel
    cdef double start, elapsed
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
    n_threads = min(n_threads, bpfast_blas_enter())  # and at most BLAS's own count
    way = bpfast_get_step_way()  # a training step's way, chosen for the whole step
    parallel = n_threads > 1 and way != STEP_SERIAL
    if parallel and _adaptive and way == STEP_NONE:
        flags = 1 + trans_a + 2 * trans_b + (4 if floating is float else 8)
        timing = _timing_for(m, n, k, flags)
        parallel = _choose_parallel(timing)
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
    cdef double weight = CHOSEN_WEIGHT if parallel == timing.parallel else PROBE_WEIGHT
    cdef int* calls = &timing.parallel_calls if parallel else &timing.serial_calls
    # A way's first call warms it up (page faults in fresh buffers, a worker's first
    # BLAS call): the second replaces its time, and a probe is repeated until then.
    if calls[0] < 2:
        calls[0] += 1
        weight = 1
    if parallel == timing.parallel:
        timing.since_probe_s += elapsed
    elif calls[0] == 2:
        timing.since_probe_s = 0
    if parallel:
        timing.parallel_s = _running(timing.parallel_s, elapsed, weight)
    else:
        timing.serial_s = _running(timing.serial_s, elapsed, weight)
    timing.parallel = timing.parallel_s != 0 and timing.parallel_s < timing.serial_s
    if timing.parallel_s != 0:
        _passes_threaded = timing.parallel


cdef bint _choose_parallel(const ShapeTiming* timing) noexcept nogil:
    """The way to run this call: the faster so far, or the other once it is due a probe.
    One thread comes first; the threaded way is first tried once that warm-up is over
    (two calls), so a short fit or a fresh process learns its way within a few calls.
    Later probes wait PROBE_RATIO times the other way's cost, at least PROBE_FLOOR_S:
    under load one threaded call can wait a scheduler slice, whatever its size."""
    cdef double other_s
    if timing.serial_s == 0:
        return False
    if timing.parallel_s == 0:
        return timing.serial_calls >= 2
    other_s = timing.serial_s if timing.parallel else timing.parallel_s
    if timing.since_probe_s >= PROBE_RATIO * max(other_s, PROBE_FLOOR_S):
        return not timing.parallel
    return timing.parallel


# Elementwise passes (bias + activation, activation derivatives, losses, optimizer
# updates, clipping, sums of squares) choose their thread count the same way as the
# products, each pass and size on its own timing: a pass is memory-bound and gains
# less from threads than a product, so it must not follow the products' choice.
cdef enum:
    PASS_BIAS_ACTIVATION = 1
    PASS_ACTIVATION_BACKWARD
    PASS_BIAS_GRADIENT
    PASS_LOSS
    PASS_OPTIMIZER
    PASS_SUM_SQUARES
    PASS_CLIP


# for tests and product_timings(): pass i + 1 is ELEMENTWISE_PASSES[i]
ELEMENTWISE_PASSES = ("bias_activation", "activation_backward", "bias_gradient", "loss",
                      "optimizer", "sum_squares", "clip")


cdef struct PassTimer:
    ShapeTiming* timing   # NULL: this call is not timed
    double start
    bint parallel


cdef int pass_threads(int pass_id, Py_ssize_t work, bint double_precision,
                      PassTimer* timer) noexcept nogil:
    """Threads for one elementwise pass over `work` elements: one below
    PARALLEL_MIN_WORK, otherwise the faster way for this pass and size as timed (see
    gemm). Every call must be followed by pass_done(timer) once the pass is over."""
    cdef int way = bpfast_get_step_way()
    timer.timing = NULL
    if _n_threads == 1 or way == STEP_SERIAL:
        return 1
    if way == STEP_THREADED:
        return _threaded_step_pass(work)
    if work < _parallel_min_work:
        return 1
    if not _adaptive:
        return _n_threads
    timer.timing = _timing_for(<int>(work & 0x3FFFFFFF), <int>(work >> 30), pass_id,
                               64 + 2 * pass_id + double_precision)
    timer.parallel = _choose_parallel(timer.timing)
    timer.start = bpfast_seconds()
    return _n_threads if timer.parallel else 1


cdef inline void pass_done(PassTimer* timer) noexcept nogil:
    if timer.timing != NULL:
        _record(timer.timing, timer.parallel, bpfast_seconds() - timer.start)


cdef inline int _threads_for(Py_ssize_t work) noexcept nogil:
    # an untimed pass follows the last timed product or pass: one thread while the
    # threaded way loses (a busy machine), since its join would wait just the same
    cdef int way = bpfast_get_step_way()
    if way == STEP_THREADED:
        return _threaded_step_pass(work)
    if work < _parallel_min_work or way == STEP_SERIAL:
        return 1
    return _n_threads if _passes_threaded else 1


cdef inline int _threaded_step_pass(Py_ssize_t work) noexcept nogil:
    # In a threaded step the workers are awake between products: passes from 1/8 of
    # PARALLEL_MIN_WORK gain too, and one run serially between two threaded products
    # lets the workers fall asleep, so that the next product pays their wake-up.
    return _n_threads if work >= _parallel_min_work // 8 else 1


# A training step chooses its way as a whole, timed as above per network shape and
# batch size: every product and pass large enough threaded, or everything on one
# thread. Timing each product apart misleads: one threaded product among serial ones
# wakes sleeping workers and is timed slower than a run of threaded products, which
# keep them awake (quiet M: 0.37 ms a step all threaded, 0.54 ms on one thread, while
# each product alone timed its threads slower); under load, workers still spinning
# after one threaded product take a core from the next serial one.
cdef struct StepTimer:
    ShapeTiming* timing   # NULL: this step is not timed (one thread, or nested)
    double start
    bint parallel
    bint holds_blas       # the step holds BLAS at one thread for all its products


cdef void step_begin(StepTimer* timer, Py_ssize_t n_rows, Py_ssize_t n_parameters,
                     int n_layers, bint double_precision) noexcept nogil:
    """Choose the way of the training step about to run; step_end(timer) must follow."""
    timer.timing = NULL
    timer.holds_blas = _split_products
    if timer.holds_blas:  # one change of BLAS's count a step, not two per product
        bpfast_blas_enter()
    if _n_threads == 1 or not _adaptive or bpfast_get_step_way() != STEP_NONE:
        return
    # no product (m n k <= rows x parameters) or pass in it is large enough to thread
    if <double>n_rows * n_parameters < _parallel_min_work:
        return
    timer.timing = _timing_for(<int>min(n_rows, 0x3FFFFFFF), <int>(n_parameters & 0x3FFFFFFF),
                               n_layers, 128 + double_precision)
    timer.parallel = _choose_parallel(timer.timing)
    bpfast_set_step_way(STEP_THREADED if timer.parallel else STEP_SERIAL)
    timer.start = bpfast_seconds()


cdef void step_end(StepTimer* timer, bint completed) noexcept nogil:
    """After the step: record its time (if it completed) and leave its way."""
    if timer.holds_blas:
        bpfast_blas_leave()
    if timer.timing == NULL:
        return
    bpfast_set_step_way(STEP_NONE)
    if completed:
        _record(timer.timing, timer.parallel, bpfast_seconds() - timer.start)


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
