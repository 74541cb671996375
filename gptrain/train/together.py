"""Failing together: a step that can fail on one rank must stop every rank, at once, with the same one-line error.

Without this, a rank that fails alone (a download, rank 0's metrics write or report, a checkpoint write) exits
while the others wait in their next collective until the process group's timeout (minutes to hours), and the
user reads a timeout instead of the cause. Two shapes:

- `on_rank0(action, what)`: rank 0 runs `action` (the others do not), then its outcome is broadcast: on success
  every rank returns rank 0's result; on failure every rank raises the same `GptrainError`. The wait happens on a
  gloo control group (`control_group()`), whose timeout is the process group's (sized for checkpoint I/O by
  `--dist-timeout`), so a slow rank-0 step never trips NCCL's watchdog.
- `together(action, what)`: every rank runs `action`; the outcomes are gathered, and if any rank failed, every
  rank raises the first failed rank's error, naming that rank (the same line on every rank).

Both are plain calls in one process (no process group, or a group of one).
"""

from __future__ import annotations

import datetime
from typing import Callable, TypeVar

import torch.distributed as dist

from gptrain.errors import GptrainError

T = TypeVar("T")
_CONTROL = {}  # the gloo control group of the current default group (made on first use)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def control_group():
    """A gloo group over every rank for small host-side messages; None without a process group. NCCL jobs get a
    separate one (object collectives there would go through the GPU); gloo jobs use the default group."""
    if _world() <= 1:
        return None
    default = dist.distributed_c10d._get_default_group()
    if dist.get_backend() == "gloo":
        return default
    if default not in _CONTROL:
        _CONTROL.clear()
        _CONTROL[default] = dist.new_group(backend="gloo", timeout=default_timeout())
    return _CONTROL[default]


def default_timeout() -> datetime.timedelta:
    from gptrain.train.distributed import timeout
    return timeout()


def describe(e: BaseException, what: str) -> str:
    """One line: a GptrainError's message as it is; anything else prefixed by the step that failed."""
    if isinstance(e, GptrainError):
        return str(e)
    text = (str(e).strip().splitlines() or [""])[0]
    return f"{what} failed: {type(e).__name__}: {text}"


def on_rank0(action: Callable[[], T], what: str) -> T:
    """Run `action` on rank 0 only; every rank returns its result or raises its error (module doc)."""
    group = control_group()
    rank = dist.get_rank() if group is not None else 0
    outcome = [None, None]  # [result, error line]
    if rank == 0:
        try:
            outcome[0] = action()
        except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001 - every failure must reach the other ranks
            outcome[1] = describe(e, what)
            if group is None:
                raise
    if group is None:
        return outcome[0]
    dist.broadcast_object_list(outcome, src=0, group=group)
    if outcome[1] is not None:
        raise GptrainError(outcome[1])
    return outcome[0]


def together(action: Callable[[], T], what: str) -> T:
    """Every rank runs `action`; if any rank failed, every rank raises the first failure (module doc)."""
    group = control_group()
    result, error = None, None
    try:
        result = action()
    except (Exception, KeyboardInterrupt) as e:  # noqa: BLE001
        if group is None:
            raise
        error = describe(e, what)
    if group is None:
        return result
    errors = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error, group=group)
    failed = [(r, e) for r, e in enumerate(errors) if e is not None]
    if failed:
        r, e = failed[0]
        raise GptrainError(f"rank {r}: {e}")
    return result
