"""The memory a PC BIOS leaves behind: the interrupt vector table, the BIOS data area, the EBDA.

A kernel started by QEMU's ``-kernel`` runs after SeaBIOS has set up low
memory, and some kernels read what it left (SeaBIOS ``src/post.c``
``init_ivt``/``init_bda``, ``src/serial.c``, ``src/misc.c``):

* the real-mode interrupt vector table at 0 (256 ``offset:segment`` far
  pointers, offset first).  SeaBIOS points every vector it does not serve at
  ``entry_iret_official``, the lone IRET the IBM PC BIOS kept at F000:FF53;
  pykvm serves none, so all 256 point there, and a stray real-mode
  interrupt returns at once;
* the BIOS data area at 0x400: the I/O bases of the serial ports found,
  packed in order from 0x400 as SeaBIOS's ``serial_setup`` packs them (no
  parallel ports), their timeouts, the equipment word (bits 11:9 the serial
  port count, bit 1 the x87 that SeaBIOS's ``mathcp_setup`` reports), the
  conventional memory size in KiB below the EBDA at 0x413, and the EBDA's
  segment at 0x40E;
* the extended BIOS data area just below 640 KiB, whose first byte is its
  size in KiB (the rest zero, so a word read gives the same).

Where the stub lives: the IRET byte is at F000:FF53 = 0xFFF53, in the top
(F) segment of the BIOS area, while the ACPI tables take the lower half
(``pykvm.platform.acpi.ACPI_AREA_START``-``ACPI_AREA_END``, 0xE0000-0xF0000).
:func:`build_firmware_state` refuses an ACPI area that would cover the stub.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

from pykvm.errors import LoaderError
from pykvm.platform import layout
from pykvm.platform.acpi import ACPI_AREA_END, ACPI_AREA_START

IRET = 0xCF  # the opcode of IRET (16-bit operand size in real mode)
IRET_STUB_SEGMENT = 0xF000  # TODO(layout): SeaBIOS's entry_iret_official, F000:FF53
IRET_STUB_OFFSET = 0xFF53  # TODO(layout)
IRET_STUB_ADDR = (IRET_STUB_SEGMENT << 4) + IRET_STUB_OFFSET

IVT_VECTORS = 256
IVT_SIZE = 4 * IVT_VECTORS

# The BIOS data area (offsets from 0x400), the fields pykvm fills.
BDA_SIZE = 0x100
BDA_COM_PORTS = 0x00  # four words: COM1-COM4 I/O bases, 0 where absent
BDA_LPT_PORTS = 0x08  # three words: LPT1-LPT3, all 0 here
BDA_EBDA_SEGMENT = 0x0E
BDA_EQUIPMENT = 0x10
BDA_MEMORY_SIZE_KB = 0x13  # conventional memory in KiB, up to the EBDA
BDA_COM_TIMEOUTS = 0x7C  # four bytes, one per serial port found
MAX_COM_PORTS = 4

EQUIPMENT_X87 = 1 << 1
EQUIPMENT_SERIAL_COUNT_SHIFT = 9  # bits 11:9
SERIAL_TIMEOUT = 0x0A  # what SeaBIOS's serial_setup stores for each port it finds


def ivt(handler_segment: int = IRET_STUB_SEGMENT, handler_offset: int = IRET_STUB_OFFSET) -> bytes:
    """256 real-mode vectors, each the far pointer ``handler_segment:handler_offset`` (offset first)."""
    return struct.pack("<HH", handler_offset, handler_segment) * IVT_VECTORS


def bios_data_area(com_ports: Sequence[int], *, ebda_addr: int = layout.EBDA_ADDR) -> bytes:
    """The BDA for these serial ports (in BIOS order: COM1 first) and an EBDA at ``ebda_addr``."""
    bda = bytearray(BDA_SIZE)
    struct.pack_into(f"<{len(com_ports)}H", bda, BDA_COM_PORTS, *com_ports)
    bda[BDA_COM_TIMEOUTS:BDA_COM_TIMEOUTS + len(com_ports)] = bytes([SERIAL_TIMEOUT]) * len(com_ports)
    struct.pack_into("<H", bda, BDA_EBDA_SEGMENT, ebda_addr >> 4)
    struct.pack_into("<H", bda, BDA_EQUIPMENT, EQUIPMENT_X87 | len(com_ports) << EQUIPMENT_SERIAL_COUNT_SHIFT)
    struct.pack_into("<H", bda, BDA_MEMORY_SIZE_KB, ebda_addr // layout.KiB)
    return bytes(bda)


def extended_bios_data_area(size: int = layout.EBDA_SIZE) -> bytes:
    """An EBDA of ``size`` bytes: its size in KiB in the first byte, zeros after."""
    return bytes([size // layout.KiB]) + bytes(size - 1)


def build_firmware_state(
    com_ports: Sequence[int],
    *,
    ebda_addr: int = layout.EBDA_ADDR,
    ebda_size: int = layout.EBDA_SIZE,
    acpi_area: tuple[int, int] = (ACPI_AREA_START, ACPI_AREA_END),
) -> list[tuple[int, bytes]]:
    """The IVT, BDA, EBDA and IRET stub as ``(guest-physical address, bytes)`` to write.

    ``com_ports`` are the I/O bases of the 16550s the machine has, in the
    order the BIOS would find them (``layout.COM_PORTS`` order).  Raises
    :class:`LoaderError` for more than four ports, an EBDA that is not
    whole KiB below 640 KiB, or an ACPI area that covers the stub.
    """
    if len(com_ports) > MAX_COM_PORTS or any(not 0 < port <= 0xFFFF for port in com_ports):
        raise LoaderError(f"the BIOS data area holds up to {MAX_COM_PORTS} serial ports "
                          f"with 16-bit bases, not {list(com_ports)}")
    if (ebda_addr % layout.KiB or not 0 < ebda_size <= 255 * layout.KiB or ebda_size % layout.KiB
            or ebda_addr + ebda_size > layout.LOW_RAM_END):
        raise LoaderError(f"an EBDA of {ebda_size:#x} bytes at {ebda_addr:#x} must be whole KiB below "
                          f"{layout.LOW_RAM_END:#x}")
    start, end = acpi_area
    if start <= IRET_STUB_ADDR < end:
        raise LoaderError(f"the ACPI area {start:#x}-{end:#x} covers the real-mode IRET stub at "
                          f"{IRET_STUB_ADDR:#x} (F000:FF53)")
    return [
        (layout.IVT_ADDR, ivt()),
        (layout.BDA_ADDR, bios_data_area(com_ports, ebda_addr=ebda_addr)),
        (ebda_addr, extended_bios_data_area(ebda_size)),
        (IRET_STUB_ADDR, bytes([IRET])),
    ]
