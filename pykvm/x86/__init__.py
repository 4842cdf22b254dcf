"""x86 helpers: segments and the GDT, page tables, CPU-mode setup, decoding.

Pure Python, no KVM needed (nothing here imports ``pykvm._native``), so all
of it can be used and tested on any machine.  Mechanism only: *where* the
GDT, TSS and page tables go is the platform's choice
(``pykvm.platform.cpu_tables``), handed to :func:`setup_mode`.

* :mod:`~pykvm.x86.bits`     architectural bit constants (CR0, CR4, EFER,
  RFLAGS, page-table entries, descriptors), with manual references;
* :mod:`~pykvm.x86.segments` :class:`Segment`, descriptors, :class:`Gdt`,
  TSS images, the standard flat GDT of each mode;
* :mod:`~pykvm.x86.paging`   page-table builders and a page walker;
* :mod:`~pykvm.x86.modes`    :func:`setup_mode`: put a vCPU in a CPU mode;
* :mod:`~pykvm.x86.state`    decode registers into names and tables.
"""

from __future__ import annotations

from . import bits
from .modes import ModeSetup, TablePlacement, mode_registers, setup_mode
from .paging import (
    Level,
    PageTableBuilder,
    PageTableError,
    PageTables4Level,
    PageTables32,
    PageTablesPae,
    Translation,
    build_identity_4level,
    build_identity_32bit,
    build_identity_pae,
    is_canonical,
    page_table_builder,
    paging_mode_of,
    translate,
    walk,
)
from .segments import FlatGdt, Gdt, Segment, flat_gdt, real_mode_segment, tss32, tss64
from .state import (
    MODES,
    check_mode,
    cpl,
    cpu_mode_name,
    decode_cr0,
    decode_cr4,
    decode_efer,
    decode_rflags,
    format_regs,
    format_sregs,
)

__all__ = [
    "bits",
    "MODES",
    "check_mode",
    # segments
    "Segment",
    "Gdt",
    "FlatGdt",
    "flat_gdt",
    "real_mode_segment",
    "tss32",
    "tss64",
    # paging
    "PageTableBuilder",
    "PageTables32",
    "PageTablesPae",
    "PageTables4Level",
    "PageTableError",
    "page_table_builder",
    "build_identity_32bit",
    "build_identity_pae",
    "build_identity_4level",
    "Level",
    "Translation",
    "walk",
    "translate",
    "paging_mode_of",
    "is_canonical",
    # modes
    "setup_mode",
    "mode_registers",
    "ModeSetup",
    "TablePlacement",
    # state
    "decode_rflags",
    "decode_cr0",
    "decode_cr4",
    "decode_efer",
    "cpu_mode_name",
    "cpl",
    "format_sregs",
    "format_regs",
]
