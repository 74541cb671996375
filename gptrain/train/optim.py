"""AdamW with the lecture's parameter groups, and the learning-rate schedules.

Weight decay applies to tensors of two or more dimensions (matmul weights, embeddings) and never to biases or
LayerNorm gains, as in GPT-3 and the lecture. The fused AdamW kernel is used on CUDA, where it is faster.
"""

from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """[decayed ≥2-D params, undecayed <2-D params], each tied tensor once (named_parameters deduplicates)."""
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


def make_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, betas=(0.9, 0.95), eps=1e-8,
                   device_type: str = "cpu") -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps,
                             fused=device_type == "cuda")


def lr_at(step: int, *, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int,
          schedule: str = "cosine", decay_frac: float = 0.2) -> float:
    """Learning rate for optimizer step `step` (0-based).

    cosine (the lecture's formula): linear warm-up max_lr·(step+1)/warmup, then a half cosine from max_lr at
    `warmup_steps` to min_lr at `max_steps`, min_lr after.
    wsd (warmup-stable-decay): the same warm-up, max_lr until the last `decay_frac` of the steps, then linear to min_lr.
    """
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step > max_steps:
        return min_lr
    if schedule == "cosine":
        ratio = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)
    if schedule == "wsd":
        decay_start = max(warmup_steps, max_steps - int(round(decay_frac * max_steps)))
        if step < decay_start:
            return max_lr
        ratio = (step - decay_start) / max(1, max_steps - decay_start)
        return max_lr + ratio * (min_lr - max_lr)
    raise ValueError(f"unknown schedule {schedule!r}; choose cosine or wsd")
