"""The fused threshold step: C against the reference, against an independent float64 oracle of
docs/algorithm.md, convergence to the true quantile, thread independence, no input mutation."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import glofnd
from glofnd import _ops

from helpers import STATE_KEYS, clone_state, op_step, oracle_step, random_state

needs_c = pytest.mark.skipif(_ops._C is None, reason="C extension not built")

SHAPES = [(1, 1), (1, 9), (7, 1), (13, 29), (64, 130)]
LAYOUTS = ["contiguous", "transposed", "strided"]
EDGES = ["plain", "ties", "nonfinite", "invalid_rows"]


def make_batch(shape, dtype, layout, edge, state, seed):
    """A batch with repeated indices in distant rows and the requested layout and edge values."""
    rows, cols = shape
    g = torch.Generator().manual_seed(seed)
    n = state["lambdas"].numel()
    index = torch.randint(0, max(1, n // 3), (rows,), generator=g)
    if rows > 4:
        index[-1] = index[0]  # the same id at both ends of the batch
    if layout == "transposed":
        sim = (torch.rand(cols, rows, generator=g) * 2 - 1).to(dtype).T
    elif layout == "strided":
        sim = (torch.rand(rows, 2 * cols, generator=g) * 2 - 1).to(dtype)[:, ::2]
    else:
        sim = (torch.rand(rows, cols, generator=g) * 2 - 1).to(dtype)
    valid = torch.rand(rows, cols, generator=g) > 0.2
    if edge == "ties":  # entries exactly at the row's current threshold
        lam_rows = state["lambdas"][index].to(dtype)
        sim[:, 0] = lam_rows
        sim[:, -1] = lam_rows
    elif edge == "nonfinite":
        pos = torch.randint(0, rows * cols, (max(1, rows * cols // 5),), generator=g)
        vals = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
        for k, p in enumerate(pos.tolist()):
            sim[p // cols, p % cols] = vals[k % 3]
    elif edge == "invalid_rows":
        valid[::2] = False
        sim[1::3] = float("nan")
    return sim, index, valid


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("edge", EDGES)
@pytest.mark.parametrize("optimizer,step", [(0, 0), (0, 3), (1, 0)], ids=["adam", "adam-t3", "sgd"])
def test_c_equals_reference_bytes(dtype, shape, layout, edge, optimizer, step):
    """Exact equality (every byte of mask, kept and state) of the C kernel and the reference."""
    base = random_state(40, seed=1)
    sim, index, valid = make_batch(shape, dtype, layout, edge, base, seed=hash((shape, layout)) % 1000)
    for use_valid in (True, False):
        outs = {}
        for name in ("c", "reference"):
            st = clone_state(base)
            with glofnd.use_backend(name):
                mask, kept = op_step(sim, index, valid if use_valid else None, st, optimizer, step)
            outs[name] = (mask, kept, st)
        (mc, kc, sc), (mr, kr, sr) = outs["c"], outs["reference"]
        assert torch.equal(mc, mr)
        assert torch.equal(kc, kr)
        for k in STATE_KEYS:
            assert torch.equal(sc[k], sr[k]), k


def test_ties_are_not_flagged(backend):
    """Strict >: an entry equal to λ is neither counted nor flagged."""
    st = random_state(10, seed=2)
    lam = st["lambdas"].clone()
    index = torch.tensor([0, 3, 7])
    sim = lam[index].unsqueeze(1).repeat(1, 5)
    mask, kept = op_step(sim, index, None, st, update=False)
    assert not mask.any()
    assert kept.tolist() == [5, 5, 5]
    # with update=True and fresh moments, every entry equals λ_old: g = α > 0, λ moves down
    for k in ("exp_avg", "exp_avg_sq", "steps"):
        st[k].zero_()
    st["lambdas"][index] = torch.tensor([1.0, 0.2, -0.5])
    op_step(sim.clone().copy_(st["lambdas"][index].unsqueeze(1)), index, None, st)
    assert (st["lambdas"][index] < torch.tensor([1.0, 0.2, -0.5])).all()


def test_rows_without_valid_entries_leave_state(backend):
    st = random_state(10, seed=3)
    before = clone_state(st)
    sim = torch.tensor([[float("nan"), float("nan")], [0.5, 0.2], [0.1, 0.9]])
    valid = torch.tensor([[True, True], [False, False], [True, True]])
    index = torch.tensor([4, 5, 6])
    mask, kept = op_step(sim, index, valid, st)
    for k in STATE_KEYS:
        assert torch.equal(st[k][[4, 5]], before[k][[4, 5]]), k
    assert st["steps"][6] == before["steps"][6] + 1
    assert kept[:2].tolist() == [0, 0] and not mask[:2].any()


def test_nonfinite_never_reaches_lambda(backend):
    st = random_state(6, seed=4)
    sim = torch.tensor([[float("inf"), -float("inf"), float("nan"), 0.3]] * 6)
    for _ in range(50):
        op_step(sim, torch.arange(6), None, st)
    for k in ("lambdas", "exp_avg", "exp_avg_sq"):
        assert torch.isfinite(st[k]).all(), k
    assert (st["lambdas"].abs() <= 1).all()


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
@pytest.mark.parametrize("bias_correction", ["sample", "epoch"])
def test_trajectory_matches_float64_oracle(backend, optimizer, bias_correction):
    """Several epochs of GloFND equal the update of docs/algorithm.md computed in float64 with float32 storage.

    Tolerance: λ within 1e-6 (the oracle uses Python's pow, the kernel binary exponentiation);
    masks equal wherever the similarity is farther than 1e-5 from the threshold."""
    n, batch, cols, alpha = 48, 8, 24, 0.15
    lr = 0.05 if optimizer == "adam" else 0.5
    fnd = glofnd.GloFND(n, alpha=alpha, lr=lr, optimizer=optimizer, bias_correction=bias_correction)
    ref = {"lambdas": np.ones(n, np.float32), "exp_avg": np.zeros(n, np.float32),
           "exp_avg_sq": np.zeros(n, np.float32), "steps": np.zeros(n, np.int64)}
    gen = torch.Generator().manual_seed(5)
    for epoch in range(6):
        fnd.set_epoch(epoch)
        for idx in torch.randperm(n, generator=gen).split(batch):
            index = torch.cat([idx, idx])  # two views: the rows of one sample are pooled
            sim = torch.rand(len(index), cols, generator=gen) * 1.6 - 0.6
            valid = torch.rand(len(index), cols, generator=gen) > 0.1
            mask = fnd(sim, index, valid)
            expect = oracle_step(ref, sim.numpy(), index.numpy(), valid.numpy(), alpha, lr,
                                 optimizer, step=epoch + 1 if bias_correction == "epoch" else 0)
            np.testing.assert_allclose(fnd.lambdas.numpy(), ref["lambdas"], rtol=0, atol=1e-6)
            lam_rows = fnd.lambdas[index].double().unsqueeze(1)
            far = (sim.double() - lam_rows).abs() > 1e-5
            assert torch.equal(mask[far], torch.from_numpy(expect)[far])
    np.testing.assert_allclose(fnd.exp_avg.numpy(), ref["exp_avg"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(fnd.exp_avg_sq.numpy(), ref["exp_avg_sq"], rtol=1e-5, atol=1e-9)
    assert np.array_equal(fnd.steps.numpy(), ref["steps"])
    assert fnd.lambdas.min() < 0.9  # the thresholds did move


def test_lambda_approaches_global_quantile(backend):
    """With fixed embeddings and random batches, λ_i tends to the (1−α)-quantile of sample i's
    similarities to the whole data set (self excluded), computed by brute force.

    Tolerance: median absolute error 0.03 and 90th percentile 0.08 after 150 visits per sample
    (λ keeps fluctuating by about lr around the quantile)."""
    torch.manual_seed(0)
    n, dim, batch, ncols, alpha = 300, 6, 30, 64, 0.1
    emb = F.normalize(torch.randn(n, dim), dim=1)
    full = emb @ emb.T
    fnd = glofnd.GloFND(n, alpha=alpha, lr=0.05)
    for _ in range(150):
        for idx in torch.randperm(n).split(batch):
            cols = torch.randint(0, n, (ncols,))
            valid = cols.unsqueeze(0) != idx.unsqueeze(1)
            fnd(full[idx][:, cols], idx, valid)
    off = full.masked_fill(torch.eye(n, dtype=torch.bool), float("nan"))
    truth = torch.nanquantile(off.double(), 1 - alpha, dim=1, interpolation="higher").float()
    err = (fnd.lambdas - truth).abs()
    assert err.median() < 0.03, err.median()
    assert err.quantile(0.9) < 0.08, err.quantile(0.9)


@needs_c
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_thread_count_does_not_change_bytes(dtype):
    gen = torch.Generator().manual_seed(6)
    n, rows, cols = 200, 333, 257
    index = torch.randint(0, 90, (rows,), generator=gen)
    sim = (torch.rand(rows, cols, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)
    valid = torch.rand(rows, cols, generator=gen) > 0.3
    results = []
    for threads in (1, 2, 4):
        torch.set_num_threads(threads)
        st = random_state(n, seed=7)
        with glofnd.use_backend("c"):
            outs = [op_step(sim, index, valid, st) for _ in range(3)]
        results.append((outs, st))
    (o1, s1) = results[0]
    for outs, st in results[1:]:
        for (ma, ka), (mb, kb) in zip(o1, outs):
            assert torch.equal(ma, mb) and torch.equal(ka, kb)
        for k in STATE_KEYS:
            assert torch.equal(s1[k], st[k]), k


@pytest.mark.parametrize("path", ["c", "reference"])
def test_numpy_api_takes_any_disjoint_layout(path):
    """init_state's (N, 4) block, four contiguous arrays and four arrays with a stride of two
    elements step to the same bytes, on the C kernel and on the reference."""
    if path == "c" and _ops._C is None:
        pytest.skip("C extension not built")
    rng = np.random.default_rng(9)
    block = glofnd.numpy_api.init_state(40, init_lambda=0.5)
    assert block["lambdas"].base is not None and block["steps"].strides == (16,)
    layouts = {"block": block,
               "contiguous": {k: np.ascontiguousarray(v) for k, v in block.items()},
               "stride-2": {k: np.repeat(v, 2)[::2] for k, v in block.items()}}
    kw = dict(alpha=0.05, lr=0.05, beta1=0.9, beta2=0.98, eps=1e-8, lo=-1.0, hi=1.0, optimizer=0,
              step=0, update=True)
    for _ in range(3):
        sim = rng.uniform(-1, 1, (24, 31)).astype(np.float32)
        index = rng.integers(0, 40, 24)
        outs = [glofnd.threshold_step(sim, index, st, alpha=0.05) if path == "c"
                else glofnd.numpy_api._reference(sim, index, st, None, kw)
                for st in layouts.values()]
        for m, k in outs[1:]:
            assert np.array_equal(outs[0][0], m) and np.array_equal(outs[0][1], k)
    for name, st in layouts.items():
        for key in STATE_KEYS:
            assert np.array_equal(st[key], block[key]), (name, key)
    assert block["steps"].max() > 0


@needs_c
def test_numpy_api_threads_and_reference_agree():
    rng = np.random.default_rng(8)
    sim = rng.uniform(-1, 1, (120, 77)).astype(np.float32)
    index = rng.integers(0, 30, 120)
    valid = rng.random((120, 77)) > 0.25
    outs = []
    for threads in (1, 2, 5):
        st = glofnd.numpy_api.init_state(50)
        outs.append((*glofnd.threshold_step(sim, index, st, valid, alpha=0.05,
                                            num_threads=threads), st))
    st_ref = glofnd.numpy_api.init_state(50)
    outs.append((*glofnd.numpy_api._reference(sim, index, st_ref, valid, dict(
        alpha=0.05, lr=0.05, beta1=0.9, beta2=0.98, eps=1e-8, lo=-1.0, hi=1.0, optimizer=0,
        step=0, update=True)), st_ref))
    m0, k0, s0 = outs[0]
    for m, k, s in outs[1:]:
        assert np.array_equal(m0, m) and np.array_equal(k0, k)
        for key in STATE_KEYS:
            assert np.array_equal(s0[key], s[key]), key


def test_inputs_are_not_modified(backend):
    gen = torch.Generator().manual_seed(9)
    sim = torch.rand(20, 11, generator=gen)
    sim[3, 4] = float("nan")
    index = torch.randint(0, 5, (20,), generator=gen)
    valid = torch.rand(20, 11, generator=gen) > 0.5
    copies = [t.clone() for t in (sim, index, valid)]
    fnd = glofnd.GloFND(5, alpha=0.2)
    fnd(sim, index, valid)
    for a, b in zip((sim, index, valid), copies):
        assert torch.equal(a.nan_to_num(), b.nan_to_num()) and a.dtype == b.dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_equal_float32(backend, dtype):
    """float16/bfloat16 similarities are compared in float32: same result as the upcast input."""
    gen = torch.Generator().manual_seed(10)
    sim = (torch.rand(16, 12, generator=gen) * 2 - 1).to(dtype)
    index = torch.randint(0, 8, (16,), generator=gen)
    a, b = glofnd.GloFND(8, alpha=0.2), glofnd.GloFND(8, alpha=0.2)
    for _ in range(5):
        assert torch.equal(a(sim, index), b(sim.float(), index))
    assert torch.equal(a.lambdas, b.lambdas)


def test_only_batch_entries_are_touched(backend):
    st = random_state(1000, seed=11)
    before = clone_state(st)
    index = torch.tensor([3, 500, 999, 3])
    op_step(torch.rand(4, 6), index, None, st)
    untouched = torch.ones(1000, dtype=torch.bool)
    untouched[index] = False
    for k in STATE_KEYS:
        assert torch.equal(st[k][untouched], before[k][untouched]), k


@pytest.mark.parametrize("rows,cols", list(itertools.product([1, 3], [1, 2])))
def test_grouped_rows_pool_one_gradient(backend, rows, cols):
    """All rows of one index give one update from the pooled share (docs/algorithm.md): the same as one
    row holding all of their entries."""
    gen = torch.Generator().manual_seed(rows * 10 + cols)
    sim = torch.rand(rows, cols, generator=gen) * 2 - 1
    a, b = random_state(4, seed=12), random_state(4, seed=12)
    op_step(sim, torch.full((rows,), 2), None, a)
    op_step(sim.reshape(1, -1), torch.tensor([2]), None, b)
    for k in STATE_KEYS:
        assert torch.equal(a[k], b[k]), k


@needs_c
def test_binding_leaks_no_references():
    """Every argument's reference count is unchanged after many calls (success and failure)."""
    import sys

    rng = np.random.default_rng(13)
    sim = rng.uniform(-1, 1, (9, 5)).astype(np.float32)
    sim_t = sim.T.copy().T  # non-contiguous view
    index = rng.integers(0, 4, 9)
    valid = rng.random((9, 5)) > 0.3
    st = glofnd.numpy_api.init_state(4)
    objs = [sim, sim_t, index, valid, *st.values()]
    before = [sys.getrefcount(o) for o in objs]
    for _ in range(200):
        glofnd.threshold_step(sim, index, st, valid, num_threads=1)
        glofnd.threshold_step(sim_t, index, st, valid, num_threads=1)
        with pytest.raises(IndexError):
            glofnd.threshold_step(sim, index + 10, st, valid)
        with pytest.raises(ValueError):
            glofnd.threshold_step(sim, index, st, valid[:, :2])
    assert [sys.getrefcount(o) for o in objs] == before


def binary_power(base: float, e: int) -> float:
    """base**e by the multiplication sequence of binary exponentiation, one Python float at a
    time (independent of the reference's table)."""
    x = 1.0
    while e > 0:
        if e & 1:
            x *= base
        base *= base
        e >>= 1
    return x


BETAS = [0.0, 0.5, 0.9, 0.98, 0.999, 0.9994, 0.9995, 0.99999, 1 - 1e-9]
EXPONENTS = [1, 2, 3, 7, 100, 2047, 2048, 65535, 65536, 65537, 131071, 200_003, 2**20 + 5,
             2**30, 2**31 - 2, 2**31 - 1]


@pytest.mark.parametrize("beta", BETAS)
def test_bias_denominator_is_binary_exponentiation(beta):
    """1 − β^t from the reference's table (and its high-bit continuation) equals the float64
    loop bit for bit, for t across the table's edge (2^16) and up to the saturated count."""
    from glofnd.reference import _bias_denominator
    e = torch.tensor(EXPONENTS, dtype=torch.int64)
    got = _bias_denominator(beta, e)
    want = torch.tensor([1.0 - binary_power(beta, int(t)) for t in EXPONENTS],
                        dtype=torch.float64)
    assert got.dtype == torch.float64
    assert torch.equal(got, want), (got - want).abs().max()


@needs_c
@pytest.mark.parametrize("betas", [(0.9, 0.98), (0.9, 0.99999), (0.99999, 0.9999)])
@pytest.mark.parametrize("step", [0, 70_000, 2**40 + 3])
def test_large_step_counts_equal_reference_bytes(betas, step):
    """Samples updated more than 2^16 times (or epoch-based t > 2^16), with betas on both sides
    of the reference's shortcut: C and reference give the same bytes."""
    out = []
    for name in ("c", "reference"):
        state = random_state(50, 3)
        state["steps"][:25] = torch.tensor([65534, 65535, 65536, 65537, 2**20, 2**31 - 2,
                                            2**31 - 1, 1, 0, 99_999] * 2 + [131071] * 5,
                                           dtype=torch.int32)
        g = torch.Generator().manual_seed(4)
        sim = torch.rand(30, 17, generator=g) * 2 - 1
        index = torch.randint(0, 25, (30,), generator=g)
        with glofnd.use_backend(name):
            mask, kept = op_step(sim, index, None, state, step=step, beta1=betas[0],
                                 beta2=betas[1])
        out.append((mask, kept, state))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    for k in STATE_KEYS:
        assert torch.equal(out[0][2][k], out[1][2][k]), k
    assert (out[0][2]["steps"][:25].long() > 65536).any()


@needs_c
def test_large_state_prefetched_up_front_equals_reference_bytes():
    """From 2^18 samples the kernels prefetch the whole batch's state entries before the groups
    run (csrc/threshold.c); the bytes are those of the reference, as for a small state."""
    n = 300_000
    out = []
    for name in ("c", "reference"):
        state = random_state(n, 5)
        g = torch.Generator().manual_seed(6)
        for _ in range(3):
            sim = torch.rand(40, 33, generator=g) * 2 - 1
            idx = torch.randint(0, n, (20,), generator=g)
            with glofnd.use_backend(name):
                mask, kept = op_step(sim, torch.cat([idx, idx]), None, state)
        out.append((mask, kept, state))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    for k in STATE_KEYS:
        assert torch.equal(out[0][2][k], out[1][2][k]), k


def test_group_ids_of_a_strided_index():
    """A strided index (a column of the multi-process records) groups as a contiguous one,
    without a warning (pytest turns warnings into errors)."""
    from glofnd.reference import group_ids
    records = torch.tensor([[5, 0], [2, 0], [5, 0], [9, 0], [2, 0]])
    gid = group_ids(records[:, 0])
    assert gid.tolist() == group_ids(records[:, 0].clone()).tolist()
    assert gid[0] == gid[2] and gid[1] == gid[4] and len({int(gid[0]), int(gid[1]), int(gid[3])}) == 3
