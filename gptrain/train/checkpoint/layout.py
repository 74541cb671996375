"""Where checkpoints live in a run directory and what they are called.

RUN/checkpoints/step_XXXXXXXX/ holds (XXXXXXXX = optimizer updates completed)
  __R_0.distcp       rank R's tensors (torch.distributed.checkpoint): its shards of the weights (unwrapped names,
                     a tied tensor once) and of the optimizer's tensors (keyed by parameter name)
  .metadata          DCP's index of where every tensor's pieces are (written by rank 0)
  rank_RRRRR.pt      rank R's RNGs and loader state                } torch.save, read back only with
  state.pt           the divergence guard's state, the optimizer's } torch.load(weights_only=True)
                     param_groups and non-tensor state
  meta.json          readable: step, tokens seen, time, git revision, configs, tokenizer, world size, tied names
  MANIFEST.json      sha256 and size of each file above, written last (by rank 0, from every rank's hashes)

Checkpoints of versions before the sharded format (VERSION 1) hold instead model.safetensors (the gathered
weights), optimizer.pt (the gathered optimizer state) and state.pt (every rank's RNGs and loader state, the
guard's): they still load and resume. Other names under checkpoints/ (`best`, `step_X.broken-TIME`, ...) are not
step directories: listing, resuming and pruning look at step_XXXXXXXX only.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

CHECKPOINTS = "checkpoints"
MODEL, OPTIMIZER, STATE, META, MANIFEST = "model.safetensors", "optimizer.pt", "state.pt", "meta.json", "MANIFEST.json"
FORMAT = "gptrain-checkpoint"
VERSION = 2  # 2: sharded (DCP); 1: gathered (model.safetensors + optimizer.pt)
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


def warn(msg: str) -> None:
    print(f"gptrain: warning: {msg}", file=sys.stderr, flush=True)


def info(msg: str) -> None:
    print(msg, flush=True)


def rank_file(rank: int) -> str:
    return f"rank_{rank:05d}.pt"


def step_dir(run_dir: str | os.PathLike, step: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"step_{step:08d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint directories under RUN/checkpoints, oldest first (complete or not: see `verify_checkpoint`)."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def checkpoint_step(ckpt: Path) -> int:
    m = _STEP_DIR.match(Path(ckpt).name)
    return int(m.group(1)) if m else -1
