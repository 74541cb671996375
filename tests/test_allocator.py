"""keep_freed_memory: a training step reuses the memory the previous one freed instead of page-faulting it in again
(what makes CPU steps ~1.8x faster), and a user's own allocator settings are left alone. Asserted through glibc's
own accounting (mallinfo2), never through page-fault counts or times, which depend on how busy the machine is."""

import ctypes
import os
import platform
import subprocess
import sys

import pytest

from gptrain.allocator import keep_freed_memory

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
                                reason="mallopt is glibc's")

PROBE = """
import ctypes, torch
from gptrain.allocator import keep_freed_memory
class MallInfo2(ctypes.Structure):  # glibc's own accounting of the heap and of mmapped blocks
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
def step():  # 64 MiB allocated and freed: the size of a demo step's activations and loss chunks
    before = libc.mallinfo2()
    x = torch.ones(64 << 20, dtype=torch.uint8)
    alive = libc.mallinfo2()
    del x
    freed = libc.mallinfo2()
    # mmapped while alive; heap bytes given back to the kernel by the free; free bytes the free left in the heap
    return alive.hblkhd - before.hblkhd, alive.arena - freed.arena, freed.fordblks - alive.fordblks
default_mmapped, _, _ = step()  # glibc's default first, then as the gptrain command sets it
kept = keep_freed_memory()
mmapped, trimmed, kept_free = step()
print(kept, default_mmapped, mmapped, trimmed, kept_free)
"""
MiB64 = 64 << 20


def test_freed_training_memory_stays_in_the_heap_for_the_next_step():
    """glibc's bookkeeping (mallinfo2), the same however busy the machine is; the page faults and step times this
    saves are measured in benchmarks/train_throughput.py (--no-keep-freed-memory), not here."""
    if not hasattr(ctypes.CDLL(None), "mallinfo2"):
        pytest.skip("mallinfo2 is glibc 2.33+")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD"))}
    out = subprocess.run([sys.executable, "-c", PROBE], env=clean, capture_output=True, text=True,
                         check=True).stdout.split()
    kept, default_mmapped, mmapped, trimmed, kept_free = out[0], *map(int, out[1:])
    assert default_mmapped >= MiB64  # glibc's default: mmapped, unmapped on free, faulted in again next step
    assert kept == "True"
    assert mmapped == 0  # kept: the block comes from the heap ...
    assert trimmed == 0 and kept_free >= MiB64  # ... and freeing it trims nothing: the next step reuses the pages


def test_the_users_allocator_settings_win(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    assert keep_freed_memory() is False  # returns before touching malloc
