"""PCI configuration mechanism #1 at 0xCF8-0xCFF, configuration space masks and BARs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm.devices import DeviceStop
from pykvm.devices.pci import PciFunction, PciHost
from pykvm.devices.pci_testdev import PciTestDev
from pykvm.errors import BusError, DeviceError

# Offsets in the host's range (it is registered at port 0xCF8).
ADDRESS, RCR, DATA = 0, 1, 4


def config_address(bus, device, function, register, enable=True):
    return (1 << 31 if enable else 0) | bus << 16 | device << 11 | function << 8 | register


class Guest:
    """A kernel's configuration accessors (Linux's pci_conf1_read/write): outl 0xCF8, then 0xCFC + (reg & 3)."""

    def __init__(self, host):
        self.host = host

    def read(self, bus, device, function, register, size):
        self.host.write(ADDRESS, config_address(bus, device, function, register & 0xFC).to_bytes(4, "little"))
        return int.from_bytes(self.host.read(DATA + (register & 3), size), "little")

    def write(self, bus, device, function, register, size, value):
        self.host.write(ADDRESS, config_address(bus, device, function, register & 0xFC).to_bytes(4, "little"))
        self.host.write(DATA + (register & 3), value.to_bytes(size, "little"))

    def scan(self):
        """Bus 0 the way Linux's pci_scan_slot does it: function 0 first, more only if multi-function."""
        found = []
        for device in range(32):
            for function in range(8):
                ids = self.read(0, device, function, 0x00, 4)
                if ids & 0xFFFF in (0xFFFF, 0x0000):
                    if function == 0:
                        break
                    continue
                header_type = self.read(0, device, function, 0x0E, 1)
                found.append((device, function, ids & 0xFFFF, ids >> 16, header_type))
                if function == 0 and not header_type & 0x80:
                    break
        return found


class BarLog:
    """The platform's side of on_bar_change: a list of the calls and the mappings they imply."""

    def __init__(self):
        self.calls = []
        self.mapped = {}

    def __call__(self, function, index, kind, old, new, size):
        self.calls.append((index, kind, old, new, size))
        assert self.mapped.get((id(function), index)) == old, "old base must be what was mapped"
        if new is None:
            self.mapped.pop((id(function), index), None)
        else:
            self.mapped[id(function), index] = new


@pytest.fixture
def host():
    return PciHost()


# --- enumeration ------------------------------------------------------------------------------


def test_a_kernel_scan_finds_exactly_the_i440fx(host):
    guest = Guest(host)
    assert guest.scan() == [(0, 0, 0x8086, 0x1237, 0x00)]
    assert guest.read(0, 0, 0, 0x08, 4) == 0x06000002  # class 06 (bridge) 00 (host), prog-if 0, revision 2
    assert guest.read(0, 0, 0, 0x2C, 4) == 0x11001AF4  # QEMU's subsystem
    assert guest.read(0, 0, 0, 0x04, 4) == 0x00000000  # command and status


def test_scan_with_the_testdev_and_a_multi_function_device(host):
    host.attach(3, 0, PciTestDev())
    host.attach(5, 0, PciFunction(vendor_id=0x8086, device_id=0x7000, class_code=0x0601, multifunction=True))
    host.attach(5, 1, PciFunction(vendor_id=0x8086, device_id=0x7010, class_code=0x0101))
    host.attach(7, 0, PciFunction(vendor_id=0x1234, device_id=0x1111, class_code=0x0300))
    assert Guest(host).scan() == [
        (0, 0, 0x8086, 0x1237, 0x00),
        (3, 0, 0x1B36, 0x0005, 0x00),
        (5, 0, 0x8086, 0x7000, 0x80),
        (5, 1, 0x8086, 0x7010, 0x00),
        (7, 0, 0x1234, 0x1111, 0x00),
    ]


def test_absent_functions_and_other_buses_read_all_ones(host):
    guest = Guest(host)
    for size, ones in ((1, 0xFF), (2, 0xFFFF), (4, 0xFFFFFFFF)):
        assert guest.read(0, 1, 0, 0x00, size) == ones
        assert guest.read(0, 0, 1, 0x00, size) == ones
        assert guest.read(1, 0, 0, 0x00, size) == ones
    guest.write(1, 0, 0, 0x3C, 1, 0x55)  # a write to nothing vanishes
    assert guest.read(0, 0, 0, 0x3C, 1) == 0


def test_multi_function_rules(host):
    with pytest.raises(BusError, match="function 0"):
        host.attach(4, 1, PciFunction(vendor_id=1, device_id=2, class_code=0))
    host.attach(4, 0, PciFunction(vendor_id=1, device_id=2, class_code=0))
    with pytest.raises(BusError, match="function 0"):
        host.attach(4, 1, PciFunction(vendor_id=1, device_id=3, class_code=0))
    with pytest.raises(BusError, match="taken"):
        host.attach(0, 0, PciFunction(vendor_id=1, device_id=2, class_code=0))
    with pytest.raises(BusError):
        host.attach(32, 0, PciFunction(vendor_id=1, device_id=2, class_code=0))
    assert set(host.functions) == {(0, 0), (4, 0)}


# --- CONFIG_ADDRESS and CONFIG_DATA -------------------------------------------------------------


def test_config_address_reads_back_without_reserved_bits(host):
    host.write(ADDRESS, (0xFFFFFFFF).to_bytes(4, "little"))
    assert host.read(ADDRESS, 4) == (0x80FFFFFC).to_bytes(4, "little")
    host.write(ADDRESS, (0x80001234).to_bytes(4, "little"))
    assert int.from_bytes(host.read(ADDRESS, 4), "little") == 0x80001234 & 0x80FFFFFC


def test_only_a_dword_at_0xcf8_is_config_address(host):
    host.write(ADDRESS, (0x80000000).to_bytes(4, "little"))
    host.write(ADDRESS, b"\x00")  # Linux's type-2 probe writes bytes here
    host.write(2, b"\x00")
    host.write(3, b"\x01")
    assert host.read(ADDRESS, 4) == (0x80000000).to_bytes(4, "little")
    assert host.read(ADDRESS, 1) == b"\xff"
    assert host.read(2, 2) == b"\xff\xff"
    assert host.ignored_accesses == 5


@pytest.mark.parametrize("lane", range(4))
def test_every_width_at_every_data_port(host, lane):
    # Register 0x00 of the host bridge holds 86 80 37 12.
    host.write(ADDRESS, config_address(0, 0, 0, 0x00).to_bytes(4, "little"))
    ids = bytes([0x86, 0x80, 0x37, 0x12])
    for size in (1, 2, 4):
        if lane + size <= 4:
            assert host.read(DATA + lane, size) == ids[lane:lane + size]
    # Register 0x40 (device-specific, writable): writes land at (reg & ~3) + lane.
    host.write(ADDRESS, config_address(0, 0, 0, 0x40).to_bytes(4, "little"))
    for size in (1, 2, 4):
        if lane + size <= 4:
            host.write(DATA, bytes(4))
            value = bytes(range(0xA1, 0xA1 + size))
            host.write(DATA + lane, value)
            expected = bytearray(4)
            expected[lane:lane + size] = value
            assert host.read(DATA, 4) == bytes(expected)
            assert host.host_bridge.config[0x40:0x44] == expected


def test_the_register_field_ignores_the_low_address_bits(host):
    host.write(ADDRESS, (config_address(0, 0, 0, 0x00) | 0x3).to_bytes(4, "little"))
    assert host.read(DATA, 2) == b"\x86\x80"


def test_enable_bit_clear_reads_all_ones_and_drops_writes(host):
    host.write(ADDRESS, config_address(0, 0, 0, 0x3C, enable=False).to_bytes(4, "little"))
    assert host.read(DATA, 4) == b"\xff" * 4
    assert host.read(DATA + 2, 2) == b"\xff" * 2
    assert host.read(DATA + 3, 1) == b"\xff"
    host.write(DATA, b"\x0b")
    host.write(ADDRESS, config_address(0, 0, 0, 0x3C).to_bytes(4, "little"))
    assert host.read(DATA, 1) == b"\x00"
    host.write(DATA, b"\x0b")
    assert host.read(DATA, 1) == b"\x0b"


def test_bad_host_calls_raise_device_error(host):
    for offset, size in ((0, 3), (7, 2), (8, 1), (-1, 1), (5, 4)):
        with pytest.raises(DeviceError):
            host.read(offset, size)
        with pytest.raises(DeviceError):
            host.write(offset, bytes(max(size, 0)))


# --- registers and masks --------------------------------------------------------------------------


def test_read_only_fields_stay(host):
    guest = Guest(host)
    host.attach(3, 0, PciTestDev())
    before = {reg: guest.read(0, 3, 0, reg, 4) for reg in (0x00, 0x08, 0x2C, 0x34)}
    header_and_pin = guest.read(0, 3, 0, 0x0C, 4) & 0x00FF0000, guest.read(0, 3, 0, 0x3C, 4) & 0xFFFFFF00
    for reg in range(0, 0x40, 4):
        if reg not in range(0x10, 0x28):
            guest.write(0, 3, 0, reg, 4, 0xFFFFFFFF)
    assert {reg: guest.read(0, 3, 0, reg, 4) for reg in before} == before
    assert (guest.read(0, 3, 0, 0x0C, 4) & 0x00FF0000, guest.read(0, 3, 0, 0x3C, 4) & 0xFFFFFF00) == header_and_pin
    assert guest.read(0, 3, 0, 0x0C, 1) == 0xFF  # cache line size is writable
    assert guest.read(0, 3, 0, 0x3C, 1) == 0xFF  # so is the interrupt line
    assert guest.read(0, 3, 0, 0x3D, 1) == 0x00  # the pin is not (pci-testdev has none)
    assert guest.read(0, 3, 0, 0x04, 2) == 0x0507  # IO, MEM, MASTER, SERR, INTX_DISABLE
    assert guest.read(0, 3, 0, 0x30, 4) == 0  # no expansion ROM


def test_status_bits_are_write_one_to_clear():
    function = PciFunction(vendor_id=1, device_id=2, class_code=0)
    function.config[0x06:0x08] = (0x2000 | 0x0100).to_bytes(2, "little")  # the device saw a master abort
    function.config_write(0x06, 2, 0x0000)
    assert function.config_read(0x06, 2) == 0x2100
    function.config_write(0x06, 2, 0x2000)
    assert function.config_read(0x06, 2) == 0x0100
    function.config_write(0x04, 4, 0xFFFF0000)  # a dword write to command+status clears the rest
    assert function.config_read(0x06, 2) == 0 and function.config_read(0x04, 2) == 0


# --- BARs -------------------------------------------------------------------------------------------


def test_bar_sizing_reads_back_the_size_and_type(host):
    host.attach(3, 0, PciTestDev())
    guest = Guest(host)
    for reg, expected in ((0x10, 0xFFFFF000), (0x14, 0xFFFFFF01), (0x18, 0), (0x24, 0)):
        original = guest.read(0, 3, 0, reg, 4)
        guest.write(0, 3, 0, reg, 4, 0xFFFFFFFF)
        assert guest.read(0, 3, 0, reg, 4) == expected
        guest.write(0, 3, 0, reg, 4, original)
    assert guest.read(0, 3, 0, 0x10, 4) == 0x0  # memory, 32-bit, not prefetchable
    assert guest.read(0, 3, 0, 0x14, 4) == 0x1  # I/O


def test_a_prefetchable_bar_shows_its_type_bit():
    function = PciFunction(vendor_id=1, device_id=2, class_code=0)
    function.add_bar(2, "mmio", 1 << 20, prefetchable=True)
    function.config_write(0x18, 4, 0xFFFFFFFF)
    assert function.config_read(0x18, 4) == 0xFFF00008


def test_programming_bars_and_decode_enable_tell_the_platform(host):
    log = BarLog()
    testdev = PciTestDev(on_bar_change=log)
    host.attach(3, 0, testdev)
    guest = Guest(host)
    guest.write(0, 3, 0, 0x10, 4, 0xFEBFF123)  # low bits are not address bits
    guest.write(0, 3, 0, 0x14, 4, 0xC000)
    assert guest.read(0, 3, 0, 0x10, 4) == 0xFEBFF000
    assert guest.read(0, 3, 0, 0x14, 4) == 0xC001
    assert log.calls == []  # nothing decodes while the command register says no
    guest.write(0, 3, 0, 0x04, 2, 0x0003)
    assert log.calls == [(0, "mmio", None, 0xFEBFF000, 4096), (1, "pio", None, 0xC000, 256)]
    assert testdev.bar(0).base == 0xFEBFF000 and testdev.decoded_base(1) == 0xC000
    log.calls.clear()
    guest.write(0, 3, 0, 0x14, 4, 0xC100)  # move the I/O BAR while decoding
    assert log.calls == [(1, "pio", 0xC000, 0xC100, 256)]
    log.calls.clear()
    guest.write(0, 3, 0, 0x04, 2, 0x0001)  # memory decoding off: BAR0 unmapped
    assert log.calls == [(0, "mmio", 0xFEBFF000, None, 4096)]
    log.calls.clear()
    guest.write(0, 3, 0, 0x04, 2, 0x0000)
    assert log.calls == [(1, "pio", 0xC100, None, 256)]
    assert log.mapped == {}


def test_sizing_a_decoding_bar_unmaps_then_remaps_it(host):
    log = BarLog()
    host.attach(3, 0, PciTestDev(on_bar_change=log))
    guest = Guest(host)
    guest.write(0, 3, 0, 0x10, 4, 0xFEBFF000)
    guest.write(0, 3, 0, 0x04, 2, 0x0002)
    guest.write(0, 3, 0, 0x10, 4, 0xFFFFFFFF)
    guest.write(0, 3, 0, 0x10, 4, 0xFEBFF000)
    assert log.calls == [(0, "mmio", None, 0xFEBFF000, 4096), (0, "mmio", 0xFEBFF000, None, 4096),
                         (0, "mmio", None, 0xFEBFF000, 4096)]


def test_bar_bytes_written_one_at_a_time(host):
    log = BarLog()
    host.attach(3, 0, PciTestDev(on_bar_change=log))
    guest = Guest(host)
    guest.write(0, 3, 0, 0x04, 2, 0x0001)
    for i, byte in enumerate((0x00, 0xD0, 0x00, 0x00)):  # I/O BAR to 0xD000, a byte at a time
        guest.write(0, 3, 0, 0x14 + i, 1, byte)
    assert log.calls == [(1, "pio", None, 0xD000, 256)]


def test_bars_beyond_their_space_do_not_decode(host):
    log = BarLog()
    testdev = PciTestDev(on_bar_change=log)
    host.attach(3, 0, testdev)
    guest = Guest(host)
    guest.write(0, 3, 0, 0x14, 4, 0x00010000)  # past the 64 KiB port space
    guest.write(0, 3, 0, 0x10, 4, 0xFFFFF000)  # its last byte would be 0xFFFFFFFF
    guest.write(0, 3, 0, 0x04, 2, 0x0003)
    assert log.calls == []
    assert testdev.decoded_base(0) is None and testdev.decoded_base(1) is None


def test_host_reset_clears_everything_and_unmaps(host):
    log = BarLog()
    testdev = PciTestDev(on_bar_change=log)
    host.attach(3, 0, testdev)
    guest = Guest(host)
    guest.write(0, 3, 0, 0x14, 4, 0xC000)
    guest.write(0, 3, 0, 0x04, 2, 0x0001)
    guest.write(0, 3, 0, 0x3C, 1, 11)
    host.write(RCR, b"\x02")
    host.reset()
    assert log.calls[-1] == (1, "pio", 0xC000, None, 256)
    assert host.read(ADDRESS, 4) == bytes(4) and host.read(RCR, 1) == b"\x00"
    assert testdev.config_read(0x14, 4) == 0x1 and testdev.config_read(0x3C, 1) == 0
    assert testdev.vendor_id == 0x1B36


def test_add_bar_refuses_what_a_bar_cannot_be():
    function = PciFunction(vendor_id=1, device_id=2, class_code=0)
    function.add_bar(0, "mmio", 16)
    for args in ((0, "mmio", 4096), (6, "mmio", 4096), (1, "mmio", 8), (1, "mmio", 3000),
                 (1, "pio", 512), (1, "pio", 2), (1, "dma", 16)):
        with pytest.raises(DeviceError):
            function.add_bar(*args)
    with pytest.raises(DeviceError):
        function.add_bar(1, "pio", 16, prefetchable=True)
    with pytest.raises(DeviceError):
        function.config_read(0xFF, 2)


# --- reset control 0xCF9 --------------------------------------------------------------------------


def test_reset_control_register_keeps_the_reset_type_and_resets_on_bit_2():
    resets = []
    host = PciHost(on_reset=lambda: resets.append(True))
    host.write(RCR, b"\x02")
    assert host.read(RCR, 1) == b"\x02" and resets == []
    host.write(RCR, b"\x0b")  # bits other than 1 are not kept
    assert host.read(RCR, 1) == b"\x02"
    host.write(RCR, b"\x00")
    assert host.read(RCR, 1) == b"\x00"
    host.write(RCR, b"\x02")
    host.write(RCR, b"\x06")  # the FADT's RESET_VALUE
    assert resets == [True]
    assert host.read(RCR, 1) == b"\x02"  # QEMU leaves the register alone on a reset request
    host.write(RCR, b"\x04")  # a soft reset is a reset too (QEMU does not tell them apart)
    assert resets == [True, True]
    assert host.ignored_accesses == 0


def test_reset_control_through_a_wider_access_but_not_through_config_address():
    resets = []
    host = PciHost(on_reset=lambda: resets.append(True))
    host.write(ADDRESS, (0x80000600).to_bytes(4, "little"))  # a dword at 0xCF8 is CONFIG_ADDRESS only
    assert resets == []
    host.write(ADDRESS, (0x0600).to_bytes(2, "little"))  # bytes 0xCF8-0xCF9: the 0xCF9 byte is 0x06
    assert resets == [True]


def test_by_default_a_reset_stops_the_machine(host):
    with pytest.raises(DeviceStop) as stop:
        host.write(RCR, b"\x06")
    assert stop.value.reason == "reset"


# --- any access ---------------------------------------------------------------------------------------

accesses = st.lists(
    st.tuples(st.sampled_from([(0, 1), (0, 2), (0, 4), (1, 1), (1, 2), (2, 1), (2, 2), (3, 1),
                               (4, 1), (4, 2), (4, 4), (5, 1), (5, 2), (6, 1), (6, 2), (7, 1)]),
              st.booleans(),
              st.one_of(st.integers(0, 0xFFFFFFFF),
                        st.sampled_from([0xFFFFFFFF, 0x80000000, 0x80001800, 0x80001810, 0x80001814,
                                         0x80001804, 0x80000004, 0x0003, 0xC000, 0xFEBFF000])),),
    max_size=80)


@settings(max_examples=150, deadline=None)
@given(accesses)
def test_any_access_sequence_is_absorbed(sequence):
    resets = []
    log = BarLog()
    host = PciHost(on_reset=lambda: resets.append(True))
    testdev = PciTestDev(on_bar_change=log)
    host.attach(3, 0, testdev)
    for (offset, size), is_write, value in sequence:
        if is_write:
            host.write(offset, (value & ((1 << 8 * size) - 1)).to_bytes(size, "little"))
        else:
            assert len(host.read(offset, size)) == size
    assert (host.host_bridge.vendor_id, host.host_bridge.device_id) == (0x8086, 0x1237)
    assert (testdev.vendor_id, testdev.device_id) == (0x1B36, 0x0005)
    assert host.host_bridge.config_read(0x08, 4) == 0x06000002
    assert testdev.config_read(0x0E, 1) == 0 and testdev.config_read(0x3D, 1) == 0
    # What the platform was told is what the function decodes.
    for index in (0, 1):
        assert log.mapped.get((id(testdev), index)) == testdev.decoded_base(index)
