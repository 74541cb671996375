"""What the hardware computes well: the one place that decides whether this CPU has native bfloat16, and so which
dtype inference runs in by default, which attention kernel suits short windows on CPU, and which library runs the
LM head's big matmuls on this CPU."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # x86 flags (Linux /proc/cpuinfo) for bf16 dot products in hardware


CPUINFO = "/proc/cpuinfo"


def cpuinfo_field(name: str, cpuinfo: str | Path = CPUINFO) -> str:
    """The first processor's `name` line of /proc/cpuinfo ('model name', 'vendor_id', 'flags'); '' where there is
    none or the file cannot be read (not Linux)."""
    try:
        text = Path(cpuinfo).read_text(errors="replace")
    except OSError:
        return ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == name:
            return value.strip()
    return ""


def native_bf16(cpuinfo: str | Path = CPUINFO) -> bool:
    """True when the CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX). Elsewhere bf16 matmuls are emulated
    and slower than float32, so float32 is the better default there. False where cpuinfo cannot be read."""
    flags = set(cpuinfo_field("flags", cpuinfo).split())
    return any(f in flags for f in BF16_CPU_FLAGS)


def onednn_lm_head(cpuinfo: str | Path = CPUINFO) -> bool:
    """Whether the chunked loss (gptrain/loss.py) runs the LM head's three (rows x C x 50,257) matmuls through
    oneDNN's linear rather than `torch.mm` on this CPU: a choice by vendor, fixed per machine, so that a resumed run
    takes the kernels of the uninterrupted one. Measured on both machine kinds (benchmarks/RESULTS.md): on AMD EPYC
    oneDNN's linear is 1.2-1.8x faster in float32 (torch.mm goes to MKL, whose fast paths are for Intel CPUs) and
    ~1.1x in bf16; on Intel Xeon torch.mm is faster (float32 logits 44 vs 68 ms per 1,024 rows; bf16 through
    oneDNN's matmul with AMX) and needs no transposed copy of the weight: the tiny step 1.08x -> 1.27x (float32) and
    1.76x -> 1.86x (bf16) the HF baseline's speed. Other CPUs keep oneDNN, as measured on AMD."""
    return cpuinfo_field("vendor_id", cpuinfo) != "GenuineIntel"


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


def deterministic_algorithms(on: bool) -> None:
    """--deterministic: PyTorch's deterministic algorithms (the embedding's backward without atomic adds, ...;
    an op with no deterministic version warns once instead of stopping the run), cuBLAS's fixed workspace (set
    before the first cuBLAS call: `gptrain train` sets it when the run starts), and no autotuning (cuDNN's
    benchmark mode, inductor's max-autotune), which picks kernels by timing and so differs between processes."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on, warn_only=True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = on
    try:
        from torch._inductor import config as inductor
    except ImportError:
        return
    if on:
        inductor.max_autotune = False
        inductor.max_autotune_gemm = False
        if hasattr(inductor, "deterministic"):
            inductor.deterministic = True
