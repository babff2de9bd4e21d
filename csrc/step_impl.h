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

/* count_dense of row xc against lam, then mask_flags of row xm (all finite) against lam1; the
 * AVX-512 version runs both in one loop, prefetching xc pf elements ahead. */
ISA_ATTR static inline int64_t FN(count_flags)(const T *restrict xc, T lam, const T *restrict xm,
                                               T lam1, uint8_t *restrict out, int64_t cols,
                                               int64_t pf, int64_t *above, int64_t *nan)
{
    (void)pf;
    FN(count_dense)(xc, cols, lam, above, nan);
    return FN(mask_flags)(xm, cols, lam1, out);
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

/* Counts row r against lam: its valid count into kept[r], the counts added to *above and
 * *nvalid (its group's). */
ISA_ATTR static void FN(count_kept_row)(const T *sim, const glofnd_batch *b, int64_t r, T lam,
                                        int64_t *above, int64_t *nvalid, int64_t *kept)
{
    int64_t row_valid = 0;
    FN(count_row)(sim, b, r, lam, above, &row_valid);
    *nvalid += row_valid;
    kept[r] = row_valid;
}

/* Counts row rc against lam (its valid count into kept, the counts added to *above and
 * *nvalid) and masks the counted row rm against lam1: for dense rows, in one loop, which
 * prefetches pf elements ahead (prefetch_distance). */
ISA_ATTR static inline void FN(count_mask_row)(const T *sim, const glofnd_batch *b, int64_t rc,
                                               T lam, int64_t *above, int64_t *nvalid,
                                               int64_t rm, T lam1, uint8_t *mask,
                                               int64_t *kept, int64_t pf)
{
    const int64_t M = b->cols;
    if (b->col_stride == 1 && b->valid == NULL && kept[rm] == M) {
        int64_t nan = 0;
        const int64_t flagged = FN(count_flags)(sim + rc * b->row_stride, lam,
                                                sim + rm * b->row_stride, lam1, mask + rm * M,
                                                M, pf, above, &nan);
        kept[rc] = M - nan;
        *nvalid += M - nan;
        kept[rm] = M - flagged;
        return;
    }
    FN(count_kept_row)(sim, b, rc, lam, above, nvalid, kept);
    FN(mask_counted_row)(sim, b, rm, lam1, mask, kept + rm);
}

/* The groups [k0, k1) of g, in batches of consecutive groups (glofnd_internal_batch_groups).
 * The rows of a batch are counted against their groups' current lambdas while the rows of the
 * previous batch, still in L1/L2, are masked against their new ones, in one loop where a row
 * read from farther away (counting) and one from L1/L2 (masking) share the cycles; then the
 * batch's lambdas are updated, one update after the other. An update is a chain of divisions and
 * a square root (~100 cycles): one at a time between the loops, each stalled the core (measured
 * at B = 128: 20 ns per group against 7 ns for independent updates back to back); a batch's
 * updates overlap one another. Each group is still handled by one thread with the same
 * operations: the bytes do not change. */
ISA_ATTR static void FN(run_groups)(const void *sim_v, const glofnd_batch *b, glofnd_state *st,
                                    const glofnd_params *p, const glofnd_grouping *g,
                                    int64_t k0, int64_t k1, uint8_t *mask, int64_t *kept)
{
    const T *sim = (const T *)sim_v;
    const int64_t *order = g->order, *starts = g->starts;
    if (!p->update) {
        for (int64_t k = k0; k < k1; ++k) {
            const int64_t *rows = order + starts[k];
            const T lam = (T)GLOFND_LAMBDA(st, b->index[rows[0]]);
            for (int64_t q = 0; q < starts[k + 1] - starts[k]; ++q)
                kept[rows[q]] = FN(mask_row)(sim, b, rows[q], lam, mask);
        }
        return;
    }
    const int64_t nb = glofnd_internal_batch_groups(b->rows, b->cols * (int64_t)sizeof(T),
                                                    g->ngroups, GLOFND_STEP_BATCH_BYTES);
    const int64_t pf = prefetch_distance(b, sizeof(T));
    glofnd_bias_memo memo;
    glofnd_bias_memo_init(&memo);
    int64_t ids[GLOFND_BATCH_MAX], above[GLOFND_BATCH_MAX], nvalid[GLOFND_BATCH_MAX];
    float lam[GLOFND_BATCH_MAX], lam1[GLOFND_BATCH_MAX]; /* this batch's, the previous one's */
    int64_t pk = k0, pn = 0; /* the previous batch: groups pk .. pk + pn - 1 */
    for (int64_t kb = k0;; kb += nb) { /* a last pass with no group masks the last batch */
        const int64_t n = glofnd_internal_take(kb, k1, nb);
        for (int64_t l = 0; l < n; ++l) {
            glofnd_internal_prefetch_group(st, b->index, g, kb + l + nb + GLOFND_PREFETCH_GROUPS);
            ids[l] = b->index[order[starts[kb + l]]];
            lam[l] = GLOFND_LAMBDA(st, ids[l]);
            above[l] = nvalid[l] = 0;
        }
        /* rows q of this batch with rows mq of the previous one, row for row */
        const int64_t kc = kb < k1 ? kb : k1;
        int64_t q = starts[kc], mq = starts[pk], l = 0, ml = 0;
        const int64_t qend = starts[kc + n], mend = starts[pk + pn];
        for (; q < qend; ++q) {
            while (starts[kb + l + 1] <= q)
                ++l;
            if (mq < mend) {
                while (starts[pk + ml + 1] <= mq)
                    ++ml;
                FN(count_mask_row)(sim, b, order[q], (T)lam[l], &above[l], &nvalid[l],
                                   order[mq], (T)lam1[ml], mask, kept, pf);
                ++mq;
            } else {
                FN(count_kept_row)(sim, b, order[q], (T)lam[l], &above[l], &nvalid[l], kept);
            }
        }
        for (; mq < mend; ++mq) {
            while (starts[pk + ml + 1] <= mq)
                ++ml;
            FN(mask_counted_row)(sim, b, order[mq], (T)lam1[ml], mask, kept + order[mq]);
        }
        if (n == 0)
            break;
        for (int64_t u = 0; u < n; ++u)
            lam1[u] = nvalid[u] > 0
                          ? glofnd_internal_update_one(st, ids[u], above[u], nvalid[u], p, &memo)
                          : lam[u];
        pk = kb;
        pn = n;
    }
}

#undef FN
#undef GLOFND_CAT
#undef GLOFND_CAT_
