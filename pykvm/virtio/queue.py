"""Split virtqueues, seen from the device (virtio 1.x spec section 2.7).

A split virtqueue is three areas of guest memory that the driver allocates
and the device finds through the transport's registers:

* the **descriptor table** (2.7.5): ``size`` entries of 16 bytes, each one
  buffer ``(addr: le64, len: le32, flags: le16, next: le16)``; descriptors
  link into *chains* with ``VIRTQ_DESC_F_NEXT``, and a descriptor with
  ``VIRTQ_DESC_F_INDIRECT`` points at a further table (2.7.5.3);
* the **available ring** (2.7.6), written by the driver:
  ``flags: le16, idx: le16, ring[size]: le16, used_event: le16`` -- the
  heads of the chains it offers, ``idx`` counting them (mod 2**16);
* the **used ring** (2.7.8), written by the device:
  ``flags: le16, idx: le16, ring[size]: {id: le32, len: le32},
  avail_event: le16`` -- the chains it has finished with and how many bytes
  it wrote into each.

:class:`SplitVirtqueue` pops chains from the available ring
(:meth:`~SplitVirtqueue.pop`), returns them through the used ring
(:meth:`~SplitVirtqueue.push`) and decides whether the driver wants to hear
about it (:meth:`~SplitVirtqueue.needs_notification`, 2.7.7).

Everything the driver wrote is hostile until checked.  Every address and
length read from guest memory is validated against guest memory before it
is used; chains are bounded by the queue size, or by the table size inside
an indirect table (so a ``next`` loop is an error, not a hang); an indirect
table inside an indirect table, an index outside its table, a readable
buffer after a writable one, or a chain of more than 2**32 bytes is an
error.  All of these raise the one error type
:class:`VirtqueueError`; the transport answers it by setting
DEVICE_NEEDS_RESET (2.1.2) and the host carries on.

Descriptors are read from guest memory exactly once, then validated, then
used from the copy: a driver that rewrites a descriptor while the device
walks it cannot make the device use an address it did not check.

Memory ordering: x86 keeps loads in order and stores in order, so reading
``avail.idx`` before the ring entries, and writing a used element before
``used.idx``, needs no fence.  The one store-then-load pair (publish
``used.idx``/``avail_event``, then read ``used_event``/``avail.idx``) is
separated by the transport's lock operations, which are locked instructions
and so full barriers on x86.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NoReturn, Protocol

from pykvm.errors import GuestMemoryError, VirtqueueError

# Descriptor flags (2.7.5).
VIRTQ_DESC_F_NEXT = 1  # the chain continues in the descriptor at ``next``
VIRTQ_DESC_F_WRITE = 2  # the buffer is device-writable (else device-readable)
VIRTQ_DESC_F_INDIRECT = 4  # the buffer is a table of descriptors (2.7.5.3)

# Available ring flags (2.7.7): the driver does not want used-buffer
# notifications.  Only meaningful when VIRTIO_F_EVENT_IDX is not negotiated.
VIRTQ_AVAIL_F_NO_INTERRUPT = 1
# Used ring flags (2.7.10): the device does not want available-buffer
# notifications.  This model never sets it (see enable_notification).
VIRTQ_USED_F_NO_NOTIFY = 1

#: The largest queue size of a split virtqueue (2.7: "Queue Size ... is
#: always a power of 2.  The maximum Queue Size value is 32768").
MAX_QUEUE_SIZE = 32768
#: A chain may not describe more than 2**32 bytes in total (2.7.5.2).
MAX_CHAIN_BYTES = 1 << 32

DESCRIPTOR_SIZE = 16
_DESCRIPTOR = struct.Struct("<QIHH")  # addr, len, flags, next
_USED_ELEMENT = struct.Struct("<II")  # id, len

#: Alignment of each area (2.7, table "Virtqueue Part Alignment").
DESC_ALIGN, AVAIL_ALIGN, USED_ALIGN = 16, 2, 4


class GuestMemoryLike(Protocol):
    """What a virtqueue needs of guest memory (``pykvm.memory.GuestMemory``).

    ``read``/``write`` raise ``GuestMemoryError`` outside guest memory;
    ``is_mapped(gpa, size)`` says whether ``[gpa, gpa+size)`` lies inside
    one region.
    """

    def read(self, gpa: int, size: int) -> bytes: ...

    def write(self, gpa: int, data: bytes) -> None: ...

    def is_mapped(self, gpa: int, size: int = 1) -> bool: ...


@dataclass(frozen=True, slots=True)
class Segment:
    """The guest memory one descriptor points at (already validated)."""

    addr: int
    length: int
    writable: bool


@dataclass(frozen=True)
class DescriptorChain:
    """One buffer the driver made available: a chain of descriptors.

    ``head`` is the index the device returns in the used ring.  The
    device-readable segments come first, then the device-writable ones
    (2.7.4.2); every segment lies inside guest memory.
    """

    head: int
    readable: tuple[Segment, ...]
    writable: tuple[Segment, ...]
    memory: GuestMemoryLike

    @property
    def readable_length(self) -> int:
        """Bytes the device may read (the driver's request or payload)."""
        return sum(s.length for s in self.readable)

    @property
    def writable_length(self) -> int:
        """Bytes the device may write (room for its reply)."""
        return sum(s.length for s in self.writable)

    def iter_readable(self, chunk: int = 1 << 16, *, start: int = 0, limit: int | None = None) -> Iterator[bytes]:
        """Yield the readable bytes from byte ``start`` on, in order, ``chunk`` at a time, ``limit`` in all."""
        left = self.readable_length if limit is None else limit
        skip = start
        for segment in self.readable:
            if skip >= segment.length:
                skip -= segment.length
                continue
            for offset in range(skip, segment.length, chunk):
                if left <= 0:
                    return
                size = min(chunk, segment.length - offset, left)
                yield _guest_read(self.memory, segment.addr + offset, size)
                left -= size
            skip = 0

    def read(self, limit: int | None = None) -> bytes:
        """Gather up to ``limit`` readable bytes (all of them by default)."""
        if limit is None:
            limit = self.readable_length
        out = bytearray()
        for segment in self.readable:
            if len(out) >= limit:
                break
            size = min(segment.length, limit - len(out))
            out += _guest_read(self.memory, segment.addr, size)
        return bytes(out)

    def write(self, data: bytes | bytearray) -> int:
        """Scatter ``data`` into the writable segments; return bytes written.

        Writes ``min(len(data), writable_length)`` bytes.
        """
        view = memoryview(data)
        written = 0
        for segment in self.writable:
            if written >= len(view):
                break
            piece = view[written : written + segment.length]
            _guest_write(self.memory, segment.addr, bytes(piece))
            written += len(piece)
        return written


class SplitVirtqueue:
    """The device's side of one split virtqueue (spec 2.7).

    The transport programs :attr:`size` and the three area addresses
    (:attr:`desc_addr`, :attr:`driver_addr` = available ring,
    :attr:`device_addr` = used ring) from the driver's register writes, then
    calls :meth:`enable`.  The device model then pops and pushes chains.

    ``max_size`` is what the device offers (QueueNumMax); ``index`` is the
    queue's number, used in messages.
    """

    def __init__(self, memory: GuestMemoryLike, max_size: int, index: int = 0) -> None:
        if not 0 < max_size <= MAX_QUEUE_SIZE or max_size & (max_size - 1):
            raise ValueError(f"queue size {max_size} must be a power of 2 up to {MAX_QUEUE_SIZE}")
        self.memory = memory
        self.max_size = max_size
        self.index = index
        self.reset()

    def reset(self) -> None:
        """Forget everything the driver programmed (device reset, 2.1.2)."""
        self.size = self.max_size  # QueueNum's reset value is QueueNumMax
        self.desc_addr = 0
        self.driver_addr = 0
        self.device_addr = 0
        self.ready = False
        self.event_idx = False  # VIRTIO_F_EVENT_IDX negotiated
        self.indirect = False  # VIRTIO_F_INDIRECT_DESC negotiated
        self.last_avail_idx = 0  # next available-ring entry to pop
        self.used_idx = 0  # our copy of used.idx
        self._signalled_used = 0  # used.idx when needs_notification last ran

    # -- set-up ----------------------------------------------------------------

    def enable(self, *, event_idx: bool = False, indirect: bool = False) -> None:
        """Check the driver's layout and start using the queue (QueueReady=1).

        Checks the size (a power of 2, at most ``max_size``), the alignment
        of each area (2.7: descriptors 16, available ring 2, used ring 4) and
        that each area lies inside guest memory.  The ring indices start at
        0, as the driver's freshly zeroed rings do.
        """
        size = self.size
        if not 0 < size <= self.max_size or size & (size - 1):
            self._fail(f"queue size {size} is not a power of 2 in 1..{self.max_size}")
        for name, addr, align, length in (
            ("descriptor table", self.desc_addr, DESC_ALIGN, DESCRIPTOR_SIZE * size),
            ("available ring", self.driver_addr, AVAIL_ALIGN, 6 + 2 * size),
            ("used ring", self.device_addr, USED_ALIGN, 6 + 8 * size),
        ):
            if addr % align:
                self._fail(f"{name} at {addr:#x} is not {align}-byte aligned")
            if not self.memory.is_mapped(addr, length):
                self._fail(f"{name} at {addr:#x}+{length:#x} is outside guest memory")
        self.event_idx = event_idx
        self.indirect = indirect
        self.last_avail_idx = 0
        self.used_idx = 0
        self._signalled_used = 0
        self.ready = True

    def disable(self) -> None:
        """Stop using the queue (QueueReady=0); its layout is kept."""
        self.ready = False

    # -- the available ring ------------------------------------------------------

    def _avail_idx(self) -> int:
        return self._read16(self.driver_addr + 2)

    def has_available(self) -> bool:
        """True when the driver has made a chain available that we have not popped."""
        return self.ready and self._avail_idx() != self.last_avail_idx

    def pop(self) -> DescriptorChain | None:
        """Take the next available chain, or None when there is none (2.7.6).

        Raises :class:`VirtqueueError` when the ring or the chain is invalid.
        """
        if not self.ready:
            return None
        avail_idx = self._avail_idx()
        pending = (avail_idx - self.last_avail_idx) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.size:
            self._fail(
                f"available index moved from {self.last_avail_idx} to {avail_idx}: "
                f"{pending} chains in a ring of {self.size}"
            )
        slot = self.last_avail_idx % self.size
        head = self._read16(self.driver_addr + 4 + 2 * slot)
        chain = self._walk(head)
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        return chain

    def _walk(self, head: int) -> DescriptorChain:
        """Follow the chain at ``head`` and validate every descriptor (2.7.5).

        Each table bounds the walk: at most ``size`` descriptors are taken
        from the descriptor table, and an indirect table may hold at most
        ``size`` entries too (2.7.5.3.1: no chain longer than the queue size).
        So a ``next`` loop ends in an error, never a hang, and one chain costs
        at most a queue size of descriptors to walk.
        """
        size = self.size
        if head >= size:
            self._fail(f"chain head {head} is outside a table of {size}")
        table, entries = self.desc_addr, size
        index = head
        budget = size  # descriptors we may still take from the current table
        in_indirect = False
        readable: list[Segment] = []
        writable: list[Segment] = []
        total = 0
        while True:
            if budget == 0:
                self._fail(f"chain at head {head} is longer than its table of {entries} (a loop?)")
            budget -= 1
            raw = self._read(table + DESCRIPTOR_SIZE * index, DESCRIPTOR_SIZE)
            addr, length, flags, next_index = _DESCRIPTOR.unpack(raw)
            if flags & VIRTQ_DESC_F_INDIRECT:
                # 2.7.5.3: the buffer is a table of ``length // 16`` descriptors
                # and the chain continues at its entry 0; it ends the chain.
                if not self.indirect:
                    self._fail("indirect descriptor without VIRTIO_F_INDIRECT_DESC")
                if in_indirect:
                    self._fail("indirect descriptor inside an indirect table")
                if flags & VIRTQ_DESC_F_NEXT:
                    self._fail("descriptor has both INDIRECT and NEXT")
                if length == 0 or length % DESCRIPTOR_SIZE:
                    self._fail(f"indirect table length {length} is not a non-zero multiple of 16")
                if length > size * DESCRIPTOR_SIZE:
                    self._fail(f"indirect table of {length // DESCRIPTOR_SIZE} entries is longer than the "
                               f"queue ({size}; 2.7.5.3.1)")
                if not self.memory.is_mapped(addr, length):
                    self._fail(f"indirect table at {addr:#x}+{length:#x} is outside guest memory")
                table, entries = addr, length // DESCRIPTOR_SIZE
                index, budget, in_indirect = 0, entries, True
                continue
            if not self.memory.is_mapped(addr, length):
                self._fail(f"buffer at {addr:#x}+{length:#x} is outside guest memory")
            total += length
            if total > MAX_CHAIN_BYTES:
                self._fail(f"chain at head {head} is longer than 2**32 bytes")
            if flags & VIRTQ_DESC_F_WRITE:
                writable.append(Segment(addr, length, True))
            elif writable:
                self._fail("device-readable descriptor after a device-writable one")
            else:
                readable.append(Segment(addr, length, False))
            if not flags & VIRTQ_DESC_F_NEXT:
                return DescriptorChain(head, tuple(readable), tuple(writable), self.memory)
            if next_index >= entries:
                self._fail(f"next index {next_index} is outside a table of {entries}")
            index = next_index

    # -- the used ring -----------------------------------------------------------

    def push(self, chain: DescriptorChain | int, written: int = 0) -> None:
        """Return a chain to the driver with ``written`` bytes written (2.7.8).

        The element is stored before ``used.idx`` is advanced, so the driver
        never sees an index that covers an element not yet written.
        """
        head = chain if isinstance(chain, int) else chain.head
        if not 0 <= head < self.size or not 0 <= written < 1 << 32:
            raise ValueError(f"bad used element (head {head}, len {written})")
        slot = self.used_idx % self.size
        self._write(self.device_addr + 4 + 8 * slot, _USED_ELEMENT.pack(head, written))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._write(self.device_addr + 2, self.used_idx.to_bytes(2, "little"))

    def needs_notification(self) -> bool:
        """Should the device notify the driver about what it pushed? (2.7.7.2)

        Covers the used elements pushed since the previous call.  Without
        VIRTIO_F_EVENT_IDX the driver suppresses notifications with
        VIRTQ_AVAIL_F_NO_INTERRUPT in ``avail.flags``.  With it, the driver
        asks to be told once ``used.idx`` passes ``used_event`` (stored after
        the available ring): notify when ``used_event`` lies in the range of
        indices just published, ``[old, new)`` (mod 2**16).
        """
        new, old = self.used_idx, self._signalled_used
        self._signalled_used = new
        if new == old:
            return False
        if self.event_idx:
            used_event = self._read16(self.driver_addr + 4 + 2 * self.size)
            return (new - used_event - 1) & 0xFFFF < (new - old) & 0xFFFF
        return not self._read16(self.driver_addr) & VIRTQ_AVAIL_F_NO_INTERRUPT

    def enable_notification(self) -> bool:
        """Ask the driver to notify us of the next available chain (2.7.10).

        With VIRTIO_F_EVENT_IDX this writes ``avail_event`` (after the used
        ring) = the next index we will pop: the driver notifies when its
        ``avail.idx`` passes it.  Without it there is nothing to do: this
        model never sets VIRTQ_USED_F_NO_NOTIFY, so the driver always
        notifies.  Returns True when a chain became available meanwhile, in
        which case the caller must pop again (the driver may have checked
        ``avail_event`` before we wrote it and not notified).
        """
        if not self.ready:
            return False
        if self.event_idx:
            where = self.device_addr + 4 + 8 * self.size
            self._write(where, self.last_avail_idx.to_bytes(2, "little"))
        return self.has_available()

    # -- guest memory, with errors turned into VirtqueueError --------------------

    def _read(self, gpa: int, size: int) -> bytes:
        return _guest_read(self.memory, gpa, size)

    def _read16(self, gpa: int) -> int:
        return int.from_bytes(self._read(gpa, 2), "little")

    def _write(self, gpa: int, data: bytes) -> None:
        _guest_write(self.memory, gpa, data)

    def _fail(self, message: str) -> NoReturn:
        raise VirtqueueError(f"virtqueue {self.index}: {message}")

    def __repr__(self) -> str:
        return (
            f"SplitVirtqueue(index={self.index}, size={self.size}, ready={self.ready}, "
            f"desc={self.desc_addr:#x}, avail={self.driver_addr:#x}, used={self.device_addr:#x}, "
            f"last_avail={self.last_avail_idx}, used_idx={self.used_idx})"
        )


def _guest_read(memory: GuestMemoryLike, gpa: int, size: int) -> bytes:
    try:
        return memory.read(gpa, size)
    except GuestMemoryError as error:  # guest memory changed under us
        raise VirtqueueError(str(error)) from error


def _guest_write(memory: GuestMemoryLike, gpa: int, data: bytes) -> None:
    try:
        memory.write(gpa, data)
    except GuestMemoryError as error:
        raise VirtqueueError(str(error)) from error
