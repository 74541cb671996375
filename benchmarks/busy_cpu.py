"""Training steps on a CPU that another process keeps busy: OpenMP's wait policy and the thread count.

Each run is a whole `gptrain train --preset tiny` process (the demo's step) for a few steps, without evaluation,
samples or saves; the figure is the median step time over steps 2.. from its metrics.jsonl. Every variant runs
quiet and beside one extra busy process (`python -c 'while 1: pass'`), interleaved (rep by rep, variant by
variant), so a drift in the machine's load hits all of them alike. The final train loss of each run is printed
too: the wait policy must not change it; the thread count may (it changes how sums are split).

    python benchmarks/busy_cpu.py --reps 3 --steps 12 [--variants default,passive]

Variants (environment of the training process; 2 threads unless said):
  default   GOMP_SPINCOUNT=300000, which is what libgomp uses when OMP_WAIT_POLICY is unset (spin ~3 ms at every
            barrier before sleeping), so this reproduces the behaviour before gptrain set a policy
  passive   OMP_WAIT_POLICY=PASSIVE (sleep at once): gptrain's default now
  spin10k   GOMP_SPINCOUNT=10000 (spin ~0.1 ms, then sleep): the middle way, should passive cost on a quiet CPU
  threads1  libgomp's default with --threads 1 (one OpenMP thread: nothing to wait for)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {  # name: (environment, train flags)
    "default": ({"GOMP_SPINCOUNT": "300000"}, []),
    "passive": ({"OMP_WAIT_POLICY": "PASSIVE"}, []),
    "spin10k": ({"GOMP_SPINCOUNT": "10000"}, []),
    "threads1": ({"GOMP_SPINCOUNT": "300000"}, ["--threads", "1"]),
}


def run(data: Path, out: Path, steps: int, env_extra: dict, flags: list[str]) -> tuple[float, float, float]:
    """(median step ms, whole-process seconds, final train loss) of one training process."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OMP_NUM_THREADS")}
    env.update(env_extra, PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "gptrain", "train", "--preset", "tiny", "--data", str(data), "--out", str(out),
           "--max-steps", str(steps), "--eval-every", "0", "--sample-every", "0", "--save-every", "0",
           "--log-every", "0", "--resume", "fresh", "--hellaswag-data", "none", *flags]
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    events = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps_ = [e for e in events if "train_loss" in e]
    tokens = json.loads((out / "config.json").read_text())["train"]["total_batch_size"]
    ms = [1000 * tokens / e["tokens_per_sec"] for e in steps_[2:]]
    return statistics.median(ms), wall, steps_[-1]["train_loss"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names from the list above")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--data", default=None, help="prepared shakespeare (default: prepared into a temp dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else Path(tmp) / "data"
        if not args.data:
            subprocess.run([sys.executable, "-m", "gptrain", "prepare", "shakespeare", "--out", str(data)], cwd=ROOT,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)), check=True, stdout=subprocess.DEVNULL)
        chosen = {k: VARIANTS[k] for k in args.variants.split(",")}
        results = {(v, c): [] for v in chosen for c in ("quiet", "busy")}
        for rep in range(args.reps):
            for cond in ("quiet", "busy"):
                busy = subprocess.Popen([sys.executable, "-c", "while 1: pass"]) if cond == "busy" else None
                try:
                    for name, (env, flags) in chosen.items():
                        r = run(data, Path(tmp) / "run", args.steps, env, flags)
                        results[(name, cond)].append(r)
                        print(f"rep {rep} {cond:5} {name:10} {r[0]:8.0f} ms/step {r[1]:6.1f} s  loss {r[2]!r}  "
                              f"load {os.getloadavg()[0]:.1f}", flush=True)
                finally:
                    if busy is not None:
                        busy.kill()
                        busy.wait()
        print("\nmedian over reps: step ms (whole process s)")
        print(f"{'variant':12}{'quiet':>20}{'one busy process':>22}")
        for name in chosen:
            cells = []
            for cond in ("quiet", "busy"):
                rs = results[(name, cond)]
                cells.append(f"{statistics.median(r[0] for r in rs):.0f} ({statistics.median(r[1] for r in rs):.1f})")
            print(f"{name:12}{cells[0]:>20}{cells[1]:>22}")


if __name__ == "__main__":
    main()
