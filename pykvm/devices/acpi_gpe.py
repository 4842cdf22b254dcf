"""The ACPI general-purpose event block GPE0 (ACPI 6.5, 4.8.4.1): status bits, then enable bits.

The FADT names the block (GPE0_BLK, 0xafe0 on QEMU's PC, GPE0_BLK_LEN 4):
its first half is GPE0_STS, whose bits are cleared by writing 1; the second
half is GPE0_EN.  An OS reads the status at boot and whenever the SCI
fires, and enables the GPEs its DSDT has handlers for.  pykvm's PC has no
event behind any GPE (no hot-plug, no power button GPE), so the status
bits never set; the block must still answer with zeros, because all-ones
would be 16 events pending that nothing can clear.  The enable bits keep
what the guest writes.
"""

from __future__ import annotations

from pykvm.errors import DeviceError

__all__ = ["AcpiGpe"]


class AcpiGpe:
    """GPE0: ``length`` bytes, the status half then the enable half (registered at the FADT's GPE0_BLK)."""

    name = "acpi-gpe0"

    def __init__(self, length: int = 4) -> None:
        if length < 2 or length % 2:
            raise DeviceError(f"a GPE block is an even number of bytes, not {length}")
        self.length = length
        self._status = bytearray(length // 2)
        self._enable = bytearray(length // 2)

    def _check(self, offset: int, size: int) -> None:
        if size < 1 or offset < 0 or offset + size > self.length:
            raise DeviceError(f"GPE0 access of {size} bytes at offset {offset} is outside its {self.length}")

    def read(self, offset: int, size: int) -> bytes:
        """Any width, by byte lanes: status bytes, then enable bytes."""
        self._check(offset, size)
        return bytes(self._status + self._enable)[offset:offset + size]

    def write(self, offset: int, data: bytes) -> None:
        """Status: write 1 to clear; enable: stored."""
        self._check(offset, len(data))
        half = self.length // 2
        for at, value in enumerate(data, start=offset):
            if at < half:
                self._status[at] &= ~value & 0xFF
            else:
                self._enable[at - half] = value

    def save_state(self) -> dict:
        """The enable bits (version 1); the status is always clear."""
        return {"version": 1, "enable": list(self._enable)}

    def load_state(self, state: dict) -> None:
        from pykvm.devices import check_state

        enable = check_state(self, state)["enable"]
        if len(enable) != len(self._enable) or not all(isinstance(b, int) and 0 <= b <= 255 for b in enable):
            raise DeviceError(f"GPE0 state: {len(self._enable)} enable bytes expected")
        self._enable[:] = bytes(enable)
