"""Page tables: build them in guest memory, and walk them like the MMU does.

Three x86 paging formats are covered (Intel SDM Vol. 3A chapter 4 "Paging";
AMD APM Vol. 2 chapter 5 "Page Translation and Protection"):

==========  =========================  ==========  ===================  ======
format      levels (root first)        entry size  page sizes           NX bit
==========  =========================  ==========  ===================  ======
``32bit``   PD, PT                     4 bytes     4 KiB, 4 MiB (PSE)   no
``pae``     PDPT (4 entries), PD, PT   8 bytes     4 KiB, 2 MiB         bit 63
``4level``  PML4, PDPT, PD, PT         8 bytes     4 KiB, 2 MiB, 1 GiB  bit 63
==========  =========================  ==========  ===================  ======

Builders never touch memory directly: they call ``write(gpa, data)``, and
the walker calls ``read(gpa, size) -> bytes``; so both work on a KVM guest's
memory, a ``bytearray`` in a test, or anything else.

Building: :func:`build_identity_32bit`, :func:`build_identity_pae` and
:func:`build_identity_4level` identity-map the bottom of the address space
and return the value for CR3.  For arbitrary mappings use a builder
(:class:`PageTables32`, :class:`PageTablesPae`, :class:`PageTables4Level`)
and its :meth:`~PageTableBuilder.map`.

Walking: :func:`walk` returns a :class:`Translation` with every step of the
walk; ``print()`` it to see the chain.  :func:`paging_mode_of` tells which
format CR0/CR4/EFER select.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from pykvm.errors import PageTableError

from . import bits
from .state import format_table

__all__ = [
    "PAGING_MODES",
    "PageTableError",
    "PageTableBuilder",
    "PageTables32",
    "PageTablesPae",
    "PageTables4Level",
    "page_table_builder",
    "build_identity_32bit",
    "build_identity_pae",
    "build_identity_4level",
    "Level",
    "Translation",
    "walk",
    "translate",
    "paging_mode_of",
    "is_canonical",
    "decode_entry",
    "KiB4",
    "MiB2",
    "MiB4",
    "GiB1",
    "GiB4",
]

KiB4 = 4 << 10
MiB2 = 2 << 20
MiB4 = 4 << 20
GiB1 = 1 << 30
GiB4 = 4 << 30

WriteFn = Callable[[int, bytes], Any]
ReadFn = Callable[[int, int], bytes]

#: The values :func:`paging_mode_of` returns and :func:`walk` accepts.
PAGING_MODES = ("none", "32bit", "pae", "4level")


@dataclass(frozen=True)
class _Format:
    """The shape of one paging format."""

    name: str
    levels: tuple[str, ...]  # level names, root first
    shifts: tuple[int, ...]  # lowest linear-address bit each level indexes
    index_bits: tuple[int, ...]  # how many address bits each level indexes
    entry_size: int  # bytes per entry
    large: tuple[int, ...]  # levels (indices) whose entries may map a page (PS=1)
    has_nx: bool

    def page_size(self, level: int) -> int:
        """Bytes one entry at *level* maps."""
        return 1 << self.shifts[level]

    def entries(self, level: int) -> int:
        """Number of entries in a table at *level*."""
        return 1 << self.index_bits[level]

    def index(self, level: int, gva: int) -> int:
        """The entry index *gva* selects at *level*."""
        return (gva >> self.shifts[level]) & (self.entries(level) - 1)

    def page_sizes(self) -> tuple[int, ...]:
        """The page sizes this format can map, smallest first."""
        return tuple(sorted(self.page_size(i) for i in (*self.large, len(self.levels) - 1)))


_FORMATS: dict[str, _Format] = {
    # Intel SDM §4.3: CR3 -> PD (bits 31:22) -> PT (bits 21:12).
    "32bit": _Format("32bit", ("PD", "PT"), (22, 12), (10, 10), 4, (0,), False),
    # Intel SDM §4.4: CR3 -> PDPT (bits 31:30, 4 PDPTEs) -> PD (29:21) -> PT (20:12).
    "pae": _Format("pae", ("PDPT", "PD", "PT"), (30, 21, 12), (2, 9, 9), 8, (1,), True),
    # Intel SDM §4.5: CR3 -> PML4 (47:39) -> PDPT (38:30) -> PD (29:21) -> PT (20:12).
    "4level": _Format("4level", ("PML4", "PDPT", "PD", "PT"), (39, 30, 21, 12), (9, 9, 9, 9), 8, (1, 2), True),
}

# In PAE paging the four PDPTEs have only P, PWT, PCD and the address; bits
# 2:1, 8:5 and 63 are reserved (Intel SDM §4.4.1, Table 4-8).  KVM refuses a
# CR3 whose PDPTEs set them, so builders never do.
_PAE_PDPTE_RESERVED = bits.PTE_RW | bits.PTE_US | (0xF << 5) | bits.PTE_NX


def _size_name(size: int) -> str:
    for unit, name in ((GiB1, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if size >= unit and size % unit == 0:
            return f"{size // unit} {name}"
    return f"{size} bytes"


def is_canonical(gva: int, va_bits: int = 48) -> bool:
    """True if *gva* (a 64-bit value) is canonical for *va_bits*-bit linear
    addresses: bits 63 down to ``va_bits - 1`` all equal (Intel SDM Vol. 1
    §3.3.7.1 "Canonical Addressing")."""
    top = gva >> (va_bits - 1)
    return top == 0 or top == (1 << (65 - va_bits)) - 1


# ---------------------------------------------------------------------------
# Entry decoding
# ---------------------------------------------------------------------------


def decode_entry(entry: int, paging_mode: str, level: int) -> tuple[str, ...]:
    """Names of the bits set in a paging-structure entry.

    The meaning of bits 7 and 12 depends on where the entry is: bit 7 is PS
    in a PD/PDPT entry and PAT in a PT entry; a large-page entry has PAT in
    bit 12.  Not-present entries decode to ``()``: the CPU ignores their
    other bits.
    """
    fmt = _FORMATS[paging_mode]
    if not entry & bits.PTE_P:
        return ()
    names = ["P"]
    if paging_mode == "pae" and level == 0:  # a PDPTE
        pairs = ((bits.PTE_PWT, "PWT"), (bits.PTE_PCD, "PCD"))
        return tuple(names + [n for b, n in pairs if entry & b])
    last = level == len(fmt.levels) - 1
    large = not last and level in fmt.large and bool(entry & bits.PTE_PS)
    pairs_common = (
        (bits.PTE_RW, "RW"), (bits.PTE_US, "US"), (bits.PTE_PWT, "PWT"), (bits.PTE_PCD, "PCD"), (bits.PTE_A, "A")
    )
    names += [n for b, n in pairs_common if entry & b]
    if last or large:
        if entry & bits.PTE_D:
            names.append("D")
        if large:
            names.append("PS")
        if entry & (bits.PTE_PAT_LARGE if large else bits.PTE_PAT):
            names.append("PAT")
        if entry & bits.PTE_G:
            names.append("G")
    elif entry & bits.PTE_PS:
        names.append("PS")  # reserved here: the walk reports it
    if fmt.has_nx and entry & bits.PTE_NX:
        names.append("NX")
    return tuple(names)


# ---------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------


class PageTableBuilder:
    """Builds page tables of one format in guest memory.

    Table pages are taken, 4 KiB at a time, from ``[region_start,
    region_end)`` (``region_end=None``: no bound).  The builder keeps a copy
    of every table it made and writes whole tables through *write* at the
    end of each :meth:`map`, so a new table never contains stale bytes.

    Tables above the leaves are made with P, R/W and U/S all set (PAE's PDPT
    entries: P only, the rest is reserved there), so the leaf entry decides
    a page's permissions.  Use :meth:`update_entry` to change an upper-level
    entry, e.g. to clear U/S there and see that it wins.
    """

    format: ClassVar[_Format]

    def __init__(self, write: WriteFn, region_start: int, region_end: int | None = None) -> None:
        if region_start % KiB4:
            raise PageTableError(f"page-table region start {region_start:#x} is not 4 KiB aligned")
        self._write = write
        self.region_start = region_start
        self.region_end = region_end
        self._next = region_start
        self._tables: dict[int, list[int]] = {}
        self._dirty: set[int] = set()
        self.root = self._alloc(0)
        self.flush()

    # --- public API ---------------------------------------------------------

    @property
    def paging_mode(self) -> str:
        """The format's name: ``"32bit"``, ``"pae"`` or ``"4level"``."""
        return self.format.name

    @property
    def cr3(self) -> int:
        """The value to load into CR3 (the root table's address)."""
        return self.root

    @property
    def region_used(self) -> tuple[int, int]:
        """``(start, end)`` of the table pages allocated so far."""
        return (self.region_start, self._next)

    @property
    def tables(self) -> int:
        """How many table pages have been allocated."""
        return len(self._tables)

    def map(
        self,
        gva: int,
        gpa: int,
        size: int,
        *,
        writable: bool = True,
        user: bool = False,
        nx: bool = False,
        page_size: int = KiB4,
    ) -> None:
        """Map ``[gva, gva+size)`` to ``[gpa, gpa+size)`` with *page_size* pages.

        Addresses and *size* must be multiples of *page_size*.  Mapping a
        page again with the same page size replaces it; mapping across an
        existing page of another size raises :class:`PageTableError` (and
        changes nothing).
        """
        fmt = self.format
        if page_size not in fmt.page_sizes():
            sizes = ", ".join(_size_name(s) for s in fmt.page_sizes())
            raise PageTableError(f"{fmt.name} paging maps {sizes} pages, not {_size_name(page_size)}")
        for name, value in (("gva", gva), ("gpa", gpa), ("size", size)):
            if value < 0 or value % page_size:
                raise PageTableError(f"{name} {value:#x} is not a multiple of the page size {_size_name(page_size)}")
        if size == 0:
            raise PageTableError("cannot map 0 bytes")
        if nx and not fmt.has_nx:
            raise PageTableError("32-bit paging has no NX bit")
        self._check_gva_range(gva, size)
        self._check_gpa_range(gpa, size, page_size)
        leaf = [fmt.page_size(i) for i in range(len(fmt.levels))].index(page_size)
        pages = range(0, size, page_size)
        for offset in pages:  # first check everything, so a conflict changes nothing
            self._check_free(gva + offset, leaf)
        parent_shift = fmt.shifts[leaf - 1] if leaf else 64
        cached_key, table = -1, 0
        for offset in pages:
            key = (gva + offset) >> parent_shift  # pages with one key share a table
            if key != cached_key:
                cached_key, table = key, self._table_for(gva + offset, leaf)
                self._dirty.add(table)
            index = fmt.index(leaf, gva + offset)
            self._tables[table][index] = self._leaf_entry(gpa + offset, leaf, writable, user, nx)
        self.flush()

    def update_entry(self, gva: int, level: str, *, set_bits: int = 0, clear_bits: int = 0) -> int:
        """Change the entry that translates *gva* at *level* (e.g. ``"PD"``).

        ``entry = (entry | set_bits) & ~clear_bits``; the table is written
        back at once.  Returns the new entry.  The tables down to *level*
        must exist (map something there first).
        """
        table, index = self._locate(gva, level)
        entry = (self._tables[table][index] | set_bits) & ~clear_bits
        self._tables[table][index] = entry
        self._dirty.add(table)
        self.flush()
        return entry

    def entry(self, gva: int, level: str) -> int:
        """The current entry translating *gva* at *level* (from the copy)."""
        table, index = self._locate(gva, level)
        return self._tables[table][index]

    def flush(self) -> None:
        """Write every changed table to guest memory."""
        kind = "I" if self.format.entry_size == 4 else "Q"  # u32 or u64, little-endian
        for table in sorted(self._dirty):
            entries = self._tables[table]
            self._write(table, struct.pack(f"<{len(entries)}{kind}", *entries))
        self._dirty.clear()

    # --- internals ----------------------------------------------------------

    def _alloc(self, level: int) -> int:
        address = self._next
        if self.region_end is not None and address + KiB4 > self.region_end:
            raise PageTableError(
                f"page-table region {self.region_start:#x}-{self.region_end:#x} is full "
                f"({len(self._tables)} tables)"
            )
        self._next += KiB4
        self._tables[address] = [0] * self.format.entries(level)
        self._dirty.add(address)
        return address

    def _is_leaf(self, entry: int, level: int) -> bool:
        fmt = self.format
        return level == len(fmt.levels) - 1 or (level in fmt.large and bool(entry & bits.PTE_PS))

    def _table_for(self, gva: int, leaf: int) -> int:
        """The table holding *gva*'s entry at level *leaf*, made if needed."""
        fmt = self.format
        table = self.root
        for level in range(leaf):
            index = fmt.index(level, gva)
            entry = self._tables[table][index]
            if not entry & bits.PTE_P:
                child = self._alloc(level + 1)
                if fmt.name == "pae" and level == 0:
                    entry = child | bits.PTE_P  # PDPTE: no R/W, U/S (reserved)
                else:
                    entry = child | bits.PTE_P | bits.PTE_RW | bits.PTE_US
                self._tables[table][index] = entry
                self._dirty.add(table)
            table = self._next_table(entry)
        return table

    def _check_free(self, gva: int, leaf: int) -> None:
        """Raise if a page of level *leaf* at *gva* conflicts with the tables."""
        fmt = self.format
        table: int | None = self.root
        for level in range(leaf + 1):
            if table is None:
                return
            entry = self._tables[table][fmt.index(level, gva)]
            if not entry & bits.PTE_P:
                return
            leafy = self._is_leaf(entry, level)
            if level < leaf and leafy:
                raise PageTableError(
                    f"gva {gva:#x} is inside a {_size_name(fmt.page_size(level))} page mapped at {fmt.levels[level]}"
                )
            if level == leaf and not leafy:
                raise PageTableError(
                    f"gva {gva:#x}: the {fmt.levels[level]} entry points to a table of smaller pages"
                )
            table = self._next_table(entry) if not leafy else None

    def _locate(self, gva: int, level_name: str) -> tuple[int, int]:
        fmt = self.format
        if level_name not in fmt.levels:
            raise PageTableError(f"{fmt.name} paging has levels {', '.join(fmt.levels)}, not {level_name!r}")
        target = fmt.levels.index(level_name)
        table = self.root
        for level in range(target):
            entry = self._tables[table][fmt.index(level, gva)]
            if not entry & bits.PTE_P or self._is_leaf(entry, level):
                raise PageTableError(f"gva {gva:#x} has no {level_name} table (stops at {fmt.levels[level]})")
            table = self._next_table(entry)
        return table, fmt.index(target, gva)

    def _next_table(self, entry: int) -> int:
        mask = bits.PTE32_ADDR_MASK if self.format.entry_size == 4 else bits.PTE_ADDR_MASK
        return entry & mask

    def _leaf_entry(self, gpa: int, level: int, writable: bool, user: bool, nx: bool) -> int:
        fmt = self.format
        entry = bits.PTE_P
        if writable:
            entry |= bits.PTE_RW
        if user:
            entry |= bits.PTE_US
        if nx:
            entry |= bits.PTE_NX
        if level != len(fmt.levels) - 1:
            entry |= bits.PTE_PS
            if fmt.name == "32bit":  # 4 MiB page: address bits 39:32 go to bits 20:13 (PSE-36)
                return entry | (gpa & bits.PTE32_ADDR_MASK_4M) | ((gpa >> 32) << bits.PTE32_PSE36_SHIFT)
        return entry | gpa

    def _check_gva_range(self, gva: int, size: int) -> None:
        if self.format.name == "4level":
            last = gva + size - 1
            if not (is_canonical(gva) and is_canonical(last)) or (gva >> 47) & 1 != (last >> 47) & 1:
                raise PageTableError(f"gva range {gva:#x}+{size:#x} is not canonical")
            if last >> 64:
                raise PageTableError(f"gva range {gva:#x}+{size:#x} passes 2**64")
        elif gva + size > 1 << 32:
            raise PageTableError(f"gva range {gva:#x}+{size:#x} passes 4 GiB")

    def _check_gpa_range(self, gpa: int, size: int, page_size: int) -> None:
        if self.format.name == "32bit":
            limit = 1 << (40 if page_size == MiB4 else 32)  # PSE-36 reaches 40 bits
        else:
            limit = 1 << 52
        if gpa + size > limit:
            raise PageTableError(f"gpa range {gpa:#x}+{size:#x} is beyond what {self.format.name} entries hold")


class PageTables32(PageTableBuilder):
    """32-bit paging (CR4.PAE=0): 4 KiB pages, or 4 MiB pages with CR4.PSE."""

    format = _FORMATS["32bit"]


class PageTablesPae(PageTableBuilder):
    """PAE paging: 4 KiB and 2 MiB pages, NX.  CR3 points to the 4-entry PDPT."""

    format = _FORMATS["pae"]


class PageTables4Level(PageTableBuilder):
    """4-level paging (long mode): 4 KiB, 2 MiB and 1 GiB pages, NX."""

    format = _FORMATS["4level"]


_BUILDERS: dict[str, type[PageTableBuilder]] = {
    "32bit": PageTables32,
    "pae": PageTablesPae,
    "4level": PageTables4Level,
}


def page_table_builder(
    paging_mode: str, write: WriteFn, region_start: int, region_end: int | None = None
) -> PageTableBuilder:
    """A builder for *paging_mode* (``"32bit"``, ``"pae"`` or ``"4level"``)."""
    try:
        cls = _BUILDERS[paging_mode]
    except KeyError:
        raise ValueError(f"no page tables for paging mode {paging_mode!r}") from None
    return cls(write, region_start, region_end)


def build_identity_32bit(
    write: WriteFn, base_gpa: int, size: int = GiB4, page_size: int = MiB4, user: bool = False
) -> int:
    """Identity-map ``[0, size)`` with 32-bit paging; return CR3.

    With 4 MiB pages (needs CR4.PSE) the whole 4 GiB takes one 4 KiB page
    directory; with 4 KiB pages it takes 4 MiB + 4 KiB of tables.
    """
    builder = PageTables32(write, base_gpa)
    builder.map(0, 0, size, writable=True, user=user, page_size=page_size)
    return builder.cr3


def build_identity_pae(
    write: WriteFn, base_gpa: int, size: int = GiB4, page_size: int = MiB2, user: bool = False
) -> int:
    """Identity-map ``[0, size)`` with PAE paging; return CR3.

    With 2 MiB pages, 4 GiB takes a PDPT page and four page directories.
    """
    builder = PageTablesPae(write, base_gpa)
    builder.map(0, 0, size, writable=True, user=user, page_size=page_size)
    return builder.cr3


def build_identity_4level(
    write: WriteFn, base_gpa: int, size: int = GiB4, page_size: int = MiB2, user: bool = False
) -> int:
    """Identity-map ``[0, size)`` with 4-level paging; return CR3.

    With 2 MiB pages 4 GiB takes 6 table pages (PML4, PDPT, 4 PDs); with
    1 GiB pages, 2 (PML4, PDPT).  1 GiB pages need CPUID.80000001H:EDX
    bit 26 (Page1GB) in the guest's CPUID.
    """
    builder = PageTables4Level(write, base_gpa)
    builder.map(0, 0, size, writable=True, user=user, page_size=page_size)
    return builder.cr3


# ---------------------------------------------------------------------------
# The walker
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Level:
    """One step of a page walk: the entry read at one level.

    Attributes:
        name: ``PML4``, ``PDPT``, ``PD`` or ``PT``.
        table: guest-physical address of the table.
        index: which entry of the table the address selected.
        entry: the entry's value.
        entry_size: 4 or 8 bytes.
        flags: the entry's set bits by name (``P``, ``RW``, ``US``, ...).
        target: the next table, or the page frame for a leaf; ``None`` if
            the entry is not present.
        leaf: whether this entry maps a page.
    """

    name: str
    table: int
    index: int
    entry: int
    entry_size: int
    flags: tuple[str, ...]
    target: int | None
    leaf: bool

    @property
    def address(self) -> int:
        """Guest-physical address of the entry itself."""
        return self.table + self.index * self.entry_size


@dataclass(frozen=True)
class Translation:
    """The result of walking the page tables for one linear address.

    ``gpa`` is ``None`` when the walk faulted; ``fault`` then says why and
    ``fault_level`` names the level where it stopped (``None`` for a
    non-canonical address, which faults before any table is read).
    ``writable`` and ``user`` are the AND, ``nx`` the OR, of the bits of
    every level of the walk (Intel SDM §4.6 "Access Rights"); all three
    are ``False`` when the walk faulted.
    """

    gva: int
    gpa: int | None
    paging_mode: str
    cr3: int
    page_size: int | None
    writable: bool
    user: bool
    nx: bool
    levels: tuple[Level, ...] = ()
    fault: str | None = None
    fault_level: str | None = None

    @property
    def valid(self) -> bool:
        """True if the address translated."""
        return self.gpa is not None

    def permits(self, *, write: bool = False, user: bool = False, execute: bool = False, wp: bool = True) -> bool:
        """Whether an access of this kind would succeed.

        *user* is an access from CPL 3; *wp* is CR0.WP (when clear,
        supervisor writes ignore R/W).  SMEP, SMAP and protection keys are
        not modelled.
        """
        if self.gpa is None:
            return False
        if user and not self.user:
            return False
        if write and not self.writable and (user or wp):
            return False
        return not (execute and self.nx)

    def __str__(self) -> str:
        width = 16 if self.paging_mode == "4level" else 8
        head = f"{self.paging_mode} walk of {self.gva:#0{width + 2}x} (CR3 {self.cr3:#x})"
        if not self.levels and self.paging_mode == "none":
            return f"{head}\n=> gpa {self.gpa:#x} (paging off: linear = physical)"
        rows = []
        for step in self.levels:
            if step.target is None:
                points = "not present"
            elif step.leaf:
                points = f"page {step.target:#x}"
            else:
                points = f"table {step.target:#x}"
            rows.append(
                [step.name, f"{step.table:#x}", step.index, f"{step.entry:#0{2 * step.entry_size + 2}x}",
                 " ".join(step.flags), points]
            )
        lines = [head]
        if rows:
            lines.append(format_table(["level", "table", "index", "entry", "flags", "->"], rows))
        if self.gpa is None:
            lines.append(f"=> fault: {self.fault}")
        else:
            access = ", ".join([
                "writable" if self.writable else "read-only",
                "user" if self.user else "supervisor",
                "no-execute" if self.nx else "executable",
            ])
            size = _size_name(self.page_size) if self.page_size else "?"
            lines.append(f"=> gpa {self.gpa:#x} ({size} page; {access})")
        return "\n".join(lines)


def paging_mode_of(cr0: int, cr4: int, efer: int) -> str:
    """The paging format CR0, CR4 and EFER select (Intel SDM §4.1.1).

    ``"none"`` (CR0.PG=0), ``"32bit"``, ``"pae"`` or ``"4level"``; with
    CR4.LA57 it returns ``"5level"``, which :func:`walk` does not handle.
    """
    if not cr0 & bits.CR0_PG:
        return "none"
    if not cr4 & bits.CR4_PAE:
        return "32bit"
    if efer & bits.EFER_LME:
        return "5level" if cr4 & bits.CR4_LA57 else "4level"
    return "pae"


def _u(data: bytes) -> int:
    return int.from_bytes(data, "little")


def walk(
    read: ReadFn, cr3: int, gva: int, paging_mode: str, *, nxe: bool = True, pse: bool = True
) -> Translation:
    """Translate *gva* by reading the page tables as the MMU would.

    *read(gpa, size)* returns guest memory.  *nxe* is EFER.NXE (when false,
    a set bit 63 is a reserved-bit fault); *pse* is CR4.PSE (32-bit paging
    only: whether PS=1 in a PDE means a 4 MiB page).  Checks: present bits,
    canonical form, PS where it is reserved, PAE PDPTE reserved bits.
    Reserved physical-address bits above MAXPHYADDR are not checked.
    """
    if paging_mode == "none":
        return Translation(gva, gva, "none", cr3, None, True, True, False)
    if paging_mode not in _FORMATS:
        raise ValueError(f"cannot walk paging mode {paging_mode!r}; expected one of {', '.join(PAGING_MODES)}")
    fmt = _FORMATS[paging_mode]

    def fault(reason: str, level: str | None, steps: list[Level]) -> Translation:
        return Translation(gva, None, paging_mode, cr3, None, False, False, False, tuple(steps), reason, level)

    if paging_mode == "4level":
        if not 0 <= gva < 1 << 64 or not is_canonical(gva):
            return fault(f"{gva:#x} is not canonical (bits 63:47 differ)", None, [])
        table = cr3 & bits.PTE_ADDR_MASK
    else:
        if not 0 <= gva < 1 << 32:
            return fault(f"{gva:#x} does not fit 32-bit linear addresses", None, [])
        table = cr3 & (bits.CR3_PAE_ADDR_MASK if paging_mode == "pae" else bits.PTE32_ADDR_MASK)

    writable = user = True
    nx = False
    steps: list[Level] = []
    last = len(fmt.levels) - 1
    for level, name in enumerate(fmt.levels):
        index = fmt.index(level, gva)
        entry = _u(read(table + index * fmt.entry_size, fmt.entry_size))
        present = bool(entry & bits.PTE_P)
        ps = bool(entry & bits.PTE_PS) and level != last
        large = ps and level in fmt.large and (pse or paging_mode != "32bit")
        leaf = present and (level == last or large)
        page_size = fmt.page_size(level)
        if not present:
            target = None
        elif paging_mode == "32bit" and large:
            target = (entry & bits.PTE32_ADDR_MASK_4M) | (
                ((entry & bits.PTE32_PSE36_MASK) >> bits.PTE32_PSE36_SHIFT) << 32
            )
        elif paging_mode == "32bit":
            target = entry & bits.PTE32_ADDR_MASK
        elif leaf:
            target = entry & bits.PTE_ADDR_MASK & ~(page_size - 1)
        else:
            target = entry & bits.PTE_ADDR_MASK
        steps.append(Level(name, table, index, entry, fmt.entry_size, decode_entry(entry, paging_mode, level),
                           target, leaf))
        where = f"{name} entry {index} (at {table + index * fmt.entry_size:#x})"
        if not present:
            return fault(f"{where} is not present", name, steps)
        if paging_mode == "pae" and level == 0:
            if entry & _PAE_PDPTE_RESERVED:
                return fault(f"{where} sets reserved bits {entry & _PAE_PDPTE_RESERVED:#x}", name, steps)
        else:
            writable = writable and bool(entry & bits.PTE_RW)
            user = user and bool(entry & bits.PTE_US)
        if ps and level not in fmt.large and paging_mode != "pae":
            return fault(f"{where} sets PS, which is reserved at this level", name, steps)
        if fmt.has_nx and entry & bits.PTE_NX:
            if not nxe:
                return fault(f"{where} sets bit 63 (NX) but EFER.NXE is 0", name, steps)
            nx = True
        if leaf:
            assert target is not None
            gpa = target | (gva & (page_size - 1))
            return Translation(gva, gpa, paging_mode, cr3, page_size, writable, user, nx, tuple(steps))
        assert target is not None
        table = target
    raise AssertionError("unreachable: the last level is always a leaf")


def translate(read: ReadFn, sregs: Any, gva: int) -> Translation:
    """Walk *gva* with the paging state of a ``struct kvm_sregs``-like object
    (CR0, CR3, CR4, EFER)."""
    mode = paging_mode_of(sregs.cr0, sregs.cr4, sregs.efer)
    return walk(
        read, sregs.cr3, gva, mode,
        nxe=bool(sregs.efer & bits.EFER_NXE), pse=bool(sregs.cr4 & bits.CR4_PSE),
    )
