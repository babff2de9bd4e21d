/* glofnd._C: the NumPy binding of the C core. The only file that includes Python.h.
 *
 * step(sim, index, valid, lambdas, exp_avg, exp_avg_sq, steps, *, alpha, lr, beta1, beta2, eps,
 *      lo, hi, optimizer, step, update, num_threads) -> (mask, kept)
 *
 * The state arrays are updated in place and must be C-contiguous, writeable and of the exact
 * dtype (float32, float32, float32, int32): a silent copy would lose the update. sim is read
 * through its strides without copying when its dtype is float32 or float64 and it is aligned. */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define NPY_NO_DEPRECATED_API NPY_1_7_API_VERSION
#include <numpy/arrayobject.h>

#include <float.h>
#include <math.h>
#include <string.h>

#include "glofnd.h"

/* obj as an ndarray (borrowed), or NULL with a TypeError naming the argument. */
static PyArrayObject *ndarray_arg(PyObject *obj, const char *name)
{
    if (!PyArray_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "%s must be a numpy.ndarray, got %s", name,
                     Py_TYPE(obj)->tp_name);
        return NULL;
    }
    return (PyArrayObject *)obj;
}

/* Borrowed array check for the in-place state: never converted, so updates cannot be lost. */
static int check_state_array(PyObject *obj, const char *name, int typenum, const char *tname,
                             npy_intp n)
{
    PyArrayObject *a = ndarray_arg(obj, name);
    if (a == NULL)
        return -1;
    if (PyArray_TYPE(a) != typenum || !PyArray_ISNOTSWAPPED(a)) {
        PyErr_Format(PyExc_TypeError, "%s must have dtype %s in native byte order", name,
                     tname);
        return -1;
    }
    if (PyArray_NDIM(a) != 1 || (n >= 0 && PyArray_DIM(a, 0) != n)) {
        PyErr_Format(PyExc_ValueError, "%s must be 1-D of length %zd (num_samples)", name,
                     (Py_ssize_t)n);
        return -1;
    }
    const npy_intp stride = PyArray_STRIDE(a, 0);
    if ((PyArray_DIM(a, 0) > 1 && (stride <= 0 || stride % 4 != 0)) || !PyArray_ISWRITEABLE(a) ||
        !PyArray_ISALIGNED(a)) {
        PyErr_Format(PyExc_ValueError,
                     "%s must be aligned, writeable, with a positive stride of whole elements "
                     "(contiguous, or a column of an interleaved (n, k) block)", name);
        return -1;
    }
    return 0;
}

/* The element stride of a state array (1 for length 0 or 1). */
static int64_t state_stride(PyObject *obj)
{
    PyArrayObject *a = (PyArrayObject *)obj;
    return PyArray_DIM(a, 0) > 1 ? (int64_t)(PyArray_STRIDE(a, 0) / 4) : 1;
}

/* Element strides of a 2-D array, or -1 when a byte stride is not a multiple of the item. */
static int element_strides(PyArrayObject *a, int64_t *rs, int64_t *cs)
{
    const npy_intp item = PyArray_ITEMSIZE(a);
    const npy_intp s0 = PyArray_STRIDE(a, 0), s1 = PyArray_STRIDE(a, 1);
    if (s0 % item != 0 || s1 % item != 0)
        return -1;
    *rs = (int64_t)(s0 / item);
    *cs = (int64_t)(s1 / item);
    return 0;
}

/* sim as an aligned float32/float64 2-D array in native byte order, a new reference; copies only
 * when unaligned, byte-swapped, or when its strides are not whole elements. */
static PyArrayObject *as_sim(PyObject *obj)
{
    if (ndarray_arg(obj, "sim") == NULL)
        return NULL;
    const int t = PyArray_TYPE((PyArrayObject *)obj);
    if (t != NPY_FLOAT32 && t != NPY_FLOAT64) {
        PyErr_SetString(PyExc_TypeError, "sim must have dtype float32 or float64 (upcast others)");
        return NULL;
    }
    if (PyArray_NDIM((PyArrayObject *)obj) != 2) {
        PyErr_Format(PyExc_ValueError, "sim must be 2-D (rows, columns), got %d dimensions",
                     PyArray_NDIM((PyArrayObject *)obj));
        return NULL;
    }
    int64_t rs, cs;
    if (PyArray_ISALIGNED((PyArrayObject *)obj) && PyArray_ISNOTSWAPPED((PyArrayObject *)obj) &&
        element_strides((PyArrayObject *)obj, &rs, &cs) == 0) { /* the usual case: as it is */
        Py_INCREF(obj);
        return (PyArrayObject *)obj;
    }
    PyArrayObject *a =
        (PyArrayObject *)PyArray_FROM_OF(obj, NPY_ARRAY_ALIGNED | NPY_ARRAY_NOTSWAPPED);
    if (a != NULL && element_strides(a, &rs, &cs) < 0) {
        Py_SETREF(a, (PyArrayObject *)PyArray_FROM_OF((PyObject *)a, NPY_ARRAY_CARRAY_RO));
    }
    return a;
}

static PyArrayObject *as_index(PyObject *obj, npy_intp rows, npy_intp n)
{
    if (!PyArray_Check(obj) || !PyArray_ISINTEGER((PyArrayObject *)obj)) {
        PyErr_SetString(PyExc_TypeError, "index must be a numpy.ndarray of integers");
        return NULL;
    }
    if (PyArray_NDIM((PyArrayObject *)obj) != 1 || PyArray_DIM((PyArrayObject *)obj, 0) != rows) {
        PyErr_Format(PyExc_ValueError, "index must be 1-D of length %zd (the rows of sim)",
                     (Py_ssize_t)rows);
        return NULL;
    }
    /* unsigned ids are read as uint64 (a safe cast); once checked below n <= INT64_MAX their
     * bits are the same int64 values, so the kernel reads the buffer as int64 */
    const int unsig = PyArray_ISUNSIGNED((PyArrayObject *)obj);
    const int want = unsig ? NPY_UINT64 : NPY_INT64;
    PyArrayObject *a;
    if (PyArray_TYPE((PyArrayObject *)obj) == want && PyArray_ISCARRAY_RO((PyArrayObject *)obj) &&
        PyArray_ISNOTSWAPPED((PyArrayObject *)obj)) { /* the usual case: as it is */
        Py_INCREF(obj);
        a = (PyArrayObject *)obj;
    } else {
        a = (PyArrayObject *)PyArray_FROM_OTF(obj, want, NPY_ARRAY_IN_ARRAY);
        if (a == NULL)
            return NULL;
    }
    const int64_t *ix = (const int64_t *)PyArray_DATA(a);
    const uint64_t *ux = (const uint64_t *)PyArray_DATA(a);
    for (npy_intp r = 0; r < rows; ++r) {
        if (unsig ? ux[r] >= (uint64_t)n : (ix[r] < 0 || ix[r] >= n)) {
            if (unsig)
                PyErr_Format(PyExc_IndexError,
                             "index[%zd] = %llu is outside [0, num_samples = %zd)", (Py_ssize_t)r,
                             (unsigned long long)ux[r], (Py_ssize_t)n);
            else
                PyErr_Format(PyExc_IndexError,
                             "index[%zd] = %lld is outside [0, num_samples = %zd)", (Py_ssize_t)r,
                             (long long)ix[r], (Py_ssize_t)n);
            Py_DECREF(a);
            return NULL;
        }
    }
    return a;
}

static PyArrayObject *as_valid(PyObject *obj, npy_intp rows, npy_intp cols)
{
    if (!PyArray_Check(obj) || PyArray_TYPE((PyArrayObject *)obj) != NPY_BOOL) {
        PyErr_SetString(PyExc_TypeError, "valid must be None or a numpy.ndarray of dtype bool");
        return NULL;
    }
    PyArrayObject *a = (PyArrayObject *)obj;
    if (PyArray_NDIM(a) != 2 || PyArray_DIM(a, 0) != rows || PyArray_DIM(a, 1) != cols) {
        PyErr_Format(PyExc_ValueError, "valid must have the shape of sim, (%zd, %zd)",
                     (Py_ssize_t)rows, (Py_ssize_t)cols);
        return NULL;
    }
    Py_INCREF(a);
    return a;
}

static int check_params(const glofnd_params *p)
{
#define REQUIRE(cond, msg)                                                                      \
    if (!(cond)) {                                                                              \
        PyErr_SetString(PyExc_ValueError, msg);                                                 \
        return -1;                                                                              \
    }
    REQUIRE(p->alpha > 0.0 && p->alpha < 1.0, "alpha must lie in (0, 1)");
    REQUIRE(p->lr >= 0.0 && isfinite(p->lr), "lr must be finite and >= 0");
    REQUIRE(p->beta1 >= 0.0 && p->beta1 < 1.0, "beta1 must lie in [0, 1)");
    REQUIRE(p->beta2 >= 0.0 && p->beta2 < 1.0, "beta2 must lie in [0, 1)");
    REQUIRE(p->eps > 0.0 && isfinite(p->eps), "eps must be finite and > 0");
    REQUIRE(fabs(p->lo) <= FLT_MAX && fabs(p->hi) <= FLT_MAX && p->lo <= p->hi,
            "lo, hi must be finite float32 values, lo <= hi");
    REQUIRE(p->optimizer == GLOFND_ADAM || p->optimizer == GLOFND_SGD,
            "optimizer must be 0 (adam) or 1 (sgd)");
    REQUIRE(p->step >= 0, "step must be >= 0");
#undef REQUIRE
    return 0;
}

/* obj as a C double; TypeError naming the argument when it is not a real number. */
static int get_double(PyObject *obj, const char *name, double *out)
{
    if (obj == NULL)
        return 0;
    if (PyBool_Check(obj) || PyArray_Check(obj) ||
        !(PyFloat_Check(obj) || PyIndex_Check(obj) || PyArray_IsScalar(obj, Floating))) {
        PyErr_Format(PyExc_TypeError, "%s must be a real number, got %s", name,
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    const double v = PyFloat_AsDouble(obj);
    if (v == -1.0 && PyErr_Occurred()) {
        PyErr_Clear(); /* e.g. an int beyond the double range */
        PyErr_Format(PyExc_ValueError, "%s is out of range", name);
        return -1;
    }
    *out = v;
    return 0;
}

/* obj as an integer in [lo, hi]; TypeError / ValueError naming the argument otherwise. */
static int get_int(PyObject *obj, const char *name, long long lo, long long hi, long long *out)
{
    if (obj == NULL)
        return 0;
    if (PyArray_IsScalar(obj, Bool)) /* numpy.bool_ has no __index__ */
        obj = PyObject_IsTrue(obj) ? Py_True : Py_False;
    PyObject *ix = PyArray_Check(obj) || !PyIndex_Check(obj) ? NULL : PyNumber_Index(obj);
    if (ix == NULL) {
        PyErr_Clear();
        PyErr_Format(PyExc_TypeError, "%s must be an int, got %s", name, Py_TYPE(obj)->tp_name);
        return -1;
    }
    int overflow = 0;
    const long long v = PyLong_AsLongLongAndOverflow(ix, &overflow);
    Py_DECREF(ix);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (overflow != 0 || v < lo || v > hi) {
        PyErr_Format(PyExc_ValueError, "%s must lie in [%lld, %lld]", name, lo, hi);
        return -1;
    }
    *out = v;
    return 0;
}

#define GLOFND_MAX_THREADS 1024

static glofnd_state state_of(PyObject *lam_o, PyObject *m_o, PyObject *v_o, PyObject *t_o,
                             npy_intp n)
{
    glofnd_state st = {PyArray_DATA((PyArrayObject *)lam_o), PyArray_DATA((PyArrayObject *)m_o),
                       PyArray_DATA((PyArrayObject *)v_o), PyArray_DATA((PyArrayObject *)t_o),
                       n, state_stride(lam_o), state_stride(m_o), state_stride(v_o),
                       state_stride(t_o)};
    return st;
}

/* The four state arrays: exact dtypes, one length n, writeable, positive strides, disjoint. */
static int check_state(PyObject *lam_o, PyObject *m_o, PyObject *v_o, PyObject *t_o,
                       npy_intp *n_out)
{
    if (check_state_array(lam_o, "lambdas", NPY_FLOAT32, "float32", -1) < 0)
        return -1;
    const npy_intp n = PyArray_DIM((PyArrayObject *)lam_o, 0);
    if (check_state_array(m_o, "exp_avg", NPY_FLOAT32, "float32", n) < 0 ||
        check_state_array(v_o, "exp_avg_sq", NPY_FLOAT32, "float32", n) < 0 ||
        check_state_array(t_o, "steps", NPY_INT32, "int32", n) < 0)
        return -1;
    /* no element shared: byte ranges apart, or the same stride and offsets that differ by a
     * non-multiple of it (the columns of one interleaved block) */
    PyObject *st_o[4] = {lam_o, m_o, v_o, t_o};
    static const char *st_names[4] = {"lambdas", "exp_avg", "exp_avg_sq", "steps"};
    for (int a = 0; a < 4; ++a)
        for (int b2 = a + 1; b2 < 4; ++b2) {
            const char *pa = PyArray_BYTES((PyArrayObject *)st_o[a]);
            const char *pb = PyArray_BYTES((PyArrayObject *)st_o[b2]);
            const int64_t sa = state_stride(st_o[a]), sb = state_stride(st_o[b2]);
            const char *ea = pa + 4 * sa * (n - 1) + 4, *eb = pb + 4 * sb * (n - 1) + 4;
            const int apart = pa >= eb || pb >= ea;
            const int interleaved = sa == sb && (pa - pb) % (4 * sa) != 0;
            if (n > 0 && !apart && !interleaved) {
                PyErr_Format(PyExc_ValueError, "%s and %s must not share memory", st_names[a],
                             st_names[b2]);
                return -1;
            }
        }
    *n_out = n;
    return 0;
}

/* obj as an array of exactly this dtype, dimensions and (for d1 >= 0) shape, C-contiguous and
 * aligned: a borrowed reference, never a copy (the torch layer hands its tensors' memory). NULL
 * with a TypeError/ValueError naming the argument; *out = NULL for None when allowed. */
static int exact_array(PyObject *obj, const char *name, int typenum, int ndim, npy_intp d0,
                       npy_intp d1, int allow_none, PyArrayObject **out)
{
    *out = NULL;
    if (obj == Py_None && allow_none)
        return 0;
    PyArrayObject *a = ndarray_arg(obj, name);
    if (a == NULL)
        return -1;
    if (PyArray_TYPE(a) != typenum || !PyArray_ISNOTSWAPPED(a)) {
        PyErr_Format(PyExc_TypeError, "%s has the wrong dtype (or is not in native byte order)",
                     name);
        return -1;
    }
    if (PyArray_NDIM(a) != ndim || (d0 >= 0 && PyArray_DIM(a, 0) != d0) ||
        (ndim == 2 && d1 >= 0 && PyArray_DIM(a, 1) != d1)) {
        PyErr_Format(PyExc_ValueError, "%s has the wrong shape", name);
        return -1;
    }
    if (!PyArray_IS_C_CONTIGUOUS(a) || !PyArray_ISALIGNED(a)) {
        PyErr_Format(PyExc_ValueError, "%s must be C-contiguous and aligned", name);
        return -1;
    }
    *out = a;
    return 0;
}

/* The arguments of step(), in order; the first STEP_REQUIRED are required. */
#define STEP_NARGS 18
#define STEP_REQUIRED 7
static const char *const step_names[STEP_NARGS] = {
    "sim",   "index", "valid", "lambdas", "exp_avg",   "exp_avg_sq", "steps",  "alpha",
    "lr",    "beta1", "beta2", "eps",     "lo",        "hi",         "optimizer", "step",
    "update", "num_threads"};
/* Their interned str, made once (exec_module): keyword names are interned by the compiler, so
 * a keyword is found by its pointer before any string is compared. */
static PyObject *step_keys[STEP_NARGS];

/* Fills a[0..STEP_NARGS) from a vectorcall (NULL where not given); TypeError as CPython words
 * it otherwise, naming the argument. No tuple, dict or str is made per call: with
 * PyArg_ParseTupleAndKeywords a keyword cost ~0.6 us a call (a str made and hashed per name). */
static int step_args(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, PyObject **a)
{
    if (nargs > STEP_NARGS) {
        PyErr_Format(PyExc_TypeError, "step() takes at most %d arguments (%zd given)",
                     STEP_NARGS, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < STEP_NARGS; ++i)
        a[i] = i < nargs ? args[i] : NULL;
    const Py_ssize_t nkw = kwnames != NULL ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t k = 0; k < nkw; ++k) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k);
        int j = 0;
        while (j < STEP_NARGS && step_keys[j] != key)
            ++j;
        for (int q = 0; j == STEP_NARGS && q < STEP_NARGS; ++q) /* a str not interned */
            if (PyUnicode_Compare(key, step_keys[q]) == 0)
                j = q;
        if (j == STEP_NARGS) {
            PyErr_Format(PyExc_TypeError, "step() got an unexpected keyword argument %R", key);
            return -1;
        }
        if (a[j] != NULL) {
            PyErr_Format(PyExc_TypeError, "step() got multiple values for argument '%s'",
                         step_names[j]);
            return -1;
        }
        a[j] = args[nargs + k];
    }
    for (int j = 0; j < STEP_REQUIRED; ++j)
        if (a[j] == NULL) {
            PyErr_Format(PyExc_TypeError, "step() missing required argument '%s' (pos %d)",
                         step_names[j], j + 1);
            return -1;
        }
    return 0;
}

static PyObject *py_step(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                         PyObject *kwnames)
{
    (void)self;
    PyObject *arg[STEP_NARGS];
    if (step_args(args, nargs, kwnames, arg) < 0)
        return NULL;
    PyObject *sim_o = arg[0], *index_o = arg[1], *valid_o = arg[2], *lam_o = arg[3],
             *m_o = arg[4], *v_o = arg[5], *t_o = arg[6], *const *o = arg + STEP_REQUIRED;
    glofnd_params p = {0.01, 0.05, 0.9, 0.98, 1e-8, -1.0, 1.0, GLOFND_ADAM, 0, 1, 1};
    long long optimizer = p.optimizer, step = 0, update = 1, threads = 1;
    if (get_double(o[0], "alpha", &p.alpha) < 0 || get_double(o[1], "lr", &p.lr) < 0 ||
        get_double(o[2], "beta1", &p.beta1) < 0 || get_double(o[3], "beta2", &p.beta2) < 0 ||
        get_double(o[4], "eps", &p.eps) < 0 || get_double(o[5], "lo", &p.lo) < 0 ||
        get_double(o[6], "hi", &p.hi) < 0 ||
        get_int(o[7], "optimizer", 0, 1, &optimizer) < 0 ||
        get_int(o[8], "step", 0, INT64_MAX, &step) < 0 ||
        get_int(o[9], "update", 0, 1, &update) < 0 ||
        get_int(o[10], "num_threads", 0, GLOFND_MAX_THREADS, &threads) < 0)
        return NULL;
    p.optimizer = (int)optimizer;
    p.step = (int64_t)step;
    p.update = (int)update;
    p.num_threads = (int)threads;
    if (check_params(&p) < 0)
        return NULL;

    PyArrayObject *sim = NULL, *index = NULL, *valid = NULL, *mask = NULL, *kept = NULL;
    PyObject *result = NULL;
    npy_intp n;
    if (check_state(lam_o, m_o, v_o, t_o, &n) < 0)
        return NULL;

    if ((sim = as_sim(sim_o)) == NULL)
        goto done;
    const npy_intp rows = PyArray_DIM(sim, 0), cols = PyArray_DIM(sim, 1);
    if ((index = as_index(index_o, rows, n)) == NULL)
        goto done;
    if (valid_o != Py_None && (valid = as_valid(valid_o, rows, cols)) == NULL)
        goto done;

    npy_intp mdims[2] = {rows, cols};
    mask = (PyArrayObject *)PyArray_EMPTY(2, mdims, NPY_BOOL, 0);
    kept = (PyArrayObject *)PyArray_EMPTY(1, mdims, NPY_INT64, 0);
    if (mask == NULL || kept == NULL)
        goto done;

    glofnd_batch b = {rows, cols, 0, 1, PyArray_DATA(index), NULL, 0, 1};
    if (element_strides(sim, &b.row_stride, &b.col_stride) < 0) {
        PyErr_SetString(PyExc_ValueError, "sim has strides that are not whole elements");
        goto done;
    }
    if (valid != NULL) {
        b.valid = (const uint8_t *)PyArray_DATA(valid);
        b.valid_row_stride = PyArray_STRIDE(valid, 0);
        b.valid_col_stride = PyArray_STRIDE(valid, 1);
    }
    glofnd_state st = state_of(lam_o, m_o, v_o, t_o, n);
    int status;
    Py_BEGIN_ALLOW_THREADS
    if (PyArray_TYPE(sim) == NPY_FLOAT32)
        status = glofnd_step_f32(PyArray_DATA(sim), &b, &st, &p, PyArray_DATA(mask),
                                 PyArray_DATA(kept));
    else
        status = glofnd_step_f64(PyArray_DATA(sim), &b, &st, &p, PyArray_DATA(mask),
                                 PyArray_DATA(kept));
    Py_END_ALLOW_THREADS
    if (status == GLOFND_ENOMEM)
        PyErr_NoMemory();
    else if (status != GLOFND_OK)
        PyErr_Format(PyExc_RuntimeError, "glofnd_step failed with status %d", status);
    else
        result = PyTuple_Pack(2, (PyObject *)mask, (PyObject *)kept);

done:
    Py_XDECREF(sim);
    Py_XDECREF(index);
    Py_XDECREF(valid);
    Py_XDECREF(mask);
    Py_XDECREF(kept);
    return result;
}

/* The row description shared by info_nce_forward and info_nce_backward. */
static int parse_rows(PyObject *sim_o, PyObject *pos_o, PyObject *own_o, PyObject *thr_o,
                      PyObject *rem_o, long long per_row, int ratio, long long threads,
                      PyArrayObject **sim, glofnd_rows *b)
{
    PyArrayObject *sim_a = NULL, *pos, *own, *thr, *rem;
    if (PyArray_Check(sim_o) && PyArray_TYPE((PyArrayObject *)sim_o) == NPY_FLOAT64) {
        if (exact_array(sim_o, "sim", NPY_FLOAT64, 2, -1, -1, 0, &sim_a) < 0)
            return -1;
    } else if (exact_array(sim_o, "sim", NPY_FLOAT32, 2, -1, -1, 0, &sim_a) < 0) {
        return -1;
    }
    const npy_intp R = PyArray_DIM(sim_a, 0), M = PyArray_DIM(sim_a, 1);
    if (exact_array(pos_o, "positive", NPY_INT64, 1, R, -1, 0, &pos) < 0 ||
        exact_array(own_o, "own", NPY_INT64, 1, R, -1, 1, &own) < 0 ||
        exact_array(thr_o, "thr", NPY_FLOAT32, 1, R, -1, 1, &thr) < 0 ||
        exact_array(rem_o, "removed", NPY_BOOL, 2, R, M, 1, &rem) < 0)
        return -1;
    if (thr != NULL && rem != NULL) {
        PyErr_SetString(PyExc_ValueError, "thr and removed are exclusive");
        return -1;
    }
    if (per_row < 0) {
        PyErr_SetString(PyExc_ValueError, "per_row must be >= 0");
        return -1;
    }
    *sim = sim_a;
    b->rows = R;
    b->cols = M;
    b->positive = PyArray_DATA(pos);
    b->own = own != NULL ? PyArray_DATA(own) : NULL;
    b->thr = thr != NULL ? PyArray_DATA(thr) : NULL;
    b->removed = rem != NULL ? PyArray_DATA(rem) : NULL;
    b->per_row = per_row;
    b->ratio = ratio;
    b->num_threads = (int)threads;
    return 0;
}

static int rows_status(int status)
{
    if (status == GLOFND_EINDEX)
        PyErr_SetString(PyExc_IndexError, "positive or own holds a column outside [0, cols)");
    else if (status != GLOFND_OK)
        PyErr_Format(PyExc_RuntimeError, "the InfoNCE kernel failed with status %d", status);
    return status == GLOFND_OK ? 0 : -1;
}

/* A new 1-D or 2-D array of the rows' dtype (NULL with the error set). */
static PyArrayObject *new_rows_array(const glofnd_rows *b, int ndim, int typenum)
{
    npy_intp dims[2] = {b->rows, b->cols};
    return (PyArrayObject *)PyArray_EMPTY(ndim, dims, typenum, 0);
}

static PyObject *py_info_nce_forward(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *sim_o, *pos_o, *own_o, *thr_o, *rem_o;
    double scale;
    long long per_row, threads;
    int ratio;
    if (!PyArg_ParseTuple(args, "OOOOOdLpL:info_nce_forward", &sim_o, &pos_o, &own_o, &thr_o,
                          &rem_o, &scale, &per_row, &ratio, &threads))
        return NULL;
    PyArrayObject *sim;
    glofnd_rows b;
    if (parse_rows(sim_o, pos_o, own_o, thr_o, rem_o, per_row, ratio, threads, &sim, &b) < 0)
        return NULL;
    const int typenum = PyArray_TYPE(sim);
    PyArrayObject *loss = new_rows_array(&b, 1, typenum);
    PyArrayObject *lse = new_rows_array(&b, 1, typenum);
    PyArrayObject *kept = new_rows_array(&b, 1, NPY_INT64);
    PyObject *result = NULL;
    if (loss != NULL && lse != NULL && kept != NULL) {
        int status;
        Py_BEGIN_ALLOW_THREADS
        if (typenum == NPY_FLOAT32)
            status = glofnd_info_nce_fwd_f32(PyArray_DATA(sim), (float)scale, &b,
                                             PyArray_DATA(loss), PyArray_DATA(lse),
                                             PyArray_DATA(kept));
        else
            status = glofnd_info_nce_fwd_f64(PyArray_DATA(sim), scale, &b, PyArray_DATA(loss),
                                             PyArray_DATA(lse), PyArray_DATA(kept));
        Py_END_ALLOW_THREADS
        if (rows_status(status) == 0)
            result = PyTuple_Pack(3, (PyObject *)loss, (PyObject *)lse, (PyObject *)kept);
    }
    Py_XDECREF(loss);
    Py_XDECREF(lse);
    Py_XDECREF(kept);
    return result;
}

static PyObject *py_info_nce_backward(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *grad_o, *sim_o, *pos_o, *own_o, *thr_o, *rem_o, *lse_o, *kept_o;
    double scale;
    long long per_row, threads;
    int ratio, want_dscale;
    if (!PyArg_ParseTuple(args, "OOOOOOdLpOOpL:info_nce_backward", &grad_o, &sim_o, &pos_o,
                          &own_o, &thr_o, &rem_o, &scale, &per_row, &ratio, &lse_o, &kept_o,
                          &want_dscale, &threads))
        return NULL;
    PyArrayObject *sim, *grad, *lse, *kept;
    glofnd_rows b;
    if (parse_rows(sim_o, pos_o, own_o, thr_o, rem_o, per_row, ratio, threads, &sim, &b) < 0)
        return NULL;
    const int typenum = PyArray_TYPE(sim);
    if (exact_array(grad_o, "grad", typenum, 1, b.rows, -1, 0, &grad) < 0 ||
        exact_array(lse_o, "lse", typenum, 1, b.rows, -1, 0, &lse) < 0 ||
        exact_array(kept_o, "kept", NPY_INT64, 1, b.rows, -1, 0, &kept) < 0)
        return NULL;
    PyArrayObject *dsim = new_rows_array(&b, 2, typenum);
    PyArrayObject *dscale = want_dscale ? new_rows_array(&b, 1, typenum) : NULL;
    PyObject *result = NULL;
    if (dsim != NULL && (dscale != NULL || !want_dscale)) {
        int status;
        Py_BEGIN_ALLOW_THREADS
        if (typenum == NPY_FLOAT32)
            status = glofnd_info_nce_bwd_f32(PyArray_DATA(sim), (float)scale, &b,
                                             PyArray_DATA(grad), PyArray_DATA(lse),
                                             PyArray_DATA(kept), PyArray_DATA(dsim),
                                             dscale != NULL ? PyArray_DATA(dscale) : NULL);
        else
            status = glofnd_info_nce_bwd_f64(PyArray_DATA(sim), scale, &b, PyArray_DATA(grad),
                                             PyArray_DATA(lse), PyArray_DATA(kept),
                                             PyArray_DATA(dsim),
                                             dscale != NULL ? PyArray_DATA(dscale) : NULL);
        Py_END_ALLOW_THREADS
        if (rows_status(status) == 0)
            result = PyTuple_Pack(2, (PyObject *)dsim,
                                  dscale != NULL ? (PyObject *)dscale : Py_None);
    }
    Py_XDECREF(dsim);
    Py_XDECREF(dscale);
    return result;
}

static PyObject *py_sogclr_lme(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *sim_o, *pos_o, *own_o, *thr_o, *rem_o;
    double scale;
    int shift;
    long long threads;
    if (!PyArg_ParseTuple(args, "OOOOOdpL:sogclr_lme", &sim_o, &pos_o, &own_o, &thr_o, &rem_o,
                          &scale, &shift, &threads))
        return NULL;
    PyArrayObject *sim;
    glofnd_rows b;
    if (parse_rows(sim_o, pos_o, own_o, thr_o, rem_o, 0, 0, threads, &sim, &b) < 0)
        return NULL;
    const int typenum = PyArray_TYPE(sim);
    PyArrayObject *out = new_rows_array(&b, 1, typenum);
    PyArrayObject *kept = new_rows_array(&b, 1, NPY_INT64);
    PyObject *result = NULL;
    if (out != NULL && kept != NULL) {
        int status;
        Py_BEGIN_ALLOW_THREADS
        if (typenum == NPY_FLOAT32)
            status = glofnd_sogclr_lme_f32(PyArray_DATA(sim), (float)scale, shift, &b,
                                           PyArray_DATA(out), PyArray_DATA(kept));
        else
            status = glofnd_sogclr_lme_f64(PyArray_DATA(sim), scale, shift, &b,
                                           PyArray_DATA(out), PyArray_DATA(kept));
        Py_END_ALLOW_THREADS
        if (rows_status(status) == 0)
            result = PyTuple_Pack(2, (PyObject *)out, (PyObject *)kept);
    }
    Py_XDECREF(out);
    Py_XDECREF(kept);
    return result;
}

/* sogclr_forward (grad_o NULL) and sogclr_backward share their arguments. */
static PyObject *sogclr_call(PyObject *grad_o, PyObject *sim_o, PyObject *pos_o, PyObject *own_o,
                             PyObject *thr_o, PyObject *rem_o, double scale, int shift,
                             int pos_term, PyObject *log_u_o, PyObject *kept_o,
                             long long threads)
{
    PyArrayObject *sim, *grad = NULL, *log_u, *kept;
    glofnd_rows b;
    if (parse_rows(sim_o, pos_o, own_o, thr_o, rem_o, 0, 0, threads, &sim, &b) < 0)
        return NULL;
    const int typenum = PyArray_TYPE(sim);
    if ((grad_o != NULL && exact_array(grad_o, "grad", typenum, 1, b.rows, -1, 0, &grad) < 0) ||
        exact_array(log_u_o, "log_u", typenum, 1, b.rows, -1, 0, &log_u) < 0 ||
        exact_array(kept_o, "kept", NPY_INT64, 1, b.rows, -1, 0, &kept) < 0)
        return NULL;
    PyArrayObject *out = new_rows_array(&b, grad != NULL ? 2 : 1, typenum);
    if (out == NULL)
        return NULL;
    int status;
    const void *u = PyArray_DATA(log_u);
    const int64_t *k = PyArray_DATA(kept);
    Py_BEGIN_ALLOW_THREADS
    if (grad == NULL && typenum == NPY_FLOAT32)
        status = glofnd_sogclr_fwd_f32(PyArray_DATA(sim), (float)scale, shift, pos_term, &b, u, k,
                                       PyArray_DATA(out));
    else if (grad == NULL)
        status = glofnd_sogclr_fwd_f64(PyArray_DATA(sim), scale, shift, pos_term, &b, u, k,
                                       PyArray_DATA(out));
    else if (typenum == NPY_FLOAT32)
        status = glofnd_sogclr_bwd_f32(PyArray_DATA(sim), (float)scale, shift, pos_term, &b,
                                       PyArray_DATA(grad), u, k, PyArray_DATA(out));
    else
        status = glofnd_sogclr_bwd_f64(PyArray_DATA(sim), scale, shift, pos_term, &b,
                                       PyArray_DATA(grad), u, k, PyArray_DATA(out));
    Py_END_ALLOW_THREADS
    if (rows_status(status) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return (PyObject *)out;
}

static PyObject *py_sogclr_forward(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *sim_o, *pos_o, *own_o, *thr_o, *rem_o, *log_u_o, *kept_o;
    double scale;
    int shift, pos_term;
    long long threads;
    if (!PyArg_ParseTuple(args, "OOOOOdppOOL:sogclr_forward", &sim_o, &pos_o, &own_o, &thr_o,
                          &rem_o, &scale, &shift, &pos_term, &log_u_o, &kept_o, &threads))
        return NULL;
    return sogclr_call(NULL, sim_o, pos_o, own_o, thr_o, rem_o, scale, shift, pos_term, log_u_o,
                       kept_o, threads);
}

static PyObject *py_sogclr_backward(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *grad_o, *sim_o, *pos_o, *own_o, *thr_o, *rem_o, *log_u_o, *kept_o;
    double scale;
    int shift, pos_term;
    long long threads;
    if (!PyArg_ParseTuple(args, "OOOOOOdppOOL:sogclr_backward", &grad_o, &sim_o, &pos_o, &own_o,
                          &thr_o, &rem_o, &scale, &shift, &pos_term, &log_u_o, &kept_o,
                          &threads))
        return NULL;
    return sogclr_call(grad_o, sim_o, pos_o, own_o, thr_o, rem_o, scale, shift, pos_term,
                       log_u_o, kept_o, threads);
}

static PyObject *py_fused_forward(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *sim_o, *pos_o, *own_o, *index_o, *lam_o, *m_o, *v_o, *t_o;
    double scale;
    int kind, update, ratio;
    long long per_row, optimizer, step, threads;
    glofnd_params p;
    if (!PyArg_ParseTuple(args, "OOOOOOOOdiLpdddddddLLpL:fused_forward", &sim_o, &pos_o, &own_o,
                          &index_o, &lam_o, &m_o, &v_o, &t_o, &scale, &kind, &per_row, &ratio,
                          &p.alpha, &p.lr, &p.beta1, &p.beta2, &p.eps, &p.lo, &p.hi, &optimizer,
                          &step, &update, &threads))
        return NULL;
    p.optimizer = (int)optimizer;
    p.step = (int64_t)step;
    p.update = update;
    p.num_threads = (int)threads;
    if (kind < 0 || kind > 2) {
        PyErr_SetString(PyExc_ValueError, "kind must be 0, 1 or 2");
        return NULL;
    }
    npy_intp n;
    if (check_params(&p) < 0 || check_state(lam_o, m_o, v_o, t_o, &n) < 0)
        return NULL;
    PyArrayObject *sim;
    glofnd_rows b;
    if (parse_rows(sim_o, pos_o, own_o, Py_None, Py_None, per_row, ratio, threads, &sim, &b) < 0)
        return NULL;
    PyArrayObject *index = as_index(index_o, b.rows, n);
    if (index == NULL)
        return NULL;
    const int typenum = PyArray_TYPE(sim);
    PyArrayObject *out0 = new_rows_array(&b, 1, typenum);
    PyArrayObject *out1 = kind == 0 ? new_rows_array(&b, 1, typenum) : NULL;
    PyArrayObject *kept = new_rows_array(&b, 1, NPY_INT64);
    PyArrayObject *thr = new_rows_array(&b, 1, NPY_FLOAT32);
    PyObject *result = NULL;
    if (out0 != NULL && (out1 != NULL || kind != 0) && kept != NULL && thr != NULL) {
        glofnd_state st = state_of(lam_o, m_o, v_o, t_o, n);
        const int64_t *ix = PyArray_DATA(index);
        int status;
        Py_BEGIN_ALLOW_THREADS
        if (typenum == NPY_FLOAT32)
            status = glofnd_fused_fwd_f32(PyArray_DATA(sim), (float)scale, kind, &b, ix, &st, &p,
                                          PyArray_DATA(out0),
                                          out1 != NULL ? PyArray_DATA(out1) : NULL,
                                          PyArray_DATA(kept), PyArray_DATA(thr));
        else
            status = glofnd_fused_fwd_f64(PyArray_DATA(sim), scale, kind, &b, ix, &st, &p,
                                          PyArray_DATA(out0),
                                          out1 != NULL ? PyArray_DATA(out1) : NULL,
                                          PyArray_DATA(kept), PyArray_DATA(thr));
        Py_END_ALLOW_THREADS
        if (status == GLOFND_ENOMEM)
            PyErr_NoMemory();
        else if (rows_status(status) == 0)
            result = PyTuple_Pack(4, (PyObject *)out0, out1 != NULL ? (PyObject *)out1 : Py_None,
                                  (PyObject *)kept, (PyObject *)thr);
    }
    Py_DECREF(index);
    Py_XDECREF(out0);
    Py_XDECREF(out1);
    Py_XDECREF(kept);
    Py_XDECREF(thr);
    return result;
}

static const char *const isa_names[] = {"base", "avx2", "avx512"};

static PyObject *py_isa(PyObject *self, PyObject *args)
{
    (void)self;
    (void)args;
    return PyUnicode_FromString(isa_names[glofnd_isa()]);
}

static PyObject *py_set_isa(PyObject *self, PyObject *arg)
{
    (void)self;
    int isa = -1;
    if (arg != Py_None) {
        const char *name = PyUnicode_Check(arg) ? PyUnicode_AsUTF8(arg) : NULL;
        for (int k = 0; name != NULL && k < 3; ++k)
            if (strcmp(name, isa_names[k]) == 0)
                isa = k;
        if (isa < 0) {
            PyErr_SetString(PyExc_ValueError,
                            "isa must be None, 'base', 'avx2' or 'avx512'");
            return NULL;
        }
    }
    if (glofnd_set_isa(isa) != GLOFND_OK) {
        PyErr_Format(PyExc_ValueError, "isa %R is not available on this CPU or build", arg);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"step", (PyCFunction)(void (*)(void))py_step, METH_FASTCALL | METH_KEYWORDS,
     "step(sim, index, valid, lambdas, exp_avg, exp_avg_sq, steps, alpha, lr, beta1, beta2,"
     " eps, lo, hi, optimizer, step, update, num_threads) -> (mask, kept)\n\n"
     "Fused GloFND threshold step: updates the state in place, returns the false-negative mask\n"
     "(bool, rows x cols) and the kept count of each row (int64)."},
    {"info_nce_forward", py_info_nce_forward, METH_VARARGS,
     "info_nce_forward(sim, positive, own, thr, removed, scale, per_row, ratio, num_threads)\n"
     "-> (loss, lse, kept)\n\nThe fused InfoNCE of each row (csrc/loss.c): sim (R, M) float32 or\n"
     "float64 C-contiguous, positive (R,) int64, own None or (R,) int64 (< 0: none), thr None or\n"
     "(R,) float32, removed None or (R, M) bool."},
    {"info_nce_backward", py_info_nce_backward, METH_VARARGS,
     "info_nce_backward(grad, sim, positive, own, thr, removed, scale, per_row, ratio, lse, kept,\n"
     "want_dscale, num_threads) -> (dsim, dscale_rows or None)\n\nIts gradient, from the\n"
     "gradient of each row's loss."},
    {"sogclr_lme", py_sogclr_lme, METH_VARARGS,
     "sogclr_lme(sim, positive, own, thr, removed, scale, shift, num_threads) -> (lme, kept)\n\n"
     "SogCLR: log of the mean of exp(scale * (s - o)) over each row's kept entries (o: the\n"
     "positive's similarity when shift, else 0), and their count."},
    {"sogclr_forward", py_sogclr_forward, METH_VARARGS,
     "sogclr_forward(sim, positive, own, thr, removed, scale, shift, pos_term, log_u, kept,\n"
     "num_threads) -> loss\n\nSogCLR's surrogate of each row (csrc/glofnd.h)."},
    {"sogclr_backward", py_sogclr_backward, METH_VARARGS,
     "sogclr_backward(grad, sim, positive, own, thr, removed, scale, shift, pos_term, log_u,\n"
     "kept, num_threads) -> dsim\n\nIts gradient in sim."},
    {"fused_forward", py_fused_forward, METH_VARARGS,
     "fused_forward(sim, positive, own, index, lambdas, exp_avg, exp_avg_sq, steps, scale, kind,\n"
     "per_row, ratio, alpha, lr, beta1, beta2, eps, lo, hi, optimizer, step, update,\n"
     "num_threads) -> (out0, out1 or None, kept, thr)\n\nThe losses' forward with GloFND's\n"
     "update in the same pass (csrc/glofnd.h, glofnd_fused_fwd): kind 0 InfoNCE (loss, lse),\n"
     "1/2 SogCLR's log-mean-exp with/without the positive's offset. Updates the state in place."},
    {"isa", py_isa, METH_NOARGS,
     "isa() -> str\n\nThe instruction set of the row kernels in use: 'base', 'avx2' or 'avx512'."},
    {"set_isa", py_set_isa, METH_O,
     "set_isa(name)\n\nSelects the row kernels' instruction set ('base', 'avx2', 'avx512'; None:\n"
     "the widest this CPU runs). Every choice gives the same bytes; for tests and benchmarks."},
    {NULL, NULL, 0, NULL}};

static int exec_module(PyObject *m)
{
    import_array1(-1);
    for (int j = 0; j < STEP_NARGS; ++j) {
        if (step_keys[j] == NULL)
            step_keys[j] = PyUnicode_InternFromString(step_names[j]);
        if (step_keys[j] == NULL)
            return -1;
    }
    if (PyModule_AddIntConstant(m, "openmp", glofnd_has_openmp()) < 0 ||
        PyModule_AddIntConstant(m, "ADAM", GLOFND_ADAM) < 0 ||
        PyModule_AddIntConstant(m, "SGD", GLOFND_SGD) < 0)
        return -1;
    return 0;
}

static PyModuleDef_Slot slots[] = {{Py_mod_exec, exec_module}, {0, NULL}};

static struct PyModuleDef moduledef = {PyModuleDef_HEAD_INIT, "glofnd._C",
                                       "C kernels of glofnd (see csrc/glofnd.h).", 0, methods,
                                       slots, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__C(void) { return PyModuleDef_Init(&moduledef); }
