"""Framework-agnostic entry point: the threshold step on NumPy arrays (JAX and others via
``numpy.asarray``). The state is a dict of NumPy arrays updated in place."""
from __future__ import annotations

import os
from typing import Optional

import numpy as np

from ._checks import _is_int, _real, check_state_fits

try:
    from . import _C
except ImportError:
    _C = None

_OPT = {"adam": 0, "sgd": 1}
_STATE = (("lambdas", np.float32), ("exp_avg", np.float32), ("exp_avg_sq", np.float32),
          ("steps", np.int32))
_MAX_THREADS = 1024  # the C binding's limit
_F32 = float(np.finfo(np.float32).max)  # λ is stored in float32: bounds beyond would round to inf


def _pair(name: str, value) -> tuple:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise TypeError(f"{name} must be a pair, got {type(value).__name__}")
    return tuple(value)


def _check_state(state) -> int:
    """The state's length N, after checking what the in-place update needs of each array."""
    if not isinstance(state, dict) or any(k not in state for k, _ in _STATE):
        raise TypeError("state must be a dict from glofnd.numpy_api.init_state")
    n = None
    for key, dtype in _STATE:
        a = state[key]
        if not isinstance(a, np.ndarray) or a.dtype != dtype:
            got = a.dtype if isinstance(a, np.ndarray) else type(a).__name__
            raise TypeError(f"state[{key!r}] must be a numpy.ndarray of dtype "
                            f"{np.dtype(dtype).name}, got {got}")
        n = a.shape[0] if n is None and a.ndim == 1 else n
        if a.ndim != 1 or a.shape[0] != n:
            raise ValueError(f"state[{key!r}] must be 1-D of length {n} (num_samples), "
                             f"got shape {a.shape}")
        stride = a.strides[0]
        if not (a.flags.writeable and a.flags.aligned) or (n > 1 and (stride <= 0 or stride % 4)):
            raise ValueError(f"state[{key!r}] must be aligned, writeable, with a positive stride "
                             "of whole elements (contiguous, or a column of an (N, k) block)")
    # no element shared: byte ranges apart, or the same stride and start addresses that differ
    # by a non-multiple of it (the columns of one block; elements are aligned 4-byte words)
    for i, (ka, _) in enumerate(_STATE):
        for kb, _ in _STATE[i + 1:]:
            a, b = state[ka], state[kb]
            pa, pb = a.__array_interface__["data"][0], b.__array_interface__["data"][0]
            sa, sb = (a.strides[0], b.strides[0]) if n > 1 else (4, 4)
            apart = pa >= pb + sb * (n - 1) + 4 or pb >= pa + sa * (n - 1) + 4
            if not apart and not (sa == sb and (pa - pb) % sa != 0):
                raise ValueError(f"state[{ka!r}] and state[{kb!r}] must not share memory")
    return n


def _check_batch(sim, index, valid, n: int) -> None:
    if not isinstance(sim, np.ndarray):
        raise TypeError(f"sim must be a numpy.ndarray, got {type(sim).__name__}")
    if sim.dtype not in (np.float32, np.float64):
        raise TypeError(f"sim must have dtype float32 or float64, got {sim.dtype}")
    if sim.ndim != 2:
        raise ValueError(f"sim must be 2-D (rows, columns), got shape {sim.shape}")
    if sim.size == 0:
        raise ValueError(f"sim is empty: shape {sim.shape}")
    if not isinstance(index, np.ndarray) or index.dtype == np.bool_ or \
            not np.issubdtype(index.dtype, np.integer):
        got = index.dtype if isinstance(index, np.ndarray) else type(index).__name__
        raise TypeError(f"index must be a numpy.ndarray of integers, got {got}")
    if index.shape != sim.shape[:1]:
        raise ValueError(f"index must have shape ({sim.shape[0]},) (the rows of sim), "
                         f"got {index.shape}")
    lo, hi = int(index.min()), int(index.max())
    if lo < 0 or hi >= n:
        raise IndexError(f"index holds {lo if lo < 0 else hi}, outside [0, num_samples={n})")
    if valid is not None:
        if not isinstance(valid, np.ndarray) or valid.dtype != np.bool_:
            raise TypeError("valid must be None or a numpy.ndarray of dtype bool")
        if valid.shape != sim.shape:
            raise ValueError(f"valid must have the shape of sim {sim.shape}, got {valid.shape}")


def init_state(num_samples: int, init_lambda: float = 1.0) -> dict:
    """A fresh state: ``lambdas`` (N,) float32 at ``init_lambda``, zero Adam moments
    ``exp_avg``/``exp_avg_sq`` (N,) float32 and update counts ``steps`` (N,) int32.

    The four are views of the columns of one (N, 4) float32 array (the counts' int32 bits in the
    last), as :class:`glofnd.GloFND` keeps its state: a sample's 16 bytes share one cache line,
    so that a step's cost hardly grows with N (docs/benchmarks.md, section d). Any four 1-D
    arrays of these dtypes and length N that share no element work as a state too.

    Raises a MemoryError naming ``num_samples`` when those 16 bytes a sample are more than this
    machine's memory and swap together, or cannot be allocated."""
    if not _is_int(num_samples):
        raise TypeError(f"num_samples must be an int, got {type(num_samples).__name__}")
    if not 0 < num_samples <= np.iinfo(np.intp).max // 4:
        raise ValueError(f"num_samples must be > 0 and addressable, got {num_samples}")
    init = _real("init_lambda", init_lambda, -_F32, _F32, False, False)
    check_state_fits(num_samples, num_samples)
    try:
        block = np.zeros((num_samples, 4), dtype=np.float32)
        block[:, 0] = init
        return {"lambdas": block[:, 0], "exp_avg": block[:, 1], "exp_avg_sq": block[:, 2],
                "steps": block.view(np.int32)[:, 3]}
    except MemoryError:
        raise MemoryError(f"num_samples={num_samples} needs {16 * num_samples / 2**30:.1f} GiB "
                          "of state, more than can be allocated here") from None


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
        valid: (R, M) bool array or None (all valid). Non-finite entries (NaN, ±inf) are never
            valid.
        step: 0 for per-sample Adam bias correction, t > 0 to use t for every sample.
        num_threads: OpenMP threads (default: all cores, at most 1024); the result does not
            depend on it.

    Threads: there is no lock here; calls on different states may run in parallel (the GIL is
    released in the kernel), calls on one state must be serialised by the caller.

    Returns:
        ``(mask, kept)``: (R, M) bool and (R,) int64 counts of valid entries not masked.

    Raises:
        TypeError, ValueError, IndexError (naming the argument) on bad input: wrong types,
        dtypes or shapes, an empty batch, indices outside [0, N), hyper-parameters out of range,
        state arrays that are not 1-D, of their dtype, aligned and writeable with a positive
        stride, or that share elements. The state is checked before anything is written: on
        error it is left exactly as it was.

    Example::

        >>> st = init_state(10)
        >>> sim = np.random.default_rng(0).uniform(-1, 1, (4, 6)).astype(np.float32)
        >>> mask, kept = threshold_step(sim, np.array([0, 1, 2, 0]), st, alpha=0.1)
        >>> mask.shape, kept.shape
        ((4, 6), (4,))
    """
    n = _check_state(state)
    _check_batch(sim, index, valid, n)
    if not isinstance(optimizer, str) or optimizer not in _OPT:
        raise ValueError(f"optimizer must be one of {sorted(_OPT)}, got {optimizer!r}")
    beta1, beta2 = _pair("betas", betas)
    lo, hi = _pair("clamp", clamp)
    kwargs = dict(alpha=_real("alpha", alpha, 0.0, 1.0, True, True),
                  lr=_real("lr", lr, 0.0, np.inf, False, True),
                  beta1=_real("betas[0]", beta1, 0.0, 1.0, False, True),
                  beta2=_real("betas[1]", beta2, 0.0, 1.0, False, True),
                  eps=_real("eps", eps, 0.0, np.inf, True, True),
                  lo=_real("clamp[0]", lo, -_F32, _F32, False, False),
                  hi=_real("clamp[1]", hi, -_F32, _F32, False, False),
                  optimizer=_OPT[optimizer])
    if kwargs["lo"] > kwargs["hi"]:
        raise ValueError(f"clamp must have clamp[0] <= clamp[1], got {tuple(clamp)}")
    if not _is_int(step) or step < 0:
        raise (ValueError if _is_int(step) else TypeError)(
            f"step must be an int >= 0, got {step!r}")
    if not isinstance(update, (bool, np.bool_)):
        raise TypeError(f"update must be a bool, got {type(update).__name__}")
    if num_threads is not None and (not _is_int(num_threads) or
                                    not 0 <= num_threads <= _MAX_THREADS):
        raise (ValueError if _is_int(num_threads) else TypeError)(
            f"num_threads must be None or an int in [0, {_MAX_THREADS}], got {num_threads!r}")
    kwargs.update(step=int(step), update=bool(update))
    if _C is not None:
        threads = num_threads if num_threads is not None else (os.cpu_count() or 1)
        return _C.step(sim, index, valid, state["lambdas"], state["exp_avg"],
                       state["exp_avg_sq"], state["steps"],
                       num_threads=min(int(threads), _MAX_THREADS), **kwargs)
    return _reference(sim, index, state, valid, kwargs)


def _reference(sim, index, state, valid, kwargs):
    import torch

    from .reference import threshold_step as ref

    # inputs were checked by threshold_step; torch.from_numpy refuses negative strides, which
    # ascontiguousarray keeps on a flipped dimension of size 1: copy
    s = torch.from_numpy(np.array(sim, order="C"))
    ix = torch.from_numpy(index.astype(np.int64))
    v = None if valid is None else torch.from_numpy(np.array(valid, order="C"))
    tensors = {k: torch.from_numpy(state[k]) for k, _ in _STATE}
    mask, kept = ref(s, ix, v, tensors["lambdas"], tensors["exp_avg"],
                     tensors["exp_avg_sq"], tensors["steps"], **kwargs)
    return mask.numpy(), kept.numpy()
