"""The host file under an image, with QEMU's cache modes (QEMU's ``file-posix`` protocol layer).

Every image format reads and writes its file through :class:`HostFile`, so
the cache mode, O_DIRECT alignment, hole punching and host I/O errors are
handled in one place.

Cache modes, as QEMU maps ``-drive cache=`` onto its three switches
(``cache.direct``, ``cache.writeback``, ``cache.no-flush``; QEMU's
docs/system/qemu-block-drivers and ``bdrv_parse_cache_mode``):

============  =========  ===========================  =======================
mode          O_DIRECT   guest write completes ...    flush
============  =========  ===========================  =======================
writeback     no         in the page cache            fdatasync
writethrough  no         after fdatasync              fdatasync
none          yes        on the device (its cache)    fdatasync
directsync    yes        after fdatasync              fdatasync
unsafe        no         in the page cache            nothing
============  =========  ===========================  =======================

O_DIRECT needs the file offset, the length and the buffer's address aligned
to the device's logical block size.  Python's ``bytes`` have no aligned
address, so every direct transfer goes through a page-aligned anonymous
``mmap`` (a bounce buffer) covering whole :data:`DIRECT_ALIGN` blocks;
partial blocks at either end are read first and merged (read-modify-write).
4096 bytes covers every logical block size Linux devices use.

Holes: ``os.posix_fallocate`` only *allocates* (mode 0); punching a hole or
zeroing a range needs the Linux ``fallocate(2)`` modes
``FALLOC_FL_PUNCH_HOLE`` and ``FALLOC_FL_ZERO_RANGE``, which Python's os
module does not expose, so they are called through ctypes.  A filesystem
that lacks a mode answers EOPNOTSUPP; the callers then write zeroes instead.

Host I/O errors (EIO, ENOSPC, ...) become :class:`~pykvm.errors.ImageError`,
so a device model catches one exception type and reports an I/O error to
its guest.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from dataclasses import dataclass

from pykvm.errors import ImageError

DIRECT_ALIGN = 4096
IOV_MAX = os.sysconf("SC_IOV_MAX") if "SC_IOV_MAX" in os.sysconf_names else 1024

# <linux/falloc.h>: stable kernel ABI.  pykvm's constants normally come from
# the C compiler (docs/architecture.md); these are used through ctypes because
# the block layer is pure Python and must not need the C extension.
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10

_UNSUPPORTED = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


@dataclass(frozen=True)
class CacheMode:
    """One of QEMU's cache modes, as its three switches."""

    name: str
    direct: bool        # O_DIRECT: bypass the host page cache
    writethrough: bool  # every guest write is followed by a flush
    no_flush: bool      # flushes are ignored (cache=unsafe)


CACHE_MODES = {
    "writeback": CacheMode("writeback", direct=False, writethrough=False, no_flush=False),
    "writethrough": CacheMode("writethrough", direct=False, writethrough=True, no_flush=False),
    "none": CacheMode("none", direct=True, writethrough=False, no_flush=False),
    "directsync": CacheMode("directsync", direct=True, writethrough=True, no_flush=False),
    "unsafe": CacheMode("unsafe", direct=False, writethrough=False, no_flush=True),
}


def cache_mode(name: str) -> CacheMode:
    """The :class:`CacheMode` called ``name`` (QEMU's spelling)."""
    try:
        return CACHE_MODES[name]
    except KeyError:
        raise ImageError(f"unknown cache mode {name!r} (one of {', '.join(CACHE_MODES)})") from None


def _load_fallocate():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.fallocate
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function


_fallocate = _load_fallocate()


class HostFile:
    """An open image file: positioned I/O, flushes and holes under one cache mode.

    Owns its file descriptor; :meth:`close` (or ``with``) releases it.
    """

    def __init__(self, path: str | os.PathLike, *, read_only: bool = False,
                 cache: str | CacheMode = "writeback") -> None:
        self.path = os.fspath(path)
        self.read_only = read_only
        self.cache = cache if isinstance(cache, CacheMode) else cache_mode(cache)
        flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC
        if self.cache.direct:
            flags |= os.O_DIRECT
        try:
            self.fd = os.open(self.path, flags)
        except OSError as e:
            if self.cache.direct and e.errno == errno.EINVAL:
                raise ImageError(f"{self.path}: cache={self.cache.name} needs O_DIRECT, which this "
                                 f"filesystem refuses; use cache=writeback or cache=writethrough") from None
            raise ImageError(f"could not open {self.path!r}: {e.strerror}") from None
        self._bounce: mmap.mmap | None = None

    # -- plain I/O ---------------------------------------------------------

    def size(self) -> int:
        """The file's length in bytes."""
        return self._call("fstat", 0, os.fstat, self.fd).st_size

    def allocated_bytes(self) -> int:
        """Bytes the host filesystem has allocated for the file (what ``du`` and ``qemu-img info`` show)."""
        return self._call("fstat", 0, os.fstat, self.fd).st_blocks * 512

    def pread(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset``; fewer only at the end of the file."""
        buffer = bytearray(length)
        got = self.read_into(offset, memoryview(buffer))
        return bytes(buffer) if got == length else bytes(buffer[:got])

    def read_into(self, offset: int, buffer: memoryview) -> int:
        """Fill ``buffer`` from ``offset``; return how many bytes the file had (the rest is untouched)."""
        if self.cache.direct:
            return self._direct_read_into(offset, buffer)
        return self._read_fully(offset, buffer)

    def _read_fully(self, offset: int, view: memoryview) -> int:
        """preadv until the view is full or the file ends (a short read at the end of the file)."""
        done = 0
        while done < len(view):
            n = self._call("read", offset + done, os.preadv, self.fd, [view[done:]], offset + done)
            done += n
            if n == 0 or (self.cache.direct and n % DIRECT_ALIGN):  # O_DIRECT: a partial block is the end
                break
        return done

    def pwrite(self, offset: int, data) -> None:
        """Write all of ``data`` at ``offset``."""
        self.pwritev(offset, [data])

    def pwritev(self, offset: int, buffers: list) -> None:
        """Write the buffers back to back from ``offset`` (one system call where possible)."""
        views = [memoryview(b).cast("B") for b in buffers]
        if self.cache.direct:
            self._direct_write(offset, views)
            return
        for start in range(0, len(views), IOV_MAX):
            chunk = views[start:start + IOV_MAX]
            self._pwritev_all(offset, chunk)
            offset += sum(len(v) for v in chunk)

    def _pwritev_all(self, offset: int, views: list[memoryview]) -> None:
        while views:
            n = self._call("write", offset, os.pwritev, self.fd, views, offset)
            offset += n
            while views and n >= len(views[0]):
                n -= len(views[0])
                views.pop(0)
            if n:
                views[0] = views[0][n:]

    def truncate(self, size: int) -> None:
        """Set the file's length."""
        self._call("ftruncate", size, os.ftruncate, self.fd, size)

    # -- flushes -----------------------------------------------------------

    def sync(self) -> None:
        """Make every completed write durable (fdatasync), unless the cache mode is ``unsafe``."""
        if not self.cache.no_flush:
            self._call("fdatasync", 0, os.fdatasync, self.fd)

    # -- holes -------------------------------------------------------------

    def punch_hole(self, offset: int, length: int) -> bool:
        """Deallocate a range (it reads as zeroes after); False if the filesystem cannot."""
        return self._fallocate(FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def zero_range(self, offset: int, length: int) -> bool:
        """Make a range read as zeroes, keeping it allocated; False if the filesystem cannot."""
        return self._fallocate(FALLOC_FL_ZERO_RANGE, offset, length)

    def _fallocate(self, mode: int, offset: int, length: int) -> bool:
        if length <= 0:
            return True
        if _fallocate is None:
            return False
        if _fallocate(self.fd, mode, offset, length) == 0:
            return True
        err = ctypes.get_errno()
        if err in _UNSUPPORTED:
            return False
        raise ImageError(f"{self.path}: fallocate at {offset:#x}+{length:#x} failed: {os.strerror(err)}")

    # -- O_DIRECT ----------------------------------------------------------

    def _bounce_buffer(self, size: int) -> memoryview:
        if self._bounce is None or len(self._bounce) < size:
            if self._bounce is not None:
                self._bounce.close()
            self._bounce = mmap.mmap(-1, max(size, 1 << 20))  # page-aligned anonymous memory
        return memoryview(self._bounce)[:size]

    def _direct_read_into(self, offset: int, buffer: memoryview) -> int:
        start = offset - offset % DIRECT_ALIGN
        end = -(-(offset + len(buffer)) // DIRECT_ALIGN) * DIRECT_ALIGN
        bounce = self._bounce_buffer(end - start)
        got = max(0, self._read_fully(start, bounce) - (offset - start))
        got = min(got, len(buffer))
        buffer[:got] = bounce[offset - start:offset - start + got]
        bounce.release()
        return got

    def _direct_write(self, offset: int, views: list[memoryview]) -> None:
        length = sum(len(v) for v in views)
        if not length:
            return
        old_size = self.size()
        start = offset - offset % DIRECT_ALIGN
        end = -(-(offset + length) // DIRECT_ALIGN) * DIRECT_ALIGN
        bounce = self._bounce_buffer(end - start)
        # Read-modify-write the partial blocks at either end.
        if start != offset or (offset + length) % DIRECT_ALIGN:
            bounce[:DIRECT_ALIGN] = bytes(DIRECT_ALIGN)
            bounce[-DIRECT_ALIGN:] = bytes(DIRECT_ALIGN)
            self._read_fully(start, bounce[:DIRECT_ALIGN])
            if end - start > DIRECT_ALIGN:
                self._read_fully(end - DIRECT_ALIGN, bounce[-DIRECT_ALIGN:])
        position = offset - start
        for view in views:
            bounce[position:position + len(view)] = view
            position += len(view)
        done = 0
        while done < len(bounce):
            done += self._call("write", start + done, os.pwritev, self.fd, [bounce[done:]], start + done)
        bounce.release()
        # Whole blocks past the old end of the file lengthened it beyond what was written.
        if end > old_size and offset + length < end:
            self.truncate(max(old_size, offset + length))

    # -- errors and lifetime -----------------------------------------------

    def _call(self, what: str, offset: int, function, *args):
        """``function(*args)``, with an OSError turned into an ImageError naming the file and offset."""
        try:
            return function(*args)
        except OSError as e:
            if self.cache.direct and e.errno == errno.EINVAL:
                raise ImageError(f"{self.path}: cache={self.cache.name} ({what} with O_DIRECT) refused by the "
                                 f"filesystem; use cache=writeback") from None
            raise ImageError(f"{self.path}: {what} at {offset:#x} failed: {e.strerror}") from None

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        """Close the file descriptor (and free the bounce buffer); safe to call twice."""
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
        if self._bounce is not None:
            self._bounce.close()
            self._bounce = None

    def __enter__(self) -> HostFile:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "fd", -1) >= 0:
            self.close()
