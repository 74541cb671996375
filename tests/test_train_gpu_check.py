"""benchmarks/gpu_check.sh runs its whole logic on a CPU (--dry-run) from the source tree, without `datasets`."""

import os
import subprocess
import sys

from conftest import ROOT, SHARED_DATA
from gptrain.devices import native_bf16


def test_gpu_check_dry_run_without_datasets(tmp_path):
    block = tmp_path / "block"
    block.mkdir()
    (block / "datasets.py").write_text("raise ImportError('datasets is not installed on the GPU machine')\n")
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=str(block), OMP_NUM_THREADS="1")
    r = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.strip().splitlines()
    table = lines[lines.index("| phase | tokens/s | MFU | first step (compile) s | final loss |"):]
    auto = "bfloat16" if native_bf16() else "float32"  # the trainer's --dtype auto on this CPU
    assert table[2].startswith(f"| eager {auto} |") and table[3].startswith(f"| eager {auto} |")
    assert "compile speed-up" in table[4]
    assert table[5].startswith("| eval round") and "val_loss 10." in table[5] and "sample" in table[5]
    assert table[6].startswith("| HellaSwag scoring")
    if (SHARED_DATA / "hellaswag" / "hellaswag_val.jsonl.gz").is_file():  # the speed row needs the examples
        assert "lecture loop" in table[6] and "predictions agree" in table[6] and "/4 |" in table[6]
    assert table[7].startswith("| vs HF GPT2LMHeadModel eager (float32) | baseline ") and "speed-up" in table[7]
    decode = [line for line in table if line.startswith("| engine decode eager (float32, vocab 50261) |")]
    assert len(decode) == 1 and all(f"batch {b} " in decode[0] for b in (1, 8, 32)) and "tok/s" in decode[0]
    lines = r.stdout.splitlines()  # the FSDP (world size 1) and activation-checkpointing rows, before the table
    for row in ("| ddp |", "| fsdp |", "| ddp, activation checkpointing |", "| fsdp, activation checkpointing |",
                "| fsdp / ddp (W=1) |", "| activation checkpointing cost | ddp "):
        assert any(line.startswith(row) for line in lines), row
