"""functional.count and kept_info_nce, the fast paths of the loss step, against plain torch."""
import pytest
import torch

from glofnd import functional as Fn

SHAPES = [(0, 5), (3, 0), (1, 1), (5, 127), (5, 128), (5, 129), (7, 300), (300, 7), (9, 1000)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_count_equals_bool_sum(shape, p, layout):
    gen = torch.Generator().manual_seed(shape[0] * 1000 + shape[1])
    x = torch.rand(shape, generator=gen) < p
    if layout == "transposed":
        x = x.T.contiguous().T
    elif layout == "strided":
        x = torch.rand(shape[0], 2 * shape[1], generator=gen)[:, ::2] < p
    rows = Fn.count(x, 1)
    assert rows.dtype == torch.int32
    assert torch.equal(rows.long(), x.sum(1))
    assert Fn.count(x).item() == int(x.sum())
    assert torch.equal(x, x.clone())  # the mask is read, not written


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kept_info_nce_same_bytes_and_grad_as_masked_info_nce(dtype):
    gen = torch.Generator().manual_seed(0)
    r, m = 6, 300
    logits = (torch.randn(r, m, generator=gen, dtype=dtype) * 3).requires_grad_()
    positive = torch.arange(r)
    negatives = torch.ones(r, m, dtype=torch.bool)
    negatives[positive, positive] = False
    removed = (torch.rand(r, m, generator=gen) < 0.2) & negatives
    removed[0] = negatives[0]  # a row with every negative removed
    ref = Fn.masked_info_nce(logits, positive, negatives, removed)
    (g_ref,) = torch.autograd.grad(ref.sum(), logits)
    keep = negatives & ~removed
    ratio = Fn.log_count_ratio(Fn.count(negatives, 1), Fn.count(keep, 1), dtype)
    out = Fn.kept_info_nce(logits, positive, keep, ratio)
    (g_out,) = torch.autograd.grad(out.sum(), logits)
    assert out.detach().numpy().tobytes() == ref.detach().numpy().tobytes()
    assert g_out.numpy().tobytes() == g_ref.numpy().tobytes()
    # and the formula: -log(e^pos / (e^pos + K/|M| sum_kept e^l)), in float64
    lg = logits.detach().double()
    k = negatives.sum(1).double()
    mk = keep.sum(1).double()
    neg = torch.where(keep, lg.exp(), torch.zeros_like(lg)).sum(1)
    pos = lg[positive, positive].exp()
    scale = torch.where(mk > 0, k / mk.clamp(min=1), torch.zeros_like(k))
    expected = -torch.log(pos / (pos + scale * neg))
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(out.detach().double(), expected, rtol=tol, atol=tol)
