"""AdamW with the lecture's parameter groups, and the learning-rate schedules.

Weight decay applies to tensors of two or more dimensions (matmul weights, embeddings) and never to biases or
LayerNorm gains, as in GPT-3 and the lecture. The fused AdamW kernel is used on CUDA and on CPU: on CPU it updates
each tensor in one multi-threaded pass where the default loops over a dozen elementwise ops (~10 ms of the tiny
demo's ~210 ms step; benchmarks/RESULTS.md).

Each group carries an `lr_scale`: the trainer sets a group's lr to the schedule's value times it. It is 1 for
the lecture's two groups; `embedding_lr_scale` != 1 moves the token embedding (tied to the LM head) into a third
group of its own. Small models learn their token statistics mostly through that one matrix and gain from a
faster rate there (the CPU demo uses 5x: val loss 5.02 against 5.14 after 1,000 steps).

`--optimizer muon` updates the blocks' hidden weight matrices (attention QKV and projection, MLP in and out) with
Muon, the momentum orthogonalized by Newton-Schulz (torch.optim.Muon's algorithm, tested equal to it), and everything else
(embeddings and the tied head, LayerNorms, biases) with the AdamW above. Both live in ONE `MuonAdamW` optimizer:
one param_groups list, one state keyed per parameter, torch's state_dict/load_state_dict, so checkpoints,
resuming and the schedule (each group's lr = schedule × lr_scale) treat it exactly as they treat AdamW. Under
FSDP a Muon matrix is a DTensor sharded on dim 0: its update is gathered whole (one matrix at a time),
orthogonalized identically on every rank, and each rank keeps its own rows; under DDP every rank computes it.
"""

from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float, embedding_lr_scale: float = 1.0,
                 exclude: list[torch.Tensor] = ()) -> list[dict]:
    """[decayed ≥2-D params, undecayed <2-D params] (+ [token embedding] when its lr is scaled), each tied tensor
    once (named_parameters deduplicates), without `exclude` (Muon's matrices)."""
    skip = {id(p) for p in exclude}
    params = [p for _, p in model.named_parameters() if p.requires_grad and id(p) not in skip]
    wte = model.transformer.wte.weight if embedding_lr_scale != 1.0 else None
    groups = [
        {"params": [p for p in params if p.dim() >= 2 and p is not wte], "weight_decay": weight_decay, "lr_scale": 1.0},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0},
    ]
    if wte is not None:
        groups.append({"params": [wte], "weight_decay": weight_decay, "lr_scale": embedding_lr_scale})
    return groups


def make_optimizer(model: torch.nn.Module, *, lr: float, weight_decay: float, betas=(0.9, 0.95), eps=1e-8,
                   embedding_lr_scale: float = 1.0, device_type: str = "cpu", fused: bool | None = None,
                   optimizer: str = "adamw", muon_lr: float = 0.02, muon_weight_decay: float = 0.0,
                   muon_momentum: float = 0.95, muon_adjust_lr: str = "original", muon_ns_dtype: str = "bfloat16"
                   ) -> torch.optim.Optimizer:
    """AdamW over `param_groups`, or with optimizer="muon" a MuonAdamW whose Muon group holds the hidden matrices.
    `fused` defaults to on for CPU and CUDA (the lecture fuses on CUDA only; benchmarks/train_throughput.py
    passes that for its baseline)."""
    if fused is None:
        fused = device_type in ("cpu", "cuda")
    hidden = hidden_matrices(model) if optimizer == "muon" else []
    groups = param_groups(model, weight_decay, embedding_lr_scale, exclude=hidden)
    for g in groups:
        g["lr"] = lr * g["lr_scale"]
    if optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)
    if optimizer != "muon":
        raise ValueError(f"unknown optimizer {optimizer!r}; choose adamw or muon")
    muon = {"params": hidden, "lr": muon_lr, "lr_scale": muon_lr / lr, "weight_decay": muon_weight_decay,
            "momentum": muon_momentum, "adjust_lr_fn": muon_adjust_lr}
    return MuonAdamW(groups, [muon], betas=betas, eps=eps, fused=fused, ns_dtype=muon_ns_dtype)


def hidden_matrices(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The 2-D weights inside the transformer blocks (QKV, attention projection, MLP in and out): Muon's share.
    Embeddings, the tied head, LayerNorms and biases stay with AdamW (Muon is for hidden layers only)."""
    return [p for name, p in model.named_parameters()
            if p.requires_grad and p.dim() == 2 and ".h." in f".{name}"]


def newton_schulz(g: torch.Tensor, coefficients, steps: int, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """torch.optim.Muon's orthogonalization (torch.optim._muon._zeropower_via_newtonschulz) with its dtype a
    parameter: torch's always computes in bf16, which rounds two runs whose gradients differ in the last float32
    bit (DDP's all-reduce against FSDP's reduce-scatter) to updates 2^-8 apart; a float32 run computes it in
    float32 and keeps FSDP = DDP to 1e-5 (tests/test_fsdp.py)."""
    a, b, c = coefficients
    x = g.to(dtype)
    tall = g.size(0) > g.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if tall else x


def adjusted_lr(lr: float, adjust: str, shape) -> float:
    """Muon's step size for a (rows, cols) matrix, as torch.optim.Muon scales it: "original" (Keller Jordan's)
    lr·sqrt(max(1, rows/cols)); "match_rms_adamw" (Moonshot's) lr·0.2·sqrt(max(rows, cols)), an update of AdamW's
    RMS, so AdamW's LR and weight decay carry over."""
    rows, cols = shape[:2]
    return lr * (math.sqrt(max(1, rows / cols)) if adjust == "original" else 0.2 * math.sqrt(max(rows, cols)))


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the groups marked "muon", AdamW on the rest, as one torch Optimizer (see the module docstring).

    The AdamW groups are stepped by a torch.optim.AdamW pointed at this optimizer's own groups and state before
    each step (load_state_dict replaces both, so the pointers are set again every time). The Muon update is
    torch.optim.Muon's: momentum buffer lerp (1 - momentum), Nesterov, Newton-Schulz (in bf16 as torch's, or
    float32 for a float32 run), decoupled weight decay lr × wd, step lr × adjust(shape); written out here to
    gather an FSDP shard's whole matrix and to choose that dtype."""

    def __init__(self, adamw_groups: list[dict], muon_groups: list[dict], *, betas=(0.9, 0.95), eps=1e-8,
                 fused: bool = False, nesterov: bool = True, ns_steps: int = 5,
                 ns_coefficients=(3.4445, -4.7750, 2.0315), ns_eps: float = 1e-7, ns_dtype: str = "bfloat16"):
        for g in muon_groups:
            if g["adjust_lr_fn"] not in ("original", "match_rms_adamw"):
                raise ValueError(f"unknown Muon LR adjustment {g['adjust_lr_fn']!r}")
            g.update(muon=True, nesterov=nesterov, ns_steps=ns_steps, ns_coefficients=tuple(ns_coefficients),
                     eps=ns_eps, ns_dtype=ns_dtype)
        # fills the AdamW groups' defaults (betas, eps, fused, ...) into their dicts
        self._adamw = torch.optim.AdamW(adamw_groups, betas=betas, eps=eps, fused=fused) if adamw_groups else None
        super().__init__(adamw_groups + muon_groups, defaults={})

    @torch.no_grad()
    def step(self, closure=None):
        """`found_inf` set (see `step_unless`): the fused AdamW kernel skips itself, and each Muon matrix and its
        momentum are put back where it is 1, all on the device."""
        if closure is not None:
            raise ValueError("MuonAdamW.step takes no closure")
        found_inf = getattr(self, "found_inf", None)
        if self._adamw is not None:
            self._adamw.param_groups = [g for g in self.param_groups if not g.get("muon")]
            self._adamw.state = self.state
            self._adamw.found_inf = found_inf
            self._adamw.step()
        for group in self.param_groups:
            if group.get("muon"):
                for p in group["params"]:
                    if p.grad is not None:
                        self._muon_update(p, group, found_inf)

    def _muon_update(self, p: torch.Tensor, group: dict, found_inf: torch.Tensor | None = None) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
        buf, mu, lr = state["momentum_buffer"], group["momentum"], group["lr"]
        before = None if found_inf is None else [_local(t).clone() for t in (buf, p)]
        buf.lerp_(p.grad, 1 - mu)
        update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
        sharded = hasattr(update, "full_tensor")  # an FSDP DTensor: orthogonalize the whole matrix
        ortho = newton_schulz(update.full_tensor() if sharded else update, group["ns_coefficients"],
                              group["ns_steps"], group["eps"], getattr(torch, group["ns_dtype"]))
        if sharded:
            from torch.distributed.tensor import distribute_tensor
            ortho = distribute_tensor(ortho, p.device_mesh, p.placements, src_data_rank=None)  # this rank's rows
        p.mul_(1 - lr * group["weight_decay"])
        p.add_(ortho, alpha=-adjusted_lr(lr, group["adjust_lr_fn"], p.shape))
        if before is not None:  # a skipped step: the momentum and the matrix as they were (a select, no sync)
            for t, old in zip((buf, p), before):
                _local(t).copy_(torch.where(found_inf > 0, old, _local(t)))


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of an FSDP DTensor (sharing its storage), or the tensor itself."""
    return t.to_local() if hasattr(t, "to_local") else t


def skips_on_device(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `step_unless` works for this optimizer: torch's fused AdamW kernels (CPU and CUDA) take GradScaler's
    `found_inf` and skip the update, restoring the step counter, without a host sync; MuonAdamW passes it on."""
    adamw_groups = [g for g in optimizer.param_groups if not g.get("muon")]
    return isinstance(optimizer, (torch.optim.AdamW, MuonAdamW)) and all(g.get("fused") for g in adamw_groups)


def step_unless(optimizer: torch.optim.Optimizer, skip: torch.Tensor) -> None:
    """optimizer.step(), a no-op where `skip` (a float32 0-dim tensor on the parameters' device, 1.0 or 0.0) is 1:
    the skip is decided on the device, so the step is queued without the host waiting for the values. With
    skip 0 the update is bit-for-bit the plain step's (tests/test_step_sync.py)."""
    optimizer.found_inf = skip
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


def lr_at(step: int, *, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int,
          schedule: str = "cosine", decay_frac: float = 0.2) -> float:
    """Learning rate for optimizer step `step` (0-based; the run's updates are steps 0 .. max_steps - 1).

    All three share the linear warm-up max_lr·(step+1)/warmup and give min_lr after the run.
    cosine: the lecture's formula, kept to the bit for its recipes: a half cosine from max_lr at `warmup_steps`
    to min_lr at step max_steps, one past the last update (whose LR is above min_lr by (max_lr - min_lr)·
    (1 - cos(π/(max_steps - warmup)))/2: 7e-9 of the range for gpt2-124m, 6e-7 for tiny).
    linear: max_lr falling in a straight line to exactly min_lr at the last update (min_lr may be 0: "linear
    decay to zero", arXiv 2502.15938).
    wsd (warmup-stable-decay): max_lr until the last `decay_frac` of the steps, then linear to exactly min_lr at
    the last update; a run can be extended, or a cooldown branched, from any checkpoint of the stable phase.
    """
    warm = max_lr * (step + 1) / warmup_steps if step < warmup_steps else None
    if schedule == "cosine":
        if warm is not None:
            return warm
        if step > max_steps:
            return min_lr
        ratio = (step - warmup_steps) / max(1, max_steps - warmup_steps)
        return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)
    if schedule in ("linear", "wsd"):
        last = max_steps - 1
        if step >= last:
            return min_lr
        if warm is not None:
            return warm
        start = warmup_steps if schedule == "linear" else max(warmup_steps, last - round(decay_frac * max_steps))
        if step < start:
            return max_lr
        return max_lr + (step - start) / max(1, last - start) * (min_lr - max_lr)
    raise ValueError(f"unknown schedule {schedule!r}; choose cosine, linear or wsd")
