/* The fused GloFND threshold step: lambda update (SPEC 2-3), then the false-negative mask (SPEC 4).
 *
 * Determinism: rows are grouped by data-set index, and one group (all rows of one index) is
 * handled start to finish by one thread with integer counts, so the bytes written do not depend
 * on the number of threads or on the order in which groups run. The update arithmetic is done in
 * double, one IEEE operation at a time (built with -ffp-contract=off), and rounded to float32 on
 * store; the pure-torch reference performs the same operations in the same order. */
#include "glofnd.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

#define GLOFND_CHUNK ((int64_t)1 << 24)

int glofnd_has_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* b**e by binary exponentiation: a fixed sequence of multiplications the reference repeats
 * exactly, where libm's pow and torch's vectorised pow may differ in the last bit. */
static double ipow(double base, int64_t e)
{
    double r = 1.0;
    while (e > 0) {
        if (e & 1)
            r *= base;
        base *= base;
        e >>= 1;
    }
    return r;
}

static void update_one(glofnd_state *st, int64_t i, int64_t above, int64_t nvalid,
                       const glofnd_params *p)
{
    const double g = p->alpha - (double)above / (double)nvalid;
    const int32_t t = st->steps[i] < INT32_MAX ? st->steps[i] + 1 : INT32_MAX;
    const double lam = (double)st->lambda[i];
    double next;
    if (p->optimizer == GLOFND_ADAM) {
        const double m = p->beta1 * (double)st->exp_avg[i] + (1.0 - p->beta1) * g;
        const double v = p->beta2 * (double)st->exp_avg_sq[i] + (1.0 - p->beta2) * g * g;
        const int64_t tb = p->step > 0 ? p->step : (int64_t)t;
        const double mhat = m / (1.0 - ipow(p->beta1, tb));
        const double vhat = v / (1.0 - ipow(p->beta2, tb));
        next = lam - p->lr * mhat / (sqrt(vhat) + p->eps);
        st->exp_avg[i] = (float)m;
        st->exp_avg_sq[i] = (float)v;
    } else {
        next = lam - p->lr * g;
    }
    next = next < p->lo ? p->lo : (next > p->hi ? p->hi : next);
    st->lambda[i] = (float)next;
    st->steps[i] = t;
}

static int check_args(const glofnd_batch *b, const glofnd_state *st, const glofnd_params *p)
{
    if (b == NULL || st == NULL || p == NULL || b->rows < 0 || b->cols < 0 || st->n < 0)
        return GLOFND_EINVAL;
    if (b->rows > 0 && (b->index == NULL || st->lambda == NULL || st->exp_avg == NULL ||
                        st->exp_avg_sq == NULL || st->steps == NULL))
        return GLOFND_EINVAL;
    if (!(p->alpha > 0.0 && p->alpha < 1.0) || !(p->lr >= 0.0) || !isfinite(p->lr) ||
        !(p->beta1 >= 0.0 && p->beta1 < 1.0) || !(p->beta2 >= 0.0 && p->beta2 < 1.0) ||
        !(p->eps > 0.0) || !isfinite(p->eps) || !(p->lo <= p->hi) || !(fabs(p->lo) <= FLT_MAX) ||
        !(fabs(p->hi) <= FLT_MAX) || p->step < 0 ||
        (p->optimizer != GLOFND_ADAM && p->optimizer != GLOFND_SGD))
        return GLOFND_EINVAL;
    for (int64_t r = 0; r < b->rows; ++r)
        if (b->index[r] < 0 || b->index[r] >= st->n)
            return GLOFND_EINDEX;
    return GLOFND_OK;
}

/* Rows grouped by index: group k holds rows order[starts[k] .. starts[k+1]), ascending. */
typedef struct {
    void *block;
    int64_t *order, *starts;
    int64_t ngroups;
} grouping;

/* O(R) grouping with an open-addressing table; group ids follow first appearance, which keeps
 * the layout deterministic (and any layout would give the same bytes). */
static int group_rows(const int64_t *index, int64_t rows, grouping *g)
{
    int64_t cap = 16;
    while (cap < 2 * rows)
        cap <<= 1;
    const size_t bytes = sizeof(int64_t) * (size_t)(2 * cap + 3 * rows + 1);
    int64_t *block = malloc(bytes);
    if (block == NULL)
        return GLOFND_ENOMEM;
    int64_t *keys = block, *ids = block + cap, *gid = block + 2 * cap;
    int64_t *order = gid + rows, *starts = order + rows;
    for (int64_t h = 0; h < cap; ++h)
        keys[h] = -1;

    int64_t ng = 0;
    for (int64_t r = 0; r < rows; ++r) {
        const uint64_t key = (uint64_t)index[r];
        uint64_t h = (key * UINT64_C(0x9E3779B97F4A7C15)) >> 20;
        for (;; ++h) {
            h &= (uint64_t)(cap - 1);
            if (keys[h] == index[r])
                break;
            if (keys[h] < 0) {
                keys[h] = index[r];
                ids[h] = ng++;
                break;
            }
        }
        gid[r] = ids[h];
    }
    /* counting sort of rows by group id; starts reuses the table memory's tail */
    memset(starts, 0, sizeof(int64_t) * (size_t)(ng + 1));
    for (int64_t r = 0; r < rows; ++r)
        starts[gid[r] + 1]++;
    for (int64_t k = 0; k < ng; ++k)
        starts[k + 1] += starts[k];
    for (int64_t r = 0; r < rows; ++r)
        order[starts[gid[r]]++] = r;
    for (int64_t k = ng; k > 0; --k)
        starts[k] = starts[k - 1];
    starts[0] = 0;

    g->block = block;
    g->order = order;
    g->starts = starts;
    g->ngroups = ng;
    return GLOFND_OK;
}

#define T float
#define SUF f32
#include "step_impl.h"
#undef T
#undef SUF

#define T double
#define SUF f64
#include "step_impl.h"
#undef T
#undef SUF
