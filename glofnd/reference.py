"""Pure-torch reference of the GloFND threshold step, written for clarity.

It is the fallback when the C extension is missing, the path for tensors on devices other than
the CPU, and the oracle of the tests. It performs the update in float64 with the same operations
in the same order as csrc/threshold.c, so on the CPU both give the same bytes.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import Tensor

ADAM, SGD = 0, 1


_TABLE_BITS = 16
_POW_TABLES: dict = {}


def _pow_table(bases: tuple[float, ...], device: torch.device) -> tuple[Tensor, list]:
    """``(table, squares)`` for each base b of ``bases``: squares[k] = b^(2^k) by repeated
    squaring in float64, and table[row, j] ((len(bases), 2^16) float64 on ``device``) = the
    product of squares[k] over the set bits k of j, multiplied in increasing k from 1.0: binary
    exponentiation's multiplication sequence, done once per (bases, device) on the host (NumPy's
    float64 products are IEEE like the C core's) and kept for the process (512 KiB per base)."""
    key = (bases, str(device))
    hit = _POW_TABLES.get(key)
    if hit is None:
        rows, all_squares = [], []
        j = np.arange(1 << _TABLE_BITS)
        for base in bases:
            squares = [base]
            for _ in range(63):
                squares.append(squares[-1] * squares[-1])
            table = np.ones(1 << _TABLE_BITS)
            for k in range(_TABLE_BITS):
                table = np.where((j >> k) & 1, table * squares[k], table)
            rows.append(table)
            all_squares.append(squares)
        hit = _POW_TABLES[key] = (torch.from_numpy(np.stack(rows)).to(device), all_squares)
    return hit


def _bias_denominators(bases: tuple[float, ...], exponent: Tensor, bits: int = 31) -> Tensor:
    """1 − b^e for each base b (rows of the (len(bases), R) float64 result) for Adam's bias
    correction, e ≥ 1 (an integer tensor, < 2^bits), with b^e computed as csrc/threshold.c does
    (binary exponentiation: the same multiplications in the same order, so the same bytes),
    without a loop over the data or a host sync: the product of the low 16 bits comes from a
    table; the high bits continue it factor by factor. When b^(2^16) ≤ 2^-55 (b ≤ 0.9994: any
    e with a high bit set gives a power under half an ulp of 1), 1 − b^e is exactly 1.0 there,
    whatever the factors."""
    table, squares = _pow_table(bases, exponent.device)
    low = table[:, exponent & ((1 << _TABLE_BITS) - 1)]
    high = exponent >> _TABLE_BITS
    if all(sq[_TABLE_BITS] <= 2.0 ** -55 for sq in squares):
        return torch.where(high > 0, 1.0, 1.0 - low)
    for k in range(_TABLE_BITS, bits):  # a base close to 1: multiply on, as the C loop does
        bit = ((exponent >> k) & 1) == 1
        factor = torch.tensor([sq[k] for sq in squares], dtype=torch.float64,
                              device=exponent.device).unsqueeze(1)
        low = torch.where(bit, low * factor, low)
    return 1.0 - low


def _bias_denominator(base: float, exponent: Tensor) -> Tensor:
    """1 − base^e, (R,) float64: :func:`_bias_denominators` of one base."""
    return _bias_denominators((base,), exponent)[0]


def row_counts(sim: Tensor, index: Tensor, valid: Optional[Tensor],
               lambdas: Tensor) -> tuple[Tensor, Tensor]:
    """Per row: entries above the row's current λ, and valid entries; both (R,) int64."""
    return _row_counts(sim, index, _valid(sim, valid), lambdas)


def _row_lambdas(lambdas: Tensor, index: Tensor, dtype: torch.dtype) -> Tensor:
    """(R, 1): each row's λ in the similarities' dtype."""
    lam = lambdas[index]
    return (lam if lam.dtype == dtype else lam.to(dtype)).unsqueeze(1)


def _row_counts(sim: Tensor, index: Tensor, ok: Tensor, lambdas: Tensor
                ) -> tuple[Tensor, Tensor]:
    above = ((sim > _row_lambdas(lambdas, index, sim.dtype)) & ok).sum(1)
    return above, ok.sum(1)


def group_ids(index: Tensor) -> Tensor:
    """(R,) int64 in [0, R): one id per distinct value of ``index`` (R,), shared by its rows
    (the position of the value's first occurrence in the sorted index). Built from a sort,
    without ``torch.unique``, whose output size is data-dependent (a host sync on
    accelerators)."""
    index = index.contiguous()  # searchsorted warns about (and copies) strided values
    return torch.searchsorted(torch.sort(index).values, index)


def pooled_update(index: Tensor, above: Tensor, nvalid: Tensor, lambdas: Tensor,
                  exp_avg: Tensor, exp_avg_sq: Tensor, steps: Tensor, alpha: float, lr: float,
                  beta1: float = 0.9, beta2: float = 0.98, eps: float = 1e-8, lo: float = -1.0,
                  hi: float = 1.0, optimizer: int = ADAM, step: int = 0) -> None:
    """Pools the row counts of each distinct index into g_i = α − above_i/valid_i and takes one
    Adam/SGD step on λ_i in place (indices without a valid entry are left as they are).

    Every row computes its index's new state from the pooled counts, and the rows write it
    back: rows of one index write the same values. No step depends on the data through the
    host, so on an accelerator the update is queued without waiting for the device."""
    gid = group_ids(index)
    counts = torch.stack([above, nvalid], 1)
    pooled = torch.zeros_like(counts).index_add_(0, gid, counts)[gid]
    count, total = pooled[:, 0], pooled[:, 1]
    has = total > 0  # elsewhere g is 0/0: computed, never written
    g = alpha - count.double() / total  # the int64 total is promoted exactly
    old_steps = steps[index]
    t = torch.clamp(old_steps, max=2**31 - 2) + 1  # the count saturates at INT32_MAX
    old_lam = lambdas[index]
    lam = old_lam.double()
    if optimizer == ADAM:
        old_m, old_v = exp_avg[index], exp_avg_sq[index]
        m = beta1 * old_m.double() + (1.0 - beta1) * g
        v = beta2 * old_v.double() + (1.0 - beta2) * g * g
        if step > 0:  # t = epoch + 1 for every sample (an int64: epochs are not bounded)
            d = _bias_denominators((beta1, beta2), torch.full_like(t, step, dtype=torch.int64),
                                   max(31, int(step).bit_length()))
        else:
            d = _bias_denominators((beta1, beta2), t)
        lam = lam - lr * (m / d[0]) / ((v / d[1]).sqrt() + eps)
        exp_avg[index] = torch.where(has, m.float(), old_m)
        exp_avg_sq[index] = torch.where(has, v.float(), old_v)
    else:
        lam = lam - lr * g
    lambdas[index] = torch.where(has, lam.clamp(lo, hi).float(), old_lam)
    steps[index] = torch.where(has, t, old_steps)


def mask_rows(sim: Tensor, index: Tensor, valid: Optional[Tensor],
              lambdas: Tensor) -> tuple[Tensor, Tensor]:
    """``(mask, kept)``: valid entries strictly above λ of the row's index, and per row the valid
    entries that are not flagged."""
    return _mask_rows(sim, index, _valid(sim, valid), lambdas)


def _mask_rows(sim: Tensor, index: Tensor, ok: Tensor, lambdas: Tensor,
               nvalid: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """``nvalid``: ok's row counts when known (the flags are a subset: kept = valid − flagged)."""
    mask = (sim > _row_lambdas(lambdas, index, sim.dtype)) & ok
    if nvalid is not None:
        return mask, nvalid - mask.sum(1)
    return mask, (ok & ~mask).sum(1)


def _valid(sim: Tensor, valid: Optional[Tensor]) -> Tensor:
    ok = sim.abs() < math.inf  # NaN and ±inf are never valid (torch.isfinite: 4 passes, not 2)
    return ok if valid is None else ok & valid


def threshold_step(
    sim: Tensor,
    index: Tensor,
    valid: Optional[Tensor],
    lambdas: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    steps: Tensor,
    alpha: float,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.98,
    eps: float = 1e-8,
    lo: float = -1.0,
    hi: float = 1.0,
    optimizer: int = ADAM,
    step: int = 0,
    update: bool = True,
) -> tuple[Tensor, Tensor]:
    """Update λ of the batch's indices in place, then return ``(mask, kept)``.

    sim (R, M) float32/float64; index (R,) int64 in [0, N); valid (R, M) bool or None;
    lambdas, exp_avg, exp_avg_sq (N,) float32 and steps (N,) int32, updated in place.
    Non-finite entries are never valid.
    mask (R, M) bool: valid and above the new λ of the row's index; kept (R,) int64.
    The three phases are separate functions so that multi-process training can pool the
    counts of all processes between them.
    """
    ok = _valid(sim, valid)  # built once for both phases
    if not update:
        return _mask_rows(sim, index, ok, lambdas)
    above, nvalid = _row_counts(sim, index, ok, lambdas)
    pooled_update(index, above, nvalid, lambdas, exp_avg, exp_avg_sq, steps, alpha, lr,
                  beta1, beta2, eps, lo, hi, optimizer, step)
    return _mask_rows(sim, index, ok, lambdas, nvalid)


def exclusion_valid(sim: Tensor, exclude: Tensor) -> Tensor:
    """(R, M) bool: every entry but the columns ``exclude`` (R, k) names in its row (entries
    outside [0, M) exclude nothing)."""
    col = torch.arange(sim.shape[1], device=sim.device)
    out = torch.ones(sim.shape, dtype=torch.bool, device=sim.device)
    for k in range(exclude.shape[1]):
        out &= col.unsqueeze(0) != exclude[:, k].unsqueeze(1)
    return out


def info_nce_keep(sim: Tensor, positive: Tensor, own: Optional[Tensor], thr: Optional[Tensor],
                  removed: Optional[Tensor]) -> Tensor:
    """(R, M) bool, the kept negatives of :func:`info_nce`: all columns but the positive and
    ``own`` (entries < 0: none), less the finite entries above ``thr`` (R,) or those flagged in
    ``removed`` (R, M)."""
    col = torch.arange(sim.shape[1], device=sim.device).unsqueeze(0)
    keep = col != positive.unsqueeze(1)
    if own is not None:
        keep &= col != own.unsqueeze(1)
    if thr is not None:
        keep &= ~((sim > thr.to(sim.dtype).unsqueeze(1)) & (sim != math.inf))
    if removed is not None:
        keep &= ~removed
    return keep


def _log_ratio(kept: Tensor, per_row: int, ratio: bool, dtype: torch.dtype) -> Tensor:
    if not ratio:
        return torch.zeros(kept.shape, dtype=dtype, device=kept.device)
    k = torch.log(torch.tensor(float(max(per_row, 1)), dtype=dtype, device=kept.device))
    rho = k - torch.log(kept.clamp(min=1).to(dtype))
    return torch.where(kept > 0, rho, torch.zeros_like(rho))


def info_nce(sim: Tensor, positive: Tensor, own: Optional[Tensor], thr: Optional[Tensor],
             removed: Optional[Tensor], scale: Tensor, per_row: int, ratio: bool
             ) -> tuple[Tensor, Tensor, Tensor]:
    r"""Per-row InfoNCE with the kept negatives M_r of :func:`info_nce_keep` rescaled to K:

    .. math:: ℓ_r = \mathrm{lse}_r − c s_{r p_r},\quad \mathrm{lse}_r = \log\Big(e^{c s_{r p_r}}
              + \sum_{j∈M_r} e^{c s_{rj} + ρ_r}\Big),\quad ρ_r = \log\frac{K}{|M_r|}

    (ρ_r = 0 without ``ratio`` or without kept negatives). Returns ``(loss, lse, kept)``, each
    (R,); the semantics of the C kernel ``_C.info_nce_forward``, in plain torch on any device.
    """
    keep = info_nce_keep(sim, positive, own, thr, removed)
    kept = keep.sum(1)
    logits = scale.to(sim.dtype) * sim
    rho = _log_ratio(kept, per_row, ratio, sim.dtype)
    pos = logits.gather(1, positive.unsqueeze(1))
    neg = torch.where(keep, logits + rho.unsqueeze(1), -math.inf)
    lse = torch.logsumexp(torch.cat([pos, neg], dim=1), dim=1)
    return lse - pos.squeeze(1), lse, kept


def info_nce_backward(grad: Tensor, sim: Tensor, positive: Tensor, own: Optional[Tensor],
                      thr: Optional[Tensor], removed: Optional[Tensor], scale: Tensor,
                      per_row: int, ratio: bool, lse: Tensor, kept: Tensor
                      ) -> tuple[Tensor, Tensor]:
    """The gradient of :func:`info_nce` from ``grad`` (R,), that of each row's loss: ``(dsim,
    dscale_rows)`` with dsim (R, M) = c · dlogits and dscale_rows (R,) = Σ_j dlogits_rj s_rj."""
    keep = info_nce_keep(sim, positive, own, thr, removed)
    c = scale.to(sim.dtype)
    rho = _log_ratio(kept, per_row, ratio, sim.dtype)
    shift = (lse - rho).unsqueeze(1)
    g = grad.to(sim.dtype).unsqueeze(1)
    dl = torch.where(keep, g * torch.exp(c * sim - shift), 0.0)
    p = positive.unsqueeze(1)
    dpos = g * (torch.exp(c * sim.gather(1, p) - lse.unsqueeze(1)) - 1)
    dl = dl.scatter(1, p, dpos)
    return c * dl, (dl * sim).sum(1)


def sogclr_lme(sim: Tensor, positive: Tensor, own: Optional[Tensor], thr: Optional[Tensor],
               removed: Optional[Tensor], scale: float, shift: bool) -> tuple[Tensor, Tensor]:
    """SogCLR's per-row log of the mean of exp(y) over the kept negatives (−inf without any), y
    = scale·(s − o) with o the positive's similarity when ``shift`` (CLIP), else 0; and the kept
    counts. The kept negatives are those of :func:`info_nce_keep`."""
    keep = info_nce_keep(sim, positive, own, thr, removed)
    kept = keep.sum(1)
    o = sim.gather(1, positive.unsqueeze(1)) if shift else 0.0
    filled = torch.where(keep, scale * (sim - o), -math.inf)
    out = torch.logsumexp(filled, dim=1) - torch.log(kept.clamp(min=1).to(sim.dtype))
    return torch.where(kept > 0, out, torch.full_like(out, -math.inf)), kept


def sogclr_surrogate(sim: Tensor, positive: Tensor, own: Optional[Tensor], thr: Optional[Tensor],
                     removed: Optional[Tensor], scale: float, shift: bool, pos_term: bool,
                     log_u: Tensor, kept: Tensor) -> Tensor:
    r"""SogCLR's per-row surrogate with d = s − o (o as in :func:`sogclr_lme`):

    .. math:: ℓ_r = −[\text{pos\_term}]\, s_{r p_r} + \frac{1}{|M_r|}\sum_{j∈M_r}
              \mathrm{sg}[e^{\text{scale}·d_{rj} − \log u_r}]\, d_{rj}
    """
    keep = info_nce_keep(sim, positive, own, thr, removed)
    p = positive.unsqueeze(1)
    d = sim - sim.gather(1, p) if shift else sim
    w = torch.where(keep, torch.exp(scale * d.detach() - log_u.unsqueeze(1)), 0.0)
    out = (w * d).sum(1) / kept.clamp(min=1).to(sim.dtype)
    return out - sim.gather(1, p).squeeze(1) if pos_term else out


def sogclr_surrogate_backward(grad: Tensor, sim: Tensor, positive: Tensor, own: Optional[Tensor],
                              thr: Optional[Tensor], removed: Optional[Tensor], scale: float,
                              shift: bool, pos_term: bool, log_u: Tensor, kept: Tensor
                              ) -> Tensor:
    """The gradient of :func:`sogclr_surrogate` in ``sim`` from ``grad`` (R,)."""
    keep = info_nce_keep(sim, positive, own, thr, removed)
    p = positive.unsqueeze(1)
    d = sim - sim.gather(1, p) if shift else sim
    g = (grad.to(sim.dtype) / kept.clamp(min=1).to(sim.dtype)).unsqueeze(1)
    out = torch.where(keep, g * torch.exp(scale * d - log_u.unsqueeze(1)), 0.0)
    at_pos = (-grad.to(sim.dtype) if pos_term else torch.zeros_like(grad, dtype=sim.dtype))
    if shift:
        at_pos = at_pos - out.sum(1)
    return out.scatter(1, p, at_pos.unsqueeze(1))
