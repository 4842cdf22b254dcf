"""QEMU's ``pc-testdev``: the test registers kvm-unit-tests drives on x86.

QEMU's ``hw/misc/pc-testdev.c`` maps five regions; they are three ranges
here because a device sees one range of one bus:

* :class:`PcTestdevPorts`, I/O ports 0xe0-0xeb (12 ports):

  - 0xe0-0xe3 (offsets 0-3) "ioport": one 32-bit register; a 1-, 2- or
    4-byte access at 0xe0 + n reads or writes its bytes n.. (little-endian);
  - 0xe4-0xe7 (offsets 4-7) "flush-page": a 32-bit write of a guest address
    asks the host to drop its mapping of that page (QEMU mprotect()s it to
    PROT_NONE and back, so KVM must fault it in again); reads give 0;
  - 0xe8-0xeb (offsets 8-11) "ioport-byte": the *same* 32-bit register,
    which QEMU reaches one byte at a time: the result is the same.

* :class:`PcTestdevIrq`, I/O ports 0x2000-0x2017 (24 ports): a byte
  written to 0x2000 + n sets interrupt line n to (value != 0); reads give 0.
  QEMU takes only 1-byte writes here, and only lines 0-15 exist on its ISA
  bus (16-23 would trip an assertion): the platform decides what 16-23 mean.

* :class:`PcTestdevIomem`, MMIO 0xff000000-0xff00ffff (64 KiB): scratch
  memory that reads back what was written, at any width.
"""

from __future__ import annotations

from collections.abc import Callable

from pykvm.errors import DeviceError

# Where QEMU puts the regions (pykvm.platform.layout has the I/O ports).
PORTS_BASE = 0xE0
PORTS_LENGTH = 12
IOPORT_OFFSET = 0  # 0xe0: the 32-bit test register
FLUSH_OFFSET = 4  # 0xe4: flush-page, 32-bit writes only
IOPORT_BYTE_OFFSET = 8  # 0xe8: the same register again
IRQ_PORT_BASE = 0x2000
IRQ_LINES = 24
IOMEM_BASE = 0xFF00_0000  # TODO(layout): PC_TESTDEV_IOMEM_ADDR
IOMEM_SIZE = 0x1_0000  # TODO(layout): PC_TESTDEV_IOMEM_SIZE
PAGE_MASK = ~0xFFF


class PcTestdevPorts:
    """Ports 0xe0-0xeb: the test register (twice) and the flush-page port.

    ``flush_page(gpa)`` is called with the page-aligned guest address a
    guest writes to the flush port; without it the write is only counted.
    """

    name = "pc-testdev"
    length = PORTS_LENGTH

    def __init__(self, flush_page: Callable[[int], None] | None = None) -> None:
        self.flush_page = flush_page
        self.register = 0  # QEMU's ioport_data
        self.flushes = 0

    def save_state(self) -> dict:
        """Ioport_data and the flush count (version 1)."""
        return {"version": 1, "register": self.register, "flushes": self.flushes}

    def load_state(self, state: dict) -> None:
        from pykvm.devices import check_state

        s = check_state(self, state)
        self.register, self.flushes = s["register"], s["flushes"]

    def read(self, offset: int, size: int) -> bytes:
        """Bytes of the test register at 0-3 and 8-11; the flush port reads 0."""
        _check_access(offset, size, self.length, self.name)
        value = self.register.to_bytes(4, "little")
        return bytes(0 if FLUSH_OFFSET <= port < IOPORT_BYTE_OFFSET else value[port % 4]
                     for port in range(offset, offset + size))

    def write(self, offset: int, data: bytes) -> None:
        """Set bytes of the test register; a 32-bit write at 4 flushes a page."""
        _check_access(offset, len(data), self.length, self.name)
        if offset == FLUSH_OFFSET:
            if len(data) == 4:  # QEMU takes nothing else here
                self.flushes += 1
                if self.flush_page is not None:
                    self.flush_page(int.from_bytes(data, "little") & PAGE_MASK)
            return
        value = bytearray(self.register.to_bytes(4, "little"))
        for port, byte in enumerate(data, start=offset):
            if not FLUSH_OFFSET <= port < IOPORT_BYTE_OFFSET:
                value[port % 4] = byte
        self.register = int.from_bytes(value, "little")


class PcTestdevIrq:
    """Ports 0x2000-0x2017: ``set_irq(n, level)`` for a byte written to 0x2000 + n."""

    name = "pc-testdev-irq"
    length = IRQ_LINES

    def __init__(self, set_irq: Callable[[int, bool], None]) -> None:
        self.set_irq = set_irq
        #: Writes wider than a byte, which QEMU refuses; dropped.
        self.ignored_writes = 0

    def save_state(self) -> dict:
        """The count of refused writes; the lines are the irqchip's (version 1)."""
        return {"version": 1, "ignored_writes": self.ignored_writes}

    def load_state(self, state: dict) -> None:
        from pykvm.devices import check_state

        self.ignored_writes = check_state(self, state)["ignored_writes"]

    def read(self, offset: int, size: int) -> bytes:
        _check_access(offset, size, self.length, self.name)
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        _check_access(offset, len(data), self.length, self.name)
        if len(data) != 1:
            self.ignored_writes += 1
            return
        self.set_irq(offset, data[0] != 0)


class PcTestdevIomem:
    """MMIO 0xff000000, 64 KiB of scratch that reads back what was written."""

    name = "pc-testdev-iomem"
    length = IOMEM_SIZE

    def __init__(self) -> None:
        self.buffer = bytearray(IOMEM_SIZE)

    def save_state(self) -> dict:
        """The 64 KiB buffer (version 1)."""
        return {"version": 1, "buffer": bytes(self.buffer)}

    def load_state(self, state: dict) -> None:
        from pykvm.devices import check_state

        self.buffer[:] = check_state(self, state)["buffer"]

    def read(self, offset: int, size: int) -> bytes:
        _check_access(offset, size, self.length, self.name)
        return bytes(self.buffer[offset:offset + size])

    def write(self, offset: int, data: bytes) -> None:
        _check_access(offset, len(data), self.length, self.name)
        self.buffer[offset:offset + len(data)] = data


def _check_access(offset: int, size: int, length: int, device: str) -> None:
    if not (1 <= size <= 8 and 0 <= offset and offset + size <= length):
        raise DeviceError(f"{device}: a {size}-byte access at offset {offset:#x} is outside its {length:#x} bytes")
