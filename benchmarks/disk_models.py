#!/usr/bin/env python3
"""Emulated ATA PIO versus virtio-blk versus the host file: ``python benchmarks/disk_models.py [--quick]``.

4 KiB sequential and random reads and writes through (a) the ata guest on
pykvm's emulated IDE disk, (b) the same guest on QEMU's -M pc, (c) the host
file itself (pread/pwrite from Python) and (d) virtio-blk (pykvm.bench.disk_virtio);
prints MB/s, exits per MB and each model's percentage of the host file,
and writes JSON and a PNG to benchmarks/results/.  A thin wrapper around
:mod:`pykvm.bench.disk_models` (``--help`` for the options).
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a source tree

from pykvm.bench.disk_models import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
