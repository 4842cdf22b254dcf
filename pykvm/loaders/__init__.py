"""Guest image loaders: flat binaries, ELF, Multiboot v1, Linux bzImage, PVH.

A loader reads an ``ImageSource`` (a file read lazily, or bytes) and returns
a ``LoadPlan``: which guest-physical ranges to fill with which file ranges
or generated boot data, the CPU state the protocol starts in, the entry
point and the registers it defines.  Plans are pure values (no VM), built
against the ``MemoryMap`` the platform describes, so a malformed image, or
one that does not fit, is refused with a one-line ``LoaderError`` before
guest memory is touched, and loaders are tested with hostile input and no
KVM.

========  ===============================================  ======================
module    what                                             spec
========  ===============================================  ======================
source    ImageSource: lazy, bounded reads                 -
plan      Segment, MemoryMap, LoadPlan, check_fits         -
space     free guest RAM; lowest/highest placement         -
bootdata  C strings, modules, one block of boot data       -
flat      flat binaries                                    -
elf       ELF headers, PT_LOAD, PT_NOTE                    System V gABI
multiboot Multiboot v1 kernels and boot information        Multiboot 0.6.96 s. 3
linux     bzImage, boot_params, the 32/64-bit entries      Linux boot.rst
pvh       PVH ELF note, hvm_start_info v1                  Xen pvh.pandoc
detect    plan_image, format detection in QEMU's order     hw/i386/x86.c
========  ===============================================  ======================
"""

from __future__ import annotations

from pykvm._lazy import lazy_exports

# Imported on first use: a flat guest's run never reads the ELF, Multiboot or Linux loaders.
_EXPORTS = {
    "Module": "pykvm.loaders.bootdata", "split_initrd": "pykvm.loaders.bootdata",
    "FORMATS": "pykvm.loaders.detect", "detect_format": "pykvm.loaders.detect", "plan_image": "pykvm.loaders.detect",
    "CPU_STATES": "pykvm.loaders.plan", "LoadPlan": "pykvm.loaders.plan", "MemoryMap": "pykvm.loaders.plan",
    "Segment": "pykvm.loaders.plan",
    "ImageSource": "pykvm.loaders.source",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

__all__ = sorted(_EXPORTS)
