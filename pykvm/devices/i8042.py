"""The 8042 keyboard controller, reduced to the one command that matters.

On a PC the 8042's command port is 0x64.  Command 0xFE pulses the CPU's reset
line low: it is how a guest reboots the machine (Linux's ``reboot=k``, the
default) and, for pykvm's ring-3 guests, how they stop (they cannot ``hlt``).
Reading port 0x64 gives the status register; 0x00 says "output buffer empty,
input buffer empty", so a guest polling before a command never waits.
"""

from __future__ import annotations

from pykvm.devices import DeviceError, DeviceStop
from pykvm.log import get_logger

log = get_logger("pykvm.devices.i8042")  # DEBUG only: a guest may write any command

CMD_PULSE_RESET = 0xFE  # pulse output port bit 0 (the CPU reset line)


class I8042:
    """The 8042 command/status port (one byte, registered at port 0x64)."""

    name = "i8042"
    length = 1

    def save_state(self) -> dict:
        """Nothing to keep: the model answers every read alike and has no registers (version 1)."""
        return {"version": 1}

    def load_state(self, state: dict) -> None:
        from pykvm.devices import check_state

        check_state(self, state)

    def read(self, offset: int, size: int) -> bytes:
        """Status register: no data to read, ready for a command."""
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        """Command 0xFE resets (stops) the machine; others are ignored."""
        if not data:
            raise DeviceError("the i8042 command port takes 1-byte writes, not 0 bytes")
        command = data[0]
        if command == CMD_PULSE_RESET:
            raise DeviceStop("reset", 0)
        log.debug("i8042: ignoring command %#04x", command)
