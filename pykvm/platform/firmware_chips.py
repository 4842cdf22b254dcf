"""The interrupt controllers and the timer as the PC's firmware leaves them for a kernel.

A kernel that QEMU boots with ``-kernel`` runs after SeaBIOS, and some
kernels use what SeaBIOS set up instead of setting it up again: the 8259s,
the 8254's channel 0 and the boot CPU's local APIC.  A BIOS programs them
through their ports; pykvm loads the same end state into KVM's in-kernel
chips before the first instruction:

* the PICs (KVM_SET_IRQCHIP): initialised with ICW4, the master's vectors at
  0x08 (the BIOS's IRQ 0-7 handlers, INT 08h-0Fh) and the slave's at 0x70
  (INT 70h-77h), the timer, keyboard, cascade and floppy lines unmasked on
  the master (mask 0xb8) and the RTC, mouse, FPU and disk lines on the slave
  (mask 0x8e), PCI lines 10 and 11 level-triggered in the slave's ELCR;
* PIT channel 0 (KVM_SET_PIT2): mode 3, a count of 0 (65,536), lobyte then
  hibyte: the 18.2 Hz tick the BIOS keeps its clock with;
* the boot CPU's LAPIC (KVM_SET_LAPIC): software-enabled, LINT0 in ExtINT
  mode (so the master PIC's output reaches the CPU) and LINT1 as the NMI,
  both level-triggered, as SeaBIOS's ``smp_setup`` writes them.

The application processors need nothing: INIT resets their local APICs.
Interrupts stay disabled in RFLAGS at the kernel's entry, so nothing
arrives before the kernel asks for it.
"""

from __future__ import annotations

from pykvm._native import ffi, lib

MASTER_VECTOR_BASE = 0x08
SLAVE_VECTOR_BASE = 0x70
MASTER_MASK = 0xB8  # IRQ 0, 1, 2 and 6 unmasked
SLAVE_MASK = 0x8E  # IRQ 8, 12, 13 and 14 unmasked
SLAVE_ELCR = 0x0C  # IRQ 10 and 11: PCI interrupt lines, level-triggered

PIT_MODE_SQUARE_WAVE = 3
PIT_RW_LOBYTE_HIBYTE = 3  # the access mode a control word 0x36 selects (KVM's RW_STATE_WORD0)

# Local APIC registers (Intel SDM vol. 3, table 11-1): offsets into KVM's 1 KiB register page.
LAPIC_SVR = 0xF0
LAPIC_LVT_LINT0 = 0x350
LAPIC_LVT_LINT1 = 0x360
SVR_APIC_ENABLED = 0x100
LVT_EXTINT_LEVEL = 0x8700  # delivery mode 111 (ExtINT), level-triggered, unmasked
LVT_NMI_LEVEL = 0x8400  # delivery mode 100 (NMI), level-triggered, unmasked


def program_legacy_chips(vm, boot_vcpu) -> None:
    """Load the PICs', PIT channel 0's and the boot CPU's LAPIC state a BIOS leaves behind."""
    for chip_id, base, mask, elcr in ((lib.KVM_IRQCHIP_PIC_MASTER, MASTER_VECTOR_BASE, MASTER_MASK, 0),
                                      (lib.KVM_IRQCHIP_PIC_SLAVE, SLAVE_VECTOR_BASE, SLAVE_MASK, SLAVE_ELCR)):
        chip = vm.get_irqchip(chip_id)
        pic = vm.pic_state(chip)
        pic.irq_base, pic.imr, pic.init4, pic.init_state = base, mask, 1, 0
        pic.elcr = elcr & pic.elcr_mask
        vm.set_irqchip(chip)

    pit = vm.get_pit2()
    channel = pit.channels[0]
    channel.mode, channel.count, channel.gate = PIT_MODE_SQUARE_WAVE, 0, 1
    channel.rw_mode = channel.read_state = channel.write_state = PIT_RW_LOBYTE_HIBYTE
    vm.set_pit2(pit)  # KVM reloads the count: channel 0's timer runs from now

    lapic = boot_vcpu.get_lapic()
    _write32(lapic.regs, LAPIC_SVR, _read32(lapic.regs, LAPIC_SVR) | SVR_APIC_ENABLED)
    _write32(lapic.regs, LAPIC_LVT_LINT0, LVT_EXTINT_LEVEL)
    _write32(lapic.regs, LAPIC_LVT_LINT1, LVT_NMI_LEVEL)
    boot_vcpu.set_lapic(lapic)


def _read32(regs, offset: int) -> int:
    return int.from_bytes(ffi.buffer(regs)[offset:offset + 4], "little")


def _write32(regs, offset: int, value: int) -> None:
    ffi.buffer(regs)[offset:offset + 4] = value.to_bytes(4, "little")
