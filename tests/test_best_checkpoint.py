"""RUN/checkpoints/best: a corpus small enough to overfit (8 documents of random tokens) makes val loss turn up
while train loss falls. The best checkpoint survives --keep-last 1, `eval val --model RUN/checkpoints/best`
gives the lowest val loss the run logged, the note is printed once, and resuming never takes `best` for a step."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gptrain.data.shards import write_shard
from gptrain.train.checkpoint import find_checkpoint, list_checkpoints, verify_checkpoint
from gptrain.train.checkpoint.best import RISING_EVALS, BestCheckpoint, best_dir, read_record

ROOT = Path(__file__).resolve().parents[1]
FLAGS = ["--model", "tiny", "--n-layer", "1", "--n-head", "2", "--n-embd", "64", "--seq-len", "32",
         "--micro-batch-size", "4", "--total-batch-size", "128", "--warmup-steps", "5", "--lr", "1e-2",
         "--min-lr-ratio", "1", "--eval-every", "10", "--val-tokens", "256", "--sample-every", "0",
         "--log-every", "0", "--device", "cpu", "--threads", "1", "--hellaswag-data", "none", "--keep-last", "1"]
NOTE = "note: val loss rose at"


def gptrain(*args):
    p = subprocess.run([sys.executable, "-m", "gptrain", *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def overfit_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("overfit")
    rng = np.random.default_rng(0)
    write_shard(d / "t_train_000.bin", np.concatenate([[50256, *rng.integers(0, 100, 63)] for _ in range(8)]))
    write_shard(d / "t_val_000.bin", np.concatenate([[50256, *rng.integers(0, 100, 63)] for _ in range(4)]))
    return d


def val_losses(run: Path) -> dict[int, float]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return {e["step"]: e["val_loss"] for e in map(json.loads, lines) if "val_loss" in e}


def test_the_best_checkpoint_is_kept_and_named_once(overfit_data, tmp_path):
    run = tmp_path / "run"
    p = gptrain("train", "--data", overfit_data, "--out", run, *FLAGS, "--max-steps", 60, "--save-every", 10)
    logged = val_losses(run)
    best_step = min((s for s in logged if s > 0), key=logged.get)
    assert 0 < best_step < 60 and logged[60] > logged[best_step]  # it overfits: the end is worse than the best
    assert read_record(run) == {"step": best_step, "val_loss": logged[best_step], "source": f"step_{best_step:08d}"}
    assert verify_checkpoint(best_dir(run)) is None
    assert [c.name for c in list_checkpoints(run)] == ["step_00000060"]  # --keep-last 1 pruned the rest, not best
    assert find_checkpoint(run).name == "step_00000060"  # resuming takes the newest step, never best
    assert p.stdout.count(NOTE) == 1, p.stdout
    note = next(line for line in p.stdout.splitlines() if line.startswith(NOTE))
    assert f"step {best_step} at val loss {logged[best_step]:.4f}" in note and f"--model {run}/checkpoints/best" in note

    out = tmp_path / "eval.json"
    gptrain("eval", "val", "--model", best_dir(run), "--json", out)
    assert json.loads(out.read_text())["val_loss"] == pytest.approx(logged[best_step], abs=1e-6)


def test_keep_best_eval_saves_at_an_improving_evaluation_off_the_save_steps(overfit_data, tmp_path):
    run = tmp_path / "run"
    gptrain("train", "--data", overfit_data, "--out", run, *FLAGS, "--max-steps", 30, "--save-every", 0,
            "--keep-best", "eval")
    logged = val_losses(run)
    assert logged[20] < logged[10] and logged[20] < logged[30]
    assert read_record(run)["source"] == "step_00000020"  # saved for it (--save-every 0 saves only at the end)
    assert [c.name for c in list_checkpoints(run)] == ["step_00000030"]


def test_the_note_needs_val_up_and_train_down_at_consecutive_evaluations(tmp_path):
    best = BestCheckpoint(tmp_path, "off")
    train = []
    for step, val, loss in [(0, 9.0, 9.0), (10, 5.0, 5.0), (20, 5.1, 4.9), (30, 5.0, 4.8), (40, 5.2, 4.7),
                            (50, 5.3, 4.6)]:
        train += [loss] * 10
        assert best.observe(step, val, train) is None  # a dip at step 30 restarts the count
    train += [4.5] * 10
    note = best.observe(60, 5.4, train)
    assert note and f"at {RISING_EVALS} evaluations in a row (5.0000 at step 30 -> 5.4000 at step 60) while train " \
                    "loss fell (4.8000 -> 4.5000)" in note
    assert "was step 10's, not kept (--keep-best off)" in note
    train += [4.4] * 10
    assert best.observe(70, 5.5, train) is None  # once per run

    flat = BestCheckpoint(tmp_path, "off")
    train = []
    for step, val in [(10, 5.0), (20, 5.1), (30, 5.2), (40, 5.3)]:
        train += [4.0] * 10  # train loss not falling: not memorising, no note
        assert flat.observe(step, val, train) is None
