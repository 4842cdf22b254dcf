"""Split virtqueues (virtio spec 2.7), driven by a driver written in Python.

:class:`RingDriver` is the guest's side of one queue: it writes descriptors
and the available ring into real guest memory (``GuestMemory(vm=None)``)
and reads the used ring, as Linux's ``virtio_ring.c`` does.  The other
virtio tests import it.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm.errors import GuestMemoryError
from pykvm.memory import GuestMemory
from pykvm.virtio.queue import (
    MAX_CHAIN_BYTES,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    SplitVirtqueue,
    VirtqueueError,
)

MEMORY_SIZE = 0x40000  # 256 KiB of guest RAM at guest-physical 0
DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000  # ring areas used by most tests
DATA = 0x10000  # buffers from here


class RingDriver:
    """The driver's side of a split virtqueue (2.7.13, 2.7.14)."""

    def __init__(self, memory, size: int, desc: int = DESC, avail: int = AVAIL, used: int = USED) -> None:
        self.memory, self.size = memory, size
        self.desc, self.avail, self.used = desc, avail, used
        self.avail_idx = 0  # our avail.idx
        self.last_used = 0  # used elements consumed
        self.free = list(range(size))
        # A driver zeroes its rings before handing them over (4.2.3.2 step 4).
        memory.write(desc, bytes(16 * size))
        memory.write(avail, bytes(6 + 2 * size))
        memory.write(used, bytes(6 + 8 * size))

    def write_desc(self, index: int, addr: int, length: int, flags: int = 0, next: int = 0,
                   table: int | None = None) -> None:
        """Store descriptor ``index`` of the descriptor table (or of an indirect ``table``)."""
        base = self.desc if table is None else table
        self.memory.write(base + 16 * index, struct.pack("<QIHH", addr, length, flags, next))

    def publish(self, head: int) -> None:
        """Make the chain at ``head`` available: ring entry first, then idx."""
        slot = self.avail + 4 + 2 * (self.avail_idx % self.size)
        self.memory.write(slot, struct.pack("<H", head))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write(self.avail + 2, struct.pack("<H", self.avail_idx))

    def add(self, segments: Sequence[tuple[int, int, bool]]) -> int:
        """Chain ``(addr, length, writable)`` segments in the table and publish the chain."""
        indices = [self.free.pop(0) for _ in segments]
        for i, (index, (addr, length, writable)) in enumerate(zip(indices, segments)):
            last = i == len(segments) - 1
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.write_desc(index, addr, length, flags, 0 if last else indices[i + 1])
        self.publish(indices[0])
        return indices[0]

    def add_indirect(self, table: int, segments: Sequence[tuple[int, int, bool]]) -> int:
        """Publish one descriptor pointing at an indirect table holding ``segments``."""
        for i, (addr, length, writable) in enumerate(segments):
            last = i == len(segments) - 1
            flags = (VIRTQ_DESC_F_WRITE if writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.write_desc(i, addr, length, flags, 0 if last else i + 1, table=table)
        head = self.free.pop(0)
        self.write_desc(head, table, 16 * len(segments), VIRTQ_DESC_F_INDIRECT)
        self.publish(head)
        return head

    def take_used(self) -> list[tuple[int, int]]:
        """The (id, len) elements the device returned since the last call."""
        used_idx = struct.unpack("<H", self.memory.read(self.used + 2, 2))[0]
        out = []
        while self.last_used != used_idx:
            slot = self.used + 4 + 8 * (self.last_used % self.size)
            head, length = struct.unpack("<II", self.memory.read(slot, 8))
            out.append((head, length))
            self.free.extend(self._chain_indices(head))
            self.last_used = (self.last_used + 1) & 0xFFFF
        return out

    def _chain_indices(self, head: int) -> Iterator[int]:
        index = head
        while True:
            yield index
            _, _, flags, nxt = struct.unpack("<QIHH", self.memory.read(self.desc + 16 * index, 16))
            if not flags & VIRTQ_DESC_F_NEXT:
                return
            index = nxt

    @property
    def used_idx(self) -> int:
        return struct.unpack("<H", self.memory.read(self.used + 2, 2))[0]

    @property
    def avail_event(self) -> int:
        """What the device asked for, after the used ring (2.7.10)."""
        return struct.unpack("<H", self.memory.read(self.used + 4 + 8 * self.size, 2))[0]

    def set_used_event(self, value: int) -> None:
        """Ask for a notification when used.idx passes ``value`` (2.7.7)."""
        self.memory.write(self.avail + 4 + 2 * self.size, struct.pack("<H", value))

    def set_avail_flags(self, flags: int) -> None:
        self.memory.write(self.avail, struct.pack("<H", flags))


@pytest.fixture
def memory() -> Iterator[GuestMemory]:
    mem = GuestMemory()
    mem.add_region(0, MEMORY_SIZE)
    yield mem
    mem.close()


def make_queue(memory, size: int = 8, **features) -> tuple[SplitVirtqueue, RingDriver]:
    queue = SplitVirtqueue(memory, max_size=size, index=0)
    driver = RingDriver(memory, size)
    queue.size, queue.desc_addr, queue.driver_addr, queue.device_addr = size, DESC, AVAIL, USED
    queue.enable(**features)
    return queue, driver


# -- layout ---------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 3, 12, 16])
def test_queue_size_must_be_a_power_of_two_within_max(memory, size):
    queue = SplitVirtqueue(memory, max_size=8)
    queue.size, queue.desc_addr, queue.driver_addr, queue.device_addr = size, DESC, AVAIL, USED
    with pytest.raises(VirtqueueError):
        queue.enable()
    assert not queue.ready


@pytest.mark.parametrize("area, addr", [
    ("desc_addr", DESC + 8),  # descriptors: 16-byte alignment
    ("driver_addr", AVAIL + 1),  # available ring: 2
    ("device_addr", USED + 2),  # used ring: 4
    ("desc_addr", MEMORY_SIZE - 16),  # table runs past the end of memory
    ("device_addr", 0xFFFF_FFFF_FFFF_FFF0),
])
def test_ring_areas_are_aligned_and_inside_memory(memory, area, addr):
    queue = SplitVirtqueue(memory, max_size=8)
    queue.desc_addr, queue.driver_addr, queue.device_addr = DESC, AVAIL, USED
    setattr(queue, area, addr)
    with pytest.raises(VirtqueueError):
        queue.enable()
    assert not queue.ready


def test_max_size_is_checked_by_the_host():
    with pytest.raises(ValueError):
        SplitVirtqueue(None, max_size=3)  # type: ignore[arg-type]


# -- popping and pushing ----------------------------------------------------------


def test_pop_nothing_when_the_ring_is_empty(memory):
    queue, _ = make_queue(memory)
    assert queue.pop() is None and not queue.has_available()


def test_no_access_while_not_ready(memory):
    queue, driver = make_queue(memory)
    driver.add([(DATA, 4, False)])
    queue.disable()
    assert queue.pop() is None and not queue.has_available()


def test_chain_of_readable_then_writable(memory):
    queue, driver = make_queue(memory)
    memory.write(DATA, b"hello ")
    memory.write(DATA + 0x100, b"world")
    head = driver.add([(DATA, 6, False), (DATA + 0x100, 5, False), (DATA + 0x200, 8, True), (DATA + 0x300, 8, True)])
    chain = queue.pop()
    assert chain is not None and chain.head == head
    assert chain.read() == b"hello world" and chain.read(7) == b"hello w"
    assert b"".join(chain.iter_readable(chunk=4)) == b"hello world"
    assert (chain.readable_length, chain.writable_length) == (11, 16)
    assert chain.write(b"0123456789ABCDEFXYZ") == 16  # truncated to the room
    assert memory.read(DATA + 0x200, 8) == b"01234567" and memory.read(DATA + 0x300, 8) == b"89ABCDEF"
    queue.push(chain, 16)
    assert driver.take_used() == [(head, 16)]
    assert queue.pop() is None


def test_ring_indices_wrap_around_2_16(memory):
    queue, driver = make_queue(memory, size=4)
    # Start both sides just below 2**16, as after 65530 buffers.
    start = 0xFFFA
    driver.avail_idx = driver.last_used = queue.last_avail_idx = queue.used_idx = start
    memory.write(AVAIL + 2, struct.pack("<H", start))
    memory.write(USED + 2, struct.pack("<H", start))
    for _ in range(5):
        heads = [driver.add([(DATA + i * 16, 16, True)]) for i in range(3)]
        for expected in heads:
            chain = queue.pop()
            assert chain.head == expected
            queue.push(chain, 1)
        assert [h for h, _ in driver.take_used()] == heads
    assert driver.avail_idx == queue.last_avail_idx == queue.used_idx == (start + 15) & 0xFFFF == 9


def test_indirect_table(memory):
    queue, driver = make_queue(memory, indirect=True)
    memory.write(DATA, b"request")
    head = driver.add_indirect(0x5000, [(DATA, 7, False), (DATA + 0x100, 4, True), (DATA + 0x200, 4, True)])
    chain = queue.pop()
    assert chain.head == head and chain.read() == b"request" and chain.writable_length == 8


def test_direct_descriptors_then_an_indirect_one(memory):
    # 2.7.5.3.1: zero or more chained descriptors followed by one INDIRECT descriptor.
    queue, driver = make_queue(memory, indirect=True)
    driver.write_desc(0, DATA, 3, VIRTQ_DESC_F_NEXT, 1)
    driver.write_desc(1, 0x5000, 16, VIRTQ_DESC_F_INDIRECT)
    driver.write_desc(0, DATA + 0x40, 5, VIRTQ_DESC_F_WRITE, table=0x5000)
    driver.publish(0)
    chain = queue.pop()
    assert chain.readable_length == 3 and chain.writable_length == 5


def test_indirect_longer_than_a_small_ring_is_accepted(memory):
    # Bounded by the table's own size, as QEMU does (Linux relies on it).
    queue, driver = make_queue(memory, size=2, indirect=True)
    driver.add_indirect(0x5000, [(DATA + 16 * i, 16, False) for i in range(10)])
    assert queue.pop().readable_length == 160


def _bad_chain_cases():
    """(description, function that writes a bad chain through the driver)."""
    def indirect_not_negotiated(d):
        d.add_indirect(0x5000, [(DATA, 4, False)])

    def nested_indirect(d):
        d.write_desc(0, 0x6000, 16, VIRTQ_DESC_F_INDIRECT, table=0x5000)
        d.write_desc(0, 0x5000, 16, VIRTQ_DESC_F_INDIRECT)
        d.publish(0)

    def indirect_and_next(d):
        d.write_desc(0, 0x5000, 16, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1)
        d.publish(0)

    def indirect_bad_length(d):
        d.write_desc(0, 0x5000, 24, VIRTQ_DESC_F_INDIRECT)
        d.publish(0)

    def indirect_empty(d):
        d.write_desc(0, 0x5000, 0, VIRTQ_DESC_F_INDIRECT)
        d.publish(0)

    def indirect_outside_memory(d):
        d.write_desc(0, MEMORY_SIZE - 16, 32, VIRTQ_DESC_F_INDIRECT)
        d.publish(0)

    def indirect_next_out_of_table(d):
        d.write_desc(0, DATA, 4, VIRTQ_DESC_F_NEXT, 2, table=0x5000)
        d.write_desc(0, 0x5000, 32, VIRTQ_DESC_F_INDIRECT)
        d.publish(0)

    def indirect_loop(d):
        d.write_desc(0, DATA, 4, VIRTQ_DESC_F_NEXT, 1, table=0x5000)
        d.write_desc(1, DATA, 4, VIRTQ_DESC_F_NEXT, 0, table=0x5000)
        d.write_desc(0, 0x5000, 32, VIRTQ_DESC_F_INDIRECT)
        d.publish(0)

    def loop(d):
        d.write_desc(0, DATA, 4, VIRTQ_DESC_F_NEXT, 1)
        d.write_desc(1, DATA, 4, VIRTQ_DESC_F_NEXT, 0)
        d.publish(0)

    def self_loop(d):
        d.write_desc(3, DATA, 4, VIRTQ_DESC_F_NEXT, 3)
        d.publish(3)

    def next_out_of_range(d):
        d.write_desc(0, DATA, 4, VIRTQ_DESC_F_NEXT, 8)
        d.publish(0)

    def head_out_of_range(d):
        d.publish(8)

    def buffer_outside_memory(d):
        d.add([(MEMORY_SIZE - 4, 8, False)])

    def buffer_near_2_64(d):
        d.add([(0xFFFF_FFFF_FFFF_FFF0, 0x20, True)])

    def huge_length(d):
        d.add([(DATA, 0xFFFF_FFFF, True)])

    def readable_after_writable(d):
        d.add([(DATA, 4, True), (DATA + 16, 4, False)])

    def avail_idx_too_far(d):
        d.memory.write(d.avail + 2, struct.pack("<H", 9))  # 9 chains in a ring of 8

    return [(f.__name__, f) for f in (
        indirect_not_negotiated, nested_indirect, indirect_and_next, indirect_bad_length, indirect_empty,
        indirect_outside_memory, indirect_next_out_of_table, indirect_loop, loop, self_loop,
        next_out_of_range, head_out_of_range, buffer_outside_memory, buffer_near_2_64, huge_length,
        readable_after_writable, avail_idx_too_far,
    )]


@pytest.mark.parametrize("name, build", _bad_chain_cases())
def test_bad_chains_raise_virtqueue_error(memory, name, build):
    queue, driver = make_queue(memory, indirect=(name != "indirect_not_negotiated"))
    build(driver)
    with pytest.raises(VirtqueueError):
        queue.pop()


def test_chain_total_is_bounded_by_2_32(memory):
    big = 0x10000000  # 256 MiB per descriptor: needs memory that large, so fake is_mapped
    queue, driver = make_queue(memory, size=32)

    class Huge:
        def __getattr__(self, name):
            return getattr(memory, name)

        def is_mapped(self, gpa, size=1):
            return True

    queue.memory = Huge()
    driver.add([(0, big, False)] * 17)  # 17 * 2**28 > 2**32
    with pytest.raises(VirtqueueError, match="2\\*\\*32"):
        queue.pop()
    assert 16 * big == MAX_CHAIN_BYTES


def test_memory_vanishing_later_is_a_virtqueue_error(memory):
    queue, driver = make_queue(memory)
    driver.add([(DATA, 4, True)])
    chain = queue.pop()
    memory.close()  # the host unmapped guest memory behind the device's back
    with pytest.raises(VirtqueueError):
        chain.write(b"late")


# -- notification suppression ----------------------------------------------------------


def test_no_interrupt_flag_without_event_idx(memory):
    queue, driver = make_queue(memory)
    driver.add([(DATA, 4, True)])
    queue.push(queue.pop(), 0)
    assert queue.needs_notification()
    assert not queue.needs_notification()  # nothing new pushed since
    driver.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    driver.add([(DATA, 4, True)])
    queue.push(queue.pop(), 0)
    assert not queue.needs_notification()


def test_used_event_with_event_idx(memory):
    queue, driver = make_queue(memory, event_idx=True)
    driver.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)  # 2.7.7.2: ignored with EVENT_IDX
    driver.set_used_event(2)  # "tell me when used.idx passes 2", i.e. after the third element
    for expected in (False, False, True, False):
        driver.add([(DATA, 4, True)])
        queue.push(queue.pop(), 0)
        assert queue.needs_notification() is expected


def test_used_event_inside_a_batch(memory):
    queue, driver = make_queue(memory, event_idx=True)
    driver.set_used_event(1)
    for _ in range(3):
        driver.add([(DATA, 4, True)])
    for _ in range(3):
        queue.push(queue.pop(), 0)
    assert queue.needs_notification()  # 1 lies in [0, 3)


def test_avail_event_is_written_when_rearming(memory):
    queue, driver = make_queue(memory, event_idx=True)
    driver.add([(DATA, 4, True)])
    queue.pop()
    assert not queue.enable_notification()  # nothing more is available
    assert driver.avail_event == 1  # "notify me when you make entry 1 available"
    driver.add([(DATA, 4, True)])
    assert queue.enable_notification()  # the re-check catches a racing driver


# -- hostile rings (hypothesis) --------------------------------------------------------

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


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=hostile_rings())
def test_hostile_rings_raise_only_virtqueue_error(spec):
    with hostile_memory() as memory:
        write_hostile_ring(memory, spec)
        recorder = RecordingMemory(memory)
        queue = SplitVirtqueue(recorder, max_size=spec["size"])
        queue.desc_addr, queue.driver_addr, queue.device_addr = DESC, AVAIL, USED
        before = snapshot(memory)
        queue.enable(event_idx=spec["event_idx"], indirect=spec["indirect_ok"])
        try:
            for _ in range(2 * spec["size"] + 1):
                chain = queue.pop()
                if chain is None:
                    break
                for segment in chain.readable + chain.writable:
                    assert memory.is_mapped(segment.addr, segment.length)
                written = chain.write(b"\xAA" * 64)
                chain.read(64)
                queue.push(chain, written)
                queue.needs_notification()
                queue.enable_notification()
        except VirtqueueError:
            pass  # the one error a hostile driver may cause
        assert recorder.violations == []
        check_writes(memory, before, recorder.writes, [(DESC, spec["size"])], [(USED, spec["size"])])


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


def test_guest_memory_error_is_not_what_the_queue_raises(memory):
    # Sanity check of the test above: GuestMemory itself would raise GuestMemoryError.
    with pytest.raises(GuestMemoryError):
        memory.read(MEMORY_SIZE, 1)
