"""Creating empty qcow2 images (what ``qemu-img create -f qcow2`` writes).

The layout is QEMU's: the header in cluster 0, then the refcount table,
the refcount blocks covering the metadata, and a zeroed L1 table large
enough for the virtual size.  With one refcount block (every image under
a few terabytes with 64 KiB clusters) that is exactly QEMU's clusters 0-3.
"""

from __future__ import annotations

import os

from pykvm.block.qcow2.header import COMPAT_LAZY_REFCOUNTS, V2_HEADER_LENGTH, V3_CREATE_LENGTH, Header
from pykvm.block.qcow2.layout import MAX_CLUSTER_BITS, MAX_L1_BYTES, MIN_CLUSTER_BITS, pack_entries
from pykvm.block.qcow2.refcount import RefcountBlock
from pykvm.errors import ImageError

COMPAT_VERSIONS = {"0.10": 2, "v2": 2, "1.1": 3, "v3": 3}
DEFAULT_CLUSTER_SIZE = 65536


def create_qcow2(path: str | os.PathLike, size: int, *, cluster_size: int = DEFAULT_CLUSTER_SIZE,
                 compat: str = "1.1", backing_file: str | None = None, backing_format: str | None = None,
                 refcount_bits: int = 16, lazy_refcounts: bool = False) -> None:
    """Write a new, empty qcow2 image at ``path`` (replacing any file there).

    ``size`` is rounded up to a multiple of 512 bytes, as qemu-img does.
    ``backing_file`` is stored as given (a relative name is resolved against
    the image's directory when it is opened).
    """
    version = COMPAT_VERSIONS.get(compat)
    if version is None:
        raise ImageError(f"Invalid parameter '{compat}' for compat (0.10 or 1.1)")
    cluster_bits = cluster_size.bit_length() - 1
    if cluster_size != 1 << cluster_bits or not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise ImageError("Cluster size must be a power of two between 512 and 2048k")
    if refcount_bits < 1 or refcount_bits > 64 or refcount_bits & (refcount_bits - 1):
        raise ImageError("Refcount width must be a power of two and may not exceed 64 bits")
    if version == 2 and refcount_bits != 16:
        raise ImageError("Different refcount widths than 16 bits require compatibility level 1.1 or above "
                         "(use compat=1.1 or greater)")
    if version == 2 and lazy_refcounts:
        raise ImageError("Lazy refcounts only supported with compatibility level 1.1 and above "
                         "(use compat=1.1 or greater)")
    if size < 0:
        raise ImageError("Image size must not be negative")
    size = -(-size // 512) * 512
    l2_span = cluster_size * (cluster_size // 8)
    l1_size = -(-size // l2_span)
    if l1_size * 8 > MAX_L1_BYTES:
        raise ImageError("The image size is too large for this cluster size (the L1 table would exceed 32 MiB)")
    l1_clusters = max(1, -(-l1_size * 8 // cluster_size))
    refcount_order = refcount_bits.bit_length() - 1
    per_block = cluster_size * 8 // refcount_bits

    # Header, refcount table, refcount blocks, L1 table: as many blocks as cover all of them.
    table_clusters, blocks = 1, 1
    while True:
        total = 1 + table_clusters + blocks + l1_clusters
        need_blocks = -(-total // per_block)
        need_table = -(-need_blocks * 8 // cluster_size)
        if (need_blocks, need_table) == (blocks, table_clusters):
            break
        blocks, table_clusters = max(blocks, need_blocks), max(table_clusters, need_table)
    table_at = cluster_size
    blocks_at = table_at + table_clusters * cluster_size
    l1_at = blocks_at + blocks * cluster_size

    header = Header(version=version, cluster_bits=cluster_bits, size=size, l1_size=l1_size,
                    l1_table_offset=l1_at, refcount_table_offset=table_at,
                    refcount_table_clusters=table_clusters, refcount_order=refcount_order,
                    compatible_features=COMPAT_LAZY_REFCOUNTS if lazy_refcounts else 0,
                    header_length=V3_CREATE_LENGTH if version >= 3 else V2_HEADER_LENGTH,
                    backing_file=backing_file, backing_format=backing_format)
    table = [blocks_at + i * cluster_size for i in range(blocks)]
    table += [0] * (table_clusters * cluster_size // 8 - len(table))
    refcount_blocks = bytearray()
    for i in range(blocks):
        block = RefcountBlock.empty(cluster_size, refcount_order)
        for cluster in range(i * per_block, min((i + 1) * per_block, total)):
            block.set(cluster - i * per_block, 1)
        refcount_blocks += block.to_bytes()
    image = header.pack() + pack_entries(table) + refcount_blocks + bytes(l1_clusters * cluster_size)
    try:
        with open(path, "wb") as f:
            f.write(image)
    except OSError as e:
        raise ImageError(f"could not create {os.fspath(path)!r}: {e.strerror}") from None
