"""Validation-loss throughput: gptrain's evaluation forward against the lecture's, and against a training step.

Baseline: the lecture's evaluation (`model(x)` logits over the whole batch, then `F.cross_entropy` on the float
logits, under `torch.no_grad()`), on the same model and batches. gptrain: `model(x, y)` under `torch.no_grad()`,
what `gptrain eval val` and the trainer's in-loop evaluation run (the chunked loss, forward only). For scale, one
training step's forward + backward of the same batch. Alternating A, B, C, ...; median of the timed rounds.

    python benchmarks/eval_val_throughput.py --preset tiny                   # the demo's shape and batch
    python benchmarks/eval_val_throughput.py --preset tiny --dtype bfloat16
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
from gptrain.model import GPT, preset as model_preset  # noqa: E402
from gptrain.train.config import TRAIN_PRESETS, resolve  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="tiny", choices=list(TRAIN_PRESETS))
    p.add_argument("--micro-batch-size", type=int, default=None)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    keep_freed_memory()
    if a.threads:
        torch.set_num_threads(a.threads)
    tc = resolve(a.preset, {} if a.micro_batch_size is None else {"micro_batch_size": a.micro_batch_size})
    B, T = tc.micro_batch_size, tc.seq_len
    cfg = model_preset(tc.model)
    torch.manual_seed(0)
    model = GPT(cfg)
    amp = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if a.dtype == "bfloat16" else contextlib.nullcontext
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    y = torch.randint(0, cfg.vocab_size, (B, T), generator=g)

    def lecture_eval():
        with torch.no_grad(), amp():
            logits = model(x)[0]
            return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), y.view(-1))

    def gptrain_eval():
        with torch.no_grad(), amp():
            return model(x, y)[1]

    def train_fwd_bwd():
        model.zero_grad(set_to_none=True)
        with amp():
            loss = model(x, y)[1]
        loss.backward()
        return loss

    runs = {"lecture eval (full logits + F.cross_entropy, no_grad)": lecture_eval,
            "gptrain eval (chunked loss, no_grad)": gptrain_eval,
            "training forward + backward (for scale)": train_fwd_bwd}
    assert abs(lecture_eval().item() - gptrain_eval().item()) < (1e-4 if a.dtype == "float32" else 2e-2)
    times = {k: [] for k in runs}
    for i in range(a.rounds + 1):
        for name, fn in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            if i:
                times[name].append((time.perf_counter() - t0, time.process_time() - c0))
    print(f"# {a.preset}: {cfg.n_layer}L/{cfg.n_head}H/{cfg.n_embd}C, B={B} T={T}, cpu, {a.dtype}, "
          f"threads {torch.get_num_threads()}, median of {a.rounds} rounds after 1 warm-up")
    print("| what | tokens/s (wall) | tokens/CPU-s |")
    print("|---|---|---|")
    res = {}
    for name, ts in times.items():
        wall = B * T / statistics.median(t for t, _ in ts)
        cpu = B * T / statistics.median(c for _, c in ts)
        res[name] = (wall, cpu)
        print(f"| {name} | {wall:,.0f} | {cpu:,.0f} |")
    (lw, lc), (gw, gc), (tw, tc_) = res.values()
    print(f"gptrain eval: {gw / lw:.2f}x the lecture's eval, {gw / tw:.2f}x a training step's forward + backward "
          f"(wall; per CPU-second {gc / lc:.2f}x / {gc / tc_:.2f}x)")


if __name__ == "__main__":
    main()
