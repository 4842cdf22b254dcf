"""``IoThread``: one host thread per machine that waits on eventfds and runs their handlers.

Some device work does not happen on the vCPU thread.  A virtio driver's
doorbell (a write to QueueNotify) can be delivered three ways, and two of
them end here:

* ``KVM_IOEVENTFD``: KVM turns the guest's write into a signal on an eventfd
  and resumes the guest without leaving the kernel;
* the C run loop's ``WRITE_EVENTFD`` range: the write reaches user space, the
  C loop signals an eventfd and resumes the guest without calling Python.

A level-triggered interrupt delivered through an irqfd needs the host side
too: KVM signals the irqfd's *resamplefd* when the guest acknowledges the
interrupt (its EOI), and the device must then say whether its line is still
high (``KVM_IRQFD_FLAG_RESAMPLE``, Documentation/virt/kvm/api.rst).

So a machine has at most one ``IoThread``: it ``poll``\\ s every eventfd
registered with :meth:`IoThread.watch`, reads (and so clears) an eventfd that
became readable, and calls its handler.  Handlers run one at a time on this
thread; they take the device's own lock (a virtio transport's
``process_queue`` does), so they may race with the vCPU thread's register
accesses safely.

Ownership: eventfds made with :meth:`IoThread.eventfd` belong to the
``IoThread`` and are closed by :meth:`IoThread.close`, after the thread has
stopped.  :meth:`close` must come before the guest memory the handlers touch
is unmapped (``Machine.close`` does it first).
"""

from __future__ import annotations

import os
import select
import threading
from collections import deque
from collections.abc import Callable

from pykvm.log import get_logger
from pykvm.stop_signals import block_stop_signals

log = get_logger("pykvm.iothread")

__all__ = ["IoThread"]

_EVENTFD_FLAGS = os.EFD_NONBLOCK | os.EFD_CLOEXEC
_MAX_LOGGED_ERRORS = 20  # handler exceptions logged with a traceback, then counted only


class IoThread:
    """A thread that waits on eventfds and calls a handler for each one that fires.

    The thread starts with the first :meth:`watch` and stops in
    :meth:`close`.  ``name`` names the thread (``ps -L`` shows it).
    """

    def __init__(self, name: str = "pykvm-io") -> None:
        self.name = name
        self._handlers: dict[int, Callable[[], None]] = {}
        self._owned: list[int] = []  # eventfds this object made and closes
        self._lock = threading.Lock()  # guards _handlers and _generation
        self._generation = 0  # bumped on every change of _handlers
        self._wake = os.eventfd(0, _EVENTFD_FLAGS)  # rebuild the poll set, or stop
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._closed = False
        #: Eventfd wake-ups handled, per fd (a kick burst counts once: the
        #: eventfd counter sums the signals that arrived before the read).
        self.wakeups: dict[int, int] = {}
        #: Handler calls that raised (logged; the thread carries on).
        self.errors = 0
        self._soon: deque[Callable[[], None]] = deque()  # call_soon(): run after the next poll

    # -- set-up ----------------------------------------------------------------
    def eventfd(self) -> int:
        """A new non-blocking eventfd, owned (and closed) by this IoThread."""
        if self._closed:
            raise ValueError("IoThread is closed")
        fd = os.eventfd(0, _EVENTFD_FLAGS)
        self._owned.append(fd)
        return fd

    def watch(self, fd: int, handler: Callable[[], None]) -> None:
        """Call ``handler()`` on this thread each time eventfd ``fd`` is signalled."""
        if self._closed:
            raise ValueError("IoThread is closed")
        with self._lock:
            if fd in self._handlers:
                raise ValueError(f"fd {fd} is already watched")
            self._handlers[fd] = handler
            self.wakeups.setdefault(fd, 0)
            self._generation += 1
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        else:
            os.eventfd_write(self._wake, 1)

    def call_soon(self, work: Callable[[], None]) -> None:
        """Run ``work()`` on this thread after it has served the eventfds that are ready; any thread.

        A device that stopped at its work budget continues this way, so one
        queue never starves the others (nor delays ``close()`` for long).
        """
        if self._closed:
            return
        self._soon.append(work)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        else:
            os.eventfd_write(self._wake, 1)

    def unwatch(self, fd: int) -> None:
        """Stop calling ``fd``'s handler (the fd stays open)."""
        with self._lock:
            if self._handlers.pop(fd, None) is not None:
                self._generation += 1
        if self._thread is not None:
            os.eventfd_write(self._wake, 1)

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # -- the thread --------------------------------------------------------------
    def _run(self) -> None:
        block_stop_signals()  # Ctrl-C is for the vCPU thread
        generation = -1
        poller = select.poll()
        handlers: dict[int, Callable[[], None]] = {}
        while not self._stopping:
            with self._lock:
                if generation != self._generation:
                    generation = self._generation
                    handlers = dict(self._handlers)
                    poller = select.poll()
                    poller.register(self._wake, select.POLLIN)
                    for fd in handlers:
                        poller.register(fd, select.POLLIN)
            for fd, events in poller.poll(0 if self._soon else None):
                if fd == self._wake:
                    _clear(fd)
                    continue
                handler = handlers.get(fd)
                if handler is None:
                    continue  # unwatched meanwhile
                try:
                    if events & (select.POLLNVAL | select.POLLERR) or not _clear(fd):
                        if events & (select.POLLNVAL | select.POLLERR):
                            raise OSError(f"poll reports {events:#x}")
                        continue  # another reader took it
                except (OSError, ValueError) as exc:  # closed or replaced under us: drop it, serve the others
                    self.errors += 1
                    log.warning("%s: eventfd %d failed (%s); no longer watched", self.name, fd, exc)
                    self.unwatch(fd)
                    continue
                self.wakeups[fd] = self.wakeups.get(fd, 0) + 1
                self._call(handler, f"handler for fd {fd}")
            for _ in range(len(self._soon)):  # only what was queued before: new work waits a poll
                if self._stopping:
                    break
                self._call(self._soon.popleft(), "deferred work")

    def _call(self, work: Callable[[], None], what: str) -> None:
        try:
            work()
        except Exception:  # a device bug must not stop every other device
            self.errors += 1
            if self.errors <= _MAX_LOGGED_ERRORS:
                log.exception("%s: %s failed", self.name, what)

    # -- ownership ----------------------------------------------------------------
    def close(self) -> None:
        """Stop the thread (waiting for a running handler to finish), then close the eventfds."""
        if self._closed:
            return
        self._closed = True
        self._stopping = True
        thread = self._thread
        if thread is not None:
            os.eventfd_write(self._wake, 1)
            if thread is not threading.current_thread():
                thread.join()
        for fd in self._owned + [self._wake]:
            try:
                os.close(fd)
            except OSError:
                pass
        self._owned.clear()
        self._handlers.clear()
        self._soon.clear()

    def __enter__(self) -> "IoThread":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("running" if self.running else "idle")
        return f"<IoThread {self.name} {state}, {len(self._handlers)} fds>"


def _clear(fd: int) -> bool:
    """Read (reset) a non-blocking eventfd; False when it was not signalled after all."""
    try:
        os.eventfd_read(fd)
        return True
    except BlockingIOError:
        return False
