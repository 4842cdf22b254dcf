"""A run under the GDB stub: ``pykvm run -s``, ``-S``, ``-gdb tcp::PORT|tcp:HOST:PORT|unix:PATH``.

QEMU's options, QEMU's meaning: ``-gdb DEV`` listens for GDB's remote
protocol on DEV (``-s`` is ``-gdb tcp::1234``); ``-S`` keeps the vCPUs
stopped until the debugger continues them.  Without ``-S`` the guest runs
at once and a debugger that attaches stops it.  ``tcp::PORT`` listens on
the loopback interface only (``pykvm.state.gdb_server``).

The stub's target (``pykvm.state.gdb_kvm.KvmTarget``) owns the guest's
runs; this thread serves the terminal's input and waits until the guest
ends (by itself, by the debugger's ``kill``), ``--timeout`` passes or a
signal comes.  The session owns the server and closes it before the
machine.  The terminal is the guest's console only: no monitor shares it
(an explicit ``-monitor`` or ``--monitor-script`` with ``-gdb`` is refused).
"""

from __future__ import annotations

import sys
import threading
import time

from pykvm import timeline
from pykvm.cli.status import EXIT_OK, exit_status, stderr, stop_line
from pykvm.errors import UsageError

#: How long a guest's end waits for the stub to tell a connected debugger (the stop reply) before closing.
REPORT_GRACE = 5.0


def check_gdb_options(config) -> None:
    """What -gdb cannot go with (one line, before anything is opened)."""
    if config.monitor not in (None, "none") or config.monitor_script is not None:
        what = "--monitor-script" if config.monitor_script is not None else f"-monitor {config.monitor}"
        raise UsageError(f"-gdb {config.gdb}: {what} cannot be used with the GDB stub yet (the debugger "
                         "controls the guest)")
    if any(spec.startswith("mon:") for spec in config.serials):
        raise UsageError(f"-gdb {config.gdb}: -serial mon:... puts the monitor on the console, which cannot be "
                         "used with the GDB stub yet: use -serial stdio")


def run_gdb(session) -> int:
    from pykvm.state.gdb_kvm import CRASHES, KvmTarget
    from pykvm.state.gdb_server import GdbServer

    c, m = session.config, session.machine
    target = KvmTarget(m)
    server = GdbServer(target, c.gdb)
    try:
        server.start()
    except OSError as exc:
        server.close()
        raise UsageError(f"-gdb {c.gdb}: {exc.strerror or exc}") from None
    session.gdb_server = server
    if sys.stderr.isatty() or c.summary or (server.address.family == "tcp" and server.address.port == 0):
        # (quiet like QEMU otherwise: a port the system picked must be told)
        waits = " (-S: the guest starts when the debugger continues it)" if c.freeze else ""
        stderr(f"pykvm: GDB stub listening on {server.bound_address}{waits}")
    requested: list[str] = []
    wake = threading.Event()

    def stop(reason: str) -> None:  # a signal (in this thread, between two waits): only note it
        requested.append(reason)
        wake.set()

    session.on_stop = stop
    deadline = None if c.timeout is None else time.monotonic() + c.timeout
    session._start_input()
    try:
        if not c.freeze:
            target.start()
        while not target.ended_event.is_set() or (target.ended in CRASHES and server.connected):
            # (a crash is reported to a connected debugger as SIGSEGV: it may look around until it leaves)
            if requested:
                target.end(requested[0])
                break
            if deadline is not None and time.monotonic() >= deadline:
                target.end("timeout")
                break
            wake.wait(0.05)
        if server.connected:
            target.wait_reported(REPORT_GRACE)  # the debugger hears of the end before its socket closes
    finally:
        session.terminal.restore()
        server.close()
        session.gdb_server = None
        target.close()  # (its run thread, if a failure left one)
    timeline.mark("ran")
    return _report(session, target)


def _report(session, target) -> int:
    c = session.config
    if target.ended == "killed":
        stderr("pykvm: the debugger killed the guest")
        return EXIT_OK
    result = target.result
    if result is not None and result.ended == target.ended:
        return session.report(result)
    line = stop_line(target.ended, timeout=c.timeout, signo=session.stop_signal)
    if line:
        stderr(line)
    elif target.end_message:
        stderr(target.end_message)
    return exit_status(target.ended, target.end_status)
