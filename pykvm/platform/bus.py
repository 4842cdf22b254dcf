"""The port-I/O and MMIO buses: which device answers which address.

x86 has two address spaces for devices: 64 Ki I/O ports reached with IN/OUT
(``pio``) and memory-mapped I/O, guest-physical addresses that no RAM backs
(``mmio``).  Each is a :class:`Bus`: a sorted list of non-overlapping ranges,
each owned by a device (kvmtool's ``kvm__register_pio/mmio``, Firecracker's
``vmm::Bus``).  The bus turns an address into (device, offset) and counts the
accesses; the device never sees the address itself.

Rules:

* A range has a non-zero length, fits in its address space (ports below
  0x10000, MMIO below 2**64) and overlaps no other range.  Violations raise
  :class:`BusError` naming both ranges.
* An access must lie wholly inside one range; one that starts in a range and
  runs past its end is treated as unmapped, like an access to nothing.
* An unmapped read returns all-ones (an undriven bus floats high) and an
  unmapped write is dropped.  Each new address is logged once at WARNING on
  the ``pykvm.bus.pio`` / ``pykvm.bus.mmio`` logger (rate-limited:
  ``pykvm.ratelimit``), repeats at DEBUG.  On a strict bus, an unmapped
  access raises :class:`~pykvm.errors.UnmappedAccess` instead.
"""

from __future__ import annotations

import bisect
from collections import namedtuple
from collections.abc import Iterator

from pykvm.devices import Device
from pykvm.errors import BusError, UnmappedAccess, describe_access
from pykvm.ratelimit import GuestLog

__all__ = ["ADDRESS_SPACE_SIZE", "Bus", "BusError", "BusRange", "UnmappedAccess"]

#: Size of each address space: 16-bit I/O ports, 64-bit physical addresses.
ADDRESS_SPACE_SIZE = {"pio": 1 << 16, "mmio": 1 << 64}


class BusRange(namedtuple("BusRange", "base length name device end")):
    """One registered range: ``length`` addresses from ``base`` (``end`` is the first past it).

    (``collections.namedtuple`` rather than ``typing.NamedTuple``: the same
    tuple, without importing typing on every start.)
    """

    __slots__ = ()

    @classmethod
    def make(cls, base: int, length: int, name: str, device: Device) -> "BusRange":
        return cls(base, length, name, device, base + length)

    def __str__(self) -> str:
        return f"{self.base:#x}-{self.end - 1:#x} ({self.name})"


# Addresses resolved to their range (or to no range) are remembered, so a
# guest hammering one port costs a dict lookup, not a bisection.  Bounded: a
# guest probing the whole MMIO space must not grow it without limit.
_CACHE_LIMIT = 4096
_MISS = object()


class Bus:
    """A port-I/O (``"pio"``) or MMIO (``"mmio"``) bus.

    ``strict`` (also settable later as an attribute) makes unmapped accesses
    raise :class:`UnmappedAccess`.  ``stats`` maps each device name to its
    number of accesses; ``unmapped`` counts accesses that found no device.
    """

    def __init__(self, kind: str, *, strict: bool = False) -> None:
        if kind not in ADDRESS_SPACE_SIZE:
            raise ValueError(f"bus kind must be 'pio' or 'mmio', not {kind!r}")
        self.kind = kind
        self.strict = strict
        self.stats: dict[str, int] = {}
        self.unmapped = 0
        self._limit = ADDRESS_SPACE_SIZE[kind]
        self._bases: list[int] = []  # sorted; parallel to _ranges
        self._ranges: list[BusRange] = []
        self._log = GuestLog(f"pykvm.bus.{kind}")
        self._cache: dict[int, BusRange | None] = {}

    # -- registration ---------------------------------------------------------

    def register(
        self, base: int, length: int, device: Device, name: str | None = None
    ) -> None:
        """Map ``device`` at ``length`` addresses from ``base``.

        ``name`` labels the range and its counter; by default it is the
        device's ``name`` attribute, else its class name.  One device may be
        registered at several ranges, but two devices may not share a name.
        """
        if name is None:
            name = getattr(device, "name", None) or type(device).__name__
        new = BusRange.make(base, length, name, device)
        space = self.kind.upper()
        if length <= 0:
            raise BusError(f"{space} range {name} at {base:#x} has zero length")
        if base < 0 or new.end > self._limit:
            raise BusError(
                f"{space} range {base:#x}+{length:#x} ({name}) does not fit "
                f"below {self._limit:#x}"
            )
        for other in self._ranges:
            if other.name == name and other.device is not device:
                raise BusError(
                    f"{space} range {new}: name already used by {other}; "
                    "pass name= to register"
                )
        i = bisect.bisect_right(self._bases, base)
        # Sorted and disjoint: only the neighbours on each side can overlap.
        for other in self._ranges[max(i - 1, 0) : i + 1]:
            if other.base < new.end and base < other.end:
                raise BusError(f"{space} range {new} overlaps {other}")
        self._bases.insert(i, base)
        self._ranges.insert(i, new)
        self._cache.clear()
        self.stats.setdefault(name, 0)

    def unregister(self, device_or_base: Device | int) -> None:
        """Remove the range starting at a base address, or all of a device's.

        Access counts are kept in ``stats``.
        """
        if isinstance(device_or_base, int):
            keep = [m for m in self._ranges if m.base != device_or_base]
            what = f"at {device_or_base:#x}"
        else:
            keep = [m for m in self._ranges if m.device is not device_or_base]
            what = f"for {device_or_base!r}"
        if len(keep) == len(self._ranges):
            raise BusError(f"no {self.kind.upper()} range registered {what}")
        self._ranges = keep
        self._bases = [m.base for m in keep]
        self._cache.clear()

    def find(self, address: int) -> tuple[int, Device] | None:
        """Return ``(base, device)`` of the range holding ``address``, if any."""
        entry = self._range_at(address)
        return None if entry is None else (entry.base, entry.device)

    def __iter__(self) -> Iterator[BusRange]:
        """The ranges, in address order."""
        return iter(list(self._ranges))

    def __len__(self) -> int:
        return len(self._ranges)

    def __repr__(self) -> str:
        ranges = ", ".join(str(m) for m in self._ranges)
        return f"<Bus {self.kind}: {ranges}>"

    def _range_at(self, address: int) -> BusRange | None:
        entry = self._cache.get(address, _MISS)
        if entry is _MISS:
            i = bisect.bisect_right(self._bases, address) - 1
            entry = self._ranges[i] if i >= 0 and address < self._ranges[i].end else None
            if len(self._cache) >= _CACHE_LIMIT:
                self._cache.clear()
            self._cache[address] = entry
        return entry  # type: ignore[return-value]

    # -- accesses -------------------------------------------------------------

    def read(self, address: int, size: int, rip: int | None = None) -> bytes:
        """Read ``size`` bytes at ``address``; ``rip`` is for error messages."""
        entry = self._cache.get(address, _MISS)  # the hot path: one dict lookup
        if entry is _MISS:
            entry = self._range_at(address)
        if entry is None or address + size > entry.end:
            self._unmapped_access(address, size, False, rip)
            return b"\xff" * size
        self.stats[entry.name] += 1
        data = entry.device.read(address - entry.base, size)
        if len(data) != size:
            raise BusError(
                f"{entry.name} returned {len(data)} bytes for a {size}-byte read"
            )
        return data

    def read_string(self, address: int, size: int, count: int, rip: int | None = None) -> bytes:
        """``count`` reads of ``size`` bytes at ``address`` (REP INS), in order.

        A device with ``read_string(offset, size, count)`` answers them in one
        call (an IDE data port hands over a sector); it must give the bytes,
        and leave the state, that ``count`` calls of ``read`` would.
        """
        entry = self._cache.get(address, _MISS)
        if entry is _MISS:
            entry = self._range_at(address)
        bulk = getattr(entry.device, "read_string", None) if entry is not None else None
        if bulk is None or address + size > entry.end:
            return b"".join(self.read(address, size, rip) for _ in range(count))
        self.stats[entry.name] += count
        data = bulk(address - entry.base, size, count)
        if len(data) != size * count:
            raise BusError(f"{entry.name} returned {len(data)} bytes for {count} reads of {size}")
        return data

    def write(self, address: int, data: bytes, rip: int | None = None) -> None:
        """Write ``data`` at ``address``; ``rip`` is for error messages."""
        entry = self._cache.get(address, _MISS)
        if entry is _MISS:
            entry = self._range_at(address)
        if entry is None or address + len(data) > entry.end:
            self._unmapped_access(address, len(data), True, rip)
            return
        self.stats[entry.name] += 1
        entry.device.write(address - entry.base, data)

    def _unmapped_access(
        self, address: int, size: int, is_write: bool, rip: int | None
    ) -> None:
        self.unmapped += 1
        if self.strict:
            raise UnmappedAccess(self.kind, address, size, is_write, rip)
        # Guests probe for hardware (Linux reads dozens of absent ports at
        # boot): warn once per address, and at a bounded rate.
        self._log.warning(address, "%s", describe_access(self.kind, address, size, is_write, rip))

    def count(self, name: str, accesses: int) -> None:
        """Add accesses to ``name``'s counter that reached its device another way (the C loop)."""
        self.stats[name] = self.stats.get(name, 0) + accesses
