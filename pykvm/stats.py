"""KVM's binary statistics (KVM_GET_STATS_FD, api.rst section 4.133).

A stats fd starts with ``struct kvm_stats_header``; it points at an id
string, an array of ``struct kvm_stats_desc`` (each followed by its name) and
a data block of u64 values.  Descriptors never change for the life of the
fd, so they are parsed once; ``read()`` re-reads only the data block.
"""

from __future__ import annotations

import functools
import os
import struct
from dataclasses import dataclass

from pykvm._native_loader import ffi, lib
from pykvm.fdowner import FdOwner

_TYPE_NAMES = {
    lib.KVM_STATS_TYPE_CUMULATIVE: "cumulative",
    lib.KVM_STATS_TYPE_INSTANT: "instant",
    lib.KVM_STATS_TYPE_PEAK: "peak",
    lib.KVM_STATS_TYPE_LINEAR_HIST: "linear_hist",
    lib.KVM_STATS_TYPE_LOG_HIST: "log_hist",
}
_UNIT_NAMES = {
    lib.KVM_STATS_UNIT_NONE: "",
    lib.KVM_STATS_UNIT_BYTES: "bytes",
    lib.KVM_STATS_UNIT_SECONDS: "seconds",
    lib.KVM_STATS_UNIT_CYCLES: "cycles",
    lib.KVM_STATS_UNIT_BOOLEAN: "boolean",
}


@dataclass(frozen=True)
class StatDescriptor:
    """One ``struct kvm_stats_desc``: what a value (or histogram) means."""

    name: str
    type: str          # cumulative, instant, peak, linear_hist, log_hist
    unit: str          # "", bytes, seconds, cycles, boolean
    base: int          # 10 or 2
    exponent: int      # value * base**exponent is in ``unit``
    size: int          # number of u64 items (1, or histogram buckets)
    offset: int        # into the data block
    bucket_size: int   # linear histograms only

    @property
    def is_histogram(self) -> bool:
        return self.type.endswith("hist")


class StatsFd(FdOwner):
    """Owner of a stats fd: parses descriptors once, reads values on demand."""

    def __init__(self, fd: int, owner: str = "") -> None:
        self._fd = fd
        self.owner = owner
        header = os.pread(fd, ffi.sizeof("struct kvm_stats_header"), 0)
        hdr = ffi.from_buffer("struct kvm_stats_header *", bytearray(header))
        self.id = os.pread(fd, hdr.name_size, hdr.id_offset).split(b"\0", 1)[0].decode()
        desc_size = ffi.sizeof("struct kvm_stats_desc") + hdr.name_size
        raw = os.pread(fd, desc_size * hdr.num_desc, hdr.desc_offset)
        self.descriptors: list[StatDescriptor] = list(_parse_descriptors(raw, desc_size))
        self._data_offset = hdr.data_offset
        # (name, first u64, count, list?) for read(): computed once.
        self._layout = [(d.name, d.offset // 8, d.size, d.is_histogram or d.size > 1) for d in self.descriptors]
        self._data_size = 8 * max((d.offset // 8 + d.size for d in self.descriptors), default=0)

    def read(self) -> dict[str, int | list[int]]:
        """Current values: an int per counter, a list of buckets per histogram."""
        data = os.pread(self._fd, self._data_size, self._data_offset)
        items = struct.unpack(f"<{len(data) // 8}Q", data)
        values: dict[str, int | list[int]] = {}
        for name, first, size, as_list in self._layout:
            values[name] = list(items[first:first + size]) if as_list else items[first]
        return values


@functools.lru_cache(maxsize=8)
def _parse_descriptors(raw: bytes, desc_size: int) -> tuple[StatDescriptor, ...]:
    """Every descriptor of a block; cached, since every vCPU of a kernel has the same block."""
    return tuple(_parse_descriptor(raw[i:i + desc_size]) for i in range(0, len(raw), desc_size))


def _parse_descriptor(raw: bytes) -> StatDescriptor:
    flags, exponent, size, offset, bucket_size = struct.unpack_from("<IhHII", raw, 0)
    name = raw[ffi.sizeof("struct kvm_stats_desc"):].split(b"\0", 1)[0].decode()
    base = 2 if (flags & lib.KVM_STATS_BASE_MASK) == lib.KVM_STATS_BASE_POW2 else 10
    return StatDescriptor(
        name=name,
        type=_TYPE_NAMES.get(flags & lib.KVM_STATS_TYPE_MASK, "unknown"),
        unit=_UNIT_NAMES.get(flags & lib.KVM_STATS_UNIT_MASK, "unknown"),
        base=base,
        exponent=exponent,
        size=size,
        offset=offset,
        bucket_size=bucket_size,
    )
