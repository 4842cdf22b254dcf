"""The binding to the C run loop (csrc/runloop.h, csrc/runloop.c).

``CLoop`` owns one ``struct pykvm_loop`` for one vCPU: the table of ranges
the C code may handle itself (``FastRange`` rows), the transmit buffer it
fills, and the counters and histograms it keeps.  ``run()`` calls
``pykvm_loop_run`` with the GIL released and returns why it stopped: a
``RET_*`` code, packed with the access for single port/MMIO exits.

The loop is tied to its ``Vcpu``: when the vCPU closes, the struct forgets
the fd and the ``kvm_run`` pointer, and a later ``run()`` returns
``RET_ERROR`` (EBADF) instead of touching an unmapped page.
"""

from __future__ import annotations

import errno
import time

from pykvm._native_loader import ffi, lib
from pykvm.errors import KvmError
from pykvm.values import Value

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
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
RET_SIZE_SHIFT = lib.PYKVM_RET_SIZE_SHIFT
RET_PORT_SHIFT = lib.PYKVM_RET_PORT_SHIFT
MAX_RANGES = lib.PYKVM_MAX_RANGES

#: Symbolic row actions (pykvm.devices.FastRow) -> the C loop's numbers.
READ_ACTIONS = {"pass": READ_PASS, "const": READ_CONST}
WRITE_ACTIONS = {"pass": WRITE_PASS, "drop": WRITE_DROP, "txbuf": WRITE_TXBUF,
                 "debug-exit": WRITE_DEBUG_EXIT, "eventfd": WRITE_EVENTFD}

_tsc_hz: float | None = None


def tsc_hz(vcpu: "Vcpu | None" = None) -> float:
    """Host TSC ticks per second, asked once per process.

    KVM_GET_TSC_KHZ answers at once (the guest's TSC runs at the host's rate
    when, as here, KVM does not scale it); only where the ioctl fails is the
    TSC calibrated against the monotonic clock, which takes 20 ms.
    """
    global _tsc_hz
    if _tsc_hz is None:
        khz = 0
        if vcpu is not None:
            try:
                khz = vcpu.get_tsc_khz()
            except (KvmError, ValueError):
                khz = 0
        if khz > 0:
            _tsc_hz = khz * 1000.0
        else:
            t0, c0 = time.perf_counter_ns(), lib.pykvm_rdtsc()
            time.sleep(0.02)
            t1, c1 = time.perf_counter_ns(), lib.pykvm_rdtsc()
            _tsc_hz = (c1 - c0) * 1e9 / (t1 - t0)
    return _tsc_hz


class FastRange(Value):
    """One row of the C loop's table, at an absolute port or address.

    ``write_fd`` is the eventfd a WRITE_EVENTFD range signals (a doorbell:
    C adds 1 to it and resumes the guest; a host thread does the work).
    ``owner`` is whatever the caller wants back with the row's statistics
    (the platform's fast-path table keeps the device and its row there).
    """

    __slots__ = ("space", "base", "length", "read_action", "write_action", "read_value", "name", "write_fd", "owner")

    def __init__(self, space: int, base: int, length: int, read_action: int = READ_PASS,
                 write_action: int = WRITE_PASS, read_value: int = 0, name: str = "", write_fd: int = -1,
                 owner: object = None) -> None:
        self.space = space
        self.base = base
        self.length = length
        self.read_action = read_action
        self.write_action = write_action
        self.read_value = read_value
        self.name = name
        self.write_fd = write_fd
        self.owner = owner


class CLoop:
    """The C KVM_RUN loop of one vCPU (``struct pykvm_loop``)."""

    def __init__(self, vcpu: "Vcpu", txbuf_size: int = 4096) -> None:
        self.vcpu = vcpu
        # The struct (39 KiB, mostly histograms) and the transmit buffer live in a
        # mapping of their own, zeroed by the kernel and returned to it on close():
        # from the malloc heap, thousands of machines in one process left it
        # fragmented (RSS kept growing though nothing leaked).
        self._size = ffi.sizeof("struct pykvm_loop") + txbuf_size
        err = ffi.new("int *")
        self._mapping = lib.pykvm_mmap_anon(self._size, err)
        if self._mapping == ffi.NULL:
            raise KvmError("mmap(run loop state)", err[0])
        self._loop = ffi.cast("struct pykvm_loop *", self._mapping)
        self._txbuf = ffi.cast("uint8_t *", self._mapping) + ffi.sizeof("struct pykvm_loop")
        loop = self._loop
        loop.vcpu_fd = vcpu.fd
        loop.run = vcpu.kvm_run
        loop.txbuf = self._txbuf
        loop.txcap = txbuf_size
        loop.pending_reason = -1
        loop.ns_per_tsc_q32 = int((1e9 / tsc_hz(vcpu)) * (1 << 32))
        self.ranges: list[FastRange] = []
        vcpu.on_close(self._forget_vcpu)

    def _forget_vcpu(self) -> None:
        """The vCPU is closing: its fd and kvm_run page must never be used again; the state goes too.

        (The vCPU closes only when no run is going on, and nothing calls
        the C loop after that: ``run()`` answers EBADF without it.)
        """
        if self._mapping is not None:
            self._loop.vcpu_fd = -1
            self._loop.run = ffi.NULL
        self.close()

    def close(self) -> None:
        """Unmap the loop's state (its statistics stay readable, as they were).  Safe twice."""
        mapping = getattr(self, "_mapping", None)
        if mapping is None:
            return
        self._closed_state = {"counters": self.counters(), "histograms": self.histograms(), "hits": self.hits(),
                              "returns": self._loop.returns}
        self._mapping = None
        self._loop = self._txbuf = None
        lib.pykvm_munmap(mapping, self._size)

    @property
    def closed(self) -> bool:
        return self._mapping is None

    def __del__(self) -> None:
        self.close()

    # -- the range table -------------------------------------------------------
    def set_ranges(self, ranges: list[FastRange]) -> None:
        """Replace the table.  Only call between runs (the C loop reads it unlocked).

        A row that stays (same space, base and name) keeps its hit count.
        Raises ``ValueError`` for more rows than the C table holds.
        """
        if len(ranges) > MAX_RANGES:
            raise ValueError(f"the C loop holds at most {MAX_RANGES} ranges, not {len(ranges)}")
        if self._loop is None:
            raise ValueError("the C loop is closed (its vCPU was closed)")
        loop = self._loop
        kept = {(r.space, r.base, r.name): (loop.ranges[i].hits, loop.ranges[i].write_hits,
                                            loop.ranges[i].last_value)
                for i, r in enumerate(self.ranges)}
        if loop.txlen and self.ranges:
            raise RuntimeError("drain the transmit buffer (take_tx) before changing the table")
        for i, r in enumerate(ranges):
            slot = loop.ranges[i]
            slot.space, slot.base, slot.length = r.space, r.base, r.length
            slot.read_action, slot.write_action, slot.read_value = r.read_action, r.write_action, r.read_value
            slot.write_fd = r.write_fd
            slot.id = i
            slot.hits, slot.write_hits, slot.last_value = kept.get((r.space, r.base, r.name), (0, 0, 0))
        loop.nranges = len(ranges)
        self.ranges = list(ranges)

    def hits(self) -> dict[str, int]:
        """Accesses handled in C, per range name."""
        if self._loop is None:
            return dict(self._closed_state["hits"])
        return {r.name or f"{r.base:#x}": self._loop.ranges[i].hits for i, r in enumerate(self.ranges)}

    def row(self, index: int) -> tuple[FastRange, int, int, int]:
        """``(range, accesses, writes, last value written)`` C handled on row ``index``, cumulative."""
        if self._loop is None:
            raise ValueError("the C loop is closed (its vCPU was closed)")
        slot = self._loop.ranges[index]
        return self.ranges[index], slot.hits, slot.write_hits, slot.last_value

    # -- running -------------------------------------------------------------------
    def run(self) -> int:
        """Run until an exit Python must handle (GIL released); see csrc/runloop.h for the code.

        Closed (its vCPU gone), it answers RET_ERROR with EBADF at once.
        """
        if self._loop is None:
            return RET_ERROR
        return lib.pykvm_loop_run(self._loop)

    @property
    def state(self):
        """The ``struct pykvm_loop *`` itself, for hot loops that read io_value/io_addr."""
        return self._loop

    @property
    def decode_all(self) -> bool:
        """Hand every exit to Python undecoded (RET_EXIT), for a tracer that decodes each one."""
        return bool(self._loop.decode_all)

    @decode_all.setter
    def decode_all(self, value: bool) -> None:
        self._loop.decode_all = int(value)

    def clear_pending(self) -> None:
        """Do not time the exit in flight (the run ends here), and forget an unsent answer."""
        if self._loop is not None:
            lib.pykvm_loop_clear_pending(self._loop)

    @property
    def stop_status(self) -> int:
        return self._loop.stop_status

    @property
    def error_errno(self) -> int:
        return errno.EBADF if self._loop is None else self._loop.error_errno

    @property
    def returns(self) -> int:
        """How many times ``run()`` has returned (any reason): a vCPU's heartbeat."""
        return self._closed_state["returns"] if self._loop is None else self._loop.returns

    def take_tx(self) -> tuple[int, bytes]:
        """``(row index, bytes)`` the C loop buffered for a transmit register since the last call."""
        n = self._loop.txlen if self._loop is not None else 0
        if not n:
            return -1, b""
        data = bytes(ffi.buffer(self._txbuf, n))
        self._loop.txlen = 0
        return self._loop.txowner, data

    # -- statistics ------------------------------------------------------------------
    def counters(self) -> dict:
        """Exits per reason (total / C / Python) and seconds in KVM_RUN, C and Python."""
        if self._loop is None:
            return self._closed_state["counters"]
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
        if self._loop is None:
            return self._closed_state["histograms"]
        loop = self._loop
        out = {}
        for reason in range(lib.PYKVM_NR_REASONS):
            if loop.exits[reason]:
                out[reason] = {
                    "handle": list(loop.hist_handle[reason]),
                    "roundtrip": list(loop.hist_roundtrip[reason]),
                }
        return out
