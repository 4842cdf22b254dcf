"""Multiboot v1 kernels (Multiboot Specification 0.6.96, section 3), as QEMU's -kernel and GRUB boot them.

3.1 The header: magic 0x1BADB002, flags, checksum (the three sum to 0 mod
2^32), 4-byte aligned within the first 8192 bytes.  Flags bits 0-15 are
requirements a loader must meet or refuse the kernel: bit 0 page-aligned
modules and bit 1 memory information (both always given here), bit 2 a
video mode (pykvm has no framebuffer: it boots anyway and says so in the
plan's notes, as QEMU prints "multiboot knows VBE. we don't."); any other
bit is refused.  With bit 16 (the "a.out kludge") the header's
header_addr/load_addr/load_end_addr/bss_end_addr/entry_addr say where the
kernel goes; otherwise the kernel must be ELF, loaded by its PT_LOADs.
GRUB's ELF64 kernels are accepted too (QEMU refuses them) when every
segment and the entry lie below 4 GiB.

3.2 Machine state: 32-bit protected mode, paging off, flat segments,
EAX = 0x2BADB002, EBX = the information structure's physical address
(cpu ``multiboot32``).

3.3 Boot information: flags; mem_lower/mem_upper (KiB of usable memory at 0
and at 1 MiB, from the e820 map); no boot_device; the command line, whose
first word is the kernel's path as QEMU passes it; mods_count/mods_addr
(16-byte entries: mod_start, mod_end, string, reserved); the memory map
(entries of size = 20, base_addr, length, type); boot_loader_name "pykvm".

Placement (see ``space.py``):

* the kernel where its header or ELF program headers say;
* modules in order, each at the lowest page-aligned free address at or
  above the kernel's end (with its bss), as QEMU puts them;
* the information block (structure, module list, memory map, strings) at
  the lowest page-aligned free address, which is low memory outside page 0.

Everything Multiboot points at is 32-bit, so all of it lies below 4 GiB.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from pykvm.errors import LoaderError
from pykvm.loaders.bootdata import BootBlock, Module, c_string, module_pairs
from pykvm.loaders.elf import is_elf, read_elf
from pykvm.loaders.plan import LoadPlan, MemoryMap, Segment, check_fits, span
from pykvm.loaders.source import ImageSource
from pykvm.loaders.space import BELOW_4G, FreeSpace, align_up
from pykvm.platform.layout import KiB, MiB, PAGE_SIZE
from pykvm.values import Value

HEADER_MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002
SEARCH_LIMIT = 8192

# header flags (3.1.2)
HEADER_PAGE_ALIGN = 1 << 0
HEADER_MEMORY_INFO = 1 << 1
HEADER_VIDEO_MODE = 1 << 2
HEADER_AOUT_KLUDGE = 1 << 16
REQUIRED_BITS = 0xFFFF
UNDERSTOOD_BITS = HEADER_PAGE_ALIGN | HEADER_MEMORY_INFO | HEADER_VIDEO_MODE

# multiboot_info flags (3.3)
INFO_MEMORY = 1 << 0
INFO_BOOT_DEVICE = 1 << 1
INFO_CMDLINE = 1 << 2
INFO_MODS = 1 << 3
INFO_MMAP = 1 << 6
INFO_LOADER_NAME = 1 << 9

INFO_SIZE = 116             # through the framebuffer fields (flags bit 12), all left zero
MODULE_ENTRY = struct.Struct("<IIII")   # mod_start, mod_end, string, reserved
MMAP_ENTRY = struct.Struct("<IQQI")     # size (20: what follows it), base_addr, length, type
LOADER_NAME = "pykvm"
LOWER_MEMORY_MAX = 640 * KiB


class MultibootHeader(Value):
    __slots__ = ("offset", "flags", "aout")

    def __init__(self, offset: int, flags: int, aout: tuple[int, int, int, int, int] | None) -> None:
        self.offset = offset  # in the file
        self.flags = flags
        self.aout = aout  # header_addr, load_addr, load_end_addr, bss_end_addr, entry_addr


def find_header(head: bytes) -> tuple[int, int] | None:
    """``(file offset, flags)`` of the first valid Multiboot header in ``head`` (the file's first 8 KiB)."""
    limit = min(len(head), SEARCH_LIMIT)
    for offset in range(0, limit - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", head, offset)
        if magic == HEADER_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return offset, flags
    return None


def read_header(source: ImageSource, head: bytes) -> MultibootHeader:
    found = find_header(head)
    if found is None:
        raise LoaderError(f"{source.name}: no Multiboot header in the first 8 KiB")
    offset, flags = found
    unknown = flags & REQUIRED_BITS & ~UNDERSTOOD_BITS
    if unknown:
        raise LoaderError(f"{source.name}: the Multiboot header requires features pykvm does not provide "
                          f"(flags {unknown:#x})")
    aout = None
    if flags & HEADER_AOUT_KLUDGE:
        if offset + 32 > source.size:
            raise LoaderError(f"{source.name}: the Multiboot a.out fields at file offset {offset + 12:#x} "
                              "run past the end of the file")
        aout = struct.unpack("<IIIII", source.read(offset + 12, 20))
    return MultibootHeader(offset, flags, aout)


def aout_kernel(source: ImageSource, header: MultibootHeader) -> tuple[Segment, int]:
    """The kernel as the a.out kludge describes it (3.1.3): its segment and entry; every inconsistency refused."""
    name = source.name
    header_addr, load_addr, load_end, bss_end, entry = header.aout
    if load_addr > header_addr:
        raise LoaderError(f"{name}: Multiboot load_addr {load_addr:#x} is above header_addr {header_addr:#x}")
    if header_addr - load_addr > header.offset:
        raise LoaderError(f"{name}: Multiboot header_addr - load_addr ({header_addr - load_addr:#x}) is more "
                          f"than the header's file offset {header.offset:#x}")
    text_offset = header.offset - (header_addr - load_addr)
    if load_end:
        if load_end < load_addr:
            raise LoaderError(f"{name}: Multiboot load_end_addr {load_end:#x} is below load_addr {load_addr:#x}")
        load_size = load_end - load_addr
        if text_offset + load_size > source.size:
            raise LoaderError(f"{name}: Multiboot load_end_addr {load_end:#x} asks for {load_size:#x} bytes from "
                              f"file offset {text_offset:#x}, past the end of the file ({source.size:#x} bytes)")
    else:  # 0: text and data run to the end of the file
        load_size = source.size - text_offset
    if load_addr + load_size > BELOW_4G:
        raise LoaderError(f"{name}: the Multiboot kernel ({load_size:#x} bytes at {load_addr:#x}) "
                          "runs past 4 GiB")
    memsize = load_size
    if bss_end:
        if bss_end < load_addr + load_size:
            raise LoaderError(f"{name}: Multiboot bss_end_addr {bss_end:#x} is below the end of the loaded "
                              f"image {load_addr + load_size:#x}")
        memsize = bss_end - load_addr
    if not load_addr <= entry < load_addr + load_size:
        raise LoaderError(f"{name}: Multiboot entry_addr {entry:#x} is outside the loaded image "
                          f"{span(load_addr, load_addr + load_size)}")
    return Segment(load_addr, memsize, source, text_offset, load_size, what="kernel"), entry


def elf_kernel(source: ImageSource) -> tuple[tuple[Segment, ...], int]:
    """A Multiboot ELF kernel's PT_LOADs and physical entry, all below 4 GiB (it starts in 32-bit mode)."""
    elf = read_elf(source)
    entry = elf.entry_physical()
    if elf.end() > BELOW_4G or entry >= BELOW_4G:
        raise LoaderError(f"{source.name}: a Multiboot kernel starts in 32-bit mode, but this ELF{elf.bits} "
                          f"image loads at {span(elf.loads[0].paddr, elf.end())}, past 4 GiB")
    return elf.segments(), entry


def memory_sizes(memory_map: MemoryMap) -> tuple[int, int]:
    """mem_lower, mem_upper in KiB: usable memory from 0 (at most 640 KiB) and from 1 MiB to its first hole.

    Usable means e820 type 1; without an e820 map, RAM.
    """
    lower = upper = 0
    for start, end in memory_map.usable_e820() if memory_map.e820 else memory_map.ram_ranges():
        if start == 0:
            lower = min(end, LOWER_MEMORY_MAX) // KiB
        if start <= MiB < end:
            upper = min((end - MiB) // KiB, 0xFFFFFFFF)
    return lower, upper


def info_block(memory_map: MemoryMap, space: FreeSpace, command_line: str,
               modules: list[tuple[Segment, str]]) -> Segment:
    """The information structure (at the block's start), module list, memory map and strings, placed."""
    block = BootBlock("multiboot info")
    info_at = block.reserve(INFO_SIZE)
    mods_at = block.reserve(MODULE_ENTRY.size * len(modules))
    mmap = b"".join(MMAP_ENTRY.pack(MMAP_ENTRY.size - 4, base, length, kind)
                    for base, length, kind in memory_map.e820)
    mmap_at = block.add(mmap)
    cmdline_at = block.add(c_string(command_line, "the command line"), 1)
    strings_at = [block.add(c_string(string, f"the string of module {i}"), 1)
                  for i, (_, string) in enumerate(modules, 1)]
    loader_at = block.add(c_string(LOADER_NAME, "the boot loader name"), 1)
    base = space.lowest(block.size, "the Multiboot information")

    for i, ((seg, _), string_at) in enumerate(zip(modules, strings_at)):
        block.put(mods_at + i * MODULE_ENTRY.size, MODULE_ENTRY.pack(seg.gpa, seg.end, base + string_at, 0))
    info = bytearray(INFO_SIZE)
    flags = INFO_MEMORY | INFO_CMDLINE | INFO_MODS | INFO_LOADER_NAME | (INFO_MMAP if mmap else 0)
    struct.pack_into("<III", info, 0, flags, *memory_sizes(memory_map))
    struct.pack_into("<III", info, 16, base + cmdline_at, len(modules), base + mods_at if modules else 0)
    struct.pack_into("<II", info, 44, len(mmap), base + mmap_at)
    struct.pack_into("<I", info, 64, base + loader_at)
    block.put(info_at, bytes(info))
    return block.segment(base)


def plan_multiboot(source: ImageSource, head: bytes, *, memory_map: MemoryMap, cmdline: str = "",
                   modules: Sequence[Module] = (), kernel_name: str | None = None) -> LoadPlan:
    header = read_header(source, head)
    if header.aout is not None:
        segment, entry = aout_kernel(source, header)
        kernel = (segment,)
    elif is_elf(head):
        kernel, entry = elf_kernel(source)
    else:
        raise LoaderError(f"{source.name}: a Multiboot kernel without the a.out kludge (flags bit 16) must be ELF")
    check_fits(kernel, memory_map)
    kernel_end = max(s.end for s in kernel)
    space = FreeSpace(memory_map, [(s.gpa, s.end) for s in kernel])

    module_segments = []
    for i, (module, string) in enumerate(module_pairs(modules), 1):
        what = f"module {i} ({module.name})"
        start = space.lowest(module.size, what, floor=align_up(kernel_end, PAGE_SIZE))
        module_segments.append((Segment(start, module.size, module, 0, module.size, what=what), string))

    name = source.name if kernel_name is None else kernel_name
    command_line = " ".join(word for word in (name, cmdline) if word)
    info = info_block(memory_map, space, command_line, module_segments)

    notes = [f"Multiboot header at file offset {header.offset:#x}, flags {header.flags:#x}",
             "a.out kludge" if header.aout is not None else "ELF",
             f"{len(module_segments)} module(s)", f"info at {info.gpa:#x}"]
    if header.flags & HEADER_VIDEO_MODE:
        notes.append("the kernel asks for a video mode; pykvm has no framebuffer, so none is set (as QEMU)")
    plan = LoadPlan(
        format="multiboot", cpu="multiboot32", entry=entry, regs={"rax": BOOTLOADER_MAGIC, "rbx": info.gpa},
        segments=kernel + tuple(seg for seg, _ in module_segments) + (info,), notes="; ".join(notes),
    )
    plan.check_fits(memory_map)
    return plan
