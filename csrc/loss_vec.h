/* float32 span loops of the fused InfoNCE in GCC/Clang vector extensions: 16 lanes, one AVX-512
 * register (loss.c includes them for its AVX-512 kernels only). The lanes are explicit, so
 * these loops do the same operations in the same order as the scalar loops of loss_impl.h and
 * give the same bytes. A span's last n < 16 entries go through the same vector code, in lanes
 * 0..n-1 (where the scalar loops add them too), read and written with masked loads and
 * stores, which touch nothing past the span: a row splits into up to three spans at its
 * excluded columns, so these partial blocks are two or three per row, and done one entry at a
 * time they took about a third of the kernels' time at M = 256-512 columns. Included by
 * loss_impl.h for T = float, with FN, ISA_ATTR and LOSS_INLINE defined. */
#ifndef GLOFND_LOSS_VEC_TYPES
#define GLOFND_LOSS_VEC_TYPES
#include <immintrin.h>
#define VL 16
typedef float vf_t __attribute__((vector_size(4 * VL)));
typedef int32_t vi_t __attribute__((vector_size(4 * VL)));
typedef uint32_t vu_t __attribute__((vector_size(4 * VL)));
typedef uint8_t vb_t __attribute__((vector_size(VL)));
#define VSPLAT(x) ((vf_t){0} + (float)(x))
/* where(m, a, b) lane by lane, m all ones or all zeros */
#define VSEL(m, a, b) ((vf_t)(((vi_t)(a) & (m)) | ((vi_t)(b) & ~(m))))
/* all ones in the lanes below n, 0 <= n <= 16 */
#define VLIVE(n) ((vi_t){0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15} < (int32_t)(n))
/* the AVX-512 lane mask of the lanes below n, 0 <= n < 16 */
#define VMASK(n) ((__mmask16)((1u << (n)) - 1u))
#endif

/* Reductions over the 16 lanes in a shuffle tree (4 steps, not a chain of 15), for the
 * results that do not depend on the order: integer counts, the max of lanes that hold no NaN
 * (a lane starts at -inf and takes y only where y > it; a tie of +0 and -0 may resolve either
 * way, and the max is only the stabiliser s - max, which is the same for both), and whether
 * any lane is non-zero. */
ISA_ATTR LOSS_INLINE int64_t FN(vsum_i)(vi_t k)
{
    return (int64_t)_mm512_reduce_add_epi32((__m512i)k);
}

ISA_ATTR LOSS_INLINE float FN(vmax_f)(vf_t m)
{
    return _mm512_reduce_max_ps((__m512)m);
}

/* The sum of the 16 floats at acc in loss_impl.h's lane_sum order: lanes l and l + 8, l and
 * l + 4, l and l + 2, then the last two (each addition is exact to swap, so the bytes match). */
ISA_ATTR LOSS_INLINE float FN(vsum_f)(const float *acc)
{
    const __m512 a = _mm512_loadu_ps(acc);
    const __m512 s8 = _mm512_add_ps(a, _mm512_shuffle_f32x4(a, a, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 s4 = _mm512_add_ps(s8, _mm512_shuffle_f32x4(s8, s8, _MM_SHUFFLE(1, 1, 1, 1)));
    const __m128 x = _mm512_castps512_ps128(s4);
    const __m128 w = _mm_add_ps(x, _mm_permute_ps(x, _MM_SHUFFLE(1, 0, 3, 2)));
    return _mm_cvtss_f32(w) + _mm_cvtss_f32(_mm_permute_ps(w, _MM_SHUFFLE(1, 1, 1, 1)));
}

ISA_ATTR LOSS_INLINE int FN(vany_nonzero)(vf_t z)
{
    return _mm512_cmp_ps_mask((__m512)z, _mm512_setzero_ps(), _CMP_NEQ_UQ) != 0;
}

/* exp_f32 of loss.c lane by lane: the same LOSS_EXP_CORE, so the same bytes. */
ISA_ATTR LOSS_INLINE vf_t FN(vexp)(vf_t x)
{
    const vi_t below = x < -87.33654f, above = x > 88.7f;
    vf_t xc = VSEL(below, VSPLAT(-87.33654f), x);
    xc = VSEL(above, VSPLAT(88.7f), xc);
    LOSS_EXP_CORE(vf_t, VSPLAT, xc, k, p)
    const vu_t sb = ((vu_t)k - 0x4B400000u + 127u) << 23;
    vf_t y = p * (vf_t)sb;
    y = VSEL(below, VSPLAT(0.0f), y);
    y = VSEL(above, VSPLAT(INFINITY), y);
    return VSEL(x != x, x, y);
}

/* The flags of 16 entries: all ones where removed (mode 1: finite and above thr; mode 2: from
 * the removed bytes), all zeros where kept. */
ISA_ATTR LOSS_INLINE vi_t FN(vflag)(vf_t v, const uint8_t *rem, int mode, float thr)
{
    if (mode == 1)
        return (v > thr) & (v != (float)INFINITY);
    if (mode == 2) {
        vb_t b;
        memcpy(&b, rem, sizeof b);
        return __builtin_convertvector(b, vi_t) != 0;
    }
    return (vi_t){0};
}

ISA_ATTR LOSS_INLINE vf_t FN(vload)(const float *x)
{
    vf_t v;
    memcpy(&v, x, sizeof v);
    return v;
}

/* x[0..n), n < 16, in the low lanes and zeros above, read through a masked load. */
ISA_ATTR LOSS_INLINE vf_t FN(vload_n)(const float *x, int64_t n)
{
    return (vf_t)_mm512_maskz_loadu_ps(VMASK(n), x);
}

/* The low n < 16 lanes of v to out[0..n), through a masked store. */
ISA_ATTR LOSS_INLINE void FN(vstore_n)(float *out, vf_t v, int64_t n)
{
    _mm512_mask_storeu_ps(out, VMASK(n), (__m512)v);
}

/* vflag of a partial block of n < 16 entries: the removed bytes through a masked load. */
ISA_ATTR LOSS_INLINE vi_t FN(vflag_n)(vf_t v, const uint8_t *rem, int64_t n, int mode, float thr)
{
    if (mode == 2) {
        const __m128i raw = _mm_maskz_loadu_epi8(VMASK(n), rem);
        vb_t b;
        memcpy(&b, &raw, sizeof b);
        return __builtin_convertvector(b, vi_t) != 0;
    }
    return FN(vflag)(v, rem, mode, thr);
}

/* span_max in blocks of 16, the last one partial: returns the entries done (all). */
ISA_ATTR LOSS_INLINE int64_t FN(vspan_max)(const float *restrict x, const uint8_t *restrict rem,
                                           int64_t n, int mode, float thr, float c, float o,
                                           float *restrict mx, int64_t *cnt)
{
    vf_t m = VSPLAT(-INFINITY);
    vi_t k = (vi_t){0};
    int64_t j = 0;
    for (; j + VL <= n; j += VL) {
        const vf_t v = FN(vload)(x + j);
        const vi_t f = FN(vflag)(v, rem + (mode == 2 ? j : 0), mode, thr);
        const vf_t y = VSEL(f, VSPLAT(-INFINITY), c * (v - o));
        m = VSEL(y > m, y, m);
        k += 1 + f; /* 1 where kept, 0 where removed */
        if ((j & 0xFFFFF) == 0xFFFF0) { /* 32-bit lane counters: flush long rows */
            for (int l = 0; l < VL; ++l)
                *cnt += k[l];
            k = (vi_t){0};
        }
    }
    if (j < n) { /* the last n - j entries; the lanes above are not there, as if removed */
        const vf_t v = FN(vload_n)(x + j, n - j);
        const vi_t f = FN(vflag_n)(v, rem + (mode == 2 ? j : 0), n - j, mode, thr) |
                       ~VLIVE(n - j);
        const vf_t y = VSEL(f, VSPLAT(-INFINITY), c * (v - o));
        m = VSEL(y > m, y, m);
        k += 1 + f;
        j = n;
    }
    const float top = FN(vmax_f)(m);
    *mx = top > *mx ? top : *mx;
    *cnt += FN(vsum_i)(k);
    return j;
}

/* span_sum in blocks of 16, the last one partial, into the lane sums acc. */
ISA_ATTR LOSS_INLINE int64_t FN(vspan_sum)(const float *restrict x, const uint8_t *restrict rem,
                                           int64_t n, int mode, float thr, float c, float o,
                                           float shift,
                                           float *restrict acc)
{
    vf_t a = FN(vload)(acc);
    int64_t j = 0;
    for (; j + VL <= n; j += VL) {
        const vf_t v = FN(vload)(x + j);
        const vi_t f = FN(vflag)(v, rem + (mode == 2 ? j : 0), mode, thr);
        const vf_t e = FN(vexp)(c * (v - o) - shift);
        a += VSEL(f, VSPLAT(0.0f), e);
    }
    if (j < n) { /* the last n - j entries, into lanes 0..n-j-1 (the others keep their sums) */
        const vi_t live = VLIVE(n - j);
        const vf_t v = FN(vload_n)(x + j, n - j);
        const vi_t f = FN(vflag_n)(v, rem + (mode == 2 ? j : 0), n - j, mode, thr);
        const vf_t e = FN(vexp)(c * (v - o) - shift);
        a = VSEL(live, a + VSEL(f, VSPLAT(0.0f), e), a);
        j = n;
    }
    memcpy(acc, &a, sizeof a);
    return j;
}

/* span_grad in blocks of 16, the last one partial. */
ISA_ATTR LOSS_INLINE int64_t FN(vspan_grad)(const float *restrict x, const uint8_t *restrict rem,
                                            int64_t n, int mode, float thr, float c, float shift,
                                            float g, float *restrict out, float *restrict acc)
{
    vf_t a = acc != NULL ? FN(vload)(acc) : VSPLAT(0.0f);
    int64_t j = 0;
    for (; j + VL <= n; j += VL) {
        const vf_t v = FN(vload)(x + j);
        const vi_t f = FN(vflag)(v, rem + (mode == 2 ? j : 0), mode, thr);
        const vf_t e = VSEL(f, VSPLAT(0.0f), g * FN(vexp)(c * v - shift));
        const vf_t o = c * e;
        memcpy(out + j, &o, sizeof o);
        a += e * v;
    }
    if (j < n) { /* the last n - j entries, into lanes 0..n-j-1 */
        const vi_t live = VLIVE(n - j);
        const vf_t v = FN(vload_n)(x + j, n - j);
        const vi_t f = FN(vflag_n)(v, rem + (mode == 2 ? j : 0), n - j, mode, thr);
        const vf_t e = VSEL(f, VSPLAT(0.0f), g * FN(vexp)(c * v - shift));
        FN(vstore_n)(out + j, c * e, n - j);
        a = VSEL(live, a + e * v, a);
        j = n;
    }
    if (acc != NULL)
        memcpy(acc, &a, sizeof a);
    return j;
}

/* span_wsum in blocks of 16, the last one partial. */
ISA_ATTR LOSS_INLINE int64_t FN(vspan_wsum)(const float *restrict x, const uint8_t *restrict rem,
                                            int64_t n, int mode, float thr, float c, float o,
                                            float shift, float *restrict acc)
{
    vf_t a = FN(vload)(acc);
    int64_t j = 0;
    for (; j + VL <= n; j += VL) {
        const vf_t v = FN(vload)(x + j);
        const vi_t f = FN(vflag)(v, rem + (mode == 2 ? j : 0), mode, thr);
        const vf_t d = v - o;
        const vf_t e = FN(vexp)(c * d - shift);
        a += VSEL(f, VSPLAT(0.0f), e * d);
    }
    if (j < n) { /* the last n - j entries, into lanes 0..n-j-1 */
        const vi_t live = VLIVE(n - j);
        const vf_t v = FN(vload_n)(x + j, n - j);
        const vi_t f = FN(vflag_n)(v, rem + (mode == 2 ? j : 0), n - j, mode, thr);
        const vf_t d = v - o;
        const vf_t e = FN(vexp)(c * d - shift);
        a = VSEL(live, a + VSEL(f, VSPLAT(0.0f), e * d), a);
        j = n;
    }
    memcpy(acc, &a, sizeof a);
    return j;
}

/* span_gsum in blocks of 16, the last one partial. */
ISA_ATTR LOSS_INLINE int64_t FN(vspan_gsum)(const float *restrict x, const uint8_t *restrict rem,
                                            int64_t n, int mode, float thr, float c, float o,
                                            float shift, float g, float *restrict out,
                                            float *restrict acc)
{
    vf_t a = FN(vload)(acc);
    int64_t j = 0;
    for (; j + VL <= n; j += VL) {
        const vf_t v = FN(vload)(x + j);
        const vi_t f = FN(vflag)(v, rem + (mode == 2 ? j : 0), mode, thr);
        const vf_t e = VSEL(f, VSPLAT(0.0f), g * FN(vexp)(c * (v - o) - shift));
        memcpy(out + j, &e, sizeof e);
        a += e;
    }
    if (j < n) { /* the last n - j entries, into lanes 0..n-j-1 */
        const vi_t live = VLIVE(n - j);
        const vf_t v = FN(vload_n)(x + j, n - j);
        const vi_t f = FN(vflag_n)(v, rem + (mode == 2 ? j : 0), n - j, mode, thr);
        const vf_t e = VSEL(f, VSPLAT(0.0f), g * FN(vexp)(c * (v - o) - shift));
        FN(vstore_n)(out + j, e, n - j);
        a = VSEL(live, a + e, a);
        j = n;
    }
    memcpy(acc, &a, sizeof a);
    return j;
}

/* span_pass1 in blocks of 16, the last one partial. Non-finite entries are rare: the loop only
 * notes whether one occurred (x - x is NaN exactly for them) and counts x > lam; when one did,
 * the counts of the span are redone exactly by a scalar loop (the max is right either way). */
ISA_ATTR LOSS_INLINE int64_t FN(vspan_pass1)(const float *restrict x, int64_t n, float c, float o,
                                             float lam, float *mx, int64_t *above, int64_t *nfin)
{
    vf_t m = VSPLAT(-INFINITY), z = VSPLAT(0.0f);
    vi_t a = (vi_t){0};
    int64_t j = 0, a_total = 0;
    for (; j + VL <= n; j += VL) {
        const vf_t v = FN(vload)(x + j);
        const vf_t y = c * (v - o);
        m = VSEL(y > m, y, m);
        a -= v > lam;
        z += v - v;
        if ((j & 0xFFFFF) == 0xFFFF0) { /* 32-bit lane counters: flush long rows */
            for (int l = 0; l < VL; ++l)
                a_total += a[l];
            a = (vi_t){0};
        }
    }
    if (j < n) { /* the last n - j entries (zeros in the lanes above: finite, not counted) */
        const vi_t live = VLIVE(n - j);
        const vf_t v = FN(vload_n)(x + j, n - j);
        const vf_t y = c * (v - o);
        m = VSEL(live & (y > m), y, m);
        a -= live & (v > lam);
        z += v - v;
        j = n;
    }
    const float top = FN(vmax_f)(m);
    *mx = top > *mx ? top : *mx;
    a_total += FN(vsum_i)(a);
    if (!FN(vany_nonzero)(z)) { /* all finite: x - x is 0 in every lane */
        *above += a_total;
        *nfin += j;
    } else {
        for (int64_t q = 0; q < j; ++q) {
            *above += (x[q] > lam) & (x[q] != INFINITY);
            *nfin += (x[q] - x[q]) == 0.0f;
        }
    }
    return j;
}

/* span_sumc in blocks of 16, the last one partial. */
ISA_ATTR LOSS_INLINE int64_t FN(vspan_sumc)(const float *restrict x, int64_t n, float thr, float c,
                                            float o, float shift, float *restrict acc,
                                            int64_t *cnt)
{
    vf_t a = FN(vload)(acc);
    vi_t k = (vi_t){0};
    int64_t j = 0;
    for (; j + VL <= n; j += VL) {
        const vf_t v = FN(vload)(x + j);
        const vi_t f = (v > thr) & (v != (float)INFINITY);
        const vf_t e = FN(vexp)(c * (v - o) - shift);
        a += VSEL(f, VSPLAT(0.0f), e);
        k += 1 + f;
        if ((j & 0xFFFFF) == 0xFFFF0) {
            for (int l = 0; l < VL; ++l)
                *cnt += k[l];
            k = (vi_t){0};
        }
    }
    if (j < n) { /* the last n - j entries, into lanes 0..n-j-1 */
        const vi_t live = VLIVE(n - j);
        const vf_t v = FN(vload_n)(x + j, n - j);
        const vi_t f = ((v > thr) & (v != (float)INFINITY)) | ~live;
        const vf_t e = FN(vexp)(c * (v - o) - shift);
        a = VSEL(live, a + VSEL(f, VSPLAT(0.0f), e), a);
        k += 1 + f;
        j = n;
    }
    *cnt += FN(vsum_i)(k);
    memcpy(acc, &a, sizeof a);
    return j;
}
