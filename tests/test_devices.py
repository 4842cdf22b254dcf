"""isa-debug-exit, the POST port, the i8042 reset line; the device protocol."""

from __future__ import annotations

import logging

import pytest

from pykvm.platform.bus import Bus
from pykvm.devices import DebugExit, Device, DeviceStop, I8042, Port80, Uart16550

# -- isa-debug-exit ---------------------------------------------------------------


@pytest.mark.parametrize(
    "data, status",
    [
        (b"\x00", 0x01),
        (b"\x01", 0x03),
        (b"\x31", 0x63),  # the usual "success" code of test harnesses
        (b"\xff", 0x1FF),
        (b"\x34\x12", 0x2469),  # outw: little-endian 0x1234
        (b"\x00\x01", 0x201),
        (b"\x78\x56\x34\x12", 0x2468ACF1),  # outl
    ],
)
def test_debug_exit_status(data, status):
    device = DebugExit(iosize=4)
    with pytest.raises(DeviceStop) as stop:
        device.write(0, data)
    assert (stop.value.reason, stop.value.status) == ("debug-exit", status)
    assert device.exit_status == status
    assert "debug-exit" in str(stop.value)


def test_debug_exit_on_port_0xf4_through_the_bus():
    bus = Bus("pio")
    device = DebugExit(iosize=2)
    bus.register(0xF4, device.length, device)
    with pytest.raises(DeviceStop) as stop:
        bus.write(0xF4, (0x31).to_bytes(2, "little"))
    assert stop.value.status == 0x63
    assert bus.stats == {"debug-exit": 1}


def test_debug_exit_reads_all_ones_and_checks_sizes():
    device = DebugExit()
    assert device.exit_status is None
    assert device.read(0, 1) == b"\xff"
    with pytest.raises(ValueError):
        DebugExit(iosize=3)
    with pytest.raises(ValueError):
        device.write(0, b"")


# -- port 0x80 ----------------------------------------------------------------------


def test_port80_records_post_codes():
    port = Port80()
    assert port.read(0, 1) == b"\xff"  # write-only, as in QEMU
    for code in (0x10, 0x2A, 0x7E):
        port.write(0, bytes([code]))
    assert port.read(0, 2) == b"\xff\xff"
    assert port.last == 0x7E
    assert port.count == 3


def test_port80_takes_back_what_the_c_loop_dropped():
    port = Port80()
    port.write(0, b"\x01")
    (row,) = port.fast_rows()
    assert (row.read, row.write, row.read_value) == ("const", "drop", 0xFF)
    port.fast_hits(row, 5, 0x42)  # C dropped five writes, the last of 0x42
    assert (port.count, port.last) == (6, 0x42)


# -- i8042 --------------------------------------------------------------------------


def test_i8042_reset_command_stops():
    with pytest.raises(DeviceStop) as stop:
        I8042().write(0, b"\xfe")
    assert (stop.value.reason, stop.value.status) == ("reset", 0)


def test_i8042_status_and_other_commands(caplog):
    kbc = I8042()
    assert kbc.read(0, 1) == b"\x00"  # output and input buffers empty
    with caplog.at_level(logging.DEBUG, logger="pykvm.devices.i8042"):
        kbc.write(0, b"\xaa")  # self-test: ignored
    assert "0xaa" in caplog.text
    assert kbc.read(0, 1) == b"\x00"


def test_i8042_reset_through_the_bus_at_0x64():
    bus = Bus("pio")
    bus.register(0x64, 1, I8042())
    assert bus.read(0x64, 1) == b"\x00"
    with pytest.raises(DeviceStop, match="reset"):
        bus.write(0x64, b"\xfe")


# -- the protocol -------------------------------------------------------------------


@pytest.mark.parametrize(
    "device", [Uart16550(), DebugExit(), Port80(), I8042()], ids=lambda d: d.name
)
def test_devices_satisfy_the_protocol(device):
    assert isinstance(device, Device)
    assert isinstance(device.name, str) and device.length >= 1


def test_device_stop_fields():
    stop = DeviceStop("debug-exit", 0x63)
    assert (stop.reason, stop.status) == ("debug-exit", 0x63)
    assert str(stop) == "debug-exit (status 0x63)"
    assert DeviceStop("reset").status == 0


def test_a_small_pc_on_one_bus():
    """COM1, POST and debug-exit at their contract ports, as a guest uses them."""
    out = bytearray()
    bus = Bus("pio", strict=True)
    bus.register(0x3F8, 8, Uart16550(output=out.extend), name="com1")
    bus.register(0x80, 1, Port80())
    bus.register(0xF4, 1, DebugExit())
    for byte in b"ok\n":
        bus.write(0x3F8, bytes([byte]))
    bus.write(0x80, b"\x42")
    assert bus.read(0x3FD, 1) == b"\x60"  # LSR: transmitter idle
    with pytest.raises(DeviceStop) as stop:
        bus.write(0xF4, b"\x00")
    assert out == b"ok\n" and stop.value.status == 1
    assert bus.stats == {"com1": 4, "port80": 1, "debug-exit": 1}
