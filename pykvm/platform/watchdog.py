"""The watchdog: one thread per process that kicks vCPUs out of KVM_RUN.

A vCPU thread blocked in KVM_RUN only comes back for an exit.  To stop a
spinning guest at a deadline, or to hand buffered serial output to its sink
while the guest computes, another thread must *kick* it: set
``kvm_run.immediate_exit`` and send it a signal (api.rst, "immediate_exit").

One thread serves every running machine of the process: a run ``arm()``s a
``Watch`` and ``disarm()``s it when it ends, so a run costs no thread
creation.  ``disarm()`` returns only when no kick for that watch can still
come.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

from pykvm.stop_signals import block_stop_signals


class Watch:
    """One armed run: how to kick it, when, and whether to flush output (compared and hashed by identity)."""

    __slots__ = ("kick", "deadline", "output_pending", "interval", "timed_out", "next_flush")

    def __init__(self, kick: Callable[[], None], deadline: float | None, output_pending: Callable[[], bool] | None,
                 interval: float, timed_out: threading.Event | None = None, next_flush: float = 0.0) -> None:
        self.kick = kick
        self.deadline = deadline
        self.output_pending = output_pending
        self.interval = interval
        self.timed_out = threading.Event() if timed_out is None else timed_out
        self.next_flush = next_flush

    def __repr__(self) -> str:
        return (f"Watch(kick={self.kick!r}, deadline={self.deadline!r}, output_pending={self.output_pending!r}, "
                f"interval={self.interval!r}, timed_out={self.timed_out!r}, next_flush={self.next_flush!r})")


class Watchdog:
    """Kicks each armed run's thread at its deadline and, if asked, while output waits."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._watches: set[Watch] = set()
        self._thread: threading.Thread | None = None

    def arm(self, kick: Callable[[], None], deadline: float | None,
            output_pending: Callable[[], bool] | None = None, interval: float = 0.05) -> Watch:
        """Watch a run; ``kick()`` makes it leave KVM_RUN; ``watch.timed_out`` is set if the deadline kicked it.

        ``deadline`` is a ``time.perf_counter()`` value or None; a NaN or
        infinite deadline, or a non-positive ``interval``, is refused with
        ``ValueError`` (the thread could never compute a wait from it).
        """
        if deadline is not None and not math.isfinite(deadline):
            raise ValueError(f"the deadline must be a finite time, not {deadline!r}")
        if not (math.isfinite(interval) and interval > 0):
            raise ValueError(f"the flush interval must be a positive number of seconds, not {interval!r}")
        watch = Watch(kick, deadline, output_pending, interval)
        if deadline is None and output_pending is None:
            return watch  # nothing to do: not even the thread is needed
        watch.next_flush = time.perf_counter() + interval
        with self._cond:
            self._watches.add(watch)
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="pykvm-watchdog", daemon=True)
                self._thread.start()
            self._cond.notify()
        return watch

    def disarm(self, watch: Watch) -> None:
        """Stop watching; after this returns no kick for ``watch`` will come."""
        with self._cond:
            self._watches.discard(watch)

    def _serve(self) -> None:
        block_stop_signals()  # Ctrl-C is for the vCPU thread
        with self._cond:
            while True:
                if not self._watches:
                    self._cond.wait()
                    continue
                wake = min(
                    min(w.deadline for w in self._watches if w.deadline is not None)
                    if any(w.deadline is not None for w in self._watches) else float("inf"),
                    min(w.next_flush for w in self._watches if w.output_pending is not None)
                    if any(w.output_pending is not None for w in self._watches) else float("inf"),
                )
                wait = wake - time.perf_counter()
                if wait > 0:
                    self._cond.wait(wait)
                now = time.perf_counter()
                for w in list(self._watches):
                    if w.deadline is not None and now >= w.deadline:
                        w.timed_out.set()
                        self._watches.discard(w)
                        w.kick()
                    elif w.output_pending is not None and now >= w.next_flush:
                        w.next_flush = now + w.interval
                        if w.output_pending():
                            w.kick()


_shared: Watchdog | None = None
_shared_lock = threading.Lock()


def shared_watchdog() -> Watchdog:
    """The process's watchdog (its thread starts on the first armed run)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = Watchdog()
        return _shared
