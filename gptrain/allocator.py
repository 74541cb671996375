"""Keep freed memory in the process on Linux, so CPU training steps stop paying the kernel for fresh pages.

glibc's malloc serves large blocks with mmap and gives small freed ones back with trim; a training step allocates
and frees hundreds of megabytes (activations, the logits chunks of the loss, their gradients), so every step
page-faults its working set in again. On the 2-core machine of benchmarks/RESULTS.md the tiny demo step spent
about a third of its CPU time in the kernel and ran 1.8x slower than with the memory kept. `mallopt` turns both
off for this process: freed blocks are reused by the next step; the peak stays mapped until exit.

Only glibc has `mallopt`; elsewhere (macOS, musl) this does nothing. A user who chose an allocator already
(`LD_PRELOAD` of jemalloc/tcmalloc, or glibc's own `MALLOC_*` variables) keeps theirs.
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD = -1  # from glibc's malloc.h
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Tell glibc to reuse freed memory instead of unmapping it; True when it took effect."""
    if not sys.platform.startswith("linux") or os.environ.get("LD_PRELOAD") \
            or any(k.startswith(("MALLOC_", "GLIBC_TUNABLES")) for k in os.environ):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
