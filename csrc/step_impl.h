/* Row kernels of the threshold step, instantiated once per similarity type by threshold.c.
 * Expects T (element type) and SUF (name suffix) to be defined; no include guard on purpose. */

#define GLOFND_CAT_(a, b) a##_##b
#define GLOFND_CAT(a, b) GLOFND_CAT_(a, b)
#define FN(name) GLOFND_CAT(name, SUF)

/* Counts of one row against lam: entries above it, and valid (finite, unmasked) entries.
 * Called with cs == 1 and vr == NULL on the hot path, where it inlines into a vector loop. */
static inline void FN(count_row)(const T *s, int64_t cs, const uint8_t *vr, int64_t vcs,
                                 int64_t cols, T lam, int64_t *above, int64_t *nvalid)
{
    int64_t a = 0, nv = 0;
    for (int64_t j0 = 0; j0 < cols; j0 += GLOFND_CHUNK) {
        /* 32-bit accumulators keep the loop vectorisable; chunks keep them from overflowing */
        const int64_t j1 = j0 + GLOFND_CHUNK < cols ? j0 + GLOFND_CHUNK : cols;
        int32_t ca = 0, cv = 0;
        if (vr == NULL) {
            for (int64_t j = j0; j < j1; ++j) {
                const T x = s[j * cs];
                const int ok = isfinite(x) != 0; /* NaN and +-inf are never valid */
                ca += ok & (x > lam);
                cv += ok;
            }
        } else {
            for (int64_t j = j0; j < j1; ++j) {
                const T x = s[j * cs];
                const int ok = (vr[j * vcs] != 0) & (isfinite(x) != 0);
                ca += ok & (x > lam);
                cv += ok;
            }
        }
        a += ca;
        nv += cv;
    }
    *above += a;
    *nvalid += nv;
}

/* Writes the false-negative flags of one row and returns its kept (valid, unflagged) count. */
static inline int64_t FN(mask_row)(const T *s, int64_t cs, const uint8_t *vr, int64_t vcs,
                                   int64_t cols, T lam, uint8_t *out)
{
    int64_t kept = 0;
    for (int64_t j0 = 0; j0 < cols; j0 += GLOFND_CHUNK) {
        const int64_t j1 = j0 + GLOFND_CHUNK < cols ? j0 + GLOFND_CHUNK : cols;
        int32_t k = 0;
        if (vr == NULL) {
            for (int64_t j = j0; j < j1; ++j) {
                const T x = s[j * cs];
                const int ok = isfinite(x) != 0;
                const uint8_t f = (uint8_t)(ok & (x > lam));
                out[j] = f;
                k += ok - f;
            }
        } else {
            for (int64_t j = j0; j < j1; ++j) {
                const T x = s[j * cs];
                const int ok = (vr[j * vcs] != 0) & (isfinite(x) != 0);
                const uint8_t f = (uint8_t)(ok & (x > lam));
                out[j] = f;
                k += ok - f;
            }
        }
        kept += k;
    }
    return kept;
}

/* One distinct index: pool its rows, update its lambda, then mask its rows. */
static void FN(do_group)(const T *sim, const glofnd_batch *b, glofnd_state *st,
                         const glofnd_params *p, const int64_t *rows, int64_t nrows,
                         uint8_t *mask, int64_t *kept)
{
    const int64_t i = b->index[rows[0]];
    const int64_t rs = b->row_stride, cs = b->col_stride, M = b->cols;
    const int64_t vrs = b->valid_row_stride, vcs = b->valid_col_stride;
    const int contiguous = cs == 1 && b->valid == NULL;

    if (p->update) {
        int64_t above = 0, nvalid = 0;
        const T lam = (T)st->lambda[i];
        for (int64_t k = 0; k < nrows; ++k) {
            const int64_t r = rows[k];
            if (contiguous)
                FN(count_row)(sim + r * rs, 1, NULL, 0, M, lam, &above, &nvalid);
            else
                FN(count_row)(sim + r * rs, cs, b->valid ? b->valid + r * vrs : NULL, vcs, M,
                              lam, &above, &nvalid);
        }
        if (nvalid > 0)
            update_one(st, i, above, nvalid, p);
    }

    const T lam = (T)st->lambda[i];
    for (int64_t k = 0; k < nrows; ++k) {
        const int64_t r = rows[k];
        uint8_t *out = mask + r * M;
        if (contiguous)
            kept[r] = FN(mask_row)(sim + r * rs, 1, NULL, 0, M, lam, out);
        else
            kept[r] = FN(mask_row)(sim + r * rs, cs, b->valid ? b->valid + r * vrs : NULL, vcs,
                                   M, lam, out);
    }
}

int GLOFND_CAT(glofnd_step, SUF)(const T *sim, const glofnd_batch *b, glofnd_state *st,
                                 const glofnd_params *p, uint8_t *mask, int64_t *kept)
{
    int status = check_args(b, st, p);
    if (status != GLOFND_OK)
        return status;
    if (b->rows == 0)
        return GLOFND_OK;

    grouping g;
    status = group_rows(b->index, b->rows, &g);
    if (status != GLOFND_OK)
        return status;

    const int64_t ngroups = g.ngroups;
    const int nt = p->num_threads;
    (void)nt;
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 8) num_threads(nt > 1 ? nt : 1) if (nt > 1)
#endif
    for (int64_t k = 0; k < ngroups; ++k)
        FN(do_group)(sim, b, st, p, g.order + g.starts[k], g.starts[k + 1] - g.starts[k], mask,
                     kept);

    free(g.block);
    return GLOFND_OK;
}

#undef FN
#undef GLOFND_CAT
#undef GLOFND_CAT_
