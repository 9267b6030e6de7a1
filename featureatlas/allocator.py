"""Keep freed memory in the process instead of handing it back to the OS after every layer.

With glibc's defaults a forward pass over a 64 x 64-token batch grows and shrinks the heap by hundreds of MB per
batch (each layer's 25 MB intermediates), and every regrown page is a fresh, zeroed page fault: 8 million faults
for 60,000 tokens of SmolLM2 in float32. Raising the mmap threshold (tensors up to 1 GiB come from the heap)
and the trim threshold (up to 1 GiB of free heap stays mapped) removed 98% of them and ran the bare forward 11%
faster on the 2-core Xeon of bench/RESULTS.md's timings. The peak memory is the same; it is just not returned early.
The mmap threshold was 256 MiB until a 16k-feature dictionary's float32 features for a batch of 4,096 tokens
(exactly 256 MiB, plus malloc's header) were found just past it: mapped afresh each time, they cost 200,000
faults a batch, and 1 GiB took its encode from 456 to 331 ms a batch.
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
