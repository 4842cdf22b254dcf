"""Split virtqueues (virtio spec 2.7), driven by a driver written in Python.

The guest's side is ``pykvm.virtio.mock_driver.RingDriver``: it writes
descriptors and the available ring into real guest memory
(``GuestMemory(vm=None)``, the ``memory`` fixture of conftest.py) and reads
the used ring, as Linux's ``virtio_ring.c`` does.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings

from pykvm.errors import GuestMemoryError
from pykvm.virtio.mock_driver import AVAIL, DESC, USED, RingDriver
from pykvm.virtio.queue import (
    MAX_CHAIN_BYTES,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    SplitVirtqueue,
    VirtqueueError,
)

from virtio_helpers import (  # noqa: E402
    DATA, MEMORY_SIZE, RecordingMemory, check_writes, hostile_memory, hostile_rings, snapshot,
    write_hostile_ring,
)


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


def test_indirect_table_up_to_the_queue_size(memory):
    queue, driver = make_queue(memory, size=8, indirect=True)
    driver.add_indirect(0x5000, [(DATA + 16 * i, 16, False) for i in range(8)])
    assert queue.pop().readable_length == 128


def test_indirect_table_longer_than_the_queue_is_refused(memory):
    """Regression: tables of 32,768 descriptors were walked whatever the queue size (2.7.5.3.1 bounds them)."""
    queue, driver = make_queue(memory, size=2, indirect=True)
    driver.add_indirect(0x5000, [(DATA + 16 * i, 16, False) for i in range(10)])
    with pytest.raises(VirtqueueError, match="longer than the queue"):
        queue.pop()


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


def test_guest_memory_error_is_not_what_the_queue_raises(memory):
    # Sanity check of the test above: GuestMemory itself would raise GuestMemoryError.
    with pytest.raises(GuestMemoryError):
        memory.read(MEMORY_SIZE, 1)
