"""The PC as pykvm builds it: every guest-physical address and I/O port, in one place.

Pure data: this module imports nothing, so the loaders, the guests' registry
and the device models below the platform layer may read it too.  The
numbers follow QEMU's ``-M pc`` wherever QEMU has one (so kernels written
for QEMU find what they expect), and pykvm's own guest contract where QEMU
has none (``guests/README.md``).

Guest-physical memory::

    0x00000000  real-mode interrupt vector table (256 x 4 bytes), page 0
    0x00000400  BIOS data area (COM port addresses, equipment, memory size)
    0x00001000  GDT            \
    0x00002000  TSS (+ I/O bitmap to 0x2868 in long_user)
    0x00003000  IDT (empty)     > pykvm's CPU structures for its own guests
    0x00010000  page tables     |  (CPU_TABLES below; a kernel that sets up its
    0x00070000  stack to 0x80000 /  own CPU state gets them elsewhere, or none)
    0x00008000  real-mode guests load here (CS=0, IP=0x8000, SP=0x7c00)
    0x0009fc00  extended BIOS data area (1 KiB), reserved in the e820 map
    0x000a0000  VGA window and option ROMs: not RAM
    0x000e0000  BIOS area: ACPI tables and the RSDP (found by the 0xe0000 scan),
                the IRET stub the real-mode vectors point at
    0x00100000  every other guest loads here (1 MiB)
    0xc0000000  the MMIO hole starts: RAM above 3 GiB continues at 4 GiB
    0xd0000000  virtio-mmio windows (0x200 bytes each)
    0xe0000000  MMIO exit-benchmark address (never RAM)
    0xfec00000  IOAPIC
    0xfee00000  local APICs
    0x100000000 RAM above the hole
"""

from __future__ import annotations

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30
PAGE_SIZE = 4096

# --- real-mode and BIOS memory -------------------------------------------------
IVT_ADDR = 0x0
BDA_ADDR = 0x400
EBDA_ADDR = 0x9FC00
EBDA_SIZE = 0x400
LOW_RAM_END = 0xA0000  # conventional memory ends here (VGA window above)
BIOS_AREA_START = 0xE0000  # the RSDP scan range, 16-byte steps (ACPI 6.4 5.2.5.1)
BIOS_AREA_END = 0x100000

# --- pykvm's CPU structures for its own guests (guests/README.md) -----------------
GDT_ADDR = 0x1000
TSS_ADDR = 0x2000
IDT_ADDR = 0x3000
PAGE_TABLES_START = 0x10000
PAGE_TABLES_END = 0x20000
STACK_TOP = 0x80000  # initial RSP/ESP; the stack grows down
STACK_BOTTOM = 0x70000
KERNEL_STACK_TOP = 0x6F000  # RSP0 in the TSS: where CPL 3 -> 0 switches to
REAL_MODE_STACK = 0x7C00  # SS=0, SP=0x7c00
CPU_TABLES_END = STACK_TOP  # everything above up to here is pykvm's when its tables are in use

# --- where images load ----------------------------------------------------------
REAL_MODE_LOAD_ADDR = 0x8000  # CS=0, IP=0x8000
LOAD_ADDR = 0x100000  # every other mode; the entry point is the load address
MULTIBOOT_INFO_ADDR = 0x6000  # where pykvm's own Multiboot guests have always found it

# --- the MMIO hole and what lives in it ------------------------------------------
MMIO_HOLE_START = 0xC000_0000
HIGH_MEMORY_START = 1 << 32
VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_MMIO_SIZE = 0x200
MMIO_BENCH_ADDR = 0xE000_0000
IOAPIC_ADDR = 0xFEC0_0000
LAPIC_ADDR = 0xFEE0_0000

# --- I/O ports ---------------------------------------------------------------------
PIC_MASTER_PORT = 0x20  # in-kernel 8259s (KVM_CREATE_IRQCHIP)
PIC_SLAVE_PORT = 0xA0
PIT_PORT = 0x40  # in-kernel 8254 (KVM_CREATE_PIT2), 0x40-0x43
SYSTEM_CONTROL_PORT = 0x61  # port B: PIT channel 2's gate (bit 0) and OUT (bit 5)
I8042_DATA_PORT = 0x60
I8042_COMMAND_PORT = 0x64
I8042_RESET = 0xFE  # written to port 0x64: reset, a clean stop for CPL-3 guests
CMOS_PORT = 0x70  # index (bit 7: NMI mask) at 0x70, data at 0x71
POST_PORT = 0x80
SMI_CMD_PORT = 0xB2  # ACPI enable/disable handshake (FADT SMI_CMD)
PC_TESTDEV_PORT = 0xE0  # QEMU's pc-testdev: 0xe0-0xeb
DEBUG_EXIT_PORT = 0xF4  # isa-debug-exit as test harnesses configure it (QEMU's default is 0x501)
IDE_PRIMARY_PORT = 0x1F0  # ATA command block: data, error/features, count, LBA low/mid/high, device, status
IDE_PRIMARY_CONTROL_PORT = 0x3F6  # alternate status / device control (0x3f7 is the floppy's)
IDE_SECONDARY_PORT = 0x170  # not populated by pykvm
IDE_SECONDARY_CONTROL_PORT = 0x376
COM_PORTS = (0x3F8, 0x2F8, 0x3E8, 0x2E8)  # COM1..COM4
COM1_PORT = COM_PORTS[0]
FW_CFG_PORT = 0x510  # selector (16-bit) at 0x510, data at 0x511
FW_CFG_DMA_PORT = 0x514  # 64-bit DMA address, big-endian
ACPI_PM_PORT = 0x600  # PIIX4 PM base: PM1a_EVT 0x600, PM1a_CNT 0x604, PM_TMR 0x608
ACPI_PM1A_EVT_PORT = ACPI_PM_PORT
ACPI_PM1A_CNT_PORT = ACPI_PM_PORT + 4
ACPI_PM_TMR_PORT = ACPI_PM_PORT + 8
ACPI_GPE0_PORT = 0xAFE0
BENCH_PORT = 0x700  # exit benchmark
PCI_CONFIG_PORT = 0xCF8  # CONFIG_ADDRESS at 0xcf8, reset control at 0xcf9, CONFIG_DATA at 0xcfc
PCI_RESET_PORT = 0xCF9
PC_TESTDEV_IRQ_PORT = 0x2000  # pc-testdev: a write to 0x2000 + n sets ISA IRQ n's level

# --- interrupt lines (ISA IRQ = GSI for 1-15; IRQ 0 is GSI 2 on the IOAPIC) ----------
PIT_IRQ = 0
KEYBOARD_IRQ = 1
CASCADE_IRQ = 2
COM_IRQS = (4, 3, 4, 3)  # COM1..COM4, as on a PC (COM3/COM4 share)
COM1_IRQ = COM_IRQS[0]
RTC_IRQ = 8
SCI_IRQ = 9  # ACPI's system control interrupt
MOUSE_IRQ = 12
IDE_IRQS = (14, 15)
IDE_PRIMARY_IRQ = IDE_IRQS[0]
#: Lines the PC's own devices use; virtio devices get the others (5, 6, 7, 10, 11, 16-23).
RESERVED_IRQS = {
    PIT_IRQ: "the PIT", KEYBOARD_IRQ: "the keyboard", CASCADE_IRQ: "the PIC cascade",
    3: "COM2/COM4", 4: "COM1/COM3", RTC_IRQ: "the RTC", SCI_IRQ: "ACPI's SCI", MOUSE_IRQ: "the mouse",
    13: "the FPU", 14: "the primary IDE channel", 15: "the secondary IDE channel",
}
IOAPIC_PINS = 24


def load_address(mode: str) -> int:
    """Where a flat guest for CPU ``mode`` is loaded (and entered) by default."""
    return REAL_MODE_LOAD_ADDR if mode == "real" else LOAD_ADDR


def ram_regions(memory_size: int) -> list[tuple[int, int]]:
    """Guest-physical ``(base, size)`` of RAM for ``memory_size`` bytes: split around the MMIO hole."""
    low = min(memory_size, MMIO_HOLE_START)
    regions = [(0, low)]
    if memory_size > low:
        regions.append((HIGH_MEMORY_START, memory_size - low))
    return regions


def e820_map(memory_size: int) -> list[tuple[int, int, int]]:
    """The memory map a PC firmware reports: ``(base, length, type)``, type 1 RAM, 2 reserved.

    Conventional memory below the EBDA, the EBDA and BIOS area reserved,
    RAM from 1 MiB to the hole, RAM above 4 GiB (as QEMU's SeaBIOS reports).
    """
    low = min(memory_size, MMIO_HOLE_START)
    entries = [(0, min(low, EBDA_ADDR), 1)]
    if low > EBDA_ADDR:
        entries.append((EBDA_ADDR, LOW_RAM_END - EBDA_ADDR, 2))
    if low > BIOS_AREA_START:
        entries.append((BIOS_AREA_START, BIOS_AREA_END - BIOS_AREA_START, 2))
    if low > BIOS_AREA_END:
        entries.append((BIOS_AREA_END, low - BIOS_AREA_END, 1))
    if memory_size > low:
        entries.append((HIGH_MEMORY_START, memory_size - low, 1))
    return entries
