"""One prepared check for a single-GPU machine (see gpu_check.sh): train-step speed with torch.compile + bf16
against compile off, then FSDP at world size 1 against DDP and activation checkpointing's cost (tokens/s, peak
memory beside the memory plan), then one evaluation round (val loss, a sample, HellaSwag) with compile on, then HellaSwag
examples/s of the batched scorer against the lecture's per-example loop (benchmarks/hellaswag_throughput.py's),
then gptrain's compiled bf16 step against transformers' GPT2LMHeadModel eager (benchmarks/train_throughput.py's),
then the generation engine's aggregate decode tokens/s under continuous batching at batch 1, 8 and 32 (the gpt2
shape with the chat vocabulary, benchmarks/batch_decode.py's measurement), eager and compiled, in one process.

Synthetic tokens, so no data preparation or `datasets` is needed; the real trainer (`gptrain.train.trainer.Trainer`)
runs every step. `--dry-run` runs the same logic on the CPU with a tiny model and without compiling, so the
script itself is tested where there is no GPU (tests/test_train_gpu_check.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import batch_decode, train_throughput  # noqa: E402
from benchmarks.hellaswag_throughput import per_example_loop, timed  # noqa: E402
from gptrain.eval import hellaswag  # noqa: E402
from gptrain.generate import Scheduler  # noqa: E402
from gptrain.model import GPT, preset as model_preset  # noqa: E402
from gptrain.tokenizer import get_tokenizer  # noqa: E402
from gptrain.train import distributed  # noqa: E402
from gptrain.train.config import resolve  # noqa: E402
from gptrain.train.trainer import Trainer  # noqa: E402

HELLASWAG = ROOT.parent / "shared" / "data" / "hellaswag" / "hellaswag_val.jsonl.gz"


class RandomTokens:
    """Uniform random tokens from a fixed generator: the step's cost without any data pipeline."""

    def __init__(self, B, T, vocab, seed=0):
        self.B, self.T, self.vocab, self.g = B, T, vocab, torch.Generator().manual_seed(seed)

    def next_batch(self):
        buf = torch.randint(0, self.vocab, (self.B, self.T + 1), generator=self.g)
        return buf[:, :-1], buf[:, 1:]

    def state_dict(self):
        return {"rng": self.g.get_state()}

    def load_state_dict(self, s):
        self.g.set_state(s["rng"])

    def batches(self):  # also a fixed validation source: the same 4 batches every call
        g = torch.Generator().manual_seed(1234)
        for _ in range(4):
            buf = torch.randint(0, self.vocab, (self.B, self.T + 1), generator=g)
            yield buf[:, :-1], buf[:, 1:]


def run_phase(cfg, model_cfg, env, steps, warmup):
    torch.manual_seed(0)
    trainer = Trainer(cfg, GPT(model_cfg), RandomTokens(cfg.micro_batch_size, cfg.seq_len, model_cfg.vocab_size),
                      env=env, tokenizer=get_tokenizer())
    name = f"{'compiled' if trainer.compile else 'eager'} {trainer.cfg.dtype}"
    t0, per_step = time.perf_counter(), []
    for i in range(steps):
        m = trainer.train_step()
        per_step.append(m)
        print(f"  {name} step {i + 1}/{steps}: loss {m['train_loss']:.4f}, {m['ms']:.0f} ms", flush=True)
    timed = per_step[warmup:] or per_step[-1:]
    tps = statistics.median(m["tokens_per_sec"] for m in timed)
    mfu = statistics.median(m["mfu"] for m in timed) if "mfu" in timed[0] else None
    first_ms = per_step[0]["ms"]
    return trainer, {"phase": name, "tokens_per_sec": tps, "mfu": mfu, "first_step_s": first_ms / 1000,
                     "wall_s": time.perf_counter() - t0, "final_loss": per_step[-1]["train_loss"]}


def hellaswag_speed(model_cfg, examples, device, repeats):
    """(batched examples/s, per-example loop examples/s, predictions that agree): float32, same model, same run,
    interleaved runs after a warm-up, medians."""
    torch.manual_seed(0)
    device = torch.device(device)
    model = GPT(model_cfg).to(device).eval()
    batched = lambda: hellaswag.predict(model, examples, device=device)  # noqa: E731
    loop = lambda: per_example_loop(model, examples, device)  # noqa: E731
    batched(), loop()
    t_batched, t_loop = [], []
    for _ in range(repeats):
        dt, _, a = timed(batched, device)
        t_batched.append(dt)
        dt, _, b = timed(loop, device)
        t_loop.append(dt)
    agree = sum(x == y for x, y in zip(a, b))  # random weights: near-ties may flip under TF32, so counted, not asserted
    n = len(examples)
    return n / statistics.median(t_batched), n / statistics.median(t_loop), agree


def decode_speed(model_cfg, device, dtype, batches, new_tokens, compile_on):
    """{mode: {batch: aggregate tokens/s}}: eager on a pool of `batch` slots (as `serve --max-batch batch`), and
    compiled on one pool of max(batches) slots, which compiles its decode step once for every batch size."""
    torch.manual_seed(0)
    model = GPT(model_cfg).to(device=device, dtype=dtype).eval()
    prompts = [get_tokenizer().encode(p) for p in batch_decode.PROMPTS]
    out = {"eager": {}}
    for b in batches:
        with Scheduler(model, max_batch=b, max_queue=0) as s:
            batch_decode.throughput(s, prompts, b, 4, 0)  # warm-up
            out["eager"][b] = batch_decode.throughput(s, prompts, b, new_tokens, 1)
    if compile_on:
        out[f"compiled (pool {max(batches)})"] = {}
        with Scheduler(model, max_batch=max(batches), max_queue=0, compile=True) as s:
            t0 = time.perf_counter()
            batch_decode.throughput(s, prompts, 1, 4, 0)
            print(f"  decode step compiled in {time.perf_counter() - t0:.1f}s", flush=True)
            for b in batches:
                out[f"compiled (pool {max(batches)})"][b] = batch_decode.throughput(s, prompts, b, new_tokens, 1)
    for mode, tps in out.items():
        print(f"  engine decode {mode}: " + ", ".join(f"batch {b} {t:,.0f} tokens/s" for b, t in tps.items()),
              flush=True)
    return out



def parallel_check(cfg, model_cfg, device, steps, warmup, compile_on):
    """One device, the same batch: DDP (a plain process) against FSDP at world size 1 (tokens/s, peak memory beside
    the memory plan), then activation checkpointing's cost in tokens/s under each. Prints its own table."""
    from gptrain.train import memory
    env = distributed.setup(device, "fsdp")  # a one-process group for FSDP's device mesh; DDP at W=1 is plain
    cuda = env.device_type == "cuda"
    out = []
    try:
        for parallel in ("ddp", "fsdp"):
            for ck in ("none", "blocks"):
                run_cfg = dataclasses.replace(cfg, compile=compile_on, dtype="auto", parallel=parallel,
                                              activation_checkpointing=ck)
                if cuda:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(env.device)
                    before = torch.cuda.memory_allocated(env.device)  # what earlier phases still hold
                trainer, row = run_phase(run_cfg, model_cfg, env, steps, warmup)
                peak = torch.cuda.max_memory_allocated(env.device) - before if cuda else None
                plan = memory.plan_for(model_cfg, trainer.cfg, 1, env.device_type)
                out.append((parallel, ck, row["tokens_per_sec"], peak, plan.total() - plan.runtime()))
                del trainer
    finally:
        distributed.teardown()
    gib = lambda n: "-" if n is None else f"{n / 2**30:.2f} GiB"  # noqa: E731
    print("\n| one device | tokens/s | peak allocated | plan (without runtime allowance) |")
    print("|---|---|---|---|")
    for parallel, ck, tps, peak, plan in out:
        print(f"| {parallel}{', activation checkpointing' if ck != 'none' else ''} | {tps:,.0f} | {gib(peak)} | "
              f"{gib(plan)} |")
    speed = {(p, c): t for p, c, t, _, _ in out}
    print(f"| fsdp / ddp (W=1) | {speed['fsdp', 'none'] / speed['ddp', 'none']:.2f}x | | |")
    print(f"| activation checkpointing cost | ddp {speed['ddp', 'blocks'] / speed['ddp', 'none']:.2f}x, "
          f"fsdp {speed['fsdp', 'blocks'] / speed['fsdp', 'none']:.2f}x tokens/s | | |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2-124m")
    p.add_argument("--device", default="cuda")
    p.add_argument("--micro-batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10, help="steps excluded from the medians (compile, autotune)")
    p.add_argument("--hellaswag", default=str(HELLASWAG), help="HellaSwag val .jsonl[.gz] (skipped when absent)")
    p.add_argument("--hellaswag-limit", type=int, default=300)
    p.add_argument("--speed-examples", type=int, default=200, help="HellaSwag examples for the scorer speed row")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, no compile: tests this script itself")
    a = p.parse_args(argv)
    over = {"micro_batch_size": a.micro_batch_size, "device": a.device, "eval_every": 0, "sample_every": 0,
            "hellaswag_data": None, "log_every": 0, "sample_tokens": 32, "num_samples": 1}
    if a.seq_len:
        over["seq_len"] = a.seq_len
    if a.dry_run:
        over.update(device="cpu", micro_batch_size=2, seq_len=32)
        a.steps, a.warmup, a.hellaswag_limit, a.speed_examples = min(a.steps, 3), 1, 4, 4
    cfg = resolve(a.preset, over)
    cfg = dataclasses.replace(cfg, total_batch_size=cfg.micro_batch_size * cfg.seq_len, max_steps=a.steps,
                              warmup_steps=min(cfg.warmup_steps, a.steps))
    model_cfg = model_preset(cfg.model)
    if a.dry_run:
        model_cfg = dataclasses.replace(model_cfg, n_layer=1, n_head=2, n_embd=32, block_size=32)
    env = distributed.DistEnv(device=distributed.choose_device(cfg.device))
    compile_on = not a.dry_run
    print(f"gpu_check: {cfg.model} {model_cfg.n_layer}L/{model_cfg.n_embd}C, B={cfg.micro_batch_size} "
          f"T={cfg.seq_len}, {a.steps} steps, device {env.device}"
          + (f" ({torch.cuda.get_device_name(env.device)})" if env.device_type == "cuda" else ""), flush=True)
    rows = []
    trainer, row = run_phase(dataclasses.replace(cfg, compile=compile_on, dtype="auto"), model_cfg, env, a.steps,
                             a.warmup)
    rows.append(row)
    _, row = run_phase(dataclasses.replace(cfg, compile=False, dtype="auto"), model_cfg, env, a.steps, a.warmup)
    rows.append(row)
    del _
    if env.device_type == "cuda":
        torch.cuda.empty_cache()

    # eager: the comparison is FSDP against DDP and checkpointing's recompute; four more compiles would cost minutes
    parallel_check(cfg, model_cfg, env.device, min(a.steps, 12), min(a.warmup, 4), compile_on=False)

    # one evaluation round on the compiled trainer: val loss (compiled fwd), a sample and HellaSwag (eager handle)
    evals = {}
    trainer.val_source = trainer.train_loader
    if Path(a.hellaswag).exists():
        from gptrain.eval.hellaswag import load_examples
        trainer.hellaswag = load_examples(a.hellaswag, limit=a.hellaswag_limit)
    t0 = time.perf_counter()
    ev = trainer.evaluate()
    evals["eval round s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    samples = trainer.sample()
    evals["sample s"] = time.perf_counter() - t0
    print(f"  val_loss {ev.get('val_loss'):.4f}; sample: {samples[0]!r}" if samples else "  (no sample)")

    # HellaSwag scoring speed on the full-size model shape (the dry run's tiny model gets the real context window)
    speed = None
    if Path(a.hellaswag).exists():
        hs_cfg = dataclasses.replace(model_cfg, block_size=model_preset(cfg.model).block_size)
        speed = hellaswag_speed(hs_cfg, hellaswag.load_examples(a.hellaswag, limit=a.speed_examples), env.device,
                                repeats=1 if a.dry_run else 3)

    # gptrain's step against the plain PyTorch baseline (transformers' GPT2LMHeadModel, eager), same batch
    versus = train_throughput.main(
        ["--preset", "tiny", "--micro-batch-size", "2", "--seq-len", "32", "--device", "cpu", "--steps", "1",
         "--warmup", "0"] if a.dry_run else
        ["--preset", a.preset, "--micro-batch-size", str(cfg.micro_batch_size), "--seq-len", str(cfg.seq_len),
         "--device", env.device, "--dtype", "bfloat16", "--steps", "10", "--warmup", "5"])

    # the generation engine: continuous batching's decode throughput, gpt2 shape with the chat vocabulary
    decode_cfg = dataclasses.replace(model_cfg, vocab_size=50261)
    decode_dtype = torch.bfloat16 if env.device_type == "cuda" else torch.float32
    decode = decode_speed(decode_cfg, env.device, decode_dtype, (1, 8, 32), 8 if a.dry_run else 128, compile_on)

    print("\n| phase | tokens/s | MFU | first step (compile) s | final loss |")
    print("|---|---|---|---|---|")
    for r in rows:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        print(f"| {r['phase']} | {r['tokens_per_sec']:,.0f} | {mfu} | {r['first_step_s']:.1f} | {r['final_loss']:.4f} |")
    print(f"| compile speed-up | {rows[0]['tokens_per_sec'] / rows[1]['tokens_per_sec']:.2f}x | | | |")
    hs = (f"acc {ev['hellaswag_acc']:.3f} acc_norm {ev['hellaswag_acc_norm']:.3f} (n={len(trainer.hellaswag)})"
          if "hellaswag_acc" in ev else "skipped (no data)")
    print(f"| eval round ({rows[0]['phase']}) | val_loss {ev.get('val_loss', float('nan')):.4f} | HellaSwag {hs} | "
          f"{evals['eval round s']:.1f} s | sample {evals['sample s']:.1f} s |")
    if speed:
        print(f"| HellaSwag scoring ({cfg.model} float32, {a.speed_examples} examples) | batched {speed[0]:.1f} ex/s | "
              f"lecture loop {speed[1]:.1f} ex/s | speed-up {speed[0] / speed[1]:.2f}x | "
              f"predictions agree {speed[2]}/{a.speed_examples} |")
    else:
        print("| HellaSwag scoring | skipped (no data) | | | |")
    print(f"| vs HF GPT2LMHeadModel eager ({versus['dtype']}) | baseline {versus['baseline_tokens_per_sec']:,.0f} tok/s | "
          f"gptrain {'compiled' if versus['compiled'] else 'eager'} {versus['gptrain_tokens_per_sec']:,.0f} tok/s | "
          f"speed-up {versus['gptrain_tokens_per_sec'] / versus['baseline_tokens_per_sec']:.2f}x | |")
    for mode, tps in decode.items():
        print(f"| engine decode {mode} ({str(decode_dtype).removeprefix('torch.')}, vocab 50261) | "
              + " | ".join(f"batch {b} {t:,.0f} tok/s" for b, t in tps.items()) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
