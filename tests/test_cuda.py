"""GloFND on a CUDA device: the pure-torch reference path there against the CPU path.

Skipped without a CUDA device. The CPU side runs the default backend (the C kernels when they
are built), so these tests check that a model trained on a GPU learns the same λ, loss and
gradients as one trained on the CPU. Tolerances: λ's state rtol 1e-6 (float32 Adam steps whose
operations round alike on both devices, up to fused multiply-adds), loss values rtol 1e-5 and
gradients rtol 1e-4 / atol 1e-6 (float32 exponentials and sums in a different order). Masks are
compared exactly on similarities drawn from a grid of multiples of 1/64, which λ (a float32
Adam iterate) never lands on.
"""
import copy

import pytest
import torch

import glofnd
from glofnd.losses import METHODS

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

N = 40
CUDA = "cuda"


def grid_batch(seed, rows=24, cols=20):
    g = torch.Generator().manual_seed(seed)
    sim = torch.randint(-64, 65, (rows, cols), generator=g).float() / 64
    index = torch.randint(0, N, (rows,), generator=g)  # repeats are pooled into one update
    valid = torch.rand(rows, cols, generator=g) > 0.1
    return sim, index, valid


def features(seed, b=16, d=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z0 = torch.randn(b, d, generator=g)
    z1 = z0 + 0.5 * torch.randn(b, d, generator=g)
    index = torch.randperm(N, generator=g)[:b]
    labels = torch.randint(0, 3, (b,), generator=g)
    return z0.to(dtype), z1.to(dtype), index, labels


def assert_state_close(cpu: torch.nn.Module, gpu: torch.nn.Module) -> None:
    a, b = cpu.state_dict(), gpu.state_dict()
    assert a.keys() == b.keys()
    for k, v in a.items():
        if not isinstance(v, torch.Tensor):
            assert v == b[k], k
        elif v.dtype.is_floating_point:
            assert b[k].device.type == CUDA and b[k].dtype == v.dtype, k
            torch.testing.assert_close(b[k].cpu(), v, rtol=1e-6, atol=1e-7, msg=k)
        else:
            assert torch.equal(b[k].cpu(), v), k


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_step_equals_cpu(optimizer):
    cpu = glofnd.GloFND(N, alpha=0.2, init_lambda=0.3, optimizer=optimizer)
    gpu = copy.deepcopy(cpu).to(CUDA)
    assert gpu.lambdas.device.type == CUDA
    moved = 0
    for s in range(6):
        sim, index, valid = grid_batch(s)
        mask_c, kept_c = cpu.step(sim, index, valid)
        mask_g, kept_g = gpu.step(sim.to(CUDA), index.to(CUDA), valid.to(CUDA))
        assert mask_g.device.type == CUDA
        assert torch.equal(mask_g.cpu(), mask_c) and torch.equal(kept_g.cpu(), kept_c)
        moved += int(mask_c.sum())
    assert moved > 0  # the comparison covered flagged entries
    assert_state_close(cpu, gpu)
    assert (cpu.steps > 0).any() and (cpu.lambdas != 0.3).any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_step_keeps_float32_state(dtype):
    gpu = glofnd.GloFND(N, alpha=0.2, init_lambda=0.3).to(CUDA)
    cpu = glofnd.GloFND(N, alpha=0.2, init_lambda=0.3)
    sim, index, valid = grid_batch(0)  # grid values are exact in every dtype here
    gpu.step(sim.to(CUDA, dtype), index.to(CUDA), valid.to(CUDA))
    cpu.step(sim, index, valid)
    assert gpu.lambdas.dtype == torch.float32
    assert_state_close(cpu, gpu)


CASES = [(glofnd.GloFNDLoss, "simclr"), (glofnd.GloFNDLoss, "sogclr"),
         (glofnd.GloFNDClipLoss, "clip"), (glofnd.GloFNDClipLoss, "sogclr")]


def make(cls, base, method, **kw):
    kw = dict(alpha=0.2, init_lambda=0.3, **kw)
    if cls is glofnd.GloFNDLoss:
        kw["temperature"] = 0.5
    return cls(N, base=base, method=method, **kw)


def call(loss, z0, z1, index, labels):
    if isinstance(loss, glofnd.GloFNDClipLoss):
        return loss(z0, z1, 4.0, index, labels)
    return loss(z0, z1, index, labels)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("cls,base", CASES)
def test_loss_equals_cpu(cls, base, method):
    cpu = make(cls, base, method)
    gpu = copy.deepcopy(cpu).to(CUDA)
    for s in range(4):
        z0, z1, index, labels = features(s)
        leaves = [z0.requires_grad_(), z1.requires_grad_()]
        value_c = call(cpu, *leaves, index, labels)
        value_c.backward()
        gleaves = [z.detach().to(CUDA).requires_grad_() for z in (z0, z1)]
        value_g = call(gpu, *gleaves, index.to(CUDA), labels.to(CUDA))
        value_g.backward()
        assert value_g.device.type == CUDA
        torch.testing.assert_close(value_g.cpu(), value_c.detach(), rtol=1e-5, atol=1e-6)
        for a, b in zip(leaves, gleaves):
            assert a.grad.abs().sum() > 0
            torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=1e-4, atol=1e-6)
        stats_c, stats_g = cpu.last_stats, gpu.last_stats
        assert stats_c.keys() == stats_g.keys()
        for k in stats_c:
            assert stats_g[k] == pytest.approx(stats_c[k], rel=1e-6, abs=1e-9, nan_ok=True), k
    assert_state_close(cpu, gpu)


@pytest.mark.parametrize("cls,base", [CASES[0], CASES[2]])
def test_state_on_cpu_equals_cpu(cls, base):
    """state_on_cpu: λ stays in host memory while the features live on the GPU; only the
    batch's entries cross devices, and the results equal an all-CPU loss."""
    cpu = make(cls, base, "glofnd")
    gpu = make(cls, base, "glofnd", state_on_cpu=True).to(CUDA)
    fnds = [m for m in gpu.modules() if isinstance(m, glofnd.GloFND)]
    for s in range(3):
        z0, z1, index, labels = features(s)
        value_c = call(cpu, z0, z1, index, labels)
        value_g = call(gpu, z0.to(CUDA), z1.to(CUDA), index.to(CUDA), labels.to(CUDA))
        torch.testing.assert_close(value_g.cpu(), value_c, rtol=1e-5, atol=1e-6)
    assert fnds and all(m.lambdas.device.type == "cpu" for m in fnds)
    for a, b in zip([m for m in cpu.modules() if isinstance(m, glofnd.GloFND)], fnds):
        torch.testing.assert_close(b.lambdas, a.lambdas, rtol=1e-6, atol=1e-7)
        assert torch.equal(b.steps, a.steps)


def test_bad_input_names_the_argument_and_keeps_the_state():
    loss = make(glofnd.GloFNDLoss, "sogclr", "glofnd").to(CUDA)
    z0, z1, index, _ = features(0)
    z0, z1 = z0.to(CUDA), z1.to(CUDA)
    call(loss, z0, z1, index.to(CUDA), None)
    before = copy.deepcopy(loss.state_dict())
    bad = index.clone()
    bad[3] = N
    with pytest.raises(IndexError, match="index"):
        call(loss, z0, z1, bad.to(CUDA), None)
    with pytest.raises(ValueError, match="index is on cpu"):
        call(loss, z0, z1, index, None)
    with pytest.raises(ValueError, match="z1"):
        call(loss, z0, z1.cpu(), index.to(CUDA), None)
    for k, v in loss.state_dict().items():
        assert torch.equal(v, before[k]) if isinstance(v, torch.Tensor) else v == before[k], k
    fnd = glofnd.GloFND(N)  # on the CPU: GPU similarities are never moved to it silently
    sim, index, valid = grid_batch(0)
    with pytest.raises(ValueError, match="state is on cpu"):
        fnd.step(sim.to(CUDA), index.to(CUDA), valid.to(CUDA))


def test_autocast_computes_in_float32():
    plain = make(glofnd.GloFNDLoss, "simclr", "glofnd").to(CUDA)
    mixed = copy.deepcopy(plain)
    z0, z1, index, _ = features(1)
    z0, z1, index = z0.to(CUDA), z1.to(CUDA), index.to(CUDA)
    with torch.autocast(CUDA, dtype=torch.bfloat16):
        value_m = call(mixed, z0, z1, index, None)
    value_p = call(plain, z0, z1, index, None)
    assert value_m.dtype == torch.float32
    torch.testing.assert_close(value_m, value_p, rtol=1e-6, atol=1e-6)
    assert torch.equal(mixed.fnd.lambdas, plain.fnd.lambdas)


def test_checkpoint_moves_between_devices():
    """A state trained on the GPU resumes on the CPU (and back) with the same results."""
    gpu = make(glofnd.GloFNDClipLoss, "sogclr", "glofnd").to(CUDA)
    for s in range(2):
        z0, z1, index, _ = features(s)
        call(gpu, z0.to(CUDA), z1.to(CUDA), index.to(CUDA), None)
    cpu = make(glofnd.GloFNDClipLoss, "sogclr", "glofnd")
    cpu.load_state_dict({k: v.cpu() if isinstance(v, torch.Tensor) else v
                         for k, v in gpu.state_dict().items()})
    z0, z1, index, _ = features(5)
    value_g = call(gpu, z0.to(CUDA), z1.to(CUDA), index.to(CUDA), None)
    value_c = call(cpu, z0, z1, index, None)
    torch.testing.assert_close(value_g.cpu(), value_c, rtol=1e-5, atol=1e-6)
    assert_state_close(cpu, gpu)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # raised inside torch's own imports
@pytest.mark.filterwarnings("ignore:TensorFloat32 tensor cores")  # Inductor's advice on TF32
def test_compile_equals_eager():
    """torch.compile with the default backend (Inductor, Triton kernels on the GPU)."""
    eager = make(glofnd.GloFNDLoss, "sogclr", "glofnd").to(CUDA)
    state = copy.deepcopy(eager)
    state.check_index = False  # no host read of the index: no graph break
    compiled = torch.compile(state)
    for s in range(3):
        z0, z1, index, _ = features(s)
        z0, z1, index = z0.to(CUDA), z1.to(CUDA), index.to(CUDA)
        torch.testing.assert_close(compiled(z0, z1, index), eager(z0, z1, index),
                                   rtol=1e-5, atol=1e-6)
    assert_state_close(eager.cpu(), state)
