"""What the BIOS leaves in low memory: IVT, BDA, EBDA and the IRET stub they point at."""

from __future__ import annotations

import struct

import pytest

from pykvm.errors import LoaderError
from pykvm.platform import acpi, bios, layout


def memory_of(blobs):
    """A sparse guest memory: {address: byte}, checking that no two blobs overlap."""
    memory = {}
    for gpa, data in blobs:
        for i, byte in enumerate(data):
            assert gpa + i not in memory, f"{gpa + i:#x} written twice"
            memory[gpa + i] = byte
    return memory


def word(memory, gpa):
    return memory[gpa] | memory[gpa + 1] << 8


def test_every_vector_reaches_an_iret():
    memory = memory_of(bios.build_firmware_state([0x3F8]))
    targets = set()
    for vector in range(256):
        offset, segment = word(memory, 4 * vector), word(memory, 4 * vector + 2)
        target = (segment << 4) + offset  # real-mode address of the handler
        assert memory.get(target) == 0xCF, f"vector {vector:#x} -> {segment:04x}:{offset:04x}"
        targets.add((segment, offset))
    assert targets == {(0xF000, 0xFF53)}


def test_the_stub_is_in_the_bios_area_and_outside_the_acpi_tables():
    assert layout.BIOS_AREA_START <= bios.IRET_STUB_ADDR < layout.BIOS_AREA_END
    assert not acpi.ACPI_AREA_START <= bios.IRET_STUB_ADDR < acpi.ACPI_AREA_END
    tables = acpi.build_acpi_tables(list(range(255)))
    memory_of(tables.blobs + bios.build_firmware_state(list(layout.COM_PORTS)))  # no byte written twice


def test_bda_with_com1_only():
    memory = memory_of(bios.build_firmware_state([layout.COM1_PORT]))
    bda = layout.BDA_ADDR
    assert [word(memory, bda + 2 * i) for i in range(4)] == [0x3F8, 0, 0, 0]
    assert [word(memory, bda + 8 + 2 * i) for i in range(3)] == [0, 0, 0]  # no LPT
    equipment = word(memory, bda + 0x10)
    assert (equipment >> 9) & 0x7 == 1
    assert equipment == 0x0202  # one serial port, x87 present
    assert [memory[bda + 0x7C + i] for i in range(4)] == [0x0A, 0, 0, 0]


def test_bda_with_four_com_ports():
    memory = memory_of(bios.build_firmware_state(list(layout.COM_PORTS)))
    bda = layout.BDA_ADDR
    assert [word(memory, bda + 2 * i) for i in range(4)] == [0x3F8, 0x2F8, 0x3E8, 0x2E8]
    assert (word(memory, bda + 0x10) >> 9) & 0x7 == 4
    assert [memory[bda + 0x7C + i] for i in range(4)] == [0x0A] * 4


def test_present_ports_are_packed_from_the_first_slot_as_seabios_does():
    memory = memory_of(bios.build_firmware_state([0x2F8]))
    assert [word(memory, layout.BDA_ADDR + 2 * i) for i in range(4)] == [0x2F8, 0, 0, 0]


def test_no_serial_ports():
    memory = memory_of(bios.build_firmware_state([]))
    assert [word(memory, layout.BDA_ADDR + 2 * i) for i in range(4)] == [0, 0, 0, 0]
    assert word(memory, layout.BDA_ADDR + 0x10) == 0x0002


def test_memory_size_and_ebda():
    memory = memory_of(bios.build_firmware_state([0x3F8]))
    bda = layout.BDA_ADDR
    assert word(memory, bda + 0x13) == 639  # KiB below the EBDA
    assert word(memory, bda + 0x0E) == 0x9FC0  # the EBDA's segment
    ebda = word(memory, bda + 0x0E) << 4
    assert ebda == layout.EBDA_ADDR
    assert word(memory, ebda) == 1  # its size in KiB
    assert all(memory[ebda + i] == 0 for i in range(2, layout.EBDA_SIZE))


def test_blob_sizes():
    blobs = dict(bios.build_firmware_state([0x3F8]))
    assert set(blobs) == {0, 0x400, 0x9FC00, 0xFFF53}
    assert {gpa: len(data) for gpa, data in blobs.items()} == {0: 1024, 0x400: 256, 0x9FC00: 1024, 0xFFF53: 1}
    assert struct.unpack("<HH", blobs[0][:4]) == (0xFF53, 0xF000)


def test_a_larger_ebda_lower_down():
    memory = memory_of(bios.build_firmware_state([0x3F8], ebda_addr=0x9F000, ebda_size=0x1000))
    assert word(memory, layout.BDA_ADDR + 0x13) == 0x9F000 // 1024
    assert word(memory, layout.BDA_ADDR + 0x0E) == 0x9F00
    assert memory[0x9F000] == 4


@pytest.mark.parametrize("kwargs", [
    {"com_ports": [0x3F8] * 5},
    {"com_ports": [0]},
    {"com_ports": [0x10000]},
    {"com_ports": [], "ebda_addr": 0x9FC10},
    {"com_ports": [], "ebda_size": 0x300},
    {"com_ports": [], "ebda_addr": 0x9FC00, "ebda_size": 0x800},
    {"com_ports": [], "acpi_area": (0xE0000, 0x100000)},
])
def test_what_cannot_be_built_is_refused(kwargs):
    with pytest.raises(LoaderError):
        bios.build_firmware_state(**kwargs)
