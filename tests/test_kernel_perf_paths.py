"""The fast paths of the C kernel give the reference's bytes.

Every instruction-set variant of the row kernels (base, AVX2, AVX-512, where the CPU runs them),
every layout (contiguous, strided columns, padded rows, transposed; validity mask absent,
contiguous or strided), widths that end in every kind of vector tail, NaN/inf/ties at λ, and 1
vs 2 threads: the mask, the kept counts and the four state arrays must equal, byte for byte,
those of the pure-torch reference (glofnd/reference.py). No tolerance: the kernel only compares
and counts, and its update performs the reference's float64 operations in the same order.
"""
import numpy as np
import pytest
import torch

import glofnd

from glofnd import numpy_api, reference

_C = pytest.importorskip("glofnd._C")

ISAS = ["base", "avx2", "avx512"]
# widths around the 16- and 64-lane blocks of the vector loops, and a few odd ones
WIDTHS = [1, 3, 15, 16, 17, 63, 64, 65, 127, 128, 129, 200]
OPT = {"adam": reference.ADAM, "sgd": reference.SGD}


def isa_available(name):
    try:
        _C.set_isa(name)
    except ValueError:
        return False
    finally:
        _C.set_isa(None)
    return True


@pytest.fixture(params=ISAS)
def isa(request):
    if not isa_available(request.param):
        pytest.skip(f"{request.param} is not available on this CPU or build")
    _C.set_isa(request.param)
    yield request.param
    _C.set_isa(None)


def make_state(n, rng, warm):
    """A state with some entries already moved (warm), so λ sits among the similarities."""
    st = numpy_api.init_state(n)
    if warm:
        st["lambdas"][:] = rng.uniform(-0.5, 0.5, n).astype(np.float32)
        st["exp_avg"][:] = rng.normal(0, 0.1, n).astype(np.float32)
        st["exp_avg_sq"][:] = rng.uniform(0, 0.1, n).astype(np.float32)
        st["steps"][:] = rng.integers(0, 50, n).astype(np.int32)
    return st


def make_sim(rows, cols, dtype, rng, lambdas, index, edge):
    sim = rng.uniform(-1, 1, (rows, cols)).astype(dtype)
    if edge:
        # ties: entries exactly at the row's current λ (strict > must leave them out)
        ties = rng.random((rows, cols)) < 0.1
        sim[ties] = np.broadcast_to(lambdas[index].astype(dtype)[:, None], sim.shape)[ties]
        sim[rng.random((rows, cols)) < 0.05] = np.nan
        sim[rng.random((rows, cols)) < 0.02] = np.inf
        sim[rng.random((rows, cols)) < 0.02] = -np.inf
    return sim


def layout(a, kind):
    """The same values as a, in a different memory layout."""
    if kind == "contiguous":
        return a
    if kind == "strided_cols":  # column stride 2
        wide = np.zeros((a.shape[0], 2 * a.shape[1]), a.dtype)
        wide[:, ::2] = a
        return wide[:, ::2]
    if kind == "padded_rows":  # row stride > cols, columns contiguous
        wide = np.zeros((a.shape[0], a.shape[1] + 5), a.dtype)
        wide[:, :a.shape[1]] = a
        return wide[:, :a.shape[1]]
    if kind == "transposed":
        return np.ascontiguousarray(a.T).T
    raise AssertionError(kind)


def reference_step(sim, index, valid, st, **kw):
    """The pure-torch reference on copies of the state; returns (mask, kept, state) as NumPy."""
    t = {k: torch.from_numpy(v.copy()) for k, v in st.items()}
    mask, kept = reference.threshold_step(
        torch.from_numpy(np.ascontiguousarray(sim)), torch.from_numpy(index),
        None if valid is None else torch.from_numpy(np.ascontiguousarray(valid)),
        t["lambdas"], t["exp_avg"], t["exp_avg_sq"], t["steps"],
        kw["alpha"], kw["lr"], kw["beta1"], kw["beta2"], kw["eps"], kw["lo"], kw["hi"],
        kw["optimizer"], kw["step"], kw["update"])
    return mask.numpy(), kept.numpy(), {k: v.numpy() for k, v in t.items()}


def c_step(sim, index, valid, st, threads, **kw):
    s = {k: v.copy() for k, v in st.items()}
    mask, kept = _C.step(sim, index, valid, s["lambdas"], s["exp_avg"], s["exp_avg_sq"],
                         s["steps"], num_threads=threads, **kw)
    return mask, kept, s


def assert_same_bytes(got, want):
    gm, gk, gs = got
    wm, wk, ws = want
    assert gm.dtype == np.bool_ and gm.shape == wm.shape
    assert gm.tobytes() == wm.tobytes(), f"mask differs at {np.argwhere(gm != wm)[:5]}"
    assert np.array_equal(gk, wk), f"kept {gk} != {wk}"
    for k in ws:
        assert gs[k].tobytes() == ws[k].tobytes(), f"state {k} differs"


def params(optimizer="adam", step=0, update=True):
    return dict(alpha=0.1, lr=0.05, beta1=0.9, beta2=0.98, eps=1e-8, lo=-1.0, hi=1.0,
                optimizer=OPT[optimizer], step=step, update=update)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cols", WIDTHS)
def test_widths_match_reference(isa, dtype, cols):
    """Every vector tail, two view rows per anchor (index = cat(idx, idx)), NaN/inf/ties."""
    rng = np.random.default_rng(cols)
    n, b = 50, 6
    idx = rng.choice(n, b, replace=False)
    index = np.concatenate([idx, idx]).astype(np.int64)
    st = make_state(n, rng, warm=True)
    sim = make_sim(2 * b, cols, dtype, rng, st["lambdas"], index, edge=True)
    kw = params()
    want = reference_step(sim, index, None, st, **kw)
    for threads in (1, 2):
        assert_same_bytes(c_step(sim, index, None, st, threads, **kw), want)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sim_layout", ["contiguous", "strided_cols", "padded_rows", "transposed"])
@pytest.mark.parametrize("valid_layout", [None, "contiguous", "strided_cols", "transposed"])
def test_layouts_match_reference(isa, dtype, sim_layout, valid_layout):
    """Non-contiguous sim and valid take other loops; they must give the same bytes."""
    rng = np.random.default_rng(7)
    n, rows, cols = 40, 23, 131
    index = rng.integers(0, 12, rows).astype(np.int64)  # repeated ids, uneven group sizes
    st = make_state(n, rng, warm=True)
    sim = make_sim(rows, cols, dtype, rng, st["lambdas"], index, edge=True)
    valid = None
    if valid_layout is not None:
        valid = rng.random((rows, cols)) < 0.8
        valid[3] = False  # a row without a valid entry: λ of its index moves only by its peers
    s_in = layout(sim, sim_layout)
    v_in = None if valid is None else layout(valid, valid_layout)
    kw = params()
    want = reference_step(sim, index, valid, st, **kw)
    for threads in (1, 2):
        got = c_step(s_in, index, v_in, st, threads, **kw)
        assert_same_bytes(got, want)


@pytest.mark.parametrize("optimizer,step,update",
                         [("adam", 0, True), ("adam", 3, True), ("sgd", 0, True),
                          ("adam", 0, False)])
def test_options_match_reference(isa, optimizer, step, update):
    """Adam with per-sample or fixed t, SGD, and masking without an update."""
    rng = np.random.default_rng(11)
    n, b, cols = 1000, 64, 257
    idx = rng.choice(n, b, replace=False)
    index = np.concatenate([idx, idx]).astype(np.int64)
    st = make_state(n, rng, warm=True)
    st["steps"][idx[:5]] = np.iinfo(np.int32).max  # saturating count
    sim = make_sim(2 * b, cols, np.float32, rng, st["lambdas"], index, edge=False)
    kw = params(optimizer, step, update)
    want = reference_step(sim, index, None, st, **kw)
    for threads in (1, 2, 3):
        assert_same_bytes(c_step(sim, index, None, st, threads, **kw), want)


def test_many_steps_match_reference(isa):
    """A short run: the state carried across steps stays byte-equal (t up to 40)."""
    rng = np.random.default_rng(3)
    n, b, cols = 30, 8, 65
    st_c = make_state(n, rng, warm=False)
    st_r = {k: v.copy() for k, v in st_c.items()}
    kw = params()
    for _ in range(40):
        idx = rng.choice(n, b, replace=False)
        index = np.concatenate([idx, idx]).astype(np.int64)
        sim = rng.uniform(-1, 1, (2 * b, cols)).astype(np.float32)
        got = c_step(sim, index, None, st_c, 2, **kw)
        want = reference_step(sim, index, None, st_r, **kw)
        assert_same_bytes(got, want)
        st_c, st_r = got[2], want[2]
    assert (st_c["steps"] > 0).any() and (st_c["lambdas"] < 1).any()  # the state moved


@pytest.mark.parametrize("cols", [65, 600])  # the small-matrix path; the batched driver
@pytest.mark.parametrize("threads", [1, 2])
def test_bias_memo_matches_reference(isa, cols, threads):
    """Adam's bias corrections 1 - β^t are kept per loop in a table with a slot per t modulo 32
    (csrc/internal.h, glofnd_bias_memo): per-sample counts mixing values that share a slot (t
    and t + 32, t + 64), neighbours (t, t + 1) and values that go past 32 between steps give
    the reference's bytes; a slot returned for the wrong t would change λ."""
    rng = np.random.default_rng(21)
    n, b = 200, 48
    idx = rng.choice(n, b, replace=False)
    index = np.concatenate([idx, idx]).astype(np.int64)
    st_c = make_state(n, rng, warm=True)
    st_c["steps"][:] = rng.choice([4, 5, 36, 37, 68, 30, 31], n).astype(np.int32)
    st_r = {k: v.copy() for k, v in st_c.items()}
    kw = params()
    for _ in range(4):
        sim = rng.uniform(-1, 1, (2 * b, cols)).astype(np.float32)
        got = c_step(sim, index, None, st_c, threads, **kw)
        want = reference_step(sim, index, None, st_r, **kw)
        assert_same_bytes(got, want)
        st_c, st_r = got[2], want[2]
    assert len(np.unique(st_c["steps"][idx] % 32)) < len(np.unique(st_c["steps"][idx]))


# (float32 columns, groups per batch of the driver): a batch keeps its rows within 8 KiB
# (csrc/internal.h, GLOFND_STEP_BATCH_BYTES), so two rows of 65 floats give 8 groups per batch,
# of 500 floats 2, of 2100 floats 1
BATCHES = [(65, 8), (500, 2), (2100, 1)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("cols,per_batch", BATCHES)
@pytest.mark.parametrize("edge", [False, True])
def test_batched_groups_match_reference(isa, dtype, cols, per_batch, edge):
    """The driver counts a batch of groups while it masks the previous batch's rows, row for row,
    then updates the batch's λ: many batches, groups of 1 to 4 rows (so that the two batches'
    rows pair unevenly), a last batch that is not full, rows with NaN/inf on either side of a
    pair, and per-sample step counts (the memo of the bias correction misses and hits)."""
    rng = np.random.default_rng(cols)
    n = 400
    groups = 5 * per_batch * 2 + 3
    ids = rng.choice(n, groups, replace=False)
    index = np.repeat(ids, rng.integers(1, 5, groups)).astype(np.int64)
    index = index[rng.permutation(index.size)]  # rows of a group apart, as two views are
    st = make_state(n, rng, warm=True)
    sim = make_sim(index.size, cols, dtype, rng, st["lambdas"], index, edge)
    kw = params()
    want = reference_step(sim, index, None, st, **kw)
    for threads in (1, 2, 3):
        assert_same_bytes(c_step(sim, index, None, st, threads, **kw), want)


@pytest.mark.parametrize("cols", [1, 5, 63, 64, 130, 256, 1000])
@pytest.mark.parametrize("kind", ["contiguous", "padded_rows"])
@pytest.mark.parametrize("edge", [False, "one", True])
def test_small_matrices_match_reference(isa, cols, kind, edge):
    """Matrices of at most 512 KiB on one thread take a path of their own with AVX-512 (two
    passes over the whole matrix in memory order, csrc/threshold.c flat_step_f32): the same
    bytes as the reference, for rows shorter than a vector, with tails, padded rows, groups of
    1 to 3 rows, and with one or many non-finite entries (the path then gives the step to the
    per-row kernels before it writes anything)."""
    rng = np.random.default_rng(cols)
    n = 300
    groups = 40
    ids = rng.choice(n, groups, replace=False)
    index = np.repeat(ids, rng.integers(1, 4, groups)).astype(np.int64)
    index = index[rng.permutation(index.size)]
    st = make_state(n, rng, warm=True)
    sim = make_sim(index.size, cols, np.float32, rng, st["lambdas"], index, edge is True)
    if edge == "one":  # a single non-finite entry in the last row
        sim[-1, cols // 2] = np.inf
    sim = layout(sim, kind)
    assert sim.nbytes <= 512 << 10
    kw = params()
    want = reference_step(sim, index, None, st, **kw)
    got = c_step(sim, index, None, st, 1, **kw)
    assert_same_bytes(got, want)
    assert want[0].any() and not want[0].all()  # the mask can disagree


@pytest.mark.parametrize("layout_kind", ["views", "views-repeats", "distinct", "repeats",
                                         "odd", "one-index"])
@pytest.mark.parametrize("cols", [7, 200])
def test_row_groupings_match_reference(isa, layout_kind, cols):
    """The grouping of rows by index has shortcuts for two views (the second half of the rows
    repeating the first: only the first half is hashed) and for indices all distinct (no sort):
    each layout, with and without repeats inside the first half, gives the reference's bytes on
    1 and 2 threads."""
    rng = np.random.default_rng(11)
    n, b = 500, 40
    idx = rng.choice(n, b, replace=False)
    index = {
        "views": np.concatenate([idx, idx]),
        "views-repeats": np.concatenate([idx[:b // 2], idx[:b // 2]] * 2),
        "distinct": idx,
        "repeats": rng.choice(idx[:10], 2 * b),
        "odd": np.concatenate([idx, idx, idx[:1]]),
        "one-index": np.full(6, idx[0]),
    }[layout_kind].astype(np.int64)
    st = make_state(n, rng, warm=True)
    sim = make_sim(index.size, cols, np.float32, rng, st["lambdas"], index, edge=False)
    kw = params()
    want = reference_step(sim, index, None, st, **kw)
    for threads in (1, 2):
        assert_same_bytes(c_step(sim, index, None, st, threads, **kw), want)


@pytest.mark.parametrize("offset", [0, 1, 4, 15])
@pytest.mark.parametrize("cols", [3, 70, 1100])
def test_unaligned_sim_matches_reference(isa, offset, cols):
    """A sim that does not start on a 64-byte boundary (offset floats past one, as NumPy's
    16-byte alignment often leaves it): the batched kernel takes the entries before the first
    boundary apart (csrc/rows_avx512.h, head_floats), which must give the reference's bytes,
    also when a row is shorter than that head. The non-finite entries send these small
    matrices from the whole-matrix path to the batched kernel, the one tested here."""
    rng = np.random.default_rng(offset * 1000 + cols)
    n, b = 300, 24
    idx = rng.choice(n, b, replace=False)
    index = np.concatenate([idx, idx]).astype(np.int64)
    st = make_state(n, rng, warm=True)
    dense = make_sim(index.size, cols, np.float32, rng, st["lambdas"], index, edge=True)
    buf = np.empty(dense.size + 64, np.float32)
    start = (-(buf.ctypes.data // 4)) % 16 + offset
    sim = buf[start:start + dense.size].reshape(dense.shape)
    sim[...] = dense
    assert sim.ctypes.data % 64 == 4 * offset
    kw = params()
    want = reference_step(dense, index, None, st, **kw)
    for threads in (1, 2):
        assert_same_bytes(c_step(sim, index, None, st, threads, **kw), want)


def test_isa_choices_agree():
    """All instruction sets this CPU runs give one result on a mid-size batch."""
    rng = np.random.default_rng(5)
    n, b, cols = 500, 96, 1001
    idx = rng.choice(n, b, replace=False)
    index = np.concatenate([idx, idx]).astype(np.int64)
    st = make_state(n, rng, warm=True)
    sim = make_sim(2 * b, cols, np.float32, rng, st["lambdas"], index, edge=True)
    valid = rng.random(sim.shape) < 0.9
    results = []
    for name in ISAS:
        if not isa_available(name):
            continue
        _C.set_isa(name)
        try:
            results.append((name, c_step(sim, index, valid, st, 2, **params())))
        finally:
            _C.set_isa(None)
    assert results and results[0][0] == "base"
    for _, got in results[1:]:
        assert_same_bytes(got, results[0][1])


def test_set_isa_rejects_unknown_name():
    with pytest.raises(ValueError, match="isa"):
        _C.set_isa("sse9")
    assert _C.isa() in ISAS


@pytest.mark.parametrize("threads", [1, 2])
def test_module_matches_reference(threads):
    """GloFND on CPU tensors (C path) against the same module routed to the reference."""
    from glofnd import GloFND

    gen = torch.Generator().manual_seed(0)
    n, b, cols = 200, 32, 64
    mods = [GloFND(n, alpha=0.05), GloFND(n, alpha=0.05)]
    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(5):
            idx = torch.randperm(n, generator=gen)[:b]
            index = torch.cat([idx, idx]).to(torch.int32)  # converted by the module
            sim = (torch.rand(2 * b, cols, generator=gen) * 2 - 1)[:, ::1]
            valid = torch.rand(2 * b, cols, generator=gen) < 0.9
            outs = []
            for name, mod in zip(("c", "reference"), mods):
                with glofnd.use_backend(name):
                    outs.append(mod.step(sim, index, valid))
            assert torch.equal(outs[0][0], outs[1][0]) and torch.equal(outs[0][1], outs[1][1])
    finally:
        torch.set_num_threads(prev)
    for name in ("lambdas", "exp_avg", "exp_avg_sq", "steps"):
        a, r = getattr(mods[0], name), getattr(mods[1], name)
        assert a.numpy().tobytes() == r.numpy().tobytes(), name


def test_changing_betas_between_calls(isa):
    """The kernel remembers the last bias-correction denominators along its loop over groups; a
    call with other betas (or another fixed t) at the same counts must not reuse them."""
    rng = np.random.default_rng(13)
    n, b, cols = 64, 16, 33
    st_c = make_state(n, rng, warm=False)
    st_c["steps"][:] = 4
    st_r = {k: v.copy() for k, v in st_c.items()}
    for beta1, beta2, step in [(0.9, 0.98, 0), (0.5, 0.9, 0), (0.5, 0.9, 7), (0.9, 0.98, 7)]:
        idx = rng.choice(n, b, replace=False)
        index = np.concatenate([idx, idx]).astype(np.int64)
        sim = rng.uniform(-1, 1, (2 * b, cols)).astype(np.float32)
        kw = dict(params(step=step), beta1=beta1, beta2=beta2)
        got = c_step(sim, index, None, st_c, 1, **kw)
        want = reference_step(sim, index, None, st_r, **kw)
        assert_same_bytes(got, want)
        st_c, st_r = got[2], want[2]
