"""Keep freed memory in the process instead of handing it back to the OS after every layer.

With glibc's defaults a forward pass grows and shrinks the heap by every layer's intermediates each batch, and
every regrown page is a fresh, zeroed page fault. Raising the mmap threshold to 1 GiB (so that tensors up to that
size, such as a large dictionary's features for a whole batch, come from the heap) and the trim threshold to
1 GiB (so that as much free heap stays mapped) removes nearly all of those faults. The peak memory is the same;
it is just not returned early. What it saves: bench/RESULTS.md, "CPU components".
"""

from __future__ import annotations

import ctypes
import os
import sys

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters
_OWN_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def keep_freed_memory() -> bool:
    """Set the thresholds on glibc (Linux) unless the user set malloc's own variables; True if they were set."""
    if not sys.platform.startswith("linux") or any(name in os.environ for name in _OWN_SETTINGS):
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt  # glibc only: musl has no libc.so.6
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, 1 << 30)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))
