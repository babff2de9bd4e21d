"""Pure-torch reference of the GloFND threshold step, written for clarity.

It is the fallback when the C extension is missing, the path for tensors on devices other than
the CPU, and the oracle of the tests. It performs the update in float64 with the same operations
in the same order as csrc/threshold.c, so on the CPU both give the same bytes.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

ADAM, SGD = 0, 1


def _ipow(base: float, exponent: Tensor) -> Tensor:
    """base ** exponent by binary exponentiation (the multiplication sequence of the C core)."""
    result = torch.ones(exponent.shape, dtype=torch.float64, device=exponent.device)
    b = torch.full_like(result, base)
    e = exponent.to(torch.int64).clone()
    while bool((e > 0).any()):
        result = torch.where((e & 1) == 1, result * b, result)
        b = b * b
        e = e >> 1
    return result


def row_counts(sim: Tensor, index: Tensor, valid: Optional[Tensor],
               lambdas: Tensor) -> tuple[Tensor, Tensor]:
    """Per row: entries above the row's current λ, and valid entries; both (R,) int64."""
    ok = _valid(sim, valid)
    above = ((sim > lambdas[index].to(sim.dtype).unsqueeze(1)) & ok).sum(1)
    return above, ok.sum(1)


def pooled_update(index: Tensor, above: Tensor, nvalid: Tensor, lambdas: Tensor,
                  exp_avg: Tensor, exp_avg_sq: Tensor, steps: Tensor, alpha: float, lr: float,
                  beta1: float = 0.9, beta2: float = 0.98, eps: float = 1e-8, lo: float = -1.0,
                  hi: float = 1.0, optimizer: int = ADAM, step: int = 0) -> None:
    """Pools the row counts of each distinct index into g_i = α − above_i/valid_i and takes one
    Adam/SGD step on λ_i in place (indices without a valid entry are left as they are)."""
    uniq, inv = torch.unique(index, return_inverse=True)
    count = torch.zeros(uniq.shape, dtype=torch.int64, device=index.device)
    total = torch.zeros_like(count)
    count.index_add_(0, inv, above)
    total.index_add_(0, inv, nvalid)
    has = total > 0
    ids = uniq[has]
    g = alpha - count[has].double() / total[has].double()
    t = torch.clamp(steps[ids].to(torch.int64) + 1, max=2**31 - 1)
    lam = lambdas[ids].double()
    if optimizer == ADAM:
        m = beta1 * exp_avg[ids].double() + (1.0 - beta1) * g
        v = beta2 * exp_avg_sq[ids].double() + (1.0 - beta2) * g * g
        tb = torch.full_like(t, step) if step > 0 else t
        mhat = m / (1.0 - _ipow(beta1, tb))
        vhat = v / (1.0 - _ipow(beta2, tb))
        lam = lam - lr * mhat / (vhat.sqrt() + eps)
        exp_avg[ids] = m.float()
        exp_avg_sq[ids] = v.float()
    else:
        lam = lam - lr * g
    lambdas[ids] = lam.clamp(lo, hi).float()
    steps[ids] = t.to(steps.dtype)


def mask_rows(sim: Tensor, index: Tensor, valid: Optional[Tensor],
              lambdas: Tensor) -> tuple[Tensor, Tensor]:
    """``(mask, kept)``: valid entries strictly above λ of the row's index, and per row the valid
    entries that are not flagged."""
    ok = _valid(sim, valid)
    mask = (sim > lambdas[index].to(sim.dtype).unsqueeze(1)) & ok
    return mask, (ok & ~mask).sum(1)


def _valid(sim: Tensor, valid: Optional[Tensor]) -> Tensor:
    ok = torch.isfinite(sim)  # NaN and ±inf are never valid
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
    if update:
        above, nvalid = row_counts(sim, index, valid, lambdas)
        pooled_update(index, above, nvalid, lambdas, exp_avg, exp_avg_sq, steps, alpha, lr,
                      beta1, beta2, eps, lo, hi, optimizer, step)
    return mask_rows(sim, index, valid, lambdas)
