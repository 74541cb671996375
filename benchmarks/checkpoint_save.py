"""What crash-safety costs: saving and resuming a full GPT-2 124M training checkpoint (weights + AdamW state).

Baselines, in the same run: one `torch.save({"model", "optimizer"})` into a file, as the lecture's loop would with
the optimizer added (no fsync, no hashes, no verification), and the same followed by an fsync (durable, but not
atomic or verified). gptrain: `Checkpointer.save` (safetensors weights,
optimizer and RNG/loader state, meta.json, every file fsynced, sha256 manifest, rename, read-back verification)
and `Checkpointer.resume` (verify every hash, then load everything). Median of --repeats runs.

    python benchmarks/checkpoint_save.py --model gpt2 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from gptrain.model import GPT, preset
from gptrain.train import checkpoint as ck


class StubLoader:
    def state_dict(self):
        return {"epoch": 0, "cursor": 123}

    def load_state_dict(self, s):
        pass


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gpt2")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = GPT(preset(args.model))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # materialise the AdamW moments
    base, durable, save, resume = [], [], [], []
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        tmp = Path(tmp)
        for i in range(args.repeats):
            t = time.perf_counter()
            torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, tmp / f"base{i}.pt")
            base.append(time.perf_counter() - t)
            t = time.perf_counter()
            with open(tmp / f"durable{i}.pt", "wb") as f:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict()}, f)
                f.flush()
                os.fsync(f.fileno())
            durable.append(time.perf_counter() - t)
            run = tmp / f"run{i}"
            c = ck.Checkpointer(run, model=model, optimizer=opt, loader=StubLoader(), config={})
            t = time.perf_counter()
            path = c.save(1, 0)
            save.append(time.perf_counter() - t)
            ck.verify._verified.clear()  # a new process has verified nothing yet
            t = time.perf_counter()
            ck.Checkpointer(run, model=model, optimizer=opt, loader=StubLoader(), config={}).resume("auto")
            resume.append(time.perf_counter() - t)
        size, base_size = dir_bytes(path), (tmp / "base0.pt").stat().st_size
    med = statistics.median
    print(f"model {args.model}: {model.num_params() / 1e6:.1f}M params, median of {args.repeats}")
    print("| what | size | time |\n|---|---|---|")
    print(f"| baseline torch.save(model+optimizer) | {base_size / 2**20:.0f} MiB | {med(base):.2f} s |")
    print(f"| baseline + fsync | {base_size / 2**20:.0f} MiB | {med(durable):.2f} s |")
    print(f"| gptrain save (fsync, sha256, verify) | {size / 2**20:.0f} MiB | {med(save):.2f} s |")
    print(f"| gptrain resume (verify + load all) | | {med(resume):.2f} s |")


if __name__ == "__main__":
    main()
