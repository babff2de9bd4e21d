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
    "bool update, bool check_index=True) -> (Tensor, Tensor)"
)


def _use_c() -> bool:
    """Whether CPU tensors run the C kernels (extension built, backend "c")."""
    return _C is not None and _backend == "c"


def _check_range(index: Tensor, n: int) -> None:
    """The index range, checked in the eager kernels so that traced callers need no
    data-dependent check of their own (the C binding checks it itself)."""
    if index.numel() == 0:
        return
    lo, hi = torch.stack(torch.aminmax(index)).tolist()  # one read from the device
    if lo < 0 or hi >= n:
        raise IndexError(f"index holds {lo if lo < 0 else hi}, outside [0, num_samples={n})")


def _threshold_step_any(sim, index, valid, lambdas, exp_avg, exp_avg_sq, steps,
                        alpha, lr, beta1, beta2, eps, lo, hi, optimizer, step, update,
                        check_index=True):
    """Any device: the reference in plain torch on the tensors' own device. ``check_index``
    False skips the range check (a host read of the index: on a GPU a wait for the device),
    for callers that checked it, or whose user waived it (the losses' ``check_index``)."""
    if check_index:
        _check_range(index, lambdas.shape[0])
    return reference.threshold_step(
        sim, index, valid, lambdas, exp_avg, exp_avg_sq, steps,
        alpha, lr, beta1, beta2, eps, lo, hi, optimizer, step, update,
    )


def _state_views(lambdas, exp_avg, exp_avg_sq, steps, views):
    """NumPy views of the four state tensors: ``views`` when the caller kept them for these
    tensors (:meth:`glofnd.GloFND._state_for_kernels`), else made now."""
    if views is not None:
        return views
    return lambdas.numpy(), exp_avg.numpy(), exp_avg_sq.numpy(), steps.numpy()


def _threshold_step_cpu(sim, index, valid, lambdas, exp_avg, exp_avg_sq, steps,
                        alpha, lr, beta1, beta2, eps, lo, hi, optimizer, step, update,
                        check_index=True, views=None):
    """CPU: the C kernel on the tensors' memory (``Tensor.numpy()`` shares it, no copy). The
    kernel checks the index range whatever ``check_index`` says (it costs nothing there).
    ``views``: NumPy views of the four state tensors, when the caller keeps them."""
    if not _use_c():
        return _threshold_step_any(sim, index, valid, lambdas, exp_avg, exp_avg_sq, steps,
                                   alpha, lr, beta1, beta2, eps, lo, hi, optimizer, step, update,
                                   check_index)
    mask, kept = _C.step(
        sim.detach().numpy(), index.numpy(), None if valid is None else valid.numpy(),
        *_state_views(lambdas, exp_avg, exp_avg_sq, steps, views),
        alpha, lr, beta1, beta2, eps, lo, hi, optimizer, step, update, torch.get_num_threads())
    # the C kernel wrote through the buffers' memory: tell autograd, as an in-place op would
    torch.autograd.graph.increment_version((lambdas, exp_avg, exp_avg_sq, steps))
    return torch.from_numpy(mask), torch.from_numpy(kept)


def _threshold_step_fake(sim, index, valid, lambdas, exp_avg, exp_avg_sq, steps,
                         alpha, lr, beta1, beta2, eps, lo, hi, optimizer, step, update,
                         check_index=True):
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


try:  # torch's own checks for active modes (private: without them, always dispatch)
    _dispatch_depth = torch._C._len_torch_dispatch_stack
    _function_mode = torch._C._is_torch_function_mode_enabled
    _dispatch_depth(), _function_mode()
except (AttributeError, TypeError, RuntimeError):  # pragma: no cover - other torch versions
    def _dispatch_depth() -> int:
        return 1

    def _function_mode() -> bool:
        return True


def _direct(*args) -> bool:
    """Whether a call may go to the CPU implementation without the dispatcher: eager (not traced),
    no dispatch or function mode active, no tensor subclass among ``args``. The dispatcher would
    then reach the same Python function, after ~10 µs of argument boxing per call (schemas of
    10-22 arguments)."""
    return (not torch.compiler.is_compiling() and _dispatch_depth() == 0
            and not _function_mode()
            and all(type(a) is Tensor or not isinstance(a, Tensor) for a in args))


def _call(op, cpu_impl, tensors: int, *args):
    """``op(*args)``; straight to its CPU implementation when :func:`_direct` allows it for the
    first ``tensors`` arguments (those that may be tensors) and the first is on the CPU."""
    if _direct(*args[:tensors]) and args[0].device.type == "cpu":
        return cpu_impl(*args)
    return op(*args)


# --- the fused InfoNCE of the losses ----------------------------------------------------------

_lib.define(
    "info_nce(Tensor sim, Tensor positive, Tensor? own, Tensor? thr, Tensor? removed, "
    "Tensor scale, int per_row, bool ratio) -> (Tensor, Tensor, Tensor)"
)
_lib.define(
    "info_nce_backward(Tensor grad, Tensor sim, Tensor positive, Tensor? own, Tensor? thr, "
    "Tensor? removed, Tensor scale, int per_row, bool ratio, Tensor lse, Tensor kept, "
    "bool want_dscale) -> (Tensor, Tensor)"
)


def _np(t: Optional[Tensor]):
    return None if t is None else t.numpy()


def _info_nce_cpu(sim, positive, own, thr, removed, scale, per_row, ratio):
    if not _use_c():
        return reference.info_nce(sim, positive, own, thr, removed, scale, per_row, ratio)
    loss, lse, kept = _C.info_nce_forward(
        sim.detach().numpy(), positive.numpy(), _np(own), _np(thr), _np(removed),
        float(scale), per_row, ratio, torch.get_num_threads())
    return torch.from_numpy(loss), torch.from_numpy(lse), torch.from_numpy(kept)


def _info_nce_fake(sim, positive, own, thr, removed, scale, per_row, ratio):
    rows = sim.shape[:1]
    return (sim.new_empty(rows), sim.new_empty(rows),
            torch.empty(rows, dtype=torch.int64, device=sim.device))


def _info_nce_backward_any(grad, sim, positive, own, thr, removed, scale, per_row, ratio, lse,
                           kept, want_dscale):
    return reference.info_nce_backward(grad, sim, positive, own, thr, removed, scale, per_row,
                                       ratio, lse, kept)


def _info_nce_backward_cpu(grad, sim, positive, own, thr, removed, scale, per_row, ratio, lse,
                           kept, want_dscale):
    if not _use_c():
        return _info_nce_backward_any(grad, sim, positive, own, thr, removed, scale, per_row,
                                      ratio, lse, kept, want_dscale)
    dsim, dscale = _C.info_nce_backward(
        grad.to(sim.dtype).contiguous().numpy(), sim.numpy(), positive.numpy(), _np(own),
        _np(thr), _np(removed), float(scale), per_row, ratio, lse.numpy(), kept.numpy(),
        want_dscale, torch.get_num_threads())
    dsim = torch.from_numpy(dsim)
    return dsim, (torch.from_numpy(dscale) if dscale is not None else dsim.new_zeros(0))


def _info_nce_backward_fake(grad, sim, positive, own, thr, removed, scale, per_row, ratio, lse,
                            kept, want_dscale):
    return sim.new_empty(sim.shape), sim.new_empty(sim.shape[:1] if want_dscale else (0,))


for _name, _any, _cpu, _fake in (
        ("info_nce", reference.info_nce, _info_nce_cpu, _info_nce_fake),
        ("info_nce_backward", _info_nce_backward_any, _info_nce_backward_cpu,
         _info_nce_backward_fake)):
    _lib.impl(_name, _any, "CompositeExplicitAutograd")
    _lib.impl(_name, _cpu, "CPU")
    torch.library.register_fake("glofnd::" + _name, _fake, lib=_lib)


def _info_nce_setup(ctx, inputs, output):
    sim, positive, own, thr, removed, scale, per_row, ratio = inputs
    _, lse, kept = output
    ctx.save_for_backward(sim, positive, own, thr, removed, scale, lse, kept)
    ctx.per_row, ctx.ratio = per_row, ratio
    ctx.mark_non_differentiable(lse, kept)


def _info_nce_grads(grad, saved, per_row, ratio, want_scale):
    """``(dsim, dscale or None)`` of the InfoNCE from the gradient of its rows' losses and the
    tensors saved by its forward (shared by the op's autograd and :class:`InfoNCE`)."""
    sim, positive, own, thr, removed, scale, lse, kept = saved
    dsim, dscale = _call(info_nce_backward, _info_nce_backward_cpu, 7, grad.contiguous(),
                         sim.detach(), positive, own, thr, removed, scale.detach(), per_row,
                         ratio, lse, kept, want_scale)
    return dsim, (dscale.sum().to(scale.dtype).reshape(scale.shape) if want_scale else None)


def _info_nce_grad(ctx, grad_loss, grad_lse, grad_kept):
    dsim, dscale = _info_nce_grads(grad_loss, ctx.saved_tensors, ctx.per_row, ctx.ratio,
                                   ctx.needs_input_grad[5])
    return dsim, None, None, None, None, dscale, None, None


torch.library.register_autograd("glofnd::info_nce", _info_nce_grad,
                                setup_context=_info_nce_setup, lib=_lib)

info_nce = torch.ops.glofnd.info_nce
info_nce_backward = torch.ops.glofnd.info_nce_backward
"""``glofnd::info_nce(sim, positive, own, thr, removed, scale, per_row, ratio) -> (loss, lse,
kept)``: the per-row InfoNCE of the losses with false negatives removed and the kept negatives
rescaled (:func:`glofnd.reference.info_nce`), differentiable in ``sim`` and ``scale``. CPU
tensors run the fused C kernel (csrc/loss.c: one read of each row for the forward, one for the
backward, no (R, M) temporary); other devices the torch formula."""


def fused_available(sim: Tensor) -> bool:
    """Whether the losses run their InfoNCE through the C kernel for ``sim``."""
    return _use_c() and sim.device.type == "cpu" and sim.dtype in (torch.float32, torch.float64)


# --- the fused SogCLR of the losses -----------------------------------------------------------

_lib.define(
    "sogclr_lme(Tensor sim, Tensor positive, Tensor? own, Tensor? thr, Tensor? removed, "
    "float scale, bool shift) -> (Tensor, Tensor)"
)
_lib.define(
    "sogclr_surrogate(Tensor sim, Tensor positive, Tensor? own, Tensor? thr, Tensor? removed, "
    "float scale, bool shift, bool pos_term, Tensor log_u, Tensor kept) -> Tensor"
)
_lib.define(
    "sogclr_surrogate_backward(Tensor grad, Tensor sim, Tensor positive, Tensor? own, "
    "Tensor? thr, Tensor? removed, float scale, bool shift, bool pos_term, Tensor log_u, "
    "Tensor kept) -> Tensor"
)


def _sogclr_lme_cpu(sim, positive, own, thr, removed, scale, shift):
    if not _use_c():
        return reference.sogclr_lme(sim, positive, own, thr, removed, scale, shift)
    out, kept = _C.sogclr_lme(sim.detach().numpy(), positive.numpy(), _np(own), _np(thr),
                              _np(removed), scale, shift, torch.get_num_threads())
    return torch.from_numpy(out), torch.from_numpy(kept)


def _sogclr_lme_fake(sim, positive, own, thr, removed, scale, shift):
    return (sim.new_empty(sim.shape[:1]),
            torch.empty(sim.shape[:1], dtype=torch.int64, device=sim.device))


def _sogclr_cpu(sim, positive, own, thr, removed, scale, shift, pos_term, log_u, kept):
    if not _use_c():
        return reference.sogclr_surrogate(sim, positive, own, thr, removed, scale, shift,
                                          pos_term, log_u, kept)
    return torch.from_numpy(_C.sogclr_forward(
        sim.detach().numpy(), positive.numpy(), _np(own), _np(thr), _np(removed), scale, shift,
        pos_term, log_u.to(sim.dtype).contiguous().numpy(), kept.numpy(),
        torch.get_num_threads()))


def _sogclr_fake(sim, positive, own, thr, removed, scale, shift, pos_term, log_u, kept):
    return sim.new_empty(sim.shape[:1])


def _sogclr_backward_cpu(grad, sim, positive, own, thr, removed, scale, shift, pos_term, log_u,
                         kept):
    if not _use_c():
        return reference.sogclr_surrogate_backward(grad, sim, positive, own, thr, removed, scale,
                                                   shift, pos_term, log_u, kept)
    return torch.from_numpy(_C.sogclr_backward(
        grad.to(sim.dtype).contiguous().numpy(), sim.numpy(), positive.numpy(), _np(own),
        _np(thr), _np(removed), scale, shift, pos_term,
        log_u.to(sim.dtype).contiguous().numpy(), kept.numpy(), torch.get_num_threads()))


def _sogclr_backward_fake(grad, sim, *args):
    return sim.new_empty(sim.shape)


for _name, _any, _cpu, _fake in (
        ("sogclr_lme", reference.sogclr_lme, _sogclr_lme_cpu, _sogclr_lme_fake),
        ("sogclr_surrogate", reference.sogclr_surrogate, _sogclr_cpu, _sogclr_fake),
        ("sogclr_surrogate_backward", reference.sogclr_surrogate_backward,
         _sogclr_backward_cpu, _sogclr_backward_fake)):
    _lib.impl(_name, _any, "CompositeExplicitAutograd")
    _lib.impl(_name, _cpu, "CPU")
    torch.library.register_fake("glofnd::" + _name, _fake, lib=_lib)


def _sogclr_setup(ctx, inputs, output):
    sim, positive, own, thr, removed, scale, shift, pos_term, log_u, kept = inputs
    ctx.save_for_backward(sim, positive, own, thr, removed, log_u, kept)
    ctx.args = (scale, shift, pos_term)


def _sogclr_grads(grad, saved, scale, shift, pos_term):
    """dsim of SogCLR's surrogate (shared by the op's autograd and :class:`SogCLR`)."""
    sim, positive, own, thr, removed, log_u, kept = saved
    return _call(sogclr_surrogate_backward, _sogclr_backward_cpu, 11, grad.contiguous(),
                 sim.detach(), positive, own, thr, removed, scale, shift, pos_term, log_u, kept)


def _sogclr_grad(ctx, grad):
    dsim = _sogclr_grads(grad, ctx.saved_tensors, *ctx.args)
    return dsim, None, None, None, None, None, None, None, None, None


torch.library.register_autograd("glofnd::sogclr_surrogate", _sogclr_grad,
                                setup_context=_sogclr_setup, lib=_lib)

sogclr_lme = torch.ops.glofnd.sogclr_lme
"""``glofnd::sogclr_lme(sim, positive, own, thr, removed, scale, shift) -> (lme, kept)``:
SogCLR's per-row log-mean-exp of the kept negatives (:func:`glofnd.reference.sogclr_lme`)."""
sogclr_surrogate = torch.ops.glofnd.sogclr_surrogate
sogclr_surrogate_backward = torch.ops.glofnd.sogclr_surrogate_backward
"""``glofnd::sogclr_surrogate(sim, positive, own, thr, removed, scale, shift, pos_term, log_u,
kept) -> loss``: SogCLR's per-row surrogate (:func:`glofnd.reference.sogclr_surrogate`),
differentiable in ``sim``. CPU tensors run the fused C kernels (csrc/loss.c)."""


# --- the losses' forward with GloFND's update in the same pass -------------------------------

_lib.define(
    "fused_forward(Tensor sim, Tensor positive, Tensor? own, Tensor index, Tensor(a!) lambdas, "
    "Tensor(b!) exp_avg, Tensor(c!) exp_avg_sq, Tensor(d!) steps, float scale, int kind, "
    "int per_row, bool ratio, float alpha, float lr, float beta1, float beta2, float eps, "
    "float lo, float hi, int optimizer, int step, bool update) -> (Tensor, Tensor, Tensor, Tensor)"
)


def _fused_forward_any(sim, positive, own, index, lambdas, exp_avg, exp_avg_sq, steps, scale,
                       kind, per_row, ratio, alpha, lr, beta1, beta2, eps, lo, hi, optimizer,
                       step, update):
    """Any device: the reference's update with the own column and positive excluded, then the
    reference formula with the rows' new λ."""
    _check_range(index, lambdas.shape[0])
    if update:
        exclude = positive.unsqueeze(1) if own is None else torch.stack([positive, own], 1)
        above, nvalid = reference.row_counts(sim, index, reference.exclusion_valid(sim, exclude),
                                             lambdas)
        reference.pooled_update(index, above, nvalid, lambdas, exp_avg, exp_avg_sq, steps,
                                alpha, lr, beta1, beta2, eps, lo, hi, optimizer, step)
    thr = lambdas[index]
    if kind == 0:
        loss, lse, kept = reference.info_nce(sim, positive, own, thr, None,
                                             torch.tensor(scale, dtype=sim.dtype), per_row,
                                             ratio)
        return loss, lse, kept, thr
    out, kept = reference.sogclr_lme(sim, positive, own, thr, None, scale, kind == 1)
    return out, out.new_empty(0), kept, thr


def _fused_forward_cpu(sim, positive, own, index, lambdas, exp_avg, exp_avg_sq, steps, scale,
                       kind, per_row, ratio, alpha, lr, beta1, beta2, eps, lo, hi, optimizer,
                       step, update):
    """CPU: one C kernel (csrc/loss.c, glofnd_fused_fwd) that counts, updates and sums."""
    if not _use_c():
        return _fused_forward_any(sim, positive, own, index, lambdas, exp_avg, exp_avg_sq,
                                  steps, scale, kind, per_row, ratio, alpha, lr, beta1, beta2,
                                  eps, lo, hi, optimizer, step, update)
    state = (lambdas, exp_avg, exp_avg_sq, steps)
    return fused_forward_c(sim, positive, own, index, state,
                           _state_views(*state, None), scale, kind, per_row, ratio,
                           (alpha, lr, beta1, beta2, eps, lo, hi, optimizer, step), update)


def fused_forward_c(sim, positive, own, index, state, views, scale, kind, per_row, ratio, hyper,
                    update):
    """The C kernel of :data:`fused_forward` on CPU tensors, for callers that made the checks of
    :func:`_direct` and hold NumPy ``views`` of the four ``state`` tensors; ``hyper`` = (alpha,
    lr, beta1, beta2, eps, lo, hi, optimizer, step)."""
    out0, out1, kept, thr = _C.fused_forward(
        sim.numpy(), positive.numpy(), None if own is None else own.numpy(), index.numpy(),
        *views, scale, kind, per_row, ratio, *hyper, update, torch.get_num_threads())
    if update:  # the kernel wrote through the buffers' memory: tell autograd
        torch.autograd.graph.increment_version(state)
    out0 = torch.from_numpy(out0)
    return (out0, out0.new_empty(0) if out1 is None else torch.from_numpy(out1),
            torch.from_numpy(kept), torch.from_numpy(thr))


def _fused_forward_fake(sim, positive, own, index, lambdas, *args):
    rows = sim.shape[:1]
    kind = args[5]
    return (sim.new_empty(rows), sim.new_empty(rows if kind == 0 else (0,)),
            torch.empty(rows, dtype=torch.int64, device=sim.device),
            torch.empty(rows, dtype=torch.float32, device=sim.device))


_lib.impl("fused_forward", _fused_forward_any, "CompositeExplicitAutograd")
_lib.impl("fused_forward", _fused_forward_cpu, "CPU")
torch.library.register_fake("glofnd::fused_forward", _fused_forward_fake, lib=_lib)

fused_forward = torch.ops.glofnd.fused_forward
"""``glofnd::fused_forward``: the losses' forward pass with GloFND's λ update in the same
pass over the similarities (no gradient; mutates the state). kind 0: ``(loss, lse, kept, thr)``
of the InfoNCE; kind 1 / 2: ``(lme, empty, kept, thr)`` of SogCLR with / without the positive's
offset. ``thr`` (R,) float32 holds the rows' new λ. λ's state is bit-identical to
:data:`threshold_step` given the validity of all but the own column and positive."""

_lib.define(
    "info_nce_attach(Tensor sim, Tensor positive, Tensor? own, Tensor? thr, Tensor? removed, "
    "Tensor scale, int per_row, bool ratio, Tensor loss, Tensor lse, Tensor kept) -> Tensor"
)


def _attach(sim, positive, own, thr, removed, scale, per_row, ratio, loss, lse, kept):
    return loss.clone()


def _attach_fake(sim, positive, own, thr, removed, scale, per_row, ratio, loss, lse, kept):
    return torch.empty_like(loss)


_lib.impl("info_nce_attach", _attach, "CompositeExplicitAutograd")
torch.library.register_fake("glofnd::info_nce_attach", _attach_fake, lib=_lib)


def _attach_setup(ctx, inputs, output):
    sim, positive, own, thr, removed, scale, per_row, ratio, _, lse, kept = inputs
    ctx.save_for_backward(sim, positive, own, thr, removed, scale, lse, kept)
    ctx.per_row, ctx.ratio = per_row, ratio


def _attach_grad(ctx, grad):
    grads = _info_nce_grad(ctx, grad, None, None)
    return (*grads, None, None, None)


torch.library.register_autograd("glofnd::info_nce_attach", _attach_grad,
                                setup_context=_attach_setup, lib=_lib)

info_nce_attach = torch.ops.glofnd.info_nce_attach
"""``glofnd::info_nce_attach``: returns ``loss`` (a copy) with the gradient of
:data:`info_nce` in ``sim`` and ``scale``, for a forward computed by :data:`fused_forward`."""


# --- the losses' entry points: straight to the CPU kernels when nothing else would run --------

def call_sogclr_lme(*args):
    """:data:`sogclr_lme` through :func:`_call`."""
    return _call(sogclr_lme, _sogclr_lme_cpu, 5, *args)


class InfoNCE(torch.autograd.Function):
    """:data:`info_nce` with its gradient in ``sim`` and ``scale``, for the losses. With
    ``fused`` (a function that runs :data:`fused_forward` and returns ``(loss, lse, kept,
    thr)``), the forward is that call, which makes the rows' thresholds ``thr`` along. Returns
    ``(loss, kept, thr)``. Same values and gradients as the op (``info_nce``/
    ``info_nce_attach``), without the per-call cost of the dispatcher and of torch.library's
    autograd wrapper in eager mode, and without a copy of the fused forward's loss."""

    @staticmethod
    def forward(ctx, sim, scale, positive, own, thr, removed, per_row, ratio, fused=None):
        if fused is None:
            loss, lse, kept = _call(info_nce, _info_nce_cpu, 6, sim.detach(), positive, own,
                                    thr, removed, scale.detach(), per_row, ratio)
        else:
            loss, lse, kept, thr = fused()
        ctx.save_for_backward(sim, positive, own, thr, removed, scale, lse, kept)
        ctx.per_row, ctx.ratio = per_row, ratio
        ctx.set_materialize_grads(False)  # no zero tensors for kept and thr, which have none
        if fused is None:
            ctx.mark_non_differentiable(kept)
            return loss, kept, None
        ctx.mark_non_differentiable(kept, thr)
        return loss, kept, thr

    @staticmethod
    def backward(ctx, grad, _kept, _thr):
        if grad is None:
            return (None,) * 9
        dsim, dscale = _info_nce_grads(grad, ctx.saved_tensors, ctx.per_row, ctx.ratio,
                                       ctx.needs_input_grad[1])
        return dsim, dscale, None, None, None, None, None, None, None


class SogCLR(torch.autograd.Function):
    """:data:`sogclr_surrogate` with its gradient in ``sim``, for the losses (as
    :class:`InfoNCE`: the same values, without the per-call cost of the dispatcher)."""

    @staticmethod
    def forward(ctx, sim, positive, own, thr, removed, scale, shift, pos_term, log_u, kept):
        log_u = log_u.to(sim.dtype).contiguous()
        out = _call(sogclr_surrogate, _sogclr_cpu, 10, sim.detach(), positive, own, thr,
                    removed, scale, shift, pos_term, log_u, kept)
        ctx.save_for_backward(sim, positive, own, thr, removed, log_u, kept)
        ctx.args = (scale, shift, pos_term)
        return out

    @staticmethod
    def backward(ctx, grad):
        dsim = _sogclr_grads(grad, ctx.saved_tensors, *ctx.args)
        return dsim, None, None, None, None, None, None, None, None, None


def info_nce_loss(sim, scale, positive, own, thr, removed, per_row, ratio, fused=None):
    """The losses' InfoNCE: ``(loss, kept, thr)`` with the gradient, ``thr`` the thresholds
    ``fused`` made (see :class:`InfoNCE`; None without it); :class:`InfoNCE` in eager mode, the
    custom ops (:data:`info_nce`, :data:`info_nce_attach`) when traced by torch.compile."""
    if not torch.compiler.is_compiling():
        return InfoNCE.apply(sim, scale, positive, own, thr, removed, per_row, ratio, fused)
    if fused is None:
        loss, _, kept = info_nce(sim, positive, own, thr, removed, scale, per_row, ratio)
        return loss, kept, None
    loss, lse, kept, thr = fused()
    return info_nce_attach(sim, positive, own, thr, removed, scale, per_row, ratio, loss, lse,
                           kept), kept, thr


def sogclr_loss(sim, positive, own, thr, removed, scale, shift, pos_term, log_u, kept):
    """The losses' SogCLR surrogate with the gradient: :class:`SogCLR` in eager mode,
    :data:`sogclr_surrogate` when traced."""
    if not torch.compiler.is_compiling():
        return SogCLR.apply(sim, positive, own, thr, removed, scale, shift, pos_term, log_u,
                            kept)
    return sogclr_surrogate(sim, positive, own, thr, removed, scale, shift, pos_term,
                            log_u.to(sim.dtype), kept)
