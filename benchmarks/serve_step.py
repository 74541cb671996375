"""CPU time of the server's generation step (`engine.SlotPool`), this checkout against others, interleaved.

For each row count R: R chat requests of a chat client's size (a system and a user message, 30-50 tokens
rendered) join an empty pool of 32 slots, as the server's scheduler holds them; the first step (their prefill and
first token) and then one decode step per new token (64 by default, sampled at temperature 1 with each row's own
seed, no early stop) are timed by the process's CPU time, not the wall clock, so that other jobs on the machine
count little. Each checkout runs in its own process at a fixed thread count (one by default), with the model as
`gptrain serve` prepares it (random weights of the gpt2 124M shape, bf16, and where the checkout has it,
`packed_linear.pack_linears`); checkouts alternate, `--repeats` times, and medians are printed, with each
checkout's first generated tokens so that equal arithmetic can be seen.

    python benchmarks/serve_step.py --baseline-tree /work/main                # R = 1, 4, 8, 16, 32, one thread
    python benchmarks/serve_step.py --baseline-tree OLD --rows 16 --threads 2 --repeats 5
    python benchmarks/serve_step.py --baseline-tree OLD --rows 1,8 --new-tokens 512 --threads 2   # long rows: resizes
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is the capital of France, and why did it become the capital?",
             "Write a short poem about the sea at night.", "How do I reverse a list in Python?",
             "Explain what a transformer language model is to a ten-year-old.",
             "Give me three ideas for a birthday party in the garden.", "Why is the sky blue?",
             "Summarise the plot of Hamlet in two sentences.", "What should I pack for a week of hiking?"]


def child(rows: list[int], new_tokens: int, threads: int) -> None:
    """In the checkout under test: print one JSON line per row count."""
    from gptrain.allocator import keep_freed_memory
    keep_freed_memory()  # as every gptrain command does
    import torch
    torch.set_num_threads(threads)
    from gptrain.chat.format import render_for_completion
    from gptrain.engine import Engine, SlotPool
    from gptrain.model import GPT, preset
    from gptrain.sampling import SamplingParams
    torch.manual_seed(0)
    model = GPT(preset("gpt2", vocab_size=50261)).to(torch.bfloat16).eval()
    try:
        from gptrain.packed_linear import pack_linears
        pack_linears(model)
    except ImportError:  # an older checkout: serve did not pack
        pass
    engine = Engine(model)
    prompts = [render_for_completion([{"role": "system", "content": "You are a helpful assistant."},
                                      {"role": "user", "content": q}], engine.tokenizer) for q in QUESTIONS]
    for r in rows:
        pool = SlotPool(engine, 32, prefill_chunk=256)
        seqs = [engine.sequence(prompts[i % len(prompts)], SamplingParams(
            max_new_tokens=new_tokens, temperature=1.0, top_k=None, seed=i, stop_ids=())) for i in range(r)]
        for s in seqs:
            pool.add(s)
        t = time.process_time()
        pool.step()
        first = time.process_time() - t
        steps = []
        while pool.rows:
            t = time.process_time()
            pool.step()
            steps.append(time.process_time() - t)
        print(json.dumps({"rows": r, "first_ms": 1000 * first, "step_ms": 1000 * statistics.median(steps),
                          "max_ms": 1000 * max(steps), "total_ms": 1000 * (first + sum(steps)), "tokens": seqs[0].ids[:6]}), flush=True)


def run(tree: Path, args) -> dict[int, dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--rows", args.rows,
           "--new-tokens", str(args.new_tokens), "--threads", str(args.threads)]
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": str(args.threads)}
    out = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, check=True).stdout
    return {r["rows"]: r for r in map(json.loads, out.splitlines())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--baseline-tree", type=Path, action="append", default=[],
                    help="another checkout to measure beside this one (e.g. a git worktree of an older commit)")
    ap.add_argument("--rows", default="1,4,8,16,32", help="row counts, comma-separated")
    ap.add_argument("--new-tokens", type=int, default=64, help="decode steps after the first, per row count")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in each checkout's process")
    ap.add_argument("--repeats", type=int, default=3, help="runs per checkout, alternating; medians are printed")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child([int(r) for r in args.rows.split(",")], args.new_tokens, args.threads)
        return 0
    trees = {"this checkout": ROOT, **{str(t): t for t in args.baseline_tree}}
    print(f"command: {' '.join(sys.argv)}\nload average at start: {os.getloadavg()[0]:.1f}", flush=True)
    runs = {name: [] for name in trees}
    for i in range(args.repeats):
        for name, tree in trees.items():
            runs[name].append(run(tree, args))
            print(f"  repeat {i + 1} {name}: " + ", ".join(f"R={r} {v['step_ms']:.1f} ms/step"
                                                           for r, v in runs[name][-1].items())
                  + f"  (load {os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    med = {name: {r: {k: statistics.median(x[r][k] for x in rs) for k in ("first_ms", "step_ms", "max_ms", "total_ms")}
                  for r in rs[0]} for name, rs in runs.items()}
    print("| checkout | rows | first step (prefill + 1 token) ms | decode step ms | slowest decode step ms "
          "| CPU ms per generated token | first tokens of row 0 |\n|---|---|---|---|---|---|---|")
    for name, rs in runs.items():
        for r, m in med[name].items():
            print(f"| {name} | {r} | {m['first_ms']:.1f} | {m['step_ms']:.1f} | {m['max_ms']:.1f} | "
                  f"{m['total_ms'] / (r * args.new_tokens):.2f} | {rs[0][r]['tokens']} |")
    new = med["this checkout"]
    for name in list(runs)[1:]:
        print(f"\n{name} / this checkout, CPU time (above 1x: this checkout takes less): " + "; ".join(
            f"R={r} first step {med[name][r]['first_ms'] / m['first_ms']:.2f}x, decode step "
            f"{med[name][r]['step_ms'] / m['step_ms']:.2f}x, slowest step {med[name][r]['max_ms'] / m['max_ms']:.2f}x, "
            f"per token {med[name][r]['total_ms'] / m['total_ms']:.2f}x" for r, m in new.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
