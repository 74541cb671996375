#!/usr/bin/env bash
# gptrain's demo, the README's first command: set up ./.venv, tokenize the shipped Shakespeare corpus, train the
# `tiny-fast` preset (CPU, or the GPU when there is one: the `tiny` model with Muon and linear decay to zero, 1,000
# steps to the val loss `tiny` reaches in 2,000), print samples and where the run is (timings and the val loss it
# reaches: README). With --chat first, then fine-tune it on the shipped conversations (gptrain sft, offline) and
# print one chat reply. Other arguments go to `gptrain train` (e.g. --max-steps 100 for a quick look), into
# runs/demo-custom (or their --out).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
chat=0
if [ "${1:-}" = "--chat" ]; then chat=1; shift; fi
. "$root/scripts/setup_env.sh" report
cd "$root"
data="${GPTRAIN_DEMO_DATA:-data/shakespeare}"
run="${GPTRAIN_DEMO_RUN:-runs/demo}"
if [ $# -gt 0 ] && [ -z "${GPTRAIN_DEMO_RUN:-}" ]; then
  # Other settings make another run: runs/demo stays the README's (a quick look first would otherwise become the
  # start of it). An --out among the arguments names the run.
  run="runs/demo-custom"
  prev=""
  for a in "$@"; do
    case "$a" in --out=*) run="${a#--out=}" ;; esac
    if [ "$prev" = "--out" ]; then run="$a"; fi
    prev="$a"
  done
  echo "demo: with your arguments the run goes to $run (runs/demo is the README's run)"
fi
start=$SECONDS

gptrain prepare shakespeare --out "$data"

# The trainer picks the dtype (bf16 autocast on GPUs and on CPUs with native bf16, float32 elsewhere) and, on a GPU,
# torch.compile. --resume auto: running the demo again continues the same run (a finished one is left as it is).
# Ctrl-C reaches gptrain (which saves a checkpoint and stops) and this script, which then stops too.
trap 'interrupted=1' INT
gptrain train --preset tiny-fast --data "$data" --out "$run" --resume auto "$@"
stop_if_interrupted() {
  if [ -n "${interrupted:-}" ]; then
    echo "demo interrupted: the run stopped at a checkpoint; the same command continues it"
    exit 130
  fi
}
stop_if_interrupted

if [ -d "$run/checkpoints" ]; then
  echo
  echo "== samples (gptrain sample --model $run --prompt 'ROMEO:' --echo): the prompt, then its continuation =="
  gptrain sample --model "$run" --prompt "ROMEO:" --echo --num-samples 2 --max-new-tokens 60 --seed 0
fi
gptrain report "$run" >/dev/null 2>&1 && echo "report: $run/report/report.png" || true
cpu="$(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ *//')"
echo
echo "demo finished in $((SECONDS - start)) s after set-up (${cpu:-$(uname -m)}, $(nproc 2>/dev/null || echo '?') cores); the run is in $(cd "$run" && pwd)"
if [ "$chat" = 1 ]; then
  # SFT on the shipped oasst-100 conversations with its defaults (the LR follows the demo's), then one question:
  # the README's own command, so running that by hand afterwards continues this run rather than changing it.
  gptrain sft --model "$run" --out "$run-chat"
  stop_if_interrupted
  echo
  echo "== chat (gptrain chat --model $run-chat) =="
  printf 'What is the capital of France?\n' | gptrain chat --model "$run-chat" --seed 0
  echo
  echo "chat demo finished in $((SECONDS - start)) s after set-up"
  echo "talk to it (gptrain lives in .venv: a new shell first needs the first line):"
  echo "  cd $root && . .venv/bin/activate"
  echo "  gptrain chat --model $run-chat"
  echo "  gptrain serve --model $run-chat"
else
  echo "next (gptrain lives in .venv: a new shell first needs the first line):"
  echo "  cd $root && . .venv/bin/activate"
  echo "  gptrain sample --model $run --prompt 'JULIET:' --echo --max-new-tokens 60"
  echo "  gptrain report $run"
  if [ $# -gt 0 ]; then  # chat on this run, not on the full runs/demo that a plain --chat trains first
    echo "  bash scripts/demo.sh --chat$(printf ' %q' "$@")"
  else
    echo "  bash scripts/demo.sh --chat"
  fi
fi
