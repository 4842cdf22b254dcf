"""pykvm's block layer: disk images for the disk controller models, and the ``pykvm img`` tool.

=============  ==========================================================
image.py       :class:`BlockImage`, the interface virtio-blk and IDE use
hostfile.py    the host file: QEMU's cache modes, O_DIRECT, holes
raw.py         raw images
qcow2/         qcow2 versions 2 and 3 (QEMU docs/interop/qcow2.txt)
backing.py     backing file names and chains
formats.py     :func:`open_image`, :func:`create_image`, format probing
units.py       sizes as qemu-img reads and prints them
imgtool.py     ``pykvm img info|create|check|convert``
=============  ==========================================================

Pure Python: no KVM, no C extension.
"""

from pykvm.block.formats import FORMATS, create_image, open_image, probe_format
from pykvm.block.hostfile import CACHE_MODES, HostFile
from pykvm.block.image import BlockImage
from pykvm.block.qcow2 import Qcow2Image, check_qcow2
from pykvm.block.raw import RawImage

__all__ = ["BlockImage", "CACHE_MODES", "FORMATS", "HostFile", "Qcow2Image", "RawImage",
           "check_qcow2", "create_image", "open_image", "probe_format"]
