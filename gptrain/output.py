"""Console output is best-effort: a closed or broken stdout/stderr never stops a command.

`gptrain train ... | tee log` then Ctrl-C: the terminal's SIGINT ends `tee` too, and the trainer's next progress
line would raise BrokenPipeError and kill the run before it saved. What a run must keep goes to files
(metrics.jsonl, checkpoints); the console only reports. So `best_effort_output()` (entered by `gptrain.cli.main`
around every command) puts a wrapper on sys.stdout and sys.stderr that, once a write or flush fails (EPIPE, EIO
from a hung-up terminal, a closed file), points the stream's file descriptor at /dev/null and goes quiet. The
descriptor is redirected too so that Python's own flush of the buffered remainder at exit succeeds: otherwise a
clean exit would become status 120 ("Exception ignored ... BrokenPipeError").
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time


class BestEffortStream:
    """A text stream that forwards to `stream` until a write fails, then discards everything."""

    def __init__(self, stream):
        self._stream = stream
        self.failed = False

    def _fail(self) -> None:
        self.failed = True
        try:  # later writes, and the interpreter's flush at exit, of the original stream go nowhere
            devnull = os.open(os.devnull, os.O_WRONLY)
            try:
                os.dup2(devnull, self._stream.fileno())
            finally:
                os.close(devnull)
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            pass  # no descriptor (a test's capture buffer): dropping our own writes is enough

    def write(self, text: str) -> int:
        if not self.failed:
            try:
                return self._stream.write(text)
            except (OSError, ValueError):  # BrokenPipeError, EIO, "I/O operation on closed file"
                self._fail()
        return len(text)

    def flush(self) -> None:
        if not self.failed:
            try:
                self._stream.flush()
            except (OSError, ValueError):
                self._fail()

    def __getattr__(self, name):  # fileno, isatty, encoding, buffer, ...: the wrapped stream's
        return getattr(self._stream, name)


@contextlib.contextmanager
def best_effort_output():
    """sys.stdout and sys.stderr best-effort for the duration (nested uses keep the outer wrappers)."""
    saved = sys.stdout, sys.stderr
    if not isinstance(sys.stdout, BestEffortStream) and sys.stdout is not None:
        sys.stdout = BestEffortStream(sys.stdout)
    if not isinstance(sys.stderr, BestEffortStream) and sys.stderr is not None:
        sys.stderr = BestEffortStream(sys.stderr)
    try:
        yield
    finally:
        for current in (sys.stdout, sys.stderr):
            if isinstance(current, BestEffortStream) and current not in saved:
                current.flush()
        sys.stdout, sys.stderr = saved


def says_configuration_errors() -> bool:
    """Whether this process prints an error found before any work (flags, ranges, files): under torchrun every
    rank finds the same one, so only each node's first process (LOCAL_RANK 0) says it; once the process group
    exists, errors may differ between ranks and every rank says its own."""
    if os.environ.get("LOCAL_RANK", "0") == "0":
        return True
    dist = sys.modules.get("torch.distributed")
    return bool(dist is not None and dist.is_available() and dist.is_initialized())


QUIET_EXIT_DELAY_S = 10.0


def let_local_rank0_speak() -> None:
    """Called by a process that keeps a configuration error to itself, before it exits: torchrun stops the other
    workers as soon as one exits, so exiting at once could end local rank 0 before it printed the error. Waiting
    lets rank 0 exit first (torchrun then names it as the failure and ends this one); the wait is bounded."""
    time.sleep(QUIET_EXIT_DELAY_S)
