"""Continuous batching: aggregate decode tokens/s of the Scheduler at several batch sizes, and the stall a long
prompt's prefill causes in the streams already running, chunked against unchunked, same model, same run.

Throughput: `batch` requests submitted at once to a Scheduler with `max_batch=batch` (different short prompts,
top-k 50 at temperature 1, own seeds, no early stop), timed from the first submit to the last token; batch 1 is
the baseline (one request at a time, as a server without batching runs). Stall: `--streams` requests decoding,
then one prompt of `--long-prompt` tokens joins; the stall is the longest gap between two tokens of a running
stream from that submit until the long request's first token, beside the streams' median gap before it. Runs
alternate; medians of `--repeats`.

    python benchmarks/batch_decode.py                        # gpt2 124M shape, chat vocabulary, fp32 and bf16
    python benchmarks/batch_decode.py --preset tiny --batches 1 8 --repeats 1 --dtypes float32   # a quick look
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import threading
import time

import torch

from gptrain.generate import SamplingParams, Scheduler
from gptrain.model import GPT, preset
from gptrain.tokenizer import get_tokenizer

PROMPTS = ["Hello, I'm a language model,", "The capital of France is", "Once upon a time", "In the beginning",
           "def fibonacci(n):", "The weather today is", "My favourite food is", "Scientists have discovered"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def throughput(sched: Scheduler, prompts: list[list[int]], batch: int, new_tokens: int, seed: int) -> float:
    """Aggregate completion tokens/s of `batch` requests submitted at once to a running scheduler."""
    t0 = time.perf_counter()
    reqs = [sched.submit(prompts[i % len(prompts)], SamplingParams(max_new_tokens=new_tokens, top_k=50,
                                                                   seed=seed * 1000 + i, stop_ids=()))
            for i in range(batch)]
    for r in reqs:
        for _ in r:
            pass
    return sum(r.completion_tokens for r in reqs) / (max(r.finished_at for r in reqs) - t0)


def stall(model: GPT, prompts: list[list[int]], streams: int, long_prompt: int, chunk: int | None,
          seed: int) -> tuple[float, float]:
    """(longest gap between tokens of running streams while a long prompt is prefilled, their median gap
    before it), in seconds."""
    block = model.config.block_size
    with Scheduler(model, max_batch=streams + 1, prefill_chunk=chunk) as s:
        stamps = [[] for _ in range(streams)]
        reqs = [s.submit(prompts[i % len(prompts)], SamplingParams(max_new_tokens=block // 2, seed=seed + i,
                                                                   stop_ids=()))
                for i in range(streams)]

        def follow(i):
            for _ in reqs[i]:
                stamps[i].append(time.perf_counter())

        threads = [threading.Thread(target=follow, args=(i,)) for i in range(streams)]
        for t in threads:
            t.start()
        while min(len(st) for st in stamps) < 8:  # all streams decoding steadily
            time.sleep(0.005)
        g = torch.Generator().manual_seed(seed)
        long_ids = torch.randint(0, 50257, (long_prompt,), generator=g).tolist()
        joined = time.perf_counter()
        big = s.submit(long_ids, SamplingParams(max_new_tokens=4, stop_ids=()))
        next(iter(big))
        first = big.first_token_at
        for r in reqs:
            r.cancel()
        for t in threads:
            t.join()
    gaps_during, gaps_before = [], []
    for st in stamps:
        for a, b in zip(st, st[1:]):
            if b > joined and a < first:
                gaps_during.append(b - a)
            elif b <= joined:
                gaps_before.append(b - a)
    return max(gaps_during), statistics.median(gaps_before)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2", help="model shape (random weights)")
    ap.add_argument("--vocab", type=int, default=50261, help="50261 = the chat vocabulary")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=list(DTYPES))
    ap.add_argument("--streams", type=int, default=4, help="running streams in the stall measurement")
    ap.add_argument("--long-prompt", type=int, default=None, help="tokens of the joining prompt (default: "
                                                                  "the window less 8)")
    ap.add_argument("--chunks", type=int, nargs="*", default=[256, 64],
                    help="prefill_chunk values to measure the stall at, beside unchunked")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    tok = get_tokenizer()
    prompts = [tok.encode(p) for p in PROMPTS]
    cfg = dataclasses.replace(preset(a.preset), vocab_size=a.vocab)
    long_prompt = a.long_prompt or cfg.block_size - 8
    results = {}
    for dtype in a.dtypes:
        torch.manual_seed(0)
        model = GPT(cfg).to(device=a.device, dtype=DTYPES[dtype]).eval()
        with Scheduler(model, max_batch=2) as s:
            throughput(s, prompts, 2, 4, 0)  # warm-up
        tps = {b: [] for b in a.batches}
        stalls = {c: [] for c in [*a.chunks, None]}
        for r in range(a.repeats):
            for b in a.batches:
                with Scheduler(model, max_batch=b, max_queue=0) as s:  # a pool of b slots, as `--max-batch b`
                    tps[b].append(throughput(s, prompts, b, a.new_tokens, r))
                print(f"{dtype} run {r + 1}/{a.repeats} batch {b}: {tps[b][-1]:.1f} tokens/s", flush=True)
            for chunk in stalls:
                stalls[chunk].append(stall(model, prompts, a.streams, long_prompt, chunk, r))
                print(f"{dtype} run {r + 1}/{a.repeats} stall, prefill_chunk {chunk}: "
                      f"{1000 * stalls[chunk][-1][0]:.0f} ms (median gap {1000 * stalls[chunk][-1][1]:.0f} ms)",
                      flush=True)
        results[dtype] = {"tokens_per_sec": {b: statistics.median(v) for b, v in tps.items()},
                          "stall_ms": {k: 1000 * statistics.median(x[0] for x in v) for k, v in stalls.items()},
                          "gap_ms": statistics.median(1000 * x[1] for v in stalls.values() for x in v)}
    print(f"\n{a.preset} shape ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M, vocabulary {a.vocab}, random "
          f"weights), {a.new_tokens} new tokens per request, top-k 50; {cpu_model()}, {a.threads} threads, "
          f"torch {torch.__version__}; median of {a.repeats}")
    print("\n| dtype | " + " | ".join(f"batch {b} tokens/s" for b in a.batches) + " | "
          + " | ".join(f"batch {b} vs 1" for b in a.batches if b != 1) + " |")
    print("|---" * (1 + len(a.batches) + sum(b != 1 for b in a.batches)) + "|")
    for dtype, r in results.items():
        t = r["tokens_per_sec"]
        base = t.get(1)
        print(f"| {dtype} | " + " | ".join(f"{t[b]:.1f}" for b in a.batches) + " | "
              + " | ".join(f"{t[b] / base:.1f}x" if base else "-" for b in a.batches if b != 1) + " |")
    print(f"\nStall while a {long_prompt}-token prompt joins {a.streams} running streams "
          f"(longest gap between their tokens until its first token; their median gap before it):")
    print("\n| dtype | " + " | ".join(f"prefill_chunk {c}" for c in a.chunks) + " | unchunked | median gap |")
    print("|---" * (len(a.chunks) + 3) + "|")
    for dtype, r in results.items():
        print(f"| {dtype} | " + " | ".join(f"{r['stall_ms'][c]:.0f} ms" for c in [*a.chunks, None])
              + f" | {r['gap_ms']:.0f} ms |")
    return results


if __name__ == "__main__":
    main()
