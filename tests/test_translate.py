"""pykvm.translate: GVA -> GPA (each level) -> HVA (slot) -> HPA, and the guest's mappings."""

from __future__ import annotations

import ctypes
import os
import struct

import pytest

from pykvm import guests
from pykvm.inspect.translate import translate_address
from pykvm.x86 import bits

LONG_BASE = 0x100000


def pagemap_shows_pfns() -> bool:
    """True when /proc/self/pagemap gives real PFNs to this process (CAP_SYS_ADMIN)."""
    buf = ctypes.create_string_buffer(4096)
    address = ctypes.addressof(buf)
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek((address // 4096) * 8)
            entry = struct.unpack("<Q", f.read(8))[0]
    except OSError:
        return False
    return bool(entry >> 63) and (entry & ((1 << 55) - 1)) != 0


# ---------------------------------------------------------------------------
# With KVM: real guests
# ---------------------------------------------------------------------------


@pytest.mark.kvm
def test_hello64_entry_chain():
    from pykvm.platform.machine import Machine

    image = guests.path("hello64").read_bytes()
    with Machine(memory="64M") as m:
        m.load_guest("hello64")
        chain = translate_address(m.vcpu, m.memory, LONG_BASE)

        # GVA -> GPA: pykvm identity-maps the first 4 GiB with 2 MiB pages
        assert chain.gpa == LONG_BASE
        assert [lv.name for lv in chain.levels] == ["PML4", "PDPT", "PD"]
        assert chain.levels[-1].leaf and chain.walk.page_size == 2 << 20
        assert chain.levels[0].table == m.vcpu.get_sregs().cr3 & bits.PTE_ADDR_MASK
        for upper, lower in zip(chain.levels, chain.levels[1:]):
            assert upper.target == lower.table  # each level points at the next table

        # GPA -> HVA: inside slot 0's mapping, and the bytes there are the guest's
        region = m.memory.region_at(LONG_BASE)
        assert (chain.slot, chain.slot_gpa, chain.slot_size, chain.slot_hva) == (
            region.slot, region.gpa, region.size, region.hva)
        assert region.hva <= chain.hva < region.hva + region.size
        assert chain.hva == m.memory.hva(LONG_BASE)
        assert ctypes.string_at(chain.hva, len(image)) == m.memory.read(LONG_BASE, len(image)) == image
        with open("/proc/self/mem", "rb", buffering=0) as mem:
            mem.seek(chain.hva)
            assert mem.read(64) == image[:64]

        # HVA -> HPA
        text = str(chain)
        if pagemap_shows_pfns():
            assert chain.hpa is not None and chain.hpa % 4096 == LONG_BASE % 4096
            assert f"HPA {chain.hpa:#x}" in text
        else:
            assert chain.hpa is None and "HPA: unknown" in text

        # KVM's own answer, where it gives one
        if chain.kvm_valid:
            assert chain.kvm_gpa == chain.gpa and "(agrees)" in text
        else:
            assert "KVM_TRANSLATE: valid=0" in text

        for expected in ("GVA 0x100000 (long 64-bit)", "PML4", "PDPT", "PD ", "=> gpa 0x100000",
                         f"GPA 0x100000 -> slot {region.slot}", f"HVA {chain.hva:#x}"):
            assert expected in text


@pytest.mark.kvm
def test_hpa_of_two_pages_differs_and_matches_pagemap():
    from pykvm.platform.machine import Machine

    if not pagemap_shows_pfns():
        pytest.skip("pagemap hides PFNs from this process (needs CAP_SYS_ADMIN)")
    with Machine(memory="16M") as m:
        m.load_guest("hello64")
        m.memory.write(0x200000, b"x")  # a page of its own, written so it is not the zero page
        a, b = translate_address(m.vcpu, m.memory, LONG_BASE), translate_address(m.vcpu, m.memory, 0x200000)
        assert a.hpa != b.hpa and b.hpa % 4096 == 0
        assert "zero-page" not in b.host.flags


@pytest.mark.kvm
def test_untouched_page_is_faulted_in_and_said_so():
    from pykvm.platform.machine import Machine

    if not pagemap_shows_pfns():
        pytest.skip("pagemap hides PFNs from this process (needs CAP_SYS_ADMIN)")
    with Machine(memory="64M") as m:
        m.load_guest("hello64")
        chain = translate_address(m.vcpu, m.memory, 0x3000000)  # never written by anyone
        assert chain.hpa is not None and chain.host.faulted_in
        assert "faulted in by reading it first" in str(chain)


@pytest.mark.kvm
def test_unmapped_and_mmio_addresses():
    from pykvm.platform.machine import Machine

    with Machine(memory="16M") as m:
        m.load_guest("hello64")
        hole = translate_address(m.vcpu, m.memory, 0xE000_0000)  # mapped by the page tables, but no slot: MMIO
        assert hole.gpa == 0xE000_0000 and hole.slot is None and hole.hva is None
        assert "no memory slot holds it" in str(hole)
        far = translate_address(m.vcpu, m.memory, 1 << 40)  # no PML4 entry
        assert far.gpa is None and far.walk.fault_level == "PML4"
        assert "fault: PML4 entry 2" in str(far) and "GPA: none" in str(far)
        noncanonical = translate_address(m.vcpu, m.memory, 1 << 47)
        assert noncanonical.gpa is None and "not canonical" in str(noncanonical)


@pytest.mark.kvm
def test_real_mode_has_no_page_walk():
    from pykvm.platform.machine import Machine

    with Machine(memory="16M") as m:
        m.load_guest("hello16")
        chain = translate_address(m.vcpu, m.memory, 0x8000)
        assert chain.gpa == 0x8000 and chain.levels == () and chain.walk.paging_mode == "none"
        assert "paging off" in str(chain)
        assert ctypes.string_at(chain.hva, 4) == guests.path("hello16").read_bytes()[:4]


@pytest.mark.kvm
def test_info_mem_mappings_of_the_shipped_modes():
    from pykvm.platform.machine import Machine
    from pykvm.inspect.translate import format_mappings, mappings

    with Machine(memory="16M") as m:
        m.load_guest("hello64")
        maps = mappings(m.memory.read, m.vcpu.get_sregs())
        assert [(x.start, x.end, x.gpa, x.rights, x.user) for x in maps] == [(0, 1 << 32, 0, "rwx", False)]
        assert format_mappings(maps) == "0000000000000000-0000000100000000 0000000000000000    4 GiB rwx supervisor"
    with Machine(memory="16M") as m:
        m.load_guest("hello64u")
        assert [x.user for x in mappings(m.memory.read, m.vcpu.get_sregs())] == [True]
    with Machine(memory="16M") as m:
        m.load_guest("hello16")
        assert mappings(m.memory.read, m.vcpu.get_sregs()) == []


# ---------------------------------------------------------------------------
# Without KVM: page tables in a bytearray, a fake pagemap
# ---------------------------------------------------------------------------


class _Sregs:
    def __init__(self, cr3: int, *, nxe: bool = True):
        self.cr0 = bits.CR0_PE | bits.CR0_PG
        self.cr3 = cr3
        self.cr4 = bits.CR4_PAE
        self.efer = bits.EFER_LME | bits.EFER_LMA | (bits.EFER_NXE if nxe else 0)


def test_mappings_merge_runs_and_keep_rights_apart():
    from pykvm.inspect.translate import format_mappings, mappings
    from pykvm.x86.paging import PageTables4Level

    ram = bytearray(1 << 20)

    def write(gpa, data):
        ram[gpa:gpa + len(data)] = data

    def read(gpa, size):
        return bytes(ram[gpa:gpa + size])

    pt = PageTables4Level(write, 0x10000, 0x80000)
    pt.map(0x400000, 0x200000, 0x3000, writable=True, user=False)          # 3 pages, contiguous
    pt.map(0x403000, 0x203000, 0x1000, writable=False, user=False)         # same run, other rights
    pt.map(0x404000, 0x300000, 0x1000, writable=True, user=False)          # physical jump
    pt.map(0x7FFF_FFFF_F000, 0x500000, 0x1000, writable=True, user=True, nx=True)
    pt.map(0xFFFF_8000_0000_0000, 0x600000, 0x2000, writable=True, user=False)  # upper half
    maps = mappings(read, _Sregs(pt.cr3))
    got = [(x.start, x.end, x.gpa, x.rights, x.user) for x in maps]
    assert got == [
        (0x400000, 0x403000, 0x200000, "rwx", False),
        (0x403000, 0x404000, 0x203000, "r-x", False),
        (0x404000, 0x405000, 0x300000, "rwx", False),
        (0x7FFF_FFFF_F000, 0x8000_0000_0000, 0x500000, "rw-", True),
        (0xFFFF_8000_0000_0000, 0xFFFF_8000_0000_2000, 0x600000, "rwx", False),
    ]
    lines = format_mappings(maps).splitlines()
    assert lines[0] == "0000000000400000-0000000000403000 0000000000200000   12 KiB rwx supervisor"
    assert lines[3].endswith("rw- user")


def _fake_pagemap(tmp_path, hva: int, entry: int):
    path = tmp_path / "pagemap"
    with open(path, "wb") as f:
        f.seek((hva // 4096) * 8)
        f.write(struct.pack("<Q", entry))
    return str(path)


def test_host_page_reads_the_pfn(tmp_path):
    from pykvm.inspect.translate import host_page

    hva = 0x7F00_1234_5678
    pagemap = _fake_pagemap(tmp_path, hva, (1 << 63) | 0x1ABCD)
    page = host_page(hva, pagemap=pagemap, kpageflags=os.devnull)
    assert page.hpa == 0x1ABCD * 4096 + 0x678 and page.present and "PFN 0x1abcd" in page.note


def test_host_page_says_why_when_pfns_are_hidden(tmp_path):
    from pykvm.inspect.translate import host_page

    hva = 0x7F00_0000_1000
    hidden = host_page(hva, pagemap=_fake_pagemap(tmp_path, hva, 1 << 63))
    assert hidden.hpa is None and "CAP_SYS_ADMIN" in hidden.note
    absent = host_page(hva, pagemap=_fake_pagemap(tmp_path, hva, 0))
    assert absent.hpa is None and not absent.present and "not faulted in" in absent.note
    touched = []
    host_page(hva, touch=lambda: touched.append(1), pagemap=_fake_pagemap(tmp_path, hva, 0))
    assert touched == [1]
    missing = host_page(hva, pagemap=str(tmp_path / "nope"))
    assert missing.hpa is None and "cannot open" in missing.note
