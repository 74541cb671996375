#!/usr/bin/env bash
# Create (or reuse) ./.venv with gptrain installed, torch pinned to the CPU wheel this project is tested with.
# Usage: source scripts/setup_env.sh [EXTRAS]   (EXTRAS defaults to "dev": everything, plus pytest)
set -e
extras="${1:-dev}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
if [ ! -x "$root/.venv/bin/python" ]; then
  "$py" -m venv "$root/.venv"
fi
. "$root/.venv/bin/activate"
stamp="$root/.venv/.gptrain-installed-$extras"
if [ ! -f "$stamp" ] || [ "$root/pyproject.toml" -nt "$stamp" ]; then
  echo "setting up $root/.venv (gptrain[$extras], torch==${GPTRAIN_TORCH:-2.13.0}) ..." >&2
  # pip's output (setuptools' editable-install banner among it) is shown only when an install fails
  log="$(mktemp)"
  if ! { python -m pip install -q --upgrade pip &&
         # GPTRAIN_TORCH_INDEX: a wheel index for torch alone, e.g. PyTorch's CPU-only index without a GPU.
         python -m pip install -q "torch==${GPTRAIN_TORCH:-2.13.0}" ${GPTRAIN_TORCH_INDEX:+--index-url "$GPTRAIN_TORCH_INDEX"} &&
         python -m pip install -q "torch==${GPTRAIN_TORCH:-2.13.0}" -e "$root[$extras]"; } >"$log" 2>&1; then
    cat "$log" >&2
    rm -f "$log"
    echo "setup_env.sh: installing into $root/.venv failed (pip's output above)" >&2
    return 1 2>/dev/null || exit 1
  fi
  rm -f "$log"
  touch "$stamp"
fi
