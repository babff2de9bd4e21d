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


# Defined with the low-level torch.library API: a schema of 17 arguments through
# torch.library.custom_op costs ~65 us per eager call in Python-side argument handling (its
# in-place wrapper re-reads the schema once per argument), more than the kernel itself at
# B = 128. Here the dispatcher's C++ fallbacks bump the version counters of the mutated
# state, and the CPU kernel is reached for a few microseconds.
_lib = torch.library.Library("glofnd", "FRAGMENT")
_lib.define(
    "threshold_step(Tensor sim, Tensor index, Tensor? valid, Tensor(a!) lambdas, "
    "Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor(d!) steps, float alpha, float lr, "
    "float beta1, float beta2, float eps, float lo, float hi, int optimizer, int step, "
    "bool update) -> (Tensor, Tensor)"
)


def _check_range(index: Tensor, n: int) -> None:
    """The index range, checked in the eager kernels so that traced callers need no
    data-dependent check of their own (the C binding checks it itself)."""
    if index.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(index))
    if lo < 0 or hi >= n:
        raise IndexError(f"index holds {lo if lo < 0 else hi}, outside [0, num_samples={n})")


def _threshold_step_any(sim, index, valid, lambdas, exp_avg, exp_avg_sq, steps,
                        alpha, lr, beta1, beta2, eps, lo, hi, optimizer, step, update):
    """Any device: the reference in plain torch on the tensors' own device."""
    _check_range(index, lambdas.shape[0])
    return reference.threshold_step(
        sim, index, valid, lambdas, exp_avg, exp_avg_sq, steps,
        alpha, lr, beta1, beta2, eps, lo, hi, optimizer, step, update,
    )


def _threshold_step_cpu(sim, index, valid, lambdas, exp_avg, exp_avg_sq, steps,
                        alpha, lr, beta1, beta2, eps, lo, hi, optimizer, step, update):
    """CPU: the C kernel on the tensors' memory (``Tensor.numpy()`` shares it, no copy)."""
    if _C is None or _backend != "c":
        return _threshold_step_any(sim, index, valid, lambdas, exp_avg, exp_avg_sq, steps,
                                   alpha, lr, beta1, beta2, eps, lo, hi, optimizer, step, update)
    mask, kept = _C.step(
        sim.detach().numpy(), index.numpy(), None if valid is None else valid.numpy(),
        lambdas.numpy(), exp_avg.numpy(), exp_avg_sq.numpy(), steps.numpy(),
        alpha=alpha, lr=lr, beta1=beta1, beta2=beta2, eps=eps, lo=lo, hi=hi,
        optimizer=optimizer, step=step, update=update, num_threads=torch.get_num_threads(),
    )
    # the C kernel wrote through the buffers' memory: tell autograd, as an in-place op would
    torch.autograd.graph.increment_version((lambdas, exp_avg, exp_avg_sq, steps))
    return torch.from_numpy(mask), torch.from_numpy(kept)


def _threshold_step_fake(sim, index, valid, lambdas, exp_avg, exp_avg_sq, steps,
                         alpha, lr, beta1, beta2, eps, lo, hi, optimizer, step, update):
    return (torch.empty(sim.shape, dtype=torch.bool, device=sim.device),
            torch.empty(sim.shape[:1], dtype=torch.int64, device=sim.device))


_lib.impl("threshold_step", _threshold_step_any, "CompositeExplicitAutograd")
_lib.impl("threshold_step", _threshold_step_cpu, "CPU")
torch.library.register_fake("glofnd::threshold_step", _threshold_step_fake, lib=_lib)

threshold_step = torch.ops.glofnd.threshold_step
"""``glofnd::threshold_step``: fused λ update and false-negative mask (see
:func:`glofnd.reference.threshold_step`); mutates lambdas, exp_avg, exp_avg_sq and steps."""

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
