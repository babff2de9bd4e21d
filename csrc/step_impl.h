/* Row kernels of the threshold step, instantiated by threshold.c once per similarity type and
 * instruction set. Expects T (element type), SUF (name suffix, e.g. f32_avx2) and ISA_ATTR (a
 * function attribute selecting the instruction set, or nothing) to be defined; no include guard
 * on purpose.
 *
 * Every variant computes the same integers: entries compared with one IEEE `>` against the same
 * T threshold, counted exactly. Only the speed differs between instruction sets.
 *
 * Hot path: the columns of a row are contiguous (col_stride 1) and valid is NULL or has
 * contiguous columns. Its loops are branch-free with 32-bit counters over blocks of
 * GLOFND_BLOCK entries, so the compiler vectorises them (check with -fopt-info-vec), and each
 * block prefetches the next; the second pass over a group's rows reads them from L1/L2, where
 * the first pass left them. Any other
 * layout takes the strided loops, which give the same results. */

#define GLOFND_CAT_(a, b) a##_##b
#define GLOFND_CAT(a, b) GLOFND_CAT_(a, b)
#define FN(name) GLOFND_CAT(name, SUF)

#ifndef GLOFND_ROWS_DEFINED /* else the includer supplies the five contiguous kernels */
/* Counts of a contiguous row without a validity mask: finite entries above lam, and non-finite
 * entries (NaN, +-inf: never valid). x - x is 0 exactly when x is finite. */
ISA_ATTR static inline void FN(count_dense)(const T *restrict s, int64_t cols, T lam,
                                            int64_t *above, int64_t *nan)
{
    for (int64_t j0 = 0; j0 < cols; j0 += GLOFND_BLOCK) {
        const int64_t n = cols - j0 < GLOFND_BLOCK ? cols - j0 : GLOFND_BLOCK;
        const T *restrict x = s + j0;
        prefetch_span(x + GLOFND_BLOCK, sizeof(T) * GLOFND_BLOCK);
        int32_t a = 0, z = 0;
        for (int64_t j = 0; j < n; ++j) {
            const int fin = (x[j] - x[j]) == (T)0;
            a += fin & (x[j] > lam);
            z += !fin;
        }
        *above += a;
        *nan += z;
    }
}

/* Counts of a contiguous row under a contiguous validity row: valid finite entries above lam, and
 * valid finite entries. */
ISA_ATTR static inline void FN(count_valid)(const T *restrict s, const uint8_t *restrict v,
                                            int64_t cols, T lam, int64_t *above, int64_t *nvalid)
{
    for (int64_t j0 = 0; j0 < cols; j0 += GLOFND_BLOCK) {
        const int64_t n = cols - j0 < GLOFND_BLOCK ? cols - j0 : GLOFND_BLOCK;
        const T *restrict x = s + j0;
        prefetch_span(x + GLOFND_BLOCK, sizeof(T) * GLOFND_BLOCK);
        const uint8_t *restrict w = v + j0;
        prefetch_span(w + GLOFND_BLOCK, GLOFND_BLOCK);
        int32_t a = 0, c = 0;
        for (int64_t j = 0; j < n; ++j) {
            const int ok = (w[j] != 0) & ((x[j] - x[j]) == (T)0);
            a += ok & (x[j] > lam);
            c += ok;
        }
        *above += a;
        *nvalid += c;
    }
}

/* Writes the flags of a contiguous row without a validity mask; returns the flagged and
 * non-finite counts through *flagged and *nan. */
ISA_ATTR static inline void FN(mask_dense)(const T *restrict s, int64_t cols, T lam,
                                           uint8_t *restrict out, int64_t *flagged, int64_t *nan)
{
    for (int64_t j0 = 0; j0 < cols; j0 += GLOFND_BLOCK) {
        const int64_t n = cols - j0 < GLOFND_BLOCK ? cols - j0 : GLOFND_BLOCK;
        const T *restrict x = s + j0;
        prefetch_span(x + GLOFND_BLOCK, sizeof(T) * GLOFND_BLOCK);
        uint8_t *restrict o = out + j0;
        int32_t f = 0, z = 0;
        for (int64_t j = 0; j < n; ++j) {
            const int fin = (x[j] - x[j]) == (T)0;
            const uint8_t b = (uint8_t)(fin & (x[j] > lam));
            o[j] = b;
            f += b;
            z += !fin;
        }
        *flagged += f;
        *nan += z;
    }
}

/* Writes the flags of a contiguous row under a contiguous validity row; returns its kept count
 * (valid, finite, not flagged). */
ISA_ATTR static inline int64_t FN(mask_valid)(const T *restrict s, const uint8_t *restrict v,
                                              int64_t cols, T lam, uint8_t *restrict out)
{
    int64_t kept = 0;
    for (int64_t j0 = 0; j0 < cols; j0 += GLOFND_BLOCK) {
        const int64_t n = cols - j0 < GLOFND_BLOCK ? cols - j0 : GLOFND_BLOCK;
        const T *restrict x = s + j0;
        prefetch_span(x + GLOFND_BLOCK, sizeof(T) * GLOFND_BLOCK);
        const uint8_t *restrict w = v + j0;
        prefetch_span(w + GLOFND_BLOCK, GLOFND_BLOCK);
        uint8_t *restrict o = out + j0;
        int32_t k = 0;
        for (int64_t j = 0; j < n; ++j) {
            const int ok = (w[j] != 0) & ((x[j] - x[j]) == (T)0);
            const uint8_t b = (uint8_t)(ok & (x[j] > lam));
            o[j] = b;
            k += ok - b;
        }
        kept += k;
    }
    return kept;
}

/* Writes the flags of a contiguous row without a validity mask that the count pass found all
 * finite; returns the flagged count. */
ISA_ATTR static inline int64_t FN(mask_flags)(const T *restrict s, int64_t cols, T lam,
                                              uint8_t *restrict out)
{
    int64_t flagged = 0;
    for (int64_t j0 = 0; j0 < cols; j0 += GLOFND_BLOCK) {
        const int64_t n = cols - j0 < GLOFND_BLOCK ? cols - j0 : GLOFND_BLOCK;
        const T *restrict x = s + j0;
        uint8_t *restrict o = out + j0;
        int32_t f = 0;
        for (int64_t j = 0; j < n; ++j) {
            const uint8_t b = x[j] > lam;
            o[j] = b;
            f += b;
        }
        flagged += f;
    }
    return flagged;
}
#endif /* GLOFND_ROWS_DEFINED */

/* Any layout: the same counts through element strides. */
ISA_ATTR static void FN(count_strided)(const T *s, int64_t cs, const uint8_t *v, int64_t vcs,
                                       int64_t cols, T lam, int64_t *above, int64_t *nvalid)
{
    int64_t a = 0, c = 0;
    for (int64_t j = 0; j < cols; ++j) {
        const T x = s[j * cs];
        const int ok = (v == NULL || v[j * vcs] != 0) & ((x - x) == (T)0);
        a += ok & (x > lam);
        c += ok;
    }
    *above += a;
    *nvalid += c;
}

/* Any layout: the same flags and kept count through element strides. */
ISA_ATTR static int64_t FN(mask_strided)(const T *s, int64_t cs, const uint8_t *v, int64_t vcs,
                                         int64_t cols, T lam, uint8_t *out)
{
    int64_t kept = 0;
    for (int64_t j = 0; j < cols; ++j) {
        const T x = s[j * cs];
        const int ok = (v == NULL || v[j * vcs] != 0) & ((x - x) == (T)0);
        const uint8_t b = (uint8_t)(ok & (x > lam));
        out[j] = b;
        kept += ok - b;
    }
    return kept;
}

/* Counts of row r, whatever the layout. */
ISA_ATTR static inline void FN(count_row)(const T *sim, const glofnd_batch *b, int64_t r, T lam,
                                          int64_t *above, int64_t *nvalid)
{
    const T *s = sim + r * b->row_stride;
    const int64_t M = b->cols;
    const uint8_t *v = b->valid != NULL ? b->valid + r * b->valid_row_stride : NULL;
    if (b->col_stride == 1 && v == NULL) {
        int64_t nan = 0;
        FN(count_dense)(s, M, lam, above, &nan);
        *nvalid += M - nan;
    } else if (b->col_stride == 1 && b->valid_col_stride == 1) {
        FN(count_valid)(s, v, M, lam, above, nvalid);
    } else {
        FN(count_strided)(s, b->col_stride, v, b->valid_col_stride, M, lam, above, nvalid);
    }
}

/* Flags of row r into mask row r; returns its kept count. */
ISA_ATTR static inline int64_t FN(mask_row)(const T *sim, const glofnd_batch *b, int64_t r, T lam,
                                            uint8_t *mask)
{
    const T *s = sim + r * b->row_stride;
    const int64_t M = b->cols;
    const uint8_t *v = b->valid != NULL ? b->valid + r * b->valid_row_stride : NULL;
    uint8_t *out = mask + r * M;
    if (b->col_stride == 1 && v == NULL) {
        int64_t flagged = 0, nan = 0;
        FN(mask_dense)(s, M, lam, out, &flagged, &nan);
        return M - nan - flagged;
    }
    if (b->col_stride == 1 && b->valid_col_stride == 1)
        return FN(mask_valid)(s, v, M, lam, out);
    return FN(mask_strided)(s, b->col_stride, v, b->valid_col_stride, M, lam, out);
}

/* Flags of row r after the count pass, which left the row's valid count in *kept (and the row
 * in L1/L2): a dense row found all finite needs neither checks nor prefetches here. */
ISA_ATTR static inline void FN(mask_counted_row)(const T *sim, const glofnd_batch *b, int64_t r,
                                                 T lam, uint8_t *mask, int64_t *kept)
{
    if (b->col_stride == 1 && b->valid == NULL && *kept == b->cols)
        *kept -= FN(mask_flags)(sim + r * b->row_stride, b->cols, lam, mask + r * b->cols);
    else
        *kept = FN(mask_row)(sim, b, r, lam, mask);
}

/* One distinct index: pool its rows, update its lambda, then mask its rows (still in cache). */
ISA_ATTR static void FN(do_group)(const void *sim_v, const glofnd_batch *b, glofnd_state *st,
                                  const glofnd_params *p, const int64_t *rows, int64_t nrows,
                                  uint8_t *mask, int64_t *kept)
{
    const T *sim = (const T *)sim_v;
    const int64_t i = b->index[rows[0]];
    if (p->update) {
        int64_t above = 0, nvalid = 0;
        const T lam = (T)GLOFND_LAMBDA(st, i);
        for (int64_t k = 0; k < nrows; ++k) {
            int64_t row_valid = 0;
            FN(count_row)(sim, b, rows[k], lam, &above, &row_valid);
            nvalid += row_valid;
            kept[rows[k]] = row_valid;
        }
        if (nvalid > 0)
            glofnd_internal_update_one(st, i, above, nvalid, p);
        const T lam1 = (T)GLOFND_LAMBDA(st, i);
        for (int64_t k = 0; k < nrows; ++k)
            FN(mask_counted_row)(sim, b, rows[k], lam1, mask, kept + rows[k]);
        return;
    }
    const T lam = (T)GLOFND_LAMBDA(st, i);
    for (int64_t k = 0; k < nrows; ++k)
        kept[rows[k]] = FN(mask_row)(sim, b, rows[k], lam, mask);
}

#undef FN
#undef GLOFND_CAT
#undef GLOFND_CAT_
