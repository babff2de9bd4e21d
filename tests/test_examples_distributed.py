"""The examples' ``--distributed`` mode end to end: 2 processes on the CPU (gloo on loopback),
started by torchrun's module (``python -m torch.distributed.run``), tiny settings.

Checked against independent computations:
- every process ends with the same loss state, bit for bit (λ, its moments, the step counters,
  SogCLR's u), and the same model parameters (DDP), from the per-rank ``--save-state`` files;
- the step counters equal the number of epochs in which each sample fell into a complete global
  batch, recomputed here from the documented split (epoch e shuffles with a generator seeded
  seed·2^32 + e, the last incomplete global batch is dropped): the processes' slices are
  disjoint and cover every global batch;
- the pooled subgradient of each sample's second update, recovered from Adam's first moment,
  is α − A/V with A an integer and V the valid entries of one process's rows against the
  *global* batch (2·(2·64 − 2) for SimCLR's two views, 64 − 1 per CLIP direction): the
  negatives were gathered from both processes;
- a sharded state (``--shard-state``) reassembled from its two shards equals the replicated
  run's state bit for bit, and both runs write the same tables (same training, same bytes).
"""
import csv
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
PNGS = ["accuracy.png", "false_negatives.png", "lambda_vs_quantile.png"]

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available")]

WORLD = 2
N_TRAIN = 160          # --subset 200: the digits split 80/20
BATCH = 64             # global batch: 32 per process, 2 steps per epoch, 32 samples dropped
EPOCHS = 2
SEED = 1
ALPHA, LR_LAMBDA, BETA1 = 0.05, 0.5, 0.9   # lr 0.5: λ = 0.5 after the first update, so that
# the second update counts many similarities above λ (the count check below is informative)
ARGS = ["--epochs", str(EPOCHS), "--subset", "200", "--batch-size", str(BATCH),
        "--start-epoch", "0", "--alpha", str(ALPHA), "--lr-lambda", str(LR_LAMBDA),
        "--methods", "glofnd", "--seeds", str(SEED), "--no-progress",
        "--device", "cpu"]  # gloo on the CPU also where a GPU is visible
STATE = ("lambdas", "exp_avg", "exp_avg_sq", "steps")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(script: str, out: Path, *extra: str) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           str(EXAMPLES / script), "--distributed", *ARGS, "--out", str(out),
           "--save-state", str(out / "state"), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def _saved(out: Path) -> list:
    return [torch.load(out / "state" / f"glofnd_seed{SEED}_rank{r}.pt", weights_only=False)
            for r in range(WORLD)]


def _states(out: Path) -> list:
    return [saved["loss"] for saved in _saved(out)]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def _assert_same_bits(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(_bits(a[k]), _bits(b[k])), k
        else:
            assert a[k] == b[k], k


def _generator(epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(SEED * 2**32 + epoch)


def _expected_steps() -> torch.Tensor:
    """Updates per sample: one per epoch in which it lies in a complete global batch."""
    steps = torch.zeros(N_TRAIN, dtype=torch.int32)
    for epoch in range(EPOCHS):
        perm = torch.randperm(N_TRAIN, generator=_generator(epoch))
        steps[perm[:N_TRAIN // BATCH * BATCH]] += 1
    return steps


def _second_update_counts(state: dict, prefix: str, nvalid: int) -> torch.Tensor:
    """A_i = (α − g_i)·V for the samples updated twice, g_i the pooled subgradient of the second
    update recovered from Adam's first moment: m_1 = fl((1−β1)·α) (the first update sees
    λ = 1, no cosine above it), m_2 = fl(β1·m_1 + (1−β1)·g). Checks A_i is an integer in
    [0, V] (float32 rounding of m_2 moves it by < 1e-4 here) and returns them."""
    twice = state[prefix + "steps"] == 2
    m1 = torch.tensor((1 - BETA1) * ALPHA, dtype=torch.float64).float().double()
    m2 = state[prefix + "exp_avg"][twice].double()
    g = (m2 - BETA1 * m1) / (1 - BETA1)
    counts = (ALPHA - g) * nvalid
    assert torch.allclose(counts, counts.round(), atol=1e-3), counts
    assert bool((counts.round() >= 0).all() and (counts.round() <= nvalid).all())
    return counts.round()


def _check_outputs(out: Path, stdout: str, accuracy_columns: list) -> None:
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["glofnd"]
    for col in accuracy_columns:
        assert 0.0 <= float(rows[0][col + "_mean"]) <= 100.0
    assert math.isfinite(float(rows[0]["lambda_err_mean"]))
    table = (out / "results.md").read_text()
    assert f"{WORLD} processes × {BATCH // WORLD}" in table and "| glofnd |" in table
    # rank 0 alone prints: the per-run line and the table once each
    assert stdout.count(f"glofnd seed {SEED}:") == 1 and stdout.count("| glofnd |") == 1
    for png in PNGS:
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    with open(out / "history.csv") as f:
        hist = list(csv.DictReader(f))
    assert [h["epoch"] for h in hist] == [str(e + 1) for e in range(EPOCHS)]
    assert all(math.isfinite(float(h["loss"])) for h in hist)


@pytest.fixture(scope="module")
def simclr_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("simclr")
    return out, _torchrun("simclr.py", out)


def test_simclr_distributed(simclr_run):
    out, stdout = simclr_run
    _check_outputs(out, stdout, ["knn_top1", "linear_top1"])
    r0, r1 = _states(out)
    _assert_same_bits(r0, r1)  # one replicated state
    p0, p1 = (saved["parameters"] for saved in _saved(out))
    _assert_same_bits(p0, p1)  # DDP: the same averaged gradients, the same weights
    assert torch.equal(r0["fnd.steps"], _expected_steps())
    counts = _second_update_counts(r0, "fnd.", 2 * (2 * BATCH - 2))  # 2 rows (views) per sample
    assert int((counts > 0).sum()) >= 10


def test_simclr_sharded_equals_replicated(simclr_run, tmp_path):
    replicated, _ = simclr_run
    _torchrun("simclr.py", tmp_path, "--shard-state")
    full = _states(replicated)[0]
    shards = _states(tmp_path)
    for r, shard in enumerate(shards):
        assert shard["_extra_state"]["shard"] == {"rank": r, "world_size": WORLD,
                                                  "num_samples": N_TRAIN}
    for name in STATE:
        key = "fnd." + name
        joined = torch.empty_like(full[key])
        for r, shard in enumerate(shards):
            joined[r::WORLD] = shard[key]  # sample i on rank i % W, slot i // W
        assert torch.equal(_bits(joined), _bits(full[key])), name
    for name in ("results.csv", "history.csv"):  # the same training, the same evaluation
        assert (tmp_path / name).read_bytes() == (replicated / name).read_bytes(), name


def test_clip_distributed(tmp_path):
    # λ = 0 after the first update: cross-modal cosines of 2 epochs' training are low
    stdout = _torchrun("clip.py", tmp_path, "--base", "sogclr", "--lr-lambda", "1.0")
    _check_outputs(tmp_path, stdout, ["zero_shot_top1", "i2t_r1", "t2i_r1"])
    r0, r1 = _states(tmp_path)
    assert {"u_image", "u_text"} <= r0.keys()
    _assert_same_bits(r0, r1)  # λ of both directions and u, replicated
    p0, p1 = (saved["parameters"] for saved in _saved(tmp_path))
    assert "logit_scale" in p0
    _assert_same_bits(p0, p1)  # both encoders and the scale in DDP
    expected = _expected_steps()
    for prefix in ("fnd_image.", "fnd_text."):
        assert torch.equal(r0[prefix + "steps"], expected)
        counts = _second_update_counts(r0, prefix, BATCH - 1)  # one row against all captions
        assert int((counts > 0).sum()) >= 10
    # u_i: moved only by its own rows (never-visited samples keep 0); the mask applied at a
    # step uses the updated λ, so a row may keep no negative and leave u_i as it was
    for u in (r0["u_image"], r0["u_text"]):
        assert bool(torch.isfinite(u).all() and (u >= 0).all())
        assert bool((u[expected == 0] == 0).all()) and int((u[expected > 0] > 0).sum()) >= 100
