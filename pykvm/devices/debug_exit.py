"""QEMU's ``isa-debug-exit``: a port the guest writes to end the run.

QEMU (``hw/misc/debugexit.c``) maps ``iosize`` bytes at ``iobase`` (0x501 by
default; test harnesses use 0xf4) and, on any write of value ``v``, exits the
emulator with status ``(v << 1) | 1``.  The shift-and-set makes every status
odd, so a guest can never pretend to have exited with QEMU's own 0; test
runners map an agreed odd value (say 0x31 -> 0x63) back to success.

Here the write raises :class:`~pykvm.devices.DeviceStop` instead of calling
``exit()``: the machine decides what a stop means.
"""

from __future__ import annotations

from pykvm.devices import DeviceStop


class DebugExit:
    """An ``isa-debug-exit`` port: any write stops the machine.

    ``iosize`` (1, 2 or 4, as QEMU's property) is the length of the range the
    device expects to be registered with; writes of 1 to 4 bytes are accepted
    at any offset inside it.  Reads return all-ones, like QEMU's, which
    implements no read handler.
    """

    name = "debug-exit"

    def __init__(self, iosize: int = 1) -> None:
        if iosize not in (1, 2, 4):
            raise ValueError(f"iosize must be 1, 2 or 4, not {iosize}")
        self.length = iosize
        #: Status of the last write, ``(value << 1) | 1``; None until then.
        self.exit_status: int | None = None

    def read(self, offset: int, size: int) -> bytes:
        """Reads are not decoded: the data lines float high."""
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        """Record QEMU's exit status for the written value and stop."""
        if not 1 <= len(data) <= 4:
            raise ValueError(f"debug-exit takes 1..4 byte writes, not {len(data)}")
        value = int.from_bytes(data, "little")
        self.exit_status = (value << 1) | 1
        raise DeviceStop("debug-exit", self.exit_status)
