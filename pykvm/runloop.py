"""Python side of the C run loop (csrc/runloop.c).

``RunLoop`` owns a ``struct pykvm_loop`` for one vCPU: the table of ranges
the C code may handle itself, the transmit buffer it fills, and the counters
and histograms it keeps.  ``run()`` calls ``pykvm_loop_run`` with the GIL
released and returns why it stopped (PYKVM_RET_*).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pykvm._native_loader import ffi, lib

if TYPE_CHECKING:
    from pykvm.vcpu import Vcpu

PIO = lib.PYKVM_SPACE_PIO
MMIO = lib.PYKVM_SPACE_MMIO

READ_PASS = lib.PYKVM_READ_PASS
READ_CONST = lib.PYKVM_READ_CONST
WRITE_PASS = lib.PYKVM_WRITE_PASS
WRITE_DROP = lib.PYKVM_WRITE_DROP
WRITE_TXBUF = lib.PYKVM_WRITE_TXBUF
WRITE_DEBUG_EXIT = lib.PYKVM_WRITE_DEBUG_EXIT
WRITE_EVENTFD = lib.PYKVM_WRITE_EVENTFD

RET_EXIT = lib.PYKVM_RET_EXIT
RET_DEBUG_EXIT = lib.PYKVM_RET_DEBUG_EXIT
RET_INTR = lib.PYKVM_RET_INTR
RET_ERROR = lib.PYKVM_RET_ERROR
RET_PIO_OUT = lib.PYKVM_RET_PIO_OUT
RET_PIO_IN = lib.PYKVM_RET_PIO_IN
RET_MMIO_WRITE = lib.PYKVM_RET_MMIO_WRITE
RET_MMIO_READ = lib.PYKVM_RET_MMIO_READ
RET_CODE_MASK = lib.PYKVM_RET_CODE_MASK
RET_TX_PENDING = lib.PYKVM_RET_TX_PENDING

_tsc_hz: float | None = None


def tsc_hz() -> float:
    """TSC ticks per second, calibrated once per process against the monotonic clock."""
    global _tsc_hz
    if _tsc_hz is None:
        t0, c0 = time.perf_counter_ns(), lib.pykvm_rdtsc()
        time.sleep(0.02)
        t1, c1 = time.perf_counter_ns(), lib.pykvm_rdtsc()
        _tsc_hz = (c1 - c0) * 1e9 / (t1 - t0)
    return _tsc_hz


@dataclass(frozen=True)
class FastRange:
    """One row of the C loop's table: what C does with accesses to a range.

    ``write_fd`` is the eventfd a WRITE_EVENTFD range signals (a doorbell:
    C adds 1 to it and resumes the guest; a host thread does the work).
    """

    space: int
    base: int
    length: int
    read_action: int = READ_PASS
    write_action: int = WRITE_PASS
    read_value: int = 0
    name: str = ""
    write_fd: int = -1


class RunLoop:
    """The C KVM_RUN loop of one vCPU."""

    def __init__(self, vcpu: "Vcpu", txbuf_size: int = 4096) -> None:
        self.vcpu = vcpu
        self._loop = ffi.new("struct pykvm_loop *")
        self._txbuf = ffi.new("uint8_t[]", txbuf_size)
        loop = self._loop
        loop.vcpu_fd = vcpu.fd
        loop.run = vcpu.kvm_run
        loop.txbuf = self._txbuf
        loop.txcap = txbuf_size
        loop.pending_reason = -1
        loop.ns_per_tsc_q32 = int((1e9 / tsc_hz()) * (1 << 32))
        self.ranges: list[FastRange] = []

    # -- the range table -------------------------------------------------------
    def set_ranges(self, ranges: list[FastRange]) -> None:
        """Replace the table.  Only call between runs (the C loop reads it unlocked)."""
        if len(ranges) > lib.PYKVM_MAX_RANGES:
            raise ValueError(f"the C loop holds at most {lib.PYKVM_MAX_RANGES} ranges")
        hits = {(r.space, r.base): self._loop.ranges[i].hits for i, r in enumerate(self.ranges)}
        for i, r in enumerate(ranges):
            slot = self._loop.ranges[i]
            slot.space, slot.base, slot.length = r.space, r.base, r.length
            slot.read_action, slot.write_action, slot.read_value = r.read_action, r.write_action, r.read_value
            slot.write_fd = r.write_fd
            slot.id = i
            slot.hits = hits.get((r.space, r.base), 0)
        self._loop.nranges = len(ranges)
        self.ranges = list(ranges)

    def hits(self) -> dict[str, int]:
        """Accesses handled in C, per range name."""
        return {r.name or f"{r.base:#x}": self._loop.ranges[i].hits for i, r in enumerate(self.ranges)}

    # -- running -------------------------------------------------------------------
    def run(self) -> int:
        """Run until an exit Python must handle.  The GIL is released.

        Returns a PYKVM_RET_* code in the low 7 bits (``RET_CODE_MASK``),
        the RET_TX_PENDING flag, and for single I/O accesses the packed
        size (bits 8-11) and port (bits 16-31); see csrc/runloop.h.
        """
        return lib.pykvm_loop_run(self._loop)

    @property
    def state(self):
        """The ``struct pykvm_loop *`` itself, for hot loops that read io_value/io_addr."""
        return self._loop

    def clear_pending(self) -> None:
        """Do not time the exit in flight (the run ends here)."""
        lib.pykvm_loop_clear_pending(self._loop)

    @property
    def stop_status(self) -> int:
        return self._loop.stop_status

    @property
    def error_errno(self) -> int:
        return self._loop.error_errno

    def take_tx(self) -> bytes:
        """Bytes the C loop buffered for a transmit register since the last call."""
        n = self._loop.txlen
        if not n:
            return b""
        data = ffi.unpack(self._txbuf, n)
        self._loop.txlen = 0
        return data

    # -- statistics ------------------------------------------------------------------
    def counters(self) -> dict:
        """Exits per reason (total / C / Python) and seconds in KVM_RUN, C and Python."""
        loop = self._loop
        hz = tsc_hz()
        per_reason = {}
        for reason in range(lib.PYKVM_NR_REASONS):
            total = loop.exits[reason]
            if total:
                per_reason[reason] = {"total": total, "c": loop.exits_c[reason], "python": loop.exits_py[reason]}
        return {
            "exits": per_reason,
            "seconds_in_run": loop.tsc_in_run / hz,
            "seconds_in_c": loop.tsc_in_c / hz,
            "seconds_in_python": loop.tsc_in_py / hz,
        }

    def histograms(self) -> dict[int, dict[str, list[int]]]:
        """Per reason: log2-ns buckets of handling time and of the whole round trip."""
        loop = self._loop
        out = {}
        for reason in range(lib.PYKVM_NR_REASONS):
            if loop.exits[reason]:
                out[reason] = {
                    "handle": list(loop.hist_handle[reason]),
                    "roundtrip": list(loop.hist_roundtrip[reason]),
                }
        return out
