"""`gptrain train`: the pretraining loop, from one CPU process to many GPUs across nodes under torchrun.

The loop is the lecture's (gradient accumulation, clip, scheduled LR, AdamW) made into a `Trainer` whose mutable
state lives in one place: `model`, `optimizer`, `train_loader`, `step` (optimizer steps done) and `tokens_seen`.
`train_step()` performs exactly one optimizer update; `run()` interleaves it with evaluation, sampling and
logging. The loop accepts any train loader with next_batch()/state_dict()/load_state_dict() and any validation
source with batches(), so SFT reuses it unchanged with its own (masked, targets −1) loaders.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from gptrain.bits_per_byte import ByteCounter, bits_per_byte
from gptrain.config import (add_dataclass_args, check_output_dir, overrides_from_args, runtime_fields, to_jsonable,
                            validate, write_json_atomic)
from gptrain.data.prefetch import prefetching
from gptrain.devices import attention_kernels, deterministic_algorithms, inference_dtype
from gptrain.errors import DiskFullError, GptrainError
from gptrain.model import GPT, GPTConfig, preset as model_preset
from gptrain.train import distributed, memory, meta_init
from gptrain.train.checkpoint import Checkpointer, checkpoint_step, rerun_hint
from gptrain.train.checkpoint.best import BestCheckpoint
from gptrain.train.config import TRAIN_PRESETS, TrainConfig, resolve
from gptrain.train.metrics import Clock, MetricsLog, console, peak_flops, step_line
from gptrain.train.optim import lr_at, make_optimizer, skips_on_device
from gptrain.train.resilience import DivergenceGuard, Preemption, inject_test_nan
from gptrain.train.together import on_rank0, together


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def grad_accum_steps(cfg: TrainConfig, world_size: int) -> int:
    per_step = cfg.micro_batch_size * cfg.seq_len * world_size
    if cfg.total_batch_size <= 0 or cfg.total_batch_size % per_step:
        lo = max(per_step, cfg.total_batch_size // per_step * per_step)
        raise GptrainError(
            f"--total-batch-size {cfg.total_batch_size} is not a multiple of micro-batch × seq-len × world size = "
            f"{cfg.micro_batch_size}×{cfg.seq_len}×{world_size} = {per_step}; use e.g. {lo} or {lo + per_step}, "
            f"or change --micro-batch-size")
    return cfg.total_batch_size // per_step


def check_seq_len(cfg: TrainConfig, model: GPT) -> None:
    if cfg.seq_len > model.config.block_size:
        raise GptrainError(f"--seq-len {cfg.seq_len} exceeds the model's context window of "
                           f"{model.config.block_size}; use --seq-len {model.config.block_size} or less")


class Trainer:
    """One training run. Everything a continuation depends on is an attribute here (see module docstring)."""

    def __init__(self, cfg: TrainConfig, model: GPT, train_loader, val_source=None, *,
                 env: distributed.DistEnv | None = None, hellaswag=None, tokenizer=None):
        self.cfg, self.env = cfg, env or distributed.DistEnv(device=distributed.choose_device(cfg.device))
        self.device = self.env.device
        self.grad_accum = grad_accum_steps(cfg, self.env.world_size)
        check_seq_len(cfg, model)
        self.compile = cfg.compile if cfg.compile is not None else self.env.device_type == "cuda"
        dtype = cfg.dtype if cfg.dtype != "auto" else self._auto_dtype(cfg, self.env.device_type)
        self.amp_dtype = torch.bfloat16 if dtype == "bfloat16" else None
        if self.env.device_type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if cfg.deterministic:
            deterministic_algorithms(True)
        self.cfg = dataclasses.replace(cfg, compile=self.compile, dtype=dtype, device=self.env.device_type,
                                       model=None if cfg.init_from else cfg.model,
                                       sample_prompt=self._sample_prompt(cfg, train_loader, tokenizer))
        self.plan = memory.require_fit(model.config, self.cfg, self.env)  # before anything big is allocated
        fsdp = cfg.parallel == "fsdp"
        self.model = model if fsdp else model.to(self.device)  # FSDP moves each unit to the device as it shards it
        self.wrapped = distributed.wrap(
            self.model, self.env, self.compile, cfg.parallel, reshard_after_forward=cfg.reshard_after_forward,
            checkpointing=cfg.activation_checkpointing, shard_size=cfg.fsdp_shard_size,
            param_dtype=self.amp_dtype if fsdp and self.env.device_type == "cuda" else None)
        # FSDP under accumulation: reduce-scatter every micro-step when asked, or (auto) when the plan needs it
        self.wrapped.reduce_every_micro_step = fsdp and (self.plan.reduce_scatter_mode() if self.plan else
                                                         cfg.reduce_scatter) == "every"
        self.optimizer = make_optimizer(self.model, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                        betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                        embedding_lr_scale=cfg.embedding_lr_scale, device_type=self.env.device_type,
                                        optimizer=cfg.optimizer, muon_lr=cfg.muon_lr,
                                        muon_weight_decay=cfg.muon_weight_decay, muon_momentum=cfg.muon_momentum,
                                        muon_adjust_lr=cfg.muon_adjust_lr, muon_ns_dtype=dtype)
        self.train_loader, self.val_source = prefetching(train_loader, self.device), val_source
        self.hellaswag, self.tokenizer = hellaswag, tokenizer
        self.step = 0  # optimizer steps completed
        self.tokens_seen = 0
        self.train_losses: list[float] = []
        self.last_eval: dict = {}
        self.last_samples: list[str] = []
        self.peak = peak_flops(self.device, self.amp_dtype or torch.float32)
        self.stop_requested = lambda: False  # set by run(): a signal arrived on this rank
        self.stop_agreed = False  # some rank was signalled (known on every rank after each step)
        self.guard = DivergenceGuard(cfg.guard_zscore, cfg.guard_window, cfg.guard_max_skips)
        # CUDA: a non-finite update is skipped on the device, the host reads the values after queuing it
        self.skip_on_device = self.env.device_type == "cuda" and skips_on_device(self.optimizer)
        self.best: BestCheckpoint | None = None
        try:
            self.checkpoints, resumed = self._resume()  # before the metrics log opens: resuming cuts it back
            self.log = together(lambda: MetricsLog(cfg.out, enabled=self.env.is_master, tensorboard=cfg.tensorboard,
                                                   wandb_project=cfg.wandb_project, config=to_jsonable(self.cfg)),
                                "opening metrics.jsonl")
        except BaseException:
            self.wrapped.release()  # a refused resume must not leave DDP alive past the process group
            raise

    @staticmethod
    def _auto_dtype(cfg: TrainConfig, device_type: str) -> str:
        """--dtype auto: the dtype the run in --out already trains in, so that rerunning a command continues the
        run as it was; for a new run bf16 autocast on CUDA GPUs and on CPUs that compute bf16 natively (~1.8x
        float32's speed at the tiny shape on an Intel Xeon with AMX), float32 elsewhere: the rule `gptrain serve`
        follows too (devices.inference_dtype)."""
        if cfg.out and cfg.resume != "fresh":
            try:
                recorded = json.loads((Path(cfg.out) / "config.json").read_text())["train"]["dtype"]
            except (OSError, ValueError, KeyError, TypeError):
                recorded = None
            if recorded in ("float32", "bfloat16"):
                return recorded
        return "bfloat16" if inference_dtype(device_type) == torch.bfloat16 else "float32"

    @staticmethod
    def _sample_prompt(cfg: TrainConfig, loader, tokenizer) -> str | None:
        """--sample-prompt, or by default the start of the data's first validation document (fits the data)."""
        manifest = getattr(loader, "manifest", None)
        if cfg.sample_prompt is not None or tokenizer is None or manifest is None:
            return cfg.sample_prompt
        from gptrain.data.loader import opening_words
        return opening_words(manifest, tokenizer)

    def _resume(self):
        """The run's Checkpointer (None without --out) and, with --resume, the state it restored everything from."""
        cfg = self.cfg
        if not cfg.out:
            if cfg.resume:
                raise GptrainError(f"--resume {cfg.resume} needs --out RUN, the run directory to continue")
            return None, None
        tok = {"name": self.tokenizer.name, "sha256": self.tokenizer.sha256} if self.tokenizer else None
        ckpt = Checkpointer(cfg.out, model=self.model, optimizer=self.optimizer, loader=self.train_loader,
                            config=self.cfg, runtime=runtime_fields(TrainConfig),
                            quiet=runtime_fields(TrainConfig, numerics=False), tokenizer=tok, guard=self.guard,
                            keep_last=cfg.keep_last, keep_every=cfg.keep_every,
                            metrics_path=Path(cfg.out) / "metrics.jsonl", asynchronous=cfg.async_save)
        resumed = ckpt.resume(cfg.resume)
        if resumed is not None:
            self.step, self.tokens_seen = resumed.step, resumed.tokens_seen
        self.best = BestCheckpoint(cfg.out, cfg.keep_best, self.env.is_master)  # after resume: fresh moves it aside
        return ckpt, resumed

    def how_to_continue(self) -> str:
        """For an error that stops the run (a full disk): what survived and how to go on."""
        last = self.checkpoints.last_good if self.checkpoints else None
        rerun = rerun_hint(self.cfg.resume)
        if last is None:
            return f"no checkpoint of this run was written yet; free space there and {rerun}"
        return (f"the last good checkpoint {last} (step {checkpoint_step(last)}) is intact; free space there and "
                f"{rerun} to continue from it")

    def _keep_best(self, ev: dict) -> str | None:
        """After an evaluation: RUN/checkpoints/best, and the val-loss trend's note to print (checkpoint/best.py).
        Runs before the evaluation is logged, so that a checkpoint saved here, like a regular one, resumes into
        evaluating this step again (its metrics offset precedes the line)."""
        if self.best is None or "val_loss" not in ev:
            return None
        if self.best.improves(self.step, ev["val_loss"]):
            self.checkpoints.wait()  # an --async-save of this step completes first: best copies whole directories
            last = self.checkpoints.last_good
            ckpt = last if last is not None and checkpoint_step(last) == self.step else None
            if ckpt is None and self.cfg.keep_best == "eval":
                ckpt = self.checkpoints.save(self.step, self.tokens_seen)
                self.checkpoints.wait()
            if ckpt is not None:
                self.best.keep(ckpt, self.step, ev["val_loss"])
        return self.best.observe(self.step, ev["val_loss"], self.train_losses)

    def _log(self, event: dict) -> None:
        """Rank 0 writes; every rank stops with its error if that fails (gptrain.train.together)."""
        def write():
            try:
                self.log.log(event)
            except DiskFullError as e:
                raise e.with_continuation(self.how_to_continue()) from None
        on_rank0(write, f"writing {Path(self.cfg.out or '.') / 'metrics.jsonl'}")

    # --- the pieces of a step
    @contextlib.contextmanager
    def autocast(self):
        """The numerics of a forward pass: autocast to the run's dtype, and the attention kernel for its window."""
        with contextlib.ExitStack() as stack:
            if self.amp_dtype is not None:
                stack.enter_context(torch.autocast(device_type=self.env.device_type, dtype=self.amp_dtype))
            stack.enter_context(self.attention())
            yield

    def attention(self):
        """The attention kernel for this run's window (gptrain/devices.py). Backward runs under it too: activation
        checkpointing recomputes a Block there and must take the forward's kernel."""
        return attention_kernels(self.env.device_type, self.cfg.seq_len, self.compile)

    def lr(self, step: int) -> float:
        c = self.cfg
        return lr_at(step, max_lr=c.lr, min_lr=c.lr * c.min_lr_ratio, warmup_steps=c.warmup_steps,
                     max_steps=c.max_steps, schedule=c.schedule, decay_frac=c.decay_frac)

    def train_step(self) -> dict:
        """One optimizer update: grad_accum micro-batches (gradients reduced on the last), clip, LR, AdamW."""
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        loss_accum = torch.zeros((), device=self.device)
        for micro in range(self.grad_accum):
            x, y = self.train_loader.next_batch()
            x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            with self.wrapped.no_sync(last_micro_step=micro == self.grad_accum - 1):
                with self.autocast():
                    _, loss = self.wrapped.train(x, y)
                loss = inject_test_nan(self.step, loss / self.grad_accum)
                loss_accum += loss.detach()
                with self.attention():
                    loss.backward()
        # one all-reduce carries the loss and the stop flag (any rank signalled)
        loss_accum, stop = distributed.all_reduce_mean_and_flag(loss_accum, self.stop_requested(), self.env)
        norm = self.wrapped.clip_grad_norm(self.cfg.grad_clip or float("inf"))
        lr = self.lr(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
        last_good = self.checkpoints.last_good if self.checkpoints else None
        # The step's one host sync, the values read (the same on every rank); on CUDA after the update is queued
        (loss_value, norm_value, self.stop_agreed), skipped = self.guard.step(
            self.optimizer, self.step, torch.stack([loss_accum, norm.float(), stop]), last_good, self.skip_on_device)
        # No synchronize: the optimizer's kernels run on while the next batch is read; `ms` is the host's time
        # from one step's end to the next, which in steady state is the device's.
        dt = time.perf_counter() - t0
        tokens = self.cfg.total_batch_size
        m = {"step": self.step, "train_loss": loss_value, "lr": lr, "grad_norm": norm_value,
             "tokens_per_sec": tokens / dt, "ms": 1000 * dt}
        if self.peak:
            m["mfu"] = self.model.estimate_mfu(tokens / dt / self.env.world_size, self.cfg.seq_len, self.peak)
        if hasattr(self.train_loader, "epoch"):
            m["epoch"] = self.train_loader.epoch
        if skipped:
            m["skipped"] = skipped
        self.step += 1
        self.tokens_seen += tokens
        return m

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Validation loss (token-weighted over the fixed val budget, averaged over ranks), as bits per byte too
        (gptrain/bits_per_byte.py), and HellaSwag."""
        out = {"step": self.step}
        if self.val_source is not None:
            total = torch.zeros((), device=self.device, dtype=torch.float64)
            count = torch.zeros((), device=self.device, dtype=torch.float64)
            nbytes = torch.zeros((), device=self.device, dtype=torch.float64)
            text_bytes = ByteCounter(self.tokenizer.token_bytes) if self.tokenizer is not None else None
            with self.wrapped.gathered(eager=False):  # FSDP: weights gathered once for all batches
                for x, y in self.val_source.batches():
                    x, y = x.to(self.device), y.to(self.device)
                    with self.autocast():
                        _, loss = self.wrapped.fwd(x, y)
                    n = (y != -1).sum()
                    total += loss.double() * n
                    count += n
                    if text_bytes is not None:
                        nbytes += text_bytes(y)
            for t in (total, count, nbytes):
                distributed.all_reduce_sum(t, self.env)
            if count.item() > 0:
                out["val_loss"] = (total / count).item()
                bpb = bits_per_byte(total.item(), nbytes.item())
                if bpb is not None:
                    out["val_bpb"] = bpb
        if self.hellaswag is not None:
            from gptrain.eval.hellaswag import evaluate as hellaswag_evaluate
            with self.wrapped.gathered() as model:  # ranks score different examples: no collectives inside
                hs = hellaswag_evaluate(model, self.hellaswag, device=self.device, rank=self.env.rank,
                                        world_size=self.env.world_size, autocast=self.amp_dtype)
            out["hellaswag_acc"], out["hellaswag_acc_norm"] = hs["acc"], hs["acc_norm"]
        self.last_eval = out
        return out

    @torch.no_grad()
    def sample(self) -> list[str]:
        """Continuations of `cfg.sample_prompt` (rank 0 only), from the eager module: no recompiles per length.
        Every rank calls it (under FSDP the weights are gathered for the sample)."""
        if self.tokenizer is None:
            return []
        from gptrain.generate import complete
        text = self.cfg.sample_prompt or ""  # none (a loader without a manifest): unconditional samples
        prompt = self.tokenizer.encode(text) or [self.tokenizer.eot]
        n_new = min(self.cfg.sample_tokens, self.model.config.block_size - len(prompt))
        with self.wrapped.gathered() as model:
            if not self.env.is_master:
                return []
            with self.autocast():
                new = complete(model, [prompt] * self.cfg.num_samples, max_new_tokens=n_new,
                               top_k=50, seed=self.cfg.seed, stop_ids=[self.tokenizer.eot])
        self.last_samples = [text + self.tokenizer.decode(ids) for ids in new]
        return self.last_samples

    # --- the loop
    def _due(self, every: int) -> bool:
        return every > 0 and (self.step % every == 0 or self.step == self.cfg.max_steps)

    @property
    def finished(self) -> bool:
        """A rerun of a finished run: its final evaluation and samples are logged already, nothing is done again
        (and nothing announced but that)."""
        saved = self.checkpoints is not None and self.checkpoints.last_good is not None
        return saved and self.step >= self.cfg.max_steps

    def run(self) -> dict:
        cfg, clock = self.cfg, Clock()
        finished = self.finished
        if finished and self.env.is_master:
            console(f"{cfg.out} finished at step {self.step}/{cfg.max_steps}: nothing to train (its final "
                    "evaluation is in metrics.jsonl); to train longer, raise --max-steps and pass --resume auto"
                    if self.step == cfg.max_steps else
                    f"{cfg.out} is at step {self.step}, past --max-steps {cfg.max_steps}: nothing to train (steps "
                    "are not undone); for a shorter run use another --out, or --resume fresh")
        preempt = Preemption(rerun_hint(cfg.resume)).install()
        self.stop_requested = lambda: preempt.received is not None
        try:
            while not finished:
                if self._due(cfg.eval_every) and (self.val_source is not None or self.hellaswag is not None):
                    ev = self.evaluate()
                    note = self._keep_best(ev)
                    self._log(ev)
                    if self.env.is_master:
                        console(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                                           for k, v in ev.items()))
                        if note:
                            console(note)
                if self._due(cfg.sample_every) and self.step > 0:
                    samples = self.sample()  # every rank: FSDP gathers the weights for it (rank 0 samples)
                    if self.tokenizer is not None:  # every rank: the write's outcome reaches them all
                        self._log({"step": self.step, "samples": samples})
                    for s in samples:
                        console(f"sample: {s!r}")
                if self.step >= cfg.max_steps:
                    break
                m = self.train_step()
                self.train_losses.append(m["train_loss"])
                clock.lap(m["ms"] / 1000)
                self._log({k: v for k, v in m.items() if k != "ms"})
                if self.env.is_master and cfg.log_every > 0 and (m["step"] % cfg.log_every == 0
                                                                 or self.step == cfg.max_steps):
                    console(step_line(m, cfg.max_steps, clock.eta(cfg.max_steps - self.step)))
                if self.env.is_master and m.get("skipped"):
                    console(f"step {m['step']}: update skipped ({m['skipped']})")
                stop = bool(self.stop_agreed)
                if self.checkpoints and (stop or self._due(cfg.save_every) or self.step == cfg.max_steps):
                    together(lambda: self.checkpoints.save(self.step, self.tokens_seen),
                             f"writing the checkpoint of step {self.step}")
                if stop:
                    if self.env.is_master:
                        console(f"stopped after step {self.step} on a signal; {rerun_hint(cfg.resume)} to continue")
                    break
            if self.checkpoints:
                self.checkpoints.wait()  # an asynchronous save still in flight completes before the run ends
        finally:
            preempt.uninstall()
            self.log.close()
        return {"train_losses": self.train_losses, "val_loss": self.last_eval.get("val_loss"),
                "eval": self.last_eval, "samples": self.last_samples,
                "step": self.step, "tokens_seen": self.tokens_seen}


# --- building a run from the command line
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
