"""Flat binaries: the file's bytes at one address, entered at that address."""

from __future__ import annotations

from pykvm.errors import LoaderError
from pykvm.loaders.plan import LoadPlan, Segment
from pykvm.x86 import layout


def plan_flat(image: bytes, *, mode: str = "long", load_addr: int | None = None,
              entry: int | None = None) -> LoadPlan:
    """Load ``image`` at ``load_addr`` (0x8000 in real mode, else 0x100000) and enter there."""
    if mode not in layout.MODES:
        raise LoaderError(f"unknown CPU mode {mode!r}; choose one of {', '.join(layout.MODES)}")
    if not image:
        raise LoaderError("the image is empty")
    if load_addr is None:
        load_addr = layout.load_address(mode)
    if load_addr < 0:
        raise LoaderError(f"negative load address {load_addr:#x}")
    return LoadPlan(
        format="flat", mode=mode, entry=load_addr if entry is None else entry,
        segments=(Segment(load_addr, bytes(image), len(image)),),
    )
