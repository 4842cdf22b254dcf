"""``-M pc``: what a kernel written for QEMU's PC expects besides RAM, a CPU and COM1.

:class:`PcBoard` adds to a machine (``Machine(platform="pc")``), at QEMU's
ports and addresses (``pykvm.platform.layout``):

===================  ===============================  ======================================
part                 where                            model
===================  ===============================  ======================================
interrupts, timer    PIC 0x20/0xa0, IOAPIC, LAPICs,   KVM's in-kernel irqchip and PIT; KVM's
                     PIT 0x40-0x43                    default GSI routing sends ISA IRQs 0-15
                                                      to both the PIC and the IOAPIC
port 0x61            PIT channel 2's gate and OUT     ``devices.port61`` (KVM_GET/SET_PIT2)
fw_cfg               0x510-0x51b (DMA at 0x514)       ``devices.fw_cfg`` (QEMU's items, the file
                                                      directory, etc/e820, etc/acpi/*)
CMOS and RTC         0x70-0x71, IRQ 8                 ``devices.cmos`` with QEMU's memory bytes
ACPI PM              0x600-0x60b, SMI_CMD 0xb2,       ``devices.acpi_pm``: PM1a event/control,
                     SCI on IRQ 9                     the 3.579545 MHz PM timer; S5 powers off,
                                                      S3 suspends (``platform.pc_sleep``)
ACPI GPE0            0xafe0-0xafe3                    ``devices.acpi_gpe``: status (always clear)
                                                      and enable bits
PCI configuration    0xcf8-0xcff (mechanism #1),      ``devices.pci``: i440FX host bridge 00:00.0,
                     reset control 0xcf9              PIIX3 ISA 00:01.0 and IDE 00:01.1, PIIX4 ACPI 00:01.3
ACPI tables          0xe0000-0xeffff (the RSDP scan)  ``platform.acpi``: RSDP, RSDT, XSDT, FADT,
                                                      FACS, MADT (every CPU), DSDT
debug-exit           0xf4-0xf7 (pykvm's, 4 bytes)     QEMU's isa-debug-exit,iobase=0xf4,iosize=4
firmware's leftovers 0-0x500, EBDA, F000:FF53         ``platform.bios``: IVT to an IRET stub,
                                                      BIOS data area, EBDA
test devices         ``-device pc-testdev``:          ``devices.pc_testdev``
                     0xe0-0xeb, 0x2000-0x2017,
                     0xff000000 (64 KiB);
                     ``-device pci-testdev``: 00:02.0 ``devices.pci_testdev``
===================  ===============================  ======================================

The devices and tables are made from the machine's shape (RAM size, CPU
count) with the board; :meth:`PcBoard.write_memory` puts the tables and the
firmware's leftovers in memory when a kernel is loaded (the BIOS data area
then lists the serial ports the machine ended up with).  The loaders see the
BIOS area as reserved and never put anything there.
"""

from __future__ import annotations

from pykvm.devices import DebugExit
from pykvm.devices.acpi_gpe import AcpiGpe
from pykvm.devices.acpi_pm import AcpiPm, SmiCommand
from pykvm.devices.cmos import Cmos
from pykvm.devices.fw_cfg import FwCfg
from pykvm.devices.pci import PciFunction, PciHost
from pykvm.devices.port61 import Port61
from pykvm.platform import layout
from pykvm.platform.acpi import GPE0_BLOCK_LENGTH, build_acpi_tables
from pykvm.platform.bios import build_firmware_state
from pykvm.platform.pc_sleep import SleepState
from pykvm.platform.pc_timers import PcTimers

__all__ = ["PcBoard", "POWER_OFF", "SUSPEND"]

#: The stop reason when the guest enters ACPI S5 (soft off): a clean end, exit status 0.
POWER_OFF = "poweroff"
#: The vCPUs' stop reason when the guest enters ACPI S3; ``Machine.run`` then waits for the wake.
SUSPEND = "suspend"

# The PIIX functions QEMU's -M pc has besides the host bridge (hw/isa/piix.c, hw/acpi/piix4.c).
PIIX3_ISA = dict(vendor_id=0x8086, device_id=0x7000, class_code=0x0601, multifunction=True)
PIIX4_ACPI = dict(vendor_id=0x8086, device_id=0x7113, class_code=0x0680, revision=0x03)
# PIIX3's IDE function in compatibility mode (prog-if 0x80: bus-master capable, both channels on the legacy
# ports and IRQs 14/15), as QEMU's piix3-ide: what a kernel's PCI IDE driver (Linux's ata_piix) looks for
# before it drives the ATA disk at 0x1f0 (platform.ide).  No bus-master BAR: the driver falls back to PIO.
PIIX3_IDE = dict(vendor_id=0x8086, device_id=0x7010, class_code=0x0101, prog_if=0x80)


class PcBoard:
    """The ``-M pc`` devices and tables of one machine (see the module docstring)."""

    def __init__(self, machine, *, pc_testdev: bool = False, pci_testdev: bool = False) -> None:
        self.machine = m = machine
        cpus = len(m.vcpus)
        apic_ids = [vcpu.id for vcpu in m.vcpus]
        # pykvm's debug-exit at 0xf4, 4 bytes wide as harnesses give QEMU (iosize=4: outl works too)
        m.remove_device(m.pc.debug_exit)
        m.pc.debug_exit = DebugExit(4)
        m.add_device(m.pc.debug_exit, port=layout.DEBUG_EXIT_PORT, length=4, name="debug-exit")
        self.acpi = build_acpi_tables(apic_ids)
        self.fw_cfg = FwCfg.for_pc(m.memory_size, cpus, memory=m.memory,
                                   e820=layout.e820_map(m.memory_size))
        rsdp = next(data for addr, data in self.acpi.blobs if addr == self.acpi.rsdp_addr)
        self.fw_cfg.add_file("etc/acpi/rsdp", rsdp)
        self.fw_cfg.add_file("etc/acpi/tables", b"".join(data for addr, data in self.acpi.blobs
                                                         if addr != self.acpi.rsdp_addr))
        m.add_device(self.fw_cfg, port=layout.FW_CFG_PORT, name="fw_cfg")
        self.cmos = Cmos(interrupt=m.irq_line(layout.RTC_IRQ))
        self.cmos.set_pc_config(m.memory_size, cpus)
        self.pm = AcpiPm(interrupt=m.irq_line(layout.SCI_IRQ), on_sleep=self._sleep)
        self.timers = PcTimers(self.cmos, self.pm)  # IRQ 8 and the SCI on time, from a thread of their own
        m.add_device(self.timers.serialized(self.cmos), port=layout.CMOS_PORT, name="cmos")
        m.add_device(self.timers.serialized(self.pm), port=layout.ACPI_PM_PORT, name="acpi-pm")
        self.sleep = SleepState(m, self.timers, self.pm, self.cmos, self.acpi.firmware_waking_vector_addr)
        self.gpe = AcpiGpe(GPE0_BLOCK_LENGTH)
        m.add_device(self.gpe, port=layout.ACPI_GPE0_PORT, name="acpi-gpe0")  # zeros: no GPE has a source
        self.smi = SmiCommand(set_sci_enabled=self.pm.set_sci_enabled)
        m.add_device(self.smi, port=layout.SMI_CMD_PORT, name="apm-smi")
        self.port61 = Port61(self._pit_channel2, self._set_pit_gate)
        m.add_device(self.port61, port=layout.SYSTEM_CONTROL_PORT, name="port61")
        self.pci = PciHost(on_reset=lambda: m.request_stop("reset"))
        self.pci.attach(1, 0, PciFunction(**PIIX3_ISA))
        self.pci.attach(1, 1, PciFunction(**PIIX3_IDE))
        self.pci.attach(1, 3, PciFunction(**PIIX4_ACPI))
        m.add_device(self.pci, port=layout.PCI_CONFIG_PORT, name="pci")
        self.pc_testdev = self.pci_testdev = None
        if pc_testdev:
            self._add_pc_testdev()
        if pci_testdev:
            from pykvm.devices.pci_testdev import PciTestDev

            self.pci_testdev = PciTestDev(on_bar_change=self._bar_changed)
            self.pci.attach(2, 0, self.pci_testdev)

    def write_memory(self) -> None:
        """Put the ACPI tables and the firmware's leftovers in guest memory (before a kernel is loaded).

        Done at load time, not when the board is made, so that the BIOS data
        area lists the serial ports the machine has by then.
        """
        m = self.machine
        com_ports = [port for port in layout.COM_PORTS if m.pio.find(port) is not None]
        for addr, data in [*self.acpi.blobs, *build_firmware_state(com_ports)]:
            m.memory.write(addr, data)
        if m.irqchip:
            from pykvm.platform.firmware_chips import program_legacy_chips

            program_legacy_chips(m.vm, m.vcpus[0])  # the PICs, PIT channel 0 and LINT0/1 as SeaBIOS leaves them

    def _pit_channel2(self) -> tuple[int, int, int]:
        channel = self.machine.vm.get_pit2().channels[2]  # KVM_GET_PIT2
        return channel.count, channel.mode, channel.count_load_time

    def _set_pit_gate(self, gate: bool) -> None:
        state = self.machine.vm.get_pit2()
        state.channels[2].gate = int(gate)
        self.machine.vm.set_pit2(state)  # KVM_SET_PIT2 (QEMU's kvm_pit_set_gate does the same)

    @property
    def rsdp_addr(self) -> int:
        return self.acpi.rsdp_addr

    def _add_pc_testdev(self) -> None:
        from pykvm.devices.pc_testdev import PcTestdevIomem, PcTestdevIrq, PcTestdevPorts

        m = self.machine
        self.pc_testdev = PcTestdevPorts()
        m.add_device(self.pc_testdev, port=layout.PC_TESTDEV_PORT, name="pc-testdev")
        m.add_device(PcTestdevIrq(lambda irq, level: m.irq_line(irq)(level)), port=layout.PC_TESTDEV_IRQ_PORT,
                     name="pc-testdev-irq")
        from pykvm.devices.pc_testdev import IOMEM_BASE

        m.add_device(PcTestdevIomem(), mmio=IOMEM_BASE, name="pc-testdev-iomem")

    def _bar_changed(self, function, index: int, kind: str, old: int | None, new: int | None, size: int) -> None:
        """A guest moved a BAR: the function's window leaves its old address and decodes at the new one."""
        device = function.bar(index).device
        if device is None:
            return
        m = self.machine
        if old is not None:
            m.remove_device(device)
        if new is not None:
            where = {"port": new} if kind == "pio" else {"mmio": new}
            try:
                m.add_device(device, length=size, name=getattr(device, "name", "pci-bar"), **where)
            except ValueError:
                pass  # a BAR over another device: it decodes nothing there (a guest's mistake, as on hardware)

    def _sleep(self, sleep_type: int) -> None:
        """PM1a_CNT's SLP_EN with SLP_TYP (the DSDT's packages): S5 powers off, S3 suspends to RAM.

        Both end the vCPUs' run; after S3 ``Machine.run`` waits for a wake
        event and resumes (``platform.pc_sleep``).  S4 (to disk) is not
        emulated: it is taken as S3.
        """
        from pykvm.devices import DeviceStop
        from pykvm.platform.acpi import QEMU_SLEEP_TYPES

        if sleep_type == QEMU_SLEEP_TYPES[5]:
            raise DeviceStop(POWER_OFF, 0)
        self.sleep.suspend()
        raise DeviceStop(SUSPEND, 0)

    def close(self) -> None:
        """End an S3 wait and join the timer thread (the machine's close calls this first)."""
        self.sleep.interrupt("closed")
        self.timers.close()
