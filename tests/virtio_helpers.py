"""Hostile virtqueues for the virtio tests: hypothesis strategies and the checks that go with them.

Shared by test_virtqueue, test_virtio_console (and any device test): rings a
hostile driver could lay out, guest memory with a gap to catch straddling
buffers, a recording wrapper that proves every device access was validated,
and a replay that proves every device write landed where the driver allowed.
"""

from __future__ import annotations

import struct

from hypothesis import strategies as st

from pykvm.memory import GuestMemory
from pykvm.virtio.mock_driver import AVAIL, DESC, USED, RingDriver
from pykvm.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

MEMORY_SIZE = 0x40000  # 256 KiB of guest RAM at guest-physical 0 (the `memory` fixture)
DATA = 0x10000  # buffers from here

GAP = 0x8000  # memory is two regions with an unmapped gap, to catch straddling buffers
REGION_A, REGION_B = (0, 0x8000), (0x10000, 0x8000)


class RecordingMemory:
    """GuestMemory wrapper that records any access outside guest memory.

    ``GuestMemory`` would refuse such an access anyway; recording it proves
    that the queue *validated* every guest address instead of relying on the
    memory layer's last line of defence.
    """

    def __init__(self, memory: GuestMemory) -> None:
        self.memory = memory
        self.violations: list[tuple[str, int, int]] = []
        self.writes: list[tuple[int, bytes]] = []  # every write, in order

    def is_mapped(self, gpa: int, size: int = 1) -> bool:
        return self.memory.is_mapped(gpa, size)

    def _check(self, kind: str, gpa: int, size: int) -> None:
        if not self.memory.is_mapped(gpa, size):
            self.violations.append((kind, gpa, size))

    def read(self, gpa: int, size: int) -> bytes:
        self._check("read", gpa, size)
        return self.memory.read(gpa, size)

    def write(self, gpa: int, data: bytes) -> None:
        self._check("write", gpa, len(data))
        self.writes.append((gpa, bytes(data)))
        self.memory.write(gpa, data)


@st.composite
def _mostly(draw, likely, unlikely):
    """``likely`` three times out of four: hostile, but often enough valid to go deep."""
    return draw(unlikely if draw(st.integers(0, 3)) == 3 else likely)


def _addresses():
    return _mostly(
        st.integers(REGION_B[0], REGION_B[0] + REGION_B[1] - 0x100),  # plausible buffers
        st.one_of(
            st.integers(0, REGION_A[1] - 1),  # over the rings and tables
            st.sampled_from([REGION_A[1] - 16, REGION_A[1] - 1, REGION_B[0] - 8, 0x17FF0]),
            st.integers(2**64 - 0x100, 2**64 - 1),
            st.integers(0, 2**64 - 1),
        ),
    )


def _lengths():
    return _mostly(st.integers(0, 64),
                   st.sampled_from([0x7FF0, 0x8000, 0xFFFFFFFF]) | st.integers(0, 2**32 - 1))


_FLAGS = [0, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT | VIRTQ_DESC_F_WRITE]


@st.composite
def _descriptors(draw, size: int):
    if draw(st.integers(0, 9)) == 0:  # an indirect descriptor, usually to the table at 0x5000
        addr = draw(_mostly(st.just(0x5000), _addresses()))
        length = draw(_mostly(st.sampled_from([16, 32, 48, 64]), _lengths()))
        flags = VIRTQ_DESC_F_INDIRECT | draw(st.sampled_from([0, 0, 0, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE]))
    else:
        addr, length = draw(_addresses()), draw(_lengths())
        flags = draw(_mostly(st.sampled_from(_FLAGS), st.integers(0, 0xFFFF)))
    nxt = draw(_mostly(st.integers(0, max(size, 4) - 1), st.integers(0, 0xFFFF)))
    return addr, length, flags, nxt


@st.composite
def hostile_rings(draw):
    size = draw(st.sampled_from([1, 2, 4, 8]))
    return {
        "size": size,
        "table": draw(st.lists(_descriptors(size), min_size=size, max_size=size)),
        "indirect": draw(st.lists(_descriptors(4), min_size=4, max_size=4)),  # a table at 0x5000
        "avail_idx": draw(_mostly(st.integers(1, size), st.integers(0, 0xFFFF))),
        "ring": draw(st.lists(_mostly(st.integers(0, size - 1), st.integers(0, 0xFFFF)),
                              min_size=size, max_size=size)),
        "used_event": draw(st.integers(0, 0xFFFF)),
        "event_idx": draw(st.booleans()),
        "indirect_ok": draw(_mostly(st.just(True), st.just(False))),
    }


INDIRECT_TABLE = 0x5000  # where hostile rings keep an indirect table of 4 entries


def write_hostile_ring(memory, spec, desc: int = DESC, avail: int = AVAIL, used: int = USED) -> RingDriver:
    """Lay out ``spec`` (from :func:`hostile_rings`) in guest memory."""
    driver = RingDriver(memory, spec["size"], desc, avail, used)
    for i, d in enumerate(spec["table"]):
        driver.write_desc(i, *d)
    for i, d in enumerate(spec["indirect"]):
        driver.write_desc(i, *d, table=INDIRECT_TABLE)
    for i, head in enumerate(spec["ring"]):
        memory.write(driver.avail + 4 + 2 * i, struct.pack("<H", head))
    memory.write(driver.avail + 2, struct.pack("<H", spec["avail_idx"]))
    driver.set_used_event(spec["used_event"])
    return driver


def hostile_memory() -> GuestMemory:
    memory = GuestMemory()
    memory.add_region(*REGION_A)
    memory.add_region(*REGION_B)
    return memory


def snapshot(memory: GuestMemory) -> dict[int, bytes]:
    """The bytes of every region, by base address."""
    return {r.gpa: memory.read(r.gpa, r.size) for r in memory.regions}


def check_writes(memory, before, writes, tables, used_rings) -> None:
    """Every device write went to a used ring or to a buffer a writable descriptor described.

    Replays ``writes`` (in order) on a copy of ``before``: at each write the
    allowed areas are recomputed from the descriptor ``tables`` [(addr,
    entries)] and the indirect table *as they were then* (a hostile driver
    may point a writable buffer at its own descriptors).  Finally the copy
    must equal guest memory: nothing else changed.
    """
    shadow = {base: bytearray(data) for base, data in before.items()}

    def locate(gpa: int) -> tuple[bytearray, int]:
        for base, data in shadow.items():
            if base <= gpa < base + len(data):
                return data, gpa - base
        raise AssertionError(f"write outside guest memory at {gpa:#x}")

    def allowed() -> list[tuple[int, int]]:
        areas = [(used, used + 6 + 8 * size) for used, size in used_rings]
        for table, entries in [*tables, (INDIRECT_TABLE, 4)]:
            data, offset = locate(table)
            for i in range(entries):
                addr, length, flags, _ = struct.unpack_from("<QIHH", data, offset + 16 * i)
                if flags & VIRTQ_DESC_F_WRITE and not flags & VIRTQ_DESC_F_INDIRECT:
                    areas.append((addr, addr + length))
        return areas

    for gpa, written in writes:
        size = len(written)
        assert any(lo <= gpa and gpa + size <= hi for lo, hi in allowed()), f"stray write {gpa:#x}+{size}"
        data, offset = locate(gpa)
        data[offset : offset + size] = written
    assert {base: bytes(data) for base, data in shadow.items()} == snapshot(memory)
