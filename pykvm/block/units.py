"""Sizes as qemu-img reads and prints them (QEMU's ``qemu_strtosz`` and ``size_to_str``)."""

from __future__ import annotations

import math
import re

_SUFFIXES = "BKMGTPE"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([BbKkMmGgTtPpEe]?)\s*$")


def parse_size(text: str) -> int:
    """``"64M"`` -> 67108864: bytes, or K, M, G, T, P, E (powers of 1024, either case; a fraction needs a suffix)."""
    match = _SIZE.match(text)
    if not match:
        raise ValueError(f"invalid size {text!r}")
    number, suffix = match.groups()
    scale = 1 << (10 * _SUFFIXES.index(suffix.upper())) if suffix else 1
    if "." in number:
        if scale == 1:
            raise ValueError(f"invalid size {text!r}: a fraction needs a suffix")
        value = int(float(number) * scale)
    else:
        value = int(number) * scale
    if value >= 1 << 63:
        raise ValueError(f"size {text!r} too large")
    return value


def size_to_str(value: int) -> str:
    """``1073741824`` -> ``"1 GiB"``: three significant digits, switching unit at 1000 (QEMU's size_to_str)."""
    suffixes = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
    _, exponent = math.frexp(value / (1000.0 / 1024.0))
    index = int((exponent - 1) / 10)  # C's division, which truncates toward zero
    return "%0.3g %sB" % (value / (1 << (10 * index)), suffixes[index])
