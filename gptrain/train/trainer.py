"""The pretraining loop, from one CPU process to many GPUs across nodes under torchrun (`gptrain train` builds
it: gptrain/train/command.py).

The loop is the lecture's (gradient accumulation, clip, scheduled LR, AdamW) made into a `Trainer` whose mutable
state lives in one place: `model`, `optimizer`, `train_loader`, `step` (optimizer steps done) and `tokens_seen`.
`train_step()` performs exactly one optimizer update; `run()` interleaves it with evaluation, sampling and
logging. The loop accepts any train loader with next_batch()/state_dict()/load_state_dict() and any validation
source with batches(), so SFT reuses it unchanged with its own (masked, targets −1) loaders.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import random
import time
from pathlib import Path

import numpy as np
import torch

from gptrain.bits_per_byte import ByteCounter, bits_per_byte
from gptrain.config import runtime_fields, to_jsonable
from gptrain.data.prefetch import prefetching
from gptrain.devices import attention_kernels, deterministic_algorithms, inference_dtype
from gptrain.errors import DiskFullError, GptrainError
from gptrain.model import GPT
from gptrain.train import distributed, memory
from gptrain.train.checkpoint import Checkpointer, checkpoint_step, rerun_hint
from gptrain.train.checkpoint.best import BestCheckpoint
from gptrain.train.config import TrainConfig
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
        rows, left = divmod(cfg.total_batch_size, cfg.seq_len * world_size)  # rows per process per step
        keep = next((m for m in range(min(cfg.micro_batch_size, rows), 0, -1) if rows % m == 0), None) \
            if cfg.total_batch_size > 0 and not left else None
        raise GptrainError(
            f"--total-batch-size {cfg.total_batch_size} is not a multiple of micro-batch × seq-len × world size = "
            f"{cfg.micro_batch_size}×{cfg.seq_len}×{world_size} = {per_step}; use e.g. {lo} or {lo + per_step}, "
            + (f"or --micro-batch-size {keep} (keeps this total batch)" if keep else "or change --micro-batch-size"))
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
            console(f"{cfg.out} finished at step {self.step}/{cfg.max_steps}: nothing to train"
                    + (" (its final evaluation is in metrics.jsonl)" if cfg.eval_every > 0 else "")
                    + "; to train longer, raise --max-steps and pass --resume auto"
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
