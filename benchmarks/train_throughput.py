"""Training-step throughput: gptrain's step against a plain PyTorch baseline of the same model, same run.

Baseline: transformers' GPT2LMHeadModel (SDPA attention, eager) with the same shape and weights init, the lecture's
loss (`F.cross_entropy` over the full float logits) and the lecture's AdamW (fused on CUDA only). gptrain: its GPT
with the chunked loss, compiled or not, autocast, attention kernel and AdamW as the trainer would on this device. The two steps alternate
(A, B, A, B, ...) so both see the same machine load; the median of the timed steps after warm-up is reported,
as wall-clock tokens/s and (CPU) tokens per CPU-second of this process, which contention disturbs less.

    python benchmarks/train_throughput.py --preset tiny                      # the demo shape on this CPU
    python benchmarks/train_throughput.py --preset gpt2-124m --micro-batch-size 16 --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptrain.allocator import keep_freed_memory  # noqa: E402
from gptrain.devices import attention_kernels  # noqa: E402
from gptrain.model import GPT, preset as model_preset  # noqa: E402
from gptrain.train.config import TRAIN_PRESETS, resolve  # noqa: E402
from gptrain.train.metrics import peak_flops  # noqa: E402
from gptrain.train.optim import make_optimizer  # noqa: E402


def hf_model(cfg):
    import transformers
    hf_cfg = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd,
                                     n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0, attn_implementation="sdpa")
    model = transformers.GPT2LMHeadModel(hf_cfg)
    assert model.config._attn_implementation == "sdpa"
    return model


def profile(name: str, step, steps: int, dev: str) -> None:
    """torch.profiler over `steps` steps: the ops with the most self time, per step."""
    from torch.profiler import ProfilerActivity
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.startswith("cuda") else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(steps):
            step()
    key = "self_cuda_time_total" if dev.startswith("cuda") else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key), reverse=True)
    total = sum(getattr(e, key) for e in events)
    print(f"\n## profile: {name}, {steps} steps, {total / 1e3 / steps:.1f} ms of self time per step")
    print("| op | calls/step | self ms/step | share |")
    print("|---|---|---|---|")
    for e in events[:15]:
        t = getattr(e, key)
        print(f"| {e.key} | {e.count / steps:g} | {t / 1e3 / steps:.1f} | {100 * t / total:.0f}% |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=list(TRAIN_PRESETS))
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="compile gptrain's model (default: as the trainer, on for CUDA)")
    p.add_argument("--steps", type=int, default=7, help="timed steps per model (after --warmup)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                   help="glibc mallopt as the gptrain command sets it (gptrain/allocator.py), for both models")
    p.add_argument("--profile", type=int, default=0, metavar="STEPS",
                   help="after timing, profile STEPS more steps of each model (torch.profiler) and print the top ops")
    a = p.parse_args(argv)
    if a.keep_freed_memory:
        keep_freed_memory()
    if a.threads:
        torch.set_num_threads(a.threads)
    tc = resolve(a.preset, {k: v for k, v in (("micro_batch_size", a.micro_batch_size), ("seq_len", a.seq_len))
                            if v is not None})
    B, T, dev = tc.micro_batch_size, tc.seq_len, a.device
    compile = a.compile if a.compile is not None else dev.startswith("cuda")
    dtype = a.dtype if a.dtype != "auto" else ("bfloat16" if dev.startswith("cuda") else "float32")
    amp = (lambda: torch.autocast(dev.split(":")[0], dtype=torch.bfloat16)) if dtype == "bfloat16" \
        else contextlib.nullcontext
    if dev.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    mcfg = model_preset(tc.model)
    torch.manual_seed(0)
    ours = GPT(mcfg).to(dev)
    ours_fwd = torch.compile(ours) if compile else ours
    base = hf_model(mcfg).to(dev)
    base.train()

    def opt(m, baseline: bool):  # the baseline's AdamW as the lecture builds it: fused on CUDA only
        kind = dev.split(":")[0]
        return make_optimizer(m, lr=1e-4, weight_decay=0.1, device_type=kind,
                              fused=kind == "cuda" if baseline else None)

    def ours_loss(x, y):
        with attention_kernels(dev.split(":")[0], T, compile):
            return ours_fwd(x, y)[1]

    def base_loss(x, y):
        logits = base(x).logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.view(-1))

    runs = {"baseline (HF GPT2LMHeadModel, sdpa, eager)": (base_loss, opt(base, True), []),
            f"gptrain ({'compiled' if compile else 'eager'}, chunked loss)": (ours_loss, opt(ours, False), [])}
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, mcfg.vocab_size, (B, T), generator=g).to(dev)
    y = torch.randint(0, mcfg.vocab_size, (B, T), generator=g).to(dev)
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)

    def step(loss_fn, optim):
        optim.zero_grad(set_to_none=True)
        with amp():
            loss = loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(optim.param_groups[0]["params"] + optim.param_groups[1]["params"], 1.0)
        optim.step()
        sync()

    for i in range(a.warmup + a.steps):
        for name, (loss_fn, optim, times) in runs.items():
            sync()
            t0, c0 = time.perf_counter(), time.process_time()
            step(loss_fn, optim)
            if i >= a.warmup:
                times.append((time.perf_counter() - t0, time.process_time() - c0))
    peak = peak_flops(dev, getattr(torch, dtype))
    print(f"# {a.preset}: {mcfg.n_layer}L/{mcfg.n_head}H/{mcfg.n_embd}C, B={B} T={T}, {dev}, {dtype}, "
          f"threads {torch.get_num_threads()}, median of {a.steps} steps after {a.warmup} warm-up")
    print("| model | tokens/s (wall) | tokens/CPU-s | MFU |")
    print("|---|---|---|---|")
    result = {}
    for name, (_, _, times) in runs.items():
        wall = B * T / statistics.median(t for t, _ in times)
        cpu = B * T / statistics.median(c for _, c in times)
        mfu = f"{100 * ours.estimate_mfu(wall, T, peak):.1f}%" if peak else "-"
        result[name] = (wall, cpu)
        print(f"| {name} | {wall:,.0f} | {cpu:,.0f} | {mfu} |")
    (bw, bc), (ow, oc) = result.values()
    print(f"speed-up: {ow / bw:.2f}x wall, {oc / bc:.2f}x per CPU-second")
    if a.profile:
        for name, (loss_fn, optim, _) in runs.items():
            profile(name, lambda: step(loss_fn, optim), a.profile, dev)
    return {"baseline_tokens_per_sec": bw, "gptrain_tokens_per_sec": ow, "compiled": compile, "dtype": dtype}


if __name__ == "__main__":
    main()
