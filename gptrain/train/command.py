"""`gptrain train` from the command line: resolve the config, build the model (on the meta device under FSDP),
the loaders and HellaSwag's examples, plan memory (`--plan`), record the run's config, and hand it all to
`Trainer` (gptrain/train/trainer.py). `sft` shares `check_run_inputs`, `print_plan` and `run_and_record`.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from pathlib import Path

import torch

from gptrain.config import add_dataclass_args, check_output_dir, overrides_from_args, validate, write_json_atomic
from gptrain.errors import DiskFullError, GptrainError
from gptrain.model import GPT, GPTConfig, preset as model_preset
from gptrain.train import distributed, memory, meta_init
from gptrain.train.config import TRAIN_PRESETS, TrainConfig, resolve
from gptrain.train.metrics import console
from gptrain.train.together import on_rank0, together
from gptrain.train.trainer import Trainer, check_seq_len, grad_accum_steps, seed_everything


def build_model(cfg: TrainConfig, vocab_size: int) -> GPT:
    if cfg.init_from:
        from gptrain.hf import load_model
        shape = {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd") if getattr(cfg, k) is not None}
        if shape:
            raise GptrainError(f"--init-from {cfg.init_from} fixes the model shape; drop the shape flags {shape}")
        return load_model(cfg.init_from, flag="--init-from")
    try:
        mcfg = model_preset(cfg.model, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
                            vocab_size=vocab_size)
    except ValueError as e:
        raise GptrainError(str(e)) from None
    if cfg.parallel == "fsdp":  # no process holds the whole model: each fills its shards after sharding
        return meta_init.build(GPT, mcfg)
    return GPT(mcfg)


def model_config(cfg: TrainConfig) -> GPTConfig:
    """The shape `build_model` would build, without building it (the data's vocabulary when --data is prepared)."""
    if cfg.init_from:
        return build_model(cfg, 0).config
    vocab = 50257
    if cfg.data and Path(cfg.data).exists():
        from gptrain.data.loader import load_manifest
        vocab = _manifest_vocab(load_manifest(cfg.data))
    try:
        return model_preset(cfg.model, n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd, vocab_size=vocab)
    except ValueError as e:
        raise GptrainError(str(e)) from None


def print_plan(cfg: TrainConfig, model: GPTConfig) -> dict:
    """`--plan`: the memory plan of this run on `--plan-world-size` (or this launch's) processes; trains nothing."""
    world = cfg.plan_world_size or int(os.environ.get("WORLD_SIZE", "1"))
    device = cfg.device if cfg.device != "auto" else distributed.choose_device("auto")
    detected = memory.detected_memory(device) if not cfg.memory else (None, "")
    plan = memory.plan_for(model, cfg, world, device.split(":")[0], *detected)
    if int(os.environ.get("RANK", "0")) == 0:
        console(memory.describe(plan))
        if cfg.memory and cfg.device == "auto":  # --memory names no device: say which one was planned for
            console(f"note: planned for {device.split(':')[0]} (this machine's, --device auto); for another pass "
                    "e.g. --device cuda (bf16 weights gathered by FSDP instead of autocast's copies)")
    return {"plan": plan}


def _resolve_steps(cfg: TrainConfig, train_tokens: int | None) -> TrainConfig:
    if cfg.epochs > 0:
        if not train_tokens:
            raise GptrainError("--epochs: the training data is smaller than one batch; pass --max-steps instead")
        return dataclasses.replace(cfg, max_steps=max(1, math.ceil(cfg.epochs * train_tokens / cfg.total_batch_size)))
    if cfg.max_steps <= 0:
        raise GptrainError(f"--max-steps {cfg.max_steps} must be positive (or pass --epochs)")
    return cfg


MANY_EPOCHS = 10  # more passes than this over the train tokens get a note: the model mostly memorises them


def _epochs_note(cfg: TrainConfig, tokens_per_epoch: int) -> str | None:
    """A run that reads its data many times over (a small corpus at a preset's steps) learns it by heart: say so
    before training, unless --epochs asked for those passes."""
    epochs = cfg.max_steps * cfg.total_batch_size / tokens_per_epoch
    if cfg.epochs > 0 or epochs <= MANY_EPOCHS:
        return None
    return (f"note: {cfg.max_steps:,} steps of {cfg.total_batch_size:,} tokens make {epochs:,.0f} epochs (passes over "
            f"the {tokens_per_epoch:,} train tokens an epoch of {cfg.data} reads): text read that often is mostly "
            "memorised; for fewer passes prepare more text, or pass --max-steps N or --epochs N")


def train(cfg: TrainConfig) -> dict:
    """Run `gptrain train` with a resolved config (the CLI's entry point; also callable from Python)."""
    if cfg.plan:
        validate(cfg)
        return print_plan(cfg, model_config(cfg))
    from gptrain.data.loader import TrainLoader, ValLoader, check_tokenizer, load_manifest
    from gptrain.tokenizer import tokenizer_for_vocab

    check_run_inputs(cfg, "train")
    manifest = load_manifest(cfg.data)
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    env = distributed.setup(cfg.device, cfg.parallel, cfg.dist_timeout)
    try:
        seed_everything(cfg.seed)
        model = build_model(cfg, vocab_size=_manifest_vocab(manifest))
        tokenizer = tokenizer_for_vocab(model.config.vocab_size)
        check_tokenizer(manifest, tokenizer)
        check_seq_len(cfg, model)
        accum = grad_accum_steps(cfg, env.world_size)
        train_loader = TrainLoader(cfg.data, cfg.micro_batch_size, cfg.seq_len, rank=env.rank,
                                   world_size=env.world_size, seed=cfg.seed, shuffle=cfg.shuffle,
                                   val_tokens=cfg.val_tokens if cfg.eval_every > 0 else 0, accum=accum)
        cfg = _resolve_steps(cfg, train_loader.tokens_per_epoch)
        val = None
        if cfg.eval_every > 0 and cfg.val_tokens > 0:
            val = ValLoader(cfg.data, cfg.micro_batch_size, cfg.seq_len, rank=env.rank,
                            world_size=env.world_size, max_tokens=cfg.val_tokens)
            if val.available < cfg.val_tokens and env.is_master:
                print(f"gptrain: note: {cfg.data} holds {val.available:,} validation tokens, fewer than --val-tokens "
                      f"{cfg.val_tokens:,}: each evaluation reads {val.tokens:,} of them (whole batches)",
                      file=sys.stderr)
        hellaswag = _load_hellaswag(cfg) if cfg.eval_every > 0 else None
        trainer = Trainer(cfg, model, train_loader, val, env=env, hellaswag=hellaswag, tokenizer=tokenizer)
        return run_and_record(trainer, {"data_source": manifest.get("source")},
                              _epochs_note(cfg, train_loader.tokens_per_epoch))
    finally:
        distributed.teardown()


def check_run_inputs(cfg: TrainConfig, command: str) -> None:
    """Everything about the options that can be checked before any work: ranges, the run directory, files."""
    validate(cfg)
    if not cfg.data:
        raise GptrainError(f"{command} needs --data "
                           + ("DIR (make one with: gptrain prepare shakespeare --out DIR)" if command == "train"
                              else "SOURCE"))
    if not cfg.out:
        raise GptrainError(f"{command} needs --out RUN (the run directory for config.json, metrics and checkpoints)")
    check_output_dir(cfg.out, "--out")
    if cfg.hellaswag_data not in (None, "", "none", "auto") and not Path(cfg.hellaswag_data).is_file():
        raise GptrainError(f"--hellaswag-data {cfg.hellaswag_data}: no such file; give HellaSwag's val "
                           ".jsonl[.gz], 'auto' (downloaded once into the cache) or none (train without it)")


def run_and_record(trainer: Trainer, record: dict | None = None, note: str | None = None) -> dict:
    """Announce the run, write RUN/config.json (the resolved config plus `record`), train, say where the run is.

    Shared by `train` and `sft`, so every run directory records the same things."""
    cfg, env, tok = trainer.cfg, trainer.env, trainer.tokenizer
    if env.is_master:
        if not trainer.finished:  # a finished run says only that (Trainer.run)
            _announce(trainer)
            if note:
                console(note)
        if cfg.warmup_steps >= cfg.max_steps > trainer.step:
            console(f"note: --warmup-steps {cfg.warmup_steps} is not below the run's {cfg.max_steps} steps: the "
                    f"learning rate rises all run and never reaches --lr {cfg.lr:g} (for a short run pass e.g. "
                    f"--warmup-steps {max(1, cfg.max_steps // 10)})")

    def write_config():
        Path(cfg.out).mkdir(parents=True, exist_ok=True)
        try:
            write_json_atomic(Path(cfg.out) / "config.json",
                              {"train": cfg, "model": trainer.model.config.to_dict(), "world_size": env.world_size,
                               "grad_accum_steps": trainer.grad_accum, "tokenizer": tok.name,
                               "tokenizer_sha256": tok.sha256, **(record or {})})
        except DiskFullError as e:
            raise e.with_continuation(trainer.how_to_continue()) from None
    try:
        on_rank0(write_config, f"writing {Path(cfg.out) / 'config.json'}")
    except BaseException:
        trainer.wrapped.release()
        raise
    try:
        result = trainer.run()
    finally:
        trainer.wrapped.release()  # before the caller tears the process group down
    if env.is_master:
        console(f"run directory: {Path(cfg.out).resolve()}")
    return result


def _manifest_vocab(manifest: dict) -> int:
    """The vocabulary a fresh model needs for this data (the chat tokenizer adds 4 ids to GPT-2's 50257)."""
    from gptrain.tokenizer import get_tokenizer
    return get_tokenizer(chat=(manifest.get("tokenizer") or {}).get("name") == "gpt2-chat").n_vocab


def _load_hellaswag(cfg: TrainConfig):
    """HellaSwag examples for in-loop accuracy: 'auto' = the official file (downloaded once into the cache)."""
    if cfg.hellaswag_data in (None, "", "none"):
        return None
    from gptrain.eval import hellaswag
    path = None if cfg.hellaswag_data == "auto" else cfg.hellaswag_data
    try:
        if path is None:  # rank 0 downloads; the outcome's broadcast is the others' barrier
            on_rank0(lambda: hellaswag.fetch(), "downloading HellaSwag")
        return together(lambda: hellaswag.load_examples(path, limit=cfg.hellaswag_limit or None,
                                                        flag="--hellaswag-data"), "reading HellaSwag")
    except GptrainError as e:
        raise GptrainError(f"{e} (or --hellaswag-data none to train without it)") from None


def _announce(t: Trainer) -> None:
    c = t.cfg
    par = (f"FSDP x{t.env.world_size}" if c.parallel == "fsdp" else
           f"DDP x{t.env.world_size}" if t.env.ddp else "single process")
    ck = ", activation checkpointing" if c.activation_checkpointing != "none" else ""
    console(f"device {t.device} ({par}{ck}), "
            f"dtype {c.dtype}, compile {'on' if t.compile else 'off'}, threads {torch.get_num_threads()}")
    console(f"model {t.model.config.n_layer}L/{t.model.config.n_head}H/{t.model.config.n_embd}C, "
            f"{t.model.num_params(padded=False) / 1e6:.1f}M params; batch {c.total_batch_size:,} tokens = "
            f"{c.micro_batch_size}×{c.seq_len} × {t.grad_accum} accum × {t.env.world_size} proc; "
            f"{c.max_steps} steps, lr {c.lr:g} ({c.schedule})"
            + (f", muon lr {c.muon_lr:g} on the block matrices" if c.optimizer == "muon" else ""))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default=None, choices=list(TRAIN_PRESETS),
                        help="a named recipe (its values, then your flags on top); default: the gpt2-124m values")
    add_dataclass_args(parser, TrainConfig, exclude=("compile",))
    parser.presets = ("--preset", TRAIN_PRESETS)  # --preset NAME --help shows NAME's values as the defaults
    parser.add_argument("--compile", dest="compile", action=argparse.BooleanOptionalAction,
                        default=argparse.SUPPRESS, help="torch.compile the model (default: on for CUDA, off elsewhere)")


def main(args: argparse.Namespace) -> int:
    overrides = overrides_from_args(args, TrainConfig)
    if overrides.get("epochs", 0) > 0 and "max_steps" in overrides:
        raise GptrainError(f"--epochs {overrides['epochs']:g} and --max-steps {overrides['max_steps']}: pass one of "
                           "them (--epochs sets the number of steps from the data's size)")
    train(resolve(args.preset, overrides))
    return 0
