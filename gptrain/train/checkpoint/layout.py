"""Where checkpoints live in a run directory and what they are called.

RUN/checkpoints/step_XXXXXXXX/ holds (XXXXXXXX = optimizer updates completed)
  model.safetensors  unwrapped weights (no `module.`/`_orig_mod.` prefixes; a tied tensor stored once)
  optimizer.pt       optimizer.state_dict()                       } torch.save, read back only with
  state.pt           every rank's RNGs and loader state, the     } torch.load(weights_only=True)
                     divergence guard's state
  meta.json          readable: step, tokens seen, time, git revision, configs, tokenizer, world size
  MANIFEST.json      sha256 and size of each file above, written last
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

CHECKPOINTS = "checkpoints"
MODEL, OPTIMIZER, STATE, META, MANIFEST = "model.safetensors", "optimizer.pt", "state.pt", "meta.json", "MANIFEST.json"
FORMAT = "gptrain-checkpoint"
VERSION = 1
_STEP_DIR = re.compile(r"^step_(\d{8,})$")


def warn(msg: str) -> None:
    print(f"gptrain: warning: {msg}", file=sys.stderr, flush=True)


def info(msg: str) -> None:
    print(msg, flush=True)


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
