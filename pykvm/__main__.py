"""``python -m pykvm`` and the ``pykvm`` command: the command line, with Ctrl-C at any moment an exit 130.

The process leaves through :func:`leave`, which skips the interpreter's
teardown once everything is closed and flushed.

``entry()`` imports the command line itself, so a Ctrl-C while the modules
load (the interpreter's first tens of milliseconds) ends with the same one
line and status as one during a run, not a KeyboardInterrupt traceback.
"""

from __future__ import annotations

import sys

EXIT_INTERRUPTED = 130


def entry() -> None:
    """Run ``pykvm.cli.main`` and exit with its status."""
    from pykvm import timeline

    try:
        from pykvm.cli import main

        status = main()
    except KeyboardInterrupt:
        print("pykvm: interrupted", file=sys.stderr)
        status = EXIT_INTERRUPTED
    timeline.mark("exit")
    timeline.write()
    leave(status)


def leave(status: int) -> None:
    """Exit now: flush what was written, then ``os._exit`` -- without the interpreter's teardown.

    Everything the command opened is closed by then (the session closes the
    machine, sockets and files and restores the terminal in ``finally``
    blocks); what is left is Python freeing its modules and objects one by
    one, which took ~8 ms of every ``pykvm run`` (a third of pykvm's own
    time) for nothing the process needs.
    """
    import os

    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe (pykvm run | head), a closed stream
            pass
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()  # handlers flush and close
    os._exit(status)


if __name__ == "__main__":
    entry()
