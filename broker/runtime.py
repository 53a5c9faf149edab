"""Process-wide tuning for a worker that handles one large frame after another.

:func:`retain_freed_memory` makes glibc's allocator keep freed memory for reuse instead of giving it
back to the kernel. Arrays above glibc's mmap threshold (at most 32 MiB: a 4096^2 float32 frame is
64 MiB) are otherwise mapped fresh on every allocation and unmapped on free, so each of the ~100
frame-sized temporaries of a subtraction page-faults its memory in again. On the build machine (a
Firecracker VM that reports free pages to its host) that was 40 % of a 4096^2 subtraction:
7.7 s -> 4.5 s warm (``python -m bench.subtraction``). A 2048^2 frame's arrays (16 MiB) are below
the threshold and gain little. The cost: the process keeps its peak heap.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

# mallopt(3) parameters (glibc malloc.h)
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
#: Heap growth per sbrk (bytes): a few frame-sized arrays, so a frame needs few system calls.
TOP_PAD_BYTES = 256 << 20


def retain_freed_memory() -> bool:
    """Serve large allocations from the heap and never trim it (glibc only).

    Returns
    -------
    bool
        True when the allocator took the settings; False elsewhere (musl, macOS), where nothing
        changes.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError, TypeError):
        return False
    ok = all(mallopt(param, value) == 1 for param, value in (
        (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2 ** 31 - 1), (_M_TOP_PAD, TOP_PAD_BYTES)))
    log.debug("retain_freed_memory: %s", ok)
    return ok
