"""The training loop against the lecture's recipe: parity with a plain PyTorch loop, DDP equivalence, compile."""

import math
import os
import socket
from dataclasses import asdict

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

from gptrain.errors import GptrainError
from gptrain.model import GPT, GPTConfig
from gptrain.train import distributed
from gptrain.train.config import TRAIN_PRESETS, TrainConfig, resolve
from gptrain.train.trainer import Trainer, grad_accum_steps


class SeqLoader:
    """The lecture's DataLoaderLite over an in-memory token stream: rank r reads chunk r of every world-size group."""

    def __init__(self, tokens, B, T, rank=0, world_size=1):
        self.tokens, self.B, self.T, self.rank, self.world = tokens, B, T, rank, world_size
        self.pos, self.epoch = B * T * rank, 0

    def next_batch(self):
        B, T = self.B, self.T
        buf = self.tokens[self.pos:self.pos + B * T + 1]
        self.pos += B * T * self.world
        if self.pos + B * T * self.world + 1 > len(self.tokens):
            self.pos, self.epoch = B * T * self.rank, self.epoch + 1
        return buf[:-1].view(B, T), buf[1:].view(B, T)

    def state_dict(self):
        return {"pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, s):
        self.pos, self.epoch = s["pos"], s["epoch"]


class FixedVal:
    def __init__(self, tokens, B, T):
        self.x = tokens[:B * T].view(B, T)
        self.y = tokens[1:B * T + 1].view(B, T)

    def batches(self):
        yield self.x, self.y


def tokens(n=20000, vocab=50257, seed=0):
    g = torch.Generator().manual_seed(seed)
    # a little structure (repeated phrases) so the loss moves
    base = torch.randint(0, vocab, (200,), generator=g)
    idx = torch.randint(0, 200, (n,), generator=g)
    return base[idx]


def lecture_lr(it, max_lr, min_lr, warmup, max_steps):
    if it < warmup:
        return max_lr * (it + 1) / warmup
    if it > max_steps:
        return min_lr
    ratio = (it - warmup) / (max_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)


def small_cfg(**kw):
    base = dict(seq_len=16, micro_batch_size=2, total_batch_size=32, max_steps=20, lr=1e-3, warmup_steps=5,
                min_lr_ratio=0.1, eval_every=0, sample_every=0, save_every=0, device="cpu", compile=False,
                dtype="float32", hellaswag_data=None, log_every=0)  # float32: the exactness tests' dtype anywhere
    base.update(kw)
    return TrainConfig(**base)


def test_lr_schedule_values():
    kw = dict(max_lr=6e-4, min_lr=6e-5, warmup_steps=715, max_steps=19073)
    from gptrain.train.optim import lr_at
    for step in (0, 1, 714, 715, 716, 5000, 19072, 19073, 19074, 30000):
        assert lr_at(step, **kw) == lecture_lr(step, 6e-4, 6e-5, 715, 19073), step
    assert lr_at(0, **kw) == pytest.approx(6e-4 / 715)
    assert lr_at(715, **kw) == 6e-4 and lr_at(19073, **kw) == pytest.approx(6e-5)
    # wsd: same warm-up, flat at max until the last 20% of the updates, then linear down to exactly min at the last
    w = dict(kw, schedule="wsd", decay_frac=0.2)
    start = 19072 - round(0.2 * 19073)  # the last update at max_lr; 19072 is the run's last update
    assert lr_at(100, **w) == lr_at(100, **kw)
    assert lr_at(715, **w) == lr_at(start, **w) == 6e-4 > lr_at(start + 1, **w)
    assert lr_at(19072, **w) == lr_at(19073, **w) == 6e-5
    mid = (start + 19072) // 2
    assert lr_at(mid, **w) == pytest.approx(6e-4 + (mid - start) / (19072 - start) * (6e-5 - 6e-4))


def assert_same_updates(a, opt, b, ref, steps=3):
    """Models a and b (same start) trained by opt and ref on the same batches stay bit-identical."""
    x = torch.randint(0, 50257, (2, 16))
    for _ in range(steps):
        for m, o in ((a, opt), (b, ref)):
            o.zero_grad()
            m(x[:, :-1], x[:, 1:])[1].backward()
            o.step()
    for (ka, pa), (kb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(pa, pb), ka


def test_optimizer_groups_match_torch_adamw(tiny_config):
    from gptrain.train.optim import make_optimizer
    torch.manual_seed(0)
    a = GPT(tiny_config)
    b = GPT(tiny_config)
    b.load_state_dict(a.state_dict())
    opt = make_optimizer(a, lr=1e-3, weight_decay=0.1)
    groups = opt.param_groups
    assert all(p.dim() >= 2 for p in groups[0]["params"]) and groups[0]["weight_decay"] == 0.1
    assert all(p.dim() < 2 for p in groups[1]["params"]) and groups[1]["weight_decay"] == 0.0
    n = sum(p.numel() for g in groups for p in g["params"])
    assert n == a.num_params()  # tied wte/lm_head counted once, nothing missing
    # the lecture's construction, by name
    named = {k: p for k, p in b.named_parameters()}
    ref = torch.optim.AdamW([{"params": [p for p in named.values() if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in named.values() if p.dim() < 2], "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95), eps=1e-8, fused=True)
    assert opt.defaults["fused"]  # on CPU too: one pass per tensor
    assert_same_updates(a, opt, b, ref)


@pytest.mark.parametrize("max_norm", [1e-3, 1e3, float("inf")])
def test_clip_matches_torch_and_leaves_small_gradients_as_they_are(tiny_config, max_norm):
    """Above max_norm: torch's clip_grad_norm_ to the bit. At or below (and inf, measure only): the gradients are
    not touched at all on CPU (torch would multiply them by exactly 1.0)."""
    torch.manual_seed(0)
    a = GPT(tiny_config)
    b = GPT(tiny_config)
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, tiny_config.vocab_size, (2, 16))
    for m in (a, b):
        m(idx, idx)[1].backward()
    before = [p.grad.clone() for p in a.parameters()]
    writes = [p.grad._version for p in a.parameters()]
    norm = distributed.wrap(a, distributed.DistEnv(), compile=False).clip_grad_norm(max_norm)
    ref = torch.nn.utils.clip_grad_norm_(list(b.parameters()), max_norm)
    assert torch.equal(norm, ref)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa.grad, pb.grad)
    clipped = bool(ref > max_norm)
    assert clipped == (max_norm == 1e-3)
    assert all((p.grad._version != v) == clipped for p, v in zip(a.parameters(), writes))
    if not clipped:
        assert all(torch.equal(p.grad, g) for p, g in zip(a.parameters(), before))


def test_fused_cpu_adamw_is_the_default_algorithm_to_rounding(tiny_config):
    """The fused kernel gptrain uses on CPU updates as torch's default (for-loop) AdamW does, to float rounding."""
    from gptrain.train.optim import make_optimizer
    torch.manual_seed(0)
    a, b = GPT(tiny_config), GPT(tiny_config)
    b.load_state_dict(a.state_dict())
    opts = [make_optimizer(m, lr=1e-3, weight_decay=0.1, fused=f) for m, f in ((a, True), (b, False))]
    assert opts[0].defaults["fused"] and not opts[1].defaults["fused"]
    x = torch.randint(0, 50257, (2, 16))
    for _ in range(5):
        for m, o in zip((a, b), opts):
            o.zero_grad()
            m(x[:, :-1], x[:, 1:])[1].backward()
            o.step()
    for (ka, pa), (kb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-5, msg=ka)  # 1% of one step (lr 1e-3); ~3e-6 seen


def test_embedding_lr_scale_is_a_third_group_at_a_multiple_of_the_schedule(tiny_config):
    from gptrain.train.optim import make_optimizer
    torch.manual_seed(0)
    a, b = GPT(tiny_config), GPT(tiny_config)
    b.load_state_dict(a.state_dict())
    opt = make_optimizer(a, lr=1e-3, weight_decay=0.1, embedding_lr_scale=5.0)
    wte = a.transformer.wte.weight
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-3, 5e-3]
    assert opt.param_groups[2]["params"] == [wte] and opt.param_groups[2]["weight_decay"] == 0.1
    assert not any(p is wte for g in opt.param_groups[:2] for p in g["params"])
    named = dict(b.named_parameters())
    wte_b = b.transformer.wte.weight
    ref = torch.optim.AdamW([
        {"params": [p for p in named.values() if p.dim() >= 2 and p is not wte_b], "weight_decay": 0.1, "lr": 1e-3},
        {"params": [p for p in named.values() if p.dim() < 2], "weight_decay": 0.0, "lr": 1e-3},
        {"params": [wte_b], "weight_decay": 0.1, "lr": 5e-3}], lr=1e-3, betas=(0.9, 0.95), eps=1e-8, fused=True)
    assert_same_updates(a, opt, b, ref)


def test_bad_total_batch_size_is_one_clear_line():
    with pytest.raises(GptrainError, match=r"--total-batch-size 1000 is not a multiple of .* 2×16×2 = 64"):
        grad_accum_steps(small_cfg(total_batch_size=1000), world_size=2)
    assert grad_accum_steps(small_cfg(total_batch_size=128), world_size=2) == 2
    # the tiny preset's 1,024 tokens (8 x 128) on 2 processes: the micro-batch that keeps that total is named
    tiny = small_cfg(total_batch_size=1024, micro_batch_size=8, seq_len=128)
    with pytest.raises(GptrainError, match=r"or --micro-batch-size 4 \(keeps this total batch\)"):
        grad_accum_steps(tiny, world_size=2)


def test_presets_carry_the_lecture_values():
    c = resolve("gpt2-124m", {})
    assert (c.seq_len, c.total_batch_size, c.lr, c.min_lr_ratio, c.warmup_steps, c.max_steps) == \
        (1024, 524288, 6e-4, 0.1, 715, 19073)
    assert (c.beta1, c.beta2, c.eps, c.weight_decay, c.grad_clip) == (0.9, 0.95, 1e-8, 0.1, 1.0)
    assert resolve("gpt2-124m-40b", {}).max_steps == 4 * 19073
    assert resolve("gpt2-124m-3xlr", {}).lr == 1.8e-3
    g3 = resolve("gpt3-124m", {})
    assert (g3.model, g3.seq_len, g3.micro_batch_size, g3.total_batch_size) == ("gpt3-small", 2048, 32, 524288)
    assert resolve("tiny", {"lr": 1e-2}).lr == 1e-2
    assert set(TRAIN_PRESETS) >= {"gpt2-124m", "gpt2-124m-40b", "gpt3-124m", "gpt2-124m-3xlr", "gpt2-350m",
                                  "gpt2-774m", "gpt2-1558m", "tiny"}


def test_fast_recipes_change_only_the_optimizer_schedule_and_steps():
    """tiny-fast and gpt2-124m-fast are their recipes with Muon, linear decay to zero and half the steps; every
    other recipe keeps the lecture's AdamW and cosine."""
    changed = {"optimizer", "muon_lr", "muon_weight_decay", "muon_adjust_lr", "schedule", "min_lr_ratio",
               "max_steps"}
    for fast, base in (("tiny-fast", "tiny"), ("gpt2-124m-fast", "gpt2-124m")):
        f, b = asdict(resolve(fast, {})), asdict(resolve(base, {}))
        assert {k for k in f if f[k] != b[k]} <= changed and f["max_steps"] == b["max_steps"] // 2
        assert (f["optimizer"], f["schedule"], f["min_lr_ratio"]) == ("muon", "linear", 0.0)
    for name in set(TRAIN_PRESETS) - {"tiny-fast", "gpt2-124m-fast"}:
        c = resolve(name, {})
        assert (c.optimizer, c.schedule) == ("adamw", "cosine"), name


def _hf_dir(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    hf = transformers.GPT2LMHeadModel(hf_cfg)
    hf.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def _lecture_losses(hf_dir, data, B, T, accum, steps, max_lr, warmup):
    """The lecture's loop on transformers' GPT2LMHeadModel: its AdamW groups, clip 1.0, its LR formula."""
    import transformers
    model = transformers.GPT2LMHeadModel.from_pretrained(hf_dir, attn_implementation="sdpa")
    model.train()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW([{"params": [p for p in params.values() if p.dim() >= 2], "weight_decay": 0.1},
                             {"params": [p for p in params.values() if p.dim() < 2], "weight_decay": 0.0}],
                            lr=max_lr, betas=(0.9, 0.95), eps=1e-8)
    loader, losses = SeqLoader(data, B, T), []
    for step in range(steps):
        opt.zero_grad()
        loss_accum = 0.0
        for _ in range(accum):
            x, y = loader.next_batch()
            logits = model(x).logits
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), y.view(-1)) / accum
            loss_accum += loss.detach()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        lr = lecture_lr(step, max_lr, 0.1 * max_lr, warmup, steps)
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        losses.append(float(loss_accum))
    return losses


@pytest.fixture(scope="module")
def shakespeare_dir(tmp_path_factory):
    from gptrain.cli import main as cli
    d = tmp_path_factory.mktemp("shakespeare")
    assert cli(["prepare", "shakespeare", "--out", str(d)]) == 0
    return d


@pytest.mark.parametrize("accum", [1, 2])
def test_lecture_parity_from_hf_weights(tmp_path, shakespeare_dir, accum):
    """gptrain's own pieces (TrainLoader in sequential mode, --init-from, Trainer) against the lecture's loop
    reading the same shard the way its DataLoaderLite does."""
    from gptrain.data.loader import TrainLoader, load_manifest
    from gptrain.data.shards import open_shard
    from gptrain.hf import load_model
    hf_dir = _hf_dir(tmp_path)
    B, T = 4, 16
    first = next(sh for sh in load_manifest(shakespeare_dir)["shards"] if sh["split"] == "train")
    data = torch.from_numpy(open_shard(shakespeare_dir / first["path"]).astype("int64"))
    ref = _lecture_losses(hf_dir, data, B, T, accum, steps=20, max_lr=3e-3, warmup=5)
    cfg = small_cfg(micro_batch_size=B, seq_len=T, total_batch_size=B * T * accum, lr=3e-3, warmup_steps=5,
                    max_steps=20, init_from=str(hf_dir), shuffle=False)
    model = load_model(str(hf_dir))
    assert model.config.vocab_size == 50257
    loader = TrainLoader(shakespeare_dir, B, T, shuffle=False)
    out = Trainer(cfg, model, loader).run()
    assert len(out["train_losses"]) == 20
    assert ref[-1] < ref[0] - 0.5  # it learned something, so the comparison means something
    for step, (a, b) in enumerate(zip(out["train_losses"], ref)):
        assert abs(a - b) < 1e-5, (step, a, b)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, data, cfg, init_state, out_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    env = distributed.setup("cpu")
    try:
        model = GPT(GPTConfig(**init_state["config"]))
        model.load_state_dict(init_state["weights"])
        out = Trainer(cfg, model, SeqLoader(data, cfg.micro_batch_size, cfg.seq_len, rank, world),
                      FixedVal(data, 2, cfg.seq_len), env=env).run()
        if rank == 0:
            torch.save({"losses": out["train_losses"], "val": out["val_loss"],
                        "weights": model.state_dict()}, out_path)
    finally:
        distributed.teardown()


def test_ddp_two_processes_equal_one_process_with_accumulation(tmp_path, tiny_config):
    torch.manual_seed(0)
    model = GPT(tiny_config)
    init = {"config": tiny_config.to_dict(), "weights": {k: v.clone() for k, v in model.state_dict().items()}}
    data, B, T = tokens(), 2, 16
    cfg = small_cfg(micro_batch_size=B, seq_len=T, total_batch_size=2 * B * T, max_steps=8, eval_every=4)
    single = Trainer(cfg, model, SeqLoader(data, B, T), FixedVal(data, 2, T)).run()
    out = tmp_path / "ddp.pt"
    mp.start_processes(_ddp_worker, args=(2, _free_port(), data, cfg, init, str(out)), nprocs=2, join=True,
                       start_method="spawn")
    ddp = torch.load(out, weights_only=True)
    assert len(ddp["losses"]) == 8
    for a, b in zip(ddp["losses"], single["train_losses"]):
        assert abs(a - b) < 1e-5, (a, b)
    assert abs(ddp["val"] - single["val_loss"]) < 1e-5
    for k, v in model.state_dict().items():
        assert torch.allclose(ddp["weights"][k], v, atol=1e-5), k


def test_no_sync_only_on_last_micro_step(monkeypatch, tiny_config):
    """Gradient all-reduce happens once per optimizer step, not once per micro-batch."""
    calls = []

    class FakeDDP(torch.nn.parallel.DistributedDataParallel):
        def __init__(self, module):
            torch.nn.Module.__init__(self)
            self.module = module

        def forward(self, *a):
            return self.module(*a)

        def no_sync(self):
            import contextlib
            calls.append("no_sync")
            return contextlib.nullcontext()

    model = GPT(tiny_config)
    w = distributed.Wrapped(raw=model, fwd=model, train=FakeDDP(model))
    for i in range(4):
        with w.no_sync(last_micro_step=i == 3):
            pass
    assert calls == ["no_sync"] * 3


def test_short_windows_on_cpu_take_the_math_attention_kernel(tiny_config):
    """At T <= 128 on CPU the trainer's attention context runs the math kernel (faster there), with the flash
    kernel's losses and gradients; longer windows, other devices and compiled models keep the default."""
    from torch.profiler import ProfilerActivity, profile
    from gptrain.devices import attention_kernels
    torch.manual_seed(0)
    model = GPT(tiny_config)
    x = torch.randint(0, 50257, (2, 17))

    def run(ctx):
        model.zero_grad()
        with profile(activities=[ProfilerActivity.CPU]) as prof, ctx:
            loss = model(x[:, :-1], x[:, 1:])[1]
            loss.backward()
        ops = {e.key for e in prof.key_averages()}
        return loss.detach(), [p.grad.clone() for p in model.parameters()], any("flash" in o for o in ops)

    flash_loss, flash_grads, used_flash = run(attention_kernels("cpu", 256))
    math_loss, math_grads, math_used_flash = run(attention_kernels("cpu", 128))
    assert used_flash and not math_used_flash
    torch.testing.assert_close(math_loss, flash_loss, rtol=0, atol=1e-6)
    for a, b in zip(math_grads, flash_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert run(attention_kernels("cpu", 128, compiled=True))[2] and run(attention_kernels("cuda", 128))[2]
