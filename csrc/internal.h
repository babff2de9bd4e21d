/* Internal interfaces shared by threshold.c and loss.c (not part of the C API in glofnd.h). */
#ifndef GLOFND_INTERNAL_H
#define GLOFND_INTERNAL_H

#include "glofnd.h"

/* Each kernel family is compiled for the baseline instruction set and, with GCC or Clang on
 * x86-64, also for AVX2 and AVX-512 (picked at run time by glofnd_isa(): portable builds, no
 * -march needed). GLOFND_ATTR_AVX2 / GLOFND_ATTR_AVX512 select them per function. */
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__) && !defined(GLOFND_NO_DISPATCH)
#define GLOFND_X86_DISPATCH 1
#define GLOFND_ATTR_AVX2 __attribute__((target("avx2")))
#if defined(__clang__)
#define GLOFND_ATTR_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#else
#define GLOFND_ATTR_AVX512                                                                      \
    __attribute__((target("avx512f,avx512bw,avx512vl,prefer-vector-width=512")))
#endif
#endif

/* Rows grouped by index: group k holds rows order[starts[k] .. starts[k+1]), ascending; row r
 * is in group gid[r]. scratch holds 2 * ngroups int64 that the caller may use. */
typedef struct {
    void *block; /* the one allocation behind order, starts, gid and scratch: free() it */
    int64_t *order, *starts, *gid, *scratch;
    int64_t ngroups;
} glofnd_grouping;

/* Groups the rows by index in O(R); GLOFND_ENOMEM when the scratch cannot be allocated. */
int glofnd_internal_group_rows(const int64_t *index, int64_t rows, glofnd_grouping *g);

/* The state, the hyper-parameters and the rows' indices: GLOFND_OK, EINVAL or EINDEX. */
int glofnd_internal_check_state(const int64_t *index, int64_t rows, const glofnd_state *st,
                                const glofnd_params *p);

/* 1 - beta1**t and 1 - beta2**t for the values of t seen in one loop over groups (the loop's
 * beta1 and beta2; no sharing between threads), in a table with a slot per t modulo
 * GLOFND_BIAS_SLOTS: computing them costs ~100 cycles, and the samples of a batch share a few
 * consecutive values of t (each is visited once per epoch; those an epoch left out are one
 * behind). It held only the last t before: with two values of t mixed at random in a batch,
 * its hits and misses came in an order no branch predictor follows, and the step took 8-17%
 * longer at B = 512 (78.0 and 84.7 us against 71.3 and 72.2 with one t) and 50% longer at
 * B = 128 (8.71 against 5.77 us). With the table: 72.8 and 5.75 us (one thread, CPU time). */
#define GLOFND_BIAS_SLOTS 32
typedef struct {
    int64_t key[GLOFND_BIAS_SLOTS]; /* the t of slot k's entry; empty: k + 1, never in slot k */
    double d1[GLOFND_BIAS_SLOTS], d2[GLOFND_BIAS_SLOTS];
} glofnd_bias_memo;

/* An empty memo. */
static inline void glofnd_bias_memo_init(glofnd_bias_memo *memo)
{
    for (int k = 0; k < GLOFND_BIAS_SLOTS; ++k)
        memo->key[k] = k + 1;
}

/* One Adam/SGD step of lambda_i from `above` of `nvalid` valid entries (nvalid > 0); returns
 * the new lambda_i. Its chain of divisions and a square root takes ~100 cycles: the drivers
 * issue the updates of a batch of groups together, so that the chains overlap. */
float glofnd_internal_update_one(glofnd_state *st, int64_t i, int64_t above, int64_t nvalid,
                                 const glofnd_params *p, glofnd_bias_memo *memo);

/* Consecutive groups whose updates the drivers issue together, at most GLOFND_BATCH_MAX: as
 * many as keep a batch's rows (rows / groups of them per group, row_bytes each) within about
 * `budget` bytes, so that the rows are still in L1 when their second pass comes.
 *
 * The threshold step's budget is 8 KiB: its loop holds a batch being counted and the previous
 * one being masked, and with rows of a power-of-two size every row takes a line in the same L1
 * sets, so two batches of 16 KiB (8 lines a set, with the mask's and the prefetched lines on
 * top of 12 ways) lost masked rows before their second pass. One thread, CPU time, medians
 * of 6-10 alternating processes: B = 512 (4 KiB rows) 73.3 -> 68.1 and 74.3 -> 71.0 us in two
 * A/Bs, B = 256 23.7 -> 21.3; B = 200 and 384 within noise (14.8 -> 14.6, 42.6 -> 43.6 us).
 * The fused loss keeps 16 KiB (loss_impl.h): 8 KiB read within the noise there (SimCLR
 * B = 256 +1.8% -> +1.2%, CLIP B = 1024 +2.2% -> +1.8% over the plain loss), and would send
 * groups of 8 KiB to its one-group path, which no benchmark covers. */
#define GLOFND_BATCH_MAX 8
#define GLOFND_STEP_BATCH_BYTES ((int64_t)8 << 10)
#define GLOFND_LOSS_BATCH_BYTES ((int64_t)16 << 10)
int64_t glofnd_internal_batch_groups(int64_t rows, int64_t row_bytes, int64_t groups,
                                     int64_t budget);

/* Groups per chunk that nt > 1 threads take in turn: about four chunks per thread, of 16
 * groups at least (one thread runs all groups as one pipeline). Each chunk is one pipeline of
 * batches, whose first and last batches run their passes alone: with 2 threads, chunks of 16
 * groups took 2-8% longer at B = 512 (two runs) and 4% at B = 2048. */
int64_t glofnd_internal_chunk_groups(int64_t groups, int nt);

/* Groups to take from group k of [.., end), at most `most` (a batch or a chunk): 0 past the
 * end. */
static inline int64_t glofnd_internal_take(int64_t k, int64_t end, int64_t most)
{
    return k >= end ? 0 : (end - k < most ? end - k : most);
}

/* Threads for `entries` similarities in `groups` groups: at most `requested`, and each thread
 * gets at least `min_work` entries. When this is 1, the drivers run their loop without entering
 * an OpenMP region: a region that runs on one thread (`if (0)` or num_threads(1)) still cost a
 * futex system call in libgomp, ~0.5 us per call (a 2 x 2 step took 1.15 us with it, 0.61
 * without). */
int glofnd_internal_threads_for(int requested, int64_t entries, int64_t min_work,
                                int64_t groups);

/* The state entries of sample i. */
#define GLOFND_LAMBDA(st, i) ((st)->lambda[(i) * (st)->lambda_stride])
#define GLOFND_EXP_AVG(st, i) ((st)->exp_avg[(i) * (st)->exp_avg_stride])
#define GLOFND_EXP_AVG_SQ(st, i) ((st)->exp_avg_sq[(i) * (st)->exp_avg_sq_stride])
#define GLOFND_STEPS(st, i) ((st)->steps[(i) * (st)->steps_stride])

/* Groups ahead whose state entries are prefetched (threshold.c and loss.c): the indices are
 * random over n, so without it every group would wait for four cache misses once the state
 * outgrows the caches. */
#define GLOFND_PREFETCH_GROUPS 4

/* Prefetches the state entries of sample i for writing. */
void glofnd_internal_prefetch_state(const glofnd_state *st, int64_t i);
/* The state entries of group k of g, if it exists, for the drivers' loops. */
static inline void glofnd_internal_prefetch_group(const glofnd_state *st, const int64_t *index,
                                                  const glofnd_grouping *g, int64_t k)
{
    if (k < g->ngroups)
        glofnd_internal_prefetch_state(st, index[g->order[g->starts[k]]]);
}
/* The state entries of the groups [k0, k1) of g, when the state is large (threshold.c). */
void glofnd_internal_prefetch_groups(const glofnd_state *st, const int64_t *index,
                                     const glofnd_grouping *g, int64_t k0, int64_t k1);

#endif /* GLOFND_INTERNAL_H */
