"""QEMU's ``pci-testdev``: a PCI function whose BARs count the guest's writes.

QEMU ``hw/misc/pci-testdev.c``; kvm-unit-tests' ``lib/pci-testdev.c`` drives
it.  Vendor 0x1b36 (Red Hat), device 0x0005, class 0x00ff ("unclassified"),
no interrupt pin, two BARs: BAR0 4 KiB of memory, BAR1 256 I/O ports.

Six tests, three per BAR: ``mmio-no-eventfd``, ``mmio-wildcard-eventfd``,
``mmio-datamatch-eventfd``, then the same three ``portio-``.  Test *i* has
a header a guest reads through the BAR::

    offset 0   test    (byte)  i
           1   width   (byte)  1: the test writes bytes
           4   offset  (le32)  where to write: 2048 + i in BAR0, 128 + i in BAR1
           8   data    (byte)  0xFA to match; 0xCE for the wildcard test
          12   count   (le32)  matching writes so far
          16   name    (NUL-terminated)

Writing *n* to offset 0 of a BAR selects test *n* of that BAR's kind (or
none, for n >= 3) and zeroes its count; afterwards a write at the test's
offset counts when its data is the test's (any data, for the wildcard
test).  Reads show the selected test's header, whichever BAR they come
through, and 0 when no test is selected or past the name.

QEMU serves both BARs one byte at a time (``max_access_size = 1``), so a
wider access is a run of byte accesses at consecutive offsets, low byte
first; pykvm does the same.  In QEMU with KVM the two ``-eventfd`` tests
of each kind are answered by an ioeventfd and never counted (the guest
accepts a count of 0 or of its 16 writes); here every matching write is
counted unless the platform binds an ioeventfd of its own.
"""

from __future__ import annotations

import struct

from pykvm.devices.pci import BarChange, PciFunction
from pykvm.errors import DeviceError

VENDOR_ID_REDHAT = 0x1B36
DEVICE_ID_REDHAT_TEST = 0x0005
PCI_CLASS_OTHERS = 0x00FF

MEMORY_BAR, IO_BAR = 0, 1
KINDS = ("mmio", "portio")  # test i's kind is KINDS[i // 3]; its BAR is the kind's index
TESTS = ("no-eventfd", "wildcard-eventfd", "datamatch-eventfd")
TEST_AREA = {"mmio": 2048, "portio": 128}  # QEMU's IOTEST_MEMSIZE / IOTEST_IOSIZE; each BAR is twice that
DATA_MATCH, DATA_ANY = 0xFA, 0xCE
ACCESS_WIDTH = 1
HEADER = struct.Struct("<BB2xIB3xI")  # test, width, offset, data, count; the name follows
TEST_FIELD, COUNT_FIELD = 0, 12  # offsets in the header


class PciTestDevWindow:
    """One BAR's contents: what the platform maps where ``on_bar_change`` says."""

    def __init__(self, owner: "PciTestDev", kind: str) -> None:
        self.owner = owner
        self.kind = kind
        self.name = f"pci-testdev-{kind}"
        self.length = 2 * TEST_AREA[kind]

    def save_state(self) -> dict:
        """Nothing of its own: the test state is the function's (:class:`PciTestDev`) (version 1)."""
        return {"version": 1}

    def load_state(self, state: dict) -> None:
        from pykvm.devices import check_state

        check_state(self, state)

    def read(self, offset: int, size: int) -> bytes:
        self._check(offset, size)
        return bytes(self.owner.header_byte(offset + i) for i in range(size))

    def write(self, offset: int, data: bytes) -> None:
        self._check(offset, len(data))
        for i, byte in enumerate(data):
            self.owner.byte_written(self.kind, offset + i, byte)

    def _check(self, offset: int, size: int) -> None:
        if not 1 <= size <= 8 or not 0 <= offset <= self.length - size:
            raise DeviceError(f"{self.name}: no {size}-byte access at offset {offset:#x}")


class PciTestDev(PciFunction):
    """The pci-testdev function and the test state its two BARs share."""

    name = "pci-testdev"

    def __init__(self, *, on_bar_change: BarChange | None = None) -> None:
        super().__init__(vendor_id=VENDOR_ID_REDHAT, device_id=DEVICE_ID_REDHAT_TEST,
                         class_code=PCI_CLASS_OTHERS, revision=0, interrupt_pin=0,
                         on_bar_change=on_bar_change)
        self.mmio = PciTestDevWindow(self, "mmio")
        self.portio = PciTestDevWindow(self, "portio")
        self.add_bar(MEMORY_BAR, "mmio", self.mmio.length, self.mmio)
        self.add_bar(IO_BAR, "pio", self.portio.length, self.portio)
        self.headers = [self._header(i) for i in range(len(KINDS) * len(TESTS))]
        self.current: int | None = None  # the selected test

    @staticmethod
    def _header(i: int) -> bytearray:
        kind, test = KINDS[i // len(TESTS)], TESTS[i % len(TESTS)]
        data = DATA_ANY if test == "wildcard-eventfd" else DATA_MATCH
        fields = HEADER.pack(i, ACCESS_WIDTH, TEST_AREA[kind] + i * ACCESS_WIDTH, data, 0)
        return bytearray(fields + f"{kind}-{test}".encode() + b"\0")

    def count(self, i: int) -> int:
        """Test ``i``'s count of matching writes."""
        return int.from_bytes(self.headers[i][COUNT_FIELD:COUNT_FIELD + 4], "little")

    def save_state(self) -> dict:
        """The configuration space, every test's header and the selected test (version 1)."""
        return {**super().save_state(), "headers": [bytes(h) for h in self.headers], "current": self.current}

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.headers = [bytearray(h) for h in state["headers"]]
        self.current = state["current"]

    def reset(self) -> None:
        super().reset()
        self.current = None

    # --- what the windows do, one byte at a time (QEMU's pci_testdev_read/write) ------------

    def header_byte(self, offset: int) -> int:
        if self.current is None:
            return 0
        header = self.headers[self.current]
        return header[offset] if offset + 1 < len(header) else 0

    def byte_written(self, kind: str, offset: int, value: int) -> None:
        if offset == TEST_FIELD:
            self.current = None
            if value < len(TESTS):
                self.current = KINDS.index(kind) * len(TESTS) + value
                struct.pack_into("<I", self.headers[self.current], COUNT_FIELD, 0)
            return
        if self.current is None:
            return
        header = self.headers[self.current]
        _, _, test_offset, data, count = HEADER.unpack_from(header)
        match_data = TESTS[self.current % len(TESTS)] != "wildcard-eventfd"
        if offset != test_offset or match_data and value != data:
            return
        struct.pack_into("<I", header, COUNT_FIELD, (count + 1) & 0xFFFF_FFFF)
