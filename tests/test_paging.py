"""Page-table builders and the page walker (pure Python, no KVM).

The walker is checked against an independent model: the list of pages the
test asked to map.  An address inside a mapped page must translate to the
page's gpa with its permissions; any other address must fault at the first
level whose entry covers no mapped page.
"""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm.x86 import bits
from pykvm.x86.paging import (
    GiB1,
    GiB4,
    KiB4,
    MiB2,
    MiB4,
    PageTableError,
    PageTables4Level,
    PageTables32,
    PageTablesPae,
    build_identity_4level,
    build_identity_32bit,
    build_identity_pae,
    is_canonical,
    page_table_builder,
    paging_mode_of,
    translate,
    walk,
)


class SparseMemory:
    """Guest memory as a dict of 4 KiB pages; unwritten memory reads as 0."""

    def __init__(self) -> None:
        self.pages: dict[int, bytearray] = {}
        self.writes = 0

    def write(self, gpa: int, data: bytes) -> None:
        self.writes += 1
        done = 0
        while done < len(data):
            address = gpa + done
            offset = address & 0xFFF
            n = min(len(data) - done, 4096 - offset)
            page = self.pages.setdefault(address >> 12, bytearray(4096))
            page[offset : offset + n] = data[done : done + n]
            done += n

    def read(self, gpa: int, size: int) -> bytes:
        out = bytearray()
        while len(out) < size:
            address = gpa + len(out)
            offset = address & 0xFFF
            n = min(size - len(out), 4096 - offset)
            out += self.pages.get(address >> 12, bytes(4096))[offset : offset + n]
        return bytes(out)


TABLES = 0x10000  # where tests put page tables

# format -> (builder class, page sizes, level names, level shifts)
FORMATS = {
    "32bit": (PageTables32, (KiB4, MiB4), ("PD", "PT"), (22, 12)),
    "pae": (PageTablesPae, (KiB4, MiB2), ("PDPT", "PD", "PT"), (30, 21, 12)),
    "4level": (PageTables4Level, (KiB4, MiB2, GiB1), ("PML4", "PDPT", "PD", "PT"), (39, 30, 21, 12)),
}


# --- identity maps --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("build", "mode", "size", "page_size", "tables"),
    [
        (build_identity_32bit, "32bit", GiB4, MiB4, 1),
        (build_identity_32bit, "32bit", 16 << 20, KiB4, 5),
        (build_identity_pae, "pae", GiB4, MiB2, 5),
        (build_identity_pae, "pae", 8 << 20, KiB4, 6),
        (build_identity_4level, "4level", GiB4, MiB2, 6),
        (build_identity_4level, "4level", GiB4, GiB1, 2),
        (build_identity_4level, "4level", 8 << 20, KiB4, 7),
    ],
)
def test_identity_maps(build: Callable[..., int], mode: str, size: int, page_size: int, tables: int) -> None:
    mem = SparseMemory()
    cr3 = build(mem.write, TABLES, size=size, page_size=page_size)
    assert cr3 == TABLES
    assert len(mem.pages) == tables  # exactly the table pages were written
    for gva in (0, 0x1234, 0x100000, size // 2 + 0x777, size - 1):
        t = walk(mem.read, cr3, gva, mode)
        assert t.gpa == gva, t
        assert t.page_size == page_size
        assert t.writable and not t.user and not t.nx
    outside = walk(mem.read, cr3, size, mode)
    if size < GiB4:
        assert outside.gpa is None and outside.fault_level is not None


@given(st.integers(0, GiB4 - 1))
def test_identity_4level_user_every_level(gva: int) -> None:
    mem = SparseMemory()
    cr3 = build_identity_4level(mem.write, TABLES, user=True)
    t = walk(mem.read, cr3, gva, "4level")
    assert t.gpa == gva and t.user
    assert [step.name for step in t.levels] == ["PML4", "PDPT", "PD"]
    assert all("US" in step.flags for step in t.levels)


# --- random non-identity mappings, checked against a model ---------------------------


def _sign_extend48(value: int) -> int:
    return value | (0xFFFF << 48) if value & (1 << 47) else value


@st.composite
def mappings(draw: st.DrawFn, mode: str) -> list[tuple[int, int, int, bool, bool, bool]]:
    """A list of (gva, gpa, page_size, writable, user, nx) single pages."""
    _, sizes, _, _ = FORMATS[mode]
    result = []
    # Cluster addresses in a few regions so tables get shared and conflicts happen.
    if mode == "4level":
        regions = draw(st.lists(st.integers(0, (1 << 48) - 1), min_size=1, max_size=3))
        regions = [_sign_extend48(r) & ~(GiB1 * 4 - 1) for r in regions]
        span = 1 << 34
    else:
        regions = draw(st.lists(st.integers(0, 3), min_size=1, max_size=3))
        regions = [r * GiB1 for r in regions]
        span = GiB1
    for _ in range(draw(st.integers(1, 12))):
        size = draw(st.sampled_from(sizes))
        base = draw(st.sampled_from(regions))
        gva = (base + draw(st.integers(0, span - 1))) & ~(size - 1)
        if mode == "4level":
            gva = _sign_extend48(gva & ((1 << 48) - 1))
        gpa_bits = 32 if (mode == "32bit" and size == KiB4) else (40 if mode == "32bit" else 46)
        gpa = draw(st.integers(0, (1 << gpa_bits) - 1)) & ~(size - 1)
        nx = draw(st.booleans()) if mode != "32bit" else False
        result.append((gva, gpa, size, draw(st.booleans()), draw(st.booleans()), nx))
    return result


def _overlaps(a: int, a_size: int, b: int, b_size: int) -> bool:
    return a < b + b_size and b < a + a_size


def _check_against_model(mode: str, pages: list[tuple[int, int, int, bool, bool, bool]], probes: list[int]) -> None:
    cls, _, names, shifts = FORMATS[mode]
    mem = SparseMemory()
    builder = cls(mem.write, TABLES)
    model: dict[int, tuple[int, int, bool, bool, bool]] = {}  # gva -> (size, gpa, w, u, nx)
    for gva, gpa, size, writable, user, nx in pages:
        conflict = any(
            _overlaps(gva, size, g, s) and (g, s) != (gva, size) for g, (s, *_rest) in model.items()
        )
        if conflict:
            before = dict(mem.pages)
            with pytest.raises(PageTableError):
                builder.map(gva, gpa, size, writable=writable, user=user, nx=nx, page_size=size)
            assert {k: bytes(v) for k, v in mem.pages.items()} == {k: bytes(v) for k, v in before.items()}
            continue
        builder.map(gva, gpa, size, writable=writable, user=user, nx=nx, page_size=size)
        model[gva] = (size, gpa, writable, user, nx)

    for gva, (size, gpa, writable, user, nx) in model.items():
        for offset in (0, size - 1, (size // 3) & ~7):
            t = walk(mem.read, builder.cr3, gva + offset, mode)
            assert t.gpa == gpa + offset, str(t)
            assert (t.page_size, t.writable, t.user, t.nx) == (size, writable, user, nx)
            assert t.levels[-1].leaf and t.levels[-1].target == gpa
            assert [s.name for s in t.levels] == list(names[: len(t.levels)])

    for probe in probes:
        hit = [(g, v) for g, v in model.items() if g <= probe < g + v[0]]
        t = walk(mem.read, builder.cr3, probe, mode)
        if hit:
            (g, (size, gpa, *_)), = hit
            assert t.gpa == gpa + probe - g
            continue
        assert t.gpa is None
        # first level whose entry covers no mapped page at all
        for level, (name, shift) in enumerate(zip(names, shifts, strict=True)):
            lo = probe & ~((1 << shift) - 1)
            if not any(_overlaps(lo, 1 << shift, g, v[0]) for g, v in model.items()):
                assert t.fault_level == name, str(t)
                assert len(t.levels) == level + 1
                assert "not present" in (t.fault or "")
                break
        else:  # pragma: no cover - an unmapped probe must fault somewhere
            raise AssertionError(str(t))


def _probes(mode: str) -> st.SearchStrategy[list[int]]:
    if mode == "4level":
        return st.lists(st.integers(0, (1 << 48) - 1).map(_sign_extend48), max_size=20)
    return st.lists(st.integers(0, GiB4 - 1), max_size=20)


_SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(st.data())
def test_random_mappings_32bit(data: st.DataObject) -> None:
    _check_against_model("32bit", data.draw(mappings("32bit")), data.draw(_probes("32bit")))


@_SETTINGS
@given(st.data())
def test_random_mappings_pae(data: st.DataObject) -> None:
    _check_against_model("pae", data.draw(mappings("pae")), data.draw(_probes("pae")))


@_SETTINGS
@given(st.data())
def test_random_mappings_4level(data: st.DataObject) -> None:
    _check_against_model("4level", data.draw(mappings("4level")), data.draw(_probes("4level")))


@_SETTINGS
@given(st.data())
def test_probes_near_mapped_pages_4level(data: st.DataObject) -> None:
    """Probe just outside mapped pages too: neighbours share upper tables."""
    pages = data.draw(mappings("4level"))
    probes = []
    for gva, _, size, *_ in pages:
        for delta in (-1, size, size + KiB4, -MiB2, size + GiB1):
            probe = gva + delta
            if 0 <= probe < 1 << 64 and is_canonical(probe):
                probes.append(probe)
    _check_against_model("4level", pages, probes)


def test_mixed_page_sizes_share_tables() -> None:
    mem = SparseMemory()
    b = PageTables4Level(mem.write, TABLES)
    b.map(0x4000_0000, 0x1_0000_0000, GiB1, page_size=GiB1)  # PDPT[1]: 1 GiB page
    b.map(0x0020_0000, 0x7000_0000, MiB2, page_size=MiB2)  # PDPT[0] -> PD[1]: 2 MiB page
    b.map(0x0000_5000, 0x9000, KiB4, page_size=KiB4)  # PDPT[0] -> PD[0] -> PT[5]
    assert b.tables == 4  # PML4, PDPT, one PD, one PT
    cases = [(0x4123_4567, 0x1_0123_4567, GiB1), (0x0030_0001, 0x7010_0001, MiB2), (0x5ABC, 0x9ABC, KiB4)]
    for gva, gpa, size in cases:
        t = walk(mem.read, b.cr3, gva, "4level")
        assert (t.gpa, t.page_size) == (gpa, size), str(t)
    assert walk(mem.read, b.cr3, 0x6000, "4level").fault_level == "PT"
    assert walk(mem.read, b.cr3, 0x40_0000, "4level").fault_level == "PD"
    assert walk(mem.read, b.cr3, 0x8000_0000, "4level").fault_level == "PDPT"
    assert walk(mem.read, b.cr3, 1 << 39, "4level").fault_level == "PML4"


# --- permissions --------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "upper"), [("4level", "PML4"), ("4level", "PDPT"), ("pae", "PD"), ("32bit", "PD")])
def test_upper_level_us_and_rw_win(mode: str, upper: str) -> None:
    mem = SparseMemory()
    b = page_table_builder(mode, mem.write, TABLES)
    b.map(0x40_0000, 0x80_0000, KiB4, writable=True, user=True)
    t = walk(mem.read, b.cr3, 0x40_0123, mode)
    assert t.user and t.writable and t.permits(write=True, user=True)

    b.update_entry(0x40_0000, upper, clear_bits=bits.PTE_US)
    t = walk(mem.read, b.cr3, 0x40_0123, mode)
    assert t.gpa == 0x80_0123  # still translates...
    assert not t.user and t.writable  # ...but only for the supervisor
    assert not t.permits(user=True) and t.permits(write=True)
    step = next(s for s in t.levels if s.name == upper)
    assert "US" not in step.flags and "US" in t.levels[-1].flags

    b.update_entry(0x40_0000, upper, clear_bits=bits.PTE_RW)
    t = walk(mem.read, b.cr3, 0x40_0123, mode)
    assert not t.writable
    assert not t.permits(write=True) and t.permits(write=True, wp=False)


def test_leaf_permissions_alone() -> None:
    mem = SparseMemory()
    b = PageTables4Level(mem.write, TABLES)
    b.map(0x1000, 0x1000, KiB4, writable=False, user=True)
    t = walk(mem.read, b.cr3, 0x1000, "4level")
    assert t.user and not t.writable
    assert t.permits(user=True) and not t.permits(user=True, write=True)


def test_pae_pdpte_carries_no_permissions() -> None:
    mem = SparseMemory()
    b = PageTablesPae(mem.write, TABLES)
    b.map(0, 0, MiB2, page_size=MiB2, user=True)
    pdpte = b.entry(0, "PDPT")
    assert pdpte & (bits.PTE_RW | bits.PTE_US) == 0  # reserved in a PDPTE
    t = walk(mem.read, b.cr3, 0x1234, "pae")
    assert t.user and t.writable
    assert t.levels[0].flags == ("P",)
    with pytest.raises(PageTableError):
        b.update_entry(0, "PT")  # no PT under a 2 MiB page
    b.update_entry(0, "PDPT", set_bits=bits.PTE_RW)
    t = walk(mem.read, b.cr3, 0x1234, "pae")
    assert t.gpa is None and t.fault_level == "PDPT" and "reserved" in (t.fault or "")


# --- NX -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["pae", "4level"])
def test_nx(mode: str) -> None:
    mem = SparseMemory()
    b = page_table_builder(mode, mem.write, TABLES)
    b.map(0x20_0000, 0x20_0000, MiB2, page_size=MiB2, nx=True)
    b.map(0x40_0000, 0x40_0000, KiB4)
    t = walk(mem.read, b.cr3, 0x20_0010, mode)
    assert t.nx and not t.permits(execute=True) and t.permits()
    assert "NX" in t.levels[-1].flags
    assert "no-execute" in str(t)
    # with EFER.NXE clear, bit 63 is reserved: the walk faults
    t = walk(mem.read, b.cr3, 0x20_0010, mode, nxe=False)
    assert t.gpa is None and "NXE" in (t.fault or "")
    # NX in an upper level applies to every page below it
    assert not walk(mem.read, b.cr3, 0x40_0000, mode).nx
    b.update_entry(0x40_0000, "PD", set_bits=bits.PTE_NX)
    t = walk(mem.read, b.cr3, 0x40_0000, mode)
    assert t.nx and "NX" not in t.levels[-1].flags


def test_32bit_paging_has_no_nx() -> None:
    b = PageTables32(SparseMemory().write, TABLES)
    with pytest.raises(PageTableError, match="NX"):
        b.map(0, 0, KiB4, nx=True)


# --- address checks ---------------------------------------------------------------------------


@pytest.mark.parametrize("gva", [1 << 47, 0x0000_8000_0000_1000, 0xFFFF_7FFF_FFFF_F000, 0x1234_0000_0000_0000])
def test_non_canonical_addresses_fault_before_any_read(gva: int) -> None:
    mem = SparseMemory()
    cr3 = build_identity_4level(mem.write, TABLES)
    reads: list[int] = []

    def read(gpa: int, size: int) -> bytes:
        reads.append(gpa)
        return mem.read(gpa, size)

    t = walk(read, cr3, gva, "4level")
    assert t.gpa is None and t.fault_level is None and "canonical" in (t.fault or "")
    assert reads == [] and t.levels == ()
    assert "canonical" in str(t)
    with pytest.raises(PageTableError, match="canonical"):
        PageTables4Level(mem.write, 0x80000).map(gva & ~0xFFF, 0, KiB4)


def test_canonical_high_half() -> None:
    assert is_canonical(0xFFFF_8000_0000_0000) and is_canonical(0x0000_7FFF_FFFF_FFFF)
    assert not is_canonical(0x0000_8000_0000_0000)
    mem = SparseMemory()
    b = PageTables4Level(mem.write, TABLES)
    b.map(0xFFFF_FFFF_8000_0000, 0x200000, MiB2, page_size=MiB2)  # a kernel's "-2 GiB"
    t = walk(mem.read, b.cr3, 0xFFFF_FFFF_8000_1234, "4level")
    assert t.gpa == 0x201234 and [s.index for s in t.levels] == [511, 510, 0]
    with pytest.raises(PageTableError):
        b.map(0x0000_7FFF_FFFF_F000, 0, 2 * KiB4)  # runs off the lower half


def test_32bit_modes_reject_wide_addresses() -> None:
    mem = SparseMemory()
    cr3 = build_identity_pae(mem.write, TABLES)
    t = walk(mem.read, cr3, 1 << 32, "pae")
    assert t.gpa is None and "32-bit" in (t.fault or "")
    with pytest.raises(PageTableError, match="4 GiB"):
        PageTables32(mem.write, 0x80000).map(0xFFFF_F000, 0, 2 * KiB4)


def test_pse36_pages_above_4gib() -> None:
    mem = SparseMemory()
    b = PageTables32(mem.write, TABLES)
    b.map(0xC000_0000, 0xAB_FFC0_0000, MiB4, page_size=MiB4)
    pde = b.entry(0xC000_0000, "PD")
    assert (pde >> 13) & 0xFF == 0xAB  # address bits 39:32 in PDE bits 20:13
    t = walk(mem.read, b.cr3, 0xC012_3456, "32bit")
    assert t.gpa == 0xAB_FFD2_3456 and t.page_size == MiB4
    with pytest.raises(PageTableError):
        b.map(0, 1 << 40, MiB4, page_size=MiB4)
    with pytest.raises(PageTableError):
        b.map(0, 1 << 32, KiB4)  # a 4 KiB PTE holds only 32 address bits


def test_32bit_without_pse_ignores_ps() -> None:
    mem = SparseMemory()
    cr3 = build_identity_32bit(mem.write, TABLES, size=MiB4 * 2)
    t = walk(mem.read, cr3, 0x1000, "32bit", pse=False)
    # PS is ignored: the PDE is read as a pointer to a page table (here: page 0)
    assert len(t.levels) == 2 and t.levels[0].target == 0 and not t.levels[0].leaf


def test_reserved_ps_in_pml4() -> None:
    mem = SparseMemory()
    b = PageTables4Level(mem.write, TABLES)
    b.map(0, 0, KiB4)
    b.update_entry(0, "PML4", set_bits=bits.PTE_PS)
    t = walk(mem.read, b.cr3, 0, "4level")
    assert t.gpa is None and t.fault_level == "PML4" and "PS" in (t.fault or "")


# --- builder errors ------------------------------------------------------------------------------


def test_builder_refuses_bad_requests() -> None:
    mem = SparseMemory()
    b = PageTables4Level(mem.write, TABLES, TABLES + 3 * KiB4)
    with pytest.raises(PageTableError, match="multiple"):
        b.map(0x1000, 0x2000, MiB2, page_size=MiB2)
    with pytest.raises(PageTableError, match="4 KiB, 2 MiB, 1 GiB"):
        b.map(0, 0, MiB4, page_size=MiB4)
    with pytest.raises(PageTableError, match="0 bytes"):
        b.map(0, 0, 0)
    b.map(0, 0, MiB2, page_size=MiB2)  # PML4, PDPT, PD: the region is now full
    with pytest.raises(PageTableError, match="full"):
        b.map(0x40_0000, 0, KiB4)
    with pytest.raises(PageTableError, match="inside a 2 MiB page"):
        b.map(0x1000, 0, KiB4)
    with pytest.raises(PageTableError):
        PageTables4Level(mem.write, 0x1234)
    with pytest.raises(ValueError):
        page_table_builder("none", mem.write, TABLES)


def test_remapping_a_page_replaces_it() -> None:
    mem = SparseMemory()
    b = PageTables4Level(mem.write, TABLES)
    b.map(0x1000, 0x5000, KiB4)
    b.map(0x1000, 0x6000, KiB4, writable=False)
    t = walk(mem.read, b.cr3, 0x1000, "4level")
    assert t.gpa == 0x6000 and not t.writable


def test_new_tables_overwrite_stale_memory() -> None:
    mem = SparseMemory()
    mem.write(TABLES, b"\xff" * 0x10000)  # garbage where the tables will go
    cr3 = build_identity_4level(mem.write, TABLES, size=MiB2, page_size=KiB4)
    assert walk(mem.read, cr3, 0x1000, "4level").gpa == 0x1000
    assert walk(mem.read, cr3, MiB2, "4level").fault_level == "PD"


# --- modes, sregs and printing ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cr0", "cr4", "efer", "mode"),
    [
        (0x60000010, 0, 0, "none"),
        (0x11, 0, 0, "none"),
        (0x80000011, 0, 0, "32bit"),
        (0x80000011, bits.CR4_PSE, 0, "32bit"),
        (0x80000011, bits.CR4_PAE, 0, "pae"),
        (0x80000011, bits.CR4_PAE, bits.EFER_LME | bits.EFER_LMA, "4level"),
        (0x80000011, bits.CR4_PAE | bits.CR4_LA57, bits.EFER_LME | bits.EFER_LMA, "5level"),
    ],
)
def test_paging_mode_of(cr0: int, cr4: int, efer: int, mode: str) -> None:
    assert paging_mode_of(cr0, cr4, efer) == mode


def test_translate_uses_sregs() -> None:
    mem = SparseMemory()
    cr3 = build_identity_32bit(mem.write, TABLES)
    sregs = SimpleNamespace(cr0=0x80000011, cr3=cr3, cr4=bits.CR4_PSE, efer=0)
    t = translate(mem.read, sregs, 0xDEAD_BEEF)
    assert t.gpa == 0xDEAD_BEEF and t.page_size == MiB4
    off = translate(mem.read, SimpleNamespace(cr0=0x11, cr3=0, cr4=0, efer=0), 0x1234)
    assert off.gpa == 0x1234 and off.paging_mode == "none" and off.levels == ()
    assert "paging off" in str(off)
    with pytest.raises(ValueError):
        walk(mem.read, 0, 0, "5level")


def test_translation_prints_the_chain() -> None:
    mem = SparseMemory()
    b = PageTables4Level(mem.write, TABLES)
    b.map(0x7FFF_0000_0000, 0x1234_5000, KiB4, user=True, writable=False)
    text = str(walk(mem.read, b.cr3, 0x7FFF_0000_0ABC, "4level"))
    lines = text.splitlines()
    assert lines[0] == "4level walk of 0x00007fff00000abc (CR3 0x10000)"
    assert lines[1].split() == ["level", "table", "index", "entry", "flags", "->"]
    assert [line.split()[0] for line in lines[2:6]] == ["PML4", "PDPT", "PD", "PT"]
    assert "page 0x12345000" in lines[5] and "P US" in lines[5]
    assert lines[6] == "=> gpa 0x12345abc (4 KiB page; read-only, user, executable)"

    fault = str(walk(mem.read, b.cr3, 0x7FFF_0020_0000, "4level"))
    assert fault.splitlines()[-2].split()[-2:] == ["not", "present"]
    assert fault.splitlines()[-1].startswith("=> fault: PD entry 1")
