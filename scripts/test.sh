#!/usr/bin/env bash
# The project's test command: sets up ./.venv if needed, then runs the whole suite on the CPU.
set -e
root="$(cd "$(dirname "$0")/.." && pwd)"
. "$root/scripts/setup_env.sh" dev
cd "$root"
python -m pytest "$@"
