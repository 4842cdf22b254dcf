"""Where pykvm puts its own CPU structures (GDT, TSS, IDT, page tables, stacks).

pykvm's own guests expect them at the contract's addresses (``GUEST_TABLES``,
guests/README.md: GDT 0x1000, TSS 0x2000, page tables from 0x10000, stack
below 0x80000).  A kernel that loads somewhere in that range, or puts its
boot data there, gets them elsewhere: :func:`place_tables` finds a window
of free RAM that overlaps nothing the loader occupies and no reserved range.
A kernel that sets up its own CPU state (Multiboot, PVH) needs none of them.
"""

from __future__ import annotations

from collections.abc import Iterable

from pykvm.errors import LoaderError
from pykvm.platform import layout
from pykvm.x86.modes import TablePlacement

#: The guests' contract (guests/README.md).
GUEST_TABLES = TablePlacement(
    gdt=layout.GDT_ADDR, tss=layout.TSS_ADDR, idt=layout.IDT_ADDR,
    page_tables=layout.PAGE_TABLES_START, page_tables_end=layout.PAGE_TABLES_END,
    kernel_stack_top=layout.KERNEL_STACK_TOP, stack_top=layout.STACK_TOP, real_stack=layout.REAL_MODE_STACK,
)


def _overlaps(ranges: Iterable[tuple[int, int]], start: int, end: int) -> bool:
    return any(a < end and start < b for a, b in ranges)


def place_tables(mode: str, occupied: Iterable[tuple[int, int]], ram: Iterable[tuple[int, int]],
                 reserved: Iterable[tuple[int, int]] = ()) -> TablePlacement:
    """The guests' placement if it is free, else the lowest free window in RAM below 4 GiB.

    ``occupied``: ``(start, end)`` of everything the loader writes;
    ``ram``: ``(base, size)`` regions; ``reserved``: ranges nothing may use.
    Real mode needs only a stack below 1 MiB.  Raises ``LoaderError`` when
    no window fits.
    """
    busy = list(occupied) + list(reserved)
    if not _overlaps(busy, *_span(GUEST_TABLES.ranges(mode))):
        return GUEST_TABLES
    limit = 1 << 20 if mode == "real" else 1 << 32
    size = TablePlacement.WINDOW_SIZE
    for base, length in sorted(ram):
        start = max(base, layout.PAGE_SIZE)  # never page 0
        end = min(base + length, limit)
        candidates = sorted({start} | {(b + 0xFFF) & ~0xFFF for _, b in busy if start <= b < end})
        for at in candidates:
            if at + size <= end and not _overlaps(busy, at, at + size):
                return TablePlacement.window(at)
    raise LoaderError(f"no room for pykvm's {mode} mode tables ({size >> 10} KiB) beside the image in guest RAM")


def _span(ranges: list[tuple[int, int]]) -> tuple[int, int]:
    return min(a for a, _ in ranges), max(b for _, b in ranges)
