"""glibc malloc settings for the gateway: keep freed megabytes for the next message.

Every pushed value passes through the gateway as a few transient copies of its size
(tornado's read buffer, the unmasked payload, the ZMQ message). With glibc's defaults a
copy of a megabyte is mapped fresh or handed back to the OS when freed, so the next message
touches new pages. Whether it does depends on what the process allocated before (glibc
moves its thresholds as it goes): after 100 KB pushes, as in the benchmark's row 3, every
1 MB push took ~500 minor faults in the gateway, 4.6 ms of its CPU against 1.8 ms for 100 KB
(with these settings: no faults, 2.9 ms; the push 11.9 -> 9.5 ms). Here buffers below
``MMAP_THRESHOLD_BYTES`` come from the heap, and up to ``TRIM_THRESHOLD_BYTES`` of freed
heap stays mapped, so steady traffic reuses warm pages. Larger buffers are still mapped on
their own and returned to the OS when freed.

Settings an operator gave through glibc's own variables (``MALLOC_MMAP_THRESHOLD_``,
``MALLOC_TRIM_THRESHOLD_``, ``MALLOC_TOP_PAD_``) are left as they are; other C libraries
are left alone.
"""

from __future__ import annotations

import ctypes
import os
import platform

#: Allocations from this size on are mapped on their own (at least the gateway's 8 MiB
#: COPY_BELOW_BYTES, so a copied ZMQ frame comes from the heap).
MMAP_THRESHOLD_BYTES = 16 * 2**20
#: Freed heap at the top kept mapped, at most: room for a few messages' transient copies.
TRIM_THRESHOLD_BYTES = 64 * 2**20

# <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_OPERATOR_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def keep_freed_memory() -> bool:
    """Apply the settings above to this process; True if they were applied."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    if any(name in os.environ for name in _OPERATOR_SETTINGS):
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # mallopt returns 1 on success; the mmap threshold first: glibc caps it (32 MiB on 64-bit)
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))
