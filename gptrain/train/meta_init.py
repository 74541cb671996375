"""FSDP start-up without a whole model in any process: build on the meta device, shard, then give each rank's
shards exactly the values that building the model in one process gives, from the same seed.

How. While the model is built on the meta device (`build`), a dispatch mode sees every in-place op that
initialises a tensor (nn.Linear's kaiming_uniform_, the model's normal_, zeros_, LayerNorm's ones_...). It
runs each one at once on a scratch CPU tensor of the same shape, which is dropped straight away: the global
generator advances exactly as it would have in a plain build (every rank, so the RNG state afterwards is the
plain build's too), and it notes the generator's state before the op. After `fully_shard`, `materialize`
allocates each rank's shards and, for every parameter, rank 0 replays only the op that set its final value
(from the noted state: one full tensor at a time) and broadcasts it; each rank keeps its shard.

Why this way. The single-process initialisation must stay what it is (tests compare gptrain with the lecture's
code from the same seed), so a per-tensor generator, or DTensor's sharded random ops (whose values depend on the
sharding), cannot be used; replaying the plain build's own draws gives its values bit for bit at every world
size and mesh. The price is that rank 0 draws the random numbers of the whole model twice (at build and at
materialisation) and every other rank once, as each did before; the memory is one full tensor, not a model.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gptrain.errors import GptrainError

_aten = torch.ops.aten
# In-place ops that overwrite the whole tensor from scalars and the global generator: replayable on their own.
_REPLAYABLE = {_aten.uniform_.default, _aten.normal_.default, _aten.zero_.default, _aten.fill_.Scalar}


@dataclass
class _Op:
    func: object
    args: tuple
    kwargs: dict
    rng: torch.Tensor | None  # the CPU generator's state before the op (None: the op draws nothing)


class _Scratch:
    """One CPU buffer, grown to the largest tensor asked for, handed out as a contiguous tensor of any shape: the
    scratch tensors of start-up reuse one block instead of leaving the heap fragmented (glibc keeps freed blocks
    of that size mapped), so the process holds one full tensor, never the model."""

    def __init__(self):
        self.buf = torch.empty(0)

    def __call__(self, shape, dtype) -> torch.Tensor:
        n = torch.Size(shape).numel() * dtype.itemsize
        if self.buf.numel() < n:
            self.buf = torch.empty(0)  # the old block goes before the new one is allocated
            self.buf = torch.empty(n, dtype=torch.uint8, device="cpu")
        return self.buf[:n].view(dtype).view(shape)


class _Recorder(TorchDispatchMode):
    """Runs each initialising op on a scratch tensor (so the generator advances as in a plain build) and notes,
    per tensor, the last op that wrote it."""

    def __init__(self):
        super().__init__()
        self.last: dict[int, tuple[torch.Tensor, _Op | None]] = {}  # id(tensor) -> (tensor, its last write)
        self.scratch = _Scratch()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        schema = func._schema
        writes = bool(schema.arguments) and schema.arguments[0].alias_info is not None and \
            schema.arguments[0].alias_info.is_write
        if writes and isinstance(args[0], torch.Tensor) and args[0].is_meta:
            target = args[0]
            op = None  # unknown: materialize refuses a parameter whose last write it cannot replay
            if func in _REPLAYABLE and kwargs.get("generator") is None and not any(
                    isinstance(a, torch.Tensor) for a in args[1:]):
                rng = torch.get_rng_state() if func in (_aten.uniform_.default, _aten.normal_.default) else None
                op = _Op(func, args[1:], kwargs, rng)
                func(self.scratch(target.shape, target.dtype), *op.args, **op.kwargs)
            self.last[id(target)] = (target, op)
            return target
        return func(*args, **kwargs)


_pending: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {parameter name: its last write}


def build(factory, *args, **kwargs) -> torch.nn.Module:
    """`factory(*args, **kwargs)` built on the meta device, its initialisation recorded for `materialize`."""
    recorder = _Recorder()
    with torch.device("meta"), recorder:
        model = factory(*args, **kwargs)
    plan = {}
    for name, p in model.named_parameters():
        found = recorder.last.get(id(p))
        plan[name] = found[1] if found is not None and found[0] is p else None
    _pending[model] = plan
    return model


def is_pending(model: torch.nn.Module) -> bool:
    return model in _pending


def materialize(model: torch.nn.Module, device: torch.device | str) -> None:
    """Allocate the (sharded) parameters of a model from `build` on `device` and fill them: rank 0 computes each
    full tensor in turn and broadcasts it, and each rank keeps its shard of it (one full tensor at a time in
    each process). Every rank calls it, after `fully_shard`."""
    from torch.distributed.tensor import DTensor, distribute_tensor
    plan = _pending.pop(model)
    unknown = [name for name, op in plan.items() if op is None]
    if unknown:
        raise GptrainError(f"cannot start {type(model).__name__} on the meta device: {', '.join(unknown[:3])} "
                           "is initialised by an op that cannot be replayed; use --parallel ddp")
    model.to_empty(device=device)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    params = dict(model.named_parameters())
    scratch = _Scratch()
    with torch.no_grad():
        for name, op in plan.items():
            p = params[name]
            full = scratch(p.shape, p.dtype)
            if rank == 0:
                now = torch.get_rng_state()
                if op.rng is not None:
                    torch.set_rng_state(op.rng)
                op.func(full, *op.args, **op.kwargs)
                torch.set_rng_state(now)
            full = full.to(device)
            if torch.distributed.is_initialized():
                torch.distributed.broadcast(full, src=0)
            if isinstance(p, DTensor):  # this rank's shard of it, sliced locally (any mesh, HSDP's included)
                p.copy_(distribute_tensor(full, p.device_mesh, p.placements, src_data_rank=None))
            else:
                p.copy_(full)
