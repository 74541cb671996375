#!/usr/bin/env bash
# The single-GPU check, built for a lent machine's 15 minutes (estimated ~7 minutes with compiles; not yet run on a
# GPU): eager and compiled gpt2-124m steps (tokens/s, MFU), the loss kernels, an evaluation round (val loss,
# HellaSwag, a sample), FSDP at world size 1 against DDP (with checkpointing, with per-micro-step reduce-scatter;
# peaks beside the memory plan), the fast recipe against gpt2-124m when that preset exists, --deterministic's cost,
# HellaSwag scoring speed, the step against transformers' GPT2LMHeadModel, decode tokens/s. Every phase runs in its
# own try; phases that no longer fit --budget (450 s) are skipped; a summary table and a JSON results file
# (--results, default runs/gpu_check/results.json) come out at the end whatever failed.
#
# Runs from the source tree without installing, on torch 2.11 or later with CUDA, numpy, tiktoken, safetensors,
# transformers; no network, no `datasets`. HellaSwag: stage 300 examples (with their MIT notice) into the
# git-ignored benchmarks/data/ first, where ../shared/data exists, and carry that folder along with the tree:
#   bash benchmarks/gpu_check.sh --stage-data [--hellaswag ../shared/data/hellaswag/hellaswag_val.jsonl.gz]
#   bash benchmarks/gpu_check.sh --results "$OUT/gpu_check.json"     # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run                            # every phase on a CPU, tiny model
# Options: gpu_check.py --help (e.g. --micro-batch-size 16 on a smaller GPU, --only eager compiled).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" "$root/benchmarks/gpu_check.py" "$@"
