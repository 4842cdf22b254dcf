"""Architectural bit constants of x86: control registers, EFER, RFLAGS,
page-table entries and segment descriptors.

These numbers are defined by the processor architecture, not by KVM, so they
do not appear in ``<linux/kvm.h>``: typing them here is the right place (the
KVM structure layouts and ioctl numbers, by contrast, always come from the
kernel header through cffi).

References (section titles are given as well as numbers, because the numbers
move a little between manual editions):

* Intel SDM = Intel 64 and IA-32 Architectures Software Developer's Manual.
* AMD APM   = AMD64 Architecture Programmer's Manual, Volume 2: System
  Programming.

Every group below has a ``*_NAMES`` table mapping each single bit to its
short name, in bit order, used by :mod:`pykvm.x86.state` to decode values.
"""

from __future__ import annotations

# ---------------------------------------------------------------------------
# CR0 -- Intel SDM Vol. 3A §2.5 "Control Registers" (Figure 2-7);
#        AMD APM Vol. 2 §3.1.1 "CR0 Register".
# ---------------------------------------------------------------------------
CR0_PE = 1 << 0  # Protection Enable: protected mode (segmentation by descriptors)
CR0_MP = 1 << 1  # Monitor Coprocessor: WAIT/FWAIT honour CR0.TS
CR0_EM = 1 << 2  # Emulation: x87/SSE instructions raise #NM/#UD
CR0_TS = 1 << 3  # Task Switched: lazy FPU state switching
CR0_ET = 1 << 4  # Extension Type: hard-wired to 1 on modern CPUs
CR0_NE = 1 << 5  # Numeric Error: native x87 error reporting (#MF)
CR0_WP = 1 << 16  # Write Protect: supervisor writes honour read-only pages
CR0_AM = 1 << 18  # Alignment Mask: enables RFLAGS.AC checking at CPL 3
CR0_NW = 1 << 29  # Not Write-through (cache control)
CR0_CD = 1 << 30  # Cache Disable
CR0_PG = 1 << 31  # Paging

#: The value CR0 has after RESET/INIT: CD | NW | ET = 0x60000010 (Intel SDM
#: Vol. 3A, chapter "Processor Management and Initialization", table "IA-32
#: and Intel 64 Processor States Following Power-up, Reset, or INIT").  A new
#: KVM vCPU starts with this value.
CR0_RESET = CR0_CD | CR0_NW | CR0_ET

CR0_NAMES: dict[int, str] = {
    CR0_PE: "PE",
    CR0_MP: "MP",
    CR0_EM: "EM",
    CR0_TS: "TS",
    CR0_ET: "ET",
    CR0_NE: "NE",
    CR0_WP: "WP",
    CR0_AM: "AM",
    CR0_NW: "NW",
    CR0_CD: "CD",
    CR0_PG: "PG",
}

# ---------------------------------------------------------------------------
# CR4 -- Intel SDM Vol. 3A §2.5 "Control Registers" (Figure 2-7);
#        AMD APM Vol. 2 §3.1.3 "CR4 Register".
# ---------------------------------------------------------------------------
CR4_VME = 1 << 0  # Virtual-8086 Mode Extensions
CR4_PVI = 1 << 1  # Protected-mode Virtual Interrupts
CR4_TSD = 1 << 2  # Time Stamp Disable (RDTSC privileged)
CR4_DE = 1 << 3  # Debugging Extensions
CR4_PSE = 1 << 4  # Page Size Extensions: 4 MiB pages in 32-bit paging
CR4_PAE = 1 << 5  # Physical Address Extension: 64-bit entries (PAE, 4-level)
CR4_MCE = 1 << 6  # Machine-Check Enable
CR4_PGE = 1 << 7  # Page Global Enable
CR4_PCE = 1 << 8  # Performance-monitoring Counter Enable (RDPMC at CPL 3)
CR4_OSFXSR = 1 << 9  # OS supports FXSAVE/FXRSTOR: enables SSE
CR4_OSXMMEXCPT = 1 << 10  # OS handles SIMD exceptions (#XM)
CR4_UMIP = 1 << 11  # User-Mode Instruction Prevention
CR4_LA57 = 1 << 12  # 57-bit linear addresses (5-level paging)
CR4_VMXE = 1 << 13  # VMX Enable
CR4_SMXE = 1 << 14  # SMX Enable
CR4_FSGSBASE = 1 << 16  # RDFSBASE/WRFSBASE... at CPL 3
CR4_PCIDE = 1 << 17  # Process-Context Identifiers
CR4_OSXSAVE = 1 << 18  # XSAVE and extended states
CR4_KL = 1 << 19  # Key Locker
CR4_SMEP = 1 << 20  # Supervisor Mode Execution Prevention
CR4_SMAP = 1 << 21  # Supervisor Mode Access Prevention
CR4_PKE = 1 << 22  # Protection Keys for user pages
CR4_CET = 1 << 23  # Control-flow Enforcement Technology
CR4_PKS = 1 << 24  # Protection Keys for supervisor pages

CR4_NAMES: dict[int, str] = {
    CR4_VME: "VME",
    CR4_PVI: "PVI",
    CR4_TSD: "TSD",
    CR4_DE: "DE",
    CR4_PSE: "PSE",
    CR4_PAE: "PAE",
    CR4_MCE: "MCE",
    CR4_PGE: "PGE",
    CR4_PCE: "PCE",
    CR4_OSFXSR: "OSFXSR",
    CR4_OSXMMEXCPT: "OSXMMEXCPT",
    CR4_UMIP: "UMIP",
    CR4_LA57: "LA57",
    CR4_VMXE: "VMXE",
    CR4_SMXE: "SMXE",
    CR4_FSGSBASE: "FSGSBASE",
    CR4_PCIDE: "PCIDE",
    CR4_OSXSAVE: "OSXSAVE",
    CR4_KL: "KL",
    CR4_SMEP: "SMEP",
    CR4_SMAP: "SMAP",
    CR4_PKE: "PKE",
    CR4_CET: "CET",
    CR4_PKS: "PKS",
}

# ---------------------------------------------------------------------------
# IA32_EFER (MSR 0xC0000080) -- Intel SDM Vol. 3A §2.2.1 "Extended Feature
# Enable Register" (Figure 2-4); AMD APM Vol. 2 §3.1.7 "Extended Feature
# Enable Register (EFER)".
# ---------------------------------------------------------------------------
MSR_EFER = 0xC0000080
#: IA32_KERNEL_GS_BASE: the GS base SWAPGS exchanges (Intel SDM Vol. 4, table 2-2).
MSR_KERNEL_GS_BASE = 0xC0000102

EFER_SCE = 1 << 0  # System Call Extensions: SYSCALL/SYSRET
EFER_LME = 1 << 8  # Long Mode Enable (software sets it before CR0.PG)
EFER_LMA = 1 << 10  # Long Mode Active (the CPU sets it; KVM_SET_SREGS takes it)
EFER_NXE = 1 << 11  # No-Execute Enable: bit 63 of PAE/4-level entries is NX
EFER_SVME = 1 << 12  # Secure Virtual Machine Enable (AMD)
EFER_LMSLE = 1 << 13  # Long Mode Segment Limit Enable (AMD, obsolete)
EFER_FFXSR = 1 << 14  # Fast FXSAVE/FXRSTOR (AMD)
EFER_TCE = 1 << 15  # Translation Cache Extension (AMD)

EFER_NAMES: dict[int, str] = {
    EFER_SCE: "SCE",
    EFER_LME: "LME",
    EFER_LMA: "LMA",
    EFER_NXE: "NXE",
    EFER_SVME: "SVME",
    EFER_LMSLE: "LMSLE",
    EFER_FFXSR: "FFXSR",
    EFER_TCE: "TCE",
}

# ---------------------------------------------------------------------------
# RFLAGS -- Intel SDM Vol. 1 §3.4.3 "EFLAGS Register" (Figure 3-8);
#           AMD APM Vol. 2 §3.1.6 "RFLAGS Register".
# ---------------------------------------------------------------------------
RFLAGS_CF = 1 << 0  # Carry
RFLAGS_FIXED = 1 << 1  # reserved, always reads as 1
RFLAGS_PF = 1 << 2  # Parity
RFLAGS_AF = 1 << 4  # Auxiliary carry
RFLAGS_ZF = 1 << 6  # Zero
RFLAGS_SF = 1 << 7  # Sign
RFLAGS_TF = 1 << 8  # Trap (single-step)
RFLAGS_IF = 1 << 9  # Interrupt enable
RFLAGS_DF = 1 << 10  # Direction
RFLAGS_OF = 1 << 11  # Overflow
RFLAGS_IOPL_SHIFT = 12  # I/O Privilege Level, two bits (13:12)
RFLAGS_IOPL_MASK = 3 << RFLAGS_IOPL_SHIFT
RFLAGS_NT = 1 << 14  # Nested Task
RFLAGS_RF = 1 << 16  # Resume (suppresses instruction breakpoints once)
RFLAGS_VM = 1 << 17  # Virtual-8086 mode
RFLAGS_AC = 1 << 18  # Alignment Check / SMAP override
RFLAGS_VIF = 1 << 19  # Virtual Interrupt Flag
RFLAGS_VIP = 1 << 20  # Virtual Interrupt Pending
RFLAGS_ID = 1 << 21  # CPUID available

#: One-bit flags (IOPL, a two-bit field, is decoded separately).
RFLAGS_NAMES: dict[int, str] = {
    RFLAGS_CF: "CF",
    RFLAGS_PF: "PF",
    RFLAGS_AF: "AF",
    RFLAGS_ZF: "ZF",
    RFLAGS_SF: "SF",
    RFLAGS_TF: "TF",
    RFLAGS_IF: "IF",
    RFLAGS_DF: "DF",
    RFLAGS_OF: "OF",
    RFLAGS_NT: "NT",
    RFLAGS_RF: "RF",
    RFLAGS_VM: "VM",
    RFLAGS_AC: "AC",
    RFLAGS_VIF: "VIF",
    RFLAGS_VIP: "VIP",
    RFLAGS_ID: "ID",
}

# ---------------------------------------------------------------------------
# Page-table entries -- Intel SDM Vol. 3A chapter 4 "Paging": §4.3 "32-Bit
# Paging" (Tables 4-4 to 4-6), §4.4 "PAE Paging" (Tables 4-7 to 4-11), §4.5
# "4-Level Paging and 5-Level Paging" (Tables 4-14 to 4-20);
# AMD APM Vol. 2 §5.4 "Page-Translation-Table Entry Fields".
# ---------------------------------------------------------------------------
PTE_P = 1 << 0  # Present
PTE_RW = 1 << 1  # Read/Write: 0 = read-only
PTE_US = 1 << 2  # User/Supervisor: 0 = supervisor only (CPL < 3)
PTE_PWT = 1 << 3  # Page-level Write-Through
PTE_PCD = 1 << 4  # Page-level Cache Disable
PTE_A = 1 << 5  # Accessed (set by the CPU)
PTE_D = 1 << 6  # Dirty (set by the CPU; leaf entries only)
PTE_PS = 1 << 7  # Page Size: this PD/PDPT entry maps a large page
PTE_PAT = 1 << 7  # PAT index bit, in a 4 KiB PTE (same bit as PS)
PTE_G = 1 << 8  # Global (leaf entries only, with CR4.PGE)
PTE_PAT_LARGE = 1 << 12  # PAT index bit, in a 2 MiB / 1 GiB / 4 MiB entry
PTE_NX = 1 << 63  # No-Execute / Execute-Disable (PAE, 4-level; needs EFER.NXE)

#: Physical-address bits of a 64-bit entry that points to a table or 4 KiB
#: page: bits 51:12 (the architectural maximum MAXPHYADDR is 52).
PTE_ADDR_MASK = 0x000F_FFFF_FFFF_F000
#: Physical-address bits of a 2 MiB page in a PD entry with PS=1 (51:21).
PTE_ADDR_MASK_2M = 0x000F_FFFF_FFE0_0000
#: Physical-address bits of a 1 GiB page in a PDPT entry with PS=1 (51:30).
PTE_ADDR_MASK_1G = 0x000F_FFFF_C000_0000

#: 32-bit paging: bits 31:12 of a PDE/PTE hold a table or 4 KiB page address.
PTE32_ADDR_MASK = 0xFFFF_F000
#: 32-bit paging, 4 MiB page (PDE.PS=1, CR4.PSE=1): bits 31:22 hold address
#: bits 31:22, and bits 20:13 hold address bits 39:32 ("PSE-36", Intel SDM
#: Vol. 3A §4.3, Table 4-4).
PTE32_ADDR_MASK_4M = 0xFFC0_0000
PTE32_PSE36_SHIFT = 13
PTE32_PSE36_MASK = 0xFF << PTE32_PSE36_SHIFT

#: CR3 in PAE paging holds the 32-byte-aligned PDPT address (bits 31:5).
CR3_PAE_ADDR_MASK = 0xFFFF_FFE0

#: Bit 7 is PS in a PD/PDPT entry but PAT in a PT entry, and a large page's
#: PAT is bit 12: :func:`pykvm.x86.paging.decode_entry` knows where an entry
#: sits and decodes it properly; this table is the plain view.
PTE_NAMES: dict[int, str] = {
    PTE_P: "P",
    PTE_RW: "RW",
    PTE_US: "US",
    PTE_PWT: "PWT",
    PTE_PCD: "PCD",
    PTE_A: "A",
    PTE_D: "D",
    PTE_PS: "PS",
    PTE_G: "G",
    PTE_NX: "NX",
}

# ---------------------------------------------------------------------------
# Segment selectors and descriptors -- Intel SDM Vol. 3A §3.4.2 "Segment
# Selectors", §3.4.5 "Segment Descriptors" (Figure 3-8), §3.4.5.1 "Code- and
# Data-Segment Descriptor Types" (Table 3-1), §3.5 "System Descriptor Types"
# (Table 3-2); AMD APM Vol. 2 §4.7 "Legacy Segment Descriptors" and §4.8
# "Long-Mode Segment Descriptors".
# ---------------------------------------------------------------------------
SELECTOR_RPL_MASK = 0x3  # Requested Privilege Level, bits 1:0
SELECTOR_TI = 1 << 2  # Table Indicator: 0 = GDT, 1 = LDT
SELECTOR_INDEX_SHIFT = 3  # descriptor index, bits 15:3

# The 4-bit "type" field of a code or data descriptor (S = 1).
SEG_TYPE_ACCESSED = 1 << 0  # A: set by the CPU when the segment is loaded
SEG_TYPE_WRITABLE = 1 << 1  # data: W, writable
SEG_TYPE_READABLE = 1 << 1  # code: R, readable
SEG_TYPE_EXPAND_DOWN = 1 << 2  # data: E, limit is the lower bound
SEG_TYPE_CONFORMING = 1 << 2  # code: C, runs at the caller's CPL
SEG_TYPE_CODE = 1 << 3  # 1 = code, 0 = data

#: Read/write data, accessed ("0x93" in a descriptor's access byte).
SEG_TYPE_DATA_RW = SEG_TYPE_WRITABLE | SEG_TYPE_ACCESSED  # 0x3
#: Execute/read code, accessed ("0x9b" in a descriptor's access byte).
SEG_TYPE_CODE_RX = SEG_TYPE_CODE | SEG_TYPE_READABLE | SEG_TYPE_ACCESSED  # 0xb

# The type field of a system descriptor (S = 0), Intel SDM Table 3-2.  In
# IA-32e mode the 16-bit kinds are invalid and types 2, 9, 11, 12, 14, 15
# name the 64-bit (16-byte) LDT, TSS and gate descriptors.
SYS_TYPE_TSS16_AVAILABLE = 0x1
SYS_TYPE_LDT = 0x2
SYS_TYPE_TSS16_BUSY = 0x3
SYS_TYPE_CALL_GATE16 = 0x4
SYS_TYPE_TASK_GATE = 0x5
SYS_TYPE_INTERRUPT_GATE16 = 0x6
SYS_TYPE_TRAP_GATE16 = 0x7
SYS_TYPE_TSS_AVAILABLE = 0x9  # 32-bit TSS, or 64-bit TSS in IA-32e mode
SYS_TYPE_TSS_BUSY = 0xB  # 32-bit TSS, or 64-bit TSS in IA-32e mode
SYS_TYPE_CALL_GATE = 0xC
SYS_TYPE_INTERRUPT_GATE = 0xE
SYS_TYPE_TRAP_GATE = 0xF

# Bit positions in an 8-byte descriptor, as one little-endian 64-bit value.
DESC_LIMIT_LOW_MASK = 0xFFFF  # limit 15:0 in bits 15:0
DESC_BASE_LOW_SHIFT = 16  # base 23:0 in bits 39:16
DESC_TYPE_SHIFT = 40  # type in bits 43:40
DESC_S = 1 << 44  # S: 1 = code/data, 0 = system
DESC_DPL_SHIFT = 45  # DPL in bits 46:45
DESC_P = 1 << 47  # Present
DESC_LIMIT_HIGH_SHIFT = 48  # limit 19:16 in bits 51:48
DESC_AVL = 1 << 52  # available to software
DESC_L = 1 << 53  # 64-bit code segment (IA-32e mode)
DESC_DB = 1 << 54  # D/B: default operand size 32-bit / big stack
DESC_G = 1 << 55  # Granularity: limit counts 4 KiB units
DESC_BASE_HIGH_SHIFT = 56  # base 31:24 in bits 63:56

# ---------------------------------------------------------------------------
# Task-state segment sizes -- Intel SDM Vol. 3A chapter "Task Management":
# "32-Bit Task-State Segment (TSS)" (Figure "32-Bit Task-State Segment") and
# "Task Management in 64-bit Mode" (Figure "64-Bit TSS Format");
# AMD APM Vol. 2 chapter 12 "Task Management", "64-Bit Task State Segment".
# ---------------------------------------------------------------------------
TSS32_SIZE = 104  # bytes; a TSS descriptor's limit is then 103 (0x67)
TSS64_SIZE = 104
