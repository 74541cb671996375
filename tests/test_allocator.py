"""keep_freed_memory: a training step reuses the memory the previous one freed instead of page-faulting it in again
(what makes CPU steps ~1.8x faster), and a user's own allocator settings are left alone."""

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="mallopt is glibc's")

PROBE = """
import resource, sys, torch
from gptrain.allocator import keep_freed_memory
from gptrain.model import GPT, preset
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
torch.manual_seed(0)
torch.set_num_threads(1)
model = GPT(preset("tiny"))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
x = torch.randint(0, 50257, (8, 129))
def steps(n):  # the demo's training step: its activations and loss chunks are hundreds of MB, freed every step
    for _ in range(n):
        opt.zero_grad(set_to_none=True)
        model(x[:, :-1], x[:, 1:])[1].backward()
        opt.step()
steps(4)  # warm-up: the heap grows to the working set
faults = []
for _ in range(5):  # per step; the median, as the heap may still grow once in a while after the warm-up
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    steps(1)
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, sorted(faults)[2])
"""


def probe(mode: str, **env) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD"))}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**clean, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1])


def test_training_steps_reuse_freed_memory_without_page_faults():
    kept, faults = probe("keep")
    _, default_faults = probe("default")
    assert kept == "True"
    assert default_faults > 10 * max(faults, 100)  # glibc's default unmaps and faults the working set in again


def test_the_users_allocator_settings_win():
    kept, _ = probe("keep", MALLOC_ARENA_MAX="2")
    assert kept == "False"
