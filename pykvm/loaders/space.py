"""Finding room in guest RAM for what a boot protocol adds: modules, initrds, boot data.

Free space is guest RAM minus the platform's reserved ranges, minus page 0
(SMP kernels put their AP trampoline there, and the PVH ABI treats address 0
as "absent"), minus everything the plan already holds.  The loaders place
with two rules:

* ``lowest``: the lowest aligned address at or above a floor (boot data,
  Multiboot modules after the kernel), as QEMU and Firecracker keep boot
  data in low memory and Multiboot modules right after the kernel;
* ``highest``: the highest aligned address whose end is at or below a limit
  (a Linux or PVH initrd, as QEMU does: below ``initrd_addr_max``).

Each claim removes its range; a request that finds no room raises a
LoaderError that names what did not fit.
"""

from __future__ import annotations

from pykvm.errors import LoaderError
from pykvm.loaders.plan import MemoryMap, merge_ranges, span
from pykvm.platform.layout import GiB, PAGE_SIZE

#: Boot data for the 32-bit protocols (and every 32-bit pointer field) lives below this.
BELOW_4G = 4 * GiB


def align_up(value: int, alignment: int) -> int:
    return (value + alignment - 1) // alignment * alignment


def align_down(value: int, alignment: int) -> int:
    return value // alignment * alignment


def subtract(ranges: list[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """``ranges`` (sorted, disjoint) without [start, end)."""
    out = []
    for s, e in ranges:
        if e <= start or end <= s:
            out.append((s, e))
            continue
        if s < start:
            out.append((s, start))
        if end < e:
            out.append((end, e))
    return out


class FreeSpace:
    """Unclaimed guest RAM, as sorted disjoint ``(start, end)`` gaps."""

    def __init__(self, memory_map: MemoryMap, claimed=()) -> None:
        gaps = memory_map.ram_ranges()
        for start, end in memory_map.reserved_ranges() + [(0, PAGE_SIZE)] + merge_ranges(claimed):
            gaps = subtract(gaps, start, end)
        self.gaps = gaps

    def claim(self, start: int, size: int) -> None:
        self.gaps = subtract(self.gaps, start, start + max(size, 1))

    def lowest(self, size: int, what: str, *, align: int = PAGE_SIZE, floor: int = 0,
               limit: int = BELOW_4G) -> int:
        """Claim the lowest ``align``-ed range of ``size`` bytes in [floor, limit); return its start."""
        need = max(size, 1)  # an empty module still gets an address of its own
        for s, e in self.gaps:
            start = align_up(max(s, floor), align)
            if start + need <= min(e, limit):
                self.claim(start, need)
                return start
        raise LoaderError(f"no room for {what} ({size:#x} bytes) in free guest RAM {span(floor, limit)}")

    def highest(self, size: int, what: str, *, align: int = PAGE_SIZE, limit: int = BELOW_4G) -> int:
        """Claim the highest ``align``-ed range of ``size`` bytes ending at or below ``limit``."""
        need = max(size, 1)
        for s, e in reversed(self.gaps):
            start = align_down(min(e, limit) - need, align)
            if start >= s:
                self.claim(start, need)
                return start
        raise LoaderError(f"no room for {what} ({size:#x} bytes) in free guest RAM below {limit:#x}")
