"""Model state in and out of checkpoints, and the small exchanges between ranks that saving and resuming need.

Weights are stored unwrapped (no DDP `module.` / compile `_orig_mod.` prefixes), a tied tensor once. Only rank 0
writes; the other ranks send it their RNG and loader states (small), so no shared filesystem is needed to save.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from gptrain.errors import GptrainError
from gptrain.model import GPTConfig
from gptrain.train.checkpoint.layout import CHECKPOINTS, META, MODEL
from gptrain.train.checkpoint.verify import find_checkpoint

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def model_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unwrapped weights with wrapper prefixes stripped (a state dict taken from a wrapper keeps them)."""
    out = {}
    for key, value in unwrap_model(model).state_dict().items():
        while key.startswith(_WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    return out


def _split_tied(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to store (each storage once: safetensors refuses shared tensors) and alias -> stored name."""
    stored, tied, seen = {}, {}, {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if t.numel() and ident in seen:
            tied[key] = seen[ident]
        else:
            seen[ident] = key
            stored[key] = t.detach().cpu().contiguous()
    return stored, tied


def _read_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The stored tensors with tied aliases restored (they share the stored tensor)."""
    state = {}
    with safe_open(ckpt / MODEL, framework="pt", device="cpu") as f:
        tied = json.loads((f.metadata() or {}).get("gptrain.tied", "{}"))
        for key in f.keys():
            state[key] = f.get_tensor(key)
    for alias, name in tied.items():
        state[alias] = state[name]
    return state


def load_model_weights(ckpt: str | os.PathLike) -> tuple[GPTConfig, dict[str, torch.Tensor], dict]:
    """(model config, state dict ready for `GPT.load_state_dict`, meta) of a checkpoint or a run's newest one."""
    found = find_checkpoint(ckpt)
    if found is None:
        raise GptrainError(f"run directory {ckpt} has no valid checkpoint under {CHECKPOINTS}/; train with "
                           "--save-every N, or pass a checkpoint directory")
    meta = json.loads((found / META).read_text())
    state = _read_weights(found)
    try:
        config = GPTConfig.from_dict(meta["model_config"])
    except (KeyError, TypeError, ValueError) as e:
        raise GptrainError(f"checkpoint {found}/{META} has no valid model_config ({e}); the checkpoint is not "
                           "from this version of gptrain") from None
    return config, state, meta


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gather_to_rank0(obj):
    """[obj of rank 0, obj of rank 1, ...] on rank 0, None elsewhere."""
    rank, world = _world()
    if world == 1:
        return [obj]
    out = [None] * world if rank == 0 else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def _broadcast_from_rank0(obj):
    rank, world = _world()
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
