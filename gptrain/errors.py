"""User-facing errors: one clear line that names the thing, the value and the fix; the CLI prints it without a traceback."""

from __future__ import annotations

import errno
import importlib
import os
import shutil
from pathlib import Path


class GptrainError(RuntimeError):
    """An error caused by the user's input or environment, with a message that says what to do."""


EXTRAS = {  # python module -> the pip extra that installs it
    "transformers": "hf",
    "huggingface_hub": "hf",
    "datasets": "data",
    "lm_eval": "eval",
    "matplotlib": "report",
    "fastapi": "serve",
    "uvicorn": "serve",
    "prometheus_client": "serve",
}


def require(module: str, purpose: str):
    """Import an optional dependency, or stop with a line naming the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRAS.get(module, module)
        raise GptrainError(f"{purpose} needs the optional package {module!r}: pip install 'gptrain[{extra}]'") from None


# ---------------------------------------------------------------- a full disk

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = ("no space left on device", "disk quota exceeded", "os error 28")


class DiskFullError(GptrainError):
    """A write failed for lack of space; `with_continuation` lets a caller that knows more say how to go on."""

    def __init__(self, directory: Path, needed: int | None, free: int | None, what: str, how_to_continue: str):
        self.directory, self.needed, self.free, self.what = directory, needed, free, what
        need = f"~{format_bytes(needed)} needed, " if needed else ""
        have = f"{format_bytes(free)} free" if free is not None else "free space unknown"
        super().__init__(f"the disk holding {directory} is full: writing {what} failed ({need}{have}); "
                         f"{how_to_continue}")

    def with_continuation(self, how_to_continue: str) -> "DiskFullError":
        return DiskFullError(self.directory, self.needed, self.free, self.what, how_to_continue)


def format_bytes(n: int | float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:,.0f} {unit}" if unit == "bytes" else f"{n:,.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free space for unprivileged writes on the filesystem holding `path` (or its nearest existing parent)."""
    p = Path(path).absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free
    except OSError:
        return None


def is_disk_full(exc: BaseException, directory: str | os.PathLike | None = None, needed: int = 0) -> bool:
    """Whether `exc` (or what it was raised from or during) is a full disk or quota. torch.save and safetensors
    wrap the OSError in their own exceptions; when the cause is lost, less free space than `needed` in
    `directory` decides."""
    seen = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _NO_SPACE:
            return True
        if any(t in str(seen).lower() for t in _NO_SPACE_TEXT):
            return True
        seen = seen.__cause__ or seen.__context__
    if directory is not None and needed > 0:
        free = free_bytes(directory)
        return free is not None and free < needed
    return False


RETRY_AFTER_FREEING = "free space there (or choose another directory) and run the same command again"


def disk_full(path: str | os.PathLike, needed_bytes: int | None, what: str,
              how_to_continue: str = RETRY_AFTER_FREEING) -> DiskFullError:
    """The one-line error for a write that ran out of space: which directory, how much was needed and is free,
    and how to continue. Raise it `from None` in place of the OSError/SafetensorError/RuntimeError."""
    directory = Path(path).absolute()
    return DiskFullError(directory, needed_bytes, free_bytes(directory), what, how_to_continue)
