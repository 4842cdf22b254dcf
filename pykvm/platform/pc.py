"""The devices every pykvm machine has, at their PC ports, and where COM1's output goes.

What tiny test guests expect of a PC (and what QEMU's ``-M pc`` has at the
same ports): a 16550 UART on COM1 (0x3f8, IRQ 4), QEMU's isa-debug-exit at
0xf4 (as test harnesses configure it), a POST-code sink at 0x80 and the
i8042's reset line at 0x64.  The numbers live in ``pykvm.platform.layout``.

:class:`SerialCapture` is COM1's output path: it keeps what the guest wrote
for the run's result (bounded: a guest printing forever must not exhaust
host memory) and forwards it to the caller's sink.  A sink that fails (a
full disk, a closed pipe) stops forwarding, keeps the error, and asks the
machine to stop the run, so the failure ends the run with a clear message
instead of unwinding through the UART model.
"""

from __future__ import annotations

from collections.abc import Callable

from pykvm.devices import DebugExit, I8042, Port80, Uart16550
from pykvm.platform import layout
from pykvm.values import Value

#: At most this much serial output is kept for a RunResult.
SERIAL_CAPTURE_LIMIT = 16 << 20


class SerialCapture:
    """A UART's output: kept (up to ``limit`` bytes) and forwarded to ``sink``."""

    def __init__(self, sink: Callable[[bytes], None] | None = None, *, limit: int = SERIAL_CAPTURE_LIMIT,
                 on_error: Callable[[str], None] | None = None) -> None:
        self.sink = sink
        self.limit = limit
        self.on_error = on_error
        self.data = bytearray()
        self.dropped = 0  # bytes not kept (beyond the limit)
        self.error: str | None = None  # why the sink stopped taking output

    def __call__(self, data: bytes) -> None:
        room = self.limit - len(self.data)
        self.data += data[:room]
        self.dropped += max(0, len(data) - room)
        if self.sink is None or self.error is not None:
            return
        try:
            self.sink(data)
        except Exception as exc:  # the host side's failure: report it, never unwind the device
            self.error = f"serial output failed: {exc}"
            if self.on_error is not None:
                self.on_error(self.error)


class PcDevices(Value):
    """The default devices of a machine (``Machine.serial`` etc. are these)."""

    __slots__ = ("serial", "debug_exit", "post", "i8042", "capture")
    __hash__ = None  # mutable, as the dataclass was: not hashable

    def __init__(self, serial: Uart16550, debug_exit: DebugExit, post: Port80, i8042: I8042,
                 capture: SerialCapture) -> None:
        self.serial = serial
        self.debug_exit = debug_exit
        self.post = post
        self.i8042 = i8042
        self.capture = capture


def add_pc_devices(add_device: Callable[..., None], irq_line: Callable[[int], Callable[[bool], None]],
                   capture: SerialCapture) -> PcDevices:
    """Make the default devices and put them on the buses with ``add_device(device, port=, length=, name=)``."""
    serial = Uart16550(output=capture, interrupt=irq_line(layout.COM1_IRQ))
    devices = PcDevices(serial, DebugExit(), Port80(), I8042(), capture)
    add_device(devices.serial, port=layout.COM1_PORT, length=8, name="com1")
    add_device(devices.debug_exit, port=layout.DEBUG_EXIT_PORT, length=1, name="debug-exit")
    add_device(devices.post, port=layout.POST_PORT, length=1, name="port80")
    add_device(devices.i8042, port=layout.I8042_COMMAND_PORT, length=1, name="i8042")
    return devices
