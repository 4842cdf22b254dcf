"""Guest image loaders: flat binary, ELF, Multiboot.

A loader reads an image and returns a ``LoadPlan``: which bytes go to which
guest-physical addresses, the CPU mode and entry point, and any register the
boot protocol defines.  Plans are pure values (no VM involved), so a
malformed image is caught with a ``LoaderError`` before guest memory is
touched, and loaders are tested with hostile input and no KVM.

``plan_image`` picks the format: an ELF header, else a Multiboot header in
the first 8 KiB, else a flat binary.
"""

from __future__ import annotations

from pykvm.loaders.plan import LoadPlan, Segment
from pykvm.loaders.detect import detect_format, plan_image

__all__ = ["LoadPlan", "Segment", "detect_format", "plan_image"]
