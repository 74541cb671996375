"""Memory measured, not only planned: peak resident memory per process of real training steps under DDP and FSDP
at several world sizes, with and without activation checkpointing, beside gptrain's memory plan.

Each configuration runs in fresh processes (torch.multiprocessing, gloo on the CPU), builds the model as `gptrain
train` does (`command.build_model`: DDP a full init on every rank; FSDP on the meta device, each rank filling its
shards after wrapping), runs a few steps of the real `Trainer` on random tokens and reports, per rank: the resident
memory before the model exists (the interpreter, torch, gloo), the bytes of the parameter, gradient and optimizer
tensors this rank holds (counted from the tensors: DTensor shards count their local part), the peak resident
memory (VmHWM), the peak of what glibc's malloc has handed out and not taken back (`mallinfo2`, sampled every
millisecond from a thread: the live tensors and objects, without the freed memory the allocator keeps resident)
and the median step time. The allocator is set as the `gptrain`
command sets it (gptrain/allocator.py) unless --no-keep-freed-memory. Configurations run one after another.

    python benchmarks/memory_fsdp.py scaling                 # gpt2-medium, W = 1, 2, 4, ddp and fsdp
    python benchmarks/memory_fsdp.py checkpointing           # gpt2-medium, one process, none vs blocks
    python benchmarks/memory_fsdp.py large                   # gpt3-large (760M), fsdp on 2 processes, blocks
    python benchmarks/memory_fsdp.py accumulation            # gpt2, fsdp W = 2, 4, 2 micro-steps a step:
                                                             # reduce-scatter on the last micro-step vs every one
    python benchmarks/memory_fsdp.py scaling --only fsdp:4 --steps 2    # one configuration
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gptrain.allocator import keep_freed_memory  # noqa: E402
from gptrain.model import preset  # noqa: E402
from gptrain.train import distributed, memory  # noqa: E402
from gptrain.train.config import TrainConfig  # noqa: E402
from gptrain.train.command import build_model  # noqa: E402
from gptrain.train.trainer import Trainer  # noqa: E402

MiB = 1 << 20


class RandomTokens:
    def __init__(self, B, T, vocab, seed):
        self.B, self.T, self.vocab, self.g = B, T, vocab, torch.Generator().manual_seed(seed)

    def next_batch(self):
        buf = torch.randint(0, self.vocab, (self.B, self.T + 1), generator=self.g)
        return buf[:, :-1], buf[:, 1:]

    def state_dict(self):
        return {}

    def load_state_dict(self, s):
        pass


def rss(field: str = "VmRSS") -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


class MallocPeak:
    """The peak of glibc's bytes in use (heap chunks handed out + mmapped ones) while it runs, sampled every
    millisecond by a thread (torch's CPU kernels release the GIL). None where there is no mallinfo2 (not glibc)."""

    def __init__(self):
        import ctypes
        import threading

        class Info(ctypes.Structure):
            _fields_ = [(f, ctypes.c_size_t) for f in
                        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
        try:
            self._mallinfo = ctypes.CDLL("libc.so.6").mallinfo2
            self._mallinfo.restype = Info
        except (OSError, AttributeError):
            self._mallinfo = None
        self.base = self.in_use()
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        if self._mallinfo is not None:
            self._thread.start()

    def in_use(self) -> int | None:
        if self._mallinfo is None:
            return None
        info = self._mallinfo()
        return info.uordblks + info.hblkhd

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.in_use())
            time.sleep(0.001)

    def stop(self) -> int | None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        return self.peak


def local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        if t is None:
            continue
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def config(shape: str, parallel: str, world: int, micro: int, seq_len: int, checkpointing: str,
           rs: str = "last", accum: int = 1) -> TrainConfig:
    return TrainConfig(model=shape, seq_len=seq_len, micro_batch_size=micro,
                       total_batch_size=micro * seq_len * world * accum, reduce_scatter=rs,
                       max_steps=100, warmup_steps=1, parallel=parallel, activation_checkpointing=checkpointing,
                       device="cpu", dtype="float32", compile=False, eval_every=0, sample_every=0, save_every=0,
                       hellaswag_data=None, log_every=0)


def worker(rank, world, port, shape, parallel, micro, seq_len, checkpointing, steps, out, keep, rs, accum):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    if keep:
        keep_freed_memory()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    env = distributed.setup("cpu", parallel)
    base = rss()
    malloc = MallocPeak()
    try:
        cfg = config(shape, parallel, world, micro, seq_len, checkpointing, rs, accum)
        torch.manual_seed(0)
        model = build_model(cfg, preset(shape).vocab_size)
        trainer = Trainer(cfg, model, RandomTokens(micro, seq_len, model.config.vocab_size, rank), env=env)
        times, losses = [], []
        for _ in range(steps):
            t0 = time.perf_counter()
            losses.append(trainer.train_step()["train_loss"])
            times.append(time.perf_counter() - t0)
        params = list(trainer.model.parameters())
        state = [t for s in trainer.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
        rec = {"rank": rank, "baseline": base, "params": local_bytes(params),
               "grads": local_bytes(p.grad for p in params), "optimizer": local_bytes(state),
               "peak": rss("VmHWM"), "malloc_base": malloc.base, "malloc_peak": malloc.stop(), "step_s": statistics.median(times[1:] or times),
               "tokens_per_s": micro * seq_len * world * accum / statistics.median(times[1:] or times),
               "losses": losses}
        gathered = [None] * world if rank == 0 else None
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.gather_object(rec, gathered, dst=0)
        else:
            gathered = [rec]
        if rank == 0:
            Path(out).write_text(json.dumps(gathered))
        del trainer, model, params, state  # before the process group: DDP's reducer must not outlive it
    finally:
        distributed.teardown()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(shape, parallel, world, micro, seq_len, checkpointing, steps, keep, rs, accum) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out.json"
        mp.start_processes(worker, args=(world, free_port(), shape, parallel, micro, seq_len, checkpointing, steps,
                                         str(out), keep, rs, accum), nprocs=world, join=True, start_method="spawn")
        return json.loads(out.read_text())


def planned(shape, parallel, world, micro, seq_len, checkpointing, rs="last", accum=1) -> memory.Plan:
    return memory.plan_for(preset(shape), config(shape, parallel, world, micro, seq_len, checkpointing, rs, accum),
                           world, "cpu")


def row(shape, parallel, world, micro, seq_len, checkpointing, steps, measured: bool, keep: bool, rs="last",
        accum=1) -> str:
    p = planned(shape, parallel, world, micro, seq_len, checkpointing, rs, accum)
    plan_state = p.params() + p.grads() + p.optimizer()
    label = f"| {parallel} | {world} | {checkpointing}{f', reduce-scatter {rs}' if accum > 1 else ''} "
    if not measured:
        return (f"{label}| not run (plan: {world} × {p.total() / MiB / 1024:.1f} GiB) | | | "
                f"{plan_state / MiB:,.0f} | | | {(p.total() - p.runtime()) / MiB:,.0f} | {p.total() / MiB:,.0f} | |")
    t0 = time.perf_counter()
    recs = measure(shape, parallel, world, micro, seq_len, checkpointing, steps, keep, rs, accum)
    wall = time.perf_counter() - t0
    peak = max(r["peak"] for r in recs)
    state = max(r["params"] + r["grads"] + r["optimizer"] for r in recs)
    base = max(r["baseline"] for r in recs)
    tps = recs[0]["tokens_per_s"]
    live = (f"{max(r['malloc_peak'] - r['malloc_base'] for r in recs) / MiB:,.0f}"
            if recs[0]["malloc_peak"] is not None else "n/a")
    print(f"  {parallel} W={world} {checkpointing}: {wall:.0f} s, ranks {json.dumps(recs)}", file=sys.stderr, flush=True)
    return (f"{label}| {peak / MiB:,.0f} | {base / MiB:,.0f} | {state / MiB:,.0f} | {plan_state / MiB:,.0f} | "
            f"{(peak - base) / MiB:,.0f} | {live} | {(p.total() - p.runtime()) / MiB:,.0f} | {p.total() / MiB:,.0f} | "
            f"{tps:,.0f} |")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("mode", choices=("scaling", "checkpointing", "large", "accumulation"))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--shape", default=None, help="model preset instead of the mode's (e.g. tiny, to try the script)")
    ap.add_argument("--micro-batch-size", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=True,
                    help="glibc mallopt as the gptrain command sets it (gptrain/allocator.py; faster CPU steps, but "
                         "freed blocks stay resident, so peaks include fragmentation); --no-keep-freed-memory: glibc's default")
    ap.add_argument("--only", action="append", default=[], help="PARALLEL:WORLD[:CHECKPOINTING] to run (repeatable)")
    ap.add_argument("--plan-only", action="append", default=[],
                    help="PARALLEL:WORLD[:CHECKPOINTING] to show from the plan without running (it would not fit)")
    a = ap.parse_args(argv)
    accum = 1
    if a.mode == "accumulation":
        shape, micro, seq_len, accum = "gpt2", a.micro_batch_size or 1, a.seq_len or 256, 2
        runs = [("fsdp", w, "none", rs) for w in (2, 4) for rs in ("last", "every")]
    elif a.mode == "scaling":
        shape, micro, seq_len = "gpt2-medium", a.micro_batch_size or 1, a.seq_len or 256
        runs = [(par, w, "none", "last") for w in (1, 2, 4) for par in ("ddp", "fsdp")]
    elif a.mode == "checkpointing":
        shape, micro, seq_len = "gpt2-medium", a.micro_batch_size or 1, a.seq_len or 1024
        runs = [("ddp", 1, "none", "last"), ("ddp", 1, "blocks", "last")]
    else:
        shape, micro, seq_len = "gpt3-large", a.micro_batch_size or 1, a.seq_len or 256
        runs = [("fsdp", 2, "blocks", "last"), ("ddp", 2, "blocks", "last")]
        a.plan_only = a.plan_only or ["ddp:2:blocks"]

    def spec(s):
        par, w, *rest = s.split(":") + ["none", "last"]
        return par, int(w), rest[0], rest[1]

    shape = a.shape or shape
    if a.only:
        runs = [spec(s) for s in a.only]
    skip = {spec(s) for s in a.plan_only}
    print(f"{shape}: {memory.param_count(preset(shape)) / 1e6:,.1f}M parameters, micro-batch {micro} × T={seq_len} "
          f"× {accum} micro-steps, "
          f"float32, CPU, {a.steps} steps per configuration; torch {torch.__version__}, {os.cpu_count()} cores; "
          f"allocator: {'gptrain (freed memory kept)' if a.keep_freed_memory else 'glibc default'}\n")
    print("| parallel | processes | activation checkpointing | peak RSS per rank (MiB) | RSS before the model | "
          "param+grad+optimizer tensors per rank | plan: param+grad+optimizer | peak − before | malloc in use: "
          "peak − before | plan: total − runtime allowance | plan: total | tokens/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for par, w, ck, rs in runs:
        print(row(shape, par, w, micro, seq_len, ck, a.steps, (par, w, ck, rs) not in skip, a.keep_freed_memory, rs,
                  accum), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
