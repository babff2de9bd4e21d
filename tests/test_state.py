"""The GloFND module: checkpoints, devices, dtypes, custom-op registration, argument checks."""
import copy
import gc
import io
import weakref

import pytest
import torch

import glofnd
from glofnd import _ops, numpy_api

STATE = ("lambdas", "exp_avg", "exp_avg_sq", "steps")


def batches(n, steps, seed=0, cols=20):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randperm(n, generator=gen)[:6]
        yield torch.rand(12, cols, generator=gen) * 2 - 1, torch.cat([idx, idx])


def test_state_dict_roundtrip_continues_identically(backend):
    a = glofnd.GloFND(30, alpha=0.1, bias_correction="epoch")
    stream = list(batches(30, 20))
    for epoch, (sim, idx) in enumerate(stream[:10]):
        a.set_epoch(epoch // 3)
        a(sim, idx)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = glofnd.GloFND(30, alpha=0.1, bias_correction="epoch")
    b.load_state_dict(torch.load(buf))
    assert b.epoch == a.epoch
    for k in STATE:
        assert torch.equal(getattr(a, k), getattr(b, k)), k
    for sim, idx in stream[10:]:
        assert torch.equal(a(sim, idx), b(sim, idx))
    for k in STATE:
        assert torch.equal(getattr(a, k), getattr(b, k)), k


def test_load_with_other_num_samples_is_a_clear_error():
    a, b = glofnd.GloFND(30), glofnd.GloFND(31)
    for sim, idx in batches(30, 3):
        b(sim, idx)
    before = {k: getattr(b, k).clone() for k in STATE}
    with pytest.raises(ValueError, match="num_samples"):
        b.load_state_dict(a.state_dict())
    for k in STATE:
        assert torch.equal(before[k], getattr(b, k)), k


def test_state_stays_float32_and_moves_with_to():
    fnd = glofnd.GloFND(10)
    fnd.double()
    assert fnd.lambdas.dtype == torch.float32 and fnd.exp_avg_sq.dtype == torch.float32
    assert fnd.steps.dtype == torch.int32
    fnd.to("meta")
    assert fnd.lambdas.device.type == "meta"
    with pytest.raises(ValueError, match="state is on meta"):
        fnd(torch.rand(2, 3), torch.tensor([0, 1]))
    clone = copy.deepcopy(glofnd.GloFND(5))  # the lock is rebuilt, not copied
    assert clone(torch.rand(2, 3), torch.tensor([0, 1])).shape == (2, 3)


def test_state_is_in_state_dict_and_float32_for_any_input_dtype(backend):
    fnd = glofnd.GloFND(8)
    fnd(torch.rand(4, 5, dtype=torch.float64), torch.arange(4))
    fnd(torch.rand(4, 5).half(), torch.arange(4))
    sd = fnd.state_dict()
    assert set(STATE) <= set(sd)
    assert all(sd[k].dtype == torch.float32 for k in ("lambdas", "exp_avg", "exp_avg_sq"))


def test_custom_op_passes_opcheck(backend):
    gen = torch.Generator().manual_seed(3)
    n = 12
    args = (torch.rand(6, 7, generator=gen), torch.randint(0, n, (6,), generator=gen),
            torch.rand(6, 7, generator=gen) > 0.2, torch.ones(n), torch.zeros(n), torch.zeros(n),
            torch.zeros(n, dtype=torch.int32), 0.1, 0.05, 0.9, 0.98, 1e-8, -1.0, 1.0, 0, 0, True)
    torch.library.opcheck(_ops.threshold_step, args)


def test_compiles_with_fake_kernel(backend):
    """torch.compile traces the op through its fake kernel (no graph break) and gives the same
    masks and state as eager."""
    a, b = glofnd.GloFND(20, alpha=0.2), glofnd.GloFND(20, alpha=0.2)

    def f(module, sim, idx):
        return module(sim * 1.0, idx)

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    for sim, idx in batches(20, 4):
        assert torch.equal(compiled(a, sim, idx), f(b, sim, idx))
    for k in STATE:
        assert torch.equal(getattr(a, k), getattr(b, k)), k


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiles_with_the_state_read_in_the_graph(compiler):
    """A compiled function may step and read every state vector in one graph: the four are
    views of one buffer (int32 and float32), which aot_autograd accepts as views made in the
    graph (four buffers aliasing one storage with two dtypes, it refuses to mutate)."""
    a, b = glofnd.GloFND(20, alpha=0.2), glofnd.GloFND(20, alpha=0.2)

    def f(module, sim, idx):
        mask = module(sim, idx)
        return mask, module.lambdas * 2, module.steps + 1, module.exp_avg + module.exp_avg_sq

    torch._dynamo.reset()
    compiled = torch.compile(f, backend=compiler, fullgraph=True)
    for sim, idx in batches(20, 3):
        for got, want in zip(compiled(a, sim, idx), f(b, sim, idx)):
            assert torch.equal(got, want)
    for k in STATE:
        assert torch.equal(getattr(a, k), getattr(b, k)), k


def test_a_pickle_with_four_buffers_loads_into_one_block():
    """A module pickled with the four vectors as separate buffers (before the block) unpickles
    with them in one (N, 4) buffer, values kept."""
    fnd = glofnd.GloFND(12, alpha=0.2)
    for sim, idx in batches(12, 2):
        fnd(sim, idx)
    want = {k: getattr(fnd, k).clone() for k in STATE}
    old = fnd.__getstate__()
    old["_buffers"] = {k: v.clone() for k, v in want.items()}
    old["_non_persistent_buffers_set"] = set()
    back = glofnd.GloFND.__new__(glofnd.GloFND)
    back.__setstate__(old)
    assert _is_block(back) and set(back._buffers) == {"state"}
    for k in STATE:
        assert torch.equal(getattr(back, k), want[k]), k
    assert set(back.state_dict()) == set(STATE) | {"_extra_state"}


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(num_samples=0), ValueError, "num_samples"),
    (dict(num_samples=3.0), TypeError, "num_samples"),
    (dict(num_samples=5, alpha=1.0), ValueError, "alpha"),
    (dict(num_samples=5, alpha=float("nan")), ValueError, "alpha"),
    (dict(num_samples=5, lr=-1), ValueError, "lr"),
    (dict(num_samples=5, optimizer="adamw"), ValueError, "optimizer"),
    (dict(num_samples=5, bias_correction="global"), ValueError, "bias_correction"),
    (dict(num_samples=5, init_lambda=2.0), ValueError, "init_lambda"),
    (dict(num_samples=5, betas=(0.9, 1.0)), ValueError, "betas"),
])
def test_bad_constructor_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        glofnd.GloFND(**kwargs)


@pytest.mark.parametrize("sim,index,valid,exc,name", [
    (torch.rand(3), torch.arange(3), None, ValueError, "sim"),
    (torch.rand(0, 4), torch.arange(0), None, ValueError, "sim"),
    (torch.ones(3, 4, dtype=torch.int64), torch.arange(3), None, TypeError, "sim"),
    (torch.rand(3, 4), torch.arange(4), None, ValueError, "index"),
    (torch.rand(3, 4), torch.tensor([0.0, 1.0, 2.0]), None, TypeError, "index"),
    (torch.rand(3, 4), torch.tensor([0, 1, 9]), None, IndexError, "index"),
    (torch.rand(3, 4), torch.tensor([0, -1, 2]), None, IndexError, "index"),
    (torch.rand(3, 4), torch.arange(3), torch.ones(3, 5, dtype=torch.bool), ValueError, "valid"),
    (torch.rand(3, 4), torch.arange(3), torch.ones(3, 4), TypeError, "valid"),
])
def test_bad_batch_leaves_state(backend, sim, index, valid, exc, name):
    fnd = glofnd.GloFND(5)
    fnd(torch.rand(2, 4), torch.tensor([0, 1]))
    before = {k: getattr(fnd, k).clone() for k in STATE}
    with pytest.raises(exc, match=name):
        fnd(sim, index, valid)
    for k in STATE:
        assert torch.equal(before[k], getattr(fnd, k)), k


# ------------------------------------------------------------------------- the state's layout

def _is_block(m):
    """Whether m's four vectors are the columns of its (N, 4) float32 buffer, row i holding
    λ_i, m_i, v_i and the bits of t_i at 16 i bytes from the buffer's start."""
    block = m.state
    base, row = block.data_ptr(), block.stride(0) * 4
    return (block.dtype == torch.float32 and block.shape == (m.num_samples, 4)
            and all(getattr(m, k).data_ptr() == base + 4 * c
                    and getattr(m, k).stride() == (row // 4,) for c, k in enumerate(STATE))
            and torch.equal(block[:, 3].view(torch.int32), m.steps))


def test_cpu_state_is_one_block_and_stays_so():
    """λ, m, v and the counts are the columns of one (N, 4) block at construction, after dtype
    casts and device no-ops, and after loading a checkpoint; state_dict saves four separate
    contiguous tensors (the format of every version) and not the block."""
    fnd = glofnd.GloFND(50, alpha=0.2)
    assert _is_block(fnd) and fnd.state.is_contiguous()
    for sim, idx in batches(50, 3):
        fnd(sim, idx)
    before = {k: getattr(fnd, k).clone() for k in STATE}
    assert before["steps"].dtype == torch.int32 and before["steps"].max() > 0
    fnd.double().half().float().to("cpu")
    assert _is_block(fnd)
    for k in STATE:
        assert torch.equal(getattr(fnd, k), before[k]), k
    sd = fnd.state_dict()
    assert set(sd) == set(STATE) | {"_extra_state"}
    assert all(sd[k].is_contiguous() and sd[k].dtype == before[k].dtype for k in STATE)
    other = glofnd.GloFND(50, alpha=0.2)
    other.load_state_dict(sd)
    assert _is_block(other)
    for k in STATE:
        assert torch.equal(getattr(other, k), before[k]), k


@pytest.mark.parametrize("bad", ["missing", "short", "not-a-tensor"])
def test_a_bad_checkpoint_changes_nothing(bad):
    """A checkpoint with one state vector missing, of another length or not a tensor raises
    and leaves every vector as it was; so does a non-strict load with one missing (the four
    load together), which reports it."""
    fnd = glofnd.GloFND(12, alpha=0.2)
    for sim, idx in batches(12, 2):
        fnd(sim, idx)
    before = {k: getattr(fnd, k).clone() for k in STATE}
    sd = {k: (v + 1 if k != "steps" else v + 3) for k, v in before.items()}
    sd["_extra_state"] = {"epoch": 0}
    if bad == "missing":
        del sd["steps"]
    elif bad == "short":
        sd["exp_avg_sq"] = sd["exp_avg_sq"][:-1]
    else:
        sd["steps"] = sd["steps"].tolist()
    with pytest.raises(RuntimeError, match="steps" if bad != "short" else "exp_avg_sq"):
        fnd.load_state_dict(sd)
    for k in STATE:
        assert torch.equal(getattr(fnd, k), before[k]), k
    if bad == "missing":
        result = fnd.load_state_dict(sd, strict=False)
        assert result.missing_keys == ["steps"]
        for k in STATE:
            assert torch.equal(getattr(fnd, k), before[k]), k
        sd["steps"] = before["steps"] + 3  # complete: all four load
        fnd.load_state_dict(sd)
        for k in STATE:
            assert torch.equal(getattr(fnd, k), before[k] + (3 if k == "steps" else 1)), k


def test_assigning_a_vector_copies_into_the_block():
    """``fnd.<vector> = t`` writes t's values into the block (which stays the same object), so
    the next step reads them: compared with a twin loaded with the same values."""
    stream = list(batches(30, 3))
    fnd, twin = glofnd.GloFND(30, alpha=0.2), glofnd.GloFND(30, alpha=0.2)
    block = fnd.state
    values = {"lambdas": torch.linspace(-0.5, 0.5, 30), "exp_avg": torch.full((30,), 0.01),
              "exp_avg_sq": torch.full((30,), 1e-3), "steps": torch.arange(30, dtype=torch.int32)}
    for k, v in values.items():
        setattr(fnd, k, v)
    assert fnd.state is block and _is_block(fnd)
    for k, v in values.items():
        assert torch.equal(getattr(fnd, k), v), k
    twin.load_state_dict(dict(values, _extra_state={"epoch": 0}))
    _twin_steps(fnd, twin, stream)


@pytest.mark.parametrize("layout", ["padded", "offset", "separate"])
def test_any_layout_gives_the_same_bytes(backend, layout):
    """A block with a longer row stride (padded) or inside a larger storage (offset) steps like
    the default one; so do four separate arrays through the NumPy API (the C kernel and the
    reference take any positive stride per vector)."""
    a, b = glofnd.GloFND(30, alpha=0.2), glofnd.GloFND(30, alpha=0.2)
    if layout == "padded":
        b.state = torch.zeros(30, 8)[:, :4].copy_(b.state)
    elif layout == "offset":
        b.state = torch.zeros(31 * 4)[4:].view(30, 4).copy_(b.state)
    else:
        b = numpy_api.init_state(30, init_lambda=1.0)
    for sim, idx in batches(30, 4):
        if layout == "separate":
            got = torch.from_numpy(numpy_api.threshold_step(sim.numpy(), idx.numpy(), state=b,
                                                            alpha=0.2)[0])
        else:
            got = b(sim, idx)
        assert torch.equal(a(sim, idx), got)
    for k in STATE:
        want = torch.from_numpy(b[k]) if layout == "separate" else getattr(b, k)
        assert torch.equal(getattr(a, k), want), k


def _twin_steps(fnd, twin, stream):
    for sim, idx in stream:
        ma, _ = fnd.step(sim, idx)
        mb, _ = twin.step(sim, idx)
        assert torch.equal(ma, mb)
    for name in STATE:
        assert torch.equal(getattr(fnd, name), getattr(twin, name)), name


HYPER_CHANGES = [("alpha", 0.3), ("lr", 0.2), ("betas", (0.5, 0.6)), ("eps", 0.5),
                 ("clamp", (-0.2, 0.2)), ("optimizer", "sgd"), ("bias_correction", "epoch"),
                 ("epoch", 4)]


@pytest.mark.parametrize("name, value", HYPER_CHANGES)
def test_hyper_parameter_changes_take_effect(name, value):
    """The C path keeps the kernels' hyper-parameters between calls: a change of any of them
    (or of the epoch) applies from the next step on, as on the reference backend, which reads
    them at every call."""
    stream = list(batches(30, 6))
    kw = dict(alpha=0.1, bias_correction="epoch" if name == "epoch" else "sample")
    fnd, twin, stale = (glofnd.GloFND(30, **kw) for _ in range(3))
    for k, (sim, idx) in enumerate(stream):
        if k == 3:
            for m in (fnd, twin):
                if name == "epoch":
                    m.set_epoch(value)
                else:
                    setattr(m, name, value)
        ma, _ = fnd.step(sim, idx)
        with glofnd.use_backend("reference"):
            mb, _ = twin.step(sim, idx)
        assert torch.equal(ma, mb), k
        for key in STATE:
            assert torch.equal(getattr(fnd, key), getattr(twin, key)), (k, key)
    for sim, idx in stream:  # the same stream without the change ends elsewhere
        stale.step(sim, idx)
    assert not all(torch.equal(getattr(stale, key), getattr(fnd, key)) for key in STATE)


@pytest.mark.parametrize("name, value", HYPER_CHANGES)
def test_hyper_parameter_changes_reach_the_losses(name, value):
    """The same through a loss's fused forward (λ's update rides on the loss's pass): the state
    after a change matches the reference backend's, and differs from the state without it."""
    gen = torch.Generator().manual_seed(1)
    losses = [glofnd.GloFNDClipLoss(40, method="glofnd", alpha=0.05, init_lambda=0.2,
                                    bias_correction="epoch" if name == "epoch" else "sample")
              for _ in range(3)]
    for k in range(5):
        img = torch.nn.functional.normalize(torch.randn(8, 6, generator=gen), dim=1)
        txt = torch.nn.functional.normalize(img + 0.5 * torch.randn(8, 6, generator=gen), dim=1)
        idx = torch.randperm(40, generator=gen)[:8]
        if k == 2:
            for loss in losses[:2]:
                for m in (loss.fnd_image, loss.fnd_text):
                    if name == "epoch":
                        m.set_epoch(value)
                    else:
                        setattr(m, name, value)
        losses[0](img, txt, 10.0, idx)
        losses[2](img, txt, 10.0, idx)
        with glofnd.use_backend("reference"):
            losses[1](img, txt, 10.0, idx)
        for key in STATE:
            for a, b in ((losses[0].fnd_image, losses[1].fnd_image),
                         (losses[0].fnd_text, losses[1].fnd_text)):
                torch.testing.assert_close(getattr(a, key), getattr(b, key), rtol=0, atol=0,
                                           msg=f"{k} {key}")
    assert not all(torch.equal(getattr(losses[0].fnd_image, key),
                               getattr(losses[2].fnd_image, key)) for key in STATE)


@pytest.mark.skipif(_ops._C is None, reason="C extension not built")
def test_kept_views_are_reused_between_steps():
    """The NumPy views of the state are made once and kept while nothing else touches the
    buffers (the kernels' own writes are recorded), by the threshold step and by the losses'
    fused forward alike; an in-place write from outside makes them be checked and made
    again."""
    fnd = glofnd.GloFND(30)
    stream = list(batches(30, 4))
    fnd.step(*stream[0])
    views = fnd._arrays[1]
    fnd.step(*stream[1])
    assert fnd._arrays[1] is views
    fnd.lambdas.fill_(0.5)  # in place from outside: the version counter moves
    fnd.step(*stream[2])
    assert fnd._arrays[1] is not views
    loss = glofnd.GloFNDClipLoss(40, method="glofnd")
    img = torch.nn.functional.normalize(torch.randn(8, 6), dim=1)
    loss(img, img, 10.0, torch.arange(8))
    views = loss.fnd_image._arrays[1], loss.fnd_text._arrays[1]
    loss(img, img, 10.0, torch.arange(8, 16))
    assert (loss.fnd_image._arrays[1], loss.fnd_text._arrays[1]) == views


@pytest.mark.parametrize("change", ["data", "set_", "assign", "replace", "load", "deepcopy",
                                    "to", "as_strided_"])
def test_kept_views_follow_the_buffers(change):
    """GloFND keeps NumPy views of its buffers between calls of the C kernels; whatever replaces
    a buffer or its memory, the next step reads and writes the buffers the module holds now
    (compared with a twin that never kept views: the reference backend)."""
    stream = list(batches(30, 6))
    fnd = glofnd.GloFND(30, alpha=0.1)
    twin = glofnd.GloFND(30, alpha=0.1)
    with glofnd.use_backend("reference"):
        _twin_steps(fnd, twin, [])  # nothing yet
    fnd.step(*stream[0])
    with glofnd.use_backend("reference"):
        twin.step(*stream[0])
    old = fnd.state
    if change == "data":
        fnd.state.data = fnd.state.data.clone()  # same object, new memory
    elif change == "set_":
        fnd.state.set_(fnd.state.clone())
    elif change == "assign":
        fnd.steps = fnd.steps + 1  # copied into the block
        twin.steps = twin.steps + 1
    elif change == "replace":
        fnd.state = fnd.state.clone()  # a new buffer
    elif change == "load":
        fnd.load_state_dict(twin.state_dict())  # in place: same memory
    elif change == "deepcopy":
        original, fnd = fnd, copy.deepcopy(fnd)
        before = {k: getattr(original, k).clone() for k in STATE}
    elif change == "as_strided_":
        # the block moves into the start of a zeroed storage twice its size (set_: new memory,
        # the same layout) and steps once; then as_strided_ makes the same object, at the same
        # address and shape, read rows 8 floats apart: the twin takes over those values
        big = torch.zeros(30 * 8)
        big[:120] = fnd.state.flatten()
        fnd.state.set_(big.untyped_storage(), 0, (30, 4), (4, 1))
        fnd.step(*stream[1])
        with glofnd.use_backend("reference"):
            twin.step(*stream[1])
        stream = stream[1:]
        twin.state.copy_(fnd.state.as_strided_((30, 4), (8, 1)))
    else:
        fnd = fnd.to(torch.float64)
    for sim, idx in stream[1:]:
        fnd.step(sim, idx)
        with glofnd.use_backend("reference"):
            twin.step(sim, idx)
    for name in STATE:
        assert torch.equal(getattr(fnd, name), getattr(twin, name)), name
    if change in ("data", "set_", "assign", "as_strided_"):
        assert fnd.state is old and not torch.equal(fnd.lambdas, torch.ones(30))
    if change == "deepcopy":  # the original's memory was not written by the copy's steps
        for k in STATE:
            assert torch.equal(getattr(original, k), before[k]), k


@pytest.mark.parametrize("move", ["to", "assign"])
def test_moved_state_releases_the_old_buffers(move):
    """The views kept for the C kernels do not keep a replaced state alive: after .to() (here to
    the meta device, as to a GPU) or an assignment, the old CPU buffers are freed."""
    fnd = glofnd.GloFND(30)
    fnd.step(*next(batches(30, 1)))  # views of the CPU buffers are kept now
    old = weakref.ref(fnd.state)
    if move == "to":
        fnd.to("meta")
    else:
        fnd.state = fnd.state.clone()
        fnd.step(*next(batches(30, 1)))  # the next step builds views of the new buffer
    gc.collect()
    assert old() is None


def test_kept_views_refuse_a_resized_buffer():
    fnd = glofnd.GloFND(30)
    sim, idx = next(batches(30, 1))
    fnd.step(sim, idx)
    before = fnd.lambdas.clone()
    fnd.state.resize_(15, 4)
    with pytest.raises(ValueError, match="state buffer must have shape"):
        fnd.step(sim, idx)
    assert torch.equal(fnd.lambdas, before[:15])
