"""Multi-process GloFND (glofnd.distributed) on gloo with 2 and 4 spawned processes.

Each world size is spawned once for all checks (tests/distributed_checks.py); every check
compares, bit for bit, against one process running the fused C step on the concatenation of all
ranks' rows. The tests below report the outcome of each check on each rank."""
import pytest
import torch.distributed as dist

import distributed_checks as dc
from glofnd import _ops

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
