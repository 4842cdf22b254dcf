"""Choose a loader for an image."""

from __future__ import annotations

from pykvm.errors import LoaderError
from pykvm.loaders.elf import is_elf, plan_elf
from pykvm.loaders.flat import plan_flat
from pykvm.loaders.multiboot import find_header, plan_multiboot
from pykvm.loaders.plan import LoadPlan

FORMATS = ("auto", "flat", "elf", "multiboot")


def detect_format(image: bytes) -> str:
    """'multiboot' if a valid Multiboot header is present, else 'elf' or 'flat'."""
    if find_header(image) is not None:
        return "multiboot"
    if is_elf(image):
        return "elf"
    return "flat"


def plan_image(
    image: bytes, *, format: str = "auto", mode: str | None = None, load_addr: int | None = None,
    entry: int | None = None, memory_size: int = 64 << 20, cmdline: str = "",
) -> LoadPlan:
    """Plan loading ``image``.  ``mode``/``load_addr``/``entry`` apply to flat images."""
    if format not in FORMATS:
        raise LoaderError(f"unknown image format {format!r}; choose one of {', '.join(FORMATS)}")
    if not image:
        raise LoaderError("the image is empty")
    if format == "auto":
        # An explicit load address or mode means the user wants a flat load.
        format = "flat" if load_addr is not None else detect_format(image)
    if format == "multiboot":
        return plan_multiboot(image, memory_size=memory_size, cmdline=cmdline)
    if format == "elf":
        return plan_elf(image, mode=mode)
    return plan_flat(image, mode=mode or "long", load_addr=load_addr, entry=entry)
