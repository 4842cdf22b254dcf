"""Dispatch of user-space exits to the buses: a pure function of (exit, buses).

No KVM is involved, so it is tested with plain exit values.  The answer to a
read is returned as bytes for the caller to write into kvm_run.
"""

from __future__ import annotations

from pykvm.bus import Bus
from pykvm.exits import Exit, IoIn, IoOut, MmioRead, MmioWrite


def dispatch(exit: Exit, pio: Bus, mmio: Bus) -> bytes | None:
    """Route an I/O exit to its device; return the bytes answering a read, or None.

    REP string I/O (``count > 1``) is split into ``count`` accesses of
    ``size`` bytes, in order, as the CPU would perform them.  Device stops
    (``DeviceStop``) and strict-bus errors propagate to the caller.
    """
    if isinstance(exit, IoOut):
        size = exit.size
        if exit.count == 1:
            pio.write(exit.port, exit.data)
        else:
            for i in range(exit.count):
                pio.write(exit.port, exit.data[i * size:(i + 1) * size])
        return None
    if isinstance(exit, IoIn):
        if exit.count == 1:
            return pio.read(exit.port, exit.size)
        return b"".join(pio.read(exit.port, exit.size) for _ in range(exit.count))
    if isinstance(exit, MmioWrite):
        mmio.write(exit.address, exit.data)
        return None
    if isinstance(exit, MmioRead):
        return mmio.read(exit.address, exit.size)
    raise TypeError(f"{type(exit).__name__} is not an I/O exit")
