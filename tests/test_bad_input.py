"""Bad input raises TypeError / ValueError / IndexError naming the argument, and changes nothing.

The test is a table: each *target* knows how to build a good call (and the state it may touch);
each *row* changes that call in one way and names the exception and the argument the message must
mention. Every row checks, bit for bit, that the state and every array argument are the same
after the failed call as before. New entry points (the losses) join by adding a target and rows.
"""
from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch

import glofnd
from glofnd import _ops, numpy_api

N = 6  # num_samples of every target's state
DROP = object()  # an override that removes the argument


# ---------------------------------------------------------------------------------------------
# Targets: a good call, and how to run it with some arguments changed.


def _np_state(rng):
    # A state that is not the initial one, so that any write would show.
    return {
        "lambdas": rng.uniform(-0.5, 0.5, N).astype(np.float32),
        "exp_avg": rng.uniform(-0.1, 0.1, N).astype(np.float32),
        "exp_avg_sq": rng.uniform(0.0, 0.1, N).astype(np.float32),
        "steps": rng.integers(0, 9, N).astype(np.int32),
    }


def _np_batch(rng):
    return {"sim": rng.uniform(-1, 1, (4, 5)).astype(np.float32),
            "index": np.array([0, 1, 2, 0]), "valid": rng.random((4, 5)) < 0.8}


@dataclass
class Target:
    name: str
    backends: tuple  # backends the call runs on ("c", "reference"), or ("none",)
    setup: Callable[[np.random.Generator], dict]  # -> context: {"kwargs": ..., "state": ...}
    call: Callable[[dict, dict], Any]  # (context, kwargs) -> result


def _c_setup(rng):
    st = _np_state(rng)
    kw = dict(_np_batch(rng), **st, alpha=0.3, lr=0.05, beta1=0.9, beta2=0.98, eps=1e-8, lo=-1.0,
              hi=1.0, optimizer=0, step=0, update=True, num_threads=2)
    return {"kwargs": kw, "state": st}


def _numpy_setup(rng):
    st = _np_state(rng)
    kw = dict(_np_batch(rng), state=st, alpha=0.3, lr=0.05, optimizer="adam", betas=(0.9, 0.98),
              eps=1e-8, clamp=(-1.0, 1.0), step=0, update=True, num_threads=2)
    return {"kwargs": kw, "state": st}


def _module_setup(rng):
    fnd = glofnd.GloFND(N, alpha=0.3)
    st = _np_state(rng)
    with torch.no_grad():
        for k, v in st.items():
            getattr(fnd, k).copy_(torch.from_numpy(v))
    b = _np_batch(rng)
    kw = {"sim": torch.from_numpy(b["sim"]), "index": torch.from_numpy(b["index"]),
          "valid": torch.from_numpy(b["valid"]), "update": True}
    return {"kwargs": kw, "module": fnd}


def _features(rng, b=4, d=3):
    z = torch.from_numpy(rng.normal(size=(2, b, d)).astype(np.float32))
    return z[0], z[1]


def _loss_setup(rng):
    loss = glofnd.GloFNDLoss(N, temperature=0.2, alpha=0.3, base="sogclr", init_lambda=0.5)
    for _ in range(2):  # a state that is not the initial one
        z0, z1 = _features(rng)
        loss(z0, z1, torch.tensor([0, 1, 2, 3]))
    z0, z1 = _features(rng)
    kw = {"z0": z0, "z1": z1, "index": torch.tensor([5, 1, 2, 0]),
          "labels": torch.tensor([0, 1, 0, 1])}
    return {"kwargs": kw, "module": loss}


def _clip_setup(rng):
    loss = glofnd.GloFNDClipLoss(N, alpha=0.3, base="sogclr", init_lambda=0.5)
    for _ in range(2):
        img, txt = _features(rng)
        loss(img, txt, 10.0, torch.tensor([0, 1, 2, 3]))
    img, txt = _features(rng)
    kw = {"image_features": img, "text_features": txt, "logit_scale": torch.tensor(10.0),
          "index": torch.tensor([5, 1, 2, 0]), "labels": torch.tensor([0, 1, 0, 1])}
    return {"kwargs": kw, "module": loss}


_LOSS_CTOR = dict(num_samples=N, temperature=0.1, alpha=0.01, lr=0.05, base="simclr",
                  method="glofnd", gamma=0.9, start_update=0, start_mask=0)
_CLIP_CTOR = dict(num_samples=N, alpha=0.01, lr=0.05, base="clip", method="glofnd", gamma=0.9,
                  start_update=0, start_mask=0)


def _module_state(ctx):
    return dict(ctx["module"].named_buffers())


TARGETS = {
    "_C.step": Target("_C.step", ("c",), _c_setup, lambda ctx, kw: glofnd._ops._C.step(**kw)),
    "numpy.threshold_step": Target("numpy.threshold_step", ("c", "reference"), _numpy_setup,
                                   lambda ctx, kw: numpy_api.threshold_step(**kw)),
    "numpy.init_state": Target("numpy.init_state", ("none",),
                               lambda rng: {"kwargs": {"num_samples": N, "init_lambda": 0.5}},
                               lambda ctx, kw: numpy_api.init_state(**kw)),
    "GloFND()": Target("GloFND()", ("none",),
                       lambda rng: {"kwargs": dict(num_samples=N, alpha=0.01, lr=0.05,
                                                   optimizer="adam", betas=(0.9, 0.98), eps=1e-8,
                                                   init_lambda=1.0, bias_correction="sample",
                                                   clamp=(-1.0, 1.0))},
                       lambda ctx, kw: glofnd.GloFND(**kw)),
    "GloFND.step": Target("GloFND.step", ("c", "reference"), _module_setup,
                          lambda ctx, kw: ctx["module"].step(**kw)),
    "GloFND.forward": Target("GloFND.forward", ("c", "reference"), _module_setup,
                             lambda ctx, kw: ctx["module"](**kw)),
    "GloFND.<vector> =": Target(
        "GloFND.<vector> =", ("none",),
        lambda rng: (lambda ctx: dict(ctx, kwargs={"name": "lambdas",
                                                   "value": ctx["module"].lambdas + 0.25}))(
            _module_setup(rng)),
        lambda ctx, kw: setattr(ctx["module"], kw["name"], kw["value"])),
    "GloFNDLoss()": Target("GloFNDLoss()", ("none",), lambda rng: {"kwargs": dict(_LOSS_CTOR)},
                           lambda ctx, kw: glofnd.GloFNDLoss(**kw)),
    "GloFNDClipLoss()": Target("GloFNDClipLoss()", ("none",),
                               lambda rng: {"kwargs": dict(_CLIP_CTOR)},
                               lambda ctx, kw: glofnd.GloFNDClipLoss(**kw)),
    "GloFNDLoss.forward": Target("GloFNDLoss.forward", ("c", "reference"), _loss_setup,
                                 lambda ctx, kw: ctx["module"](**kw)),
    "GloFNDClipLoss.forward": Target("GloFNDClipLoss.forward", ("c", "reference"), _clip_setup,
                                     lambda ctx, kw: ctx["module"](**kw)),
}


# ---------------------------------------------------------------------------------------------
# Rows. `change` is a dict of overrides (DROP removes the argument) or a function of the context
# returning one (for values built from the state); `prepare` may alter the context first.


@dataclass
class Row:
    targets: tuple
    id: str
    change: Any
    error: type
    name: str  # the argument the message must name
    prepare: Optional[Callable[[dict], None]] = field(default=None)


C, NP, INIT, CTOR = ("_C.step",), ("numpy.threshold_step",), ("numpy.init_state",), ("GloFND()",)
MOD = ("GloFND.step", "GloFND.forward")
ASSIGN = ("GloFND.<vector> =",)
LCTOR, LOSS, CLIP = ("GloFNDLoss()", "GloFNDClipLoss()"), ("GloFNDLoss.forward",), \
    ("GloFNDClipLoss.forward",)
ARR = C + NP  # rows on NumPy arrays shared by the binding and the NumPy API
nan, inf = math.nan, math.inf


def _np(f):
    """A change computed from a fresh default batch of NumPy arrays."""
    return lambda ctx: f(ctx["kwargs"])


def _st(key, f):
    """A change of one state array: on _C.step it is an argument, on the NumPy API a dict entry."""
    def change(ctx):
        new = f(ctx["kwargs"].get(key, ctx["state"][key]))
        if "state" in ctx["kwargs"]:
            return {"state": dict(ctx["state"], **{key: new})}
        return {key: new}
    return change


def _readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def _overlapping(ctx):
    """exp_avg and exp_avg_sq with a stride of 2 elements in one array, the second starting at
    the first's element 1: they share N - 1 elements."""
    big = np.zeros(2 * N + 2, dtype=np.float32)
    pair = {"exp_avg": big[0:2 * N:2], "exp_avg_sq": big[2:2 * N + 2:2]}
    if "state" in ctx["kwargs"]:
        return {"state": dict(ctx["state"], **pair)}
    return pair


def _t(f):
    """A change computed from the default torch batch."""
    return lambda ctx: f(ctx["kwargs"])


def _state_buffer(f):
    """Replaces the module's (N, 4) state buffer by f(buffer)."""
    def prepare(ctx):
        m = ctx["module"]
        m.state = f(m.state)
    return prepare


def _assigned(name, f):
    """Assigns f(current vector) to the state vector ``name`` (copied into the block)."""
    return lambda ctx: {"name": name, "value": f(getattr(ctx["module"], name))}


ROWS = [
    # --- sim -----------------------------------------------------------------------------------
    Row(ARR, "sim-list", _np(lambda k: {"sim": k["sim"].tolist()}), TypeError, "sim"),
    Row(ARR, "sim-int", _np(lambda k: {"sim": k["sim"].astype(np.int32)}), TypeError, "sim"),
    Row(ARR, "sim-complex", _np(lambda k: {"sim": k["sim"].astype(np.complex64)}), TypeError,
        "sim"),
    Row(ARR, "sim-float16", _np(lambda k: {"sim": k["sim"].astype(np.float16)}), TypeError, "sim"),
    Row(ARR, "sim-1d", _np(lambda k: {"sim": k["sim"][0]}), ValueError, "sim"),
    Row(ARR, "sim-3d", _np(lambda k: {"sim": k["sim"][None]}), ValueError, "sim"),
    Row(ARR, "sim-missing", {"sim": DROP}, TypeError, "sim"),
    Row(NP, "sim-empty-rows", _np(lambda k: {"sim": k["sim"][:0], "index": k["index"][:0],
                                             "valid": None}), ValueError, "sim"),
    Row(NP, "sim-empty-cols", _np(lambda k: {"sim": k["sim"][:, :0], "valid": None}), ValueError,
        "sim"),
    # --- index ---------------------------------------------------------------------------------
    Row(ARR, "index-list", {"index": [0, 1, 2, 0]}, TypeError, "index"),
    Row(ARR, "index-float", {"index": np.array([0.0, 1.0, 2.0, 0.0])}, TypeError, "index"),
    Row(ARR, "index-bool", {"index": np.array([True, False, True, False])}, TypeError, "index"),
    Row(ARR, "index-object", {"index": np.array([0, 1, 2, 0], dtype=object)}, TypeError, "index"),
    Row(ARR, "index-short", {"index": np.array([0, 1, 2])}, ValueError, "index"),
    Row(ARR, "index-2d", {"index": np.array([[0, 1, 2, 0]])}, ValueError, "index"),
    Row(ARR, "index-too-large", {"index": np.array([0, 1, N, 0])}, IndexError, "index"),
    Row(ARR, "index-negative", {"index": np.array([0, -1, 2, 0])}, IndexError, "index"),
    Row(ARR, "index-uint64-huge", {"index": np.array([0, 2**64 - 1, 2, 0], dtype=np.uint64)},
        IndexError, "index"),
    # --- valid ---------------------------------------------------------------------------------
    Row(ARR, "valid-int", _np(lambda k: {"valid": k["valid"].astype(np.int8)}), TypeError,
        "valid"),
    Row(ARR, "valid-list", _np(lambda k: {"valid": k["valid"].tolist()}), TypeError, "valid"),
    Row(ARR, "valid-shape", _np(lambda k: {"valid": k["valid"][:, :3]}), ValueError, "valid"),
    # --- state arrays --------------------------------------------------------------------------
    Row(ARR, "lambdas-float64", _st("lambdas", lambda a: a.astype(np.float64)), TypeError,
        "lambdas"),
    Row(ARR, "exp_avg-float16", _st("exp_avg", lambda a: a.astype(np.float16)), TypeError,
        "exp_avg"),
    Row(ARR, "exp_avg_sq-list", _st("exp_avg_sq", lambda a: a.tolist()), TypeError, "exp_avg_sq"),
    Row(ARR, "steps-int64", _st("steps", lambda a: a.astype(np.int64)), TypeError, "steps"),
    Row(ARR, "steps-short", _st("steps", lambda a: a[:-1].copy()), ValueError, "steps"),
    Row(ARR, "lambdas-2d", _st("lambdas", lambda a: a[None].copy()), ValueError, "lambdas"),
    # strided state is taken (columns of a block), state that shares elements is not: here
    # exp_avg_sq starts one element of stride 2 after exp_avg
    Row(ARR, "exp_avg_sq-overlaps-exp_avg", _overlapping, ValueError, "exp_avg_sq"),
    Row(ARR, "exp_avg-reversed", _st("exp_avg", lambda a: a[::-1]), ValueError, "exp_avg"),
    Row(ARR, "exp_avg_sq-readonly", _st("exp_avg_sq", _readonly), ValueError, "exp_avg_sq"),
    Row(ARR, "exp_avg-aliases-lambdas", lambda ctx: _st("exp_avg", lambda a: (
        ctx["kwargs"].get("lambdas", ctx["state"]["lambdas"])))(ctx), ValueError, "exp_avg"),
    Row(NP, "state-not-dict", _np(lambda k: {"state": list(k["state"].values())}), TypeError,
        "state"),
    Row(NP, "state-missing-key", _np(lambda k: {"state": {x: y for x, y in k["state"].items()
                                                          if x != "steps"}}), TypeError, "state"),
    Row(NP, "state-missing", {"state": DROP}, TypeError, "state"),
    # --- hyper-parameters, binding names -------------------------------------------------------
    *[Row(C, f"alpha={v}", {"alpha": v}, ValueError, "alpha") for v in (0.0, 1.0, -0.5, nan, inf)],
    Row(C, "alpha-str", {"alpha": "0.1"}, TypeError, "alpha"),
    Row(C, "alpha-array", {"alpha": np.array([0.1, 0.2])}, TypeError, "alpha"),
    *[Row(C, f"lr={v}", {"lr": v}, ValueError, "lr") for v in (-1.0, nan, inf)],
    Row(C, "lr-huge-int", {"lr": 10**400}, ValueError, "lr"),
    Row(C, "beta1=1", {"beta1": 1.0}, ValueError, "beta1"),
    Row(C, "beta2=nan", {"beta2": nan}, ValueError, "beta2"),
    *[Row(C, f"eps={v}", {"eps": v}, ValueError, "eps") for v in (0.0, -1e-8, nan, inf)],
    Row(C, "lo>hi", {"lo": 0.5, "hi": -0.5}, ValueError, "lo"),
    Row(C, "lo=nan", {"lo": nan}, ValueError, "lo"),
    Row(C, "hi=inf", {"hi": inf}, ValueError, "hi"),
    Row(C, "hi-beyond-float32", {"hi": 1e39}, ValueError, "hi"),
    Row(C, "optimizer=2", {"optimizer": 2}, ValueError, "optimizer"),
    Row(C, "optimizer-huge", {"optimizer": 2**80}, ValueError, "optimizer"),
    Row(C, "optimizer-str", {"optimizer": "adam"}, TypeError, "optimizer"),
    Row(C, "step=-1", {"step": -1}, ValueError, "step"),
    Row(C, "step-float", {"step": 1.5}, TypeError, "step"),
    Row(C, "step-huge", {"step": 2**70}, ValueError, "step"),
    Row(C, "update=2", {"update": 2}, ValueError, "update"),
    Row(C, "update-array", {"update": np.ones(3)}, TypeError, "update"),
    *[Row(C, f"num_threads={v}", {"num_threads": v}, ValueError, "num_threads")
      for v in (-1, 10**6)],
    Row(C, "num_threads-float", {"num_threads": 2.0}, TypeError, "num_threads"),
    Row(C, "unknown-option", {"momentum": 0.9}, TypeError, "momentum"),
    # --- hyper-parameters, NumPy API names -----------------------------------------------------
    *[Row(NP, f"alpha={v}", {"alpha": v}, ValueError, "alpha")
      for v in (0.0, 1.0, -0.5, nan, inf)],
    *[Row(NP, f"alpha-{type(v).__name__}", {"alpha": v}, TypeError, "alpha")
      for v in ("0.1", None, True, [0.1])],
    *[Row(NP, f"lr={v}", {"lr": v}, ValueError, "lr") for v in (-1.0, nan, inf)],
    Row(NP, "lr-huge-int", {"lr": 10**400}, ValueError, "lr"),
    Row(NP, "betas-scalar", {"betas": 0.9}, TypeError, "betas"),
    Row(NP, "betas-triple", {"betas": (0.9, 0.98, 0.5)}, TypeError, "betas"),
    Row(NP, "betas[0]=1", {"betas": (1.0, 0.98)}, ValueError, "betas[0]"),
    Row(NP, "betas[1]=nan", {"betas": (0.9, nan)}, ValueError, "betas[1]"),
    *[Row(NP, f"eps={v}", {"eps": v}, ValueError, "eps") for v in (0.0, -1e-8, nan, inf)],
    Row(NP, "clamp-reversed", {"clamp": (0.5, -0.5)}, ValueError, "clamp"),
    Row(NP, "clamp-nan", {"clamp": (nan, 1.0)}, ValueError, "clamp[0]"),
    Row(NP, "clamp-beyond-float32", {"clamp": (-1.0, 1e39)}, ValueError, "clamp[1]"),
    Row(NP, "clamp-none", {"clamp": None}, TypeError, "clamp"),
    *[Row(NP, f"optimizer={v!r}", {"optimizer": v}, ValueError, "optimizer")
      for v in ("adamw", None, 0, ["adam"])],
    Row(NP, "step=-1", {"step": -1}, ValueError, "step"),
    *[Row(NP, f"step-{type(v).__name__}", {"step": v}, TypeError, "step") for v in (1.5, "1")],
    *[Row(NP, f"update-{type(v).__name__}", {"update": v}, TypeError, "update")
      for v in ("yes", None, 1)],
    *[Row(NP, f"num_threads={v}", {"num_threads": v}, ValueError, "num_threads")
      for v in (-1, 2000)],
    Row(NP, "num_threads-float", {"num_threads": 1.5}, TypeError, "num_threads"),
    Row(NP, "unknown-option", {"momentum": 0.9}, TypeError, "momentum"),
    # --- init_state ----------------------------------------------------------------------------
    *[Row(INIT, f"num_samples={v}", {"num_samples": v}, ValueError, "num_samples")
      for v in (0, -3, 2**70)],
    *[Row(INIT, f"num_samples-{type(v).__name__}", {"num_samples": v}, TypeError, "num_samples")
      for v in (1.5, "10", True, None)],
    *[Row(INIT, f"init_lambda={v}", {"init_lambda": v}, ValueError, "init_lambda")
      for v in (nan, inf, 1e39)],
    Row(INIT, "init_lambda-str", {"init_lambda": "1"}, TypeError, "init_lambda"),
    Row(INIT, "unknown-option", {"alpha": 0.1}, TypeError, "alpha"),
    # --- GloFND constructor --------------------------------------------------------------------
    *[Row(CTOR, f"num_samples={v}", {"num_samples": v}, ValueError, "num_samples")
      for v in (0, -3, 2**70)],
    *[Row(CTOR, f"num_samples-{type(v).__name__}", {"num_samples": v}, TypeError, "num_samples")
      for v in (1.5, "10", True)],
    *[Row(CTOR, f"alpha={v}", {"alpha": v}, ValueError, "alpha")
      for v in (0.0, 1.0, -0.5, 1.5, nan, inf)],
    *[Row(CTOR, f"alpha-{type(v).__name__}", {"alpha": v}, TypeError, "alpha")
      for v in ("0.1", None)],
    *[Row(CTOR, f"lr={v}", {"lr": v}, ValueError, "lr") for v in (-0.1, nan, inf)],
    *[Row(CTOR, f"optimizer={v!r}", {"optimizer": v}, ValueError, "optimizer")
      for v in ("adamw", ["adam"], None)],
    Row(CTOR, "betas-single", {"betas": (0.9,)}, TypeError, "betas"),
    Row(CTOR, "betas-scalar", {"betas": 0.9}, TypeError, "betas"),
    Row(CTOR, "betas[0]=1", {"betas": (1.0, 0.9)}, ValueError, "betas[0]"),
    Row(CTOR, "betas[1]=nan", {"betas": (0.9, nan)}, ValueError, "betas[1]"),
    *[Row(CTOR, f"eps={v}", {"eps": v}, ValueError, "eps") for v in (0.0, nan)],
    *[Row(CTOR, f"init_lambda={v}", {"init_lambda": v}, ValueError, "init_lambda")
      for v in (nan, 2.0)],
    *[Row(CTOR, f"bias_correction={v!r}", {"bias_correction": v}, ValueError, "bias_correction")
      for v in ("step", ["sample"])],
    Row(CTOR, "clamp-reversed", {"clamp": (1.0, -1.0)}, ValueError, "clamp[1]"),
    Row(CTOR, "clamp-nan", {"clamp": (nan, 1.0)}, ValueError, "clamp[0]"),
    Row(CTOR, "clamp-beyond-float32", {"clamp": (-1e39, 1.0), "init_lambda": 0.0}, ValueError,
        "clamp[0]"),
    Row(CTOR, "clamp-single", {"clamp": (-1.0,)}, TypeError, "clamp"),
    Row(CTOR, "unknown-option", {"momentum": 0.9}, TypeError, "momentum"),
    # --- GloFND forward / step -----------------------------------------------------------------
    Row(MOD, "sim-numpy", _t(lambda k: {"sim": k["sim"].numpy()}), TypeError, "sim"),
    Row(MOD, "sim-int", _t(lambda k: {"sim": k["sim"].to(torch.int32)}), TypeError, "sim"),
    Row(MOD, "sim-complex", _t(lambda k: {"sim": k["sim"].to(torch.complex64)}), TypeError,
        "sim"),
    Row(MOD, "sim-1d", _t(lambda k: {"sim": k["sim"][0]}), ValueError, "sim"),
    Row(MOD, "sim-3d", _t(lambda k: {"sim": k["sim"][None]}), ValueError, "sim"),
    Row(MOD, "sim-empty-rows", _t(lambda k: {"sim": k["sim"][:0], "index": k["index"][:0],
                                             "valid": None}), ValueError, "sim"),
    Row(MOD, "sim-empty-cols", _t(lambda k: {"sim": k["sim"][:, :0], "valid": None}), ValueError,
        "sim"),
    Row(MOD, "sim-missing", {"sim": DROP}, TypeError, "sim"),
    Row(MOD, "sim-meta", _t(lambda k: {"sim": k["sim"].to("meta"), "index": k["index"].to("meta"),
                                       "valid": None}), ValueError, "sim"),
    Row(MOD, "index-meta", _t(lambda k: {"index": k["index"].to("meta")}), ValueError, "index"),
    Row(MOD, "valid-meta", _t(lambda k: {"valid": k["valid"].to("meta")}), ValueError, "valid"),
    Row(MOD, "index-list", {"index": [0, 1, 2, 0]}, TypeError, "index"),
    Row(MOD, "index-float", {"index": torch.tensor([0.0, 1.0, 2.0, 0.0])}, TypeError, "index"),
    Row(MOD, "index-bool", {"index": torch.tensor([True, False, True, False])}, TypeError,
        "index"),
    Row(MOD, "index-short", {"index": torch.tensor([0, 1, 2])}, ValueError, "index"),
    Row(MOD, "index-2d", {"index": torch.tensor([[0, 1, 2, 0]])}, ValueError, "index"),
    Row(MOD, "index-too-large", {"index": torch.tensor([0, 1, N, 0])}, IndexError, "index"),
    Row(MOD, "index-negative", {"index": torch.tensor([0, -1, 2, 0])}, IndexError, "index"),
    Row(MOD, "valid-int", _t(lambda k: {"valid": k["valid"].to(torch.uint8)}), TypeError, "valid"),
    Row(MOD, "valid-shape", _t(lambda k: {"valid": k["valid"][:, :3]}), ValueError, "valid"),
    *[Row(MOD, f"update-{type(v).__name__}", {"update": v}, TypeError, "update")
      for v in ("yes", None, torch.ones(2))],
    Row(MOD, "unknown-option", {"momentum": 0.9}, TypeError, "momentum"),
    Row(MOD, "state-float64", {}, TypeError, "state",
        prepare=_state_buffer(lambda b: b.double())),
    Row(MOD, "state-3-columns", {}, ValueError, "state",
        prepare=_state_buffer(lambda b: b[:, :3].clone())),
    Row(MOD, "state-short", {}, ValueError, "state", prepare=_state_buffer(lambda b: b[:-1].clone())),
    Row(MOD, "state-column-major", {}, ValueError, "state",
        prepare=_state_buffer(lambda b: b.t().contiguous().t())),
    Row(MOD, "state-expanded", {}, ValueError, "state",
        prepare=_state_buffer(lambda b: b[:1].expand(b.shape[0], 4))),
    # --- assignment of a state vector (copied into the block) ----------------------------------
    Row(ASSIGN, "lambdas-float64", _assigned("lambdas", lambda t: t.double()), TypeError,
        "lambdas"),
    Row(ASSIGN, "lambdas-list", _assigned("lambdas", lambda t: t.tolist()), TypeError, "lambdas"),
    Row(ASSIGN, "steps-int64", _assigned("steps", lambda t: t.long()), TypeError, "steps"),
    Row(ASSIGN, "exp_avg-2d", _assigned("exp_avg", lambda t: t[:, None].clone()), ValueError,
        "exp_avg"),
    Row(ASSIGN, "exp_avg_sq-short", _assigned("exp_avg_sq", lambda t: t[:-1].clone()),
        ValueError, "exp_avg_sq"),
    Row(MOD, "state-meta", {}, ValueError, "sim", prepare=lambda ctx: ctx["module"].to("meta")),
    # --- the losses: constructors -----------------------------------------------------------
    *[Row(LCTOR, f"num_samples={v!r}", {"num_samples": v}, e, "num_samples")
      for v, e in ((0, ValueError), (-3, ValueError), (4.0, TypeError), (None, TypeError))],
    *[Row(LCTOR, f"alpha={v}", {"alpha": v}, ValueError, "alpha") for v in (0.0, 1.0, nan)],
    *[Row(LCTOR, f"lr={v}", {"lr": v}, ValueError, "lr") for v in (-0.1, inf)],
    *[Row(LCTOR, f"gamma={v}", {"gamma": v}, ValueError, "gamma") for v in (0.0, 1.5, nan)],
    Row(LCTOR, "base-unknown", {"base": "moco"}, ValueError, "base"),
    Row(LCTOR, "method-unknown", {"method": "debiased"}, ValueError, "method"),
    Row(LCTOR, "start_update-negative", {"start_update": -1}, ValueError, "start_update"),
    Row(LCTOR, "start_mask-before-update", {"start_update": 5, "start_mask": 2}, ValueError,
        "start_mask"),
    Row(LCTOR, "unknown-option", {"momentum": 0.9}, TypeError, "momentum"),
    *[Row(("GloFNDLoss()",), f"temperature={v}", {"temperature": v}, ValueError, "temperature")
      for v in (0.0, -0.1, nan, inf)],
    Row(("GloFNDLoss()",), "temperature-str", {"temperature": "0.1"}, TypeError, "temperature"),
    # --- the losses: forward ----------------------------------------------------------------
    Row(LOSS, "z0-numpy", _t(lambda k: {"z0": k["z0"].numpy()}), TypeError, "z0"),
    Row(LOSS, "z0-int", _t(lambda k: {"z0": k["z0"].to(torch.int64)}), TypeError, "z0"),
    Row(LOSS, "z0-complex", _t(lambda k: {"z0": k["z0"].to(torch.complex64)}), TypeError, "z0"),
    Row(LOSS, "z0-1d", _t(lambda k: {"z0": k["z0"][0]}), ValueError, "z0"),
    Row(LOSS, "z1-shape", _t(lambda k: {"z1": k["z1"][:3]}), ValueError, "z1"),
    Row(LOSS, "z1-dim", _t(lambda k: {"z1": k["z1"][:, :2]}), ValueError, "z1"),
    Row(LOSS, "z1-meta", _t(lambda k: {"z1": k["z1"].to("meta")}), ValueError, "z1"),
    Row(LOSS, "empty-batch", _t(lambda k: {"z0": k["z0"][:0], "z1": k["z1"][:0],
                                           "index": k["index"][:0], "labels": None}),
        ValueError, "z0"),
    Row(CLIP, "image-numpy", _t(lambda k: {"image_features": k["image_features"].numpy()}),
        TypeError, "image_features"),
    Row(CLIP, "image-int", _t(lambda k: {"image_features": k["image_features"].long()}),
        TypeError, "image_features"),
    Row(CLIP, "text-shape", _t(lambda k: {"text_features": k["text_features"][:3]}), ValueError,
        "text_features"),
    Row(CLIP, "text-meta", _t(lambda k: {"text_features": k["text_features"].to("meta")}),
        ValueError, "text_features"),
    Row(CLIP, "empty-batch", _t(lambda k: {"image_features": k["image_features"][:0],
                                           "text_features": k["text_features"][:0],
                                           "index": k["index"][:0], "labels": None}),
        ValueError, "image_features"),
    Row(CLIP, "logit_scale-str", {"logit_scale": "10"}, TypeError, "logit_scale"),
    Row(CLIP, "logit_scale-vector", {"logit_scale": torch.ones(2)}, ValueError, "logit_scale"),
    Row(CLIP, "logit_scale-int", {"logit_scale": torch.tensor(10)}, ValueError, "logit_scale"),
    *[Row(LOSS + CLIP, rid, change, err, name) for rid, change, err, name in (
        ("index-too-large", {"index": torch.tensor([0, 1, N, 0])}, IndexError, "index"),
        ("index-negative", {"index": torch.tensor([0, -1, 2, 0])}, IndexError, "index"),
        ("index-float", {"index": torch.tensor([0.0, 1.0, 2.0, 0.0])}, TypeError, "index"),
        ("index-short", {"index": torch.tensor([0, 1, 2])}, ValueError, "index"),
        ("index-list", {"index": [0, 1, 2, 3]}, TypeError, "index"),
        ("labels-short", {"labels": torch.tensor([0, 1])}, ValueError, "labels"),
        ("labels-float", {"labels": torch.tensor([0.0, 1.0, 0.0, 1.0])}, TypeError, "labels"),
        ("unknown-option", {"momentum": 0.9}, TypeError, "momentum"))],
    Row(LOSS + CLIP, "index-meta", _t(lambda k: {"index": k["index"].to("meta")}), ValueError,
        "index"),
]


# ---------------------------------------------------------------------------------------------


def _cases():
    for row in ROWS:
        for target in row.targets:
            for backend in TARGETS[target].backends:
                yield pytest.param(row, TARGETS[target], backend,
                                   id=f"{target}-{row.id}-{backend}")


def _snapshot(obj):
    """Bytes of every array in obj (dicts, tuples and lists are walked); meta tensors by shape."""
    if isinstance(obj, dict):
        return {k: _snapshot(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_snapshot(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        if obj.device.type == "meta":
            return ("meta", tuple(obj.shape), obj.dtype)
        return ("tensor", tuple(obj.shape), obj.dtype, obj.detach().contiguous().numpy().tobytes())
    if isinstance(obj, np.ndarray):
        return ("array", obj.shape, obj.dtype.str, obj.tobytes())
    return ("object", repr(obj))


@pytest.fixture
def backend(request, monkeypatch):
    """Routes the call to the C kernel or to the pure-torch reference."""
    name = request.param
    if name == "c" and _ops._C is None:
        pytest.skip("C extension not built")
    if name == "reference":
        monkeypatch.setattr(numpy_api, "_C", None)
        monkeypatch.setattr(_ops, "_backend", "reference")
    return name


def test_table_is_well_formed():
    # Every target is exercised, and every row names a target that exists.
    used = {t for row in ROWS for t in row.targets}
    assert used == set(TARGETS)
    assert len({(t, row.id) for row in ROWS for t in row.targets}) == \
        sum(len(row.targets) for row in ROWS)


def test_good_call_succeeds():
    # The unchanged call of every target works, so each row's failure is due to its change.
    rng = np.random.default_rng(0)
    for target in TARGETS.values():
        if target.name == "_C.step" and _ops._C is None:
            continue
        ctx = target.setup(rng)
        target.call(ctx, dict(ctx["kwargs"]))


@pytest.mark.parametrize("row,target,backend", list(_cases()), indirect=["backend"])
def test_bad_input(row, target, backend):
    rng = np.random.default_rng(1)
    ctx = target.setup(rng)
    if row.prepare is not None:
        row.prepare(ctx)
    change = row.change(ctx) if callable(row.change) else row.change
    kwargs = dict(ctx["kwargs"])
    for k, v in change.items():
        if v is DROP:
            del kwargs[k]
        else:
            kwargs[k] = v
    state = (_module_state(ctx) if "module" in ctx else ctx.get("state", {}))
    before = _snapshot((state, kwargs))

    with pytest.raises(row.error) as info:
        target.call(ctx, kwargs)

    assert type(info.value) in (TypeError, ValueError, IndexError), type(info.value)
    msg = str(info.value)
    assert re.search(rf"(?<![\w\[]){re.escape(row.name)}(?![\w\]])", msg) or \
        (row.name.endswith("]") and row.name in msg), f"message does not name {row.name}: {msg}"
    after = _snapshot(((_module_state(ctx) if "module" in ctx else ctx.get("state", {})), kwargs))
    assert after == before, "a failed call changed the state or an argument"


# ---------------------------------------------------------------------------------------------
# Calls that are not errors at the binding level: the empty batch is a no-op there.


@pytest.mark.skipif(_ops._C is None, reason="C extension not built")
@pytest.mark.parametrize("shape", [(0, 5), (0, 0), (3, 0)])
def test_c_empty_batch_is_a_noop(shape):
    rng = np.random.default_rng(2)
    st = _np_state(rng)
    before = _snapshot(st)
    mask, kept = glofnd._ops._C.step(np.zeros(shape, np.float32),
                                     np.zeros(shape[0], np.int64), None, **st, alpha=0.1)
    assert mask.shape == shape and mask.dtype == np.bool_ and not mask.any()
    assert kept.shape == shape[:1] and kept.dtype == np.int64 and (kept == 0).all()
    assert _snapshot(st) == before


@pytest.mark.skipif(_ops._C is None, reason="C extension not built")
@pytest.mark.parametrize("all_given", [False, True])
def test_c_step_names_an_unknown_keyword(all_given):
    """An unknown keyword is named, also when every known one is given too (where CPython's own
    message gives only a count), and the state is left as it was."""
    st = numpy_api.init_state(10)
    before = {k: v.copy() for k, v in st.items()}
    sim = np.zeros((2, 3), dtype=np.float32)
    index = np.array([0, 1])
    kw = dict(alpha=0.1, lr=0.05, beta1=0.9, beta2=0.98, eps=1e-8, lo=-1.0, hi=1.0,
              optimizer=0, step=0, update=True, num_threads=1) if all_given else {}
    with pytest.raises(TypeError, match="unexpected keyword argument 'alpah'"):
        _ops._C.step(sim, index, None, st["lambdas"], st["exp_avg"], st["exp_avg_sq"],
                     st["steps"], alpah=0.1, **kw)
    for k, v in st.items():
        assert np.array_equal(v, before[k]), k


def _c_step_args(rng):
    st = numpy_api.init_state(10)
    sim = rng.uniform(-1, 1, (4, 6)).astype(np.float32)
    index = np.array([0, 3, 0, 7])
    return (sim, index, None, st["lambdas"], st["exp_avg"], st["exp_avg_sq"], st["steps"]), st


@pytest.mark.skipif(_ops._C is None, reason="C extension not built")
@pytest.mark.parametrize("case", ["twice", "too-many", "missing", "positional-past-end"])
def test_c_step_argument_errors_name_the_argument(case):
    """The binding parses its arguments itself (vectorcall): an argument given twice, too many
    positional ones and a missing required one raise TypeError as CPython words it, naming the
    argument, and leave the state as it was."""
    args, st = _c_step_args(np.random.default_rng(3))
    before = {k: v.copy() for k, v in st.items()}
    hyper = (0.1, 0.05, 0.9, 0.98, 1e-8, -1.0, 1.0, 0, 0, 1, 1)  # alpha .. num_threads
    call, match = {
        "twice": (lambda: _ops._C.step(*args, 0.1, alpha=0.2),
                  "multiple values for argument 'alpha'"),
        "too-many": (lambda: _ops._C.step(*args, *hyper, 1),
                     "at most 18 arguments \\(19 given\\)"),
        "missing": (lambda: _ops._C.step(*args[:3], lambdas=args[3], exp_avg=args[4],
                                         exp_avg_sq=args[5]), "missing required argument 'steps'"),
        "positional-past-end": (lambda: _ops._C.step(*args[:6]), "'steps' \\(pos 7\\)"),
    }[case]
    with pytest.raises(TypeError, match=match):
        call()
    for k, v in st.items():
        assert np.array_equal(v, before[k]), k


@pytest.mark.skipif(_ops._C is None, reason="C extension not built")
def test_c_step_keywords_positional_and_uninterned_agree():
    """The same call given positionally, by keyword, and by keyword names built at run time (so
    not interned: found by comparing strings, not pointers) gives the same mask, counts and
    state."""
    names = ("sim", "index", "valid", "lambdas", "exp_avg", "exp_avg_sq", "steps")
    hyper = dict(alpha=0.2, lr=0.07, beta1=0.8, beta2=0.9, eps=1e-6, lo=-0.5, hi=0.9,
                 optimizer=0, step=3, update=True, num_threads=1)
    results = []
    for form in ("positional", "keyword", "uninterned"):
        args, st = _c_step_args(np.random.default_rng(5))
        if form == "positional":
            out = _ops._C.step(*args, *hyper.values())
        else:
            kw = dict(zip(names, args), **hyper)
            if form == "uninterned":
                kw = {"".join(list(k)): v for k, v in kw.items()}
                assert all(sys.intern(k) is not k for k in kw)
            out = _ops._C.step(**kw)
        results.append((out, {k: v.copy() for k, v in st.items()}))
    (m0, k0), s0 = results[0]
    assert m0.any() and not m0.all()  # the call flagged some entries: the comparison can fail
    for (m, k), s in results[1:]:
        assert np.array_equal(m, m0) and np.array_equal(k, k0)
        for name in s0:
            assert np.array_equal(s[name], s0[name]), name


@pytest.mark.skipif(_ops._C is None, reason="C extension not built")
def test_c_step_reads_byte_swapped_inputs_by_value():
    """sim and index in non-native byte order are read by value (converted), giving the bytes
    of the native call; before, a swapped sim was read as if native."""
    native, st = _c_step_args(np.random.default_rng(6))
    swapped, st2 = _c_step_args(np.random.default_rng(6))
    swapped = (swapped[0].astype(swapped[0].dtype.newbyteorder()),
               swapped[1].astype(swapped[1].dtype.newbyteorder())) + swapped[2:]
    assert not swapped[0].dtype.isnative and not swapped[1].dtype.isnative
    m0, k0 = _ops._C.step(*native, alpha=0.2)
    m1, k1 = _ops._C.step(*swapped, alpha=0.2)
    assert m0.any() and np.array_equal(m0, m1) and np.array_equal(k0, k1)
    for name in st:
        assert np.array_equal(st[name], st2[name]), name


@pytest.mark.skipif(_ops._C is None, reason="C extension not built")
@pytest.mark.parametrize("name", ["lambdas", "exp_avg", "exp_avg_sq", "steps"])
def test_c_step_refuses_a_byte_swapped_state_array(name):
    """A state array in non-native byte order cannot be updated in place correctly: TypeError
    naming it, nothing written."""
    args, st = _c_step_args(np.random.default_rng(7))
    pos = 3 + ("lambdas", "exp_avg", "exp_avg_sq", "steps").index(name)
    swapped = st[name].astype(st[name].dtype.newbyteorder())
    before = swapped.copy()
    others = {k: v.copy() for k, v in st.items()}
    args = args[:pos] + (swapped,) + args[pos + 1:]
    with pytest.raises(TypeError, match=f"{name} must have dtype .* native byte order"):
        _ops._C.step(*args)
    assert np.array_equal(swapped, before)
    for k, v in st.items():
        assert np.array_equal(v, others[k]), k
