"""Shared test helpers: random states and batches, and the independent float64 oracle."""
from __future__ import annotations

import importlib
import os

import numpy as np
import pytest
import torch

from glofnd import _ops

STATE_KEYS = ("lambdas", "exp_avg", "exp_avg_sq", "steps")
HYPER = dict(alpha=0.1, lr=0.05, beta1=0.9, beta2=0.98, eps=1e-8, lo=-1.0, hi=1.0)


def import_peer(module: str):
    """Imports a peer library that a test compares against (it is in the ``test`` extra).
    Skips where it is not installed, unless GLOFND_REQUIRE_PEERS is set (CI sets it): there a
    broken test install fails rather than skipping the comparison."""
    if os.environ.get("GLOFND_REQUIRE_PEERS"):
        return importlib.import_module(module)
    return pytest.importorskip(module)


def random_state(n: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    lam = torch.rand(n, generator=g) * 2 - 1
    lam[::5] = 1.0
    return {
        "lambdas": lam.float(),
        "exp_avg": (torch.rand(n, generator=g) - 0.5) * 0.2,
        "exp_avg_sq": torch.rand(n, generator=g) * 0.05,
        "steps": torch.randint(0, 6, (n,), generator=g, dtype=torch.int32),
    }


def clone_state(state: dict) -> dict:
    return {k: v.clone() for k, v in state.items()}


def op_step(sim, index, valid, state, optimizer=0, step=0, update=True, **hyper):
    """One call of the custom op on the backend selected by glofnd.use_backend."""
    h = {**HYPER, **hyper}
    return _ops.threshold_step(sim, index, valid, state["lambdas"], state["exp_avg"],
                               state["exp_avg_sq"], state["steps"], h["alpha"], h["lr"],
                               h["beta1"], h["beta2"], h["eps"], h["lo"], h["hi"], optimizer,
                               step, update)


def oracle_step(state: dict, sim, index, valid, alpha, lr, optimizer="adam", betas=(0.9, 0.98),
                eps=1e-8, step=0):
    """docs/algorithm.md written directly: float64 arithmetic, float32 storage, Python pow.

    state holds NumPy arrays (float32 lambdas/exp_avg/exp_avg_sq, int steps), updated in place.
    Returns the mask computed with the new thresholds."""
    sim = np.asarray(sim, dtype=np.float64)
    ok = ~np.isnan(sim) if valid is None else (np.asarray(valid) & ~np.isnan(sim))
    lam, m, v, t = state["lambdas"], state["exp_avg"], state["exp_avg_sq"], state["steps"]
    b1, b2 = betas
    for i in np.unique(index):
        rows = index == i
        n_valid = ok[rows].sum()
        if n_valid == 0:
            continue
        above = (ok[rows] & (sim[rows] > float(lam[i]))).sum()
        g = alpha - above / n_valid
        t[i] += 1
        new = float(lam[i])
        if optimizer == "adam":
            mm = b1 * float(m[i]) + (1 - b1) * g
            vv = b2 * float(v[i]) + (1 - b2) * g * g
            tb = step if step > 0 else int(t[i])
            new -= lr * (mm / (1 - b1 ** tb)) / (np.sqrt(vv / (1 - b2 ** tb)) + eps)
            m[i], v[i] = np.float32(mm), np.float32(vv)
        else:
            new -= lr * g
        lam[i] = np.float32(min(max(new, -1.0), 1.0))
    return ok & (sim > lam[index].astype(np.float64)[:, None])
