"""Image loaders: plans from flat, ELF and Multiboot images; hostile images give LoaderError."""

from __future__ import annotations

import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm import guests
from pykvm.errors import LoaderError
from pykvm.loaders import detect_format, plan_image
from pykvm.loaders.multiboot import BOOTLOADER_MAGIC, HEADER_MAGIC


def make_elf64(code: bytes, paddr: int = 0x100000, vaddr: int | None = None, bss: int = 0) -> bytes:
    """A minimal ELF64 executable with one PT_LOAD segment."""
    vaddr = paddr if vaddr is None else vaddr
    ehdr = struct.pack("<4sBBBBB7sHHIQQQIHHHHHH", b"\x7fELF", 2, 1, 1, 0, 0, bytes(7),
                       2, 62, 1, vaddr, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    phdr = struct.pack("<IIQQQQQQ", 1, 5, 120, vaddr, paddr, len(code), len(code) + bss, 0x1000)
    return ehdr + phdr + code


def test_detect_formats():
    assert detect_format(guests.path("hello64").read_bytes()) == "flat"
    assert detect_format(guests.path("bench32").read_bytes()) == "multiboot"
    assert detect_format(make_elf64(b"\xf4")) == "elf"


def test_elf_plan_uses_physical_addresses_and_bss():
    plan = plan_image(make_elf64(b"\x90\xf4", paddr=0x200000, vaddr=0xFFFF_FFFF_8020_0000, bss=0x100))
    assert plan.format == "elf64" and plan.mode == "long"
    assert plan.entry == 0x200000
    (seg,) = plan.segments
    assert (seg.gpa, seg.data, seg.memsize) == (0x200000, b"\x90\xf4", 0x102)


def test_multiboot_plan_of_bench32():
    image = guests.patch_bench_params(guests.path("bench32").read_bytes(), 1, 50)
    plan = plan_image(image, memory_size=64 << 20, cmdline="console=ttyS0")
    assert plan.format == "multiboot" and plan.mode == "protected"
    assert plan.regs == {"rax": BOOTLOADER_MAGIC, "rbx": 0x6000}
    info = plan.extra_writes[0].data
    flags, mem_lower, mem_upper, _, cmdline_addr = struct.unpack_from("<IIIII", info)
    assert flags & 0b101 == 0b101 and mem_lower == 639 and mem_upper == (63 << 20) // 1024
    assert info[cmdline_addr - 0x6000:].startswith(b"console=ttyS0\0")


BAD = [
    (b"", "empty"),
    (b"\x7fELF" + bytes(60), "little-endian"),
    (b"\x7fELF\x03\x01" + bytes(60), "class"),
    (make_elf64(b"\xf4")[:100], "past the end"),
    (make_elf64(b"\xf4").replace(b"\x3e\x00", b"\x28\x00", 1), "not x86"),
]


@pytest.mark.parametrize("image, message", BAD)
def test_malformed_images_are_rejected(image, message):
    with pytest.raises(LoaderError, match=message):
        plan_image(image)


def test_multiboot_requiring_unknown_features_is_rejected():
    flags = 1 << 3  # a required feature bit pykvm does not provide
    header = struct.pack("<III", HEADER_MAGIC, flags, (-(HEADER_MAGIC + flags)) & 0xFFFFFFFF)
    with pytest.raises(LoaderError, match="requires features"):
        plan_image(header + bytes(64))


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=400), st.sampled_from([b"\x7fELF\x02\x01", b"\x7fELF\x01\x01", b""]))
def test_hostile_images_raise_only_loader_errors(tail, prefix):
    image = prefix + tail
    try:
        plan = plan_image(image, memory_size=16 << 20)
    except LoaderError:
        return
    for seg in plan.segments:  # whatever was accepted is self-consistent
        assert seg.memsize >= len(seg.data) and seg.gpa >= 0


@settings(max_examples=200)
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1),
       st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 200))
def test_hostile_multiboot_headers(header_addr, load_addr, load_end, bss_end, entry, pad):
    flags = 1 << 16
    header = struct.pack("<IIIIIIII", HEADER_MAGIC, flags, (-(HEADER_MAGIC + flags)) & 0xFFFFFFFF,
                         header_addr, load_addr, load_end, bss_end, entry)
    try:
        plan = plan_image(bytes(pad * 4) + header + bytes(32), memory_size=16 << 20)
    except LoaderError:
        return
    (seg,) = plan.segments
    assert seg.gpa == load_addr and seg.gpa <= plan.entry < seg.gpa + seg.memsize


@pytest.mark.kvm
def test_elf_guest_runs():
    from pykvm.machine import Machine

    code = guests.path("hello64").read_bytes()
    with Machine(memory="16M") as m:
        m.load_image(make_elf64(code))
        result = m.run(timeout=10)
    assert result.ended == "hlt"
    assert result.serial_text.endswith(f"checksum 0x{zlib.adler32(code):08x}\n")


@pytest.mark.kvm
def test_multiboot_kernel_runs_with_its_parameter_block():
    from pykvm.machine import Machine

    image = guests.patch_bench_params(guests.path("bench32").read_bytes(), 1, 50)  # 50 port writes
    with Machine(memory="16M") as m:
        loaded = m.load_image(image)
        assert loaded["format"] == "multiboot"
        result = m.run(timeout=10)
    assert result.ended == "debug-exit" and result.exit_status == 1  # it wrote 0 to port 0xf4
    assert result.exits["io"]["total"] == 51
    assert result.regs["rax"] == 50


@pytest.mark.kvm
def test_segment_outside_memory_is_rejected_before_writing():
    from pykvm.machine import Machine

    with Machine(memory="4M") as m:
        with pytest.raises(LoaderError, match="does not fit"):
            m.load_image(make_elf64(b"\xf4", paddr=0x800000))
        with pytest.raises(LoaderError, match="overlaps pykvm's tables"):
            m.load_image(make_elf64(b"\xf4", paddr=0x10000))
