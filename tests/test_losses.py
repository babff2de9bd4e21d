"""Tests of glofnd.GloFNDLoss and glofnd.GloFNDClipLoss.

The expected values are the formulas of docs/losses.md written here again, row by row in float64
(loops, no code shared with glofnd.functional); peers: pytorch_metric_learning's NTXentLoss and
open_clip's ClipLoss formula. Tolerances: 1e-10 (float64 against float64), 1e-5 (float32).
"""
import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F

import glofnd
from glofnd import _ops
from glofnd import functional as Fn
from glofnd.losses import METHODS, gathered_step
from helpers import import_peer

B, D = 6, 5
TAU = 0.5
SCALE = 4.0


def batch(seed, b=B, d=D, n_classes=3, dtype=torch.float64, n=20):
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(b, d, generator=g, dtype=torch.float64).to(dtype)
    z1 = (z0.double() + 0.5 * torch.randn(b, d, generator=g, dtype=torch.float64)).to(dtype)
    index = torch.randperm(n, generator=g)[:b]
    labels = torch.randint(0, n_classes, (b,), generator=g)
    return z0, z1, index, labels


def unit(x):
    return x.double() / x.double().norm(dim=1, keepdim=True)


def make(cls, method, base, **kw):
    kw.setdefault("alpha", 0.2)
    kw.setdefault("init_lambda", 0.3)
    if cls is glofnd.GloFNDLoss:
        kw.setdefault("temperature", TAU)
    return cls(20, base=base, method=method, **kw)


# ---------------------------------------------------------------- reference formulas (docs/losses.md)

def simclr_layout(z0, z1):
    """Row r of [z0|z1] against columns [z0|z1]: (sim, positive column, valid negatives)."""
    e = unit(torch.cat([z0, z1]))
    n, b = e.shape[0], z0.shape[0]
    pos = [(r + b) % n for r in range(n)]
    valid = torch.tensor([[j != r and j != pos[r] for j in range(n)] for r in range(n)])
    return e @ e.T, pos, valid


def ref_info_nce_row(logits, p, valid_row, removed_row):
    negs = [j for j in range(len(logits)) if valid_row[j]]
    kept = [j for j in negs if not removed_row[j]]
    denom = torch.exp(logits[p])
    if kept:
        denom = denom + len(negs) / len(kept) * sum(torch.exp(logits[j]) for j in kept)
    return -(logits[p] - torch.log(denom))


def ref_simclr(z0, z1, tau, removed):
    sim, pos, valid = simclr_layout(z0, z1)
    rows = [ref_info_nce_row(sim[r] / tau, pos[r], valid[r], removed[r]) for r in range(len(pos))]
    return torch.stack(rows).mean()


def ref_sogclr_rows(sim, pos_sim, valid, removed, ids, u, tau, gamma, positive_logit=True):
    """Per-row SogCLR surrogate and the new u (a dict) following docs/losses.md. ``sim`` rows hold
    s (unimodal) or s − s_ii (bimodal, pos_sim = 0)."""
    losses, u_rows = [], {}
    for r in range(sim.shape[0]):
        kept = [j for j in range(sim.shape[1]) if valid[r, j] and not removed[r, j]]
        i = int(ids[r])
        old = float(u[i])
        if kept:
            g = sum(math.exp(float(sim[r, j].detach()) / tau) for j in kept) / len(kept)
            ur = g if old == 0 else (1 - gamma) * old + gamma * g
            u_rows.setdefault(i, []).append(ur)
            weights = [math.exp(float(sim[r, j].detach()) / tau) / ur for j in kept]
            term = sum(w * sim[r, j] for w, j in zip(weights, kept)) / len(kept)
        else:
            term = 0.0 * sim[r, 0]
        losses.append(-pos_sim[r] + term)
    new_u = {i: sum(v) / len(v) for i, v in u_rows.items()}
    return torch.stack(losses), new_u


def ref_clip(img, txt, scale, removed_i, removed_t):
    s = unit(img) @ unit(txt).T
    b = s.shape[0]
    valid = ~torch.eye(b, dtype=torch.bool)
    li = torch.stack([ref_info_nce_row(scale * s[i], i, valid[i], removed_i[i]) for i in range(b)])
    lt = torch.stack([ref_info_nce_row(scale * s.T[i], i, valid[i], removed_t[i])
                      for i in range(b)])
    return (li.mean() + lt.mean()) / 2


def expected_removed(loss, sim, valid, ids, labels, fnd=None):
    """The mask each method must apply, from the state *after* the call (λ updated first)."""
    method = loss.method
    if method == "none":
        return torch.zeros_like(valid)
    if method == "oracle":
        return (labels[:, None] == labels[None, :]) & valid
    if method == "fnc":
        thr = torch.nanquantile(sim.masked_fill(~valid, math.nan), 1 - loss.alpha, dim=1)
        return (sim > thr[:, None]) & valid
    lam = fnd.lambdas.double()
    lam = lam[ids] if method == "glofnd" else lam[0].expand(len(ids))
    return (sim > lam[:, None]) & valid


# ---------------------------------------------------------------- values against the formulas

@pytest.mark.parametrize("method", METHODS)
def test_simclr_matches_formula(method, backend):
    loss = make(glofnd.GloFNDLoss, method, "simclr")
    for step in range(3):
        z0, z1, index, labels = batch(step)
        value = loss(z0, z1, index, labels)
        sim, _, valid = simclr_layout(z0, z1)
        ids, lab = torch.cat([index, index]), torch.cat([labels, labels])
        removed = expected_removed(loss, sim, valid, ids, lab, loss.fnd)
        want = ref_simclr(z0, z1, TAU, removed)
        torch.testing.assert_close(value, want, rtol=1e-10, atol=1e-12)
        if method != "none":
            assert loss.last_stats["removed"] == pytest.approx(
                removed.sum().item() / valid.sum().item())
    if method in ("glofnd", "single"):
        assert loss.last_stats["removed"] > 0  # the masked branch was exercised


@pytest.mark.parametrize("method", ["glofnd", "single"])
def test_learned_lambda_is_fed_from_both_views(method, backend):
    loss = make(glofnd.GloFNDLoss, method, "simclr")
    twin = glofnd.GloFND(20 if method == "glofnd" else 1, alpha=0.2, init_lambda=0.3)
    for step in range(3):
        z0, z1, index, _ = batch(step)
        loss(z0, z1, index)
        sim, _, valid = simclr_layout(z0, z1)
        ids = torch.cat([index, index])
        twin.step(sim, ids if method == "glofnd" else torch.zeros_like(ids), valid)
        assert torch.equal(loss.fnd.lambdas, twin.lambdas)
        assert torch.equal(loss.fnd.steps, twin.steps)


@pytest.mark.parametrize("method", METHODS)
def test_sogclr_matches_formula(method, backend):
    gamma = 0.7
    loss = make(glofnd.GloFNDLoss, method, "sogclr", gamma=gamma)
    for step in range(3):  # the first call takes ĝ as is, the later ones move u
        z0, z1, index, labels = batch(step % 2)  # repeated indices: u is moved, not reset
        u_before = loss.u.double().clone()
        value = loss(z0, z1, index, labels)
        sim, pos, valid = simclr_layout(z0, z1)
        ids, lab = torch.cat([index, index]), torch.cat([labels, labels])
        removed = expected_removed(loss, sim, valid, ids, lab, loss.fnd)
        pos_sim = torch.stack([sim[r, pos[r]] for r in range(len(pos))])
        rows, new_u = ref_sogclr_rows(sim, pos_sim, valid, removed, ids, u_before, TAU, gamma)
        torch.testing.assert_close(value, rows.mean(), rtol=1e-10, atol=1e-12)
        for i, want in new_u.items():
            assert loss.u[i].item() == pytest.approx(want, rel=1e-6)
        untouched = torch.ones(20, dtype=torch.bool)
        untouched[index] = False
        assert torch.equal(loss.u[untouched].double(), u_before[untouched])


@pytest.mark.parametrize("method", METHODS)
def test_clip_matches_formula(method, backend):
    clip = make(glofnd.GloFNDClipLoss, method, "clip")
    for step in range(3):
        img, txt, index, labels = batch(step)
        value = clip(img, txt, torch.tensor(SCALE, dtype=torch.float64), index, labels)
        s = unit(img) @ unit(txt).T
        valid = ~torch.eye(B, dtype=torch.bool)
        rem_i = expected_removed(clip, s, valid, index, labels, clip.fnd_image)
        rem_t = expected_removed(clip, s.T, valid, index, labels, clip.fnd_text)
        torch.testing.assert_close(value, ref_clip(img, txt, SCALE, rem_i, rem_t),
                                   rtol=1e-10, atol=1e-12)
        # both directions as one block of 2B rows, and each on its own
        stats = clip.last_stats
        for key, rem in (("removed", rem_i.sum() + rem_t.sum()), ("image_removed", rem_i.sum()),
                         ("text_removed", rem_t.sum())):
            n = valid.sum() * (2 if key == "removed" else 1)
            assert stats[key] == pytest.approx(rem.item() / n.item(), rel=1e-12), key
    if method in ("glofnd", "single"):
        assert clip.last_stats["removed"] > 0  # the masked branch was exercised
    if method == "glofnd":
        # image→text feeds λ^img, text→image feeds λ^txt: two different states (a single λ
        # pools all entries of s and of s.T alike, so its two copies agree)
        assert not torch.equal(clip.fnd_image.lambdas, clip.fnd_text.lambdas)


@pytest.mark.parametrize("method", METHODS)
def test_clip_sogclr_matches_formula(method, backend):
    gamma = 0.6
    clip = make(glofnd.GloFNDClipLoss, method, "sogclr", gamma=gamma)
    tau = 1 / SCALE
    for step in range(3):
        img, txt, index, labels = batch(step % 2)
        u_i, u_t = clip.u_image.double().clone(), clip.u_text.double().clone()
        value = clip(img, txt, SCALE, index, labels)
        s = unit(img) @ unit(txt).T
        valid = ~torch.eye(B, dtype=torch.bool)
        terms = []
        for sim, u, fnd, u_after in ((s, u_i, clip.fnd_image, clip.u_image),
                                     (s.T, u_t, clip.fnd_text, clip.u_text)):
            removed = expected_removed(clip, sim, valid, index, labels, fnd)
            diff = sim - sim.diagonal()[:, None]
            rows, new_u = ref_sogclr_rows(diff, torch.zeros(B, dtype=torch.float64), valid,
                                          removed, index, u, tau, gamma)
            terms.append(rows.mean())
            for i, want in new_u.items():
                assert u_after[i].item() == pytest.approx(want, rel=1e-6)
        torch.testing.assert_close(value, (terms[0] + terms[1]) / 2, rtol=1e-10, atol=1e-12)


def test_none_equals_pytorch_metric_learning_ntxent():
    NTXentLoss = import_peer("pytorch_metric_learning.losses").NTXentLoss
    loss = glofnd.GloFNDLoss(20, temperature=0.2, method="none")
    peer = NTXentLoss(temperature=0.2)
    for b in (1, 2, 7):
        z0, z1, index, _ = batch(b, b=b, dtype=torch.float32)
        ours = loss(z0, z1, index)
        theirs = peer(torch.cat([z0, z1]), torch.cat([torch.arange(b), torch.arange(b)]))
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_none_equals_open_clip_loss():
    clip = glofnd.GloFNDClipLoss(20, method="none")
    img, txt, index, _ = batch(3, dtype=torch.float32)
    img, txt = F.normalize(img, dim=1), F.normalize(txt, dim=1)  # open_clip's features are
    scale = torch.tensor(30.0, requires_grad=True)               # normalised by the model
    labels = torch.arange(B)
    logits = scale * img @ txt.T
    want = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    got = clip(img, txt, scale, index, output_dict=True)["contrastive_loss"]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    g_want, = torch.autograd.grad(want, scale)
    g_got, = torch.autograd.grad(got, scale)
    torch.testing.assert_close(g_got, g_want, rtol=1e-5, atol=1e-6)


def test_masked_info_nce_plain_is_cross_entropy():
    logits = torch.randn(5, 7, dtype=torch.float64)
    pos = torch.tensor([0, 3, 6, 1, 2])
    neg = torch.ones(5, 7, dtype=torch.bool)
    neg[torch.arange(5), pos] = False
    want = F.cross_entropy(logits, pos, reduction="none")
    torch.testing.assert_close(Fn.masked_info_nce(logits, pos, neg), want)
    none_removed = Fn.masked_info_nce(logits, pos, neg, torch.zeros_like(neg))
    assert torch.equal(none_removed, Fn.masked_info_nce(logits, pos, neg))  # log(K/K) = 0


@pytest.mark.parametrize("shape", [(1, 1), (3, 1), (4, 9), (5, 2)])
@pytest.mark.parametrize("q", [0.0, 0.5, 0.9, 0.99, 1.0])
def test_quantile_thresholds_match_nanquantile(shape, q):
    g = torch.Generator().manual_seed(shape[1])
    sim = torch.randn(shape, generator=g, dtype=torch.float64)
    valid = torch.rand(shape, generator=g) > 0.3
    valid[0] = False  # a row without valid entries gives NaN
    want = torch.nanquantile(sim.masked_fill(~valid, math.nan), q, dim=1)
    torch.testing.assert_close(Fn.quantile_thresholds(sim, valid, q), want, equal_nan=True)


def test_fn_scores_per_row_average():
    removed = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 1]], dtype=torch.bool)
    truth = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    s = Fn.fn_scores(removed, truth)
    p = (1 / 2 + 0 / 2) / 2   # rows 0 and 2 predict
    r = (1 / 1 + 0 / 1) / 2   # rows 0 and 1 have true false negatives
    assert s["precision"].item() == pytest.approx(p)
    assert s["recall"].item() == pytest.approx(r)
    assert s["f1"].item() == pytest.approx(2 * p * r / (p + r))


def test_oracle_diagnostics_are_perfect():
    loss = glofnd.GloFNDLoss(20, method="oracle")
    z0, z1, index, labels = batch(0, dtype=torch.float32)
    loss(z0, z1, index, labels)
    st = loss.last_stats
    assert st["precision"] == st["recall"] == st["f1"] == 1.0
    assert all(isinstance(v, float) for v in st.values())


# ---------------------------------------------------------------- gradients

def _frozen(cls, method, base, warm=2):
    """A loss whose λ has moved and then is frozen (lr=0), so that repeated calls agree."""
    obj = make(cls, method, base)
    for step in range(warm):
        a, b, index, labels = batch(10 + step)
        if cls is glofnd.GloFNDLoss:
            obj(a, b, index, labels)
        else:
            obj(a, b, SCALE, index, labels)
    for fnd in obj._fnds():
        fnd.lr = 0.0
    return obj


@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_simclr(method):
    loss = _frozen(glofnd.GloFNDLoss, method, "simclr")
    z0, z1, index, labels = batch(5, b=4, d=3)
    z0.requires_grad_(), z1.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: loss(a, b, index[:4], labels[:4]), (z0, z1))
    assert (loss.last_stats["removed"] > 0) == (method != "none")


@pytest.mark.parametrize("method", METHODS)
def test_gradcheck_clip(method):
    clip = _frozen(glofnd.GloFNDClipLoss, method, "clip")
    img, txt, index, labels = batch(5, b=4, d=3)
    scale = torch.tensor(SCALE, dtype=torch.float64, requires_grad=True)
    img.requires_grad_(), txt.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b, c: clip(a, b, c, index, labels),
                                    (img, txt, scale))
    assert (clip.last_stats["removed"] > 0) == (method != "none")


@pytest.mark.parametrize("base", ["simclr", "sogclr"])
@pytest.mark.parametrize("method", ["glofnd", "fnc", "oracle"])
def test_gradients_equal_reference(base, method):
    loss = _frozen(glofnd.GloFNDLoss, method, base)
    z0, z1, index, labels = batch(7)
    z0.requires_grad_(), z1.requires_grad_()
    u_before = loss.u.double().clone() if base == "sogclr" else None
    got = torch.autograd.grad(loss(z0, z1, index, labels), (z0, z1))
    sim, pos, valid = simclr_layout(z0, z1)
    ids, lab = torch.cat([index, index]), torch.cat([labels, labels])
    removed = expected_removed(loss, sim.detach(), valid, ids, lab, loss.fnd)
    assert removed.any()
    if base == "simclr":
        ref = ref_simclr(z0, z1, TAU, removed)
    else:
        pos_sim = torch.stack([sim[r, pos[r]] for r in range(len(pos))])
        ref = ref_sogclr_rows(sim, pos_sim, valid, removed, ids, u_before, TAU, 0.9)[0].mean()
    want = torch.autograd.grad(ref, (z0, z1))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("base", ["clip", "sogclr"])
def test_clip_gradients_equal_reference(base):
    clip = _frozen(glofnd.GloFNDClipLoss, "glofnd", base)
    img, txt, index, labels = batch(8)
    img.requires_grad_(), txt.requires_grad_()
    u = (clip.u_image.double().clone(), clip.u_text.double().clone()) if base == "sogclr" else None
    got = torch.autograd.grad(clip(img, txt, SCALE, index, labels), (img, txt))
    s = unit(img) @ unit(txt).T
    valid = ~torch.eye(B, dtype=torch.bool)
    rem_i = expected_removed(clip, s.detach(), valid, index, labels, clip.fnd_image)
    rem_t = expected_removed(clip, s.detach().T, valid, index, labels, clip.fnd_text)
    if base == "clip":
        ref = ref_clip(img, txt, SCALE, rem_i, rem_t)
    else:
        terms = []
        for sim, rem, uu in ((s, rem_i, u[0]), (s.T, rem_t, u[1])):
            diff = sim - sim.diagonal()[:, None]
            terms.append(ref_sogclr_rows(diff, torch.zeros(B, dtype=torch.float64), valid, rem,
                                         index, uu, 1 / SCALE, 0.9)[0].mean())
        ref = (terms[0] + terms[1]) / 2
    want = torch.autograd.grad(ref, (img, txt))
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-9, atol=1e-12)


def test_state_carries_no_gradient():
    loss = glofnd.GloFNDLoss(20, base="sogclr", alpha=0.2, init_lambda=0.0)
    z0, z1, index, _ = batch(0)
    z0.requires_grad_()
    loss(z0, z1, index).backward()
    for t in (loss.fnd.lambdas, loss.fnd.exp_avg, loss.u):
        assert not t.requires_grad and t.grad_fn is None
    assert [n for n, _ in loss.named_parameters()] == []


# ---------------------------------------------------------------- masking edge cases, precision

@pytest.mark.parametrize("base", ["simclr", "sogclr"])
def test_all_negatives_removed_stays_finite(base):
    loss = glofnd.GloFNDLoss(20, base=base, init_lambda=-1.0, lr=0.0)  # λ = −1 flags all
    z0, z1, index, _ = batch(0)
    z0.requires_grad_()
    value = loss(z0, z1, index)
    value.backward()
    assert loss.last_stats["removed"] == 1.0
    assert torch.isfinite(value) and torch.isfinite(z0.grad).all()
    if base == "simclr":
        assert value.item() == 0.0  # no negative left: −log(e^p / e^p)
    else:
        sim, pos, _ = simclr_layout(z0, z1)
        want = -torch.stack([sim[r, pos[r]] for r in range(2 * B)]).mean()
        torch.testing.assert_close(value, want)
        assert torch.equal(loss.u, torch.zeros(20))  # no kept negative: u is not moved


def test_clip_all_negatives_removed_stays_finite():
    clip = glofnd.GloFNDClipLoss(20, method="oracle")
    img, txt, index, _ = batch(0, dtype=torch.float16)
    img.requires_grad_()
    value = clip(img, txt, 100.0, index, torch.zeros(B, dtype=torch.int64))
    value.backward()
    assert value.item() == 0.0 and torch.isfinite(img.grad).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_features_are_computed_in_float32(dtype):
    z0, z1, index, labels = batch(2, dtype=dtype)
    a = glofnd.GloFNDLoss(20, alpha=0.2, init_lambda=0.3)
    b = copy.deepcopy(a)
    va = a(z0, z1, index, labels)
    vb = b(z0.float(), z1.float(), index, labels)
    assert va.dtype == torch.float32
    assert torch.equal(va, vb) and torch.equal(a.fnd.lambdas, b.fnd.lambdas)


def test_autocast_does_not_lower_precision():
    z0, z1, index, _ = batch(2, dtype=torch.float32)
    for cls, args in ((glofnd.GloFNDLoss, ()), (glofnd.GloFNDClipLoss, (SCALE,))):
        a = cls(20, alpha=0.2, init_lambda=0.3)
        b = copy.deepcopy(a)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            va = a(z0, z1, *args, index)
        vb = b(z0, z1, *args, index)
        assert va.dtype == torch.float32 and torch.equal(va, vb)


def test_half_and_dtype_moves_keep_state_float32():
    loss = glofnd.GloFNDClipLoss(20, base="sogclr").half()
    assert loss.fnd_image.lambdas.dtype == torch.float32 and loss.u_text.dtype == torch.float32
    loss = glofnd.GloFNDLoss(20).to(torch.float64)
    assert loss.fnd.lambdas.dtype == torch.float32


# ---------------------------------------------------------------- backends, schedule, state

@pytest.mark.parametrize("base", ["simclr", "sogclr"])
def test_c_and_reference_backends_agree_bitwise(base, monkeypatch):
    """λ's state is bit-identical. The value (and SogCLR's u, made from the batch's
    log-mean-exp) runs the fused C kernels on the "c" backend, whose float32 exponentials and
    sums round differently from torch's: equal to a few ulp (rtol 1e-5)."""
    if _ops.implementation != "c":
        pytest.skip("C extension not built")
    out = []
    for name in ("c", "reference"):
        with glofnd.use_backend(name):
            loss = glofnd.GloFNDLoss(20, base=base, alpha=0.2, init_lambda=0.3)
            values = [loss(*batch(s, dtype=torch.float32)[:3]) for s in range(4)]
        out.append((torch.stack(values), loss.state_dict()))
    assert not torch.equal(out[0][0], torch.zeros(4))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-7)
    for k in out[0][1]:
        if isinstance(out[0][1][k], torch.Tensor):
            if k == "u":
                assert (out[0][1][k] != 0).any()
                torch.testing.assert_close(out[0][1][k], out[1][1][k], rtol=1e-5, atol=0)
            else:
                assert torch.equal(out[0][1][k], out[1][1][k]), k


def test_cpu_tensors_go_through_the_c_kernel(monkeypatch):
    if _ops.implementation != "c":
        pytest.skip("C extension not built")
    calls = []

    real = _ops._C

    class Counting:
        def __getattr__(self, name):
            def call(*args, **kwargs):
                calls.append((name, args[1 if name == "info_nce_backward" else 0].shape))
                return getattr(real, name)(*args, **kwargs)
            return call

    monkeypatch.setattr(_ops, "_C", Counting())
    clip = glofnd.GloFNDClipLoss(20)
    img, txt, index, _ = batch(0, dtype=torch.float32)
    img.requires_grad_(True)
    clip(img, txt, SCALE, index).backward()
    # per direction: one kernel for λ's update and the InfoNCE; then the InfoNCE's backward
    assert calls[:2] == [("fused_forward", (B, B))] * 2
    assert sorted(calls[2:]) == [("info_nce_backward", (B, B))] * 2


def test_gathered_step_equals_step(backend):
    a = glofnd.GloFND(30, alpha=0.2)
    b = copy.deepcopy(a)
    for s in range(4):
        g = torch.Generator().manual_seed(s)
        sim = torch.rand(12, 9, generator=g) * 2 - 1
        index = torch.randint(0, 30, (12,), generator=g)  # repeats are pooled
        valid = torch.rand(12, 9, generator=g) > 0.2
        ma, _ = a.step(sim, index, valid)
        mb, lam = gathered_step(b, sim, index, valid)
        assert torch.equal(ma, mb) and torch.equal(lam, a.lambdas[index])
        for name in ("lambdas", "exp_avg", "exp_avg_sq", "steps"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name


@pytest.mark.parametrize("method", ["glofnd", "fnc", "oracle", "single"])
def test_schedule(method):
    loss = make(glofnd.GloFNDLoss, method, "simclr", start_update=1, start_mask=2)
    base = glofnd.GloFNDLoss(20, temperature=TAU, method="none")
    for epoch in range(4):
        loss.set_epoch(epoch)
        z0, z1, index, labels = batch(epoch)
        before = copy.deepcopy(loss.state_dict())
        value = loss(z0, z1, index, labels)
        plain = base(z0, z1, index)
        if epoch < 2:
            assert torch.equal(value, plain)  # exactly the base loss before start_mask
            assert loss.last_stats["removed"] == 0.0
        else:
            assert not torch.equal(value, plain) and loss.last_stats["removed"] > 0
        if loss.fnd is not None:
            moved = not torch.equal(before["fnd.lambdas"], loss.fnd.lambdas)
            assert moved == (epoch >= 1)


@pytest.mark.parametrize("cls,base", [(glofnd.GloFNDLoss, "sogclr"),
                                      (glofnd.GloFNDClipLoss, "sogclr"),
                                      (glofnd.GloFNDClipLoss, "clip")])
def test_state_dict_resumes_bit_identically(cls, base, backend):
    def call(obj, s):
        a, b, index, labels = batch(s, dtype=torch.float32)
        return obj(a, b, index, labels) if cls is glofnd.GloFNDLoss else obj(a, b, SCALE, index)

    kw = dict(bias_correction="epoch", start_update=1, start_mask=1)
    run = make(cls, "glofnd", base, **kw)
    for epoch, s in ((0, 0), (1, 1), (1, 2)):
        run.set_epoch(epoch)
        call(run, s)
    buf = io.BytesIO()
    torch.save(run.state_dict(), buf)
    buf.seek(0)
    fresh = make(cls, "glofnd", base, **kw)
    fresh.load_state_dict(torch.load(buf))
    assert fresh.epoch == 1 and all(f.epoch == 1 for f in fresh._fnds())
    for s in (3, 4, 0):
        assert torch.equal(call(run, s), call(fresh, s))
    for (k, x), (_, y) in zip(run.state_dict().items(), fresh.state_dict().items()):
        if isinstance(x, torch.Tensor):
            assert torch.equal(x, y), k


@pytest.mark.parametrize("method", ["glofnd", "fnc"])
def test_loading_another_size_is_an_error(method):
    small = glofnd.GloFNDClipLoss(10, base="sogclr", method=method)
    with pytest.raises(ValueError, match="num_samples"):
        glofnd.GloFNDClipLoss(20, base="sogclr", method=method).load_state_dict(small.state_dict())


def test_compile_gives_the_same_values():
    eager = glofnd.GloFNDLoss(20, base="sogclr", alpha=0.2, init_lambda=0.3)
    compiled_state = copy.deepcopy(eager)
    compiled_state.check_index = False  # no host read of the index: fewer graph breaks
    compiled = torch.compile(compiled_state, backend="aot_eager")
    for s in range(3):
        z0, z1, index, _ = batch(s, dtype=torch.float32)
        torch.testing.assert_close(compiled(z0, z1, index), eager(z0, z1, index),
                                   rtol=1e-6, atol=1e-6)
    assert torch.equal(compiled_state.fnd.lambdas, eager.fnd.lambdas)
    torch.testing.assert_close(compiled_state.u, eager.u, rtol=1e-6, atol=0)


@pytest.mark.parametrize("base", ["simclr", "sogclr"])
@pytest.mark.parametrize("method", METHODS)
def test_compile_traces_one_graph(backend, base, method):
    """With check_index off, GloFNDLoss compiles to one graph (fullgraph=True raises on any
    break) on both CPU paths: the scale reaches the kernels as a number, and λ's and u's
    updates have no data-dependent shape. Values and state as in eager mode."""
    torch._dynamo.reset()  # each case compiles the same forward anew: stay under the limit
    eager = make(glofnd.GloFNDLoss, method, base)
    eager.check_index = False
    state = copy.deepcopy(eager)
    compiled = torch.compile(state, backend="eager", fullgraph=True)
    for s in range(3):
        z0, z1, index, labels = batch(s, dtype=torch.float32)
        torch.testing.assert_close(compiled(z0, z1, index, labels),
                                   eager(z0, z1, index, labels), rtol=0, atol=0)
    for k, v in eager.state_dict().items():
        assert torch.equal(v, state.state_dict()[k]) if isinstance(v, torch.Tensor) \
            else v == state.state_dict()[k], k


def test_temperature_is_validated_and_reaches_the_kernels():
    loss = glofnd.GloFNDLoss(20, temperature=0.07)
    with pytest.raises(ValueError, match="temperature"):
        loss.temperature = 0.0
    assert loss.temperature == 0.07
    z0, z1, index, _ = batch(0, dtype=torch.float32)
    before = loss(z0, z1, index)
    loss.temperature = 0.5  # a later change is used by the next call
    fresh = glofnd.GloFNDLoss(20, temperature=0.5)
    fresh.load_state_dict(loss.state_dict())
    torch.testing.assert_close(loss(z0, z1, index), fresh(z0, z1, index), rtol=0, atol=0)
    assert not torch.equal(before, fresh(z0, z1, index))


@pytest.mark.parametrize("base", ["simclr", "sogclr"])
@pytest.mark.parametrize("method", METHODS)
def test_batch_order_does_not_matter(base, method):
    a = make(glofnd.GloFNDLoss, method, base)
    b = copy.deepcopy(a)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    for step in range(2):
        z0, z1, index, labels = batch(step)
        va = a(z0, z1, index, labels)
        vb = b(z0[perm], z1[perm], index[perm], labels[perm])
        torch.testing.assert_close(va, vb, rtol=1e-12, atol=1e-12)
        for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            if isinstance(x, torch.Tensor):
                assert torch.equal(x, y), k


@pytest.mark.parametrize("base", ["simclr", "sogclr"])
def test_eval_mode_reads_but_does_not_write_the_state(base):
    loss = make(glofnd.GloFNDLoss, "glofnd", base)
    loss(*batch(0))
    before = copy.deepcopy(loss.state_dict())
    z0, z1, index, labels = batch(1)
    value = loss.eval()(z0, z1, index, labels)
    for k, v in before.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, loss.state_dict()[k]), k
    sim, pos, valid = simclr_layout(z0, z1)
    ids = torch.cat([index, index])
    removed = expected_removed(loss, sim, valid, ids, None, loss.fnd)  # the current λ
    assert removed.any()
    if base == "simclr":
        torch.testing.assert_close(value, ref_simclr(z0, z1, TAU, removed))
    else:
        pos_sim = torch.stack([sim[r, pos[r]] for r in range(len(pos))])
        rows, _ = ref_sogclr_rows(sim, pos_sim, valid, removed, ids, loss.u.double(), TAU, 0.9)
        torch.testing.assert_close(value, rows.mean())
    loss.train()(z0, z1, index, labels)
    assert not torch.equal(before["fnd.lambdas"], loss.fnd.lambdas)


def test_state_on_cpu_pins_the_state():
    loss = glofnd.GloFNDClipLoss(20, base="sogclr", state_on_cpu=True).to("meta")
    assert loss.fnd_image.lambdas.device.type == "cpu" and loss.u_text.device.type == "cpu"
    loss = glofnd.GloFNDLoss(20).to("meta")
    assert loss.fnd.lambdas.device.type == "meta"


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("kwargs,exc,word", [
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature="a"), TypeError, "temperature"),
    (dict(base="moco"), ValueError, "base"),
    (dict(method="debias"), ValueError, "method"),
    (dict(alpha=1.5), ValueError, "alpha"),
    (dict(gamma=0.0), ValueError, "gamma"),
    (dict(start_update=3, start_mask=1), ValueError, "start_mask"),
    (dict(start_mask=-1), ValueError, "start_mask"),
])
def test_bad_constructor_arguments(kwargs, exc, word):
    with pytest.raises(exc, match=word):
        glofnd.GloFNDLoss(20, **kwargs)


def test_bad_clip_constructor_arguments():
    with pytest.raises(ValueError, match="base"):
        glofnd.GloFNDClipLoss(20, base="simclr")
    with pytest.raises(ValueError, match="num_samples"):
        glofnd.GloFNDClipLoss(0)


def _bad_calls(z0, z1, index, labels):
    return [
        (dict(z1=z1[:-1]), ValueError, "z1"),
        (dict(z1=z1[:, :-1]), ValueError, "z1"),
        (dict(z0=z0.long()), TypeError, "z0"),
        (dict(z0=z0[0]), ValueError, "z0"),
        (dict(index=index.float()), TypeError, "index"),
        (dict(index=index[:-1]), ValueError, "index"),
        (dict(index=index + 20), IndexError, "index"),
        (dict(index=index - 20), IndexError, "index"),
        (dict(labels=labels[:-1]), ValueError, "labels"),
        (dict(labels=None), ValueError, "labels"),
    ]


@pytest.mark.parametrize("base", ["simclr", "sogclr"])
def test_bad_calls_raise_and_leave_state_intact(base):
    z0, z1, index, labels = batch(0)
    for method in ("glofnd", "oracle"):
        loss = make(glofnd.GloFNDLoss, method, base)
        loss(z0, z1, index, labels)
        before = copy.deepcopy(loss.state_dict())
        for change, exc, word in _bad_calls(z0, z1, index, labels):
            if word == "labels" and change["labels"] is None and method != "oracle":
                continue
            args = dict(z0=z0, z1=z1, index=index, labels=labels, **{})
            args.update(change)
            with pytest.raises(exc, match=word):
                loss(**args)
            after = loss.state_dict()
            for k, v in before.items():
                if isinstance(v, torch.Tensor):
                    assert torch.equal(v, after[k]), (change, k)


def test_bad_clip_calls():
    img, txt, index, labels = batch(0)
    clip = glofnd.GloFNDClipLoss(20, method="oracle", base="sogclr")
    before = copy.deepcopy(clip.state_dict())
    with pytest.raises(ValueError, match="text_features"):
        clip(img, txt[:-1], SCALE, index, labels)
    with pytest.raises(ValueError, match="logit_scale"):
        clip(img, txt, torch.ones(2), index, labels)
    with pytest.raises(TypeError, match="logit_scale"):
        clip(img, txt, "100", index, labels)
    with pytest.raises(IndexError, match="index"):
        clip(img, txt, SCALE, index + 100, labels)
    with pytest.raises(ValueError, match="labels"):
        clip(img, txt, SCALE, index)
    for k, v in before.items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, clip.state_dict()[k])


def test_module_on_another_device_than_the_features_is_an_error():
    loss = glofnd.GloFNDLoss(20).to("meta")
    z0, z1, index, _ = batch(0, dtype=torch.float32)
    with pytest.raises(ValueError, match="device|on meta|state"):
        loss(z0, z1, index)


@pytest.mark.parametrize("kind", ["simclr", "sogclr", "clip", "clip-sogclr"])
@pytest.mark.parametrize("method", METHODS)
def test_fused_path_with_labels_gives_the_reference_diagnostics(kind, method):
    """With labels (precision/recall diagnostics, oracle), the CPU losses still run the fused
    kernels; their diagnostics are the reference path's exactly (integer counts, bit-identical
    λ), their values the same to float32 rounding."""
    if _ops.implementation != "c":
        pytest.skip("C extension not built")
    out = []
    for name in ("c", "reference"):
        with glofnd.use_backend(name):
            if kind.startswith("clip"):
                loss = glofnd.GloFNDClipLoss(20, alpha=0.2, method=method, init_lambda=0.3,
                                             base="sogclr" if kind == "clip-sogclr" else "clip")
            else:
                loss = glofnd.GloFNDLoss(20, alpha=0.2, method=method, init_lambda=0.3,
                                         base=kind)
            values, stats = [], []
            for s in range(3):
                z0, z1, index, labels = batch(s, dtype=torch.float32)
                args = (z0, z1, SCALE, index, labels) if kind.startswith("clip") else \
                    (z0, z1, index, labels)
                values.append(loss(*args))
                stats.append(loss.last_stats)
        out.append((torch.stack(values), stats))
    torch.testing.assert_close(out[0][0], out[1][0], rtol=1e-5, atol=1e-6)
    for got, want in zip(out[0][1], out[1][1]):
        assert got.keys() == want.keys()
        for k in got:  # the same floats, NaN where undefined on both
            assert got[k] == want[k] or (math.isnan(got[k]) and math.isnan(want[k])), k
    if method != "none":
        assert any("precision" in k for k in out[0][1][-1])


def test_reference_path_checks_the_index_range_once(monkeypatch):
    """On the reference path (the one of GPUs), a loss step reads the index range from the
    device once, in forward (``check_index``), not again in λ's step; GloFND.step alone checks
    it itself. Out-of-range indices are refused by name either way."""
    calls = []
    real = _ops._check_range

    def counting(index, n):
        calls.append(n)
        return real(index, n)

    monkeypatch.setattr(_ops, "_check_range", counting)
    z0, z1, index, _ = batch(0, dtype=torch.float32)
    with glofnd.use_backend("reference"):
        loss = make(glofnd.GloFNDLoss, "glofnd", "simclr")
        loss(z0, z1, index)
        assert calls == []
        bad = index.clone()
        bad[0] = 20
        with pytest.raises(IndexError, match="index holds 20"):
            loss(z0, z1, bad)
        fnd = glofnd.GloFND(20)
        fnd.step(torch.rand(6, 6), index)
        assert calls == [20]
        with pytest.raises(IndexError, match="index holds 20"):
            fnd.step(torch.rand(6, 6), bad)


@pytest.mark.parametrize("cls,base", [(glofnd.GloFNDLoss, "simclr"), (glofnd.GloFNDLoss, "sogclr"),
                                      (glofnd.GloFNDClipLoss, "clip"),
                                      (glofnd.GloFNDClipLoss, "sogclr")])
@pytest.mark.parametrize("method", METHODS)
def test_reference_step_reads_from_the_device_once(cls, base, method, monkeypatch):
    """The path of GPUs (the reference) reads tensor values on the host, which waits for the
    device, once per loss step with check_index (the index range) and never without: forward
    and backward, every base and method. Counted through the Tensor methods that read values
    (item, tolist, bool, int, float, index, nonzero)."""
    reads = []
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero"):
        real = getattr(torch.Tensor, name)

        def counting(self, *args, _real=real, _name=name, **kwargs):
            reads.append(_name)
            return _real(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, counting)
    z0, z1, index, labels = batch(3, dtype=torch.float32)
    with glofnd.use_backend("reference"):
        for check in (True, False):
            loss = make(cls, method, base)
            loss.check_index = check
            args = (z0.requires_grad_(), z1, SCALE, index, labels) if cls is glofnd.GloFNDClipLoss \
                else (z0.requires_grad_(), z1, index, labels)
            loss(*args)
            reads.clear()
            loss(*args).backward()
            assert reads == (["tolist"] if check else []), (check, reads)
