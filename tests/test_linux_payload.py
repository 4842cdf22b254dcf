"""A bzImage's payload unpacked by the host (pykvm.loaders.linux_payload): plans, fallbacks, damaged payloads."""

from __future__ import annotations

import lzma
import struct

import pytest

from loader_images import MiB, GuestView, assert_placement_rules, make_bzimage, make_elf, pc_memory_map, source
from pykvm.errors import LoaderError
from pykvm.loaders import plan_image
from pykvm.loaders.linux_payload import payload_codec

MAP = pc_memory_map(128 * MiB)
TEXT = b"\x90" * 0x100 + b"\xf4"


def bzimage_with(payload: bytes, *, version: int = 0x20F, init_size: int = 0x800000, xloadflags: int = 0x01) -> bytes:
    stub = b"\xf4" * 0x200
    image = bytearray(make_bzimage(version=version, init_size=init_size, xloadflags=xloadflags,
                                   payload=stub + payload))
    struct.pack_into("<II", image, 0x248, len(stub), len(payload))
    return bytes(image)


def vmlinux(bits: int = 64) -> bytes:
    # text at 16 MiB, data (and .bss) at 18 MiB, as a vmlinux's physical layout; the entry is physical
    high = 0xFFFFFFFF80000000 if bits == 64 else 0xC0000000
    loads = [(0x1000000, high + 0x1000000, TEXT, 0x100000), (0x1200000, high + 0x1200000, b"DATA", 0x80000)]
    return make_elf(loads, entry=0x1000000, bits=bits)


def test_xz_payload_is_unpacked_and_its_segments_load_at_their_physical_addresses():
    image = bzimage_with(lzma.compress(vmlinux(), format=lzma.FORMAT_XZ) + b"SIZE")  # the kernel appends a size
    plan = plan_image(source(image), memory_map=MAP, cmdline="console=ttyS0",
                      modules=[source(b"initrd" * 100, "initrd")])
    assert (plan.cpu, plan.entry) == ("linux64", 0x1000000)
    text, data, initrd, zero_page, _ = plan.segments
    assert (text.gpa, text.memsize, data.gpa, data.memsize) == (0x1000000, 0x100000, 0x1200000, 0x80000)
    assert "xz payload unpacked by pykvm" in plan.notes
    view = GuestView(plan)
    assert view.read(0x1000100, 1) == b"\xf4" and view.read(0x1200000, 4) == b"DATA"
    assert view.u32(zero_page.gpa + 0x214) == 0x1000000        # code32_start: where the kernel is
    assert plan.regs == {"rsi": zero_page.gpa}
    assert_placement_rules(plan, MAP)


def test_linux_decompressor_format_keeps_the_boot_protocol_entry():
    image = bzimage_with(lzma.compress(vmlinux(), format=lzma.FORMAT_XZ))
    plan = plan_image(source(image), memory_map=MAP, format="linux-decompressor")
    assert (plan.cpu, plan.entry) == ("linux64", 0x1000200)
    assert plan.segments[0].what == "kernel and its init_size room"


@pytest.mark.parametrize("payload, why", [
    (b"\x02\x21\x4c\x18" + bytes(60), "this Python cannot decompress lz4"),
    (b"\x90" * 64, "the payload's codec is unknown"),
])
def test_payloads_pykvm_cannot_unpack_fall_back_to_the_kernels_decompressor(payload, why):
    plan = plan_image(source(bzimage_with(payload)), memory_map=MAP)
    assert (plan.cpu, plan.entry) == ("linux64", 0x1000200)
    assert why in plan.notes and "its own decompressor runs" in plan.notes


def test_32_bit_kernels_are_not_unpacked():
    xz = lzma.compress(vmlinux(), format=lzma.FORMAT_XZ)
    for image in (bzimage_with(xz, xloadflags=0), bzimage_with(xz, version=0x20B)):  # no XLF_KERNEL_64 before 2.12
        plan = plan_image(source(image), memory_map=MAP)
        assert plan.cpu == "linux32" and "unpacked" not in plan.notes


@pytest.mark.parametrize("payload, message", [
    (b"\xfd7zXZ\x00" + b"garbage" * 10, "the xz payload does not decompress"),
    (lzma.compress(vmlinux(), format=lzma.FORMAT_XZ)[:-40], "the xz payload is truncated"),
    (lzma.compress(b"not an ELF" * 10, format=lzma.FORMAT_XZ), "is not an ELF"),
    (lzma.compress(vmlinux(bits=32), format=lzma.FORMAT_XZ), "ELF32, not a 64-bit vmlinux"),
    (lzma.compress(bytes(0x900000), format=lzma.FORMAT_XZ), "unpacks to more than 0x800000 bytes"),
])
def test_damaged_payloads_are_refused(payload, message):
    with pytest.raises(LoaderError, match=message):
        plan_image(source(bzimage_with(payload)), memory_map=MAP)


def test_codec_magic_numbers():
    assert [payload_codec(m) for m in (b"\x1f\x8b\x08", b"\xfd7zXZ\x00\x00", b"BZh9", b"\x28\xb5\x2f\xfd",
                                       b"\x5d\x00\x00\x80", b"\x89LZO\x00", b"MZ")] == [
        "gzip", "xz", "bzip2", "zstd", "lzma", "lzo", None]
