"""HellaSwag examples/s: gptrain's batched scorer against the lecture's per-example loop, same model, same run.

The per-example loop is the lecture's: one forward of the example's 4 rows (padded to the longest), logits and
cross-entropy at every position, masked to the ending tokens. Both must give the same predictions (checked).
Reports the median of --repeats timed runs of each, after one untimed warm-up.

    python benchmarks/hellaswag_throughput.py                       # tiny preset on CPU
    python benchmarks/hellaswag_throughput.py --preset gpt2 --device cuda --examples 1000
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gptrain.allocator import keep_freed_memory  # noqa: E402
from gptrain.eval import hellaswag  # noqa: E402
from gptrain.model import GPT, preset  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "hellaswag" / "hellaswag_val.jsonl.gz"


@torch.no_grad()
def per_example_loop(model, examples, device):
    preds = []
    for ex in examples:
        ctx, ends, _ = hellaswag.render(ex)
        width = max(len(ctx) + len(e) for e in ends)
        tokens = torch.zeros((4, width), dtype=torch.long)
        mask = torch.zeros((4, width), dtype=torch.long)
        for i, e in enumerate(ends):
            tokens[i, :len(ctx) + len(e)] = torch.tensor(ctx + e)
            mask[i, len(ctx):len(ctx) + len(e)] = 1
        tokens, mask = tokens.to(device), mask.to(device)
        logits, _ = model(tokens)
        losses = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)).float(), tokens[:, 1:].reshape(-1),
                                 reduction="none").view(4, -1)
        m = mask[:, 1:]
        total = (losses * m).sum(1)
        preds.append((total.argmin().item(), (total / m.sum(1)).argmin().item()))
    return preds


def timed(fn, device) -> tuple[float, float, object]:
    """(wall seconds, CPU seconds of this process over all threads, result)."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0, time.process_time() - c0, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", help="model shape (random weights: speed does not depend on them)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--data", default=str(SHARED), help="HellaSwag validation .jsonl[.gz]")
    p.add_argument("--examples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16, help="examples per forward pass of the batched scorer")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    keep_freed_memory()  # as the `gptrain` command does, for both scorers
    torch.manual_seed(0)
    device = torch.device(args.device)
    model = GPT(preset(args.preset)).to(device).eval()
    examples = hellaswag.load_examples(args.data, limit=args.examples)
    batched = lambda: hellaswag.predict(model, examples, batch_size=args.batch_size, device=device)  # noqa: E731
    loop = lambda: per_example_loop(model, examples, device)  # noqa: E731
    batched(), loop()  # warm-up (allocator, kernels)
    t_batched, t_loop, c_batched, c_loop = [], [], [], []
    for _ in range(args.repeats):  # interleaved, so machine load affects both alike
        dt, ct, a = timed(batched, device)
        t_batched.append(dt)
        c_batched.append(ct)
        dt, ct, b = timed(loop, device)
        t_loop.append(dt)
        c_loop.append(ct)
        assert a == b, "batched scorer and per-example loop disagree"
    n = len(examples)
    eps_b, eps_l = n / statistics.median(t_batched), n / statistics.median(t_loop)
    cps_b, cps_l = n / statistics.median(c_batched), n / statistics.median(c_loop)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"device {device}, threads {args.threads}")
    print(f"model: {args.preset} ({model.num_params() / 1e6:.1f}M params), {n} examples, batch {args.batch_size} "
          f"examples, median of {args.repeats}")
    print(f"per-example loop (lecture): {eps_l:8.2f} examples/s, {cps_l:8.2f} examples/CPU-s   "
          f"runs {[f'{t:.2f}s' for t in t_loop]}")
    print(f"batched scorer (gptrain):   {eps_b:8.2f} examples/s, {cps_b:8.2f} examples/CPU-s   "
          f"runs {[f'{t:.2f}s' for t in t_batched]}")
    print(f"speedup: {eps_b / eps_l:.2f}x wall, {cps_b / cps_l:.2f}x per CPU-second (predictions identical)")


if __name__ == "__main__":
    main()
