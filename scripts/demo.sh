#!/usr/bin/env bash
# gptrain's demo, the README's first command: set up ./.venv, tokenize the shipped Shakespeare corpus, train the
# `tiny` preset (CPU, or the GPU when there is one), print samples and where the run is (timings and the val loss it reaches: README).
# Extra arguments go to `gptrain train` (e.g. --max-steps 100 for a quick look).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
. "$root/scripts/setup_env.sh" report
cd "$root"
data="${GPTRAIN_DEMO_DATA:-data/shakespeare}"
run="${GPTRAIN_DEMO_RUN:-runs/demo}"
start=$SECONDS

gptrain prepare shakespeare --out "$data"

# CPUs with native bfloat16 (avx512_bf16 / AMX) train the demo ~1.3x faster under bf16 autocast; elsewhere float32.
# On a GPU the trainer picks bf16 and torch.compile by itself.
extra=()
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
   && grep -qwE 'avx512_bf16|amx_bf16' /proc/cpuinfo 2>/dev/null; then
  extra+=(--dtype bfloat16)
fi
# --resume auto: running the demo again continues (or, when finished, just re-evaluates) the same run.
gptrain train --preset tiny --data "$data" --out "$run" --resume auto ${extra[@]+"${extra[@]}"} "$@"

if [ -d "$run/checkpoints" ]; then
  echo
  echo "== samples (gptrain sample --model $run --prompt 'ROMEO:') =="
  gptrain sample --model "$run" --prompt "ROMEO:" --num-samples 2 --max-new-tokens 60 --seed 0
fi
gptrain report "$run" >/dev/null 2>&1 && echo "report: $run/report/report.png" || true
echo
echo "demo finished in $((SECONDS - start)) s after set-up; the run is in $(cd "$run" && pwd)"
echo "next: gptrain sample --model $run --prompt 'JULIET:'   |   gptrain report $run   |   bash scripts/test.sh"
