"""A full disk (issue 15.2): one line naming the directory, the bytes needed and free, what survived and how to
continue, instead of tracebacks from safetensors, torch.save or json; and nothing already written is lost.

On a real filesystem that fills up (a small tmpfs, which needs root and the right to mount: skipped where the
machine does not allow it), and, everywhere, with ENOSPC injected into each writer."""

import contextlib
import errno
import io
import json
import os
import subprocess
import uuid

import numpy as np
import pytest

from gptrain import errors
from gptrain.cli import main
from gptrain.config import write_json_atomic
from gptrain.data.shards import write_shard
from gptrain.errors import DiskFullError, disk_full


def run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gptrain: error: ") and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def small_fs(tmp_path):
    """mount(size) -> a directory on a tmpfs of that many bytes; resize(size) grows it (remount)."""
    mountpoint = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
    mountpoint.mkdir()
    mounted = []

    def mount(size: int):
        if os.geteuid() != 0:
            pytest.skip("mounting a small tmpfs needs root")
        try:
            p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mountpoint)],
                               capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError) as e:
            pytest.skip(f"cannot run mount here ({e})")
        if p.returncode != 0:
            pytest.skip(f"this machine does not allow mounting a tmpfs ({p.stderr.strip() or p.returncode})")
        mounted.append(mountpoint)
        return mountpoint

    def resize(size: int):
        subprocess.run(["mount", "-o", f"remount,size={size}", str(mountpoint)], check=True)

    mount.resize = resize
    yield mount
    for m in mounted:
        subprocess.run(["umount", "-l", str(m)], check=False)


@pytest.fixture
def data(small_shards):
    return small_shards


# a checkpoint of this model is ~9.9 MB, nearly all of it one process's tensors (__0_0.distcp: weights 3.2 MB,
# AdamW's moments 6.5 MB)
TRAIN = ["--preset", "tiny", "--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--seq-len", "16",
         "--micro-batch-size", "2", "--total-batch-size", "32", "--max-steps", "4", "--eval-every", "0",
         "--sample-every", "0", "--threads", "1", "--save-every", "2", "--log-every", "0"]


def test_training_on_a_disk_that_fills_up(small_fs, data):
    """The second checkpoint does not fit (its tensors, written by DCP, fail): one line, the first checkpoint
    intact; after freeing space the same command continues from it."""
    run_dir = small_fs(12_000_000) / "run"
    argv = ["train", "--data", str(data), "--out", str(run_dir), *TRAIN]
    code, _, err = run(argv)
    line = one_line(err)
    assert code == 2 and f"the disk holding {run_dir}/checkpoints is full" in line
    assert "writing checkpoint step_00000004 failed (~9.9 MB needed, " in line and " free)" in line
    assert f"{run_dir}/checkpoints/step_00000002 (step 2) is intact" in line and "run the same command again" in line
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_00000002"]  # no debris
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    small_fs.resize(40_000_000)
    code, out, err = run(argv)
    assert code == 0 and "resuming from" in out and "step_00000002" in out
    assert [json.loads(x)["step"] for x in (run_dir / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]


def test_a_full_disk_at_start_up(small_fs, data):
    fs = small_fs(1_000_000)
    with open(fs / "filler", "wb", buffering=0) as f:  # fill it to the last byte
        with pytest.raises(OSError):
            for _ in range(1000):
                f.write(b"\0" * 4096)
    code, _, err = run(["train", "--data", str(data), "--out", str(fs / "run"), *TRAIN])
    line = one_line(err)
    assert code == 2 and f"the disk holding {fs}/run is full: writing {fs}/run/config.json failed" in line
    assert "no checkpoint of this run was written yet" in line


def test_prepare_and_export_on_a_full_disk(small_fs, tmp_path):
    fs = small_fs(200_000)
    text = tmp_path / "docs.jsonl"
    words = np.random.default_rng(1).choice(["the", "word", "of", "a", "line", "and", "more"], 120_000)
    text.write_text("".join(json.dumps({"text": " ".join(words[i:i + 600])}) + "\n" for i in range(0, len(words), 600)))
    argv = ["prepare", str(text), "--out", str(fs / "data"), "--shard-tokens", "20000", "--val-tokens", "5000",
            "--workers", "1"]
    code, _, err = run(argv)
    line = one_line(err)
    assert code == 2 and f"the disk holding {fs}/data is full: writing shard train_" in line
    assert "the shards finished before it are kept" in line
    kept = json.loads((fs / "data" / "manifest.json").read_text())
    assert kept["shards"] and not kept["complete"] and not list((fs / "data").glob(".*tmp*"))
    small_fs.resize(4_000_000)
    assert run(argv)[0] == 0  # continues after the kept shards
    assert json.loads((fs / "data" / "manifest.json").read_text())["complete"]

    from gptrain.hf import save_pretrained
    from gptrain.model import GPT, GPTConfig
    save_pretrained(GPT(GPTConfig(block_size=16, vocab_size=50257, n_layer=1, n_head=2, n_embd=16)), tmp_path / "m")
    code, _, err = run(["export", "--model", str(tmp_path / "m"), "--out", str(fs / "export")])
    line = one_line(err)
    assert code == 2 and f"the disk holding {fs} is full: writing the export export failed" in line
    assert "nothing was replaced" in line and not list(fs.glob(".export*")) and not (fs / "export").exists()


# ---------------------------------------------------------------- injected, where no filesystem can be mounted

def _no_space(*a, **k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_json_and_shard_writers_turn_enospc_into_one_line(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    target.write_text('{"old": true}\n')
    monkeypatch.setattr(os, "fsync", _no_space)
    with pytest.raises(DiskFullError) as e:
        write_json_atomic(target, {"new": True})
    assert "\n" not in str(e.value) and f"the disk holding {tmp_path} is full" in str(e.value)
    with pytest.raises(DiskFullError, match="writing shard s.bin failed .~2.0 KB needed"):
        write_shard(tmp_path / "s.bin", np.zeros(500, dtype=np.uint16))
    monkeypatch.undo()
    assert target.read_text() == '{"old": true}\n' and sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


def test_disk_full_message_and_detection(tmp_path, monkeypatch):
    monkeypatch.setattr(errors, "free_bytes", lambda path: 1_234_567)
    e = disk_full(tmp_path / "run", 9_750_000, "checkpoint step_00000004", "the last good one is intact")
    assert str(e) == (f"the disk holding {tmp_path}/run is full: writing checkpoint step_00000004 failed "
                      "(~9.8 MB needed, 1.2 MB free); the last good one is intact")
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")
    except RuntimeError as wrapped:  # torch.save hides the OSError in __context__
        assert errors.is_disk_full(wrapped)
    assert not errors.is_disk_full(RuntimeError("unexpected pos"), tmp_path, needed=100)  # 1.2 MB free: not full
    assert errors.is_disk_full(RuntimeError("unexpected pos"), tmp_path, needed=2_000_000)


def test_cli_reports_an_unexpected_enospc_in_one_line(tmp_path, monkeypatch, capsys):
    """Any write the commands do not wrap themselves still ends in one line, not a traceback."""
    import gptrain.train.command as command
    monkeypatch.setattr(command, "check_run_inputs",
                        lambda cfg, cmd: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device",
                                                                       str(tmp_path / "x.json"))))
    assert main(["train", "--data", "d", "--out", str(tmp_path / "r")]) == 2
    assert one_line(capsys.readouterr().err).startswith(f"gptrain: error: the disk holding {tmp_path} is full")
