"""qcow2 images: guest clusters through L1/L2 tables (QEMU docs/interop/qcow2.txt, "Cluster mapping").

Opening validates everything a write could trip over *before* the first
write: the header (header.py), the L1 table and every entry in it, the
refcount table and every refcount block it names (refcount.py), the
snapshot table, and that none of these metadata clusters overlap (a
:class:`~pykvm.block.qcow2.layout.MetadataMap`).  L2 entries are checked as
they are used; a bad one *signals corruption* as QEMU does: a writable v3
image gets its corrupt bit set, the image turns read-only, and the access
fails with :class:`~pykvm.errors.ImageError`.

Reads: unallocated clusters come from the backing file (or are zero), zero
clusters are zero, compressed clusters are inflated (raw deflate, 4 KiB
window: zlib ``wbits=-12`` as QEMU), and runs of clusters that are
contiguous in the file are read with one system call.

Writes, in this order (refcount.py explains why that order is crash safe):

1. a cluster whose L2 entry has the COPIED flag is written in place;
2. any other cluster (unallocated, zero, compressed, or shared with a
   snapshot) gets a new host cluster from the allocation pool, filled with
   what the guest cluster read before (copy-on-write from the backing file
   or the old cluster) around the new bytes;
3. the L2 entries are updated (an L2 table is first allocated, or copied if
   shared, and named in the L1 table only once its content is synced);
4. the clusters that lost a reference are queued to be decremented after
   the next sync.

Zeroing uses the v3 zero flag on whole clusters (v2 images get zero bytes,
or an unallocated entry when no backing file shows through); discard
unmaps whole clusters only (it is a hint), as QEMU's ``qcow2_co_pdiscard``.
"""

from __future__ import annotations

import itertools
import os
import struct
import zlib
from array import array
from collections.abc import Callable
from typing import NoReturn

from pykvm.block.backing import resolve_backing_path
from pykvm.block.hostfile import CacheMode, HostFile
from pykvm.block.image import BlockImage
from pykvm.block.qcow2.cache import LruCache
from pykvm.block.qcow2.header import (AUTOCLEAR_FIELD, INCOMPAT_CORRUPT, INCOMPAT_DIRTY, INCOMPATIBLE_FIELD,
                                      read_header)
from pykvm.block.qcow2.layout import (COPIED, L1_RESERVED, MAX_L1_BYTES, OFFSET_MASK, ZERO,
                                      CompressedDescriptor, Kind, MetadataMap, kind_of, pack_entries,
                                      unpack_table)
from pykvm.block.qcow2.refcount import Refcounts
from pykvm.block.qcow2.snapshots import read_snapshots
from pykvm.errors import ImageError

#: ``open_backing(path, format_or_None) -> BlockImage``: how an image opens its backing file.
BackingOpener = Callable[[str, "str | None"], BlockImage]
#: Bytes of L2 tables kept in memory (QEMU's default l2-cache-size is 1 MiB as well).
L2_CACHE_BYTES = 1 << 20
_WRITE_BYTES = "write zero bytes"


class Qcow2Image(BlockImage):
    """An open qcow2 image (version 2 or 3) on a :class:`HostFile` it owns."""

    format = "qcow2"

    def __init__(self, file: HostFile, *, open_backing: BackingOpener | None = None) -> None:
        self.file = file
        self._opened = False
        header = read_header(file)
        super().__init__(header.size, read_only=file.read_only, cache=file.cache)
        self.header = header
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.l2_entries = self.cluster_size // 8
        self.compressed = CompressedDescriptor(header.cluster_bits)
        self.metadata = MetadataMap(header.cluster_bits)
        self.metadata.add(0, self.cluster_size, "the header")
        self.l1 = self._read_l1()
        self.refcounts = Refcounts(file, header, self.metadata, self._corrupt)
        self.snapshots = self._read_snapshots()
        self._claim_l2_tables()
        self.l2_cache = LruCache(max(4, L2_CACHE_BYTES // self.cluster_size))
        self._inflated: tuple[int | None, bytes] = (None, b"")
        self.backing: BlockImage | None = None
        self.backing_path: str | None = None
        if not self.read_only:
            self._prepare_for_writing()
        self._opened = True
        if header.backing_file:
            self._open_backing(open_backing)

    @classmethod
    def open(cls, path: str | os.PathLike, *, read_only: bool = False, cache: str | CacheMode = "writeback",
             open_backing: BackingOpener | None = None) -> Qcow2Image:
        """Open an image file.

        Without ``open_backing`` a backing file is not opened (as ``qemu-img info``
        does) and reading a cluster it would supply raises ImageError;
        :func:`pykvm.block.open_image` passes an opener that follows the chain.
        """
        file = HostFile(path, read_only=read_only, cache=cache)
        try:
            return cls(file, open_backing=open_backing)
        except BaseException:
            file.close()
            raise

    def __repr__(self) -> str:
        return f"Qcow2Image({self.file.path!r})"

    # -- opening -----------------------------------------------------------

    def _read_l1(self) -> array:
        h, cs = self.header, self.cluster_size
        needed = -(-h.size // (cs * self.l2_entries))
        if h.l1_size < needed:
            raise ImageError(f"L1 table too small for the virtual size: {h.l1_size} entries, "
                             f"{h.size} bytes need {needed}")
        if h.l1_size * 8 > MAX_L1_BYTES:
            raise ImageError(f"L1 table too large ({h.l1_size} entries; QEMU's limit is {MAX_L1_BYTES // 8})")
        if not h.l1_size:
            return array("Q")
        file_size = self.file.size()
        if h.l1_table_offset % cs or h.l1_table_offset + h.l1_size * 8 > file_size:
            raise ImageError(f"L1 table at {h.l1_table_offset:#x} is unaligned or beyond the end of the file")
        self.metadata.add(h.l1_table_offset, h.l1_size * 8, "the L1 table")
        l1 = unpack_table(self.file.pread(h.l1_table_offset, h.l1_size * 8))
        for index, entry in enumerate(l1):
            offset = entry & OFFSET_MASK
            if entry & L1_RESERVED or offset % cs or (offset and offset + cs > file_size):
                raise ImageError(f"L1 entry {index} ({entry:#x}) has reserved bits set, is unaligned "
                                 f"or points beyond the end of the file")
        return l1

    def _read_snapshots(self):
        snapshots, table_bytes = read_snapshots(self.file, self.header)
        if snapshots:
            self.metadata.add(self.header.snapshots_offset, table_bytes, "the snapshot table")
        for snapshot in snapshots:
            if snapshot.l1_size:
                self.metadata.add(snapshot.l1_table_offset, snapshot.l1_size * 8,
                                  f"the L1 table of snapshot {snapshot.id}")
        return snapshots

    def _claim_l2_tables(self) -> None:
        for index, entry in enumerate(self.l1):
            if entry & OFFSET_MASK:
                self.metadata.add(entry & OFFSET_MASK, self.cluster_size, f"the L2 table of L1 entry {index}")

    def _prepare_for_writing(self) -> None:
        h = self.header
        if h.incompatible_features & INCOMPAT_CORRUPT:
            raise ImageError(f"{self.file.path}: the image is marked corrupt; it can only be opened read-only "
                             f"(qemu-img check -r all repairs it)")
        if h.incompatible_features & INCOMPAT_DIRTY:
            from pykvm.block.qcow2.check import repair_dirty_image
            repair_dirty_image(self)
        if h.autoclear_features:
            # Autoclear features pykvm does not maintain (bitmaps) must be cleared before writing.
            h.autoclear_features = 0
            self.file.pwrite(AUTOCLEAR_FIELD, bytes(8))
            self.file.sync()

    def _open_backing(self, open_backing: BackingOpener | None) -> None:
        self.backing_path = resolve_backing_path(self.file.path, self.header.backing_file)
        if open_backing is not None:
            self.backing = open_backing(self.backing_path, self.header.backing_format)

    def _corrupt(self, message: str) -> NoReturn:
        """Signal corruption found while running (QEMU's ``qcow2_signal_corruption``)."""
        if self._opened and not self.read_only:
            self.read_only = True
            self.refcounts.pool = []  # leaked rather than touched again
            if self.header.version >= 3:
                self.header.incompatible_features |= INCOMPAT_CORRUPT
                try:
                    self.file.pwrite(INCOMPATIBLE_FIELD, struct.pack(">Q", self.header.incompatible_features))
                    self.file.sync()
                except ImageError:
                    pass
        raise ImageError(f"{self.file.path}: corrupt qcow2 image: {message}")

    # -- looking clusters up -----------------------------------------------

    def _l2_table(self, offset: int) -> array:
        table = self.l2_cache.get(offset)
        if table is None:
            data = self.file.pread(offset, self.cluster_size)
            if len(data) != self.cluster_size:
                self._corrupt(f"the L2 table at {offset:#x} is cut short by the end of the file")
            table = unpack_table(data)
            self.l2_cache.put(offset, table)
        return table

    def _entry(self, guest_cluster: int) -> int:
        l2_offset = self.l1[guest_cluster // self.l2_entries] & OFFSET_MASK
        return self._l2_table(l2_offset)[guest_cluster % self.l2_entries] if l2_offset else 0

    def _kind(self, entry: int, guest_cluster: int) -> Kind:
        kind = kind_of(entry)
        if kind in (Kind.ZERO_PLAIN, Kind.ZERO_ALLOC) and self.header.version < 3:
            self._corrupt(f"zero cluster entry for guest cluster {guest_cluster} in a version 2 image")
        if kind in (Kind.NORMAL, Kind.ZERO_ALLOC) and entry & OFFSET_MASK & (self.cluster_size - 1):
            self._corrupt(f"the L2 entry of guest cluster {guest_cluster} ({entry:#x}) is not cluster aligned")
        return kind

    def _runs(self, offset: int, length: int):
        """(kind, guest offset, length, host offset or L2 entry) for a range, merging what continues."""
        cb, mask = self.cluster_bits, self.cluster_size - 1
        end, position, run = offset + length, offset, None
        while position < end:
            cluster = position >> cb
            n = min(end, (cluster + 1) << cb) - position
            entry = self._entry(cluster)
            kind = self._kind(entry, cluster)
            where = 0
            if kind is Kind.NORMAL:
                where = (entry & OFFSET_MASK) + (position & mask)
            elif kind is Kind.COMPRESSED:
                where = entry
            elif kind is Kind.ZERO_ALLOC:
                kind = Kind.ZERO_PLAIN
            if (run is not None and run[0] is kind and kind is not Kind.COMPRESSED
                    and (kind is not Kind.NORMAL or run[3] + run[2] == where)):
                run[2] += n
            else:
                if run is not None:
                    yield tuple(run)
                run = [kind, position, n, where]
            position += n
        if run is not None:
            yield tuple(run)

    # -- reading -----------------------------------------------------------

    def _read(self, offset: int, length: int) -> bytes:
        out = bytearray(length)
        with memoryview(out) as view:
            for kind, start, n, where in self._runs(offset, length):
                into = view[start - offset:start - offset + n]
                if kind is Kind.NORMAL:
                    self.file.read_into(where, into)  # what lies past the end of the file reads as zeroes
                elif kind is Kind.UNALLOCATED:
                    self._read_backing(start, into)
                elif kind is Kind.COMPRESSED:
                    inside = start & (self.cluster_size - 1)
                    into[:] = self._inflate(where)[inside:inside + n]
        return bytes(out)

    def _read_backing(self, offset: int, into: memoryview) -> None:
        if self.header.backing_file and self.backing is None:
            raise ImageError(f"{self.file.path} was opened without its backing file and cannot read "
                             f"unallocated clusters")
        if self.backing is not None:
            n = min(len(into), max(0, self.backing.size - offset))
            if n:
                into[:n] = self.backing.read(offset, n)

    def _inflate(self, entry: int) -> bytes:
        if self._inflated[0] == entry:
            return self._inflated[1]
        offset, length = self.compressed.decode(entry)
        try:
            data = zlib.decompressobj(-12).decompress(self.file.pread(offset, length), self.cluster_size)
        except zlib.error as e:
            self._corrupt(f"compressed cluster at {offset:#x} does not inflate: {e}")
        if len(data) != self.cluster_size:
            self._corrupt(f"compressed cluster at {offset:#x} inflates to {len(data)} bytes, "
                          f"not {self.cluster_size}")
        self._inflated = (entry, data)
        return data

    def _cluster_content(self, guest_cluster: int) -> bytearray:
        """What a whole guest cluster reads as now (zero-padded past the virtual end)."""
        start = guest_cluster << self.cluster_bits
        content = bytearray(self._read(start, min(self.cluster_size, self.size - start)))
        content.extend(bytes(self.cluster_size - len(content)))
        return content

    # -- writing -----------------------------------------------------------

    def _slices(self, offset: int, length: int):
        """Split a range at L2 table boundaries: (offset, length) pieces one L2 table maps."""
        span = self.l2_entries << self.cluster_bits
        end = offset + length
        while offset < end:
            n = min(end, (offset // span + 1) * span) - offset
            yield offset, n
            offset += n

    def _write(self, offset: int, data: memoryview) -> None:
        for start, n in self._slices(offset, len(data)):
            self._write_slice(start, data[start - offset:start - offset + n])

    def _write_slice(self, offset: int, data: memoryview) -> None:
        cb, cs = self.cluster_bits, self.cluster_size
        first, last = offset >> cb, (offset + len(data) - 1) >> cb
        table_offset, table = self._writable_l2(first // self.l2_entries)
        writes: list[tuple[int, object]] = []   # (host offset, bytes)
        new_entries: dict[int, int] = {}        # L2 index -> entry
        needs_cluster: list[tuple[int, object]] = []
        frees: list[tuple[int, int]] = []
        for cluster in range(first, last + 1):
            lo, hi = max(offset, cluster << cb), min(offset + len(data), (cluster + 1) << cb)
            piece = data[lo - offset:hi - offset]
            index, inside = cluster % self.l2_entries, lo & (cs - 1)
            entry = table[index]
            kind, host = self._kind(entry, cluster), entry & OFFSET_MASK
            if kind is Kind.NORMAL and entry & COPIED:
                self._check_data_cluster(host, cluster)
                writes.append((host + inside, piece))
                continue
            if kind is Kind.ZERO_ALLOC and entry & COPIED:
                # Our own preallocated cluster: fill it, zeroes around the new bytes.
                self._check_data_cluster(host, cluster)
                writes.append((host, _merged(bytes(cs), inside, piece)))
                new_entries[index] = host | COPIED
                continue
            whole = hi - lo == cs
            needs_cluster.append((index, piece if whole else _merged(self._cluster_content(cluster), inside, piece)))
            if kind in (Kind.NORMAL, Kind.ZERO_ALLOC):
                frees.append((host, cs))
            elif kind is Kind.COMPRESSED:
                frees.append(self.compressed.decode(entry))
        if needs_cluster:
            for (index, content), host in zip(needs_cluster, self.refcounts.allocate(len(needs_cluster)), strict=True):
                writes.append((host, content))
                new_entries[index] = host | COPIED
        self._write_runs(writes)
        if new_entries:
            if self.cache.writethrough:
                self.file.sync()  # the data before the L2 entries that show it
            self._set_entries(table_offset, table, new_entries)
        self._free_later(frees)

    def _check_data_cluster(self, host: int, guest_cluster: int) -> None:
        owner = self.metadata.owner(host >> self.cluster_bits)
        if owner is not None:
            self._corrupt(f"guest cluster {guest_cluster} is mapped onto {owner} at {host:#x}")

    def _write_runs(self, writes: list[tuple[int, object]]) -> None:
        """Write (host offset, bytes) pieces, one system call per run of adjacent pieces."""
        writes.sort(key=lambda w: w[0])
        start, buffers, expected = 0, [], -1
        for host, data in writes:
            if host != expected and buffers:
                self.file.pwritev(start, buffers)
                buffers = []
            if not buffers:
                start = expected = host
            buffers.append(data)
            expected += len(data)
        if buffers:
            self.file.pwritev(start, buffers)

    def _writable_l2(self, l1_index: int) -> tuple[int, array]:
        """The L2 table for an L1 entry, allocated (zeroed) or copied first unless it is ours alone."""
        entry = self.l1[l1_index]
        old = entry & OFFSET_MASK
        if old and entry & COPIED:
            return old, self._l2_table(old)
        table = array("Q", self._l2_table(old)) if old else array("Q", bytes(self.cluster_size))
        new = self.refcounts.allocate(1)[0]
        self.file.pwrite(new, pack_entries(table))
        self.metadata.add(new, self.cluster_size, f"the L2 table of L1 entry {l1_index}")
        self.file.sync()  # the table before the L1 entry naming it
        self.l1[l1_index] = new | COPIED
        self.file.pwrite(self.header.l1_table_offset + l1_index * 8, struct.pack(">Q", new | COPIED))
        self.l2_cache.put(new, table)
        if old:
            self.l2_cache.pop(old)
            self.refcounts.free_later(old, self.cluster_size)
        return new, table

    def _set_entries(self, table_offset: int, table: array, changes: dict[int, int]) -> None:
        for index, entry in changes.items():
            table[index] = entry
        lo, hi = min(changes), max(changes) + 1
        self.file.pwrite(table_offset + lo * 8, pack_entries(table[lo:hi]))

    def _free_later(self, frees: list[tuple[int, int]]) -> None:
        for offset, length in frees:
            self.refcounts.free_later(offset, length)
        if frees:
            self._inflated = (None, b"")

    # -- zeroes and discards -----------------------------------------------

    def _write_zeroes(self, offset: int, length: int, unmap: bool) -> None:
        self._zero(offset, length, "zeroes-unmap" if unmap else "zeroes")

    def _discard(self, offset: int, length: int) -> None:
        self._zero(offset, length, "discard")

    def _zero(self, offset: int, length: int, mode: str) -> None:
        cb, end = self.cluster_bits, offset + length
        whole: list[int] = []
        for cluster in range(offset >> cb, ((end - 1) >> cb) + 1):
            lo, hi = max(offset, cluster << cb), min(end, (cluster + 1) << cb)
            if lo == cluster << cb and hi == min((cluster + 1) << cb, self.size):
                whole.append(cluster)
            elif mode != "discard" and not self._reads_as_zero(cluster, lo):
                self._write(lo, memoryview(bytes(hi - lo)))
        for _, same_table in itertools.groupby(whole, key=lambda c: c // self.l2_entries):
            self._zero_clusters(list(same_table), mode)

    def _reads_as_zero(self, cluster: int, offset: int) -> bool:
        kind = self._kind(self._entry(cluster), cluster)
        if kind is Kind.UNALLOCATED:
            return self.backing is None or offset >= self.backing.size
        return kind in (Kind.ZERO_PLAIN, Kind.ZERO_ALLOC)

    def _zero_clusters(self, clusters: list[int], mode: str) -> None:
        """Zero or discard whole guest clusters that one L2 table maps."""
        changes: dict[int, int] = {}
        frees: list[tuple[int, int]] = []
        write_bytes: list[int] = []
        for cluster in clusters:
            entry = self._entry(cluster)
            outcome = self._zeroed_entry(entry, self._kind(entry, cluster), mode)
            if outcome == _WRITE_BYTES:
                write_bytes.append(cluster)
            elif outcome is not None:
                changes[cluster % self.l2_entries], free = outcome
                if free is not None:
                    frees.append(free)
        if changes:
            table_offset, table = self._writable_l2(clusters[0] // self.l2_entries)
            self._set_entries(table_offset, table, changes)
            self._free_later(frees)
        for cluster in write_bytes:
            start = cluster << self.cluster_bits
            self._write(start, memoryview(bytes(min(self.cluster_size, self.size - start))))

    def _zeroed_entry(self, entry: int, kind: Kind, mode: str):
        """What zeroing (or discarding) a whole cluster does: None (nothing), _WRITE_BYTES, or (entry, free)."""
        host = entry & OFFSET_MASK
        free = None
        if kind is Kind.COMPRESSED:
            free = self.compressed.decode(entry)
        elif kind in (Kind.NORMAL, Kind.ZERO_ALLOC):
            free = (host, self.cluster_size)
        has_backing = self.backing is not None
        if self.header.version >= 3:
            if mode == "zeroes" and free is not None and kind is not Kind.COMPRESSED and entry & COPIED:
                keep = host | COPIED | ZERO   # zero flag, preallocation kept
                return None if entry == keep else (keep, None)
            if kind is Kind.ZERO_PLAIN or (kind is Kind.UNALLOCATED and not has_backing):
                return None
            return ZERO, free
        # Version 2 has no zero flag: only an unallocated entry reads as zeroes, and only without a backing file.
        if kind is Kind.UNALLOCATED and (mode == "discard" or not has_backing):
            return None
        if mode == "discard" or (mode == "zeroes-unmap" and not has_backing):
            return 0, free
        return _WRITE_BYTES

    # -- flush and close ---------------------------------------------------

    def _flush(self) -> None:
        if self.refcounts.sync():
            self.file.sync()

    def _close(self) -> None:
        try:
            if not self.read_only:
                self.refcounts.release_pool()
                self._flush()
        finally:
            self.file.close()
            if self.backing is not None:
                self.backing.close()


def _merged(base, at: int, piece) -> bytearray:
    out = base if isinstance(base, bytearray) else bytearray(base)
    out[at:at + len(piece)] = piece
    return out
