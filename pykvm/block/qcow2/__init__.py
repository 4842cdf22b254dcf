"""qcow2, versions 2 and 3 (QEMU docs/interop/qcow2.txt).

===============  ====================================================
header.py        the header, header extensions, feature bits
layout.py        L1/L2 entry bits, cluster kinds, the metadata map
cache.py         the LRU table cache (L2 tables, refcount blocks)
refcount.py      refcounts, allocation, crash-consistent ordering
snapshots.py     the internal snapshot table (read-only)
image.py         :class:`Qcow2Image`: reads, writes, zeroes, discards
check.py         ``qemu-img check``: references against refcounts
create.py        new, empty images
===============  ====================================================
"""

from pykvm.block.qcow2.check import CheckResult, check_qcow2
from pykvm.block.qcow2.create import create_qcow2
from pykvm.block.qcow2.image import Qcow2Image

__all__ = ["CheckResult", "Qcow2Image", "check_qcow2", "create_qcow2"]
