"""The ATA PIO disk model (pykvm.devices.ata), driven as a driver would drive it: no VM.

A small driver below speaks to the channel's command and control blocks
through ``read``/``write`` at offsets, as the bus would: it selects device
0, loads the task file, writes the command, polls status, moves data
through the 16-bit (or 32-bit) data port.  The disk is a real raw image.
"""

from __future__ import annotations

import os
import random
import struct

import pytest

from pykvm.block import RawImage, create_image
from pykvm.devices import ata
from pykvm.devices.ata import ABRT, BSY, DF, DRDY, DRQ, ERR, IDNF, NIEN, SECTOR, SRST, AtaChannel

SECTORS = 2048  # a 1 MiB disk


class Line:
    """The interrupt line: its current level and every change."""

    def __init__(self) -> None:
        self.level = False
        self.changes: list[bool] = []

    def __call__(self, level: bool) -> None:
        self.level = level
        self.changes.append(level)


class Driver:
    """Register-level ATA PIO, as ATA/ATAPI-6 describes the host's protocol."""

    def __init__(self, channel: AtaChannel) -> None:
        self.ch = channel

    def outb(self, reg: int, value: int) -> None:
        self.ch.write(reg, bytes([value]))

    def inb(self, reg: int) -> int:
        return self.ch.read(reg, 1)[0]

    def status(self) -> int:
        return self.inb(7)

    def alt_status(self) -> int:
        return self.ch.control.read(0, 1)[0]

    def control(self, value: int) -> None:
        self.ch.control.write(0, bytes([value]))

    def task_file(self, lba: int, count: int, ext: bool, device: int = 0) -> None:
        if ext:
            for reg, value in ((2, count >> 8), (3, lba >> 24), (4, lba >> 32), (5, lba >> 40)):
                self.outb(reg, value & 0xFF)
            self.outb(6, 0x40 | device << 4)
        else:
            self.outb(6, 0xE0 | device << 4 | (lba >> 24 & 0x0F))
        for reg, value in ((2, count), (3, lba), (4, lba >> 8), (5, lba >> 16)):
            self.outb(reg, value & 0xFF)

    def read_block(self, width: int = 2) -> bytes:
        assert self.status() & (DRQ | ERR | BSY) == DRQ
        return b"".join(self.ch.read(0, width) for _ in range(SECTOR // width))

    def write_block(self, data: bytes, width: int = 2) -> None:
        assert self.alt_status() & (DRQ | ERR | BSY) == DRQ
        for i in range(0, SECTOR, width):
            self.ch.write(0, data[i:i + width])

    def read_sectors(self, lba: int, count: int, *, ext: bool = False, width: int = 2) -> bytes:
        self.task_file(lba, count, ext)
        self.outb(7, ata.READ_SECTORS_EXT if ext else ata.READ_SECTORS)
        data = b"".join(self.read_block(width) for _ in range(count or (0x10000 if ext else 0x100)))
        assert self.status() & (DRQ | ERR | BSY) == 0
        return data

    def write_sectors(self, lba: int, data: bytes, *, ext: bool = False, width: int = 2) -> None:
        count = len(data) // SECTOR
        self.task_file(lba, count, ext)
        self.outb(7, ata.WRITE_SECTORS_EXT if ext else ata.WRITE_SECTORS)
        for i in range(count):
            self.write_block(data[i * SECTOR:(i + 1) * SECTOR], width)
        assert self.status() & (DRQ | ERR | BSY) == 0

    def identify(self) -> bytes:
        self.outb(6, 0xA0)
        self.outb(7, ata.IDENTIFY_DEVICE)
        return self.read_block()


@pytest.fixture
def disk(tmp_path):
    path = tmp_path / "disk.img"
    create_image(path, "raw", SECTORS * SECTOR)
    with RawImage.open(path) as image:
        yield path, image


@pytest.fixture
def rig(disk):
    path, image = disk
    line = Line()
    channel = AtaChannel(image, line)
    return Driver(channel), channel, line, path


def pattern(lba: int, count: int) -> bytes:
    return b"".join(struct.pack("<I", lba + i) * (SECTOR // 4) for i in range(count))


def words(block: bytes) -> list[int]:
    return list(struct.unpack("<256H", block))


def ata_string(block: bytes, first: int, last: int) -> str:
    raw = block[2 * first:2 * (last + 1)]
    return bytes(raw[i ^ 1] for i in range(len(raw))).decode("ascii").rstrip()


# --- IDENTIFY DEVICE ----------------------------------------------------------------------

def test_identify_describes_the_disk(rig):
    drv, channel, line, _ = rig
    block = drv.identify()
    w = words(block)
    assert sum(block) % 256 == 0 and w[255] & 0xFF == 0xA5  # the integrity word
    assert w[0] & 0x8000 == 0  # an ATA device
    assert ata_string(block, 27, 46) == "PYKVM HARDDISK" and ata_string(block, 10, 19) == "PYKVM0001"
    assert ata_string(block, 23, 26) == "1.0"
    assert w[60] | w[61] << 16 == SECTORS
    assert w[100] | w[101] << 16 | w[102] << 32 | w[103] << 48 == SECTORS
    assert w[49] & 1 << 9  # LBA
    assert w[83] & (1 << 10 | 1 << 12 | 1 << 13) == 1 << 10 | 1 << 12 | 1 << 13  # LBA48, FLUSH (EXT)
    assert w[86] & 1 << 10 and w[83] & 0xC000 == 0x4000
    assert w[1] * w[3] * w[6] <= SECTORS and w[57] | w[58] << 16 == w[1] * w[3] * w[6]
    assert drv.status() == DRDY | 0x10  # the block read, the command is done


def test_identify_of_a_large_disk_caps_lba28():
    block = ata.identify_block(1 << 30, serial="S", model="M", firmware="F")
    w = words(block)
    assert w[60] | w[61] << 16 == (1 << 28) - 1
    assert w[100] | w[101] << 16 | w[102] << 32 == 1 << 30
    assert w[1] == 16383 and sum(block) % 256 == 0


def test_identify_interrupts_once_and_status_read_acknowledges(rig):
    drv, channel, line, _ = rig
    drv.outb(6, 0xA0)
    drv.outb(7, ata.IDENTIFY_DEVICE)
    assert line.level and channel.irq_pending
    assert drv.alt_status() & DRQ and line.level  # alternate status does not acknowledge
    assert drv.status() & DRQ and not line.level  # status does
    for _ in range(256):
        channel.read(0, 2)
    assert not line.level and drv.status() == DRDY | 0x10


# --- data ---------------------------------------------------------------------------------

@pytest.mark.parametrize("ext", [False, True], ids=["lba28", "lba48"])
@pytest.mark.parametrize("width", [2, 4], ids=["pio16", "pio32"])
def test_write_then_read_back(rig, ext, width):
    drv, channel, line, path = rig
    data = pattern(100, 5)
    drv.write_sectors(100, data, ext=ext, width=width)
    assert drv.read_sectors(100, 5, ext=ext, width=width) == data
    with open(path, "rb") as f:  # the image itself holds the sectors
        f.seek(100 * SECTOR)
        assert f.read(5 * SECTOR) == data
    assert channel.stats["sectors_written"] == channel.stats["sectors_read"] == 5


def test_random_writes_match_a_model(rig):
    drv, channel, _, path = rig
    rng = random.Random(14)
    model = bytearray(SECTORS * SECTOR)
    for _ in range(20):
        lba, count = rng.randrange(SECTORS - 16), rng.randrange(1, 17)
        data = rng.randbytes(count * SECTOR)
        drv.write_sectors(lba, data, ext=rng.random() < 0.5)
        model[lba * SECTOR:(lba + count) * SECTOR] = data
    drv.outb(7, ata.FLUSH_CACHE)
    assert drv.status() == DRDY | 0x10
    assert drv.read_sectors(0, 0, ext=False) == bytes(model[:256 * SECTOR])  # count 0 = 256 sectors
    assert path.read_bytes() == bytes(model)


def test_interrupt_per_sector_on_reads_and_writes(rig):
    drv, channel, line, _ = rig
    drv.task_file(8, 3, False)
    drv.outb(7, ata.WRITE_SECTORS)
    assert not line.changes  # no interrupt before the first block of a PIO write
    for i in range(3):
        drv.write_block(pattern(i, 1))
        assert line.level  # each block done: an interrupt (the third: completion)
        drv.status()
    assert line.changes == [True, False] * 3
    line.changes.clear()
    drv.task_file(8, 3, False)
    drv.outb(7, ata.READ_SECTORS)
    for i in range(3):
        assert line.level  # each block ready: an interrupt
        assert drv.read_block() == pattern(i, 1)
    assert line.changes == [True, False] * 3 and not line.level


def test_nien_masks_the_line_but_not_the_protocol(rig):
    drv, channel, line, _ = rig
    drv.control(NIEN)
    drv.write_sectors(0, pattern(0, 2))
    assert drv.read_sectors(0, 2) == pattern(0, 2)
    assert line.changes == []
    drv.outb(7, ata.FLUSH_CACHE)
    assert channel.irq_pending and not line.level
    drv.control(0)  # unmasked: the pending interrupt reaches the line
    assert line.level


def test_chs_addressing(rig):
    drv, channel, _, _ = rig
    lba = (1 * 16 + 3) * 63 + 4  # cylinder 1, head 3, sector 5
    drv.write_sectors(lba, pattern(lba, 1))
    drv.outb(6, 0xA3)  # CHS, device 0, head 3
    for reg, value in ((2, 1), (3, 5), (4, 1), (5, 0)):
        drv.outb(reg, value)
    drv.outb(7, ata.READ_SECTORS)
    assert drv.read_block() == pattern(lba, 1)


def test_hob_reads_back_the_high_order_bytes(rig):
    drv, _, _, _ = rig
    drv.task_file(0x123456789A, 0x0102, True)
    drv.control(0x80)
    assert [drv.inb(r) for r in (2, 3, 4, 5)] == [0x01, 0x34, 0x12, 0x00]
    drv.control(0)
    assert [drv.inb(r) for r in (2, 3, 4, 5)] == [0x02, 0x9A, 0x78, 0x56]


def _channel_state(channel: AtaChannel) -> tuple:
    return (channel.status, channel.error, channel._pos, channel._end, channel._transfer, channel.irq_pending,
            dict(channel.stats))


@pytest.mark.parametrize("size, counts", [(2, [256] * 6), (2, [100, 300, 1000, 1]), (4, [128, 7, 1000]),
                                          (2, [255, 1, 2, 500])], ids=["sectors", "ragged", "dwords", "odd"])
def test_read_string_is_the_reads_one_by_one(disk, size, counts):
    """REP INSW in one call (Bus.read_string): the same bytes, status and interrupts as word by word."""
    path, image = disk
    lines, channels = [Line(), Line()], []
    for line in lines:
        channel = AtaChannel(image, line)
        Driver(channel).write_sectors(40, pattern(40, 3))
        Driver(channel).task_file(40, 3, False)
        channel.write(7, bytes([ata.READ_SECTORS]))
        channels.append(channel)
    bulk, single = channels
    for count in counts:  # more than the transfer holds at the end: all ones, as on the bus
        assert bulk.read_string(0, size, count) == b"".join(single.read(0, size) for _ in range(count))
        assert _channel_state(bulk) == _channel_state(single)
    assert lines[0].changes == lines[1].changes
    assert bulk.read_string(7, 1, 3) == single.read(7, 1) * 3  # other registers: one by one


def test_the_bus_hands_rep_ins_to_read_string(rig):
    from pykvm.platform.bus import Bus
    from pykvm.platform.vcpu_loop import dispatch
    from pykvm import exits

    drv, channel, _, _ = rig
    bus = Bus("pio")
    bus.register(0x1F0, 8, channel, "ide0")
    drv.write_sectors(3, pattern(3, 2))
    drv.task_file(3, 2, False)
    drv.outb(7, ata.READ_SECTORS)
    data = dispatch(exits.IoIn(0x1F0, 2, 512), bus, Bus("mmio"))  # two sectors in one exit
    assert data == pattern(3, 2) and bus.stats["ide0"] == 512
    assert drv.status() == DRDY | 0x10


# --- errors -------------------------------------------------------------------------------

@pytest.mark.parametrize("command", [ata.READ_SECTORS, ata.WRITE_SECTORS, ata.READ_VERIFY])
def test_beyond_the_last_sector_is_idnf_and_touches_nothing(rig, command):
    drv, channel, line, path = rig
    before = path.read_bytes()
    drv.task_file(SECTORS - 2, 4, False)  # starts inside, ends outside
    drv.outb(7, command)
    assert drv.status() == DRDY | ERR | 0x10 and drv.inb(1) == IDNF
    channel.write(0, b"\x55\xaa" * 2)  # data to nowhere
    assert drv.inb(7) & DRQ == 0 and path.read_bytes() == before
    drv.task_file(1 << 40, 1, True)
    drv.outb(7, ata.READ_SECTORS_EXT)
    assert drv.inb(1) == IDNF and channel.stats["sectors_read"] == 0


def test_the_last_sector_is_reachable(rig):
    drv, _, _, _ = rig
    drv.write_sectors(SECTORS - 1, pattern(7, 1), ext=True)
    assert drv.read_sectors(SECTORS - 1, 1) == pattern(7, 1)


@pytest.mark.parametrize("command", [0x00, 0xA1, 0xC8, 0xCA, 0xC4, 0xF8, 0x27, 0xB0, 0x5A])
def test_unknown_commands_abort(rig, command):
    drv, _, line, _ = rig
    drv.outb(7, command)  # NOP, IDENTIFY PACKET, READ/WRITE DMA, READ MULTIPLE, READ NATIVE MAX, SMART ...
    assert line.level
    assert drv.status() == DRDY | ERR | 0x10 and drv.inb(1) == ABRT
    assert drv.identify()[0:2] == b"\x40\x00"  # and the device still works


def test_set_features(rig):
    drv, channel, _, _ = rig
    for sub, count in ((0x82, 0), (0x02, 0), (0x03, 0x0C), (0x03, 0x01), (0xAA, 0), (0x55, 0), (0x66, 0)):
        drv.outb(1, sub)
        drv.outb(2, count)
        drv.outb(7, ata.SET_FEATURES)
        assert drv.status() == DRDY | 0x10, hex(sub)
    for sub, count in ((0x03, 0x45), (0x03, 0x22), (0x99, 0)):  # UDMA 5, MWDMA 2, nonsense
        drv.outb(1, sub)
        drv.outb(2, count)
        drv.outb(7, ata.SET_FEATURES)
        assert drv.status() & ERR and drv.inb(1) == ABRT, hex(sub)
    drv.outb(1, 0x82)
    drv.outb(7, ata.SET_FEATURES)
    assert not channel.write_cache and words(drv.identify())[85] & 1 << 5 == 0


def test_read_only_image_refuses_writes(disk):
    path, _ = disk
    with RawImage.open(path, read_only=True) as image:
        drv = Driver(AtaChannel(image))
        drv.task_file(0, 1, False)
        drv.outb(7, ata.WRITE_SECTORS)
        assert drv.status() & (ERR | DRQ) == ERR and drv.inb(1) == ABRT
        assert drv.read_sectors(0, 1) == bytes(SECTOR)


class FailingImage:
    """A BlockImage whose host file fails: reads raise ImageError, writes and flushes OSError."""

    size = 64 * SECTOR
    read_only = False

    def read(self, offset, length):
        from pykvm.errors import ImageError
        raise ImageError("bad sector")

    def write(self, offset, data):
        raise OSError(5, "Input/output error")

    def flush(self):
        raise OSError(5, "Input/output error")


def test_host_io_errors_become_ata_errors():
    drv = Driver(AtaChannel(FailingImage()))
    drv.task_file(0, 1, False)
    drv.outb(7, ata.READ_SECTORS)
    assert drv.status() == DRDY | ERR | 0x10 and drv.inb(1) == ata.UNC
    drv.task_file(0, 1, False)
    drv.outb(7, ata.WRITE_SECTORS)
    drv.write_block(bytes(SECTOR))
    assert drv.status() == DRDY | DF | ERR
    drv.outb(7, ata.FLUSH_CACHE)
    assert drv.status() & (DF | ERR) == DF | ERR


# --- device 1, reset ---------------------------------------------------------------------------

def test_absent_device_1_reads_as_no_device(rig):
    drv, channel, line, _ = rig
    drv.outb(6, 0xB0)  # DEV = 1
    assert drv.status() == 0 and drv.alt_status() == 0 and drv.inb(1) == 0
    drv.outb(7, ata.IDENTIFY_DEVICE)  # ignored: nobody there
    assert drv.status() == 0 and not line.changes and channel.read(0, 2) == b"\xff\xff"
    drv.outb(6, 0xA0)
    assert drv.status() == DRDY | 0x10


def test_software_reset_sets_the_signature(rig):
    drv, channel, line, _ = rig
    drv.task_file(5, 2, False)
    drv.outb(7, ata.READ_SECTORS)  # a transfer in progress
    drv.control(SRST)
    assert drv.alt_status() & BSY and drv.status() & BSY
    drv.outb(7, ata.IDENTIFY_DEVICE)  # ignored while in reset
    drv.control(0)
    assert drv.status() == DRDY | 0x10 and drv.inb(1) == 0x01
    assert [drv.inb(r) for r in (2, 3, 4, 5)] == [1, 1, 0, 0]  # the ATA signature
    assert channel.read(0, 2) == b"\xff\xff"  # the transfer is gone
    drv.outb(7, ata.EXECUTE_DIAGNOSTIC)
    assert drv.inb(1) == 0x01 and [drv.inb(r) for r in (2, 3, 4, 5)] == [1, 1, 0, 0]


# --- garbage ------------------------------------------------------------------------------------

def test_garbage_to_every_register_never_crashes(rig):
    drv, channel, line, path = rig
    rng = random.Random(1410)
    for _ in range(20000):
        if rng.random() < 0.05:
            drv.control(rng.randrange(256) & ~SRST if rng.random() < 0.9 else rng.randrange(256))
            continue
        offset = rng.randrange(8)
        size = rng.choice([1, 1, 2, 4])
        size = min(size, 8 - offset)
        if rng.random() < 0.5:
            data = channel.read(offset, size)
            assert len(data) == size
        else:
            channel.write(offset, rng.randbytes(size))
    assert os.path.getsize(path) == SECTORS * SECTOR  # never written out of range
    drv.control(SRST)
    drv.control(0)
    drv.outb(6, 0xA0)
    assert words(drv.identify())[60] == SECTORS
