"""RUN/checkpoints/best: the checkpoint with the lowest validation loss so far, kept whatever the retention flags.

A small corpus trained long is memorised: val loss turns up while train loss keeps falling, and the newest
checkpoints (all that --keep-last keeps) are the worse ones. `BestCheckpoint` keeps a copy of the checkpoint
whose evaluation gave the lowest val loss as RUN/checkpoints/best (readable by every command as `--model
RUN/checkpoints/best`), and says once when val loss has risen at several evaluations in a row while train loss
fell, naming the best step and how to use it.

The copy knows nothing of a checkpoint's format: once a step directory is complete (verify_checkpoint), its
files are hard-linked (copied where links are impossible) into a hidden temp directory beside it, with best.json
(step, val loss, source) written there too; that directory then replaces the old best by two renames, so `best`
is always a complete checkpoint (a crash between the renames leaves the old one as .best-old, put back by the next
run). Checkpoint files are never modified in place, so sharing them by hard links is safe: pruning a step
directory only drops its names. `best` is not a step directory, so resuming, `find_checkpoint(RUN)` and
retention never see it; `--resume fresh` moves it aside with the rest of checkpoints/.

Which evaluations can become the best (--keep-best): `eval` saves a checkpoint at an evaluation that improves on
the best when its step has none (exact, at the cost of a save each time val loss improves off a --save-every
step); `saved` (the default) takes only the checkpoints saved anyway (free; exact when --save-every is a multiple
of --eval-every, as in the tiny preset); `off` keeps none.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch.distributed as dist

from gptrain.config import fsync_dir
from gptrain.train.checkpoint.layout import CHECKPOINTS, warn
from gptrain.train.checkpoint.verify import verify_checkpoint

BEST, RECORD = "best", "best.json"
RISING_EVALS = 3  # val loss up at this many evaluations in a row, train loss down: the note


def best_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / CHECKPOINTS / BEST


def read_record(run_dir: str | os.PathLike) -> dict | None:
    """best.json of RUN/checkpoints/best: {"step", "val_loss", "source"}, or None when there is no best."""
    try:
        return json.loads((best_dir(run_dir) / RECORD).read_text())
    except (OSError, ValueError):
        return None


def _link_tree(src: Path, dst: Path) -> None:
    """`dst` (new) holding `src`'s files: hard links where the filesystem allows, else copies."""
    dst.mkdir()
    for entry in src.iterdir():
        target = dst / entry.name
        if entry.is_dir():
            _link_tree(entry, target)
            continue
        try:
            os.link(entry, target)
        except OSError:
            shutil.copy2(entry, target)


class BestCheckpoint:
    """The run's best checkpoint and the val-loss trend. Every rank makes the same decisions (the val loss is
    reduced over ranks and the starting record is rank 0's); only `is_master` touches the disk."""

    def __init__(self, run_dir: str | os.PathLike, mode: str = "saved", is_master: bool = True):
        self.run_dir, self.mode, self.is_master = Path(run_dir), mode, is_master
        self.path = best_dir(run_dir)
        self.root = self.path.parent
        if is_master:
            self._recover()
        record = _from_rank0(read_record(run_dir) if is_master else None)
        self.step = record["step"] if record else None
        self.val_loss = record["val_loss"] if record else float("inf")
        self.history: list[tuple[int, float, float | None]] = []  # (step, val loss, mean train loss since last)
        self._seen_train = 0
        self.noted = False

    def _recover(self) -> None:
        old = self.root / ".best-old"
        if old.is_dir() and not self.path.exists():
            os.replace(old, self.path)  # a crash between the two renames of `keep`
        elif old.exists():
            shutil.rmtree(old, ignore_errors=True)

    def improves(self, step: int, val_loss: float) -> bool:
        """Whether this evaluation should become the best (step 0, the untrained model, never does)."""
        return self.mode != "off" and step > 0 and val_loss < self.val_loss

    def keep(self, ckpt: Path, step: int, val_loss: float) -> None:
        """Make `ckpt` (the complete checkpoint of `step`) the best. Every rank calls it."""
        self.step, self.val_loss = step, val_loss
        if not self.is_master:
            return
        reason = verify_checkpoint(ckpt, full=False)
        if reason:
            warn(f"not keeping {ckpt} as the best checkpoint: {reason}")
            return
        tmp, old = self.root / f".tmp-best-{ckpt.name}", self.root / ".best-old"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            _link_tree(ckpt, tmp)
            (tmp / RECORD).write_text(json.dumps({"step": step, "val_loss": val_loss, "source": ckpt.name}) + "\n")
            fsync_dir(tmp)
            if self.path.exists():
                os.replace(self.path, old)
            os.replace(tmp, self.path)
            fsync_dir(self.root)
            shutil.rmtree(old, ignore_errors=True)
        except OSError as e:  # the run goes on: its own checkpoints are intact
            shutil.rmtree(tmp, ignore_errors=True)
            warn(f"could not update {self.path} to {ckpt.name} ({e}); the run's checkpoints are unaffected")

    def observe(self, step: int, val_loss: float, train_losses: list[float]) -> str | None:
        """Record an evaluation; the note, once, when val loss has risen at RISING_EVALS evaluations in a row
        while the mean train loss (over the steps between evaluations) fell."""
        recent = train_losses[self._seen_train:]
        self._seen_train = len(train_losses)
        self.history.append((step, val_loss, sum(recent) / len(recent) if recent else None))
        window = self.history[-(RISING_EVALS + 1):]
        if self.noted or len(window) <= RISING_EVALS:
            return None
        vals, trains = [v for _, v, _ in window], [t for _, _, t in window]
        rising = all(b > a for a, b in zip(vals, vals[1:]))
        if not rising or None in trains or not trains[-1] < trains[0]:
            return None
        self.noted = True
        (s0, v0, t0), (s1, v1, t1) = window[0], window[-1]
        if self.step is None:
            lowest = min(self.history, key=lambda e: e[1])
            kept = (f"the lowest val loss, {lowest[1]:.4f}, was step {lowest[0]}'s, not kept "
                    + ("(--keep-best off)" if self.mode == "off" else
                       "(no checkpoint at that step: --keep-best eval saves one)"))
        else:
            run = self.run_dir.as_posix()
            kept = (f"the best checkpoint, step {self.step} at val loss {self.val_loss:.4f}, is kept in {run}/"
                    f"{CHECKPOINTS}/{BEST}: use it with --model {run}/{CHECKPOINTS}/{BEST} (sample, eval, export, "
                    "sft, chat)")
        return (f"note: val loss rose at {RISING_EVALS} evaluations in a row ({v0:.4f} at step {s0} -> {v1:.4f} at "
                f"step {s1}) while train loss fell ({t0:.4f} -> {t1:.4f}): the model is memorising its training "
                f"text; {kept}. More text, or fewer steps, avoids it")


def _from_rank0(obj):
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return obj
