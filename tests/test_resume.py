"""Long runs: a training run interrupted at any step and resumed from its checkpoint reproduces
the uninterrupted run bit for bit on the CPU (model, optimizer, loss state and data order)."""
import io

import pytest
import torch

import glofnd

N, B, D_IN, D_OUT, STEPS = 48, 12, 10, 6, 8


def make(kind, base):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(D_IN, 16), torch.nn.ReLU(),
                                torch.nn.Linear(16, D_OUT))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    if kind == "unimodal":
        loss = glofnd.GloFNDLoss(N, temperature=0.2, alpha=0.1, base=base, init_lambda=0.5,
                                 start_update=1, start_mask=2)
    else:
        loss = glofnd.GloFNDClipLoss(N, alpha=0.1, base=base, init_lambda=0.5)
    return model, opt, loss


def train_step(kind, model, opt, loss, data, gen, step):
    loss.set_epoch(step // 3)
    idx = torch.randperm(N, generator=gen)[:B]
    x = data[idx]
    noise = 0.1 * torch.randn(x.shape, generator=gen)
    if kind == "unimodal":
        value = loss(model(x), model(x + noise), idx)
    else:
        value = loss(model(x), model(x.flip(1) + noise), 10.0, idx)
    opt.zero_grad()
    value.backward()
    opt.step()
    return value.detach()


def checkpoint(model, opt, loss, gen) -> bytes:
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "loss": loss.state_dict(), "rng": gen.get_state()}, buf)
    return buf.getvalue()


@pytest.mark.parametrize("kind,base", [("unimodal", "simclr"), ("unimodal", "sogclr"),
                                       ("clip", "clip"), ("clip", "sogclr")])
def test_interrupt_anywhere_and_resume_is_bitwise(backend, kind, base):
    data = torch.randn(N, D_IN, generator=torch.Generator().manual_seed(1))
    model, opt, loss = make(kind, base)
    gen = torch.Generator().manual_seed(2)
    saved, values = {}, []
    for step in range(STEPS):
        saved[step] = checkpoint(model, opt, loss, gen)
        values.append(train_step(kind, model, opt, loss, data, gen, step))
    final = checkpoint(model, opt, loss, gen)
    ref = torch.load(io.BytesIO(final))

    for stop in range(1, STEPS):
        model2, opt2, loss2 = make(kind, base)
        ck = torch.load(io.BytesIO(saved[stop]))
        model2.load_state_dict(ck["model"])
        opt2.load_state_dict(ck["opt"])
        loss2.load_state_dict(ck["loss"])
        gen2 = torch.Generator()
        gen2.set_state(ck["rng"])
        for step in range(stop, STEPS):
            assert torch.equal(train_step(kind, model2, opt2, loss2, data, gen2, step),
                               values[step]), (stop, step)
        got = torch.load(io.BytesIO(checkpoint(model2, opt2, loss2, gen2)))
        for part in ("model", "loss"):
            for k, v in ref[part].items():
                if isinstance(v, torch.Tensor):
                    assert torch.equal(v, got[part][k]), (stop, part, k)
        for k, st in ref["opt"]["state"].items():
            for name, v in st.items():
                assert torch.equal(v, got["opt"]["state"][k][name]), (stop, k, name)
    # the run did learn thresholds: resuming is not trivially equal
    fnds = [m for m in loss.modules() if isinstance(m, glofnd.GloFND)]
    assert any((f.lambdas < 0.5).any() for f in fnds)
