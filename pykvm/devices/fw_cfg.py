"""QEMU's firmware configuration device (fw_cfg), x86 I/O-port interface.

The interface is QEMU's ``docs/specs/fw_cfg.rst``; where the text is silent
the behaviour follows ``hw/nvram/fw_cfg.c`` and ``hw/i386/fw_cfg.c``, because
firmware and kernels written for QEMU (SeaBIOS, kvm-unit-tests, Linux's
``qemu_fw_cfg`` driver) probe exactly that.

A guest selects an *item* by its 16-bit key and reads the item's bytes one
at a time, or has the device copy them into guest memory by DMA.  On x86 the
device is 12 ports at 0x510, registered here as one range::

    offset 0-1   selector, 16-bit write (0x510); offset 0 and 1 both read the
                 data byte, as QEMU's combined region does (its address is ignored)
    offset 1     data, 8-bit: each read returns the next byte of the item, 0 past its end
    offset 2-3   nothing (reads all-ones)
    offset 4-11  DMA address, 64-bit big-endian (0x514): a 32-bit write at 4 sets
                 the high half, a 32-bit write at 8 the low half and starts the
                 transfer, as does a 64-bit write at 4; reads give "QEMU CFG"

Items with keys 0x0000-0x001f are QEMU's well-known ones (their encodings
are in :meth:`FwCfg.for_pc`); keys from 0x0020 are *files*, named in the
file directory (key 0x0019) and kept sorted by name, as QEMU does for
machine types without the legacy order.  Keys with bit 15 set are x86's own
(ACPI tables, IRQ0 override, ...).  Writes through the data port are ignored
(QEMU dropped them in v2.4); a DMA write may change a file created writable.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

from pykvm.errors import DeviceError, GuestMemoryError
from pykvm.platform import layout
from pykvm.ratelimit import GuestLog

_log = GuestLog("pykvm.devices.fw_cfg")

# --- selector keys (QEMU include/standard-headers/linux/qemu_fw_cfg.h) -----------
SIGNATURE = 0x00  # b"QEMU"
ID = 0x01  # le32 feature bits
UUID = 0x02  # 16 bytes
RAM_SIZE = 0x03  # le64 bytes
NOGRAPHIC = 0x04  # le16
NB_CPUS = 0x05  # le16, CPUs present at boot
MACHINE_ID = 0x06
KERNEL_ADDR = 0x07  # le32
KERNEL_SIZE = 0x08  # le32
KERNEL_CMDLINE = 0x09  # le32 address of the command line (not used on x86)
INITRD_ADDR = 0x0A  # le32
INITRD_SIZE = 0x0B  # le32
BOOT_DEVICE = 0x0C
NUMA = 0x0D  # le64 words: node count, node of each APIC ID, memory of each node
BOOT_MENU = 0x0E  # le16
MAX_CPUS = 0x0F  # le16: on x86 the APIC ID limit
KERNEL_ENTRY = 0x10
KERNEL_DATA = 0x11  # the kernel's protected-mode part
INITRD_DATA = 0x12
CMDLINE_ADDR = 0x13  # le32
CMDLINE_SIZE = 0x14  # le32, including the terminating NUL
CMDLINE_DATA = 0x15  # the command line and its NUL
SETUP_ADDR = 0x16  # le32: where the real-mode setup code goes
SETUP_SIZE = 0x17  # le32
SETUP_DATA = 0x18
FILE_DIR = 0x19
FILE_FIRST = 0x20

WRITE_CHANNEL = 0x4000  # selector bit 14: ignored since QEMU v2.4
ARCH_LOCAL = 0x8000  # selector bit 15: an architecture's own item
ENTRY_MASK = 0x3FFF
INVALID = 0xFFFF

# x86's own keys (QEMU hw/i386/fw_cfg.h).
ACPI_TABLES = ARCH_LOCAL + 0
SMBIOS_ENTRIES = ARCH_LOCAL + 1
IRQ0_OVERRIDE = ARCH_LOCAL + 2
E820_TABLE = ARCH_LOCAL + 3
HPET = ARCH_LOCAL + 4

#: How many files fit in the directory: QEMU's default ``x-file-slots``.
FILE_SLOTS = 0x20
FILE_NAME_SIZE = 56  # bytes, NUL included
_DIR_ENTRY = struct.Struct(">IHH56s")  # size, select, reserved, name

# FW_CFG_ID bits.
VERSION_TRADITIONAL = 0x01
VERSION_DMA = 0x02

# FWCfgDmaAccess: be32 control, be32 length, be64 address.
_DMA_ACCESS = struct.Struct(">IIQ")
DMA_CTL_ERROR = 0x01
DMA_CTL_READ = 0x02
DMA_CTL_SKIP = 0x04
DMA_CTL_SELECT = 0x08
DMA_CTL_WRITE = 0x10
DMA_SIGNATURE = b"QEMU CFG"  # what the DMA address register reads as

# Register offsets inside the 12-port range.
SELECTOR_OFFSET = 0
DATA_OFFSET = 1
DMA_OFFSET = 4  # high half of the address; the low half is at DMA_OFFSET + 4
REGISTER_LENGTH = 12

# Where QEMU's x86_load_linux puts a modern (boot protocol >= 2.02) bzImage.
LINUX_SETUP_ADDR = 0x10000
LINUX_CMDLINE_ADDR = 0x20000
LINUX_KERNEL_ADDR = 0x100000

E820_RAM = 1
_ZERO_FILL_CHUNK = 1 << 20  # bytes zeroed per guest write when DMA reads past an item


class DmaMemory(Protocol):
    """What DMA needs of guest memory (``pykvm.memory.GuestMemory`` has it)."""

    def is_mapped(self, gpa: int, size: int = 1) -> bool: ...
    def read(self, gpa: int, size: int) -> bytes: ...
    def write(self, gpa: int, data: bytes) -> None: ...


@dataclass
class _Item:
    data: bytearray
    writable: bool = False


class FwCfg:
    """The fw_cfg device: items, the file directory, the port and DMA interfaces.

    ``memory`` gives DMA its guest memory; without it the device has no DMA
    interface (FW_CFG_ID says so and the DMA ports read all-ones), as QEMU's
    ``dma_enabled=off``.
    """

    name = "fw_cfg"
    length = REGISTER_LENGTH

    def __init__(self, memory: DmaMemory | None = None, *, file_slots: int = FILE_SLOTS) -> None:
        if not 0x10 <= file_slots <= ENTRY_MASK + 1 - FILE_FIRST:
            raise DeviceError(f"file_slots must be 0x10..{ENTRY_MASK + 1 - FILE_FIRST:#x}, not {file_slots:#x}")
        self.memory = memory
        self.file_slots = file_slots
        self._items: dict[int, _Item] = {}  # by key without the write-channel bit
        self._files: list[tuple[bytes, _Item]] = []  # sorted by name; key = FILE_FIRST + index
        self._selector = SIGNATURE
        self._offset = 0
        self._dma_address = 0
        #: Guest accesses the interface does not decode (wrong width or offset), ignored.
        self.ignored_accesses = 0
        self.dma_transfers = 0
        self.dma_errors = 0
        features = VERSION_TRADITIONAL | (VERSION_DMA if memory is not None else 0)
        self.add_item(SIGNATURE, b"QEMU")
        self.add_item(ID, struct.pack("<I", features))
        self._rebuild_directory()

    @property
    def dma_enabled(self) -> bool:
        return self.memory is not None

    # -- the host's side: building the items ------------------------------------

    def add_item(self, key: int, data: bytes) -> None:
        """Add the read-only item ``key`` (a well-known or x86 key, below 0x20 in its space)."""
        if key & WRITE_CHANNEL or not 0 <= key <= 0xFFFF or key & ENTRY_MASK >= FILE_FIRST:
            raise DeviceError(f"fw_cfg key {key:#x} is not a well-known or x86 key (files use add_file)")
        if key in self._items:
            raise DeviceError(f"fw_cfg key {key:#x} is already set")
        self._items[key] = _Item(bytearray(data))

    def add_file(self, name: str, data: bytes, *, writable: bool = False) -> int:
        """Add a file; return its key.  Keys follow name order, so a later file may move it."""
        encoded = name.encode("ascii", errors="replace")
        if not name.isascii() or not encoded or b"\0" in encoded or len(encoded) >= FILE_NAME_SIZE:
            raise DeviceError(f"fw_cfg file name {name!r} must be 1..{FILE_NAME_SIZE - 1} ASCII characters")
        if any(existing == encoded for existing, _ in self._files):
            raise DeviceError(f"fw_cfg file {name!r} already exists")
        if len(self._files) >= self.file_slots:
            raise DeviceError(f"fw_cfg has no free file slot for {name!r} ({self.file_slots} slots)")
        # QEMU inserts by strcmp(); bytes compare the same way.
        index = sum(1 for existing, _ in self._files if existing < encoded)
        self._files.insert(index, (encoded, _Item(bytearray(data), writable)))
        self._rebuild_directory()
        return FILE_FIRST + index

    def file_key(self, name: str) -> int:
        """The key the file ``name`` has now."""
        encoded = name.encode("ascii", errors="replace")
        for index, (existing, _) in enumerate(self._files):
            if existing == encoded:
                return FILE_FIRST + index
        raise DeviceError(f"no fw_cfg file {name!r}")

    def item_data(self, key: int) -> bytes:
        """The current bytes of item ``key`` (a DMA write may have changed a writable file)."""
        item = self._item(key)
        if item is None:
            raise DeviceError(f"no fw_cfg item {key:#x}")
        return bytes(item.data)

    def _rebuild_directory(self) -> None:
        # The directory has room for every slot, as QEMU allocates it: a
        # guest reads the count first and then that many entries.
        entries = [
            _DIR_ENTRY.pack(len(item.data), FILE_FIRST + index, 0, name)
            for index, (name, item) in enumerate(self._files)
        ]
        directory = struct.pack(">I", len(entries)) + b"".join(entries)
        self._items[FILE_DIR] = _Item(bytearray(directory.ljust(4 + _DIR_ENTRY.size * self.file_slots, b"\0")))

    def _item(self, key: int) -> _Item | None:
        """The item a selector value names, or None (invalid key, or nothing stored)."""
        if key == INVALID:
            return None
        entry = key & ENTRY_MASK
        if not key & ARCH_LOCAL and FILE_FIRST <= entry < FILE_FIRST + len(self._files):
            return self._files[entry - FILE_FIRST][1]
        return self._items.get(key & ~WRITE_CHANNEL)

    # -- the guest's side: ports -------------------------------------------------------

    def save_state(self) -> dict:
        """Selector, offset, the DMA address latch and the counters (version 1).

        The items themselves are made from the machine's shape (RAM, CPUs,
        ACPI tables), which a restore builds again and checks.
        """
        return {"version": 1, "selector": self._selector, "offset": self._offset,
                "dma_address": self._dma_address, "ignored": self.ignored_accesses,
                "dma_transfers": self.dma_transfers, "dma_errors": self.dma_errors}

    def load_state(self, state: dict) -> None:
        from pykvm.devices import check_state

        s = check_state(self, state)
        self._selector, self._offset, self._dma_address = s["selector"], s["offset"], s["dma_address"]
        self.ignored_accesses, self.dma_transfers, self.dma_errors = s["ignored"], s["dma_transfers"], s["dma_errors"]

    def reset(self) -> None:
        """Machine reset: the signature is selected again and the DMA address cleared."""
        self._select(SIGNATURE)
        self._dma_address = 0

    def read(self, offset: int, size: int) -> bytes:
        """Data byte at 0/1, the DMA signature at 4..11, all-ones in between."""
        _check_access(offset, size)
        if size == 1 and offset in (SELECTOR_OFFSET, DATA_OFFSET):
            return bytes([self._next_data_byte()])
        result = bytearray()
        for register in range(offset, offset + size):
            if register < 2:
                result.append(0)  # a wide access to the data port is not decoded (QEMU: 0)
            elif register < DMA_OFFSET or not self.dma_enabled:
                result.append(0xFF)
            else:
                result.append(DMA_SIGNATURE[register - DMA_OFFSET])
        if offset < 2:
            self.ignored_accesses += 1
        return bytes(result)

    def write(self, offset: int, data: bytes) -> None:
        """Selector (16-bit at 0) and DMA address (32-bit at 4 and 8, or 64-bit at 4)."""
        _check_access(offset, len(data))
        size = len(data)
        if offset == SELECTOR_OFFSET and size == 2:
            self._select(int.from_bytes(data, "little"))
        elif self.dma_enabled and offset == DMA_OFFSET and size == 4:
            self._dma_address = int.from_bytes(data, "big") << 32
        elif self.dma_enabled and offset == DMA_OFFSET + 4 and size == 4:
            self._dma_address |= int.from_bytes(data, "big")
            self._dma_transfer()
        elif self.dma_enabled and offset == DMA_OFFSET and size == 8:
            self._dma_address = int.from_bytes(data, "big")
            self._dma_transfer()
        else:
            # Byte writes to the data port included: QEMU ignores them since v2.4.
            self.ignored_accesses += 1

    def _select(self, key: int) -> None:
        """Select ``key``; the offset restarts at 0.  A key past the file slots selects nothing."""
        self._offset = 0
        self._selector = INVALID if key & ENTRY_MASK >= FILE_FIRST + self.file_slots else key

    def _next_data_byte(self) -> int:
        item = self._item(self._selector)
        if item is None or self._offset >= len(item.data):
            return 0
        value = item.data[self._offset]
        self._offset += 1
        return value

    # -- the guest's side: DMA ---------------------------------------------------------

    def _dma_transfer(self) -> None:
        """Carry out the FWCfgDmaAccess at the DMA address, then write its control word back."""
        address, self._dma_address = self._dma_address, 0
        self.dma_transfers += 1
        header = self._guest_read(address, _DMA_ACCESS.size)
        if header is None:
            self._dma_failed(address, "an FWCfgDmaAccess outside guest memory")
            self._guest_write(address, struct.pack(">I", DMA_CTL_ERROR))
            return
        control, length, target = _DMA_ACCESS.unpack(header)
        if control & DMA_CTL_SELECT:
            self._select(control >> 16)
        operation = 0
        if control & DMA_CTL_READ:
            operation = DMA_CTL_READ
        elif control & DMA_CTL_WRITE:
            operation = DMA_CTL_WRITE
        elif control & DMA_CTL_SKIP:
            operation = DMA_CTL_SKIP
        else:
            length = 0  # no operation: only the selection, if any
        error = False
        while length > 0 and not error:
            item = self._item(self._selector)
            if item is None or self._offset >= len(item.data):
                # Past the item's end: a read fills zeros, a write fails, a skip does nothing.
                chunk = length
                if operation == DMA_CTL_READ:
                    error = not self._guest_zero(target, chunk)
                elif operation == DMA_CTL_WRITE:
                    error = True
            else:
                chunk = min(length, len(item.data) - self._offset)
                if operation == DMA_CTL_READ:
                    error = not self._guest_write(target, bytes(item.data[self._offset:self._offset + chunk]))
                elif operation == DMA_CTL_WRITE:
                    # The item cannot grow: a write running past its end is dropped whole.
                    source = self._guest_read(target, chunk) if item.writable and chunk == length else None
                    if source is None:
                        error = True
                    else:
                        item.data[self._offset:self._offset + chunk] = source
                self._offset += chunk  # QEMU advances even when the copy failed
            target += chunk
            length -= chunk
        if error:
            self._dma_failed(address, "a transfer QEMU refuses (bad address, read-only item, or past its end)")
        self._guest_write(address, struct.pack(">I", DMA_CTL_ERROR if error else 0))

    def _dma_failed(self, address: int, why: str) -> None:
        self.dma_errors += 1
        _log.warning(("dma", why), "fw_cfg: DMA at %#x: %s; control gets the error bit", address, why)

    def _guest_read(self, gpa: int, size: int) -> bytes | None:
        assert self.memory is not None
        if not self.memory.is_mapped(gpa, size):
            return None
        try:
            return self.memory.read(gpa, size)
        except GuestMemoryError:
            return None

    def _guest_write(self, gpa: int, data: bytes) -> bool:
        assert self.memory is not None
        if not self.memory.is_mapped(gpa, len(data)):
            return False
        try:
            self.memory.write(gpa, data)
        except GuestMemoryError:
            return False
        return True

    def _guest_zero(self, gpa: int, size: int) -> bool:
        """Zero ``size`` bytes at ``gpa`` (a guest may ask for gigabytes: in bounded pieces)."""
        assert self.memory is not None
        if not self.memory.is_mapped(gpa, size):
            return False
        zeros = bytes(min(size, _ZERO_FILL_CHUNK))
        for start in range(0, size, len(zeros)):
            if not self._guest_write(gpa + start, zeros[:size - start]):
                return False
        return True

    # -- the standard PC items ---------------------------------------------------------

    @classmethod
    def for_pc(
        cls,
        ram_size: int,
        cpus: int = 1,
        *,
        max_cpus: int | None = None,
        memory: DmaMemory | None = None,
        nographic: bool = True,
        boot_menu: bool = False,
        uuid: bytes = bytes(16),
        kernel: bytes | None = None,
        kernel_addr: int = LINUX_KERNEL_ADDR,
        setup: bytes | None = None,
        setup_addr: int = LINUX_SETUP_ADDR,
        cmdline: str | bytes = "",
        cmdline_addr: int = LINUX_CMDLINE_ADDR,
        initrd: bytes | None = None,
        initrd_addr: int | None = None,
        e820: Iterable[tuple[int, int, int]] | None = None,
    ) -> FwCfg:
        """The items QEMU's ``-M pc`` provides (fw_cfg_common_realize, fw_cfg_arch_create, x86_load_linux).

        ``max_cpus`` is QEMU's APIC ID limit (default ``cpus``).  ``kernel`` is
        the image's protected-mode part and ``setup`` its real-mode part, split
        by the loader as QEMU does; the command line and initrd items exist
        only with a kernel, as in QEMU.  ``e820`` defaults to pykvm's RAM
        regions (``layout.ram_regions``), type 1 each, which is what QEMU's
        ``etc/e820`` holds.
        """
        max_cpus = cpus if max_cpus is None else max_cpus
        if not 1 <= cpus <= max_cpus <= 0xFFFF:
            raise DeviceError(f"need 1 <= cpus ({cpus}) <= max_cpus ({max_cpus}) <= 65535")
        if not 0 <= ram_size < 1 << 64:
            raise DeviceError(f"ram_size {ram_size:#x} does not fit in 64 bits")
        if len(uuid) != 16:
            raise DeviceError(f"a UUID is 16 bytes, not {len(uuid)}")
        if kernel is None and (initrd is not None or setup is not None):
            raise DeviceError("setup code and an initrd need a kernel, as QEMU's -initrd needs -kernel")
        if initrd is not None and initrd_addr is None:
            raise DeviceError("an initrd needs initrd_addr (the loader chooses it below the kernel's initrd_max)")
        fw_cfg = cls(memory)
        fw_cfg.add_item(UUID, uuid)
        fw_cfg.add_item(NOGRAPHIC, _le16(nographic))
        fw_cfg.add_item(BOOT_MENU, _le16(boot_menu))
        fw_cfg.add_item(NB_CPUS, _le16(cpus))
        fw_cfg.add_item(MAX_CPUS, _le16(max_cpus))
        fw_cfg.add_item(RAM_SIZE, struct.pack("<Q", ram_size))
        fw_cfg.add_item(IRQ0_OVERRIDE, _le32(1))
        # No NUMA nodes: a zero node count, then node 0 for every APIC ID.
        fw_cfg.add_item(NUMA, bytes(8 * (1 + max_cpus)))
        fw_cfg.add_file("etc/boot-fail-wait", _le32(0xFFFFFFFF))  # no reboot timeout
        if e820 is None:
            e820 = [(base, size, E820_RAM) for base, size in layout.ram_regions(ram_size)]
        fw_cfg.add_file("etc/e820", b"".join(struct.pack("<QQI", *entry) for entry in e820))
        if kernel is not None:
            fw_cfg._add_blob(KERNEL_ADDR, KERNEL_SIZE, KERNEL_DATA, kernel_addr, kernel)
            command_line = (cmdline.encode() if isinstance(cmdline, str) else cmdline) + b"\0"
            fw_cfg._add_blob(CMDLINE_ADDR, CMDLINE_SIZE, CMDLINE_DATA, cmdline_addr, command_line)
            if setup is not None:
                fw_cfg._add_blob(SETUP_ADDR, SETUP_SIZE, SETUP_DATA, setup_addr, setup)
            if initrd is not None:
                fw_cfg._add_blob(INITRD_ADDR, INITRD_SIZE, INITRD_DATA, initrd_addr, initrd)
        return fw_cfg

    def _add_blob(self, addr_key: int, size_key: int, data_key: int, address: int, data: bytes) -> None:
        """One of x86's (address, size, data) triples: le32 address, le32 size, the bytes."""
        if not (0 <= address <= 0xFFFFFFFF and len(data) <= 0xFFFFFFFF):
            raise DeviceError(f"fw_cfg key {data_key:#x}: address {address:#x} and size must fit in 32 bits")
        self.add_item(addr_key, _le32(address))
        self.add_item(size_key, _le32(len(data)))
        self.add_item(data_key, data)


def _le16(value: int) -> bytes:
    return struct.pack("<H", value)


def _le32(value: int) -> bytes:
    return struct.pack("<I", value)


def _check_access(offset: int, size: int) -> None:
    if not (1 <= size <= 8 and 0 <= offset and offset + size <= REGISTER_LENGTH):
        raise DeviceError(f"fw_cfg: a {size}-byte access at offset {offset} is outside its 12 ports")
