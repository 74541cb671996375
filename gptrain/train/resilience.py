"""Surviving preemption and divergence.

- `Preemption`: SIGTERM, SIGINT or SIGHUP (a closed terminal or ssh session) asks the run to stop; every rank
  finishes the step it is in, the ranks agree through the step's loss all-reduce, a checkpoint is saved and
  the process exits 0, whatever became of its console (gptrain/output.py). A second SIGINT or SIGTERM exits at
  once (a copy of the same signal within a second is ignored: torchrun forwards the terminal's Ctrl-C to workers
  that already received it); a repeated SIGHUP never does, as a hung-up terminal cannot ask twice (the kernel and
  the shell each send one).
- `DivergenceGuard`: an update whose loss or gradient norm is non-finite is skipped (no optimizer step), and so,
  optionally, is one whose loss or grad norm is an outlier (z-score against a running window of accepted steps).
  Too many consecutive skips stop the run, naming the step and the last good checkpoint. Its state is
  checkpointed, so skipping never breaks bit-exact resume.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import threading
import time
from collections import deque

import torch

from gptrain.errors import GptrainError
from gptrain.train.optim import step_unless

# Test-only: comma-separated steps (or A-B ranges) at which the trainer turns the loss into NaN.
TEST_NAN_STEPS = "GPTRAIN_TEST_NAN_STEPS"


STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP") if hasattr(signal, name))


class Preemption:
    """Install around the training loop (or use as a context manager); `received` is the signal, None before one.
    The trainer carries it on its per-step loss all-reduce, so every rank stops after the same step."""

    DUPLICATE_WINDOW_S = 1.0

    def __init__(self, rerun: str = "run the same command again", signals=STOP_SIGNALS):
        self.rerun, self.signals = rerun, signals
        self.received: int | None = None
        self._at = 0.0
        self._previous = {}

    def install(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():  # Python delivers signals to the main thread only
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.uninstall()
        return False

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.received is None:
            self.received, self._at = signum, time.monotonic()
            print(f"gptrain: {name} received: finishing this step, saving a checkpoint, then exiting "
                  "(send it again to exit at once without saving)", file=sys.stderr, flush=True)
            return
        if signum == getattr(signal, "SIGHUP", None) or (
                signum == self.received and time.monotonic() - self._at < self.DUPLICATE_WINDOW_S):
            return
        print(f"gptrain: second {name}: exiting now without saving; {self.rerun} to continue from the last "
              "checkpoint", file=sys.stderr, flush=True)
        os._exit(128 + signum)


class DivergenceError(GptrainError):
    pass


class DivergenceGuard:
    """Decides, from the (rank-averaged) loss and the global grad norm, whether an update may be applied.

    Every rank sees the same loss and norm, so every rank makes the same decision. `zscore` > 0 also skips
    updates whose loss or grad norm lies more than `zscore` standard deviations above the mean of the last
    `window` accepted steps (once the window is full). `max_skips` consecutive skips raise DivergenceError.
    """

    def __init__(self, zscore: float = 0.0, window: int = 100, max_skips: int = 5):
        if max_skips < 1:
            raise GptrainError(f"--guard-max-skips {max_skips} must be at least 1")
        if zscore > 0 and window < 2:
            raise GptrainError(f"--guard-window {window} must be at least 2 to compute a z-score")
        self.zscore, self.window, self.max_skips = zscore, window, max_skips
        self.losses: deque[float] = deque(maxlen=window)
        self.norms: deque[float] = deque(maxlen=window)
        self.consecutive = 0
        self.skipped = 0
        self.good_checkpoint: str | None = None  # the newest checkpoint saved before the current run of skips

    def check(self, step: int, loss: float, grad_norm: float, last_checkpoint=None) -> str | None:
        """None to apply the update, else why it must be skipped. Raises DivergenceError after too many skips.
        `last_checkpoint` is the newest checkpoint saved so far."""
        reason = self._reason(loss, grad_norm)
        if reason is None:
            self.losses.append(loss)
            self.norms.append(grad_norm)
            self.consecutive = 0
            return None
        if self.consecutive == 0:
            self.good_checkpoint = str(last_checkpoint) if last_checkpoint else None
        self.consecutive += 1
        self.skipped += 1
        if self.consecutive >= self.max_skips:
            good = self.good_checkpoint
            where = (f"the last good checkpoint is {good}: resume from it (--resume {good}) "
                     "with a lower --lr or another --seed" if good else
                     "no checkpoint was saved before it: restart with a lower --lr or another --seed")
            raise DivergenceError(f"training diverged: {self.consecutive} consecutive updates skipped up to step "
                                  f"{step} (last: {reason}); {where}")
        return reason

    def step(self, optimizer: torch.optim.Optimizer, step: int, values: torch.Tensor, last_checkpoint=None,
             on_device: bool = False) -> tuple[list[float], str | None]:
        """Apply `optimizer`'s update unless the guard skips it: (`values` = [loss, grad norm, ...] read as floats,
        the reason for a skip or None). On the host path (CPU) the values are read, then the step is taken or not.
        `on_device` (CUDA): the non-finite test is made on the device and the update queued through the fused
        optimizer's `found_inf` (optim.step_unless) before the host reads the values, copied ahead of the
        optimizer's kernels, so the device runs those while the host keeps the books: the same decision from
        the same values. The z-score test's window lives on the host: with `zscore` > 0 the host path is taken."""
        if on_device and self.zscore == 0:
            read = _read_later(values)
            step_unless(optimizer, (~torch.isfinite(values[:2]).all()).float())
            values = read()
            return values, self.check(step, values[0], values[1], last_checkpoint)
        values = values.tolist()
        reason = self.check(step, values[0], values[1], last_checkpoint)
        if reason is None:
            optimizer.step()
        return values, reason

    def _reason(self, loss: float, grad_norm: float) -> str | None:
        if not math.isfinite(loss):
            return f"non-finite loss {loss}"
        if not math.isfinite(grad_norm):
            return f"non-finite grad norm {grad_norm}"
        if self.zscore > 0 and len(self.losses) == self.window:
            for name, value, history in (("loss", loss, self.losses), ("grad norm", grad_norm, self.norms)):
                z = _zscore(value, history)
                if z > self.zscore:
                    return f"{name} {value:.4g} is an outlier (z-score {z:.1f} > {self.zscore:g})"
        return None

    def state_dict(self) -> dict:
        return {"losses": list(self.losses), "norms": list(self.norms), "consecutive": self.consecutive,
                "skipped": self.skipped, "good_checkpoint": self.good_checkpoint}

    def load_state_dict(self, state: dict) -> None:
        self.losses = deque(state["losses"], maxlen=self.window)
        self.norms = deque(state["norms"], maxlen=self.window)
        self.consecutive, self.skipped = int(state["consecutive"]), int(state["skipped"])
        self.good_checkpoint = state.get("good_checkpoint")


def _read_later(values: torch.Tensor):
    """Start copying `values` to the host without waiting (pinned memory, on the current stream, so it completes
    before any work queued after it); the function returned waits for that copy alone and gives the floats."""
    if values.device.type != "cuda":
        return values.tolist
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()

    def wait() -> list[float]:
        copied.synchronize()
        return host.tolist()
    return wait


def _zscore(value: float, history) -> float:
    n = len(history)
    mean = math.fsum(history) / n
    std = math.sqrt(math.fsum((x - mean) ** 2 for x in history) / (n - 1))
    return (value - mean) / std if std > 0 else 0.0


def _parse_steps(spec: str) -> frozenset[int]:
    steps = set()
    for part in filter(None, (p.strip() for p in spec.split(","))):
        lo, _, hi = part.partition("-")
        steps.update(range(int(lo), int(hi or lo) + 1))
    return frozenset(steps)


_NAN_STEPS = _parse_steps(os.environ.get(TEST_NAN_STEPS, ""))


def inject_test_nan(step: int, loss: torch.Tensor) -> torch.Tensor:
    """Test hook: the loss (and so the gradients) become NaN at the steps listed in $GPTRAIN_TEST_NAN_STEPS."""
    return loss * float("nan") if step in _NAN_STEPS else loss
