"""Choosing a loader for an image, and the one entry point: ``plan_image``.

``format="auto"`` follows QEMU's ``x86_load_linux`` (hw/i386/x86.c), which
tries, in order: a Linux setup header ("HdrS" at 0x202; pykvm also wants
the boot flag 0xAA55 at 0x1FE), then a Multiboot header in the first 8 KiB
(so an ELF kernel that is also Multiboot boots as Multiboot: QEMU tries
Multiboot before PVH because both can be ELF), then an ELF with a PVH
note; pykvm adds plain ELF, and a flat binary when nothing else matches.
An explicit ``load_addr`` or ``mode`` means a flat image, whatever the
bytes look like (``format="elf"`` with ``mode`` starts an ELF in that mode).

Only the first 8 KiB of the image are read to decide (ELF images: their
program headers and notes too).
"""

from __future__ import annotations

from collections.abc import Sequence

from pykvm.errors import LoaderError
from pykvm.loaders.bootdata import Module, module_pairs
from pykvm.loaders.flat import check_mode, plan_flat
from pykvm.loaders.plan import LoadPlan, MemoryMap
from pykvm.loaders.source import ImageSource

# The protocol loaders are imported when an image needs them (a flat guest's run never does).
#: ``linux``: a bzImage, its payload unpacked by pykvm where it can (pykvm.loaders.linux_payload);
#: ``linux-decompressor``: a bzImage entered at its own decompressor, as boot.rst describes.
FORMATS = ("auto", "flat", "elf", "multiboot", "linux", "linux-decompressor", "pvh")
HEAD_SIZE = 8192  # multiboot.SEARCH_LIMIT: enough for the Multiboot search and the Linux setup header
BOOT_PROTOCOLS = "a Multiboot, Linux or PVH kernel"


def read_head(source: ImageSource) -> bytes:
    if source.size == 0:
        raise LoaderError(f"{source.name} is empty")
    return source.read(0, min(source.size, HEAD_SIZE))


def detect_format(source: ImageSource, head: bytes | None = None) -> str:
    """"linux", "multiboot", "pvh", "elf" or "flat", in QEMU's order (see the module docstring)."""
    from pykvm.loaders.elf import is_elf, read_elf
    from pykvm.loaders.linux import is_bzimage
    from pykvm.loaders.multiboot import find_header
    from pykvm.loaders.pvh import pvh_entry

    head = read_head(source) if head is None else head
    if is_bzimage(head):
        return "linux"
    if find_header(head) is not None:
        return "multiboot"
    if is_elf(head):
        return "pvh" if pvh_entry(read_elf(source)) is not None else "elf"
    return "flat"


def plan_image(
    source: ImageSource, *, memory_map: MemoryMap, format: str = "auto", mode: str | None = None,
    load_addr: int | None = None, entry: int | None = None, cmdline: str = "",
    modules: Sequence[Module] = (), kernel_name: str | None = None, rsdp: int | None = None,
) -> LoadPlan:
    """Plan booting ``source``; the plan fits ``memory_map`` or a one-line LoaderError says why not.

    ``mode``/``load_addr``/``entry``: flat images (``mode`` also ELF).
    ``cmdline`` (``-append``) and ``modules`` (``-initrd``: each an
    ImageSource, or ``(ImageSource, string)`` for a Multiboot module's
    string) need a boot protocol.  ``kernel_name`` is the first word of a
    Multiboot command line (default ``source.name``).  ``rsdp``: the ACPI
    RSDP's address, for PVH's rsdp_paddr and Linux's acpi_rsdp_addr.
    """
    if not isinstance(source, ImageSource):
        raise TypeError(f"plan_image needs an ImageSource, not {type(source).__name__}")
    if format not in FORMATS:
        raise LoaderError(f"unknown image format {format!r}; choose one of {', '.join(FORMATS)}")
    module_pairs(modules)  # type check, before anything is read
    head = read_head(source)
    if format == "auto":
        format = "flat" if load_addr is not None or mode is not None else detect_format(source, head)
    if format in ("flat", "elf"):
        if modules:
            raise LoaderError(f"-initrd needs {BOOT_PROTOCOLS}; {source.name} is loaded as a {format} image")
        if cmdline:
            raise LoaderError(f"-append needs {BOOT_PROTOCOLS}; {source.name} is loaded as a {format} image")
    if format != "flat" and (load_addr is not None or entry is not None):
        raise LoaderError(f"a load address or entry point applies to flat images; {source.name} is {format}")
    if mode is not None:
        check_mode(mode)
        if format not in ("flat", "elf"):
            raise LoaderError(f"a CPU mode applies to flat and ELF images; a {format} kernel starts in "
                              "the state its boot protocol defines")

    if format in ("linux", "linux-decompressor"):
        from pykvm.loaders.linux import plan_linux

        return plan_linux(source, head, memory_map=memory_map, cmdline=cmdline, modules=modules, rsdp=rsdp,
                          unpack=format == "linux")
    if format == "multiboot":
        from pykvm.loaders.multiboot import plan_multiboot

        return plan_multiboot(source, head, memory_map=memory_map, cmdline=cmdline, modules=modules,
                              kernel_name=kernel_name)
    if format == "pvh":
        from pykvm.loaders.pvh import plan_pvh

        return plan_pvh(source, memory_map=memory_map, cmdline=cmdline, modules=modules, rsdp=rsdp)
    if format == "elf":
        from pykvm.loaders.elf import plan_elf

        plan = plan_elf(source, mode=mode)
    else:
        plan = plan_flat(source, mode=mode or "long", load_addr=load_addr, entry=entry)
    plan.check_fits(memory_map)
    return plan
