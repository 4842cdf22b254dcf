"""Backing files: where a backing file name points, and how deep a chain may go.

A qcow2 image names its backing file as a string in its header.  As in
QEMU (``bdrv_get_full_backing_filename``), a relative name is relative to
the directory of the image that names it, not to the current directory.
Chains are followed read-only, at most :data:`MAX_BACKING_DEPTH` images
deep, and an image that appears twice in its own chain is refused.
"""

from __future__ import annotations

import os
import re

from pykvm.errors import ImageError

MAX_BACKING_DEPTH = 16
_PROTOCOL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def resolve_backing_path(image_path: str, backing_name: str) -> str:
    """The path a backing file name means, seen from the image at ``image_path``."""
    if _PROTOCOL.match(backing_name) and not os.path.exists(backing_name):
        raise ImageError(f"backing file {backing_name!r} names a protocol pykvm does not support")
    if os.path.isabs(backing_name):
        return backing_name
    return os.path.join(os.path.dirname(image_path), backing_name)


def extend_chain(chain: tuple[str, ...], path: str) -> tuple[str, ...]:
    """``chain`` (the images opened so far, top first) with ``path`` below it; refuses loops and deep chains."""
    real = os.path.realpath(path)
    if real in chain:
        raise ImageError(f"backing file loop: {path} is its own backing file (through {len(chain)} images)")
    if len(chain) > MAX_BACKING_DEPTH:
        raise ImageError(f"backing chain deeper than {MAX_BACKING_DEPTH} images at {path}")
    return chain + (real,)
