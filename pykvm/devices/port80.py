"""Port 0x80: the POST code port.

PC firmware writes a progress byte ("power-on self test" code) to port 0x80
at each boot step, for a diagnostic card to display.  Linux also writes to it
as a tiny I/O delay (``outb_p``), so a long-running guest may write millions
of codes: the history kept here is bounded.
"""

from __future__ import annotations

from pykvm.devices import DeviceError, FastRow


class Port80:
    """A POST code sink that remembers the last code written and how many were.

    ``last`` is the last value written, ``count`` how many writes were seen.
    Reads return all-ones, as QEMU's port 0x80 does: nothing drives the bus
    on a read.  Both are the same whether the writes reached this model or
    pykvm's C loop took them (it counts them and keeps the last value, and
    hands both back through ``fast_hits``).  No history of codes is kept:
    the C loop could not keep it, and a Linux guest writes millions of them
    as an I/O delay.
    """

    name = "port80"
    length = 1
    fast_path_changed = None  # its row never changes

    def __init__(self) -> None:
        self.last = 0
        self.count = 0

    def save_state(self) -> dict:
        """The last code and the count (version 1)."""
        return {"version": 1, "last": self.last, "count": self.count}

    def load_state(self, state: dict) -> None:
        from pykvm.devices import check_state

        s = check_state(self, state)
        self.last, self.count = s["last"], s["count"]

    def read(self, offset: int, size: int) -> bytes:
        """All-ones: the port is write-only."""
        return b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        """Latch and count the written code."""
        if not data:
            raise DeviceError("port 0x80 takes writes of 1 to 8 bytes, not 0")
        self.last = int.from_bytes(data, "little")
        self.count += 1

    def fast_rows(self) -> tuple[FastRow, ...]:
        """C may drop every write (counting it) and answer reads with all-ones."""
        return (FastRow(0, 1, read="const", read_value=0xFF, write="drop"),)

    def fast_hits(self, row: FastRow, hits: int, last_value: int) -> None:
        """Account for writes the C loop dropped."""
        if hits:
            self.count += hits
            self.last = last_value
