"""Where a training process runs, and how the model is parallelised: device choice, torchrun's environment, the
process group, DDP or FSDP2, activation checkpointing and torch.compile, all applied from outside the model.

The model is plain PyTorch; `wrap` returns three handles to the same weights:
- `train`: the module the fixed-shape training step calls (DDP over the compiled model, or the FSDP root);
- `fwd`: validation loss (same shapes as training, so no extra recompiles);
- `raw`: the plain module, for variable-shape work (sampling, HellaSwag), always used inside `Wrapped.gathered()`.
Variable shapes through a compiled module would recompile for every new length; the eager module avoids that
storm without switching the features off (see docs/ARCHITECTURE.md, "compile with evaluation and sampling").

`--parallel fsdp` applies `fully_shard` to every Block and then to the root (which holds the embeddings, the final
LayerNorm and the LM head tied to the token embedding: one FSDP unit, so the tie survives sharding); compile and
activation checkpointing then act per Block. A model built on the meta device (`meta_init.build`) is materialised
after sharding, each rank holding only its shards, with the values a single-process build gives. `--fsdp-shard-size S` shards inside groups of S processes and
replicates across groups (HSDP on a 2-D device mesh, e.g. shard inside a node, replicate across nodes).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from gptrain.errors import GptrainError
from gptrain.train import meta_init

PARALLEL = ("ddp", "fsdp")
CHECKPOINTING = ("none", "blocks")
# The process groups' timeout (`--dist-timeout`): how long a rank waits in a collective before the job fails. It
# is sized for the slowest rank-0 step (a checkpoint save), not NCCL's default 10 minutes.
DEFAULT_TIMEOUT_MIN = 60.0
_timeout = [datetime.timedelta(minutes=DEFAULT_TIMEOUT_MIN)]


def timeout() -> datetime.timedelta:
    """The timeout the current process groups were made with (gptrain.train.together's control group uses it)."""
    return _timeout[0]


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def ddp(self) -> bool:
        """More than one process (data parallel, whether DDP or FSDP)."""
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


def cuda_device(local_rank: int) -> str:
    """This process's GPU: its local rank modulo the GPUs it sees. A launcher that gives each process one visible
    GPU (CUDA_VISIBLE_DEVICES per rank) leaves one device while LOCAL_RANK counts on."""
    return f"cuda:{local_rank % torch.cuda.device_count()}"


def setup(device_pref: str = "auto", parallel: str = "ddp", timeout_min: float = DEFAULT_TIMEOUT_MIN) -> DistEnv:
    """Read torchrun's RANK/LOCAL_RANK/WORLD_SIZE (absent: one process) and join the process group, whose
    collectives wait `timeout_min` minutes before failing.

    FSDP needs a process group even for one process (its device mesh is built on one), so `parallel="fsdp"` makes
    a single-member group from an in-memory store when there is no torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and parallel != "fsdp":
        return DistEnv(device=choose_device(device_pref))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    device = choose_device(device_pref)
    if device == "cuda":
        device = cuda_device(local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        _timeout[0] = datetime.timedelta(minutes=timeout_min)
        if world <= 1:
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=_timeout[0])
        else:
            dist.init_process_group(backend=backend, timeout=_timeout[0])
    return DistEnv(rank=rank, local_rank=local_rank, world_size=max(world, 1), device=device)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.ddp:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        x /= env.world_size
    return x


def all_reduce_mean_and_flag(x: torch.Tensor, flag: bool, env: DistEnv) -> tuple[torch.Tensor, torch.Tensor]:
    """(x averaged over ranks, 1.0 if `flag` is set on any rank else 0.0) in one all-reduce: a per-step flag (the
    stop signal) rides on the loss's collective instead of costing its own."""
    both = torch.stack([x.float(), x.new_full((), float(flag), dtype=torch.float32)])  # a fill, no host copy
    if env.ddp:
        dist.all_reduce(both, op=dist.ReduceOp.SUM)
        both[0] /= env.world_size
    return both[0].to(x.dtype), (both[1] > 0).float()


def all_reduce_sum(x: torch.Tensor, env: DistEnv) -> torch.Tensor:
    if env.ddp:
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def shard_mesh(env: DistEnv, shard_size: int = 0):
    """The FSDP device mesh: 1-D over all processes, or (replicate, shard) when `shard_size` divides the world."""
    from torch.distributed.device_mesh import init_device_mesh
    world = env.world_size
    if shard_size in (0, world):
        return init_device_mesh(env.device_type, (world,), mesh_dim_names=("shard",))
    if shard_size < 0 or world % shard_size:
        raise GptrainError(f"--fsdp-shard-size {shard_size} does not divide the {world} processes; use a divisor "
                           f"of {world} (e.g. the processes per node), or 0 to shard over all of them")
    return init_device_mesh(env.device_type, (world // shard_size, shard_size), mesh_dim_names=("replicate", "shard"))


def _checkpointed(forward, *args, **kwargs):
    """A Block's forward whose activations are recomputed in backward (non-reentrant); plain when no grad."""
    if torch.is_grad_enabled():
        return checkpoint(forward, *args, use_reentrant=False, **kwargs)
    return forward(*args, **kwargs)


def _per_block(model: torch.nn.Module, checkpointing: str, compile: bool) -> None:
    """Activation checkpointing and/or torch.compile around each Block's forward, set on the instance so that
    parameter names (and therefore checkpoints) are unchanged and FSDP's hooks stay outside both."""
    for block in model.transformer.h:
        fn = block.forward
        if checkpointing == "blocks":
            fn = functools.partial(_checkpointed, fn)
        if compile:
            fn = torch.compile(fn)
        block.forward = fn


@dataclass
class Wrapped:
    raw: torch.nn.Module
    fwd: torch.nn.Module
    train: torch.nn.Module
    parallel: str = "ddp"
    # FSDP: each FSDP module and the reshard-after-forward it trains with (restored after `gathered`)
    fsdp_modules: list = field(default_factory=list)
    # FSDP: reduce-scatter on every micro-step (only the shard accumulates: memory) instead of the last (traffic)
    reduce_every_micro_step: bool = False

    def no_sync(self, last_micro_step: bool):
        """Reduce gradients only on the last micro-step of an optimizer step (DDP: `no_sync` on the others; FSDP:
        gradients accumulate unsharded, in the reduction dtype, and are reduce-scattered once), or under FSDP with
        `reduce_every_micro_step` on every micro-step, the sharded gradients accumulating."""
        if self.parallel == "fsdp":
            self.train.set_requires_gradient_sync(last_micro_step or self.reduce_every_micro_step)
            return contextlib.nullcontext()
        if isinstance(self.train, torch.nn.parallel.DistributedDataParallel) and not last_micro_step:
            return self.train.no_sync()
        return contextlib.nullcontext()

    def release(self) -> None:
        """Drop the DDP wrapper: its C++ reducer must be gone before the process group is destroyed (one that
        outlives it can hang the process at exit). The `fwd`/`raw` handles stay usable."""
        self.train = self.fwd

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip to `max_norm` (inf: measure only) by the global gradient norm; under FSDP the gradients are shards
        (DTensors) and their norm is reduced across processes, so every rank sees the whole model's norm."""
        params = [p for p in self.raw.parameters() if p.grad is not None]
        total = torch.nn.utils.get_total_norm([p.grad for p in params], 2.0)
        if hasattr(total, "full_tensor"):
            total = total.full_tensor()
        # torch multiplies by the coefficient even when it is clamped to 1, to spare a GPU a sync; on CPU the
        # check is free and skips a pass over every gradient (the same result: x * 1.0 == x).
        if total.device.type != "cpu" or bool(max_norm / (total + 1e-6) < 1.0):
            torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
        return total

    @contextlib.contextmanager
    def gathered(self, eager: bool = True):
        """The whole model on every rank, for forward-only work (yields `raw`; `eager=False`: the compiled
        per-Block forwards stay on, for fixed-shape validation). Under FSDP every rank must enter together: the
        parameters are all-gathered once and stay so until the block exits, so work that differs between ranks (a
        sample on rank 0 only, HellaSwag's uneven shares) runs without collectives, and FSDP's per-iteration
        records of those forwards are reset afterwards (else backward's prefetching would follow a different
        order on each rank). A no-op for DDP."""
        if self.parallel != "fsdp":
            yield self.raw
            return
        for module, _ in self.fsdp_modules:
            module.unshard()
            module.set_reshard_after_forward(False, recurse=False)
        try:
            with torch.compiler.set_stance("force_eager") if eager else contextlib.nullcontext():
                yield self.raw
        finally:
            for module, reshard in self.fsdp_modules:
                module.set_reshard_after_forward(reshard, recurse=False)
            reset_iter_state(self.raw)  # reshards every unit and forgets the forwards above


def reset_iter_state(root) -> None:
    """FSDPModule.reset_iter_state (torch 2.13) on the FSDP root after forward-only work: every unit resharded and
    the iteration's records of those forwards forgotten. Torch 2.11 (the lent GPU machines' image) lacks it; there
    the same is done on FSDP's state directly, for the forward-only case gptrain needs (no gradients in flight)."""
    if hasattr(root, "reset_iter_state"):
        root.reset_iter_state()
        return
    from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState
    state = root._get_fsdp_state()
    if (gather := state._comm_ctx.all_gather_state) is not None and gather.event is not None:
        state._device_handle.current_stream().wait_event(gather.event)
    state._comm_ctx.all_gather_state = None
    state._comm_ctx.post_forward_order.clear()
    for unit in state._state_ctx.all_states:
        unit._modules_to_run_forward.clear()
        unit._training_state = TrainingState.IDLE
        group = unit._fsdp_param_group
        if group is not None:
            group._post_forward_indices.clear()
            group._training_state = TrainingState.IDLE
            group.reshard()
    state._state_ctx.iter_forward_root = None


def wrap(model: torch.nn.Module, env: DistEnv, compile: bool, parallel: str = "ddp", *,
         reshard_after_forward: bool = True, checkpointing: str = "none", shard_size: int = 0,
         param_dtype: torch.dtype | None = None) -> Wrapped:
    """Apply the chosen parallelism to `model` (already on its device for DDP; FSDP moves each unit itself).

    DDP compiles the whole model (the loss included); FSDP compiles each Block, between its hooks. `param_dtype`
    (FSDP only) is the MixedPrecisionPolicy's: parameters all-gathered and computed in it, gradients reduced in
    float32, the sharded master weights and AdamW state stay float32."""
    if parallel not in PARALLEL:
        raise GptrainError(f"--parallel {parallel!r}: choose one of {', '.join(PARALLEL)}")
    if checkpointing not in CHECKPOINTING:
        raise GptrainError(f"--activation-checkpointing {checkpointing!r}: choose one of {', '.join(CHECKPOINTING)}")
    if parallel == "fsdp":
        return _wrap_fsdp(model, env, compile, reshard_after_forward, checkpointing, shard_size, param_dtype)
    _per_block(model, checkpointing, compile=False)
    fwd = torch.compile(model) if compile else model
    train = fwd
    if env.ddp:
        ids = [torch.device(env.device).index] if env.device_type == "cuda" else None
        train = torch.nn.parallel.DistributedDataParallel(fwd, device_ids=ids, gradient_as_bucket_view=True)
    return Wrapped(raw=model, fwd=fwd, train=train)


def _wrap_fsdp(model, env, compile, reshard_after_forward, checkpointing, shard_size, param_dtype) -> Wrapped:
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
    if not dist.is_initialized():
        raise GptrainError("--parallel fsdp needs a process group; run under torchrun, or through `gptrain train`, "
                           "which makes one for a single process")
    mesh = shard_mesh(env, shard_size)
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    _per_block(model, checkpointing, compile)
    blocks = list(model.transformer.h)
    modules = []
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again at once by backward: keeping them saves an all-gather.
        reshard = reshard_after_forward and i < len(blocks) - 1
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard, mp_policy=mp)
        modules.append((block, reshard))
    # The root (embeddings, final LayerNorm, the tied LM head) keeps FSDP's default: not resharded after forward,
    # since backward begins with it.
    fully_shard(model, mesh=mesh, mp_policy=mp)
    modules.insert(0, (model, False))
    if meta_init.is_pending(model):  # built on the meta device: each rank fills its shards now
        meta_init.materialize(model, env.device)
    # FSDP takes the first module to run forward as the root, and sets it up then (its lazy init). Set the real
    # root up now, so that `gathered()` (which may come before any training step, e.g. the step-0 evaluation)
    # finds FSDP ready, without a forward: a warm-up forward would all-gather the root's embedding and the last
    # Block and hold them, ~0.5-0.9 GiB more at start-up at 760M (benchmarks/checkpoint_sharded.py). FSDP2 has no
    # public call for it; `_lazy_init` is what its root pre-forward hook runs first (torch 2.11 and 2.13).
    model._get_fsdp_state()._lazy_init()
    return Wrapped(raw=model, fwd=model, train=model, parallel="fsdp", fsdp_modules=modules)
