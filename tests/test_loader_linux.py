"""Linux bzImages (boot.rst): the setup header, where the kernel and initrd go, the zero page."""

from __future__ import annotations

import struct

import pytest

from loader_images import (
    MiB, GuestView, assert_placement_rules, assert_refused, make_bzimage, pc_memory_map, refused, source,
)
from pykvm.errors import LoaderError
from pykvm.loaders import MemoryMap, plan_image
from pykvm.platform import layout

MAP = pc_memory_map(64 * MiB)


def test_protocol_2_15_with_a_64_bit_entry():
    image = make_bzimage(version=0x20F, xloadflags=0x01, pref_address=0x1000000, init_size=0x400000)
    initrd = b"INITRD" * 1000
    plan = plan_image(source(image, "bzImage"), memory_map=MAP, cmdline="console=ttyS0 root=/dev/vda",
                      modules=[source(initrd, "initrd.img")], rsdp=0xE0000)
    assert (plan.format, plan.cpu, plan.entry) == ("linux", "linux64", 0x1000200)
    bp = plan.regs["rsi"]
    assert plan.regs == {"rsi": bp}
    kernel, ramdisk, zero_page, cmdline = plan.segments
    # the protected-mode kernel: the file after 5 sectors, at pref_address, with init_size of room
    assert (kernel.gpa, kernel.offset, kernel.filesz, kernel.memsize) == (0x1000000, 5 * 512, 0x3001, 0x400000)
    assert kernel.what == "kernel and its init_size room"
    # the initrd: highest page-aligned address in RAM below initrd_addr_max (64 MiB of RAM here)
    assert (ramdisk.gpa, ramdisk.memsize, ramdisk.what) == ((64 * MiB - len(initrd)) & ~0xFFF, 6000,
                                                             "initrd (initrd.img)")
    assert (zero_page.gpa, zero_page.memsize, zero_page.what) == (bp, 4096, "boot_params")
    assert bp == 0x1000 and cmdline.gpa == 0x2000                  # low memory, page 0 never
    view = GuestView(plan)
    assert view.read(bp + 0x202, 4) == b"HdrS" and view.u16(bp + 0x206) == 0x20F   # the header, copied
    assert view.u16(bp + 0x1FE) == 0xAA55 and view.u8(bp + 0x1F1) == 4 and view.u16(bp + 0x1FA) == 0xFFFF
    assert view.u32(bp + 0x22C) == 0x7FFFFFFF and view.u32(bp + 0x238) == 2047  # initrd_addr_max, cmdline_size
    assert view.u8(bp + 0x210) == 0xFF                              # type_of_loader: undefined
    assert view.u8(bp + 0x211) == 0x01                              # LOADED_HIGH, no CAN_USE_HEAP
    assert view.u16(bp + 0x224) == 0 and view.read(bp + 0x226, 2) == b"\0\0"   # heap_end_ptr, ext_loader_*
    assert view.u32(bp + 0x214) == 0x1000000                        # code32_start = where it was loaded
    assert (view.u32(bp + 0x218), view.u32(bp + 0x21C)) == (ramdisk.gpa, len(initrd))
    assert view.cstr(view.u32(bp + 0x228)) == b"console=ttyS0 root=/dev/vda"
    assert view.u64(bp + 0x250) == 0                                # setup_data
    assert view.u64(bp + 0x070) == 0xE0000                          # acpi_rsdp_addr (2.14+)
    assert view.read(bp + 0x26C, 4) == bytes(4)                     # the setup code after the header is not copied
    e820 = layout.e820_map(64 * MiB)
    assert view.u8(bp + 0x1E8) == len(e820)
    assert [struct.unpack("<QQI", view.read(bp + 0x2D0 + 20 * i, 20)) for i in range(len(e820))] == e820
    assert view.read(ramdisk.gpa, 12) == b"INITRDINITRD"
    assert view.read(0x1000000, 1) == b"\x90" and view.read(0x1003000, 2) == b"\xf4\0"
    assert view.u8(bp + 0x1EF) == 0                                 # sentinel
    assert_placement_rules(plan, MAP)


def test_protocol_2_15_without_xlf_kernel_64_uses_the_32_bit_entry():
    plan = plan_image(source(make_bzimage(xloadflags=0)), memory_map=MAP)
    bp = plan.regs["rsi"]
    assert (plan.cpu, plan.entry) == ("linux32", 0x1000000)
    assert plan.regs == {"rsi": bp, "rbx": 0, "rbp": 0, "rdi": 0}
    view = GuestView(plan)
    assert (view.u32(bp + 0x218), view.u32(bp + 0x21C)) == (0, 0)  # no initrd
    assert view.cstr(view.u32(bp + 0x228)) == b""


def test_protocol_2_06_loads_at_1mib_without_init_size():
    image = make_bzimage(version=0x206, xloadflags=0x01, pref_address=0x2000000, init_size=0x800000,
                         header_end=0x23C, setup_sects=0)
    plan = plan_image(source(image), memory_map=MAP, rsdp=0xE0000, modules=[source(b"i" * 10)])
    kernel = plan.segments[0]
    assert (plan.cpu, plan.entry) == ("linux32", 0x100000)         # no xloadflags before 2.12
    assert (kernel.gpa, kernel.offset, kernel.filesz) == (0x100000, 5 * 512, 0x3001)    # setup_sects 0 means 4
    assert kernel.end == 0x200000                                   # its runtime start, aligned to 2 MiB
    assert "no init_size: room for the file only" in plan.notes
    view = GuestView(plan)
    bp = plan.regs["rsi"]
    assert view.u64(bp + 0x070) == 0                                # no acpi_rsdp_addr before 2.14
    assert view.read(bp + 0x23C, 0x30) == bytes(0x30)               # header ends at 0x23c: nothing copied after
    assert view.u32(bp + 0x214) == 0x100000


def test_non_relocatable_kernel_loads_at_1mib_and_keeps_room_up_to_its_runtime_window():
    plan = plan_image(source(make_bzimage(relocatable=0, pref_address=0x1000000, init_size=0x200000)),
                      memory_map=MAP)
    kernel = plan.segments[0]
    assert (kernel.gpa, kernel.end, plan.entry) == (0x100000, 0x1200000, 0x100200)


def test_relocatable_kernel_runtime_start_is_aligned():
    plan = plan_image(source(make_bzimage(pref_address=0x1100000, kernel_alignment=0x200000,
                                          init_size=0x100000)), memory_map=MAP)
    kernel = plan.segments[0]
    assert (kernel.gpa, kernel.end) == (0x1100000, 0x1300000)      # runtime 0x1200000 + init_size


def test_initrd_stays_below_initrd_addr_max_and_clear_of_the_kernel_window():
    big = pc_memory_map(256 * MiB)
    plan = plan_image(source(make_bzimage(initrd_addr_max=0x3FFFFFF)), memory_map=big,
                      modules=[source(b"x" * 0x5000, "initrd")])
    initrd = plan.segments[1]
    assert initrd.gpa == 0x4000000 - 0x5000 and initrd.end <= 0x3FFFFFF + 1 and initrd.gpa % 4096 == 0
    # a window that ends near the top of RAM pushes the initrd below it
    plan = plan_image(source(make_bzimage(pref_address=0x1000000, init_size=0x2FFC000)), memory_map=MAP,
                      modules=[source(b"x" * 0x3000, "initrd")])
    assert plan.segments[1].gpa == 0x4000000 - 0x3000
    plan = plan_image(source(make_bzimage(pref_address=0x1000000, init_size=0x3000000)), memory_map=MAP,
                      modules=[source(b"x" * 0x3000, "initrd")])
    assert plan.segments[1].end <= 0x1000000                        # below the kernel window, not in it
    assert_placement_rules(plan, MAP)


def test_initrd_too_large_is_refused():
    with pytest.raises(LoaderError, match=r"^no room for initrd \(huge\) \(0x4000000 bytes\) in free guest RAM "
                                          r"below 0x80000000$"):
        plan_image(source(make_bzimage()), memory_map=MAP, modules=[source(bytes(64 * MiB), "huge")])


def test_command_line_is_bounded_by_cmdline_size():
    image = make_bzimage(cmdline_size=16)
    plan = plan_image(source(image), memory_map=MAP, cmdline="x" * 16)
    assert plan.segments[-1].data == b"x" * 16 + b"\0"
    with pytest.raises(LoaderError, match=r"^the command line is 17 bytes; bz takes at most 16 \(cmdline_size\)$"):
        plan_image(source(image, "bz"), memory_map=MAP, cmdline="x" * 17)


def test_too_many_e820_entries():
    entries = tuple((i * 0x100000, 0x1000, 1 if i % 2 else 2) for i in range(129))
    crowded = MemoryMap(ram=((0, 64 * MiB),), e820=entries, reserved=((0, 0x1000),))
    with pytest.raises(LoaderError, match="the memory map has 129 entries; boot_params holds at most 128"):
        plan_image(source(make_bzimage()), memory_map=crowded)
    ok = MemoryMap(ram=((0, 64 * MiB),), e820=entries[:128], reserved=((0, 0x1000),))
    plan = plan_image(source(make_bzimage()), memory_map=ok)
    view = GuestView(plan)
    bp = plan.regs["rsi"]
    assert view.u8(bp + 0x1E8) == 128
    assert struct.unpack("<QQI", view.read(bp + 0x2D0 + 20 * 127, 20)) == entries[127]


def _with(image: bytes, at: int, value: bytes) -> bytes:
    patched = bytearray(image)
    patched[at:at + len(value)] = value
    return bytes(patched)


BAD = [
    (make_bzimage(version=0x205), "Linux boot protocol 2.05 is older than 2.06"),
    (make_bzimage(version=0x200), "Linux boot protocol 2.00 is older than 2.06"),
    (make_bzimage(loadflags=0), r"a zImage \(loadflags LOADED_HIGH clear\) is not supported"),
    (make_bzimage()[:0x200], r"too short for a Linux setup header"),
    (make_bzimage(setup_sects=20, payload=b""), r"the setup code \(20 sectors\) leaves no protected-mode kernel"),
    (make_bzimage(syssize=0x400), r"truncated: syssize says 0x4000 bytes of kernel, the file holds 0x3001"),
    (make_bzimage(kernel_alignment=0x300000), "kernel_alignment 0x300000 is not a power of two"),
    (make_bzimage(relocatable=0, pref_address=0x80000), "non-relocatable kernel with pref_address 0x80000"),
    (make_bzimage(pref_address=0xFFF00000, init_size=0x200000), "past 4 GiB"),
    (make_bzimage(init_size=0x8000000),
     r"^kernel and its init_size room \(0x1000000-0x8ffffff, 0x8000000 bytes\) does not fit in guest RAM"),
    (make_bzimage(pref_address=0xA0000, kernel_alignment=0x1000), "overlaps the reserved range 0x9fc00-0xfffff"),
    (_with(make_bzimage(), 0x1FE, b"\0\0"), r"no boot flag 0xAA55 at 0x1FE"),
    (make_bzimage(header_end=0x230), r"the setup header ends at 0x230 \(the jump at 0x200\), before the fields"),
    (_with(make_bzimage(), 0x202, b"HdrZ"), r"no Linux setup header \(no \"HdrS\" at 0x202\)"),
]


@refused(BAD)
def test_bad_bzimages_are_refused(image, message):
    assert_refused(image, message, MAP, format="linux")


def test_one_initrd_only():
    with pytest.raises(LoaderError, match=r"a Linux kernel takes one initrd, not 2"):
        plan_image(source(make_bzimage()), memory_map=MAP, modules=[source(b"a"), source(b"b")])


def test_a_nul_in_the_command_line_is_refused():
    with pytest.raises(LoaderError, match="the command line contains a NUL character"):
        plan_image(source(make_bzimage()), memory_map=MAP, cmdline="a\0b")
