"""Opening and creating images of any supported format (QEMU's format probing, ``bdrv_open``).

``format="auto"`` probes: a file that starts with the qcow2 magic is
qcow2, anything else is raw.  As in QEMU, probing is a convenience with a
catch: a guest that can write the first bytes of a raw disk can make it
look like qcow2.  Name the format of images a guest writes to.
"""

from __future__ import annotations

import os

from pykvm.block.backing import extend_chain, resolve_backing_path
from pykvm.block.hostfile import CacheMode
from pykvm.block.image import BlockImage
from pykvm.block.qcow2.create import DEFAULT_CLUSTER_SIZE, create_qcow2
from pykvm.block.qcow2.header import MAGIC
from pykvm.block.qcow2.image import Qcow2Image
from pykvm.block.raw import RawImage, create_raw
from pykvm.errors import ImageError

FORMATS = ("raw", "qcow2")


def probe_format(path: str | os.PathLike) -> str:
    """``"qcow2"`` if the file starts with the qcow2 magic, else ``"raw"``."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(MAGIC))
    except OSError as e:
        raise ImageError(f"could not open {os.fspath(path)!r}: {e.strerror}") from None
    return "qcow2" if head == MAGIC else "raw"


def open_image(path: str | os.PathLike, *, format: str = "auto", read_only: bool = False,
               cache: str | CacheMode = "writeback") -> BlockImage:
    """Open a disk image; a qcow2 image's backing chain is opened read-only with the same cache mode."""
    return _open(os.fspath(path), format, read_only, cache, ())


def _open(path: str, format: str, read_only: bool, cache, chain: tuple[str, ...]) -> BlockImage:
    chain = extend_chain(chain, path)
    if format == "auto":
        format = probe_format(path)
    if format == "raw":
        return RawImage.open(path, read_only=read_only, cache=cache)
    if format == "qcow2":
        def open_backing(backing_path: str, backing_format: str | None) -> BlockImage:
            return _open(backing_path, backing_format or "auto", True, cache, chain)
        return Qcow2Image.open(path, read_only=read_only, cache=cache, open_backing=open_backing)
    raise ImageError(f"unsupported image format {format!r} (pykvm knows {', '.join(FORMATS)})")


def create_image(path: str | os.PathLike, format: str, size: int | None = None, *,
                 backing_file: str | None = None, backing_format: str | None = None,
                 cluster_size: int = DEFAULT_CLUSTER_SIZE, compat: str = "1.1", refcount_bits: int = 16,
                 lazy_refcounts: bool = False) -> int:
    """Create an empty image and return its virtual size.

    With a backing file (qcow2 only) the size defaults to the backing file's
    and its format, when not given, is probed and recorded in the new image.
    """
    path = os.fspath(path)
    if format == "raw":
        if backing_file:
            raise ImageError("Backing file not supported for file format 'raw'")
        if size is None:
            raise ImageError("Image creation needs a size parameter")
        create_raw(path, size)
        return -(-size // 512) * 512
    if format != "qcow2":
        raise ImageError(f"unsupported image format {format!r} (pykvm knows {', '.join(FORMATS)})")
    if backing_file:
        backing_path = resolve_backing_path(path, backing_file)
        backing_format = backing_format or probe_format(backing_path)
        with open_image(backing_path, format=backing_format, read_only=True) as backing:
            size = backing.size if size is None else size
    if size is None:
        raise ImageError("Image creation needs a size parameter")
    create_qcow2(path, size, cluster_size=cluster_size, compat=compat, backing_file=backing_file,
                 backing_format=backing_format, refcount_bits=refcount_bits, lazy_refcounts=lazy_refcounts)
    return -(-size // 512) * 512
