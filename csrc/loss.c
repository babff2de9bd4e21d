/* The fused InfoNCE of the losses: false negatives removed, kept negatives rescaled, forward and
 * backward in one pass over each row (docs/losses.md, docs/benchmarks.md).
 *
 * Row r of the (R, M) similarities s has its positive in column p_r and its excluded columns
 * (the positive, and in unimodal losses the row's own column); the other entries are its valid
 * negatives, of which those flagged are removed: entries above the row's threshold (the mask the
 * threshold step would write, compared on the fly, so that no R x M mask exists) or those of a
 * given mask. With c the scale, K the valid count, M_r the kept negatives and
 * rho_r = log(K / |M_r|) (0 without rescaling):
 *
 *     loss_r = lse_r - c s_{r p_r},
 *     lse_r = log(e^{c s_{r p_r}} + sum_{j in M_r} e^{c s_rj + rho_r})
 *
 * and the gradient of the logits is g_r e^{c s_rj + rho_r - lse_r} on the kept entries,
 * g_r (e^{c s_{r p_r} - lse_r} - 1) on the positive and 0 elsewhere.
 *
 * Each row is read twice (its max, then its exponentials, the second time from L1/L2) in the
 * forward and once in the backward, which writes the gradient; rows are independent, so OpenMP
 * splits them and the bytes do not depend on the thread count. */
#include "glofnd.h"
#include "internal.h"

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* Explicit accumulator lanes of the row loops (a multiple of every vector width in floats). */
#define LOSS_LANES 16

/* Rows per thread below which a second thread costs more than it saves. */
#define LOSS_MIN_WORK_PER_THREAD ((int64_t)1 << 15)

/* exp(x) for float32 without branches or libm calls, so that the loops vectorise: Cody-Waite
 * reduction x = n ln2 + r, |r| <= ln2/2, the degree-7 polynomial of Cephes' expf for e^r, and
 * 2^n built from the exponent bits. Relative error below 2 ulp over [-87.3, 88.7]; below that
 * the result is 0 (e^x underflows float32's normal range), above it +inf, NaN stays NaN. */
#define LOSS_EXP_CORE(V, SPLAT, xc, k, p)                                                       \
    /* k: xc log2(e) + 1.5 * 2^23 (the addition rounds it to an integer n), p: e^r */           \
    const V k = (xc) * 1.44269504088896341f + 12582912.0f;                                      \
    V p;                                                                                        \
    {                                                                                           \
        const V n_ = k - 12582912.0f;                                                           \
        const V r_ = ((xc) - n_ * 0.693359375f) - n_ * -2.12194440e-4f;                         \
        p = SPLAT(1.9875691500e-4f);                                                            \
        p = p * r_ + 1.3981999507e-3f;                                                          \
        p = p * r_ + 8.3334519073e-3f;                                                          \
        p = p * r_ + 4.1665795894e-2f;                                                          \
        p = p * r_ + 1.6666665459e-1f;                                                          \
        p = p * r_ + 5.0000001201e-1f;                                                          \
        p = (p * (r_ * r_) + r_) + 1.0f;                                                        \
    }
#define LOSS_SCALAR(x) (x)

/* The scalar exp; loss_vec.h's vexp runs the same LOSS_EXP_CORE on 16 lanes (the same bytes). */
static inline float exp_f32(float x)
{
    const float xc = x < -87.33654f ? -87.33654f : (x > 88.7f ? 88.7f : x);
    LOSS_EXP_CORE(float, LOSS_SCALAR, xc, k, p)
    uint32_t kb, sb;
    memcpy(&kb, &k, sizeof kb);
    sb = (kb - 0x4B400000u + 127u) << 23; /* the biased exponent of 2^n */
    float scale;
    memcpy(&scale, &sb, sizeof scale);
    float y = p * scale;
    y = x < -87.33654f ? 0.0f : y;
    y = x > 88.7f ? INFINITY : y;
    return x != x ? x : y;
}

#define EXP_F32(x) exp_f32(x)
#define EXP_F64(x) exp(x)


#define T float
#define EXP_T EXP_F32
#define EXP1_T EXP_F32
#define LOG_T logf
#define ISA_ATTR
#define SUF f32_base
#include "loss_impl.h"
#undef SUF
#undef ISA_ATTR
#ifdef GLOFND_X86_DISPATCH
#define ISA_ATTR GLOFND_ATTR_AVX2
#define SUF f32_avx2
#include "loss_impl.h"
#undef SUF
#undef ISA_ATTR
#define ISA_ATTR GLOFND_ATTR_AVX512
/* AVX-512: the float loops in vector extensions (loss_vec.h), which the compiler does not
 * derive from the scalar loops (their selects and maxima stay scalar); narrower instruction
 * sets lower those 16-lane vectors badly and keep the scalar loops. The lanes are the same, so
 * are the bytes. */
#define LOSS_VECTOR 1
#define SUF f32_avx512
#include "loss_impl.h"
#undef LOSS_VECTOR
#undef SUF
#undef ISA_ATTR
#endif
#undef LOG_T
#undef EXP1_T
#undef EXP_T
#undef T
#undef LOSS_VECTOR

#define T double
#define EXP_T EXP_F64
#define EXP1_T EXP_F64
#define LOG_T log
#define ISA_ATTR
#define SUF f64_base
#include "loss_impl.h"
#undef SUF
#undef ISA_ATTR
#undef LOG_T
#undef EXP1_T
#undef EXP_T
#undef T

#ifdef _OPENMP
#define LOSS_OMP_FOR _Pragma("omp parallel for schedule(static) num_threads(nt)")
#define LOSS_OMP_FOR_GROUPS _Pragma("omp parallel for schedule(dynamic, 1) num_threads(nt)")
#else
#define LOSS_OMP_FOR
#define LOSS_OMP_FOR_GROUPS
#endif

/* The row kernels of one instruction set. */
typedef struct {
    void (*fwd)(const float *, float, const glofnd_rows *, int64_t, float *, float *, int64_t *);
    void (*bwd)(const float *, float, const glofnd_rows *, int64_t, const float *, const float *,
                const int64_t *, float *, float *);
    void (*lme)(const float *, float, int, const glofnd_rows *, int64_t, float *, int64_t *);
    void (*sfwd)(const float *, float, int, int, const glofnd_rows *, int64_t, const float *,
                 const int64_t *, float *);
    void (*sbwd)(const float *, float, int, int, const glofnd_rows *, int64_t, const float *,
                 const float *, const int64_t *, float *);
    void (*fused)(const float *, float, int, const glofnd_rows *, const int64_t *, glofnd_state *,
                  const glofnd_params *, const glofnd_grouping *, int64_t, int64_t, float *,
                  float *, int64_t *, float *);
} kernels_f32;

#define LOSS_KERNELS(suf)                                                                       \
    {fwd_row_##suf,     bwd_row_##suf,     lme_row_##suf,                                       \
     sog_fwd_row_##suf, sog_bwd_row_##suf, fused_groups_##suf}

static const kernels_f32 *f32_kernels(void)
{
    static const kernels_f32 base = LOSS_KERNELS(f32_base);
#ifdef GLOFND_X86_DISPATCH
    static const kernels_f32 avx2 = LOSS_KERNELS(f32_avx2);
    static const kernels_f32 avx512 = LOSS_KERNELS(f32_avx512);
    switch (glofnd_isa()) {
    case GLOFND_ISA_AVX512:
        return &avx512;
    case GLOFND_ISA_AVX2:
        return &avx2;
    default:
        break;
    }
#endif
    return &base;
}

static int check_rows(const glofnd_rows *b)
{
    if (b == NULL || b->rows < 0 || b->cols < 0 || (b->rows > 0 && b->positive == NULL) ||
        (b->thr != NULL && b->removed != NULL) || b->per_row < 0)
        return GLOFND_EINVAL;
    for (int64_t r = 0; r < b->rows; ++r) {
        if (b->positive[r] < 0 || b->positive[r] >= b->cols)
            return GLOFND_EINDEX;
        if (b->own != NULL && b->own[r] >= b->cols)
            return GLOFND_EINDEX;
    }
    return GLOFND_OK;
}

/* Checks the rows, then runs `call` (a row kernel applied to row r) on every row, the rows
 * split between threads (each row is written by one thread: the bytes do not depend on it). */
#define LOSS_RUN_ROWS(b, call)                                                                  \
    do {                                                                                        \
        const int status_ = check_rows(b);                                                      \
        if (status_ != GLOFND_OK)                                                               \
            return status_;                                                                     \
        const int nt = glofnd_internal_threads_for((b)->num_threads, (b)->rows * (b)->cols,    \
                                                   LOSS_MIN_WORK_PER_THREAD, (b)->rows);        \
        if (nt == 1) { /* no OpenMP region (internal.h, threads_for) */                         \
            for (int64_t r = 0; r < (b)->rows; ++r)                                             \
                call;                                                                           \
            return GLOFND_OK;                                                                   \
        }                                                                                       \
        LOSS_OMP_FOR                                                                            \
        for (int64_t r = 0; r < (b)->rows; ++r)                                                 \
            call;                                                                               \
        return GLOFND_OK;                                                                       \
    } while (0)

int glofnd_info_nce_fwd_f32(const float *sim, float scale, const glofnd_rows *b, float *loss,
                            float *lse, int64_t *kept)
{
    const kernels_f32 *k = f32_kernels();
    LOSS_RUN_ROWS(b, k->fwd(sim, scale, b, r, loss, lse, kept));
}

int glofnd_info_nce_bwd_f32(const float *sim, float scale, const glofnd_rows *b,
                            const float *grad, const float *lse, const int64_t *kept,
                            float *dsim, float *dscale)
{
    const kernels_f32 *k = f32_kernels();
    LOSS_RUN_ROWS(b, k->bwd(sim, scale, b, r, grad, lse, kept, dsim, dscale));
}

int glofnd_info_nce_fwd_f64(const double *sim, double scale, const glofnd_rows *b, double *loss,
                            double *lse, int64_t *kept)
{
    LOSS_RUN_ROWS(b, fwd_row_f64_base(sim, scale, b, r, loss, lse, kept));
}

int glofnd_info_nce_bwd_f64(const double *sim, double scale, const glofnd_rows *b,
                            const double *grad, const double *lse, const int64_t *kept,
                            double *dsim, double *dscale)
{
    LOSS_RUN_ROWS(b, bwd_row_f64_base(sim, scale, b, r, grad, lse, kept, dsim, dscale));
}

int glofnd_sogclr_lme_f32(const float *sim, float scale, int shift, const glofnd_rows *b,
                          float *out, int64_t *kept)
{
    const kernels_f32 *k = f32_kernels();
    LOSS_RUN_ROWS(b, k->lme(sim, scale, shift, b, r, out, kept));
}

int glofnd_sogclr_lme_f64(const double *sim, double scale, int shift, const glofnd_rows *b,
                          double *out, int64_t *kept)
{
    LOSS_RUN_ROWS(b, lme_row_f64_base(sim, scale, shift, b, r, out, kept));
}

int glofnd_sogclr_fwd_f32(const float *sim, float scale, int shift, int pos_term,
                          const glofnd_rows *b, const float *log_u, const int64_t *kept,
                          float *loss)
{
    const kernels_f32 *k = f32_kernels();
    LOSS_RUN_ROWS(b, k->sfwd(sim, scale, shift, pos_term, b, r, log_u, kept, loss));
}

int glofnd_sogclr_fwd_f64(const double *sim, double scale, int shift, int pos_term,
                          const glofnd_rows *b, const double *log_u, const int64_t *kept,
                          double *loss)
{
    LOSS_RUN_ROWS(b, sog_fwd_row_f64_base(sim, scale, shift, pos_term, b, r, log_u, kept, loss));
}

int glofnd_sogclr_bwd_f32(const float *sim, float scale, int shift, int pos_term,
                          const glofnd_rows *b, const float *grad, const float *log_u,
                          const int64_t *kept, float *dsim)
{
    const kernels_f32 *k = f32_kernels();
    LOSS_RUN_ROWS(b, k->sbwd(sim, scale, shift, pos_term, b, r, grad, log_u, kept, dsim));
}

int glofnd_sogclr_bwd_f64(const double *sim, double scale, int shift, int pos_term,
                          const glofnd_rows *b, const double *grad, const double *log_u,
                          const int64_t *kept, double *dsim)
{
    LOSS_RUN_ROWS(b, sog_bwd_row_f64_base(sim, scale, shift, pos_term, b, r, grad, log_u, kept,
                                          dsim));
}

/* The fused step: groups the rows by index, then runs `call` (a group kernel applied to the
 * groups [k0_, k1_) of g) on chunks of groups, split between threads (each group and its state
 * entry are written by one thread: the bytes do not depend on it). */
#define LOSS_RUN_GROUPS(b, index, st, p, call)                                                  \
    do {                                                                                        \
        int status_ = check_rows(b);                                                            \
        if (status_ == GLOFND_OK && ((b)->thr != NULL || (b)->removed != NULL))                 \
            status_ = GLOFND_EINVAL;                                                            \
        if (status_ == GLOFND_OK)                                                               \
            status_ = glofnd_internal_check_state(index, (b)->rows, st, p);                     \
        if (status_ != GLOFND_OK || (b)->rows == 0)                                             \
            return status_;                                                                     \
        glofnd_grouping g;                                                                      \
        status_ = glofnd_internal_group_rows(index, (b)->rows, &g);                             \
        if (status_ != GLOFND_OK)                                                               \
            return status_;                                                                     \
        /* the loss's exponentials make an entry dearer than in the threshold step */          \
        const int nt = glofnd_internal_threads_for((b)->num_threads, (b)->rows * (b)->cols,    \
                                                   LOSS_MIN_WORK_PER_THREAD, g.ngroups);        \
        if (nt == 1) { /* one pipeline, no OpenMP region (internal.h) */                        \
            const int64_t k0_ = 0, k1_ = g.ngroups;                                             \
            if ((p)->update)                                                                    \
                glofnd_internal_prefetch_groups(st, index, &g, k0_, k1_);                       \
            call;                                                                               \
        } else {                                                                                \
            const int64_t chunk_ = glofnd_internal_chunk_groups(g.ngroups, nt);                 \
            const int64_t nchunks_ = (g.ngroups + chunk_ - 1) / chunk_;                         \
            LOSS_OMP_FOR_GROUPS                                                                 \
            for (int64_t c_ = 0; c_ < nchunks_; ++c_) {                                         \
                const int64_t k0_ = c_ * chunk_;                                                \
                const int64_t k1_ = k0_ + glofnd_internal_take(k0_, g.ngroups, chunk_);         \
                if ((p)->update) /* by the thread that writes them */                           \
                    glofnd_internal_prefetch_groups(st, index, &g, k0_, k1_);                   \
                call;                                                                           \
            }                                                                                   \
        }                                                                                       \
        free(g.block);                                                                          \
        return GLOFND_OK;                                                                       \
    } while (0)

int glofnd_fused_fwd_f32(const float *sim, float scale, int kind, const glofnd_rows *b,
                         const int64_t *index, glofnd_state *st, const glofnd_params *p,
                         float *out0, float *out1, int64_t *kept, float *thr)
{
    const kernels_f32 *k_ = f32_kernels();
    LOSS_RUN_GROUPS(b, index, st, p,
                    k_->fused(sim, scale, kind, b, index, st, p, &g, k0_, k1_, out0, out1, kept,
                              thr));
}

int glofnd_fused_fwd_f64(const double *sim, double scale, int kind, const glofnd_rows *b,
                         const int64_t *index, glofnd_state *st, const glofnd_params *p,
                         double *out0, double *out1, int64_t *kept, float *thr)
{
    LOSS_RUN_GROUPS(b, index, st, p,
                    fused_groups_f64_base(sim, scale, kind, b, index, st, p, &g, k0_, k1_, out0,
                                          out1, kept, thr));
}
