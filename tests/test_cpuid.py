"""Each vCPU's CPUID table: the topology filled in, unbacked features masked, -cpu's edits (no KVM needed)."""

from __future__ import annotations

import pytest

from pykvm.platform.cpuid import FEATURES, CpuidError, Leaf, vcpu_table

SIGNIFICANT = 1


def supported() -> list[Leaf]:
    """A small KVM_GET_SUPPORTED_CPUID answer: the host's APIC ID (7) still in leaf 1, empty 0BH/1FH."""
    return [
        Leaf(0, 0, 0, 0x1F, 0, 0, 0),
        Leaf(1, 0, 0, 0xA0671, 0x07010800, 1 << 21 | 1 << 31, 0x0F8BFBFF),  # x2apic, hypervisor; no HTT
        Leaf(4, 0, SIGNIFICANT, 0x4000121, 0x2C0003F, 0x3F, 0),
        Leaf(4, 1, SIGNIFICANT, 0x4000122, 0x3C0003F, 0x3F, 0),
        Leaf(4, 2, SIGNIFICANT, 0, 0, 0, 0),  # no more cache levels
        Leaf(7, 0, SIGNIFICANT, 0, 1 << 5, 0, 0),  # avx2
        Leaf(0xB, 0, SIGNIFICANT, 0, 0, 0, 0),
        Leaf(0x40000001, 0, 0, 0x1007EFB, 0, 0, 0),  # KVM's PV features, async PF among them
    ]


def leaf(table, function, index=0):
    (found,) = [x for x in table if x.function == function and x.index == index]
    return found


@pytest.mark.parametrize("threads, cores, apic_id", [(1, 1, 0), (1, 4, 3), (2, 2, 3), (1, 3, 2)])
def test_topology_and_apic_ids(threads, cores, apic_id):
    table = vcpu_table(supported(), apic_id=apic_id, threads=threads, cores=cores)
    one = leaf(table, 1)
    per_package = 1 << (max(threads - 1, 0).bit_length() + max(cores - 1, 0).bit_length())
    assert one.ebx >> 24 == apic_id and (one.ebx >> 16) & 0xFF == per_package
    assert bool(one.edx >> 28 & 1) == (per_package > 1)  # HTT says EBX[23:16] is valid
    assert one.ebx & 0xFFFF == 0x0800  # CLFLUSH size and brand index untouched
    assert leaf(table, 4, 0).eax >> 26 == (1 << max(cores - 1, 0).bit_length()) - 1
    assert leaf(table, 4, 2).eax == 0  # no cache level: left alone
    smt, core, end = leaf(table, 0xB, 0), leaf(table, 0xB, 1), leaf(table, 0xB, 2)
    assert [x.edx for x in (smt, core, end)] == [apic_id] * 3  # x2APIC ID in every sub-leaf
    assert (smt.ebx, smt.ecx >> 8) == (threads, 1) and (core.ebx, core.ecx >> 8) == (threads * cores, 2)
    assert end.ecx >> 8 == 0  # the level type 0 ends the list
    assert apic_id >> core.eax == 0 or threads * cores <= 1  # the ID fits the package's width


def test_async_page_faults_are_never_advertised():
    eax = leaf(vcpu_table(supported(), apic_id=0), 0x40000001).eax
    assert not eax & (1 << 4 | 1 << 10 | 1 << 14)
    assert eax & 1 and eax & 1 << 3  # kvmclock stays


def test_cpu_edits():
    table = vcpu_table(supported(), apic_id=0, edits=[("x2apic", False), ("avx2", False), ("hypervisor", True)])
    assert not leaf(table, 1).ecx >> 21 & 1 and not leaf(table, 7).ebx >> 5 & 1
    with pytest.raises(CpuidError, match="does not offer CPU feature 'avx512f'"):
        vcpu_table(supported(), apic_id=0, edits=[("avx512f", True)])
    with pytest.raises(CpuidError, match="unknown CPU feature 'frobnicate'"):
        vcpu_table(supported(), apic_id=0, edits=[("frobnicate", True)])


def test_the_supported_table_is_not_changed():
    base = supported()
    before = [x.fields() for x in base]
    vcpu_table(base, apic_id=3, threads=2, cores=2, edits=[("x2apic", False)])
    assert [x.fields() for x in base] == before


def test_feature_names_are_unique_bits():
    bits = list(FEATURES.values())
    assert len(bits) == len(set(bits))
