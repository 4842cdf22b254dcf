"""Coalesced I/O zones: guest writes KVM buffers in a ring instead of exiting.

KVM_REGISTER_COALESCED_MMIO (with ``pio=1``: KVM_CAP_COALESCED_PIO) makes
KVM append a guest write to a zone to the ring page at
KVM_COALESCED_MMIO_PAGE_OFFSET and resume the guest without an exit.  Reads
still exit.  The ring is the VM's, visible through every vCPU's mapping, so
whichever vCPU thread comes back from KVM_RUN drains it (under a lock),
oldest first, before handling its own exit.  When the ring is full the next
write exits as usual, so nothing is lost -- but such an exit must reach
Python, which drains the ring first: the fast-path table leaves zones out.

Only writes whose sole effect is their data may be coalesced (a UART's THR
while it is a plain transmit).  A run of byte writes to a device's ``txbuf``
row goes to the device in one ``fast_transmitted`` call, as the C loop's
transmit buffer does; anything else goes through the bus.
"""

from __future__ import annotations

import threading

from pykvm.platform.bus import Bus
from pykvm.platform.fastpath import FastPath


class CoalescedZones:
    """The machine's coalesced zones and the draining of KVM's ring."""

    def __init__(self, vm, pio: Bus, mmio: Bus, fastpath: FastPath) -> None:
        self.vm = vm
        self.pio, self.mmio = pio, mmio
        self.fastpath = fastpath
        self.zones: list[tuple[int, int, bool]] = []
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self.zones)

    def add(self, base: int, length: int, *, pio: bool) -> None:
        """KVM_REGISTER_COALESCED_MMIO for ``length`` ports/bytes at ``base``."""
        self.vm.register_coalesced_mmio(base, length, pio=pio)
        self.zones.append((base, length, pio))
        self.fastpath.add_zone(base, length, pio)

    def flush(self, vcpu) -> None:
        """Hand the writes buffered in the ring to the devices, oldest first."""
        if not self.zones or vcpu.kvm_run is None:
            return
        with self._lock:
            pending = vcpu.drain_coalesced()
            run: bytearray = bytearray()
            run_target = None  # (device, row, bus, name) of the txbuf run being collected
            for addr, data, is_pio in pending:
                target = self._txbuf_target(addr, len(data), is_pio)
                if target is not None and target == run_target:
                    run += data
                    continue
                self._hand_over(run_target, run)
                run, run_target = bytearray(), None
                if target is not None:
                    run, run_target = bytearray(data), target
                    continue
                (self.pio if is_pio else self.mmio).write(addr, data)
            self._hand_over(run_target, run)

    def _txbuf_target(self, addr: int, size: int, is_pio: bool):
        """The device row a byte write goes to when it is a plain transmit, else None."""
        if size != 1:
            return None
        bus = self.pio if is_pio else self.mmio
        found = bus.find(addr)
        if found is None:
            return None
        base, device = found
        offer = getattr(device, "fast_rows", None)
        if offer is None:
            return None
        for row in offer():
            if row.write == "txbuf" and base + row.offset == addr:
                return (device, row, bus, base)
        return None

    @staticmethod
    def _hand_over(target, data: bytearray) -> None:
        if target is None or not data:
            return
        device, row, bus, base = target
        name = next((r.name for r in bus if r.base == base), None)
        if name is not None:
            bus.count(name, len(data))
        device.fast_transmitted(row, bytes(data))
