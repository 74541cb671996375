"""Model and optimizer state of a run: the unwrapped model and its tied names, the weights of a checkpoint for
commands that read one (`load_model_weights`), and the gathered format of earlier versions.

Weights are stored unwrapped (no DDP `module.` / compile `_orig_mod.` prefixes), a tied tensor once; the optimizer
state is keyed by parameter name, not by position, so it means the same under any wrapping. The current format is
sharded (`sharded`); checkpoints of earlier versions hold full tensors (model.safetensors, optimizer.pt) that rank 0
reads and broadcasts on resume, each rank keeping its part (broadcast_from_rank0), so they resume under any
parallelism and world size too.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, set_optimizer_state_dict

from gptrain.errors import GptrainError
from gptrain.model import GPTConfig
from gptrain.train.checkpoint import sharded
from gptrain.train.checkpoint.layout import CHECKPOINTS, META, MODEL
from gptrain.train.checkpoint.verify import find_checkpoint, gathered_format


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain model inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers (an FSDP model is its own)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def _load_options() -> StateDictOptions:
    return StateDictOptions(full_state_dict=True, broadcast_from_rank0=_world()[1] > 1)


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """{alias: stored name} for parameters registered under several names (the LM head tied to the embedding)."""
    first, aliases = {}, {}
    for name, p in unwrap_model(model).named_parameters(remove_duplicate=False):
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def load_model_state(model: torch.nn.Module, read) -> None:
    """Load full weights: rank 0 calls `read()` for them and broadcasts each tensor; each rank keeps its part."""
    state = read() if _world()[0] == 0 else {}
    set_model_state_dict(unwrap_model(model), state, options=_load_options())


def load_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, read, source: str) -> None:
    """Load a gathered optimizer state: rank 0 calls `read()` for it and broadcasts it. The oldest checkpoints
    keyed it by position in this run's parameter groups: converted by name first. Every rank learns whether it
    fit."""
    message, state = None, read() if _world()[0] == 0 else None
    if state is not None:
        try:
            state = _keyed_by_name(state, model, optimizer)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            message = str(e)
    message = _broadcast_from_rank0(message)
    empty = _broadcast_from_rank0(state is not None and not state["state"])
    if message is None and not empty:  # a saved optimizer that never stepped: the fresh one equals it
        try:
            set_optimizer_state_dict(unwrap_model(model), optimizer, state or {}, options=_load_options())
            del state
        except (ValueError, KeyError, RuntimeError) as e:
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
    if message is not None:
        raise GptrainError(f"{source} does not fit this run's optimizer ({message}); resume with the settings the "
                           "run started with")


def _param_names(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in unwrap_model(model).named_parameters()}


def _keyed_by_name(state: dict, model, optimizer) -> dict:
    """The saved state keyed by parameter name (a file of earlier versions, optimizer.state_dict() with integer ids
    in this run's group order, is converted), after checking that it groups the parameters as this run does."""
    groups = optimizer.param_groups
    sizes = [len(g["params"]) for g in state["param_groups"]]
    if sizes != [len(g["params"]) for g in groups]:
        raise ValueError(f"parameter groups of sizes {sizes}, this run has {[len(g['params']) for g in groups]}: "
                         "was --embedding-lr-scale changed?")
    names = _param_names(model)
    if not all(isinstance(i, str) for g in state["param_groups"] for i in g["params"]):
        order = [names[id(p)] for g in groups for p in g["params"]]
        by_id = {i: order[n] for n, i in enumerate(i for g in state["param_groups"] for i in g["params"])}
        state = {"state": {by_id[i]: v for i, v in state["state"].items()},
                 "param_groups": [{**g, "params": [by_id[i] for i in g["params"]]} for g in state["param_groups"]]}
    if [sorted(g["params"]) for g in state["param_groups"]] != [sorted(names[id(p)] for p in g["params"]) for g in groups]:
        raise ValueError("its parameter groups hold other parameters than this run's")
    return state


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
    state = _read_weights(found) if gathered_format(found) else sharded.read_model_tensors(found, meta.get("tied", {}))
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


def _broadcast_from_rank0(obj):
    rank, world = _world()
    if world == 1:
        return obj
    box = [obj if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
