"""The virtio-mmio transport, register by register (virtio spec 4.2).

The guest driver's view of the register window is
``pykvm.virtio.mock_driver.MmioDriver``, as Linux's ``virtio_mmio.c`` uses it.
"""

from __future__ import annotations

import logging
import struct
import threading

import pytest
from virtio_helpers import DATA, MEMORY_SIZE

from pykvm.platform.bus import Bus
from pykvm.memory import GuestMemory
from pykvm.virtio import (
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_FEATURES_OK,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VirtioDevice,
    VirtioMmioDevice,
    linux_cmdline,
)
from pykvm.virtio import mmio as R  # register offsets
from pykvm.virtio.mock_driver import MmioDriver, RingDriver

VERSION_1 = 1 << VIRTIO_F_VERSION_1


class EchoDevice(VirtioDevice):
    """A two-queue test device: returns each chain with its readable bytes copied back."""

    device_id = 42
    name = "echo"

    def __init__(self) -> None:
        super().__init__([8, 4], features=1 << 5)
        self.config = bytearray(b"\x01\x02\x03\x04\x05\x06\x07\x08")
        self.notified: list[int] = []
        self.activations = 0
        self.resets = 0

    def notify(self, index: int) -> None:
        self.notified.append(index)
        queue = self.queues[index]
        while (chain := queue.pop()) is not None:
            queue.push(chain, chain.write(chain.read()))
        self.signal_used(index)

    def config_space(self) -> bytes:
        return bytes(self.config)

    def on_activate(self) -> None:
        self.activations += 1

    def on_reset(self) -> None:
        self.resets += 1

    def change_config(self, offset: int, value: int) -> None:
        with self.lock:
            self.config[offset] = value
            self.config_changed()


class Harness:
    def __init__(self, memory: GuestMemory, **kwargs) -> None:
        self.memory = memory
        self.device = EchoDevice()
        self.edges: list[bool] = []
        self.transport = VirtioMmioDevice(self.device, memory, self.edges.append, **kwargs)
        self.driver = MmioDriver(self.transport, memory)

    def start(self, features: int = VERSION_1) -> dict[int, RingDriver]:
        return self.driver.start(features, {0: (8, 0x1000, 0x2000, 0x3000), 1: (4, 0x4000, 0x5000, 0x6000)})


@pytest.fixture
def h(memory) -> Harness:
    return Harness(memory)


# -- identification ----------------------------------------------------------------


def test_identification_registers(h):
    d = h.driver
    assert d.r32(R.MAGIC_VALUE) == 0x74726976  # "virt"
    assert h.transport.read(0, 4) == b"virt"
    assert d.r32(R.VERSION) == 2
    assert d.r32(R.DEVICE_ID) == 42
    assert d.r32(R.VENDOR_ID_REG) == R.VENDOR_ID == int.from_bytes(b"pykv", "little")
    assert h.transport.length == 0x200


def test_linux_cmdline():
    assert linux_cmdline(0xD0000000, 5) == "virtio_mmio.device=0x200@0xd0000000:5"
    assert linux_cmdline() == "virtio_mmio.device=0x200@0xd0000000:5"
    assert linux_cmdline(0xD0000200, 6, device_id=1) == "virtio_mmio.device=0x200@0xd0000200:6:1"


def test_registered_on_the_mmio_bus(h):
    bus = Bus("mmio")
    bus.register(R.VIRTIO_MMIO_BASE, h.transport.length, h.transport)
    assert bus.read(0xD0000000, 4) == b"virt"
    assert bus.read(0xD0000000 + R.DEVICE_ID, 4) == (42).to_bytes(4, "little")
    bus.write(0xD0000000 + R.STATUS, STATUS_ACKNOWLEDGE.to_bytes(4, "little"))
    assert h.driver.status == STATUS_ACKNOWLEDGE


# -- access widths ----------------------------------------------------------------------


@pytest.mark.parametrize("offset, size", [(R.MAGIC_VALUE, 1), (R.MAGIC_VALUE, 2), (R.VERSION + 2, 2),
                                          (R.MAGIC_VALUE, 8), (R.STATUS + 1, 4)])
def test_registers_need_aligned_32_bit_accesses(h, caplog, offset, size):
    with caplog.at_level(logging.WARNING, "pykvm.virtio.mmio"):
        assert h.transport.read(offset, size) == b"\xff" * size
    assert "32-bit" in caplog.text


def test_narrow_write_is_ignored(h):
    h.transport.write(R.STATUS, bytes([STATUS_ACKNOWLEDGE]))
    h.transport.write(R.STATUS + 2, b"\x01\x00")
    assert h.driver.status == 0


def test_write_only_and_reserved_registers_read_zero(h):
    for offset in (R.DEVICE_FEATURES_SEL, R.QUEUE_SEL, R.QUEUE_NOTIFY, R.INTERRUPT_ACK, R.QUEUE_DESC_LOW,
                   0x018, 0x0F8, R.QUEUE_RESET):
        assert h.driver.r32(offset) == 0, hex(offset)


def test_no_shared_memory_regions(h):
    # virtio 1.2: a length of all-ones (-1) means "no such region".
    h.driver.w32(R.SHM_SEL, 0)
    assert [h.driver.r32(o) for o in (R.SHM_LEN_LOW, R.SHM_LEN_HIGH)] == [0xFFFFFFFF] * 2


def test_read_only_registers_ignore_writes(h):
    h.driver.w32(R.MAGIC_VALUE, 0)
    h.driver.w32(R.INTERRUPT_STATUS, 3)
    h.driver.w32(R.CONFIG_GENERATION, 7)
    assert h.driver.r32(R.MAGIC_VALUE) == 0x74726976
    assert h.driver.r32(R.INTERRUPT_STATUS) == 0 and h.driver.r32(R.CONFIG_GENERATION) == 0


# -- features ----------------------------------------------------------------------------


def test_feature_pages(h):
    d = h.driver
    d.w32(R.DEVICE_FEATURES_SEL, 0)
    low = d.r32(R.DEVICE_FEATURES)
    assert low == (1 << 5) | (1 << VIRTIO_F_INDIRECT_DESC) | (1 << VIRTIO_F_EVENT_IDX)
    d.w32(R.DEVICE_FEATURES_SEL, 1)
    assert d.r32(R.DEVICE_FEATURES) == 1  # VIRTIO_F_VERSION_1 is bit 32
    for page in (2, 3, 0xFFFFFFFF):
        d.w32(R.DEVICE_FEATURES_SEL, page)
        assert d.r32(R.DEVICE_FEATURES) == 0


def test_ring_features_can_be_withheld(memory):
    h = Harness(memory, ring_features=0)
    assert h.driver.device_features() == VERSION_1 | (1 << 5)


def test_features_ok_needs_version_1(h):
    assert not h.driver.negotiate(1 << 5)  # a legacy driver
    assert h.driver.status == STATUS_ACKNOWLEDGE | STATUS_DRIVER


def test_features_ok_refused_for_unoffered_bits(h):
    assert not h.driver.negotiate(VERSION_1 | (1 << 6))
    assert not h.driver.negotiate(VERSION_1 | (1 << 40))


def test_features_ok_refused_for_bits_beyond_64(h):
    d = h.driver
    d.w32(R.STATUS, 0)
    d.add_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    d.write_features(VERSION_1)
    d.w32(R.DRIVER_FEATURES_SEL, 2)
    d.w32(R.DRIVER_FEATURES, 1)
    d.add_status(STATUS_FEATURES_OK)
    assert not d.status & STATUS_FEATURES_OK


def test_features_ok_accepted_for_a_subset(h):
    wanted = VERSION_1 | (1 << VIRTIO_F_EVENT_IDX)
    assert h.driver.negotiate(wanted)
    assert h.transport.driver_features == wanted


def test_driver_features_frozen_after_features_ok(h):
    assert h.driver.negotiate(VERSION_1)
    h.driver.write_features(VERSION_1 | (1 << 5))
    assert h.transport.driver_features == VERSION_1


def test_renegotiation_after_a_failed_attempt(h):
    assert not h.driver.negotiate(1 << 5)
    assert h.driver.negotiate(VERSION_1 | (1 << 5))


# -- status ---------------------------------------------------------------------------------


def test_driver_ok_needs_features_ok(h):
    d = h.driver
    d.add_status(STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    d.add_status(STATUS_DRIVER_OK)
    assert not d.status & STATUS_DRIVER_OK
    assert h.device.activations == 0


def test_driver_cannot_clear_bits_or_set_needs_reset(h):
    assert h.driver.negotiate(VERSION_1)
    h.driver.w32(R.STATUS, STATUS_ACKNOWLEDGE | STATUS_DEVICE_NEEDS_RESET)
    assert h.driver.status == STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK


def test_driver_ok_activates_and_processes_early_buffers(h):
    assert h.driver.negotiate(VERSION_1)
    ring = h.driver.setup_queue(0, 8, 0x1000, 0x2000, 0x3000)
    ring.add([(DATA, 4, True)])
    h.driver.notify(0)  # before DRIVER_OK: the device must not consume buffers (2.1.2)
    assert h.device.notified == [] and ring.used_idx == 0
    h.driver.add_status(STATUS_DRIVER_OK)
    assert h.device.activations == 1
    assert h.device.notified == [0] and ring.used_idx == 1


def test_failed_stops_processing(h):
    rings = h.start()
    h.driver.add_status(STATUS_FAILED)
    rings[0].add([(DATA, 4, True)])
    h.driver.notify(0)
    assert h.device.notified == [0, 1]  # only the passes at DRIVER_OK
    assert rings[0].used_idx == 0


# -- queues ------------------------------------------------------------------------------------


def test_queue_num_max_and_missing_queues(h):
    d = h.driver
    for index, size in ((0, 8), (1, 4), (2, 0), (0xFFFF, 0)):
        d.w32(R.QUEUE_SEL, index)
        assert d.r32(R.QUEUE_NUM_MAX) == size
        assert d.r32(R.QUEUE_READY) == 0
    d.w32(R.QUEUE_READY, 1)  # on a queue that does not exist: ignored
    assert d.r32(R.QUEUE_READY) == 0


def test_queue_setup_through_64_bit_registers(memory):
    # Put the rings above 4 GiB, so the High registers matter.
    memory.add_region(0x1_0000_0000, 0x10000)
    h = Harness(memory)
    assert h.driver.negotiate(VERSION_1)
    ring = h.driver.setup_queue(1, 4, 0x1_0000_0000, 0x1_0000_1000, 0x1_0000_2000)
    q = h.transport.queues[1]
    assert (q.size, q.desc_addr, q.driver_addr, q.device_addr, q.ready) == (
        4, 0x1_0000_0000, 0x1_0000_1000, 0x1_0000_2000, True)
    assert h.driver.r32(R.QUEUE_READY) == 1
    h.driver.add_status(STATUS_DRIVER_OK)
    ring.add([(0x1_0000_4000, 4, True)])
    h.driver.notify(1)
    assert ring.take_used() == [(0, 0)]


def test_queue_registers_ignored_while_ready(h):
    h.start()
    h.driver.w32(R.QUEUE_SEL, 0)
    h.driver.w32(R.QUEUE_NUM, 2)
    h.driver.w32(R.QUEUE_DESC_LOW, 0x8000)
    q = h.transport.queues[0]
    assert (q.size, q.desc_addr) == (8, 0x1000)


def test_queue_ready_zero_stops_the_queue(h):
    rings = h.start()
    h.driver.w32(R.QUEUE_SEL, 0)
    h.driver.w32(R.QUEUE_READY, 0)
    assert h.driver.r32(R.QUEUE_READY) == 0  # the driver reads it back (4.2.2.2)
    rings[0].add([(DATA, 4, True)])
    h.driver.notify(0)
    assert rings[0].used_idx == 0


@pytest.mark.parametrize("size, desc", [(3, 0x1000), (16, 0x1000), (8, 0x1008), (8, MEMORY_SIZE)])
def test_bad_queue_layout_needs_reset(h, size, desc):
    assert h.driver.negotiate(VERSION_1)
    d = h.driver
    d.w32(R.QUEUE_SEL, 0)
    d.w32(R.QUEUE_NUM, size)
    d.w32(R.QUEUE_DESC_LOW, desc)
    d.w32(R.QUEUE_DRIVER_LOW, 0x2000)
    d.w32(R.QUEUE_DEVICE_LOW, 0x3000)
    d.w32(R.QUEUE_READY, 1)
    assert d.r32(R.QUEUE_READY) == 0
    assert d.status & STATUS_DEVICE_NEEDS_RESET
    assert h.edges == []  # no DRIVER_OK yet: no configuration interrupt (2.1.2)


def test_notify_for_a_missing_queue_is_ignored(h):
    h.start()
    h.driver.notify(7)
    h.transport.process_queue(-1)
    assert h.device.notified == [0, 1]  # the passes at DRIVER_OK


# -- interrupts ---------------------------------------------------------------------------


def test_used_buffer_interrupt_and_ack(h):
    rings = h.start()
    assert h.edges == []
    rings[0].add([(DATA, 4, True)])
    h.driver.notify(0)
    assert h.driver.r32(R.INTERRUPT_STATUS) == R.INTERRUPT_VRING
    assert h.edges == [True] and h.transport.irq_level
    rings[1].add([(DATA, 4, True)])
    h.driver.notify(1)
    assert h.edges == [True]  # level: already high
    h.driver.w32(R.INTERRUPT_ACK, R.INTERRUPT_VRING)
    assert h.driver.r32(R.INTERRUPT_STATUS) == 0
    assert h.edges == [True, False] and not h.transport.irq_level


def test_partial_ack_keeps_the_line_high(h):
    rings = h.start()
    rings[0].add([(DATA, 4, True)])
    h.driver.notify(0)
    h.device.change_config(0, 9)
    assert h.driver.r32(R.INTERRUPT_STATUS) == R.INTERRUPT_VRING | R.INTERRUPT_CONFIG
    h.driver.w32(R.INTERRUPT_ACK, R.INTERRUPT_CONFIG)
    assert h.driver.r32(R.INTERRUPT_STATUS) == R.INTERRUPT_VRING and h.edges == [True]
    h.driver.w32(R.INTERRUPT_ACK, R.INTERRUPT_VRING)
    assert h.edges == [True, False]


def test_config_generation_and_config_interrupt(h):
    d = h.driver
    assert d.r32(R.CONFIG_GENERATION) == 0
    h.device.change_config(1, 0x22)  # before DRIVER_OK: generation only
    assert d.r32(R.CONFIG_GENERATION) == 1 and h.edges == []
    h.start()
    assert h.transport.read(R.CONFIG, 4) == b"\x01\x22\x03\x04"
    h.device.change_config(0, 0x11)
    assert d.r32(R.CONFIG_GENERATION) == 2
    assert d.r32(R.INTERRUPT_STATUS) == R.INTERRUPT_CONFIG and h.edges == [True]
    assert d.ack() == R.INTERRUPT_CONFIG and h.edges == [True, False]


def test_config_space_any_width_and_past_the_end(h):
    t = h.transport
    assert t.read(R.CONFIG + 1, 1) == b"\x02"
    assert t.read(R.CONFIG + 2, 2) == b"\x03\x04"
    assert t.read(R.CONFIG + 4, 4) == b"\x05\x06\x07\x08"
    assert t.read(R.CONFIG + 6, 4) == b"\x07\x08\xff\xff"
    assert t.read(0x1FC, 4) == b"\xff" * 4
    t.write(R.CONFIG, b"\x00")  # EchoDevice's config is read-only: ignored
    assert t.read(R.CONFIG, 1) == b"\x01"


# -- reset ------------------------------------------------------------------------------------


def test_reset_clears_everything(h):
    rings = h.start(VERSION_1 | (1 << VIRTIO_F_EVENT_IDX))
    rings[0].add([(DATA, 4, True)])
    h.driver.notify(0)
    assert h.transport.irq_level
    h.driver.w32(R.QUEUE_SEL, 1)
    resets = h.device.resets  # the driver's initialisation reset once already (3.1.1)
    h.driver.w32(R.STATUS, 0)
    d = h.driver
    assert d.status == 0 and d.r32(R.INTERRUPT_STATUS) == 0
    assert h.edges == [True, False]
    assert h.transport.driver_features == 0 and h.device.resets == resets + 1 and not h.device.active
    assert d.r32(R.QUEUE_NUM_MAX) == 8  # QueueSel went back to 0
    for index, q in enumerate(h.transport.queues):
        d.w32(R.QUEUE_SEL, index)
        assert d.r32(R.QUEUE_READY) == 0
        assert (q.size, q.desc_addr, q.driver_addr, q.device_addr) == (q.max_size, 0, 0, 0)
        assert (q.last_avail_idx, q.used_idx, q.event_idx) == (0, 0, False)
    # A fresh initialisation works, at other addresses.
    rings = h.driver.start(VERSION_1, {0: (8, 0x8000, 0x9000, 0xA000)})
    rings[0].add([(DATA, 4, True)])
    h.driver.notify(0)
    assert rings[0].take_used() == [(0, 0)]


# -- broken drivers ------------------------------------------------------------------------


def test_virtqueue_error_sets_needs_reset_and_interrupts(h, caplog):
    rings = h.start()
    rings[0].add([(MEMORY_SIZE - 2, 8, True)])  # runs off the end of guest memory
    with caplog.at_level(logging.WARNING, "pykvm.virtio.mmio"):
        h.driver.notify(0)
        h.driver.notify(0)  # ignored: the device is stopped
    assert h.driver.status & STATUS_DEVICE_NEEDS_RESET
    assert h.driver.r32(R.INTERRUPT_STATUS) == R.INTERRUPT_CONFIG and h.edges == [True]
    assert caplog.text.count("needs reset") == 1
    assert h.transport.errors == 1 and "outside guest memory" in h.transport.last_error
    assert h.device.notified == [0, 1, 0]
    # The driver recovers by resetting.
    h.driver.ack()
    rings = h.start()
    assert not h.driver.status & STATUS_DEVICE_NEEDS_RESET
    rings[0].add([(DATA, 8, True)])
    h.driver.notify(0)
    assert rings[0].take_used() == [(0, 0)]


# -- threads ---------------------------------------------------------------------------------


def test_process_queue_from_another_thread(h):
    """An ioeventfd thread calls process_queue while the vCPU thread reads registers."""
    rings = h.start()
    ring = rings[0]
    done = threading.Event()
    errors: list[BaseException] = []

    def iothread() -> None:
        try:
            while not done.is_set():
                h.transport.process_queue(0)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    thread = threading.Thread(target=iothread)
    thread.start()
    try:
        for _ in range(200):
            ring.add([(DATA, 4, True)])
            h.driver.ack()
            while ring.take_used() == []:
                h.driver.r32(R.INTERRUPT_STATUS)
    finally:
        done.set()
        thread.join()
    assert errors == [] and ring.used_idx == 200
    assert not h.driver.status & STATUS_DEVICE_NEEDS_RESET


def test_echo_device_round_trip(h):
    rings = h.start()
    h.memory.write(DATA, b"ping")
    ring = rings[1]
    ring.write_desc(0, DATA, 4, 1, 1)
    ring.write_desc(1, DATA + 0x100, 4, 2)
    ring.publish(0)
    h.driver.notify(1)
    assert ring.take_used() == [(0, 4)]
    assert h.memory.read(DATA + 0x100, 4) == b"ping"
    assert struct.unpack("<H", h.memory.read(0x6002, 2))[0] == 1


# -- a hostile driver on the register window (hypothesis) ----------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_ACCESSES = st.lists(st.tuples(
    st.booleans(),                                       # write?
    st.one_of(st.sampled_from(range(0, 0x100, 4)), st.integers(0, 0x1FF)),  # mostly registers
    st.sampled_from([1, 2, 4, 8]),
    st.one_of(st.integers(0, 0xFFFFFFFF), st.sampled_from([0, 1, 0xF, 0x1000, DATA])),
), max_size=60)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(accesses=_ACCESSES)
def test_any_register_sequence_never_raises_and_keeps_the_window_consistent(memory, accesses):
    h = Harness(memory)
    for write, offset, size, value in accesses:
        size = min(size, 0x200 - offset)
        if write:
            h.transport.write(offset, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
            if offset == R.QUEUE_NOTIFY and size == 4:
                h.transport.process_queue(value & 0xFFFF)
        else:
            assert len(h.transport.read(offset, size)) == size
        assert h.driver.r32(R.MAGIC_VALUE) == 0x74726976  # "virt": identification never changes
        assert h.driver.r32(R.VERSION) == 2
        assert h.transport.irq_level == (h.transport.interrupt_status != 0)
