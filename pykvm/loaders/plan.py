"""What a loader is told (``MemoryMap``) and what it produces (a ``LoadPlan`` of ``Segment``\\s).

A plan is a pure value: the guest-physical ranges to fill (file ranges of
an ``ImageSource``, or bytes the loader generated: boot information,
``boot_params``, command lines), the CPU state the boot protocol starts in,
the entry point and the registers the protocol defines.  Nothing touches a
VM, so ``check_fits`` can refuse a plan before one byte of guest memory is
written, and loaders are tested without KVM.
"""

from __future__ import annotations

from pykvm.errors import LoaderError
from pykvm.loaders.source import ImageSource
from pykvm.values import Value
from pykvm.x86 import MODES

#: The CPU states a plan can ask for.  pykvm's five modes (it builds the GDT,
#: TSS and page tables for them), and the boot protocols' own states:
#:
#: * ``multiboot32``, ``pvh32``: 32-bit protected mode, paging off, flat
#:   4 GiB code and data segments, no tables (the OS loads its own GDT:
#:   Multiboot 0.6.96 section 3.2; Xen's pvh.pandoc).
#: * ``linux32``: the 32-bit boot protocol (boot.rst "32-bit BOOT PROTOCOL"):
#:   paging off, a GDT with flat ``__BOOT_CS`` = 0x10 and ``__BOOT_DS`` = 0x18.
#: * ``linux64``: the 64-bit boot protocol: long mode, identity-mapped page
#:   tables, ``__BOOT_CS`` a 64-bit code segment, ``__BOOT_DS`` data.
CPU_STATES: tuple[str, ...] = MODES + ("multiboot32", "pvh32", "linux32", "linux64")

_ZEROES = bytes(1 << 20)


def span(start: int, end: int) -> str:
    """``0x100000-0x1fffff`` for the half-open range [start, end)."""
    return f"{start:#x}-{max(start, end - 1):#x}"


class Segment(Value):
    """Guest-physical ``[gpa, gpa + memsize)``: content (file range or ``data``), then zeroes."""

    __slots__ = ("gpa", "memsize", "source", "offset", "filesz", "data", "what")

    def __init__(
        self,
        gpa: int,
        memsize: int,
        source: ImageSource | None = None,   # None: the content is `data`
        offset: int = 0,                     # in source
        filesz: int = 0,                     # bytes taken from source
        data: bytes = b"",                   # generated content (boot info, boot_params, command lines)
        what: str = "",                      # "kernel", "module 1 (initrd.img)", "boot_params": for messages
    ) -> None:
        self.gpa = gpa
        self.memsize = memsize
        self.source = source
        self.offset = offset
        self.filesz = filesz
        self.data = data
        self.what = what
        name = what or "segment"
        if self.source is None and self.filesz:
            raise LoaderError(f"{name}: a file size without a source")
        if self.source is not None and self.data:
            raise LoaderError(f"{name}: both a source and generated data")
        if self.gpa < 0 or self.memsize < 0 or self.filesz < 0 or self.offset < 0:
            raise LoaderError(f"{name}: negative address or size")
        if self.content_size > self.memsize:
            raise LoaderError(f"{name}: {self.content_size:#x} bytes of content exceed its size {self.memsize:#x}")
        if self.source is not None and self.offset + self.filesz > self.source.size:
            raise LoaderError(f"{name}: bytes {self.offset:#x}+{self.filesz:#x} lie beyond the end of "
                              f"{self.source.name}")

    @property
    def end(self) -> int:
        return self.gpa + self.memsize

    @property
    def content_size(self) -> int:
        """Bytes copied before the zero fill."""
        return self.filesz if self.source is not None else len(self.data)

    def describe(self) -> str:
        return f"{self.what or 'segment'} ({span(self.gpa, self.end)}, {self.memsize:#x} bytes)"

    def fill(self, view: memoryview) -> None:
        """Write this segment into ``view``, the guest memory of ``[gpa, gpa + memsize)``."""
        view = memoryview(view).cast("B")
        if len(view) != self.memsize:
            raise LoaderError(f"{self.describe()}: given {len(view):#x} bytes of memory to fill")
        n = self.content_size
        if self.source is not None:
            self.source.readinto(self.offset, view[:n])
        else:
            view[:n] = self.data
        for start in range(n, self.memsize, len(_ZEROES)):  # .bss, in 1 MiB steps (no huge bytes object)
            chunk = min(len(_ZEROES), self.memsize - start)
            view[start:start + chunk] = _ZEROES[:chunk]


def merge_ranges(ranges) -> list[tuple[int, int]]:
    """Sorted, non-overlapping ``(start, end)`` pairs covering the same addresses (adjacent ones joined)."""
    merged: list[list[int]] = []
    for start, end in sorted((s, e) for s, e in ranges if e > s):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


class MemoryMap(Value):
    """What the platform tells a loader about the guest's memory.

    ``ram``: ``(base, size)`` of guest RAM.  ``e820``: ``(base, length,
    type)`` as the firmware would report it (type 1 usable, 2 reserved, ...),
    passed to the kernel as is.  ``reserved``: ``(base, size)`` a loader must
    put nothing in: page 0, the EBDA and BIOS area, the platform's own tables.
    """

    __slots__ = ("ram", "e820", "reserved")

    def __init__(self, ram: tuple[tuple[int, int], ...], e820: tuple[tuple[int, int, int], ...] = (),
                 reserved: tuple[tuple[int, int], ...] = ()) -> None:
        # accept lists; keep the value hashable
        self.ram = tuple(tuple(int(x) for x in item) for item in ram)
        self.e820 = tuple(tuple(int(x) for x in item) for item in e820)
        self.reserved = tuple(tuple(int(x) for x in item) for item in reserved)
        for base, size in self.ram + self.reserved:
            if base < 0 or size < 0 or base + size > 1 << 64:
                raise LoaderError(f"memory map: bad range {base:#x}+{size:#x}")
        for entry in self.e820:
            if (len(entry) != 3 or entry[0] < 0 or entry[1] <= 0 or entry[0] + entry[1] > 1 << 64
                    or not 0 <= entry[2] < 1 << 32):
                raise LoaderError(f"memory map: bad e820 entry {entry}")

    def ram_ranges(self) -> list[tuple[int, int]]:
        """RAM as merged ``(start, end)`` pairs."""
        return merge_ranges((base, base + size) for base, size in self.ram)

    def reserved_ranges(self) -> list[tuple[int, int]]:
        return merge_ranges((base, base + size) for base, size in self.reserved)

    def usable_e820(self) -> list[tuple[int, int]]:
        """The e820 map's usable (type 1) memory as merged ``(start, end)`` pairs."""
        return merge_ranges((base, base + length) for base, length, kind in self.e820 if kind == 1)

    def describe_ram(self) -> str:
        return ", ".join(span(s, e) for s, e in self.ram_ranges()) or "none"


class LoadPlan(Value):
    """How to start an image: what to write where, the CPU state, the entry and its registers."""

    __slots__ = ("format", "cpu", "entry", "regs", "segments", "notes")

    def __init__(
        self,
        format: str,                     # "flat", "elf32", "elf64", "multiboot", "linux", "pvh"
        cpu: str,                        # one of CPU_STATES
        entry: int,
        regs: dict[str, int],            # rax/rbx/rsi/... as the protocol defines them
        segments: tuple[Segment, ...],   # the image, modules, boot data
        notes: str = "",
    ) -> None:
        if cpu not in CPU_STATES:
            raise LoaderError(f"unknown CPU state {cpu!r}")
        self.format = format
        self.cpu = cpu
        self.entry = entry
        self.regs = regs
        self.segments = segments
        self.notes = notes

    def occupied(self) -> list[tuple[int, int]]:
        """``(start, end)`` of every non-empty segment, sorted: the platform puts its tables elsewhere."""
        return sorted((s.gpa, s.end) for s in self.segments if s.memsize)

    def check_fits(self, memory_map: MemoryMap) -> None:
        """LoaderError naming the first segment outside RAM, over a reserved range, or over another."""
        check_fits(self.segments, memory_map)


def check_fits(segments, memory_map: MemoryMap) -> None:
    """Every non-empty segment lies in RAM, outside every reserved range and clear of the others."""
    ram = memory_map.ram_ranges()
    reserved = memory_map.reserved_ranges()
    placed = sorted((s for s in segments if s.memsize), key=lambda s: s.gpa)
    for seg in placed:
        if not any(start <= seg.gpa and seg.end <= end for start, end in ram):
            raise LoaderError(f"{seg.describe()} does not fit in guest RAM ({memory_map.describe_ram()})")
        for start, end in reserved:
            if seg.gpa < end and start < seg.end:
                raise LoaderError(f"{seg.describe()} overlaps the reserved range {span(start, end)}")
    for a, b in zip(placed, placed[1:]):  # sorted by start: any overlap shows between neighbours
        if b.gpa < a.end:
            raise LoaderError(f"{a.describe()} and {b.describe()} overlap")
