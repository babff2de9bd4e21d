r"""Contrastive losses with false negatives removed: SimCLR/SogCLR and CLIP (docs/losses.md).

Both modules keep rows (the anchors of this process) and columns (the candidates they are compared
with) apart: the similarity matrix is ``rows @ columns.T`` with the positive of each row given by
its column. The masks come from one of five methods:

========  ====================================================================================
glofnd    learned per-sample threshold λ_i (:class:`glofnd.GloFND`), strict ``s > λ_i``
fnc       per-anchor (1−α)-quantile of its negatives in the current batch (no state)
single    one learned λ shared by all anchors (a :class:`glofnd.GloFND` of size 1)
oracle    negatives with the anchor's class label (needs ``labels``; for evaluation)
none      the base loss
========  ====================================================================================

Removed negatives leave the denominator and the kept ones are rescaled to the original count.
"""
from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor, nn

from . import _ops
from . import distributed as D
from . import functional as Fn
from . import reference
from .state import _OPTIMIZERS, GloFND, _check_real, check_batch

BASES = ("simclr", "sogclr")
CLIP_BASES = ("clip", "sogclr")
METHODS = ("glofnd", "fnc", "single", "oracle", "none")


def _check_epoch(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
    return value


def _check_features(name: str, x, other_name: Optional[str] = None,
                    other: Optional[Tensor] = None) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() != 2 or x.shape[0] == 0 or x.shape[1] == 0:
        raise ValueError(f"{name} must be a non-empty 2-D tensor (batch, dim), "
                         f"got shape {tuple(x.shape)}")
    if other is not None:
        if x.shape != other.shape:
            raise ValueError(f"{name} must have the shape of {other_name} {tuple(other.shape)}, "
                             f"got {tuple(x.shape)}")
        if x.device != other.device:
            raise ValueError(f"{name} is on {x.device} but {other_name} is on {other.device}")


def _check_ids(name: str, x, batch: int, device: torch.device, num_samples: Optional[int]) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype.is_floating_point or x.dtype.is_complex or x.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor, got dtype {x.dtype}")
    if x.shape != (batch,):
        raise ValueError(f"{name} must have shape ({batch},) (one per sample of the batch), "
                         f"got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the features are on {device}")
    if num_samples is not None:
        lo, hi = torch.stack(torch.aminmax(x)).tolist()  # one read from the device
        if lo < 0 or hi >= num_samples:
            bad = lo if lo < 0 else hi
            raise IndexError(f"{name} holds {bad}, outside [0, num_samples={num_samples})")


def gathered_step(fnd: GloFND, sim: Tensor, index: Tensor, valid: Optional[Tensor] = None,
                  update: bool = True) -> tuple[Tensor, Tensor]:
    """``fnd.step`` for a state kept on another device (the CPU) than ``sim``.

    Gathers the state entries of the batch's unique indices, runs the threshold step on
    ``sim``'s device (the reference there, the C kernel on the CPU) and scatters them back: only
    O(batch) state crosses devices. Returns ``(mask, lam)`` with ``lam`` (R,) the rows' new λ.
    Same semantics and, on the CPU, the same bytes as ``fnd.step``.
    """
    check_batch(sim, index, valid, fnd.num_samples)
    home, dev = fnd.lambdas.device, sim.device
    uniq, inv = torch.unique(index.to(torch.int64), return_inverse=True)
    at = uniq.to(home)
    lam = fnd.lambdas[at].to(dev)
    m1 = fnd.exp_avg[at].to(dev)
    m2 = fnd.exp_avg_sq[at].to(dev)
    steps = fnd.steps[at].to(dev)
    sim = sim.detach()
    if sim.dtype not in (torch.float32, torch.float64):
        sim = sim.float()
    step = fnd.epoch + 1 if fnd.bias_correction == "epoch" else 0
    with fnd._lock:
        mask, _ = _ops.threshold_step(
            sim, inv, valid, lam, m1, m2, steps, fnd.alpha, fnd.lr, fnd.betas[0], fnd.betas[1],
            fnd.eps, fnd.clamp[0], fnd.clamp[1], _OPTIMIZERS[fnd.optimizer], step, bool(update))
        if update:
            fnd.lambdas[at] = lam.to(home)
            fnd.exp_avg[at] = m1.to(home)
            fnd.exp_avg_sq[at] = m2.to(home)
            fnd.steps[at] = steps.to(home)
    return mask, lam[inv]


def _count(n_valid: int, x) -> Optional[int]:
    """A diagnostics count as an int: ``x`` is None, a count (0-d), the kept entries per row
    ((R,): the count is the valid entries less their sum), or a tuple of those (the blocks of
    one call, e.g. CLIP's two directions, together ``n_valid`` valid entries)."""
    if x is None:
        return None
    parts = x if isinstance(x, tuple) else (x,)
    if parts[0].dim() == 0:
        return sum(int(p) for p in parts)
    return int(n_valid) - sum(int(p.sum()) for p in parts)


class _Detector(nn.Module):
    """Shared machinery: method, schedule, state placement, diagnostics."""

    def __init__(self, num_samples: int, alpha: float, lr: float, method: str, base: str,
                 bases: tuple[str, ...], gamma: float, start_update: int, start_mask: int,
                 state_on_cpu: bool, fnd_kwargs: dict, gather_distributed: bool = False,
                 distributed: Union[bool, str, None] = None, process_group=None):
        super().__init__()
        if isinstance(num_samples, bool) or not isinstance(num_samples, int):
            raise TypeError(f"num_samples must be an int, got {type(num_samples).__name__}")
        if num_samples <= 0:
            raise ValueError(f"num_samples must be > 0, got {num_samples}")
        if base not in bases:
            raise ValueError(f"base must be one of {bases}, got {base!r}")
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        self.num_samples = num_samples
        self.alpha = _check_real("alpha", alpha, 0.0, 1.0, True, True)
        _check_real("lr", lr, 0.0, math.inf, False, True)
        self.gamma = _check_real("gamma", gamma, 0.0, 1.0, True, False)
        self.base = base
        self.method = method
        self.start_update = _check_epoch("start_update", start_update)
        self.start_mask = _check_epoch("start_mask", start_mask)
        if method in ("glofnd", "single") and start_mask < start_update:
            raise ValueError(f"start_mask ({start_mask}) must be >= start_update "
                             f"({start_update}): the mask uses the learned λ")
        self.state_on_cpu = bool(state_on_cpu)
        self.epoch = 0
        self._check_index = True
        self._fnd_kwargs = dict(fnd_kwargs, alpha=alpha, lr=lr)
        # diagnostics of the last call: counts and thresholds kept as tensors, turned into
        # floats when last_stats is read (so that a step that does not read them pays nothing)
        self._masked = False
        self._pending: list[tuple] = []
        self._stats: Optional[dict[str, float]] = {}
        self._log_k_cache: Optional[tuple] = None
        self.gather_distributed = bool(gather_distributed)
        if distributed is None:
            distributed = "replicated" if self.gather_distributed else False
        self.distributed = D.resolve_mode(distributed)
        self.process_group = process_group
        if self.distributed == "sharded":  # (rank, world size) fixed at construction
            self.shard = D.world(process_group)

    def _vector(self) -> Tensor:
        """A fresh per-sample float32 vector (this process's shard when sharded)."""
        n = self.num_samples
        if self.distributed == "sharded":
            n = D.shard_size(n, *self.shard)
        return torch.zeros(n, dtype=torch.float32)

    def _new_fnd(self) -> Optional[GloFND]:
        if self.method not in ("glofnd", "single"):
            return None
        layout = self.distributed
        if self.method == "single" and layout is not None:
            layout = "replicated"  # one shared λ: nothing to shard
        return GloFND(self.num_samples if self.method == "glofnd" else 1, **self._fnd_kwargs,
                      distributed=layout or False, process_group=self.process_group)

    def _gather(self, *xs: Optional[Tensor]) -> tuple[int, int, list[Optional[Tensor]]]:
        """With ``gather_distributed`` on several processes: (offset of this process's rows,
        global batch size, the inputs gathered in rank order). Float tensors are gathered with
        the gradient-summing gather; integer ones without gradient."""
        b = xs[0].shape[0]
        if not (self.gather_distributed and D.multi_process(self.process_group)):
            return 0, b, list(xs)
        group = self.process_group
        sizes = D.all_sizes(b, group, xs[0].device)
        rank = torch.distributed.get_rank(group)
        out = [None if x is None else
               D.gather_with_grad(x, sizes, group) if x.is_floating_point() else
               D.gather_rows(x, sizes, group) for x in xs]
        return sum(sizes[:rank]), sum(sizes), out

    @property
    def check_index(self) -> bool:
        """Whether each call checks 0 <= index < num_samples (default True). The check reads the
        index's min and max: a host sync on accelerators and a graph break under torch.compile.
        Set it to False when the data pipeline guarantees the range."""
        return self._check_index

    @check_index.setter
    def check_index(self, value: bool) -> None:
        self._check_index = bool(value)

    def _fnds(self) -> list[GloFND]:
        return [m for m in self.children() if isinstance(m, GloFND)]

    # In eval mode (``loss.eval()``, e.g. a validation loop) the state is read but not written:
    # masks use the current λ and u is not moved, so that held-out indices leave it untouched.

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch of the schedule: λ is learned from ``start_update`` and masks apply
        from ``start_mask`` on (before that the loss is exactly the base loss). Also sets the
        epoch of Adam's bias correction when ``bias_correction="epoch"``."""
        _check_epoch("epoch", epoch)
        for fnd in self._fnds():
            fnd.set_epoch(epoch)
        self.epoch = epoch

    @property
    def masking(self) -> bool:
        """Whether masks are applied at the current epoch."""
        return self.method != "none" and self.epoch >= self.start_mask

    @property
    def last_stats(self) -> dict[str, float]:
        """Diagnostics of the last call, as floats (NaN where undefined):

        ``masking`` (1.0 when masks were applied), ``removed`` (share of the valid negatives
        removed from the loss), ``flagged`` (share flagged by the method, also while λ is learned
        but not yet applied), ``lambda_mean/min/max`` (the batch's λ, or the fnc thresholds),
        and with labels ``precision``, ``recall``, ``f1`` of the flagged negatives against the
        same-label negatives (per-row averages, F1 of the averages, as the paper). CLIP losses add
        ``image_``/``text_`` prefixed values per direction."""
        if self._stats is None:
            self._stats = self._finish_stats()
        return dict(self._stats)

    def _finish_stats(self) -> dict[str, float]:
        stats = {"masking": float(self._masked)}
        for prefix, n_valid, n_removed, n_flagged, thr, rows in self._pending:
            # exact integers, then one correctly rounded division: the bytes of the float64
            # tensor division it replaces
            n = max(int(n_valid), 1)
            n_removed, n_flagged = (_count(n_valid, x) for x in (n_removed, n_flagged))
            stats[prefix + "removed"] = 0.0 if n_removed is None else int(n_removed) / n
            stats[prefix + "flagged"] = 0.0 if n_flagged is None else int(n_flagged) / n
            if thr is not None:
                thr = thr.double()
                stats[prefix + "lambda_mean"] = float(thr.nanmean())
                stats[prefix + "lambda_min"] = float(thr.nan_to_num(math.inf).min())
                stats[prefix + "lambda_max"] = float(thr.nan_to_num(-math.inf).max())
            if rows is not None:
                for k, v in Fn.scores_from_counts(*rows).items():
                    stats[prefix + k] = float(v)
        return stats

    def _log_k(self, like: Tensor, k: int, dtype: torch.dtype) -> Tensor:
        """(R,) log K in ``dtype``, the numerator of the count ratio: the same for every step of
        one batch size, so the last one is kept (computed as an (R,) tensor, as before, so that
        its bytes do not depend on the caching)."""
        key = (like.shape[0], k, dtype, like.device)
        if self._log_k_cache is None or self._log_k_cache[0] != key:
            full = torch.full_like(like, k)
            self._log_k_cache = (key, torch.log(full.clamp(min=1).to(dtype)))
        return self._log_k_cache[1]

    def _start_stats(self, masked: bool) -> None:
        self._masked = masked
        self._pending = []
        self._stats = None

    def _detect(self, fnd: Optional[GloFND], sim: Tensor, index: Tensor, valid: Tensor,
                row_labels: Optional[Tensor], col_labels: Optional[Tensor]
                ) -> tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
        """Returns (removed, flagged, thresholds): the mask applied to the loss (None before
        ``start_mask``), the mask the method produced (None if it did not run) and the rows'
        thresholds (None if none)."""
        method, mask_on = self.method, self.masking
        if method == "none":
            return None, None, None
        if method in ("glofnd", "single"):
            update = self.training and self.epoch >= self.start_update
            if not (update or mask_on):
                return None, None, None
            ids = index if method == "glofnd" else torch.zeros_like(index)
            if fnd.distributed is not None and D.multi_process(fnd.process_group):
                flagged, thr = D.loss_step(fnd, sim, ids, valid, update)
            elif self.state_on_cpu and sim.device != fnd.lambdas.device:
                flagged, thr = gathered_step(fnd, sim, ids, valid, update)
            else:  # the index range was checked by forward (or waived: check_index)
                flagged, _ = fnd._step(sim, ids, valid, update, False)
                thr = fnd.lambdas[ids]
        elif not mask_on:
            return None, None, None
        elif method == "fnc":
            flagged, thr = Fn.fnc_mask(sim, valid, self.alpha)
        else:
            flagged, thr = Fn.label_mask(row_labels, col_labels, valid), None
        return (flagged if mask_on else None), flagged, thr

    def _fused(self, prefix: str, fnd: Optional[GloFND], sim: Tensor, index: Tensor,
               own: Optional[Tensor], positive: Tensor, per_row: int, scale: Tensor,
               u: Optional[Tensor] = None, blocks: int = 1,
               row_labels: Optional[Tensor] = None, col_labels: Optional[Tensor] = None,
               scale_value: Optional[float] = None) -> Tensor:
        """One block of rows through the fused C kernels (CPU): returns the per-row losses and
        records the diagnostics, as :meth:`_detect`, :meth:`_kept` and the torch formulas of
        :mod:`glofnd.functional` together would. ``scale`` is c = 1/τ (unimodal) or the logit
        scale (CLIP), a scalar tensor. ``u`` None: the InfoNCE (:data:`glofnd._ops.info_nce`);
        else SogCLR with that moving average (:data:`glofnd._ops.sogclr_surrogate`; unimodal
        when ``own`` is given, else CLIP's d = s − s_pos with τ = 1/scale).
        ``row_labels``/``col_labels``: the labels of the rows and columns, for the
        precision/recall diagnostics (and ``oracle``). ``scale_value``: ``scale`` as a number
        when the caller knows it (1/τ), so that it is not read from the tensor (a host read, and
        a graph break under torch.compile).

        With GloFND's state in this process and masks applied, one kernel updates the rows' λ
        and computes the forward (:meth:`_fused_glofnd`): no (R, M) mask or validity mask is
        made unless labels ask for the diagnostics. Other set-ups (several processes, a state on
        another device, masks learned but not yet applied, fnc, oracle) build the method's mask
        as before and hand it to the kernels."""
        method, mask_on = self.method, self.masking
        memo: list[Tensor] = []

        def valid() -> Tensor:
            if not memo:
                exclude = (positive.unsqueeze(1) if own is None
                           else torch.stack([positive, own], 1))
                memo.append(reference.exclusion_valid(sim, exclude))
            return memo[0]

        if method in ("glofnd", "single") and mask_on \
                and fnd._buffers["state"].device == sim.device \
                and not (fnd.distributed is not None and D.multi_process(fnd.process_group)):
            # the update rides on the loss's own pass over sim
            update = self.training and self.epoch >= self.start_update
            ids = index if method == "glofnd" else torch.zeros_like(index)
            return self._fused_glofnd(prefix, fnd, sim, ids, index, own, positive, per_row,
                                      scale, u, blocks, update, row_labels, col_labels, valid,
                                      scale_value)
        removed = flagged = thr = None
        if method != "none":
            removed, flagged, thr = self._detect(fnd, sim.detach(), index, valid(), row_labels,
                                                 col_labels)
        applied = removed is not None
        if u is None:
            loss, kept, _ = _ops.info_nce_loss(sim, scale, positive, own, None, removed,
                                               per_row, applied)
        else:
            c = scale.item() if scale_value is None else scale_value
            shift = own is None
            log_g, kept = _ops.call_sogclr_lme(sim.detach(), positive, own, None, removed, c,
                                               shift)
            log_u = self._move_rows_state(u, index, log_g, blocks=blocks)
            loss = _ops.sogclr_loss(sim, positive, own, None, removed, c, shift, not shift,
                                    log_u, kept)
        n_removed = kept if applied else None
        if flagged is None or flagged is removed:
            n_flagged = n_removed
        else:
            n_flagged = Fn.count(flagged)
        rows = None
        if row_labels is not None and flagged is not None:
            rows = Fn.score_counts(flagged, Fn.label_mask(row_labels, col_labels, valid()))
        self._pending.append((prefix, sim.shape[0] * per_row, n_removed, n_flagged,
                              None if thr is None else thr.detach(), rows))
        return loss

    def _fused_glofnd(self, prefix: str, fnd: GloFND, sim: Tensor, ids: Tensor, index: Tensor,
                      own: Optional[Tensor], positive: Tensor, per_row: int, scale: Tensor,
                      u: Optional[Tensor], blocks: int, update: bool,
                      row_labels: Optional[Tensor], col_labels: Optional[Tensor],
                      valid, scale_value: Optional[float] = None) -> Tensor:
        """:meth:`_fused` for GloFND (or single) with its state here and masks applied: one
        kernel counts the rows against the current λ, updates λ and computes the forward with
        the new λ (:data:`glofnd._ops.fused_forward`); the gradient is attached by the InfoNCE's
        or SogCLR's own backward. With labels, the flags (finite valid entries above the new λ,
        the threshold step's mask) are made for the precision/recall diagnostics only."""
        detached = sim.detach()
        c = scale.item() if scale_value is None else scale_value
        if u is None:
            def fused():
                return fnd._fused_forward(detached, ids, positive, own, c, 0, per_row, update)
            loss, kept, thr = _ops.info_nce_loss(sim, scale, positive, own, None, None, per_row,
                                                 True, fused)
        else:
            shift = own is None
            log_g, _, kept, thr = fnd._fused_forward(detached, ids, positive, own, c,
                                                     1 if shift else 2, per_row, update)
            log_u = self._move_rows_state(u, index, log_g, blocks=blocks)
            loss = _ops.sogclr_loss(sim, positive, own, thr, None, c, shift, not shift, log_u,
                                     kept)
        rows = None
        if row_labels is not None:
            flagged = (detached > thr.to(detached.dtype).unsqueeze(1)) & (detached != math.inf)
            flagged &= valid()
            rows = Fn.score_counts(flagged, Fn.label_mask(row_labels, col_labels, valid()))
        self._pending.append((prefix, sim.shape[0] * per_row, kept, kept, thr, rows))
        return loss

    def _kept(self, prefix: str, valid: Tensor, per_row: int, removed: Optional[Tensor],
              flagged: Optional[Tensor], thr: Optional[Tensor], truth: Optional[Tensor],
              ratio_dtype: Optional[torch.dtype] = None
              ) -> tuple[Tensor, Optional[Tensor], tuple]:
        """One block of rows: records its diagnostics and returns ``(keep, log_ratio, entry)``.

        ``valid`` (R, M) has ``per_row`` True entries in every row (K: the losses build it so).
        keep (R, M) bool: the kept negatives, ``valid & ~removed`` (``valid`` itself when nothing
        is removed), built in place in the memory of ``removed``, which the callers do not use
        afterwards (it is the mask the method produced for this call: the flagged one too);
        log_ratio (R,) log(K/|M_r|) in ``ratio_dtype`` when given and something is removed,
        else None; entry the diagnostics kept for :attr:`last_stats` (read by
        :meth:`_finish_stats`). Every method flags valid entries only (removed ⊆ valid), so the
        removed count is the valid count less the kept count: the entry holds the kept count of
        each row (an (R,) tensor) in place of the removed count, and last_stats subtracts.
        """
        rows = None if truth is None or flagged is None else Fn.score_counts(flagged, truth)
        n_flagged = None if flagged is None or flagged is removed else Fn.count(flagged)
        n_valid = valid.shape[0] * per_row
        keep, log_ratio, n_removed = valid, None, None
        if removed is not None:
            keep = torch.gt(valid, removed, out=removed)  # valid & ~removed, one pass
            n_removed = m = Fn.count(keep, 1)  # the kept per row; last_stats takes the rest
            if ratio_dtype is not None:
                log_ratio = self._log_k(m, per_row, ratio_dtype) - torch.log(
                    m.clamp(min=1).to(ratio_dtype))
        if flagged is removed:
            n_flagged = n_removed
        entry = (prefix, n_valid, n_removed, n_flagged, None if thr is None else thr.detach(),
                 rows)
        self._pending.append(entry)
        return keep, log_ratio, entry

    def _move_rows_state(self, u: Tensor, index: Tensor, log_g: Tensor, blocks: int = 1
                         ) -> Tensor:
        r"""SogCLR moving average: per row u_r = (1−γ)u_i + γ ĝ_r (ĝ_r as is where u_i
        is 0); u_i ← the mean of u_r over the rows of index i that have kept negatives. Only the
        batch's entries are read or written (gathered from and scattered to the state's device).
        Returns log u_r (R,) in the dtype of ``log_g``. In eval mode u is read, not written.
        On several processes with a distributed state, u_i pools the rows of all processes
        (:func:`glofnd.distributed.moving_average`; ``blocks`` = the views in this process's rows).
        """
        if self.distributed is not None and D.multi_process(self.process_group):
            shard = self.shard if self.distributed == "sharded" else None
            return D.moving_average(u, index, log_g, self.gamma, self.training, blocks, shard,
                                    self.process_group)
        home = u.device
        gid = reference.group_ids(index)  # no torch.unique: no host sync on accelerators
        at = index.to(home)
        old = u[at].to(device=log_g.device, dtype=log_g.dtype)
        g = torch.exp(log_g)
        has = torch.isfinite(log_g)
        new = torch.where(old == 0, g, (1.0 - self.gamma) * old + self.gamma * g)
        new = torch.where(has, new, old)
        total = torch.zeros_like(new).index_add_(0, gid, torch.where(has, new, 0.0))
        count = torch.zeros_like(new).index_add_(0, gid, has.to(new.dtype))
        total, count = total[gid], count[gid]  # each row's index's pooled values
        if self.training:  # rows of one index write the same value
            stored = torch.where(count > 0, total / count.clamp(min=1), old)
            u[at] = stored.to(device=home, dtype=u.dtype)
        return torch.where(has & (new > 0), torch.log(new), torch.zeros_like(new))

    def _apply(self, fn, recurse=True):
        # The state stays float32/int32 under .half()/.to(dtype); with state_on_cpu it stays put.
        def keep_state(t):
            out = fn(t)
            if self.state_on_cpu:
                return t
            return out if out.dtype == t.dtype else t.to(out.device)
        return super()._apply(keep_state, recurse)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        names = tuple(k for k, v in self._buffers.items() if v is not None)
        if self.distributed == "sharded" and names:
            state_dict = D.load_shard(self, state_dict, prefix, names)
        elif names:
            D.check_not_shard(self, state_dict, prefix)
        for name, buf in self._buffers.items():
            saved = state_dict.get(prefix + name)
            if buf is not None and saved is not None and saved.shape != buf.shape:
                raise ValueError(f"the checkpoint's {name} has num_samples={saved.shape[0]}, "
                                 f"this loss has num_samples={self.num_samples}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def get_extra_state(self):
        if self.distributed == "sharded":
            return {"epoch": self.epoch, "shard": D.shard_info(self)}
        return {"epoch": self.epoch}

    def set_extra_state(self, state) -> None:
        self.epoch = int(state["epoch"])

    def _extra(self) -> str:
        return (f"num_samples={self.num_samples}, base={self.base!r}, method={self.method!r}, "
                f"alpha={self.alpha}, start_update={self.start_update}, "
                f"start_mask={self.start_mask}, state_on_cpu={self.state_on_cpu}"
                + (", gather_distributed=True" if self.gather_distributed else "")
                + (f", distributed={self.distributed!r}" if self.distributed else ""))


class GloFNDLoss(_Detector):
    r"""Unimodal contrastive loss on two views, false negatives removed (docs/losses.md).

    Rows are the 2B anchors ``[z0 | z1]`` against the 2B columns ``[z0 | z1]``; row r's positive
    is the other view of its sample, the self column is excluded, so every row has
    K = 2(B−1) valid negatives. With s the cosines, τ the temperature and M_r the kept negatives:

    ``base="simclr"`` (NT-Xent, mean over the 2B rows):

    .. math:: ℓ_r = -\log\frac{e^{s_{rr'}/τ}}{e^{s_{rr'}/τ} + \frac{K}{|M_r|}
              \sum_{j∈M_r} e^{s_{rj}/τ}}

    With nothing masked it is the standard NT-Xent of SSL libraries (the authors' code sums the
    two directions instead of averaging: twice this value). A row whose negatives are all
    removed has loss 0.

    ``base="sogclr"`` (global contrastive loss, moving average ``u`` (N,) float32, init 0):
    :math:`ĝ_r = \frac{1}{|M_r|}\sum_{j∈M_r} e^{s_{rj}/τ}`,
    :math:`u_r = (1−γ)u_i + γĝ_r` (ĝ_r as is while u_i = 0), u_i ← the mean of its rows' u_r
    (the two views), and the value is the mean of the surrogate

    .. math:: ℓ_r = -s_{rr'} + \frac{1}{|M_r|}\sum_{j∈M_r}\mathrm{sg}[e^{s_{rj}/τ}/u_r]\,s_{rj}

    whose gradient is that of τ·log(mean_{M_r} e^{s/τ}) − s_{rr'} with the batch mean replaced by
    u. (SogCLR's own code divides s by τ in the surrogate: its value and gradient are this one
    divided by τ.) Rows with no kept negative do not move u.

    Args:
        num_samples: N, the data-set size (``index`` lies in [0, N)).
        temperature: τ > 0.
        alpha: α, the share of negatives treated as false (glofnd, single, fnc).
        lr: λ's step size (glofnd, single).
        base: ``"simclr"`` or ``"sogclr"``.
        method: ``"glofnd"``, ``"fnc"``, ``"single"``, ``"oracle"`` or ``"none"``.
        gamma: γ in (0, 1], SogCLR's weight of the new estimate (an attribute: schedules may
            change it between steps).
        start_update, start_mask: epochs from which λ is learned and masks are applied (see
            :meth:`set_epoch`); before ``start_mask`` the value is exactly the base loss.
        state_on_cpu: keep λ (and u) on the CPU whatever device the module is moved to; each
            call gathers the batch's entries to the features' device and scatters them back.
        optimizer, betas, eps, init_lambda, bias_correction: passed to :class:`GloFND`.
        gather_distributed: on several processes (``torch.distributed``), score this
            process's anchors against the candidates of *all* processes: the features (and
            indices, labels) are all-gathered with a gather whose backward sums the gradients
            over the processes. The state is then shared too (``distributed`` defaults to
            ``"replicated"``). See *Multi-process training* below.
        distributed: the layout of the state across processes: ``"replicated"`` (or True),
            ``"sharded"`` (sample i's λ, moments and u on rank i % W), or False (a separate
            state per process). None (default): ``"replicated"`` with ``gather_distributed``,
            else False. Without an initialised process group, or with one process, the
            ordinary single-process path runs.
        process_group: the group (None: the default group).

    Multi-process training (every process calls the loss with its own B_k samples, in the
    same order): each process's 2B_k rows are scored against the 2ΣB_k columns ``[all first
    views | all second views]`` in rank order, λ_i gets one update per step from all rows of i
    on all processes, and u_i the mean of those rows' estimates; every process then holds the
    state one process would hold after the concatenated batch. The value returned is the mean
    over this process's rows. Gradients: ``loss.backward()`` on process k gives its inputs the
    gradient of Σ_k' L_k' (the gather's backward sums over processes); DDP's average over the W
    processes then equals, with equal B_k, the gradient of one process computing the loss of
    the whole global batch. Keep the loss outside the DDP-wrapped model (its state must not be
    overwritten by DDP's buffer broadcast; see :mod:`glofnd.distributed`).

    Forward: ``loss(z0, z1, index, labels=None)``; z0, z1 (B, D) any float dtype (normalised
    inside; similarities and softmax in float32, float64 for float64 inputs, autocast off);
    index (B,) integer data-set ids; labels (B,) integer classes, needed by ``"oracle"`` and
    used for the diagnostics (:attr:`last_stats`). Returns a scalar.

    State: ``fnd`` (:class:`GloFND`, or None for fnc/oracle/none; size 1 for single), ``u``
    (sogclr), ``epoch``; all in ``state_dict``. CPU tensors run λ's step in the C kernel, other
    devices the reference on their own device (the module must be on that device, or use
    ``state_on_cpu``). In eval mode the state is read, not written. Deterministic on the CPU.

    Example::

        >>> loss_fn = GloFNDLoss(num_samples=1000, temperature=0.1, alpha=0.01)
        >>> z0, z1 = torch.randn(8, 32, requires_grad=True), torch.randn(8, 32)
        >>> loss = loss_fn(z0, z1, torch.arange(8))
        >>> loss.backward()
    """

    u: Optional[Tensor]

    def __init__(self, num_samples: int, temperature: float = 0.1, alpha: float = 0.01,
                 lr: float = 0.05, base: str = "simclr", method: str = "glofnd",
                 gamma: float = 0.9, start_update: int = 0, start_mask: int = 0,
                 state_on_cpu: bool = False, optimizer: str = "adam",
                 betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-8,
                 init_lambda: float = 1.0, bias_correction: str = "sample",
                 gather_distributed: bool = False, distributed: Union[bool, str, None] = None,
                 process_group=None):
        super().__init__(num_samples, alpha, lr, method, base, BASES, gamma, start_update,
                         start_mask, state_on_cpu,
                         dict(optimizer=optimizer, betas=betas, eps=eps,
                              init_lambda=init_lambda, bias_correction=bias_correction),
                         gather_distributed, distributed, process_group)
        self.temperature = temperature
        self.fnd = self._new_fnd()
        if base == "sogclr":
            self.register_buffer("u", self._vector())
        else:
            self.u = None

    def forward(self, z0: Tensor, z1: Tensor, index: Tensor,
                labels: Optional[Tensor] = None) -> Tensor:
        _check_features("z0", z0)
        _check_features("z1", z1, "z0", z0)
        b = z0.shape[0]
        _check_ids("index", index, b, z0.device, self.num_samples if self.check_index else None)
        if labels is not None:
            _check_ids("labels", labels, b, z0.device, None)
        elif self.method == "oracle":
            raise ValueError("labels are required with method='oracle'")
        with torch.autocast(z0.device.type, enabled=False):
            return self._forward(z0, z1, index.to(torch.int64), labels)

    def _forward(self, z0: Tensor, z1: Tensor, index: Tensor, labels: Optional[Tensor]) -> Tensor:
        b = z0.shape[0]
        rows = torch.cat([z0, z1])
        # the candidates: [all first views | all second views] of every process, rank order
        off, total, (a0, a1, all_labels) = self._gather(z0, z1, labels)
        sim = Fn.cosine(rows, torch.cat([a0, a1]))
        r = torch.arange(2 * b, device=sim.device)
        first = r < b
        own = torch.where(first, off + r, total + off + r - b)       # the row's own column
        positive = torch.where(first, total + off + r, off + r - b)  # its other view
        ids = torch.cat([index, index])
        if _ops.fused_available(sim):
            lab = None if labels is None else torch.cat([labels, labels])
            col_lab = None if labels is None else torch.cat([all_labels, all_labels])
            self._start_stats(self.masking)
            scale, c = self._inv_temperature[sim.dtype]
            per_row = self._fused("", self._modules.get("fnd"), sim, ids, own, positive,
                                  2 * total - 2, scale, self._buffers.get("u"), 2, lab, col_lab,
                                  c)
            return per_row.mean()
        col = torch.arange(2 * total, device=sim.device).unsqueeze(0)
        valid = (col != own.unsqueeze(1)) & (col != positive.unsqueeze(1))
        lab = None if labels is None else torch.cat([labels, labels])
        col_lab = None if labels is None else torch.cat([all_labels, all_labels])
        removed, flagged, thr = self._detect(self.fnd, sim.detach(), ids, valid, lab, col_lab)
        self._start_stats(removed is not None)
        truth = None if lab is None else Fn.label_mask(lab, col_lab, valid)
        simclr = self.base == "simclr"
        keep, log_ratio, _ = self._kept("", valid, 2 * total - 2, removed, flagged, thr, truth,
                                        sim.dtype if simclr else None)
        del removed, flagged  # keep may live in their memory
        if simclr:
            per_row = Fn.kept_info_nce(sim / self.temperature, positive, keep, log_ratio)
        else:
            log_g = Fn.log_mean_exp(sim.detach() / self.temperature, keep)
            log_u = self._move_rows_state(self.u, ids, log_g, blocks=2)
            pos = sim.gather(1, positive.unsqueeze(1)).squeeze(1)
            per_row = Fn.sogclr_surrogate(sim, pos, keep, log_u, self.temperature)
        return per_row.mean()

    @property
    def temperature(self) -> float:
        """τ > 0."""
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        tau = _check_real("temperature", value, 0.0, math.inf, True, True)
        # 1/τ for the fused kernels, per dtype: the scale tensor (for the gradient) and its value
        # as a number (for the kernels), so that no call reads it from a tensor
        scales = {dtype: torch.tensor(1.0 / tau, dtype=dtype)
                  for dtype in (torch.float32, torch.float64)}
        self._inv_temperature = {dtype: (t, t.item()) for dtype, t in scales.items()}
        self._temperature = tau

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, " + self._extra()


class GloFNDClipLoss(_Detector):
    r"""Symmetric image-text contrastive loss with false negatives removed (docs/losses.md, bimodal).

    Rows i of the images against the B texts (image→text, thresholds ``fnd_image``) and rows of
    the texts against the B images (text→image, ``fnd_text``); the only excluded column is the
    pair's own positive (K = B−1). Image-image and text-text similarities are never used.
    With s the cosines (features are normalised inside) and M_i a row's kept negatives:

    ``base="clip"``: the cross-entropy of logit_scale·s, each row's negatives masked by its own λ
    and the kept ones rescaled by K/|M_i|, the mean of the two directions:

    .. math:: ℓ^{I}_i = -\log\frac{e^{c s_{ii}}}{e^{c s_{ii}} + \frac{K}{|M_i|}
              \sum_{j∈M_i} e^{c s_{ij}}},\quad
              L = \tfrac12(\mathrm{mean}_i ℓ^I_i + \mathrm{mean}_i ℓ^T_i)

    With nothing masked it equals open_clip's ``ClipLoss`` on normalised features.

    ``base="sogclr"``: the bimodal global contrastive loss, τ = 1/logit_scale (treated as a
    constant), d_ij = s_ij − s_ii, g_i = (1/|M_i|)Σ_{M_i} e^{d_ij/τ}, u_i ← (1−γ)u_i + γ g_i per
    modality (``u_image``, ``u_text``; g_i as is while u_i = 0), and

    .. math:: ℓ_i = \frac{1}{|M_i|}\sum_{j∈M_i}\mathrm{sg}[e^{d_{ij}/τ}/u_i]\,d_{ij},
              \quad L = \tfrac12(\mathrm{mean}_i ℓ^I_i + \mathrm{mean}_i ℓ^T_i)

    whose gradient is τ times that of mean_i g_i/u_i (the authors' loss, which sums the two
    modalities). Set ``loss.gamma`` per epoch for a γ schedule.

    Args: as :class:`GloFNDLoss` (no temperature: it comes from ``logit_scale``).

    Multi-process training (``gather_distributed=True``): the B_k image rows of each process
    are scored against the ΣB_k texts of all processes and its text rows against all images
    (rank order); states, the loss value (mean over this process's rows) and the gradient
    convention (DDP's average equals one process's gradient of the global loss, with equal
    B_k; ``logit_scale``'s gradient included) are as in :class:`GloFNDLoss`.

    Forward: ``clip(image_features, text_features, logit_scale, index, labels=None,
    output_dict=False)``; features (B, D) any float dtype; logit_scale a float or a scalar
    tensor (its gradient flows with ``base="clip"``); index (B,) data-set ids of the pairs;
    labels (B,) optional classes (``"oracle"`` and diagnostics). Returns a scalar, or
    ``{"contrastive_loss": value}`` with ``output_dict=True``.

    Example::

        >>> clip = GloFNDClipLoss(num_samples=1000, alpha=1e-3)
        >>> img, txt = torch.randn(8, 32), torch.randn(8, 32)
        >>> loss = clip(img, txt, torch.tensor(100.0), torch.arange(8))
    """

    u_image: Optional[Tensor]
    u_text: Optional[Tensor]

    def __init__(self, num_samples: int, alpha: float = 1e-3, lr: float = 0.05,
                 base: str = "clip", method: str = "glofnd", gamma: float = 0.9,
                 start_update: int = 0, start_mask: int = 0, state_on_cpu: bool = False,
                 optimizer: str = "adam", betas: tuple[float, float] = (0.9, 0.98),
                 eps: float = 1e-8, init_lambda: float = 1.0, bias_correction: str = "sample",
                 gather_distributed: bool = False, distributed: Union[bool, str, None] = None,
                 process_group=None):
        super().__init__(num_samples, alpha, lr, method, base, CLIP_BASES, gamma, start_update,
                         start_mask, state_on_cpu,
                         dict(optimizer=optimizer, betas=betas, eps=eps,
                              init_lambda=init_lambda, bias_correction=bias_correction),
                         gather_distributed, distributed, process_group)
        self.fnd_image = self._new_fnd()
        self.fnd_text = self._new_fnd()
        if base == "sogclr":
            self.register_buffer("u_image", self._vector())
            self.register_buffer("u_text", self._vector())
        else:
            self.u_image = self.u_text = None

    def forward(self, image_features: Tensor, text_features: Tensor,
                logit_scale: Union[Tensor, float], index: Tensor,
                labels: Optional[Tensor] = None, output_dict: bool = False):
        _check_features("image_features", image_features)
        _check_features("text_features", text_features, "image_features", image_features)
        dev = image_features.device
        b = image_features.shape[0]
        if isinstance(logit_scale, Tensor):
            if logit_scale.numel() != 1 or not logit_scale.is_floating_point():
                raise ValueError("logit_scale must be a float or a one-element float tensor, "
                                 f"got shape {tuple(logit_scale.shape)}, dtype {logit_scale.dtype}")
            scale = logit_scale.reshape(())
        elif isinstance(logit_scale, (int, float)) and not isinstance(logit_scale, bool):
            scale = torch.tensor(float(logit_scale), device=dev)
        else:
            raise TypeError(f"logit_scale must be a float or a tensor, "
                            f"got {type(logit_scale).__name__}")
        _check_ids("index", index, b, dev, self.num_samples if self.check_index else None)
        if labels is not None:
            _check_ids("labels", labels, b, dev, None)
        elif self.method == "oracle":
            raise ValueError("labels are required with method='oracle'")
        with torch.autocast(dev.type, enabled=False):
            value = self._forward(image_features, text_features, scale, index.to(torch.int64),
                                  labels)
        return {"contrastive_loss": value} if output_dict else value

    def _forward(self, img: Tensor, txt: Tensor, scale: Tensor, index: Tensor,
                 labels: Optional[Tensor]) -> Tensor:
        b = img.shape[0]
        off, total, (all_img, all_txt, all_labels) = self._gather(img, txt, labels)
        if total == b:
            sim = Fn.cosine(img, txt)  # (B, B) image rows against text columns
            sims = (sim, sim.T)
        else:  # local rows against the columns of every process
            sims = (Fn.cosine(img, all_txt), Fn.cosine(txt, all_img))
        scale = scale.to(sims[0].dtype)
        positive = off + torch.arange(b, device=img.device)
        self._start_stats(self.masking)
        clip = self.base == "clip"
        if _ops.fused_available(sims[0]):
            # the submodules and buffers straight from nn.Module's dicts (None where unset, as
            # the attributes): its __getattr__ costs about a microsecond a name in a step
            mods, bufs = self._modules, self._buffers
            terms = [self._fused(name + "_", mods.get("fnd_" + name), s.contiguous(), index,
                                 None, positive, total - 1, scale, bufs.get("u_" + name), 1,
                                 labels, all_labels).mean()
                     for name, s in (("image", sims[0]), ("text", sims[1]))]
            self._join_entries()
            return (terms[0] + terms[1]) / 2
        col = torch.arange(total, device=img.device)
        valid = col.unsqueeze(0) != positive.unsqueeze(1)
        truth = None if labels is None else Fn.label_mask(labels, all_labels, valid)
        terms = []
        for name, s, fnd, u in (("image", sims[0], self.fnd_image, self.u_image),
                                ("text", sims[1], self.fnd_text, self.u_text)):
            # the text rows are the columns of sims[0]: the kernel reads rows, and a strided
            # read of columns costs more than this copy (3-4x the step at B = 256 and 1024)
            removed, flagged, thr = self._detect(fnd, s.detach().contiguous(), index, valid,
                                                 labels, all_labels)
            keep, log_ratio, _ = self._kept(name + "_", valid, total - 1, removed, flagged,
                                                thr, truth, s.dtype if clip else None)
            del removed, flagged
            if clip:
                per_row = Fn.kept_info_nce(scale * s, positive, keep, log_ratio)
            else:
                tau = 1.0 / scale.detach()
                d = s - s.gather(1, positive.unsqueeze(1))
                log_g = Fn.log_mean_exp(d.detach() / tau, keep)
                log_u = self._move_rows_state(u, index, log_g)
                per_row = Fn.sogclr_surrogate(d, torch.zeros_like(log_g), keep, log_u, tau)
            terms.append(per_row.mean())
        self._join_entries()
        return (terms[0] + terms[1]) / 2

    def _join_entries(self) -> None:
        """The diagnostics of both directions as one block of 2B rows: the counts add up, the
        per-row score counts are concatenated (the same rows, in the same order, as the two masks
        concatenated)."""
        (_, v0, r0, f0, _, s0), (_, v1, r1, f1, _, s1) = self._pending[-2:]
        # both parts as they are: last_stats adds them up when it is read
        removed = None if r0 is None else (r0, r1)
        flagged = removed if f0 is r0 and f1 is r1 else None if f0 is None else (f0, f1)
        self._pending.append(("", v0 + v1, removed, flagged, None,
                              None if s0 is None else tuple(torch.cat(x) for x in zip(s0, s1))))

    def extra_repr(self) -> str:
        return self._extra()
