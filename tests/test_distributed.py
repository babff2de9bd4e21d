"""Multi-process GloFND (glofnd.distributed) on gloo with 2 and 4 spawned processes.

Each world size is spawned once for all checks (tests/distributed_checks.py); every check
compares, bit for bit, against one process running the fused C step on the concatenation of all
ranks' rows. The tests below report the outcome of each check on each rank."""
import pytest
import torch.distributed as dist

import torch

import distributed_checks as dc
import glofnd
from glofnd import _ops
from glofnd import distributed as gd

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")

CHECKS = [
    "uses_c_kernel",
    "replicated",
    "sharded",
    "invalid_batch_raises_everywhere",
    "checkpoint_replicated",
    "checkpoint_sharded",
    "ddp_fault_reproduced",
    "ddp_fault_detected",
    "ddp_sharded_inside_detected",
    "ddp_safe_setup",
    "losses_replicated",
    "losses_sharded",
    "moving_average_exact",
    "losses_ddp_gradients",
    "overwrite_check_accepts_deliberate_changes",
]


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def outcomes(request, tmp_path_factory):
    world_size = request.param
    with pytest.MonkeyPatch.context() as mp:  # the spawned processes inherit the environment
        mp.setenv("GLOFND_EXPECT_C", "1" if _ops._C is not None else "0")
        return world_size, dc.spawn(world_size, CHECKS, str(tmp_path_factory.mktemp("dist")))


@pytest.mark.parametrize("check", CHECKS)
def test_check(outcomes, check):
    world_size, per_rank = outcomes
    for rank, results in enumerate(per_rank):
        assert check in results, f"rank {rank} did not run {check}"
        assert results[check] is None, f"rank {rank} of {world_size}:\n{results[check]}"


def test_init_from_env_without_torchrun_is_one_process(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert gd.init_from_env() == (0, 1, 0)
    assert not dist.is_initialized()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert gd.init_from_env() == (0, 1, 0)
    assert not dist.is_initialized()


def test_single_process_path_is_unchanged(backend):
    """Without a process group, distributed=True/'sharded' and gather_distributed=True run the
    ordinary path: the same bytes as the default module, and a full-size state."""
    gen = torch.Generator().manual_seed(0)
    mods = [glofnd.GloFND(11, alpha=0.3, distributed=d) for d in (False, True, "sharded")]
    for _ in range(3):
        sim = torch.rand(6, 5, generator=gen) * 2 - 1
        index = torch.randint(0, 11, (6,), generator=gen)
        masks = [m(sim, index) for m in mods]
        assert all(torch.equal(x, masks[0]) for x in masks)
    for m in mods[1:]:
        for k in ("lambdas", "exp_avg", "exp_avg_sq", "steps"):
            assert torch.equal(getattr(m, k), getattr(mods[0], k))
    z0, z1 = torch.randn(4, 3, generator=gen), torch.randn(4, 3, generator=gen)
    idx = torch.arange(4)
    plain = glofnd.GloFNDLoss(11, base="sogclr", alpha=0.3)
    gathered = glofnd.GloFNDLoss(11, base="sogclr", alpha=0.3, gather_distributed=True)
    assert torch.equal(plain(z0, z1, idx), gathered(z0, z1, idx))
    assert torch.equal(plain.u, gathered.u)


def test_bad_distributed_argument():
    with pytest.raises(ValueError, match="distributed"):
        glofnd.GloFND(4, distributed="everywhere")
    with pytest.raises(ValueError, match="distributed"):
        glofnd.GloFNDClipLoss(4, distributed="everywhere")


def test_shard_sizes_partition_the_data_set():
    for n in (1, 5, 23, 64):
        for w in (1, 2, 3, 4, 7):
            sizes = [gd.shard_size(n, r, w) for r in range(w)]
            assert sum(sizes) == n
            assert sizes == [len(range(r, n, w)) for r in range(w)]
