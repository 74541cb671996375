"""Whether a checkpoint directory is complete and intact, and which checkpoint a path names."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from gptrain.errors import GptrainError
from gptrain.train.checkpoint.sharded import DCP_METADATA
from gptrain.train.checkpoint.layout import (CHECKPOINTS, FORMAT, MANIFEST, META, MODEL, _STEP_DIR,
                                             list_checkpoints, warn)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


_verified: dict[str, tuple] = {}  # path -> file signature when last verified (hash each file once per process)


def _signature(ckpt: Path, names) -> tuple:
    sig = []
    for name in [MANIFEST, *names]:
        st = (ckpt / name).stat()
        sig.append((name, st.st_size, st.st_mtime_ns))
    return tuple(sig)


def verify_checkpoint(ckpt: str | os.PathLike, full: bool = True) -> str | None:
    """None when `ckpt` is complete and intact, else the reason it is not. `full=False` skips the hashes."""
    ckpt = Path(ckpt)
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
        files = manifest["files"]
        if (manifest.get("format") != FORMAT or not isinstance(files, dict)
                or not all(isinstance(e, dict) and "/" not in n and n not in ("..", MANIFEST) for n, e in files.items())):
            return f"{MANIFEST} is not a gptrain checkpoint manifest"
    except FileNotFoundError:
        return f"no {MANIFEST} (the save did not finish)"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    for required in (MODEL if MODEL in files else DCP_METADATA, META):
        if required not in files:
            return f"{MANIFEST} does not list {required}"
    try:
        sig = _signature(ckpt, files)
    except OSError as e:
        return f"missing file {Path(e.filename).name}"
    for name, entry in files.items():
        size = (ckpt / name).stat().st_size
        if size != entry.get("bytes"):
            return f"{name} has {size} bytes, the manifest says {entry.get('bytes')} (truncated or altered)"
    if not full or _verified.get(str(ckpt)) == sig:
        return None
    for name, entry in files.items():
        digest = _sha256(ckpt / name)
        if digest != entry.get("sha256"):
            return f"{name} has sha256 {digest[:12]}..., the manifest says {str(entry.get('sha256'))[:12]}... (corrupted)"
    _verified[str(ckpt)] = sig
    return None


def gathered_format(ckpt: Path) -> bool:
    """Whether a (verified) checkpoint is of the gathered format of earlier versions (model.safetensors and
    optimizer.pt) rather than sharded: what its manifest lists decides."""
    return MODEL in json.loads((Path(ckpt) / MANIFEST).read_text())["files"]


def _is_checkpoint_dir(path: Path) -> bool:
    return bool(_STEP_DIR.match(path.name)) or (path / MANIFEST).exists() or (path / MODEL).exists()


def find_checkpoint(path: str | os.PathLike) -> Path | None:
    """The checkpoint `path` names: a checkpoint directory (must be valid), or a run directory (or its
    checkpoints/ folder), whose newest valid checkpoint is returned, skipping broken ones with a warning.
    None when a run directory has no valid checkpoint."""
    path = Path(path)
    if not path.exists():
        raise GptrainError(f"checkpoint or run directory {path} does not exist; pass a run directory (--out of a "
                           "training run) or one of its checkpoints/step_XXXXXXXX directories")
    if _is_checkpoint_dir(path):
        reason = verify_checkpoint(path)
        if reason:
            raise GptrainError(f"checkpoint {path} is not usable: {reason}; pass its run directory to use the "
                               "newest valid checkpoint instead")
        return path
    run_dir = path.parent if path.name == CHECKPOINTS else path
    for ckpt in reversed(list_checkpoints(run_dir)):
        reason = verify_checkpoint(ckpt)
        if reason is None:
            return ckpt
        warn(f"skipping checkpoint {ckpt}: {reason}; trying the one before it")
    return None
