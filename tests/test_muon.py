"""`--optimizer muon`: the update against its documented formula and against torch.optim.Muon, the AdamW part
against torch.optim.AdamW, the state through state_dict, and the learning-rate schedules' last step."""

import copy
import math

import pytest
import torch

from gptrain.model import GPT
from gptrain.train.optim import MuonAdamW, hidden_matrices, lr_at, make_optimizer

needs_torch_muon = pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon needs torch 2.9+")
A, B, C = 3.4445, -4.7750, 2.0315  # torch.optim.Muon's (Keller Jordan's) quintic Newton-Schulz coefficients


def documented_step(w, grads, lr, wd, mu, adjust):
    """torch.optim.Muon's documented algorithm in float64: B_t = mu B + g, Nesterov g + mu B_t, five quintic
    Newton-Schulz steps on it normalised (transposed when tall), decoupled decay, lr scaled by the shape."""
    w, buf = w.double().clone(), torch.zeros_like(w, dtype=torch.float64)
    rows, cols = w.shape
    scale = math.sqrt(max(1, rows / cols)) if adjust == "original" else 0.2 * math.sqrt(max(rows, cols))
    for g in grads:
        g = g.double()
        buf = mu * buf + g
        x = g + mu * buf
        x = x.T if rows > cols else x
        x = x / x.norm()
        for _ in range(5):
            gram = x @ x.T
            x = A * x + (B * gram + C * gram @ gram) @ x
        o = x.T if rows > cols else x
        w = w - lr * wd * w
        w = w - lr * scale * o
    return w


@needs_torch_muon
@pytest.mark.parametrize("shape,adjust", [((48, 16), "original"), ((16, 64), "match_rms_adamw")])
def test_one_matrix_follows_the_documented_update_and_torch_muon(shape, adjust):
    torch.manual_seed(0)
    w0 = torch.randn(shape)
    grads = [torch.randn(shape) for _ in range(3)]
    want = documented_step(w0, grads, 0.02, 0.1, 0.95, adjust)
    moved = (want - w0.double()).abs().max()
    ref = torch.nn.Parameter(w0.clone())
    torch_muon = torch.optim.Muon([ref], lr=0.02, weight_decay=0.1, momentum=0.95, adjust_lr_fn=adjust)
    for ns_dtype, tol in (("bfloat16", 0.02), ("float32", 1e-4)):
        mine = torch.nn.Parameter(w0.clone())
        opt = MuonAdamW([], [{"params": [mine], "lr": 0.02, "lr_scale": 1.0, "weight_decay": 0.1,
                              "momentum": 0.95, "adjust_lr_fn": adjust}], ns_dtype=ns_dtype)
        for i, g in enumerate(grads):
            mine.grad = g.clone()
            opt.step()
            if ns_dtype == "bfloat16":  # torch's own Muon (bf16 Newton-Schulz), to the bit
                ref.grad = g.clone()
                torch_muon.step()
                assert torch.equal(mine, ref), i
        # the documented formula in float64: within 2% of the update's size in bf16; in float32 within 1e-4 of it
        # (the weights' own float32 rounding, ~1e-7 on values near 1, is ~3e-6 of it)
        assert (mine.double() - want).abs().max() < tol * moved, ns_dtype
    assert moved > 0.02  # three steps of ~lr each moved it


@needs_torch_muon
def test_muon_takes_the_block_matrices_and_adamw_the_rest_as_torch_would(tiny_config):
    torch.manual_seed(0)
    a, b = GPT(tiny_config), GPT(tiny_config)
    b.load_state_dict(a.state_dict())
    opt = make_optimizer(a, lr=1e-3, weight_decay=0.1, embedding_lr_scale=5.0, optimizer="muon", muon_lr=0.02,
                         muon_weight_decay=0.01)
    names = {id(p): n for n, p in a.named_parameters()}
    muon = [names[id(p)] for g in opt.param_groups if g.get("muon") for p in g["params"]]
    assert muon == [f"transformer.h.{i}.{m}.weight" for i in range(2)
                    for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == a.num_params()
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3, 5e-3, 0.02]  # lr = schedule x lr_scale
    assert opt.param_groups[3]["lr_scale"] * 1e-3 == pytest.approx(0.02)

    bh = hidden_matrices(b)
    ids = {id(p) for p in bh}
    rest = [p for p in b.parameters() if id(p) not in ids]
    wte = b.transformer.wte.weight
    adamw = torch.optim.AdamW([
        {"params": [p for p in rest if p.dim() >= 2 and p is not wte], "weight_decay": 0.1, "lr": 1e-3},
        {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "lr": 1e-3},
        {"params": [wte], "weight_decay": 0.1, "lr": 5e-3}], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, fused=True)
    muon = torch.optim.Muon(bh, lr=0.02, weight_decay=0.01, momentum=0.95)  # bf16 Newton-Schulz, our default
    x = torch.randint(0, tiny_config.vocab_size, (2, 17))
    for _ in range(3):
        for m, opts in ((a, [opt]), (b, [adamw, muon])):
            for o in opts:
                o.zero_grad()
            m(x[:, :-1], x[:, 1:])[1].backward()
            for o in opts:
                o.step()
        for (k, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(pa, pb), k


def test_state_dict_round_trip_continues_exactly(tiny_config):
    torch.manual_seed(0)
    models = [GPT(tiny_config) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [make_optimizer(m, lr=1e-3, weight_decay=0.1, optimizer="muon") for m in models]
    x = torch.randint(0, tiny_config.vocab_size, (2, 17))

    def step(m, o):
        o.zero_grad()
        m(x[:, :-1], x[:, 1:])[1].backward()
        o.step()

    for _ in range(2):
        for m, o in zip(models, opts):
            step(m, o)
    saved = copy.deepcopy(opts[0].state_dict())  # as from a file: no tensor shared with the live state
    assert {k for s in saved["state"].values() for k in s} == {"step", "exp_avg", "exp_avg_sq", "momentum_buffer"}
    fresh = make_optimizer(models[1], lr=1e-3, weight_decay=0.1, optimizer="muon")
    fresh.load_state_dict(saved)
    for m, o in ((models[0], opts[0]), (models[1], fresh)):
        step(m, o)
    for (k, pa), pb in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(pa, pb), k


@pytest.mark.parametrize("schedule", ["cosine", "linear", "wsd"])
@pytest.mark.parametrize("steps,warmup", [(100, 10), (1000, 40), (7, 0)])
def test_schedules_rise_then_fall_to_the_minimum(schedule, steps, warmup):
    kw = dict(max_lr=1.0, min_lr=0.0, warmup_steps=warmup, max_steps=steps, schedule=schedule, decay_frac=0.2)
    lrs = [lr_at(s, **kw) for s in range(steps + 2)]
    if warmup:
        assert lrs[warmup - 1] == 1.0 and lrs[0] == 1.0 / warmup
    after = lrs[warmup:steps]
    assert all(x >= y for x, y in zip(after, after[1:]))  # never rises after the warm-up
    assert lrs[steps] == lrs[steps + 1] == 0.0
    if schedule != "cosine":  # cosine is the lecture's formula: zero one past the last update (test_train)
        assert lrs[steps - 1] == 0.0 and lrs[steps - 2] > 0.0
    if schedule == "wsd":
        assert lrs[steps - round(0.2 * steps) - 1] == 1.0 > lrs[steps - round(0.2 * steps)]
