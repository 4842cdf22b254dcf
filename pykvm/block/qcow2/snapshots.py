"""The internal snapshot table (QEMU docs/interop/qcow2.txt, "Snapshots"): read-only.

pykvm never creates, applies or deletes snapshots; it reads the table so
that ``img info`` can list it, ``img check`` can count the references a
snapshot holds, and writes never touch a snapshot's tables: clusters a
snapshot shares have refcount 2 or more and no COPIED flag in the active
tables, so the writer copies them first (see image.py).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from pykvm.block.hostfile import HostFile
from pykvm.block.qcow2.header import Header
from pykvm.block.qcow2.layout import MAX_L1_BYTES
from pykvm.errors import ImageError

_ENTRY = struct.Struct(">QIHHIIQII")   # the fixed 40 bytes of a snapshot table entry
MAX_SNAPSHOTS = 65536                  # QEMU's QCOW_MAX_SNAPSHOTS
MAX_TABLE_BYTES = 64 << 20             # QEMU's QCOW_MAX_SNAPSHOTS_SIZE


@dataclass(frozen=True)
class Snapshot:
    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int
    disk_size: int | None
    icount: int | None


def read_snapshots(file: HostFile, header: Header) -> tuple[list[Snapshot], int]:
    """The snapshots and the table's length in bytes; validated against the file."""
    count, offset = header.nb_snapshots, header.snapshots_offset
    if count == 0:
        return [], 0
    if count > MAX_SNAPSHOTS:
        raise ImageError(f"too many snapshots ({count})")
    file_size = file.size()
    if offset % header.cluster_size or offset >= file_size:
        raise ImageError(f"snapshot table at {offset:#x} is unaligned or beyond the end of the file")
    data = file.pread(offset, min(MAX_TABLE_BYTES, file_size - offset))
    snapshots, position = [], 0
    for number in range(count):
        if position + _ENTRY.size > len(data):
            raise ImageError(f"snapshot {number} runs past the end of the snapshot table")
        (l1_offset, l1_size, id_length, name_length, date_sec, date_nsec, vm_clock,
         vm_state_size, extra_size) = _ENTRY.unpack_from(data, position)
        extra_start = position + _ENTRY.size
        strings_start = extra_start + extra_size
        end = strings_start + id_length + name_length
        if end > len(data):
            raise ImageError(f"snapshot {number} runs past the end of the snapshot table")
        extra = data[extra_start:strings_start]
        if len(extra) >= 8:
            vm_state_size = struct.unpack_from(">Q", extra, 0)[0]
        disk_size = struct.unpack_from(">Q", extra, 8)[0] if len(extra) >= 16 else None
        icount = struct.unpack_from(">Q", extra, 16)[0] if len(extra) >= 24 else None
        if l1_offset % header.cluster_size or l1_size * 8 > MAX_L1_BYTES or l1_offset + l1_size * 8 > file_size:
            raise ImageError(f"snapshot {number}'s L1 table at {l1_offset:#x} is unaligned, too large "
                             f"or beyond the end of the file")
        snapshots.append(Snapshot(
            id=data[strings_start:strings_start + id_length].decode(errors="replace"),
            name=data[strings_start + id_length:end].decode(errors="replace"),
            l1_table_offset=l1_offset, l1_size=l1_size, date_sec=date_sec, date_nsec=date_nsec,
            vm_clock_nsec=vm_clock, vm_state_size=vm_state_size, disk_size=disk_size,
            icount=None if icount in (None, (1 << 64) - 1) else icount))
        position = end + (-end % 8)
    return snapshots, position
