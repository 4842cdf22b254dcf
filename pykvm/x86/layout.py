"""The guest-physical layout and port numbers shared by every part of pykvm.

These are the numbers of the project's contract (guests, loaders, tests and
labs all rely on them), kept in one place::

    0x00001000  GDT, built by the host
    0x00002000  TSS (64-bit TSS in the long modes, 32-bit TSS otherwise;
                in long_user followed by an I/O bitmap, up to 0x2868)
    0x00003000  IDT (left empty, limit 0, unless a test installs one)
    0x00006000  Multiboot information structure (Multiboot kernels only)
    0x00008000  real-mode guests are loaded here (CS=0, IP=0x8000, SP=0x7c00)
    0x00010000  page tables built by the host, up to 0x1ffff
    0x0006f000  top of the ring-0 stack used by CPL-3 guests (TSS.RSP0)
    0x00070000  stack, growing down from 0x80000
    0x00100000  all other guests are loaded here (1 MiB); entry = load address
    0xd0000000  virtio-mmio devices
    0xe0000000  MMIO exit-benchmark address (never backed by RAM)
"""

from __future__ import annotations

KiB = 1 << 10
MiB = 1 << 20
GiB = 1 << 30

#: The five CPU modes a guest can be started in (canonical names).
#:
#: * ``real``: 16-bit real mode.
#: * ``protected``: 32-bit flat protected mode, paging off.
#: * ``paged32``: 32-bit, non-PAE paging, 4 MiB pages identity-mapping 4 GiB.
#: * ``long``: 64-bit at CPL 0, identity map of the first 4 GiB (2 MiB pages).
#: * ``long_user``: 64-bit at CPL 3 with RFLAGS.IOPL=3, same identity map with
#:   U/S=1 at every level.
MODES: tuple[str, ...] = ("real", "protected", "paged32", "long", "long_user")

# --- system tables -----------------------------------------------------------
GDT_ADDR = 0x1000
TSS_ADDR = 0x2000
IDT_ADDR = 0x3000

# --- page tables built by the host: [PAGE_TABLES_START, PAGE_TABLES_END) -----
PAGE_TABLES_START = 0x10000
PAGE_TABLES_END = 0x20000

# --- stacks ------------------------------------------------------------------
STACK_TOP = 0x80000  # initial RSP/ESP; the stack grows down
STACK_BOTTOM = 0x70000
KERNEL_STACK_TOP = 0x6F000  # RSP0 in the TSS: where CPL 3 -> 0 switches to

# --- where guests are loaded -------------------------------------------------
REAL_MODE_LOAD_ADDR = 0x8000  # CS=0, IP=0x8000
REAL_MODE_STACK = 0x7C00  # SS=0, SP=0x7c00
LOAD_ADDR = 0x100000  # every other mode; the entry point is the load address

# --- boot-protocol data --------------------------------------------------------
MULTIBOOT_INFO_ADDR = 0x6000  # multiboot_info, command line and memory map (< 0x7000)
MULTIBOOT_INFO_MAX = 0x1000

# --- MMIO --------------------------------------------------------------------
VIRTIO_MMIO_BASE = 0xD0000000
MMIO_BENCH_ADDR = 0xE0000000

# --- I/O ports ---------------------------------------------------------------
BENCH_PORT = 0x700  # exit benchmark
COM1_PORT = 0x3F8  # 16550 UART, ports 0x3f8-0x3ff
COM1_IRQ = 4
DEBUG_EXIT_PORT = 0xF4  # isa-debug-exit
POST_PORT = 0x80
I8042_COMMAND_PORT = 0x64
I8042_RESET = 0xFE  # written to port 0x64: reset, a clean stop for CPL-3 guests


def load_address(mode: str) -> int:
    """Return where a guest for *mode* is loaded (and entered)."""
    check_mode(mode)
    return REAL_MODE_LOAD_ADDR if mode == "real" else LOAD_ADDR


def initial_stack(mode: str) -> int:
    """Return the initial stack pointer (linear address) for *mode*."""
    check_mode(mode)
    return REAL_MODE_STACK if mode == "real" else STACK_TOP


def check_mode(mode: str) -> str:
    """Return *mode* if it is one of :data:`MODES`, else raise ``ValueError``."""
    if mode not in MODES:
        raise ValueError(f"unknown CPU mode {mode!r}; expected one of {', '.join(MODES)}")
    return mode
