"""The plan the fuzz64u guest follows (guests/fuzz.c): which ranges to hit, how, and where to stop.

Pure data: a list of :class:`Target` -- a port or MMIO range, whether the
guest may write and read it, and optionally the range its written values
are drawn from (a virtio address register gets addresses in a scratch area,
so a device never writes over the fuzzer's own code) -- packed at
``PLAN_ADDR`` with the seed, the number of accesses and the exit port.
The guest writes back how many accesses it made and the XOR of what it read.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

PLAN_ADDR = 0x300000
MAGIC = b"PYKVFUZZ"
MAX_TARGETS = 256
MAY_WRITE, MAY_READ = 1, 2

_HEADER = struct.Struct("<8sQQQQQQQ")  # magic, seed, count, ntargets, exit_port, exit_value, done, answers
_TARGET = struct.Struct("<IIQQQQ")  # kind, flags, base, length, value_min, value_span


@dataclass(frozen=True)
class Target:
    """One range the guest hits: ``kind`` "pio" or "mmio"; ``flags`` MAY_WRITE | MAY_READ."""

    kind: str
    base: int
    length: int
    flags: int = MAY_WRITE | MAY_READ
    value_min: int = 0
    value_span: int = 0  # 0: any value
    what: str = ""

    def pack(self) -> bytes:
        return _TARGET.pack(0 if self.kind == "pio" else 1, self.flags, self.base, self.length,
                            self.value_min, self.value_span)


def build_plan(targets: list[Target], *, seed: int, count: int, exit_port: int, exit_value: int) -> bytes:
    """The bytes to write at PLAN_ADDR."""
    if not 0 < len(targets) <= MAX_TARGETS:
        raise ValueError(f"a plan holds 1 to {MAX_TARGETS} targets, not {len(targets)}")
    for t in targets:
        if t.length <= 0 or (t.kind == "pio" and t.base + t.length > 0x10000):
            raise ValueError(f"bad target {t}")
    header = _HEADER.pack(MAGIC, seed & (2**64 - 1), count, len(targets), exit_port, exit_value, 0, 0)
    return header + b"".join(t.pack() for t in targets)


def results(plan_bytes: bytes) -> tuple[int, int]:
    """``(accesses made, XOR of the values read)`` from the plan as the guest left it."""
    fields = _HEADER.unpack_from(plan_bytes)
    return fields[6], fields[7]


def free_ranges(start: int, end: int, taken: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``(base, length)`` pieces of ``[start, end)`` outside every ``(base, length)`` in ``taken``."""
    pieces, at = [], start
    for base, length in sorted(taken):
        if base > at:
            pieces.append((at, min(base, end) - at))
        at = max(at, base + length)
        if at >= end:
            break
    if at < end:
        pieces.append((at, end - at))
    return [(b, n) for b, n in pieces if n > 0]
