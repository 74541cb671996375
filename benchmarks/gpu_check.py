"""One prepared check for a lent single-GPU machine (see gpu_check.sh), built so that a 15-minute loan cannot be
wasted: it runs on the machine's fixed image (torch 2.11, no network, nothing installed), every phase runs in its
own try, phases whose estimated time no longer fits the budget are skipped with a line, and a summary table plus a
machine-readable results file (JSON, rewritten after every phase) come out at the end whatever failed.

Phases, cheapest and most valuable first:
  env          torch/CUDA versions, the device, which features newer than torch 2.11 this torch has
  eager        the real Trainer's step, eager bf16: tokens/s, MFU (against the peak of the dtype used)
  loss         the LM-head loss on its own: the CPU-tuned chunked path against the CUDA path and the plain expression
  compiled     the same step compiled: tokens/s, MFU, the first (compiling) step's seconds
  eval         on the compiled trainer: validation loss, HellaSwag on the carried subset, a sample, each timed
  fsdp         FSDP at world size 1 against DDP, with activation checkpointing and per-micro-step reduce-scatter:
               tokens/s and peak memory beside the memory plan's figure
  fast_recipe  gpt2-124m against gpt2-124m-fast on the shipped Shakespeare text, the same few hundred steps: val
               losses and tokens/s (skipped with a line when this tree has no gpt2-124m-fast preset)
  deterministic  --deterministic's cost in tokens/s (eager)
  hellaswag_speed  the batched HellaSwag scorer against the lecture's per-example loop
  hf_baseline  the compiled step against transformers' GPT2LMHeadModel eager
  decode       the generation engine's decode tokens/s at batch 1, 8, 32, eager then compiled

Synthetic tokens for the speed phases, so no data preparation or `datasets` is needed. HellaSwag's examples come
from `benchmarks/data/` (staged by `gpu_check.sh --stage-data` from ../shared/data and carried with the working
tree; the full file may not be committed) or ../shared/data; with neither, the eval phase says so in its row.
`--dry-run` runs every phase on the CPU with a tiny model and without compiling (tests/test_train_gpu_check.py).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gptrain.model import GPT, preset as model_preset  # noqa: E402
from gptrain.train import distributed  # noqa: E402
from gptrain.train.config import TRAIN_PRESETS, resolve  # noqa: E402

SHARED_HELLASWAG = ROOT.parent / "shared" / "data" / "hellaswag" / "hellaswag_val.jsonl.gz"
STAGED = ROOT / "benchmarks" / "data"  # git-ignored: staged here, carried to the lent machine with the tree
STAGED_HELLASWAG = STAGED / "hellaswag_val_subset.jsonl.gz"
HELLASWAG_NOTICE = """HellaSwag (Zellers et al., 2019), validation split: the first {n} examples, unchanged.
Source: https://github.com/rowanz/hellaswag (data/hellaswag_val.jsonl). License: MIT, as follows.

MIT License

Copyright (c) 2019 Rowan Zellers

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
"""
FAST_PRESET = "gpt2-124m-fast"

# Features this code uses that torch 2.11 may lack: name -> (probe, what degrades without it).
FEATURES = {
    "FSDPModule.reset_iter_state": (
        lambda: hasattr(__import__("torch.distributed.fsdp", fromlist=["FSDPModule"]).FSDPModule, "reset_iter_state"),
        "FSDP resets its iteration state through gptrain's fallback (distributed.reset_iter_state)"),
    "torch.compiler.set_stance": (lambda: hasattr(torch.compiler, "set_stance"),
                                  "compile with evaluation/sampling (force_eager) is unavailable"),
    "torch.nn.utils.get_total_norm": (lambda: hasattr(torch.nn.utils, "get_total_norm"),
                                      "gradient clipping fails"),
}


def features() -> dict[str, bool]:
    out = {}
    for name, (probe, _) in FEATURES.items():
        try:
            out[name] = bool(probe())
        except Exception:  # noqa: BLE001 - a probe that cannot even import means the feature is absent
            out[name] = False
    return out


class Skip(Exception):
    """A phase that cannot run here, with the line that says why (not a failure)."""


# ----------------------------------------------------------------------------------------------- token sources
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


class TextTokens:
    """Real text for the recipe comparison: random windows of a token array (train), fixed windows of a held-out
    tail (val)."""

    def __init__(self, tokens: torch.Tensor, B: int, T: int, val_batches: int = 8, seed: int = 0):
        n_val = val_batches * B * (T + 1)
        self.train, self.val = tokens[:-n_val], tokens[-n_val:]
        self.B, self.T, self.val_batches, self.g = B, T, val_batches, torch.Generator().manual_seed(seed)

    def next_batch(self):
        starts = torch.randint(0, self.train.numel() - self.T - 1, (self.B,), generator=self.g)
        buf = torch.stack([self.train[s:s + self.T + 1] for s in starts.tolist()])
        return buf[:, :-1], buf[:, 1:]

    def state_dict(self):
        return {"rng": self.g.get_state()}

    def load_state_dict(self, s):
        self.g.set_state(s["rng"])

    def batches(self):
        v = self.val.view(self.val_batches, self.B, self.T + 1)
        for buf in v:
            yield buf[:, :-1], buf[:, 1:]


# ----------------------------------------------------------------------------------------------- the check
@dataclasses.dataclass
class Check:
    """What every phase needs, and what the phases hand on to later ones (the compiled trainer)."""
    args: argparse.Namespace
    cfg: object
    model_cfg: object
    env: distributed.DistEnv
    compile_on: bool
    compiled: object = None  # the compiled phase's trainer, reused by the eval phase

    @property
    def cuda(self) -> bool:
        return self.env.device_type == "cuda"

    def steps(self, n: int) -> int:
        return min(n, 3) if self.args.dry_run else n


def _trainer(check: Check, cfg, model_cfg=None, loader=None, val=None, hellaswag=None):
    from gptrain.tokenizer import get_tokenizer
    from gptrain.train.trainer import Trainer
    model_cfg = model_cfg or check.model_cfg
    torch.manual_seed(0)
    loader = loader or RandomTokens(cfg.micro_batch_size, cfg.seq_len, model_cfg.vocab_size)
    return Trainer(cfg, GPT(model_cfg), loader, val, env=check.env, hellaswag=hellaswag, tokenizer=get_tokenizer())


def _steps(trainer, steps: int, warmup: int, name: str) -> dict:
    """Run `steps` optimizer steps; medians over the steps after `warmup`."""
    per_step = []
    for i in range(steps):
        m = trainer.train_step()
        per_step.append(m)
        if i == 0 or i == steps - 1 or (i + 1) % 10 == 0:
            print(f"  {name} step {i + 1}/{steps}: loss {m['train_loss']:.4f}, {m['ms']:.0f} ms", flush=True)
    timed = per_step[warmup:] or per_step[-1:]
    mfu = [m["mfu"] for m in timed if "mfu" in m]
    return {"tokens_per_sec": statistics.median(m["tokens_per_sec"] for m in timed),
            "mfu": statistics.median(mfu) if mfu else None, "first_step_s": per_step[0]["ms"] / 1000,
            "final_loss": per_step[-1]["train_loss"], "dtype": trainer.cfg.dtype}


def _free(check: Check) -> None:
    if check.cuda:
        torch.cuda.empty_cache()


def phase_env(check: Check) -> dict:
    feats = features()
    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": check.env.device,
           "device_name": torch.cuda.get_device_name(check.env.device) if check.cuda else "cpu",
           "features": feats}
    for name, ok in feats.items():
        if not ok:
            print(f"  torch {torch.__version__} lacks {name}: {FEATURES[name][1]}", flush=True)
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    out["summary"] = f"torch {out['torch']}, {out['device_name']}" + (
        "" if all(feats.values()) else f"; lacks {', '.join(k for k, v in feats.items() if not v)}")
    return out


def phase_eager(check: Check) -> dict:
    trainer = _trainer(check, dataclasses.replace(check.cfg, compile=False, dtype="auto"))
    out = _steps(trainer, check.args.steps, check.args.warmup, "eager")
    out["summary"] = _speed_line(out)
    return out


def phase_loss(check: Check) -> dict:
    """The LM-head loss and its gradients alone at the run's micro-batch: each path timed (median of repeats),
    forward + backward, in the run's autocast dtype."""
    import torch.nn.functional as F

    from gptrain import loss as lm
    dev, mc = check.env.device, check.model_cfg
    n = check.cfg.micro_batch_size * check.cfg.seq_len
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(n, mc.n_embd, generator=g) * 0.5).to(dev).requires_grad_()
    w = (torch.randn(mc.padded_vocab_size, mc.n_embd, generator=g) * 0.02).to(dev).requires_grad_()
    t = torch.randint(0, mc.vocab_size, (n,), generator=g).to(dev)
    amp = torch.bfloat16 if check.cuda else None
    kernels = getattr(lm, "KERNELS", ("cpu",))
    paths = {f"chunked ({k})": (lambda k=k: lm.lm_loss(x, w, t, mc.vocab_size, kernel=k)) if len(kernels) > 1
             else (lambda: lm.lm_loss(x, w, t, mc.vocab_size)) for k in kernels}
    paths["plain F.cross_entropy"] = lambda: F.cross_entropy(F.linear(x, w[:mc.vocab_size]).float(), t)
    times, losses = {}, {}
    repeats = 2 if check.args.dry_run else 5
    for name, fn in paths.items():
        ts = []
        for _ in range(repeats + 1):
            x.grad = w.grad = None
            _sync(check)
            t0 = time.perf_counter()
            with torch.autocast(check.env.device_type, dtype=amp, enabled=amp is not None):
                loss = fn()
            loss.backward()
            _sync(check)
            ts.append(time.perf_counter() - t0)
        times[name], losses[name] = statistics.median(ts[1:]), loss.item()
        print(f"  loss {name}: {1000 * times[name]:.1f} ms fwd+bwd, loss {losses[name]:.5f}", flush=True)
    base = times["plain F.cross_entropy"]
    return {"ms": {k: 1000 * v for k, v in times.items()}, "loss": losses, "tokens": n,
            "summary": ", ".join(f"{k} {1000 * v:.1f} ms ({base / v:.2f}x plain)" for k, v in times.items()
                                 if k != "plain F.cross_entropy") + f"; plain {1000 * base:.1f} ms"}


def phase_compiled(check: Check) -> dict:
    if not check.compile_on:
        raise Skip("compile off (--dry-run or --no-compile)")
    check.compiled = _trainer(check, dataclasses.replace(check.cfg, compile=True, dtype="auto"))
    out = _steps(check.compiled, check.args.steps, check.args.warmup, "compiled")
    out["summary"] = _speed_line(out) + f", first step {out['first_step_s']:.1f} s"
    return out


def hellaswag_file(arg: str | None) -> Path | None:
    """--hellaswag, else the staged subset, else ../shared/data's full file; None when there is none."""
    for p in ([Path(arg)] if arg else [STAGED_HELLASWAG, SHARED_HELLASWAG]):
        if p.is_file():
            return p
    return None


NO_HELLASWAG = ("no HellaSwag examples here (none in benchmarks/data/ or ../shared/data): run "
                "`benchmarks/gpu_check.sh --stage-data` where ../shared/data exists and carry benchmarks/data along")


def phase_eval(check: Check) -> dict:
    """One evaluation round on the compiled trainer (the eager one on --dry-run): val loss through the compiled
    forward, HellaSwag and a sample through the eager handle, as the training loop runs them."""
    from gptrain.eval.hellaswag import load_examples
    trainer = check.compiled or _trainer(check, dataclasses.replace(check.cfg, compile=False, dtype="auto"))
    trainer.val_source = trainer.train_loader
    path = hellaswag_file(check.args.hellaswag)
    trainer.hellaswag = load_examples(path, limit=check.args.hellaswag_limit) if path else None
    t0 = time.perf_counter()
    ev = trainer.evaluate()
    eval_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    samples = trainer.sample()
    sample_s = time.perf_counter() - t0
    out = {"val_loss": ev.get("val_loss"), "eval_s": eval_s, "sample_s": sample_s,
           "sample": samples[0] if samples else None, "hellaswag_file": str(path) if path else None}
    if "hellaswag_acc" in ev:
        out.update(hellaswag_acc=ev["hellaswag_acc"], hellaswag_acc_norm=ev["hellaswag_acc_norm"],
                   hellaswag_n=len(trainer.hellaswag))
        hs = f"HellaSwag acc_norm {ev['hellaswag_acc_norm']:.3f} (n={len(trainer.hellaswag)})"
    else:
        hs = "HellaSwag: " + NO_HELLASWAG
        print(f"  {hs}", flush=True)
    out["summary"] = f"val_loss {ev.get('val_loss', float('nan')):.4f}, {hs}; round {eval_s:.1f} s, sample {sample_s:.1f} s"
    return out


def phase_fsdp(check: Check) -> dict:
    """One device, the same batch (two micro-steps, so accumulation is exercised): DDP (a plain process) against
    FSDP at world size 1, then FSDP with activation checkpointing and with reduce-scatter every micro-step: tokens/s,
    peak allocated memory, the memory plan's figure for each (without its runtime allowance)."""
    from gptrain.train import memory
    cfg = dataclasses.replace(check.cfg, total_batch_size=2 * check.cfg.micro_batch_size * check.cfg.seq_len)
    variants = [("ddp", {"parallel": "ddp"}), ("fsdp", {"parallel": "fsdp"}),
                ("fsdp, checkpointing", {"parallel": "fsdp", "activation_checkpointing": "blocks"})]
    if "reduce_scatter" in {f.name for f in dataclasses.fields(cfg)}:
        variants.append(("fsdp, reduce-scatter per micro-step", {"parallel": "fsdp", "reduce_scatter": "every"}))
    env = distributed.setup(check.env.device, "fsdp")  # a one-process group for FSDP's device mesh
    rows = {}
    try:
        for name, over in variants:
            run_cfg = dataclasses.replace(cfg, compile=False, dtype="auto", **over)
            before = 0
            if check.cuda:
                _free(check)
                torch.cuda.reset_peak_memory_stats(env.device)
                before = torch.cuda.memory_allocated(env.device)  # what earlier phases still hold
            trainer = _trainer(dataclasses.replace(check, env=env), run_cfg)
            row = _steps(trainer, check.steps(12), min(check.args.warmup, 4), name)
            peak = torch.cuda.max_memory_allocated(env.device) - before if check.cuda else None
            plan = memory.plan_for(check.model_cfg, trainer.cfg, 1, env.device_type)
            rows[name] = {"tokens_per_sec": row["tokens_per_sec"], "peak_bytes": peak,
                          "plan_bytes": plan.total() - plan.runtime()}
            trainer.wrapped.release()
            del trainer
    finally:
        distributed.teardown()
    gib = lambda n: "-" if n is None else f"{n / 2**30:.2f} GiB"  # noqa: E731
    base = rows["ddp"]["tokens_per_sec"]
    return {"rows": rows, "summary": "; ".join(
        f"{k} {v['tokens_per_sec']:,.0f} tok/s ({v['tokens_per_sec'] / base:.2f}x), peak {gib(v['peak_bytes'])} "
        f"(plan {gib(v['plan_bytes'])})" for k, v in rows.items())}


def phase_fast_recipe(check: Check) -> dict:
    """gpt2-124m against gpt2-124m-fast: the same steps of the same tokens (the shipped Shakespeare text, one
    micro-batch per step), eager; the val loss on the same held-out windows after those steps, and tokens/s."""
    if FAST_PRESET not in TRAIN_PRESETS:
        raise Skip(f"this tree has no --preset {FAST_PRESET} (it comes with the fewer-tokens work)")
    from gptrain.data.sources import shakespeare_documents
    from gptrain.tokenizer import get_tokenizer
    tok = get_tokenizer()
    docs = shakespeare_documents()
    text = "".join(docs[:3] if check.args.dry_run else docs)
    tokens = torch.tensor(tok.encode_ordinary(text) if hasattr(tok, "encode_ordinary") else tok.encode(text))
    steps = check.steps(check.args.recipe_steps)
    out = {}
    for preset in ("gpt2-124m", FAST_PRESET):
        over = {"micro_batch_size": check.cfg.micro_batch_size, "seq_len": check.cfg.seq_len,
                "device": check.cfg.device, "eval_every": 0, "sample_every": 0, "hellaswag_data": None,
                "log_every": 0}
        cfg = resolve(preset, over)
        cfg = dataclasses.replace(cfg, total_batch_size=cfg.micro_batch_size * cfg.seq_len, max_steps=steps,
                                  warmup_steps=max(1, steps // 10), compile=False, dtype="auto")
        mcfg = dataclasses.replace(check.model_cfg, vocab_size=check.model_cfg.vocab_size)
        data = TextTokens(tokens, cfg.micro_batch_size, cfg.seq_len, val_batches=2 if check.args.dry_run else 8)
        trainer = _trainer(check, cfg, mcfg, loader=data, val=data)
        row = _steps(trainer, steps, min(check.args.warmup, steps - 1), preset)
        row["val_loss"] = trainer.evaluate().get("val_loss")
        out[preset] = row
        trainer.wrapped.release()
        del trainer
        _free(check)
    a, b = out["gpt2-124m"], out[FAST_PRESET]
    out["summary"] = (f"{steps} steps: val {a['val_loss']:.4f} -> {b['val_loss']:.4f}, tok/s "
                      f"{a['tokens_per_sec']:,.0f} -> {b['tokens_per_sec']:,.0f}")
    return out


def phase_deterministic(check: Check) -> dict:
    """--deterministic's cost: eager steps with it against without, same run."""
    from gptrain.train.config import TrainConfig
    if "deterministic" not in {f.name for f in dataclasses.fields(TrainConfig)}:
        raise Skip("this tree has no --deterministic")
    out = {}
    for on in (False, True):
        trainer = _trainer(check, dataclasses.replace(check.cfg, compile=False, dtype="auto", deterministic=on))
        out["on" if on else "off"] = _steps(trainer, check.steps(15), min(check.args.warmup, 5),
                                           f"deterministic {'on' if on else 'off'}")
        del trainer
    from gptrain.devices import deterministic_algorithms
    deterministic_algorithms(False)
    ratio = out["on"]["tokens_per_sec"] / out["off"]["tokens_per_sec"]
    out["summary"] = (f"eager tok/s {out['off']['tokens_per_sec']:,.0f} -> {out['on']['tokens_per_sec']:,.0f} "
                      f"({ratio:.2f}x)")
    return out


def phase_hellaswag_speed(check: Check) -> dict:
    """Batched scorer against the lecture's per-example loop: float32, same model, interleaved, medians."""
    from benchmarks.hellaswag_throughput import per_example_loop, timed
    from gptrain.eval import hellaswag
    path = hellaswag_file(check.args.hellaswag)
    if path is None:
        raise Skip(NO_HELLASWAG)
    examples = hellaswag.load_examples(path, limit=check.args.speed_examples)
    cfg = dataclasses.replace(check.model_cfg, block_size=model_preset(check.cfg.model).block_size)
    torch.manual_seed(0)
    dev = torch.device(check.env.device)
    model = GPT(cfg).to(dev).eval()
    batched = lambda: hellaswag.predict(model, examples, device=dev)  # noqa: E731
    loop = lambda: per_example_loop(model, examples, dev)  # noqa: E731
    batched(), loop()
    tb, tl = [], []
    for _ in range(1 if check.args.dry_run else 3):
        dt, _, a = timed(batched, dev)
        tb.append(dt)
        dt, _, b = timed(loop, dev)
        tl.append(dt)
    n = len(examples)
    out = {"batched_ex_per_s": n / statistics.median(tb), "loop_ex_per_s": n / statistics.median(tl),
           "agree": sum(x == y for x, y in zip(a, b)), "n": n}
    out["summary"] = (f"batched {out['batched_ex_per_s']:.1f} ex/s, lecture loop {out['loop_ex_per_s']:.1f} ex/s "
                      f"({out['batched_ex_per_s'] / out['loop_ex_per_s']:.2f}x), predictions agree {out['agree']}/{n}")
    return out


def phase_hf_baseline(check: Check) -> dict:
    from benchmarks import train_throughput
    a, cfg = check.args, check.cfg
    versus = train_throughput.main(
        ["--preset", "tiny", "--micro-batch-size", "2", "--seq-len", "32", "--device", "cpu", "--steps", "1",
         "--warmup", "0"] if a.dry_run else
        ["--preset", a.preset, "--micro-batch-size", str(cfg.micro_batch_size), "--seq-len", str(cfg.seq_len),
         "--device", check.env.device, "--dtype", "bfloat16", "--steps", "10", "--warmup", "5"])
    versus["summary"] = (f"HF eager {versus['baseline_tokens_per_sec']:,.0f} tok/s, gptrain "
                         f"{'compiled' if versus['compiled'] else 'eager'} {versus['gptrain_tokens_per_sec']:,.0f} tok/s"
                         f" ({versus['gptrain_tokens_per_sec'] / versus['baseline_tokens_per_sec']:.2f}x, "
                         f"{versus['dtype']})")
    return versus


def _decode(check: Check, compile_on: bool) -> dict:
    from benchmarks import batch_decode
    from gptrain.generate import Scheduler
    from gptrain.tokenizer import get_tokenizer
    cfg = dataclasses.replace(check.model_cfg, vocab_size=50261)  # the gpt2 shape with the chat vocabulary
    dtype = torch.bfloat16 if check.cuda else torch.float32
    torch.manual_seed(0)
    model = GPT(cfg).to(device=check.env.device, dtype=dtype).eval()
    prompts = [get_tokenizer().encode(p) for p in batch_decode.PROMPTS]
    new_tokens, batches, tps, out = 8 if check.args.dry_run else 128, (1, 8, 32), {}, {}
    if not compile_on:
        for b in batches:
            with Scheduler(model, max_batch=b, max_queue=0) as s:
                batch_decode.throughput(s, prompts, b, 4, 0)  # warm-up
                tps[str(b)] = batch_decode.throughput(s, prompts, b, new_tokens, 1)
    else:  # one pool of the largest batch: the decode step compiles once for every batch size
        with Scheduler(model, max_batch=max(batches), max_queue=0, compile=True) as s:
            t0 = time.perf_counter()
            batch_decode.throughput(s, prompts, 1, 4, 0)
            out["compile_s"] = time.perf_counter() - t0
            for b in batches:
                tps[str(b)] = batch_decode.throughput(s, prompts, b, new_tokens, 1)
    out["tokens_per_sec_by_batch"] = tps
    out["summary"] = f"{str(dtype).removeprefix('torch.')}, vocab 50261: " + ", ".join(
        f"batch {b} {t:,.0f} tok/s" for b, t in tps.items())
    return out


def phase_decode(check: Check) -> dict:
    return _decode(check, compile_on=False)


def phase_decode_compiled(check: Check) -> dict:
    if not check.compile_on:
        raise Skip("compile off (--dry-run or --no-compile)")
    return _decode(check, compile_on=True)


# name, function, estimated seconds on an H100 at gpt2-124m B=32 (cold compiles included; not yet measured)
PHASES = [("env", phase_env, 1), ("eager", phase_eager, 20), ("loss", phase_loss, 10),
          ("compiled", phase_compiled, 90), ("eval", phase_eval, 40), ("fsdp", phase_fsdp, 40),
          ("fast_recipe", phase_fast_recipe, 60), ("deterministic", phase_deterministic, 20),
          ("hellaswag_speed", phase_hellaswag_speed, 30), ("hf_baseline", phase_hf_baseline, 40),
          ("decode", phase_decode, 30), ("decode_compiled", phase_decode_compiled, 90)]


def _sync(check: Check) -> None:
    if check.cuda:
        torch.cuda.synchronize(check.env.device)


def _speed_line(r: dict) -> str:
    mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
    return f"{r['dtype']} {r['tokens_per_sec']:,.0f} tok/s{mfu}, final loss {r['final_loss']:.4f}"


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:300]


def run_phases(check: Check, phases, budget_s: float, results_path: Path) -> dict:
    """Every phase in its own try; a phase whose estimate no longer fits the budget is skipped. The results file is
    rewritten after every phase, so a killed run still leaves what it measured."""
    results = {"args": {k: v for k, v in vars(check.args).items()}, "phases": []}
    start = time.perf_counter()
    for name, fn, estimate in phases:
        if check.args.only and name not in check.args.only:
            continue
        left = budget_s - (time.perf_counter() - start)
        row = {"phase": name}
        if not check.args.dry_run and estimate > left:
            row.update(status="skipped", summary=f"time budget: ~{estimate} s needed, {left:.0f} s left")
        else:
            print(f"== {name}", flush=True)
            t0 = time.perf_counter()
            try:
                row.update(status="ok", **fn(check))
            except Skip as e:
                row.update(status="skipped", summary=str(e))
            except Exception as e:  # noqa: BLE001 - the point: one phase's failure must not end the check
                traceback.print_exc()
                row.update(status="failed", summary=_one_line(e))
            finally:
                with contextlib.suppress(Exception):
                    distributed.teardown()
                    _free(check)
            row["seconds"] = round(time.perf_counter() - t0, 2)
        print(f"  -> {row['status']}: {row['summary']}", flush=True)
        results["phases"].append(row)
        results["wall_s"] = round(time.perf_counter() - start, 2)
        _write(results_path, results)
    return results


def _write(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=str))
    tmp.replace(path)


def summary_table(results: dict) -> str:
    lines = ["| phase | status | seconds | result |", "|---|---|---|---|"]
    for r in results["phases"]:
        summary = str(r.get("summary", "")).replace("|", "/")
        lines.append(f"| {r['phase']} | {r['status']} | {r.get('seconds', '-')} | {summary} |")
    return "\n".join(lines)


def stage_data(limit: int, source: str | None) -> int:
    """Copy the first `limit` HellaSwag examples from ../shared/data (or `source`) into benchmarks/data/
    (git-ignored) with the license notice, for carrying to a lent machine that has no ../shared."""
    source = Path(source) if source else SHARED_HELLASWAG
    if not source.is_file():
        print(f"gpu_check: {source} is not here: nothing to stage (pass --hellaswag PATH)", file=sys.stderr)
        return 1
    STAGED.mkdir(parents=True, exist_ok=True)
    with (gzip.open if source.suffix == ".gz" else open)(source, "rt", encoding="utf-8") as f:
        lines = [line for _, line in zip(range(limit), f)]
    with gzip.open(STAGED_HELLASWAG, "wt", encoding="utf-8") as f:
        f.writelines(lines)
    (STAGED / "HELLASWAG_NOTICE").write_text(HELLASWAG_NOTICE.format(n=len(lines)))
    print(f"gpu_check: {len(lines)} HellaSwag examples staged in {STAGED_HELLASWAG.relative_to(ROOT)} "
          f"({STAGED_HELLASWAG.stat().st_size:,} bytes, with HELLASWAG_NOTICE); carry benchmarks/data to the GPU machine")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gpt2-124m")
    p.add_argument("--device", default="cuda")
    p.add_argument("--micro-batch-size", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=8, help="steps excluded from the medians (compile, autotune)")
    p.add_argument("--recipe-steps", type=int, default=200, help="steps of each preset in the fast_recipe phase")
    p.add_argument("--hellaswag", default=None, help="HellaSwag val .jsonl[.gz] (default: the staged subset, then "
                   "../shared/data)")
    p.add_argument("--hellaswag-limit", type=int, default=300)
    p.add_argument("--speed-examples", type=int, default=200, help="HellaSwag examples for the scorer speed row")
    p.add_argument("--budget", type=float, default=450, help="seconds; later phases that do not fit are skipped")
    p.add_argument("--only", nargs="*", default=None, help="run only these phases (names as in the table)")
    p.add_argument("--results", default=str(ROOT / "runs" / "gpu_check" / "results.json"),
                   help="the machine-readable results (JSON), rewritten after every phase")
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--stage-data", action="store_true", help="copy the HellaSwag subset from ../shared/data into "
                   "benchmarks/data/ (git-ignored; carry it to the lent machine) and exit")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, no compile: tests this script itself")
    a = p.parse_args(argv)
    if a.stage_data:
        return stage_data(a.hellaswag_limit, a.hellaswag)
    over = {"micro_batch_size": a.micro_batch_size, "device": a.device, "eval_every": 0, "sample_every": 0,
            "hellaswag_data": None, "log_every": 0, "sample_tokens": 32, "num_samples": 1}
    if a.seq_len:
        over["seq_len"] = a.seq_len
    if a.dry_run:
        over.update(device="cpu", micro_batch_size=2, seq_len=32)
        a.steps, a.warmup, a.hellaswag_limit, a.speed_examples, a.recipe_steps = min(a.steps, 3), 1, 4, 4, 3
    cfg = resolve(a.preset, over)
    cfg = dataclasses.replace(cfg, total_batch_size=cfg.micro_batch_size * cfg.seq_len, max_steps=a.steps,
                              warmup_steps=min(cfg.warmup_steps, a.steps))
    model_cfg = model_preset(cfg.model)
    if a.dry_run:
        model_cfg = dataclasses.replace(model_cfg, n_layer=1, n_head=2, n_embd=32, block_size=32)
    env = distributed.DistEnv(device=distributed.choose_device(cfg.device))
    check = Check(a, cfg, model_cfg, env, compile_on=a.compile and not a.dry_run)
    print(f"gpu_check: {cfg.model} {model_cfg.n_layer}L/{model_cfg.n_embd}C, B={cfg.micro_batch_size} T={cfg.seq_len}, "
          f"{a.steps} steps, device {env.device}, torch {torch.__version__}, budget {a.budget:.0f} s", flush=True)
    results = {"phases": []}
    try:
        results = run_phases(check, PHASES, a.budget, Path(a.results))
    finally:
        print("\n" + summary_table(results), flush=True)
        print(f"results: {a.results}", flush=True)
    failed = [r["phase"] for r in results["phases"] if r["status"] == "failed"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
