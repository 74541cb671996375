#!/usr/bin/env bash
# Single-GPU check, about 6 minutes (estimated: not yet run on a GPU): gpt2-124m for 50 steps on synthetic tokens with torch.compile + bf16 against
# compile off (tokens/s, MFU), then FSDP at world size 1 against DDP with and without activation checkpointing (eager, 12
# steps each: tokens/s, peak memory beside the memory plan), then one evaluation round with compile on (val loss, a sample, HellaSwag on 300
# examples when ../shared/data has them), then HellaSwag examples/s of the batched scorer against the lecture's
# per-example loop (gpt2 shape, float32, 200 examples), then the compiled bf16 step against transformers'
# GPT2LMHeadModel eager (the train-throughput baseline), then the generation engine's decode tokens/s under
# continuous batching at batch 1, 8, 32 (gpt2 shape, chat vocabulary, bf16, eager and compiled). Runs from the
# source tree without installing: needs torch with CUDA, numpy, tiktoken, safetensors, transformers (not
# `datasets`). Prints a short table last. Options: see gpu_check.py --help (e.g. --micro-batch-size 16 on a
# smaller GPU; --dry-run to exercise the script on a CPU).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python3}" "$root/benchmarks/gpu_check.py" "$@"
