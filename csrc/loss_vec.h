/* float32 span loops of the fused InfoNCE in GCC/Clang vector extensions: 16 lanes, lowered to
 * whatever the instruction set of the including function offers (4 SSE, 2 AVX2 or 1 AVX-512
 * registers). The lanes are explicit, so every instruction set does the same operations in the
 * same order and gives the same bytes. Included by loss_impl.h for T = float, with FN, ISA_ATTR
 * and LOSS_INLINE defined; the scalar loops of loss_impl.h finish the tails. */
#ifndef GLOFND_LOSS_VEC_TYPES
#define GLOFND_LOSS_VEC_TYPES
#define VL 16
typedef float vf_t __attribute__((vector_size(4 * VL)));
typedef int32_t vi_t __attribute__((vector_size(4 * VL)));
typedef uint32_t vu_t __attribute__((vector_size(4 * VL)));
typedef uint8_t vb_t __attribute__((vector_size(VL)));
#define VSPLAT(x) ((vf_t){0} + (float)(x))
/* where(m, a, b) lane by lane, m all ones or all zeros */
#define VSEL(m, a, b) ((vf_t)(((vi_t)(a) & (m)) | ((vi_t)(b) & ~(m))))
#endif

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

/* span_max over whole blocks of 16: returns the entries done. */
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
    float out = *mx;
    for (int l = 0; l < VL; ++l) {
        out = m[l] > out ? m[l] : out;
        *cnt += k[l];
    }
    *mx = out;
    return j;
}

/* span_sum over whole blocks of 16, into the lane sums acc. */
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
    memcpy(acc, &a, sizeof a);
    return j;
}

/* span_grad over whole blocks of 16. */
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
    if (acc != NULL)
        memcpy(acc, &a, sizeof a);
    return j;
}

/* span_wsum over whole blocks of 16. */
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
    memcpy(acc, &a, sizeof a);
    return j;
}

/* span_gsum over whole blocks of 16. */
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
    memcpy(acc, &a, sizeof a);
    return j;
}

/* span_pass1 over whole blocks of 16. Non-finite entries are rare: the loop only notes whether
 * one occurred (x - x is NaN exactly for them) and counts x > lam; when one did, the counts of
 * the blocks are redone exactly by the scalar loop (the max is right either way). */
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
    float out = *mx, zs = 0.0f;
    for (int l = 0; l < VL; ++l) {
        out = m[l] > out ? m[l] : out;
        a_total += a[l];
        zs += z[l];
    }
    *mx = out;
    if (zs == 0.0f) { /* all finite */
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

/* span_sumc over whole blocks of 16. */
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
    for (int l = 0; l < VL; ++l)
        *cnt += k[l];
    memcpy(acc, &a, sizeof a);
    return j;
}
