"""Device models: what the guest finds behind an I/O port or MMIO address.

A device is decoupled from the VM and the event loop (the design of rust-vmm's
``vm-superio``): it sees *offsets* relative to the start of the range the bus
mapped it at, never ports, guest addresses or vCPUs.  It talks back to the
host only through callables handed to its constructor (an output sink, an
interrupt line), so every device can be tested with no VM at all.

A device that must end the run (the guest asked to exit or to reset the
machine) raises :class:`DeviceStop` from ``write``; the bus lets it propagate
to the run loop.

A device owns its fast path.  Exits cost the most when they reach Python,
so pykvm's C run loop may take some accesses itself -- but only those the
device hands it, and only while its state allows.  A device that has such
registers offers ``fast_rows()``: :class:`FastRow` values, relative to its
range, for its *current* state; when its state changes what those rows
should be, it calls ``fast_path_changed()`` (a callable the platform sets).
The platform gives back what C did, so what the host reads from the device
is the same with the C loop on or off: ``fast_hits(row, hits, last_value)``
for writes C counted or dropped, ``fast_transmitted(row, data)`` for bytes
C buffered from a ``txbuf`` row.
"""

from __future__ import annotations

from abc import ABC
from collections.abc import Callable, Sequence

from pykvm.errors import DeviceError
from pykvm.values import Value

__all__ = [
    "Device",
    "DeviceError",
    "DeviceStop",
    "DebugExit",
    "FastPathDevice",
    "FastRow",
    "I8042",
    "Port80",
    "Uart16550",
]


def _has_methods(cls: type, names: tuple[str, ...]) -> bool:
    return all(callable(getattr(cls, name, None)) for name in names)


class Device(ABC):
    """What the bus requires of a device (a structural type: any class with these methods is one).

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

    @classmethod
    def __subclasshook__(cls, other: type):  # isinstance(x, Device): x has read and write (as collections.abc)
        return _has_methods(other, ("read", "write")) if cls is Device else NotImplemented


class FastRow(Value):
    """Registers of a device that the C run loop may handle without calling Python.

    ``offset``/``length`` are relative to the device's range.  ``read`` is
    ``"pass"`` (Python answers) or ``"const"`` (C answers ``read_value``);
    ``write`` is ``"pass"``, ``"drop"`` (C counts the write and keeps its
    value), ``"txbuf"`` (C buffers byte writes: a UART's transmit register),
    ``"debug-exit"`` (C stops the run with status ``(value << 1) | 1``) or
    ``"eventfd"`` (C signals ``write_fd``: a doorbell served by a host thread).
    """

    __slots__ = ("offset", "length", "read", "write", "read_value", "write_fd", "name")

    def __init__(self, offset: int, length: int, read: str = "pass", write: str = "pass", read_value: int = 0,
                 write_fd: int = -1, name: str = "") -> None:
        self.offset = offset
        self.length = length
        self.read = read
        self.write = write
        self.read_value = read_value
        self.write_fd = write_fd
        self.name = name


class FastPathDevice(ABC):
    """A device that offers some of its registers to the C loop (see the module docstring); structural too."""

    fast_path_changed: Callable[[], None] | None

    def fast_rows(self) -> Sequence[FastRow]:
        """The rows C may take in the device's current state (empty: none)."""
        ...

    def fast_hits(self, row: FastRow, hits: int, last_value: int) -> None:
        """C handled ``hits`` writes to ``row`` since the last call; the last wrote ``last_value``."""
        ...

    @classmethod
    def __subclasshook__(cls, other: type):
        # (fast_path_changed is an instance attribute: a class does not show it)
        return _has_methods(other, ("fast_rows", "fast_hits")) if cls is FastPathDevice else NotImplemented


class DeviceStop(Exception):
    """A device asks the machine to stop running the guest (control flow, not an error).

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
def check_state(device: object, state: dict, version: int = 1) -> dict:
    """A ``load_state`` argument checked: a dict with the ``version`` this model writes (DeviceError if not).

    Every stateful device offers ``save_state() -> dict`` (a small dict of
    plain values: ints, bools, strings, bytes, lists; ``version`` first) and
    ``load_state(dict)``; snapshots (``pykvm.state.snapshot``) save and load
    them.  A device whose state is elsewhere says so in its ``save_state``.
    """
    name = getattr(device, "name", type(device).__name__)
    if not isinstance(state, dict) or state.get("version") != version:
        got = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise DeviceError(f"{name}: saved state version {got!r}, this model reads version {version}")
    return state


from pykvm.devices.debug_exit import DebugExit  # noqa: E402
from pykvm.devices.i8042 import I8042  # noqa: E402
from pykvm.devices.port80 import Port80  # noqa: E402
from pykvm.devices.uart16550 import Uart16550  # noqa: E402
