"""Device models: what the guest finds behind an I/O port or MMIO address.

A device is decoupled from the VM and the event loop (the design of rust-vmm's
``vm-superio``): it sees *offsets* relative to the start of the range the bus
mapped it at, never ports, guest addresses or vCPUs.  It talks back to the
host only through callables handed to its constructor (an output sink, an
interrupt line), so every device can be tested with no VM at all.

A device that must end the run (the guest asked to exit or to reset the
machine) raises :class:`DeviceStop` from ``write``; the bus lets it propagate
to the run loop.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = [
    "Device",
    "DeviceStop",
    "DebugExit",
    "I8042",
    "Port80",
    "Uart16550",
]


@runtime_checkable
class Device(Protocol):
    """What the bus requires of a device.

    ``read(offset, size)`` returns exactly ``size`` bytes, little-endian, as
    x86 does.  ``write(offset, data)`` receives the bytes the guest wrote.
    ``offset`` is relative to the device's range; the bus guarantees that
    ``offset + size`` stays inside it.

    A device may also carry a ``name: str`` attribute; the bus uses it to
    label the range and its access counter when ``register`` is given none.
    """

    def read(self, offset: int, size: int) -> bytes:
        """Answer a guest read of ``size`` bytes at ``offset``."""
        ...

    def write(self, offset: int, data: bytes) -> None:
        """Take a guest write of ``data`` at ``offset``."""
        ...


class DeviceStop(Exception):
    """A device asks the machine to stop running the guest.

    ``reason`` says who and why (``"debug-exit"``, ``"reset"``); ``status``
    is the exit status the machine should report (for ``debug-exit`` it is
    QEMU's ``(value << 1) | 1``).
    """

    def __init__(self, reason: str, status: int = 0) -> None:
        self.reason = reason
        self.status = status
        super().__init__(f"{reason} (status {status:#x})")


# The models import DeviceStop from this module, so they are imported only
# after it is defined; this keeps `from pykvm.devices import Uart16550` working.
from pykvm.devices.debug_exit import DebugExit  # noqa: E402
from pykvm.devices.i8042 import I8042  # noqa: E402
from pykvm.devices.port80 import Port80  # noqa: E402
from pykvm.devices.uart16550 import Uart16550  # noqa: E402
