"""PVH direct boot (Xen's x86/HVM direct boot ABI, docs/misc/pvh.pandoc), as QEMU, Firecracker and
cloud-hypervisor boot an uncompressed kernel (vmlinux) that carries the entry in an ELF note.

The kernel is an ELF executable whose PT_NOTE segments hold a note named
"Xen" of type XEN_ELFNOTE_PHYS32_ENTRY (18); its descriptor (4 or 8 bytes)
is the physical address of the 32-bit entry.  The PT_LOADs load at their
physical addresses.

At entry (cpu ``pvh32``): 32-bit protected mode, paging off, flat 4 GiB
code and data segments, EBX = the physical address of ``struct
hvm_start_info`` (xen/include/public/arch-x86/hvm/start_info.h), version 1:

    magic 0x336ec578, version 1, flags 0, nr_modules, modlist_paddr,
    cmdline_paddr, rsdp_paddr (0 unless the platform gives one),
    memmap_paddr, memmap_entries (the e820 map), reserved

with 32-byte module entries (paddr, size, cmdline_paddr, reserved) and
24-byte memory map entries (addr, size, type, reserved).  Address 0 means
"absent", which is one more reason nothing goes in page 0.

Placement: the initrd (module 0, as QEMU passes -initrd) at the highest
page-aligned free address below 4 GiB; the start-info block (structure,
module list, memory map, command line) at the lowest free page.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from pykvm.errors import LoaderError
from pykvm.loaders.bootdata import BootBlock, Module, c_string, module_pairs
from pykvm.loaders.elf import ElfImage, read_elf
from pykvm.loaders.plan import LoadPlan, MemoryMap, Segment, check_fits
from pykvm.loaders.source import ImageSource
from pykvm.loaders.space import BELOW_4G, FreeSpace

XEN_NOTE_NAME = b"Xen"
XEN_ELFNOTE_PHYS32_ENTRY = 18
START_MAGIC = 0x336EC578
START_VERSION = 1
START_INFO = struct.Struct("<IIIIQQQQII")   # magic .. rsdp_paddr, memmap_paddr, memmap_entries, reserved
MODLIST_ENTRY = struct.Struct("<QQQQ")      # paddr, size, cmdline_paddr, reserved
MEMMAP_ENTRY = struct.Struct("<QQII")       # addr, size, type, reserved


def pvh_entry(elf: ElfImage) -> int | None:
    """The XEN_ELFNOTE_PHYS32_ENTRY address, or None if the image has no such note."""
    for name, kind, desc in elf.notes():
        if name != XEN_NOTE_NAME or kind != XEN_ELFNOTE_PHYS32_ENTRY:
            continue
        if len(desc) not in (4, 8):
            raise LoaderError(f"{elf.source.name}: the PVH entry note has a {len(desc)}-byte value "
                              "(4 or 8 expected)")
        return int.from_bytes(desc, "little")
    return None


def plan_pvh(source: ImageSource, *, memory_map: MemoryMap, cmdline: str = "", modules: Sequence[Module] = (),
             rsdp: int | None = None) -> LoadPlan:
    name = source.name
    elf = read_elf(source)
    entry = pvh_entry(elf)
    if entry is None:
        raise LoaderError(f"{name}: no PVH entry (ELF note \"Xen\" type {XEN_ELFNOTE_PHYS32_ENTRY})")
    if not any(ph.paddr <= entry < ph.paddr + ph.filesz for ph in elf.loads):
        raise LoaderError(f"{name}: the PVH entry {entry:#x} is in no loaded segment")
    if entry >= BELOW_4G:
        raise LoaderError(f"{name}: the PVH entry {entry:#x} is above 4 GiB (it runs in 32-bit mode)")
    pairs = module_pairs(modules)
    if len(pairs) > 1:
        raise LoaderError(f"a PVH kernel takes one initrd, not {len(pairs)} (QEMU loads -initrd as one file)")
    kernel = elf.segments()
    check_fits(kernel, memory_map)
    space = FreeSpace(memory_map, [(s.gpa, s.end) for s in kernel])

    initrds = []
    for module, _ in pairs:
        what = f"initrd ({module.name})"
        start = space.highest(module.size, what)
        initrds.append(Segment(start, module.size, module, 0, module.size, what=what))

    block = BootBlock("hvm_start_info")
    info_at = block.reserve(START_INFO.size)
    modlist_at = block.add(b"".join(MODLIST_ENTRY.pack(s.gpa, s.memsize, 0, 0) for s in initrds))
    memmap_at = block.add(b"".join(MEMMAP_ENTRY.pack(base, length, kind, 0)
                                   for base, length, kind in memory_map.e820))
    cmdline_at = block.add(c_string(cmdline, "the command line"), 1)
    base = space.lowest(block.size, "hvm_start_info")
    block.put(info_at, START_INFO.pack(
        START_MAGIC, START_VERSION, 0, len(initrds), base + modlist_at if initrds else 0, base + cmdline_at,
        rsdp or 0, base + memmap_at if memory_map.e820 else 0, len(memory_map.e820), 0))

    plan = LoadPlan(
        format="pvh", cpu="pvh32", entry=entry, regs={"rbx": base + info_at},
        segments=kernel + tuple(initrds) + (block.segment(base),),
        notes=f"PVH entry {entry:#x} (ELF{elf.bits}); hvm_start_info at {base + info_at:#x}",
    )
    plan.check_fits(memory_map)
    return plan
