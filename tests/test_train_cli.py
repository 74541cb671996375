"""`gptrain train` as a user runs it: real prepared data, config.json, metrics.jsonl, determinism, bad input."""

import json

import pytest

from gptrain import devices
from gptrain.cli import main as cli
from gptrain.devices import native_bf16

SMALL = ["--preset", "tiny", "--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--seq-len", "32",
         "--micro-batch-size", "2", "--total-batch-size", "128", "--max-steps", "4", "--eval-every", "2",
         "--val-tokens", "256", "--sample-every", "0", "--threads", "1"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("shakespeare")
    assert cli(["prepare", "shakespeare", "--out", str(d)]) == 0
    return d


def _events(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_train_writes_resolved_config_and_metrics(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(["train", "--data", str(data_dir), "--out", str(run), *SMALL, "--lr", "0.01"]) == 0
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["train"]["lr"] == 0.01 and cfg["train"]["device"] == "cpu" and cfg["train"]["compile"] is False
    auto = "bfloat16" if native_bf16() else "float32"  # --dtype auto on this CPU
    assert cfg["train"]["dtype"] == auto and cfg["grad_accum_steps"] == 2 and cfg["world_size"] == 1
    assert cfg["train"]["embedding_lr_scale"] == 5.0 and cfg["train"]["save_every"] == 500  # tiny's
    assert cfg["data_source"] == {"kind": "shakespeare", "name": "shakespeare"}  # what the val loss is of
    assert cfg["model"] == {"block_size": cfg["model"]["block_size"], "vocab_size": 50257, "n_layer": 1, "n_head": 2,
                            "n_embd": 32, "pad_vocab_to": 64}
    events = _events(run)
    steps = [e for e in events if "train_loss" in e]
    assert [e["step"] for e in steps] == [0, 1, 2, 3]
    assert all({"lr", "grad_norm", "tokens_per_sec"} <= e.keys() for e in steps)
    assert [e["step"] for e in events if "val_loss" in e] == [0, 2, 4]
    out = capsys.readouterr().out
    assert "device cpu" in out and "step      4/4" in out and "eta" in out and f"run directory: {run}" in out


def test_cpu_runs_are_bit_for_bit_reproducible(data_dir, tmp_path):
    losses = []
    for name in ("a", "b"):
        assert cli(["train", "--data", str(data_dir), "--out", str(tmp_path / name), *SMALL]) == 0
        losses.append([e["train_loss"] for e in _events(tmp_path / name) if "train_loss" in e])
    assert losses[0] == losses[1]  # exact: JSON floats round-trip, so the files hold the exact losses
    assert cli(["train", "--data", str(data_dir), "--out", str(tmp_path / "c"), *SMALL, "--seed", "7"]) == 0
    assert [e["train_loss"] for e in _events(tmp_path / "c") if "train_loss" in e] != losses[0]


def test_epochs_set_the_step_count(data_dir, tmp_path):
    args = [a for a in SMALL if a not in ("--max-steps", "4")]
    # ~1.44M train tokens / 128 per step ≈ 11k steps per epoch; 0.0003 epochs ≈ 4 steps
    assert cli(["train", "--data", str(data_dir), "--out", str(tmp_path / "r"), *args, "--epochs", "0.0003",
                "--eval-every", "0"]) == 0
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["train"]["max_steps"] == 4


@pytest.mark.parametrize("flags, message", [
    (["--total-batch-size", "100"], "--total-batch-size 100 is not a multiple of"),
    (["--seq-len", "4096"], "--seq-len 4096 exceeds the model's context window"),
    (["--val-tokens", "10"], "fewer than one batch"),
])
def test_bad_input_is_one_line(data_dir, tmp_path, capsys, flags, message):
    code = cli(["train", "--data", str(data_dir), "--out", str(tmp_path / "r"), *SMALL, *flags])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gptrain: error: ") and message in err and "\n" not in err


def test_rerunning_the_same_command_continues_the_run(data_dir, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["train", "--data", str(data_dir), "--out", str(run), *SMALL, "--save-every", "2"]
    assert cli(argv) == 0
    ref = [e["train_loss"] for e in _events(run) if "train_loss" in e]
    # a crash after step 3, before the checkpoint at 4: the same command continues from step 2, exactly
    newest = run / "checkpoints" / "step_00000004"
    newest.rename(run / "gone")
    capsys.readouterr()
    assert cli(argv) == 0
    out, err = capsys.readouterr()
    assert "resuming from" in out and "step_00000002" in out
    assert [e["train_loss"] for e in _events(run) if "train_loss" in e] == ref  # steps 0-3 once each, same losses
    assert len(list(run.glob("metrics.jsonl.cut-*"))) == 1 and "metrics.jsonl.cut-" in err  # the cut tail is kept

    # a changed setting that defines the run is refused, naming it; a runtime one is not
    assert cli([*argv, "--lr", "0.02"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "--lr 0.002 -> 0.02" in err and "--resume auto" in err
    assert cli([*argv, "--log-every", "2"]) == 0
    assert "resuming from" in capsys.readouterr().out
    assert cli([*argv, "--lr", "0.02", "--resume", "auto"]) == 0  # explicit auto continues, with a warning
    assert "lr 0.002 -> 0.02" in capsys.readouterr().err


def test_in_loop_samples_continue_the_datas_own_text(data_dir, tmp_path):
    from gptrain.data.shards import open_shard
    from gptrain.tokenizer import get_tokenizer
    run = tmp_path / "run"
    args = [a for a in SMALL if a not in ("--sample-every", "0")]
    assert cli(["train", "--data", str(data_dir), "--out", str(run), *args, "--sample-every", "4",
                "--sample-tokens", "4", "--eval-every", "0"]) == 0
    prompt = json.loads((run / "config.json").read_text())["train"]["sample_prompt"]
    manifest = json.loads((data_dir / "manifest.json").read_text())
    val = next(sh for sh in manifest["shards"] if sh["split"] == "val")
    tokens = open_shard(data_dir / val["path"])[:200].tolist()
    first_doc = get_tokenizer().decode(tokens[1:tokens.index(50256, 1)] if 50256 in tokens[1:] else tokens[1:])
    first_line = next(line for line in first_doc.splitlines() if line.strip())
    assert prompt == first_line.strip() + "\n"  # a whole line, with its newline: samples start the next line
    samples = next(e["samples"] for e in _events(run) if "samples" in e)
    assert all(s.startswith(prompt) for s in samples)


def test_dtype_auto_follows_the_cpu_for_a_new_run_and_keeps_a_run_s_own(data_dir, tmp_path, monkeypatch):
    """auto: bf16 autocast on a CPU with native bf16, float32 without; rerunning a run keeps the dtype it has."""
    for native, dtype in ((True, "bfloat16"), (False, "float32")):
        monkeypatch.setattr(devices, "native_bf16", lambda native=native: native)
        run = tmp_path / f"new-{dtype}"
        assert cli(["train", "--data", str(data_dir), "--out", str(run), *SMALL, "--max-steps", "1"]) == 0
        assert json.loads((run / "config.json").read_text())["train"]["dtype"] == dtype
    # a float32 run, then the same command (auto) on a CPU where auto would pick bf16: it continues in float32
    monkeypatch.setattr(devices, "native_bf16", lambda: True)
    run = tmp_path / "kept"
    assert cli(["train", "--data", str(data_dir), "--out", str(run), *SMALL, "--max-steps", "2", "--dtype", "float32",
                "--save-every", "1"]) == 0
    assert cli(["train", "--data", str(data_dir), "--out", str(run), *SMALL, "--max-steps", "3",
                "--resume", "auto"]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["dtype"] == "float32"
    assert [e["step"] for e in _events(run) if "train_loss" in e] == [0, 1, 2]  # continued, not started over
    assert cli(["train", "--data", str(data_dir), "--out", str(run), *SMALL, "--max-steps", "3",
                "--resume", "fresh"]) == 0  # a new run: the CPU's choice again
    assert json.loads((run / "config.json").read_text())["train"]["dtype"] == "bfloat16"
