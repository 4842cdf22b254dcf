#!/usr/bin/env python3
"""VM lifecycle per step and VMs per second, against raw C: ``python benchmarks/lifecycle.py [--quick]``.

A thin wrapper around :mod:`pykvm.bench.lifecycle`; ``pykvm bench --help``
lists the options.  See benchmarks/README.md for how to read the results.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source tree

from pykvm.bench.lifecycle import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
