"""Multiboot v1 (spec 0.6.96 section 3): headers, a.out and ELF kernels, modules, the information structure."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from loader_images import (
    GuestView, MB_AOUT, MiB, assert_placement_rules, assert_refused, make_aout_kernel, make_multiboot_elf,
    multiboot_header, pc_memory_map, refused, source,
)
from pykvm import guests
from pykvm.errors import LoaderError
from pykvm.loaders import MemoryMap, plan_image, split_initrd
from pykvm.loaders.multiboot import BOOTLOADER_MAGIC
from pykvm.platform import layout

MAP = pc_memory_map(64 * MiB)
INFO_FLAGS = (1 << 0) | (1 << 2) | (1 << 3) | (1 << 6) | (1 << 9)   # memory, cmdline, mods, mmap, loader name


def info_fields(view: GuestView, info: int) -> dict:
    names = ["flags", "mem_lower", "mem_upper", "boot_device", "cmdline", "mods_count", "mods_addr"]
    fields = dict(zip(names, struct.unpack("<7I", view.read(info, 28))))
    fields["mmap_length"], fields["mmap_addr"] = struct.unpack("<II", view.read(info + 44, 8))
    fields["boot_loader_name"] = view.u32(info + 64)
    fields["vbe_and_framebuffer"] = view.read(info + 72, 116 - 72)
    return fields


def mmap_entries(view: GuestView, addr: int, length: int) -> list[tuple[int, int, int]]:
    entries, at = [], addr
    while at < addr + length:
        size, base, size_bytes, kind = struct.unpack("<IQQI", view.read(at, 24))
        assert size == 20
        entries.append((base, size_bytes, kind))
        at += size + 4
    return entries


def test_bench32_boots_as_multiboot_with_a_complete_info_structure():
    image = guests.patch_bench_params(guests.path("bench32").read_bytes(), 1, 50)
    plan = plan_image(source(image, "/boot/bench32.bin"), memory_map=MAP, cmdline="console=ttyS0 quiet")
    assert (plan.format, plan.cpu, plan.entry) == ("multiboot", "multiboot32", 0x100000)
    kernel, info_segment = plan.segments
    assert (kernel.gpa, kernel.offset, kernel.filesz, kernel.what) == (0x100000, 0, len(image), "kernel")
    assert kernel.memsize > len(image)                             # bss_end_addr: its stack
    info = plan.regs["rbx"]
    assert plan.regs == {"rax": BOOTLOADER_MAGIC, "rbx": info} and info == info_segment.gpa == 0x1000
    view = GuestView(plan)
    f = info_fields(view, info)
    assert f["flags"] == INFO_FLAGS                                 # no boot_device (bit 1)
    assert (f["mem_lower"], f["mem_upper"]) == (639, 63 * 1024)    # 0x9fc00 below the EBDA; 1 MiB to 64 MiB
    assert (f["boot_device"], f["mods_count"], f["mods_addr"]) == (0, 0, 0)
    assert view.cstr(f["cmdline"]) == b"/boot/bench32.bin console=ttyS0 quiet"
    assert view.cstr(f["boot_loader_name"]) == b"pykvm"
    assert mmap_entries(view, f["mmap_addr"], f["mmap_length"]) == layout.e820_map(64 * MiB)
    assert f["vbe_and_framebuffer"] == bytes(44)
    assert view.read(0x100000 + 0x30, 16)[8:] == struct.pack("<II", 1, 50)   # its PKVMARGS block, loaded
    assert_placement_rules(plan, MAP)


def test_modules_are_page_aligned_after_the_kernel_with_their_strings():
    kernel = make_aout_kernel(load_addr=0x100000, bss=0x2345)
    mods = [source(b"A" * 5000, "/boot/a.img"), (source(b"", "b"), "b --verbose x=1"), source(b"C" * 4096, "c")]
    plan = plan_image(source(kernel), memory_map=MAP, modules=mods, cmdline="root=/dev/ram0",
                      kernel_name="/boot/kernel")
    view = GuestView(plan)
    f = info_fields(view, plan.regs["rbx"])
    assert f["flags"] == INFO_FLAGS and f["mods_count"] == 3
    assert view.cstr(f["cmdline"]) == b"/boot/kernel root=/dev/ram0"
    kernel_end = 0x100000 + len(kernel) + 0x2345
    entries = [struct.unpack("<IIII", view.read(f["mods_addr"] + 16 * i, 16)) for i in range(3)]
    starts = [start for start, _, _, _ in entries]
    assert starts == [0x103000, 0x105000, 0x106000]                 # first fit from the kernel's end, in order
    assert all(start % 4096 == 0 and start >= kernel_end for start in starts)
    assert [end - start for start, end, _, _ in entries] == [5000, 0, 4096]
    assert [view.cstr(string) for _, _, string, _ in entries] == [b"/boot/a.img", b"b --verbose x=1", b"c"]
    assert all(reserved == 0 for *_, reserved in entries)
    assert view.read(0x103000, 5000) == b"A" * 5000 and view.read(0x106000, 4096) == b"C" * 4096
    assert [s.what for s in plan.segments[1:4]] == ["module 1 (/boot/a.img)", "module 2 (b)", "module 3 (c)"]
    assert_placement_rules(plan, MAP)


def test_info_goes_to_the_lowest_free_page_and_skips_reserved_ranges():
    tables = pc_memory_map(64 * MiB, reserved=[(0x1000, 0x7F000)])   # the platform keeps 0x1000-0x7ffff
    plan = plan_image(source(make_aout_kernel()), memory_map=tables)
    assert plan.regs["rbx"] == 0x80000
    assert_placement_rules(plan, tables)
    no_low = pc_memory_map(64 * MiB, reserved=[(0x1000, 0x9EC00)])   # no low memory left at all
    plan = plan_image(source(make_aout_kernel(load_addr=0x200000)), memory_map=no_low)
    assert plan.regs["rbx"] == 0x100000                             # below the kernel, above the BIOS area
    assert_placement_rules(plan, no_low)


def test_without_an_e820_map_there_is_no_mmap_and_memory_sizes_come_from_ram():
    bare = MemoryMap(ram=((0, 64 * MiB),), reserved=((0, 0x1000),))
    plan = plan_image(source(make_aout_kernel()), memory_map=bare)
    f = info_fields(GuestView(plan), plan.regs["rbx"])
    assert f["flags"] == INFO_FLAGS & ~(1 << 6) and f["mmap_length"] == 0
    assert (f["mem_lower"], f["mem_upper"]) == (640, 63 * 1024)


def test_kernel_name_and_command_line_forms():
    def cmdline(**kwargs) -> bytes:
        plan = plan_image(source(make_aout_kernel(), "k.bin"), memory_map=MAP, **kwargs)
        view = GuestView(plan)
        return view.cstr(info_fields(view, plan.regs["rbx"])["cmdline"])

    assert cmdline() == b"k.bin"
    assert cmdline(kernel_name="", cmdline="a b") == b"a b"
    assert cmdline(kernel_name="/k", cmdline="a") == b"/k a"
    assert cmdline(cmdline="\u00e9") == "k.bin \u00e9".encode()
    with pytest.raises(LoaderError, match="the command line contains a NUL character"):
        cmdline(cmdline="a\0b")
    with pytest.raises(LoaderError, match="the string of module 1 contains a NUL"):
        plan_image(source(make_aout_kernel()), memory_map=MAP, modules=[(source(b"m"), "m\0")])


def test_elf_kernels_load_by_physical_address():
    plan = plan_image(source(make_multiboot_elf(bits=32, paddr=0x200000, vaddr=0xC0200000)), memory_map=MAP,
                      modules=[source(b"M" * 10, "m")])
    assert (plan.format, plan.cpu, plan.entry) == ("multiboot", "multiboot32", 0x20000C)
    text, data, module, info = plan.segments
    assert (text.gpa, data.gpa, data.memsize - data.filesz) == (0x200000, 0x201000, 0x3000)
    assert module.gpa == 0x205000                                   # after the data segment's bss, page-aligned
    assert GuestView(plan).read(0x200000, 4) == struct.pack("<I", 0x1BADB002)
    assert_placement_rules(plan, MAP)


def test_elf64_kernels_are_accepted_below_4gib_as_grub_does():
    plan = plan_image(source(make_multiboot_elf(bits=64, paddr=0x200000, vaddr=0xFFFFFFFF80200000)),
                      memory_map=MAP)
    assert (plan.format, plan.entry) == ("multiboot", 0x20000C)
    big = pc_memory_map(6 << 30)
    with pytest.raises(LoaderError, match="starts in 32-bit mode, but this ELF64 image loads at "):
        plan_image(source(make_multiboot_elf(bits=64, paddr=0x100000000, vaddr=0x100000000)), memory_map=big)


def test_header_flags():
    plan = plan_image(source(make_aout_kernel(flags=0b111)), memory_map=MAP)   # page align, memory, video
    assert "video mode" in plan.notes and "no framebuffer" in plan.notes
    assert info_fields(GuestView(plan), plan.regs["rbx"])["flags"] == INFO_FLAGS  # bits 11, 12 stay clear
    with pytest.raises(LoaderError, match=r"requires features pykvm does not provide \(flags 0x8\)"):
        plan_image(source(make_aout_kernel(flags=1 << 3)), memory_map=MAP)
    with pytest.raises(LoaderError, match=r"\(flags 0x8000\)"):
        plan_image(source(make_aout_kernel(flags=1 << 15)), memory_map=MAP)
    assert plan_image(source(make_aout_kernel(flags=1 << 20)), memory_map=MAP).format == "multiboot"
    with pytest.raises(LoaderError, match=r"without the a\.out kludge \(flags bit 16\) must be ELF"):
        plan_image(source(multiboot_header(0) + bytes(64)), memory_map=MAP)
    with pytest.raises(LoaderError, match="no Multiboot header in the first 8 KiB"):
        plan_image(source(bytes(8192) + multiboot_header(MB_AOUT)), memory_map=MAP, format="multiboot")


def aout(header_addr, load_addr, load_end, bss_end, entry, offset=0x20, tail=0x100) -> bytes:
    return bytes(offset) + multiboot_header(MB_AOUT, (header_addr, load_addr, load_end, bss_end, entry)) + \
        bytes(tail)


BAD_AOUT = [
    (aout(0x100000, 0x100020, 0, 0, 0x100020), "load_addr 0x100020 is above header_addr 0x100000"),
    (aout(0x100040, 0x100000, 0, 0, 0x100000), r"header_addr - load_addr \(0x40\) is more than the header's"),
    (aout(0x100020, 0x100000, 0xFFFFF, 0, 0x100000), "load_end_addr 0xfffff is below load_addr"),
    (aout(0x100020, 0x100000, 0x100200, 0, 0x100000), r"asks for 0x200 bytes from file offset 0x0, past the end"),
    (aout(0x100020, 0x100000, 0x100100, 0x1000FF, 0x100000), "bss_end_addr 0x1000ff is below the end"),
    (aout(0x100020, 0x100000, 0x100100, 0x100200, 0x100100), "entry_addr 0x100100 is outside the loaded image"),
    (aout(0x100020, 0x100000, 0, 0, 0xFFFFF), "entry_addr 0xfffff is outside"),
    (aout(0xFFFFFF20, 0xFFFFFF00, 0, 0, 0xFFFFFF00, tail=0x1000), "runs past 4 GiB"),
    (bytes(8) + multiboot_header(MB_AOUT)[:12] + bytes(8), "a.out fields at file offset 0x14 run past the end"),
    (aout(0x4000020, 0x4000000, 0, 0, 0x4000000), r"kernel \(0x4000000-.*does not fit in guest RAM"),
    (aout(0xA0020, 0xA0000, 0, 0, 0xA0000), r"kernel \(0xa0000-.*overlaps the reserved range 0x9fc00-0xfffff"),
]


@refused(BAD_AOUT)
def test_inconsistent_aout_headers_are_refused(image, message):
    assert_refused(image, message, MAP)


def test_aout_with_zero_load_end_takes_the_rest_of_the_file():
    plan = plan_image(source(aout(0x100020, 0x100000, 0, 0x101000, 0x100030)), memory_map=MAP)
    (kernel, _) = plan.segments
    assert (kernel.offset, kernel.filesz, kernel.memsize, plan.entry) == (0, 0x20 + 32 + 0x100, 0x1000, 0x100030)


def test_modules_that_do_not_fit_are_refused():
    small = pc_memory_map(2 * MiB)
    with pytest.raises(LoaderError, match=r"^no room for module 2 \(big\) \(0x100000 bytes\) in free guest RAM "):
        plan_image(source(make_aout_kernel()), memory_map=small,
                   modules=[source(b"x", "small"), source(bytes(1 << 20), "big")])


@settings(max_examples=300)
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
       st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 200))
def test_hostile_aout_headers(header_addr, load_addr, load_end, bss_end, entry, pad):
    image = aout(header_addr, load_addr, load_end, bss_end, entry, offset=pad * 4, tail=32)
    try:
        plan = plan_image(source(image), memory_map=MAP)
    except LoaderError as exc:
        assert "\n" not in str(exc)
        return
    kernel = plan.segments[0]
    assert kernel.gpa == load_addr and load_addr <= plan.entry < load_addr + kernel.filesz
    assert kernel.offset + kernel.filesz <= len(image)
    assert_placement_rules(plan, MAP)


def test_split_initrd_reads_qemus_option_grammar():
    assert split_initrd("a.mod") == [("a.mod", "a.mod")]
    assert split_initrd("/boot/a.mod x=1 y,b,,c.mod,d") == [
        ("/boot/a.mod", "/boot/a.mod x=1 y"), ("b,c.mod", "b,c.mod"), ("d", "d")]
    for bad in ("a,", ",a", "a, x", ""):
        with pytest.raises(LoaderError, match="an entry without a file name"):
            split_initrd(bad)
