/* Row kernels of the fused InfoNCE, instantiated by loss.c once per similarity type and
 * instruction set. Expects T, SUF, ISA_ATTR and EXP_T (an exp of T without branches) to be
 * defined; no include guard on purpose.
 *
 * The loops run over contiguous spans of a row (the excluded columns split a row into up to
 * three spans) with LOSS_LANES explicit accumulators, so that the compiler vectorises them
 * without reassociating anything: every instruction set adds the same numbers in the same order
 * and gives the same bytes. */

#define LOSS_CAT_(a, b) a##_##b
#define LOSS_CAT(a, b) LOSS_CAT_(a, b)
#define FN(name) LOSS_CAT(name, SUF)

/* Whether entry x (its removed flag r) is kept: mode 0 keeps all, mode 1 drops finite entries
 * above thr (the threshold step's flags), mode 2 drops the entries flagged in `removed`. */
#define LOSS_KEEP(mode, x, thr, r) \
    ((mode) == 0 ? 1 : (mode) == 1 ? !(((x) > (thr)) & ((x) != (T)INFINITY)) : !(r))

#ifndef LOSS_BY_MODE
/* Runs stmt with MODE a literal 0, 1 or 2, so that each span loop is compiled per mode without
 * branches inside (the loops vectorise only then). */
#define LOSS_BY_MODE(mode, stmt)                                                                \
    do {                                                                                        \
        if ((mode) == 0) {                                                                      \
            enum { MODE = 0 };                                                                  \
            stmt;                                                                               \
        } else if ((mode) == 1) {                                                               \
            enum { MODE = 1 };                                                                  \
            stmt;                                                                               \
        } else {                                                                                \
            enum { MODE = 2 };                                                                  \
            stmt;                                                                               \
        }                                                                                       \
    } while (0)
#if defined(__GNUC__) || defined(__clang__)
#define LOSS_INLINE static inline __attribute__((always_inline))
#else
#define LOSS_INLINE static inline
#endif
#endif

#ifdef LOSS_VECTOR
#include "loss_vec.h"
#endif

/* Max of c*(x - o) over the kept entries of a span, and their count. */
ISA_ATTR LOSS_INLINE void FN(span_max)(const T *restrict x, const uint8_t *restrict rem,
                                         int64_t n, int mode, T thr, T c, T o, T *mx,
                                         int64_t *cnt)
{
    T m[LOSS_LANES];
    int32_t k[LOSS_LANES];
    for (int l = 0; l < LOSS_LANES; ++l) {
        m[l] = -(T)INFINITY;
        k[l] = 0;
    }
    int64_t j = 0;
#ifdef LOSS_VECTOR
    j = FN(vspan_max)(x, rem, n, mode, thr, c, o, mx, cnt);
#endif
    for (; j + LOSS_LANES <= n; j += LOSS_LANES) {
        for (int l = 0; l < LOSS_LANES; ++l) {
            const T v = x[j + l];
            const int keep = LOSS_KEEP(mode, v, thr, mode == 2 ? rem[j + l] : 0);
            const T y = keep ? c * (v - o) : -(T)INFINITY;
            m[l] = y > m[l] ? y : m[l];
            k[l] += keep;
        }
        if ((j & 0xFFFF) == 0xFFF0) { /* 32-bit lane counters: flush long rows */
            for (int l = 0; l < LOSS_LANES; ++l) {
                *cnt += k[l];
                k[l] = 0;
            }
        }
    }
    for (const int64_t jt = j; j < n; ++j) { /* the tail in lanes 0.., as loss_vec.h */
        const T v = x[j];
        const int keep = LOSS_KEEP(mode, v, thr, mode == 2 ? rem[j] : 0);
        const T y = keep ? c * (v - o) : -(T)INFINITY;
        m[j - jt] = y > m[j - jt] ? y : m[j - jt];
        k[j - jt] += keep;
    }
    T out = *mx;
    for (int l = 0; l < LOSS_LANES; ++l) {
        out = m[l] > out ? m[l] : out;
        *cnt += k[l];
    }
    *mx = out;
}

/* Sum of exp(c*(x - o) - shift) over the kept entries of a span, into lane sums acc. */
ISA_ATTR LOSS_INLINE void FN(span_sum)(const T *restrict x, const uint8_t *restrict rem,
                                         int64_t n, int mode, T thr, T c, T o, T shift,
                                         T *restrict acc)
{
    int64_t j = 0;
#ifdef LOSS_VECTOR
    j = FN(vspan_sum)(x, rem, n, mode, thr, c, o, shift, acc);
#endif
    for (; j + LOSS_LANES <= n; j += LOSS_LANES) {
        for (int l = 0; l < LOSS_LANES; ++l) {
            const T v = x[j + l];
            const int keep = LOSS_KEEP(mode, v, thr, mode == 2 ? rem[j + l] : 0);
            const T e = EXP_T(c * (v - o) - shift);
            acc[l] += keep ? e : (T)0;
        }
    }
    for (const int64_t jt = j; j < n; ++j) { /* the tail in lanes 0.., as loss_vec.h */
        const T v = x[j];
        const int keep = LOSS_KEEP(mode, v, thr, mode == 2 ? rem[j] : 0);
        const T e = EXP_T(c * (v - o) - shift);
        acc[j - jt] += keep ? e : (T)0;
    }
}

/* The gradient of a span: e = keep ? g * exp(c*x - shift) : 0 (the logits' gradient), out = c * e
 * (the similarities'), and the sum of e * x into acc (the scale's) when acc is not NULL. */
ISA_ATTR LOSS_INLINE void FN(span_grad)(const T *restrict x, const uint8_t *restrict rem,
                                          int64_t n, int mode, T thr, T c, T shift, T g,
                                          T *restrict out, T *restrict acc)
{
    int64_t j = 0;
#ifdef LOSS_VECTOR
    j = FN(vspan_grad)(x, rem, n, mode, thr, c, shift, g, out, acc);
#endif
    if (acc == NULL) {
        for (; j < n; ++j) {
            const T v = x[j];
            const int keep = LOSS_KEEP(mode, v, thr, mode == 2 ? rem[j] : 0);
            const T e = keep ? g * EXP_T(c * v - shift) : (T)0;
            out[j] = c * e;
        }
        return;
    }
    for (; j + LOSS_LANES <= n; j += LOSS_LANES) {
        for (int l = 0; l < LOSS_LANES; ++l) {
            const T v = x[j + l];
            const int keep = LOSS_KEEP(mode, v, thr, mode == 2 ? rem[j + l] : 0);
            const T e = keep ? g * EXP_T(c * v - shift) : (T)0;
            out[j + l] = c * e;
            acc[l] += e * v;
        }
    }
    for (const int64_t jt = j; j < n; ++j) { /* the tail in lanes 0.., as loss_vec.h */
        const T v = x[j];
        const int keep = LOSS_KEEP(mode, v, thr, mode == 2 ? rem[j] : 0);
        const T e = keep ? g * EXP_T(c * v - shift) : (T)0;
        out[j] = c * e;
        acc[j - jt] += e * v;
    }
}

/* SogCLR's weighted sum: sum of exp(c*(x - o) - shift) * (x - o) over the kept entries of a span,
 * into lane sums acc. */
ISA_ATTR LOSS_INLINE void FN(span_wsum)(const T *restrict x, const uint8_t *restrict rem,
                                          int64_t n, int mode, T thr, T c, T o, T shift,
                                          T *restrict acc)
{
    int64_t j = 0;
#ifdef LOSS_VECTOR
    j = FN(vspan_wsum)(x, rem, n, mode, thr, c, o, shift, acc);
#endif
    for (; j + LOSS_LANES <= n; j += LOSS_LANES) {
        for (int l = 0; l < LOSS_LANES; ++l) {
            const T v = x[j + l];
            const int keep = LOSS_KEEP(mode, v, thr, mode == 2 ? rem[j + l] : 0);
            const T d = v - o;
            const T e = EXP_T(c * d - shift);
            acc[l] += keep ? e * d : (T)0;
        }
    }
    for (const int64_t jt = j; j < n; ++j) { /* the tail in lanes 0.., as loss_vec.h */
        const T v = x[j];
        const int keep = LOSS_KEEP(mode, v, thr, mode == 2 ? rem[j] : 0);
        const T d = v - o;
        const T e = EXP_T(c * d - shift);
        acc[j - jt] += keep ? e * d : (T)0;
    }
}

/* SogCLR's gradient: out = keep ? g * exp(c*(x - o) - shift) : 0, and the sum of out into the
 * lane sums acc. */
ISA_ATTR LOSS_INLINE void FN(span_gsum)(const T *restrict x, const uint8_t *restrict rem,
                                          int64_t n, int mode, T thr, T c, T o, T shift, T g,
                                          T *restrict out, T *restrict acc)
{
    int64_t j = 0;
#ifdef LOSS_VECTOR
    j = FN(vspan_gsum)(x, rem, n, mode, thr, c, o, shift, g, out, acc);
#endif
    for (; j + LOSS_LANES <= n; j += LOSS_LANES) {
        for (int l = 0; l < LOSS_LANES; ++l) {
            const T v = x[j + l];
            const int keep = LOSS_KEEP(mode, v, thr, mode == 2 ? rem[j + l] : 0);
            const T e = keep ? g * EXP_T(c * (v - o) - shift) : (T)0;
            out[j + l] = e;
            acc[l] += e;
        }
    }
    for (const int64_t jt = j; j < n; ++j) { /* the tail in lanes 0.., as loss_vec.h */
        const T v = x[j];
        const int keep = LOSS_KEEP(mode, v, thr, mode == 2 ? rem[j] : 0);
        const T e = keep ? g * EXP_T(c * (v - o) - shift) : (T)0;
        out[j] = e;
        acc[j - jt] += e;
    }
}

/* The fused step's first pass over a span: the max of c*(x - o) over all its entries, and the
 * threshold update's counts: finite entries, and those above lam. */
ISA_ATTR LOSS_INLINE void FN(span_pass1)(const T *restrict x, int64_t n, T c, T o, T lam, T *mx,
                                           int64_t *above, int64_t *nfin)
{
    int64_t j = 0;
#ifdef LOSS_VECTOR
    j = FN(vspan_pass1)(x, n, c, o, lam, mx, above, nfin);
#endif
    T m = *mx;
    int64_t a = 0, f = 0;
    for (; j < n; ++j) {
        const T v = x[j];
        const T y = c * (v - o);
        m = y > m ? y : m;
        a += (v > lam) & (v != (T)INFINITY);
        f += (v - v) == (T)0;
    }
    *mx = m;
    *above += a;
    *nfin += f;
}

/* The fused step's second pass over a span: span_sum of mode 1 (finite entries above thr are
 * removed) and the kept count. */
ISA_ATTR LOSS_INLINE void FN(span_sumc)(const T *restrict x, int64_t n, T thr, T c, T o, T shift,
                                          T *restrict acc, int64_t *cnt)
{
    int64_t j = 0;
#ifdef LOSS_VECTOR
    j = FN(vspan_sumc)(x, n, thr, c, o, shift, acc, cnt);
#endif
    int64_t k = 0;
    for (; j + LOSS_LANES <= n; j += LOSS_LANES) {
        for (int l = 0; l < LOSS_LANES; ++l) {
            const T v = x[j + l];
            const int keep = LOSS_KEEP(1, v, thr, 0);
            const T e = EXP_T(c * (v - o) - shift);
            acc[l] += keep ? e : (T)0;
            k += keep;
        }
    }
    for (const int64_t jt = j; j < n; ++j) { /* the tail in lanes 0.., as loss_vec.h */
        const T v = x[j];
        const int keep = LOSS_KEEP(1, v, thr, 0);
        const T e = EXP_T(c * (v - o) - shift);
        acc[j - jt] += keep ? e : (T)0;
        k += keep;
    }
    *cnt += k;
}

/* The sum of the 16 lane sums in a fixed tree: lanes l and l + 8, then l and l + 4, then l and
 * l + 2, then the last two. loss_vec.h's vsum_f adds in the same order (the same bytes) in four
 * vector steps instead of a chain of 15 dependent additions (about 1 us less per 256 rows). */
ISA_ATTR LOSS_INLINE T FN(lane_sum)(const T *acc)
{
#ifdef LOSS_VECTOR
    return FN(vsum_f)(acc);
#else
    T t[LOSS_LANES / 2];
    for (int l = 0; l < LOSS_LANES / 2; ++l)
        t[l] = acc[l] + acc[l + LOSS_LANES / 2];
    for (int l = 0; l < 4; ++l)
        t[l] = t[l] + t[l + 4];
    return (t[0] + t[2]) + (t[1] + t[3]);
#endif
}

/* The spans of row r between its excluded columns: up to three [lo, hi) pairs. */
static inline int FN(spans)(const glofnd_rows *b, int64_t r, int64_t lo[3], int64_t hi[3])
{
    int64_t e0 = b->positive[r], e1 = b->own != NULL ? b->own[r] : -1;
    if (e1 < 0 || e1 == e0)
        e1 = e0;
    if (e1 < e0) {
        const int64_t t = e0;
        e0 = e1;
        e1 = t;
    }
    int n = 0;
    lo[n] = 0;
    hi[n++] = e0;
    if (e1 != e0) {
        lo[n] = e0 + 1;
        hi[n++] = e1;
    }
    lo[n] = e1 + 1;
    hi[n++] = b->cols;
    return n;
}

/* The mode of a backward row: a row whose forward kept all the entries of its spans (`kept`, the
 * forward's count) had nothing removed, so it runs as mode 0, without the comparisons or the
 * removed bytes. The values are the same: no entry would have been dropped. */
static inline int FN(bwd_mode)(int mode, const int64_t lo[3], const int64_t hi[3], int ns,
                               int64_t kept)
{
    if (mode == 0)
        return 0;
    int64_t n = 0;
    for (int k = 0; k < ns; ++k)
        n += hi[k] - lo[k];
    return kept == n ? 0 : mode;
}

/* The count ratio log(K/|M_r|) of a row with `cnt` kept negatives (0 when not rescaled, and
 * when nothing was removed: log K - log K, without the two logarithms). */
static inline T FN(log_ratio)(const glofnd_rows *b, int64_t cnt)
{
    const int64_t k = b->per_row > 1 ? b->per_row : 1;
    if (!b->ratio || cnt <= 0 || cnt == k)
        return (T)0;
    return LOG_T((T)k) - LOG_T((T)cnt);
}

/* A row's log(e^pos + K/|M| sum), where sum = sum over the kept of e^{c s - stab}, stab = mx
 * (0 when mx is -inf), cnt = |M|. */
static inline T FN(info_nce_lse)(const glofnd_rows *b, T pos, T mx, T sum, int64_t cnt)
{
    const T stab = mx > -(T)INFINITY ? mx : (T)0;
    if (sum != sum)
        return sum; /* a kept NaN */
    if (cnt > 0 && mx > -(T)INFINITY) {
        const T top = stab + FN(log_ratio)(b, cnt);
        const T big = pos > top ? pos : top;
        return big + LOG_T(EXP1_T(pos - big) + EXP1_T(top - big) * sum);
    }
    return pos;
}

/* One row of the forward pass: the loss -log(e^P / (e^P + K/|M| sum_kept e^{c s})), the
 * row's log-sum-exp (the backward's input) and its kept count. */
ISA_ATTR static void FN(fwd_row)(const T *sim, T c, const glofnd_rows *b, int64_t r, T *loss,
                                 T *lse_out, int64_t *kept)
{
    const int64_t M = b->cols;
    const T *s = sim + r * M;
    const uint8_t *rem = b->removed != NULL ? b->removed + r * M : NULL;
    const int mode = b->thr != NULL ? 1 : rem != NULL ? 2 : 0;
    const T thr = b->thr != NULL ? (T)b->thr[r] : (T)0;
    int64_t lo[3], hi[3];
    const int ns = FN(spans)(b, r, lo, hi);
    T mx = -(T)INFINITY;
    int64_t cnt = 0;
    for (int k = 0; k < ns; ++k)
        LOSS_BY_MODE(mode, FN(span_max)(s + lo[k], rem != NULL ? rem + lo[k] : NULL,
                                        hi[k] - lo[k], MODE, thr, c, (T)0, &mx, &cnt));
    const T pos = c * s[b->positive[r]];
    const T stab = mx > -(T)INFINITY ? mx : (T)0;
    T acc[LOSS_LANES];
    for (int l = 0; l < LOSS_LANES; ++l)
        acc[l] = 0;
    if (cnt > 0)
        for (int k = 0; k < ns; ++k)
            LOSS_BY_MODE(mode, FN(span_sum)(s + lo[k], rem != NULL ? rem + lo[k] : NULL,
                                            hi[k] - lo[k], MODE, thr, c, (T)0, stab, acc));
    T sum = FN(lane_sum)(acc);
    const T lse = FN(info_nce_lse)(b, pos, mx, sum, cnt);
    loss[r] = lse - pos;
    lse_out[r] = lse;
    kept[r] = cnt;
}

/* One row of the backward pass: row r of dsim = c * dlogits, and the row's share of the
 * scale's gradient, sum_j dlogits_j * s_j (when dscale is not NULL). */
ISA_ATTR static void FN(bwd_row)(const T *sim, T c, const glofnd_rows *b, int64_t r,
                                 const T *grad, const T *lse, const int64_t *kept, T *dsim,
                                 T *dscale)
{
    const int64_t M = b->cols;
    const T *s = sim + r * M;
    const uint8_t *rem = b->removed != NULL ? b->removed + r * M : NULL;
    const T thr = b->thr != NULL ? (T)b->thr[r] : (T)0;
    T *out = dsim + r * M;
    int64_t lo[3], hi[3];
    const int ns = FN(spans)(b, r, lo, hi);
    const int mode = FN(bwd_mode)(b->thr != NULL ? 1 : rem != NULL ? 2 : 0, lo, hi, ns, kept[r]);
    const T g = grad[r];
    const T shift = lse[r] - FN(log_ratio)(b, kept[r]);
    T acc[LOSS_LANES];
    for (int l = 0; l < LOSS_LANES; ++l)
        acc[l] = 0;
    for (int k = 0; k < ns; ++k)
        LOSS_BY_MODE(mode, FN(span_grad)(s + lo[k], rem != NULL ? rem + lo[k] : NULL,
                                         hi[k] - lo[k], MODE, thr, c, shift, g, out + lo[k],
                                         dscale != NULL ? acc : NULL));
    for (int k = 0; k + 1 < ns; ++k)
        out[hi[k]] = 0; /* the excluded columns */
    const int64_t p = b->positive[r];
    const T dp = g * (EXP1_T(c * s[p] - lse[r]) - (T)1);
    out[p] = c * dp;
    if (dscale != NULL) {
        T sum = FN(lane_sum)(acc);
        dscale[r] = sum + dp * s[p];
    }
}

/* Row context shared by the SogCLR rows: mode, threshold, spans, and the offset o (the
 * positive's similarity when shift, else 0). */
#define LOSS_ROW_SETUP                                                                          \
    const int64_t M = b->cols;                                                                  \
    const T *s = sim + r * M;                                                                   \
    const uint8_t *rem = b->removed != NULL ? b->removed + r * M : NULL;                         \
    const int mode = b->thr != NULL ? 1 : rem != NULL ? 2 : 0;                                  \
    const T thr = b->thr != NULL ? (T)b->thr[r] : (T)0;                                         \
    int64_t lo[3], hi[3];                                                                       \
    const int ns = FN(spans)(b, r, lo, hi);                                                     \
    const T o = shift ? s[b->positive[r]] : (T)0

/* SogCLR, one row: log of the mean of exp(c*(s - o)) over the kept entries (-inf without any)
 * and their count. */
ISA_ATTR static void FN(lme_row)(const T *sim, T c, int shift, const glofnd_rows *b, int64_t r,
                                 T *out, int64_t *kept)
{
    LOSS_ROW_SETUP;
    T mx = -(T)INFINITY;
    int64_t cnt = 0;
    for (int k = 0; k < ns; ++k)
        LOSS_BY_MODE(mode, FN(span_max)(s + lo[k], rem != NULL ? rem + lo[k] : NULL,
                                        hi[k] - lo[k], MODE, thr, c, o, &mx, &cnt));
    const T stab = mx > -(T)INFINITY ? mx : (T)0;
    T acc[LOSS_LANES];
    for (int l = 0; l < LOSS_LANES; ++l)
        acc[l] = 0;
    if (cnt > 0)
        for (int k = 0; k < ns; ++k)
            LOSS_BY_MODE(mode, FN(span_sum)(s + lo[k], rem != NULL ? rem + lo[k] : NULL,
                                            hi[k] - lo[k], MODE, thr, c, o, stab, acc));
    T sum = FN(lane_sum)(acc);
    out[r] = cnt > 0 ? stab + LOG_T(sum) - LOG_T((T)cnt) : -(T)INFINITY;
    kept[r] = cnt;
}

/* SogCLR, one row: the surrogate -[pos_term] s_p + (1/|M|) sum_M exp(c*(s - o) - log_u) (s - o). */
ISA_ATTR static void FN(sog_fwd_row)(const T *sim, T c, int shift, int pos_term,
                                     const glofnd_rows *b, int64_t r, const T *log_u,
                                     const int64_t *kept, T *loss)
{
    LOSS_ROW_SETUP;
    T acc[LOSS_LANES];
    for (int l = 0; l < LOSS_LANES; ++l)
        acc[l] = 0;
    for (int k = 0; k < ns; ++k)
        LOSS_BY_MODE(mode, FN(span_wsum)(s + lo[k], rem != NULL ? rem + lo[k] : NULL,
                                         hi[k] - lo[k], MODE, thr, c, o, log_u[r], acc));
    T sum = FN(lane_sum)(acc);
    const T m = (T)(kept[r] > 1 ? kept[r] : 1);
    loss[r] = (pos_term ? -s[b->positive[r]] : (T)0) + sum / m;
}

/* SogCLR, one row of the gradient: g/|M| exp(c*(s - o) - log_u) on the kept entries; on the
 * positive -g [pos_term] less, when shift, the sum of the others (it is subtracted from all). */
ISA_ATTR static void FN(sog_bwd_row)(const T *sim, T c, int shift, int pos_term,
                                     const glofnd_rows *b, int64_t r, const T *grad,
                                     const T *log_u, const int64_t *kept, T *dsim)
{
    LOSS_ROW_SETUP;
    T *out = dsim + r * M;
    const T m = (T)(kept[r] > 1 ? kept[r] : 1);
    const T g = grad[r] / m;
    T acc[LOSS_LANES];
    for (int l = 0; l < LOSS_LANES; ++l)
        acc[l] = 0;
    const int bmode = FN(bwd_mode)(mode, lo, hi, ns, kept[r]);
    for (int k = 0; k < ns; ++k)
        LOSS_BY_MODE(bmode, FN(span_gsum)(s + lo[k], rem != NULL ? rem + lo[k] : NULL,
                                         hi[k] - lo[k], MODE, thr, c, o, log_u[r], g,
                                         out + lo[k], acc));
    for (int k = 0; k + 1 < ns; ++k)
        out[hi[k]] = 0; /* the excluded columns */
    T sum = FN(lane_sum)(acc);
    out[b->positive[r]] = (pos_term ? -grad[r] : (T)0) - (shift ? sum : (T)0);
}

#undef LOSS_ROW_SETUP
/* First pass over a group's rows: their maxima into out0, the counts against lam. */
ISA_ATTR static void FN(fused_pass1)(const T *sim, T c, int kind, const glofnd_rows *b,
                                     const int64_t *rows, int64_t nrows, T lam, T *out0,
                                     int64_t *above, int64_t *nfin)
{
    const int shift = kind == 1;
    const int64_t M = b->cols;
    for (int64_t q = 0; q < nrows; ++q) {
        const int64_t r = rows[q];
        const T *s = sim + r * M;
        int64_t lo[3], hi[3];
        const int ns = FN(spans)(b, r, lo, hi);
        const T o = shift ? s[b->positive[r]] : (T)0;
        T mx = -(T)INFINITY;
        for (int k = 0; k < ns; ++k)
            FN(span_pass1)(s + lo[k], hi[k] - lo[k], c, o, lam, &mx, above, nfin);
        out0[r] = mx;
    }
}

/* Second pass: the rows' kept sums against the new lam1, and their outputs. */
ISA_ATTR static void FN(fused_pass2)(const T *sim, T c, int kind, const glofnd_rows *b,
                                     const int64_t *rows, int64_t nrows, float lam1, T *out0,
                                     T *out1, int64_t *kept, float *thr_out)
{
    const int shift = kind == 1;
    const int64_t M = b->cols;
    for (int64_t q = 0; q < nrows; ++q) {
        const int64_t r = rows[q];
        const T *s = sim + r * M;
        int64_t lo[3], hi[3];
        const int ns = FN(spans)(b, r, lo, hi);
        const T o = shift ? s[b->positive[r]] : (T)0;
        T mx = out0[r];
        T acc[LOSS_LANES];
        for (int l = 0; l < LOSS_LANES; ++l)
            acc[l] = 0;
        int64_t cnt = 0;
        for (int k = 0; k < ns; ++k)
            FN(span_sumc)(s + lo[k], hi[k] - lo[k], (T)lam1, c, o,
                          mx > -(T)INFINITY ? mx : (T)0, acc, &cnt);
        T sum = FN(lane_sum)(acc);
        if (cnt > 0 && sum < (T)1e-30) { /* underflow: stabilise with the kept max instead */
            int64_t again = 0;
            mx = -(T)INFINITY;
            for (int k = 0; k < ns; ++k)
                FN(span_max)(s + lo[k], NULL, hi[k] - lo[k], 1, (T)lam1, c, o, &mx, &again);
            for (int l = 0; l < LOSS_LANES; ++l)
                acc[l] = 0;
            for (int k = 0; k < ns; ++k)
                FN(span_sum)(s + lo[k], NULL, hi[k] - lo[k], 1, (T)lam1, c, o,
                             mx > -(T)INFINITY ? mx : (T)0, acc);
            sum = FN(lane_sum)(acc);
        }
        thr_out[r] = lam1;
        kept[r] = cnt;
        if (kind == 0) {
            const T pos = c * s[b->positive[r]];
            const T lse = FN(info_nce_lse)(b, pos, mx, sum, cnt);
            out0[r] = lse - pos;
            out1[r] = lse;
        } else {
            const T stab = mx > -(T)INFINITY ? mx : (T)0;
            out0[r] = cnt > 0 ? stab + LOG_T(sum) - LOG_T((T)cnt) : -(T)INFINITY;
        }
    }
}

/* The fused step over the groups [k0, k1) of g (a group: all rows of one data-set index i).
 * The first pass counts a group's rows against the current lambda_i, taking each row's max
 * along; lambda_i is updated; the second pass sums each row's kept exponentials against the
 * new lambda_i, the rows still in L1/L2. kind 0: InfoNCE (out0 loss, out1 lse); kind 1:
 * SogCLR's log-mean-exp with o = the positive (CLIP); kind 2: the same with o = 0 (out0 the
 * log-mean-exp). thr (R) gets the rows' new lambda. The max over every entry is the stabiliser;
 * when it is so far above the kept entries that their sum underflows, the kept max is taken in
 * a third pass.
 *
 * The groups go in batches of consecutive groups (glofnd_internal_batch_groups): the first
 * passes of a batch, the updates of its lambdas one after the other, then the second passes of
 * the previous batch. An update is a chain of divisions and a square root (~100 cycles): one
 * at a time between the passes, each stalled the core; a batch's updates overlap one another.
 * Each group is still handled by one thread with the same operations: the bytes do not
 * change. */
ISA_ATTR static void FN(fused_groups)(const T *sim, T c, int kind, const glofnd_rows *b,
                                      const int64_t *index, glofnd_state *st,
                                      const glofnd_params *p, const glofnd_grouping *g,
                                      int64_t k0, int64_t k1, T *out0, T *out1, int64_t *kept,
                                      float *thr_out)
{
    const int64_t *order = g->order, *starts = g->starts;
    const int64_t nb = glofnd_internal_batch_groups(b->rows, b->cols * (int64_t)sizeof(T),
                                                    g->ngroups, GLOFND_LOSS_BATCH_BYTES);
    glofnd_bias_memo memo;
    glofnd_bias_memo_init(&memo);
    float lam1[GLOFND_BATCH_MAX]; /* the new lambdas of the previous batch */
    int64_t ids[GLOFND_BATCH_MAX], above[GLOFND_BATCH_MAX], nfin[GLOFND_BATCH_MAX];
    int64_t pk = k0, pn = 0; /* the previous batch: groups pk .. pk + pn - 1 */
    for (int64_t kb = k0;; kb += nb) { /* a last pass with no group ends the last batch */
        const int64_t n = glofnd_internal_take(kb, k1, nb);
        for (int64_t l = 0; l < n; ++l) {
            glofnd_internal_prefetch_group(st, index, g, kb + l + nb + GLOFND_PREFETCH_GROUPS);
            ids[l] = index[order[starts[kb + l]]];
            above[l] = nfin[l] = 0;
            FN(fused_pass1)(sim, c, kind, b, order + starts[kb + l],
                            starts[kb + l + 1] - starts[kb + l], (T)GLOFND_LAMBDA(st, ids[l]),
                            out0, &above[l], &nfin[l]);
        }
        float lam_new[GLOFND_BATCH_MAX];
        for (int64_t l = 0; l < n; ++l)
            lam_new[l] = p->update && nfin[l] > 0
                             ? glofnd_internal_update_one(st, ids[l], above[l], nfin[l], p, &memo)
                             : GLOFND_LAMBDA(st, ids[l]);
        if (nb == 1) { /* a group of 16 KiB or more: its rows would leave L1 while the next
                          * group's first pass runs, and the update is a small part of its time */
            if (n == 1)
                FN(fused_pass2)(sim, c, kind, b, order + starts[kb], starts[kb + 1] - starts[kb],
                                lam_new[0], out0, out1, kept, thr_out);
        } else {
            for (int64_t l = 0; l < pn; ++l)
                FN(fused_pass2)(sim, c, kind, b, order + starts[pk + l],
                                starts[pk + l + 1] - starts[pk + l], lam1[l], out0, out1, kept,
                                thr_out);
            for (int64_t l = 0; l < n; ++l)
                lam1[l] = lam_new[l];
            pk = kb;
            pn = n;
        }
        if (n == 0)
            break;
    }
}

#undef FN
#undef LOSS_CAT
#undef LOSS_CAT_
