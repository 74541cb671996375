"""OpenMP's waiting threads sleep at once in every gptrain command (gptrain/openmp.py), unless the user chose a
policy: what libgomp itself reports (OMP_DISPLAY_ENV) when the `gptrain` command starts."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def libgomp_settings(**env) -> str:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    p = subprocess.run([sys.executable, "-m", "gptrain", "--version"], cwd=ROOT, capture_output=True, text=True,
                       env={**clean, "PYTHONPATH": str(ROOT), "OMP_DISPLAY_ENV": "VERBOSE", **env}, timeout=600)
    assert p.returncode == 0, p.stderr
    if "GOMP_SPINCOUNT" not in p.stderr:
        pytest.skip("torch here does not run on GNU OpenMP")
    return p.stderr


def test_waiting_threads_sleep_at_once():
    assert "GOMP_SPINCOUNT = '0'" in libgomp_settings()  # PASSIVE; libgomp's default spins 300000 times


def test_the_users_own_policy_wins():
    assert "GOMP_SPINCOUNT = '1000'" in libgomp_settings(GOMP_SPINCOUNT="1000")
    active = libgomp_settings(OMP_WAIT_POLICY="ACTIVE", GOMP_SPINCOUNT="1000")  # (unbounded ACTIVE spinning
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in active and "GOMP_SPINCOUNT = '1000'" in active  # stalls a busy CPU)
