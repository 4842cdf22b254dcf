"""Checking a qcow2 image's refcounts against its references (``qemu-img check``, QEMU's qcow2-refcount.c).

Every reference the image holds is counted into an in-memory table: the
header cluster, the active L1 table, its L2 tables and their data clusters
(compressed data counts once for each host cluster it touches), every
snapshot's L1 and L2 tables, the snapshot table, the refcount table and the
refcount blocks.  Then, cluster by cluster, the stored refcount is compared
with the count:

* stored < referenced: **corruption** (a cluster could be allocated twice);
* stored > referenced: a **leak** (wasted space, harmless);

and the COPIED flag of every active L1/L2 entry must say "refcount is 1"
exactly when it is.  Messages use QEMU's wording; exit codes are
qemu-img's: 0 clean, 2 corruptions, 3 leaks only, 1 check not completed.

The checker reads the file on its own (not through :class:`Qcow2Image`) so
that it can examine images the image class refuses to open.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

from pykvm.block.hostfile import HostFile
from pykvm.block.qcow2.header import INCOMPAT_DIRTY, INCOMPATIBLE_FIELD, Header, read_header
from pykvm.block.qcow2.layout import (COPIED, L1_RESERVED, OFFSET_MASK, CompressedDescriptor, Kind, kind_of,
                                      unpack_table)
from pykvm.block.qcow2.refcount import RefcountBlock
from pykvm.block.qcow2.snapshots import read_snapshots
from pykvm.errors import ImageError


@dataclass
class CheckResult:
    """What a check found, in ``qemu-img check``'s terms."""

    filename: str
    corruptions: int = 0
    leaks: int = 0
    check_errors: int = 0
    #: One line per problem, as qemu-img prints them on stderr.
    messages: list[str] = field(default_factory=list)
    total_clusters: int = 0
    allocated_clusters: int = 0
    fragmented_clusters: int = 0
    compressed_clusters: int = 0
    image_end_offset: int = 0
    #: (cluster, stored refcount, references found) for every cluster where they differ.
    mismatches: list[tuple[int, int, int]] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        if self.check_errors:
            return 1
        return 2 if self.corruptions else 3 if self.leaks else 0

    def report(self) -> str:
        """The summary qemu-img prints on stdout."""
        lines = []
        if not (self.corruptions or self.leaks or self.check_errors):
            lines.append("No errors were found on the image.")
        if self.corruptions:
            lines += ["", f"{self.corruptions} errors were found on the image.",
                      "Data may be corrupted, or further writes to the image may corrupt it."]
        if self.leaks:
            lines += ["", f"{self.leaks} leaked clusters were found on the image.",
                      "This means waste of disk space, but no harm to data."]
        if self.check_errors:
            lines += ["", f"{self.check_errors} internal errors have occurred during the check."]
        if self.total_clusters and self.allocated_clusters:
            lines.append(f"{self.allocated_clusters}/{self.total_clusters} = "
                         f"{self.allocated_clusters * 100.0 / self.total_clusters:.2f}% allocated, "
                         f"{self.fragmented_clusters * 100.0 / self.allocated_clusters:.2f}% fragmented, "
                         f"{self.compressed_clusters * 100.0 / self.allocated_clusters:.2f}% compressed clusters")
        if self.image_end_offset:
            lines.append(f"Image end offset: {self.image_end_offset}")
        return "\n".join(lines) + "\n"


def check_qcow2(path: str | os.PathLike) -> CheckResult:
    """Check the qcow2 image at ``path`` (read-only).  Raises ImageError if its header is unusable."""
    with HostFile(path, read_only=True) as file:
        return Checker(file, read_header(file)).run()


class Checker:
    """One pass over an image's metadata (see the module docstring)."""

    def __init__(self, file: HostFile, header: Header) -> None:
        self.file = file
        self.header = header
        self.cluster_bits = header.cluster_bits
        self.cluster_size = header.cluster_size
        self.compressed = CompressedDescriptor(header.cluster_bits)
        self.file_size = file.size()
        self.references = [0] * -(-self.file_size // self.cluster_size)
        self.result = CheckResult(file.path)
        self.per_block = self.cluster_size * 8 // header.refcount_bits
        self._blocks: dict[int, RefcountBlock | None] = {}

    def run(self) -> CheckResult:
        h, r = self.header, self.result
        r.total_clusters = -(-h.size // self.cluster_size)
        self._count(0, self.cluster_size)
        active_l1 = self._check_l1(h.l1_table_offset, h.l1_size, active=True)
        try:
            snapshots, table_bytes = read_snapshots(self.file, h)
        except ImageError as e:
            self._error(f"ERROR: {e}")
            snapshots, table_bytes = [], 0
        for snapshot in snapshots:
            self._check_l1(snapshot.l1_table_offset, snapshot.l1_size, active=False)
        self._count(h.snapshots_offset, table_bytes)
        self._count(h.refcount_table_offset, h.refcount_table_clusters * self.cluster_size)
        self.reftable = unpack_table(self.file.pread(h.refcount_table_offset,
                                                     h.refcount_table_clusters * self.cluster_size))
        self._check_refblocks()
        self._compare()
        self._check_copied_flags(active_l1)
        return r

    # -- counting references -------------------------------------------------

    def _error(self, message: str) -> None:
        self.result.messages.append(message)
        self.result.corruptions += 1

    def _count(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        if offset + length - self.file_size > self.cluster_size:
            self._error(f"ERROR: counting reference for region exceeding the end of the file by one "
                        f"cluster or more: offset {offset:#x} size {length:#x}")
            return
        for cluster in range(offset >> self.cluster_bits, ((offset + length - 1) >> self.cluster_bits) + 1):
            if cluster >= len(self.references):
                self.references.extend([0] * (cluster + 1 - len(self.references)))
            self.references[cluster] += 1

    def _read_table(self, offset: int, length: int):
        data = self.file.pread(offset, length)
        if len(data) < length:
            self.result.messages.append(f"ERROR: table at {offset:#x} is cut short by the end of the file")
            self.result.check_errors += 1
        return unpack_table(data)

    def _check_l1(self, offset: int, size: int, *, active: bool):
        self._count(offset, size * 8)
        l1 = self._read_table(offset, size * 8)
        for entry in l1:
            if entry & L1_RESERVED:
                self._error(f"ERROR found L1 entry with reserved bits set: {entry:x}")
            l2_offset = entry & OFFSET_MASK
            if not l2_offset:
                continue
            self._count(l2_offset, self.cluster_size)
            if l2_offset % self.cluster_size:
                self._error(f"ERROR l2_offset={l2_offset:x}: Table is not cluster aligned; L1 entry corrupted")
            self._check_l2(l2_offset, active)
        return l1

    def _check_l2(self, offset: int, active: bool) -> None:
        r, cs = self.result, self.cluster_size
        next_contiguous = 0
        for entry in self._read_table(offset, cs):
            kind = kind_of(entry)
            if kind is Kind.COMPRESSED:
                data_offset, length = self.compressed.decode(entry)
                if entry & COPIED:
                    self._error(f"ERROR: coffset=0x{data_offset:x}: copied flag must never be set for "
                                f"compressed clusters")
                self._count(data_offset, length)
                if active:
                    r.allocated_clusters += 1
                    r.compressed_clusters += 1
                    r.fragmented_clusters += 1  # compressed clusters are fragmented by nature (QEMU)
            elif kind in (Kind.NORMAL, Kind.ZERO_ALLOC):
                host = entry & OFFSET_MASK
                if host % cs:
                    what = "Data" if kind is Kind.NORMAL else "Preallocated"
                    self._error(f"ERROR offset={host:x}: {what} cluster is not properly aligned; "
                                f"L2 entry corrupted.")
                if active:
                    r.allocated_clusters += 1
                    if next_contiguous and host != next_contiguous:
                        r.fragmented_clusters += 1
                    next_contiguous = host + cs
                self._count(host, cs)

    # -- refcount structures -------------------------------------------------

    def _check_refblocks(self) -> None:
        for index, offset in enumerate(self.reftable):
            cluster = offset >> self.cluster_bits
            if offset % self.cluster_size:
                self._error(f"ERROR refcount block {index} is not cluster aligned; refcount table entry corrupted")
                continue
            if cluster >= len(self.references):
                self._error(f"ERROR refcount block {index} is outside image")
                continue
            if offset:
                self._count(offset, self.cluster_size)
                if self.references[cluster] != 1:
                    self._error(f"ERROR refcount block {index} refcount={self.references[cluster]}")

    def stored_refcount(self, cluster: int) -> int | None:
        """The refcount the image stores for a cluster; None if its refcount block cannot be read."""
        index = cluster // self.per_block
        if index >= len(self.reftable) or not self.reftable[index]:
            return 0
        if index not in self._blocks:
            offset = self.reftable[index]
            data = self.file.pread(offset, self.cluster_size) if offset % self.cluster_size == 0 else b""
            valid = len(data) == self.cluster_size
            self._blocks[index] = RefcountBlock(data, self.header.refcount_order) if valid else None
        block = self._blocks[index]
        return None if block is None else block.get(cluster % self.per_block)

    def _compare(self) -> None:
        r = self.result
        highest = 0
        for cluster, referenced in enumerate(self.references):
            stored = self.stored_refcount(cluster)
            if stored is None:
                r.messages.append(f"Can't get refcount for cluster {cluster}: Input/output error")
                r.check_errors += 1
                continue
            if stored or referenced:
                highest = cluster
            if stored != referenced:
                r.mismatches.append((cluster, stored, referenced))
                if stored < referenced:
                    self._error(f"ERROR cluster {cluster} refcount={stored} reference={referenced}")
                else:
                    r.messages.append(f"Leaked cluster {cluster} refcount={stored} reference={referenced}")
                    r.leaks += 1
        r.image_end_offset = (highest + 1) * self.cluster_size

    def _check_copied_flags(self, l1) -> None:
        for index, entry in enumerate(l1):
            l2_offset = entry & OFFSET_MASK
            if not l2_offset:
                continue
            refcount = self.stored_refcount(l2_offset >> self.cluster_bits)
            if refcount is not None and (refcount == 1) != bool(entry & COPIED):
                self._error(f"ERROR OFLAG_COPIED L2 cluster: l1_index={index} l1_entry={entry:x} "
                            f"refcount={refcount}")
            for l2_entry in unpack_table(self.file.pread(l2_offset, self.cluster_size)):
                if kind_of(l2_entry) in (Kind.NORMAL, Kind.ZERO_ALLOC):
                    refcount = self.stored_refcount((l2_entry & OFFSET_MASK) >> self.cluster_bits)
                    if refcount is not None and (refcount == 1) != bool(l2_entry & COPIED):
                        self._error(f"ERROR OFLAG_COPIED data cluster: l2_entry={l2_entry:x} refcount={refcount}")


def repair_dirty_image(image) -> None:
    """Make a dirty image's refcounts match its references, then clear the dirty bit (QEMU does so on open).

    ``image`` is a :class:`~pykvm.block.qcow2.image.Qcow2Image` being opened
    for writing.  Only refcounts in existing refcount blocks are rewritten;
    an image that needs more (new blocks, fixed L1/L2 entries) is refused.
    """
    result = Checker(image.file, image.header).run()
    try:
        for cluster, _stored, referenced in result.mismatches:
            image.refcounts.set_refcount(cluster, referenced)
        image.refcounts.flush_changes()
    except ImageError as e:
        raise ImageError(f"{image.file.path}: the image is dirty and pykvm cannot repair its refcounts ({e}); "
                         f"run qemu-img check -r all") from None
    image.file.sync()
    after = Checker(image.file, image.header).run()
    if after.exit_code:
        raise ImageError(f"{image.file.path}: the image is dirty and still inconsistent after fixing its "
                         f"refcounts ({after.messages[0] if after.messages else 'check failed'}); "
                         f"run qemu-img check -r all")
    image.header.incompatible_features &= ~INCOMPAT_DIRTY
    image.file.pwrite(INCOMPATIBLE_FIELD, struct.pack(">Q", image.header.incompatible_features))
    image.file.sync()
