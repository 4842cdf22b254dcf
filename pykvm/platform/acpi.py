"""ACPI tables for the PC: what an operating system reads to find CPUs, interrupts and power control.

ACPI 6.4, chapter 5.  A firmware leaves a *Root System Description Pointer*
(RSDP, 5.2.5) on a 16-byte boundary in 0xE0000-0xFFFFF, where an OS looks
for it; the RSDP points at the RSDT (32-bit table pointers, 5.2.7) and the
XSDT (64-bit pointers, 5.2.8); these list the description tables:

* MADT ("APIC", 5.2.12): the local APIC address, one Processor Local APIC
  entry per CPU, the IOAPIC, the ISA interrupt source overrides and the
  LINT1 NMI wiring;
* FADT ("FACP", 5.2.9): the fixed-hardware ports (PM1a event/control, PM
  timer, GPE0, SMI_CMD and the ACPI enable handshake, the reset register)
  and pointers to the FACS and the DSDT;
* FACS (5.2.10): memory the OS and the platform share, among it the
  firmware waking vector an S3 resume jumps to;
* DSDT (5.2.11.1): AML.  Here only the sleep-state packages ``\\_S3_``,
  ``\\_S4_``, ``\\_S5_`` (7.4.2), enough for an OS to power off or suspend
  by writing SLP_TYP|SLP_EN to PM1a_CNT.

The values follow QEMU's ``-M pc`` (``hw/i386/acpi-build.c``,
``acpi-common.c``): the same MADT (revision 1, IOAPIC ID 0, IRQ 0 -> GSI 2,
IRQs 5/9/10/11 level-triggered active-high, NMI on LINT1 of every CPU), the
same PIIX4 PM ports and FADT flags, the same SLP_TYP values.  Where the
platform needs more than ``-M pc`` has, pykvm goes further: QEMU's x86
machines write an ACPI 1.0 RSDP (RSDT only) and ``-M pc`` a revision-1
FADT (for Windows 2000), which have no XSDT, no 64-bit addresses and no
reset register.  pykvm's RSDP is revision 2 with an XSDT beside the RSDT
(as QEMU's ARM and RISC-V virt machines), and its FADT is revision 3, as
QEMU's q35 writes it (the X_ fields, RESET_REG at 0xCF9).

Only ``FIRMWARE_CTRL`` carries the FACS address: ACPI 6.4 5.2.9 says
``X_FIRMWARE_CTRL`` must be zero when ``FIRMWARE_CTRL`` is non-zero (and
QEMU, fwts and Linux agree).  The DSDT's address is in both ``DSDT`` and
``X_DSDT``, which the spec allows.

:func:`build_acpi_tables` returns the bytes to write into guest memory and
where; it touches no VM.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from pykvm.errors import LoaderError
from pykvm.platform import layout

# Where the tables go: the lower half of the BIOS area.  The upper half (the
# F segment) holds the real-mode IRET stub (pykvm.platform.bios).
ACPI_AREA_START = layout.BIOS_AREA_START  # TODO(layout)
ACPI_AREA_END = 0xF0000  # TODO(layout)

# Numbers of QEMU's PIIX4 PM device (hw/acpi/piix4.c) not in the layout.
GPE0_BLOCK_LENGTH = 4  # TODO(layout): PIIX4's GPE_LEN (q35's ICH9 has 16)
ACPI_ENABLE = 0xF1  # written to SMI_CMD: firmware hands the fixed hardware to the OS
ACPI_DISABLE = 0xF0
IOAPIC_ID = 0  # TODO(layout): QEMU's ACPI_BUILD_IOAPIC_ID
RESET_VALUE = 0x06  # TODO(layout): PIIX reset control: bit 2 "reset CPU", bit 1 "hard reset"
RTC_CENTURY = 0x32  # the CMOS index of the century byte (QEMU's RTC_CENTURY)

# Header identity: pykvm's own (QEMU writes "BOCHS " / "BXPC").
OEM_ID = b"PYKVM "
OEM_TABLE_ID = b"PYKVMPC "
OEM_REVISION = 1
CREATOR_ID = b"PYKV"
CREATOR_REVISION = 1

HEADER_SIZE = 36  # every description table starts with it (5.2.6)
RSDP_SIGNATURE = b"RSD PTR "
RSDP_REVISION = 2  # ACPI 2.0+: has the XSDT address and the extended checksum
RSDP_V1_SIZE = 20  # the part the first checksum covers
RSDP_SIZE = 36
RSDP_ALIGN = 16  # the OS scans 16-byte boundaries (5.2.5.1)
FACS_SIZE = 64
FACS_ALIGN = 64  # 5.2.10: the FACS is aligned on a 64-byte boundary
TABLE_ALIGN = 16  # not required by ACPI: keeps every table on a scan boundary

#: Offsets in the FACS (5.2.10, Table 5.14) the platform reads on S3 resume.
FACS_FIRMWARE_WAKING_VECTOR = 12  # 32-bit; real mode: CS = vector >> 4, IP = vector & 0xF
FACS_X_FIRMWARE_WAKING_VECTOR = 24  # 64-bit, used only when the FACS version is >= 1
FACS_VERSION = 0  # as QEMU: an ACPI 1.0 FACS, so only the 32-bit vector is in use

FADT_REVISION = 3
FADT_SIZE = 244  # the ACPI 2.0/3.0 FADT, up to X_GPE1_BLK

# FADT flags (5.2.9, Table 5.10), the ones QEMU sets.
FADT_F_WBINVD = 1 << 0
FADT_F_PROC_C1 = 1 << 2
FADT_F_SLP_BUTTON = 1 << 5  # no fixed sleep button
FADT_F_RTC_S4 = 1 << 7
FADT_F_RESET_REG_SUP = 1 << 10
FADT_F_USE_PLATFORM_CLOCK = 1 << 15
FADT_F_FORCE_APIC_CLUSTER_MODEL = 1 << 18  # QEMU: flat logical mode only reaches 8 CPUs
IAPC_BOOT_ARCH_8042 = 1 << 1
INT_MODEL_MULTIPLE_APIC = 1  # the ACPI 1.0 INT_MODEL byte; reserved since 2.0, QEMU still writes 1
LATENCY_NOT_SUPPORTED = 0xFFF  # P_LVL2_LAT / P_LVL3_LAT: no C2 / C3

GAS_SYSTEM_IO = 1  # Generic Address Structure address space (5.2.3.2)

MADT_REVISION = 1
MADT_PCAT_COMPAT = 1  # the board also has dual 8259s
MADT_LOCAL_APIC, MADT_IO_APIC, MADT_OVERRIDE, MADT_LOCAL_APIC_NMI = 0, 1, 2, 4
LOCAL_APIC_ENABLED = 1
ALL_PROCESSORS = 0xFF  # ACPI processor ID meaning "every processor"
MAX_APIC_ID = 254  # 255 is the broadcast ID: larger IDs need x2APIC entries

# MPS INTI flags (5.2.12.5, Table 5.26): polarity in bits 1:0, trigger mode in bits 3:2.
INTI_CONFORMS = 0x0
INTI_ACTIVE_HIGH_LEVEL = 0xD  # polarity 01 (high), trigger 11 (level)

DSDT_REVISION = 1  # as QEMU: integers are 32 bits


@dataclass(frozen=True)
class InterruptOverride:
    """A MADT Interrupt Source Override: ISA ``irq`` arrives at ``gsi`` with MPS INTI ``flags``."""

    irq: int
    gsi: int
    flags: int = INTI_CONFORMS


#: QEMU's overrides: the PIT's IRQ 0 is on IOAPIC pin 2; the PCI-routable IRQs are level, active-high.
QEMU_INTERRUPT_OVERRIDES = (
    InterruptOverride(layout.PIT_IRQ, 2),
    *(InterruptOverride(irq, irq, INTI_ACTIVE_HIGH_LEVEL) for irq in (5, layout.SCI_IRQ, 10, 11)),
)

#: SLP_TYP values of QEMU's DSDT, by sleep state.
QEMU_SLEEP_TYPES = {3: 1, 4: 2, 5: 0}


@dataclass(frozen=True)
class IoApic:
    """The IOAPIC as the MADT describes it."""

    id: int = IOAPIC_ID
    address: int = layout.IOAPIC_ADDR
    gsi_base: int = 0


@dataclass(frozen=True)
class PmPorts:
    """The ACPI fixed hardware in I/O space (QEMU's PIIX4 PM) and the SCI that signals it."""

    pm1a_evt: int = layout.ACPI_PM1A_EVT_PORT
    pm1a_cnt: int = layout.ACPI_PM1A_CNT_PORT
    pm_tmr: int = layout.ACPI_PM_TMR_PORT
    gpe0: int = layout.ACPI_GPE0_PORT
    gpe0_length: int = GPE0_BLOCK_LENGTH
    smi_cmd: int = layout.SMI_CMD_PORT
    acpi_enable: int = ACPI_ENABLE
    acpi_disable: int = ACPI_DISABLE
    sci_irq: int = layout.SCI_IRQ

    # Block lengths in bytes, as QEMU's hw/acpi/core.c implements them.
    PM1_EVT_LENGTH = 4
    PM1_CNT_LENGTH = 2
    PM_TMR_LENGTH = 4


@dataclass(frozen=True)
class ResetRegister:
    """The FADT reset register: writing ``value`` to I/O ``port`` resets the machine."""

    port: int = layout.PCI_RESET_PORT
    value: int = RESET_VALUE


@dataclass(frozen=True)
class AcpiTables:
    """What :func:`build_acpi_tables` built: bytes to write and the addresses an OS or the platform needs."""

    blobs: list[tuple[int, bytes]]  # (guest-physical address, bytes), one per table
    rsdp_addr: int
    tables: dict[str, int] = field(default_factory=dict)  # "RSDP", "FACS", "DSDT", "FACP", ... -> address

    @property
    def facs_addr(self) -> int:
        return self.tables["FACS"]

    @property
    def firmware_waking_vector_addr(self) -> int:
        """Where the OS leaves the 32-bit real-mode S3 resume vector."""
        return self.facs_addr + FACS_FIRMWARE_WAKING_VECTOR


# --- AML (ACPI 6.4 chapter 20): just what sleep-state packages need -------------------

AML_ZERO_OP = 0x00
AML_ONE_OP = 0x01
AML_NAME_OP = 0x08
AML_BYTE_PREFIX = 0x0A
AML_WORD_PREFIX = 0x0B
AML_DWORD_PREFIX = 0x0C
AML_PACKAGE_OP = 0x12
_NAME_LEAD_CHARS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ_"
_NAME_CHARS = _NAME_LEAD_CHARS + "0123456789"


def aml_integer(value: int) -> bytes:
    """A ComputationalData integer in its shortest form (20.2.3); 32 bits at most (DSDT revision 1)."""
    if value == 0:
        return bytes([AML_ZERO_OP])
    if value == 1:
        return bytes([AML_ONE_OP])
    for prefix, size in ((AML_BYTE_PREFIX, 1), (AML_WORD_PREFIX, 2), (AML_DWORD_PREFIX, 4)):
        if 0 < value < 1 << (8 * size):
            return bytes([prefix]) + value.to_bytes(size, "little")
    raise ValueError(f"AML integer {value!r} does not fit in 32 bits")


def aml_pkg_length(body_length: int) -> bytes:
    """The PkgLength (20.2.4) of ``body_length`` bytes: it counts its own 1-4 bytes too.

    One byte holds lengths up to 63; longer ones put the count of following
    bytes in bits 7:6 of the lead byte, the low nibble in bits 3:0 and the
    rest, 8 bits at a time, in the following bytes.
    """
    for extra in range(4):
        total = body_length + 1 + extra
        if extra == 0 and total < 1 << 6:
            return bytes([total])
        if extra and total < 1 << (4 + 8 * extra):
            rest = (total >> 4).to_bytes(extra, "little")
            return bytes([(extra << 6) | (total & 0xF)]) + rest
    raise ValueError(f"AML package of {body_length} bytes is longer than PkgLength can say")


def aml_name_seg(name: str) -> bytes:
    """A NameSeg (20.2.2): four name characters, padded with '_' like ASL compilers do."""
    if not 1 <= len(name) <= 4 or name[0] not in _NAME_LEAD_CHARS or any(c not in _NAME_CHARS for c in name):
        raise ValueError(f"{name!r} is not an AML name segment")
    return name.ljust(4, "_").encode("ascii")


def aml_package(elements: Sequence[int]) -> bytes:
    """DefPackage: PackageOp PkgLength NumElements PackageElementList, of integers."""
    if len(elements) > 0xFF:
        raise ValueError("an AML Package holds at most 255 elements")
    body = bytes([len(elements)]) + b"".join(aml_integer(e) for e in elements)
    return bytes([AML_PACKAGE_OP]) + aml_pkg_length(len(body)) + body


def aml_name(name: str, data: bytes) -> bytes:
    """DefName: NameOp NameString DataRefObject, ``Name(NAME, data)`` in ASL."""
    return bytes([AML_NAME_OP]) + aml_name_seg(name) + data


def sleep_state_packages(sleep_types: Mapping[int, int]) -> bytes:
    """``Name(_Sx_, Package() {SLP_TYPa, SLP_TYPb, 0, 0})`` for each state, as QEMU writes them.

    QEMU puts them inside ``Scope(\\)``; the DSDT's own TermList is already
    the root scope, so pykvm writes them there directly.
    """
    return b"".join(aml_name(f"_S{state}", aml_package([typ, typ, 0, 0]))
                    for state, typ in sorted(sleep_types.items()))


# --- the tables ----------------------------------------------------------------------


def checksum(data: bytes) -> int:
    """The byte that makes ``data`` (with it) sum to 0 mod 256 (5.2.6)."""
    return -sum(data) & 0xFF


def description_table(signature: bytes, revision: int, body: bytes) -> bytes:
    """A System Description Table: the 36-byte header (5.2.6, Table 5.4) then ``body``, checksummed."""
    header = struct.pack("<4sIBB6s8sI4sI", signature, HEADER_SIZE + len(body), revision, 0,
                         OEM_ID, OEM_TABLE_ID, OEM_REVISION, CREATOR_ID, CREATOR_REVISION)
    table = bytearray(header + body)
    table[9] = checksum(table)
    return bytes(table)


def generic_address(port: int, length: int) -> bytes:
    """A Generic Address Structure (5.2.3.2) for ``length`` bytes of I/O space at ``port``.

    Access size 0 ("undefined, legacy"), as QEMU writes it: OSPM then
    accesses the register as wide as its bit width says.
    """
    return struct.pack("<BBBBQ", GAS_SYSTEM_IO, 8 * length, 0, 0, port)


def build_rsdp(rsdt_addr: int, xsdt_addr: int) -> bytes:
    """The RSDP (5.2.5.3): a checksum over its first 20 bytes and an extended one over all 36."""
    rsdp = bytearray(struct.pack("<8sB6sBIIQB3x", RSDP_SIGNATURE, 0, OEM_ID, RSDP_REVISION,
                                 rsdt_addr, RSDP_SIZE, xsdt_addr, 0))
    rsdp[8] = checksum(rsdp[:RSDP_V1_SIZE])
    rsdp[32] = checksum(rsdp)
    return bytes(rsdp)


def build_facs() -> bytes:
    """The FACS (5.2.10): no header checksum, length 64, every field zero until the OS writes."""
    facs = bytearray(FACS_SIZE)
    struct.pack_into("<4sI", facs, 0, b"FACS", FACS_SIZE)
    facs[32] = FACS_VERSION
    return bytes(facs)


def build_dsdt(sleep_types: Mapping[int, int]) -> bytes:
    return description_table(b"DSDT", DSDT_REVISION, sleep_state_packages(sleep_types))


def build_madt(apic_ids: Sequence[int], ioapic: IoApic, overrides: Sequence[InterruptOverride]) -> bytes:
    """The MADT (5.2.12) as QEMU's acpi_build_madt writes it for xAPIC IDs."""
    body = bytearray(struct.pack("<II", layout.LAPIC_ADDR, MADT_PCAT_COMPAT))
    for processor_id, apic_id in enumerate(apic_ids):  # 5.2.12.2, Table 5.23
        body += struct.pack("<BBBBI", MADT_LOCAL_APIC, 8, processor_id, apic_id, LOCAL_APIC_ENABLED)
    body += struct.pack("<BBBBII", MADT_IO_APIC, 12, ioapic.id, 0, ioapic.address, ioapic.gsi_base)
    for override in overrides:  # 5.2.12.5: bus 0 is ISA
        body += struct.pack("<BBBBIH", MADT_OVERRIDE, 10, 0, override.irq, override.gsi, override.flags)
    body += struct.pack("<BBBHB", MADT_LOCAL_APIC_NMI, 6, ALL_PROCESSORS, INTI_CONFORMS, 1)  # LINT1
    return description_table(b"APIC", MADT_REVISION, bytes(body))


def build_fadt(*, facs_addr: int, dsdt_addr: int, pm: PmPorts, reset: ResetRegister,
               cpu_count: int, i8042: bool, rtc_century: int) -> bytes:
    """The FADT, revision 3 (5.2.9, Table 5.9): legacy port fields and their X_ twins agree."""
    flags = (FADT_F_WBINVD | FADT_F_PROC_C1 | FADT_F_SLP_BUTTON | FADT_F_RTC_S4
             | FADT_F_USE_PLATFORM_CLOCK | FADT_F_RESET_REG_SUP)
    if cpu_count > 8:
        flags |= FADT_F_FORCE_APIC_CLUSTER_MODEL
    blocks = [(pm.pm1a_evt, pm.PM1_EVT_LENGTH), (0, 0), (pm.pm1a_cnt, pm.PM1_CNT_LENGTH), (0, 0),
              (0, 0), (pm.pm_tmr, pm.PM_TMR_LENGTH), (pm.gpe0, pm.gpe0_length), (0, 0)]
    ports = [port for port, _ in blocks]  # PM1a_EVT PM1b_EVT PM1a_CNT PM1b_CNT PM2_CNT PM_TMR GPE0 GPE1
    lengths = [length for _, length in blocks]
    body = struct.pack(
        "<IIBBHIBBBB8I8BHHHHBBBBBHBI",
        facs_addr, dsdt_addr,                    # FIRMWARE_CTRL, DSDT (offsets 36, 40)
        INT_MODEL_MULTIPLE_APIC, 0,              # reserved (INT_MODEL), Preferred_PM_Profile: unspecified
        pm.sci_irq, pm.smi_cmd,                  # SCI_INT, SMI_CMD
        pm.acpi_enable, pm.acpi_disable, 0, 0,   # ACPI_ENABLE, ACPI_DISABLE, S4BIOS_REQ, PSTATE_CNT
        *ports,                                  # offsets 56-87
        lengths[0], lengths[2], 0, lengths[5],   # PM1_EVT_LEN, PM1_CNT_LEN, PM2_CNT_LEN, PM_TMR_LEN
        pm.gpe0_length, 0, 0, 0,                 # GPE0_BLK_LEN, GPE1_BLK_LEN, GPE1_BASE, CST_CNT
        LATENCY_NOT_SUPPORTED, LATENCY_NOT_SUPPORTED, 0, 0,  # P_LVL2_LAT, P_LVL3_LAT, FLUSH_SIZE, FLUSH_STRIDE
        0, 0, 0, 0, rtc_century,                 # DUTY_OFFSET, DUTY_WIDTH, DAY_ALRM, MON_ALRM, CENTURY
        IAPC_BOOT_ARCH_8042 if i8042 else 0, 0,  # IAPC_BOOT_ARCH, reserved
        flags,                                   # offset 112
    )
    body += generic_address(reset.port, 1) + struct.pack("<B3x", reset.value)  # RESET_REG, RESET_VALUE
    body += struct.pack("<QQ", 0, dsdt_addr)     # X_FIRMWARE_CTRL (zero: see the module docstring), X_DSDT
    body += b"".join(generic_address(port, length) if port else bytes(12) for port, length in blocks)
    table = description_table(b"FACP", FADT_REVISION, body)
    assert len(table) == FADT_SIZE
    return table


def build_acpi_tables(
    apic_ids: Sequence[int],
    *,
    ioapic: IoApic = IoApic(),
    overrides: Sequence[InterruptOverride] = QEMU_INTERRUPT_OVERRIDES,
    pm: PmPorts = PmPorts(),
    reset: ResetRegister = ResetRegister(),
    sleep_types: Mapping[int, int] = QEMU_SLEEP_TYPES,
    area: tuple[int, int] = (ACPI_AREA_START, ACPI_AREA_END),
    i8042: bool = True,
    rtc_century: int = RTC_CENTURY,
) -> AcpiTables:
    """Lay out the RSDP, FACS, DSDT, FADT, MADT, RSDT and XSDT in ``area`` = [start, end).

    ``apic_ids`` are the CPUs' local APIC IDs, the boot CPU first; CPU *n*
    gets ACPI processor ID *n*.  ``i8042`` sets the FADT's "8042 present"
    boot flag, as QEMU does when its machine has one.  Raises
    :class:`LoaderError` when an argument cannot be described or the tables
    do not fit in ``area``.
    """
    _check_arguments(apic_ids, ioapic, overrides, area)
    start, end = area
    cursor = _align(start, RSDP_ALIGN)
    placed: dict[str, int] = {}

    def place(name: str, size: int, alignment: int = TABLE_ALIGN) -> int:
        nonlocal cursor
        addr = _align(cursor, alignment)
        if addr + size > end:
            raise LoaderError(f"ACPI tables for {len(apic_ids)} CPUs do not fit in "
                              f"{start:#x}-{end:#x}: {name} would end at {addr + size:#x}")
        placed[name] = addr
        cursor = addr + size
        return addr

    facs, dsdt, madt = build_facs(), build_dsdt(sleep_types), build_madt(apic_ids, ioapic, overrides)
    rsdp_addr = place("RSDP", RSDP_SIZE, RSDP_ALIGN)
    facs_addr = place("FACS", len(facs), FACS_ALIGN)
    dsdt_addr = place("DSDT", len(dsdt))
    fadt = build_fadt(facs_addr=facs_addr, dsdt_addr=dsdt_addr, pm=pm, reset=reset,
                      cpu_count=len(apic_ids), i8042=i8042, rtc_century=rtc_century)
    pointed_to = [place("FACP", len(fadt)), place("APIC", len(madt))]
    rsdt = description_table(b"RSDT", 1, struct.pack(f"<{len(pointed_to)}I", *pointed_to))
    xsdt = description_table(b"XSDT", 1, struct.pack(f"<{len(pointed_to)}Q", *pointed_to))
    rsdt_addr, xsdt_addr = place("RSDT", len(rsdt)), place("XSDT", len(xsdt))
    contents = {"RSDP": build_rsdp(rsdt_addr, xsdt_addr), "FACS": facs, "DSDT": dsdt, "FACP": fadt,
                "APIC": madt, "RSDT": rsdt, "XSDT": xsdt}
    return AcpiTables(blobs=[(placed[name], contents[name]) for name in placed],
                      rsdp_addr=rsdp_addr, tables=placed)


def _check_arguments(apic_ids: Sequence[int], ioapic: IoApic, overrides: Sequence[InterruptOverride],
                     area: tuple[int, int]) -> None:
    if not apic_ids:
        raise LoaderError("the MADT needs at least one CPU")
    if len(set(apic_ids)) != len(apic_ids):
        raise LoaderError(f"duplicate local APIC IDs in {list(apic_ids)}")
    if any(not 0 <= apic_id <= MAX_APIC_ID for apic_id in apic_ids):
        raise LoaderError(f"local APIC IDs must be 0-{MAX_APIC_ID} (larger ones need x2APIC): {list(apic_ids)}")
    if not 0 <= ioapic.id <= 0xFF or not 0 <= ioapic.address < 1 << 32 or not 0 <= ioapic.gsi_base < 1 << 32:
        raise LoaderError(f"{ioapic} cannot be described in the MADT")
    for override in overrides:
        if not 0 <= override.irq <= 0xFF or not 0 <= override.gsi < 1 << 32 or not 0 <= override.flags <= 0xFFFF:
            raise LoaderError(f"{override} cannot be described in the MADT")
    start, end = area
    if not layout.BIOS_AREA_START <= start < end <= layout.BIOS_AREA_END:
        raise LoaderError(f"the ACPI area {start:#x}-{end:#x} is not inside the BIOS area "
                          f"{layout.BIOS_AREA_START:#x}-{layout.BIOS_AREA_END:#x}, where the RSDP scan looks")


def _align(value: int, alignment: int) -> int:
    return -(-value // alignment) * alignment
