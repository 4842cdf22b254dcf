"""An ATA disk on a PC's primary IDE channel, PIO only: the fully emulated disk.

The register interface is ATA/ATAPI-6's (T13 1410D, the register chapter) and the
commands are ATA8-ACS's (T13 1699-D).  The channel has two blocks of
registers; the platform maps them at the PC's legacy ports (0x1f0-0x1f7 and
0x3f6, IRQ 14: ``pykvm.platform.layout``), each as a device of its own
(:class:`AtaChannel` and its :attr:`~AtaChannel.control` block), because a
device sees offsets in its range, never ports.

Command block (:class:`AtaChannel`, 8 bytes)::

    off  read               write
    0    data (16 or 32 bits; 8-bit accesses read all ones, writes are dropped)
    1    error              features
    2    sector count       sector count
    3    LBA low            LBA low          (CHS: sector number)
    4    LBA mid            LBA mid          (CHS: cylinder low)
    5    LBA high           LBA high         (CHS: cylinder high)
    6    device             device           (bit 6 LBA, bit 4 DEV, bits 3-0 LBA 27-24 / head)
    7    status             command          (reading status clears a pending interrupt)

Control block (``channel.control``, 1 byte): alternate status on reads (no
side effect), device control on writes (bit 1 nIEN, bit 2 SRST, bit 7 HOB:
read the previous, "high order", byte of the 48-bit registers).

Each of features, sector count and the LBA registers is a two-byte FIFO
(the 48-bit address feature set): a write moves the current byte to the high-order one.
An LBA48 command (READ/WRITE SECTORS EXT) takes a 16-bit count (0 means
65536) and a 48-bit address from both; an LBA28 command a byte of count (0
means 256) and 28 bits of address.

Commands, all completed at once (the emulation is synchronous, so BSY is
seen only while SRST is held):

=======================  ====  ============================================
IDENTIFY DEVICE          ECh   512 bytes of PIO data-in (:func:`identify_block`)
READ SECTORS (EXT)       20h/21h (24h)  PIO data-in: DRQ and an interrupt per sector
WRITE SECTORS (EXT)      30h/31h (34h)  PIO data-out: DRQ per sector; each sector
                                 goes to the image when its last word arrives,
                                 then an interrupt (the last one: completion)
READ VERIFY SECTORS      40h/41h (42h)  bounds check only, then an interrupt
FLUSH CACHE (EXT)        E7h (EAh)   BlockImage.flush()
SET FEATURES             EFh   02h/82h write cache on/off (off: each sector
                                 is flushed), 03h transfer mode (PIO 0-4),
                                 55h/AAh look-ahead, 66h/CCh revert defaults
EXECUTE DIAGNOSTIC       90h   error 01h: device 0 passed, device 1 absent
INITIALIZE DEV. PARAMS   91h   accepted (the CHS geometry stays 16 x 63)
IDLE/STANDBY IMMEDIATE   E1h/E0h, CHECK POWER MODE E5h (count FFh: active)
anything else            --    ERR with ABRT (IDENTIFY PACKET DEVICE, NOP, DMA ...)
=======================  ====  ============================================

Errors: a command that reaches past the last sector ends with ERR and
IDNF, before the image is touched; an image read that fails ends with ERR
and UNC, a write the image refuses (read-only) with ERR and ABRT, and a
host I/O error on write or flush with DF and ERR.  Device 1 is absent: with
DEV set, status and error read 0 (device 0 answers for an absent device 1,
as QEMU's PIIX IDE does) and commands are ignored.

The interrupt line, ``interrupt(level)``, is high while an interrupt is
pending and nIEN is clear.  Device tests need no VM (``tests/test_ata.py``).
"""

from __future__ import annotations

from collections.abc import Callable

from pykvm.errors import ImageError
from pykvm.ratelimit import GuestLog

__all__ = ["AtaChannel", "AtaControl", "SECTOR", "identify_block"]

SECTOR = 512
LBA28_MAX = (1 << 28) - 1  # sectors an LBA28 command can address (word 60-61's limit)
CHS_HEADS, CHS_SECTORS, CHS_CYLINDERS_MAX = 16, 63, 16383

# Status and error register bits (ATA/ATAPI-6's register descriptions).
BSY, DRDY, DF, DSC, DRQ, ERR = 0x80, 0x40, 0x20, 0x10, 0x08, 0x01
ABRT, IDNF, UNC = 0x04, 0x10, 0x40
# Device control and device register bits.
NIEN, SRST, HOB = 0x02, 0x04, 0x80
DEV, LBA_MODE = 0x10, 0x40

# Command codes (ATA8-ACS's command matrix).
READ_SECTORS, READ_SECTORS_NORETRY, READ_SECTORS_EXT = 0x20, 0x21, 0x24
WRITE_SECTORS, WRITE_SECTORS_NORETRY, WRITE_SECTORS_EXT = 0x30, 0x31, 0x34
READ_VERIFY, READ_VERIFY_NORETRY, READ_VERIFY_EXT = 0x40, 0x41, 0x42
EXECUTE_DIAGNOSTIC, INITIALIZE_PARAMETERS = 0x90, 0x91
STANDBY_IMMEDIATE, IDLE_IMMEDIATE, CHECK_POWER_MODE = 0xE0, 0xE1, 0xE5
FLUSH_CACHE, FLUSH_CACHE_EXT = 0xE7, 0xEA
IDENTIFY_DEVICE, SET_FEATURES = 0xEC, 0xEF

# SET FEATURES subcommands (ATA8-ACS, SET FEATURES).
SF_WRITE_CACHE_ON, SF_WRITE_CACHE_OFF = 0x02, 0x82
SF_TRANSFER_MODE = 0x03
SF_LOOKAHEAD_OFF, SF_LOOKAHEAD_ON = 0x55, 0xAA
SF_REVERT_OFF, SF_REVERT_ON = 0x66, 0xCC

_READS = {READ_SECTORS: False, READ_SECTORS_NORETRY: False, READ_SECTORS_EXT: True}
_WRITES = {WRITE_SECTORS: False, WRITE_SECTORS_NORETRY: False, WRITE_SECTORS_EXT: True}
_VERIFIES = {READ_VERIFY: False, READ_VERIFY_NORETRY: False, READ_VERIFY_EXT: True}


def _ata_string(text: str, length: int) -> bytes:
    """An ATA string field: ASCII padded with spaces, the first character of each word in its high byte."""
    raw = text.encode("ascii", "replace")[:length].ljust(length, b" ")
    return bytes(raw[i ^ 1] for i in range(length))


def identify_block(sectors: int, *, serial: str, model: str, firmware: str,
                   write_cache: bool = True, lookahead: bool = True) -> bytes:
    """The 512 bytes IDENTIFY DEVICE returns for a disk of ``sectors`` (ATA8-ACS, IDENTIFY DEVICE's data table).

    A fixed ATA device with LBA and the 48-bit feature set, PIO modes 0-4,
    no DMA, no READ/WRITE MULTIPLE; word 255 carries the checksum, so the
    512 bytes sum to 0 modulo 256.
    """
    w = [0] * 256
    cylinders = max(1, min(CHS_CYLINDERS_MAX, sectors // (CHS_HEADS * CHS_SECTORS)))
    chs_capacity = cylinders * CHS_HEADS * CHS_SECTORS
    lba28 = min(sectors, LBA28_MAX)
    w[0] = 0x0040  # bit 15 clear: ATA device; bit 6: fixed (not removable)
    w[1], w[3], w[6] = cylinders, CHS_HEADS, CHS_SECTORS  # default CHS translation
    w[47] = 0x8000  # bits 15:8 = 80h; 0 sectors per READ/WRITE MULTIPLE (not supported)
    w[49] = 1 << 11 | 1 << 9  # IORDY supported, LBA supported (bit 8, DMA: no)
    w[50] = 0x4000  # bit 14 shall be one
    w[51] = 0x0200  # PIO timing mode 2 (obsolete word, as drives still report it)
    w[53] = 0x0003  # words 54-58 and 64-70 are valid
    w[54], w[55], w[56] = cylinders, CHS_HEADS, CHS_SECTORS  # current CHS geometry
    w[57], w[58] = chs_capacity & 0xFFFF, chs_capacity >> 16
    w[60], w[61] = lba28 & 0xFFFF, lba28 >> 16  # total user addressable sectors, LBA28
    w[64] = 0x0003  # advanced PIO modes 3 and 4
    w[65] = w[66] = w[67] = w[68] = 120  # cycle times in ns (PIO 4)
    w[80] = 0x01F0  # major versions: ATA/ATAPI-4 to ATA8-ACS
    w[82] = 1 << 14 | 1 << 6 | 1 << 5  # NOP (it aborts, as specified), look-ahead, write cache
    w[83] = 0x4000 | 1 << 13 | 1 << 12 | 1 << 10  # FLUSH CACHE EXT, FLUSH CACHE, 48-bit address
    w[84] = 0x4000
    w[85] = 1 << 14 | (1 << 6 if lookahead else 0) | (1 << 5 if write_cache else 0)  # enabled: as 82
    w[86] = 1 << 13 | 1 << 12 | 1 << 10  # enabled: as 83
    w[87] = 0x4000
    w[93] = 0x400B  # hardware reset result: device 0, number by jumper, passed diagnostics
    for i in range(4):  # words 100-103: total user addressable sectors, LBA48
        w[100 + i] = sectors >> (16 * i) & 0xFFFF
    w[106] = 0x4000  # valid; one 512-byte logical sector per physical sector
    data = bytearray(b"".join(v.to_bytes(2, "little") for v in w))
    data[20:40] = _ata_string(serial, 20)  # words 10-19
    data[46:54] = _ata_string(firmware, 8)  # words 23-26
    data[54:94] = _ata_string(model, 40)  # words 27-46
    data[510] = 0xA5  # word 255: signature, then the checksum byte
    data[511] = -sum(data[:511]) & 0xFF
    return bytes(data)


class AtaControl:
    """The channel's control block (one port, 0x3f6): alternate status and device control."""

    name = "ide0-control"
    length = 1

    def __init__(self, channel: "AtaChannel") -> None:
        self.channel = channel

    def read(self, offset: int, size: int) -> bytes:
        return bytes([self.channel.alt_status()]) * size

    def write(self, offset: int, data: bytes) -> None:
        if data:
            self.channel.device_control(data[0])


class AtaChannel:
    """A primary IDE channel with one ATA disk (device 0) on a ``BlockImage``; device 1 absent.

    ``image``: the disk (``pykvm.block.BlockImage``: ``size``, ``read``,
    ``write``, ``flush``; the caller owns it).  ``interrupt(level)``: the
    channel's IRQ line.  ``serial``/``model``/``firmware``: IDENTIFY's strings.
    """

    name = "ide0"
    length = 8

    def __init__(self, image, interrupt: Callable[[bool], None] | None = None, *, serial: str = "PYKVM0001",
                 model: str = "PYKVM HARDDISK", firmware: str = "1.0") -> None:
        self.image = image
        self.interrupt = interrupt
        self.sectors = image.size // SECTOR
        self.serial, self.model, self.firmware = serial, model, firmware
        self.control = AtaControl(self)
        self._log = GuestLog("pykvm.devices.ata")
        self.stats = {"commands": 0, "sectors_read": 0, "sectors_written": 0, "errors": 0}
        self.write_cache = True
        self.lookahead = True
        self._irq_level = False
        self.device_control_reg = 0
        self.reset()

    # -- reset and signature -----------------------------------------------------
    def reset(self) -> None:
        """Power-on or software reset: the ATA signature in the task file, DRDY."""
        self._set_signature()
        self.error = 0x01  # diagnostic code: device 0 passed, device 1 not present
        self.status = DRDY | DSC
        self._buf = b""
        self._pos = self._end = 0
        self._pending = False
        self._transfer = None  # None, or (write, next_lba, sectors_left) of a PIO command
        self._update_irq()

    def _set_signature(self) -> None:
        # An ATA device's signature: count 01h, LBA low 01h, mid 00h, high 00h, device 00h.
        self.features = self.hob_features = 0
        self.count, self.hob_count = 1, 0
        self.lba_low, self.lba_mid, self.lba_high = 1, 0, 0
        self.hob_lba_low = self.hob_lba_mid = self.hob_lba_high = 0
        self.device = 0

    # -- the interrupt line ------------------------------------------------------
    def _update_irq(self) -> None:
        level = self._pending and not self.device_control_reg & NIEN
        if level != self._irq_level:
            self._irq_level = level
            if self.interrupt is not None:
                self.interrupt(level)

    def _raise(self) -> None:
        self._pending = True
        self._update_irq()

    @property
    def irq_pending(self) -> bool:
        """The device has an interrupt pending (INTRQ, whether or not nIEN masks it)."""
        return self._pending

    # -- the control block ------------------------------------------------------------
    def alt_status(self) -> int:
        """Alternate status: the status register without clearing a pending interrupt."""
        if self.device & DEV:
            return 0
        return BSY if self.device_control_reg & SRST else self.status

    def device_control(self, value: int) -> None:
        old, self.device_control_reg = self.device_control_reg, value & (HOB | SRST | NIEN)
        if value & SRST and not old & SRST:
            self.status = BSY  # held in reset while SRST is one
            self._transfer, self._pos, self._end = None, 0, 0
            self._pending = False
        elif old & SRST and not value & SRST:
            self.reset()  # SRST cleared: the reset completes (at once here), no interrupt
        self._update_irq()

    # -- the command block ------------------------------------------------------------
    def read(self, offset: int, size: int) -> bytes:
        if offset == 0 and size in (2, 4):
            return self._read_data(size)
        return bytes(self._read_register(offset + i) for i in range(size))

    def read_string(self, offset: int, size: int, count: int) -> bytes:
        """``count`` reads of ``size`` bytes at once (REP INSW/INSD: KVM hands over up to a page).

        The bytes, and the state after, are those of ``count`` calls of
        :meth:`read`; the data port's sector buffer is just sliced instead.
        """
        if offset != 0 or size not in (2, 4):
            return b"".join(self.read(offset, size) for _ in range(count))
        parts = []
        while count:
            left = self._end - self._pos
            if not self._data_in() or left % size:
                parts.append(self._read_data(size))  # no transfer, or an odd tail: word by word
                count -= 1
                continue
            n = min(count, left // size)
            pos, self._pos = self._pos, self._pos + n * size
            parts.append(self._buf[pos:self._pos])
            count -= n
            if self._pos >= self._end:
                self._block_read()
        return b"".join(parts)

    def write(self, offset: int, data: bytes) -> None:
        if offset == 0 and len(data) in (2, 4):
            self._write_data(data)
            return
        for i, value in enumerate(data):
            self._write_register(offset + i, value)

    def _read_register(self, reg: int) -> int:
        hob = self.device_control_reg & HOB
        absent = self.device & DEV  # device 1 selected: there is none
        if reg == 0:
            return 0xFF  # an 8-bit data access: the data port is 16 bits wide
        if reg == 1:
            return 0 if absent else self.hob_features if hob else self.error
        if reg == 2:
            return self.hob_count if hob else self.count
        if reg == 3:
            return self.hob_lba_low if hob else self.lba_low
        if reg == 4:
            return self.hob_lba_mid if hob else self.lba_mid
        if reg == 5:
            return self.hob_lba_high if hob else self.lba_high
        if reg == 6:
            return self.device | 0xA0  # bits 7 and 5 are obsolete and read as one
        if absent:
            return 0
        if self.device_control_reg & SRST:
            return BSY
        if self._pending:
            self._pending = False  # reading status acknowledges the interrupt
            self._update_irq()
        return self.status

    def _write_register(self, reg: int, value: int) -> None:
        self.device_control_reg &= ~HOB  # a write to any command block register clears HOB
        if reg == 1:
            self.hob_features, self.features = self.features, value
        elif reg == 2:
            self.hob_count, self.count = self.count, value
        elif reg == 3:
            self.hob_lba_low, self.lba_low = self.lba_low, value
        elif reg == 4:
            self.hob_lba_mid, self.lba_mid = self.lba_mid, value
        elif reg == 5:
            self.hob_lba_high, self.lba_high = self.lba_high, value
        elif reg == 6:
            self.device = value & 0x5F
        elif reg == 7:
            self._command(value)
        # reg 0: an 8-bit write to the data port is dropped

    # -- PIO data ------------------------------------------------------------------------
    def _data_in(self) -> bool:
        """A PIO data-in block is ready for the host (DRQ, device 0)."""
        return bool(self.status & DRQ) and self._transfer is not None and not self._transfer[0] \
            and not self.device & DEV

    def _read_data(self, size: int) -> bytes:
        pos = self._pos
        if not self._data_in():
            return b"\xff" * size  # no data-in transfer: nobody drives the bus
        self._pos = pos + size
        data = self._buf[pos:pos + size]
        if self._pos >= self._end:
            self._block_read()
        return data.ljust(size, b"\xff")

    def _write_data(self, data: bytes) -> None:
        if self.status & DRQ == 0 or self._transfer is None or not self._transfer[0] or self.device & DEV:
            return  # no data-out transfer: the write goes nowhere
        pos = self._pos
        take = min(len(data), self._end - pos)
        self._buf[pos:pos + take] = data[:take]
        self._pos = pos + take
        if self._pos >= self._end:
            self._block_written()

    def _block_read(self) -> None:
        """The host has read the whole data block: the next sector, or the end of the command."""
        _, lba, left = self._transfer
        if left == 0:
            self._finish()
            return
        self._load_sector(lba, left)

    def _load_sector(self, lba: int, left: int) -> None:
        try:
            self._buf = self.image.read(lba * SECTOR, SECTOR)
        except (ImageError, OSError) as exc:
            self._fail(UNC, f"read of sector {lba} failed: {exc}")
            return
        self.stats["sectors_read"] += 1
        self._transfer = (False, lba + 1, left - 1)
        self._pos, self._end = 0, SECTOR
        self.status = DRDY | DSC | DRQ
        self._raise()  # PIO data-in: an interrupt as each block becomes ready

    def _block_written(self) -> None:
        """The host has written a whole sector: it goes to the image, then DRQ for the next or completion."""
        _, lba, left = self._transfer
        try:
            self.image.write(lba * SECTOR, bytes(self._buf))  # the buffer is reused for the next sector
            if not self.write_cache:
                self.image.flush()
        except ImageError as exc:
            self._fail(ABRT, f"write of sector {lba} refused: {exc}")
            return
        except OSError as exc:
            self._fail(ABRT, f"write of sector {lba} failed: {exc}", fault=True)
            return
        self.stats["sectors_written"] += 1
        left -= 1
        if left == 0:
            self._finish()
            self._raise()  # PIO data-out: the last interrupt is the command's completion
            return
        self._transfer = (True, lba + 1, left)
        self._pos = 0
        self.status = DRDY | DSC | DRQ
        self._raise()

    def _finish(self) -> None:
        self._transfer = None
        self._pos = self._end = 0
        self.status = DRDY | DSC

    def _fail(self, error: int, why: str, *, fault: bool = False) -> None:
        self.stats["errors"] += 1
        self._log.warning(("ata", error), "ide0: %s", why)
        self._transfer = None
        self._pos = self._end = 0
        self.error = error
        self.status = DRDY | ERR | (DF if fault else DSC)
        self._raise()

    def _complete(self) -> None:
        """A non-data command completed without error."""
        self.error = 0
        self.status = DRDY | DSC
        self._raise()

    # -- commands ------------------------------------------------------------------------------
    def _command(self, code: int) -> None:
        if self.device & DEV:
            return  # for device 1, which is not there: ignored (no one answers)
        if self.device_control_reg & SRST:
            return  # held in reset
        self.stats["commands"] += 1
        self._transfer = None
        self._pos = self._end = 0
        self._pending = False
        self.error = 0
        if code in _READS or code in _WRITES or code in _VERIFIES:
            ext = _READS.get(code, _WRITES.get(code, _VERIFIES.get(code)))
            lba, count = self._address(ext)
            if lba + count > self.sectors:
                self._fail(IDNF, f"command {code:#04x}: sectors {lba}+{count} beyond the "
                                 f"{self.sectors}-sector disk")
            elif code in _READS:
                self._load_sector(lba, count)
            elif code in _WRITES:
                if getattr(self.image, "read_only", False):
                    self._fail(ABRT, "write to a read-only disk")
                    return
                self._transfer = (True, lba, count)
                self._buf = bytearray(SECTOR)
                self._pos, self._end = 0, SECTOR
                self.status = DRDY | DSC | DRQ  # no interrupt before the first block of a PIO write
            else:
                self._complete()  # READ VERIFY: nothing to transfer, the range exists
        elif code == IDENTIFY_DEVICE:
            self._buf = identify_block(self.sectors, serial=self.serial, model=self.model,
                                       firmware=self.firmware, write_cache=self.write_cache,
                                       lookahead=self.lookahead)
            self._transfer = (False, 0, 0)
            self._pos, self._end = 0, SECTOR
            self.status = DRDY | DSC | DRQ
            self._raise()
        elif code in (FLUSH_CACHE, FLUSH_CACHE_EXT):
            try:
                self.image.flush()
            except (ImageError, OSError) as exc:
                self._fail(ABRT, f"flush failed: {exc}", fault=True)
                return
            self._complete()
        elif code == SET_FEATURES:
            self._set_features()
        elif code == EXECUTE_DIAGNOSTIC:
            self._set_signature()
            self.error = 0x01
            self.status = DRDY | DSC
            self._raise()
        elif code == CHECK_POWER_MODE:
            self.count = 0xFF  # active or idle
            self._complete()
        elif code in (INITIALIZE_PARAMETERS, IDLE_IMMEDIATE, STANDBY_IMMEDIATE):
            self._complete()
        else:
            self._fail(ABRT, f"command {code:#04x} is not supported")

    def _address(self, ext: bool) -> tuple[int, int]:
        """(first sector, sectors) from the task file, for an LBA48 (``ext``) or LBA28/CHS command."""
        if ext:
            count = self.hob_count << 8 | self.count or 0x10000
            lba = (self.hob_lba_high << 40 | self.hob_lba_mid << 32 | self.hob_lba_low << 24
                   | self.lba_high << 16 | self.lba_mid << 8 | self.lba_low)
            return lba, count
        count = self.count or 0x100
        if self.device & LBA_MODE:
            return (self.device & 0x0F) << 24 | self.lba_high << 16 | self.lba_mid << 8 | self.lba_low, count
        cylinder, head, sector = self.lba_high << 8 | self.lba_mid, self.device & 0x0F, self.lba_low
        if sector == 0:  # sectors count from 1: sector 0 addresses nothing
            return self.sectors, count
        return (cylinder * CHS_HEADS + head) * CHS_SECTORS + sector - 1, count

    def _set_features(self) -> None:
        sub = self.features
        if sub in (SF_WRITE_CACHE_ON, SF_WRITE_CACHE_OFF):
            if sub == SF_WRITE_CACHE_OFF and self.write_cache:
                try:
                    self.image.flush()  # what the cache held becomes durable before it goes away
                except (ImageError, OSError) as exc:
                    self._fail(ABRT, f"flush failed: {exc}", fault=True)
                    return
            self.write_cache = sub == SF_WRITE_CACHE_ON
        elif sub in (SF_LOOKAHEAD_ON, SF_LOOKAHEAD_OFF):
            self.lookahead = sub == SF_LOOKAHEAD_ON
        elif sub == SF_TRANSFER_MODE:
            mode = self.count
            # 00h PIO default, 01h PIO default without IORDY, 08h-0Ch PIO flow control mode 0-4
            if not (mode in (0x00, 0x01) or 0x08 <= mode <= 0x0C):
                self._fail(ABRT, f"SET FEATURES: transfer mode {mode:#04x} (only PIO modes 0-4)")
                return
        elif sub not in (SF_REVERT_ON, SF_REVERT_OFF):
            self._fail(ABRT, f"SET FEATURES subcommand {sub:#04x} is not supported")
            return
        self._complete()
