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


@contextlib.contextmanager
def spawned_server(model_dir: Path, log: Path, *args: str, threads: int | None = None, timeout: float = 120):
    """`python -m gptrain serve --model DIR --port P ARGS...`; yields once /health answers; stopped with SIGINT."""
    port = free_port()
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    out = open(log, "w")
    proc = subprocess.Popen([sys.executable, "-m", "gptrain", "serve", "--model", str(model_dir), "--port",
                             str(port), *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"gptrain serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            with contextlib.suppress(OSError):
                get_json(url, "/health", timeout=2)
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"gptrain serve did not answer within {timeout} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield Spawned(url, proc.pid, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        out.close()
