"""pc-testdev: the test register and its byte alias, flush-page, the IRQ ports, the iomem window."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.devices import pc_testdev as td
from pykvm.devices.pc_testdev import PcTestdevIomem, PcTestdevIrq, PcTestdevPorts
from pykvm.errors import DeviceError
from pykvm.platform import layout


def test_qemus_addresses():
    assert (td.PORTS_BASE, td.PORTS_LENGTH) == (layout.PC_TESTDEV_PORT, 12)
    assert td.IRQ_PORT_BASE == layout.PC_TESTDEV_IRQ_PORT
    assert (td.IOMEM_BASE, td.IOMEM_SIZE) == (0xFF000000, 0x10000)


@pytest.mark.parametrize("data", [b"\x5a", b"\x34\x12", b"\x78\x56\x34\x12"])
def test_test_register_reads_back_byte_word_long(data):
    ports = PcTestdevPorts()
    ports.write(td.IOPORT_OFFSET, data)
    assert ports.read(td.IOPORT_OFFSET, len(data)) == data


def test_sub_accesses_reach_the_registers_bytes():
    ports = PcTestdevPorts()
    ports.write(0, b"\x78\x56\x34\x12")  # outl 0xe0, 0x12345678
    assert ports.read(1, 1) == b"\x56"  # inb 0xe1
    assert ports.read(2, 2) == b"\x34\x12"  # inw 0xe2
    ports.write(3, b"\xab")  # outb 0xe3
    assert ports.register == 0xAB345678


def test_the_byte_port_at_0xe8_is_the_same_register():
    ports = PcTestdevPorts()
    ports.write(td.IOPORT_BYTE_OFFSET, b"\x11\x22\x33\x44")
    assert ports.read(td.IOPORT_OFFSET, 4) == b"\x11\x22\x33\x44"
    ports.write(td.IOPORT_OFFSET + 1, b"\x99")
    assert ports.read(td.IOPORT_BYTE_OFFSET + 1, 1) == b"\x99"


def test_flush_page_takes_32_bit_writes_of_an_address():
    flushed = []
    ports = PcTestdevPorts(flush_page=flushed.append)
    ports.write(td.FLUSH_OFFSET, (0x12345ABC).to_bytes(4, "little"))
    assert flushed == [0x12345000]
    ports.write(td.FLUSH_OFFSET, b"\x00\x10")  # a word: QEMU refuses it
    assert flushed == [0x12345000] and ports.flushes == 1
    assert ports.read(td.FLUSH_OFFSET, 4) == bytes(4)
    assert ports.register == 0  # the flush port is not part of the test register
    PcTestdevPorts().write(td.FLUSH_OFFSET, bytes(4))  # no host callback: counted only


def test_irq_port_drives_line_n():
    lines = []
    irq = PcTestdevIrq(lambda n, level: lines.append((n, level)))
    irq.write(0x0E, b"\x01")  # outb 0x200e, 1
    irq.write(0x0E, b"\x00")
    irq.write(23, b"\x80")  # any non-zero value raises
    assert lines == [(14, True), (14, False), (23, True)]
    irq.write(4, b"\x01\x00")  # wider than a byte: dropped, as QEMU
    assert lines == [(14, True), (14, False), (23, True)] and irq.ignored_writes == 1
    assert irq.read(0, 1) == b"\0"


def test_iomem_is_scratch_memory():
    iomem = PcTestdevIomem()
    iomem.write(0x1000, b"\x01\x02\x03\x04\x05\x06\x07\x08")
    assert iomem.read(0x1000, 8) == b"\x01\x02\x03\x04\x05\x06\x07\x08"
    assert iomem.read(0x1002, 2) == b"\x03\x04"
    iomem.write(0xFFFF, b"\xee")
    assert iomem.read(0xFFFE, 2) == b"\x00\xee"


def test_host_errors():
    with pytest.raises(DeviceError):
        PcTestdevPorts().read(10, 4)
    with pytest.raises(DeviceError):
        PcTestdevIrq(lambda n, level: None).write(24, b"\x01")
    with pytest.raises(DeviceError):
        PcTestdevIomem().write(0xFFFF, b"\0\0")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 11), st.binary(min_size=1, max_size=4)), max_size=30))
def test_the_register_is_the_last_bytes_written(writes):
    ports, model = PcTestdevPorts(), bytearray(4)
    for offset, data in writes:
        if offset + len(data) > 12:
            continue
        ports.write(offset, data)
        if offset != td.FLUSH_OFFSET:
            for port, byte in enumerate(data, start=offset):
                if not 4 <= port < 8:
                    model[port % 4] = byte
        assert ports.read(0, 4) == ports.read(8, 4) == bytes(model)
