"""``pykvm run``: QEMU's command line, a live console, honest exit codes.

    pykvm run -kernel FILE [-initrd ...] [-append ...] [-m SIZE] [-serial ...] [-device ...] ...
    pykvm run --guest NAME [--args A0,A1] [--timeout S] [--stats] ...

How the terminal is used, as QEMU does: by default (and with
``-nographic``) the serial console and the monitor share it (``mon:stdio``:
raw mode, Ctrl-a c switches, Ctrl-a x quits, Ctrl-a h helps); ``-serial
stdio`` gives the console alone (Ctrl-C stops pykvm); ``-monitor stdio``
the monitor alone.  On a pipe, input is forwarded as it comes and its end
ends the input stream (the UART hangs up), not the run.

QEMU prints nothing on stderr for a clean run, and test harnesses rely on
it: pykvm's one-line summary goes to stderr only when stderr is a terminal
or with ``--summary``/``--stats``; so do library warnings (``warning:``,
rate-limited).  Errors always do.

The exit statuses are in ``pykvm.cli.status``.
"""

from __future__ import annotations

import sys

from pykvm import timeline
from pykvm.cli.config import RunConfig, run_config
from pykvm.cli.grammar import parse
from pykvm.cli.options import RUN_OPTIONS, RUN_TABLE, help_text
from pykvm.cli.status import EXIT_OK

SUMMARY = "Boot a kernel (QEMU's options) or a shipped guest (--guest) on KVM."


def show_library_warnings(config: RunConfig) -> None:
    """pykvm's warnings reach stderr, tagged, when someone is watching it (QEMU is silent otherwise)."""
    if not (sys.stderr.isatty() or config.summary or config.stats):
        return
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("pykvm: warning: %(message)s"))
    handler.setLevel(logging.WARNING)
    logging.getLogger("pykvm").addHandler(handler)


def cmd_run(argv: list[str]) -> int:
    parsed = parse(argv, RUN_TABLE, command="pykvm run",
                   positional="a disk image: pykvm boots -kernel FILE (or --guest NAME)")
    if parsed.flag("help"):
        sys.stdout.write(help_text("run", RUN_OPTIONS, SUMMARY))
        return EXIT_OK
    config = run_config(parsed)
    show_library_warnings(config)
    timeline.mark("parsed")
    from pykvm.cli.session import Session

    with Session(config) as session:
        status = session.run()
    timeline.mark("closed")
    return status
