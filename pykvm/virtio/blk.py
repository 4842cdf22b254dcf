"""virtio-blk: a paravirtual disk (virtio 1.2 spec section 5.2) on a :class:`pykvm.block.BlockImage`.

Device ID 2, one request queue (queue 0).  A request is one descriptor
chain (5.2.6)::

    struct virtio_blk_req {
        le32 type;  le32 reserved;  le64 sector;   /* device-readable header, 16 bytes */
        u8 data[];                                 /* readable (OUT, DISCARD...) or writable (IN, GET_ID) */
        u8 status;                                 /* the last device-writable byte */
    };

The device does not assume any framing (VIRTIO_F_VERSION_1, 2.7.4): the
header is the first 16 readable bytes wherever the driver split them, the
status is the last writable byte, and the data is what lies between.
Sectors are always 512 bytes, whatever ``blk_size`` says.

Requests (5.2.6): IN (0) reads, OUT (1) writes, FLUSH (4), GET_ID (8: a
20-byte serial, NUL-padded), DISCARD (11) and WRITE_ZEROES (13), whose
data is an array of 16-byte segments ``{le64 sector; le32 num_sectors;
le32 flags}`` with flag bit 0 = unmap.  Status (5.2.6): OK 0, IOERR 1,
UNSUPP 2.  What each bad request gets:

* a range beyond the capacity, a data length that is not whole sectors, a
  write to a read-only disk, more segments or bigger ones than the
  configuration space allows, or a host I/O error: IOERR (nothing written);
* an unknown type, DISCARD/WRITE_ZEROES when the feature was not
  negotiated, an unknown flag, or DISCARD with the unmap flag (5.2.6.1):
  UNSUPP;
* a chain with no device-writable byte for the status: the device cannot
  answer at all -- that breaks the virtqueue contract and is a
  :class:`~pykvm.errors.VirtqueueError`, so the transport sets
  DEVICE_NEEDS_RESET (as the console does for a buffer in the wrong
  direction).  Addresses and lengths outside guest memory are refused the
  same way by the queue code before the device sees the chain.

Write cache (as QEMU's ``virtio_blk_set_features``): with VIRTIO_BLK_F_FLUSH
negotiated the device writes back and the driver's FLUSH makes writes
durable (``BlockImage.flush``: fdatasync, nothing with ``cache=unsafe``);
a driver that did not accept FLUSH gets a flush after every write.

Bounds on the host's work.  A compliant request has at most ``seg_max``
data segments of at most ``size_max`` bytes (the queue allows 2**32 bytes
in a chain), so one request moves at most ``seg_max * size_max`` bytes; data
goes through host memory :data:`CHUNK` bytes at a time.  A round of
:meth:`VirtioBlk.notify` ends after ``ROUND_CHAINS`` requests or once
``ROUND_BYTES`` have moved, and the transport continues on the I/O thread.
The driver may keep many requests in flight; they complete in the order
they are available (the image is synchronous, requests never overlap in
time), and one interrupt covers each round's used buffers.
"""

from __future__ import annotations

import struct

from pykvm.errors import GuestMemoryError, ImageError
from pykvm.log import get_logger
from pykvm.ratelimit import GuestLog
from pykvm.virtio import VirtioDevice
from pykvm.virtio.queue import DescriptorChain, VirtqueueError

log = get_logger("pykvm.virtio.blk")

__all__ = ["VirtioBlk", "SECTOR"]

VIRTIO_ID_BLOCK = 2
SECTOR = 512

# Feature bits (5.2.3).
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# Request types and status values (5.2.6).
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
FLAG_UNMAP = 1
ID_BYTES = 20  # VIRTIO_BLK_ID_BYTES

_HEADER = struct.Struct("<IIQ")  # type, reserved, sector
_SEGMENT = struct.Struct("<QII")  # sector, num_sectors, flags
# The configuration space (5.2.4) through write_zeroes_may_unmap, 60 bytes:
# capacity, size_max, seg_max, geometry (c, h, s), blk_size, topology (4 fields),
# writeback, unused0, num_queues, max_discard_sectors, max_discard_seg,
# discard_sector_alignment, max_write_zeroes_sectors, max_write_zeroes_seg,
# write_zeroes_may_unmap, unused1[3].
_CONFIG = struct.Struct("<QIIHBBIBBHIBBHIIIIIB3x")

DEFAULT_QUEUE_SIZE = 256
DEFAULT_SIZE_MAX = 128 << 10  # bytes per data segment
CHUNK = 1 << 20  # host memory per transfer step
MAX_DISCARD_SEG = 1  # one segment per request, as QEMU


class VirtioBlk(VirtioDevice):
    """A virtio-blk disk on ``image`` (a :class:`pykvm.block.BlockImage`, which it owns: :meth:`close`).

    ``read_only`` (or a read-only image) offers VIRTIO_BLK_F_RO and answers
    writes with IOERR; ``serial`` is what GET_ID returns (at most 20 bytes).
    """

    device_id = VIRTIO_ID_BLOCK
    name = "virtio-blk"

    def __init__(self, image, *, read_only: bool = False, serial: str = "", blk_size: int = SECTOR,
                 queue_size: int = DEFAULT_QUEUE_SIZE, size_max: int = DEFAULT_SIZE_MAX) -> None:
        if blk_size < SECTOR or blk_size & (blk_size - 1):
            raise ValueError(f"blk_size {blk_size} must be a power of 2 of at least 512")
        encoded = serial.encode()
        if len(encoded) > ID_BYTES:
            raise ValueError(f"serial {serial!r} is longer than {ID_BYTES} bytes")
        self.image = image
        self.read_only = read_only or image.read_only
        self.serial = encoded
        self.blk_size = blk_size
        self.size_max = size_max
        self.seg_max = queue_size - 2  # header and status take a descriptor each
        self.capacity = image.size // SECTOR
        features = ((1 << VIRTIO_BLK_F_SIZE_MAX) | (1 << VIRTIO_BLK_F_SEG_MAX) | (1 << VIRTIO_BLK_F_BLK_SIZE)
                    | (1 << VIRTIO_BLK_F_FLUSH))
        if self.read_only:
            features |= 1 << VIRTIO_BLK_F_RO
        else:
            features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
        super().__init__([queue_size], features)
        self.max_discard_sectors = min(self.capacity, 0xFFFFFFFF) or 1
        self.max_write_zeroes_sectors = self.max_discard_sectors
        #: Requests completed, by status; bytes read and written; flushes done.
        self.completed = {S_OK: 0, S_IOERR: 0, S_UNSUPP: 0}
        self.bytes_read = 0
        self.bytes_written = 0
        self.flushes = 0
        self._log = GuestLog(log)

    # -- configuration space (5.2.4) -------------------------------------------------

    def config_space(self) -> bytes:
        return _CONFIG.pack(
            self.capacity, self.size_max, self.seg_max, 0, 0, 0, self.blk_size, 0, 0, 0, 0,
            1, 0, 1,  # writeback (meaningful with CONFIG_WCE, not offered), unused0, num_queues
            self.max_discard_sectors, MAX_DISCARD_SEG, self.blk_size // SECTOR,
            self.max_write_zeroes_sectors, MAX_DISCARD_SEG, 1)

    # -- the queue ---------------------------------------------------------------------

    def notify(self, index: int) -> bool:
        """Serve the request queue: one round of requests; True when more are waiting."""
        if index != 0:
            return False
        queue = self.queues[0]
        chains, budget = 0, self.ROUND_BYTES
        used = False
        try:
            while chains < self.ROUND_CHAINS and budget > 0:
                chain = queue.pop()
                if chain is None and queue.enable_notification():
                    chain = queue.pop()
                if chain is None:
                    break
                chains += 1
                written, moved = self._serve(chain)
                queue.push(chain, written)
                used = True
                budget -= moved
        finally:
            if used:
                self.signal_used(0)
        return chains == self.ROUND_CHAINS or budget <= 0

    def _serve(self, chain: DescriptorChain) -> tuple[int, int]:
        """Carry out one request; return (bytes written into the chain, bytes moved)."""
        writable = chain.writable_length
        if writable < 1:
            raise VirtqueueError("virtio-blk: request without a device-writable status byte (5.2.6)")
        header = chain.read(_HEADER.size)
        moved = 0
        data_in = 0  # bytes of data written into the chain before the status
        if len(header) < _HEADER.size:
            status = self._bad(S_IOERR, "short-header", "request header of %d bytes (16 needed)", len(header))
        else:
            kind, _, sector = _HEADER.unpack(header)
            out_length = chain.readable_length - _HEADER.size  # data the driver gave us
            in_length = writable - 1  # room for data before the status
            try:
                status, data_in, moved = self._request(chain, kind, sector, out_length, in_length)
            except ImageError as error:
                self._log.warning(("image", str(error)), "%s: I/O error: %s", self.name, error)
                status = S_IOERR
        _write_at(chain, writable - 1, bytes([status]))
        self.completed[status] = self.completed.get(status, 0) + 1
        return data_in + 1, moved

    def _request(self, chain: DescriptorChain, kind: int, sector: int, out_length: int,
                 in_length: int) -> tuple[int, int, int]:
        """(status, bytes of data written into the chain, bytes moved) for one request."""
        if kind == T_IN:
            if not self._range_ok(sector, in_length) or not self._segments_ok(chain.writable, True):
                return S_IOERR, 0, 0
            self._copy_in(chain, sector * SECTOR, in_length)
            self.bytes_read += in_length
            return S_OK, in_length, in_length
        if kind == T_OUT:
            if self.read_only:
                return self._bad(S_IOERR, "ro", "write to a read-only disk"), 0, 0
            if not self._range_ok(sector, out_length) or not self._segments_ok(chain.readable, False):
                return S_IOERR, 0, 0
            self._copy_out(chain, sector * SECTOR, out_length)
            if not self.has_feature(VIRTIO_BLK_F_FLUSH):
                self.image.flush()  # no FLUSH negotiated: writethrough (QEMU's write cache off)
            self.bytes_written += out_length
            return S_OK, 0, out_length
        if kind == T_FLUSH:
            self.image.flush()
            self.flushes += 1
            return S_OK, 0, 0
        if kind == T_GET_ID:
            data = self.serial.ljust(ID_BYTES, b"\0")[:min(ID_BYTES, in_length)]
            return S_OK, _write_at(chain, 0, data), 0
        if kind in (T_DISCARD, T_WRITE_ZEROES):
            return self._ranges(chain, kind, out_length)
        return self._bad(S_UNSUPP, ("type", kind), "unknown request type %d", kind), 0, 0

    def _ranges(self, chain: DescriptorChain, kind: int, out_length: int) -> tuple[int, int, int]:
        """DISCARD and WRITE_ZEROES (5.2.6): their segments, checked in full before any is applied."""
        discard = kind == T_DISCARD
        feature = VIRTIO_BLK_F_DISCARD if discard else VIRTIO_BLK_F_WRITE_ZEROES
        if not self.has_feature(feature):
            return self._bad(S_UNSUPP, ("unsupp", kind), "request type %d without its feature", kind), 0, 0
        if self.read_only:
            return S_IOERR, 0, 0
        count, rest = divmod(out_length, _SEGMENT.size)
        if rest or count == 0 or count > MAX_DISCARD_SEG:
            status = self._bad(S_IOERR, ("segments", kind), "%d bytes of discard/write-zeroes segments", out_length)
            return status, 0, 0
        data = b"".join(chain.iter_readable(start=_HEADER.size, limit=out_length))
        segments = [_SEGMENT.unpack_from(data, i * _SEGMENT.size) for i in range(count)]
        limit = self.max_discard_sectors if discard else self.max_write_zeroes_sectors
        for sector, sectors, flags in segments:
            if flags & ~FLAG_UNMAP or (discard and flags & FLAG_UNMAP):
                return S_UNSUPP, 0, 0  # 5.2.6.1: unknown flags; unmap on a discard
            if sectors > limit or not self._range_ok(sector, sectors * SECTOR):
                return S_IOERR, 0, 0
        for sector, sectors, flags in segments:
            if discard:
                self.image.discard(sector * SECTOR, sectors * SECTOR)
            else:
                self.image.write_zeroes(sector * SECTOR, sectors * SECTOR, unmap=bool(flags & FLAG_UNMAP))
        if not self.has_feature(VIRTIO_BLK_F_FLUSH):
            self.image.flush()
        return S_OK, 0, 0

    # -- checks ----------------------------------------------------------------------

    def _range_ok(self, sector: int, length: int) -> bool:
        if length % SECTOR:
            self._bad(S_IOERR, "partial", "data of %d bytes is not whole 512-byte sectors", length)
            return False
        if sector + length // SECTOR > self.capacity:
            self._bad(S_IOERR, "range", "sectors %d+%d beyond the capacity of %d", sector, length // SECTOR,
                      self.capacity)
            return False
        return True

    def _segments_ok(self, segments, writable: bool) -> bool:
        """seg_max and size_max (5.2.3): the data segments (the header's and status's excluded) within them."""
        data = _data_segments(segments, _HEADER.size if not writable else 0, 1 if writable else 0)
        if len(data) > self.seg_max or any(n > self.size_max for n in data):
            self._bad(S_IOERR, "seg-max", "request beyond seg_max %d / size_max %d", self.seg_max, self.size_max)
            return False
        return True

    def _bad(self, status: int, key, message: str, *args) -> int:
        """Log a request the driver got wrong (rate-limited: the guest triggers it); return ``status``."""
        self._log.info(("bad", key), "%s: " + message + " (status %s)", self.name, *args,
                       "UNSUPP" if status == S_UNSUPP else "IOERR")
        return status

    # -- data ------------------------------------------------------------------------

    def _copy_in(self, chain: DescriptorChain, offset: int, length: int) -> None:
        """Disk -> the chain's writable bytes [0, length), CHUNK at a time."""
        done = 0
        while done < length:
            n = min(CHUNK, length - done)
            _write_at(chain, done, self.image.read(offset + done, n))
            done += n

    def _copy_out(self, chain: DescriptorChain, offset: int, length: int) -> None:
        """The chain's readable bytes after the header -> disk, CHUNK at a time."""
        position = offset
        for piece in chain.iter_readable(CHUNK, start=_HEADER.size, limit=length):
            self.image.write(position, piece)
            position += len(piece)

    # -- lifetime --------------------------------------------------------------------

    def close(self) -> None:
        """Flush and close the image."""
        self.image.close()


def _data_segments(segments, skip_front: int, skip_back: int) -> list[int]:
    """Lengths of the data parts of ``segments`` once ``skip_front``/``skip_back`` bytes are cut away."""
    lengths = [s.length for s in segments]
    while skip_front and lengths:
        cut = min(skip_front, lengths[0])
        lengths[0] -= cut
        skip_front -= cut
        if not lengths[0]:
            lengths.pop(0)
    while skip_back and lengths:
        cut = min(skip_back, lengths[-1])
        lengths[-1] -= cut
        skip_back -= cut
        if not lengths[-1]:
            lengths.pop()
    return [n for n in lengths if n]


def _write_at(chain: DescriptorChain, offset: int, data: bytes) -> int:
    """Scatter ``data`` into the chain's writable bytes from byte ``offset``; return bytes written."""
    view = memoryview(data)
    done = 0
    for segment in chain.writable:
        if done >= len(view):
            break
        if offset >= segment.length:
            offset -= segment.length
            continue
        n = min(segment.length - offset, len(view) - done)
        try:
            chain.memory.write(segment.addr + offset, bytes(view[done:done + n]))
        except GuestMemoryError as error:  # guest memory changed under us
            raise VirtqueueError(str(error)) from error
        done += n
        offset = 0
    return done
