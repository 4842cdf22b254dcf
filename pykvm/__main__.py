"""``python -m pykvm`` and the ``pykvm`` command: the command line, with Ctrl-C at any moment an exit 130.

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
    sys.exit(status)


if __name__ == "__main__":
    entry()
