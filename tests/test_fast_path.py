"""The C loop changes where an exit is handled, never what it does.

* Every shipped guest, run with ``c_loop=True`` and ``False``, computes the
  same results and leaves the same host-visible device state: the POST
  port's count and last code, debug-exit's status, the UART's bytes sent,
  the buses' per-device counters and unmapped counts.
* Devices at any port -- 0x7fff, 0x8000, 0xc000, 0xffff (a regression:
  ports from 0x8000 came back negative) -- work on the Python path (packed
  single accesses and decoded REP string I/O) and on the C path (a device's
  own fast rows).
"""

from __future__ import annotations

import contextlib
import os
import tempfile

import pytest

from pykvm import guests
from pykvm.block import RawImage, create_image
from pykvm.devices import FastRow
from pykvm.platform.machine import Machine
from pykvm.virtio.backends import MemoryBackend

pytestmark = pytest.mark.kvm


class Echo(MemoryBackend):
    def write(self, data: bytes) -> None:
        super().write(data)
        self.feed(data)


# How each guest is run: its arguments, what it needs, its input.  Guests that
# never stop by themselves are run to a timeout and only compared on that.
SETUP = {
    "bench32": {"args": (1, 40)}, "bench64": {"args": (3, 40)}, "bench64u": {"args": (2, 40)},
    "primes64u": {"args": (2000, 0)},
    "iobench64u": {"args": (1, 64), "timing": ("rcx", "rdx")},  # it leaves its TSC readings there
    "uart_echo": {"input": b"hi\x04"},
    "uart_irq": {"input": b"ok\x04", "irqchip": True},
    "virtio64u": {"virtio": True},
    "virtio64": {"virtio": True, "irqchip": True},
    "spin16": {"timeout": 0.2}, "spin64": {"timeout": 0.2}, "spin64u": {"timeout": 0.2},
    "ata": {"ide": True},
    "blk": {"disk": True},  # finds the disk by its scan (no command line), verifies 64 blocks
}


def run(name: str, c_loop: bool):
    setup = SETUP.get(name, {})
    with contextlib.ExitStack() as stack:
        m = stack.enter_context(Machine(memory="32M", c_loop=c_loop, irqchip=setup.get("irqchip", False)))
        if setup.get("virtio"):
            m.add_virtio_console(Echo())
        if setup.get("ide"):
            path = os.path.join(stack.enter_context(tempfile.TemporaryDirectory()), "disk.raw")
            create_image(path, "raw", 1 << 20)
            m.add_ide_disk(stack.enter_context(RawImage.open(path)))
        if setup.get("disk"):
            path = os.path.join(stack.enter_context(tempfile.TemporaryDirectory()), "blk.raw")
            create_image(path, "raw", 1 << 20)
            m.add_virtio_blk(stack.enter_context(RawImage.open(path)))
        m.load_guest(name, args=setup.get("args", (0, 0)))
        if "input" in setup:
            m.feed_serial(setup["input"])
        result = m.run(timeout=setup.get("timeout", 30))
        state = {
            "post": (m.post.count, m.post.last),
            "debug_exit": m.debug_exit.exit_status,
            "uart_bytes_out": m.serial.bytes_out,
            "pio_stats": dict(m.pio.stats), "mmio_stats": dict(m.mmio.stats),
            "unmapped": (m.pio.unmapped, m.mmio.unmapped),
        }
        return result, state


def guest_names():
    from pykvm.host import nested_kvm_module

    skip_paged32 = nested_kvm_module() == "kvm_pvm"  # kvm_pvm pages only in long mode (test_guests checks the refusal)
    return [n for n in guests.names() if not (skip_paged32 and guests.info(n).mode == "paged32")]


@pytest.mark.parametrize("name", guest_names())
def test_the_c_loop_changes_nothing_the_host_or_guest_can_see(name):
    fast, fast_state = run(name, c_loop=True)
    slow, slow_state = run(name, c_loop=False)
    assert fast.ended == slow.ended, (fast.message, slow.message)
    if "timeout" in SETUP.get(name, {}):
        assert fast.ended == "timeout"
        return
    assert fast.exit_status == slow.exit_status
    assert fast.serial == slow.serial
    timing = SETUP.get(name, {}).get("timing", ())
    assert {k: v for k, v in fast.regs.items() if k not in timing} == \
        {k: v for k, v in slow.regs.items() if k not in timing}
    assert fast_state == slow_state
    assert sum(v["c"] for v in slow.exits.values()) == 0
    if fast.serial:
        assert fast.exits["io"]["c"] > 0  # the C loop really took part of the work


# -- devices at any port ------------------------------------------------------------------

PORTS = [0x7FFF, 0x8000, 0xC000, 0xFFFF]


class Latch:
    """A one-register device: reads give back the last value written."""

    name = "latch"
    length = 1

    def __init__(self) -> None:
        self.value = b"\0"
        self.writes: list[bytes] = []

    def read(self, offset: int, size: int) -> bytes:
        return self.value * size

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append(bytes(data))
        self.value = bytes(data[-1:])


class FastLatch(Latch):
    """The same, but offering the C loop its register: C drops writes and answers reads with 0xee."""

    fast_path_changed = None

    def __init__(self) -> None:
        super().__init__()
        self.c_writes = 0
        self.c_last = None

    def fast_rows(self):
        return (FastRow(0, 1, read="const", read_value=0xEE, write="drop"),)

    def fast_hits(self, row, hits: int, last_value: int) -> None:
        self.c_writes += hits
        self.c_last = last_value


def real_mode(port: int) -> bytes:
    """mov dx, port; mov al, 0x34; out dx, al; mov al, 0; in al, dx; mov si, 0x8100; mov cx, 3; rep outsb; hlt."""
    p = port.to_bytes(2, "little")
    code = b"\xba" + p + b"\xb0\x34\xee" + b"\xb0\x00\xec" + b"\xfc\xbe\x00\x81\xb9\x03\x00\xf3\x6e" + b"\xf4"
    return code.ljust(0x100, b"\x90") + b"xyz"


@pytest.mark.parametrize("port", PORTS)
@pytest.mark.parametrize("c_loop", [True, False], ids=["c-loop", "python"])
def test_python_device_at_any_port(port, c_loop):
    with Machine(memory="4M", c_loop=c_loop, strict=True) as m:
        latch = Latch()
        m.add_device(latch, port=port)
        m.load_image(real_mode(port), mode="real")
        result = m.run(timeout=10)
        assert result.ended == "hlt", result.message  # strict: any access to nothing would stop the run
        assert result.regs["rax"] & 0xFF == 0x34  # the IN read back what the OUT wrote
        assert latch.writes == [b"\x34", b"x", b"y", b"z"]  # REP OUTSB: the decoded path, one write per byte
        assert m.pio.stats["latch"] == 5


@pytest.mark.parametrize("port", PORTS)
def test_c_row_at_any_port(port):
    with Machine(memory="4M", strict=True) as m:
        latch = FastLatch()
        m.add_device(latch, port=port)
        m.load_image(real_mode(port), mode="real")
        result = m.run(timeout=10)
        assert result.ended == "hlt", result.message
        assert latch.writes == []  # everything went through C
        assert result.regs["rax"] & 0xFF == 0xEE  # C answered the IN
        assert (latch.c_writes, latch.c_last) == (4, ord("z"))  # the OUT and the three bytes of REP OUTSB
        assert m.pio.stats["latch"] == 5  # ... and the IN: the bus counts what C did as well
