"""What the hardware computes well: the one place that decides whether this CPU has native bfloat16, and so which
dtype inference runs in by default."""

from __future__ import annotations

from pathlib import Path

import torch

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 flags (Linux /proc/cpuinfo) for bf16 dot products in hardware


def native_bf16(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """True when the CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX). Elsewhere bf16 matmuls are emulated
    and slower than float32, so float32 is the better default there. False where cpuinfo cannot be read."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = set(line.partition(":")[2].split())
            return any(f in flags for f in BF16_CPU_FLAGS)
    return False


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def inference_dtype(device: str, choice: str = "auto") -> torch.dtype:
    """The dtype to serve or sample in: `choice` (float32 | bfloat16), or for auto bfloat16 on CUDA GPUs that
    support it and on CPUs with native bf16, float32 otherwise (MPS included)."""
    if choice != "auto":
        return DTYPES[choice]
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    if kind == "cpu" and native_bf16():
        return torch.bfloat16
    return torch.float32
