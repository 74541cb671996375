"""`TrainConfig`: every option of a training run in one typed dataclass, and the named recipes (presets).

Flags are generated from the fields (gptrain.config.add_dataclass_args), so `--micro-batch-size 8` exists because
`micro_batch_size` does. A preset is a set of field values; flags the user passes override it, and the fully
resolved result (model shape included) is written to RUN/config.json. Each number carries its range (`ge`/`gt`/
`le`/`lt`, checked when the flag is parsed and by `validate`); `runtime=True` marks what may change when the same
run continues (how it executes, not what it trains); re-running a command with any other field changed is refused.
`numerics=True` marks the runtime fields that change floating-point results (a resume names their changes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path


def _f(default, help: str, **meta):
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class TrainConfig:
    # --- what to train on and where to write
    data: str | None = _f(None, "prepared data directory (gptrain prepare ... --out DIR)")
    out: str | None = _f(None, "run directory: config.json, metrics.jsonl, checkpoints", runtime=True)
    init_from: str | None = _f(None, "start from these weights: HF directory, hub name, gptrain run or checkpoint, "
                               "llm.c model .bin")
    # --- model shape (None: the model preset's value)
    model: str | None = _f("gpt2", "model shape preset (gptrain.model.PRESETS); recorded as null with --init-from, "
                                   "whose model fixes the shape")
    n_layer: int | None = _f(None, "override the number of layers", ge=1, le=1024)
    n_head: int | None = _f(None, "override the number of attention heads", ge=1, le=1024)
    n_embd: int | None = _f(None, "override the embedding width", ge=1, le=1 << 17)
    # --- batch and length
    seq_len: int = _f(1024, "tokens per sequence (T)", ge=1)
    micro_batch_size: int = _f(64, "sequences per forward pass per process (B)", ge=1)
    total_batch_size: int = _f(524288, "tokens per optimizer step; must be a multiple of B*T*world_size", ge=1)
    max_steps: int = _f(19073, "optimizer steps (0: derive from --epochs and the data size)", ge=0)
    epochs: float = _f(0.0, "train for this many passes over the data instead of --max-steps (when > 0)", ge=0,
                        le=1e6)
    # --- optimizer and schedule
    lr: float = _f(6e-4, "maximum learning rate", gt=0, le=1)
    min_lr_ratio: float = _f(0.1, "minimum learning rate as a fraction of --lr", ge=0, le=1)
    warmup_steps: int = _f(715, "linear warm-up steps", ge=0)
    schedule: str = _f("cosine", "learning-rate schedule after the warm-up: cosine (the lecture's, to --min-lr-ratio "
                                 "at the end), linear (straight down to --min-lr-ratio at the last step), wsd "
                                 "(constant, then linear down over the last --decay-frac)",
                       choices=("cosine", "linear", "wsd"))
    decay_frac: float = _f(0.2, "wsd: fraction of the steps spent decaying at the end", ge=0, le=1)
    weight_decay: float = _f(0.1, "AdamW weight decay (applied to 2-D weights only)", ge=0)
    beta1: float = _f(0.9, "AdamW beta1", ge=0, lt=1)
    beta2: float = _f(0.95, "AdamW beta2", ge=0, lt=1)
    eps: float = _f(1e-8, "AdamW epsilon", gt=0)
    optimizer: str = _f("adamw", "adamw (every parameter), or muon: Muon on the blocks' weight matrices and AdamW "
                                 "(the flags above) on embeddings, LayerNorms and biases", choices=("adamw", "muon"))
    muon_lr: float = _f(0.02, "muon: peak learning rate of the Muon matrices (follows --schedule like --lr)", gt=0,
                        le=10)
    muon_weight_decay: float = _f(0.0, "muon: decoupled weight decay of the Muon matrices (per step: lr × this)",
                                  ge=0)
    muon_momentum: float = _f(0.95, "muon: momentum (Nesterov)", ge=0, lt=1)
    muon_adjust_lr: str = _f("original", "muon: update scale by matrix shape: original (sqrt(max(1, rows/cols)), "
                                         "Keller Jordan's) or match_rms_adamw (0.2·sqrt(max(rows, cols)), Moonshot's: "
                                         "AdamW's LR and weight decay carry over)",
                             choices=("original", "match_rms_adamw"))
    grad_clip: float = _f(1.0, "clip the global gradient norm to this (0: off)", ge=0)
    embedding_lr_scale: float = _f(1.0, "the token embedding's (tied LM head's) learning rate as a multiple of the "
                                        "schedule's (1: the lecture's single rate)", gt=0)
    # --- numerics and speed
    device: str = _f("auto", "cpu, cuda, mps or auto", choices=("auto", "cpu", "cuda", "mps"), runtime=True,
                     numerics=True)
    dtype: str = _f("auto", "autocast dtype: auto (the run's own when --out holds one; else bfloat16 on CUDA and "
                            "on CPUs with native bf16, float32 elsewhere)",
                    choices=("auto", "float32", "bfloat16"))
    compile: bool | None = _f(None, "torch.compile the model (default: on for CUDA, off elsewhere)", runtime=True,
                              numerics=True)
    deterministic: bool = _f(False, "CUDA: deterministic algorithms (torch.use_deterministic_algorithms, the cuBLAS "
                                    "workspace setting, no autotuning), so that a GPU run repeats itself; slower. "
                                    "CPU runs are deterministic without it", runtime=True, numerics=True)
    # numerics too, but 0 is "torch's default": the checkpoint's machine record compares the count actually used
    threads: int = _f(0, "CPU threads for torch (0: torch's default)", ge=0, le=4096, runtime=True)
    # --- parallelism and memory (how a run executes, not what it trains: a resumed run may change them)
    parallel: str = _f("ddp", "data parallelism under torchrun: ddp (every process holds the whole model) or fsdp "
                              "(parameters, gradients and optimizer state sharded across processes)",
                       choices=("ddp", "fsdp"), runtime=True, numerics=True)
    reshard_after_forward: bool = _f(True, "fsdp: free each Block's gathered parameters after its forward and gather "
                                           "them again for backward (--no-reshard-after-forward: keep them, less "
                                           "communication, more memory)", runtime=True)
    fsdp_shard_size: int = _f(0, "fsdp: shard inside groups of this many processes and replicate across groups "
                                 "(hybrid sharding, e.g. the GPUs of one node); 0: shard over all processes",
                              ge=0, runtime=True, numerics=True)
    activation_checkpointing: str = _f("none", "recompute activations in backward instead of keeping them: none or "
                                               "blocks (each transformer Block)",
                                       choices=("none", "blocks"), runtime=True)
    reduce_scatter: str = _f("auto", "fsdp with gradient accumulation: reduce-scatter gradients on the last "
                                     "micro-step only (last: each rank holds the whole model's float32 gradient "
                                     "meanwhile), on every micro-step (every: only the shard is kept, more "
                                     "communication), or auto (every when the plan says the run does not fit "
                                     "otherwise)", choices=("auto", "last", "every"), runtime=True, numerics=True)
    dist_timeout: float = _f(60.0, "minutes a process waits in a collective (e.g. while rank 0 writes a checkpoint) "
                                   "before the job fails; size it for the slowest checkpoint save", gt=0,
                             runtime=True)
    plan: bool = _f(False, "print the per-process memory plan (parameters, gradients, optimizer state, activations, "
                           "the largest micro-batch that fits) and exit without training", runtime=True)
    memory: str | None = _f(None, "memory per process the plan must fit, e.g. 80GB (GB = GiB = 2^30 bytes); default "
                                  "on CUDA: the GPU's. A run that does not fit stops before its first step",
                            runtime=True)
    plan_world_size: int = _f(0, "with --plan: plan for this many processes (0: this launch's)", ge=0, runtime=True)
    # --- data order
    shuffle: bool = _f(True, "reshuffle the training data every epoch (--no-shuffle: the lecture's sequential order)")
    seed: int = _f(1337, "seed for initialisation, data order and sampling", ge=0, lt=2**32)
    # --- in-loop evaluation (0 disables each)
    eval_every: int = _f(250, "steps between validation-loss (and HellaSwag) evaluations; 0: off", ge=0, runtime=True)
    val_tokens: int = _f(10485760, "validation token budget per evaluation", ge=0, runtime=True)
    hellaswag_data: str | None = _f(None, "HellaSwag for in-loop accuracy: a val .jsonl[.gz], 'auto' (official file, "
                                          "downloaded once into the cache) or none (off)", runtime=True)
    hellaswag_limit: int = _f(0, "score only the first N HellaSwag examples (0: all)", ge=0, runtime=True)
    sample_every: int = _f(250, "steps between text samples; 0: off", ge=0, runtime=True)
    sample_tokens: int = _f(32, "new tokens per sample", ge=1, runtime=True)
    sample_prompt: str | None = _f(None, "prompt the in-loop samples continue (none: the start of the first validation "
                                          "document, a few words, so the prompt fits the data)", runtime=True)
    num_samples: int = _f(4, "samples per sampling round", ge=1, le=1024, runtime=True)
    log_every: int = _f(1, "steps between console lines (0: none)", ge=0, runtime=True)
    tensorboard: bool = _f(False, "also write TensorBoard events to RUN/tb (needs tensorboard installed)", runtime=True)
    wandb_project: str | None = _f(None, "also log to this Weights & Biases project (needs wandb installed)",
                                   runtime=True)
    # --- checkpoints and resilience (issue 5 owns the behaviour; the flags live here)
    save_every: int = _f(5000, "steps between checkpoints; 0: only at the end", ge=0, runtime=True)
    keep_last: int = _f(3, "keep the newest K checkpoints (0: keep all)", ge=0, runtime=True)
    keep_every: int = _f(0, "also keep every checkpoint whose step is a multiple of M permanently; 0: none", ge=0,
                        runtime=True)
    keep_best: str = _f("saved", "RUN/checkpoints/best, a copy of the checkpoint with the lowest val loss, kept whatever "
                                 "--keep-last says: saved (among the checkpoints saved anyway: free, exact when "
                                 "--save-every is a multiple of --eval-every), eval (also save at an evaluation that "
                                 "improves on it: exact, a save each time) or off",
                         choices=("saved", "eval", "off"), runtime=True)
    async_save: bool = _f(False, "write checkpoints in the background: each rank's shards are copied to CPU memory "
                                 "(one more copy of its model and optimizer shards) and training goes on while "
                                 "they are written; at most one save in flight, the run's end waits for it",
                          runtime=True)
    resume: str | None = _f(None, "none (default): continue the run in --out when it holds checkpoints of the same "
                                  "settings, refusing (naming them) when a setting that defines the run changed; "
                                  "'auto': continue from its newest valid checkpoint whatever changed; 'fresh': start "
                                  "over, first moving the old checkpoints, metrics.jsonl and config.json aside to "
                                  "RUN/previous-TIME/; or a checkpoint (or run directory) path", runtime=True)
    guard_zscore: float = _f(0.0, "skip an update whose loss or grad-norm z-score exceeds this (0: off)", ge=0)
    guard_window: int = _f(100, "steps in the running window of the divergence guard", ge=2,
                          le=1_000_000)
    guard_max_skips: int = _f(5, "stop the run after this many consecutive skipped updates", ge=1)


_GPT2_124M = dict(model="gpt2", seq_len=1024, micro_batch_size=64, total_batch_size=524288, lr=6e-4,
                  min_lr_ratio=0.1, warmup_steps=715, max_steps=19073, weight_decay=0.1, grad_clip=1.0,
                  eval_every=250, sample_every=250, hellaswag_data="auto")

# The lecture's recipes, plus sizes it did not train and a preset for CPUs.
TRAIN_PRESETS: dict[str, dict] = {
    "gpt2-124m": dict(_GPT2_124M),
    "gpt2-124m-40b": dict(_GPT2_124M, max_steps=4 * 19073),
    "gpt2-124m-3xlr": dict(_GPT2_124M, lr=1.8e-3),
    "gpt3-124m": dict(_GPT2_124M, model="gpt3-small", seq_len=2048, micro_batch_size=32),
    # The GPT-3 family (paper Table 2.1: batch in tokens and max LR per size; warm-up over 375M tokens; T = 2048).
    # Each trains 10B tokens (one epoch of FineWeb-EDU 10B; the paper's 300B is --max-steps 30x). Micro-batches are
    # the memory plan's largest for 8 GPUs of 80 GB (README, "Large models: FSDP, activation checkpointing").
    "gpt3-350m": dict(_GPT2_124M, model="gpt3-medium", seq_len=2048, micro_batch_size=16, lr=3e-4),
    "gpt3-760m": dict(_GPT2_124M, model="gpt3-large", seq_len=2048, micro_batch_size=16, lr=2.5e-4),
    "gpt3-1.3b": dict(_GPT2_124M, model="gpt3-xl", seq_len=2048, micro_batch_size=8, lr=2e-4,
                      total_batch_size=1 << 20, warmup_steps=358, max_steps=9537),
    "gpt3-2.7b": dict(_GPT2_124M, model="gpt3-2.7b", seq_len=2048, micro_batch_size=8, lr=1.6e-4,
                      total_batch_size=1 << 20, warmup_steps=358, max_steps=9537, parallel="fsdp"),
    "gpt3-6.7b": dict(_GPT2_124M, model="gpt3-6.7b", seq_len=2048, micro_batch_size=8, lr=1.2e-4,
                      total_batch_size=1 << 21, warmup_steps=179, max_steps=4768, parallel="fsdp",
                      activation_checkpointing="blocks"),
    # GPT-3 paper table 2.1 LRs for the matching widths; batch stays at 0.5M tokens.
    "gpt2-350m": dict(_GPT2_124M, model="gpt2-medium", micro_batch_size=32, lr=3e-4),
    "gpt2-774m": dict(_GPT2_124M, model="gpt2-large", micro_batch_size=16, lr=2.5e-4),
    "gpt2-1558m": dict(_GPT2_124M, model="gpt2-xl", micro_batch_size=8, lr=2e-4),
    # The demo: learns Shakespeare in minutes on two CPU cores. The 50k-vocabulary head dominates a step there,
    # so the model is narrow (128) and shallow (6 layers learned no faster per token), the batch is small (1,024
    # tokens learned faster per token than 512, 2,048 or 4,096), the LR high, and the tied embedding's LR 5x
    # (README, "The demo's settings", has the runs behind each choice). A checkpoint every 500 steps costs ~0.3 s
    # each, ~0.3% of the run (benchmarks/RESULTS.md, "Checkpoints"), so a killed demo loses at most 500 steps.
    "tiny": dict(model="tiny", seq_len=128, micro_batch_size=8, total_batch_size=1024, lr=2e-3, min_lr_ratio=0.1,
                 embedding_lr_scale=5.0, warmup_steps=40, max_steps=2000, weight_decay=0.1, grad_clip=1.0,
                 eval_every=500, val_tokens=65536, sample_every=1000, sample_tokens=48, num_samples=2,
                 save_every=500, hellaswag_data=None),
}
# Fewer tokens for the same model (benchmarks/recipe_sweep.py, README "Which recipe"): Muon on the blocks' weight
# matrices (lr 0.02, Keller Jordan's shape scaling, no weight decay), AdamW as before on the rest, and a linear
# decay to zero, for half the steps. Measured on CPUs at the tiny and 6L x 256 scales (tiny-fast reaches the tiny
# recipe's val loss of twice the steps); gpt2-124m-fast carries the same choices to 124M unmeasured (a GPU run,
# benchmarks/gpu_check.sh, says whether its 5B tokens reach gpt2-124m's 10B): Muon's orthogonalized update has the
# same spectral norm at every width, so its 'original'-scaled LR transfers (0.02 here = 0.0036 with
# --muon-adjust-lr match_rms_adamw at width 768); its 'original' LR at 124M in the NanoGPT speedrun was 0.02-0.05.
_FAST = dict(optimizer="muon", muon_lr=0.02, muon_weight_decay=0.0, muon_adjust_lr="original", schedule="linear",
             min_lr_ratio=0.0)
TRAIN_PRESETS["tiny-fast"] = dict(TRAIN_PRESETS["tiny"], **_FAST, max_steps=1000)
TRAIN_PRESETS["gpt2-124m-fast"] = dict(_GPT2_124M, **_FAST, max_steps=19073 // 2)


def resolve(preset: str | None, overrides: dict) -> TrainConfig:
    """The preset's values, then the user's flags on top."""
    base = TrainConfig()
    if preset is not None:
        if preset not in TRAIN_PRESETS:
            from gptrain.errors import GptrainError
            raise GptrainError(f"unknown --preset {preset!r}; choose one of {', '.join(TRAIN_PRESETS)}")
        base = replace(base, **TRAIN_PRESETS[preset])
    known = {f.name for f in fields(TrainConfig)}
    return replace(base, **{k: v for k, v in overrides.items() if k in known})


def recorded_run(src: str) -> dict:
    """A gptrain run directory's config.json (for a run, one of its checkpoints or the checkpoints directory):
    {"train": settings, "world_size", ...}; {} for anything else (an HF directory, a hub name)."""
    path = Path(src)
    for cfg in (path / "config.json", path.parent / "config.json", path.parent.parent / "config.json"):
        try:
            record = json.loads(cfg.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(record, dict) and isinstance(record.get("train"), dict):
            return record
    return {}


def recorded_train_config(src: str) -> dict:
    """The training settings of `recorded_run(src)`, {} when none: `sft` defaults to the run's learning rate (and
    `eval val`, through the whole record, to its batch shape, tokens and dtype)."""
    return recorded_run(src).get("train", {})
