"""The vCPU run loop: the one place an exit is handled.

Every exit takes one path.  The guest's ``out`` leaves KVM_RUN; the C loop
(``pykvm.platform.cloop``) takes it if a device gave it a fast row for that
port; otherwise it comes back here, goes to the bus and the device, and the
guest is re-entered.  Only exits that end or pause a run come out of
:meth:`VcpuLoop.run`, as a :class:`VcpuStop` (the model of cloud-hypervisor's
``VmOps`` with ``VmExit::Ignore`` for what the loop handled itself).
``Machine.run()``, the tracer, the monitor, the GDB stub and the benchmarks
all run a guest through this loop.

One ``VcpuLoop`` per vCPU, safe to run on its own thread (SMP runs one
thread per vCPU): what other threads may do to a running loop is
:meth:`~VcpuLoop.request_stop`, :meth:`~VcpuLoop.post` (run a callable on
the vCPU's thread before it re-enters the guest) and the watchdog's kick.

Two ways an exit reaches Python:

* packed (the hot path): a single port/MMIO access comes back in the C
  loop's return value (code, size, port) with the data in ``io_value``, and
  goes straight to the bus; an answer to a read goes back the same way;
* decoded: anything else (REP string I/O, wide MMIO, HLT, shutdown, ...) is
  decoded from ``kvm_run`` into an exit value (``pykvm.exits``); I/O values
  go through :func:`dispatch`, the others end the run.

Kicks are never lost: on EINTR the loop clears ``immediate_exit`` *before*
it looks at the stop flags, so a request that arrives after the look sets
``immediate_exit`` again and the next KVM_RUN returns at once.
"""

from __future__ import annotations

import functools
import signal
import threading
from collections import deque
from collections.abc import Callable

from pykvm import exits
from pykvm._native_loader import lib
from pykvm.devices import DeviceStop
from pykvm.errors import KvmError, UnmappedAccess
from pykvm.platform.bus import Bus
from pykvm.platform.cloop import (
    RET_CODE_MASK, RET_DEBUG_EXIT, RET_ERROR, RET_INTR, RET_MMIO_READ, RET_MMIO_WRITE, RET_PIO_IN,
    RET_PIO_OUT, RET_PORT_SHIFT, RET_SIZE_SHIFT, RET_TX_PENDING, CLoop,
)
from pykvm.platform.fastpath import FastPath, FastTable
from pykvm.stop_signals import STOP_SIGNALS
from pykvm.values import Value

__all__ = ["VcpuLoop", "VcpuStop", "dispatch", "exit_stop"]

_IO_EXITS = (exits.IoOut, exits.IoIn, exits.MmioWrite, exits.MmioRead)
_BYTE = [bytes((i,)) for i in range(256)]  # one-byte OUT data without a to_bytes call


class VcpuStop(Value):
    """Why a run of the vCPU loop ended.

    ``reason``: ``hlt``, ``debug-exit``, ``reset``, ``shutdown`` (triple
    fault), ``internal-error``, ``fail-entry``, ``system-event``, ``debug``
    (KVM_EXIT_DEBUG: a step or breakpoint), ``guest-error`` (strict bus),
    ``timeout``, ``closed``, ``unknown``, ``io`` (asked to stop after an I/O
    exit), ``interrupted`` (Ctrl-C), or the reason given to
    :meth:`VcpuLoop.request_stop`.  ``status`` is the device's exit status
    (debug-exit's ``(value << 1) | 1``, 0 for HLT and reset); ``exit`` the
    exit value that ended the run, when there was one.  ``pending_io``: a
    device stopped the run from inside an I/O instruction, which KVM has not
    completed yet (the next run, or ``VcpuLoop.complete_pending``, does).
    """

    __slots__ = ("reason", "status", "message", "exit", "pending_io")

    def __init__(self, reason: str, status: int | None = None, message: str = "", exit: object = None,
                 pending_io: bool = False) -> None:
        self.reason = reason
        self.status = status
        self.message = message
        self.exit = exit
        self.pending_io = pending_io


def dispatch(exit: exits.Exit, pio: Bus, mmio: Bus) -> bytes | None:
    """Route an I/O exit value to its device; return the bytes answering a read, or None.

    A pure function of (exit, buses), tested without KVM.  REP string I/O
    (``count > 1``) is split into ``count`` accesses of ``size`` bytes, in
    order, as the CPU would perform them (a device may take REP INS's reads
    in one call: ``Bus.read_string``).  Device stops (``DeviceStop``) and
    strict-bus errors propagate to the caller.
    """
    if isinstance(exit, exits.IoOut):
        size = exit.size
        if exit.count == 1:
            pio.write(exit.port, exit.data)
        else:
            for i in range(exit.count):
                pio.write(exit.port, exit.data[i * size:(i + 1) * size])
        return None
    if isinstance(exit, exits.IoIn):
        if exit.count == 1:
            return pio.read(exit.port, exit.size)
        return pio.read_string(exit.port, exit.size, exit.count)
    if isinstance(exit, exits.MmioWrite):
        mmio.write(exit.address, exit.data)
        return None
    if isinstance(exit, exits.MmioRead):
        return mmio.read(exit.address, exit.size)
    raise TypeError(f"{type(exit).__name__} is not an I/O exit")


def exit_stop(exit: exits.Exit, describe_cpu: Callable[[], str] = lambda: "") -> VcpuStop:
    """How a run ends on an exit that is not I/O (``describe_cpu`` adds the register dump)."""
    if isinstance(exit, exits.Hlt):
        return VcpuStop("hlt", 0, "", exit)
    if isinstance(exit, exits.Shutdown):
        return VcpuStop("shutdown", None, "triple fault or shutdown\n" + describe_cpu(), exit)
    if isinstance(exit, exits.InternalError):
        return VcpuStop("internal-error", None, f"KVM internal error: {exit.suberror_name}\n" + describe_cpu(),
                        exit)
    if isinstance(exit, exits.FailEntry):
        return VcpuStop("fail-entry", None, f"VM entry failed, hardware reason "
                        f"{exit.hardware_entry_failure_reason:#x}\n" + describe_cpu(), exit)
    if isinstance(exit, exits.SystemEvent):
        return VcpuStop("system-event", None, f"system event type {exit.type}", exit)
    if isinstance(exit, exits.Debug):
        return VcpuStop("debug", None, f"debug exception {exit.exception} at {exit.pc:#x}", exit)
    return VcpuStop("unknown", None, f"unhandled exit {exit}\n" + describe_cpu(), exit)


class VcpuLoop:
    """The run loop of one vCPU: KVM_RUN through the C loop, I/O to the buses, stops returned.

    ``fastpath`` is the machine's table source; ``coalesced`` (optional) is
    drained whenever KVM_RUN returns, before the exit is handled (its writes
    are older); ``describe_cpu`` gives the register dump for crash reports.
    """

    def __init__(self, vcpu, pio: Bus, mmio: Bus, fastpath: FastPath, *, coalesced=None,
                 describe_cpu: Callable[[], str] | None = None) -> None:
        self.vcpu = vcpu
        self.pio, self.mmio = pio, mmio
        self.fastpath = fastpath
        self.cloop = CLoop(vcpu)
        self.table = FastTable(self.cloop, fastpath)
        self.coalesced = coalesced
        self.describe_cpu = describe_cpu or (lambda: "")
        #: Called with a KVM_EXIT_INTERNAL_ERROR; True: the instruction was finished, run on
        #: (pykvm.platform.ring0_assist, on hosts whose ring-0 emulator lacks some instructions).
        self.assist: Callable[[exits.Exit], bool] | None = None
        self._attention = True  # the one flag the hot path checks per exit
        self._posted: deque[Callable[[], None]] = deque()
        self._stop_request: str | None = None
        self._run_mask: set | None = None  # the KVM_SET_SIGNAL_MASK last given to the vCPU
        self._watch = None
        self._observing = False
        fastpath.on_change(self._table_changed)

    # -- what other threads may do -------------------------------------------------
    @property
    def c_loop(self) -> bool:
        """Whether the C loop takes the devices' fast rows (False sends every exit to Python)."""
        return self.table.enabled

    @c_loop.setter
    def c_loop(self, value: bool) -> None:
        self.table.enabled = bool(value)
        self.table.generation = -1
        self._attention = True

    def post(self, work: Callable[[], None]) -> None:
        """Run ``work()`` on the vCPU's thread before it next enters the guest; safe from any thread.

        From the vCPU's own thread (a device continuing its work in rounds)
        the next KVM_RUN returns at once, so the stop flags are looked at
        between rounds: a stop or a deadline is never held up by device work.
        """
        self._posted.append(work)
        self._attention = True
        runner = self.vcpu.runner
        if runner is None:
            return
        if runner == threading.get_ident():
            run = self.vcpu.kvm_run
            if run is not None:
                run.immediate_exit = 1
        else:
            self.vcpu.kick()

    def request_stop(self, reason: str = "paused") -> None:
        """Make a running :meth:`run` return soon with ``reason``; before a run, the next run returns at once."""
        self._stop_request = reason
        self.vcpu.kick()

    def cancel_stop(self) -> None:
        """Forget a stop request that came after the run had already ended for another reason."""
        self._stop_request = None

    @property
    def stop_requested(self) -> str | None:
        return self._stop_request

    def kick(self) -> None:
        """Make the vCPU leave KVM_RUN now (it goes back in unless a stop is due)."""
        self.vcpu.kick()

    def _table_changed(self) -> None:
        self._attention = True
        self._kick_unless_mine()

    def _kick_unless_mine(self) -> None:
        runner = self.vcpu.runner
        if runner is not None and runner != threading.get_ident():
            self.vcpu.kick()

    # -- running ---------------------------------------------------------------------
    def run(self, *, watch=None, observe: Callable[[exits.Exit], None] | None = None,
            after_io: str | None = None) -> VcpuStop:
        """Run the guest until something ends or pauses the run; return why.

        ``watch`` is the watchdog's record for this run (its ``timed_out``
        event ends the run with ``timeout``).  ``observe`` sees every I/O exit
        as a decoded value before it is handled (the C loop's rows are off
        meanwhile, so each reaches Python).  ``after_io``: ``"return"`` ends
        the run after the first I/O exit is handled (the next run completes
        the instruction); ``"complete"`` also completes it first, without
        running any further instruction (``immediate_exit``; for
        single-stepping).  Host errors (``KvmError``) propagate; nothing the
        guest does raises.
        """
        with self.vcpu.running():
            saved_mask = self._block_stop_signals()
            self._watch = watch
            if observe is not None:
                self._observing = True
                self.table.clear()
                self.cloop.decode_all = True
            if self._stop_request is not None:
                self.vcpu.kvm_run.immediate_exit = 1  # asked before this run started
            try:
                return self._run(observe, after_io)
            finally:
                self._watch = None
                if self._observing:
                    self._observing = False
                    self.cloop.decode_all = False
                    self.table.generation = -1
                    self._attention = True  # the next run installs the rows again
                self.finish()
                signal.pthread_sigmask(signal.SIG_SETMASK, saved_mask)  # a stop signal held back arrives now

    def _block_stop_signals(self) -> set:
        """Block the stop signals on this thread for the run; KVM unblocks them inside KVM_RUN on the main thread.

        Python runs signal handlers on the main thread, between bytecodes: a
        Ctrl-C that came after the loop's last look and before KVM_RUN would
        wait for the guest's next exit (forever, for a guest that computes).
        Blocked here and unblocked by KVM inside KVM_RUN, it makes KVM_RUN
        return EINTR at once.  Another thread's run keeps them blocked even
        in KVM_RUN: the main thread takes them.  Returns the previous mask.
        """
        saved = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        in_run = (saved - STOP_SIGNALS) if threading.current_thread() is threading.main_thread() \
            else (saved | STOP_SIGNALS)
        if in_run != self._run_mask:
            try:
                self.vcpu.set_signal_mask(in_run)
            except BaseException:
                signal.pthread_sigmask(signal.SIG_SETMASK, saved)
                raise
            self._run_mask = in_run
        return saved

    def finish(self) -> None:
        """After a run: hand back everything C holds (hits, transmit bytes, coalesced writes)."""
        self.cloop.clear_pending()
        if self.coalesced:
            self.coalesced.flush(self.vcpu)
        self.table.drain_tx()
        self.table.sync()
        run = self.vcpu.kvm_run
        if run is not None:
            run.immediate_exit = 0

    def complete_pending(self) -> None:
        """Finish the I/O instruction KVM is waiting on without running another (immediate_exit)."""
        with self.vcpu.running():
            run = self.vcpu.kvm_run
            run.immediate_exit = 1
            try:
                self.cloop.run()
            finally:
                run.immediate_exit = 0

    def _attend(self) -> None:
        """Work posted by other threads, and a new fast-path table, before re-entering the guest."""
        self._attention = False
        posted = self._posted
        for _ in range(len(posted)):  # what was posted until now; what this posts waits a round
            posted.popleft()()
        if not self._observing and self.table.generation != self.fastpath.generation:
            self.table.install()

    def _interrupted(self) -> VcpuStop | None:
        """KVM_RUN returned EINTR: a kick or a stop signal.  Clear immediate_exit first, then see why."""
        run = self.vcpu.kvm_run
        run.immediate_exit = 0
        if STOP_SIGNALS & signal.sigpending():
            # KVM_RUN returned for it, but out here it is blocked again, so still pending: let it in for a
            # moment, and Python's handler runs before the next line (KeyboardInterrupt, or a stop request)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        if self.vcpu.closing:
            return VcpuStop("closed", None, "the vCPU was closed during the run")
        watch = self._watch
        if watch is not None and watch.timed_out.is_set():
            return VcpuStop("timeout", None, "stopped by --timeout")
        reason = self._stop_request
        if reason is not None:
            self._stop_request = None
            return VcpuStop(reason)
        return None  # a kick for input, output or a new table: go back in

    def _run(self, observe, after_io: str | None) -> VcpuStop:
        run = self.vcpu.kvm_run
        state = self.cloop.state
        loop_run = functools.partial(lib.pykvm_loop_run, state)  # valid all run: close() waits for it
        pio_read, pio_write = self.pio.read, self.pio.write
        mmio_read, mmio_write = self.mmio.read, self.mmio.write
        coalesced = self.coalesced
        code_mask, pio_out = RET_CODE_MASK, RET_PIO_OUT
        size_shift, port_shift = RET_SIZE_SHIFT, RET_PORT_SHIFT
        completing = None  # after_io="complete": the I/O exit being completed
        while True:
            if self._attention:
                self._attend()
            ret = loop_run()  # the GIL is released inside
            if coalesced:
                coalesced.flush(self.vcpu)  # older than what C buffered and than this exit
            if ret & RET_TX_PENDING:
                self.table.drain_tx()  # before Python touches the device again
            code = ret & code_mask
            try:
                if code == pio_out:
                    size = (ret >> size_shift) & 0xF
                    value = state.io_value
                    pio_write(ret >> port_shift, _BYTE[value] if size == 1 else value.to_bytes(size, "little"))
                    continue
                if code == RET_PIO_IN:
                    state.io_value = int.from_bytes(pio_read(ret >> port_shift, (ret >> size_shift) & 0xF), "little")
                    state.io_answer = 1
                    continue
                if code == RET_MMIO_WRITE:
                    mmio_write(state.io_addr, state.io_value.to_bytes((ret >> size_shift) & 0xF, "little"))
                    continue
                if code == RET_MMIO_READ:
                    state.io_value = int.from_bytes(mmio_read(state.io_addr, (ret >> size_shift) & 0xF), "little")
                    state.io_answer = 1
                    continue
                if code == RET_INTR:
                    if completing is not None:
                        run.immediate_exit = 0
                        return VcpuStop("io", None, "", completing)
                    stop = self._interrupted()
                    if stop is not None:
                        return stop
                    continue
                if code == RET_DEBUG_EXIT:
                    return VcpuStop("debug-exit", self.cloop.stop_status)
                if code == RET_ERROR:
                    raise KvmError("KVM_RUN", self.cloop.error_errno)
                exit = exits.decode(run)
                if isinstance(exit, _IO_EXITS):
                    if observe is not None:
                        observe(exit)
                    answer = dispatch(exit, self.pio, self.mmio)  # REP string I/O, wide MMIO
                    if answer is not None:
                        if isinstance(exit, exits.IoIn):
                            exits.complete_io_in(run, answer)
                        else:
                            exits.complete_mmio_read(run, answer)
                    if after_io == "return":
                        return VcpuStop("io", None, "", exit)
                    if after_io == "complete":
                        run.immediate_exit = 1
                        completing = exit
                    continue
            except DeviceStop as stop:
                return VcpuStop(stop.reason, stop.status, pending_io=True)
            except UnmappedAccess as exc:
                located = exc.at(self.vcpu.get_regs().rip)
                return VcpuStop("guest-error", None, f"{located}\n{self.describe_cpu()}".rstrip("\n"))
            if self.assist is not None and isinstance(exit, exits.InternalError) and self.assist(exit):
                continue
            return exit_stop(exit, self.describe_cpu)
