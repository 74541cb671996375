"""Signals and output never cost work: `gptrain train ... | tee log` and then SIGINT (Ctrl-C ends tee as well),
SIGTERM or SIGHUP (the terminal or ssh session closed): the trainer's reader is gone, its next progress line has
nowhere to go, and still the step finishes, a checkpoint is saved at the step it was on and the exit is clean."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gptrain.output import BestEffortStream
from gptrain.train.checkpoint import list_checkpoints, verify_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--model", "tiny", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--seq-len", "16",
         "--micro-batch-size", "2", "--total-batch-size", "32", "--max-steps", "100000", "--warmup-steps", "2",
         "--eval-every", "0", "--sample-every", "0", "--save-every", "0", "--log-every", "1", "--device", "cpu",
         "--threads", "1", "--hellaswag-data", "none"]


def logged_steps(run: Path) -> list[int]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [e["step"] for e in map(json.loads, path.read_text().splitlines()) if "train_loss" in e]


def wait_for(predicate, what: str, proc, timeout: float = 600):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the trainer died (exit {proc.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_after_the_pipe_reader_died_saves_the_step_and_exits_zero(small_shards, tmp_path, sig):
    run = tmp_path / "run"
    read_end, write_end = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "gptrain", "train", "--data", str(small_shards), "--out",
                             str(run), *FLAGS], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdin=subprocess.DEVNULL, stdout=write_end, stderr=write_end)  # `2>&1 | tee log`
    os.close(write_end)
    try:
        with os.fdopen(read_end, "rb", buffering=0) as reader:
            seen = b""
            while b"step " not in seen:  # training has begun and prints a line per step
                chunk = reader.read(4096)
                assert chunk, seen.decode(errors="replace")[-2000:]
                seen += chunk
        # the reader is gone (read_end closed); training goes on although every progress line now fails
        wait_for(lambda: len(logged_steps(run)) >= 5 + seen.count(b"step "), "steps after the reader closed", proc)
        proc.send_signal(getattr(signal, sig))
        assert proc.wait(timeout=600) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    steps = logged_steps(run)
    saved = list_checkpoints(run)
    assert [c.name for c in saved] == [f"step_{len(steps):08d}"]  # the step it was on, all logged steps kept
    assert verify_checkpoint(saved[0]) is None and steps == list(range(len(steps)))


def test_a_best_effort_stream_goes_quiet_after_a_broken_pipe_and_exit_stays_clean():
    """The interpreter's own flush at exit must not turn the clean exit into status 120."""
    code = ("import sys, time\n"
            "from gptrain.output import best_effort_output\n"
            "with best_effort_output():\n"
            "    sys.stdin.read()\n"  # the parent closes our stdout's reader, then stdin
            "    for i in range(1000): print('line', i)\n"
            "    print('x' * 10000, end='')\n"  # left in the buffer for the exit-time flush
            "sys.stdout.write('y' * 100)\n")
    read_end, write_end = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdin=subprocess.PIPE, stdout=write_end, stderr=subprocess.PIPE)
    os.close(write_end)
    os.close(read_end)
    _, err = proc.communicate(b"", timeout=60)
    assert proc.returncode == 0 and err == b"", err.decode()


def test_a_stream_without_a_descriptor_just_drops_writes():
    class Closed:
        def write(self, text):
            raise ValueError("I/O operation on closed file")

        def flush(self):
            raise ValueError("I/O operation on closed file")

    s = BestEffortStream(Closed())
    assert s.write("hello") == 5
    s.flush()
    assert s.failed
