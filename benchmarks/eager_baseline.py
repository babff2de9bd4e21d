"""The GloFND threshold step in eager PyTorch, written the way research code writes it.

This is the baseline the fused C kernel is measured against (benchmarks/run.py): one tensor
operation per line, each a full pass over its operand or a gather/scatter of the state.

For B anchors with two view rows each (``sim`` is (2B, M): rows [0, B) are view a of
``idx``, rows [B, 2B) view b) and per-sample state λ, m, v, t:

    c_i  = Σ_{views} Σ_j 1[s_ij > λ_i]                  (count per sample, both views)
    g_i  = α − c_i / (2M)
    m_i ← β1 m_i + (1−β1) g_i,   v_i ← β2 v_i + (1−β2) g_i²,   t_i ← t_i + 1
    λ_i ← clamp(λ_i − lr · (m_i / (1−β1^t_i)) / (√(v_i / (1−β2^t_i)) + eps), −1, 1)
    mask = s_rj > λ_{idx[r mod B]}                      (compare again with the new λ)

Unlike glofnd it has no NaN handling and no validity mask (every entry counts), computes the
update in float32 and the bias powers with ``torch.pow``: its λ may differ from glofnd's in
the last bits, which run.py reports beside the timings.

Example::

    >>> import torch
    >>> n, b = 100, 4
    >>> lam, m, v = torch.ones(n), torch.zeros(n), torch.zeros(n)
    >>> t = torch.zeros(n, dtype=torch.int32)
    >>> sim = torch.rand(2 * b, 2 * b) * 2 - 1
    >>> mask = eager_threshold_step(sim, torch.arange(b), lam, m, v, t)
    >>> mask.shape
    torch.Size([8, 8])
"""
from __future__ import annotations

import torch
from torch import Tensor


def eager_threshold_step(sim: Tensor, idx: Tensor, lambdas: Tensor, exp_avg: Tensor,
                         exp_avg_sq: Tensor, steps: Tensor, alpha: float = 0.01,
                         lr: float = 0.05, beta1: float = 0.9, beta2: float = 0.98,
                         eps: float = 1e-8) -> Tensor:
    """Updates λ of ``idx`` (B,) in place from ``sim`` (2B, M) and returns the (2B, M) mask."""
    b = idx.shape[0]
    lam = lambdas[idx]                                        # gather λ for the batch
    above = sim > lam.repeat(2).unsqueeze(1)                  # compare, (2B, M)
    count = above.sum(1).view(2, b).sum(0)                    # count per row, per sample
    g = alpha - count.float() / float(2 * sim.shape[1])
    t = steps[idx] + 1
    m = beta1 * exp_avg[idx] + (1 - beta1) * g                # Adam
    v = beta2 * exp_avg_sq[idx] + (1 - beta2) * g * g
    m_hat = m / (1 - torch.pow(beta1, t.float()))             # bias correction
    v_hat = v / (1 - torch.pow(beta2, t.float()))
    new = (lam - lr * m_hat / (v_hat.sqrt() + eps)).clamp(-1.0, 1.0)
    exp_avg[idx] = m                                          # scatter back
    exp_avg_sq[idx] = v
    steps[idx] = t
    lambdas[idx] = new
    return sim > lambdas[idx].repeat(2).unsqueeze(1)          # compare again for the mask
