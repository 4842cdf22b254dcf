"""``Machine.run()``: every vCPU's loop under the watchdog, to the stop that ends the run, and its result.

One run arms the process's watchdog (``platform.watchdog``) for each vCPU's
loop (``platform.vcpu_loop``) with the run's deadline, runs one loop on the
calling thread or one thread per vCPU (``platform.smp``), and turns the stop
into a :class:`~pykvm.platform.results.RunResult`.  Between the vCPUs'
stops and that result sits ACPI S3 (``platform.pc_sleep``): a guest that
suspends to RAM ends the loops, and the run waits here for its wake event
and runs them again, so a caller sees one run.
"""

from __future__ import annotations

import math
import threading

from pykvm.platform.results import REGISTER_NAMES, RunAccounting, RunResult
from pykvm.platform.smp import run_vcpus
from pykvm.platform.vcpu_loop import VcpuStop
from pykvm.platform.watchdog import shared_watchdog

__all__ = ["check_timeout", "run_machine", "run_result"]


def check_timeout(timeout: float | None) -> float | None:
    """A run's timeout: None, or a finite number of seconds > 0 (NaN, infinities and negatives refused)."""
    if timeout is None:
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
        raise TypeError(f"timeout must be a number of seconds or None, not {type(timeout).__name__}")
    if not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"timeout must be a finite number of seconds above 0, not {timeout!r}")
    return float(timeout)


def run_machine(m, timeout: float | None, flush_interval: float) -> RunResult:
    """What ``Machine.run`` does (its docstring says what a caller sees)."""
    timeout = check_timeout(timeout)
    m._run_thread = threading.current_thread()
    m._run_done.clear()
    try:
        if m._closed:
            raise ValueError("the machine is closed: it cannot run again")
        return _run(m, timeout, flush_interval)
    finally:
        m._run_done.set()  # close() from another thread waits for this


def _run(m, timeout: float | None, flush_interval: float) -> RunResult:
    m._sync_extra_rows()
    accounting = RunAccounting(m.loops, m.stats_fds)
    deadline = None if timeout is None else accounting.started + timeout
    watchdog = shared_watchdog()

    def run_one(index: int) -> VcpuStop:
        loop = m.loops[index]
        state = loop.cloop.state
        pending = (lambda: bool(state.txlen)) if m.pc.capture.sink is not None else None
        with loop.vcpu.running():
            watch = watchdog.arm(loop.kick, deadline, pending, flush_interval)
            try:
                return loop.run(watch=watch)
            except KeyboardInterrupt:
                loop.finish()
                return VcpuStop("interrupted", None, "stopped by Ctrl-C")
            finally:
                watchdog.disarm(watch)

    def run_all() -> VcpuStop:
        if len(m.loops) == 1:
            return run_one(0)
        index, stop = run_vcpus(m.loops, run_one)
        m.last_stop_vcpu = index
        return stop.replace(message=f"vCPU {index}: {stop.message}") if index and stop.message else stop

    sleep = m.board.sleep if m.board is not None else None
    stop = VcpuStop("suspend", 0, "") if sleep is not None and sleep.suspended else run_all()
    while stop.reason == "suspend" and sleep is not None:  # ACPI S3: wait for the wake, then resume
        try:
            woke = sleep.wait_for_wake(deadline)
        except KeyboardInterrupt:
            woke = "interrupted"
        if woke != "wake":
            m.cancel_stop()  # the stop request was for the sleep; the loops must not keep it
            stop = VcpuStop(woke, None, "while suspended (ACPI S3)")
        else:
            stop = run_all()
    return run_result(m, accounting, stop)


def run_result(m, accounting: RunAccounting, stop: VcpuStop) -> RunResult:
    """The run's result from the stop that ended it: a failed sink, the debug-exit status, the registers."""
    ended, status, message = stop.reason, stop.status, stop.message
    if m._output_error is not None:
        # The sink failed (maybe only when the last bytes were handed over at the end of
        # the run): what the guest wrote did not all arrive, and that is what the run says.
        if ended != "output-error":
            message = f"{m._output_error} (the guest had ended: {ended})"
            m.loop.cancel_stop()  # the stop the failure asked for is this one
        else:
            message = m._output_error
        ended, status = "output-error", None
    if ended == "debug-exit" and status is None:
        status = m.debug_exit.exit_status
    capture = m.pc.capture
    if capture.dropped:
        message = (message + "\n" if message else "") + f"{capture.dropped} serial bytes not kept"
    regs = {}
    if not m.vcpu.closing:
        values = m.vcpu.get_regs()
        regs = {name: getattr(values, name) for name in REGISTER_NAMES}
    return accounting.result(ended, status, message, stop.exit, bytes(capture.data), regs)
