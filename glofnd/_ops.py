"""torch.library custom ops over the C kernels, with fake kernels for torch.compile.

CPU tensors are handed to the C extension without copying (``Tensor.numpy()`` shares memory);
tensors on any other device run the reference in plain torch on that device.
"""
from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor

from . import reference

try:
    from . import _C
except ImportError:  # no compiler at install time, or GLOFND_NO_EXTENSION=1
    _C = None

implementation = "c" if _C is not None else "reference"


def _check_range(index: Tensor, n: int) -> None:
    if index.numel() == 0:
        return
    lo, hi = int(index.min()), int(index.max())
    if lo < 0 or hi >= n:
        raise IndexError(f"index holds {lo if lo < 0 else hi}, outside [0, num_samples={n})")


@torch.library.custom_op(
    "glofnd::threshold_step", mutates_args=("lambdas", "exp_avg", "exp_avg_sq", "steps")
)
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
    beta1: float,
    beta2: float,
    eps: float,
    lo: float,
    hi: float,
    optimizer: int,
    step: int,
    update: bool,
) -> tuple[Tensor, Tensor]:
    """Fused λ update and false-negative mask; see :func:`glofnd.reference.threshold_step`.

    Index range is checked here, in the eager kernels, so that traced callers need no
    data-dependent check of their own."""
    _check_range(index, lambdas.shape[0])
    return reference.threshold_step(
        sim, index, valid, lambdas, exp_avg, exp_avg_sq, steps,
        alpha, lr, beta1, beta2, eps, lo, hi, optimizer, step, update,
    )


@threshold_step.register_kernel("cpu")
def _threshold_step_cpu(sim, index, valid, lambdas, exp_avg, exp_avg_sq, steps,
                        alpha, lr, beta1, beta2, eps, lo, hi, optimizer, step, update):
    if _C is None or _backend != "c":
        _check_range(index, lambdas.shape[0])
        return reference.threshold_step(
            sim, index, valid, lambdas, exp_avg, exp_avg_sq, steps,
            alpha, lr, beta1, beta2, eps, lo, hi, optimizer, step, update,
        )
    mask, kept = _C.step(
        sim.numpy(), index.numpy(), None if valid is None else valid.numpy(),
        lambdas.numpy(), exp_avg.numpy(), exp_avg_sq.numpy(), steps.numpy(),
        alpha=alpha, lr=lr, beta1=beta1, beta2=beta2, eps=eps, lo=lo, hi=hi,
        optimizer=optimizer, step=step, update=update, num_threads=torch.get_num_threads(),
    )
    return torch.from_numpy(mask), torch.from_numpy(kept)


@threshold_step.register_fake
def _threshold_step_fake(sim, index, valid, lambdas, exp_avg, exp_avg_sq, steps,
                         alpha, lr, beta1, beta2, eps, lo, hi, optimizer, step, update):
    return (torch.empty(sim.shape, dtype=torch.bool, device=sim.device),
            torch.empty(sim.shape[:1], dtype=torch.int64, device=sim.device))


_backend = implementation


@contextlib.contextmanager
def use_backend(name: str):
    """Within the block, CPU tensors run on ``name``: ``"c"`` or ``"reference"``.

    Example::

        >>> with use_backend("reference"):
        ...     pass  # GloFND on CPU tensors now runs the pure-torch path
    """
    global _backend
    if name not in ("c", "reference"):
        raise ValueError(f"name must be 'c' or 'reference', got {name!r}")
    if name == "c" and _C is None:
        raise RuntimeError("the C extension glofnd._C is not built")
    previous, _backend = _backend, name
    try:
        yield
    finally:
        _backend = previous
