"""Reference counts and cluster allocation (QEMU docs/interop/qcow2.txt, "Host cluster management").

The refcount table (contiguous clusters) points to refcount blocks (one
cluster each) of ``2**refcount_order``-bit entries, one per host cluster.
A cluster with refcount 0 is free.

Crash consistency.  A crash may *leak* clusters (refcount higher than the
references to them: wasted space, ``qemu-img check`` exit 3) but must never
leave a reference to a cluster whose refcount is too low (corruption, exit
2).  QEMU keeps that with dependencies between its metadata caches
(qcow2-cache.c: refcount blocks are flushed before the L2 tables that use
them; freed clusters are decremented after the L2 tables that dropped
them).  pykvm writes metadata through and keeps the same two orders:

* **increase before use.**  :meth:`Refcounts.allocate` hands out clusters
  from a *pool* whose refcounts (1) were written, and synced, before any
  table entry points at them.  The pool is refilled a batch at a time, so
  one sync covers many allocations; a crash leaks at most the pool.
* **decrease after the drop.**  :meth:`Refcounts.free_later` only queues a
  decrement; the queue is applied after the next sync, i.e. after the
  L1/L2 write that stopped referring to the cluster is durable.

A new refcount block is written (and synced) before the table entry that
points at it; a grown refcount table is written with the blocks covering
it, synced, and only then named in the header.

"Synced" is ``fdatasync`` in every cache mode but ``unsafe``, where pykvm
relies on program order alone: writes a killed process made are all in the
page cache in the order it made them, so a process crash still only leaks.
In ``unsafe`` mode decrements are applied at once.
"""

from __future__ import annotations

import struct
import sys
from array import array
from collections.abc import Callable

from pykvm.block.hostfile import HostFile
from pykvm.block.qcow2.cache import LruCache
from pykvm.block.qcow2.header import REFCOUNT_TABLE_FIELD, Header
from pykvm.block.qcow2.layout import (MAX_REFTABLE_BYTES, REFTABLE_RESERVED, MetadataMap,
                                      pack_entries, unpack_table)
from pykvm.errors import ImageError

#: Clusters reserved per refill of the allocation pool (what one crash may leak, at most).
POOL_BATCH = 32
_TYPECODES = {array(code).itemsize: code for code in "BHIQ"}


class RefcountBlock:
    """One refcount block in memory; sub-byte entries are packed from a byte's least significant bit."""

    def __init__(self, data: bytes, order: int) -> None:
        self.bits = 1 << order
        if self.bits >= 8:
            self.width = self.bits // 8
            self.values = array(_TYPECODES[self.width])
            self.values.frombytes(data)
            if sys.byteorder == "little" and self.width > 1:
                self.values.byteswap()
        else:
            self.raw = bytearray(data)
            self.per_byte = 8 // self.bits
            self.mask = (1 << self.bits) - 1

    @classmethod
    def empty(cls, cluster_size: int, order: int) -> RefcountBlock:
        return cls(bytes(cluster_size), order)

    def get(self, index: int) -> int:
        if self.bits >= 8:
            return self.values[index]
        shift = (index % self.per_byte) * self.bits
        return (self.raw[index // self.per_byte] >> shift) & self.mask

    def set(self, index: int, value: int) -> tuple[int, int]:
        """Store a refcount; return the byte range [lo, hi) of the block that changed."""
        if self.bits >= 8:
            self.values[index] = value
            return index * self.width, (index + 1) * self.width
        byte, shift = index // self.per_byte, (index % self.per_byte) * self.bits
        self.raw[byte] = (self.raw[byte] & ~(self.mask << shift)) | (value << shift)
        return byte, byte + 1

    def find_zero(self, start: int) -> int:
        """The first free entry at or after ``start``, or -1."""
        if self.bits >= 8:
            try:
                return self.values.index(0, start)
            except ValueError:
                return -1
        for index in range(start, len(self.raw) * self.per_byte):
            if not self.get(index):
                return index
        return -1

    def to_bytes(self, lo: int = 0, hi: int | None = None) -> bytes:
        """The block's on-disk bytes [lo, hi)."""
        if self.bits < 8:
            return bytes(self.raw[lo:hi])
        hi = len(self.values) * self.width if hi is None else hi
        part = self.values[lo // self.width:hi // self.width]
        if sys.byteorder == "little" and self.width > 1:
            part.byteswap()
        return part.tobytes()


class Refcounts:
    """An image's refcounts: lookups, allocation through a pool, deferred frees, table growth."""

    def __init__(self, file: HostFile, header: Header, metadata: MetadataMap,
                 corruption: Callable[[str], None]) -> None:
        self.file = file
        self.header = header
        self.metadata = metadata
        self.corruption = corruption
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.order = header.refcount_order
        self.max_refcount = (1 << header.refcount_bits) - 1
        self.per_block = self.cluster_size * 8 // header.refcount_bits
        self.ordered = not file.cache.no_flush
        self.blocks = LruCache(max(8, (1 << 20) // self.cluster_size), on_evict=self._write_evicted)
        self.pool: list[int] = []      # cluster indices: refcount 1, durable, not yet used
        self.pending: list[int] = []   # cluster indices to decrement after the next sync
        self.free_hint = 0             # no free cluster below this index
        self._dirty: dict[int, list[int]] = {}  # table index -> changed byte range [lo, hi)
        self._read_table()

    # -- opening -----------------------------------------------------------

    def _read_table(self) -> None:
        h, cs = self.header, self.cluster_size
        size = h.refcount_table_clusters * cs
        if h.refcount_table_clusters == 0:
            raise ImageError("the image has no refcount table (refcount_table_clusters is 0)")
        if size > MAX_REFTABLE_BYTES:
            raise ImageError(f"refcount table too large ({size} bytes; QEMU's limit is {MAX_REFTABLE_BYTES})")
        file_size = self.file.size()
        if h.refcount_table_offset % cs or h.refcount_table_offset + size > file_size:
            raise ImageError(f"refcount table at {h.refcount_table_offset:#x} (+{size:#x}) is unaligned "
                             f"or beyond the end of the file")
        self.metadata.add(h.refcount_table_offset, size, "the refcount table")
        self.table = unpack_table(self.file.pread(h.refcount_table_offset, size))
        for index, entry in enumerate(self.table):
            if not entry:
                continue
            if entry & REFTABLE_RESERVED or entry % cs or entry + cs > file_size:
                raise ImageError(f"refcount table entry {index} ({entry:#x}) is unaligned or "
                                 f"beyond the end of the file")
            self.metadata.add(entry, cs, f"refcount block {index}")

    # -- lookups -----------------------------------------------------------

    def get(self, cluster: int) -> int:
        """The refcount of a host cluster (0 where no block covers it)."""
        index = cluster // self.per_block
        block = self._block(index) if index < len(self.table) else None
        return block.get(cluster % self.per_block) if block is not None else 0

    def _block(self, index: int) -> RefcountBlock | None:
        offset = self.table[index]
        if not offset:
            return None
        block = self.blocks.get(index)
        if block is None:
            data = self.file.pread(offset, self.cluster_size)
            if len(data) != self.cluster_size:
                self.corruption(f"refcount block {index} at {offset:#x} is cut short by the end of the file")
            block = RefcountBlock(data, self.order)
            self.blocks.put(index, block)
        return block

    # -- changing refcounts ------------------------------------------------

    def _update(self, cluster: int, delta: int) -> int:
        index = cluster // self.per_block
        block = self._block(index) if index < len(self.table) else None
        if block is None:
            self.corruption(f"no refcount block covers cluster {cluster}")
        entry = cluster % self.per_block
        value = block.get(entry) + delta
        if value < 0:
            self.corruption(f"refcount of cluster {cluster} would drop below 0")
        if value > self.max_refcount:
            raise ImageError(f"refcount overflow: cluster {cluster} would need refcount {value} "
                             f"(at most {self.max_refcount} with {self.header.refcount_bits}-bit refcounts)")
        lo, hi = block.set(entry, value)
        span = self._dirty.setdefault(index, [lo, hi])
        span[0], span[1] = min(span[0], lo), max(span[1], hi)
        return value

    def set_refcount(self, cluster: int, value: int) -> None:
        """Store a refcount outright (repairs); :meth:`flush_changes` writes it."""
        self._update(cluster, value - self.get(cluster))

    def flush_changes(self) -> None:
        """Write every refcount entry changed in memory but not yet in the file."""
        self._write_dirty()

    def _write_dirty(self) -> None:
        for index in list(self._dirty):
            self._write_evicted(index, self.blocks.get(index))

    def _write_evicted(self, index: int, block: RefcountBlock) -> None:
        span = self._dirty.pop(index, None)
        if span is not None:
            self.file.pwrite(self.table[index] + span[0], block.to_bytes(span[0], span[1]))

    # -- allocation --------------------------------------------------------

    def allocate(self, count: int) -> list[int]:
        """Host offsets of ``count`` clusters whose refcount 1 is already durable."""
        if len(self.pool) < count:
            self._reserve(max(count - len(self.pool), POOL_BATCH))
        taken, self.pool = self.pool[:count], self.pool[count:]
        return [cluster << self.cluster_bits for cluster in taken]

    def _reserve(self, count: int) -> None:
        found: list[int] = []
        cluster = self.free_hint
        while len(found) < count:
            index = cluster // self.per_block
            if index >= len(self.table):
                self._grow_table(index)
                continue
            if not self.table[index]:
                self._new_block(index, cluster)
                cluster += 1
                continue
            free = self._block(index).find_zero(cluster % self.per_block)
            if free < 0:
                cluster = (index + 1) * self.per_block
                continue
            cluster = index * self.per_block + free
            owner = self.metadata.owner(cluster)
            if owner is not None:
                self.corruption(f"{owner} at {cluster << self.cluster_bits:#x} has refcount 0")
            self._update(cluster, +1)
            found.append(cluster)
            cluster += 1
        self._write_dirty()
        self.free_hint = cluster
        self.sync()
        self.pool = sorted(self.pool + found)

    def _new_block(self, index: int, cluster: int) -> None:
        """Make free ``cluster`` the refcount block of its own range (which is all free: it had no block)."""
        owner = self.metadata.owner(cluster)
        if owner is not None:
            self.corruption(f"{owner} at {cluster << self.cluster_bits:#x} has no refcount block")
        block = RefcountBlock.empty(self.cluster_size, self.order)
        block.set(cluster % self.per_block, 1)
        offset = cluster << self.cluster_bits
        self.file.pwrite(offset, block.to_bytes())
        self.metadata.add(offset, self.cluster_size, f"refcount block {index}")
        self.file.sync()  # the block's content before the table entry naming it
        self.table[index] = offset
        self.file.pwrite(self.header.refcount_table_offset + index * 8, struct.pack(">Q", offset))
        self.blocks.put(index, block)

    def _grow_table(self, needed_index: int) -> None:
        """Move the refcount table to a fresh area past everything, with blocks that cover the area."""
        cs, per_block, h = self.cluster_size, self.per_block, self.header
        area = max(-(-self.file.size() // cs), len(self.table) * per_block)
        area = -(-area // per_block) * per_block
        nblocks = 1
        while True:
            entries = max(needed_index + 1, area // per_block + nblocks)
            table_clusters = -(-entries * 8 // cs)
            if nblocks * per_block >= nblocks + table_clusters:
                break
            nblocks += 1
        if table_clusters * cs > MAX_REFTABLE_BYTES:
            raise ImageError("the image is full: its refcount table would exceed QEMU's 8 MiB limit")
        table = array("Q", self.table)
        table.extend([0] * (table_clusters * cs // 8 - len(table)))
        used_end = area + nblocks + table_clusters
        for j in range(nblocks):
            block = RefcountBlock.empty(cs, self.order)
            first = area + j * per_block
            for cluster in range(first, min(first + per_block, used_end)):
                block.set(cluster - first, 1)
            offset = (area + j) << self.cluster_bits
            self.file.pwrite(offset, block.to_bytes())
            self.metadata.add(offset, cs, f"refcount block {area // per_block + j}")
            table[area // per_block + j] = offset
            self.blocks.put(area // per_block + j, block)
        table_offset = (area + nblocks) << self.cluster_bits
        self.file.pwrite(table_offset, pack_entries(table))
        self.metadata.add(table_offset, table_clusters * cs, "the new refcount table")
        self.file.sync()  # blocks and table before the header names them
        self.file.pwrite(REFCOUNT_TABLE_FIELD, struct.pack(">QI", table_offset, table_clusters))
        self.file.sync()  # the header before the old table's clusters are freed
        old_first = h.refcount_table_offset >> self.cluster_bits
        for cluster in range(old_first, old_first + h.refcount_table_clusters):
            self.metadata.remove(cluster)
            self.pending.append(cluster)
        self.table = table
        h.refcount_table_offset, h.refcount_table_clusters = table_offset, table_clusters

    # -- freeing -----------------------------------------------------------

    def free_later(self, offset: int, length: int) -> None:
        """Drop one reference to each cluster of a byte range, once the change that dropped it is durable."""
        first = offset >> self.cluster_bits
        last = (offset + length - 1) >> self.cluster_bits
        self.pending.extend(range(first, last + 1))
        if not self.ordered:
            self._apply_pending()

    def sync(self) -> bool:
        """Sync the file, then apply the queued decrements; True if there were any (they want a sync too)."""
        self.file.sync()
        return self._apply_pending()

    def release_pool(self) -> None:
        """Give back the reserved clusters nobody used (on close)."""
        for cluster in self.pool:
            self._update(cluster, -1)
            self.free_hint = min(self.free_hint, cluster)
        self.pool = []
        self._write_dirty()

    def _apply_pending(self) -> bool:
        if not self.pending:
            return False
        freed = []
        for cluster in self.pending:
            if self._update(cluster, -1) == 0:
                freed.append(cluster)
        self.pending = []
        self._write_dirty()
        for cluster in freed:
            self.metadata.remove(cluster)
            self.free_hint = min(self.free_hint, cluster)
        self._punch(sorted(freed))
        return True

    def _punch(self, clusters: list[int]) -> None:
        """Give freed clusters' space back to the host filesystem (runs of adjacent clusters at once)."""
        start = 0
        for i in range(1, len(clusters) + 1):
            if i == len(clusters) or clusters[i] != clusters[i - 1] + 1:
                first, count = clusters[start], i - start
                self.file.punch_hole(first << self.cluster_bits, count << self.cluster_bits)
                start = i
