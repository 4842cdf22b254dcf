"""The qcow2 header, its extensions and feature bits (QEMU docs/interop/qcow2.txt, "Header").

:func:`parse_header` validates everything the header alone can say wrong
(magic, version, cluster size, encryption, feature bits, extension area);
the tables it points to are checked by the image when it opens them.
:meth:`Header.pack` builds the first cluster of a new image.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pykvm.block.qcow2.layout import MAX_CLUSTER_BITS, MIN_CLUSTER_BITS
from pykvm.errors import ImageError

MAGIC = b"QFI\xfb"

_V2 = struct.Struct(">4sIQIIQIIQQIIQ")   # bytes 0-71
_V3 = struct.Struct(">QQQII")            # bytes 72-103
V2_HEADER_LENGTH = _V2.size              # 72
V3_HEADER_LENGTH = _V2.size + _V3.size   # 104
#: What QEMU 7.2 writes: the v3 header plus the compression_type byte, padded to 8.
V3_CREATE_LENGTH = 112

# Byte offsets of the fields pykvm updates in place.
REFCOUNT_TABLE_FIELD = 48                # refcount_table_offset (u64) + refcount_table_clusters (u32)
INCOMPATIBLE_FIELD = 72
AUTOCLEAR_FIELD = 88

# Header extension types.
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_CRYPTO = 0x0537BE77
EXT_DATA_FILE = 0x44415441
_KNOWN_EXTENSIONS = {EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, EXT_BITMAPS, EXT_CRYPTO, EXT_DATA_FILE}

# Feature bits.
INCOMPAT_DIRTY = 1 << 0
INCOMPAT_CORRUPT = 1 << 1
COMPAT_LAZY_REFCOUNTS = 1 << 0
#: Incompatible features pykvm can open images with (it handles both bits itself).
SUPPORTED_INCOMPATIBLE = INCOMPAT_DIRTY | INCOMPAT_CORRUPT

INCOMPATIBLE, COMPATIBLE, AUTOCLEAR = 0, 1, 2
#: The names QEMU writes in its feature name table (and shows for images without one).
KNOWN_FEATURES = {
    (INCOMPATIBLE, 0): "dirty bit",
    (INCOMPATIBLE, 1): "corrupt bit",
    (INCOMPATIBLE, 2): "external data file",
    (INCOMPATIBLE, 3): "compression type",
    (INCOMPATIBLE, 4): "extended L2 entries",
    (COMPATIBLE, 0): "lazy refcounts",
    (AUTOCLEAR, 0): "bitmaps",
    (AUTOCLEAR, 1): "raw external data",
}
_FEATURE_ENTRY = struct.Struct(">BB46s")


@dataclass
class Header:
    """A parsed qcow2 header (field names as in the spec)."""

    version: int
    cluster_bits: int
    size: int
    l1_size: int
    l1_table_offset: int
    refcount_table_offset: int
    refcount_table_clusters: int
    nb_snapshots: int = 0
    snapshots_offset: int = 0
    backing_file_offset: int = 0
    backing_file_size: int = 0
    crypt_method: int = 0
    incompatible_features: int = 0
    compatible_features: int = 0
    autoclear_features: int = 0
    refcount_order: int = 4
    header_length: int = V3_CREATE_LENGTH
    compression_type: int = 0
    backing_file: str | None = None
    backing_format: str | None = None
    #: (type, bit) -> name, from the image's feature name table.
    feature_names: dict[tuple[int, int], str] = field(default_factory=dict)
    #: Every extension as found, (type, data), unknown ones included.
    extensions: list[tuple[int, bytes]] = field(default_factory=list)

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def refcount_bits(self) -> int:
        return 1 << self.refcount_order

    @property
    def compat(self) -> str:
        """The ``compat=`` spelling of the version, as qemu-img shows it."""
        return "0.10" if self.version == 2 else "1.1"

    def feature_name(self, kind: int, bit: int) -> str:
        """The image's own name for a feature bit, else QEMU's, else ``"bit N"``."""
        return self.feature_names.get((kind, bit)) or KNOWN_FEATURES.get((kind, bit)) or "unknown feature"

    def pack(self) -> bytes:
        """The first cluster of an image with this header: fields, extensions, backing file name."""
        out = bytearray(self.cluster_size)
        backing = (self.backing_file or "").encode()
        fields = _V2.pack(MAGIC, self.version, 0, len(backing), self.cluster_bits, self.size,
                          self.crypt_method, self.l1_size, self.l1_table_offset,
                          self.refcount_table_offset, self.refcount_table_clusters,
                          self.nb_snapshots, self.snapshots_offset)
        if self.version >= 3:
            fields += _V3.pack(self.incompatible_features, self.compatible_features,
                               self.autoclear_features, self.refcount_order, self.header_length)
            fields += bytes([self.compression_type]).ljust(self.header_length - len(fields), b"\0")
        out[:len(fields)] = fields
        position = len(fields)
        for kind, data in self._extensions_to_write():
            record = struct.pack(">II", kind, len(data)) + data
            record += bytes(-len(record) % 8)
            out[position:position + len(record)] = record
            position += len(record)
        position += 8  # the end-of-extensions marker: type 0, length 0
        if backing:
            if position + len(backing) > self.cluster_size:
                raise ImageError("the backing file name does not fit in the header cluster")
            out[position:position + len(backing)] = backing
            struct.pack_into(">QI", out, 8, position, len(backing))
        return bytes(out)

    def _extensions_to_write(self) -> list[tuple[int, bytes]]:
        extensions = []
        if self.backing_format:
            extensions.append((EXT_BACKING_FORMAT, self.backing_format.encode()))
        table = b"".join(_FEATURE_ENTRY.pack(kind, bit, name.encode()) for (kind, bit), name in KNOWN_FEATURES.items())
        used = (self.header_length + sum(8 + len(data) + -len(data) % 8 for _, data in extensions)
                + 8 + len(table) + 8 + len((self.backing_file or "").encode()))
        if self.version >= 3 and used <= self.cluster_size:
            # The feature name table is optional: small clusters go without, as with QEMU.
            extensions.append((EXT_FEATURE_TABLE, table))
        return extensions


def read_header(file) -> Header:
    """Read and parse the header of an open image file (a :class:`~pykvm.block.hostfile.HostFile`)."""
    head = file.pread(0, V3_CREATE_LENGTH)
    cluster_bits = struct.unpack_from(">I", head, 20)[0] if len(head) >= 24 else 0
    if MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        head = file.pread(0, 1 << cluster_bits)
    return parse_header(head)


def parse_header(data: bytes) -> Header:
    """Parse and validate the start of an image (at least its first cluster, or the whole file if shorter)."""
    if len(data) < V2_HEADER_LENGTH:
        raise ImageError(f"too short to be a qcow2 image ({len(data)} bytes)")
    (magic, version, backing_offset, backing_size, cluster_bits, size, crypt_method, l1_size,
     l1_offset, reftable_offset, reftable_clusters, nb_snapshots, snapshots_offset) = _V2.unpack_from(data)
    if magic != MAGIC:
        raise ImageError("not a qcow2 image (bad magic)")
    if version not in (2, 3):
        raise ImageError(f"unsupported qcow2 version {version} (pykvm reads versions 2 and 3)")
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise ImageError(f"cluster_bits {cluster_bits} out of range "
                         f"({MIN_CLUSTER_BITS}..{MAX_CLUSTER_BITS}: 512 bytes to 2 MiB)")
    cluster_size = 1 << cluster_bits
    header = Header(version=version, cluster_bits=cluster_bits, size=size, l1_size=l1_size,
                    l1_table_offset=l1_offset, refcount_table_offset=reftable_offset,
                    refcount_table_clusters=reftable_clusters, nb_snapshots=nb_snapshots,
                    snapshots_offset=snapshots_offset, backing_file_offset=backing_offset,
                    backing_file_size=backing_size, crypt_method=crypt_method,
                    header_length=V2_HEADER_LENGTH)
    if version >= 3:
        if len(data) < V3_HEADER_LENGTH:
            raise ImageError("truncated version 3 header")
        (header.incompatible_features, header.compatible_features, header.autoclear_features,
         header.refcount_order, header.header_length) = _V3.unpack_from(data, V2_HEADER_LENGTH)
        if (header.header_length < V3_HEADER_LENGTH or header.header_length % 8
                or header.header_length > min(cluster_size, len(data))):
            raise ImageError(f"invalid header_length {header.header_length}")
        if header.header_length > V3_HEADER_LENGTH:
            header.compression_type = data[V3_HEADER_LENGTH]
    if header.refcount_order > 6:
        raise ImageError(f"refcount_order {header.refcount_order} out of range (at most 6: 64-bit refcounts)")
    if crypt_method != 0:
        raise ImageError(f"encrypted qcow2 images are not supported (crypt_method {crypt_method})")
    if size >= 1 << 63:
        raise ImageError(f"virtual size {size:#x} too large")
    _parse_extensions(header, data)
    _check_incompatible_features(header)
    if header.compression_type != 0:
        raise ImageError(f"compression_type {header.compression_type} is set without its incompatible bit")
    if backing_offset:
        if backing_size > 1023 or backing_offset + backing_size > min(cluster_size, len(data)):
            raise ImageError(f"backing file name at {backing_offset:#x} (+{backing_size}) "
                             f"does not lie in the header cluster")
        try:
            header.backing_file = data[backing_offset:backing_offset + backing_size].decode()
        except UnicodeDecodeError:
            raise ImageError("the backing file name is not valid UTF-8") from None
    return header


def _parse_extensions(header: Header, data: bytes) -> None:
    # The extension area runs from the header's end to the backing file name
    # (or the end of the first cluster).
    end = min(header.backing_file_offset or header.cluster_size, header.cluster_size, len(data))
    position = header.header_length
    seen = set()
    while position + 8 <= end:
        kind, length = struct.unpack_from(">II", data, position)
        if kind == EXT_END:
            return
        start = position + 8
        if start + length > end:
            raise ImageError(f"header extension {kind:#010x} at {position:#x} runs past the header area")
        payload = bytes(data[start:start + length])
        if kind in seen and kind in _KNOWN_EXTENSIONS:
            raise ImageError(f"header extension {kind:#010x} appears twice")
        seen.add(kind)
        header.extensions.append((kind, payload))
        if kind == EXT_BACKING_FORMAT:
            header.backing_format = payload.decode(errors="replace")
        elif kind == EXT_FEATURE_TABLE:
            for offset in range(0, length - length % _FEATURE_ENTRY.size, _FEATURE_ENTRY.size):
                feature_kind, bit, name = _FEATURE_ENTRY.unpack_from(payload, offset)
                header.feature_names[(feature_kind, bit)] = name.rstrip(b"\0").decode(errors="replace")
        # Other extensions (bitmaps, unknown ones) are kept as they are: pykvm never rewrites this area.
        position = start + length + (-length % 8)


def _check_incompatible_features(header: Header) -> None:
    unsupported = header.incompatible_features & ~SUPPORTED_INCOMPATIBLE
    if unsupported:
        names = [f"{header.feature_name(INCOMPATIBLE, bit)} (bit {bit})"
                 for bit in range(64) if unsupported >> bit & 1]
        raise ImageError(f"unsupported incompatible qcow2 features: {', '.join(names)}")
