#!/usr/bin/env python3
"""Exit latency per kind and path, against raw C and QEMU: ``python benchmarks/exit_latency.py [--quick]``.

A thin wrapper around :mod:`pykvm.bench.exit_latency`; ``pykvm bench --help``
lists the options.  See benchmarks/README.md for how to read the results.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source tree

from pykvm.bench.exit_latency import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
