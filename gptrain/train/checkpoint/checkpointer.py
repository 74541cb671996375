"""The Checkpointer: saves and restores everything a run's future depends on, bit for bit, after any kind of death.

A checkpoint is written into a hidden temp directory, every file fsynced, the manifest written last, then renamed
into place and the parent fsynced: a kill at any moment leaves either the complete checkpoint or none. A directory
whose manifest is missing or whose hashes fail is never used. Old checkpoints are pruned only after the new one is
verified on disk, and the newest valid one is never pruned.

Nothing a run wrote is ever deleted by resuming: checkpoints that cannot be used are moved aside
(`step_X.broken-TIME`, `step_X.abandoned-TIME`), the part of metrics.jsonl logged after the checkpoint a run
resumes from goes to `metrics.jsonl.cut-TIME`, and a fresh start in a directory that holds an earlier run's
records first moves them to `RUN/previous-TIME/`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from gptrain.config import fsync_dir, to_jsonable
from gptrain.errors import GptrainError, disk_full, is_disk_full
from gptrain.train.checkpoint import sharded
from gptrain.train.checkpoint.choose import choose, set_aside, unique_path
from gptrain.train.checkpoint.layout import (CHECKPOINTS, FORMAT, MANIFEST, META, OPTIMIZER, STATE, VERSION,
                                             checkpoint_step, info, list_checkpoints, rank_file, step_dir, warn)
from gptrain.train.checkpoint.provenance import git_revision, machine, machine_changes
from gptrain.train.checkpoint.rng import _from_safe, _to_safe, capture_rng_state, restore_rng_state
from gptrain.train.checkpoint.state import (_broadcast_from_rank0, _keyed_by_name, _read_weights, _world,
                                            load_model_state, load_optimizer_state, tied_aliases, unwrap_model)
from gptrain.train.checkpoint.verify import _sha256, _signature, _verified, gathered_format, verify_checkpoint

# Test-only: "kill:STEP" SIGKILLs this process halfway through writing checkpoint STEP; "sleep:SECONDS" sleeps
# there on every save, so a test can kill at a random moment that includes a save in progress.
TEST_SAVE_HOOK = "GPTRAIN_TEST_SAVE_HOOK"


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _save_torch(path: Path, obj) -> None:
    """torch.save, fsynced; what it holds must load with torch.load(weights_only=True)."""
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(to_jsonable(obj), f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _test_save_hook(step: int, when: str) -> None:
    hook = os.environ.get(TEST_SAVE_HOOK, "")
    if hook.startswith("sleep:") and when == "middle":
        time.sleep(float(hook.split(":", 1)[1]))
    elif hook == f"kill:{step}" and when == "middle":
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class ResumeState:
    """Where a resumed run continues: `step` updates are done, `tokens_seen` tokens consumed."""
    path: Path
    step: int
    tokens_seen: int
    meta: dict = field(default_factory=dict)


def rerun_hint(resume: str | None) -> str:
    """How to continue a stopped run: its own command again, unless that command starts over (--resume fresh)
    or pins a checkpoint (--resume PATH), which a rerun would repeat."""
    if resume in (None, "auto"):
        return "run the same command again"
    return f"run the same command without --resume {resume}"


class Checkpointer:
    """Saves and restores everything a run's future depends on. Every rank calls `save`/`resume`/`wait` at the
    same points; each writes its own part of a checkpoint, rank 0 the files of the whole run and the manifest.

    `config` is the resolved run configuration (JSON-able); `runtime` names its keys that may change when a run
    continues (how it executes, not what it trains), `quiet` those of them whose change leaves the arithmetic as it
    was (a resume does not list them among the changed settings); `tokenizer` is {"name", "sha256"}; `guard` any
    object with state_dict/load_state_dict (the divergence guard); `metrics_path` the log that resuming cuts back;
    `asynchronous` writes the tensors in the background (`--async-save`).
    """

    def __init__(self, run_dir: str | os.PathLike, *, model, optimizer, loader, config: dict,
                 runtime: frozenset[str] = frozenset(), quiet: frozenset[str] = frozenset(),
                 tokenizer: dict | None = None, guard=None,
                 keep_last: int = 0, keep_every: int = 0, metrics_path: str | os.PathLike | None = None,
                 asynchronous: bool = False):
        self.run_dir = Path(run_dir)
        self.root = self.run_dir / CHECKPOINTS
        self.model, self.optimizer, self.loader, self.guard = model, optimizer, loader, guard
        self.config = to_jsonable(config)
        self.runtime = frozenset(runtime) | {"resume"}
        self.quiet = frozenset(quiet) | {"resume", "out"}
        self.tokenizer = tokenizer
        self.keep_last, self.keep_every = keep_last, keep_every
        self.metrics_path = Path(metrics_path) if metrics_path else None
        self.rank, self.world_size = _world()
        self.last_good: Path | None = None  # the newest complete checkpoint
        self.asynchronous = asynchronous
        # Checkpoint traffic has a gloo group of its own: an asynchronous save's background thread uses it while
        # training uses the default group (DCP's async_save needs a CPU backend, which NCCL is not).
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        self.pg = torch.distributed.new_group(backend="gloo") if distributed and self.world_size > 1 else None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gptrain-save") if asynchronous else None
        self._pending: Future | None = None

    # -- saving ---------------------------------------------------------------------------------------------
    def save(self, step: int, tokens_seen: int) -> Path:
        """Write checkpoint `step` (updates completed): every rank its own shards and state, rank 0 the manifest
        last, then the rename into place, verification and pruning. Asynchronous: the tensors are staged in CPU
        memory and written in the background, and the checkpoint counts (`last_good`) once that is done; a save
        first waits for the one before it, so at most one is in flight. Returns the checkpoint's path."""
        self.wait()
        final = step_dir(self.run_dir, step)
        tmp = self.root / f".tmp-{final.name}"
        failure = None
        if self.rank == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                for stale in self.root.glob(".tmp-*"):  # left by a save that was killed: incomplete by definition
                    shutil.rmtree(stale, ignore_errors=True)
                tmp.mkdir()
            except Exception as e:
                failure = e
        self._agree(failure, final)
        try:
            model = unwrap_model(self.model)
            tensors, rest = sharded.state_to_save(model, self.optimizer, tied_aliases(model))
            _save_torch(tmp / rank_file(self.rank), {"rng": capture_rng_state(),
                                                     "loader": _to_safe(self.loader.state_dict())})
            if self.rank == 0:
                _save_torch(tmp / STATE, {"guard": self.guard.state_dict() if self.guard else None,
                                          "optimizer": rest})
                _write_json(tmp / META, self._meta(step, tokens_seen, model))
        except Exception as e:
            failure = e
        self._agree(failure, final)
        if self.asynchronous:
            written = sharded.save(tensors, tmp, self.pg, asynchronous=True)
            self._pending = self._executor.submit(self._complete, written, step, final, tmp)
            return final
        try:
            sharded.save(tensors, tmp, self.pg, asynchronous=False)
        except Exception as e:
            failure = e
        self._agree(failure, final)
        self._finalize(step, final, tmp)
        return final

    def wait(self) -> None:
        """Wait for the save in flight (if any) to complete; its failure is raised here, on every rank."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def _complete(self, written, step: int, final: Path, tmp: Path) -> None:
        """The background part of an asynchronous save: the tensors' future, then the same completion as a
        synchronous save (on the checkpoint process group, which nothing else uses meanwhile)."""
        failure = None
        try:
            sharded.result(written)
        except Exception as e:
            failure = e
        self._agree(failure, final)
        self._finalize(step, final, tmp)

    def _finalize(self, step: int, final: Path, tmp: Path) -> None:
        """Every file is written: each rank hashes its own, rank 0 writes the manifest listing them all, renames
        the directory into place, checks it and prunes. Every rank learns the outcome."""
        _test_save_hook(step, "middle")
        files, failure = {}, None
        try:
            names = [rank_file(self.rank)] + sorted(p.name for p in tmp.glob(f"__{self.rank}_*.distcp"))
            names += [sharded.DCP_METADATA, STATE, META] if self.rank == 0 else []
            files = {name: {"sha256": _sha256(tmp / name), "bytes": (tmp / name).stat().st_size} for name in names}
        except Exception as e:
            failure = e
        files = self._agree(failure, final, files)
        if self.rank == 0:
            try:
                _write_json(tmp / MANIFEST, {"format": FORMAT, "version": VERSION, "step": step, "files": files})
                fsync_dir(tmp)
                if final.exists():
                    set_aside(final, "replaced")
                os.replace(tmp, final)
                fsync_dir(self.root)
                # The hashes were computed by reading back the fsynced files; what remains to check is that the
                # renamed directory holds them all, at their sizes.
                reason = verify_checkpoint(final, full=False)
                if reason:
                    raise GptrainError(f"checkpoint {final} failed verification right after writing ({reason}); "
                                       "the disk may be failing. Earlier checkpoints were kept")
                _verified[str(final)] = _signature(final, files)
            except Exception as e:
                failure = e
        self._agree(failure, final)
        if self.rank == 0:
            try:
                self._prune(final)
            except OSError as e:
                warn(f"could not prune old checkpoints in {self.root} ({e}); they are kept")
        self.last_good = final

    def _agree(self, failure: Exception | None, final: Path, files: dict | None = None) -> dict:
        """A point every rank passes together: if any rank's part failed, the unfinished directory is removed and
        every rank raises the same one-line error (the failing rank its own exception). Returns the `files` of
        all ranks merged."""
        message = None if failure is None else self._explain(failure, final)
        mine = (str(message) if message is not None else None, files or {})
        if self.world_size > 1 and self.pg is not None:
            everyone = [None] * self.world_size
            torch.distributed.all_gather_object(everyone, mine, group=self.pg)
        else:
            everyone = [mine]
        first = next((m for m, _ in everyone if m), None)
        if first is None:
            return {name: entry for _, part in everyone for name, entry in part.items()}
        if self.rank == 0:
            shutil.rmtree(self.root / f".tmp-{final.name}", ignore_errors=True)
        if failure is not None:
            if isinstance(message, GptrainError):
                raise message from None
            raise failure
        raise GptrainError(first)

    def _explain(self, e: Exception, final: Path):
        """The error to raise for a failed write: the one-line full-disk or file-system error, else `e` itself."""
        needed = self._bytes_needed()
        prev = (f"the last good checkpoint {self.last_good} (step {checkpoint_step(self.last_good)}) is intact"
                if self.last_good else "no earlier checkpoint of this run exists")
        how = (f"{prev}; free space there (or lower --keep-last) and {rerun_hint(self.config.get('resume'))} "
               "to continue" + (f" from step {checkpoint_step(self.last_good)}" if self.last_good else ""))
        if is_disk_full(e, self.root, needed):
            return disk_full(self.root, needed, f"checkpoint {final.name}", how)
        if isinstance(e, OSError):
            return GptrainError(f"could not write checkpoint {final}: {e.strerror or e}; {how}")
        return e

    def _meta(self, step: int, tokens_seen: int, model) -> dict:
        now = time.time()
        return {
            "format": FORMAT, "version": VERSION,
            "step": step, "tokens_seen": tokens_seen,
            "time": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"), "unix_time": now,
            "git_revision": git_revision(),
            "world_size": self.world_size,
            "machine": machine(),
            "model_config": model.config.to_dict() if hasattr(model, "config") else None,
            "tied": tied_aliases(model),
            "tokenizer": self.tokenizer,
            "metrics_offset": self._metrics_size(),
            "config": self.config,
        }

    def _bytes_needed(self) -> int:
        """About what one checkpoint takes: the last one's files, else the tensors it would hold."""
        if self.last_good is not None and self.last_good.is_dir():
            return sum(p.stat().st_size for p in self.last_good.iterdir() if p.is_file())
        seen, n = set(), 0
        tensors = list(unwrap_model(self.model).state_dict().values())
        tensors += [v for st in self.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
        for t in tensors:
            if t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                n += t.numel() * t.element_size()
        return n

    def _metrics_size(self) -> int | None:
        """metrics.jsonl's length now (made durable), where a resume from this checkpoint cuts it back to."""
        if self.metrics_path is None or not self.metrics_path.exists():
            return None
        _fsync_file(self.metrics_path)
        return self.metrics_path.stat().st_size

    def _prune(self, newest: Path) -> None:
        """Keep the newest `keep_last` complete checkpoints (0: all) and every `keep_every`-th step; the one just
        written is always kept. Incomplete or corrupt directories are left for the user to inspect."""
        if self.keep_last <= 0:
            return
        complete = [c for c in list_checkpoints(self.run_dir)
                    if checkpoint_step(c) < checkpoint_step(newest) and verify_checkpoint(c, full=False) is None]
        keep = set(complete[-(self.keep_last - 1):]) if self.keep_last > 1 else set()
        for ckpt in complete:
            if ckpt in keep or (self.keep_every > 0 and checkpoint_step(ckpt) % self.keep_every == 0):
                continue
            doomed = ckpt.with_name(f".deleting-{ckpt.name}")
            os.replace(ckpt, doomed)  # renamed first, so a crash mid-delete never leaves a half checkpoint
            shutil.rmtree(doomed, ignore_errors=True)
        for leftover in self.root.glob(".deleting-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        fsync_dir(self.root)

    # -- resuming -------------------------------------------------------------------------------------------
    def resume(self, spec: str | None) -> ResumeState | None:
        """Restore the run state from `spec`: None/"" (the default: continue from this run's newest valid
        checkpoint if its identity settings, all but `runtime`, are unchanged, else refuse naming them; fresh when
        there is none), "auto" (newest valid checkpoint whatever changed, or fresh), "fresh" (start over, moving
        the old records aside) or a path (a checkpoint, or a run directory's newest valid one). Checkpoints that
        exist but are all broken stop every mode but a path and "fresh". Call after building model, optimizer and
        loader; restores RNGs last. Returns None for a fresh start."""
        choice, failure = None, None
        if self.rank == 0:  # one rank verifies and decides; the others follow
            try:
                choice = choose(self.run_dir, spec, self.config, self.runtime)
            except Exception as e:
                failure = e
        choice, message = _broadcast_from_rank0((str(choice) if choice else None, failure and str(failure)))
        if failure is not None:
            raise failure
        if message:
            raise GptrainError(message)
        return self._load(Path(choice)) if choice else None

    def _load(self, ckpt: Path) -> ResumeState:
        meta = json.loads((ckpt / META).read_text())
        model = unwrap_model(self.model)
        self._check_compatible(ckpt, meta, model)
        # Rank 0 verified every hash when it chose `ckpt`.
        state = torch.load(ckpt / STATE, map_location="cpu", weights_only=True)
        if gathered_format(ckpt):  # the format of earlier versions: rank 0 reads, every rank takes its part
            load_model_state(self.model, lambda: _read_weights(ckpt))
            load_optimizer_state(self.model, self.optimizer, source=str(ckpt / OPTIMIZER), read=lambda: torch.load(
                ckpt / OPTIMIZER, map_location="cpu", weights_only=True, mmap=True))
            saved_world, rank_state = len(state["ranks"]), lambda r: state["ranks"][r]
        else:  # sharded: every rank reads what it holds in this run's layout
            self._load_sharded(ckpt, model, state["optimizer"])
            saved_world = int(meta["world_size"])
            rank_state = lambda r: torch.load(ckpt / rank_file(r), map_location="cpu", weights_only=True)  # noqa: E731
        mine = rank_state(self.rank if saved_world == self.world_size else 0)
        parallel = self.config.get("parallel")
        saved_parallel = (meta.get("config") or {}).get("parallel") or parallel  # older metadata: not recorded
        if self.rank == 0 and (saved_world, saved_parallel) != (self.world_size, parallel):
            warn(f"resuming a {saved_world}-process {saved_parallel} run as {self.world_size}-process {parallel}: every "
                 "optimizer step reads the rows the original run would have (the same total batch), but the "
                 "continuation is no longer bit for bit the original run: it sums in another order")
        self.loader.load_state_dict(_from_safe(mine["loader"]))
        if self.guard is not None and state.get("guard") is not None:
            self.guard.load_state_dict(state["guard"])
        if self.rank == 0:
            self._truncate_metrics(ckpt, meta)
            info(f"resuming from {ckpt} (step {meta['step']}, {meta['tokens_seen']:,} tokens seen)")
        restore_rng_state(mine["rng"])  # last: nothing above may draw from a generator afterwards
        self.last_good = ckpt
        return ResumeState(path=ckpt, step=int(meta["step"]), tokens_seen=int(meta["tokens_seen"]), meta=meta)

    def _load_sharded(self, ckpt: Path, model, rest: dict | None) -> None:
        """Model and optimizer from a sharded checkpoint; an optimizer that does not fit is one clear line."""
        try:
            if rest is not None:
                _keyed_by_name(rest, model, self.optimizer)
            sharded.load(model, self.optimizer, ckpt, tied_aliases(model), rest, self.pg)
        except (ValueError, KeyError, TypeError, IndexError, RuntimeError) as e:
            message = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise GptrainError(f"{ckpt} does not fit this run's optimizer ({message}); resume with the settings the "
                               "run started with") from None

    def _check_compatible(self, ckpt: Path, meta: dict, model) -> None:
        saved = meta.get("model_config") or {}
        now = model.config.to_dict() if hasattr(model, "config") else {}
        diff = [f"{k}={saved.get(k)} -> {now.get(k)}" for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
        if diff:
            raise GptrainError(f"checkpoint {ckpt} has a different model shape ({', '.join(diff)}); the shape cannot "
                               "change mid-run: drop the shape flags to resume, or train into a new --out")
        old_tok, new_tok = (meta.get("tokenizer") or {}).get("sha256"), (self.tokenizer or {}).get("sha256")
        if old_tok and new_tok and old_tok != new_tok:
            raise GptrainError(f"checkpoint {ckpt} was trained with tokenizer {meta['tokenizer'].get('name')} "
                               f"(sha256 {old_tok[:12]}...) but this run's data uses {self.tokenizer.get('name')} "
                               f"(sha256 {new_tok[:12]}...); the tokenizer cannot change mid-run")
        if self.rank == 0:
            differs = machine_changes(meta.get("machine"), machine())
            if differs:
                warn(f"{ckpt.name} was written with {', '.join(differs)}: the continuation is not bit-for-bit the "
                     "uninterrupted run (floating-point results depend on the thread count, torch version and "
                     "processor); resume with the same ones to continue exactly")
            old_cfg = meta.get("config") or {}
            changed = [f"{k} {old_cfg[k]!r} -> {self.config[k]!r}"
                       for k in sorted(set(old_cfg) & set(self.config) - self.quiet) if old_cfg[k] != self.config[k]]
            if changed:
                warn(f"settings changed since {ckpt.name}: {'; '.join(changed)}")

    def _truncate_metrics(self, ckpt: Path, meta: dict) -> None:
        """Cut RUN/metrics.jsonl back to what was written when `ckpt` was saved, so no step appears twice; what is
        cut (logged after that save) is first kept in metrics.jsonl.cut-TIME."""
        offset = meta.get("metrics_offset")
        if self.metrics_path is None or offset is None or not self.metrics_path.exists():
            return
        if ckpt.parent.resolve() != self.root.resolve():
            return  # resuming another run's checkpoint: this run's log is its own
        if checkpoint_step(ckpt) >= self.config.get("max_steps", float("inf")):
            return  # the run's last checkpoint: what follows it is its final evaluation, which a rerun keeps
        size = self.metrics_path.stat().st_size
        if size < offset:
            warn(f"{self.metrics_path} is shorter than when {ckpt.name} was saved; appending to it as it is")
            return
        if size == offset:
            return
        with open(self.metrics_path, "rb") as f:
            f.seek(offset)
            tail = f.read()
        kept = unique_path(self.metrics_path.with_name(f"{self.metrics_path.name}.cut-{time.strftime('%Y%m%dT%H%M%S')}"))
        with open(kept, "wb") as f:
            f.write(tail)
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(kept.parent)
        with open(self.metrics_path, "r+b") as f:
            f.truncate(offset)
            f.flush()
            os.fsync(f.fileno())
        lines = tail.count(b"\n") + (not tail.endswith(b"\n"))
        warn(f"resuming from {ckpt.name}: the {lines} line(s) of {self.metrics_path.name} logged "
             f"after it were moved to {kept} (the resumed run logs those steps again)")
