"""The GloFND state: one learned threshold λ_i per data-set sample (docs/algorithm.md)."""
from __future__ import annotations

import math
import threading
from typing import Optional, Union

import numpy as np
import torch
from torch import Tensor, nn

from . import _ops
from ._checks import _real as _check_real
from ._checks import check_state_fits
from . import distributed as _dist
from .reference import ADAM, SGD

_OPTIMIZERS = {"adam": ADAM, "sgd": SGD}
_STATE = (("lambdas", torch.float32), ("exp_avg", torch.float32),
          ("exp_avg_sq", torch.float32), ("steps", torch.int32))
_BIAS_CORRECTION = ("sample", "epoch")


def _versions(state: tuple[Tensor, ...]) -> tuple[int, ...]:
    """The version counters of the four state tensors (see GloFND._state_for_kernels)."""
    return (state[0]._version, state[1]._version, state[2]._version, state[3]._version)


def _interleaved(size: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Zeroed CPU state of ``size`` samples: λ_i and its two moments as the columns of one
    (size, 3) float32 block, so that a step over a large data set touches about two cache lines
    per sample (these 12 bytes and the count) instead of four (docs/benchmarks.md, section d);
    ``steps`` a separate int32 vector (torch.compile cannot trace in-place updates of views of
    one storage with different dtypes). NumPy's allocator asks the kernel for transparent huge
    pages on large blocks (torch's does not): at N = 10^7 that saves a TLB miss per access."""
    block = torch.from_numpy(np.zeros((size, 3), dtype=np.float32))
    steps = torch.from_numpy(np.zeros(size, dtype=np.int32))
    return block[:, 0], block[:, 1], block[:, 2], steps


def _is_interleaved(state: tuple[Tensor, ...]) -> bool:
    """Whether the buffers are laid out as :func:`_interleaved` makes them."""
    base = state[0]
    return (all(t.dim() == 1 and t.stride() == (3,) for t in state[:3])
            and all(t.untyped_storage().data_ptr() == base.untyped_storage().data_ptr()
                    and t.storage_offset() == base.storage_offset() + k
                    for k, t in enumerate(state[:3])))


def check_batch(sim: Tensor, index: Tensor, valid: Optional[Tensor], num_samples: int,
                check_index: bool = True) -> None:
    """Validates one batch; raises TypeError/ValueError/IndexError naming the argument."""
    if not isinstance(sim, Tensor):
        raise TypeError(f"sim must be a torch.Tensor, got {type(sim).__name__}")
    if not sim.is_floating_point():
        raise TypeError(f"sim must be a floating-point tensor, got dtype {sim.dtype}")
    if sim.dim() != 2:
        raise ValueError(f"sim must be 2-D (rows, columns), got shape {tuple(sim.shape)}")
    if sim.shape[0] == 0 or sim.shape[1] == 0:
        raise ValueError(f"sim is empty: shape {tuple(sim.shape)}")
    if not isinstance(index, Tensor):
        raise TypeError(f"index must be a torch.Tensor, got {type(index).__name__}")
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise TypeError(f"index must be an integer tensor, got dtype {index.dtype}")
    if index.shape != sim.shape[:1]:
        raise ValueError(f"index must have shape ({sim.shape[0]},) (the rows of sim), "
                         f"got {tuple(index.shape)}")
    if index.device != sim.device:
        raise ValueError(f"index is on {index.device} but sim is on {sim.device}")
    if valid is not None:
        if not isinstance(valid, Tensor) or valid.dtype != torch.bool:
            raise TypeError("valid must be None or a bool tensor")
        if valid.shape != sim.shape:
            raise ValueError(f"valid must have the shape of sim {tuple(sim.shape)}, "
                             f"got {tuple(valid.shape)}")
        if valid.device != sim.device:
            raise ValueError(f"valid is on {valid.device} but sim is on {sim.device}")
    # values are checked where they can be read: not on meta tensors nor while torch.compile
    # traces (the C kernel checks them again before it writes anything)
    if check_index and index.device.type != "meta" and not torch.compiler.is_compiling():
        lo, hi = torch.stack(torch.aminmax(index)).tolist()  # one read from the device
        if lo < 0 or hi >= num_samples:
            bad = lo if lo < 0 else hi
            raise IndexError(f"index holds {bad}, outside [0, num_samples={num_samples})")


class GloFND(nn.Module):
    r"""Per-sample false-negative thresholds λ, learned online as (1−α)-quantiles.

    For anchor i with cosine similarities :math:`s_{ij}` to its negatives, λ_i minimises
    :math:`F_i(λ) = αλ + \frac{1}{|S_i|}\sum_{j∈S_i}(s_{ij} − λ)_+`, so that a share α of the
    anchor's negatives *over the whole data set* lies above it. Each call takes a batch of rows,
    pools all rows of one data-set index into one stochastic subgradient

    .. math:: g_i = α − \frac{1}{|B_i|}\sum_{j∈B_i} 1[s_{ij} > λ_i],

    takes one Adam (β=(0.9, 0.98)) or SGD step on λ_i clamped to [−1, 1], and then flags as false
    negatives the valid entries strictly above the *new* λ_i. Only the batch's entries of the
    state are read or written, so a step costs O(R·M) whatever ``num_samples`` is.

    Args:
        num_samples: N, the size of the data set (indices lie in [0, N)).
        alpha: α in (0, 1), the share of negatives treated as false.
        lr: step size of λ (≥ 0).
        optimizer: ``"adam"`` (as the paper) or ``"sgd"``.
        betas, eps: Adam's decay rates and denominator term.
        init_lambda: initial λ in [−1, 1]; 1.0 flags nothing at first.
        bias_correction: ``"sample"`` (default): Adam's t is the per-sample update count t_i;
            ``"epoch"``: t = epoch + 1 as in the authors' code (set with :meth:`set_epoch`).
        clamp: the interval λ is kept in.
        distributed: multi-process training on ``torch.distributed`` (see
            :mod:`glofnd.distributed`): ``True`` or ``"replicated"`` keeps the whole state on
            every process, ``"sharded"`` keeps index i on rank ``i % W`` (about N/W × 16 bytes per
            process; the process group must be initialised before construction). Each process
            passes its own rows; the result equals one process stepping on all processes' rows.
            ``False`` (default), or no initialised group / one process: the ordinary path.
        process_group: the group for ``distributed`` (None: the default group).
        check_overwrite: in a multi-process run, check before each step that the entries this
            module wrote last still hold its values, and raise a RuntimeError if another writer
            (DDP's buffer broadcast) replaced them.

    Raises:
        TypeError / ValueError naming the argument; MemoryError naming ``num_samples`` when the
        state (16 bytes a sample) is more than this machine's memory and swap together.

    Shapes: ``sim`` (R, M) cosines of R rows against M columns, any float dtype (float16 and
    bfloat16 are compared in float32); ``index`` (R,) integer data-set ids of the rows' anchors,
    repeated ids allowed (pooled into one update); ``valid`` (R, M) bool or None (all valid).
    Non-finite entries (NaN, ±inf) are neither valid nor flagged; an index without a valid entry
    in the batch keeps its state (λ stays finite whatever the similarities hold).

    State (float32, saved in ``state_dict``): ``lambdas``, ``exp_avg``, ``exp_avg_sq`` (N,), and
    ``steps`` (N,) int32. On the CPU the three float32 vectors are the columns of one (N, 3)
    block (a sample's 12 bytes share a cache line, so that a step's cost hardly grows with N);
    any 1-D buffers of the right dtype and length work too. CPU tensors run the C kernel
    (multi-threaded, bit-identical for any thread count); others run the pure-torch reference on
    their own device.

    Threads: calls on one module are serialised by its lock (the result is that of some serial
    order); different modules step in parallel (the C kernel releases the GIL).

    Example::

        >>> fnd = GloFND(num_samples=1000, alpha=0.01)
        >>> z = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
        >>> is_fn = fnd(z @ z.T, torch.arange(8), valid=~torch.eye(8, dtype=torch.bool))
        >>> is_fn.shape, is_fn.dtype
        (torch.Size([8, 8]), torch.bool)
    """

    lambdas: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    steps: Tensor

    def __init__(self, num_samples: int, alpha: float = 0.01, lr: float = 0.05,
                 optimizer: str = "adam", betas: tuple[float, float] = (0.9, 0.98),
                 eps: float = 1e-8, init_lambda: float = 1.0, bias_correction: str = "sample",
                 clamp: tuple[float, float] = (-1.0, 1.0),
                 distributed: Union[bool, str] = False, process_group=None,
                 check_overwrite: bool = True):
        super().__init__()
        if isinstance(num_samples, bool) or not isinstance(num_samples, int):
            raise TypeError(f"num_samples must be an int, got {type(num_samples).__name__}")
        if not 0 < num_samples < 2**62:
            raise ValueError(f"num_samples must be > 0 and addressable, got {num_samples}")
        if not isinstance(optimizer, str) or optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {sorted(_OPTIMIZERS)}, got {optimizer!r}")
        if not isinstance(bias_correction, str) or bias_correction not in _BIAS_CORRECTION:
            raise ValueError(f"bias_correction must be one of {_BIAS_CORRECTION}, "
                             f"got {bias_correction!r}")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise TypeError("betas must be a pair (beta1, beta2)")
        if not (isinstance(clamp, (tuple, list)) and len(clamp) == 2):
            raise TypeError("clamp must be a pair (low, high)")
        self.num_samples = num_samples
        self.alpha = _check_real("alpha", alpha, 0.0, 1.0, True, True)
        self.lr = _check_real("lr", lr, 0.0, math.inf, False, True)
        self.betas = (_check_real("betas[0]", betas[0], 0.0, 1.0, False, True),
                      _check_real("betas[1]", betas[1], 0.0, 1.0, False, True))
        self.eps = _check_real("eps", eps, 0.0, math.inf, True, True)
        f32 = float(torch.finfo(torch.float32).max)  # λ is float32: wider bounds round to inf
        lo = _check_real("clamp[0]", clamp[0], -f32, f32, False, False)
        hi = _check_real("clamp[1]", clamp[1], lo, f32, False, False)
        self.clamp = (lo, hi)
        init = _check_real("init_lambda", init_lambda, lo, hi, False, False)
        self.optimizer = optimizer
        self.bias_correction = bias_correction
        self.epoch = 0
        self._lock = threading.Lock()
        self._arrays = None  # see _state_for_kernels
        self.distributed = _dist.resolve_mode(distributed)
        self.process_group = process_group
        self.check_overwrite = bool(check_overwrite)
        self._last_write = None
        size = num_samples
        if self.distributed == "sharded":  # (rank, world size) fixed at construction
            self.shard = _dist.world(process_group)
            size = _dist.shard_size(num_samples, *self.shard)
        check_state_fits(num_samples, size)
        block = _interleaved(size)
        block[0].fill_(init)
        for (name, _), view in zip(_STATE, block):
            self.register_buffer(name, view)

    def __setattr__(self, name: str, value) -> None:
        super().__setattr__(name, value)
        self.__dict__["_hyper"] = None  # any attribute may be a hyper-parameter: made again

    def _hyper_args(self, eager: bool = False) -> tuple:
        """``(alpha, lr, beta1, beta2, eps, lo, hi, optimizer, t)`` as the C kernels take them
        (t: Adam's step count, 0 for the per-sample counts). Kept in eager calls until an
        attribute is set (:meth:`__setattr__`): building it reads nine attributes, which costs
        more in a training step than the kernels' own extra work. ``eager``: the caller knows
        that it is not being traced (it asked :func:`glofnd._ops._direct`)."""
        keep = eager or not torch.compiler.is_compiling()
        hyper = self.__dict__.get("_hyper") if keep else None
        if hyper is None:
            hyper = (self.alpha, self.lr, self.betas[0], self.betas[1], self.eps, self.clamp[0],
                     self.clamp[1], _OPTIMIZERS[self.optimizer],
                     self.epoch + 1 if self.bias_correction == "epoch" else 0)
            if keep:
                self.__dict__["_hyper"] = hyper
        return hyper

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch used by ``bias_correction="epoch"`` (t = epoch + 1)."""
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epoch must be an int >= 0, got {epoch!r}")
        self.epoch = epoch

    def step(self, sim: Tensor, index: Tensor, valid: Optional[Tensor] = None,
             update: bool = True) -> tuple[Tensor, Tensor]:
        """Like :meth:`forward`, and also returns ``kept`` (R,) int64: the valid entries of each
        row that are not false negatives. ``update=False`` masks with the current λ only.

        With ``distributed`` set and more than one process, the call is collective (with
        ``update=True``, and always when sharded): every process calls it with its own rows."""
        return self._step(sim, index, valid, update, True)

    def _step(self, sim: Tensor, index: Tensor, valid: Optional[Tensor], update: bool,
              check_index: bool) -> tuple[Tensor, Tensor]:
        """:meth:`step`; ``check_index`` False leaves out the reference path's index range
        check (a host sync on accelerators), for the losses, which check it themselves unless
        their user turned ``check_index`` off. The C kernel checks it always."""
        hyper = self._hyper_args()
        if self._multi_process():
            if not isinstance(update, (bool, np.bool_)):
                raise TypeError(f"update must be a bool, got {type(update).__name__}")
            return _dist.step(self, sim, index, valid, bool(update), hyper[-1])
        # the index range is checked by the op's kernels (C and reference), which keeps this
        # path free of data-dependent Python and traceable by torch.compile
        check_batch(sim, index, valid, self.num_samples, check_index=False)
        state, views = self._state_for_kernels()
        if sim.device != state[0].device:
            raise ValueError(f"sim is on {sim.device} but the state is on {state[0].device}; "
                             "move the module with .to(device)")
        if not isinstance(update, (bool, np.bool_)):
            raise TypeError(f"update must be a bool, got {type(update).__name__}")
        sim = sim.detach()
        if sim.dtype not in (torch.float32, torch.float64):
            sim = sim.float()
        if index.dtype != torch.int64:
            index = index.to(torch.int64)
        args = (sim, index, valid, *state, *hyper, bool(update), bool(check_index))
        if torch.compiler.is_compiling():  # traced: the compiled graph runs the op as one call
            return _ops.threshold_step(*args)
        if _dist.guard_active(self):  # multi-process run: was the state replaced since?
            with self._lock:
                message = _dist.check_unchanged(self)
                if message is not None:
                    raise RuntimeError(message)
                out = _ops.threshold_step(*args)
                if update:
                    _dist.record_write(self, torch.unique(args[1]))
                return out
        with self._lock:  # one state, one writer: concurrent calls on it are serialised
            if views is not None and _ops._direct(sim, index, valid):
                out = _ops._threshold_step_cpu(*args, views=views)  # eager: the kernel itself
                self._wrote()
                return out
            return _ops.threshold_step(*args)

    def _fused_forward(self, sim: Tensor, index: Tensor, positive: Tensor,
                       own: Optional[Tensor], scale: float, kind: int, per_row: int,
                       update: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """:data:`glofnd._ops.fused_forward` on this state, for the losses: the λ update of
        :meth:`step` (when ``update``; the rows' own column and positive excluded by index, no
        mask made) and the loss's forward in one pass. The arguments are the losses' own, already
        checked; one process only (the losses take :meth:`step` otherwise)."""
        direct = _ops._direct(sim, positive, own, index)
        state, views = self._state_for_kernels(eager=direct)
        hyper = self._hyper_args(eager=direct)
        if direct and views is not None:  # eager on the CPU: the kernel itself
            with self._lock:
                out = _ops.fused_forward_c(sim, positive, own, index, state, views, scale, kind,
                                           per_row, True, hyper, update)
                if update:
                    self._wrote()
                return out
        args = (sim, positive, own, index, *state, scale, kind, per_row, True, *hyper,
                bool(update))
        if torch.compiler.is_compiling():  # traced: the compiled graph runs the op as one call
            return _ops.fused_forward(*args)
        with self._lock:
            return _ops.fused_forward(*args)

    def _multi_process(self) -> bool:
        if self.distributed is None:
            return False
        rank, size = _dist.world(self.process_group)
        if self.distributed == "sharded" and (rank, size) != self.shard:
            raise RuntimeError(f"this GloFND was sharded for rank {self.shard[0]} of world size "
                               f"{self.shard[1]} at construction, but the process group is now "
                               f"rank {rank} of {size}; build GloFND(distributed='sharded') after "
                               "torch.distributed.init_process_group")
        return size > 1

    def mark_state_changed(self) -> None:
        """Accepts the current state as this module's own after a deliberate change between
        steps (the overwrite check of multi-process runs would otherwise report it)."""
        _dist.forget_write(self)

    def _check_state(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The buffers as the kernels update them in place: (N,) contiguous, float32 (int32 for
        ``steps``), on one device. Casting the module (``.double()``, ``.half()``) breaks this.
        A sharded state holds this process's share of the N entries. Returns the four buffers
        (read from ``_buffers`` directly: ``nn.Module.__getattr__`` costs a microsecond each,
        and this runs on every step)."""
        n = self.num_samples
        if self.distributed == "sharded":
            n = _dist.shard_size(n, *self.shard)
        buffers = self._buffers
        state = tuple(buffers.get(name) for name, _ in _STATE)
        device = state[0].device if isinstance(state[0], Tensor) else None
        for (name, dtype), t in zip(_STATE, state):
            if not isinstance(t, Tensor) or t.dtype != dtype:
                got = t.dtype if isinstance(t, Tensor) else type(t).__name__
                raise TypeError(f"the state buffer {name} must have dtype {dtype}, got {got}")
            if t.shape != (n,) or (n > 1 and t.stride(0) < 1):
                raise ValueError(f"the state buffer {name} must be 1-D of shape ({n},) with a "
                                 f"positive stride, got shape {tuple(t.shape)}, stride "
                                 f"{t.stride()}")
            if t.device != device:
                raise ValueError(f"the state buffer {name} is on {t.device}, lambdas on "
                                 f"{device}")
        return state

    def _state_for_kernels(self, eager: bool = False
                           ) -> tuple[tuple[Tensor, ...], Optional[tuple[np.ndarray, ...]]]:
        """``(buffers, views)``: the checked buffers, and NumPy views of their memory where the
        call will run the C kernels directly (eager, state on the CPU, extension in use), else
        None (traced code must not read addresses or make arrays). ``eager``: the caller knows
        that it is not being traced (it asked :func:`glofnd._ops._direct`).

        The views are kept between calls while the four buffers stay the same objects at the
        same addresses with the same version counters (``Tensor._version``, which every in-place
        operation advances: ``set_``, ``resize_``, ``as_strided_`` among them; the kernels' own
        writes are recorded by :meth:`_wrote`). That costs a few hundred nanoseconds per call
        instead of the checks and four ``Tensor.numpy()`` (about 5 µs). Anything that replaces a
        buffer (``.to()``, ``_apply``, assignment), its memory (``.data =``, ``set_``) or its
        layout, or writes it in place, makes them be built and checked again; the one change
        not seen is ``.data =`` a tensor at the same address with another layout. Kept views
        exist only for CPU buffers, so the device is looked at only when they are (re)built."""
        if not _ops._use_c() or not eager and torch.compiler.is_compiling():
            return self._check_state(), None
        kept = self._arrays
        if kept is not None:
            b = self._buffers
            lam, m1, m2, t = state = kept[0]
            if (b.get("lambdas") is lam and b.get("exp_avg") is m1
                    and b.get("exp_avg_sq") is m2 and b.get("steps") is t
                    and kept[2] == _versions(state)
                    and kept[3] == (lam.data_ptr(), m1.data_ptr(), m2.data_ptr(), t.data_ptr())):
                return state, kept[1]
        state = self._check_state()
        if state[0].device.type != "cpu":
            self._arrays = None
            return state, None
        views = tuple(t.numpy() for t in state)
        self._arrays = [state, views, _versions(state), tuple(t.data_ptr() for t in state)]
        return state, views

    def _wrote(self) -> None:
        """Records the version counters after a kernel wrote the buffers through the kept views
        (and advanced the counters, as an in-place operation would), so that the next call
        keeps the views. Called under the lock, right after the write."""
        kept = self._arrays
        if kept is not None:
            kept[2] = _versions(kept[0])

    def forward(self, sim: Tensor, index: Tensor, valid: Optional[Tensor] = None,
                update: bool = True) -> Tensor:
        """Updates λ of the rows' indices, then returns the (R, M) bool false-negative mask."""
        return self.step(sim, index, valid, update)[0]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        _dist.forget_write(self)
        if self.distributed == "sharded":
            state_dict = _dist.load_shard(self, state_dict, prefix)
        else:
            _dist.check_not_shard(self, state_dict, prefix)
        key = prefix + "lambdas"
        if key in state_dict and state_dict[key].shape != self.lambdas.shape:
            raise ValueError(f"the checkpoint's GloFND state has num_samples="
                             f"{state_dict[key].shape[0]}, this module has num_samples="
                             f"{self.num_samples}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _apply(self, fn, recurse=True):
        # .to(device) moves the state; .double()/.half() leave it float32, values untouched (a
        # cast there and back would round λ to the cast's precision)
        def keep_dtype(t):
            out = fn(t)
            return out if out.dtype == t.dtype else t.to(out.device)
        super()._apply(keep_dtype, recurse)
        self._arrays = None  # the kept views would keep the old buffers' memory alive
        _dist.forget_write(self)
        for name in ("lambdas", "exp_avg", "exp_avg_sq"):
            if getattr(self, name).dtype != torch.float32:
                setattr(self, name, getattr(self, name).float())
        self._interleave()
        return self

    def _interleave(self) -> None:
        """Puts λ and its moments back into one (N, 3) block on the CPU after a conversion copied
        the buffers apart (values unchanged; other devices keep separate buffers)."""
        state = tuple(self._buffers.get(name) for name, _ in _STATE)
        if not all(isinstance(t, Tensor) and t.device.type == "cpu" and t.dim() == 1
                   and t.dtype == dtype for t, (_, dtype) in zip(state, _STATE)) \
                or len({t.shape for t in state}) != 1 or _is_interleaved(state):
            return
        block = _interleaved(state[0].shape[0])
        for (name, _), new, old in zip(_STATE[:3], block, state):
            new.copy_(old)
            self._buffers[name] = new

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # four separate contiguous tensors, the checkpoint format of every version
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, _ in _STATE:
            t = destination.get(prefix + name)
            if isinstance(t, Tensor) and not t.is_contiguous():
                destination[prefix + name] = t.clone(memory_format=torch.contiguous_format)

    def get_extra_state(self):
        if self.distributed == "sharded":
            return {"epoch": self.epoch, "shard": _dist.shard_info(self)}
        return {"epoch": self.epoch}

    def set_extra_state(self, state) -> None:
        self.epoch = int(state["epoch"])

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_lock", None)
        state["_last_write"] = None
        state["_arrays"] = None  # views of this process's memory
        return state

    def __setstate__(self, state):
        for name, default in (("distributed", None), ("process_group", None),
                              ("check_overwrite", True), ("_arrays", None)):
            state.setdefault(name, default)
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def extra_repr(self) -> str:
        extra = "" if self.distributed is None else f", distributed={self.distributed!r}"
        return (f"num_samples={self.num_samples}, alpha={self.alpha}, lr={self.lr}, "
                f"optimizer={self.optimizer!r}, bias_correction={self.bias_correction!r}{extra}")
