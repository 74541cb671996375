"""How long `gptrain serve`'s OpenMP threads should spin: for each GOMP_SPINCOUNT, one server on the same random
gpt2-shaped model (bf16 where the CPU has it), its aggregate tokens/s with 8 streaming clients on an idle machine,
and the first token of one request sent 0.3 s after a busy process (a busy loop) started beside it.
Counts alternate, `--rounds` times. The server's own choice is GOMP_SPINCOUNT=5000 (gptrain/openmp.py).

    python benchmarks/serve_spin.py          # 300000 (libgomp's default), 30000, 5000, 1500; ~4 min on 2 cores
    python benchmarks/serve_spin.py --counts 5000,1500 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import busy_process, level, machine, settle  # noqa: E402
from serve_spawn import random_model, spawned_server  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--counts", default="300000,30000,5000,1500", help="GOMP_SPINCOUNT values, comma-separated")
    ap.add_argument("--rounds", type=int, default=2, help="times each count is measured, counts in turn")
    args = ap.parse_args()
    print(f"machine: {machine()}\ncommand: {' '.join(sys.argv)}\n\n| GOMP_SPINCOUNT | round | K = 8 idle, tokens/s | "
          "TTFT p99 | first token beside a busy process |\n|---|---|---|---|---|", flush=True)
    run = argparse.Namespace(model=None, api_key=None, new_tokens=64, requests_per_client=2, no_ignore_eos=False)
    with tempfile.TemporaryDirectory() as tmp:
        model = random_model(Path(tmp) / "model", preset="gpt2", vocab_size=50261)
        for r in range(args.rounds):
            for count in args.counts.split(","):
                os.environ["GOMP_SPINCOUNT"] = count  # the server inherits it; gptrain leaves a user's count alone
                with spawned_server(model, Path(tmp) / f"{count}.log", "--no-access-log", "--max-tokens-limit", "64",
                                    timeout=600) as srv:
                    level(srv.url, 8, argparse.Namespace(**{**vars(run), "new_tokens": 8}))  # warm-up
                    settle()
                    idle = level(srv.url, 8, run)
                    with busy_process():
                        time.sleep(0.3)
                        beside = level(srv.url, 1, argparse.Namespace(**{**vars(run), "requests_per_client": 1}))
                print(f"| {count} | {r + 1} | {idle['tokens_per_s']:.1f} | {idle['ttft_p99']:.2f} s | "
                      f"{beside['ttft_p99']:.2f} s |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
