"""Which accesses the C loop may take: the table the devices offer, and what C hands back.

A device owns its fast path (``pykvm.devices.FastRow``): it says which of
its registers the C loop may handle in its current state, and calls
``fast_path_changed()`` when that changes.  :class:`FastPath` is the
machine-wide source of the table: it turns every device's rows into
absolute :class:`~pykvm.platform.cloop.FastRange` rows at the device's bus
address, adds rows no device owns (``extra``: labs and benchmarks drop a
port), and leaves out any row inside a coalesced zone (an exit there means
KVM's ring is full, and only Python drains it).  Each change bumps
``generation`` and wakes every vCPU loop, which installs the new table
before its next KVM_RUN.

:class:`FastTable` is the per-vCPU half: it installs rows in one
:class:`~pykvm.platform.cloop.CLoop` and hands back what C did -- hit counts
and last values to the owning device (``fast_hits``) and to the bus's
statistics, buffered transmit bytes to the device (``fast_transmitted``) --
so that what the host reads from a device is the same with the C loop on
or off.
"""

from __future__ import annotations

import threading
from collections import namedtuple
from collections.abc import Callable

from pykvm.platform.bus import Bus
from pykvm.platform.cloop import MMIO, PIO, READ_ACTIONS, WRITE_ACTIONS, CLoop, FastRange


class RowOwner(namedtuple("RowOwner", "bus range_name device row")):
    """Whom a row's statistics go back to: the bus (``Bus``), its range's name, the device and its ``FastRow``."""

    __slots__ = ()


class FastPath:
    """The machine's fast-path table, rebuilt from the buses' devices when one changes."""

    def __init__(self, pio: Bus, mmio: Bus) -> None:
        self.pio, self.mmio = pio, mmio
        self.generation = 0
        self._extra: tuple[FastRange, ...] = ()
        self._zones: list[tuple[int, int, bool]] = []  # coalesced (base, length, is_pio)
        self._wake: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    # -- what changes the table ----------------------------------------------------
    def adopt(self, device: object) -> None:
        """A device was put on a bus: listen to its changes, and rebuild."""
        if hasattr(device, "fast_rows") and hasattr(device, "fast_path_changed"):
            device.fast_path_changed = self.changed  # type: ignore[attr-defined]
        self.changed()

    def changed(self) -> None:
        """The rows are different now (a device's state, a zone, the extra rows): wake the loops."""
        with self._lock:
            self.generation += 1
            wake = list(self._wake)
        for callback in wake:
            callback()

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (from any thread) whenever the table changes."""
        with self._lock:
            self._wake.append(callback)

    @property
    def extra(self) -> tuple[FastRange, ...]:
        """Rows no device owns, at absolute addresses (a benchmark's dropped port)."""
        return self._extra

    @extra.setter
    def extra(self, rows) -> None:
        self._extra = tuple(rows)
        self.changed()

    def add_zone(self, base: int, length: int, pio: bool) -> None:
        """A coalesced zone: no row may lie inside it."""
        self._zones.append((base, length, pio))
        self.changed()

    # -- the table -------------------------------------------------------------------
    def rows(self) -> list[FastRange]:
        """Every row the devices offer now, at bus addresses, then the extra rows; none in a zone."""
        rows = list(self._extra)
        for space, bus in ((PIO, self.pio), (MMIO, self.mmio)):
            for entry in bus:
                offer = getattr(entry.device, "fast_rows", None)
                if offer is None:
                    continue
                for row in offer():
                    name = entry.name if not row.name else f"{entry.name}.{row.name}"
                    rows.append(FastRange(
                        space, entry.base + row.offset, row.length, READ_ACTIONS[row.read],
                        WRITE_ACTIONS[row.write], row.read_value, name, row.write_fd,
                        RowOwner(bus, entry.name, entry.device, row)))
        return [r for r in rows if not self._in_zone(r)]

    def _in_zone(self, r: FastRange) -> bool:
        return any((r.space == PIO) == pio and r.base < base + length and base < r.base + r.length
                   for base, length, pio in self._zones)


class FastTable:
    """The table of one vCPU's C loop, and the hand-back of what C did with it."""

    def __init__(self, cloop: CLoop, source: FastPath) -> None:
        self.cloop = cloop
        self.source = source
        self.generation = -1  # of the rows installed; -1: none yet
        self.enabled = True
        self._synced: dict[tuple[int, int, str], tuple[int, int]] = {}  # (accesses, writes) handed back

    def install(self) -> None:
        """Hand back what C did with the old rows, then install the current ones."""
        self.sync()
        self.drain_tx()
        self.generation = self.source.generation
        self.cloop.set_ranges(self.source.rows() if self.enabled else [])

    def clear(self) -> None:
        """No rows: every exit reaches Python (a tracer watching each one)."""
        self.sync()
        self.drain_tx()
        self.cloop.set_ranges([])
        self.generation = -1

    def drain_tx(self) -> None:
        """Give the bytes C buffered from a ``txbuf`` row to its device, before Python touches it."""
        index, data = self.cloop.take_tx()
        if data:
            owner = self.cloop.ranges[index].owner
            if isinstance(owner, RowOwner):
                owner.bus.count(owner.range_name, len(data))
                owner.device.fast_transmitted(owner.row, data)

    def sync(self) -> None:
        """Hand new hits (and each row's last written value) to the devices and the bus counters."""
        if self.cloop.closed:
            return  # handed back at the end of the last run
        for index, r in enumerate(self.cloop.ranges):
            _, hits, writes, last_value = self.cloop.row(index)
            key = (r.space, r.base, r.name)
            hits0, writes0 = self._synced.get(key, (0, 0))
            if hits == hits0:
                continue
            self._synced[key] = (hits, writes)
            owner = r.owner
            if not isinstance(owner, RowOwner):
                continue
            if owner.row.write == "txbuf":  # the bytes themselves come through drain_tx
                owner.bus.count(owner.range_name, (hits - hits0) - (writes - writes0))
                continue
            owner.bus.count(owner.range_name, hits - hits0)
            if writes > writes0:
                owner.device.fast_hits(owner.row, writes - writes0, last_value)
