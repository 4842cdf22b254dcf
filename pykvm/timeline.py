"""Phase timestamps of one pykvm process, for the start-up benchmark: ``PYKVM_TIMELINE=FILE``.

With the variable set, :func:`mark` notes ``CLOCK_MONOTONIC`` at each phase
(the package imported, the options parsed, the machine built, the guest
loaded, run and closed) and :func:`write` puts them in FILE, one ``name
nanoseconds`` line each, as the process exits.  The clock is system-wide,
so the benchmark, which noted when it spawned the process and when it
ended, can place every phase of the process's life (``pykvm.bench.startup``).
Without the variable, :func:`mark` is one comparison.
"""

from __future__ import annotations

import os
import time

_PATH = os.environ.get("PYKVM_TIMELINE")
_marks: list[tuple[str, int]] = []


def mark(phase: str) -> None:
    """Note that ``phase`` ended now (nothing when PYKVM_TIMELINE is not set)."""
    if _PATH is not None:
        _marks.append((phase, time.monotonic_ns()))


def write() -> None:
    """Write the marks to PYKVM_TIMELINE's file (once, at the end)."""
    if _PATH is None or not _marks:
        return
    with open(_PATH, "w") as f:
        f.writelines(f"{phase} {ns}\n" for phase, ns in _marks)
    _marks.clear()
