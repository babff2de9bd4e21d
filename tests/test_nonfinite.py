"""Non-finite similarities: NaN and ±inf are never valid, λ stays finite, and an index whose rows
hold nothing finite keeps its whole state. Each test runs on the C kernel and on the reference."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import glofnd
from glofnd import _ops, numpy_api

NONFINITE = (np.nan, np.inf, -np.inf)


@pytest.fixture(params=["c", "reference"])
def backend(request, monkeypatch):
    if request.param == "c" and _ops._C is None:
        pytest.skip("C extension not built")
    if request.param == "reference":
        monkeypatch.setattr(numpy_api, "_C", None)
        monkeypatch.setattr(_ops, "_backend", "reference")
    return request.param


def _sprinkle(rng, sim, share):
    """sim with a share of its entries replaced by NaN, +inf or -inf."""
    out = sim.copy()
    hit = rng.random(sim.shape) < share
    out[hit] = rng.choice(NONFINITE, size=int(hit.sum()))
    return out


def _sgd_oracle(lam, sim, index, valid, alpha, lr, lo=-1.0, hi=1.0):
    """The SGD step in float64 written from docs/algorithm.md, finite valid entries only."""
    lam = lam.copy()
    for i in np.unique(index):
        rows = sim[index == i]
        ok = np.isfinite(rows) & valid[index == i]
        if ok.sum() == 0:
            continue
        g = alpha - (rows[ok] > np.float64(lam[i])).sum() / ok.sum()
        lam[i] = np.float32(min(max(float(lam[i]) - lr * g, lo), hi))
    return lam


def test_sgd_step_ignores_nonfinite(backend):
    # λ after each SGD step equals the float64 oracle that drops non-finite entries, bit for bit.
    rng = np.random.default_rng(0)
    n, alpha, lr = 8, 0.2, 0.3
    st = numpy_api.init_state(n, init_lambda=0.5)
    for _ in range(20):
        sim = _sprinkle(rng, rng.uniform(-1, 1, (10, 7)), 0.3)
        index = rng.integers(0, n, 10)
        valid = rng.random(sim.shape) < 0.9
        expect = _sgd_oracle(st["lambdas"], sim, index, valid, alpha, lr)
        mask, kept = numpy_api.threshold_step(sim, index, st, valid, alpha=alpha, lr=lr,
                                              optimizer="sgd")
        assert st["lambdas"].tobytes() == expect.tobytes()
        ok = np.isfinite(sim) & valid
        assert not mask[~ok].any(), "a non-finite or invalid entry was flagged"
        np.testing.assert_array_equal(mask, ok & (sim > st["lambdas"][index][:, None]))
        np.testing.assert_array_equal(kept, (ok & ~mask).sum(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lambda_stays_finite(backend, dtype):
    # Large steps on batches full of NaN and ±inf: λ, the moments and the counts stay finite and
    # λ inside the clamp.
    rng = np.random.default_rng(1)
    fnd = glofnd.GloFND(16, alpha=0.05, lr=10.0)
    for _ in range(30):
        sim = _sprinkle(rng, rng.uniform(-1, 1, (12, 9)), 0.6)
        fnd(torch.from_numpy(sim).to(dtype), torch.from_numpy(rng.integers(0, 16, 12)))
    for name in ("lambdas", "exp_avg", "exp_avg_sq"):
        assert torch.isfinite(getattr(fnd, name)).all(), name
    assert (fnd.lambdas.abs() <= 1).all()
    assert int(fnd.steps.sum()) > 0  # the finite entries did move λ


@pytest.mark.parametrize("kind", ["nan", "inf", "-inf", "mixed"])
def test_index_without_finite_entry_keeps_its_state(backend, kind):
    # Index 3 has two rows with nothing finite; index 1 has one such row and one finite row.
    rng = np.random.default_rng(2)
    fnd = glofnd.GloFND(5, alpha=0.1, lr=0.5)
    fnd(torch.rand(4, 6) * 2 - 1, torch.tensor([0, 1, 3, 4]))  # a non-initial state
    before = {k: getattr(fnd, k).clone() for k in ("lambdas", "exp_avg", "exp_avg_sq", "steps")}

    sim = rng.uniform(-1, 1, (5, 6))
    bad = {"nan": np.nan, "inf": np.inf, "-inf": -np.inf}
    for r in (1, 2, 4):
        sim[r] = bad[kind] if kind != "mixed" else rng.choice(NONFINITE, 6)
    index = torch.tensor([0, 3, 3, 1, 1])
    mask, kept = fnd.step(torch.from_numpy(sim), index)

    for name, old in before.items():
        new = getattr(fnd, name)
        assert new[3].numpy().tobytes() == old[3].numpy().tobytes(), name  # untouched
        assert new[2].numpy().tobytes() == old[2].numpy().tobytes(), name  # not in the batch
    assert int(fnd.steps[0]) == int(before["steps"][0]) + 1
    assert int(fnd.steps[1]) == int(before["steps"][1]) + 1  # fed by its finite row only
    assert not mask[[1, 2, 4]].any() and kept[[1, 2, 4]].tolist() == [0, 0, 0]
    # index 1's update equals the one from its finite row alone
    solo = glofnd.GloFND(5, alpha=0.1, lr=0.5)
    solo.load_state_dict({k: v.clone() for k, v in before.items()}
                         | {"_extra_state": {"epoch": 0}})
    solo.step(torch.from_numpy(sim[3:4]), torch.tensor([1]))
    assert fnd.lambdas[1].item() == solo.lambdas[1].item()


def test_nonfinite_kinds_are_equivalent(backend):
    # Replacing every non-finite entry by NaN (or by an invalid finite value) changes nothing.
    rng = np.random.default_rng(3)
    sim = _sprinkle(rng, rng.uniform(-1, 1, (9, 11)).astype(np.float32), 0.4)
    index = rng.integers(0, 4, 9)
    as_nan = np.where(np.isfinite(sim), sim, np.nan).astype(np.float32)
    as_invalid = np.where(np.isfinite(sim), sim, 0.99).astype(np.float32)
    results = []
    for s, valid in ((sim, None), (as_nan, None), (as_invalid, np.isfinite(sim))):
        st = numpy_api.init_state(4, init_lambda=0.3)
        out = numpy_api.threshold_step(s, index, st, valid, alpha=0.3, lr=0.2)
        results.append((out[0].tobytes(), out[1].tobytes(),
                        *(st[k].tobytes() for k in sorted(st))))
    assert results[0] == results[1] == results[2]
