"""QEMU's pci-testdev: its configuration space, the test headers, the write counters."""

from __future__ import annotations

import struct

import pytest

from pykvm.devices.pci import PciHost
from pykvm.devices.pci_testdev import PciTestDev
from pykvm.errors import DeviceError

NAMES = ["mmio-no-eventfd", "mmio-wildcard-eventfd", "mmio-datamatch-eventfd",
         "portio-no-eventfd", "portio-wildcard-eventfd", "portio-datamatch-eventfd"]


class Platform:
    """Maps BAR devices where on_bar_change says, on two tiny address spaces (pio, mmio)."""

    def __init__(self):
        self.maps = {"pio": {}, "mmio": {}}

    def on_bar_change(self, function, index, kind, old, new, size):
        if old is not None:
            del self.maps[kind][old]
        if new is not None:
            self.maps[kind][new] = function.bar(index).device

    def _find(self, kind, address, size):
        for base, device in self.maps[kind].items():
            if base <= address and address + size <= base + device.length:
                return device, address - base
        raise AssertionError(f"nothing mapped at {kind} {address:#x}")

    def read(self, kind, address, size):
        device, offset = self._find(kind, address, size)
        return int.from_bytes(device.read(offset, size), "little")

    def write(self, kind, address, size, value):
        device, offset = self._find(kind, address, size)
        device.write(offset, value.to_bytes(size, "little"))


def config_write(host, register, size, value, device=3):
    host.write(0, (0x80000000 | device << 11 | register & 0xFC).to_bytes(4, "little"))
    host.write(4 + (register & 3), value.to_bytes(size, "little"))


@pytest.fixture
def machine():
    """A host bridge with the testdev at 00:03.0, its BARs programmed as SeaBIOS would."""
    platform = Platform()
    host = PciHost()
    testdev = PciTestDev(on_bar_change=platform.on_bar_change)
    host.attach(3, 0, testdev)
    config_write(host, 0x10, 4, 0xFEBFF000)
    config_write(host, 0x14, 4, 0xC000)
    config_write(host, 0x04, 2, 0x0003)
    return platform, testdev


MMIO_BASE, PIO_BASE = 0xFEBFF000, 0xC000
WINDOWS = {"mmio": ("mmio", MMIO_BASE), "portio": ("pio", PIO_BASE)}


def run_like_kvm_unit_tests(platform, window):
    """lib/pci-testdev.c's pci_testdev_all(): select tests until one fails; (names, counts)."""
    kind, base = WINDOWS[window]
    names, counts = [], []
    for test_nr in range(8):
        platform.write(kind, base + 0, 1, test_nr)
        if platform.read(kind, base + 12, 4) != 0:
            break
        width = platform.read(kind, base + 1, 1)
        if width not in (1, 2, 4):
            break
        sig, off = platform.read(kind, base + 8, 4), platform.read(kind, base + 4, 4)
        for _ in range(16):
            platform.write(kind, base + off, width, sig & ((1 << 8 * width) - 1))
        counts.append(platform.read(kind, base + 12, 4))
        name = bytearray()
        while (c := platform.read(kind, base + 16 + len(name), 1)) != 0:
            name.append(c)
        names.append(name.decode())
    return names, counts


def test_configuration_space_is_qemus(machine):
    _, testdev = machine
    assert testdev.config_read(0x00, 4) == 0x00051B36
    assert testdev.config_read(0x08, 4) == 0x00FF0000  # class 0x00ff ("unclassified"), revision 0
    assert testdev.config_read(0x2C, 4) == 0x11001AF4
    assert testdev.config_read(0x3D, 1) == 0  # no interrupt pin
    assert (testdev.bar(0).kind, testdev.bar(0).size) == ("mmio", 4096)
    assert (testdev.bar(1).kind, testdev.bar(1).size) == ("pio", 256)


def test_the_bars_are_mapped_where_the_guest_put_them(machine):
    platform, testdev = machine
    assert platform.maps == {"mmio": {MMIO_BASE: testdev.mmio}, "pio": {PIO_BASE: testdev.portio}}
    assert testdev.mmio.length == 4096 and testdev.portio.length == 256


@pytest.mark.parametrize("window", ["mmio", "portio"])
def test_the_kvm_unit_tests_loop_finds_three_tests_per_bar(machine, window):
    platform, _ = machine
    names, counts = run_like_kvm_unit_tests(platform, window)
    assert names == [name for name in NAMES if name.startswith(window)]
    assert counts == [16, 16, 16]


@pytest.mark.parametrize("i", range(6))
def test_header_layout(machine, i):
    platform, _ = machine
    window = "mmio" if i < 3 else "portio"
    kind, base = WINDOWS[window]
    platform.write(kind, base, 1, i % 3)
    header = bytes(platform.read(kind, base + n, 1) for n in range(16 + len(NAMES[i]) + 1))
    test, width, offset, data, count = struct.unpack_from("<BB2xIB3xI", header)
    assert test == i
    assert width == 1
    assert offset == (2048 if window == "mmio" else 128) + i
    assert data == (0xCE if "wildcard" in NAMES[i] else 0xFA)
    assert count == 0
    assert header[16:] == NAMES[i].encode() + b"\0"
    assert platform.read(kind, base + 4, 4) == offset  # a dword read is four byte reads, low first


def test_datamatch_counts_only_the_right_data_at_the_right_offset(machine):
    platform, testdev = machine
    platform.write("pio", PIO_BASE, 1, 2)  # portio-datamatch-eventfd: offset 128 + 5
    offset = platform.read("pio", PIO_BASE + 4, 4)
    assert offset == 133
    for value in (0xFA, 0xFB, 0x00, 0xFA):
        platform.write("pio", PIO_BASE + offset, 1, value)
    platform.write("pio", PIO_BASE + offset + 1, 1, 0xFA)  # wrong offset
    assert platform.read("pio", PIO_BASE + 12, 4) == 2
    assert testdev.count(5) == 2


def test_wildcard_counts_any_data(machine):
    platform, testdev = machine
    platform.write("mmio", MMIO_BASE, 1, 1)
    for value in (0x00, 0xCE, 0xFF):
        platform.write("mmio", MMIO_BASE + 2049, 1, value)
    assert platform.read("mmio", MMIO_BASE + 12, 4) == 3 == testdev.count(1)


def test_a_wide_write_is_bytes_as_in_qemu(machine):
    platform, testdev = machine
    platform.write("mmio", MMIO_BASE, 1, 0)  # mmio-no-eventfd: offset 2048, data 0xFA
    platform.write("mmio", MMIO_BASE + 2048, 4, 0xFAFAFAFA)  # only the first byte lands on 2048
    platform.write("mmio", MMIO_BASE + 2047, 2, 0xFA00)  # its second byte does
    platform.write("mmio", MMIO_BASE + 2047, 2, 0x00FA)  # here the 0xFA misses
    assert testdev.count(0) == 2


def test_selecting_again_zeroes_the_count_and_three_selects_none(machine):
    platform, testdev = machine
    platform.write("mmio", MMIO_BASE, 1, 0)
    platform.write("mmio", MMIO_BASE + 2048, 1, 0xFA)
    assert testdev.count(0) == 1
    platform.write("mmio", MMIO_BASE, 1, 0)
    assert testdev.count(0) == 0
    platform.write("mmio", MMIO_BASE, 1, 3)
    assert testdev.current is None
    assert platform.read("mmio", MMIO_BASE, 4) == 0 and platform.read("mmio", MMIO_BASE + 16, 1) == 0
    platform.write("mmio", MMIO_BASE + 2048, 1, 0xFA)  # nothing selected: nothing counted
    assert [testdev.count(i) for i in range(6)] == [0] * 6


def test_both_bars_show_the_selected_test(machine):
    platform, testdev = machine
    platform.write("pio", PIO_BASE, 1, 0)  # portio-no-eventfd
    assert platform.read("mmio", MMIO_BASE, 1) == 3  # read through BAR0: the same header
    platform.write("mmio", MMIO_BASE + 131, 1, 0xFA)  # and its offset counts through BAR0 too, as in QEMU
    assert testdev.count(3) == 1


def test_reads_past_the_name_and_without_a_test_are_zero(machine):
    platform, testdev = machine
    assert platform.read("mmio", MMIO_BASE, 4) == 0
    platform.write("pio", PIO_BASE, 1, 0)
    end = 16 + len("portio-no-eventfd")
    assert platform.read("pio", PIO_BASE + end - 1, 1) == ord("d")
    assert platform.read("pio", PIO_BASE + end, 4) == 0
    assert platform.read("pio", PIO_BASE + 255, 1) == 0


def test_reset_deselects_and_unmaps(machine):
    platform, testdev = machine
    platform.write("mmio", MMIO_BASE, 1, 1)
    testdev.reset()
    assert testdev.current is None
    assert platform.maps == {"mmio": {}, "pio": {}}


def test_windows_refuse_bad_host_calls():
    testdev = PciTestDev()
    for offset, size in ((4096, 1), (4095, 2), (-1, 1), (0, 0), (0, 9)):
        with pytest.raises(DeviceError):
            testdev.mmio.read(offset, size)
    with pytest.raises(DeviceError):
        testdev.portio.write(255, b"\x00\x00")
