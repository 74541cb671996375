"""Generation throughput: gptrain's KV-cache engine against the lecture's sampling loop, same model, same run.

The lecture's loop re-runs the model over the whole growing sequence for every new token and takes the top-50
of the last position's softmax; the engine encodes the prompt once and then runs one position per row per
token. Both sample top-k 50 at temperature 1 from the same random-weight model, for the same batch of prompts,
with no early stop, so both produce batch × new_tokens tokens. Runs alternate; the median of each is reported.

    python benchmarks/generate_throughput.py                       # gpt2 (124M) shape, batch 4, 256 new tokens
    python benchmarks/generate_throughput.py --preset tiny --repeats 5 --compile
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from gptrain.generate import Engine
from gptrain.model import GPT, preset
from gptrain.tokenizer import get_tokenizer

PROMPT = "Hello, I'm a language model,"


@torch.no_grad()
def lecture_loop(model: GPT, prompt: list[int], batch: int, new_tokens: int, seed: int) -> torch.Tensor:
    """The reference lecture's way: full forward of the (cropped) sequence per token, top-50 sampling."""
    g = torch.Generator().manual_seed(seed)
    x = torch.tensor([prompt] * batch)
    for _ in range(new_tokens):
        logits, _ = model(x[:, -model.config.block_size:])
        probs = F.softmax(logits[:, -1, :], dim=-1)
        top_probs, top_ids = torch.topk(probs, 50, dim=-1)
        pick = torch.multinomial(top_probs, 1, generator=g)
        x = torch.cat([x, torch.gather(top_ids, -1, pick)], dim=1)
    return x[:, len(prompt):]


def engine_run(engine: Engine, prompt: list[int], batch: int, new_tokens: int, seed: int) -> int:
    gen = engine.generate([prompt] * batch, max_new_tokens=new_tokens, temperature=1.0, top_k=50, seed=seed,
                          stop_ids=(), context="slide")  # slide past a small preset's window, as the loop crops
    for _ in gen:
        pass
    return sum(len(r) for r in gen.ids)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="gpt2", help="model shape (random weights)")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="1 is fastest on a contended machine")
    ap.add_argument("--compile", action="store_true", help="also time the engine with a compiled decode step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = GPT(preset(args.preset)).eval()
    prompt = get_tokenizer().encode(PROMPT)
    n = args.batch * args.new_tokens
    runs = {"lecture loop (no cache)": lambda s: lecture_loop(model, prompt, args.batch, args.new_tokens, s),
            "gptrain engine (KV cache)": lambda s: engine_run(Engine(model), prompt, args.batch, args.new_tokens, s)}
    if args.compile:
        compiled = Engine(model, compile=True)
        t = timed(lambda: engine_run(compiled, prompt, args.batch, 4, 0))
        print(f"compile + first 4 tokens: {t:.1f}s")
        runs["gptrain engine (KV cache, compiled)"] = lambda s: engine_run(compiled, prompt, args.batch,
                                                                           args.new_tokens, s)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for r in range(args.repeats):
        for name, fn in runs.items():
            times[name].append(timed(lambda: fn(r)))
            print(f"run {r + 1}/{args.repeats} {name}: {n / times[name][-1]:.1f} tokens/s", flush=True)
    print(f"\n{args.preset} ({model.num_params() / 1e6:.0f}M, random weights), batch {args.batch}, prompt "
          f"{len(prompt)} tokens, {args.new_tokens} new tokens, top-k 50; {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, torch {torch.__version__}; median of {args.repeats}")
    base = n / statistics.median(times["lecture loop (no cache)"])
    for name, ts in times.items():
        tps = n / statistics.median(ts)
        print(f"| {name} | {tps:.1f} tokens/s | {tps / base:.1f}x |")


if __name__ == "__main__":
    main()
