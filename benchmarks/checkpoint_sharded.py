"""Sharded checkpoints and meta-device start-up against a baseline release, side by side: FSDP on W CPU processes
(gloo) for each code tree, in the same run.

Each run builds the model as `gptrain train --parallel fsdp` does (`command.build_model`, `distributed.wrap`),
trains --train-steps steps (micro-batch 1, random tokens: the peak a run without saves reaches; 0: AdamW's
moments from one step on zero gradients, no forward), then saves through the tree's `Checkpointer`: synchronously, and (trees that have it) with `asynchronous=True`.
Per rank it records the peak resident memory (sampled every 5 ms) during start-up and during each save, the
seconds the caller is blocked by a save (sync: the whole save; async: until `save` returns, and the wait for
the background write afterwards), and the checkpoint's files and bytes.

    git worktree add /tmp/gptrain-581fc9d 581fc9d     # the release to compare with
    python benchmarks/checkpoint_sharded.py --baseline /tmp/gptrain-581fc9d --model gpt2-large --worlds 2 4
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = os.sysconf("SC_PAGE_SIZE")


class Peak:
    """The largest resident set seen since `reset`, sampled in a thread."""

    def __init__(self):
        self.value, self._stop = 0, False
        threading.Thread(target=self._run, daemon=True).start()

    def current(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * PAGE

    def _run(self):
        while not self._stop:
            self.value = max(self.value, self.current())
            time.sleep(0.005)

    def reset(self) -> None:
        self.value = self.current()

    def read(self) -> int:
        return max(self.value, self.current())


class StubLoader:
    def state_dict(self):
        return {"epoch": 0, "cursor": 0}


def worker(args) -> None:
    import torch
    from gptrain.train import distributed
    from gptrain.train.checkpoint import Checkpointer
    from gptrain.train.config import resolve
    from gptrain.train.command import build_model

    peak = Peak()
    torch.set_num_threads(1)
    env = distributed.setup("cpu", "fsdp")
    rank, out = env.rank, {}
    cfg = resolve(None, {"model": args.model, "parallel": "fsdp", "device": "cpu"})
    peak.reset()
    t = time.perf_counter()
    torch.manual_seed(0)
    model = build_model(cfg, vocab_size=50257)
    distributed.wrap(model, env, compile=False, parallel="fsdp")
    out["startup_s"] = time.perf_counter() - t
    out["startup_peak"] = peak.read()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    # Training without saves: the peak a run reaches anyway (gathered units, activations, gradients, AdamW),
    # against which a save's peak is compared. Random tokens: the memory does not depend on the data.
    peak.reset()
    t = time.perf_counter()
    gen = torch.Generator().manual_seed(rank)
    for _ in range(max(1, args.train_steps)):
        x = torch.randint(0, 50257, (1, args.seq_len + 1), generator=gen)
        if args.train_steps:
            _, loss = model(x[:, :-1], x[:, 1:])
            loss.backward()
        else:  # moments only (no forward): one step on zero gradients
            for p in model.parameters():
                p.grad = torch.zeros_like(p)
        opt.step()
        opt.zero_grad(set_to_none=True)
    out["train_s"] = (time.perf_counter() - t) / max(1, args.train_steps)
    out["train_peak"] = peak.read()
    has_async = "asynchronous" in inspect.signature(Checkpointer).parameters
    modes = [m for m in args.modes if m == "sync" or has_async]
    for i, mode in enumerate(modes):
        run = Path(args.out) / mode
        extra = {"asynchronous": True} if mode == "async" else {}
        ck = Checkpointer(run, model=model, optimizer=opt, loader=StubLoader(), config={}, **extra)
        torch.distributed.barrier()
        peak.reset()
        t = time.perf_counter()
        path = ck.save(1, 0)
        out[f"{mode}_stall_s"] = time.perf_counter() - t
        if mode == "async":
            t = time.perf_counter()
            ck.wait()
            out["async_wait_s"] = time.perf_counter() - t
        torch.distributed.barrier()
        out[f"{mode}_peak"] = peak.read()
        if rank == 0:
            sizes = [p.stat().st_size for p in path.iterdir() if p.is_file()]
            out[f"{mode}_files"], out[f"{mode}_bytes"], out[f"{mode}_largest"] = len(sizes), sum(sizes), max(sizes)
    out["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(out))
    torch.distributed.barrier()
    distributed.teardown()


def launch(tree: Path, args, world: int, out: Path) -> list[dict]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(world),
           str(Path(__file__).resolve()), "--worker", "--model", args.model, "--out", str(out),
           "--train-steps", str(args.train_steps), "--seq-len", str(args.seq_len), "--modes", *args.modes]
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, env=env, check=True, cwd=out)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def gib(n) -> str:
    return f"{n / 2 ** 30:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--baseline", type=Path, help="a checkout of the release to compare with")
    ap.add_argument("--model", default="gpt2-large")
    ap.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--train-steps", type=int, default=2,
                    help="training steps (micro-batch 1, random tokens) before the saves: the peak of a run without "
                         "saves; 0: AdamW moments from one step on zero gradients, no forward")
    ap.add_argument("--seq-len", type=int, default=64, help="tokens per training step")
    ap.add_argument("--modes", nargs="+", choices=["sync", "async"], default=["sync", "async"],
                    help="which saves to make (async: trees that have it; it stages a CPU copy of each rank's share)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    trees = [("baseline", args.baseline)] if args.baseline else []
    trees.append(("this tree", ROOT))
    results = {}
    for world in args.worlds:
        for name, tree in trees:
            out = Path(tempfile.mkdtemp(dir=ROOT))
            try:
                ranks = launch(tree, args, world, out)
            finally:
                shutil.rmtree(out, ignore_errors=True)
            results[f"{name} W={world}"] = ranks
            r0 = ranks[0]
            print(f"{name:9} W={world}: start-up peak RSS GiB by rank {[gib(r['startup_peak']) for r in ranks]} "
                  f"({r0['startup_s']:.1f} s); training peak {[gib(r['train_peak']) for r in ranks]} "
                  f"({max(r['train_s'] for r in ranks):.1f} s a step); sync save peak {[gib(r['sync_peak']) for r in ranks]}, stall "
                  f"{max(r['sync_stall_s'] for r in ranks):.1f} s, {r0['sync_files']} files, "
                  f"{gib(r0['sync_bytes'])} GiB, largest file {r0['sync_largest'] / r0['sync_bytes']:.0%}", flush=True)
            if "async_stall_s" in r0:
                print(f"{'':9} async save peak {[gib(r['async_peak']) for r in ranks]}, stall "
                      f"{max(r['async_stall_s'] for r in ranks):.1f} s, then the background write "
                      f"{max(r['async_wait_s'] for r in ranks):.1f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
