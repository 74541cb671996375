"""What the hardware computes well: the one place that decides whether this CPU has native bfloat16, and so which
dtype inference runs in by default, and which attention kernel suits short windows on CPU."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

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


MATH_ATTENTION_MAX_T = 128  # measured crossover on CPU: math 1.9x faster than flash at T=128, 0.9x at T=256


def attention_kernels(device_type: str, seq_len: int, compiled: bool = False):
    """A context that picks scaled_dot_product_attention's kernel for an eager training or evaluation pass.

    On CPU at windows of up to 128 tokens the math kernel (matmul, softmax, matmul) runs a Block's attention
    forward and backward ~1.9x faster than the flash kernel the dispatcher picks (tiny demo shape: 3.1 vs 5.9 ms a
    layer; benchmarks/RESULTS.md); from 256 tokens flash wins. Elsewhere, and under torch.compile, the default.
    """
    if device_type == "cpu" and seq_len <= MATH_ATTENTION_MAX_T and not compiled:
        return sdpa_kernel([SDPBackend.MATH])
    return contextlib.nullcontext()
