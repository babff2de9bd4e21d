r"""Pure functions behind the losses: no state, plain torch autograd.

Every function works on *rows* (the anchors of this process) against *columns* (the candidates,
possibly gathered from other processes): ``sim`` is (R, M), ``positive`` (R,) is the column of each
row's positive, ``negatives`` (R, M) bool marks the valid negatives (self and positive excluded),
``removed`` (R, M) bool or None marks the negatives declared false. Removed entries leave the
negative set; they are never turned into positives. Masks carry no gradient.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (float16/bfloat16 are promoted)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def cosine(a: Tensor, b: Tensor) -> Tensor:
    """(R, M) cosine similarities of the rows of ``a`` (R, D) and ``b`` (M, D).

    Computed in float32 (float64 for float64 inputs) with autocast disabled, whatever the input
    dtype, so that thresholds and softmaxes never see float16/bfloat16 rounding.
    """
    dtype = compute_dtype(a, b)
    with torch.autocast(a.device.type, enabled=False):
        a = torch.nn.functional.normalize(a.to(dtype), dim=1)
        b = torch.nn.functional.normalize(b.to(dtype), dim=1)
        return a @ b.T


_PARTIAL = 128  # bytes summed into one uint8 partial count: at most 255, so it cannot overflow


def count(mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """The True entries of a bool tensor: in all (``dim=None``, an int64 scalar) or per row of a
    2-D mask (``dim=1``: int32, int64 for rows of 2^31 entries or more).

    Equals ``mask.sum(dim)`` in value, without its cost: a bool sum first converts the whole mask
    to int64, 8 bytes per entry (13 ms and 32 MiB for a 2048 x 2048 mask on one core of the
    benchmark machine); a sum into int32 still copies it to int32 first. Here the total comes
    from ``count_nonzero`` and the rows from uint8 partial sums over blocks of 128 bytes, then a
    sum of the R x M/128 partials: no copy of the mask, and at 128 bytes torch's vectorised
    reduction applies (0.15 ms for 2048 x 2048 here).

    Example::

        >>> count(torch.tensor([[True, False], [True, True]]), 1)
        tensor([1, 2], dtype=torch.int32)
    """
    if dim is None:
        return torch.count_nonzero(mask)
    if mask.dim() != 2 or dim not in (1, -1):
        return mask.sum(dim, dtype=torch.int64)
    m = mask.shape[1]
    if m < _PARTIAL:  # a short row: the int32 copy is small, one call instead of three
        return mask.sum(1, dtype=torch.int32)
    u = mask.view(torch.uint8)
    q = m // _PARTIAL
    out = u[:, :q * _PARTIAL].unflatten(1, (q, _PARTIAL)).sum(-1, dtype=torch.uint8).sum(
        -1, dtype=torch.int32 if m < 2**31 else torch.int64)
    if m % _PARTIAL:
        out += u[:, q * _PARTIAL:].sum(-1, dtype=torch.uint8)
    return out


def log_count_ratio(k: Tensor, m: Tensor, dtype: torch.dtype) -> Tensor:
    """log(K_r / |M_r|) from the counts: K_r (R,) valid and |M_r| (R,) kept negatives per row,
    each taken as at least 1."""
    return torch.log(k.clamp(min=1).to(dtype)) - torch.log(m.clamp(min=1).to(dtype))


def count_ratio_log(negatives: Tensor, keep: Tensor, dtype: torch.dtype) -> Tensor:
    """(R,) log(K_r / |M_r|): the rescaling of the kept negatives to the original count.

    0 for rows without negatives or without kept negatives (those rows' negative term vanishes).
    """
    return log_count_ratio(count(negatives, 1), count(keep, 1), dtype)


def masked_info_nce(logits: Tensor, positive: Tensor, negatives: Tensor,
                    removed: Optional[Tensor] = None) -> Tensor:
    r"""Per-row InfoNCE, false negatives removed, kept negatives rescaled (docs/losses.md).

    .. math::

        ℓ_r = -\log \frac{e^{l_{r,p_r}}}
                        {e^{l_{r,p_r}} + \frac{K_r}{|M_r|}\sum_{j∈M_r} e^{l_{rj}}}

    with :math:`l` the logits (similarity/τ or logit_scale·similarity), :math:`p_r` the positive
    column, :math:`K_r` the valid negatives of row r and :math:`M_r` those not removed. Computed as
    one log-sum-exp over ``[l_pos, l_kept + log(K/|M|)]`` with −inf for every other entry, so it is
    stable and finite even when every negative of a row is removed (the row's loss is then 0: no
    negative is left). With ``removed=None`` (or all False) it is the standard InfoNCE.

    Args:
        logits: (R, M) float.
        positive: (R,) int64 column of each row's positive.
        negatives: (R, M) bool, valid negatives (self and positive excluded).
        removed: (R, M) bool or None, negatives declared false (no gradient flows through it).

    Returns:
        (R,) per-row losses, in the dtype of ``logits``.

    Example::

        >>> l = torch.randn(4, 4)
        >>> neg = ~torch.eye(4, dtype=torch.bool)
        >>> x = masked_info_nce(l, torch.arange(4), neg)
        >>> ce = torch.nn.functional.cross_entropy(l, torch.arange(4), reduction="none")
        >>> torch.allclose(x, ce)
        True
    """
    if removed is None:
        return kept_info_nce(logits, positive, negatives)
    keep = negatives & ~removed
    return kept_info_nce(logits, positive, keep, count_ratio_log(negatives, keep, logits.dtype))


def kept_info_nce(logits: Tensor, positive: Tensor, keep: Tensor,
                  log_ratio: Optional[Tensor] = None) -> Tensor:
    """:func:`masked_info_nce` given the kept negatives ``keep`` (R, M) bool and the rows'
    ``log_ratio`` (R,) = log(K_r/|M_r|) (:func:`log_count_ratio`; None: no rescaling).

    Same bytes as :func:`masked_info_nce`: the kept logits get the ratio added (the others are
    −inf, which a finite ratio leaves −inf), then one log-sum-exp over ``[l_pos, kept]``. The
    ratio is added in place, so that the step needs no (R, M) float temporary beyond the masked
    logits, and outside autograd: adding a constant leaves the gradient as it is, so the graph
    needs no node for it (``where`` saves only its condition, so the in-place change is safe).
    """
    pos = logits.gather(1, positive.unsqueeze(1))
    neg = torch.where(keep, logits, -math.inf)
    if log_ratio is not None:
        with torch.no_grad():
            neg.add_(log_ratio.unsqueeze(1))
    return torch.logsumexp(torch.cat([pos, neg], dim=1), dim=1) - pos.squeeze(1)


def quantile_thresholds(sim: Tensor, valid: Tensor, q: float) -> Tensor:
    r"""(R,) per-row q-quantile of the valid entries of ``sim`` (linear interpolation).

    Equals ``torch.nanquantile(sim.masked_fill(~valid, nan), q, dim=1)`` (NaN for rows without a
    valid entry), computed with a sort so that it has no size limit and compiles.
    """
    n = count(valid, 1)
    filled = torch.where(valid, sim, math.inf)
    ordered = filled.sort(dim=1).values
    pos = (n - 1).clamp(min=0).to(sim.dtype) * q
    lo = pos.floor()
    hi = pos.ceil()
    lo_v = ordered.gather(1, lo.long().unsqueeze(1)).squeeze(1)
    hi_v = ordered.gather(1, hi.long().unsqueeze(1)).squeeze(1)
    w = pos - lo
    # torch.lerp's formula, so that the result matches torch.quantile's bytes
    out = torch.lerp(lo_v, hi_v, w)
    return torch.where(n > 0, out, torch.full_like(out, math.nan))


def fnc_mask(sim: Tensor, valid: Tensor, alpha: float) -> tuple[Tensor, Tensor]:
    """False-negative cancellation, a baseline of the paper: per-row in-batch (1−α)-quantile.

    Returns ``(mask, threshold)``: mask (R, M) bool, valid entries strictly above the row's
    threshold; threshold (R,) the quantiles (NaN for rows without valid entries).
    """
    sim = sim.detach()
    thr = quantile_thresholds(sim, valid, 1.0 - alpha)
    return (sim > thr.unsqueeze(1)) & valid, thr


def label_mask(row_labels: Tensor, col_labels: Tensor, valid: Tensor) -> Tensor:
    """Oracle baseline: valid negatives whose label equals the row's label. (R, M) bool."""
    return (row_labels.unsqueeze(1) == col_labels.unsqueeze(0)) & valid


def sogclr_surrogate(sim: Tensor, positive_sim: Tensor, keep: Tensor, log_u: Tensor,
                     temperature: float) -> Tensor:
    r"""Per-row SogCLR surrogate given each row's moving average u_r (docs/losses.md).

    .. math:: ℓ_r = -s_{r,p_r} + \frac{1}{|M_r|}\sum_{j∈M_r} \mathrm{sg}[e^{s_{rj}/τ}/u_r]\, s_{rj}

    ``log_u`` (R,) is log u_r (the weights are formed as exp(s/τ − log u) so that they do not
    overflow before the division). Rows with no kept negative reduce to −s_{r,p_r}.
    """
    weights = torch.exp(sim.detach() / temperature - log_u.detach().unsqueeze(1))
    weights = torch.where(keep, weights, 0.0)
    m = count(keep, 1).clamp(min=1).to(sim.dtype)
    return -positive_sim + (weights * sim).sum(1) / m


def log_mean_exp(x: Tensor, keep: Tensor) -> Tensor:
    """(R,) log of the mean of exp(x) over the kept entries of each row; −inf for empty rows."""
    filled = torch.where(keep, x, -math.inf)
    m = count(keep, 1)
    out = torch.logsumexp(filled, dim=1) - torch.log(m.clamp(min=1).to(x.dtype))
    return torch.where(m > 0, out, torch.full_like(out, -math.inf))


def fn_scores(removed: Tensor, truth: Tensor) -> dict[str, Tensor]:
    """Per-row averaged precision and recall of ``removed`` against ``truth`` (both (R, M) bool),
    and F1 = 2PR/(P+R) of the averages, as the paper measures. Rows without a prediction are left
    out of the
    precision, rows without a true false negative out of the recall; NaN when none is left."""
    return scores_from_counts(*score_counts(removed, truth))


def score_counts(removed: Tensor, truth: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per row: (true positives, predicted, true) counts of ``removed`` against ``truth``, the
    input of :func:`scores_from_counts` (rows of several blocks may be concatenated first)."""
    return count(removed & truth, 1), count(removed, 1), count(truth, 1)


def scores_from_counts(tp: Tensor, npred: Tensor, ntrue: Tensor) -> dict[str, Tensor]:
    """:func:`fn_scores` from the per-row counts of :func:`score_counts`."""
    tp, npred, ntrue = tp.double(), npred.double(), ntrue.double()
    has_pred = npred > 0
    has_true = ntrue > 0
    zero = torch.zeros_like(tp)
    n_p = count(has_pred).double()
    n_r = count(has_true).double()
    p = torch.where(has_pred, tp / npred.clamp(min=1), zero).sum() / n_p  # NaN when n_p == 0
    r = torch.where(has_true, tp / ntrue.clamp(min=1), zero).sum() / n_r
    f1 = torch.where(p + r > 0, 2 * p * r / (p + r), p + r)  # 0 when both are 0, NaN stays NaN
    return {"precision": p, "recall": r, "f1": f1}
