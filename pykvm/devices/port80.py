"""Port 0x80: the POST code port.

PC firmware writes a progress byte ("power-on self test" code) to port 0x80
at each boot step, for a diagnostic card to display.  Linux also writes to it
as a tiny I/O delay (``outb_p``), so a long-running guest may write millions
of codes: the history kept here is bounded.
"""

from __future__ import annotations

from collections import deque


class Port80:
    """A POST code sink that remembers what was written.

    ``last`` is the last value written, ``count`` how many writes were seen,
    and ``codes`` the most recent ``history`` values, oldest first.  Reads
    return all-ones, as QEMU's port 0x80 does: nothing drives the bus on a
    read.  That keeps the guest's view identical when pykvm's C loop drops
    these writes without calling the model (it then counts them itself).
    """

    name = "port80"
    length = 1

    def __init__(self, history: int = 256) -> None:
        self.last = 0
        self.count = 0
        self.codes: deque[int] = deque(maxlen=history)

    def read(self, offset: int, size: int) -> bytes:
        """All-ones: the port is write-only."""
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        """Latch and record the written code."""
        self.last = int.from_bytes(data, "little")
        self.count += 1
        self.codes.append(self.last)
