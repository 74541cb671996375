"""benchmarks/gpu_check.sh runs every phase on a CPU (--dry-run) from the source tree, without `datasets`; a phase
that fails does not stop the others; the summary table and the results file come out whatever happened."""

import json
import os
import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT))
from benchmarks import gpu_check  # noqa: E402

PHASES = [name for name, _, _ in gpu_check.PHASES]


def _table(stdout: str) -> dict[str, list[str]]:
    lines = stdout.splitlines()
    start = lines.index("| phase | status | seconds | result |")
    rows = [line.split(" | ") for line in lines[start + 2:] if line.startswith("| ")]
    return {r[0].lstrip("| "): r for r in rows}


def test_gpu_check_dry_run_without_datasets(tmp_path):
    block = tmp_path / "block"
    block.mkdir()
    (block / "datasets.py").write_text("raise ImportError('datasets is not installed on the GPU machine')\n")
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(block), OMP_NUM_THREADS="1")
    results = tmp_path / "results.json"
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run", "--results", str(results)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = _table(r.stdout)
    assert list(table) == PHASES  # every phase has its row, in order
    status = {name: row[1] for name, row in table.items()}
    assert "failed" not in status.values(), r.stdout[-3000:]
    assert status["compiled"] == status["decode_compiled"] == "skipped"  # no compile on a dry run
    for name in ("env", "eager", "loss", "eval", "fsdp", "deterministic", "hf_baseline", "decode"):
        assert status[name] == "ok", name
    assert "val_loss 10." in table["eval"][3] and "sample" in table["eval"][3]
    if gpu_check.hellaswag_file(None):
        assert "HellaSwag acc_norm" in table["eval"][3] and "predictions agree" in table["hellaswag_speed"][3]
    else:  # said, not silently skipped
        assert "no HellaSwag examples here" in table["eval"][3] and status["hellaswag_speed"] == "skipped"
    if gpu_check.FAST_PRESET not in gpu_check.TRAIN_PRESETS:
        assert status["fast_recipe"] == "skipped" and gpu_check.FAST_PRESET in table["fast_recipe"][3]
    assert all(f"{k} " in table["fsdp"][3] for k in ("ddp", "fsdp", "fsdp, checkpointing"))
    saved = json.loads(results.read_text())
    assert [p["phase"] for p in saved["phases"]] == PHASES
    assert saved["phases"][1]["tokens_per_sec"] > 0 and "torch" in saved["phases"][0]


def test_a_failing_phase_does_not_stop_the_check(tmp_path, monkeypatch, capsys):
    def broken(check):
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nlong traceback text")
    phases = [p if p[0] != "eager" else ("eager", broken, 1) for p in gpu_check.PHASES if p[0] in ("env", "eager", "loss")]
    monkeypatch.setattr(gpu_check, "PHASES", phases)
    rc = gpu_check.main(["--dry-run", "--results", str(tmp_path / "r.json")])
    table = _table(capsys.readouterr().out)
    assert rc == 1 and list(table) == ["env", "eager", "loss"]
    assert table["eager"][1] == "failed" and "RuntimeError: CUDA error: an illegal memory access" in table["eager"][3]
    assert "long traceback" not in table["eager"][3] and table["loss"][1] == "ok"
    saved = json.loads((tmp_path / "r.json").read_text())
    assert [p["status"] for p in saved["phases"]] == ["ok", "failed", "ok"]


def test_the_budget_skips_phases_that_no_longer_fit(tmp_path, monkeypatch, capsys):
    phases = [("env", gpu_check.phase_env, 1), ("decode_compiled", gpu_check.phase_decode_compiled, 90)]
    monkeypatch.setattr(gpu_check, "PHASES", phases)
    check = gpu_check.Check(gpu_check.argparse.Namespace(only=None, dry_run=False), None, None,
                            gpu_check.distributed.DistEnv(), compile_on=False)
    out = gpu_check.run_phases(check, phases, budget_s=30, results_path=tmp_path / "r.json")
    assert [p["status"] for p in out["phases"]] == ["ok", "skipped"]
    assert "time budget" in out["phases"][1]["summary"]
