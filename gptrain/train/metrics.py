"""What a run reports: one console line per step with a progress bar and ETA, RUN/metrics.jsonl, and optional
TensorBoard / Weights & Biases writers (used only when installed and asked for).

metrics.jsonl holds one JSON object per event: `{"step", "train_loss", "lr", "grad_norm", "tokens_per_sec", ...}`
per step, `{"step", "val_loss"}` per evaluation, `{"step", "samples": [...]}` per sampling round. Floats are
written with `json`'s shortest round-trip repr, so losses read back bit for bit.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import torch

from gptrain.errors import GptrainError, disk_full, is_disk_full

# Dense bf16 peak FLOP/s per GPU (vendor data sheets), for MFU; the first key found in the device name wins, so
# variants come before their family. Unknown GPUs print no MFU.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100 NVL": 835e12, "H100": 989e12, "A100": 312e12,
                   "A10G": 125e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12}
# The peak of other dtypes as a fraction of bf16's, on every GPU above: a float32 run's matmuls run as TF32 (the
# trainer enables it on CUDA), whose dense tensor-core peak is half bf16's.
PEAK_FRACTION = {torch.bfloat16: 1.0, torch.float16: 1.0, torch.float32: 0.5}


def peak_flops(device: str, dtype: torch.dtype = torch.bfloat16) -> float | None:
    """The device's dense peak FLOP/s for matmuls in `dtype` (the run's autocast dtype, float32 without)."""
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    bf16 = next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)
    return None if bf16 is None else bf16 * PEAK_FRACTION[dtype]


def format_duration(seconds: float) -> str:
    s = int(max(0, seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def step_line(m: dict, max_steps: int, eta_s: float | None) -> str:
    """One line per step: progress bar, step, loss, lr, grad norm, time, tokens/s, MFU, ETA."""
    done = (m["step"] + 1) / max(1, max_steps)
    bar = "#" * int(10 * done) + "." * (10 - int(10 * done))
    parts = [f"[{bar}] step {m['step'] + 1:>6}/{max_steps}", f"loss {m['train_loss']:.6f}", f"lr {m['lr']:.3e}",
             f"norm {m['grad_norm']:.4f}", f"{m['ms']:.0f} ms", f"{m['tokens_per_sec']:,.0f} tok/s"]
    if m.get("mfu") is not None:
        parts.append(f"mfu {100 * m['mfu']:.1f}%")
    if eta_s is not None:
        parts.append(f"eta {format_duration(eta_s)}")
    return " | ".join(parts)


def _optional(module: str, flag: str):
    """Writers that are never dependencies: asked for but absent is one line saying what to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise GptrainError(f"{flag} needs the package {module!r}, which is not installed: pip install {module}") from None


class MetricsLog:
    """Appends events to RUN/metrics.jsonl (rank 0 only; other ranks get a log that writes nothing). It never
    truncates: a fresh run finds no log (the Checkpointer moved an earlier one aside), a resumed one appends."""

    def __init__(self, run_dir: str | os.PathLike | None, *, enabled: bool = True,
                 tensorboard: bool = False, wandb_project: str | None = None, config: dict | None = None):
        self.enabled = enabled and run_dir is not None
        self._file = None
        self._tb = self._wandb = None
        if not self.enabled:
            return
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        self.path = run_dir / "metrics.jsonl"
        if tensorboard:
            _optional("tensorboard", "--tensorboard")
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(run_dir / "tb"))
        if wandb_project:
            self._wandb = _optional("wandb", "--wandb-project")
            self._wandb.init(project=wandb_project, config=config, dir=str(run_dir))
        self._file = open(self.path, "a")

    def log(self, event: dict) -> None:
        if not self.enabled:
            return
        line = json.dumps(event) + "\n"
        try:
            self._file.write(line)
            self._file.flush()
        except OSError as e:
            if is_disk_full(e):
                raise disk_full(self.path.parent, len(line), str(self.path)) from None
            raise
        scalars = {k: v for k, v in event.items() if isinstance(v, (int, float)) and k != "step"}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, event["step"])
        if self._wandb is not None and scalars:
            self._wandb.log(scalars, step=event["step"])

    def close(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except OSError as e:  # the failed flush of a full disk was reported by log() already
                if not is_disk_full(e):
                    raise
            self._file = None
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


class Clock:
    """Step timing and ETA from the mean of recent steps (the first, compile-heavy steps drop out)."""

    def __init__(self, window: int = 20):
        self.window, self.times = window, []

    def lap(self, seconds: float) -> None:
        self.times = (self.times + [seconds])[-self.window:]

    def eta(self, steps_left: int) -> float | None:
        return sum(self.times) / len(self.times) * steps_left if self.times else None


def console(line: str) -> None:
    print(line, file=sys.stdout, flush=True)

