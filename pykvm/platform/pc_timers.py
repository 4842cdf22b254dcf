"""The PC's timed interrupts: IRQ 8 from the RTC and the SCI from the ACPI PM timer, on time.

The device models keep no timers (``devices.cmos``, ``devices.acpi_pm``):
they latch what is due whenever they are touched, and say when their next
interrupt is due (``next_event``).  A guest that enables the RTC's periodic,
alarm or update-ended interrupt, or the PM timer's overflow event, and then
waits for it with ``hlt`` touches nothing, so something must wake them at
that time.  :class:`PcTimers` is that something: one thread per machine
that sleeps until the earliest ``next_event`` and latches it, which raises
the line.

It starts only when a guest first makes an event due (most guests never
do, and a thread costs start-up time), is woken after every guest write to
either device (the due time may have moved), and is joined by ``close()``.
The devices are shared between vCPU threads and this one, so every access
goes through one lock: :class:`Serialized` wraps each device on the bus.
"""

from __future__ import annotations

import threading
import time

__all__ = ["PcTimers", "Serialized"]


class Serialized:
    """A device on the bus whose accesses take ``lock``, and which tells ``after_write`` of each write."""

    def __init__(self, device, lock, after_write) -> None:
        self.device, self.name, self.length = device, device.name, device.length
        self._lock, self._after_write = lock, after_write

    def read(self, offset: int, size: int) -> bytes:
        with self._lock:
            return self.device.read(offset, size)

    def write(self, offset: int, data: bytes) -> None:
        with self._lock:
            self.device.write(offset, data)
            self._after_write()

    def save_state(self) -> dict:
        with self._lock:
            return self.device.save_state()

    def load_state(self, state: dict) -> None:
        with self._lock:
            self.device.load_state(state)
            self._after_write()  # the restored registers may make an event due


class PcTimers:
    """Latch the RTC's and the PM timer's events when they fall due (see the module docstring)."""

    def __init__(self, cmos, pm) -> None:
        self.cmos, self.pm = cmos, pm
        self.lock = threading.RLock()  # the devices' lock; an RLock: a device callback may come back in
        self._changed = threading.Condition(self.lock)
        self._thread: threading.Thread | None = None
        self._closed = False
        self.listeners: list = []  # called (under the lock) after each latch: the S3 wake check

    def serialized(self, device) -> Serialized:
        return Serialized(device, self.lock, self.poke)

    def due(self) -> float | None:
        """time.monotonic() of the next event of either device, or None; latches what is due now."""
        times = []
        rtc = self.cmos.next_event()
        if rtc is not None:
            times.append(time.monotonic() + (rtc - self.cmos.clock()))
        pm = self.pm.next_event()
        if pm is not None:
            times.append(time.monotonic() + (pm - self.pm.clock_ns()) / 1e9)
        for listener in self.listeners:
            listener()
        return min(times, default=None)

    def poke(self) -> None:
        """A guest wrote to a timed device (the lock is held): start the thread or move its deadline."""
        if self._closed:
            return
        if self._thread is None:
            if self.due() is None:
                return
            self._thread = threading.Thread(target=self._run, name="pykvm-pc-timers", daemon=True)
            self._thread.start()
        self._changed.notify()

    def _run(self) -> None:
        from pykvm.stop_signals import block_stop_signals

        block_stop_signals()  # Ctrl-C belongs to the main thread
        with self._changed:
            while not self._closed:
                due = self.due()
                self._changed.wait(None if due is None else max(0.0, due - time.monotonic()))

    def close(self) -> None:
        """Stop and join the thread (the machine's close does this); idempotent."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
