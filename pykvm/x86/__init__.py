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

The names below are imported from their module on first use
(``pykvm._lazy``): a run that sets up real mode never builds page tables.
"""

from __future__ import annotations

from pykvm._lazy import lazy_exports

from . import bits  # constants only: cheap, and used everywhere

_MODULES = {
    "modes": ("ModeSetup", "TablePlacement", "mode_registers", "setup_mode"),
    "paging": ("Level", "PageTableBuilder", "PageTableError", "PageTables4Level", "PageTables32", "PageTablesPae",
               "Translation", "build_identity_4level", "build_identity_32bit", "build_identity_pae", "is_canonical",
               "page_table_builder", "paging_mode_of", "translate", "walk"),
    "segments": ("FlatGdt", "Gdt", "Segment", "flat_gdt", "real_mode_segment", "tss32", "tss64"),
    "state": ("MODES", "check_mode", "cpl", "cpu_mode_name", "decode_cr0", "decode_cr4", "decode_efer",
              "decode_rflags", "format_regs", "format_sregs"),
}
_EXPORTS = {name: f"pykvm.x86.{module}" for module, names in _MODULES.items() for name in names}

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


__all__ = ["bits", *_EXPORTS]
