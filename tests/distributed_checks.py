"""Checks of multi-process GloFND, run inside processes spawned by tests/test_distributed.py.

Every check runs on every rank of one gloo process group and compares against one process
(glofnd.GloFND on the C path, no process group involved) stepping on the concatenation of all
ranks' rows. A check returns normally or raises; the spawner collects the outcome of each check on
each rank into a JSON file per rank.
"""
from __future__ import annotations

import datetime
import inspect
import io
import json
import os
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import glofnd
from glofnd import distributed as gd

N = 23          # not a multiple of 2 or 4: shards of unequal size
COLS = 9
STATE = ("lambdas", "exp_avg", "exp_avg_sq", "steps")
CONFIGS = [dict(optimizer="adam", bias_correction="sample", alpha=0.2),
           dict(optimizer="adam", bias_correction="epoch", alpha=0.1),
           dict(optimizer="sgd", alpha=0.3, lr=0.1)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(world_size: int, checks: list[str], outdir: str) -> list[dict]:
    """Runs ``checks`` on ``world_size`` spawned processes; returns each rank's outcomes."""
    import torch.multiprocessing as mp
    mp.start_processes(_worker, args=(world_size, free_port(), checks, outdir),
                       nprocs=world_size, start_method="spawn")
    out = []
    for r in range(world_size):
        with open(os.path.join(outdir, f"rank{r}.json")) as f:
            out.append(json.load(f))
    return out


def _worker(rank: int, world_size: int, port: int, checks: list[str], outdir: str) -> None:
    torch.set_num_threads(1)
    timeout = datetime.timedelta(seconds=30)
    if world_size == 2:  # as torchrun would start it: through the environment
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
        assert gd.init_from_env("gloo", timeout) == (rank, world_size, rank)
    else:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=timeout)
    results = {}
    try:
        for name in checks:
            try:
                start = time.perf_counter()
                globals()["check_" + name](rank, world_size, outdir)
                results[name] = None
                if rank == 0 and os.environ.get("GLOFND_TIMING"):
                    print(f"{name}: {time.perf_counter() - start:.2f} s", flush=True)
            except Exception:  # reported to the test, which fails with this traceback
                results[name] = traceback.format_exc()
            try:  # a check that failed on some ranks only may leave the others waiting
                dist.barrier()
            except Exception:
                results[name] = results[name] or ("ranks desynchronised after this check:\n"
                                                  + traceback.format_exc())
                break
    finally:
        with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
            json.dump(results, f)
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------
# data: the same global batch on every rank, split by rows

def random_full_state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    lam = torch.rand(N, generator=g) * 1.6 - 0.8
    lam[::5] = 1.0
    return {"lambdas": lam, "exp_avg": (torch.rand(N, generator=g) - 0.5) * 0.2,
            "exp_avg_sq": torch.rand(N, generator=g) * 0.05,
            "steps": torch.randint(0, 6, (N,), generator=g, dtype=torch.int32)}


def global_batch(seed: int, world_size: int, lambdas: torch.Tensor, dtype=torch.float32):
    """Per-rank (sim, index, valid) lists. Rows per rank vary (1..7); indices repeat within and
    across ranks; entries equal to the row's current λ (ties), NaN, ±inf, and rows without a
    valid entry occur."""
    g = torch.Generator().manual_seed(seed)
    parts = []
    for _ in range(world_size):
        r = int(torch.randint(1, 8, (1,), generator=g))
        index = torch.randint(0, N, (r,), generator=g)
        sim = torch.rand(r, COLS, generator=g, dtype=torch.float64) * 2 - 1
        tie = torch.rand(r, COLS, generator=g) < 0.2
        sim = torch.where(tie, lambdas[index].double().unsqueeze(1), sim)
        sim[torch.rand(r, COLS, generator=g) < 0.05] = float("nan")
        sim[torch.rand(r, COLS, generator=g) < 0.03] = float("inf")
        sim[torch.rand(r, COLS, generator=g) < 0.03] = -float("inf")
        valid = torch.rand(r, COLS, generator=g) < 0.85
        if r > 2:
            valid[1] = False
        parts.append((sim.to(dtype), index, valid))
    return parts


def concat(parts):
    return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]),
            torch.cat([p[2] for p in parts]))


def rows_of(parts, rank: int) -> slice:
    start = sum(p[0].shape[0] for p in parts[:rank])
    return slice(start, start + parts[rank][0].shape[0])


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype == torch.float32:
        return torch.equal(a.view(torch.int32), b.view(torch.int32))
    return torch.equal(a, b)


def assert_state(fnd, single, rank: int, world_size: int, what: str) -> None:
    """fnd's state (its shard when sharded) holds the bytes of the single-process state."""
    for k in STATE:
        want = getattr(single, k)
        if fnd.distributed == "sharded":
            want = want[rank::world_size]
        got = getattr(fnd, k)
        assert same_bits(got, want), f"{what}: {k} differs on rank {rank}: {got} vs {want}"
    if fnd.distributed == "sharded":
        full = gd.gather_full_state(fnd)
        for k in STATE:
            assert same_bits(full[k], getattr(single, k)), f"{what}: gathered {k} differs"


def run_steps(fnd, single, rank, world_size, seed, steps, epochs=None, update=True,
              dtypes=(torch.float32, torch.float64, torch.float16)) -> None:
    for t in range(steps):
        if epochs is not None:
            fnd.set_epoch(epochs[t])
            single.set_epoch(epochs[t])
        parts = global_batch(seed * 100 + t, world_size, single_lambdas(single),
                             dtypes[t % len(dtypes)])
        sim, index, valid = concat(parts)
        want_mask, want_kept = single.step(sim, index, valid, update=update)
        mine = parts[rank]
        mask, kept = fnd.step(*mine, update=update)
        rows = rows_of(parts, rank)
        assert torch.equal(mask, want_mask[rows]), f"step {t}: mask differs on rank {rank}"
        assert torch.equal(kept, want_kept[rows]), f"step {t}: kept differs on rank {rank}"
        assert_state(fnd, single, rank, world_size, f"step {t}")


def single_lambdas(single) -> torch.Tensor:
    return single.lambdas


def pair(mode, seed=0, **cfg):
    """A multi-process GloFND and its single-process twin, both from the same random state."""
    fnd = glofnd.GloFND(N, distributed=mode, **cfg)
    single = glofnd.GloFND(N, check_overwrite=False, **cfg)
    full = random_full_state(seed)
    single.load_state_dict({**full, "_extra_state": {"epoch": 0}})
    fnd.load_state_dict({**full, "_extra_state": {"epoch": 0}})  # sharded: takes [rank::W]
    return fnd, single


# ----------------------------------------------------------------------------------------------
# checks

def _check_mode(mode, rank, world_size):
    for c, cfg in enumerate(CONFIGS):
        fnd, single = pair(mode, seed=c, **cfg)
        epochs = [0, 0, 1, 3] if cfg.get("bias_correction") == "epoch" else None
        run_steps(fnd, single, rank, world_size, seed=10 * c + 1, steps=4, epochs=epochs)
        run_steps(fnd, single, rank, world_size, seed=10 * c + 2, steps=1, update=False)
    # from the default initial state (λ = 1: nothing flagged at first)
    fnd = glofnd.GloFND(N, alpha=0.3, distributed=mode)
    single = glofnd.GloFND(N, alpha=0.3, check_overwrite=False)
    run_steps(fnd, single, rank, world_size, seed=99, steps=3)


def check_uses_c_kernel(rank, world_size, outdir):
    """The single-process twin runs the fused C kernel whenever the spawning test has it."""
    if os.environ.get("GLOFND_EXPECT_C") == "1":
        assert glofnd.implementation == "c" and glofnd._ops._C is not None


def check_replicated(rank, world_size, outdir):
    _check_mode("replicated", rank, world_size)


def check_sharded(rank, world_size, outdir):
    fnd = glofnd.GloFND(N, distributed="sharded")
    assert fnd.lambdas.shape == (gd.shard_size(N, rank, world_size),)
    assert sum(gd.shard_size(N, r, world_size) for r in range(world_size)) == N
    _check_mode("sharded", rank, world_size)


def check_invalid_batch_raises_everywhere(rank, world_size, outdir):
    """One rank passes an index out of range: it raises IndexError, every other rank a
    RuntimeError naming it, no state changes, and the next valid step runs normally."""
    for mode in ("replicated", "sharded"):
        fnd, single = pair(mode, seed=5)
        parts = global_batch(7, world_size, single.lambdas)
        before = {k: getattr(fnd, k).clone() for k in STATE}
        sim, index, valid = parts[rank]
        bad = world_size - 1
        if rank == bad:
            index = index.clone()
            index[0] = N
        try:
            fnd.step(sim, index, valid)
        except IndexError as err:
            assert rank == bad and "num_samples" in str(err), (mode, rank, err)
        except RuntimeError as err:
            assert rank != bad and f"rank {bad}" in str(err), (mode, rank, err)
        else:
            raise AssertionError(f"{mode}: rank {rank} did not raise")
        for k in STATE:
            assert same_bits(getattr(fnd, k), before[k]), f"{mode}: {k} changed"
        run_steps(fnd, single, rank, world_size, seed=8, steps=2)


def check_checkpoint_replicated(rank, world_size, outdir):
    """Saved on rank 0, loaded on every rank: training continues as one process would."""
    fnd, single = pair("replicated", seed=3, bias_correction="epoch")
    run_steps(fnd, single, rank, world_size, seed=31, steps=2, epochs=[0, 1])
    path = os.path.join(outdir, "replicated.pt")
    if rank == 0:
        torch.save(fnd.state_dict(), path)
    dist.barrier()
    fresh = glofnd.GloFND(N, bias_correction="epoch", distributed=True)
    fresh.load_state_dict(torch.load(path))
    assert fresh.epoch == 1
    plain = glofnd.GloFND(N, bias_correction="epoch")  # a replicated checkpoint is a plain one
    plain.load_state_dict(torch.load(path))
    assert_state(plain, single, rank, world_size, "plain load")
    run_steps(fresh, single, rank, world_size, seed=32, steps=2, epochs=[1, 2])


def check_checkpoint_sharded(rank, world_size, outdir):
    """Each rank saves its shard and loads it back; other world sizes, other num_samples,
    another rank's shard and a non-sharded module are refused with a ValueError, unchanged."""
    fnd, single = pair("sharded", seed=4)
    run_steps(fnd, single, rank, world_size, seed=41, steps=2)
    buf = io.BytesIO()
    torch.save(fnd.state_dict(), buf)
    blob = buf.getvalue()
    fresh = glofnd.GloFND(N, distributed="sharded")
    fresh.load_state_dict(torch.load(io.BytesIO(blob)))
    run_steps(fresh, single, rank, world_size, seed=42, steps=2)

    shard = torch.load(io.BytesIO(blob))
    # another rank's shard
    objs = [None] * world_size
    dist.all_gather_object(objs, blob)
    other = torch.load(io.BytesIO(objs[(rank + 1) % world_size]))
    _refused(glofnd.GloFND(N, distributed="sharded"), other, "rank")
    # other num_samples, a non-sharded module
    _refused(glofnd.GloFND(N + 1, distributed="sharded"), shard, "num_samples")
    _refused(glofnd.GloFND(N), shard, "shard")
    _refused(glofnd.GloFND(N, distributed=True), shard, "shard")
    # another world size: a subgroup of two ranks shards by 2
    sub = dist.new_group([0, 1])
    if rank in (0, 1) and world_size != 2:
        _refused(glofnd.GloFND(N, distributed="sharded", process_group=sub), shard,
                 "world size")
    if rank in (0, 1) and world_size == 2:  # the same world size through a group: accepted
        glofnd.GloFND(N, distributed="sharded", process_group=sub).load_state_dict(shard)
    # the gathered full state loads anywhere, also into a plain module
    full = gd.gather_full_state(fresh)
    plain = glofnd.GloFND(N)
    plain.load_state_dict({**full, "_extra_state": {"epoch": 0}})
    assert_state(plain, single, rank, world_size, "full state")


def _refused(module, state_dict, words):
    before = {k: getattr(module, k).clone() for k in STATE}
    try:
        module.load_state_dict(state_dict)
    except ValueError as err:
        assert words in str(err), err
    else:
        raise AssertionError("load_state_dict accepted a mismatched shard")
    for k in STATE:
        assert same_bits(getattr(module, k), before[k])


# ----------------------------------------------------------------------------------------------
# DistributedDataParallel

DIM = 6


class Net(nn.Module):
    """An encoder whose forward also steps a GloFND: the unsafe set-up when wrapped in DDP."""

    def __init__(self, fnd=None):
        super().__init__()
        torch.manual_seed(0)
        self.enc = nn.Linear(DIM, DIM)
        self.fnd = fnd

    def forward(self, x, index):
        z = F.normalize(self.enc(x), dim=1)
        sim = z @ z.T
        valid = ~torch.eye(len(x), dtype=torch.bool)
        mask = self.fnd(sim.detach(), index, valid) if self.fnd is not None else None
        return z, sim, valid, mask


def local_data(rank, world_size, t, n=N):
    g = torch.Generator().manual_seed(1000 + t)
    idx = torch.randperm(n, generator=g)[:4 * world_size].view(world_size, 4)
    x = torch.randn(n, DIM, generator=g)
    return x[idx[rank]], idx[rank]


def train(net, fnd_outside, rank, world_size, steps, single, n=N):
    """A few SGD steps; returns per step whether this rank raised, stopping all ranks together
    when one did. ``single`` steps on the gathered rows of all ranks."""
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    for t in range(steps):
        x, index = local_data(rank, world_size, t, n)
        error = None
        try:
            z, sim, valid, mask = net(x, index)
            if fnd_outside is not None:
                mask = fnd_outside(sim.detach(), index, valid)
        except RuntimeError as err:
            error = err
        flag = torch.tensor([error is not None], dtype=torch.int64)
        dist.all_reduce(flag)
        if int(flag):
            return t, error
        pieces = [None] * world_size
        dist.all_gather_object(pieces, (sim.detach(), index, valid))
        if single is not None:
            single(*concat(pieces))
        logits = torch.where(valid & ~mask, sim / 0.5, torch.tensor(-1e4))
        loss = torch.logsumexp(logits, dim=1).mean() - (z * z.roll(1, 0)).sum(1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps, None


def ddp(module, sync_buffers=None):
    """DDP with its default buffer synchronisation (None: before every forward) or with it off;
    the keyword is ``forward_sync_buffers`` in recent torch, ``broadcast_buffers`` before."""
    if sync_buffers is None:
        return nn.parallel.DistributedDataParallel(module)
    params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    key = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
    return nn.parallel.DistributedDataParallel(module, **{key: sync_buffers})


def check_ddp_fault_reproduced(rank, world_size, outdir):
    """A plain GloFND inside a DDP model with DDP's default buffer broadcast (the
    overwrite check off) loses updates: before every forward DDP copies rank 0's state into
    every rank."""
    fnd = glofnd.GloFND(N, alpha=0.3, check_overwrite=False)
    net = ddp(Net(fnd))
    single = glofnd.GloFND(N, alpha=0.3, check_overwrite=False)
    done, err = train(net, None, rank, world_size, 4, single)
    assert done == 4 and err is None, err
    lost = int((single.steps - fnd.steps).sum())
    assert lost > 0, "no update was lost"
    # rank 0's copy arrived before the last forward: away from the last batches, rank r holds
    # exactly rank 0's state
    states = [None] * world_size
    dist.all_gather_object(states, {k: getattr(fnd, k) for k in STATE})
    last = torch.zeros(N, dtype=torch.bool)
    for r in range(world_size):
        last[local_data(r, world_size, 3)[1]] = True
    for k in STATE:
        assert same_bits(states[rank][k][~last], states[0][k][~last]), k
    del net


def check_ddp_fault_detected(rank, world_size, outdir):
    """The same set-up with the check on: every rank other than 0 raises a RuntimeError that
    names the cause in its second forward."""
    fnd = glofnd.GloFND(N, alpha=0.3)
    net = ddp(Net(fnd))
    done, err = train(net, None, rank, world_size, 3, None)
    assert done == 1, f"stopped at step {done}"
    if rank == 0:
        assert err is None, err
    else:
        assert err is not None and "broadcast_buffers" in str(err), err
    del net


def check_ddp_sharded_inside_detected(rank, world_size, outdir):
    """A sharded state inside DDP (equal shard sizes, so DDP accepts it) is overwritten by rank
    0's shard: every rank raises, the ranks whose shard changed with the cause."""
    n = 4 * world_size * 2
    fnd = glofnd.GloFND(n, alpha=0.3, distributed="sharded")
    net = ddp(Net(fnd))
    done, err = train(net, None, rank, world_size, 3, None, n)
    assert done == 1 and isinstance(err, RuntimeError), (done, err)
    if rank != 0:
        assert "broadcast_buffers" in str(err), err
    del net


def check_ddp_safe_setup(rank, world_size, outdir):
    """The documented set-ups lose no update: GloFND(distributed=True) outside the DDP model, or
    inside it with broadcast_buffers=False; both equal one process over the global batch. (Inside
    with broadcast_buffers=True the replicated state survives too, the broadcast copying the same
    values, and the overwrite check stays silent.)"""
    for place in ("outside", "inside_no_broadcast", "inside_broadcast"):
        fnd = glofnd.GloFND(N, alpha=0.3, distributed=True)
        single = glofnd.GloFND(N, alpha=0.3, check_overwrite=False)
        if place == "outside":
            net, outside = ddp(Net()), fnd
        else:
            net = ddp(Net(fnd), None if place == "inside_broadcast" else False)
            outside = None
        done, err = train(net, outside, rank, world_size, 4, single)
        assert done == 4 and err is None, (place, err)
        assert_state(fnd, single, rank, world_size, place)
        del net


# ----------------------------------------------------------------------------------------------
# The losses with gather_distributed=True

LOSSES = [("simclr", glofnd.GloFNDLoss), ("sogclr", glofnd.GloFNDLoss),
          ("clip", glofnd.GloFNDClipLoss), ("sogclr", glofnd.GloFNDClipLoss)]
PER_RANK = 3
FEAT = 8


def loss_pair(cls, base, layout, seed, **kw):
    """A multi-process loss and its single-process twin from the same random λ and u."""
    cfg = dict(base=base, alpha=0.2, **kw)
    if cls is glofnd.GloFNDLoss:
        cfg["temperature"] = 0.5
    single = cls(N, **cfg)
    g = torch.Generator().manual_seed(seed)
    for name, buf in single.named_buffers():
        if name.endswith("lambdas"):
            buf.copy_(torch.rand(buf.numel(), generator=g) * 1.2 - 0.6)
        elif name.startswith("u"):  # some zeros: the first estimate is taken as is
            buf.copy_(torch.rand(N, generator=g) * 3 * (torch.rand(N, generator=g) > 0.3))
    multi = cls(N, gather_distributed=True, distributed=layout, **cfg)
    multi.load_state_dict(single.state_dict())  # sharded: each rank takes its slices
    return multi, single


def loss_batch(seed, world_size, dtype):
    g = torch.Generator().manual_seed(seed)
    b = PER_RANK * world_size
    index = torch.randint(0, N, (b,), generator=g)  # repeats within and across ranks
    labels = torch.randint(0, 3, (b,), generator=g)
    x0 = torch.randn(b, FEAT, generator=g, dtype=torch.float64).to(dtype)
    x1 = (x0 + 0.7 * torch.randn(b, FEAT, generator=g, dtype=torch.float64)).to(dtype)
    return x0, x1, index, labels


def loss_call(loss, cls, a, b, scale, index, labels):
    if cls is glofnd.GloFNDLoss:
        return loss(a, b, index, labels)
    return loss(a, b, scale, index, labels)


def assert_loss_state(multi, single, rank, world_size, what):
    """λ and its moments: the same bytes as one process. u: within float32 rounding, because the
    similarities themselves are not bitwise reproducible across matrix shapes (a process computes
    its rows against all columns, one process all rows at once, and BLAS may block these
    products differently); the pooling of u is checked bit for bit in moving_average_exact. On a
    replicated state every process holds the same bytes."""
    for (name, got), (_, want) in zip(multi.named_buffers(), single.named_buffers()):
        if multi.distributed == "sharded" and got.shape != want.shape:  # method="single" keeps
            want = want[rank::world_size]                               # its one λ replicated
        if name.startswith("u"):
            err = float((got.double() - want.double()).abs().max())
            assert err <= 4e-7 * (1 + float(want.abs().max())), f"{what}: {name} off by {err}"
        else:
            assert same_bits(got, want), f"{what}: {name} differs on rank {rank}"
        if multi.distributed == "replicated":
            copies = [torch.empty_like(got) for _ in range(world_size)]
            dist.all_gather(copies, got)
            assert all(same_bits(c, got) for c in copies), f"{what}: {name} differs between ranks"


def close(a, b, what, tol=None):
    if tol is None:
        tol = 1e-5 if a.dtype == torch.float32 else 1e-11
    err = float((a - b).abs().max())
    scale = float(b.abs().max()) + 1e-30
    assert err <= tol * scale, f"{what}: max error {err:.3g} against max {scale:.3g}"


def _check_losses(layout, rank, world_size):
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    cases = LOSSES + [("simclr", glofnd.GloFNDLoss, m) for m in ("single", "fnc", "oracle")]
    for case, (base, cls, *method) in enumerate(cases):
        kw = {"method": method[0]} if method else {}
        multi, single = loss_pair(cls, base, layout, seed=case, **kw)
        for t, dtype in enumerate((torch.float32, torch.float64, torch.float32)):
            x0, x1, index, labels = loss_batch(100 * case + t, world_size, dtype)
            a, b = x0.clone().requires_grad_(), x1.clone().requires_grad_()
            scale_s = torch.tensor(3.0, dtype=dtype, requires_grad=True)
            want = loss_call(single, cls, a, b, scale_s, index, labels)
            want.backward()
            a_k = x0[mine].clone().requires_grad_()
            b_k = x1[mine].clone().requires_grad_()
            scale_k = torch.tensor(3.0, dtype=dtype, requires_grad=True)
            got = loss_call(multi, cls, a_k, b_k, scale_k, index[mine], labels[mine])
            got.backward()
            what = f"{cls.__name__}({base}, {kw}) {layout} step {t}"
            # u is float32 state: float64 steps of sogclr carry its rounding (relative 1e-7)
            tol = 2e-6 if base == "sogclr" and t > 0 else None
            # the value: the mean over local rows; their mean over processes is the global mean
            mean = got.detach().clone()
            dist.all_reduce(mean)
            close(mean / world_size, want.detach(), what + " loss", tol)
            # the gradient: DDP's average over processes equals one process's gradient
            close(a_k.grad / world_size, a.grad[mine], what + " grad first", tol)
            close(b_k.grad / world_size, b.grad[mine], what + " grad second", tol)
            if base == "clip":
                g = scale_k.grad.clone()
                dist.all_reduce(g)
                close(g / world_size, scale_s.grad, what + " grad logit_scale")
            assert_loss_state(multi, single, rank, world_size, what)
        # the state's checkpoint continues identically (a shard per process when sharded)
        fresh = cls(N, gather_distributed=True, distributed=layout, base=base, alpha=0.2,
                    **({"temperature": 0.5} if cls is glofnd.GloFNDLoss else {}), **kw)
        fresh.load_state_dict(multi.state_dict())
        x0, x1, index, labels = loss_batch(100 * case + 9, world_size, torch.float32)
        loss_call(single, cls, x0, x1, torch.tensor(3.0), index, labels)
        loss_call(fresh, cls, x0[mine], x1[mine], torch.tensor(3.0), index[mine], labels[mine])
        assert_loss_state(fresh, single, rank, world_size, f"{cls.__name__}({base}) resumed")


def check_losses_replicated(rank, world_size, outdir):
    _check_losses("replicated", rank, world_size)


def check_losses_sharded(rank, world_size, outdir):
    _check_losses("sharded", rank, world_size)


def check_moving_average_exact(rank, world_size, outdir):
    """The multi-process u update pools all processes' rows into the bytes one process gets on
    the concatenated rows (ordered view by view), given the same per-row estimates: indices repeat
    many times within and across processes, some rows have no kept negative (log ĝ = −inf)."""
    for layout in ("replicated", "sharded"):
        for blocks in (1, 2):
            single = glofnd.GloFNDLoss(N, base="sogclr", gamma=0.3)
            multi = glofnd.GloFNDLoss(N, base="sogclr", gamma=0.3, distributed=layout)
            g = torch.Generator().manual_seed(blocks)
            single.u.copy_(torch.rand(N, generator=g) * 3 * (torch.rand(N, generator=g) > 0.3))
            multi.load_state_dict(single.state_dict())
            for t in range(4):
                rows = 8
                index = torch.randint(0, 5, (world_size, rows), generator=g)
                log_g = torch.randn(world_size, blocks, rows, generator=g) * 3
                log_g[torch.rand(log_g.shape, generator=g) < 0.2] = -float("inf")
                ids = index.unsqueeze(1).expand(-1, blocks, -1)
                # one process: all first views, then all second views
                want = single._move_rows_state(single.u, ids.transpose(0, 1).reshape(-1),
                                               log_g.transpose(0, 1).reshape(-1))
                got = multi._move_rows_state(multi.u, ids[rank].reshape(-1),
                                             log_g[rank].reshape(-1), blocks=blocks)
                want = want.view(blocks, world_size, rows)[:, rank].reshape(-1)
                assert same_bits(got, want), f"{layout} blocks={blocks} step {t}: log u_r"
                wu = single.u[rank::world_size] if layout == "sharded" else single.u
                assert same_bits(multi.u, wu), f"{layout} blocks={blocks} step {t}: u"


class Towers(nn.Module):
    """Two linear encoders and, where the loss trains it, a logit scale (an image-text model in
    miniature). DDP needs every parameter to receive a gradient, so an unused scale is a
    constant instead."""

    def __init__(self, learn_scale: bool):
        super().__init__()
        torch.manual_seed(1)
        self.a = nn.Linear(FEAT, FEAT)
        self.b = nn.Linear(FEAT, FEAT)
        self.scale = nn.Parameter(torch.tensor(2.0)) if learn_scale else torch.tensor(2.0)

    def forward(self, x0, x1):
        return self.a(x0), self.b(x1), self.scale


def check_losses_ddp_gradients(rank, world_size, outdir):
    """The convention end to end: the model in DDP, the loss outside with
    gather_distributed=True; after backward, DDP's averaged parameter gradients equal the
    gradients of one process computing the loss of the whole global batch."""
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    for case, (base, cls) in enumerate(LOSSES):
        multi, single = loss_pair(cls, base, "replicated", seed=20 + case)
        model = ddp(Towers(learn_scale=base == "clip"))
        twin = Towers(learn_scale=base == "clip")
        for t in range(2):
            x0, x1, index, labels = loss_batch(300 * case + t, world_size, torch.float32)
            model.zero_grad()
            twin.zero_grad()
            loss_call(multi, cls, *model(x0[mine], x1[mine]), index[mine], None).backward()
            loss_call(single, cls, *twin(x0, x1), index, None).backward()
            for (name, p), q in zip(model.module.named_parameters(), twin.parameters()):
                close(p.grad, q.grad, f"{cls.__name__}({base}) step {t} {name}", 2e-5)
        del model


def check_overwrite_check_accepts_deliberate_changes(rank, world_size, outdir):
    """The overwrite check reports a foreign write between steps, but not a checkpoint load nor
    a change acknowledged with mark_state_changed(); for every layout."""
    for layout in (False, "replicated", "sharded"):
        fnd = glofnd.GloFND(N, alpha=0.3, distributed=layout)
        parts = global_batch(5, world_size, torch.ones(N))
        fnd.step(*parts[rank])
        fnd.load_state_dict(glofnd.GloFND(N, distributed=layout).state_dict())
        fnd.step(*parts[rank])                      # a load is a deliberate change
        fnd.lambdas.fill_(0.25)
        fnd.mark_state_changed()
        fnd.step(*parts[rank])                      # acknowledged
        touched = rank == 0 or layout == "replicated" or layout is False
        if touched:  # a write nobody acknowledged (sharded: only on rank 0)
            fnd.steps.add_(1)
        try:
            fnd.step(*parts[rank])
        except RuntimeError as err:  # the cause where it happened, its rank elsewhere
            want = "broadcast_buffers" if touched else "rank 0 reported"
            assert want in str(err), (layout, rank, err)
        else:
            raise AssertionError(f"{layout}: the foreign write went unnoticed on rank {rank}")
