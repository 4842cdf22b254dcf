"""virtio-blk (virtio 1.2 section 5.2) behind virtio-mmio, driven by the Python mock driver.

Requests are laid out in real guest memory (``GuestMemory(vm=None)``) the
way Linux's ``virtio_blk.c`` does -- a 16-byte header, the data, a status
byte -- and also split at odd places, as VIRTIO_F_VERSION_1 allows.  The
disk is a real raw or qcow2 image; what a request did is read back from the
image file, not from the device.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from virtio_helpers import RecordingMemory, check_writes, hostile_memory, hostile_rings, snapshot, write_hostile_ring

from pykvm.block import create_image, open_image
from pykvm.virtio import STATUS_DEVICE_NEEDS_RESET, VIRTIO_F_VERSION_1, VirtioMmioDevice
from pykvm.virtio import mmio as R
from pykvm.virtio.blk import (
    S_IOERR, S_OK, S_UNSUPP, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT, T_WRITE_ZEROES, VIRTIO_BLK_F_BLK_SIZE,
    VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX,
    VIRTIO_BLK_F_WRITE_ZEROES, VirtioBlk,
)
from pykvm.virtio.mock_driver import MmioDriver

VERSION_1 = 1 << VIRTIO_F_VERSION_1
ALL = VERSION_1 | sum(1 << b for b in (VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_BLK_SIZE,
                                        VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_WRITE_ZEROES))
DISK = 1 << 20  # 2048 sectors
QSIZE = 64
RING = (0x1000, 0x2000, 0x3000)
HDR, BUF = 0x8000, 0x10000  # headers at HDR + 32 * i (status at +16), data buffers from BUF


def header(kind: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", kind, 0, sector)


class Disk:
    """A VirtioBlk on an image file, its transport and a driver with queue 0 running."""

    def __init__(self, memory, path, *, fmt="raw", read_only=False, features=ALL, **options):
        self.path = path
        self.image = open_image(path, format=fmt, read_only=read_only)
        self.blk = VirtioBlk(self.image, read_only=read_only, **options)
        self.edges: list[bool] = []
        self.transport = VirtioMmioDevice(self.blk, memory, self.edges.append)
        self.driver = MmioDriver(self.transport, memory)
        self.memory = memory
        self.ring = self.driver.start(features, {0: (QSIZE, *RING)})[0]
        self.slot = 0

    def submit(self, kind, sector=0, *, out=b"", in_len=0, split_header=False) -> tuple[int, int]:
        """Publish one request (not notified); return (header address, in-buffer address)."""
        h = HDR + 32 * self.slot
        data = BUF + 0x2000 * self.slot
        self.slot += 1
        self.memory.write(h, header(kind, sector))
        self.memory.write(h + 16, b"\xee")  # status, to be overwritten
        segments = [(h, 5, False), (h + 5, 11, False)] if split_header else [(h, 16, False)]
        if out:
            self.memory.write(data, out)
            half = len(out) // 2
            segments += [(data, half, False), (data + half, len(out) - half, False)] if half else [(data, len(out), False)]
        if in_len:
            segments.append((data, in_len, True))
        segments.append((h + 16, 1, True))
        self.ring.add(segments)
        return h, data

    def status(self, h: int) -> int:
        return self.memory.read(h + 16, 1)[0]

    def run(self, kind, sector=0, **kw) -> tuple[int, bytes, list]:
        self.slot = 0
        h, data = self.submit(kind, sector, **kw)
        self.driver.notify(0)
        used = self.ring.take_used()
        return self.status(h), self.memory.read(data, kw.get("in_len", 0)), used

    def close(self):
        self.blk.close()


@pytest.fixture(params=["raw", "qcow2"])
def disk(request, memory, tmp_path):
    path = tmp_path / f"disk.{request.param}"
    create_image(path, request.param, DISK)
    d = Disk(memory, path, fmt=request.param)
    yield d
    d.close()


def file_bytes(path, fmt, offset, length) -> bytes:
    with open_image(path, format=fmt, read_only=True) as image:
        return image.read(offset, length)


def test_features_and_configuration_space(memory, tmp_path):
    create_image(tmp_path / "d.raw", "raw", DISK)
    d = Disk(memory, tmp_path / "d.raw")
    offered = d.driver.device_features()
    assert offered & ALL == ALL and not offered & 1 << VIRTIO_BLK_F_RO
    assert d.driver.r32(R.DEVICE_ID) == 2
    config = d.transport.read(R.CONFIG, 4) + d.transport.read(R.CONFIG + 4, 4)
    assert struct.unpack("<Q", config)[0] == DISK // 512  # capacity in sectors
    size_max, seg_max = struct.unpack("<II", bytes(d.transport.read(R.CONFIG + 8, 1) + d.transport.read(R.CONFIG + 9, 7)))
    assert seg_max == d.blk.seg_max and size_max == d.blk.size_max
    assert struct.unpack("<I", d.transport.read(R.CONFIG + 20, 4))[0] == 512  # blk_size
    discard = struct.unpack("<IIIIIB", d.transport.read(R.CONFIG + 36, 21))
    assert discard == (DISK // 512, 1, 1, DISK // 512, 1, 1)
    d.close()
    ro = Disk(memory, tmp_path / "d.raw", read_only=True, features=VERSION_1 | 1 << VIRTIO_BLK_F_RO)
    assert ro.driver.device_features() & 1 << VIRTIO_BLK_F_RO
    assert not ro.driver.device_features() & 1 << VIRTIO_BLK_F_DISCARD
    ro.close()


def test_write_then_read_back_with_the_header_split(disk):
    fmt = "qcow2" if disk.path.suffix == ".qcow2" else "raw"
    payload = bytes((i * 7 + 3) & 0xFF for i in range(4096))
    status, _, used = disk.run(T_OUT, 100, out=payload, split_header=True)
    assert status == S_OK and used[0][1] == 1  # only the status byte written
    status, data, used = disk.run(T_IN, 100, in_len=4096)
    assert status == S_OK and data == payload and used[0][1] == 4097
    status, _, _ = disk.run(T_FLUSH)
    assert status == S_OK and disk.blk.flushes == 1
    assert file_bytes(disk.path, fmt, 100 * 512, 4096) == payload


def test_many_requests_in_flight_one_doorbell(disk):
    fmt = "qcow2" if disk.path.suffix == ".qcow2" else "raw"
    heads, before = [], disk.transport.notifications
    for i in range(16):
        heads.append(disk.submit(T_OUT, 8 * i * 17, out=bytes([i + 1]) * 4096)[0])
    disk.driver.notify(0)
    used = disk.ring.take_used()
    assert len(used) == 16 and all(disk.status(h) == S_OK for h in heads)
    assert disk.transport.notifications == before + 1 and disk.edges == [True]  # one interrupt for the round
    disk.blk.image.flush()
    for i in range(16):
        assert file_bytes(disk.path, fmt, 8 * i * 17 * 512, 4096) == bytes([i + 1]) * 4096


def test_get_id(memory, tmp_path):
    create_image(tmp_path / "d.raw", "raw", DISK)
    d = Disk(memory, tmp_path / "d.raw", serial="pykvm-disk-0")
    status, data, used = d.run(T_GET_ID, in_len=20)
    assert status == S_OK and data == b"pykvm-disk-0".ljust(20, b"\0") and used[0][1] == 21
    d.close()


def test_bad_requests_get_ioerr_or_unsupp(disk):
    capacity = DISK // 512
    assert disk.run(T_IN, capacity - 1, in_len=1024)[0] == S_IOERR  # beyond the end
    assert disk.run(T_OUT, capacity, out=bytes(512))[0] == S_IOERR
    assert disk.run(T_IN, 0, in_len=100)[0] == S_IOERR  # not whole sectors
    assert disk.run(99)[0] == S_UNSUPP  # unknown type
    segment = struct.pack("<QII", 0, 8, 1)
    assert disk.run(T_DISCARD, out=segment)[0] == S_UNSUPP  # unmap on a discard (5.2.6.1)
    assert disk.run(T_WRITE_ZEROES, out=struct.pack("<QII", 0, 8, 2))[0] == S_UNSUPP  # unknown flag
    assert disk.run(T_WRITE_ZEROES, out=struct.pack("<QII", capacity - 1, 8, 0))[0] == S_IOERR
    assert disk.run(T_WRITE_ZEROES, out=segment * 2)[0] == S_IOERR  # more than max_write_zeroes_seg
    assert disk.blk.completed[S_OK] == 0
    assert not disk.driver.status & STATUS_DEVICE_NEEDS_RESET


def test_write_zeroes_and_discard(disk):
    fmt = "qcow2" if disk.path.suffix == ".qcow2" else "raw"
    disk.run(T_OUT, 0, out=b"\xab" * 8192)
    for flags in (0, 1):
        disk.run(T_OUT, 256, out=b"\xcd" * 4096)
        assert disk.run(T_WRITE_ZEROES, out=struct.pack("<QII", 256, 8, flags))[0] == S_OK
        assert file_bytes(disk.path, fmt, 256 * 512, 4096) == bytes(4096)
    assert disk.run(T_DISCARD, out=struct.pack("<QII", 0, 16, 0))[0] == S_OK
    assert file_bytes(disk.path, fmt, 0, 8192) in (bytes(8192), b"\xab" * 8192)  # advisory


def test_features_not_negotiated(memory, tmp_path):
    """No FLUSH: every write is flushed (writethrough); no DISCARD/WRITE_ZEROES: UNSUPP."""
    create_image(tmp_path / "d.raw", "raw", DISK)
    d = Disk(memory, tmp_path / "d.raw", features=VERSION_1)
    flushes = []
    d.image._flush = lambda: flushes.append(1)
    assert d.run(T_OUT, 0, out=bytes(512))[0] == S_OK and flushes == [1]
    assert d.run(T_DISCARD, out=struct.pack("<QII", 0, 8, 0))[0] == S_UNSUPP
    d.close()


def test_read_only_disk_refuses_writes_and_keeps_the_image(memory, tmp_path):
    path = tmp_path / "d.raw"
    create_image(path, "raw", DISK)
    path.write_bytes(b"\x11" * DISK)
    d = Disk(memory, path, read_only=True, features=VERSION_1 | 1 << VIRTIO_BLK_F_RO | 1 << VIRTIO_BLK_F_FLUSH)
    assert d.run(T_OUT, 0, out=b"\x22" * 4096)[0] == S_IOERR
    assert d.run(T_WRITE_ZEROES, out=struct.pack("<QII", 0, 8, 0))[0] == S_UNSUPP  # not offered
    status, data, _ = d.run(T_IN, 0, in_len=512)
    assert status == S_OK and data == b"\x11" * 512
    assert d.run(T_FLUSH)[0] == S_OK
    d.close()
    assert path.read_bytes() == b"\x11" * DISK


def test_no_status_byte_or_a_buffer_outside_memory_needs_reset(memory, tmp_path):
    create_image(tmp_path / "d.raw", "raw", DISK)
    for segments in ([(HDR, 16, False)],  # nothing device-writable
                     [(HDR, 16, False), (0x7FFFF000, 512, True), (HDR + 16, 1, True)]):  # outside guest RAM
        d = Disk(memory, tmp_path / "d.raw")
        memory.write(HDR, header(T_IN, 0))
        d.ring.add(segments)
        d.driver.notify(0)
        assert d.driver.status & STATUS_DEVICE_NEEDS_RESET
        assert d.ring.take_used() == []
        d.close()


def test_a_round_is_bounded_and_continues(memory, tmp_path):
    create_image(tmp_path / "d.raw", "raw", DISK)
    d = Disk(memory, tmp_path / "d.raw")
    later = []
    d.transport.reschedule = later.append
    for i in range(QSIZE):
        memory.write(HDR + 32 * (i % 32), header(T_FLUSH))
    for i in range(QSIZE // 2):  # 32 two-descriptor requests, then 32 more after they are used
        d.ring.add([(HDR + 32 * i, 16, False), (HDR + 32 * i + 16, 1, True)])
    d.blk.ROUND_CHAINS = 10
    d.driver.notify(0)
    assert len(d.ring.take_used()) == 10 and later == [0]
    while later:
        later.pop()
        d.transport.process_queue(0)
    assert d.blk.flushes == 32
    d.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(spec=hostile_rings())
def test_hostile_rings_through_the_disk(spec, tmp_path_factory):
    """Random descriptor tables: status bytes or NEEDS_RESET, never an exception or a stray write."""
    path = tmp_path_factory.mktemp("hostile") / "d.raw"
    create_image(path, "raw", 64 << 10)
    with hostile_memory() as memory:
        recorder = RecordingMemory(memory)
        image = open_image(path, format="raw")
        blk = VirtioBlk(image, queue_size=8)
        transport = VirtioMmioDevice(blk, recorder, lambda level: None)
        driver = MmioDriver(transport, memory)
        assert driver.negotiate(ALL)
        write_hostile_ring(memory, spec, *RING)
        # Whatever the descriptors point at that is a header, make some of them requests.
        for kind, where in ((T_IN, 0x10000), (T_OUT, 0x10010), (T_GET_ID, 0x10020)):
            memory.write(where, header(kind, 1))
        driver.w32(R.QUEUE_SEL, 0)
        driver.w32(R.QUEUE_NUM, spec["size"])
        for low, addr in zip((R.QUEUE_DESC_LOW, R.QUEUE_DRIVER_LOW, R.QUEUE_DEVICE_LOW), RING):
            driver.w32(low, addr)
        driver.w32(R.QUEUE_READY, 1)
        before = snapshot(memory)
        driver.add_status(4)
        driver.notify(0)
        assert recorder.violations == []
        check_writes(memory, before, recorder.writes, [(RING[0], spec["size"])], [(RING[2], spec["size"])])
        blk.close()
