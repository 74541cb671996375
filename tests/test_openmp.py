"""OpenMP's waiting threads sleep at once in every gptrain command but `serve` (gptrain/openmp.py), unless the
user chose a policy: what libgomp itself reports (OMP_DISPLAY_ENV) when a `gptrain` command loads torch."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def libgomp_settings(*command: str, **env) -> str:
    """libgomp's settings in `gptrain COMMAND --model MISSING`, which loads torch and then stops at the model."""
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    p = subprocess.run([sys.executable, "-m", "gptrain", *(command or ("sample",)), "--model", "/nonexistent"],
                       cwd=ROOT, capture_output=True, text=True,
                       env={**clean, "PYTHONPATH": str(ROOT), "OMP_DISPLAY_ENV": "VERBOSE", **env}, timeout=600)
    assert p.returncode == 2 and "/nonexistent" in p.stderr, p.stderr
    if "GOMP_SPINCOUNT" not in p.stderr:
        pytest.skip("torch here does not run on GNU OpenMP")
    return p.stderr


def test_waiting_threads_sleep_at_once():
    assert "GOMP_SPINCOUNT = '0'" in libgomp_settings()  # PASSIVE; libgomp's default spins 300000 times


def test_the_server_spins_briefly():
    pytest.importorskip("fastapi")  # serve checks for its extra before it loads torch
    assert "GOMP_SPINCOUNT = '5000'" in libgomp_settings("serve")


@pytest.mark.parametrize("command", [("sample",), ("serve",)])
def test_the_users_own_policy_wins(command):
    if command == ("serve",):
        pytest.importorskip("fastapi")
    assert "GOMP_SPINCOUNT = '1000'" in libgomp_settings(*command, GOMP_SPINCOUNT="1000")
    passive = libgomp_settings(*command, OMP_WAIT_POLICY="PASSIVE")
    assert "GOMP_SPINCOUNT = '0'" in passive
    active = libgomp_settings(*command, OMP_WAIT_POLICY="ACTIVE", GOMP_SPINCOUNT="1000")  # (unbounded ACTIVE
    assert "OMP_WAIT_POLICY = 'ACTIVE'" in active and "GOMP_SPINCOUNT = '1000'" in active  # spinning stalls a
    # busy CPU)


def test_import_gptrain_leaves_torch_unloaded_until_the_model_is_used():
    code = ("import sys, gptrain, gptrain.cli; assert 'torch' not in sys.modules; "
            "from gptrain import GPT; assert 'torch' in sys.modules and GPT.__module__ == 'gptrain.model'")
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr
