"""The fused kernels of the losses: the InfoNCE and SogCLR forward and backward (csrc/loss.c)
against a float64 formula written here and against the torch reference, and the λ update inside
the loss's pass (excluded columns) against the reference step with the same validity as a mask,
bit for bit."""
import contextlib
import math

import numpy as np
import pytest
import torch

import glofnd
from glofnd import _ops, reference

from helpers import clone_state, random_state

needs_c = pytest.mark.skipif(_ops._C is None, reason="C extension not built")


def formula(sim, positive, own, thr, removed, scale, per_row, ratio):
    """Row by row in float64 with Python floats: the loss -log(e^P / (e^P + K/|M| Σ_M e^{cs}))."""
    out, kept_all = [], []
    s = sim.double().tolist()
    for r, row in enumerate(s):
        kept = []
        for j, x in enumerate(row):
            if j == int(positive[r]) or (own is not None and j == int(own[r])):
                continue
            if thr is not None and x > float(thr[r]) and x != math.inf:
                continue
            if removed is not None and bool(removed[r, j]):
                continue
            kept.append(x)
        p = scale * row[int(positive[r])]
        rho = math.log(max(per_row, 1) / len(kept)) if ratio and kept else 0.0
        terms = [p] + [scale * x + rho for x in kept]
        big = max(terms)
        out.append(big + math.log(sum(math.exp(t - big) for t in terms)) - p)
        kept_all.append(len(kept))
    return torch.tensor(out, dtype=torch.float64), torch.tensor(kept_all)


def case(rows, cols, mode, seed, dtype=torch.float32, unimodal=True):
    g = torch.Generator().manual_seed(seed)
    sim = (torch.rand(rows, cols, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    positive = torch.randint(0, cols, (rows,), generator=g)
    own = torch.randint(-1, cols, (rows,), generator=g) if unimodal else None
    thr = removed = None
    if mode == "thr":
        thr = (torch.rand(rows, generator=g) * 1.4 - 0.4).float()
    elif mode == "removed":
        removed = torch.rand(rows, cols, generator=g) < 0.3
    return sim, positive, own, thr, removed


SIZES = [(1, 2), (3, 17), (16, 16), (33, 70), (64, 300)]
MODES = ["none", "thr", "removed"]


@needs_c
@pytest.mark.parametrize("rows,cols", SIZES)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("unimodal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_equals_float64_formula(rows, cols, mode, unimodal, dtype):
    sim, positive, own, thr, removed = case(rows, cols, mode, rows * cols, dtype, unimodal)
    ratio = mode != "none"
    scale = torch.tensor(7.5, dtype=dtype)
    loss, lse, kept = _ops.info_nce(sim, positive, own, thr, removed, scale, cols - 2, ratio)
    want, want_kept = formula(sim, positive, own, thr, removed, 7.5, cols - 2, ratio)
    assert torch.equal(kept, want_kept)
    tol = 1e-5 if dtype == torch.float32 else 1e-12  # relative, on values of order 1-10
    torch.testing.assert_close(loss.double(), want, rtol=tol, atol=tol)
    assert loss.dtype == dtype and lse.dtype == dtype


@needs_c
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("unimodal", [True, False])
def test_gradients_equal_the_reference_and_gradcheck(mode, unimodal):
    sim, positive, own, thr, removed = case(24, 50, mode, 3, torch.float64, unimodal)
    ratio = mode != "none"
    grads = []
    for backend in ("c", "reference"):
        s = sim.clone().requires_grad_()
        c = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
        with _ops.use_backend(backend):
            loss = _ops.info_nce(s, positive, own, thr, removed, c, 48, ratio)[0]
            (loss * torch.linspace(0.5, 1.5, 24, dtype=torch.float64)).sum().backward()
        grads.append((s.grad, c.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-10, atol=1e-12)
    s = sim.clone().requires_grad_()
    c = torch.tensor(4.0, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b: _ops.info_nce(a, positive, own, thr, removed, b, 48, ratio)[0], (s, c))


@needs_c
def test_float32_gradients_match_float64():
    sim, positive, own, thr, _ = case(64, 300, "thr", 5)
    out = []
    for dtype in (torch.float32, torch.float64):
        s = sim.to(dtype).detach().clone().requires_grad_()
        c = torch.tensor(10.0, dtype=dtype, requires_grad=True)
        _ops.info_nce(s, positive, own, thr, None, c, 298, True)[0].mean().backward()
        out.append((s.grad.double(), c.grad.double()))
    # gradients up to 1/R = 0.016: float32 rounding of c·s (c = 10) moves them by < 1e-7
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(out[0][1], out[1][1], rtol=1e-4, atol=1e-6)


@needs_c
@pytest.mark.parametrize("isa", ["base", "avx2", "avx512"])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("unimodal", [True, False])
def test_same_bytes_for_every_thread_count_and_instruction_set(isa, mode, unimodal):
    """Every kernel (InfoNCE, SogCLR, the fused forward) gives the same bytes on every
    instruction set and thread count. The base and AVX2 kernels run the scalar 16-lane loops,
    the AVX-512 ones the vector loops, whose spans end in partial blocks (333 columns split at
    one or two random excluded columns): their lanes must match entry for entry."""
    if isa != "base" and isa != _ops._C.isa() and not _isa_available(isa):
        pytest.skip(f"{isa} not available")
    sim, positive, own, thr, removed = case(300, 333, mode, 9, unimodal=unimodal)
    grad = torch.rand(300, generator=torch.Generator().manual_seed(1))
    ref = _run(sim, positive, own, thr, removed, grad, None, 1)
    try:
        for threads in (1, 2, 4):
            got = _run(sim, positive, own, thr, removed, grad, isa, threads)
            assert got.keys() == ref.keys()
            for key in ref:
                assert torch.equal(got[key], ref[key]), key
    finally:
        _ops._C.set_isa(None)


def _isa_available(isa):
    try:
        _ops._C.set_isa(isa)
        return True
    except ValueError:
        return False
    finally:
        _ops._C.set_isa(None)


def _run(sim, positive, own, thr, removed, grad, isa, threads):
    """The outputs of every kernel family on one case, by name (the fused forward only where
    nothing is given to remove: it makes its own thresholds)."""
    if isa is not None:
        _ops._C.set_isa(isa)
    n, pos, g = sim.numpy(), positive.numpy(), grad.numpy()
    own_, thr_, rem_ = (None if t is None else t.numpy() for t in (own, thr, removed))
    per_row = sim.shape[1] - (2 if own is not None else 1)
    out = {}
    loss, lse, kept = _ops._C.info_nce_forward(n, pos, own_, thr_, rem_, 3.0, per_row, True,
                                               threads)
    dsim, dscale = _ops._C.info_nce_backward(g, n, pos, own_, thr_, rem_, 3.0, per_row, True,
                                             lse, kept, True, threads)
    out.update(loss=loss, lse=lse, kept=kept, dsim=dsim, dscale=dscale)
    for shift in (True, False):
        lme, kept = _ops._C.sogclr_lme(n, pos, own_, thr_, rem_, 3.0, shift, threads)
        log_u = np.nan_to_num(lme, neginf=0.0) + np.float32(0.25)
        fwd = _ops._C.sogclr_forward(n, pos, own_, thr_, rem_, 3.0, shift, not shift, log_u,
                                     kept, threads)
        bwd = _ops._C.sogclr_backward(g, n, pos, own_, thr_, rem_, 3.0, shift, not shift,
                                      log_u, kept, threads)
        out.update({f"lme{shift}": lme, f"kept{shift}": kept, f"sog{shift}": fwd,
                    f"dsog{shift}": bwd})
    if thr is None and removed is None:
        index = torch.randint(0, 50, (sim.shape[0],),
                              generator=torch.Generator().manual_seed(2)).numpy()
        for kind in (0, 1, 2):
            st = random_state(50, 3)
            res = _ops._C.fused_forward(n, pos, own_, index, *(t.numpy() for t in st.values()),
                                        3.0, kind, per_row, True, 0.3, 0.05, 0.9, 0.98, 1e-8,
                                        -1.0, 1.0, 0, 0, True, threads)
            out.update({f"fused{kind}_{i}": x for i, x in enumerate(res) if x is not None})
            out.update({f"state{kind}_{k}": v for k, v in st.items()})
    return {k: v if isinstance(v, torch.Tensor) else torch.from_numpy(v) for k, v in out.items()}


@needs_c
@pytest.mark.parametrize("unimodal", [True, False])
def test_whole_rows_backward_as_without_thresholds(unimodal):
    """A row with nothing above its threshold runs its backward without the comparisons: its
    gradient has the bytes of the same row with no threshold at all; the other rows, with one
    entry or more removed, match the float64 formula."""
    sim, positive, own, thr, _ = case(60, 70, "thr", 4, unimodal=unimodal)
    thr[::3] = 2.0  # nothing above: whole rows
    thr[1::3] = sim.max(1).values[1::3] - 1e-3  # the row's max only (or a tie) removed
    per_row = 70 - (2 if unimodal else 1)
    grads = []
    for t in (thr, None):
        s = sim.clone().requires_grad_()
        loss, _, kept = _ops.info_nce(s, positive, own, t, None, torch.tensor(3.0), per_row, True)
        loss.sum().backward()
        grads.append(s.grad)
    whole = torch.arange(60) % 3 == 0
    assert torch.equal(grads[0][whole], grads[1][whole])
    assert not torch.equal(grads[0][~whole], grads[1][~whole])
    s = sim.double().requires_grad_()  # the torch reference in float64
    reference.info_nce(s, positive, own, thr, None, torch.tensor(3.0, dtype=torch.float64),
                       per_row, True)[0].sum().backward()
    torch.testing.assert_close(grads[0].double(), s.grad, rtol=1e-4, atol=1e-6)


class _NoGradToFirst(torch.autograd.Function):
    """x.sum() + y.sum() whose backward gives x no gradient (None)."""

    @staticmethod
    def forward(ctx, x, y):
        return x.sum() + y.sum()

    @staticmethod
    def backward(ctx, g):
        return None, g.expand(3)


@needs_c
@pytest.mark.parametrize("method", ["none", "glofnd"])
def test_backward_without_a_gradient_for_the_loss(method):
    """The InfoNCE does not materialise zero gradients for its outputs: when what follows gives
    the loss no gradient (None), its backward gives none either, and the features get none."""
    loss = glofnd.GloFNDLoss(10, method=method)
    z0, z1 = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    y = torch.randn(3, requires_grad=True)
    _NoGradToFirst.apply(loss(z0, z1, torch.arange(4)), y).backward()
    assert z0.grad is None and z1.grad is None and torch.equal(y.grad, torch.ones(3))


@needs_c
def test_edge_rows():
    """A row with every negative removed has loss 0; a kept NaN makes its row NaN and no other;
    the excluded columns get no gradient (a NaN row's gradient is NaN even where its weight is 0,
    as torch's logsumexp gives)."""
    sim = torch.tensor([[0.9, 0.5, 0.4, 0.3], [0.2, 0.9, float("nan"), 0.1],
                        [0.1, 0.2, 0.9, 0.3]])
    positive = torch.tensor([0, 1, 2])
    own = torch.tensor([3, -1, 0])
    thr = torch.tensor([0.0, 0.95, 0.95])
    s = sim.clone().requires_grad_()
    loss, lse, kept = _ops.info_nce(s, positive, own, thr, None, torch.tensor(2.0), 2, True)
    assert loss[0].item() == 0 and kept.tolist() == [0, 3, 2]
    assert math.isnan(loss[1].item()) and not math.isnan(loss[2].item())
    loss[2].backward()
    assert s.grad[2, 0] == 0 and s.grad[2, 2] < 0 and (s.grad[0] == 0).all()


@needs_c
@pytest.mark.parametrize("bad,exc,name", [
    ({"sim": np.zeros((2, 3), np.float16)}, TypeError, "sim"),
    ({"sim": np.zeros((3, 2), np.float32).T}, ValueError, "sim"),
    ({"positive": np.zeros(2, np.int32)}, TypeError, "positive"),
    ({"positive": np.zeros(3, np.int64)}, ValueError, "positive"),
    ({"positive": np.array([0, 3])}, IndexError, "positive"),
    ({"own": np.array([0, 5])}, IndexError, "own"),
    ({"thr": np.zeros(2, np.float64)}, TypeError, "thr"),
    ({"removed": np.zeros((2, 2), bool)}, ValueError, "removed"),
])
def test_binding_rejects_bad_arrays(bad, exc, name):
    args = {"sim": np.zeros((2, 3), np.float32), "positive": np.array([0, 1]), "own": None,
            "thr": None, "removed": None}
    args.update(bad)
    with pytest.raises(exc, match=name):
        _ops._C.info_nce_forward(args["sim"], args["positive"], args["own"], args["thr"],
                                 args["removed"], 1.0, 2, True, 1)


def test_fake_kernel_traces_under_compile():
    sim, positive, own, thr, _ = case(8, 8, "thr", 1)
    f = torch.compile(lambda s, c: _ops.info_nce(s, positive, own, thr, None, c, 6, True)[0],
                      backend="eager", fullgraph=True)
    c = torch.tensor(2.0)
    torch.testing.assert_close(f(sim, c), _ops.info_nce(sim, positive, own, thr, None, c, 6,
                                                         True)[0])


# ---------------------------------------------------------------------------- SogCLR kernels

@needs_c
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sogclr_kernels_equal_the_torch_formula(mode, shift, dtype):
    """log-mean-exp, kept counts, surrogate and its gradient: the C kernels against the torch
    formula of glofnd.reference, whose gradient here is torch's autograd through it (the
    weights detached), not the hand-written backward."""
    sim, positive, own, thr, removed = case(33, 70, mode, 11, dtype, unimodal=not shift)
    sim[0, 3] = sim[0, 5] = 0.25  # ties
    lme, kept = _ops.sogclr_lme(sim, positive, own, thr, removed, 6.0, shift)
    want_lme, want_kept = reference.sogclr_lme(sim, positive, own, thr, removed, 6.0, shift)
    assert torch.equal(kept, want_kept)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(lme, want_lme, rtol=tol, atol=tol)
    log_u = (want_lme + 0.2).clamp(min=-5.0)
    weights = torch.linspace(0.5, 1.5, 33, dtype=dtype)
    grads = []
    for fn in (_ops.sogclr_surrogate, reference.sogclr_surrogate):
        s = sim.clone().requires_grad_()
        value = fn(s, positive, own, thr, removed, 6.0, shift, not shift, log_u, kept)
        (value * weights).sum().backward()
        grads.append((value.detach(), s.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=tol, atol=tol)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=tol, atol=tol)


@needs_c
def test_sogclr_same_bytes_for_every_thread_count():
    sim, positive, _, thr, _ = case(300, 333, "thr", 4, unimodal=False)
    grad = torch.rand(300)
    out = []
    for threads in (1, 2, 4):
        torch.set_num_threads(threads)
        lme, kept = _ops.sogclr_lme(sim, positive, None, thr, None, 10.0, True)
        s = sim.clone().requires_grad_()
        v = _ops.sogclr_surrogate(s, positive, None, thr, None, 10.0, True, False, lme, kept)
        (v * grad).sum().backward()
        out.append((lme, kept, v.detach(), s.grad))
    for other in out[1:]:
        for a, b in zip(out[0], other):
            assert torch.equal(a, b)


# ----------------------------------------------- the forward with the update in the same pass

def fused_case(rows, cols, seed, dtype=torch.float32, unimodal=True, n=30):
    sim, positive, own, _, _ = case(rows, cols, "none", seed, dtype, unimodal)
    g = torch.Generator().manual_seed(seed + 1)
    index = torch.randint(0, n, (rows,), generator=g)
    sim[1, :] = float("nan")
    sim[2, 3] = float("inf")
    return sim, positive, own, index


ARGS = (0.1, 0.05, 0.9, 0.98, 1e-8, -1.0, 1.0, 0, 0)  # alpha lr beta1 beta2 eps lo hi opt step


@pytest.mark.parametrize("kind", [0, 1, 2])
@pytest.mark.parametrize("update", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n", [30, 300_000])  # 300,000: the batch's entries prefetched up front
# 60 columns: the C driver takes 8 groups per batch; 4200 (a group's rows >= 16 KiB): one
@pytest.mark.parametrize("rows,cols", [(45, 60), (12, 4200)])
def test_fused_forward_equals_update_then_forward(backend, kind, update, dtype, n, rows, cols):
    """One pass that counts, updates λ and sums: the state is bit-identical to the reference
    threshold_step with all but the own column and positive valid, and the outputs equal those of
    info_nce / sogclr_lme given the new λ (to float rounding: the stabiliser differs)."""
    unimodal = kind != 1
    sim, positive, own, index = fused_case(rows, cols, kind + 7 * update, dtype, unimodal)
    state = random_state(n, seed=3)
    a, b = clone_state(state), clone_state(state)
    out0, out1, kept, thr = _ops.fused_forward(sim, positive, own, index, *a.values(), 8.0,
                                               kind, cols - 2, True, *ARGS[:-2], 0, 0, update)
    exclude = positive.unsqueeze(1) if own is None else torch.stack([positive, own], 1)
    if update:
        with _ops.use_backend("reference"):
            _ops.threshold_step(sim, index, reference.exclusion_valid(sim, exclude), *b.values(),
                                *ARGS, True)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert torch.equal(thr, b["lambdas"][index])
    if kind == 0:
        want = reference.info_nce(sim, positive, own, thr, None, torch.tensor(8.0, dtype=dtype),
                                  cols - 2, True)
        got = (out0, out1, kept)
    else:
        want = reference.sogclr_lme(sim, positive, own, thr, None, 8.0, kind == 1)
        got = (out0, kept)
        assert out1.numel() == 0
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    # row 1 is all NaN, row 2 keeps a +inf: both non-finite (torch's logsumexp gives +inf
    # where the kernel gives NaN for the latter); the others agree
    assert torch.isnan(out0[1]) and not torch.isfinite(out0[2]) and not torch.isfinite(want[0][2])
    finite = torch.ones(rows, dtype=torch.bool)
    finite[1:3] = False
    for x, y in zip(got, want):
        torch.testing.assert_close(x[finite], y[finite], rtol=tol, atol=tol)


@needs_c
@pytest.mark.parametrize("kind", [0, 2])
def test_fused_forward_underflow_falls_back_to_the_kept_max(kind):
    """A row whose removed entries lie far above its kept ones (scale 100: e^{-150}) would sum
    to 0 against the max over every entry; the kernel then stabilises with the kept max."""
    sim = torch.full((4, 6), -0.6)
    sim[:, 0] = 0.9  # above λ = 0: removed
    sim[:, 5] = torch.tensor([0.1, 0.2, -0.7, 0.0])  # the positive
    positive = torch.full((4,), 5)
    own = torch.full((4,), -1)
    index = torch.arange(4)
    state = random_state(4, seed=0)
    state["lambdas"].zero_()
    out0, _, kept, thr = _ops.fused_forward(sim, positive, own, index, *state.values(), 100.0,
                                            kind, 5, True, *ARGS[:-2], 0, 0, False)
    assert kept.tolist() == [4] * 4
    if kind == 0:
        want = reference.info_nce(sim.double(), positive, own, thr, None,
                                  torch.tensor(100.0, dtype=torch.float64), 5, True)[0]
    else:
        want = reference.sogclr_lme(sim.double(), positive, own, thr, None, 100.0, False)[0]
    assert torch.isfinite(out0).all()
    torch.testing.assert_close(out0.double(), want, rtol=1e-5, atol=1e-5)


@needs_c
def test_fused_forward_same_bytes_for_every_thread_count_and_instruction_set():
    sim, positive, own, index = fused_case(400, 333, 2, n=150)
    out = []
    isas = [i for i in ("base", "avx2", "avx512") if _isa_available(i)]
    try:
        for isa in isas:
            _ops._C.set_isa(isa)
            for threads in (1, 2, 4):
                torch.set_num_threads(threads)
                state = random_state(150, seed=1)
                res = _ops.fused_forward(sim, positive, own, index, *state.values(), 10.0, 0,
                                         331, True, *ARGS[:-2], 0, 0, True)
                out.append((*res, *state.values()))
    finally:
        _ops._C.set_isa(None)
    for other in out[1:]:
        for x, y in zip(out[0], other):
            torch.testing.assert_close(x, y, rtol=0, atol=0, equal_nan=True)


@needs_c
@pytest.mark.parametrize("bad,exc,name", [
    ({"kind": 3}, ValueError, "kind"),
    ({"index": np.array([0, 30])}, IndexError, "index"),
    ({"lambdas": np.zeros(30, np.float64)}, TypeError, "lambdas"),
    ({"alpha": 1.5}, ValueError, "alpha"),
])
def test_fused_binding_rejects_bad_arguments(bad, exc, name):
    state = {k: v.numpy() for k, v in random_state(30, seed=0).items()}
    before = {k: v.copy() for k, v in state.items()}
    args = dict(sim=np.zeros((2, 3), np.float32), positive=np.array([0, 1]), own=None,
                index=np.array([0, 1]), **state, scale=1.0, kind=0, per_row=2, ratio=True,
                alpha=0.1, lr=0.05, beta1=0.9, beta2=0.98, eps=1e-8, lo=-1.0, hi=1.0,
                optimizer=0, step=0, update=True, num_threads=1)
    args.update(bad)
    with pytest.raises(exc, match=name):
        _ops._C.fused_forward(*args.values())
    for k in before:
        assert np.array_equal(before[k], state[k])


# ------------------------------------------------------------- the losses' eager entry points

@needs_c
def test_eager_functions_equal_the_ops():
    """The losses' autograd.Functions (eager, no dispatcher) give the ops' values and
    gradients; under a dispatch mode they go through the ops (the mode sees the calls)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func))
            return func(*args, **(kwargs or {}))

    sim, positive, own, thr, _ = case(20, 30, "thr", 8)
    out = []
    for mode in (None, Seen()):
        s = sim.clone().requires_grad_()
        c = torch.tensor(5.0, requires_grad=True)
        with mode if mode is not None else contextlib.nullcontext():
            loss, kept, _ = _ops.info_nce_loss(s, c, positive, own, thr, None, 28, True)
            lme, k2 = _ops.call_sogclr_lme(sim, positive, own, thr, None, 5.0, False)
            sog = _ops.sogclr_loss(s, positive, own, thr, None, 5.0, False, True, lme, k2)
            (loss.sum() + sog.sum()).backward()
        out.append((loss.detach(), kept, sog.detach(), s.grad, c.grad))
        if mode is not None:
            assert {"glofnd.info_nce.default", "glofnd.sogclr_lme.default",
                    "glofnd.info_nce_backward.default"} <= mode.ops
    ref = []
    s = sim.clone().requires_grad_()
    c = torch.tensor(5.0, requires_grad=True)
    loss, _, kept = _ops.info_nce(s, positive, own, thr, None, c, 28, True)
    lme, k2 = _ops.sogclr_lme(sim, positive, own, thr, None, 5.0, False)
    sog = _ops.sogclr_surrogate(s, positive, own, thr, None, 5.0, False, True, lme, k2)
    (loss.sum() + sog.sum()).backward()
    ref = (loss.detach(), kept, sog.detach(), s.grad, c.grad)
    for got in out:
        for x, y in zip(got, ref):
            assert torch.equal(x, y)


@needs_c
def test_glofnd_step_under_a_dispatch_mode_goes_through_the_op():
    """GloFND.step calls the CPU kernel directly in plain eager mode and through the dispatcher
    under a dispatch mode: the same bytes either way, and the mode sees the op."""
    import glofnd
    from torch.utils._python_dispatch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        ops: set = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.add(str(func))
            return func(*args, **(kwargs or {}))

    sim, _, _, index = fused_case(40, 30, 3)
    out = []
    for mode in (contextlib.nullcontext(), Seen()):
        fnd = glofnd.GloFND(30, alpha=0.1)
        with mode:
            mask, kept = fnd.step(sim, index)
        out.append((mask, kept, *fnd.state_dict().values()))
    assert "glofnd.threshold_step.default" in Seen.ops
    for x, y in zip(*out):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y)


@needs_c
def test_losses_go_through_the_ops_when_modes_cannot_be_checked(monkeypatch):
    """Without torch's private mode checks (another torch version), every call dispatches: the
    same values and gradients."""
    import glofnd

    def run():
        loss = glofnd.GloFNDLoss(30, alpha=0.2, init_lambda=0.3)
        z = torch.randn(6, 5, generator=torch.Generator().manual_seed(0), requires_grad=True)
        value = loss(z, z.detach() + 0.1, torch.arange(6))
        value.backward()
        return value.detach(), z.grad, loss.fnd.lambdas.clone()

    direct = run()
    monkeypatch.setattr(_ops, "_dispatch_depth", lambda: 1)
    for x, y in zip(direct, run()):
        assert torch.equal(x, y)
