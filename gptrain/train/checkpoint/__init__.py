"""Checkpoints a run can always resume from, bit for bit, after any kind of death. One module per job:

- `layout`: where checkpoints live in a run directory and what their files are called
- `verify`: whether a checkpoint is complete and intact; which checkpoint a path names
- `rng`: RNG and loader state in a form torch.load(weights_only=True) reads back
- `provenance`: what a checkpoint records about the code that made it
- `sharded`: model and optimizer tensors through torch.distributed.checkpoint, each rank its own shards
- `state`: the unwrapped model, a checkpoint's weights for commands, the gathered format of earlier versions
- `choose`: which checkpoint a run continues from (the --resume modes), and moving aside what it abandons
- `checkpointer`: `Checkpointer` (atomic save, asynchronous save, prune, resume) and `ResumeState`
"""

from gptrain.train.checkpoint.checkpointer import TEST_SAVE_HOOK, Checkpointer, ResumeState, rerun_hint
from gptrain.train.checkpoint.layout import (CHECKPOINTS, FORMAT, MANIFEST, META, MODEL, OPTIMIZER, STATE, VERSION,
                                             checkpoint_step, list_checkpoints, step_dir)
from gptrain.train.checkpoint.provenance import git_revision
from gptrain.train.checkpoint.rng import capture_rng_state, restore_rng_state
from gptrain.train.checkpoint.state import load_model_weights, unwrap_model
from gptrain.train.checkpoint.verify import find_checkpoint, verify_checkpoint

__all__ = ["CHECKPOINTS", "FORMAT", "MANIFEST", "META", "MODEL", "OPTIMIZER", "STATE", "TEST_SAVE_HOOK", "VERSION",
           "Checkpointer", "ResumeState", "capture_rng_state", "checkpoint_step", "find_checkpoint", "git_revision",
           "list_checkpoints", "load_model_weights", "rerun_hint", "restore_rng_state", "step_dir",
           "unwrap_model", "verify_checkpoint"]
