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

from pykvm.devices import DeviceError, DeviceStop, FastRow


class DebugExit:
    """An ``isa-debug-exit`` port: any write stops the machine.

    ``iosize`` (1, 2 or 4, as QEMU's property) is the length of the range the
    device expects to be registered with; writes of 1 to 4 bytes are accepted
    at any offset inside it.  Reads return all-ones, like QEMU's, which
    implements no read handler.
    """

    name = "debug-exit"
    fast_path_changed = None  # its row never changes

    def __init__(self, iosize: int = 1) -> None:
        if iosize not in (1, 2, 4):
            raise DeviceError(f"iosize must be 1, 2 or 4, not {iosize}")
        self.length = iosize
        #: Status of the last write, ``(value << 1) | 1``; None until then.
        self.exit_status: int | None = None

    def save_state(self) -> dict:
        """The last exit status (version 1); the width is the machine's shape."""
        return {"version": 1, "exit_status": self.exit_status}

    def load_state(self, state: dict) -> None:
        from pykvm.devices import check_state

        self.exit_status = check_state(self, state)["exit_status"]

    def fast_rows(self) -> tuple[FastRow, ...]:
        """The whole range: C answers reads with all-ones and stops the run on a write."""
        return (FastRow(0, self.length, read="const", read_value=(1 << 64) - 1, write="debug-exit"),)

    def fast_hits(self, row: FastRow, hits: int, last_value: int) -> None:
        """C stopped the run on a write of ``last_value``: the same status a Python write records."""
        if hits:
            self.exit_status = ((last_value & ((1 << (8 * self.length)) - 1)) << 1) | 1

    def read(self, offset: int, size: int) -> bytes:
        """Reads are not decoded: the data lines float high."""
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        """Record QEMU's exit status for the written value and stop."""
        if not 1 <= len(data) <= 4:
            raise DeviceError(f"debug-exit takes 1..4 byte writes, not {len(data)}")
        value = int.from_bytes(data, "little")
        self.exit_status = (value << 1) | 1
        raise DeviceStop("debug-exit", self.exit_status)
