"""Linux bzImages through the x86 boot protocol (Documentation/arch/x86/boot.rst), booted directly.

Like Firecracker and cloud-hypervisor (and unlike QEMU and kvmtool, which
run the kernel's 16-bit setup code: QEMU from an option ROM), pykvm skips
the real-mode setup and enters the protected-mode kernel itself: it fills
the zero page (``struct boot_params``, arch/x86/include/uapi/asm/
bootparam.h) the setup code would have filled.

The setup header lies at 0x1F1: setup_sects (0 means 4), syssize, boot_flag
0xAA55 at 0x1FE, "HdrS" at 0x202, the protocol version at 0x206.  Protocol
2.06 or newer is required (it has cmdline_size), and loadflags LOADED_HIGH
(a bzImage).  The protected-mode kernel is the file after (setup_sects + 1)
sectors.

Where the kernel goes (boot.rst, init_size): a relocatable kernel loads at
pref_address (2.10+), a fixed one at 0x100000.  Its runtime start is
align_up(max(load, pref_address), kernel_alignment) when relocatable, else
pref_address; it needs init_size bytes from there before it reads the memory
map.  The kernel segment covers that whole window (file bytes, then
zeroes), so nothing else is put where the decompressor works.

boot_params: the setup header copied from the file (0x1F1 to 0x202 + the
byte at 0x201), then type_of_loader 0xFF (undefined), ext_loader_ver 0,
code32_start = the load address, CAN_USE_HEAP clear and heap_end_ptr 0 (the
heap is for the setup code, which does not run), cmd_line_ptr,
ramdisk_image/ramdisk_size, setup_data 0, acpi_rsdp_addr (2.14+, when the
platform gives one), e820_entries/e820_table (at most 128 entries).

Placement: the initrd at the highest page-aligned free address whose end is
at or below min(initrd_addr_max + 1, 4 GiB), as QEMU; boot_params (a page)
and the command line at the lowest free addresses (low memory, page 0 never).

Entry: with xloadflags XLF_KERNEL_64 (2.12+), the 64-bit entry at load
address + 0x200, RSI = boot_params, cpu ``linux64``; otherwise the 32-bit
entry at the load address, ESI = boot_params and EBX/EBP/EDI = 0, cpu
``linux32``.  The handover (EFI) entry is not used.  The CPU state of each
is built by ``pykvm.x86.boot_states``.

Unpacked (``unpack=True``, format ``linux``): a 64-bit kernel whose payload
pykvm can decompress (``pykvm.loaders.linux_payload``) is loaded as the
vmlinux ELF inside it, each PT_LOAD at its physical address, and entered at
its ``e_entry`` (the kernel proper's ``startup_64``) in the same 64-bit
state with the same boot_params: the decompressor never runs.  Otherwise
(``linux-decompressor``, or a payload pykvm cannot unpack: the plan's notes
say why) the bzImage is entered as above.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from pykvm.errors import LoaderError
from pykvm.loaders.bootdata import Module, c_string, module_pairs
from pykvm.loaders.plan import LoadPlan, MemoryMap, Segment, check_fits, span
from pykvm.loaders.source import ImageSource
from pykvm.loaders.space import BELOW_4G, FreeSpace, align_up
from pykvm.values import Value

SETUP_HEADER = 0x1F1
HEADER_MAGIC = b"HdrS"          # at 0x202
BOOT_FLAG = 0xAA55              # at 0x1FE
MIN_PROTOCOL = 0x206
SECTOR = 512
DEFAULT_SETUP_SECTS = 4
DEFAULT_LOAD_ADDR = 0x100000
ENTRY_64_OFFSET = 0x200
HEADER_2_06_END = 0x23C         # the end of cmdline_size, the last field of protocol 2.06
HEADER_COPY_LIMIT = 0x290       # boot_params.edd_mbr_sig_buffer: the setup header never runs past it

LOADED_HIGH = 1 << 0
CAN_USE_HEAP = 1 << 7
XLF_KERNEL_64 = 1 << 0
TYPE_OF_LOADER_UNDEFINED = 0xFF

# struct boot_params (zero-page.rst)
BOOT_PARAMS_SIZE = 4096
BP_ACPI_RSDP_ADDR = 0x070
BP_E820_ENTRIES = 0x1E8
BP_E820_TABLE = 0x2D0
E820_MAX_ENTRIES = 128
E820_ENTRY = struct.Struct("<QQI")
# struct setup_header fields written by the loader (absolute offsets in the zero page / the file)
HDR_TYPE_OF_LOADER = 0x210
HDR_LOADFLAGS = 0x211
HDR_CODE32_START = 0x214
HDR_RAMDISK = 0x218             # ramdisk_image, ramdisk_size
HDR_HEAP_END_PTR = 0x224
HDR_EXT_LOADER = 0x226          # ext_loader_ver, ext_loader_type
HDR_CMD_LINE_PTR = 0x228
HDR_SETUP_DATA = 0x250


def protocol_name(version: int) -> str:
    return f"{version >> 8}.{version & 0xFF:02d}"


def is_bzimage(head: bytes) -> bool:
    """The setup header's two signatures: boot_flag 0xAA55 at 0x1FE and "HdrS" at 0x202."""
    return len(head) >= 0x206 and head[0x1FE:0x200] == b"\x55\xaa" and head[0x202:0x206] == HEADER_MAGIC


class SetupHeader(Value):
    """The setup header fields a loader reads (boot.rst "THE REAL-MODE KERNEL HEADER")."""

    __slots__ = ("version", "setup_size", "syssize", "loadflags", "initrd_addr_max", "kernel_alignment", "relocatable",
                 "xloadflags", "cmdline_size", "pref_address", "init_size", "raw")

    def __init__(self, version: int, setup_size: int, syssize: int, loadflags: int, initrd_addr_max: int,
                 kernel_alignment: int, relocatable: bool, xloadflags: int, cmdline_size: int, pref_address: int,
                 init_size: int, raw: bytes) -> None:
        self.version = version
        self.setup_size = setup_size  # bytes of real-mode code before the protected-mode kernel
        self.syssize = syssize  # protected-mode kernel, 16-byte paragraphs
        self.loadflags = loadflags
        self.initrd_addr_max = initrd_addr_max
        self.kernel_alignment = kernel_alignment
        self.relocatable = relocatable
        self.xloadflags = xloadflags  # 2.12+, else 0
        self.cmdline_size = cmdline_size
        self.pref_address = pref_address  # 2.10+, else 0x100000
        self.init_size = init_size  # 2.10+, else 0 (unknown)
        self.raw = raw  # file bytes 0x1F1 up to the header's end, copied into boot_params


def read_setup_header(source: ImageSource, head: bytes) -> SetupHeader:
    name = source.name
    if len(head) < 0x206:
        raise LoaderError(f"{name}: too short for a Linux setup header ({source.size} bytes)")
    if head[0x202:0x206] != HEADER_MAGIC:
        raise LoaderError(f"{name}: no Linux setup header (no \"HdrS\" at 0x202)")
    if head[0x1FE:0x200] != b"\x55\xaa":
        raise LoaderError(f"{name}: no boot flag 0xAA55 at 0x1FE")
    (version,) = struct.unpack_from("<H", head, 0x206)
    if version < MIN_PROTOCOL:
        raise LoaderError(f"{name}: Linux boot protocol {protocol_name(version)} is older than 2.06")
    setup_sects = head[SETUP_HEADER] or DEFAULT_SETUP_SECTS
    setup_size = (setup_sects + 1) * SECTOR
    if setup_size >= source.size:
        raise LoaderError(f"{name}: the setup code ({setup_sects} sectors) leaves no protected-mode kernel "
                          f"in the file ({source.size:#x} bytes)")
    # setup_size >= 1024, so `head` (the file's first 8 KiB) holds the whole header
    (syssize,) = struct.unpack_from("<I", head, 0x1F4)
    loadflags = head[HDR_LOADFLAGS]
    initrd_addr_max, kernel_alignment, relocatable, _, xloadflags, cmdline_size = struct.unpack_from(
        "<IIBBHI", head, 0x22C)
    pref_address, init_size = struct.unpack_from("<QI", head, 0x258)
    if version < 0x20C:
        xloadflags = 0
    if version < 0x20A:
        pref_address, init_size = DEFAULT_LOAD_ADDR, 0
    end = min(0x202 + head[0x201], HEADER_COPY_LIMIT)   # boot.rst: 0x202 + the jump's displacement
    if end < HEADER_2_06_END:
        raise LoaderError(f"{name}: the setup header ends at {end:#x} (the jump at 0x200), before the fields "
                          "of protocol 2.06")
    return SetupHeader(version, setup_size, syssize, loadflags, initrd_addr_max, kernel_alignment,
                       bool(relocatable), xloadflags, cmdline_size, pref_address, init_size,
                       head[SETUP_HEADER:end])


def kernel_window(hdr: SetupHeader, kernel_size: int, name: str) -> tuple[int, int]:
    """``(load address, end of the memory the kernel needs before reading the memory map)``."""
    if hdr.relocatable:
        alignment = hdr.kernel_alignment
        if alignment == 0 or alignment & (alignment - 1):
            raise LoaderError(f"{name}: kernel_alignment {alignment:#x} is not a power of two")
        load = hdr.pref_address
        runtime = align_up(load, alignment)
    else:
        load = DEFAULT_LOAD_ADDR
        runtime = hdr.pref_address
        if runtime < load:
            raise LoaderError(f"{name}: a non-relocatable kernel with pref_address {runtime:#x} below 1 MiB")
    end = max(load + kernel_size, runtime + hdr.init_size)
    if end > BELOW_4G:
        raise LoaderError(f"{name}: the kernel needs {load:#x}-{end - 1:#x}, past 4 GiB")
    return load, end


def build_boot_params(hdr: SetupHeader, *, load_addr: int, cmdline_addr: int, initrd: tuple[int, int],
                      e820, rsdp: int | None) -> bytes:
    """The zero page: the kernel's setup header plus what the loader fills in."""
    bp = bytearray(BOOT_PARAMS_SIZE)
    bp[SETUP_HEADER:SETUP_HEADER + len(hdr.raw)] = hdr.raw
    bp[HDR_TYPE_OF_LOADER] = TYPE_OF_LOADER_UNDEFINED
    bp[HDR_LOADFLAGS] = hdr.loadflags & ~CAN_USE_HEAP
    struct.pack_into("<I", bp, HDR_CODE32_START, load_addr)
    struct.pack_into("<II", bp, HDR_RAMDISK, *initrd)
    struct.pack_into("<H", bp, HDR_HEAP_END_PTR, 0)
    bp[HDR_EXT_LOADER:HDR_EXT_LOADER + 2] = b"\0\0"      # ext_loader_ver, ext_loader_type: none with 0xFF
    struct.pack_into("<I", bp, HDR_CMD_LINE_PTR, cmdline_addr)
    if hdr.version >= 0x209:
        struct.pack_into("<Q", bp, HDR_SETUP_DATA, 0)
    if rsdp is not None and hdr.version >= 0x20E:
        struct.pack_into("<Q", bp, BP_ACPI_RSDP_ADDR, rsdp)
    bp[BP_E820_ENTRIES] = len(e820)
    for i, (base, length, kind) in enumerate(e820):
        E820_ENTRY.pack_into(bp, BP_E820_TABLE + i * E820_ENTRY.size, base, length, kind)
    return bytes(bp)


def plan_linux(source: ImageSource, head: bytes, *, memory_map: MemoryMap, cmdline: str = "",
               modules: Sequence[Module] = (), rsdp: int | None = None, unpack: bool = True) -> LoadPlan:
    """The plan for a bzImage; ``unpack``: a 64-bit kernel's payload unpacked here when pykvm can (linux_payload)."""
    name = source.name
    hdr = read_setup_header(source, head)
    if not hdr.loadflags & LOADED_HIGH:
        raise LoaderError(f"{name}: a zImage (loadflags LOADED_HIGH clear) is not supported; use a bzImage")
    kernel_size = source.size - hdr.setup_size
    if hdr.syssize * 16 > kernel_size + 15:
        raise LoaderError(f"{name}: truncated: syssize says {hdr.syssize * 16:#x} bytes of kernel, "
                          f"the file holds {kernel_size:#x}")
    command_line = c_string(cmdline, "the command line")
    if len(command_line) - 1 > hdr.cmdline_size:
        raise LoaderError(f"the command line is {len(command_line) - 1} bytes; {name} takes at most "
                          f"{hdr.cmdline_size} (cmdline_size)")
    if len(memory_map.e820) > E820_MAX_ENTRIES:
        raise LoaderError(f"the memory map has {len(memory_map.e820)} entries; boot_params holds at most "
                          f"{E820_MAX_ENTRIES}")
    pairs = module_pairs(modules)
    if len(pairs) > 1:
        raise LoaderError(f"a Linux kernel takes one initrd, not {len(pairs)} (QEMU loads -initrd as one file)")

    vmlinux, unpacked = None, ""
    if unpack and hdr.xloadflags & XLF_KERNEL_64:
        from pykvm.loaders.linux_payload import DEFAULT_LIMIT, unpack_payload

        vmlinux, unpacked = unpack_payload(source, head, hdr.setup_size, hdr.init_size or DEFAULT_LIMIT)
    if vmlinux is not None:  # the kernel proper at its link address; the decompressor never runs
        kernel_segments = vmlinux.segments("kernel (unpacked vmlinux)")
        load, window_end = vmlinux.loads[0].paddr, vmlinux.end()
    else:
        load, window_end = kernel_window(hdr, kernel_size, name)
        what = "kernel" if window_end == load + kernel_size else "kernel and its init_size room"
        kernel_segments = (Segment(load, window_end - load, source, hdr.setup_size, kernel_size, what=what),)
    check_fits(kernel_segments, memory_map)
    space = FreeSpace(memory_map, [(s.gpa, s.end) for s in kernel_segments])
    segments = list(kernel_segments)
    initrd = (0, 0)
    if pairs:
        initrd_source = pairs[0][0]
        what = f"initrd ({initrd_source.name})"
        limit = min(hdr.initrd_addr_max + 1, BELOW_4G)
        start = space.highest(initrd_source.size, what, limit=limit)
        segments.append(Segment(start, initrd_source.size, initrd_source, 0, initrd_source.size, what=what))
        initrd = (start, initrd_source.size)
    bp_addr = space.lowest(BOOT_PARAMS_SIZE, "boot_params")
    cmdline_addr = space.lowest(len(command_line), "the command line", align=16)
    boot_params = build_boot_params(hdr, load_addr=load, cmdline_addr=cmdline_addr, initrd=initrd,
                                    e820=memory_map.e820, rsdp=rsdp)
    segments += [Segment(bp_addr, BOOT_PARAMS_SIZE, data=boot_params, what="boot_params"),
                 Segment(cmdline_addr, len(command_line), data=command_line, what="command line")]

    if vmlinux is not None:
        cpu, entry, regs = "linux64", vmlinux.entry, {"rsi": bp_addr}   # e_entry: startup_64, physical
    elif hdr.xloadflags & XLF_KERNEL_64:
        cpu, entry, regs = "linux64", load + ENTRY_64_OFFSET, {"rsi": bp_addr}
    else:
        cpu, entry, regs = "linux32", load, {"rsi": bp_addr, "rbx": 0, "rbp": 0, "rdi": 0}
    if vmlinux is not None:
        what = f"{unpacked}; vmlinux {span(load, window_end)}, entered at startup_64 {entry:#x}"
    else:
        what = (f"kernel {kernel_size:#x} bytes at {load:#x}, needs up to {window_end:#x}"
                + ("" if hdr.init_size else " (no init_size: room for the file only)")
                + (f"; its own decompressor runs ({unpacked})" if unpacked else ""))
    plan = LoadPlan(
        format="linux", cpu=cpu, entry=entry, regs=regs, segments=tuple(segments),
        notes=f"Linux boot protocol {protocol_name(hdr.version)}, {'64' if cpu == 'linux64' else '32'}-bit entry; {what}",
    )
    plan.check_fits(memory_map)
    return plan
