"""Knows, without reading a large buffer, whether anything wrote to it since it was hashed.

Deciding that a pushed 1 GB array is unchanged by hashing it reads the whole gigabyte on
each side of every cell that uses it (~18 ms per side here). Linux (6.7 and later) can
instead say which pages were written since we last looked: the buffer's pages are
write-protected with an *asynchronous* userfaultfd (no handler thread: the kernel itself
lifts the protection on the first write and remembers it), and the ``PAGEMAP_SCAN`` ioctl
on /proc/self/pagemap reports written pages, about 40 µs for a gigabyte. A buffer with no
written page since its digest was taken still has that digest.

What it costs: the first write to each protected 4 KiB page after a hash takes one extra
minor fault (rewriting a whole tracked 1 GB array once costs ~0.25 s more), so only
buffers of at least ``TRACK_MIN_BYTES`` are tracked. ``UFFD_USER_MODE_ONLY`` makes it
work for unprivileged users with ``vm.unprivileged_userfaultfd = 0``; and since the
protection is asynchronous, writes made by system calls (``readinto``) are recorded too.

Where any of this is missing (another OS or architecture, an older kernel, a seccomp
filter, a mapping that cannot be registered) the buffer is simply hashed every time, so a
wrong answer is never the fallback. The scan also fails (and we hash) when the memory at
that address is no longer the mapping we registered (freed and reallocated arrays).
Only memory that nothing but this process's own page tables can write is tracked: private
anonymous mappings (where numpy and torch keep large arrays), and in a pooled kernel the
private mappings of its claimed, deleted uploads. Shared memory (multiprocessing arrays,
``shared_memory``, ``np.memmap`` of a file another process may write) is hashed every time.
Re-protecting a range forgets every cached digest on those pages (an array and a slice of
it), and a forked child starts afresh (its inherited descriptors act on the parent).
The writes it cannot see: memory handed back to the OS inside a live buffer on kernels that
zero it without a fault, and writes that bypass the page tables through a long-term pin
taken before the hash (io_uring fixed buffers, host memory registered for device DMA with
cudaHostRegister). ``JUPYTER_GPU_WRITE_TRACKING=0`` switches tracking off.
"""

from __future__ import annotations

import ctypes
import fcntl
import logging
import os
import platform
import struct
import threading
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

#: Set to 0 to hash every time (if some memory is written behind the page tables' back:
#: io_uring fixed buffers, memory registered with a device for DMA).
DISABLE_ENV = "JUPYTER_GPU_WRITE_TRACKING"
#: Smaller buffers hash in under a millisecond; tracking them would only add write faults.
TRACK_MIN_BYTES = 64 * 2**20
#: Digests remembered (least recently used dropped first); one per tracked buffer.
MAX_TRACKED = 256

_SYS_USERFAULTFD = {"x86_64": 323, "aarch64": 282}
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096

# <linux/userfaultfd.h>
_UFFD_API = 0xAA
_UFFD_USER_MODE_ONLY = 1
_UFFD_FEATURE_WP_HUGETLBFS_SHMEM = 1 << 12
_UFFD_FEATURE_WP_UNPOPULATED = 1 << 13
_UFFD_FEATURE_WP_ASYNC = 1 << 15
_UFFDIO_API = 0xC018AA3F  # _IOWR(0xAA, 0x3F, struct uffdio_api)
_UFFDIO_REGISTER = 0xC020AA00  # _IOWR(0xAA, 0x00, struct uffdio_register)
_UFFDIO_REGISTER_MODE_WP = 1 << 1

# <linux/fs.h>
_PAGEMAP_SCAN = 0xC0606610  # _IOWR('f', 16, struct pm_scan_arg)
_PM_SCAN_WP_MATCHING = 1 << 0
_PM_SCAN_CHECK_WPASYNC = 1 << 1
_PAGE_IS_WPALLOWED = 1 << 0
_PAGE_IS_WRITTEN = 1 << 1
_REGIONS = 64  # struct page_region slots per scan call


class WriteTracker:
    """Caches digests of large buffers, valid for as long as no page of them was written."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._uffd: int | None = None
        self._pagemap: int | None = None
        self._unavailable: str | None = None
        self._digests: OrderedDict[tuple[int, int], bytes] = OrderedDict()
        self._regions = (ctypes.c_uint64 * (3 * _REGIONS))()
        self._pid = os.getpid()
        self._trusted_dir: str | None = None

    def trust_deleted_files_in(self, directory: str | None) -> None:
        """Private mappings of files deleted from ``directory`` may be tracked too.

        For a pooled kernel's staging directory: a file there is written by the gateway,
        closed, then mapped and unlinked by this kernel, so nothing can write it any more
        except through this process's own page tables.
        """
        self._trusted_dir = directory.rstrip("/") + "/" if directory else None

    @property
    def available(self) -> bool:
        return self._open() is None

    def digest(self, view: memoryview, compute: Callable[[memoryview], bytes]) -> bytes:
        """``compute(view)``, or the digest it gave last time if nothing wrote to ``view`` since."""
        span = _span(view)
        if span is None:
            return compute(view)
        key, first, end = span
        with self._lock:
            if self._open() is not None:
                return compute(view)
            cached = self._digests.get(key)
            if cached is not None and self._untouched(first, end):
                self._digests.move_to_end(key)
                return cached
            self._digests.pop(key, None)
            # Protect first, then hash: a write during the hash leaves a written page
            # behind, so the next call hashes again instead of trusting a torn digest.
            if not self._protect(first, end):
                return compute(view)
            return self._store(key, compute(view))

    def remember(self, view: memoryview, digest: bytes) -> None:
        """Take ``digest`` as the digest of ``view`` from now on, until a page of it is written.

        For a value just received with its digest (the sender hashed it): the receiver need
        not read it again to answer what it holds.
        """
        span = _span(view)
        if span is None:
            return
        key, first, end = span
        with self._lock:
            if self._open() is None and self._protect(first, end):
                self._store(key, digest)

    def _store(self, key: tuple[int, int], digest: bytes) -> bytes:
        self._digests[key] = digest
        while len(self._digests) > MAX_TRACKED:
            self._digests.popitem(last=False)
        return digest

    # --- the Linux side -----------------------------------------------------------------------

    def _open(self) -> str | None:
        """None once the userfaultfd and pagemap are open, else why they cannot be."""
        if self._pid != os.getpid():
            self._forget_parent()
        if self._uffd is not None or self._unavailable is not None:
            return self._unavailable
        number = _SYS_USERFAULTFD.get(platform.machine())
        if os.environ.get(DISABLE_ENV, "1") == "0":
            self._unavailable = f"write tracking switched off ({DISABLE_ENV}=0)"
            return self._unavailable
        if platform.system() != "Linux" or number is None:
            self._unavailable = f"no userfaultfd on {platform.system()} {platform.machine()}"
            return self._unavailable
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.syscall.restype = ctypes.c_long
            fd = int(libc.syscall(number, os.O_CLOEXEC | os.O_NONBLOCK | _UFFD_USER_MODE_ONLY))
            if fd < 0:
                errno = ctypes.get_errno()
                raise OSError(errno, os.strerror(errno))
            try:
                features = _UFFD_FEATURE_WP_ASYNC | _UFFD_FEATURE_WP_UNPOPULATED | _UFFD_FEATURE_WP_HUGETLBFS_SHMEM
                fcntl.ioctl(fd, _UFFDIO_API, bytearray(struct.pack("QQQ", _UFFD_API, features, 0)))
                self._pagemap = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                os.close(fd)
                raise
        except (OSError, AttributeError) as exc:
            self._unavailable = f"write tracking unavailable ({exc}); large values are hashed on every use"
            log.debug(self._unavailable)
            return self._unavailable
        self._uffd = fd
        return None

    def _scan(self, first: int, end: int, flags: int, anyof: int, return_mask: int) -> tuple[int, int]:
        """One PAGEMAP_SCAN call: (regions found, address the walk stopped at)."""
        assert self._pagemap is not None
        arg = bytearray(struct.pack(
            "12Q", 96, flags | _PM_SCAN_CHECK_WPASYNC, first, end, 0, ctypes.addressof(self._regions),
            _REGIONS, 0, 0, 0, anyof, return_mask,
        ))
        found = fcntl.ioctl(self._pagemap, _PAGEMAP_SCAN, arg)
        walk_end = struct.unpack_from("Q", arg, 32)[0]
        return found, walk_end

    def _private(self, first: int, end: int) -> bool:
        """Whether every page of [first, end) is in memory only this process can write."""
        try:
            mappings = _mappings()
        except OSError:
            return False
        covered = first
        for start, stop, perms, inode, path in sorted(mappings):
            if stop <= covered or start >= end:
                continue
            if start > covered or perms[3:4] != "p":
                return False
            staged = (self._trusted_dir is not None and path.startswith(self._trusted_dir)
                      and path.endswith(" (deleted)"))
            if inode != 0 and not staged:
                return False
            covered = stop
            if covered >= end:
                return True
        return False

    def _untouched(self, first: int, end: int) -> bool:
        try:
            found, _ = self._scan(first, end, 0, _PAGE_IS_WRITTEN, _PAGE_IS_WRITTEN)
        except OSError:  # not the mapping we registered any more (freed, remapped, forked)
            return False
        return found == 0

    def _forget_parent(self) -> None:
        """In a forked child: the inherited descriptors act on the parent's memory."""
        for fd in (self._uffd, self._pagemap):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._uffd = self._pagemap = None
        self._digests.clear()
        self._pid = os.getpid()

    def _protect(self, first: int, end: int) -> bool:
        """Register the pages for asynchronous write protection and protect all of them.

        Only memory nothing else can write: private anonymous mappings (a write by another
        process to shared memory, or to the file behind a file mapping, never touches our
        page tables), and private mappings of files deleted from the trusted directory.
        """
        assert self._uffd is not None
        # Re-protecting these pages clears the record of writes any other cached buffer on
        # them was relying on (a slice of an array, the array itself): those must go.
        for key in [k for k in self._digests if k[0] < end and k[0] + k[1] > first]:
            del self._digests[key]
        if not self._private(first, end):
            return False
        try:
            fcntl.ioctl(self._uffd, _UFFDIO_REGISTER,
                        bytearray(struct.pack("QQQQ", first, end - first, _UFFDIO_REGISTER_MODE_WP, 0)))
            start = first
            while start < end:
                # Every page is "interesting" (WPALLOWED), holes too, so pages not yet
                # faulted in are protected as well and their first write is seen.
                _, start = self._scan(start, end, _PM_SCAN_WP_MATCHING, _PAGE_IS_WPALLOWED | _PAGE_IS_WRITTEN,
                                      _PAGE_IS_WPALLOWED)
        except OSError as exc:
            log.debug("cannot track writes to %#x-%#x: %s", first, end, exc)
            return False
        return True


def _span(view: memoryview) -> tuple[tuple[int, int], int, int] | None:
    """For a buffer worth tracking: its key (address, size) and the pages it lies on."""
    if view.nbytes < TRACK_MIN_BYTES or not view.c_contiguous:
        return None
    address = _address(view)
    if address is None:
        return None
    first = address - address % _PAGE
    end = -(-(address + view.nbytes) // _PAGE) * _PAGE
    return (address, view.nbytes), first, end


def _address(view: memoryview) -> int | None:
    try:
        holder: Any = ctypes.c_char.from_buffer(view)
        address = ctypes.addressof(holder)
        del holder
        return address
    except TypeError:  # read-only: ask numpy, which reads the address without copying
        import sys

        numpy = sys.modules.get("numpy")
        if numpy is None:
            return None
        return int(numpy.frombuffer(view, dtype=numpy.uint8).ctypes.data)


#: One per process: the userfaultfd and the digests belong to the process's memory.
tracker = WriteTracker()


def _mappings() -> list[tuple[int, int, str, int, str]]:
    """(start, end, permissions, inode, path) of every mapping of this process."""
    found = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) < 5:
                continue
            start, _, stop = fields[0].partition("-")
            path = fields[5].rstrip("\n") if len(fields) > 5 else ""
            found.append((int(start, 16), int(stop, 16), fields[1], int(fields[4]), path))
    return found
