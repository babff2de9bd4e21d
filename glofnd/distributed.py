r"""Multi-process GloFND on ``torch.distributed``: one state for all processes.

Every process holds its own rows (its anchors) and calls the step; the result is the one that a
single process would get on the concatenation of all processes' rows: each data-set index gets one
pooled subgradient over all of its rows on all ranks and exactly one update per step, and every
process sees the same thresholds. Two layouts of the state:

``"replicated"`` (``GloFND(..., distributed=True)``): every process keeps the whole state (N,).
    A step counts, per local row, the entries above the current λ and the valid entries
    (:func:`glofnd.reference.row_counts`), pools them per distinct local index, all-gathers the
    records ``(index, above, nvalid)`` (3 int64 = 24 bytes per distinct index of the global batch),
    and every process applies :func:`glofnd.reference.pooled_update` to the same gathered records
    in the same order: the same arithmetic gives the same bytes everywhere, no state is broadcast.
    Local rows are then masked by the fused kernel with ``update=False``.

``"sharded"`` (``GloFND(..., distributed="sharded")``): index i lives on rank ``i % W`` at local
    slot ``i // W``; a process keeps about N/W × 16 bytes. A step is five ``all_to_all`` exchanges:
    the counts per owner (W int64); the distinct local indices to their owners (8 bytes each),
    their current λ back (4 bytes); the pooled counts ``(above, nvalid)`` to the owners (16
    bytes), which update their slots, and the new λ back (4 bytes). Per distinct index of the
    local batch a process sends and receives 32 bytes, whatever W is.

Both give the same bytes as one process running the fused C step on the concatenated batch
(the pooled update performs the kernel's float64 arithmetic in the kernel's order; the counts are
integers). With one process, or without an initialised process group, GloFND takes its ordinary
single-process path.

Never keep the state in buffers that DDP broadcasts: with ``broadcast_buffers=True`` (DDP's
default; ``forward_sync_buffers`` in recent PyTorch) a module registered inside the wrapped model
has its buffers overwritten by rank 0's copy before every forward, and the other ranks' updates are
lost. Keep the loss and its GloFND outside the wrapped model (or turn the buffer
sync off). GloFND keeps the values it last wrote at the entries it touched and, in a multi-process
run, checks them before the next step: a change raises a RuntimeError that names the cause (see
:func:`check_unchanged`).

The losses' ``gather_distributed=True`` adds :func:`gather_with_grad` (features of all processes,
gradient summed back) and :func:`moving_average` (SogCLR's u over all processes' rows).
Traffic, memory and a worked estimate for 10^9 samples: docs/distributed.md.

Example (``torchrun --nproc-per-node 4 train.py``)::

    >>> rank, world_size, local_rank = glofnd.distributed.init_from_env()
    >>> fnd = glofnd.GloFND(len(dataset), alpha=0.01, distributed="sharded")
    >>> mask = fnd(sim_local, index_local, valid_local)   # collective; same on every process
"""
from __future__ import annotations

import os
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor

from . import _ops, reference

MODES = ("replicated", "sharded")

# codes sent in place of a size when a process cannot take part in a step
_BAD_BATCH, _OVERWRITTEN = -1, -2


def resolve_mode(distributed: Union[bool, str, None]) -> Optional[str]:
    """``False``/``None`` -> None, ``True`` -> ``"replicated"``, or one of :data:`MODES`."""
    if distributed is None or distributed is False:
        return None
    if distributed is True:
        return "replicated"
    if isinstance(distributed, str) and distributed in MODES:
        return distributed
    raise ValueError(f"distributed must be True, False, 'replicated' or 'sharded', "
                     f"got {distributed!r}")


def world(group=None) -> tuple[int, int]:
    """``(rank, world_size)`` of ``group``; ``(0, 1)`` without an initialised process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def shard_size(num_samples: int, rank: int, world_size: int) -> int:
    """Number of indices i in [0, num_samples) with i % world_size == rank (rank's shard)."""
    return max(0, (num_samples - rank + world_size - 1) // world_size)


def init_from_env(backend: Optional[str] = None, timeout=None) -> tuple[int, int, int]:
    """Initialises the default process group from torchrun's environment variables.

    Reads ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT`` through
    the ``env://`` method). Without them, or with ``WORLD_SIZE=1``, nothing is initialised and
    ``(0, 1, 0)`` is returned, so a script runs unchanged as one process. The backend defaults to
    ``"nccl"`` when CUDA is available (and the process's GPU is set to ``LOCAL_RANK``), else
    ``"gloo"``; ``timeout`` (a ``datetime.timedelta``) bounds each collective. Returns
    ``(rank, world_size, local_rank)``. A training script then builds its loss with
    ``gather_distributed=True`` outside the DDP-wrapped model, gives every process an equal
    share of each global batch (a ``DistributedSampler`` with ``drop_last=True``, or the
    examples' ``GlobalBatches``), and saves a replicated state from rank 0 only (a sharded
    state from every rank); see ``examples/simclr.py --distributed``.

    Example::

        # torchrun --nproc-per-node 4 train.py
        >>> rank, world_size, local_rank = init_from_env()
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if size <= 1:
        return 0, 1, 0
    if not dist.is_initialized():
        if backend is None:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        kw = {} if timeout is None else {"timeout": timeout}
        dist.init_process_group(backend, init_method="env://", **kw)
    return dist.get_rank(), dist.get_world_size(), local_rank


# ----------------------------------------------------------------------------------------------
# Detection of state overwritten between steps

class _LastWrite:
    """The values a GloFND wrote at the entries (local slots) it touched in its last step."""

    __slots__ = ("block", "slots", "lam_bits", "step_vals")

    def __init__(self, fnd, slots: Tensor):
        self.block, self.slots = fnd.state, slots
        self.lam_bits = fnd.lambdas[slots].view(torch.int32).clone()
        self.step_vals = fnd.steps[slots].clone()


def guard_active(fnd) -> bool:
    """Whether ``fnd`` records and checks its writes: in a multi-process run, unless
    ``check_overwrite=False``, and never while traced by torch.compile."""
    if not fnd.check_overwrite or torch.compiler.is_compiling():
        return False
    return world(fnd.process_group)[1] > 1


def record_write(fnd, slots: Tensor) -> None:
    """Remembers the values at ``slots`` (local, distinct) after a step of ``fnd``."""
    fnd._last_write = _LastWrite(fnd, slots)


def forget_write(fnd) -> None:
    """Forgets the last write (after a deliberate change: a checkpoint load, a user edit)."""
    fnd._last_write = None


def check_unchanged(fnd) -> Optional[str]:
    """None when the entries ``fnd`` last wrote still hold what it wrote, else a message.

    Content that changed means another writer, typically DDP's buffer broadcast, replaced the
    state between steps and this process's updates are lost. (A replicated state rewritten with
    the same values by the broadcast loses nothing and is not reported; it only costs a copy of
    the whole state per step.)"""
    rec = fnd._last_write
    if rec is None or rec.block is not fnd.state:
        return None  # nothing written yet, or the buffer was replaced on purpose
    same = (torch.equal(fnd.lambdas[rec.slots].view(torch.int32), rec.lam_bits)
            and torch.equal(fnd.steps[rec.slots], rec.step_vals))
    if not same:
        return ("the GloFND state was overwritten between two steps: the entries this process "
                "updated in its last step no longer hold the values it wrote, so its updates are "
                "lost. The usual cause is a GloFND (or a loss holding one) registered inside a "
                "DistributedDataParallel model that synchronises buffers (DDP's default, "
                "broadcast_buffers=True, called forward_sync_buffers in recent PyTorch): DDP "
                "replaces them with rank 0's copy before every forward. Keep the loss and its "
                "GloFND outside the DDP-wrapped module (or turn the buffer sync off) and build "
                "it with GloFND(..., distributed=True) or distributed='sharded'. If you changed "
                "the state on purpose, call fnd.mark_state_changed() afterwards.")
    return None


# ----------------------------------------------------------------------------------------------
# The step

def _hyper(fnd, step: int) -> tuple:
    return (fnd.alpha, fnd.lr, fnd.betas[0], fnd.betas[1], fnd.eps, fnd.clamp[0], fnd.clamp[1],
            _optimizer(fnd), step)


def _optimizer(fnd) -> int:
    return reference.ADAM if fnd.optimizer == "adam" else reference.SGD


def _pool(index: Tensor, above: Tensor, nvalid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Sums the counts of rows sharing an index: (distinct indices sorted, above, nvalid)."""
    uniq, inv = torch.unique(index, return_inverse=True)
    a = torch.zeros(uniq.shape, dtype=torch.int64, device=index.device).index_add_(0, inv, above)
    v = torch.zeros_like(a).index_add_(0, inv, nvalid)
    return uniq, a, v


def _raise_if_any(codes: Tensor, own: Optional[BaseException], own_msg: Optional[str],
                  rank: int) -> None:
    """Raises on every process when any process reported a bad batch or an overwritten state."""
    bad = (codes < 0).nonzero().flatten().tolist()
    if not bad:
        return
    if own is not None:
        raise own
    if own_msg is not None:
        raise RuntimeError(own_msg)
    what = {_BAD_BATCH: "an invalid batch", _OVERWRITTEN: "an overwritten GloFND state"}
    k = bad[0]
    raise RuntimeError(f"rank {k} reported {what.get(int(codes[k]), 'an error')} to this "
                       f"GloFND step (rank {rank} took no step; see rank {k}'s error)")


def _all_gather_rows(rows: Tensor, code: int, group) -> tuple[Tensor, Tensor]:
    """All-gathers 2-D ``rows`` of varying length: sizes first (or a negative code), then the
    rows padded to the longest. Returns (codes (W,), concatenated rows in rank order)."""
    w = dist.get_world_size(group)
    mine = torch.tensor([code], dtype=torch.int64, device=rows.device)
    sizes = [torch.empty_like(mine) for _ in range(w)]
    dist.all_gather(sizes, mine, group=group)
    codes = torch.cat(sizes)
    if bool((codes < 0).any()):
        return codes, rows[:0]
    longest = int(codes.max())
    padded = rows.new_zeros((longest,) + tuple(rows.shape[1:]))
    padded[:rows.shape[0]] = rows
    parts = [torch.empty_like(padded) for _ in range(w)]
    dist.all_gather(parts, padded, group=group)
    return codes, torch.cat([p[:int(n)] for p, n in zip(parts, codes.tolist())])


def _exchange(send: Tensor, send_counts: list[int], recv_counts: list[int], group) -> Tensor:
    """all_to_all of the rows of ``send`` (grouped by destination rank) with uneven splits."""
    out = send.new_empty((sum(recv_counts),) + tuple(send.shape[1:]))
    dist.all_to_all_single(out, send.contiguous(), output_split_sizes=recv_counts,
                           input_split_sizes=send_counts, group=group)
    return out


def _validate(fnd, sim, index, valid) -> Optional[BaseException]:
    from .state import check_batch  # state imports this module
    try:
        check_batch(sim, index, valid, fnd.num_samples, check_index=True)
        if hasattr(fnd, "_check_state"):
            fnd._check_state()
        if sim.device != fnd.lambdas.device:
            raise ValueError(f"sim is on {sim.device} but the state is on "
                             f"{fnd.lambdas.device}; move the module with .to(device)")
    except (TypeError, ValueError, IndexError) as err:
        return err
    return None


def _prepare(sim: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    sim = sim.detach()
    if sim.dtype not in (torch.float32, torch.float64):
        sim = sim.float()
    return sim, index.to(torch.int64)


def _moments(fnd) -> tuple[Tensor, Tensor, Tensor]:
    return fnd.exp_avg, fnd.exp_avg_sq, fnd.steps


def _mask(sim: Tensor, index: Tensor, valid: Optional[Tensor], lambdas: Tensor,
          fnd, state: Optional[tuple] = None) -> tuple[Tensor, Tensor]:
    """(mask, kept) against ``lambdas[index]`` through the fused op with update=False (which
    reads λ only; ``state`` supplies the other tensors the op takes, else zeros)."""
    if state is None:  # three separate buffers: the binding refuses aliased state
        state = (torch.zeros_like(lambdas), torch.zeros_like(lambdas),
                 torch.zeros(lambdas.shape, dtype=torch.int32, device=lambdas.device))
    return _ops.threshold_step(sim, index, valid, lambdas, *state, *_hyper(fnd, 0), False)


@torch.compiler.disable
def step(fnd, sim: Tensor, index: Tensor, valid: Optional[Tensor], update: bool,
         epoch_step: int) -> tuple[Tensor, Tensor]:
    """One multi-process step of ``fnd`` (a GloFND built with ``distributed=``); collective.

    ``sim`` (R, M), ``index`` (R,), ``valid`` (R, M) or None are this process's rows (R may differ
    between processes). Returns this process's ``(mask, kept)``. Every process of the group must
    call it, in the same order; an invalid batch or an overwritten state on any process raises on
    every process (with the real error on the process that had it) instead of leaving the others
    waiting."""
    err = _validate(fnd, sim, index, valid)
    if err is None:
        sim, index = _prepare(sim, index)
    if fnd.distributed == "sharded":
        return _sharded(fnd, sim, index, valid, update, epoch_step, err)
    return _replicated(fnd, sim, index, valid, update, epoch_step, err)


def _guard_message(fnd) -> Optional[str]:
    return check_unchanged(fnd) if guard_active(fnd) else None


def _replicated(fnd, sim, index, valid, update, epoch_step, err):
    group = fnd.process_group
    rank = dist.get_rank(group)
    with fnd._lock:
        overwritten = _guard_message(fnd) if err is None else None
        if not update:  # λ is the same everywhere: masking needs no communication
            if err is not None:
                raise err
            if overwritten is not None:
                raise RuntimeError(overwritten)
            return _mask(sim, index, valid, fnd.lambdas, fnd, _moments(fnd))
        if err is None and overwritten is None:
            above, nvalid = reference.row_counts(sim, index, valid, fnd.lambdas)
            records = torch.stack(_pool(index, above, nvalid), dim=1)
            code = records.shape[0]
        else:
            records = torch.zeros((0, 3), dtype=torch.int64, device=fnd.lambdas.device)
            code = _BAD_BATCH if err is not None else _OVERWRITTEN
        codes, every = _all_gather_rows(records, code, group)
        _raise_if_any(codes, err, overwritten, rank)
        reference.pooled_update(every[:, 0], every[:, 1], every[:, 2], fnd.lambdas, fnd.exp_avg,
                                fnd.exp_avg_sq, fnd.steps, *_hyper(fnd, epoch_step))
        out = _mask(sim, index, valid, fnd.lambdas, fnd, _moments(fnd))
        if guard_active(fnd):
            record_write(fnd, torch.unique(every[:, 0]))
        return out


class _Route:
    """Sharded layout: where the distinct indices ``uniq`` of this process live (rank i % W,
    slot i // W) and which slots the other processes ask this process for. Built with two
    ``all_to_all`` exchanges (the counts per owner, then the indices); a negative ``code`` is sent
    instead of the counts when this process cannot take part, and every process then raises."""

    def __init__(self, uniq: Optional[Tensor], w: int, group, device, code: int = 0,
                 err: Optional[BaseException] = None, message: Optional[str] = None):
        if code >= 0:
            owner = uniq % w
            self.order = torch.argsort(owner, stable=True)
            counts = torch.bincount(owner, minlength=w)
            request = uniq[self.order]
        else:
            counts = torch.full((w,), code, dtype=torch.int64, device=device)
            request = torch.zeros(0, dtype=torch.int64, device=device)
        incoming = torch.empty_like(counts)
        dist.all_to_all_single(incoming, counts, group=group)
        _raise_if_any(incoming, err, message, dist.get_rank(group))
        self.group, self.uniq = group, uniq
        self.send_n, self.recv_n = counts.tolist(), incoming.tolist()
        self.slots = _exchange(request, self.send_n, self.recv_n, group) // w  # asked of me

    def to_owners(self, rows: Tensor) -> Tensor:
        """Rows aligned with ``uniq`` to their owners; returns the rows aligned with ``slots``."""
        return _exchange(rows[self.order], self.send_n, self.recv_n, self.group)

    def answer(self, values: Tensor) -> Tensor:
        """Values aligned with ``slots`` back to the askers; returns them aligned with ``uniq``."""
        got = _exchange(values, self.recv_n, self.send_n, self.group)
        out = torch.empty_like(got)
        out[self.order] = got
        return out


def _sharded(fnd, sim, index, valid, update, epoch_step, err):
    rank, w = fnd.shard
    with fnd._lock:
        overwritten = _guard_message(fnd) if err is None else None
        uniq = inv = None
        code = _BAD_BATCH if err is not None else _OVERWRITTEN if overwritten is not None else 0
        if code == 0:
            uniq, inv = torch.unique(index, return_inverse=True)
        route = _Route(uniq, w, fnd.process_group, fnd.lambdas.device, code, err, overwritten)
        slots = route.slots
        if update:
            lam_u = route.answer(fnd.lambdas[slots])
            above, nvalid = reference.row_counts(sim, inv, valid, lam_u)
            _, a, v = _pool(inv, above, nvalid)
            got = route.to_owners(torch.stack([a, v], dim=1))
            reference.pooled_update(slots, got[:, 0], got[:, 1], fnd.lambdas, fnd.exp_avg,
                                    fnd.exp_avg_sq, fnd.steps, *_hyper(fnd, epoch_step))
            if guard_active(fnd):
                record_write(fnd, torch.unique(slots))
        lam_u = route.answer(fnd.lambdas[slots])
        mask, kept = _mask(sim, inv, valid, lam_u, fnd)
        fnd._rows_lambda = lam_u[inv]
        return mask, kept


# ----------------------------------------------------------------------------------------------
# Features and per-sample vectors of the losses

def multi_process(group=None) -> bool:
    """Whether ``group`` (None: the default group) spans more than one process."""
    return world(group)[1] > 1


def all_sizes(n: int, group, device) -> list[int]:
    """The row counts of all processes (one small all_gather)."""
    w = dist.get_world_size(group)
    mine = torch.tensor([n], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(mine) for _ in range(w)]
    dist.all_gather(sizes, mine, group=group)
    return [int(x) for x in torch.cat(sizes).tolist()]


def gather_rows(x: Tensor, sizes: list[int], group) -> Tensor:
    """All processes' rows of ``x`` (sizes[k] rows on rank k), concatenated in rank order."""
    longest = max(sizes)
    padded = x.new_zeros((longest,) + tuple(x.shape[1:]))
    padded[:x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the gradient of the gathered tensor over all processes
    (an all_reduce) and returns this process's slice of the sum."""

    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.group = group
        rank = dist.get_rank(group)
        ctx.start, ctx.stop = sum(sizes[:rank]), sum(sizes[:rank + 1])
        return gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad[ctx.start:ctx.stop], None, None


def gather_with_grad(x: Tensor, sizes: list[int], group=None) -> Tensor:
    r"""All processes' rows of ``x`` (B_k, ...) -> (Σ_k B_k, ...), differentiable.

    The backward all-reduces (sums) the gradient of the gathered tensor over the processes and
    returns this process's slice: the gradient of :math:`\sum_k L_k` with respect to this
    process's rows, where L_k is the loss of process k. (Returning only the local slice without
    the sum drops the other processes' terms.) Every process must call the backward.

    Example::

        >>> sizes = all_sizes(z.shape[0], None, z.device)
        >>> z_all = gather_with_grad(z, sizes)      # rank order; rank k's rows at its offset
    """
    return _GatherWithGrad.apply(x, sizes, group)


def fetch(local: Tensor, uniq: Tensor, rank: int, w: int, group) -> Tensor:
    """Values of a sharded vector (``local`` holds index i at slot i // W on rank i % W) at the
    distinct indices ``uniq`` of this process (collective)."""
    route = _Route(uniq.to(local.device), w, group, local.device)
    return route.answer(local[route.slots])


def moving_average(u: Tensor, index: Tensor, log_g: Tensor, gamma: float, write: bool,
                   blocks: int, shard: Optional[tuple[int, int]], group) -> Tensor:
    r"""Multi-process SogCLR moving average over all processes' rows (collective).

    Per local row r of index i: u_r = (1−γ)u_i + γ ĝ_r (ĝ_r = exp(log_g_r) as is while u_i = 0;
    u_i unchanged for rows without kept negatives). With ``write``, every process all-gathers the
    rows' (index, u_r, has) records (24 bytes per row), orders them as one process would order its
    rows (``blocks`` equal blocks per process, e.g. the two views: all processes' first blocks,
    then their second blocks) and sets u_i ← the mean of u_r over the rows of index i with kept
    negatives, with the same float operations in the same order as one process: the same bytes.
    ``shard`` = (rank, W) when u is sharded (only owned entries are written; reads go to the
    owners), None when replicated. Returns log u_r (R,) in the dtype of ``log_g``.
    """
    home, dev, dtype = u.device, log_g.device, log_g.dtype
    uniq, inv = torch.unique(index, return_inverse=True)
    if shard is None:
        old_u = u[uniq.to(home)]
    else:
        old_u = fetch(u, uniq, shard[0], shard[1], group)
    old = old_u.to(device=dev, dtype=dtype)[inv]
    g = torch.exp(log_g)
    has = torch.isfinite(log_g)
    new = torch.where(old == 0, g, (1.0 - gamma) * old + gamma * g)
    new = torch.where(has, new, old)
    if write:
        rec = torch.stack([index.double(), new.double(), has.double()], dim=1).to(home)
        sizes = all_sizes(rec.shape[0], group, home)
        every = gather_rows(rec, sizes, group)
        parts = [p.chunk(blocks) for p in every.split(sizes)]
        every = torch.cat([p[b] for b in range(blocks) for p in parts])
        gi = every[:, 0].to(torch.int64)
        gnew, ghas = every[:, 1].to(dtype), every[:, 2] > 0
        guniq, ginv = torch.unique(gi, return_inverse=True)
        total = torch.zeros(guniq.shape, dtype=dtype, device=home)
        count = torch.zeros_like(total)
        total.index_add_(0, ginv, torch.where(ghas, gnew, torch.zeros_like(gnew)))
        count.index_add_(0, ginv, ghas.to(dtype))
        put = count > 0
        if shard is not None:
            put &= guniq % shard[1] == shard[0]
        at = guniq[put] if shard is None else guniq[put] // shard[1]
        u[at] = (total[put] / count[put].clamp(min=1)).to(u.dtype)
    return torch.where(has & (new > 0), torch.log(new), torch.zeros_like(new))


def loss_step(fnd, sim: Tensor, index: Tensor, valid: Tensor, update: bool
              ) -> tuple[Tensor, Tensor]:
    """The threshold step of a multi-process loss: ``(mask, λ of each row)``. A state kept on
    another device (``state_on_cpu``) gets the batch moved to it (the process group must then
    handle that device's tensors, e.g. gloo for the CPU)."""
    home, dev = fnd.lambdas.device, sim.device
    mask, _ = fnd.step(sim.to(home), index.to(home), valid.to(home), update)
    if fnd.distributed == "sharded":
        lam = fnd._rows_lambda
    else:
        lam = fnd.lambdas[index.to(home)]
    return mask.to(dev), lam.to(dev)


# ----------------------------------------------------------------------------------------------
# Checkpoints of sharded states

def shard_info(fnd) -> dict:
    """What a sharded checkpoint records about its layout."""
    rank, w = fnd.shard
    return {"rank": rank, "world_size": w, "num_samples": fnd.num_samples}


STATE_NAMES = ("lambdas", "exp_avg", "exp_avg_sq", "steps")


def load_shard(fnd, state_dict: dict, prefix: str, names: tuple = STATE_NAMES) -> dict:
    """Checks a checkpoint against a sharded module ``fnd`` (with ``shard`` and ``num_samples``)
    and returns the entries to load; ``names`` are its per-sample vectors.

    A shard saved by the same rank of the same world size with the same num_samples loads as is;
    a full (single-process or replicated) state loads by taking this rank's slice ``[rank::W]``.
    Anything else raises ValueError before any state is changed."""
    rank, w = fnd.shard
    extra = state_dict.get(prefix + "_extra_state")
    saved = extra.get("shard") if isinstance(extra, dict) else None
    key = prefix + names[0]
    out = dict(state_dict)
    if saved is not None:
        if saved["num_samples"] != fnd.num_samples:
            raise ValueError(f"the checkpoint's GloFND shard has num_samples="
                             f"{saved['num_samples']}, this module has num_samples="
                             f"{fnd.num_samples}")
        if saved["world_size"] != w:
            raise ValueError(f"the checkpoint's GloFND shard was saved with world size "
                             f"{saved['world_size']}, this process group has world size {w}; "
                             "a sharded state reloads into the same world size only (save "
                             "glofnd.distributed.gather_full_state(fnd) to change it)")
        if saved["rank"] != rank:
            raise ValueError(f"the checkpoint holds rank {saved['rank']}'s GloFND shard, "
                             f"this is rank {rank}: each process loads its own shard")
        return out
    if key in state_dict:
        n = state_dict[key].shape[0]
        if n != fnd.num_samples:
            raise ValueError(f"the checkpoint's GloFND state has num_samples={n}, this module "
                             f"has num_samples={fnd.num_samples}")
        for name in names:
            if prefix + name in state_dict:
                out[prefix + name] = state_dict[prefix + name][rank::w]
    return out


def check_not_shard(fnd, state_dict: dict, prefix: str) -> None:
    """A non-sharded module refuses a shard of a sharded state with a clear message."""
    extra = state_dict.get(prefix + "_extra_state")
    saved = extra.get("shard") if isinstance(extra, dict) else None
    if saved is not None and saved["world_size"] > 1:
        raise ValueError(f"the checkpoint holds one shard (rank {saved['rank']} of world size "
                         f"{saved['world_size']}) of a sharded GloFND state; load it into "
                         "GloFND(..., distributed='sharded') with the same world size, or save "
                         "glofnd.distributed.gather_full_state(fnd) instead")


@torch.compiler.disable
def gather_full_state(fnd) -> dict[str, Tensor]:
    """The whole state (N,) of a sharded ``fnd``, assembled on every process (collective).

    Returns ``{"lambdas", "exp_avg", "exp_avg_sq", "steps"}``; it loads into a GloFND of any world
    size and layout. Needs N × 16 bytes on every process. For a non-sharded module, returns
    its own buffers (cloned)."""
    names = ("lambdas", "exp_avg", "exp_avg_sq", "steps")
    if fnd.distributed != "sharded" or fnd.shard[1] == 1:
        return {k: getattr(fnd, k).clone() for k in names}
    rank, w = fnd.shard
    n = fnd.num_samples
    longest = shard_size(n, 0, w)
    out = {}
    for k in names:
        local = getattr(fnd, k)
        padded = local.new_zeros(longest)
        padded[:local.shape[0]] = local
        parts = [torch.empty_like(padded) for _ in range(w)]
        dist.all_gather(parts, padded, group=fnd.process_group)
        full = local.new_empty(n)
        for r, p in enumerate(parts):
            full[r::w] = p[:shard_size(n, r, w)]
        out[k] = full
    return out
