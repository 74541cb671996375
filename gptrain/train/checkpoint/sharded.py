"""Model and optimizer tensors in and out of a checkpoint through torch.distributed.checkpoint (DCP), sharded.

Every rank writes the tensors it holds: under FSDP its shards (DTensors), under DDP or one process the whole
model, which DCP deduplicates so that each replicated tensor is written once, by one rank. Nothing is gathered.
Loading reshards: DCP reads into whatever this run's ranks hold, so a checkpoint written at world size W by
either parallelism resumes at any other. One process without a cluster reads the model's tensors only, one
by one (`read_model_tensors`), never the optimizer's.

Only tensors go through DCP: the optimizer's param_groups and any non-tensor state travel with the rest of the
run state (torch.load(weights_only=True)), since DCP reads non-tensor values with a full unpickler. DCP's own
`.metadata` is a pickle too; it is read here with an unpickler that admits only DCP's metadata classes, torch
sizes, dtypes and layouts (`SafeReader`), so a checkpoint from elsewhere cannot run code when it is opened.
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import CheckpointException, FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.metadata import StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)

from gptrain.errors import GptrainError

DCP_METADATA = ".metadata"
# Without a process group DCP warns on every call that it assumes one process, which is what gptrain means.
warnings.filterwarnings("ignore", message=r"torch\.distributed is (disabled, )?unavailable or uninitialized, "
                                          r"assuming the intent is to (save|load) in a single process")
_ALLOWED = {
    "torch.distributed.checkpoint.metadata": {"Metadata", "TensorStorageMetadata", "BytesStorageMetadata",
                                              "TensorProperties", "ChunkStorageMetadata", "MetadataIndex",
                                              "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if name in _ALLOWED.get(module, ()) or (module == "torch" and (
                name == "Size" or isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                           torch.memory_format)))):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a checkpoint's metadata")


class SafeReader(FileSystemReader):
    """DCP's file reader, with `.metadata` read by an unpickler that builds only metadata (see the docstring)."""

    def read_metadata(self, *args, **kwargs):
        path = Path(self.path) / DCP_METADATA
        try:
            with open(path, "rb") as f:
                metadata = _MetadataUnpickler(f).load()
        except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
            raise GptrainError(f"{path} is not a torch.distributed.checkpoint metadata file ({e})") from None
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


def _split(optimizer_state: dict) -> tuple[dict, dict]:
    """(tensors by parameter name and key: what DCP stores, everything else: param_groups, non-tensor state)."""
    tensors = {name: {k: v for k, v in st.items() if torch.is_tensor(v)}
               for name, st in optimizer_state["state"].items()}
    rest = {"param_groups": optimizer_state["param_groups"],
            "state": {name: {k: v for k, v in st.items() if not torch.is_tensor(v)}
                      for name, st in optimizer_state["state"].items()}}
    return tensors, rest


def state_to_save(model: torch.nn.Module, optimizer, aliases: dict[str, str]) -> tuple[dict, dict | None]:
    """({"model": tensors, "optim": tensors} as this rank holds them, the optimizer's non-tensor part; None for an
    optimizer that never stepped, which has no state: asking torch for one would create it with a zero step)."""
    weights = {k: v for k, v in get_model_state_dict(model).items() if k not in aliases}  # a tied tensor once
    if not optimizer.state:
        return {"model": weights}, None
    tensors, rest = _split(get_optimizer_state_dict(model, optimizer))
    return {"model": weights, "optim": tensors}, rest


def writer(path: Path) -> FileSystemWriter:
    return FileSystemWriter(path, single_file_per_rank=True, sync_files=True, overwrite=True)


def save(state: dict, path: Path, process_group, asynchronous: bool):
    """Write `state` under `path` (each rank its part); asynchronous: stage it in CPU memory, write it in a
    background thread and return the future (wait for it with `result`)."""
    with _own_exceptions():
        if asynchronous:
            return dcp.async_save(state, storage_writer=writer(path), process_group=process_group, no_dist=_alone())
        dcp.save(state, storage_writer=writer(path), process_group=process_group, no_dist=_alone())
    return None


def result(future) -> None:
    """Wait for an asynchronous save's future."""
    with _own_exceptions():
        future.result()


@contextlib.contextmanager
def _own_exceptions():
    """DCP reports failures as a CheckpointException (a BaseException listing each rank's): raise the first
    rank's own exception instead, so that a full disk is an OSError like any other write's."""
    try:
        yield
    except CheckpointException as e:
        failures = [exc for exc, _ in e.failures.values()] if e.failures else []
        raise (failures[0] if failures else RuntimeError(str(e).splitlines()[0])) from None


def _alone() -> bool:
    """No process group: DCP is told so (else it warns on every call that it assumes one process)."""
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


def load(model: torch.nn.Module, optimizer, path: Path, aliases: dict[str, str], rest: dict | None,
         process_group) -> None:
    """Restore model (and, when `rest` is given, optimizer) state from the checkpoint at `path`, each rank reading
    the parts it holds in this run's layout."""
    weights = {k: v for k, v in get_model_state_dict(model).items() if k not in aliases}
    state = {"model": weights}
    if rest is not None:
        tensors, _ = _split(get_optimizer_state_dict(model, optimizer))  # the template: this run's shards
        state["optim"] = tensors
    with _own_exceptions():
        dcp.load(state, storage_reader=SafeReader(path), process_group=process_group, no_dist=_alone())
    set_model_state_dict(model, weights, options=StateDictOptions(strict=False))  # tied aliases are not listed
    if rest is not None:
        merged = {"param_groups": rest["param_groups"],
                  "state": {name: {**rest["state"].get(name, {}), **t} for name, t in state["optim"].items()}}
        set_optimizer_state_dict(model, optimizer, merged)


def read_model_tensors(path: Path, aliases: dict[str, str]) -> dict[str, torch.Tensor]:
    """The model's full tensors from a sharded checkpoint, in this one process (no process group is used, even
    when one exists), tied aliases restored; the optimizer's tensors are not read."""
    reader = SafeReader(path)
    weights = {}
    for key, md in reader.read_metadata().state_dict_metadata.items():
        if key.startswith("model.") and isinstance(md, TensorStorageMetadata):
            weights[key[len("model."):]] = torch.empty(md.size, dtype=md.properties.dtype)
    with _own_exceptions():
        dcp.load({"model": weights}, storage_reader=reader, no_dist=True)
    for alias, name in aliases.items():
        weights[alias] = weights[name]
    return weights
