"""PCI configuration space and configuration mechanism #1, as on QEMU's i440FX/PIIX PC.

PCI Local Bus Specification 3.0, section 3.2.2.3.2 (mechanism #1) and
chapter 6 (configuration space); QEMU ``hw/pci/pci.c``, ``pci_host.c``,
``hw/pci-host/i440fx.c``, ``hw/isa/piix.c``.

The host bridge answers eight I/O ports from 0xCF8 (:class:`PciHost`):

* a 32-bit access to 0xCF8 is CONFIG_ADDRESS: bit 31 enables the data
  window, bits 23:16 pick the bus, 15:11 the device, 10:8 the function and
  7:2 the dword register.  Bits 30:24 and 1:0 are reserved and read as 0.
  Anything but a dword at 0xCF8 is not CONFIG_ADDRESS (the spec passes it
  on as ordinary I/O): byte by byte it reads as all-ones and its writes
  are dropped, except for the byte at 0xCF9 (and an unaligned access
  starting below 0xCFC does not reach CONFIG_DATA either).  QEMU instead
  returns CONFIG_ADDRESS for any read at 0xCF8/0xCFA/0xCFB;
* 0xCF9 is the PIIX reset control register.  As QEMU's ``rcr_write``:
  a write with bit 2 set resets the system (whatever bit 1 says, QEMU
  does not tell hard from soft reset) and changes nothing else; any other
  write keeps bit 1 (the reset type); reads return what was kept;
* 0xCFC-0xCFF is CONFIG_DATA: an access of 1, 2 or 4 bytes at 0xCFC + n
  reaches configuration register (CONFIG_ADDRESS & 0xFC) + n of the
  selected function.  With the enable bit clear, or with no function
  there, reads are all-ones and writes vanish.

Each function (:class:`PciFunction`) has 256 bytes of configuration space
with QEMU's masks: a write changes only the bits its write mask allows
(vendor, device, revision, class, header type, capability pointer,
interrupt pin are read-only), and a 1 written to a write-1-to-clear status
bit clears it.  Base address registers decode when their address is valid
and the command register enables their space; whenever that decoded
address changes the function calls ``on_bar_change`` so the platform can
move the BAR's device on its buses.  The one bus is bus 0; the host bridge
itself is 00:00.0.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, Optional

from pykvm.devices import Device, DeviceStop
from pykvm.errors import BusError, DeviceError

CONFIG_SPACE_SIZE = 256
HEADER_SIZE = 64  # the type 0 header; the device-specific rest is writable, as in QEMU

# Type 0 header registers (PCI 3.0, 6.1).
VENDOR_ID = 0x00
DEVICE_ID = 0x02
COMMAND = 0x04
STATUS = 0x06
REVISION_ID = 0x08
CLASS_PROG = 0x09
CLASS_DEVICE = 0x0A  # sub-class (low byte) and base class (high byte)
CACHE_LINE_SIZE = 0x0C
HEADER_TYPE = 0x0E
BAR0 = 0x10
NUM_BARS = 6
SUBSYSTEM_VENDOR_ID = 0x2C
SUBSYSTEM_ID = 0x2E
INTERRUPT_LINE = 0x3C
INTERRUPT_PIN = 0x3D

COMMAND_IO = 1 << 0
COMMAND_MEMORY = 1 << 1
COMMAND_MASTER = 1 << 2
COMMAND_SERR = 1 << 8
COMMAND_INTX_DISABLE = 1 << 10
COMMAND_WRITABLE = COMMAND_IO | COMMAND_MEMORY | COMMAND_MASTER | COMMAND_SERR | COMMAND_INTX_DISABLE
# Master/target abort, parity and system error status bits: write 1 to clear.
STATUS_WRITE_1_TO_CLEAR = 0xF900

HEADER_TYPE_MULTI_FUNCTION = 0x80
BAR_SPACE_IO = 0x1  # bit 0 of a BAR: 1 = I/O space
BAR_MEM_PREFETCH = 0x8

# QEMU's default subsystem (PCI_SUBVENDOR_ID_REDHAT_QUMRANET, PCI_SUBDEVICE_ID_QEMU).
QEMU_SUBSYSTEM_VENDOR_ID = 0x1AF4
QEMU_SUBSYSTEM_ID = 0x1100

PIO_SPACE_END = 0x10000  # an I/O BAR must decode inside the 64 KiB port space
MMIO_32_END = 0xFFFF_FFFF  # QEMU: a 32-bit BAR whose last byte is 0xffffffff is not mapped

BarKind = Literal["pio", "mmio"]
#: ``on_bar_change(function, bar_index, kind, old_base, new_base, size)``; a base of None is "not decoded".
BarChange = Callable[["PciFunction", int, BarKind, Optional[int], Optional[int], int], None]


@dataclass
class Bar:
    """One base address register: what it decodes and where it decodes it now."""

    kind: BarKind
    size: int
    device: Device | None = None  # what the platform maps at the base
    prefetchable: bool = False
    base: int | None = None  # the decoded address; None while not decoding


class PciFunction:
    """One PCI function's configuration space (a type 0 header) and its BARs.

    ``class_code`` is the 16-bit base class and sub-class (0x0600 is a host
    bridge), as QEMU's ``class_id``; ``multifunction`` sets bit 7 of the
    header type, which function 0 of a multi-function device must have.
    ``on_bar_change`` (also settable later) hears every change of a BAR's
    decoded address; it runs on the guest's configuration write, so it must
    handle any address a guest can program, overlaps included.
    """

    name = "pci-function"

    def __init__(self, *, vendor_id: int, device_id: int, class_code: int, revision: int = 0,
                 prog_if: int = 0, subsystem_vendor_id: int = QEMU_SUBSYSTEM_VENDOR_ID,
                 subsystem_id: int = QEMU_SUBSYSTEM_ID, interrupt_pin: int = 0,
                 multifunction: bool = False, on_bar_change: BarChange | None = None) -> None:
        self.on_bar_change = on_bar_change
        self.multifunction = multifunction
        self.config = bytearray(CONFIG_SPACE_SIZE)
        self._power_on = bytearray(CONFIG_SPACE_SIZE)  # what reset() restores
        self.write_mask = bytearray(CONFIG_SPACE_SIZE)
        self.write_1_to_clear = bytearray(CONFIG_SPACE_SIZE)
        self._bars: dict[int, Bar] = {}
        self.set_power_on(VENDOR_ID, 2, vendor_id)
        self.set_power_on(DEVICE_ID, 2, device_id)
        self.set_power_on(REVISION_ID, 1, revision)
        self.set_power_on(CLASS_PROG, 1, prog_if)
        self.set_power_on(CLASS_DEVICE, 2, class_code)
        self.set_power_on(HEADER_TYPE, 1, HEADER_TYPE_MULTI_FUNCTION if multifunction else 0)
        self.set_power_on(SUBSYSTEM_VENDOR_ID, 2, subsystem_vendor_id)
        self.set_power_on(SUBSYSTEM_ID, 2, subsystem_id)
        self.set_power_on(INTERRUPT_PIN, 1, interrupt_pin)
        # QEMU's pci_init_wmask / pci_init_w1cmask.
        self.write_mask[CACHE_LINE_SIZE] = 0xFF
        self.write_mask[INTERRUPT_LINE] = 0xFF
        self.write_mask[COMMAND:COMMAND + 2] = COMMAND_WRITABLE.to_bytes(2, "little")
        self.write_mask[HEADER_SIZE:] = b"\xff" * (CONFIG_SPACE_SIZE - HEADER_SIZE)
        self.write_1_to_clear[STATUS:STATUS + 2] = STATUS_WRITE_1_TO_CLEAR.to_bytes(2, "little")

    # --- set-up by the host ---------------------------------------------------------

    def set_power_on(self, offset: int, size: int, value: int) -> None:
        """Give a register its reset value (the value :meth:`reset` restores)."""
        self.config[offset:offset + size] = self._power_on[offset:offset + size] = value.to_bytes(size, "little")

    def add_bar(self, index: int, kind: BarKind, size: int, device: Device | None = None,
                prefetchable: bool = False) -> Bar:
        """Declare 32-bit BAR ``index``: ``size`` bytes (a power of two) of ``kind`` space."""
        if not 0 <= index < NUM_BARS or index in self._bars:
            raise DeviceError(f"{self.name}: BAR {index} is not a free BAR slot (0-{NUM_BARS - 1})")
        smallest, largest = (4, 256) if kind == "pio" else (16, 1 << 31)
        if kind not in ("pio", "mmio") or size & (size - 1) or not smallest <= size <= largest:
            raise DeviceError(f"{self.name}: a {kind} BAR takes a power of two from {smallest} "
                              f"to {largest} bytes, not {size}")
        if kind == "pio" and prefetchable:
            raise DeviceError(f"{self.name}: only memory BARs can be prefetchable")
        type_bits = BAR_SPACE_IO if kind == "pio" else (BAR_MEM_PREFETCH if prefetchable else 0)
        offset = BAR0 + 4 * index
        self.write_mask[offset:offset + 4] = (~(size - 1) & 0xFFFF_FFFF).to_bytes(4, "little")
        self.set_power_on(offset, 4, type_bits)
        bar = self._bars[index] = Bar(kind, size, device, prefetchable)
        return bar

    def bar(self, index: int) -> Bar:
        """BAR ``index`` as declared by :meth:`add_bar` (KeyError if it was not)."""
        return self._bars[index]

    @property
    def bars(self) -> dict[int, Bar]:
        return dict(self._bars)

    @property
    def vendor_id(self) -> int:
        return self.config_read(VENDOR_ID, 2)

    @property
    def device_id(self) -> int:
        return self.config_read(DEVICE_ID, 2)

    def save_state(self) -> dict:
        """The configuration space (version 1); the BARs' mappings follow from it."""
        return {"version": 1, "config": bytes(self.config)}

    def load_state(self, state: dict) -> None:
        """Load the configuration space; BARs that decode now are mapped again (``on_bar_change``)."""
        from pykvm.devices import check_state

        self.config[:] = check_state(self, state)["config"]
        self._update_mappings()

    def reset(self) -> None:
        """Back to power-on values: decoding off, so every mapped BAR is unmapped."""
        self.config[:] = self._power_on
        self._update_mappings()

    # --- configuration cycles ----------------------------------------------------------

    def config_read(self, offset: int, size: int) -> int:
        """The ``size``-byte register at ``offset``, little-endian."""
        self._check_access(offset, size)
        return int.from_bytes(self.config[offset:offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        """A configuration write, byte by byte through the masks (QEMU's pci_default_write_config)."""
        self._check_access(offset, size)
        data = (value & ((1 << 8 * size) - 1)).to_bytes(size, "little")
        for address, byte in enumerate(data, offset):
            writable, clearable = self.write_mask[address], self.write_1_to_clear[address]
            self.config[address] = (self.config[address] & ~writable | byte & writable) & ~(byte & clearable)
        if offset <= COMMAND < offset + size or offset < BAR0 + 4 * NUM_BARS and offset + size > BAR0:
            self._update_mappings()

    def _check_access(self, offset: int, size: int) -> None:
        if size not in (1, 2, 4) or not 0 <= offset <= CONFIG_SPACE_SIZE - size:
            raise DeviceError(f"{self.name}: no {size}-byte configuration register at {offset:#x}")

    # --- BAR decoding ---------------------------------------------------------------------

    def decoded_base(self, index: int) -> int | None:
        """Where BAR ``index`` decodes now: None with its space disabled or an address QEMU would not map."""
        bar = self._bars[index]
        command = self.config_read(COMMAND, 2)
        if not command & (COMMAND_IO if bar.kind == "pio" else COMMAND_MEMORY):
            return None
        base = self.config_read(BAR0 + 4 * index, 4) & ~(bar.size - 1)
        last = base + bar.size - 1
        limit = PIO_SPACE_END - 1 if bar.kind == "pio" else MMIO_32_END - 1
        if base == 0 or last > limit:  # 0 is "unassigned"; all-ones is a sizing probe
            return None
        return base

    def _update_mappings(self) -> None:
        for index, bar in sorted(self._bars.items()):
            new_base = self.decoded_base(index)
            if new_base == bar.base:
                continue
            old_base, bar.base = bar.base, new_base
            if self.on_bar_change is not None:
                self.on_bar_change(self, index, bar.kind, old_base, new_base, bar.size)


# QEMU's i440FX host bridge function (hw/pci-host/i440fx.c).
I440FX_VENDOR_ID = 0x8086  # Intel
I440FX_DEVICE_ID = 0x1237  # 82441FX PMC
I440FX_REVISION = 0x02
PCI_CLASS_BRIDGE_HOST = 0x0600
I440FX_SMRAM = 0x72
I440FX_SMRAM_DEFAULT = 0x02  # what QEMU's i440fx_realize sets (C_BASE_SEG = 010b)


class I440fxHostBridge(PciFunction):
    """00:00.0, the i440FX PCI and memory controller: IDs only (PAM and SMRAM bytes are plain storage)."""

    name = "i440fx"

    def __init__(self) -> None:
        super().__init__(vendor_id=I440FX_VENDOR_ID, device_id=I440FX_DEVICE_ID,
                         class_code=PCI_CLASS_BRIDGE_HOST, revision=I440FX_REVISION)
        self.set_power_on(I440FX_SMRAM, 1, I440FX_SMRAM_DEFAULT)


# CONFIG_ADDRESS (PCI 3.0, Figure 3-2).
CONFIG_ADDRESS_ENABLE = 1 << 31
CONFIG_ADDRESS_MASK = 0x80FF_FFFC  # bits 30:24 and 1:0 are reserved, read as 0
DATA_WINDOW = 4  # CONFIG_DATA is at offset 4 of the host's range (0xCFC)
RESET_CONTROL = 1  # offset of 0xCF9 in the host's range
RCR_SYSTEM_RESET = 1 << 1  # 1: hard reset, the only bit QEMU keeps
RCR_RESET_CPU = 1 << 2  # 1: reset now
DEVICES_PER_BUS = 32
FUNCTIONS_PER_DEVICE = 8


def _reset_request() -> None:
    raise DeviceStop("reset", 0)


class PciHost:
    """Ports 0xCF8-0xCFF: CONFIG_ADDRESS, the PIIX reset control register, CONFIG_DATA.

    ``on_reset()`` is called when the guest asks for a reset through 0xCF9;
    by default it raises :class:`DeviceStop` ("reset"), as the i8042 does.
    The host bridge :class:`I440fxHostBridge` is attached at 00:00.0.
    """

    name = "pci-host"
    length = 8

    def __init__(self, *, on_reset: Callable[[], None] = _reset_request) -> None:
        self.on_reset = on_reset
        self.config_address = 0
        self.reset_control = 0
        #: Accesses to 0xCF8-0xCFB that are neither CONFIG_ADDRESS nor the reset register.
        self.ignored_accesses = 0
        self._functions: dict[tuple[int, int], PciFunction] = {}
        self.host_bridge = I440fxHostBridge()
        self.attach(0, 0, self.host_bridge)

    # --- topology ---------------------------------------------------------------------

    def attach(self, device: int, function: int, pci_function: PciFunction) -> None:
        """Put ``pci_function`` at 00:``device``.``function`` (QEMU's multi-function rules)."""
        if not 0 <= device < DEVICES_PER_BUS or not 0 <= function < FUNCTIONS_PER_DEVICE:
            raise BusError(f"no PCI slot {device}.{function}: devices 0-31, functions 0-7")
        where = f"00:{device:02x}.{function}"
        if (device, function) in self._functions:
            raise BusError(f"PCI {where} is taken by {self._functions[device, function].name}")
        function0 = self._functions.get((device, 0))
        if function and (function0 is None or not function0.multifunction):
            raise BusError(f"PCI {where}: function 0 of device {device:#x} must be present and multi-function first")
        if not function and not pci_function.multifunction and any(
                (device, f) in self._functions for f in range(1, FUNCTIONS_PER_DEVICE)):
            raise BusError(f"PCI {where}: a single-function device cannot join functions already there")
        self._functions[device, function] = pci_function

    def function_at(self, bus: int, device: int, function: int) -> PciFunction | None:
        return self._functions.get((device, function)) if bus == 0 else None

    @property
    def functions(self) -> dict[tuple[int, int], PciFunction]:
        """``(device, function) -> PciFunction`` on bus 0."""
        return dict(self._functions)

    def save_state(self) -> dict:
        """CONFIG_ADDRESS, the reset register, and every function's state by slot (version 1)."""
        return {"version": 1, "config_address": self.config_address, "reset_control": self.reset_control,
                "ignored": self.ignored_accesses,
                "functions": [[d, f, fn.save_state()] for (d, f), fn in sorted(self._functions.items())]}

    def load_state(self, state: dict) -> None:
        from pykvm.devices import check_state

        s = check_state(self, state)
        slots = sorted(self._functions)
        if [[d, f] for d, f, _ in s["functions"]] != [list(slot) for slot in slots]:
            raise DeviceError("pci-host: the saved PCI functions are not the ones on this bus")
        self.config_address, self.reset_control = s["config_address"], s["reset_control"]
        self.ignored_accesses = s["ignored"]
        for d, f, function_state in s["functions"]:
            self._functions[d, f].load_state(function_state)

    def reset(self) -> None:
        """A machine reset: CONFIG_ADDRESS and the reset register cleared, every function reset."""
        self.config_address = 0
        self.reset_control = 0
        for pci_function in self._functions.values():
            pci_function.reset()

    # --- the port range -----------------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        self._check_access(offset, size)
        if offset >= DATA_WINDOW:
            value = self._data_read(offset - DATA_WINDOW, size)
        elif offset == 0 and size == 4:
            value = self.config_address
        else:
            self._count_if_ignored(offset, size)
            value = int.from_bytes(bytes(self._port_byte_read(offset + i) for i in range(size)), "little")
        return value.to_bytes(size, "little")

    def write(self, offset: int, data: bytes) -> None:
        self._check_access(offset, len(data))
        value = int.from_bytes(data, "little")
        if offset >= DATA_WINDOW:
            self._data_write(offset - DATA_WINDOW, len(data), value)
        elif offset == 0 and len(data) == 4:
            self.config_address = value & CONFIG_ADDRESS_MASK
        else:
            self._count_if_ignored(offset, len(data))
            if offset <= RESET_CONTROL < offset + len(data):
                self._reset_control_write(data[RESET_CONTROL - offset])

    def _check_access(self, offset: int, size: int) -> None:
        if size not in (1, 2, 4) or not 0 <= offset <= self.length - size:
            raise DeviceError(f"pci-host: no {size}-byte access at offset {offset}")

    def _count_if_ignored(self, offset: int, size: int) -> None:
        if (offset, size) != (RESET_CONTROL, 1):
            self.ignored_accesses += 1

    def _port_byte_read(self, offset: int) -> int:
        """A byte of a non-CONFIG_ADDRESS access: the reset register at 0xCF9, nothing elsewhere."""
        return self.reset_control if offset == RESET_CONTROL else 0xFF

    def _reset_control_write(self, value: int) -> None:
        if value & RCR_RESET_CPU:
            self.on_reset()
            return
        self.reset_control = value & RCR_SYSTEM_RESET

    # --- CONFIG_DATA ------------------------------------------------------------------------

    def _selected(self) -> tuple[PciFunction | None, int]:
        """The function CONFIG_ADDRESS selects (None if disabled or absent) and its dword register."""
        address = self.config_address
        if not address & CONFIG_ADDRESS_ENABLE:
            return None, 0
        bus, device, function = (address >> 16) & 0xFF, (address >> 11) & 0x1F, (address >> 8) & 0x7
        return self.function_at(bus, device, function), address & 0xFC

    def _data_read(self, lane: int, size: int) -> int:
        pci_function, register = self._selected()
        if pci_function is None:
            return (1 << 8 * size) - 1  # master abort: all-ones
        return pci_function.config_read(register + lane, size)

    def _data_write(self, lane: int, size: int, value: int) -> None:
        pci_function, register = self._selected()
        if pci_function is not None:
            pci_function.config_write(register + lane, size, value)
