"""Port 0x61, system control port B: PIT channel 2's gate and its OUT pin, as a PC's chipset has them.

Kernels time the TSC against PIT channel 2 (Linux's ``pit_calibrate_tsc``,
pykvm's ``guests/timer.c``): they open the channel's gate with bit 0,
program a one-shot count and poll bit 5, the channel's OUT pin, which
rises when the count runs out.  The 8254 itself is KVM's (KVM_CREATE_PIT2);
this device reads its channel 2 (``channel2()`` returns ``(count, mode,
count_load_time_ns)``: KVM_GET_PIT2) and computes OUT from the time since
the count was loaded, as QEMU's ``pit_get_out`` does, and hands gate
changes to ``set_gate``.

=====  ====================================================================
bit    meaning
=====  ====================================================================
0      channel 2 gate (read back as written)
1      speaker data enable (read back; there is no speaker)
4      refresh request: toggles every 15.085 us (DRAM refresh, used as a delay)
5      channel 2 OUT
6, 7   NMI status (IOCHK, SERR): always 0
=====  ====================================================================
"""

from __future__ import annotations

import time
from collections.abc import Callable

from pykvm.errors import DeviceError

PIT_HZ = 1_193_182  # the 8254's input clock (1.193182 MHz)
REFRESH_NS = 15_085  # the refresh request bit's half period
GATE, SPEAKER, REFRESH, OUT2 = 1 << 0, 1 << 1, 1 << 4, 1 << 5


def channel_out(count: int, mode: int, elapsed_ns: int) -> bool:
    """An 8254 channel's OUT pin ``elapsed_ns`` after its ``count`` was loaded (QEMU's ``pit_get_out``)."""
    count = count or 0x10000  # a count of 0 means 65536
    ticks = max(elapsed_ns, 0) * PIT_HZ // 1_000_000_000
    if mode == 1:
        return ticks < count
    if mode in (2, 6):
        return not (ticks % count == 0 and ticks != 0)  # low for one tick at each terminal count
    if mode in (3, 7):
        return ticks % count < (count + 1) >> 1  # a square wave, high for the first half
    if mode in (4, 5):
        return ticks != count
    return ticks >= count  # mode 0: low from the load until the count runs out


class Port61:
    """System control port B (see the module docstring)."""

    name = "port61"
    length = 1

    def __init__(self, channel2: Callable[[], tuple[int, int, int]], set_gate: Callable[[bool], None],
                 clock_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self.channel2 = channel2
        self.set_gate = set_gate
        self.clock_ns = clock_ns
        self.control = 0  # bits 0-1 as last written

    def save_state(self) -> dict:
        """Bits 0-1 as last written (version 1); the gate itself is in the PIT's state (KVM_GET_PIT2)."""
        return {"version": 1, "control": self.control}

    def load_state(self, state: dict) -> None:
        from pykvm.devices import check_state

        self.control = check_state(self, state)["control"]

    def read(self, offset: int, size: int) -> bytes:
        if offset != 0 or size != 1:
            raise DeviceError(f"port 0x61 takes 1-byte accesses, not {size} at offset {offset}")
        now = self.clock_ns()
        count, mode, loaded_ns = self.channel2()
        value = self.control & (GATE | SPEAKER)
        if now // REFRESH_NS & 1:
            value |= REFRESH
        if channel_out(count, mode, now - loaded_ns):
            value |= OUT2
        return bytes([value])

    def write(self, offset: int, data: bytes) -> None:
        if offset != 0 or len(data) != 1:
            raise DeviceError(f"port 0x61 takes 1-byte accesses, not {len(data)} at offset {offset}")
        old, self.control = self.control, data[0] & (GATE | SPEAKER)
        if (old ^ self.control) & GATE:
            self.set_gate(bool(self.control & GATE))
