#!/usr/bin/env bash
# The fast recipe's GPU row (a phase for benchmarks/gpu_check.sh): gpt2-124m and gpt2-124m-fast, the same number of
# steps each (STEPS, default 300; each recipe's own schedule over them, warm-up WARMUP=30), on the shipped
# Shakespeare corpus (offline: the lent GPU machines reach no network), 65,536-token steps (micro-batch 16 x 1024 x
# 4 accumulation on one GPU), then a table: final val loss and bits per byte, median tokens/s. A few hundred steps
# on 1.4M tokens of Shakespeare say whether Muon runs compiled on the GPU and what its Newton-Schulz costs per
# token; whether gpt2-124m-fast reaches gpt2-124m's FineWeb-EDU loss in half the tokens needs the full runs.
# Extra arguments go to both `gptrain train` commands (e.g. on a CPU, to exercise it: STEPS=3 bash
# benchmarks/recipe_gpu_check.sh --n-layer 2 --n-embd 64 --n-head 2 --seq-len 64 --micro-batch-size 2
# --total-batch-size 256 --device cpu). OUT (default runs/recipe_gpu_check) holds the data and runs.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
py="${PYTHON:-python3}"
out="${OUT:-runs/recipe_gpu_check}"
steps="${STEPS:-300}"
"$py" -m gptrain prepare shakespeare --out "$out/shakespeare"
for recipe in gpt2-124m gpt2-124m-fast; do
  "$py" -m gptrain train --preset "$recipe" --data "$out/shakespeare" --out "$out/$recipe" --resume fresh \
    --max-steps "$steps" --warmup-steps "${WARMUP:-30}" --micro-batch-size 16 --total-batch-size 65536 \
    --eval-every "$steps" --val-tokens 131072 --sample-every 0 --save-every 0 --hellaswag-data none \
    --log-every 25 "$@"
done
"$py" - "$out" <<'EOF'
import json, statistics, sys
from pathlib import Path
print("| recipe | steps | val loss | val bpb | median tokens/s |\n|---|---|---|---|---|")
for recipe in ("gpt2-124m", "gpt2-124m-fast"):
    rows = [json.loads(line) for line in open(Path(sys.argv[1]) / recipe / "metrics.jsonl")]
    ev = [r for r in rows if "val_loss" in r][-1]
    tps = statistics.median(r["tokens_per_sec"] for r in rows if "tokens_per_sec" in r)
    print(f"| {recipe} | {ev['step']} | {ev['val_loss']:.4f} | {ev.get('val_bpb', float('nan')):.4f} | {tps:,.0f} |")
EOF
