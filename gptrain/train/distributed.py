"""Where a training process runs: device choice, torchrun's environment, the process group, DDP and compile.

The model is plain PyTorch; this module wraps it from outside. `wrap` returns three handles to the same weights:
- `train`: compiled (when asked) and DDP-wrapped (under torchrun), used only for the fixed-shape training step;
- `fwd`: compiled but not DDP, used for validation loss (same shapes as training, so no extra recompiles);
- `raw`: the plain module, used for variable-shape work (sampling, HellaSwag) and for checkpoints.
Variable shapes through a compiled module would recompile for every new length; the eager module avoids that
storm without switching the features off (see docs/ARCHITECTURE.md, "compile with evaluation and sampling").
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gptrain.errors import GptrainError


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def ddp(self) -> bool:
        return self.world_size > 1

    @property
    def is_master(self) -> bool:
        return self.rank == 0

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]


def choose_device(pref: str = "auto") -> str:
    """'auto' picks CUDA, then MPS, then CPU; an explicit choice that is unavailable is an error."""
    cuda, mps = torch.cuda.is_available(), getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if pref == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    if pref == "cuda" and not cuda:
        raise GptrainError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu or auto")
    if pref == "mps" and not mps:
        raise GptrainError("--device mps was asked for but MPS is not available; use --device cpu or auto")
    return pref


def setup(device_pref: str = "auto") -> DistEnv:
    """Read torchrun's RANK/LOCAL_RANK/WORLD_SIZE (absent: one process) and join the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistEnv(device=choose_device(device_pref))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(device_pref)
    if device == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return DistEnv(rank=rank, local_rank=local_rank, world_size=world, device=device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.ddp:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= env.world_size
    return x


def all_reduce_sum(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.ddp:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


@dataclass
class Wrapped:
    raw: torch.nn.Module
    fwd: torch.nn.Module
    train: torch.nn.Module

    def no_sync(self, last_micro_step: bool):
        """Skip DDP's gradient all-reduce on every micro-step but the last one."""
        if isinstance(self.train, torch.nn.parallel.DistributedDataParallel) and not last_micro_step:
            return self.train.no_sync()
        return contextlib.nullcontext()


def wrap(model: torch.nn.Module, env: DistEnv, compile: bool) -> Wrapped:
    fwd = torch.compile(model) if compile else model
    train = fwd
    if env.ddp:
        ids = [env.local_rank] if env.device_type == "cuda" else None
        train = torch.nn.parallel.DistributedDataParallel(fwd, device_ids=ids)
    return Wrapped(raw=model, fwd=fwd, train=train)
