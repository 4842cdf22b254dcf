"""Flat binaries: the file's bytes at one address, entered there in one of pykvm's CPU modes."""

from __future__ import annotations

from pykvm.errors import LoaderError
from pykvm.loaders.plan import LoadPlan, Segment
from pykvm.loaders.source import ImageSource
from pykvm.platform import layout
from pykvm.x86 import MODES


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise LoaderError(f"unknown CPU mode {mode!r}; choose one of {', '.join(MODES)}")


def plan_flat(source: ImageSource, *, mode: str = "long", load_addr: int | None = None,
              entry: int | None = None) -> LoadPlan:
    """Load the whole file at ``load_addr`` (0x8000 in real mode, else 0x100000) and enter at ``entry``."""
    check_mode(mode)
    if load_addr is None:
        load_addr = layout.load_address(mode)
    if load_addr < 0:
        raise LoaderError(f"negative load address {load_addr:#x}")
    if entry is not None and entry < 0:
        raise LoaderError(f"negative entry point {entry:#x}")
    return LoadPlan(
        format="flat", cpu=mode, entry=load_addr if entry is None else entry, regs={},
        segments=(Segment(load_addr, source.size, source, 0, source.size, what="kernel"),),
    )
