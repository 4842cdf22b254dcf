"""Raw images: the virtual disk is the file, byte for byte (QEMU's ``raw`` format).

The virtual size is the file's length rounded up to whole 512-byte sectors,
as QEMU presents it; the missing tail reads as zeroes.  ``write_zeroes`` uses
``fallocate(FALLOC_FL_ZERO_RANGE)`` (or ``PUNCH_HOLE`` when the guest allows
unmapping), ``discard`` punches a hole; where the filesystem cannot, zeroes
are written instead (``write_zeroes``) or nothing is done (``discard`` is
only a hint).
"""

from __future__ import annotations

import os

from pykvm.block.hostfile import CacheMode, HostFile
from pykvm.block.image import BlockImage
from pykvm.errors import ImageError

ZERO_CHUNK = 1 << 20


def write_zero_bytes(file: HostFile, offset: int, length: int) -> None:
    """Write real zero bytes over a range, a chunk at a time (the fallback when fallocate cannot)."""
    zeros = bytes(min(length, ZERO_CHUNK))
    while length:
        n = min(length, len(zeros))
        file.pwrite(offset, memoryview(zeros)[:n])
        offset += n
        length -= n


def create_raw(path: str | os.PathLike, size: int) -> None:
    """Create (or replace) a sparse raw image of ``size`` bytes, rounded up to 512 as qemu-img does."""
    if size < 0:
        raise ImageError("Image size must not be negative")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(fd, -(-size // 512) * 512)
        finally:
            os.close(fd)
    except OSError as e:
        raise ImageError(f"could not create {os.fspath(path)!r}: {e.strerror}") from None


class RawImage(BlockImage):
    """A raw image on a :class:`HostFile` (which it owns)."""

    format = "raw"

    def __init__(self, file: HostFile) -> None:
        super().__init__(-(-file.size() // 512) * 512, read_only=file.read_only, cache=file.cache)
        self.file = file

    @classmethod
    def open(cls, path: str | os.PathLike, *, read_only: bool = False,
             cache: str | CacheMode = "writeback") -> RawImage:
        return cls(HostFile(path, read_only=read_only, cache=cache))

    def __repr__(self) -> str:
        return f"RawImage({self.file.path!r})"

    def _read(self, offset: int, length: int) -> bytes:
        data = self.file.pread(offset, length)
        # The file may have been shortened behind our back: what is missing reads as zeroes.
        return data if len(data) == length else data + bytes(length - len(data))

    def _write(self, offset: int, data: memoryview) -> None:
        self.file.pwrite(offset, data)

    def _write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        done = self.file.punch_hole(offset, length) if unmap else self.file.zero_range(offset, length)
        if not done:
            write_zero_bytes(self.file, offset, length)

    def _discard(self, offset: int, length: int) -> None:
        self.file.punch_hole(offset, length)

    def _flush(self) -> None:
        self.file.sync()

    def _close(self) -> None:
        try:
            if not self.read_only:
                self.file.sync()
        finally:
            self.file.close()
