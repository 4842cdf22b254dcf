#!/usr/bin/env python3
"""Boot and IPIs against QEMU: ``python benchmarks/boot.py [--quick]``.

A fresh process to a Multiboot kernel's first serial byte and to its
debug-exit (pykvm -M pc / -M microvm against QEMU's), to the Linux banner
(when ``make linux`` has put a kernel in the cache), and the IPI round trip
between two vCPUs (-smp 2, and -smp 4 with the other APs halted or
spinning); prints the tables, writes benchmarks/results/boot.json and a
PNG.  A thin wrapper around :mod:`pykvm.bench.boot` (``--help`` for the
options).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source tree

from pykvm.bench.boot import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
