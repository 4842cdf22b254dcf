#!/usr/bin/env python3
"""Emulated 16550 versus virtio-console: ``python benchmarks/io_models.py [--quick]``.

Moves N bytes guest -> host and host -> guest through (a) the 16550 with
Python handlers, (b) the 16550 with the C loop, (c) coalesced PIO and
(d) virtio-console with ioeventfd and irqfd; prints MB/s, exits per KB and
the ratio to (a), and writes JSON to benchmarks/results/.  A thin wrapper
around :mod:`pykvm.bench.io_models` (``--help`` for the options).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source tree

from pykvm.bench.io_models import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
