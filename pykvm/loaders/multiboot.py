"""Multiboot (version 0.6.96) kernels, as QEMU's -kernel and GRUB load them.

The header lies in the first 8192 bytes, 4-byte aligned: magic 0x1BADB002,
flags, checksum (the three sum to 0 mod 2^32).  With flag bit 16 (the
"a.out kludge") the header gives the load addresses itself; otherwise the
image must be ELF.  The kernel starts in 32-bit protected mode with paging
off, EAX = 0x2BADB002 and EBX = the physical address of the Multiboot
information structure (spec section 3.2 "Machine state", 3.3).
"""

from __future__ import annotations

import struct

from pykvm.errors import LoaderError
from pykvm.loaders.elf import is_elf, plan_elf
from pykvm.loaders.plan import LoadPlan, Segment
from pykvm.x86 import layout

HEADER_MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002
SEARCH_LIMIT = 8192
FLAG_AOUT_KLUDGE = 1 << 16
SUPPORTED_REQUIRED_FLAGS = 0b111  # page align, memory info, video info (ignored)

# multiboot_info flags
INFO_MEMORY = 1 << 0
INFO_CMDLINE = 1 << 2
INFO_MMAP = 1 << 6
INFO_LOADER_NAME = 1 << 9

INFO_ADDR = layout.MULTIBOOT_INFO_ADDR


def find_header(image: bytes) -> tuple[int, int] | None:
    """(file offset, flags) of a valid Multiboot header, or None."""
    for offset in range(0, min(len(image), SEARCH_LIMIT) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", image, offset)
        if magic == HEADER_MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return offset, flags
    return None


def plan_multiboot(image: bytes, *, memory_size: int, cmdline: str = "") -> LoadPlan:
    found = find_header(image)
    if found is None:
        raise LoaderError("no Multiboot header in the first 8 KiB")
    offset, flags = found
    unknown = flags & 0xFFFF & ~SUPPORTED_REQUIRED_FLAGS
    if unknown:
        raise LoaderError(f"Multiboot header requires features pykvm does not provide (flags {unknown:#x})")
    if flags & FLAG_AOUT_KLUDGE:
        if offset + 32 > len(image):
            raise LoaderError("Multiboot a.out header truncated")
        header_addr, load_addr, load_end, bss_end, entry = struct.unpack_from("<IIIII", image, offset + 12)
        if not load_addr <= header_addr or header_addr - load_addr > offset:
            raise LoaderError("Multiboot header_addr/load_addr are inconsistent")
        start = offset - (header_addr - load_addr)
        size = (load_end - load_addr) if load_end else len(image) - start
        if size <= 0 or start + size > len(image):
            raise LoaderError("Multiboot load_end_addr lies outside the file")
        memsize = max(size, bss_end - load_addr) if bss_end else size
        if not load_addr <= entry < load_addr + memsize:
            raise LoaderError(f"Multiboot entry {entry:#x} is outside the loaded image")
        segments = (Segment(load_addr, image[start:start + size], memsize),)
    elif is_elf(image):
        elf = plan_elf(image, mode="protected")
        segments, entry = elf.segments, elf.entry
    else:
        raise LoaderError("Multiboot image without the a.out kludge must be ELF")
    info = build_info(memory_size, cmdline)
    return LoadPlan(
        format="multiboot", mode="protected", entry=entry, segments=segments,
        regs={"rax": BOOTLOADER_MAGIC, "rbx": INFO_ADDR},
        extra_writes=(Segment(INFO_ADDR, info, len(info)),),
        notes=f"Multiboot header at file offset {offset:#x}, flags {flags:#x}",
    )


def build_info(memory_size: int, cmdline: str) -> bytes:
    """The multiboot_info structure, the command line and a memory map after it."""
    low_ram = min(memory_size, 0x9FC00)
    high_ram = max(0, min(memory_size, 0xC000_0000) - 0x100000)
    cmd = cmdline.encode() + b"\0"
    if len(cmd) > 2048:
        raise LoaderError("the command line is longer than 2047 bytes")
    loader = b"pykvm\0"
    mmap_entries = [(0, low_ram, 1), (0x100000, high_ram, 1)]
    if memory_size > 0xC000_0000:
        mmap_entries.append((1 << 32, memory_size - 0xC000_0000, 1))
    mmap = b"".join(struct.pack("<IQQI", 20, base, length, kind) for base, length, kind in mmap_entries)
    info_size = 116
    cmd_addr = INFO_ADDR + info_size
    loader_addr = cmd_addr + len(cmd)
    mmap_addr = loader_addr + len(loader)
    info = bytearray(info_size)
    struct.pack_into("<III", info, 0, INFO_MEMORY | INFO_CMDLINE | INFO_MMAP | INFO_LOADER_NAME,
                     low_ram // 1024, high_ram // 1024)
    struct.pack_into("<I", info, 16, cmd_addr)
    struct.pack_into("<II", info, 44, len(mmap), mmap_addr)
    struct.pack_into("<I", info, 64, loader_addr)
    data = bytes(info) + cmd + loader + mmap
    assert len(data) <= layout.MULTIBOOT_INFO_MAX
    return data
