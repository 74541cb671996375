"""keep_freed_memory: a training step reuses the memory the previous one freed instead of page-faulting it in again
(what makes CPU steps ~1.8x faster), and a user's own allocator settings are left alone. Asserted through glibc's
own accounting (mallinfo2), never through page-fault counts or times, which depend on how busy the machine is."""

import ctypes
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="mallopt is glibc's")

PROBE = """
import ctypes, sys, torch
from gptrain.allocator import keep_freed_memory
class MallInfo2(ctypes.Structure):  # glibc's own accounting of the heap and of mmapped blocks
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
before = libc.mallinfo2()  # torch's import mmapped some blocks before keep_freed_memory could act
x = torch.ones(64 << 20, dtype=torch.uint8)  # 64 MiB: the size of a demo step's activations and loss chunks
alive = libc.mallinfo2()
del x
freed = libc.mallinfo2()
print(kept, alive.hblkhd - before.hblkhd, freed.arena - before.arena)
"""
MiB64 = 64 << 20


def probe(mode: str, **env) -> tuple[str, int, int]:
    """(whether keep_freed_memory took effect, bytes newly mmapped while the tensor lives, growth of the heap
    after it is freed): glibc's bookkeeping, the same however busy the machine is (the page faults and step times it saves
    are measured in benchmarks/train_throughput.py, not here)."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD"))}
    out = subprocess.run([sys.executable, "-c", PROBE, mode], env={**clean, **env}, capture_output=True, text=True,
                         check=True).stdout.split()
    return out[0], int(out[1]), int(out[2])


def test_freed_training_memory_stays_in_the_heap_for_the_next_step():
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("mallinfo2 is glibc 2.33+")
    kept, mmapped, heap_after_free = probe("keep")
    assert kept == "True"
    assert mmapped == 0  # a big block comes from the heap, not from an mmap that free would unmap
    assert heap_after_free >= MiB64  # and freeing it does not trim it: the next step reuses those pages
    _, default_mmapped, _ = probe("default")
    assert default_mmapped >= MiB64  # glibc's default: mmapped, unmapped on free, faulted in again next step


def test_the_users_allocator_settings_win():
    kept, _, _ = probe("keep", MALLOC_ARENA_MAX="2")
    assert kept == "False"
