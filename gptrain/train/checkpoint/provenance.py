"""What a checkpoint records about the code and the machine that made it."""

from __future__ import annotations

import platform
import subprocess
from functools import lru_cache
from pathlib import Path

import torch

from gptrain.devices import cpuinfo_field


@lru_cache(maxsize=1)
def git_revision() -> str | None:
    """The source tree's commit, when gptrain runs from a git checkout."""
    src = Path(__file__).resolve().parents[3]
    if not (src / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() or None


@lru_cache(maxsize=1)
def cpu_model() -> str:
    """The processor's name (/proc/cpuinfo's 'model name' on Linux), '' when unknown."""
    return cpuinfo_field("model name") or platform.processor() or ""


def machine() -> dict:
    """What a bit-for-bit continuation depends on besides the checkpoint: floating-point sums change with the
    number of threads, the torch version (its kernels) and the processor (its vector units)."""
    out = {"threads": torch.get_num_threads(), "torch": torch.__version__, "cpu": cpu_model()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["gpu"] = torch.cuda.get_device_name()
    return out


def machine_changes(saved: dict | None, now: dict) -> list[str]:
    """'threads 2 -> 1'-style differences between the machine a checkpoint was written on and this one."""
    saved = saved or {}
    return [f"{k} {saved[k]} -> {now.get(k)}" for k in ("threads", "torch", "cpu", "gpu")
            if k in saved and saved[k] != now.get(k)]
