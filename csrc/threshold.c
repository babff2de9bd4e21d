/* The fused GloFND threshold step: the lambda update, then the false-negative mask (docs/algorithm.md).
 *
 * Determinism: rows are grouped by data-set index, and one group (all rows of one index) is
 * handled start to finish by one thread with integer counts, so the bytes written do not depend
 * on the number of threads or on the order in which groups run. The update arithmetic is done in
 * double, one IEEE operation at a time (built with -ffp-contract=off), and rounded to float32 on
 * store; the pure-torch reference performs the same operations in the same order.
 *
 * Speed: the similarities are read from memory once. A group's rows are counted, its lambda
 * updated, and the same rows, still in L1, compared again for the mask while the next groups'
 * rows are counted (step_impl.h, run_groups); no R x M temporary exists besides the caller's
 * mask. Row loops are compiled per instruction set and chosen at run time (step_impl.h,
 * rows_avx512.h); rows and the state entries of upcoming groups are prefetched.
 * benchmarks/run.py measures all of it against a plain read of the matrix. */
#include "glofnd.h"
#include "internal.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* Entries per block of the portable row loops (32-bit counters; the next block is prefetched),
 * and the prefetch distance of the AVX-512 loops in floats (4 KiB). */
#define GLOFND_BLOCK ((int64_t)1024)
#define GLOFND_PREFETCH_FLOATS 1024
/* The batched count loop's distance for matrices of at most GLOFND_PREFETCH_NEAR_BYTES, which
 * stay in the last-level cache between steps: 2 KiB. From the cache, 4 KiB ahead fetched lines
 * too early: the step at B = 512 (4 MiB, one thread) took 75.7 us with 4 KiB, 71.9 with 2 KiB
 * and 71.6 with 1 KiB as a fixed distance. From memory, 2 KiB was too late: B = 1024 (16 MiB)
 * 385 -> 434 us, B = 2048 (64 MiB) 3.13 -> 3.32 ms (1 KiB: 3.89). 8 MiB leaves room for the
 * mask and the other operands in a 32 MiB last-level cache. */
#define GLOFND_PREFETCH_NEAR 512
#define GLOFND_PREFETCH_NEAR_BYTES ((uint64_t)8 << 20)

/* The count loop's prefetch distance in elements for the dense rows of b. */
static inline int64_t prefetch_distance(const glofnd_batch *b, size_t elem)
{
    const uint64_t bytes = (uint64_t)b->rows * (uint64_t)b->cols * elem;
    return bytes <= GLOFND_PREFETCH_NEAR_BYTES ? GLOFND_PREFETCH_NEAR : GLOFND_PREFETCH_FLOATS;
}

#if defined(__GNUC__) || defined(__clang__)
#define GLOFND_NOINLINE __attribute__((noinline))
#define GLOFND_PREFETCH_R(p) __builtin_prefetch((p), 0, 3)
#define GLOFND_PREFETCH_W(p) __builtin_prefetch((p), 1, 3)
#else
#define GLOFND_NOINLINE
#define GLOFND_PREFETCH_R(p) ((void)(p))
#define GLOFND_PREFETCH_W(p) ((void)(p))
#endif

/* Samples from which the whole batch's state entries are prefetched up front: about 3 MiB of
 * state, more than stays in the caches between steps. */
#define GLOFND_PREFETCH_ALL_MIN ((int64_t)1 << 18)

/* Entries per thread below which another thread costs more (fork, join) than it saves. */
#define GLOFND_MIN_WORK_PER_THREAD ((int64_t)1 << 16)

int glofnd_has_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* b1**e and b2**e by binary exponentiation: a fixed sequence of multiplications the reference
 * repeats exactly, where libm's pow and torch's vectorised pow may differ in the last bit. A
 * factor 1.0 where a bit of e is clear is exact and keeps the loop free of branches. */
static void ipow2(double b1, double b2, int64_t e, double *r1, double *r2)
{
    double x1 = 1.0, x2 = 1.0;
    while (e > 0) {
        const int bit = (int)(e & 1);
        x1 *= bit ? b1 : 1.0;
        x2 *= bit ? b2 : 1.0;
        b1 *= b1;
        b2 *= b2;
        e >>= 1;
    }
    *r1 = x1;
    *r2 = x2;
}

/* 1 - b1**t and 1 - b2**t through the memo (kept for one b1 and b2): the values ipow2 computes,
 * so the bytes do not depend on whether the memo hit. */
static void bias_denominators(double b1, double b2, int64_t t, glofnd_bias_memo *memo,
                              double *d1, double *d2)
{
    const int k = (int)(t & (GLOFND_BIAS_SLOTS - 1));
    if (memo->key[k] != t) {
        double pow1, pow2;
        ipow2(b1, b2, t, &pow1, &pow2);
        memo->key[k] = t;
        memo->d1[k] = 1.0 - pow1;
        memo->d2[k] = 1.0 - pow2;
    }
    *d1 = memo->d1[k];
    *d2 = memo->d2[k];
}

/* Not inlined: the update arithmetic is compiled once, for the baseline instruction set, and
 * shared by every kernel variant. */
GLOFND_NOINLINE float glofnd_internal_update_one(glofnd_state *st, int64_t i, int64_t above,
                                                int64_t nvalid, const glofnd_params *p,
                                                glofnd_bias_memo *memo)
{
    const double g = p->alpha - (double)above / (double)nvalid;
    const int32_t t = GLOFND_STEPS(st, i) < INT32_MAX ? GLOFND_STEPS(st, i) + 1 : INT32_MAX;
    const double lam = (double)GLOFND_LAMBDA(st, i);
    double next;
    if (p->optimizer == GLOFND_ADAM) {
        const double m = p->beta1 * (double)GLOFND_EXP_AVG(st, i) + (1.0 - p->beta1) * g;
        const double v = p->beta2 * (double)GLOFND_EXP_AVG_SQ(st, i) + (1.0 - p->beta2) * g * g;
        const int64_t tb = p->step > 0 ? p->step : (int64_t)t;
        double d1, d2;
        bias_denominators(p->beta1, p->beta2, tb, memo, &d1, &d2);
        const double mhat = m / d1;
        const double vhat = v / d2;
        next = lam - p->lr * mhat / (sqrt(vhat) + p->eps);
        GLOFND_EXP_AVG(st, i) = (float)m;
        GLOFND_EXP_AVG_SQ(st, i) = (float)v;
    } else {
        next = lam - p->lr * g;
    }
    next = next < p->lo ? p->lo : (next > p->hi ? p->hi : next);
    const float lam1 = (float)next;
    GLOFND_LAMBDA(st, i) = lam1;
    GLOFND_STEPS(st, i) = t;
    return lam1;
}

/* The state, the hyper-parameters and the rows' indices, as every kernel needs them. */
int glofnd_internal_check_state(const int64_t *index, int64_t rows, const glofnd_state *st,
                                const glofnd_params *p)
{
    if (st == NULL || p == NULL || st->n < 0 || rows < 0 || st->lambda_stride < 1 ||
        st->exp_avg_stride < 1 || st->exp_avg_sq_stride < 1 || st->steps_stride < 1)
        return GLOFND_EINVAL;
    if (rows > 0 && (index == NULL || st->lambda == NULL || st->exp_avg == NULL ||
                     st->exp_avg_sq == NULL || st->steps == NULL))
        return GLOFND_EINVAL;
    if (!(p->alpha > 0.0 && p->alpha < 1.0) || !(p->lr >= 0.0) || !isfinite(p->lr) ||
        !(p->beta1 >= 0.0 && p->beta1 < 1.0) || !(p->beta2 >= 0.0 && p->beta2 < 1.0) ||
        !(p->eps > 0.0) || !isfinite(p->eps) || !(p->lo <= p->hi) || !(fabs(p->lo) <= FLT_MAX) ||
        !(fabs(p->hi) <= FLT_MAX) || p->step < 0 ||
        (p->optimizer != GLOFND_ADAM && p->optimizer != GLOFND_SGD))
        return GLOFND_EINVAL;
    for (int64_t r = 0; r < rows; ++r)
        if (index[r] < 0 || index[r] >= st->n)
            return GLOFND_EINDEX;
    return GLOFND_OK;
}

static int check_args(const glofnd_batch *b, const glofnd_state *st, const glofnd_params *p)
{
    if (b == NULL || b->rows < 0 || b->cols < 0)
        return GLOFND_EINVAL;
    const int status = glofnd_internal_check_state(b->index, b->rows, st, p);
    if (status != GLOFND_OK)
        return status;
    return GLOFND_OK;
}

/* Prefetches the cache lines of [p, p + bytes) for reading: the hardware prefetchers leave one
 * core well short of the memory bandwidth on these short row streams. Never faults. */
static inline void prefetch_span(const void *p, size_t bytes)
{
    for (size_t off = 0; off < bytes; off += 64)
        GLOFND_PREFETCH_R((const char *)p + off);
}

/* Threads to use: at most the caller's, one per `min_work` entries, one per group, at least
 * one. The bytes written do not depend on it. */
int glofnd_internal_threads_for(int requested, int64_t entries, int64_t min_work,
                                int64_t groups)
{
    int64_t nt = requested > 1 ? requested : 1;
    const int64_t by_work = entries / min_work;
    if (nt > by_work)
        nt = by_work > 1 ? by_work : 1;
    if (nt > groups)
        nt = groups > 1 ? groups : 1;
    return (int)nt;
}

int64_t glofnd_internal_batch_groups(int64_t rows, int64_t row_bytes, int64_t groups,
                                     int64_t budget)
{
    const int64_t group_bytes = (groups > 0 ? rows / groups : 1) * row_bytes;
    const int64_t n = group_bytes > 0 ? budget / group_bytes : GLOFND_BATCH_MAX;
    return n < 1 ? 1 : (n > GLOFND_BATCH_MAX ? GLOFND_BATCH_MAX : n);
}

int64_t glofnd_internal_chunk_groups(int64_t groups, int nt)
{
    const int64_t per = (groups + 4 * (int64_t)nt - 1) / (4 * (int64_t)nt);
    return per > 16 ? per : 16;
}

/* O(R) grouping with an open-addressing table; group ids follow first appearance, which keeps
 * the layout deterministic (and any layout would give the same bytes). Two layouts are common
 * and skip work: the second half of the rows repeating the first (two views: only the first
 * half is hashed) and, among the rows hashed, no index seen twice (then the order is known
 * without sorting). Both give the layout of the general case. */
int glofnd_internal_group_rows(const int64_t *index, int64_t rows, glofnd_grouping *g)
{
    int64_t cap = 16;
    while (cap < 2 * rows)
        cap <<= 1;
    const size_t bytes = sizeof(int64_t) * (size_t)(2 * cap + 3 * rows + 1);
    int64_t *block = malloc(bytes);
    if (block == NULL)
        return GLOFND_ENOMEM;
    int64_t *keys = block, *ids = block + cap, *gid = block + 2 * cap;
    int64_t *order = gid + rows, *starts = order + rows;
    for (int64_t h = 0; h < cap; ++h)
        keys[h] = -1;

    const int64_t half = rows / 2;
    const int views = rows >= 2 && rows % 2 == 0 &&
                      memcmp(index, index + half, sizeof(int64_t) * (size_t)half) == 0;
    const int64_t hashed = views ? half : rows;
    int64_t ng = 0;
    for (int64_t r = 0; r < hashed; ++r) {
        const uint64_t key = (uint64_t)index[r];
        uint64_t h = (key * UINT64_C(0x9E3779B97F4A7C15)) >> 20;
        for (;; ++h) {
            h &= (uint64_t)(cap - 1);
            if (keys[h] == index[r])
                break;
            if (keys[h] < 0) {
                keys[h] = index[r];
                ids[h] = ng++;
                break;
            }
        }
        gid[r] = ids[h];
    }
    if (ng == hashed && views) { /* group k: rows k and k + half */
        for (int64_t k = 0; k < ng; ++k) {
            starts[k] = 2 * k;
            order[2 * k] = k;
            order[2 * k + 1] = k + half;
            gid[k + half] = k;
        }
        starts[ng] = rows;
    } else if (ng == hashed) { /* group k: row k */
        for (int64_t k = 0; k <= ng; ++k)
            starts[k] = k;
        for (int64_t r = 0; r < rows; ++r)
            order[r] = r;
    } else {
        for (int64_t r = hashed; r < rows; ++r)
            gid[r] = gid[r - half];
        /* counting sort of rows by group id */
        memset(starts, 0, sizeof(int64_t) * (size_t)(ng + 1));
        for (int64_t r = 0; r < rows; ++r)
            starts[gid[r] + 1]++;
        for (int64_t k = 0; k < ng; ++k)
            starts[k + 1] += starts[k];
        for (int64_t r = 0; r < rows; ++r)
            order[starts[gid[r]]++] = r;
        for (int64_t k = ng; k > 0; --k)
            starts[k] = starts[k - 1];
        starts[0] = 0;
    }

    g->block = block;
    g->order = order;
    g->starts = starts;
    g->gid = gid;
    g->scratch = keys; /* the table is spent: cap >= 2 * rows >= 2 * ng entries */
    g->ngroups = ng;
    return GLOFND_OK;
}

/* A group kernel: pools, updates and masks the rows of the groups [k0, k1) (step_impl.h). */
typedef void (*group_fn)(const void *sim, const glofnd_batch *b, glofnd_state *st,
                         const glofnd_params *p, const glofnd_grouping *g, int64_t k0,
                         int64_t k1, uint8_t *mask, int64_t *kept);

/* Each kernel family per instruction set (internal.h). */
#define ISA_ATTR
#define T float
#define SUF f32_base
#include "step_impl.h"
#undef SUF
#undef T
#define T double
#define SUF f64_base
#include "step_impl.h"
#undef SUF
#undef T
#undef ISA_ATTR

#ifdef GLOFND_X86_DISPATCH
#define ISA_ATTR GLOFND_ATTR_AVX2
#define T float
#define SUF f32_avx2
#include "step_impl.h"
#undef SUF
#undef T
#define T double
#define SUF f64_avx2
#include "step_impl.h"
#undef SUF
#undef T
#undef ISA_ATTR

#define ISA_ATTR GLOFND_ATTR_AVX512
#include "rows_avx512.h"
#define GLOFND_ROWS_DEFINED
#define T float
#define SUF f32_avx512
#include "step_impl.h"
#undef SUF
#undef T
#undef GLOFND_ROWS_DEFINED
#define T double
#define SUF f64_avx512
#include "step_impl.h"
#undef SUF
#undef T
#undef ISA_ATTR

/* Matrices of at most this many bytes take flat_step_f32 (with one thread): they fit in L2
 * twice over on current cores, so its second read comes from there. */
#define GLOFND_FLAT_BYTES ((int64_t)512 << 10)

/* The step on a small dense float32 matrix, single-threaded, with AVX-512. The pipeline of
 * run_groups pays per row (calls, a reduction, a test: ~13 ns a row at B = 128, measured on
 * rows of 16 entries), which on short rows weighs as much as the rows' own work. Here the
 * matrix, which fits in L2, is read twice in memory order (count_all_f32_avx512, then
 * flags_all_f32_avx512) with all the updates in between. _C.step, CPU time, medians of 5-6
 * alternating processes: B = 64 3.09 -> 2.74 us, B = 128 7.26 -> 6.95, B = 180 14.7 -> 14.1.
 * Returns 0 without writing anything when the matrix is not dense, too large, or the step does
 * not update, and when an entry may not be finite: run_groups then does the step, with its exact
 * per-row handling. The same operations per entry and group as
 * run_groups: the same bytes. */
static int flat_step_f32(const float *sim, const glofnd_batch *b, glofnd_state *st,
                         const glofnd_params *p, const glofnd_grouping *g, uint8_t *mask,
                         int64_t *kept)
{
    const int64_t G = g->ngroups, M = b->cols;
    if (!p->update || b->col_stride != 1 || b->valid != NULL || M == 0 ||
        b->rows * M > GLOFND_FLAT_BYTES / (int64_t)sizeof(float))
        return 0;
    int64_t *above = g->scratch;
    float *lam = (float *)(above + G), *lam1 = lam + G;
    /* no prefetch of the state here: run_step prefetches it when it is large, and on a state
     * that fits in the caches the prefetches only held up the count pass (B = 128: 6.62 ->
     * 6.23 us without them; at N = 10^7, 6.98 -> 6.61) */
    for (int64_t k = 0; k < G; ++k) {
        lam[k] = GLOFND_LAMBDA(st, b->index[g->order[g->starts[k]]]);
        above[k] = 0;
    }
    if (!count_all_f32_avx512(sim, b->rows, M, b->row_stride, g->gid, lam, above))
        return 0;
    glofnd_bias_memo memo;
    glofnd_bias_memo_init(&memo);
    for (int64_t k = 0; k < G; ++k)
        lam1[k] = glofnd_internal_update_one(st, b->index[g->order[g->starts[k]]], above[k],
                                             (g->starts[k + 1] - g->starts[k]) * M, p, &memo);
    flags_all_f32_avx512(sim, b->rows, M, b->row_stride, g->gid, lam1, mask, kept);
    return 1;
}

#endif

/* The widest instruction set this CPU runs, among those compiled in. */
static int best_isa(void)
{
#ifdef GLOFND_X86_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("popcnt"))
        return GLOFND_ISA_AVX512;
    if (__builtin_cpu_supports("avx2"))
        return GLOFND_ISA_AVX2;
#endif
    return GLOFND_ISA_BASE;
}

#ifdef GLOFND_X86_DISPATCH
static int current_isa = -1; /* -1: not chosen yet; accessed atomically */
#endif

int glofnd_isa(void)
{
#ifdef GLOFND_X86_DISPATCH
    int isa = __atomic_load_n(&current_isa, __ATOMIC_RELAXED);
    if (isa < 0) {
        isa = best_isa();
        __atomic_store_n(&current_isa, isa, __ATOMIC_RELAXED);
    }
    return isa;
#else
    return GLOFND_ISA_BASE;
#endif
}

int glofnd_set_isa(int isa)
{
    if (isa == -1)
        isa = best_isa();
    if (isa < GLOFND_ISA_BASE || isa > best_isa())
        return GLOFND_EINVAL;
#ifdef GLOFND_X86_DISPATCH
    __atomic_store_n(&current_isa, isa, __ATOMIC_RELAXED);
#endif
    return GLOFND_OK;
}

static group_fn kernel_f32(void)
{
    switch (glofnd_isa()) {
#ifdef GLOFND_X86_DISPATCH
    case GLOFND_ISA_AVX512:
        return run_groups_f32_avx512;
    case GLOFND_ISA_AVX2:
        return run_groups_f32_avx2;
#endif
    default:
        return run_groups_f32_base;
    }
}

static group_fn kernel_f64(void)
{
    switch (glofnd_isa()) {
#ifdef GLOFND_X86_DISPATCH
    case GLOFND_ISA_AVX512:
        return run_groups_f64_avx512;
    case GLOFND_ISA_AVX2:
        return run_groups_f64_avx2;
#endif
    default:
        return run_groups_f64_base;
    }
}

/* Prefetches the state entries of the groups [k0, k1) at once, before any is used, when the
 * state is too large to stay in the caches between steps: the misses of all those samples are
 * then in flight together, instead of a few groups' at a time (the per-group prefetch a few
 * groups ahead still runs). Called for the whole batch by one thread, and by each thread for
 * the chunk it takes (the lines then come to the core that writes them). At N = 10^7 this took
 * the step from 1.09x to 1.01-1.03x its time at N = 10^3 (B = 512, one thread); with two
 * threads, the chunks' own prefetches took it from 1.09-1.17x to 1.03-1.06x its time at
 * N = 10^4, where one thread had prefetched the whole batch (docs/benchmarks.md, section d). */
void glofnd_internal_prefetch_groups(const glofnd_state *st, const int64_t *index,
                                     const glofnd_grouping *g, int64_t k0, int64_t k1)
{
    if (st->n < GLOFND_PREFETCH_ALL_MIN)
        return;
    for (int64_t k = k0; k < k1; ++k)
        glofnd_internal_prefetch_group(st, index, g, k);
}

/* Not inlined: inlined, GCC 12 compiled these prefetches away (prefetch_groups became a bare
 * ret, the group loops lost theirs), and every group then waited for its state's misses. */
GLOFND_NOINLINE void glofnd_internal_prefetch_state(const glofnd_state *st, int64_t i)
{
    GLOFND_PREFETCH_W(&GLOFND_LAMBDA(st, i));
    GLOFND_PREFETCH_W(&GLOFND_EXP_AVG(st, i));
    GLOFND_PREFETCH_W(&GLOFND_EXP_AVG_SQ(st, i));
    GLOFND_PREFETCH_W(&GLOFND_STEPS(st, i));
}

/* The whole step on small matrices (flat_step_f32): 0, with nothing written, when it does not
 * apply. */
typedef int (*flat_fn)(const float *sim, const glofnd_batch *b, glofnd_state *st,
                       const glofnd_params *p, const glofnd_grouping *g, uint8_t *mask,
                       int64_t *kept);

static int run_step(group_fn fn, flat_fn flat, const void *sim, const glofnd_batch *b,
                    glofnd_state *st, const glofnd_params *p, uint8_t *mask, int64_t *kept)
{
    int status = check_args(b, st, p);
    if (status != GLOFND_OK || b->rows == 0)
        return status;
    glofnd_grouping g;
    status = glofnd_internal_group_rows(b->index, b->rows, &g);
    if (status != GLOFND_OK)
        return status;

    const int64_t ngroups = g.ngroups;
    const int nt = glofnd_internal_threads_for(p->num_threads, b->rows * b->cols,
                                                 GLOFND_MIN_WORK_PER_THREAD, ngroups);
    if (p->update && nt == 1)
        glofnd_internal_prefetch_groups(st, b->index, &g, 0, ngroups);
    /* one thread runs its groups as one pipeline, without an OpenMP region (internal.h,
     * glofnd_internal_threads_for); several take chunks of them */
    if (nt == 1 && flat != NULL && flat((const float *)sim, b, st, p, &g, mask, kept)) {
        /* done */
    } else if (nt == 1) {
        fn(sim, b, st, p, &g, 0, ngroups, mask, kept);
    } else {
        const int64_t chunk = glofnd_internal_chunk_groups(ngroups, nt);
        const int64_t nchunks = (ngroups + chunk - 1) / chunk;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
#endif
        for (int64_t c = 0; c < nchunks; ++c) {
            const int64_t k0 = c * chunk, k1 = k0 + glofnd_internal_take(k0, ngroups, chunk);
            if (p->update)
                glofnd_internal_prefetch_groups(st, b->index, &g, k0, k1);
            fn(sim, b, st, p, &g, k0, k1, mask, kept);
        }
    }

    free(g.block);
    return GLOFND_OK;
}

int glofnd_step_f32(const float *sim, const glofnd_batch *b, glofnd_state *st,
                    const glofnd_params *p, uint8_t *mask, int64_t *kept)
{
#ifdef GLOFND_X86_DISPATCH
    const flat_fn flat = glofnd_isa() == GLOFND_ISA_AVX512 ? flat_step_f32 : NULL;
#else
    const flat_fn flat = NULL;
#endif
    return run_step(kernel_f32(), flat, sim, b, st, p, mask, kept);
}

int glofnd_step_f64(const double *sim, const glofnd_batch *b, glofnd_state *st,
                    const glofnd_params *p, uint8_t *mask, int64_t *kept)
{
    return run_step(kernel_f64(), NULL, sim, b, st, p, mask, kept);
}
