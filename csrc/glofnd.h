/* glofnd: C core of GloFND (global false-negative discovery).
 *
 * Pure C99: no Python, no NumPy. Plain pointers and sizes in, a status code out.
 * The state lives in four caller-owned arrays of length n; one call reads and writes only
 * the entries named by the batch's indices, so its cost does not depend on n.
 */
#ifndef GLOFND_H
#define GLOFND_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum glofnd_status {
    GLOFND_OK = 0,
    GLOFND_EINVAL = -1, /* a size, stride or hyper-parameter is invalid */
    GLOFND_EINDEX = -2, /* an index lies outside [0, n) */
    GLOFND_ENOMEM = -3  /* scratch allocation failed; nothing was written */
};

enum glofnd_optimizer { GLOFND_ADAM = 0, GLOFND_SGD = 1 };

/* R rows of M similarities; row r belongs to the anchor with data-set id index[r].
 * Strides are in elements and may be negative. valid == NULL means every entry is valid. */
typedef struct {
    int64_t rows, cols;
    int64_t row_stride, col_stride;
    const int64_t *index;
    const uint8_t *valid;
    int64_t valid_row_stride, valid_col_stride;
} glofnd_batch;

/* Per-sample state, n entries each: threshold, Adam moments, update count. Entry i of each array
 * lies at index i * stride (strides in elements, >= 1): 1 for separate arrays; 4 for one
 * interleaved (n, 4) block, where a sample's four entries share one cache line and a step at
 * large n touches one line per sample instead of four. */
typedef struct {
    float *lambda;
    float *exp_avg;
    float *exp_avg_sq;
    int32_t *steps;
    int64_t n;
    int64_t lambda_stride, exp_avg_stride, exp_avg_sq_stride, steps_stride;
} glofnd_state;

typedef struct {
    double alpha;        /* target share of negatives above lambda, in (0, 1) */
    double lr;           /* step size, >= 0 */
    double beta1, beta2; /* Adam decay rates, in [0, 1) */
    double eps;          /* Adam denominator term, > 0 */
    double lo, hi;       /* lambda is clamped to [lo, hi], finite float32 values */
    int optimizer;       /* enum glofnd_optimizer */
    int64_t step;        /* > 0: Adam bias correction uses this t for all; 0: per-sample count */
    int update;          /* 0: mask with the current lambda, state untouched */
    int num_threads;     /* <= 1: serial; results never depend on it */
} glofnd_params;

/* Update lambda of every distinct index in the batch from the share of its valid entries above
 * the current lambda (all rows of one index pooled), then write mask[r*M + j] = 1 where entry
 * (r, j) is valid and above the new lambda of index[r], and kept[r] = valid entries not masked.
 * Non-finite entries (NaN, +-inf) are never valid: never counted, never flagged; an index with no
 * valid entry keeps its state. mask (R*M) and kept (R) are contiguous outputs. */
int glofnd_step_f32(const float *sim, const glofnd_batch *batch, glofnd_state *state,
                    const glofnd_params *params, uint8_t *mask, int64_t *kept);
int glofnd_step_f64(const double *sim, const glofnd_batch *batch, glofnd_state *state,
                    const glofnd_params *params, uint8_t *mask, int64_t *kept);

/* Rows of the fused InfoNCE (loss.c): R rows of M contiguous similarities (row stride M). Row
 * r's positive is column positive[r]; it and own[r] (when own is not NULL and own[r] >= 0) are
 * excluded; every other entry is a valid negative, removed when it is finite and above thr[r]
 * (thr not NULL) or flagged in removed (R*M contiguous, not NULL). per_row is K, the valid count
 * of every row, and ratio = 1 rescales the kept negatives by K / |M_r|. */
typedef struct {
    int64_t rows, cols;
    const int64_t *positive;
    const int64_t *own;
    const float *thr;
    const uint8_t *removed;
    int64_t per_row;
    int ratio;
    int num_threads; /* <= 1: serial; results never depend on it */
} glofnd_rows;

/* Forward: loss (R), lse (R, the log-sum-exp the backward needs) and kept (R, |M_r|). */
int glofnd_info_nce_fwd_f32(const float *sim, float scale, const glofnd_rows *rows, float *loss,
                            float *lse, int64_t *kept);
int glofnd_info_nce_fwd_f64(const double *sim, double scale, const glofnd_rows *rows,
                            double *loss, double *lse, int64_t *kept);
/* Backward from grad (R), the gradient of each row's loss: dsim (R*M) and, when dscale is not
 * NULL, each row's term of the scale's gradient (R). */
int glofnd_info_nce_bwd_f32(const float *sim, float scale, const glofnd_rows *rows,
                            const float *grad, const float *lse, const int64_t *kept, float *dsim,
                            float *dscale);
int glofnd_info_nce_bwd_f64(const double *sim, double scale, const glofnd_rows *rows,
                            const double *grad, const double *lse, const int64_t *kept,
                            double *dsim, double *dscale);

/* SogCLR (loss.c), with o_r = s_{r p_r} when shift, else 0, and y_rj = scale * (s_rj - o_r):
 * lme: out_r = log(mean over the kept j of e^{y_rj}) (-inf without kept entries), kept_r = |M_r|;
 * fwd: loss_r = -[pos_term] s_{r p_r} + (1/|M_r|) sum_{j in M_r} e^{y_rj - log_u_r} (s_rj - o_r),
 * the weights held constant; bwd: its gradient from grad (R). */
int glofnd_sogclr_lme_f32(const float *sim, float scale, int shift, const glofnd_rows *rows,
                          float *out, int64_t *kept);
int glofnd_sogclr_lme_f64(const double *sim, double scale, int shift, const glofnd_rows *rows,
                          double *out, int64_t *kept);
int glofnd_sogclr_fwd_f32(const float *sim, float scale, int shift, int pos_term,
                          const glofnd_rows *rows, const float *log_u, const int64_t *kept,
                          float *loss);
int glofnd_sogclr_fwd_f64(const double *sim, double scale, int shift, int pos_term,
                          const glofnd_rows *rows, const double *log_u, const int64_t *kept,
                          double *loss);
int glofnd_sogclr_bwd_f32(const float *sim, float scale, int shift, int pos_term,
                          const glofnd_rows *rows, const float *grad, const float *log_u,
                          const int64_t *kept, float *dsim);
int glofnd_sogclr_bwd_f64(const double *sim, double scale, int shift, int pos_term,
                          const glofnd_rows *rows, const double *grad, const double *log_u,
                          const int64_t *kept, double *dsim);

/* The losses' fused forward with GloFND's update: for every distinct index i of the rows
 * (index, R), counts its rows' valid entries (all but the excluded columns, finite) and those
 * above lambda_i, updates lambda_i as glofnd_step_f32 would (bit for bit; not when
 * params->update is 0), then computes each row with its kept negatives = the valid ones not
 * above the new lambda_i (non-finite ones kept, as the losses keep them). kind 0: the InfoNCE
 * (out0 loss, out1 lse, as glofnd_info_nce_fwd with thr = the new lambdas); kind 1 / 2: SogCLR's
 * log-mean-exp with / without the positive's offset (out0; out1 unused). kept (R) and thr (R,
 * the rows' new lambda) are outputs. rows->thr and rows->removed must be NULL. */
int glofnd_fused_fwd_f32(const float *sim, float scale, int kind, const glofnd_rows *rows,
                         const int64_t *index, glofnd_state *state, const glofnd_params *params,
                         float *out0, float *out1, int64_t *kept, float *thr);
int glofnd_fused_fwd_f64(const double *sim, double scale, int kind, const glofnd_rows *rows,
                         const int64_t *index, glofnd_state *state, const glofnd_params *params,
                         double *out0, double *out1, int64_t *kept, float *thr);

/* Instruction sets of the row kernels. All give the same bytes; the widest one the CPU runs is
 * used unless glofnd_set_isa chose another. */
enum glofnd_isa { GLOFND_ISA_BASE = 0, GLOFND_ISA_AVX2 = 1, GLOFND_ISA_AVX512 = 2 };

/* The instruction set in use (enum glofnd_isa). */
int glofnd_isa(void);

/* Selects an instruction set for later calls (tests, benchmarks); -1 restores the widest.
 * GLOFND_EINVAL when it was not compiled in or the CPU lacks it. Not to be called while a step
 * runs in another thread. */
int glofnd_set_isa(int isa);

/* 1 when the library was built with OpenMP. */
int glofnd_has_openmp(void);

#ifdef __cplusplus
}
#endif

#endif /* GLOFND_H */
