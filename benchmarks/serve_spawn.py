"""Start `gptrain serve` as a child process on a free loopback port, for the serving benchmarks and tests: a random
model saved as a HF directory, the server's output kept in a log file, its pid for resident memory."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def random_model(out_dir: Path, *, vocab_size: int = 50261, seed: int = 0, preset: str | None = None,
                 **shape) -> Path:
    """A random-weight GPT (a preset's shape, or block_size/n_layer/n_head/n_embd) written where --model reads it."""
    from gptrain.hf import save_pretrained
    from gptrain.model import GPT, GPTConfig
    from gptrain.model import preset as model_preset
    torch.manual_seed(seed)
    cfg = model_preset(preset, vocab_size=vocab_size) if preset else GPTConfig(vocab_size=vocab_size, **shape)
    save_pretrained(GPT(cfg), out_dir, force=True)
    return out_dir


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def get_json(url: str, path: str, timeout: float = 10) -> dict:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


@dataclass
class Spawned:
    url: str
    pid: int
    log: Path

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def answers(url: str, path: str = "/health") -> bool:
    """Whether GET url+path is a 200 now."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=2)
    try:
        conn.request("GET", path)
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


@contextlib.contextmanager
def spawned(cmd: list[str], log: Path, port: int, *, env: dict | None = None, timeout: float = 120,
            what: str = "the server", cwd: Path = ROOT):
    """Run `cmd` (a server listening on `port`) with its output in `log`; yields a Spawned once GET /health is a
    200; stopped with SIGINT (then killed)."""
    out = open(log, "w")
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, stdout=out,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while not answers(url):
            if proc.poll() is not None:
                text = log.read_text(errors="replace")
                errors = "\n".join(line for line in text.splitlines() if "Error" in line)[-3000:]
                raise RuntimeError(f"{what} exited with {proc.returncode}:\n{text[-2000:]}\nits errors:\n{errors}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not answer within {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield Spawned(url, proc.pid, log)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        out.close()


@contextlib.contextmanager
def spawned_server(model_dir: Path, log: Path, *args: str, threads: int | None = None, timeout: float = 120,
                   tree: Path = ROOT):
    """`python -m gptrain serve --model DIR --port P ARGS...` (the gptrain of checkout `tree`); yields once /health
    answers; stopped with SIGINT."""
    port = free_port()
    env = {"OMP_NUM_THREADS": str(threads)} if threads else {}
    with spawned([sys.executable, "-m", "gptrain", "serve", "--model", str(model_dir), "--port", str(port), *args],
                 log, port, env=env, timeout=timeout, what="gptrain serve", cwd=tree) as srv:
        yield srv


@contextlib.contextmanager
def spawned_vllm(python: str, model_dir: Path, log: Path, *args: str, timeout: float = 1200, kv_gib: int = 4):
    """vLLM's OpenAI server (`python` is the interpreter of the venv it is installed in) on `model_dir`, served as
    "model", with `kv_gib` GiB of KV cache (VLLM_CPU_KVCACHE_SPACE); yields once /health answers (after vLLM's own
    compilation and warm-up)."""
    port = free_port()
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--port", str(port),
           "--served-model-name", "model", *args]
    env = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": str(kv_gib)}
    with spawned(cmd, log, port, env=env, timeout=timeout, what="vLLM", cwd=Path(python).parent) as srv:
        yield srv
