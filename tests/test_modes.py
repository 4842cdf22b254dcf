"""setup_mode() and the register decoders (pure Python: a fake vCPU, no KVM).

The fake vCPU hands out ``struct kvm_sregs``/``kvm_regs``-like namespaces
with KVM's reset values, as a real ``Vcpu`` would; guest memory is a
bytearray.  For each mode we check the control registers, the segment
registers, and that the GDT, TSS and page tables written into memory agree
with what was put in the registers.
"""

from __future__ import annotations

import struct
from types import SimpleNamespace
from typing import Any

import pytest

from pykvm.x86 import bits
from pykvm.platform import layout
from pykvm.platform.cpu_tables import GUEST_TABLES
from pykvm.x86.state import MODES
from pykvm.x86.modes import ModeNotSupported, ModeSetup, mode_registers, setup_mode
from pykvm.x86.paging import translate
from pykvm.x86.segments import USER_IO_PORTS, Gdt, Segment, tss_size
from pykvm.x86.state import (
    cpl,
    cpu_mode_name,
    decode_cr0,
    decode_cr4,
    decode_efer,
    decode_rflags,
    format_regs,
    format_sregs,
)

SEGMENT_REGS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


def _kvm_segment(**fields: int) -> SimpleNamespace:
    seg = {"base": 0, "limit": 0xFFFF, "selector": 0, "type": 3, "present": 1, "dpl": 0,
           "db": 0, "s": 1, "l": 0, "g": 0, "avl": 0, "unusable": 0, "padding": 0}
    seg.update(fields)
    return SimpleNamespace(**seg)


class FakeVcpu:
    """Enough of pykvm's Vcpu for setup_mode, starting from KVM's reset state."""

    def __init__(self) -> None:
        segs = {name: _kvm_segment() for name in SEGMENT_REGS}
        segs["cs"] = _kvm_segment(selector=0xF000, base=0xFFFF0000, type=0xB)
        segs["tr"] = _kvm_segment(type=0xB, s=0)
        segs["ldt"] = _kvm_segment(type=2, s=0)
        self.sregs = SimpleNamespace(
            **segs,
            gdt=SimpleNamespace(base=0, limit=0xFFFF),
            idt=SimpleNamespace(base=0, limit=0xFFFF),
            cr0=0x60000010, cr2=0, cr3=0, cr4=0, cr8=0, efer=0, apic_base=0xFEE00900,
            interrupt_bitmap=[0, 0, 0, 0],
        )
        self.regs = SimpleNamespace(**{r: 0 for r in GPRS}, rip=0xFFF0, rflags=0x2)
        self.regs.rdx = 0x600  # KVM puts the CPU signature in RDX at reset
        self.calls: list[str] = []

    def get_sregs(self) -> SimpleNamespace:
        self.calls.append("get_sregs")
        return self.sregs

    def set_sregs(self, sregs: SimpleNamespace) -> None:
        self.calls.append("set_sregs")
        self.sregs = sregs

    def get_regs(self) -> SimpleNamespace:
        self.calls.append("get_regs")
        return self.regs

    def set_regs(self, regs: SimpleNamespace) -> None:
        self.calls.append("set_regs")
        self.regs = regs


class FakeMemory:
    """2 MiB of guest RAM in a bytearray."""

    def __init__(self, size: int = 2 << 20) -> None:
        self.data = bytearray(size)

    def write(self, gpa: int, data: bytes) -> None:
        assert gpa + len(data) <= len(self.data), f"write past RAM at {gpa:#x}"
        self.data[gpa : gpa + len(data)] = data

    def read(self, gpa: int, size: int) -> bytes:
        return bytes(self.data[gpa : gpa + size])


def _setup(mode: str, **kwargs: Any) -> tuple[FakeVcpu, FakeMemory, ModeSetup]:
    vcpu, memory = FakeVcpu(), FakeMemory()
    result = setup_mode(mode, vcpu, memory, layout.load_address(mode), tables=GUEST_TABLES, **kwargs)
    return vcpu, memory, result


EXPECTED = {
    # mode: (cr0 flags, cr4 flags, efer flags, cs selector, cs L, cs D, cpu_mode_name)
    "real": ({"ET", "NW", "CD"}, set(), set(), 0x0000, 0, 0, "real"),
    "protected": ({"PE", "MP", "ET", "NE"}, {"OSFXSR", "OSXMMEXCPT"}, set(), 0x08, 0, 1, "protected 32-bit"),
    "paged32": ({"PE", "MP", "ET", "NE", "WP", "PG"}, {"PSE", "OSFXSR", "OSXMMEXCPT"}, set(), 0x08, 0, 1,
                "paged 32-bit"),
    "long": ({"PE", "MP", "ET", "NE", "WP", "PG"}, {"PAE", "OSFXSR", "OSXMMEXCPT"}, {"LME", "LMA"}, 0x08, 1, 0,
             "long 64-bit"),
    "long_user": ({"PE", "MP", "ET", "NE", "WP", "PG"}, {"PAE", "OSFXSR", "OSXMMEXCPT"}, {"LME", "LMA"}, 0x23, 1, 0,
                  "long 64-bit"),
}


@pytest.mark.parametrize("mode", MODES)
def test_control_registers_and_cs(mode: str) -> None:
    vcpu, _, result = _setup(mode)
    s = vcpu.sregs
    cr0, cr4, efer, cs_sel, cs_l, cs_db, name = EXPECTED[mode]
    assert set(decode_cr0(s.cr0)) == cr0
    assert set(decode_cr4(s.cr4)) == cr4
    assert set(decode_efer(s.efer)) == efer
    assert (s.cr0, s.cr4, s.efer) == mode_registers(mode) == (result.cr0, result.cr4, result.efer)
    assert (s.cs.selector, s.cs.l, s.cs.db) == (cs_sel, cs_l, cs_db)
    assert cpu_mode_name(s.cr0, s.cr4, s.efer, bool(s.cs.l), bool(s.cs.db)) == name
    # set, then read back to check KVM kept the mode's bits
    assert vcpu.calls == ["get_sregs", "set_sregs", "get_sregs", "get_regs", "set_regs"]


def test_real_mode_state() -> None:
    vcpu, memory, result = _setup("real", args=(7, 9))
    s, r = vcpu.sregs, vcpu.regs
    assert s.cr0 == 0x60000010 and s.cr3 == 0
    for name in ("cs", "ds", "es", "fs", "gs", "ss"):
        seg = getattr(s, name)
        assert (seg.selector, seg.base, seg.limit, seg.present, seg.s) == (0, 0, 0xFFFF, 1, 1)
        assert seg.type == (0xB if name == "cs" else 0x3)
    assert (r.rip, r.rsp, r.rflags, r.rdi, r.rsi) == (0x8000, 0x7C00, 0x2, 7, 9)
    assert r.rdx == 0x600  # untouched
    assert not any(memory.data)  # nothing written: real mode needs no tables
    assert result.gdt is None and result.page_tables is None


def test_real_mode_entry_above_64k_uses_a_segment() -> None:
    vcpu, memory = FakeVcpu(), FakeMemory()
    setup_mode("real", vcpu, memory, entry=0x12345, stack=0x9F000, tables=GUEST_TABLES)
    assert (vcpu.sregs.cs.selector, vcpu.sregs.cs.base, vcpu.regs.rip) == (0x1000, 0x10000, 0x2345)
    assert (vcpu.sregs.ss.selector, vcpu.sregs.ss.base, vcpu.regs.rsp) == (0x9000, 0x90000, 0xF000)
    with pytest.raises(ValueError, match="1 MiB"):
        setup_mode("real", vcpu, memory, entry=0x100000, tables=GUEST_TABLES)


@pytest.mark.parametrize("mode", ["protected", "paged32", "long", "long_user"])
def test_gdt_in_memory_matches_the_segment_registers(mode: str) -> None:
    vcpu, memory, result = _setup(mode)
    s = vcpu.sregs
    assert (s.gdt.base, s.idt.base, s.idt.limit) == (layout.GDT_ADDR, layout.IDT_ADDR, 0)
    long_mode = mode.startswith("long")
    gdt = Gdt.from_bytes(memory.read(s.gdt.base, s.gdt.limit + 1), long_mode=long_mode)
    assert result.gdt is not None and bytes(gdt) == bytes(result.gdt)
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr"):
        in_register = Segment.from_kvm(getattr(s, name))
        # what the CPU would load from the GDT for that selector:
        assert gdt.segment(in_register.selector) == in_register, name
    assert s.ldt.unusable == 1 and s.ldt.selector == 0
    tr = Segment.from_kvm(s.tr)
    assert (tr.base, tr.limit, tr.type, tr.s) == (layout.TSS_ADDR, tss_size(mode) - 1, bits.SYS_TYPE_TSS_BUSY, False)
    assert tr.base + tr.limit < layout.IDT_ADDR


@pytest.mark.parametrize("mode", ["protected", "paged32", "long", "long_user"])
def test_registers(mode: str) -> None:
    vcpu, _, result = _setup(mode, args=(0x1111, 0x2222))
    r = vcpu.regs
    assert (r.rip, r.rsp, r.rdi, r.rsi) == (0x100000, layout.STACK_TOP, 0x1111, 0x2222)
    assert r.rflags == (0x3002 if mode == "long_user" else 0x2)
    assert (result.rip, result.rsp, result.args) == (r.rip, r.rsp, (0x1111, 0x2222))


def test_long_user_privilege() -> None:
    vcpu, memory, _ = _setup("long_user")
    s = vcpu.sregs
    assert (s.cs.selector & 3, s.cs.dpl, s.ss.selector & 3, s.ss.dpl) == (3, 3, 3, 3)
    assert cpl(s.cs.selector) == cpl(s.cs.selector, s.ss.dpl) == 3
    assert "IOPL=3" in decode_rflags(vcpu.regs.rflags)
    rsp0 = struct.unpack_from("<Q", memory.data, layout.TSS_ADDR + 4)[0]
    assert rsp0 == layout.KERNEL_STACK_TOP == 0x6F000
    # I/O permission bitmap right after the fixed part: ports 0..0x3fff allowed
    iomap = layout.TSS_ADDR + struct.unpack_from("<H", memory.data, layout.TSS_ADDR + 102)[0]
    assert iomap == layout.TSS_ADDR + 104
    limit = vcpu.sregs.tr.limit
    assert limit == 104 + USER_IO_PORTS // 8  # the limit covers the 0xff end byte
    for port in (layout.I8042_COMMAND_PORT, layout.COM1_PORT, layout.BENCH_PORT, 0xCF8, USER_IO_PORTS - 1):
        assert memory.data[iomap + port // 8] >> (port % 8) & 1 == 0, hex(port)
    assert memory.data[layout.TSS_ADDR + limit] == 0xFF


def test_kernel_modes_have_no_io_bitmap() -> None:
    for mode in ("protected", "long"):
        vcpu, memory, _ = _setup(mode)
        assert vcpu.sregs.tr.limit == 103
        assert struct.unpack_from("<H", memory.data, layout.TSS_ADDR + 102)[0] == 104  # past the limit


class PvmLikeVcpu(FakeVcpu):
    """Drops CR0.PG outside long mode, as kvm_pvm nested hosts do."""

    def set_sregs(self, sregs: SimpleNamespace) -> None:
        if not sregs.efer & bits.EFER_LME:
            sregs.cr0 &= ~bits.CR0_PG
        super().set_sregs(sregs)


def test_dropped_paging_is_reported() -> None:
    with pytest.raises(ModeNotSupported, match=r"CR0 0x80010033 -> 0x10033 \(PG changed\).*long mode"):
        setup_mode("paged32", PvmLikeVcpu(), FakeMemory(), layout.LOAD_ADDR, tables=GUEST_TABLES)
    for mode in ("real", "protected", "long", "long_user"):  # these keep their bits
        setup_mode(mode, PvmLikeVcpu(), FakeMemory(), layout.load_address(mode), tables=GUEST_TABLES)


def test_protected_tss_has_ring0_stack() -> None:
    _, memory, _ = _setup("protected")
    esp0, ss0 = struct.unpack_from("<IH", memory.data, layout.TSS_ADDR + 4)
    assert (esp0, ss0) == (layout.KERNEL_STACK_TOP, 0x10)


@pytest.mark.parametrize(
    ("mode", "page_size", "tables", "user"),
    [("paged32", 4 << 20, 1, False), ("long", 2 << 20, 6, False), ("long_user", 2 << 20, 6, True)],
)
def test_page_tables_identity_map_4gib(mode: str, page_size: int, tables: int, user: bool) -> None:
    vcpu, memory, result = _setup(mode)
    s = vcpu.sregs
    assert s.cr3 == layout.PAGE_TABLES_START == result.cr3
    assert result.page_tables is not None
    start, end = result.page_tables
    assert (start, (end - start) // 4096) == (layout.PAGE_TABLES_START, tables)
    assert end <= layout.PAGE_TABLES_END
    for gva in (0, layout.load_address(mode), layout.STACK_TOP - 8, layout.MMIO_BENCH_ADDR, 0xFFFF_F000):
        t = translate(memory.read, s, gva)
        assert t.gpa == gva and t.page_size == page_size and t.writable
        assert t.user == user
        if user:
            assert all("US" in step.flags for step in t.levels)  # U/S=1 at every level
    if mode.startswith("long"):
        assert translate(memory.read, s, 1 << 32).fault_level == "PDPT"


def test_unknown_mode() -> None:
    with pytest.raises(ValueError, match="long_user"):
        setup_mode("unreal", FakeVcpu(), FakeMemory(), 0, tables=GUEST_TABLES)


def test_setup_prints_a_summary() -> None:
    vcpu, _, result = _setup("long_user")
    text = str(result)
    assert text.startswith("mode long_user")
    assert "PE MP ET NE WP PG" in text and "LME LMA" in text and "IOPL=3" in text
    assert "code 64-bit DPL3 RX" in text and "TSS 64-bit busy DPL0" in text
    sregs_text = format_sregs(vcpu.sregs)
    assert sregs_text.splitlines()[0] == "mode: long 64-bit, CPL 3"
    assert "null (unusable)" in sregs_text
    assert "rflags 0x3002 [IOPL=3]" in format_regs(vcpu.regs)


# --- pure decoders ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "name"),
    [
        ((0x60000010, 0, 0, False, False), "real"),
        ((0x11, 0, 0, False, False), "protected 16-bit"),
        ((0x11, 0, 0, False, True), "protected 32-bit"),
        ((0x80000011, 0x10, 0, False, True), "paged 32-bit"),
        ((0x80000011, 0x20, 0, False, True), "PAE 32-bit"),
        ((0x80000011, 0x20, 0x500, True, False), "long 64-bit"),
        ((0x80000011, 0x20, 0x500, False, True), "compatibility"),
        ((0x80000011, 0x20, 0x100, False, True), "PAE 32-bit"),  # LME without LMA: not yet long
    ],
)
def test_cpu_mode_name(args: tuple[int, int, int, bool, bool], name: str) -> None:
    assert cpu_mode_name(*args) == name


def test_virtual_8086() -> None:
    assert cpu_mode_name(0x11, 0, 0, False, False, rflags=bits.RFLAGS_VM | 2) == "virtual-8086"


def test_decoders() -> None:
    assert decode_rflags(0x2) == []
    assert decode_rflags(0x246) == ["PF", "ZF", "IF"]
    assert decode_rflags(0x3202) == ["IF", "IOPL=3"]
    assert decode_rflags(0x4_7000) == ["IOPL=3", "NT", "AC"]
    assert decode_cr0(0x80000011) == ["PE", "ET", "PG"]
    assert decode_cr4(0x20 | (1 << 30)) == ["PAE", "bit30"]  # unknown bits stay visible
    assert decode_efer(0xD01) == ["SCE", "LME", "LMA", "NXE"]
    assert cpl(0x2B) == 3 and cpl(0x08) == 0 and cpl(0x08, ss_dpl=3) == 3


@pytest.mark.parametrize("mode, page_size", [("paged32", 4 << 20), ("long", 2 << 20), ("long_user", 2 << 20)])
def test_closed_form_identity_tables_are_the_builders(mode, page_size):
    """setup_mode's identity map, written out, is byte for byte what the general page-table builder makes."""
    from pykvm.x86.modes import identity_tables
    from pykvm.x86.paging import PageTables4Level, PageTables32

    written = {}
    builder_class = PageTables32 if mode == "paged32" else PageTables4Level
    builder = builder_class(lambda gpa, data: written.__setitem__(gpa, bytes(data)), 0x30000, 0x40000)
    builder.map(0, 0, 1 << 32, page_size=page_size, user=mode == "long_user")
    assert identity_tables(mode, 0x30000, 0x40000) == (builder.cr3, builder.region_used,
                                                       tuple(sorted(written.items())))


def test_identity_tables_refuse_a_region_too_small():
    from pykvm.errors import PageTableError
    from pykvm.x86.modes import identity_tables

    with pytest.raises(PageTableError, match="needs 6 table pages"):
        identity_tables("long", 0x30000, 0x33000)
