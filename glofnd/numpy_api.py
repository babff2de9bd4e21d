"""Framework-agnostic entry point: the threshold step on NumPy arrays (JAX and others via
``numpy.asarray``). The state is a dict of NumPy arrays updated in place."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

try:
    from . import _C
except ImportError:
    _C = None

_OPT = {"adam": 0, "sgd": 1}


def init_state(num_samples: int, init_lambda: float = 1.0) -> dict:
    """A fresh state: ``lambdas`` (N,) float32 at ``init_lambda``, zero Adam moments
    ``exp_avg``/``exp_avg_sq`` (N,) float32 and update counts ``steps`` (N,) int32."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)):
        raise TypeError(f"num_samples must be an int, got {type(num_samples).__name__}")
    if num_samples <= 0:
        raise ValueError(f"num_samples must be > 0, got {num_samples}")
    return {
        "lambdas": np.full(num_samples, init_lambda, dtype=np.float32),
        "exp_avg": np.zeros(num_samples, dtype=np.float32),
        "exp_avg_sq": np.zeros(num_samples, dtype=np.float32),
        "steps": np.zeros(num_samples, dtype=np.int32),
    }


def threshold_step(sim, index, state: dict, valid=None, *, alpha: float = 0.01,
                   lr: float = 0.05, optimizer: str = "adam", betas=(0.9, 0.98),
                   eps: float = 1e-8, clamp=(-1.0, 1.0), step: int = 0, update: bool = True,
                   num_threads: Optional[int] = None):
    r"""One GloFND step on NumPy arrays: update λ of the batch's indices, then mask.

    g_i = α − (1/|B_i|) Σ_{j∈B_i} 1[s_ij > λ_i] over all valid entries of all rows of index i;
    Adam (or SGD) on λ_i, clamped; then ``mask[r, j] = valid[r, j] and sim[r, j] > λ_{index[r]}``.

    Args:
        sim: (R, M) float32 or float64 array (read through its strides, not copied).
        index: (R,) integer array of data-set ids in [0, N).
        state: a dict from :func:`init_state`, updated in place.
        valid: (R, M) bool array or None (all valid). NaN entries are never valid.
        step: 0 for per-sample Adam bias correction, t > 0 to use t for every sample.
        num_threads: OpenMP threads (default: all cores); the result does not depend on it.

    Returns:
        ``(mask, kept)``: (R, M) bool and (R,) int64 counts of valid entries not masked.

    Example::

        >>> st = init_state(10)
        >>> sim = np.random.default_rng(0).uniform(-1, 1, (4, 6)).astype(np.float32)
        >>> mask, kept = threshold_step(sim, np.array([0, 1, 2, 0]), st, alpha=0.1)
        >>> mask.shape, kept.shape
        ((4, 6), (4,))
    """
    if not isinstance(state, dict) or any(k not in state for k in
                                         ("lambdas", "exp_avg", "exp_avg_sq", "steps")):
        raise TypeError("state must be a dict from glofnd.numpy_api.init_state")
    if optimizer not in _OPT:
        raise ValueError(f"optimizer must be one of {sorted(_OPT)}, got {optimizer!r}")
    kwargs = dict(alpha=float(alpha), lr=float(lr), beta1=float(betas[0]),
                  beta2=float(betas[1]), eps=float(eps), lo=float(clamp[0]),
                  hi=float(clamp[1]), optimizer=_OPT[optimizer], step=int(step),
                  update=bool(update))
    if _C is not None:
        threads = num_threads if num_threads is not None else (os.cpu_count() or 1)
        return _C.step(sim, index, valid, state["lambdas"], state["exp_avg"],
                       state["exp_avg_sq"], state["steps"], num_threads=int(threads), **kwargs)
    return _reference(sim, index, state, valid, kwargs)


def _reference(sim, index, state, valid, kwargs):
    import torch

    from .reference import threshold_step as ref
    from .state import check_batch

    n = state["lambdas"].shape[0]
    s, ix = torch.from_numpy(np.asarray(sim)), torch.from_numpy(np.asarray(index))
    v = None if valid is None else torch.from_numpy(np.asarray(valid))
    check_batch(s, ix, v, n)
    tensors = {k: torch.from_numpy(state[k]) for k in ("lambdas", "exp_avg", "exp_avg_sq", "steps")}
    mask, kept = ref(s, ix.long(), v, tensors["lambdas"], tensors["exp_avg"],
                     tensors["exp_avg_sq"], tensors["steps"], **kwargs)
    return mask.numpy(), kept.numpy()
