"""How a ``pykvm run`` ends: its exit statuses, and the line pykvm prints when it ended the run itself.

Exit status: the guest's isa-debug-exit status ``(value << 1) | 1``; 0 for
a clean HLT, reset or monitor ``quit``; 2 bad input (one line; also an
output that cannot be written); 3 the guest crashed (triple fault, KVM
internal error, failed entry, strict-bus violation: a register dump
follows); 4 this host's KVM cannot run the guest; 5 a shipped guest
reported that it failed; 124 ``--timeout``; 130 SIGINT; 143 SIGTERM or
SIGHUP.  docs/cli.md has the table; tests/test_cli.py covers each.
"""

from __future__ import annotations

import signal
import sys

EXIT_OK = 0
EXIT_BAD_INPUT = 2
EXIT_GUEST_CRASHED = 3
EXIT_HOST_CANNOT = 4
EXIT_GUEST_FAILED = 5
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143

_STOPS = {"timeout": EXIT_TIMEOUT, "interrupted": EXIT_INTERRUPTED, "terminated": EXIT_TERMINATED,
          "output-error": EXIT_BAD_INPUT, "paused": EXIT_OK, "closed": EXIT_INTERRUPTED}


def exit_status(ended: str, status: int | None) -> int:
    """The process's exit status for how a run ended."""
    if status is not None:
        return status
    return _STOPS.get(ended, EXIT_GUEST_CRASHED)


def stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def install_stop_signals(stop) -> object:
    """SIGINT, SIGTERM and SIGHUP end the run like a stop request: the summary is printed, the terminal restored.

    ``stop(reason, signo)`` runs in the main thread (Python runs signal
    handlers there) wherever that thread is (the run loop, the monitor's
    wait, setting up the console), so it only asks the run to stop.
    """
    previous = {}
    for signo, reason in ((signal.SIGINT, "interrupted"), (signal.SIGTERM, "terminated"),
                          (signal.SIGHUP, "terminated")):
        previous[signo] = signal.signal(signo, lambda s, f, reason=reason: stop(reason, s))
    return previous


def stop_line(ended: str, *, timeout: float | None = None, signo: int | None = None) -> str | None:
    """The line pykvm always prints when it, not the guest, ended the run (QEMU: 'terminating on signal N')."""
    if ended == "timeout":
        return f"pykvm: timeout: stopped after --timeout {timeout:g} s" if timeout else "pykvm: timeout"
    if ended == "interrupted":
        return "pykvm: terminating on signal 2 (interrupted)"
    if ended == "terminated":
        return f"pykvm: terminating on signal {signo or signal.SIGTERM}"
    return None


def restore_signals(previous) -> None:
    for signo, handler in previous.items():
        signal.signal(signo, handler)
