"""End to end: `gptrain train` killed (SIGKILL at any moment, even mid-save), preempted (SIGTERM) or corrupted,
then relaunched with `--resume auto`, continues bit for bit: same train loss at every step, same final weights.

The data is tiny on purpose: 5 steps per epoch, so the epoch boundary (a reshuffle) falls in the resumed part.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from gptrain.data.shards import write_shard
from gptrain.train.checkpoint import find_checkpoint, load_model_weights
from gptrain.train.checkpoint.sharded import SafeReader

ROOT = Path(__file__).resolve().parents[1]
STEPS = 8  # 2N, with checkpoints every N/2 = 2 steps
FLAGS = ["--model", "tiny", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--seq-len", "16",
         "--micro-batch-size", "2", "--total-batch-size", "32", "--max-steps", str(STEPS), "--warmup-steps", "2",
         "--lr", "1e-2", "--eval-every", "4", "--val-tokens", "64", "--sample-every", "0", "--save-every", "2",
         "--keep-last", "2", "--device", "cpu", "--threads", "1", "--seed", "7", "--hellaswag-data", "none"]


def _env(**extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


def train_cmd(data, run, *more):
    return [sys.executable, "-m", "gptrain", "train", "--data", str(data), "--out", str(run), *FLAGS, *more]


def run_train(data, run, *more, env=None, check=True):
    p = subprocess.run(train_cmd(data, run, *more), cwd=ROOT, env=env or _env(), capture_output=True, text=True,
                       timeout=900)  # seconds when the machine is idle; generous for a busy one
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


def events(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def losses(run):
    """{step: train_loss}, asserting no step was logged twice."""
    steps = [e for e in events(run) if "train_loss" in e]
    assert len({e["step"] for e in steps}) == len(steps), [e["step"] for e in steps]
    return {e["step"]: e["train_loss"] for e in steps}


def assert_same_run(run, ref):
    assert losses(run) == losses(ref)  # exact float equality at every step
    assert [e for e in events(run) if "val_loss" in e] == [e for e in events(ref) if "val_loss" in e]
    _, got, meta = load_model_weights(run)
    _, want, ref_meta = load_model_weights(ref)
    assert meta["step"] == ref_meta["step"] == STEPS
    for k in want:
        assert torch.equal(got[k], want[k]), k


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A train shard of 180 tokens (5 steps of 32 per epoch) and a val shard, documents led by <|endoftext|>."""
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)

    def docs(n):
        out = []
        while len(out) < n:
            out += [50256, *rng.integers(0, 500, rng.integers(5, 30))]
        return np.array(out[:n])

    write_shard(d / "tiny_train_000.bin", docs(180))
    write_shard(d / "tiny_val_000.bin", docs(100))
    return d


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("ref") / "run"
    run_train(data, run)
    assert len(losses(run)) == STEPS and losses(run)[STEPS - 1] < losses(run)[0] - 0.5  # it learns
    assert {e["epoch"] for e in events(run) if "epoch" in e} == {0, 1}  # an epoch boundary inside the run
    return run


def test_sigkill_mid_save_and_a_corrupted_checkpoint_then_resume_auto_is_bit_exact(data, reference, tmp_path):
    """Killed while writing step 8, and the newest complete checkpoint (6) damaged: resume falls back to 4."""
    run = tmp_path / "run"
    p = run_train(data, run, env=_env(GPTRAIN_TEST_SAVE_HOOK="kill:8"), check=False)
    assert p.returncode == -signal.SIGKILL
    assert (run / "checkpoints" / ".tmp-step_00000008").is_dir()  # the half-written checkpoint
    assert find_checkpoint(run).name == "step_00000006"
    blob = bytearray((run / "checkpoints" / "step_00000006" / "__0_0.distcp").read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    (run / "checkpoints" / "step_00000006" / "__0_0.distcp").write_bytes(bytes(blob))
    p = run_train(data, run, "--resume", "auto")
    assert "skipping checkpoint" in p.stderr and "step_00000006" in p.stderr
    assert "resuming from" in p.stdout and "step_00000004" in p.stdout
    assert_same_run(run, reference)
    names = {c.name for c in (run / "checkpoints").iterdir()}
    broken = {n for n in names if n.startswith("step_00000006.broken-")}  # kept for inspection, not deleted
    assert len(broken) == 1 and names - broken == {"step_00000006", "step_00000008", "best"}  # best: lowest val


def test_sigkill_during_an_asynchronous_save_then_resume_is_bit_exact(data, reference, tmp_path):
    """--async-save: killed while step 6's checkpoint is completed in the background (training goes on
    meanwhile), the run resumes from step 4 and ends exactly as the synchronous reference; its end waits for the
    last save."""
    run = tmp_path / "run"
    p = run_train(data, run, "--async-save", env=_env(GPTRAIN_TEST_SAVE_HOOK="kill:6"), check=False)
    assert p.returncode == -signal.SIGKILL
    assert (run / "checkpoints" / ".tmp-step_00000006").is_dir() and find_checkpoint(run).name == "step_00000004"
    p = run_train(data, run, "--async-save", "--resume", "auto")
    assert "resuming from" in p.stdout and "step_00000004" in p.stdout
    assert_same_run(run, reference)
    assert find_checkpoint(run).name == f"step_{STEPS:08d}"  # the last save completed before the process ended


def test_sigkill_at_a_random_moment_then_resume_auto_is_bit_exact(data, reference, tmp_path):
    seed = random.randrange(1 << 30)
    delay = random.Random(seed).uniform(0.0, 1.0)
    run = tmp_path / "run"
    # Every save sleeps 0.4 s halfway through, so the kill often lands while a checkpoint is being written.
    proc = subprocess.Popen(train_cmd(data, run), cwd=ROOT, env=_env(GPTRAIN_TEST_SAVE_HOOK="sleep:0.4"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180  # ends as soon as the checkpoint appears; long only on a busy machine
    while not (run / "checkpoints" / "step_00000002").exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    print(f"seed {seed}: killed {delay:.3f} s after step_00000002 appeared")  # shown if the test fails
    run_train(data, run, "--resume", "auto")
    assert_same_run(run, reference)


def test_sigterm_saves_exits_zero_and_resumes_exactly(data, reference, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(data, run) + ["--resume", "fresh"], cwd=ROOT,  # a fresh start, so the hint
                            env=_env(GPTRAIN_TEST_SAVE_HOOK="sleep:0.4"),       # must not say "same command"
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180  # ends as soon as the checkpoint appears; long only on a busy machine
    while not (run / "checkpoints" / "step_00000002").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM received" in err
    assert "run the same command without --resume fresh to continue" in out + err
    stopped = find_checkpoint(run)
    assert 2 <= int(stopped.name.split("_")[1]) < STEPS  # saved where it stopped, before the end
    assert max(losses(run)) < STEPS - 1  # the last step logged is before the end
    run_train(data, run, "--resume", "auto")
    assert_same_run(run, reference)


def test_nan_steps_are_skipped_and_repeated_ones_stop_the_run(data, tmp_path):
    """Step 3's NaN is skipped (later losses stay finite); steps 5, 6, 7 in a row stop the run (max 3 skips)."""
    run = tmp_path / "run"
    p = run_train(data, run, "--guard-max-skips", "3", env=_env(GPTRAIN_TEST_NAN_STEPS="3,5-100"), check=False)
    skipped = [e for e in events(run) if e.get("skipped")]
    assert [e["step"] for e in skipped] == [3, 5, 6] and "non-finite" in skipped[0]["skipped"]
    assert "step 3: update skipped" in p.stdout
    assert np.isfinite(losses(run)[4])  # the NaN never reached the weights
    assert p.returncode == 2
    line = [l for l in p.stderr.splitlines() if l.startswith("gptrain: error:")]
    assert len(line) == 1 and "3 consecutive updates skipped up to step 7" in line[0], p.stderr[-2000:]
    assert "checkpoints/step_00000004" in line[0]  # step 6 was saved mid-streak: not a good one
    assert "Traceback" not in p.stderr


@pytest.mark.slow
def test_ddp_two_processes_kill_and_resume_is_bit_exact(data, tmp_path):
    """2-process gloo under torchrun: killed mid-save of step 6, resumed from step 4, equal to the uninterrupted run."""
    def torchrun(run, *more, env):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "gptrain", "train", "--data", str(data), "--out", str(run), *FLAGS, "--total-batch-size", "64", *more]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)

    ref, run = tmp_path / "ref", tmp_path / "run"
    p = torchrun(ref, env=_env())
    assert p.returncode == 0, p.stderr[-3000:]
    assert torchrun(run, env=_env(GPTRAIN_TEST_SAVE_HOOK="kill:6")).returncode != 0
    assert find_checkpoint(run).name == "step_00000004"
    p = torchrun(run, "--resume", "auto", env=_env())
    assert p.returncode == 0, p.stderr[-3000:]
    assert_same_run(run, ref)
    meta = json.loads((find_checkpoint(run) / "meta.json").read_text())
    assert meta["world_size"] == 2
    names = {f.name for f in find_checkpoint(run).iterdir()}
    assert {"rank_00000.pt", "rank_00001.pt"} <= names  # each rank's RNG and loader state


MUON = ["--optimizer", "muon", "--muon-weight-decay", "0.1", "--schedule", "linear", "--min-lr-ratio", "0"]


def test_muon_killed_mid_save_resumes_bit_exact(data, tmp_path):
    """Muon's momentum buffers travel in the checkpoint: killed while writing step 6, resumed from step 4, the run
    equals the uninterrupted one (linear decay to zero: its LR resumes exactly too)."""
    ref, run = tmp_path / "ref", tmp_path / "run"
    run_train(data, ref, *MUON)
    p = run_train(data, run, *MUON, env=_env(GPTRAIN_TEST_SAVE_HOOK="kill:6"), check=False)
    assert p.returncode == -signal.SIGKILL
    assert find_checkpoint(run).name == "step_00000004"
    keys = SafeReader(str(find_checkpoint(run))).read_metadata().state_dict_metadata
    assert sum(k.endswith("momentum_buffer") for k in keys) == 8  # 4 matrices in each of 2 blocks
    run_train(data, run, *MUON, "--resume", "auto")
    assert_same_run(run, ref)
    assert [e["lr"] for e in events(ref) if "lr" in e][-1] == 0.0
