"""The block device interface every image format implements.

:class:`BlockImage` is what a disk controller model (virtio-blk, IDE) talks
to: byte offsets into the *virtual* disk, any alignment.  It is an abstract
base class rather than a Protocol because the rules every format must keep
are the same and are kept here, once:

* bounds: ``offset + length`` beyond :attr:`size` raises
  :class:`~pykvm.errors.ImageError` (the device answers the guest with an
  I/O error status);
* read-only images refuse writes, zeroes and discards with ``ImageError``;
* ``cache=writethrough``/``directsync``: every write, zeroing and discard
  is followed by :meth:`flush` before it returns (QEMU emulates FUA the
  same way);
* a closed image refuses everything; ``close()`` twice is harmless.

An image serves one caller at a time (a disk controller handles its
requests in order); it holds no lock of its own.

Formats implement the underscored methods and never see a bad range.

Semantics a guest can rely on (virtio-blk's WRITE_ZEROES and DISCARD):

* ``write_zeroes`` makes the range read as zeroes; ``unmap=True`` lets the
  format free the space behind it;
* ``discard`` is advisory: afterwards each byte reads either as before, as
  zero, or (qcow2 version 2 with a backing file) as the backing file's byte.
"""

from __future__ import annotations

import abc

from pykvm.block.hostfile import CacheMode
from pykvm.errors import ImageError


class BlockImage(abc.ABC):
    """A virtual disk of :attr:`size` bytes."""

    #: Format name as ``qemu-img`` spells it ("raw", "qcow2").
    format: str = ""

    def __init__(self, size: int, *, read_only: bool, cache: CacheMode) -> None:
        self.size = size
        self.read_only = read_only
        self.cache = cache
        self._closed = False

    # -- the interface -------------------------------------------------------

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes of the virtual disk from ``offset``."""
        self._check_range(offset, length)
        return self._read(offset, length) if length else b""

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset``."""
        view = memoryview(data).cast("B")
        self._check_writable()
        self._check_range(offset, len(view))
        if len(view):
            self._write(offset, view)
            self._written()

    def write_zeroes(self, offset: int, length: int, *, unmap: bool = False) -> None:
        """Make ``length`` bytes from ``offset`` read as zeroes; ``unmap`` allows freeing their space."""
        self._check_writable()
        self._check_range(offset, length)
        if length:
            self._write_zeroes(offset, length, unmap)
            self._written()

    def discard(self, offset: int, length: int) -> None:
        """Tell the image the range's content is no longer needed (advisory)."""
        self._check_writable()
        self._check_range(offset, length)
        if length:
            self._discard(offset, length)
            self._written()

    def flush(self) -> None:
        """Make every completed write durable (a no-op with ``cache=unsafe``)."""
        self._check_open()
        if not self.read_only:
            self._flush()

    def close(self) -> None:
        """Flush and release the image's files; safe to call twice."""
        if not self._closed:
            self._closed = True
            self._close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what a format implements -------------------------------------------

    @abc.abstractmethod
    def _read(self, offset: int, length: int) -> bytes: ...

    @abc.abstractmethod
    def _write(self, offset: int, data: memoryview) -> None: ...

    @abc.abstractmethod
    def _write_zeroes(self, offset: int, length: int, unmap: bool) -> None: ...

    @abc.abstractmethod
    def _discard(self, offset: int, length: int) -> None: ...

    @abc.abstractmethod
    def _flush(self) -> None: ...

    @abc.abstractmethod
    def _close(self) -> None: ...

    # -- the rules ---------------------------------------------------------

    def _written(self) -> None:
        if self.cache.writethrough:
            self._flush()

    def _check_open(self) -> None:
        if self._closed:
            raise ImageError(f"{self!r} is closed")

    def _check_writable(self) -> None:
        self._check_open()
        if self.read_only:
            raise ImageError(f"{self!r} is read-only")

    def _check_range(self, offset: int, length: int) -> None:
        self._check_open()
        if not isinstance(offset, int) or not isinstance(length, int) or offset < 0 or length < 0:
            raise ImageError(f"bad range offset={offset!r} length={length!r}")
        if offset + length > self.size:
            raise ImageError(f"access at {offset:#x}+{length:#x} beyond the end of the "
                             f"{self.size:#x}-byte disk")
