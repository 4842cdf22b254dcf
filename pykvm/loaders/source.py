"""Where an image's bytes come from: a file read lazily, or bytes already in memory.

Loaders never read a file whole.  They parse headers with small ``read``
calls, describe the rest as file ranges (``Segment.source``/``offset``/
``filesz``), and the machine copies each range straight into guest memory
with ``readinto`` once the whole plan is known to fit.  So a 2 GiB kernel
that does not fit is refused after reading a few KiB of headers, and a
kernel that does fit is never held in a Python ``bytes`` object.
"""

from __future__ import annotations

import os
import stat

from pykvm.errors import LoaderError


class ImageSource:
    """A kernel, initrd or module: its ``name`` (for messages), ``size``, and bytes on demand.

    Build one with :meth:`open` (a file) or :meth:`from_bytes`.  A source
    that is a file keeps its descriptor open until :meth:`close` (or the end
    of a ``with`` block); segments refer to it, so keep it open until the
    plan has been loaded.
    """

    def __init__(self, name: str, size: int, *, fd: int | None = None, data: bytes | None = None) -> None:
        self.name = name
        self.size = size
        self._fd = fd
        self._data = memoryview(data) if data is not None else None
        self._closed = False

    @classmethod
    def open(cls, path: str | os.PathLike) -> "ImageSource":
        """Open a file (regular or block device) for lazy reading."""
        name = os.fspath(path)
        try:
            fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            raise LoaderError(f"cannot read {name}: {exc.strerror}") from None
        try:
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                raise LoaderError(f"cannot read {name}: not a regular file")
            size = os.lseek(fd, 0, os.SEEK_END)
        except OSError as exc:
            os.close(fd)
            raise LoaderError(f"cannot read {name}: {exc.strerror}") from None
        except LoaderError:
            os.close(fd)
            raise
        return cls(name, size, fd=fd)

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview, name: str = "<bytes>") -> "ImageSource":
        """An image already in memory (a copy is kept, so later changes to ``data`` do not leak in)."""
        data = bytes(data)
        return cls(name, len(data), data=data)

    # -- reading -------------------------------------------------------------------
    def _check_range(self, offset: int, n: int) -> None:
        if self._closed:
            raise LoaderError(f"{self.name} is closed")
        if offset < 0 or n < 0 or offset + n > self.size:
            raise LoaderError(
                f"{self.name}: bytes {offset:#x}-{offset + n:#x} lie beyond its end ({self.size:#x} bytes)"
            )

    def read(self, offset: int, n: int) -> bytes:
        """Exactly ``n`` bytes from ``offset``; LoaderError if any of them lies beyond the end."""
        self._check_range(offset, n)
        if self._data is not None:
            return bytes(self._data[offset:offset + n])
        view = memoryview(bytearray(n))
        self._pread_into(offset, view)
        return bytes(view)

    def readinto(self, offset: int, view: memoryview) -> None:
        """Fill ``view`` (e.g. a slice of guest memory) with ``len(view)`` bytes from ``offset``."""
        view = memoryview(view).cast("B")
        self._check_range(offset, len(view))
        if self._data is not None:
            view[:] = self._data[offset:offset + len(view)]
            return
        self._pread_into(offset, view)

    def _pread_into(self, offset: int, view: memoryview) -> None:
        done = 0
        while done < len(view):
            try:
                got = os.preadv(self._fd, [view[done:]], offset + done)
            except OSError as exc:
                raise LoaderError(f"cannot read {self.name}: {exc.strerror}") from None
            if got == 0:  # the file shrank after it was opened
                raise LoaderError(f"{self.name} ended at {offset + done:#x} while being read (was it changed?)")
            done += got

    # -- lifetime ------------------------------------------------------------------
    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None

    def __enter__(self) -> "ImageSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ImageSource({self.name!r}, {self.size} bytes)"
