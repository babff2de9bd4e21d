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


def _new_block(size: int) -> Tensor:
    """Zeroed CPU state of ``size`` samples: the (size, 4) float32 block behind
    :attr:`GloFND.state`, whose row i holds λ_i, its two moments and the bits of the int32 count
    t_i, so that a step over a large data set touches one cache line per sample (16 bytes,
    aligned) instead of two or four (docs/benchmarks.md, section d). NumPy's allocator asks the
    kernel for transparent huge pages on large blocks (torch's does not): at N = 10^7 that saves
    a TLB miss per access."""
    return torch.from_numpy(np.zeros((size, 4), dtype=np.float32))


def _column(block: Tensor, k: int) -> Tensor:
    """State vector k, an (N,) view of a state block: λ, m, v (float32) or, k = 3, the counts
    (int32)."""
    column = block[:, k]
    return column.view(torch.int32) if k == 3 else column


def _columns(block: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The four (N,) views of a state block: λ, m, v (float32) and the counts (int32)."""
    return tuple(_column(block, k) for k in range(4))


def _vector(k: int, doc: str) -> property:
    """GloFND's state vector k: column k of its buffer ``state`` (as int32 for the counts,
    k = 3); assigning copies into it (GloFND._assign)."""
    def get(self) -> Tensor:
        return _column(self._buffers["state"], k)

    def assign(self, value: Tensor) -> None:
        self._assign(k, value)
    return property(get, assign, doc=doc)


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

    State: ``lambdas``, ``exp_avg``, ``exp_avg_sq`` (N,) float32 and ``steps`` (N,) int32, the
    columns of one (N, 4) float32 buffer ``state`` (the counts' int32 bits in its last column):
    a sample's 16 bytes share one cache line, so that a step's cost hardly grows with N. The
    four are views of it (assigning one copies into it); ``state_dict`` saves them as four
    contiguous tensors. CPU tensors run the C kernel (multi-threaded, bit-identical for any
    thread count); others run the pure-torch reference on their own device.

    Threads: calls on one module are serialised by its lock (the result is that of some serial
    order); different modules step in parallel (the C kernel releases the GIL).

    Example::

        >>> fnd = GloFND(num_samples=1000, alpha=0.01)
        >>> z = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
        >>> is_fn = fnd(z @ z.T, torch.arange(8), valid=~torch.eye(8, dtype=torch.bool))
        >>> is_fn.shape, is_fn.dtype
        (torch.Size([8, 8]), torch.bool)
    """

    # The four state vectors are views of the one buffer: torch.compile traces them as views of
    # it (aot_autograd refuses input mutations of views of one storage with different dtypes,
    # which four buffers would be); assigning one copies into it.
    lambdas = _vector(0, "(N,) float32: the thresholds λ (a view of the buffer ``state``).")
    exp_avg = _vector(1, "(N,) float32: Adam's first moment of λ (a view of ``state``).")
    exp_avg_sq = _vector(2, "(N,) float32: Adam's second moment of λ (a view of ``state``).")
    steps = _vector(3, "(N,) int32: the number of updates of each λ_i (a view of ``state``).")

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
        block = _new_block(size)
        block[:, 0].fill_(init)
        # not saved as such: state_dict holds the four vectors (_save_to_state_dict)
        self.register_buffer("state", block, persistent=False)

    def _assign(self, k: int, value: Tensor) -> None:
        """``fnd.<name> = value``: copies value (same shape and dtype) into column k."""
        name, dtype = _STATE[k]
        if not isinstance(value, Tensor) or value.dtype != dtype:
            got = value.dtype if isinstance(value, Tensor) else type(value).__name__
            raise TypeError(f"{name} must be a {dtype} tensor, got {got}")
        view = _column(self._buffers["state"], k)
        if value.shape != view.shape:
            raise ValueError(f"{name} must have shape {tuple(view.shape)}, got "
                             f"{tuple(value.shape)}")
        with torch.no_grad():
            view.copy_(value)
        _dist.forget_write(self)

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
        """The four state vectors as the kernels update them in place: the columns of the
        buffer ``state``, which must be (N, 4) float32 with unit column stride (a sharded state
        holds this process's share of the N entries). Returns ``(lambdas, exp_avg, exp_avg_sq,
        steps)``, (N,) views (read from ``_buffers`` directly: ``nn.Module.__getattr__`` costs
        a microsecond, and this runs on every step)."""
        n = self.num_samples
        if self.distributed == "sharded":
            n = _dist.shard_size(n, *self.shard)
        block = self._buffers.get("state")
        if not isinstance(block, Tensor) or block.dtype != torch.float32:
            got = block.dtype if isinstance(block, Tensor) else type(block).__name__
            raise TypeError(f"the state buffer must have dtype torch.float32, got {got}")
        if block.shape != (n, 4) or block.stride(1) != 1 or (n > 1 and block.stride(0) < 4):
            raise ValueError(f"the state buffer must have shape ({n}, 4), unit column stride and "
                             f"a row stride of at least 4, got shape {tuple(block.shape)}, stride "
                             f"{block.stride()}")
        return _columns(block)

    def _state_for_kernels(self, eager: bool = False
                           ) -> tuple[tuple[Tensor, ...], Optional[tuple[np.ndarray, ...]]]:
        """``(state, views)``: the four checked state vectors (:meth:`_check_state`), and NumPy
        views of their memory where the call will run the C kernels directly (eager, state on
        the CPU, extension in use), else None (traced code must not read addresses or make
        arrays). ``eager``: the caller knows that it is not being traced (it asked
        :func:`glofnd._ops._direct`).

        Both are kept between calls while the buffer ``state`` stays the same object at the same
        address, with the same shape, strides and version counter (``Tensor._version``, which
        every in-place operation on it or its views advances: ``set_``, ``resize_``,
        ``as_strided_`` among them; the kernels' own writes are recorded by :meth:`_wrote`).
        That costs a few hundred nanoseconds per call instead of the checks, four views and four
        ``Tensor.numpy()`` (about 8 µs). Anything that replaces the buffer (``.to()``,
        ``_apply``), its memory (``.data =``, ``set_``) or its layout, or writes it in place,
        makes them be built and checked again. Kept views exist only for a CPU buffer, so the
        device is looked at only when they are (re)built."""
        if not _ops._use_c() or not eager and torch.compiler.is_compiling():
            return self._check_state(), None
        kept = self._arrays
        block = self._buffers.get("state")
        if (kept is not None and block is kept[0] and kept[2] == block._version
                and kept[3] == (block.data_ptr(), block.shape, block.stride())):
            return kept[4], kept[1]
        state = self._check_state()
        if block.device.type != "cpu":
            self._arrays = None
            return state, None
        views = tuple(t.numpy() for t in state)
        self._arrays = [block, views, block._version,
                        (block.data_ptr(), block.shape, block.stride()), state]
        return state, views

    def _wrote(self) -> None:
        """Records the version counter after a kernel wrote the state through the kept views
        (and advanced the counter, as an in-place operation would), so that the next call keeps
        the views. Called under the lock, right after the write."""
        kept = self._arrays
        if kept is not None:
            kept[2] = kept[0]._version

    def forward(self, sim: Tensor, index: Tensor, valid: Optional[Tensor] = None,
                update: bool = True) -> Tensor:
        """Updates λ of the rows' indices, then returns the (R, M) bool false-negative mask."""
        return self.step(sim, index, valid, update)[0]

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # the four vectors, checked all before any is copied into the block (in place, also
        # with assign=True: the buffer stays one block). They load together: with one missing
        # none is loaded, also with strict=False (which reports it in missing_keys; torch passes
        # strict=True here whatever the caller asked), as λ without its moments and counts
        # would not be a state
        _dist.forget_write(self)
        if self.distributed == "sharded":
            state_dict = _dist.load_shard(self, state_dict, prefix)
        else:
            _dist.check_not_shard(self, state_dict, prefix)
        columns = self._check_state()
        key = prefix + "lambdas"
        got = state_dict.get(key)
        if isinstance(got, Tensor) and got.shape != columns[0].shape:
            raise ValueError(f"the checkpoint's GloFND state has num_samples="
                             f"{got.shape[0] if got.dim() else got.shape}, this module has "
                             f"num_samples={self.num_samples}")
        loads, bad = [], False
        for (name, _), view in zip(_STATE, columns):
            key = prefix + name
            if key not in state_dict:
                missing_keys.append(key)
                bad = True
                continue
            value = state_dict[key]
            if not isinstance(value, Tensor):
                error_msgs.append(f"While copying the state vector {key}, expected a tensor "
                                  f"from the checkpoint but received {type(value).__name__}")
                bad = True
            elif value.shape != view.shape:
                error_msgs.append(f"size mismatch for {key}: copying a state vector of shape "
                                  f"{tuple(value.shape)} from the checkpoint, the shape in "
                                  f"this module is {tuple(view.shape)}")
                bad = True
            else:
                loads.append((view, value))
        if not bad:
            with torch.no_grad():
                for view, value in loads:
                    view.copy_(value)
        names = {prefix + name for name, _ in _STATE}
        super()._load_from_state_dict({k: v for k, v in state_dict.items() if k not in names},
                                      prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def _apply(self, fn, recurse=True):
        # .to(device) moves the state; .double()/.half() leave it float32, values untouched (a
        # cast there and back would round λ to the cast's precision)
        def keep_dtype(t):
            out = fn(t)
            return out if out.dtype == t.dtype else t.to(out.device)
        old = self._buffers.get("state")
        super()._apply(keep_dtype, recurse)
        self._arrays = None  # the kept views would keep the old buffer's memory alive
        _dist.forget_write(self)
        block = self._buffers.get("state")
        if (block is not old and isinstance(block, Tensor) and block.device.type == "cpu"
                and block.dtype == torch.float32 and block.dim() == 2):
            self._buffers["state"] = _new_block(block.shape[0]).copy_(block)  # huge pages
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # four separate contiguous tensors, the checkpoint format of every version
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for (name, _), view in zip(_STATE, _columns(self._buffers["state"])):
            destination[prefix + name] = view.detach().clone(
                memory_format=torch.contiguous_format)

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
        buffers = state.get("_buffers", {})
        if "state" not in buffers and all(name in buffers for name, _ in _STATE):
            # pickled by a version with four buffers: into one block
            old = [buffers.pop(name) for name, _ in _STATE]
            n = old[0].shape[0]
            block = _new_block(n) if old[0].device.type == "cpu" else old[0].new_empty((n, 4))
            for view, value in zip(_columns(block), old):
                view.copy_(value)
            buffers["state"] = block
            state.setdefault("_non_persistent_buffers_set", set()).add("state")
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def extra_repr(self) -> str:
        extra = "" if self.distributed is None else f", distributed={self.distributed!r}"
        return (f"num_samples={self.num_samples}, alpha={self.alpha}, lr={self.lr}, "
                f"optimizer={self.optimizer!r}, bias_correction={self.bias_correction!r}{extra}")
