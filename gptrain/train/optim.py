"""AdamW with the lecture's parameter groups, and the learning-rate schedules.

Weight decay applies to tensors of two or more dimensions (matmul weights, embeddings) and never to biases or
LayerNorm gains, as in GPT-3 and the lecture. The fused AdamW kernel is used on CUDA and on CPU: on CPU it updates
each tensor in one multi-threaded pass where the default loops over a dozen elementwise ops (~10 ms of the tiny
demo's ~210 ms step; benchmarks/RESULTS.md).

Each group carries an `lr_scale`: the trainer sets a group's lr to the schedule's value times it. It is 1 for
the lecture's two groups; `embedding_lr_scale` != 1 moves the token embedding (tied to the LM head) into a third
group of its own. Small models learn their token statistics mostly through that one matrix and gain from a
faster rate there (the CPU demo uses 5x: val loss 5.02 against 5.14 after 1,000 steps).
"""

from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float, embedding_lr_scale: float = 1.0) -> list[dict]:
    """[decayed ≥2-D params, undecayed <2-D params] (+ [token embedding] when its lr is scaled), each tied tensor
    once (named_parameters deduplicates)."""
    params = [p for _, p in model.named_parameters() if p.requires_grad]
    wte = model.transformer.wte.weight if embedding_lr_scale != 1.0 else None
    groups = [
        {"params": [p for p in params if p.dim() >= 2 and p is not wte], "weight_decay": weight_decay, "lr_scale": 1.0},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    if wte is not None:
        groups.append({"params": [wte], "weight_decay": weight_decay, "lr_scale": embedding_lr_scale})
    return groups


def make_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, betas=(0.9, 0.95), eps=1e-8,
                   embedding_lr_scale: float = 1.0, device_type: str = "cpu", fused: bool | None = None
                   ) -> torch.optim.AdamW:
    """`fused` defaults to on for CPU and CUDA (the lecture fuses on CUDA only; benchmarks/train_throughput.py
    passes that for its baseline)."""
    groups = param_groups(model, weight_decay, embedding_lr_scale)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    if fused is None:
        fused = device_type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


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
