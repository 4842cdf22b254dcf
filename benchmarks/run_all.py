#!/usr/bin/env python3
"""Every benchmark (exit latency, lifecycle, memory): ``python benchmarks/run_all.py [--quick]``.

The same as ``pykvm bench`` and ``make bench``.  See benchmarks/README.md.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source tree

from pykvm.bench import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
