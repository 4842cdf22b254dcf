"""The snapshot file: one versioned file holding a paused machine's whole state.

Layout (all integers little-endian)::

    magic     8 bytes  b"PYKVMSNP"
    version   u32      FORMAT_VERSION
    sections  repeated: name (4 ASCII bytes), length (u64), payload (length bytes)
    trailer   b"CRC3", length 4, crc32 of every byte before the trailer

The first section is ``MACH``, the machine description (what must match
before anything is created: memory size, CPUs, platform, devices).  The
others: ``STAT`` (vCPU, VM and device state, a JSON document) and one
``RAM `` section per memory region.  JSON carries only plain values; bytes
are written as ``{"$b": "<base64>"}`` (``encode``/``decode`` below).

A ``RAM `` section is sparse: the region's base and size (u64 each), a
bitmap with one bit per 4 KiB page (set: the page is stored), then the
stored pages in address order.  Pages of zeros are not stored, so a
128 MiB machine that touched 1 MiB writes about 1 MiB.

:func:`read_snapshot` checks everything -- magic, version, every length,
the checksum, the description's shape -- and raises :class:`SnapshotError`
(one line) before the caller creates anything.  :func:`write_snapshot`
writes a temporary file beside the target and renames it over the target
only once it is complete and flushed, so a failed save leaves no partial
file behind.
"""

from __future__ import annotations

import base64
import json
import os
import struct
import zlib

from pykvm.errors import PykvmError

__all__ = ["FORMAT_VERSION", "MAGIC", "PAGE_SIZE", "Snapshot", "SnapshotError", "decode", "encode",
           "read_snapshot", "write_snapshot", "sparse_pages", "load_pages"]

MAGIC = b"PYKVMSNP"
FORMAT_VERSION = 1
PAGE_SIZE = 4096
_HEAD = struct.Struct("<8sI")
_SECTION = struct.Struct("<4sQ")
_REGION = struct.Struct("<QQ")
_TRAILER = b"CRC3"
_ZERO_PAGE = bytes(PAGE_SIZE)
_SCAN = 64 * PAGE_SIZE  # zero runs are found 256 KiB at a time first
_ZERO_SCAN = bytes(_SCAN)


class SnapshotError(PykvmError, ValueError):
    """A snapshot file that cannot be restored: why, in one line."""


# -- plain values with bytes ---------------------------------------------------------------
def encode(value):
    """``value`` with every bytes object replaced by ``{"$b": base64}`` (so JSON can carry it)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"$b": base64.b64encode(bytes(value)).decode("ascii")}
    if isinstance(value, dict):
        return {str(k): encode(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [encode(v) for v in value]
    return value


def decode(value):
    """The inverse of :func:`encode`."""
    if isinstance(value, dict):
        if set(value) == {"$b"}:
            return base64.b64decode(value["$b"])
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value


# -- sparse memory ------------------------------------------------------------------------------
def sparse_pages(view: memoryview) -> tuple[bytes, list[bytes]]:
    """(bitmap, stored pages) of a region's bytes: one bit per 4 KiB page, set where it is not all zero.

    Copied out 256 KiB at a time (``bytes ==`` is a memcmp; a memoryview
    comparison goes element by element): runs of zeros cost one compare.
    """
    size = len(view)
    bitmap = bytearray((size // PAGE_SIZE + 7) // 8)
    stored = []
    for start in range(0, size, _SCAN):
        block = view[start:start + _SCAN].tobytes()
        if block == _ZERO_SCAN[:len(block)]:
            continue
        for offset in range(0, len(block), PAGE_SIZE):
            page = block[offset:offset + PAGE_SIZE]
            if page != _ZERO_PAGE:
                index = (start + offset) // PAGE_SIZE
                bitmap[index >> 3] |= 1 << (index & 7)
                stored.append(page)
    return bytes(bitmap), stored


def load_pages(view: memoryview, payload: memoryview, *, zeroed: bool = False) -> None:
    """Write a ``RAM `` section's pages into ``view``; the pages not stored become zeros.

    ``zeroed``: the region is known to hold zeros already (a new machine's
    fresh mapping), so only the stored pages are written.  Runs of pages
    are copied with one slice assignment each.
    """
    pages = len(view) // PAGE_SIZE
    bitmap = payload[_REGION.size:_REGION.size + (pages + 7) // 8]
    data = _REGION.size + len(bitmap)
    index = 0
    while index < pages:
        stored = bitmap[index >> 3] >> (index & 7) & 1
        end = index + 1
        while end < pages and (bitmap[end >> 3] >> (end & 7) & 1) == stored:
            end += 1
        first, last = index * PAGE_SIZE, end * PAGE_SIZE
        if stored:
            view[first:last] = payload[data:data + last - first]
            data += last - first
        elif not zeroed:
            view[first:last] = bytes(last - first)
        index = end


def _ram_section(base: int, view: memoryview) -> list:
    if len(view) % PAGE_SIZE or base % PAGE_SIZE:
        raise ValueError(f"a region of {len(view):#x} bytes at {base:#x} is not whole 4 KiB pages")
    bitmap, stored = sparse_pages(view)
    return [_REGION.pack(base, len(view)), bitmap, *stored]


def _check_ram(payload: memoryview) -> tuple[int, int]:
    if len(payload) < _REGION.size:
        raise SnapshotError("a RAM section is shorter than its header")
    base, size = _REGION.unpack_from(payload)
    if size % PAGE_SIZE or base % PAGE_SIZE:
        raise SnapshotError(f"a RAM section at {base:#x}+{size:#x} is not whole 4 KiB pages")
    pages = size // PAGE_SIZE
    bitmap = bytes(payload[_REGION.size:_REGION.size + (pages + 7) // 8])
    if len(bitmap) != (pages + 7) // 8:
        raise SnapshotError(f"the RAM section at {base:#x} is shorter than its page bitmap")
    expected = int.from_bytes(bitmap, "little").bit_count() * PAGE_SIZE
    if len(payload) != _REGION.size + len(bitmap) + expected:
        raise SnapshotError(f"the RAM section at {base:#x} holds {len(payload)} bytes, its bitmap says "
                            f"{_REGION.size + len(bitmap) + expected}")
    return base, size


# -- the file -----------------------------------------------------------------------------------
class Snapshot:
    """A checked snapshot: ``machine`` (the description), ``state`` (decoded JSON), ``ram`` [(base, size, payload)]."""

    def __init__(self, machine: dict, state: dict, ram: list[tuple[int, int, memoryview]], path: str = "") -> None:
        self.machine = machine
        self.state = state
        self.ram = ram
        self.path = path


def write_snapshot(path: str, machine: dict, state: dict, regions: list[tuple[int, memoryview]]) -> int:
    """Write the file atomically (a temporary file in the same directory, renamed); return its size.

    On any failure the temporary file is removed and the target is
    untouched; the OSError propagates.
    """
    parts: list = [_HEAD.pack(MAGIC, FORMAT_VERSION)]

    def section(name: bytes, chunks: list) -> None:
        parts.append(_SECTION.pack(name, sum(len(c) for c in chunks)))
        parts.extend(chunks)

    section(b"MACH", [json.dumps(machine, sort_keys=True).encode()])
    section(b"STAT", [json.dumps(encode(state), sort_keys=True).encode()])
    for base, view in regions:
        section(b"RAM ", _ram_section(base, view))
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    parts.append(_SECTION.pack(_TRAILER, 4) + struct.pack("<I", crc))
    directory = os.path.dirname(os.path.abspath(path))
    temporary = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        try:
            os.unlink(temporary)
        except OSError:
            pass
        raise
    return sum(len(p) for p in parts)


def read_snapshot(path: str) -> Snapshot:
    """Read and check a snapshot file; SnapshotError (one line, naming the file) for anything wrong."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise SnapshotError(f"{path}: {exc.strerror}") from None
    try:
        return _parse(memoryview(data), path)
    except SnapshotError as exc:
        raise SnapshotError(f"{path}: {exc}") from None


def _parse(data: memoryview, path: str) -> Snapshot:
    if len(data) < _HEAD.size or bytes(data[:len(MAGIC)]) != MAGIC:
        raise SnapshotError("not a pykvm snapshot (no PYKVMSNP magic)")
    _, version = _HEAD.unpack_from(data)
    if version != FORMAT_VERSION:
        raise SnapshotError(f"snapshot format version {version}, this pykvm reads version {FORMAT_VERSION}")
    sections: list[tuple[bytes, memoryview]] = []
    offset = _HEAD.size
    while True:
        if offset + _SECTION.size > len(data):
            raise SnapshotError(f"truncated: the file ends at byte {len(data)} inside a section header")
        name, length = _SECTION.unpack_from(data, offset)
        start = offset + _SECTION.size
        if start + length > len(data):
            raise SnapshotError(f"truncated: section {name.decode('latin-1')!r} needs {length} bytes, "
                                f"{len(data) - start} are left")
        if name == _TRAILER:
            if length != 4 or start + 4 != len(data):
                raise SnapshotError("bytes after the checksum, or a checksum of the wrong size")
            stored, = struct.unpack_from("<I", data, start)
            if zlib.crc32(data[:offset]) != stored:
                raise SnapshotError("checksum mismatch: the file is corrupt")
            break
        sections.append((name, data[start:start + length]))
        offset = start + length
    if not sections or sections[0][0] != b"MACH":
        raise SnapshotError("the machine description (MACH) is missing")
    machine = state = None
    ram = []
    for name, payload in sections:
        try:
            if name == b"MACH":
                machine = json.loads(bytes(payload))
            elif name == b"STAT":
                state = decode(json.loads(bytes(payload)))
            elif name == b"RAM ":
                base, size = _check_ram(payload)
                ram.append((base, size, payload))
            else:
                raise SnapshotError(f"unknown section {name.decode('latin-1')!r}")
        except (ValueError, UnicodeDecodeError) as exc:
            if isinstance(exc, SnapshotError):
                raise
            raise SnapshotError(f"section {name.decode('latin-1')!r} is not valid: {exc}") from None
    if not isinstance(machine, dict) or not isinstance(state, dict):
        raise SnapshotError("the machine description or the state section is missing")
    return Snapshot(machine, state, ram, path)
