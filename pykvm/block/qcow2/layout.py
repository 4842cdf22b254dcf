"""qcow2's on-disk vocabulary: L1/L2 entry bits, cluster kinds, tables, the metadata map.

QEMU docs/interop/qcow2.txt, "Cluster mapping" and "Host cluster management".
Every number in a qcow2 file is big-endian; tables are arrays of 64-bit
entries, one cluster (L2 tables, refcount blocks) or several contiguous
clusters (L1 table, refcount table) long.
"""

from __future__ import annotations

import enum
import sys
from array import array

from pykvm.errors import ImageError

#: L1 and L2 entries, bit 63: the cluster's refcount is exactly one, so it may be written in place.
COPIED = 1 << 63
#: L2 entries, bit 62: a compressed cluster (its descriptor is laid out differently).
COMPRESSED = 1 << 62
#: Standard L2 entries, bit 0 (version 3 only): the cluster reads as zeroes.
ZERO = 1
#: Bits 9-55: a host offset (L1 entries, standard L2 entries).
OFFSET_MASK = 0x00FF_FFFF_FFFF_FE00
#: Bits that must be 0 in an L1 entry (0-8 and 56-62).
L1_RESERVED = 0x7F00_0000_0000_01FF
#: Bits that must be 0 in a refcount table entry.
REFTABLE_RESERVED = 0x1FF

#: QEMU's implementation limits (qcow2.h), which it refuses to open beyond.
MAX_L1_BYTES = 32 << 20
MAX_REFTABLE_BYTES = 8 << 20
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21


class Kind(enum.Enum):
    """What a guest cluster is, from its L2 entry (QEMU's ``QCow2ClusterType``)."""

    UNALLOCATED = "unallocated"  # reads from the backing file, or zeroes
    ZERO_PLAIN = "zero"          # reads as zeroes, no host cluster
    ZERO_ALLOC = "zero-alloc"    # reads as zeroes, a preallocated host cluster
    NORMAL = "normal"            # data in a host cluster
    COMPRESSED = "compressed"    # zlib data somewhere in the file


def kind_of(entry: int) -> Kind:
    """Classify an L2 entry (no validation: see the image and checker for that)."""
    if entry & COMPRESSED:
        return Kind.COMPRESSED
    if entry & ZERO:
        return Kind.ZERO_ALLOC if entry & OFFSET_MASK else Kind.ZERO_PLAIN
    return Kind.NORMAL if entry & OFFSET_MASK else Kind.UNALLOCATED


class CompressedDescriptor:
    """Where a compressed cluster's data lies (x = 62 - (cluster_bits - 8) in the spec).

    Bits 0..x-1 are the byte offset of the data; bits x..61 the number of
    512-byte sectors it occupies beyond the first.  The data runs to the end
    of its last sector and may cross into the next host cluster.
    """

    def __init__(self, cluster_bits: int) -> None:
        self.shift = 62 - (cluster_bits - 8)
        self.offset_mask = (1 << self.shift) - 1
        self.sectors_mask = (1 << (cluster_bits - 8)) - 1

    def decode(self, entry: int) -> tuple[int, int]:
        """(host byte offset, byte length) of a compressed cluster's data."""
        offset = entry & self.offset_mask
        sectors = ((entry >> self.shift) & self.sectors_mask) + 1
        return offset, sectors * 512 - (offset & 511)


def unpack_table(data: bytes) -> array:
    """Big-endian 64-bit entries as an ``array('Q')`` of native integers."""
    table = array("Q")
    table.frombytes(data[:len(data) - len(data) % 8])
    if sys.byteorder == "little":
        table.byteswap()
    return table


def pack_entries(entries) -> bytes:
    """Native integers (an array or a list) as big-endian 64-bit entries."""
    table = array("Q", entries)
    if sys.byteorder == "little":
        table.byteswap()
    return table.tobytes()


class MetadataMap:
    """Which host clusters hold metadata, and what: header, L1, L2 tables, refcount structures, snapshots.

    Filled while an image is opened, so overlapping metadata is found before
    any write; kept up to date as tables are allocated and freed, so a guest
    write can never land on metadata (QEMU's ``qcow2_check_metadata_overlap``).
    """

    def __init__(self, cluster_bits: int) -> None:
        self.cluster_bits = cluster_bits
        self._owner: dict[int, str] = {}

    def add(self, offset: int, length: int, what: str) -> None:
        """Claim the clusters holding ``length`` bytes from ``offset`` for ``what``; refuse overlaps."""
        first = offset >> self.cluster_bits
        last = (offset + max(length, 1) - 1) >> self.cluster_bits
        for cluster in range(first, last + 1):
            other = self._owner.get(cluster)
            if other is not None:
                raise ImageError(f"metadata overlap: {what} and {other} share the cluster at "
                                 f"{cluster << self.cluster_bits:#x}")
        for cluster in range(first, last + 1):
            self._owner[cluster] = what

    def remove(self, cluster: int) -> None:
        """Forget a cluster (it was freed)."""
        self._owner.pop(cluster, None)

    def owner(self, cluster: int) -> str | None:
        """What metadata the host cluster holds, or None."""
        return self._owner.get(cluster)

    def __len__(self) -> int:
        return len(self._owner)
