"""ACPI tables read back the way a guest reads them: scan for the RSDP, follow RSDT and XSDT.

The parser here is written from ACPI 6.4 chapter 5 independently of
pykvm.platform.acpi: it knows offsets, not the builder's helpers.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.errors import LoaderError
from pykvm.platform import acpi, layout

BIOS_START, BIOS_END = layout.BIOS_AREA_START, layout.BIOS_AREA_END


# --- a guest's view ----------------------------------------------------------------------


class GuestMemory:
    """The BIOS area after the blobs were written into it (and nothing outside it)."""

    def __init__(self, blobs):
        self.bytes = bytearray(BIOS_END - BIOS_START)
        self.written = []
        for gpa, data in blobs:
            assert BIOS_START <= gpa and gpa + len(data) <= BIOS_END, f"blob at {gpa:#x} outside the BIOS area"
            for start, end in self.written:
                assert gpa + len(data) <= start or gpa >= end, f"blob at {gpa:#x} overlaps another"
            self.written.append((gpa, gpa + len(data)))
            self.bytes[gpa - BIOS_START:gpa - BIOS_START + len(data)] = data

    def read(self, gpa, size):
        assert BIOS_START <= gpa and gpa + size <= BIOS_END
        return bytes(self.bytes[gpa - BIOS_START:gpa - BIOS_START + size])

    def u8(self, gpa):
        return self.read(gpa, 1)[0]

    def u16(self, gpa):
        return struct.unpack("<H", self.read(gpa, 2))[0]

    def u32(self, gpa):
        return struct.unpack("<I", self.read(gpa, 4))[0]

    def u64(self, gpa):
        return struct.unpack("<Q", self.read(gpa, 8))[0]


def find_rsdp(memory):
    """ACPI 6.4 5.2.5.1: 16-byte boundaries of 0xE0000-0xFFFFF, signature and checksum."""
    for gpa in range(BIOS_START, BIOS_END, 16):
        if memory.read(gpa, 8) == b"RSD PTR " and sum(memory.read(gpa, 20)) % 256 == 0:
            return gpa
    return None


def read_table(memory, gpa):
    """A description table at ``gpa``: (signature, whole table), its length and checksum checked."""
    signature, length = memory.read(gpa, 4), memory.u32(gpa + 4)
    assert length >= 36, f"{signature} at {gpa:#x}: length {length}"
    table = memory.read(gpa, length)
    assert sum(table) % 256 == 0, f"{signature} at {gpa:#x}: bad checksum"
    return signature, table


def walk(memory):
    """RSDP -> RSDT and XSDT -> tables; both lists must agree.  Returns {signature: address}."""
    rsdp = find_rsdp(memory)
    assert rsdp is not None
    assert memory.u8(rsdp + 15) == 2, "RSDP revision"
    assert memory.u32(rsdp + 20) == 36, "RSDP length"
    assert sum(memory.read(rsdp, 36)) % 256 == 0, "RSDP extended checksum"
    rsdt_addr, xsdt_addr = memory.u32(rsdp + 16), memory.u64(rsdp + 24)
    rsdt_sig, rsdt = read_table(memory, rsdt_addr)
    xsdt_sig, xsdt = read_table(memory, xsdt_addr)
    assert (rsdt_sig, xsdt_sig) == (b"RSDT", b"XSDT")
    assert (len(rsdt) - 36) % 4 == 0 and (len(xsdt) - 36) % 8 == 0
    from_rsdt = [struct.unpack_from("<I", rsdt, off)[0] for off in range(36, len(rsdt), 4)]
    from_xsdt = [struct.unpack_from("<Q", xsdt, off)[0] for off in range(36, len(xsdt), 8)]
    assert from_rsdt == from_xsdt
    tables = {"RSDP": rsdp, "RSDT": rsdt_addr, "XSDT": xsdt_addr}
    for gpa in from_rsdt:
        signature, _ = read_table(memory, gpa)
        tables[signature.decode()] = gpa
    return tables


def parse_madt(table):
    """(local APIC address, flags, [(type, entry bytes)])."""
    lapic, flags = struct.unpack_from("<II", table, 36)
    entries, offset = [], 44
    while offset < len(table):
        kind, length = table[offset], table[offset + 1]
        assert length >= 2 and offset + length <= len(table)
        entries.append((kind, table[offset:offset + length]))
        offset += length
    return lapic, flags, entries


def cpus_in_madt(table):
    """[(processor ID, APIC ID)] of the enabled Processor Local APIC entries."""
    _, _, entries = parse_madt(table)
    cpus = []
    for kind, entry in entries:
        if kind == 0:
            assert len(entry) == 8
            processor_id, apic_id, flags = struct.unpack_from("<BBI", entry, 2)
            if flags & 1:
                cpus.append((processor_id, apic_id))
    return cpus


def gas(table, offset):
    """A Generic Address Structure: (space, bit width, bit offset, access size, address)."""
    return struct.unpack_from("<BBBBQ", table, offset)


def decode_pkg_length(aml, offset):
    """(package length, bytes the PkgLength took)."""
    lead = aml[offset]
    follow = lead >> 6
    if follow == 0:
        return lead & 0x3F, 1
    assert lead & 0x30 == 0, "bits 5:4 must be 0 in a multi-byte PkgLength"
    value = lead & 0x0F
    for i in range(follow):
        value |= aml[offset + 1 + i] << (4 + 8 * i)
    return value, 1 + follow


def decode_integer(aml, offset):
    """(value, size) of ZeroOp / OneOp / OnesOp / Byte/Word/DWord/QWord prefixed data."""
    op = aml[offset]
    if op in (0x00, 0x01):
        return op, 1
    if op == 0xFF:
        return 0xFFFFFFFF, 1
    widths = {0x0A: 1, 0x0B: 2, 0x0C: 4, 0x0E: 8}
    assert op in widths, f"not an integer opcode: {op:#x}"
    size = widths[op]
    return int.from_bytes(aml[offset + 1:offset + 1 + size], "little"), 1 + size


def decode_names(aml):
    """The DSDT's top-level ``Name(XXXX, Package(){integers})`` objects: {name: [values]}."""
    names, offset = {}, 0
    while offset < len(aml):
        assert aml[offset] == 0x08, f"expected NameOp at {offset}"
        offset += 1
        if aml[offset] == 0x5C:  # a root prefix, as in \_S5_
            offset += 1
        name = aml[offset:offset + 4].decode("ascii")
        offset += 4
        assert aml[offset] == 0x12, "expected PackageOp"
        length, taken = decode_pkg_length(aml, offset + 1)
        end = offset + 1 + length
        cursor = offset + 1 + taken
        count = aml[cursor]
        cursor += 1
        values = []
        while cursor < end:
            value, size = decode_integer(aml, cursor)
            values.append(value)
            cursor += size
        assert cursor == end and len(values) == count
        names[name] = values
        offset = end
    return names


def osdev_s5_lookup(dsdt):
    """The _S5_ search hobby kernels use (the well-known OSDev wiki "shutdown" snippet)."""
    at = dsdt.find(b"_S5_", 36)
    assert at > 0
    assert dsdt[at - 1] == 0x08 or (dsdt[at - 2] == 0x08 and dsdt[at - 1] == 0x5C)
    assert dsdt[at + 4] == 0x12
    at += 5
    at += ((dsdt[at] & 0xC0) >> 6) + 2  # skip PkgLength and NumElements
    if dsdt[at] == 0x0A:
        at += 1
    slp_typ_a = dsdt[at]
    at += 1
    if dsdt[at] == 0x0A:
        at += 1
    return slp_typ_a, dsdt[at]


def build(apic_ids, **kwargs):
    tables = acpi.build_acpi_tables(apic_ids, **kwargs)
    return tables, GuestMemory(tables.blobs)


# --- the tree ------------------------------------------------------------------------------


def test_the_rsdp_scan_finds_every_table_with_checksums_and_lengths():
    tables, memory = build([0, 1])
    found = walk(memory)
    assert found["RSDP"] == tables.rsdp_addr
    assert found["RSDP"] % 16 == 0
    assert set(found) == {"RSDP", "RSDT", "XSDT", "FACP", "APIC"}
    for name in ("RSDT", "XSDT", "FACP", "APIC"):
        assert tables.tables[name] == found[name]
    rsdp = memory.read(tables.rsdp_addr, 36)
    assert sum(rsdp[:20]) % 256 == 0 and rsdp[9:15] == acpi.OEM_ID
    assert [gpa for gpa, _ in tables.blobs] == list(tables.tables.values())


def test_every_table_header_names_its_revision():
    tables, memory = build([0])
    revisions = {name: memory.u8(gpa + 8) for name, gpa in tables.tables.items() if name not in ("RSDP", "FACS")}
    assert revisions == {"DSDT": 1, "FACP": 3, "APIC": 1, "RSDT": 1, "XSDT": 1}


# --- MADT ----------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 2, 4, 64])
def test_madt_has_one_enabled_local_apic_per_cpu(count):
    apic_ids = list(range(count))
    tables, memory = build(apic_ids)
    _, madt = read_table(memory, walk(memory)["APIC"])
    assert cpus_in_madt(madt) == list(enumerate(apic_ids))


def test_madt_keeps_sparse_apic_ids_in_order_with_dense_processor_ids():
    apic_ids = [0, 2, 4, 6, 254]
    _, memory = build(apic_ids)
    _, madt = read_table(memory, walk(memory)["APIC"])
    assert cpus_in_madt(madt) == [(0, 0), (1, 2), (2, 4), (3, 6), (4, 254)]


def test_madt_matches_qemu_pc():
    _, memory = build([0, 1])
    _, madt = read_table(memory, walk(memory)["APIC"])
    lapic, flags, entries = parse_madt(madt)
    assert lapic == layout.LAPIC_ADDR == 0xFEE00000
    assert flags == 1  # PCAT_COMPAT
    kinds = [kind for kind, _ in entries]
    assert kinds == [0, 0, 1, 2, 2, 2, 2, 2, 4]
    ioapic = [entry for kind, entry in entries if kind == 1][0]
    assert struct.unpack_from("<BBII", ioapic, 2) == (0, 0, layout.IOAPIC_ADDR, 0)
    overrides = [struct.unpack_from("<BBIH", entry, 2) for kind, entry in entries if kind == 2]
    assert overrides == [(0, 0, 2, 0x0), (0, 5, 5, 0xD), (0, 9, 9, 0xD), (0, 10, 10, 0xD), (0, 11, 11, 0xD)]
    nmi = [entry for kind, entry in entries if kind == 4][0]
    assert struct.unpack_from("<BHB", nmi, 2) == (0xFF, 0, 1)  # all processors, conforming, LINT1


def test_madt_takes_another_ioapic_and_overrides():
    ioapic = acpi.IoApic(id=5, address=0xFEC01000, gsi_base=24)
    overrides = [acpi.InterruptOverride(0, 2), acpi.InterruptOverride(9, 9, 0xF)]
    _, memory = build([0], ioapic=ioapic, overrides=overrides)
    _, madt = read_table(memory, walk(memory)["APIC"])
    _, _, entries = parse_madt(madt)
    assert [struct.unpack_from("<BBII", e, 2) for k, e in entries if k == 1] == [(5, 0, 0xFEC01000, 24)]
    assert [struct.unpack_from("<BBIH", e, 2) for k, e in entries if k == 2] == [(0, 0, 2, 0), (0, 9, 9, 0xF)]


# --- FADT and FACS -------------------------------------------------------------------------------


def test_fadt_ports_and_their_x_twins():
    tables, memory = build([0, 1, 2, 3])
    _, fadt = read_table(memory, walk(memory)["FACP"])
    assert len(fadt) == 244
    assert struct.unpack_from("<H", fadt, 46)[0] == 9  # SCI_INT
    assert struct.unpack_from("<IBB", fadt, 48) == (0xB2, 0xF1, 0xF0)  # SMI_CMD, ACPI_ENABLE, ACPI_DISABLE
    pm1a_evt, pm1b_evt, pm1a_cnt, pm1b_cnt, pm2_cnt, pm_tmr, gpe0, gpe1 = struct.unpack_from("<8I", fadt, 56)
    assert (pm1a_evt, pm1a_cnt, pm_tmr, gpe0) == (0x600, 0x604, 0x608, 0xAFE0)
    assert (pm1b_evt, pm1b_cnt, pm2_cnt, gpe1) == (0, 0, 0, 0)
    evt_len, cnt_len, pm2_len, tmr_len, gpe0_len, gpe1_len = struct.unpack_from("<6B", fadt, 88)
    assert (evt_len, cnt_len, pm2_len, tmr_len, gpe0_len, gpe1_len) == (4, 2, 0, 4, 4, 0)
    assert struct.unpack_from("<HH", fadt, 96) == (0xFFF, 0xFFF)  # no C2, no C3
    assert fadt[108] == 0x32  # CENTURY
    assert struct.unpack_from("<H", fadt, 109)[0] == 0x2  # IAPC_BOOT_ARCH: 8042
    # X_PM1a_EVT, X_PM1b_EVT, X_PM1a_CNT, X_PM1b_CNT, X_PM2_CNT, X_PM_TMR, X_GPE0, X_GPE1
    x_blocks = [gas(fadt, 148 + 12 * i) for i in range(8)]
    legacy = [(pm1a_evt, evt_len), (0, 0), (pm1a_cnt, cnt_len), (0, 0), (0, 0), (pm_tmr, tmr_len),
              (gpe0, gpe0_len), (0, 0)]
    for (space, width, bit_offset, _, address), (port, length) in zip(x_blocks, legacy):
        if port:
            assert (space, width, bit_offset, address) == (1, 8 * length, 0, port)
        else:
            assert (space, width, address) == (0, 0, 0)


def test_fadt_flags_and_reset_register():
    _, memory = build([0])
    _, fadt = read_table(memory, walk(memory)["FACP"])
    flags = struct.unpack_from("<I", fadt, 112)[0]
    assert flags == (1 << 0) | (1 << 2) | (1 << 5) | (1 << 7) | (1 << 10) | (1 << 15)
    assert gas(fadt, 116) == (1, 8, 0, 0, 0xCF9)  # RESET_REG: I/O, 8 bits at offset 0
    assert fadt[128] == 0x06  # RESET_VALUE


def test_more_than_eight_cpus_force_the_cluster_model_as_qemu_does():
    _, memory = build(list(range(9)))
    _, fadt = read_table(memory, walk(memory)["FACP"])
    assert struct.unpack_from("<I", fadt, 112)[0] & (1 << 18)


def test_without_an_8042_the_boot_flag_is_clear():
    _, memory = build([0], i8042=False)
    _, fadt = read_table(memory, walk(memory)["FACP"])
    assert struct.unpack_from("<H", fadt, 109)[0] == 0


def test_fadt_points_at_the_facs_and_the_dsdt():
    tables, memory = build([0])
    _, fadt = read_table(memory, walk(memory)["FACP"])
    firmware_ctrl, dsdt = struct.unpack_from("<II", fadt, 36)
    x_firmware_ctrl, x_dsdt = struct.unpack_from("<QQ", fadt, 132)
    assert firmware_ctrl == tables.facs_addr and x_firmware_ctrl == 0  # ACPI 6.4 5.2.9: only one of them
    assert dsdt == x_dsdt == tables.tables["DSDT"]
    assert memory.read(firmware_ctrl, 4) == b"FACS"
    assert firmware_ctrl % 64 == 0
    assert memory.u32(firmware_ctrl + 4) == 64
    assert tables.firmware_waking_vector_addr == firmware_ctrl + 12
    assert memory.u32(tables.firmware_waking_vector_addr) == 0
    assert memory.u64(firmware_ctrl + acpi.FACS_X_FIRMWARE_WAKING_VECTOR) == 0


# --- DSDT ----------------------------------------------------------------------------------------


def test_dsdt_sleep_packages_decode_to_qemus_slp_typ():
    tables, memory = build([0])
    signature, dsdt = read_table(memory, tables.tables["DSDT"])
    assert signature == b"DSDT"
    assert decode_names(dsdt[36:]) == {"_S3_": [1, 1, 0, 0], "_S4_": [2, 2, 0, 0], "_S5_": [0, 0, 0, 0]}


def test_dsdt_s5_bytes():
    tables, memory = build([0])
    _, dsdt = read_table(memory, tables.tables["DSDT"])
    at = dsdt.index(b"_S5_")
    # NameOp "_S5_" PackageOp PkgLength(6) NumElements(4) Zero Zero Zero Zero
    assert dsdt[at - 1:at + 11] == b"\x08_S5_\x12\x06\x04\x00\x00\x00\x00"
    s4 = dsdt.index(b"_S4_")
    assert dsdt[s4 - 1:s4 + 13] == b"\x08_S4_\x12\x08\x04\x0a\x02\x0a\x02\x00\x00"


def test_a_hobby_kernels_s5_search_finds_slp_typ():
    tables, memory = build([0])
    _, dsdt = read_table(memory, tables.tables["DSDT"])
    assert osdev_s5_lookup(dsdt) == (0, 0)
    custom_tables, custom_memory = build([0], sleep_types={5: 7})
    _, custom = read_table(custom_memory, custom_tables.tables["DSDT"])
    assert osdev_s5_lookup(custom) == (7, 7)


@pytest.mark.parametrize("value, encoded", [
    (0, b"\x00"), (1, b"\x01"), (2, b"\x0a\x02"), (0xFF, b"\x0a\xff"), (0x100, b"\x0b\x00\x01"),
    (0x12345, b"\x0c\x45\x23\x01\x00"), (0xFFFFFFFF, b"\x0c\xff\xff\xff\xff"),
])
def test_aml_integers(value, encoded):
    assert acpi.aml_integer(value) == encoded
    assert decode_integer(encoded, 0) == (value, len(encoded))


def test_aml_integers_out_of_range_are_refused():
    for value in (-1, 1 << 32):
        with pytest.raises(ValueError):
            acpi.aml_integer(value)


@pytest.mark.parametrize("body, encoded", [
    (0, b"\x01"), (62, b"\x3f"), (63, b"\x41\x04"), (0xFFD, b"\x4f\xff"), (0xFFE, b"\x81\x00\x01"),
])
def test_pkg_length_boundaries(body, encoded):
    assert acpi.aml_pkg_length(body) == encoded


@given(st.integers(0, (1 << 28) - 5))
def test_pkg_length_counts_itself(body):
    encoded = acpi.aml_pkg_length(body)
    length, taken = decode_pkg_length(encoded + bytes(4), 0)
    assert taken == len(encoded)
    assert length == body + len(encoded)


def test_aml_names_are_checked():
    assert acpi.aml_name_seg("_S5") == b"_S5_"
    for bad in ("", "_S5__", "5ABC", "ab"):
        with pytest.raises(ValueError):
            acpi.aml_name_seg(bad)


# --- placement and errors --------------------------------------------------------------------


def test_the_default_area_is_below_the_f_segment():
    tables, _ = build(list(range(255)))
    assert all(acpi.ACPI_AREA_START <= gpa and gpa + len(data) <= acpi.ACPI_AREA_END
               for gpa, data in tables.blobs)


@pytest.mark.parametrize("apic_ids", [[], [0, 0], [255], [-1], [0, 300]])
def test_apic_ids_the_madt_cannot_describe(apic_ids):
    with pytest.raises(LoaderError):
        acpi.build_acpi_tables(apic_ids)


@pytest.mark.parametrize("area", [(0x9F000, 0xA0000), (0xFF000, 0x100010), (0xE1000, 0xE1000)])
def test_areas_outside_the_rsdp_scan_are_refused(area):
    with pytest.raises(LoaderError, match="BIOS area"):
        acpi.build_acpi_tables([0], area=area)


def test_a_small_area_is_a_clear_error():
    with pytest.raises(LoaderError, match="do not fit") as error:
        acpi.build_acpi_tables(list(range(200)), area=(0xE0000, 0xE0400))
    assert "200 CPUs" in str(error.value)


def _needed_span(apic_ids):
    """Bytes the tables take from a 64-byte aligned start (the layout is the same for every such start)."""
    tables = acpi.build_acpi_tables(apic_ids, area=(BIOS_START, BIOS_END))
    return max(gpa + len(data) for gpa, data in tables.blobs) - BIOS_START


@settings(max_examples=60, deadline=None)
@given(apic_ids=st.lists(st.integers(0, 254), min_size=1, max_size=255, unique=True),
       start_block=st.integers(0, (BIOS_END - BIOS_START) // 64 - 1),
       size=st.integers(1, 4096))
def test_any_cpu_set_gives_valid_tables_or_a_clear_error(apic_ids, start_block, size):
    start = BIOS_START + 64 * start_block
    end = min(start + size, BIOS_END)
    try:
        tables = acpi.build_acpi_tables(apic_ids, area=(start, end))
    except LoaderError as error:
        assert "do not fit" in str(error)
        assert _needed_span(apic_ids) > end - start
        return
    memory = GuestMemory(tables.blobs)
    assert all(start <= gpa and gpa + len(data) <= end for gpa, data in tables.blobs)
    found = walk(memory)
    assert found["RSDP"] == tables.rsdp_addr
    _, madt = read_table(memory, found["APIC"])
    assert cpus_in_madt(madt) == list(enumerate(apic_ids))
    _, fadt = read_table(memory, found["FACP"])
    assert struct.unpack_from("<I", fadt, 36)[0] % 64 == 0
    assert decode_names(read_table(memory, struct.unpack_from("<I", fadt, 40)[0])[1][36:])["_S5_"] == [0, 0, 0, 0]
