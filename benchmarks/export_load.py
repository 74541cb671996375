"""Seconds to export and to load GPT-2 124M: gptrain against transformers' own save/load, same weights, same run.

export: `gptrain.hf.save_pretrained` (config, model.safetensors, generation config, tokenizer files derived from
the shipped ranks, atomic rename; its merge-list cache cleared each time, as in a fresh `gptrain export`)
against `GPT2LMHeadModel.save_pretrained` + `AutoTokenizer.save_pretrained` of the same model and tokenizer.
load: `gptrain.hf.load_model(dir)` against `AutoModelForCausalLM.from_pretrained(dir)` on the exported directory.
Runs alternate; the median of --repeats is reported, wall and CPU seconds (CPU is steadier on a shared machine).

    python benchmarks/export_load.py --repeats 3
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ["HF_HUB_OFFLINE"] = "1"
    import transformers

    from gptrain import hf
    from gptrain.model import GPT, preset

    torch.manual_seed(0)
    model = GPT(preset("gpt2")).eval()
    work = Path(tempfile.mkdtemp(prefix="export_bench-"))
    try:
        ours_dir, theirs_dir = work / "gptrain", work / "transformers"
        hf.save_pretrained(model, ours_dir)
        hf_model = transformers.AutoModelForCausalLM.from_pretrained(ours_dir)
        hf_tok = transformers.AutoTokenizer.from_pretrained(ours_dir)

        def export_ours():
            hf.bpe_merges.cache_clear()
            hf.save_pretrained(model, ours_dir)

        def export_theirs():
            shutil.rmtree(theirs_dir, ignore_errors=True)
            hf_model.save_pretrained(theirs_dir)
            hf_tok.save_pretrained(theirs_dir)

        results = {k: [] for k in ("export gptrain", "export transformers", "load gptrain", "load transformers")}
        for _ in range(args.repeats):
            results["export gptrain"].append(timed(export_ours))
            results["export transformers"].append(timed(export_theirs))
            results["load gptrain"].append(timed(lambda: hf.load_model(str(ours_dir))))
            results["load transformers"].append(
                timed(lambda: transformers.AutoModelForCausalLM.from_pretrained(ours_dir)))
        size = sum(p.stat().st_size for p in ours_dir.iterdir()) / 2**20
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}; "
          f"torch {torch.__version__}, transformers {transformers.__version__}, {args.threads} threads")
    print(f"GPT-2 124M, export directory {size:.0f} MiB, median of {args.repeats}")
    for name, runs in results.items():
        wall = statistics.median(r[0] for r in runs)
        cpu = statistics.median(r[1] for r in runs)
        print(f"  {name:<20} {wall:6.2f} s wall  {cpu:6.2f} s CPU")


if __name__ == "__main__":
    main()
