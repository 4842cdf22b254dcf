"""PVH direct boot: the XEN_ELFNOTE_PHYS32_ENTRY note, the PT_LOADs, hvm_start_info version 1."""

from __future__ import annotations

import struct

import pytest

from loader_images import (
    GuestView, MiB, assert_placement_rules, assert_refused, make_elf, make_pvh_elf, pc_memory_map, refused,
    source,
)
from pykvm.errors import LoaderError
from pykvm.loaders import plan_image
from pykvm.platform import layout

MAP = pc_memory_map(64 * MiB)
START_INFO = struct.Struct("<IIIIQQQQII")


def test_vmlinux_with_a_pvh_note_and_an_initrd():
    initrd = b"RD" * 3000
    plan = plan_image(source(make_pvh_elf(bits=64, paddr=0x1000000, entry_offset=0x40), "vmlinux"),
                      memory_map=MAP, cmdline="console=hvc0", modules=[source(initrd, "initrd.img")],
                      rsdp=0xE0000)
    assert (plan.format, plan.cpu, plan.entry) == ("pvh", "pvh32", 0x1000040)
    start = plan.regs["rbx"]
    assert plan.regs == {"rbx": start} and start == 0x1000
    kernel, ramdisk, info = plan.segments
    assert (kernel.gpa, kernel.memsize, kernel.filesz) == (0x1000000, 0x2000, 0x200)
    assert ramdisk.gpa == (64 * MiB - len(initrd)) & ~0xFFF and ramdisk.what == "initrd (initrd.img)"
    view = GuestView(plan)
    (magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, memmap_entries, reserved) = \
        START_INFO.unpack(view.read(start, START_INFO.size))
    assert (magic, version, flags, nr_modules, rsdp, reserved) == (0x336EC578, 1, 0, 1, 0xE0000, 0)
    assert struct.unpack("<QQQQ", view.read(modlist, 32)) == (ramdisk.gpa, len(initrd), 0, 0)
    assert view.cstr(cmdline) == b"console=hvc0"
    e820 = layout.e820_map(64 * MiB)
    assert memmap_entries == len(e820)
    assert [struct.unpack("<QQII", view.read(memmap + 24 * i, 24)) for i in range(len(e820))] == \
        [(base, length, kind, 0) for base, length, kind in e820]
    assert view.read(ramdisk.gpa, 4) == b"RDRD"
    assert_placement_rules(plan, MAP)


def test_elf32_with_a_4_byte_note_and_no_initrd():
    plan = plan_image(source(make_pvh_elf(bits=32, paddr=0x200000, desc_size=4)), memory_map=MAP)
    assert (plan.format, plan.entry) == ("pvh", 0x200040)
    view = GuestView(plan)
    fields = START_INFO.unpack(view.read(plan.regs["rbx"], START_INFO.size))
    assert fields[3:5] == (0, 0)                                    # nr_modules, modlist_paddr: none
    assert fields[6] == 0                                           # rsdp_paddr: the platform gave none
    assert view.cstr(fields[5]) == b""


def test_explicit_format_needs_the_note():
    plain = make_elf([(0x100000, 0x100000, b"\xf4", 1)], entry=0x100000)
    assert plan_image(source(plain), memory_map=MAP).format == "elf64"
    with pytest.raises(LoaderError, match=r'no PVH entry \(ELF note "Xen" type 18\)'):
        plan_image(source(plain), memory_map=MAP, format="pvh")


def _note_elf(desc: bytes, *, paddr=0x100000, name=b"Xen") -> bytes:
    return make_elf([(paddr, 0xFFFFFFFF80000000, b"\x90" * 64, 0x1000)], entry=0xFFFFFFFF80000000,
                    notes=[(name, 18, desc)])


BAD = [
    (_note_elf(b"\x00\x00"), "the PVH entry note has a 2-byte value"),
    (_note_elf((0x300000).to_bytes(8, "little")), "the PVH entry 0x300000 is in no loaded segment"),
    (_note_elf((0x100000020).to_bytes(8, "little"), paddr=0x100000000), "the PVH entry 0x100000020 is above 4 GiB"),
    (make_pvh_elf(paddr=0xC800_0000), r"kernel .*does not fit in guest RAM"),
]


@refused(BAD)
def test_bad_pvh_kernels_are_refused(image, message):
    assert_refused(image, message, pc_memory_map(4 << 30), format="pvh")


def test_a_note_that_runs_past_its_segment_is_refused():
    image = bytearray(_note_elf((0x100010).to_bytes(8, "little")))
    at = image.index(b"Xen\0") - 12
    struct.pack_into("<I", image, at + 4, 0x100)                   # descsz far past the segment
    with pytest.raises(LoaderError, match="a note in PT_NOTE 1 runs past its segment"):
        plan_image(source(bytes(image)), memory_map=MAP)


def test_other_notes_are_skipped():
    image = _note_elf((0x100010).to_bytes(4, "little"), name=b"Xenon")
    assert plan_image(source(image), memory_map=MAP).format == "elf64"


def test_one_initrd_only():
    with pytest.raises(LoaderError, match="a PVH kernel takes one initrd, not 2"):
        plan_image(source(make_pvh_elf()), memory_map=MAP, modules=[source(b"a"), source(b"b")])
