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
    """
    ok = torch.isfinite(sim)  # NaN and ±inf are never valid
    if valid is not None:
        ok &= valid
    if update:
        uniq, inv = torch.unique(index, return_inverse=True)
        lam_rows = lambdas[uniq][inv].to(sim.dtype).unsqueeze(1)
        above = ((sim > lam_rows) & ok).sum(1)
        count = torch.zeros(uniq.shape, dtype=torch.int64, device=sim.device)
        nvalid = torch.zeros_like(count)
        count.index_add_(0, inv, above)
        nvalid.index_add_(0, inv, ok.sum(1))
        has = nvalid > 0
        ids = uniq[has]
        g = alpha - count[has].double() / nvalid[has].double()
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
    mask = (sim > lambdas[index].to(sim.dtype).unsqueeze(1)) & ok
    kept = (ok & ~mask).sum(1)
    return mask, kept
