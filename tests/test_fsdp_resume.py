"""`gptrain train --parallel fsdp` end to end under torchrun (2 gloo processes) on data that wraps twice in the
run: killed (SIGKILL mid-save, then mid-training) and resumed with --resume auto it is bit for bit the
uninterrupted run (which saved with --async-save); its mid-run checkpoint resumes on 1 and 4 processes and under DDP onto the uninterrupted run's
losses through both epoch boundaries, as does a fresh 1-process run of the same config; `export` and `eval val` of
its checkpoint equal those of the same run trained by DDP.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gptrain.cli import main as cli
from gptrain.data.shards import write_shard
from gptrain.train.checkpoint import find_checkpoint, load_model_weights, sharded
from test_resume import ROOT, _env, events, losses

STEPS = 10
# 64 tokens a step: 2 processes × micro-batch 2 × 16, or one process accumulating 2 micro-batches
FLAGS = ["--model", "tiny", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--seq-len", "16",
         "--micro-batch-size", "2", "--total-batch-size", "64", "--max-steps", str(STEPS), "--warmup-steps", "2",
         "--lr", "1e-2", "--eval-every", "4", "--val-tokens", "64", "--sample-every", "4", "--sample-tokens", "4",
         "--num-samples", "1", "--save-every", "2", "--keep-last", "0", "--device", "cpu", "--threads", "1",
         "--seed", "7", "--hellaswag-data", "none", "--dtype", "float32"]


def train_cmd(data, run, *more, nproc=2):
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
              if nproc > 1 else [sys.executable])
    return [*launch, "-m", "gptrain", "train", "--data", str(data), "--out", str(run), *FLAGS, *more]


def train(data, run, *more, nproc=2, env=None, check=True):
    p = subprocess.run(train_cmd(data, run, *more, nproc=nproc), cwd=ROOT, env=env or _env(), capture_output=True,
                       text=True, timeout=240)
    if check:
        assert p.returncode == 0, p.stderr[-3000:]
    return p


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    tokens = np.concatenate([[50256, *rng.integers(0, 500, rng.integers(5, 30))] for _ in range(60)])
    write_shard(d / "tiny_train_000.bin", tokens[:300])  # 18 rows of 16: 4 steps of 4 rows an epoch, 2 left over
    write_shard(d / "tiny_val_000.bin", tokens[700:900])
    return d


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    run = tmp_path_factory.mktemp("fsdp") / "run"
    p = train(data, run, "--parallel", "fsdp", "--async-save")  # the runs compared with it save synchronously
    assert "FSDP x2" in p.stdout
    assert len(losses(run)) == STEPS and losses(run)[STEPS - 1] < losses(run)[0] - 0.3
    assert [e["step"] for e in events(run) if "samples" in e] == [4, 8, 10]  # rank 0 sampled from gathered weights
    # the loader's epoch after each step: the data wraps after steps 4 and 8
    assert [e["epoch"] for e in events(run) if "train_loss" in e] == [0] * 3 + [1] * 4 + [2] * 3
    return run


def test_fsdp_killed_mid_save_and_mid_training_resumes_bit_for_bit(data, reference, tmp_path):
    run = tmp_path / "run"
    p = train(data, run, "--parallel", "fsdp", env=_env(GPTRAIN_TEST_SAVE_HOOK="kill:6"), check=False)
    assert p.returncode != 0 and (run / "checkpoints" / ".tmp-step_00000006").is_dir()
    assert find_checkpoint(run).name == "step_00000004"
    # resumed, then killed again while training (after step 5's record, before the end)
    proc = subprocess.Popen(train_cmd(data, run, "--parallel", "fsdp", "--resume", "auto"), cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 180
    while proc.poll() is None and time.monotonic() < deadline and 5 not in _logged_steps(run):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert STEPS - 1 not in losses(run)  # killed before the end
    train(data, run, "--parallel", "fsdp", "--resume", "auto")
    assert losses(run) == losses(reference)  # exact float equality at every step
    assert [e for e in events(run) if "val_loss" in e] == [e for e in events(reference) if "val_loss" in e]
    _, got, _ = load_model_weights(run)
    _, want, meta = load_model_weights(reference)
    assert meta["step"] == STEPS and meta["world_size"] == 2
    for k in want:
        assert torch.equal(got[k], want[k]), k


def test_fsdp_muon_killed_mid_save_resumes_bit_for_bit_and_equals_ddp(data, tmp_path):
    """Muon under FSDP: each sharded matrix gathered whole, its momentum sharded in the checkpoint like AdamW's
    moments; killed mid-save of step 6, resumed from step 4: the uninterrupted run's losses to the bit, and a DDP
    run's to 1e-5."""
    muon = ["--optimizer", "muon", "--muon-weight-decay", "0.1"]
    ref, run, ddp = tmp_path / "ref", tmp_path / "run", tmp_path / "ddp"
    train(data, ref, "--parallel", "fsdp", *muon)
    p = train(data, run, "--parallel", "fsdp", *muon, env=_env(GPTRAIN_TEST_SAVE_HOOK="kill:6"), check=False)
    assert p.returncode != 0 and find_checkpoint(run).name == "step_00000004"
    train(data, run, "--parallel", "fsdp", *muon, "--resume", "auto")
    assert losses(run) == losses(ref)
    train(data, ddp, "--parallel", "ddp", *muon)
    assert all(abs(losses(ddp)[s] - losses(ref)[s]) < 1e-5 for s in range(STEPS))


def _logged_steps(run):
    try:
        return {e["step"] for e in events(run) if "train_loss" in e}
    except (FileNotFoundError, json.JSONDecodeError):
        return set()


@pytest.mark.parametrize("nproc,parallel", [(1, "fsdp"), (2, "ddp"), (4, "fsdp")])
def test_fsdp_checkpoint_resumes_on_another_world_size_and_under_ddp(data, reference, tmp_path, nproc, parallel):
    """From step 2, through the epoch boundaries at steps 4 and 8: the same rows at every step (4 processes take
    one row each, 1 process accumulates two micro-batches), so the losses agree to summation order."""
    run = tmp_path / "run"
    mb = ["--micro-batch-size", "1"] if nproc == 4 else []
    p = train(data, run, "--parallel", parallel, "--resume", str(reference / "checkpoints" / "step_00000002"),
              *mb, nproc=nproc)
    assert "resuming from" in p.stdout
    # another world size or parallelism (here W=2 under ddp): the continuation is said not to be bit for bit
    assert f"resuming a 2-process fsdp run as {nproc}-process {parallel}" in p.stdout + p.stderr
    got, want = losses(run), losses(reference)
    assert sorted(got) == list(range(2, STEPS))
    for step in got:
        assert abs(got[step] - want[step]) < 1e-4, (step, got[step], want[step])


def test_a_fresh_one_process_run_matches_the_two_process_run_through_the_wraps(data, reference, tmp_path):
    run = tmp_path / "run"
    train(data, run, "--parallel", "fsdp", nproc=1)
    got, want = losses(run), losses(reference)
    assert sorted(got) == list(range(STEPS))
    for step in got:
        assert abs(got[step] - want[step]) < 1e-4, (step, got[step], want[step])


def test_export_and_eval_of_an_fsdp_checkpoint_equal_the_ddp_run(data, reference, tmp_path, capsys):
    ddp = tmp_path / "ddp"
    train(data, ddp, "--parallel", "ddp")
    for step in range(STEPS):  # the same run, trained by the other parallelism
        assert abs(losses(ddp)[step] - losses(reference)[step]) < 1e-5
    results = {}
    for name, run in (("fsdp", reference), ("ddp", ddp)):
        assert cli(["export", "--model", str(run), "--out", str(tmp_path / f"export-{name}")]) == 0
        assert cli(["eval", "val", "--model", str(run), "--data", str(data), "--device", "cpu", "--batch-size", "2",
                    "--json", str(tmp_path / f"{name}.json")]) == 0
        results[name] = (load_file(tmp_path / f"export-{name}" / "model.safetensors"),
                         json.loads((tmp_path / f"{name}.json").read_text())["val_loss"])
    (fsdp_w, fsdp_val), (ddp_w, ddp_val) = results["fsdp"], results["ddp"]
    assert set(fsdp_w) == set(ddp_w)
    for k in ddp_w:  # reduce-scatter and all-reduce sum in different orders; AdamW turns that into ~1e-5 steps
        assert torch.allclose(fsdp_w[k], ddp_w[k], atol=1e-4), k
    assert abs(fsdp_val - ddp_val) < 1e-5
    # one checkpoint format: each rank's files, the tied head stored once, the optimizer keyed by parameter name
    for run in (reference, ddp):
        d = find_checkpoint(run)
        assert {".metadata", "rank_00000.pt", "rank_00001.pt"} <= {f.name for f in d.iterdir()}
        keys = sharded.SafeReader(d).read_metadata().state_dict_metadata
        assert "optim.transformer.wte.weight.exp_avg" in keys and "model.lm_head.weight" not in keys
    # nothing gathered: each FSDP rank wrote its own shards, no file holds more than 60% of the checkpoint
    sizes = {f.name: f.stat().st_size for f in find_checkpoint(reference).iterdir()}
    assert {"__0_0.distcp", "__1_0.distcp"} <= set(sizes) and max(sizes.values()) < 0.6 * sum(sizes.values()), sizes
