"""Which checkpoint a run continues from, decided on rank 0 before anything is loaded (`Checkpointer.resume`):
the --resume modes, refusing changed settings or checkpoints that are all broken, and moving aside, never
deleting, what the choice leaves behind (an earlier run's records, checkpoints of an abandoned future).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from gptrain.config import fsync_dir
from gptrain.errors import GptrainError
from gptrain.train.checkpoint.layout import CHECKPOINTS, META, checkpoint_step, info, list_checkpoints, warn
from gptrain.train.checkpoint.verify import find_checkpoint, verify_checkpoint


def set_aside(ckpt: Path, why: str) -> Path:
    """Move a checkpoint out of the way without deleting it (its name no longer looks like a checkpoint)."""
    dest = unique_path(ckpt.with_name(f"{ckpt.name}.{why}-{time.strftime('%Y%m%dT%H%M%S')}"))
    os.replace(ckpt, dest)
    fsync_dir(ckpt.parent)
    warn(f"moved {ckpt.name} aside to {dest} (kept, not deleted)")
    return dest


def choose(run_dir: Path, spec: str | None, config: dict, runtime: frozenset) -> Path | None:
    """The checkpoint `Checkpointer.resume(spec)` continues from (None: a fresh start), after setting aside
    what that choice abandons; raises GptrainError when the run cannot go on as asked (see `resume`)."""
    root = run_dir / CHECKPOINTS
    if spec == "fresh":
        move_records_aside(run_dir, "--resume fresh")
        return None
    if spec and spec != "auto":
        ckpt = find_checkpoint(spec)
        if ckpt is None:
            raise GptrainError(f"--resume {spec}: no valid checkpoint under {Path(spec) / CHECKPOINTS}; pass a "
                               "checkpoint directory or --resume auto")
    else:
        ckpt = find_checkpoint(run_dir) if root.is_dir() else None
        if ckpt is None:
            _refuse_if_only_broken(run_dir)
            if records(run_dir):
                move_records_aside(run_dir, "it holds no checkpoint to continue from")
            elif spec == "auto":
                info(f"no checkpoint in {root} yet: starting a fresh run")
            return None
        if spec is None:
            _refuse_if_changed(run_dir, ckpt, config, runtime)
    # Later checkpoints of this run belong to a future that this resume abandons; move them aside so that
    # a later resume cannot jump back onto it (they are kept, not deleted).
    if ckpt.parent.resolve() == root.resolve():
        for later in list_checkpoints(run_dir):
            if checkpoint_step(later) > checkpoint_step(ckpt):
                set_aside(later, "abandoned" if verify_checkpoint(later) is None else "broken")
    return ckpt


def _refuse_if_only_broken(run_dir: Path) -> None:
    """Checkpoints exist, none valid: set them aside and stop, rather than start over on top of the run."""
    root = run_dir / CHECKPOINTS
    bad = list_checkpoints(run_dir)
    reasons = [f"{c.name} ({verify_checkpoint(c)})" for c in bad]
    for c in bad:
        set_aside(c, "broken")
    earlier = sorted(p.name for p in root.glob("step_*.broken-*")) if root.is_dir() else []
    if not bad and not earlier:
        return
    what = "; ".join(reasons) if reasons else ", ".join(earlier)
    raise GptrainError(
        f"{root} holds checkpoints but none is usable ({what}); they are kept, moved aside as "
        f"step_X.broken-TIME. To continue, restore a good copy as {root}/step_XXXXXXXX, or pass --resume "
        f"PATH with a checkpoint from elsewhere; to start over, pass --resume fresh (moves the old checkpoints, "
        f"metrics.jsonl and config.json aside to {run_dir}/previous-TIME/, deleting nothing)")


def _refuse_if_changed(run_dir: Path, ckpt: Path, config: dict, runtime: frozenset) -> None:
    """Continuing by default requires the run's identity (every non-runtime setting) to be unchanged."""
    old = (json.loads((ckpt / META).read_text()).get("config") or {})
    changed = [f"--{k.replace('_', '-')} {old[k]!r} -> {config[k]!r}"
               for k in sorted(set(old) & set(config) - runtime) if old[k] != config[k]]
    if changed:
        raise GptrainError(
            f"{run_dir} holds a run ({ckpt.name}) whose settings differ from these: {'; '.join(changed)}. "
            "Re-run with the original values to continue it, pass --resume auto to continue it with the new "
            "ones, or --resume fresh (or another --out) to start a new run")


def records(run_dir: Path) -> list[Path]:
    """What an earlier run left in the run directory: checkpoints, metrics (with cut-off parts), config, tb,
    the report drawn from them."""
    root = run_dir / CHECKPOINTS
    names = [CHECKPOINTS, "metrics.jsonl", "config.json", "tb", "report"]
    found = [run_dir / n for n in names if (run_dir / n).exists()]
    found += sorted(run_dir.glob("metrics.jsonl.cut-*"))
    empty_log = run_dir / "metrics.jsonl"
    if empty_log in found and empty_log.stat().st_size == 0:
        found.remove(empty_log)
    if root in found and not any(root.iterdir()):
        found.remove(root)
    return found


def move_records_aside(run_dir: Path, why: str) -> Path | None:
    """Start over without losing anything: move an earlier run's records into RUN/previous-TIME/."""
    found = records(run_dir)
    if not found:
        return None
    dest = unique_path(run_dir / f"previous-{time.strftime('%Y%m%dT%H%M%S')}")
    dest.mkdir()
    for p in found:
        os.replace(p, dest / p.name)
    fsync_dir(run_dir)
    warn(f"starting a fresh run in {run_dir} ({why}): moved the earlier run's "
         f"{', '.join(p.name for p in found)} to {dest} (kept, not deleted)")
    return dest


def unique_path(path: Path) -> Path:
    """`path`, or `path-2`, `path-3`, ... when it exists."""
    dest, n = path, 1
    while dest.exists():
        n += 1
        dest = path.with_name(f"{path.name}-{n}")
    return dest
