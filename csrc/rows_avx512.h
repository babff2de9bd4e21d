/* AVX-512 (F, BW, VL) row kernels for float32, included by threshold.c on x86-64 with GCC or
 * Clang and used only when the CPU has these extensions (checked at run time).
 *
 * They replace the portable contiguous loops of step_impl.h (count_dense, count_valid,
 * mask_dense, mask_valid, mask_flags) for T = float and must compute the
 * same integers: each entry is compared once with `>` against the same float threshold. 64
 * entries per iteration: four 16-lane compares are joined into one 64-bit mask, counted with
 * popcnt and, for the mask, expanded to 0/1 bytes with one masked byte move; the dense counts
 * (count_dense, count_flags) add the compares' lanes into vector counters instead, with fewer
 * instructions per entry. Non-finite entries (NaN, +-inf: never valid) are rare: the loops only
 * note whether one occurred (x - x, or x * 0 + acc, is NaN exactly for them), and a row that had
 * one is redone exactly by the scalar loops. Tails use masked loads and stores. */
#include <immintrin.h>

#define AVX512_ATTR __attribute__((target("avx512f,avx512bw,avx512vl,popcnt")))

/* The 64 floats (4 cache lines) pf ahead of x (GLOFND_PREFETCH_FLOATS, or the batched count
 * loop's prefetch_distance): the hardware prefetchers leave a single core short of the memory
 * bandwidth on these short row streams (measured on one core: B = 2048 from 3.7 to 3.0-3.2 ms,
 * B = 512 from ~98 to ~88 us). Past the row's end this fetches the next rows, which are the
 * next group's; a prefetch never faults. */
static inline void prefetch_floats(const float *x, int64_t pf)
{
    const char *p = (const char *)(x + pf);
    _mm_prefetch(p, _MM_HINT_T0);
    _mm_prefetch(p + 64, _MM_HINT_T0);
    _mm_prefetch(p + 128, _MM_HINT_T0);
    _mm_prefetch(p + 192, _MM_HINT_T0);
}

/* The first n lanes, 0 <= n <= 16. */
static inline __mmask16 lanes16(int64_t n)
{
    return (__mmask16)(n >= 16 ? 0xFFFFu : (1u << n) - 1u);
}

AVX512_ATTR static inline int64_t popcount64(__mmask64 k)
{
    return (int64_t)__builtin_popcountll(_cvtmask64_u64(k));
}

AVX512_ATTR static inline int64_t popcount16(__mmask16 k)
{
    return (int64_t)__builtin_popcount(_cvtmask16_u32(k));
}

/* Bits of x[0..64) > lam; *nan gains a bit where a pair of lanes holds a non-finite value. */
AVX512_ATTR static inline __mmask64 gt64(const float *x, __m512 vl, __mmask16 *nan)
{
    const __m512 a = _mm512_loadu_ps(x), b = _mm512_loadu_ps(x + 16);
    const __m512 c = _mm512_loadu_ps(x + 32), d = _mm512_loadu_ps(x + 48);
    *nan |= _mm512_cmp_ps_mask(_mm512_sub_ps(a, a), _mm512_sub_ps(b, b), _CMP_UNORD_Q) |
            _mm512_cmp_ps_mask(_mm512_sub_ps(c, c), _mm512_sub_ps(d, d), _CMP_UNORD_Q);
    const __mmask32 lo = _mm512_kunpackw(_mm512_cmp_ps_mask(b, vl, _CMP_GT_OQ),
                                         _mm512_cmp_ps_mask(a, vl, _CMP_GT_OQ));
    const __mmask32 hi = _mm512_kunpackw(_mm512_cmp_ps_mask(d, vl, _CMP_GT_OQ),
                                         _mm512_cmp_ps_mask(c, vl, _CMP_GT_OQ));
    return _mm512_kunpackd(hi, lo);
}

/* Bits of x[0..64) > lam, for a row known to be finite. */
AVX512_ATTR static inline __mmask64 gt64_finite(const float *x, __m512 vl)
{
    const __mmask32 lo =
        _mm512_kunpackw(_mm512_cmp_ps_mask(_mm512_loadu_ps(x + 16), vl, _CMP_GT_OQ),
                        _mm512_cmp_ps_mask(_mm512_loadu_ps(x), vl, _CMP_GT_OQ));
    const __mmask32 hi =
        _mm512_kunpackw(_mm512_cmp_ps_mask(_mm512_loadu_ps(x + 48), vl, _CMP_GT_OQ),
                        _mm512_cmp_ps_mask(_mm512_loadu_ps(x + 32), vl, _CMP_GT_OQ));
    return _mm512_kunpackd(hi, lo);
}

/* Bits of the n < 64 entries x[0..n) > lam, through masked loads. */
AVX512_ATTR static inline __mmask64 gt_tail(const float *x, int64_t n, __m512 vl,
                                            __mmask16 *nan)
{
    uint64_t bits = 0;
    for (int64_t j = 0; j < n; j += 16) {
        const __mmask16 m = lanes16(n - j);
        const __m512 a = _mm512_maskz_loadu_ps(m, x + j);
        const __m512 z = _mm512_sub_ps(a, a);
        *nan |= _mm512_mask_cmp_ps_mask(m, z, z, _CMP_UNORD_Q);
        bits |= (uint64_t)_cvtmask16_u32(_mm512_mask_cmp_ps_mask(m, a, vl, _CMP_GT_OQ)) << j;
    }
    return _cvtu64_mask64(bits);
}

/* Entries of x before its first 64-byte boundary, at most n. NumPy's allocator aligns to 16
 * bytes: with such a sim every 64-byte load of the batched count loop read two cache lines,
 * and the step took 17% longer at B = 512 (78 -> 92 us); that loop takes these entries
 * through masked loads first (86 us). */
static inline int64_t head_floats(const float *x, int64_t n)
{
    const int64_t h = (int64_t)((64 - ((uintptr_t)x & 63)) & 63) / (int64_t)sizeof(float);
    return h < n ? h : n;
}

/* Flags of the n < 64 entries x[0..n) (finite) against vl into out; returns their count. */
AVX512_ATTR static inline int64_t flags_part(const float *x, int64_t n, __m512 vl, uint8_t *out)
{
    __mmask16 ignored = 0;
    const __mmask64 k = gt_tail(x, n, vl, &ignored);
    _mm512_mask_storeu_epi8(out, ((__mmask64)1 << n) - 1,
                            _mm512_maskz_mov_epi8(k, _mm512_set1_epi8(1)));
    return popcount64(k);
}

/* Valid bits of w[0..n), n <= 64: bytes that are not 0. */
AVX512_ATTR static inline __mmask64 valid_bits(const uint8_t *w, int64_t n)
{
    const __mmask64 m = n >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << n) - 1);
    const __m512i v = _mm512_maskz_loadu_epi8(m, w);
    return _mm512_test_epi8_mask(v, v);
}

/* Exact counts of a row that holds a non-finite value (rare): entries valid (w[j] != 0, or all
 * when w is NULL) and finite, those of them above lam, and, with out, their flags. */
static void exact_row_f32(const float *x, const uint8_t *w, int64_t n, float lam, uint8_t *out,
                          int64_t *above, int64_t *ok)
{
    int64_t a = 0, c = 0;
    for (int64_t j = 0; j < n; ++j) {
        const int v = (w == NULL || w[j] != 0) & ((x[j] - x[j]) == 0.0f);
        const uint8_t f = (uint8_t)(v & (x[j] > lam));
        if (out != NULL)
            out[j] = f;
        a += f;
        c += v;
    }
    *above = a;
    *ok = c;
}

/* Entries of row xc above lam and, with `flags` (a literal, so that each caller compiles its
 * own loop), the flags of row xm (all finite) against lam1 into out, in one loop: the count
 * reads its row from L2/L3 or memory and leaves the core's units idle, the flags read theirs
 * from L1/L2 and keep them busy. The count adds the compares' lanes into 32-bit lane counters
 * (reduced every 2^24 blocks of 64, far below their range); a lane of the accumulators fin
 * turns NaN when it meets a non-finite entry (x * 0 is NaN exactly for NaN and +-inf, and a
 * NaN stays in the sum), and the row is then counted exactly. Returns the flagged count.
 * Plain inline: marked always_inline, GCC 12 compiled its prefetches away (4% slower at
 * B = 512), as it did with prefetch_state in threshold.c. */
#define COUNT64_BLOCK ((int64_t)64 << 24)
AVX512_ATTR static inline int64_t
count_flags_body(const float *xc, float lam, const float *xm, float lam1, uint8_t *out,
                 int64_t n, int64_t pf, int flags, int64_t *above, int64_t *nan)
{
    const __m512 vc = _mm512_set1_ps(lam), vm = _mm512_set1_ps(lam1), z = _mm512_setzero_ps();
    const __m512i one = _mm512_set1_epi8(1), one32 = _mm512_set1_epi32(1);
    __m512 f0 = z, f1 = z, f2 = z, f3 = z;
    __mmask16 bad = 0;
    int64_t a = 0, f = 0;
    const int64_t h = head_floats(xc, n), n64 = h + ((n - h) & ~(int64_t)63);
    if (h > 0) {
        a += popcount64(gt_tail(xc, h, vc, &bad));
        if (flags)
            f += flags_part(xm, h, vm, out);
    }
    for (int64_t j0 = h; j0 < n64; j0 += COUNT64_BLOCK) {
        const int64_t j1 = n64 - j0 < COUNT64_BLOCK ? n64 : j0 + COUNT64_BLOCK;
        __m512i c0 = _mm512_setzero_si512(), c1 = c0;
        for (int64_t j = j0; j < j1; j += 64) {
            prefetch_floats(xc + j, pf);
            const __m512 v0 = _mm512_loadu_ps(xc + j), v1 = _mm512_loadu_ps(xc + j + 16);
            const __m512 v2 = _mm512_loadu_ps(xc + j + 32), v3 = _mm512_loadu_ps(xc + j + 48);
            f0 = _mm512_fmadd_ps(v0, z, f0);
            f1 = _mm512_fmadd_ps(v1, z, f1);
            f2 = _mm512_fmadd_ps(v2, z, f2);
            f3 = _mm512_fmadd_ps(v3, z, f3);
            c0 = _mm512_mask_add_epi32(c0, _mm512_cmp_ps_mask(v0, vc, _CMP_GT_OQ), c0, one32);
            c1 = _mm512_mask_add_epi32(c1, _mm512_cmp_ps_mask(v1, vc, _CMP_GT_OQ), c1, one32);
            c0 = _mm512_mask_add_epi32(c0, _mm512_cmp_ps_mask(v2, vc, _CMP_GT_OQ), c0, one32);
            c1 = _mm512_mask_add_epi32(c1, _mm512_cmp_ps_mask(v3, vc, _CMP_GT_OQ), c1, one32);
            if (flags) {
                const __mmask64 k = gt64_finite(xm + j, vm);
                _mm512_storeu_si512((void *)(out + j), _mm512_maskz_mov_epi8(k, one));
                f += popcount64(k);
            }
        }
        a += (int64_t)_mm512_reduce_add_epi32(_mm512_add_epi32(c0, c1));
    }
    if (n64 < n) {
        a += popcount64(gt_tail(xc + n64, n - n64, vc, &bad));
        if (flags)
            f += flags_part(xm + n64, n - n64, vm, out + n64);
    }
    const __m512 s = _mm512_add_ps(_mm512_add_ps(f0, f1), _mm512_add_ps(f2, f3));
    if (bad || _mm512_cmp_ps_mask(s, s, _CMP_UNORD_Q) != 0) {
        int64_t ok;
        exact_row_f32(xc, NULL, n, lam, NULL, &a, &ok);
        *nan += n - ok;
    }
    *above += a;
    return f;
}

AVX512_ATTR static void count_dense_f32_avx512(const float *x, int64_t n, float lam,
                                               int64_t *above, int64_t *nan)
{
    (void)count_flags_body(x, lam, NULL, 0.0f, NULL, n, GLOFND_PREFETCH_FLOATS, 0, above, nan);
}

AVX512_ATTR static void count_valid_f32_avx512(const float *x, const uint8_t *w, int64_t n,
                                               float lam, int64_t *above, int64_t *nvalid)
{
    const __m512 vl = _mm512_set1_ps(lam);
    __mmask16 bad = 0;
    int64_t a = 0, c = 0;
    for (int64_t j = 0; j < n; j += 64) {
        const int64_t len = n - j < 64 ? n - j : 64;
        prefetch_floats(x + j, GLOFND_PREFETCH_FLOATS);
        _mm_prefetch((const char *)(w + j + GLOFND_PREFETCH_FLOATS), _MM_HINT_T0);
        const __mmask64 kv = valid_bits(w + j, len);
        const __mmask64 kg = len == 64 ? gt64(x + j, vl, &bad) : gt_tail(x + j, len, vl, &bad);
        a += popcount64(kg & kv);
        c += popcount64(kv);
    }
    if (bad)
        exact_row_f32(x, w, n, lam, NULL, &a, &c);
    *above += a;
    *nvalid += c;
}

AVX512_ATTR static void mask_dense_f32_avx512(const float *x, int64_t n, float lam, uint8_t *out,
                                              int64_t *flagged, int64_t *nan)
{
    const __m512 vl = _mm512_set1_ps(lam);
    const __m512i one = _mm512_set1_epi8(1);
    __mmask16 bad = 0;
    int64_t f = 0, j = 0;
    for (; j + 64 <= n; j += 64) {
        prefetch_floats(x + j, GLOFND_PREFETCH_FLOATS);
        const __mmask64 k = gt64(x + j, vl, &bad);
        _mm512_storeu_si512((void *)(out + j), _mm512_maskz_mov_epi8(k, one));
        f += popcount64(k);
    }
    if (j < n) {
        const __mmask64 k = gt_tail(x + j, n - j, vl, &bad);
        const __mmask64 m = ((__mmask64)1 << (n - j)) - 1;
        _mm512_mask_storeu_epi8(out + j, m, _mm512_maskz_mov_epi8(k, one));
        f += popcount64(k);
    }
    if (bad) {
        int64_t ok;
        exact_row_f32(x, NULL, n, lam, out, &f, &ok);
        *nan += n - ok;
    }
    *flagged += f;
}

/* The flags only, for a row the count pass has just read (in L1/L2) and found all finite. */
AVX512_ATTR static int64_t mask_flags_f32_avx512(const float *x, int64_t n, float lam,
                                                 uint8_t *out)
{
    const __m512 vl = _mm512_set1_ps(lam);
    const __m512i one = _mm512_set1_epi8(1);
    int64_t f = 0, j = 0;
    for (; j + 64 <= n; j += 64) {
        const __mmask64 k = gt64_finite(x + j, vl);
        _mm512_storeu_si512((void *)(out + j), _mm512_maskz_mov_epi8(k, one));
        f += popcount64(k);
    }
    if (j < n) {
        __mmask16 ignored = 0;
        const __mmask64 k = gt_tail(x + j, n - j, vl, &ignored);
        const __mmask64 m = ((__mmask64)1 << (n - j)) - 1;
        _mm512_mask_storeu_epi8(out + j, m, _mm512_maskz_mov_epi8(k, one));
        f += popcount64(k);
    }
    return f;
}

/* count_dense_f32_avx512 of row xc against lam and mask_flags_f32_avx512 of row xm (all
 * finite) against lam1, in one loop (count_flags_body), prefetching xc pf floats ahead; returns
 * the flagged count of xm. */
AVX512_ATTR static int64_t count_flags_f32_avx512(const float *xc, float lam, const float *xm,
                                                  float lam1, uint8_t *out, int64_t n,
                                                  int64_t pf, int64_t *above, int64_t *nan)
{
    return count_flags_body(xc, lam, xm, lam1, out, n, pf, 1, above, nan);
}

AVX512_ATTR static int64_t mask_valid_f32_avx512(const float *x, const uint8_t *w, int64_t n,
                                                 float lam, uint8_t *out)
{
    const __m512 vl = _mm512_set1_ps(lam);
    const __m512i one = _mm512_set1_epi8(1);
    __mmask16 bad = 0;
    int64_t f = 0, c = 0;
    for (int64_t j = 0; j < n; j += 64) {
        const int64_t len = n - j < 64 ? n - j : 64;
        prefetch_floats(x + j, GLOFND_PREFETCH_FLOATS);
        _mm_prefetch((const char *)(w + j + GLOFND_PREFETCH_FLOATS), _MM_HINT_T0);
        const __mmask64 kv = valid_bits(w + j, len);
        const __mmask64 kg = len == 64 ? gt64(x + j, vl, &bad) : gt_tail(x + j, len, vl, &bad);
        const __mmask64 k = kg & kv;
        const __mmask64 m = len == 64 ? ~(__mmask64)0 : (((__mmask64)1 << len) - 1);
        _mm512_mask_storeu_epi8(out + j, m, _mm512_maskz_mov_epi8(k, one));
        f += popcount64(k);
        c += popcount64(kv);
    }
    if (bad)
        exact_row_f32(x, w, n, lam, out, &f, &c);
    return c - f;
}

/* The whole-matrix loops of the threshold step on small matrices (threshold.c, flat_step_f32):
 * every row of a dense float32 matrix (R rows of M entries, row stride rs floats), in memory
 * order, row r against lam[gid[r]]. Counting with popcounts and one non-finite test for the
 * whole matrix, instead of a call, a reduction and a test per row, is what makes them faster
 * than the per-row kernels when rows are short.
 *
 * Counts of the rows, added to above[gid[r]]; returns 0 when an entry may not be finite (x + y
 * overflowing also says so): the counts are then not to be used. */
AVX512_ATTR static int count_all_f32_avx512(const float *sim, int64_t R, int64_t M, int64_t rs,
                                           const int64_t *gid, const float *lam, int64_t *above)
{
    const __m512 z = _mm512_setzero_ps();
    __m512 f0 = z, f1 = z;
    __mmask16 bad = 0;
    const int64_t n64 = M & ~(int64_t)63;
    for (int64_t r = 0; r < R; ++r) {
        const float *x = sim + r * rs;
        const __m512 vl = _mm512_set1_ps(lam[gid[r]]);
        int64_t a = 0;
        for (int64_t j = 0; j < n64; j += 64) {
            __m512 v0 = _mm512_loadu_ps(x + j), v1 = _mm512_loadu_ps(x + j + 16);
            __m512 v2 = _mm512_loadu_ps(x + j + 32), v3 = _mm512_loadu_ps(x + j + 48);
            /* in registers: GCC otherwise folds the loads into the sums and loads each vector
             * again for its compare (8 loads for 4; B = 128 took 5.96 us, 5.61 with this) */
            __asm__("" : "+v"(v0), "+v"(v1), "+v"(v2), "+v"(v3));
            f0 = _mm512_fmadd_ps(_mm512_add_ps(v0, v1), z, f0);
            f1 = _mm512_fmadd_ps(_mm512_add_ps(v2, v3), z, f1);
            const __mmask32 lo = _mm512_kunpackw(_mm512_cmp_ps_mask(v1, vl, _CMP_GT_OQ),
                                                 _mm512_cmp_ps_mask(v0, vl, _CMP_GT_OQ));
            const __mmask32 hi = _mm512_kunpackw(_mm512_cmp_ps_mask(v3, vl, _CMP_GT_OQ),
                                                 _mm512_cmp_ps_mask(v2, vl, _CMP_GT_OQ));
            a += popcount64(_mm512_kunpackd(hi, lo));
        }
        if (n64 < M)
            a += popcount64(gt_tail(x + n64, M - n64, vl, &bad));
        above[gid[r]] += a;
    }
    const __m512 s = _mm512_add_ps(f0, f1);
    return !bad && _mm512_cmp_ps_mask(s, s, _CMP_UNORD_Q) == 0;
}

/* Flags of every row (all finite) against lam[gid[r]] into mask (R rows of M bytes);
 * kept[r] = M - flagged. */
AVX512_ATTR static void flags_all_f32_avx512(const float *sim, int64_t R, int64_t M, int64_t rs,
                                            const int64_t *gid, const float *lam, uint8_t *mask,
                                            int64_t *kept)
{
    for (int64_t r = 0; r < R; ++r)
        kept[r] = M - mask_flags_f32_avx512(sim + r * rs, M, lam[gid[r]], mask + r * M);
}

#undef AVX512_ATTR
