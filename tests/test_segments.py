"""Segments, descriptors and GDTs (pure Python, no KVM)."""

from __future__ import annotations

import struct
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm.x86 import bits
from pykvm.platform import layout
from pykvm.x86.state import MODES
from pykvm.x86.segments import (
    KERNEL_CS,
    KERNEL_DS,
    USER_CS,
    USER_DS,
    Gdt,
    Segment,
    flat_gdt,
    real_mode_segment,
    tss32,
    tss64,
    tss_size,
)
from pykvm.x86.state import describe_segment_type

# --- strategies -----------------------------------------------------------------


@st.composite
def segments(draw: st.DrawFn, base_bits: int = 32, system: bool | None = None) -> Segment:
    """Any segment an 8-byte (or, with base_bits=64, 16-byte) descriptor can hold."""
    g = draw(st.booleans())
    raw_limit = draw(st.integers(0, 0xFFFFF))
    present = draw(st.booleans())
    s = draw(st.booleans()) if system is None else not system
    return Segment(
        base=draw(st.integers(0, (1 << base_bits) - 1)),
        limit=(raw_limit << 12) | 0xFFF if g else raw_limit,
        type=draw(st.integers(0, 15)),
        present=present,
        dpl=draw(st.integers(0, 3)),
        db=draw(st.booleans()),
        s=s,
        l=draw(st.booleans()),
        g=g,
        avl=draw(st.booleans()),
        unusable=not present,  # not stored in a descriptor: decoding derives it
    )


# --- descriptor encode / decode -------------------------------------------------


@given(segments(), st.integers(0, 0xFFFF))
def test_descriptor_round_trip(segment: Segment, selector: int) -> None:
    raw = segment.descriptor()
    assert len(raw) == 8
    assert Segment.from_descriptor(raw, selector) == segment.with_selector(selector)
    assert Segment.from_descriptor(segment.descriptor_value()) == segment


@given(segments(base_bits=64, system=True))
def test_system_descriptor64_round_trip(segment: Segment) -> None:
    raw = segment.system_descriptor64()
    assert len(raw) == 16
    assert raw[12:] == bytes(4)  # reserved
    assert Segment.from_descriptor(raw) == segment


@given(segments())
def test_descriptor_fields_land_where_the_sdm_says(segment: Segment) -> None:
    value = segment.descriptor_value()
    raw_limit = segment.limit >> 12 if segment.g else segment.limit
    assert value & 0xFFFF == raw_limit & 0xFFFF
    assert (value >> 48) & 0xF == raw_limit >> 16
    assert (value >> 16) & 0xFFFFFF == segment.base & 0xFFFFFF
    assert value >> 56 == segment.base >> 24
    assert (value >> 40) & 0xF == segment.type
    assert (value >> 45) & 3 == segment.dpl
    assert bool(value & (1 << 47)) == segment.present


def _flat(type_: int, dpl: int = 0, l: bool = False) -> Segment:  # noqa: E741
    return Segment(limit=0xFFFFFFFF, type=type_, present=True, dpl=dpl, db=not l, s=True, l=l, g=True)


@pytest.mark.parametrize(
    ("segment", "expected"),
    [
        (_flat(0xB, l=True), 0x00AF9B000000FFFF),  # 64-bit code, ring 0
        (_flat(0xB), 0x00CF9B000000FFFF),  # 32-bit code, ring 0
        (_flat(0x3), 0x00CF93000000FFFF),  # data, ring 0
        (_flat(0xB, dpl=3, l=True), 0x00AFFB000000FFFF),  # 64-bit code, ring 3
        (_flat(0x3, dpl=3), 0x00CFF3000000FFFF),  # data, ring 3
        (Segment(limit=0xFFFF, type=0xB, present=True, s=True), 0x00009B000000FFFF),  # 16-bit code
        (Segment(base=0x2000, limit=0x67, type=0xB, present=True), 0x00008B0020000067),  # busy TSS
        (Segment.null(), 0),
    ],
)
def test_well_known_descriptors(segment: Segment, expected: int) -> None:
    assert segment.descriptor_value() == expected
    assert segment.descriptor() == struct.pack("<Q", expected)


def test_flat_gdt_descriptors_are_the_textbook_constants() -> None:
    assert bytes(flat_gdt("long", layout.TSS_ADDR).gdt)[8:24] == struct.pack("<QQ", 0x00AF9B000000FFFF, 0x00CF93000000FFFF)
    assert bytes(flat_gdt("protected", layout.TSS_ADDR).gdt)[8:24] == struct.pack("<QQ", 0x00CF9B000000FFFF, 0x00CF93000000FFFF)
    user = bytes(flat_gdt("long_user", layout.TSS_ADDR).gdt)
    assert struct.unpack_from("<4Q", user, 8) == (
        0x00AF9B000000FFFF,
        0x00CF93000000FFFF,
        0x00CFF3000000FFFF,
        0x00AFFB000000FFFF,
    )


def test_encoding_rejects_what_a_descriptor_cannot_hold() -> None:
    with pytest.raises(ValueError, match="G=1"):
        Segment(limit=0x100000).descriptor()  # byte limit above 1 MiB
    with pytest.raises(ValueError, match="0xfff"):
        Segment(limit=0x1000, g=True).descriptor()  # not a whole number of 4 KiB units
    with pytest.raises(ValueError, match="8-byte"):
        Segment(base=1 << 32).descriptor()
    with pytest.raises(ValueError, match="system"):
        Segment(s=True).system_descriptor64()
    with pytest.raises(ValueError):
        Segment(dpl=4)
    with pytest.raises(ValueError):
        Segment(type=16)
    with pytest.raises(ValueError):
        Segment.from_descriptor(bytes(7))


def test_kvm_segment_copy_both_ways() -> None:
    segment = _flat(0xB, dpl=3, l=True).with_selector(0x23)
    obj = SimpleNamespace(padding=0)
    segment.to_kvm(obj)
    assert obj.selector == 0x23 and obj.l == 1 and obj.db == 0 and obj.present == 1
    assert isinstance(obj.present, int) and not isinstance(obj.present, bool)
    assert Segment.from_kvm(obj) == segment


# --- the GDT ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_gdt_bytes_round_trip(mode: str) -> None:
    gdt = flat_gdt(mode, layout.TSS_ADDR).gdt
    decoded = Gdt.from_bytes(bytes(gdt), gdt.long_mode)
    assert list(decoded.entries()) == list(gdt.entries())
    assert bytes(decoded) == bytes(gdt)
    assert gdt.limit == len(bytes(gdt)) - 1


def test_long_user_gdt_layout_suits_sysret() -> None:
    flat = flat_gdt("long_user", layout.TSS_ADDR)
    gdt = flat.gdt
    assert (KERNEL_CS, KERNEL_DS, USER_DS, USER_CS) == (0x08, 0x10, 0x1B, 0x23)
    # SYSRET to 64-bit code: CS = STAR[63:48] + 16, SS = STAR[63:48] + 8, RPL forced to 3.
    star_sysret = KERNEL_DS
    assert USER_CS == (star_sysret + 16) | 3 and USER_DS == (star_sysret + 8) | 3
    assert gdt.segment(KERNEL_CS).l and gdt.segment(KERNEL_CS).dpl == 0
    assert gdt.segment(USER_CS).l and gdt.segment(USER_CS).dpl == 3
    assert flat.cs.selector == USER_CS and flat.cs.dpl == 3
    assert flat.ss.selector == USER_DS and flat.ss.dpl == 3
    assert flat.tr.selector == 0x28 and flat.tr.base == layout.TSS_ADDR and not flat.tr.s
    assert len(gdt) == 7  # the 64-bit TSS descriptor takes slots 5 and 6
    with pytest.raises(IndexError, match="upper half"):
        gdt.selector(6)


@pytest.mark.parametrize(
    ("mode", "cs", "ds", "tr", "cs_bits"),
    [
        ("protected", 0x08, 0x10, 0x18, "32-bit"),
        ("paged32", 0x08, 0x10, 0x18, "32-bit"),
        ("long", 0x08, 0x10, 0x18, "64-bit"),
        ("long_user", 0x23, 0x1B, 0x28, "64-bit"),
    ],
)
def test_flat_gdt_selectors(mode: str, cs: int, ds: int, tr: int, cs_bits: str) -> None:
    flat = flat_gdt(mode, layout.TSS_ADDR)
    assert (flat.cs.selector, flat.ds.selector, flat.ss.selector, flat.tr.selector) == (cs, ds, ds, tr)
    assert flat.cs.describe().startswith(f"code {cs_bits}")
    assert flat.tr.type == bits.SYS_TYPE_TSS_BUSY and flat.tr.limit == tss_size(mode) - 1
    assert flat.ldt.unusable
    for seg in (flat.cs, flat.ds, flat.ss, flat.tr):
        assert flat.gdt.segment(seg.selector) == seg


def test_real_mode_segments() -> None:
    flat = flat_gdt("real", layout.TSS_ADDR)
    assert flat.cs == real_mode_segment(0, code=True)
    seg = real_mode_segment(0x1234)
    assert (seg.base, seg.limit, seg.selector, seg.type) == (0x12340, 0xFFFF, 0x1234, 3)
    assert real_mode_segment(0xF000, code=True).type == 0xB
    assert not seg.db and not seg.g and seg.present and seg.s


def test_gdt_table_prints_decoded_types() -> None:
    text = str(flat_gdt("long_user", layout.TSS_ADDR).gdt)
    lines = text.splitlines()
    assert lines[0] == "GDT (IA-32e, 7 slots, limit 0x37)"
    assert lines[1].split() == ["index", "selector", "base", "limit", "type", "flags"]
    assert "code 64-bit DPL3 RX" in lines[6]
    assert "0x0020" in lines[6]
    assert "TSS 64-bit busy DPL0" in lines[7] and "(16 bytes)" in lines[7]
    assert "null" in lines[2]
    # the columns line up: every row's type column starts at the same place
    starts = {line.index("code") for line in lines if "code" in line}
    assert len(starts) == 1


@pytest.mark.parametrize(
    ("args", "text"),
    [
        ((0xB, True, 3, True, False), "code 64-bit DPL3 RX"),
        ((0x9, True, 0, False, True), "code 32-bit DPL0 X"),
        ((0xE, True, 0, False, False), "code 16-bit DPL0 RX conforming"),
        ((0x3, True, 0, False, True), "data 32-bit DPL0 RW"),
        ((0x5, True, 2, False, False), "data 16-bit DPL2 R expand-down"),
        ((0xB, False, 0, False, False), "TSS 32-bit busy DPL0"),
        ((0x2, False, 0, False, False), "LDT DPL0"),
        ((0x8, False, 0, False, False), "reserved system type 0x8 DPL0"),
    ],
)
def test_describe_segment_type(args: tuple[int, bool, int, bool, bool], text: str) -> None:
    assert describe_segment_type(*args) == text


def test_describe_long_mode_system_types() -> None:
    assert describe_segment_type(0x9, False, 0, False, False, long_mode=True) == "TSS 64-bit available DPL0"
    assert describe_segment_type(0xE, False, 0, False, False, long_mode=True) == "interrupt gate 64-bit DPL0"


# --- task-state segments ----------------------------------------------------------


def test_tss64_layout() -> None:
    tss = tss64(rsp0=0x6F000, ist=(0x5000,))
    assert len(tss) == 104
    assert struct.unpack_from("<Q", tss, 4)[0] == 0x6F000  # RSP0
    assert struct.unpack_from("<Q", tss, 36)[0] == 0x5000  # IST1
    assert struct.unpack_from("<H", tss, 102)[0] == 104  # I/O map base: no bitmap


def test_tss_io_bitmap() -> None:
    tss = tss64(rsp0=0, io_ports=0x800)
    assert len(tss) == 104 + 0x100 + 1
    assert tss[104:-1] == bytes(0x100) and tss[-1] == 0xFF
    assert tss_size("long_user") == 104 + 0x4000 // 8 + 1
    assert tss_size("long") == tss_size("protected") == 104
    assert len(tss32(0, 0, io_ports=8)) == 104 + 2
    with pytest.raises(ValueError):
        tss64(0, io_ports=7)


def test_tss32_layout() -> None:
    tss = tss32(esp0=0x6F000, ss0=0x10)
    assert len(tss) == 104
    assert struct.unpack_from("<IH", tss, 4) == (0x6F000, 0x10)
    assert struct.unpack_from("<H", tss, 102)[0] == 104
