"""A virtio driver written in Python: the guest's side, for tests and labs (like vm-virtio's mock.rs).

:class:`RingDriver` is the driver's side of one split virtqueue (virtio 1.2
section 2.7): it writes descriptors and the available ring into guest memory
and reads the used ring, as Linux's ``virtio_ring.c`` does.
:class:`MmioDriver` is the driver's view of a virtio-mmio register window
(section 4.2), as Linux's ``virtio_mmio.c`` uses it.  Both need only an
object with ``read(gpa, n)`` / ``write(gpa, data)`` -- ``GuestMemory(vm=None)``
works, so device models are tested with no VM at all.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence

from pykvm.virtio import (
    STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK, VirtioMmioDevice,
)
from pykvm.virtio import mmio as R  # register offsets
from pykvm.virtio.queue import VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

__all__ = ["DESC", "AVAIL", "USED", "MmioDriver", "RingDriver"]

DESC, AVAIL, USED = 0x1000, 0x2000, 0x3000  # default ring areas


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


class MmioDriver:
    """The guest's side of the register window: 32-bit accesses only (4.2.2.2)."""

    def __init__(self, transport: VirtioMmioDevice, memory) -> None:
        self.transport, self.memory = transport, memory

    def r32(self, offset: int) -> int:
        return int.from_bytes(self.transport.read(offset, 4), "little")

    def w32(self, offset: int, value: int) -> None:
        self.transport.write(offset, value.to_bytes(4, "little"))

    @property
    def status(self) -> int:
        return self.r32(R.STATUS)

    def add_status(self, bits: int) -> None:
        self.w32(R.STATUS, self.status | bits)

    def device_features(self) -> int:
        features = 0
        for page in range(2):
            self.w32(R.DEVICE_FEATURES_SEL, page)
            features |= self.r32(R.DEVICE_FEATURES) << (32 * page)
        return features

    def write_features(self, features: int) -> None:
        for page in range(2):
            self.w32(R.DRIVER_FEATURES_SEL, page)
            self.w32(R.DRIVER_FEATURES, features >> (32 * page) & 0xFFFFFFFF)

    def negotiate(self, features: int) -> bool:
        """3.1.1 steps 1-6: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK, re-read."""
        self.w32(R.STATUS, 0)
        self.add_status(STATUS_ACKNOWLEDGE)
        self.add_status(STATUS_DRIVER)
        self.write_features(features)
        self.add_status(STATUS_FEATURES_OK)
        return bool(self.status & STATUS_FEATURES_OK)

    def setup_queue(self, index: int, size: int, desc: int, avail: int, used: int) -> RingDriver:
        """4.2.3.2: select, check, size, addresses through the 64-bit pairs, ready."""
        self.w32(R.QUEUE_SEL, index)
        if self.r32(R.QUEUE_READY) != 0:
            raise RuntimeError(f"queue {index} is already ready")
        if not 0 < size <= self.r32(R.QUEUE_NUM_MAX):
            raise ValueError(f"queue {index}: size {size} is not within 1..QueueNumMax")
        ring = RingDriver(self.memory, size, desc, avail, used)
        self.w32(R.QUEUE_NUM, size)
        for low, addr in ((R.QUEUE_DESC_LOW, desc), (R.QUEUE_DRIVER_LOW, avail), (R.QUEUE_DEVICE_LOW, used)):
            self.w32(low, addr & 0xFFFFFFFF)
            self.w32(low + 4, addr >> 32)
        self.w32(R.QUEUE_READY, 1)
        return ring

    def start(self, features: int, queues: dict[int, tuple[int, int, int, int]]) -> dict[int, RingDriver]:
        """A whole initialisation: negotiate, set up ``queues`` {index: (size, desc, avail, used)}, DRIVER_OK."""
        if not self.negotiate(features):
            raise RuntimeError("the device refused the features (FEATURES_OK did not stick)")
        rings = {i: self.setup_queue(i, *layout) for i, layout in queues.items()}
        self.add_status(STATUS_DRIVER_OK)
        return rings

    def notify(self, index: int) -> None:
        self.w32(R.QUEUE_NOTIFY, index)

    def ack(self) -> int:
        """Read InterruptStatus and acknowledge what it shows, as an interrupt handler does."""
        status = self.r32(R.INTERRUPT_STATUS)
        self.w32(R.INTERRUPT_ACK, status)
        return status
