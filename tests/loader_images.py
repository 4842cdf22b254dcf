"""Synthetic kernels for the loader tests, and a way to read what a plan puts in guest memory.

Builders: ``make_elf`` (ELF32/ELF64 with PT_LOADs and notes), ``multiboot_header``,
``make_aout_kernel`` (Multiboot with the a.out kludge), ``make_multiboot_elf``,
``make_bzimage`` (a Linux setup header of any protocol version), ``make_pvh_elf``.
``GuestView`` fills a plan's segments into buffers and reads guest-physical
addresses back, as the guest would see them.
"""

from __future__ import annotations

import struct

import pytest

from pykvm.errors import LoaderError
from pykvm.loaders import ImageSource, LoadPlan, MemoryMap, plan_image
from pykvm.platform import layout

MiB = 1 << 20
MB_MAGIC = 0x1BADB002
MB_AOUT = 1 << 16


def pc_memory_map(memory_size: int = 64 * MiB, reserved=()) -> MemoryMap:
    """A PC's map as the platform gives it: page 0, the EBDA and the BIOS area reserved."""
    return MemoryMap(
        ram=tuple(layout.ram_regions(memory_size)),
        e820=tuple(layout.e820_map(memory_size)),
        reserved=((0, layout.PAGE_SIZE), (layout.EBDA_ADDR, layout.BIOS_AREA_END - layout.EBDA_ADDR))
        + tuple(reserved),
    )


def source(data: bytes, name: str = "kernel.img") -> ImageSource:
    return ImageSource.from_bytes(data, name)


# -- ELF ------------------------------------------------------------------------------
def make_elf(loads, *, entry: int, bits: int = 64, notes=(), machine: int | None = None,
             note_align: int = 4) -> bytes:
    """``loads``: (paddr, vaddr, data, memsz) each; ``notes``: (name, type, desc) each."""
    ehsize, phsize = (64, 56) if bits == 64 else (52, 32)
    machine = machine if machine is not None else (62 if bits == 64 else 3)
    phnum = len(loads) + (1 if notes else 0)
    data_at = ehsize + phnum * phsize
    body, phdrs = b"", []
    for paddr, vaddr, data, memsz in loads:
        phdrs.append((1, data_at + len(body), vaddr, paddr, len(data), memsz, 0x1000))
        body += data
    if notes:
        blob = b""
        for name, kind, desc in notes:
            name_z = name + b"\0"
            blob += struct.pack("<III", len(name_z), len(desc), kind)
            blob += name_z + bytes(-len(name_z) % note_align) + desc + bytes(-len(desc) % note_align)
        phdrs.append((4, data_at + len(body), 0, 0, len(blob), len(blob), note_align))
        body += blob
    if bits == 64:
        ehdr = struct.pack("<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, bytes(7), 2, machine, 1,
                           entry, ehsize, 0, 0, ehsize, phsize, phnum, 0, 0, 0)
        table = b"".join(struct.pack("<IIQQQQQQ", t, 5, off, va, pa, fs, ms, al)
                         for t, off, va, pa, fs, ms, al in phdrs)
    else:
        ehdr = struct.pack("<4sBBBBB7sHHIIIIIHHHHHH", b"\x7fELF", 1, 1, 1, 0, 0, bytes(7), 2, machine, 1,
                           entry, ehsize, 0, 0, ehsize, phsize, phnum, 0, 0, 0)
        table = b"".join(struct.pack("<IIIIIIII", t, off, va, pa, fs, ms, 5, al)
                         for t, off, va, pa, fs, ms, al in phdrs)
    return ehdr + table + body


# -- Multiboot --------------------------------------------------------------------------
def multiboot_header(flags: int, aout: tuple[int, int, int, int, int] | None = None) -> bytes:
    header = struct.pack("<III", MB_MAGIC, flags, (-(MB_MAGIC + flags)) & 0xFFFFFFFF)
    return header + (struct.pack("<IIIII", *aout) if aout is not None else b"")


def make_aout_kernel(*, load_addr: int = 0x100000, code: bytes = b"\x90" * 200 + b"\xf4",
                     bss: int = 0x2000, header_offset: int = 8, flags: int = MB_AOUT) -> bytes:
    """A file that is loaded whole at ``load_addr``: padding, the header (32 bytes), the code."""
    size = header_offset + 32 + len(code)
    header_addr = load_addr + header_offset
    aout = (header_addr, load_addr, load_addr + size, load_addr + size + bss, header_addr + 32)
    return bytes(header_offset) + multiboot_header(flags | MB_AOUT, aout) + code


def make_multiboot_elf(*, bits: int = 32, paddr: int = 0x200000, vaddr: int = 0xC0200000, flags: int = 0,
                       bss: int = 0x3000, notes=()) -> bytes:
    """An ELF kernel with a Multiboot header (no a.out kludge) at the start of its text."""
    text = multiboot_header(flags) + b"\x90" * 100 + b"\xf4"
    data = b"DATA" * 64
    loads = [(paddr, vaddr, text, len(text)), (paddr + 0x1000, vaddr + 0x1000, data, len(data) + bss)]
    return make_elf(loads, entry=vaddr + 12, bits=bits, notes=notes)


# -- Linux --------------------------------------------------------------------------------
def make_bzimage(*, version: int = 0x20F, setup_sects: int = 4, loadflags: int = 0x01, xloadflags: int = 0x01,
                 relocatable: int = 1, kernel_alignment: int = 0x200000, pref_address: int = 0x1000000,
                 init_size: int = 0x400000, cmdline_size: int = 2047, initrd_addr_max: int = 0x7FFFFFFF,
                 payload: bytes = b"\x90" * 0x3000 + b"\xf4", syssize: int | None = None,
                 header_end: int = 0x26C) -> bytes:
    """A bzImage: (setup_sects or 4) + 1 sectors of setup with the header at 0x1F1, then ``payload``."""
    setup = bytearray(((setup_sects or 4) + 1) * 512)
    setup[0x1F1] = setup_sects
    struct.pack_into("<I", setup, 0x1F4, (len(payload) + 15) // 16 if syssize is None else syssize)
    struct.pack_into("<H", setup, 0x1FA, 0xFFFF)                 # vid_mode "normal"
    setup[0x1FE:0x200] = b"\x55\xaa"
    setup[0x200:0x202] = bytes([0xEB, header_end - 0x202])      # jmp over the header
    setup[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", setup, 0x206, version)
    setup[0x211] = loadflags
    struct.pack_into("<I", setup, 0x214, 0x100000)               # code32_start
    struct.pack_into("<IIBBHI", setup, 0x22C, initrd_addr_max, kernel_alignment, relocatable, 0,
                     xloadflags, cmdline_size)
    struct.pack_into("<QI", setup, 0x258, pref_address, init_size)
    setup[header_end:header_end + 4] = b"CODE"                  # setup code after the header
    return bytes(setup) + payload


# -- PVH ------------------------------------------------------------------------------------
def make_pvh_elf(*, bits: int = 64, paddr: int = 0x1000000, entry_offset: int = 0x40, desc_size: int = 8,
                 entry: int | None = None, multiboot: bool = False) -> bytes:
    """A vmlinux-like ELF: text at ``paddr`` (virtual 0xffffffff81000000) and a Xen PHYS32_ENTRY note."""
    vaddr = 0xFFFFFFFF81000000 if bits == 64 else 0xC1000000
    text = (multiboot_header(0) if multiboot else b"") + b"\x90" * 0x200
    entry = paddr + entry_offset if entry is None else entry
    notes = [(b"GNU", 3, b"\x01" * 20), (b"Xen", 18, entry.to_bytes(8, "little")[:desc_size])]
    loads = [(paddr, vaddr, text, 0x2000)]
    return make_elf(loads, entry=vaddr, bits=bits, notes=notes)


# -- reading guest memory back ---------------------------------------------------------------
class GuestView:
    """Guest-physical reads of what ``plan`` writes (each segment filled on first use)."""

    def __init__(self, plan: LoadPlan) -> None:
        self.plan = plan
        self._filled: dict[int, bytearray] = {}

    def read(self, gpa: int, n: int) -> bytes:
        for i, seg in enumerate(self.plan.segments):
            if seg.gpa <= gpa and gpa + n <= seg.end:
                if i not in self._filled:
                    buf = bytearray(seg.memsize)
                    seg.fill(memoryview(buf))
                    self._filled[i] = buf
                return bytes(self._filled[i][gpa - seg.gpa:gpa - seg.gpa + n])
        raise AssertionError(f"no segment holds {gpa:#x}+{n}")

    def u8(self, gpa: int) -> int:
        return self.read(gpa, 1)[0]

    def u16(self, gpa: int) -> int:
        return struct.unpack("<H", self.read(gpa, 2))[0]

    def u32(self, gpa: int) -> int:
        return struct.unpack("<I", self.read(gpa, 4))[0]

    def u64(self, gpa: int) -> int:
        return struct.unpack("<Q", self.read(gpa, 8))[0]

    def cstr(self, gpa: int) -> bytes:
        for seg in self.plan.segments:
            if seg.gpa <= gpa < seg.end:
                data = self.read(gpa, seg.end - gpa)
                assert b"\0" in data, f"unterminated string at {gpa:#x}"
                return data[:data.index(b"\0")]
        raise AssertionError(f"no segment holds {gpa:#x}")


def refused(cases):
    """``cases`` of (image, message) as pytest parameters named after their messages."""
    return pytest.mark.parametrize("image, message", cases, ids=[message[:30] for _, message in cases])


def assert_refused(image: bytes, message: str, memory_map: MemoryMap | None = None, **kwargs) -> None:
    """plan_image refuses ``image`` with a one-line LoaderError matching ``message``."""
    with pytest.raises(LoaderError, match=message) as info:
        plan_image(source(image), memory_map=memory_map or pc_memory_map(), **kwargs)
    assert "\n" not in str(info.value)


def assert_placement_rules(plan: LoadPlan, memory_map: MemoryMap) -> None:
    """Nothing in page 0, nothing overlapping, everything in RAM and outside the reserved ranges."""
    plan.check_fits(memory_map)
    occupied = plan.occupied()
    assert all(start >= layout.PAGE_SIZE for start, _ in occupied), occupied
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(occupied, occupied[1:])), occupied
