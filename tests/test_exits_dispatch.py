"""Exits as values and their dispatch: pure functions, tested without KVM.

A ``struct kvm_run`` is allocated by cffi and filled as KVM would fill it.
"""

from __future__ import annotations

import pytest

from pykvm import exits
from pykvm._native_loader import ffi, lib
from pykvm.platform.bus import Bus, UnmappedAccess
from pykvm.devices import DebugExit, DeviceStop, Uart16550
from pykvm.platform.vcpu_loop import dispatch


def make_run(buffer_size: int = 8192):
    raw = ffi.new("char[]", buffer_size)
    return raw, ffi.cast("struct kvm_run *", raw)


def fill_io(run, direction, port, size, count, payload=b""):
    run.exit_reason = lib.KVM_EXIT_IO
    run.io.direction, run.io.port, run.io.size, run.io.count = direction, port, size, count
    run.io.data_offset = 4096
    ffi.memmove(ffi.cast("char *", run) + 4096, payload, len(payload))


def test_decode_io_out_with_rep_data():
    raw, run = make_run()
    fill_io(run, lib.KVM_EXIT_IO_OUT, 0x3F8, 2, 3, b"aabbcc")
    assert exits.decode(run) == exits.IoOut(0x3F8, 2, 3, b"aabbcc")


def test_decode_io_in_and_complete():
    raw, run = make_run()
    fill_io(run, lib.KVM_EXIT_IO_IN, 0x60, 1, 4)
    assert exits.decode(run) == exits.IoIn(0x60, 1, 4)
    exits.complete_io_in(run, b"wxyz")
    assert ffi.buffer(raw)[4096:4100] == b"wxyz"
    with pytest.raises(ValueError):
        exits.complete_io_in(run, b"short")


def test_decode_mmio():
    raw, run = make_run()
    run.exit_reason = lib.KVM_EXIT_MMIO
    run.mmio.phys_addr, run.mmio.len, run.mmio.is_write = 0xD000_0050, 4, 1
    run.mmio.data[0:4] = [1, 2, 3, 4]
    assert exits.decode(run) == exits.MmioWrite(0xD000_0050, b"\x01\x02\x03\x04")
    run.mmio.is_write = 0
    assert exits.decode(run) == exits.MmioRead(0xD000_0050, 4)
    exits.complete_mmio_read(run, b"\xaa\xbb\xcc\xdd")
    assert list(run.mmio.data[0:4]) == [0xAA, 0xBB, 0xCC, 0xDD]


def test_decode_other_reasons():
    raw, run = make_run()
    run.exit_reason = lib.KVM_EXIT_HLT
    assert exits.decode(run) == exits.Hlt()
    run.exit_reason = lib.KVM_EXIT_SHUTDOWN
    assert exits.decode(run) == exits.Shutdown()
    run.exit_reason = lib.KVM_EXIT_INTERNAL_ERROR
    run.internal.suberror, run.internal.ndata = lib.KVM_INTERNAL_ERROR_EMULATION, 2
    run.internal.data[0:2] = [7, 9]
    decoded = exits.decode(run)
    assert decoded == exits.InternalError(1, (7, 9)) and decoded.suberror_name == "emulation failure"
    run.exit_reason = lib.KVM_EXIT_DEBUG
    run.debug.arch.exception, run.debug.arch.pc = 1, 0x100005
    run.debug.arch.dr6, run.debug.arch.dr7 = 0xFFFF4FF0, 0x400
    assert exits.decode(run) == exits.Debug(1, 0x100005, 0xFFFF4FF0, 0x400)
    run.exit_reason = lib.KVM_EXIT_FAIL_ENTRY
    run.fail_entry.hardware_entry_failure_reason, run.fail_entry.cpu = 0x21, 1
    assert exits.decode(run) == exits.FailEntry(0x21, 1)
    run.exit_reason = lib.KVM_EXIT_SYSTEM_EVENT
    run.system_event.type, run.system_event.ndata = lib.KVM_SYSTEM_EVENT_RESET, 0
    assert exits.decode(run) == exits.SystemEvent(lib.KVM_SYSTEM_EVENT_RESET, ())
    run.exit_reason = lib.KVM_EXIT_HYPERCALL
    run.hypercall.nr = 5
    assert exits.decode(run).nr == 5
    run.exit_reason = 4242
    unknown = exits.decode(run)
    assert unknown == exits.Unknown(4242, run.hw.hardware_exit_reason) and "4242" in unknown.name


def test_exit_values_compare_by_kind_and_fields():
    e = exits.IoOut(1, 1, 1, b"x")
    assert e == exits.IoOut(1, 1, 1, b"x") and hash(e) == hash(exits.IoOut(1, 1, 1, b"x"))
    assert e != exits.IoOut(1, 1, 1, b"y")
    assert exits.Hlt() != exits.Shutdown()  # no fields, different exits
    assert exits.MmioRead(5, 4) != exits.FailEntry(5, 4)
    assert repr(e) == "IoOut(port=1, size=1, count=1, data=b'x')"
    assert isinstance(e, exits.Exit) and e.reason == "io_out"
    with pytest.raises(AttributeError):
        e.extra = 1  # __slots__: no attributes beyond the fields


class Recorder:
    name = "rec"

    def __init__(self):
        self.writes = []

    def read(self, offset, size):
        return bytes([offset + i for i in range(size)])

    def write(self, offset, data):
        self.writes.append((offset, data))


def buses(strict=False):
    pio, mmio = Bus("pio", strict=strict), Bus("mmio", strict=strict)
    return pio, mmio


def test_dispatch_splits_rep_string_io_per_element():
    pio, mmio = buses()
    rec = Recorder()
    pio.register(0x700, 4, rec)
    assert dispatch(exits.IoOut(0x701, 1, 3, b"abc"), pio, mmio) is None
    assert rec.writes == [(1, b"a"), (1, b"b"), (1, b"c")]
    assert dispatch(exits.IoIn(0x702, 2, 2), pio, mmio) == b"\x02\x03\x02\x03"


def test_dispatch_mmio_and_unmapped():
    pio, mmio = buses()
    rec = Recorder()
    mmio.register(0xD000_0000, 0x200, rec)
    dispatch(exits.MmioWrite(0xD000_0070, b"\x0f\0\0\0"), pio, mmio)
    assert rec.writes == [(0x70, b"\x0f\0\0\0")]
    assert dispatch(exits.MmioRead(0xD000_0004, 4), pio, mmio) == b"\x04\x05\x06\x07"
    assert dispatch(exits.MmioRead(0xE000_0000, 4), pio, mmio) == b"\xff" * 4
    assert dispatch(exits.IoIn(0x1234, 2, 1), pio, mmio) == b"\xff\xff"


def test_dispatch_strict_unmapped_raises():
    pio, mmio = buses(strict=True)
    with pytest.raises(UnmappedAccess) as info:
        dispatch(exits.IoOut(0x1234, 1, 1, b"\0"), pio, mmio)
    assert "0x1234" in str(info.value)


def test_dispatch_device_stop_propagates():
    pio, mmio = buses()
    pio.register(0xF4, 1, DebugExit())
    with pytest.raises(DeviceStop) as info:
        dispatch(exits.IoOut(0xF4, 1, 1, b"\x31"), pio, mmio)
    assert info.value.reason == "debug-exit" and info.value.status == 0x63


def test_dispatch_feeds_the_uart():
    pio, mmio = buses()
    out = []
    pio.register(0x3F8, 8, Uart16550(output=out.append))
    for byte in b"hi":
        dispatch(exits.IoOut(0x3F8, 1, 1, bytes([byte])), pio, mmio)
    assert b"".join(out) == b"hi"
    assert dispatch(exits.IoIn(0x3FD, 1, 1), pio, mmio) == b"\x60"  # THRE | TEMT


def test_dispatch_rejects_non_io_exits():
    pio, mmio = buses()
    with pytest.raises(TypeError):
        dispatch(exits.Hlt(), pio, mmio)
