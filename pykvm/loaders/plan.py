"""What a loader produces: segments to copy and the CPU state to start in."""

from __future__ import annotations

from dataclasses import dataclass, field

from pykvm.errors import LoaderError


@dataclass(frozen=True)
class Segment:
    """``data`` copied to ``gpa``, followed by zeroes up to ``memsize`` bytes (ELF's .bss)."""

    gpa: int
    data: bytes
    memsize: int

    @property
    def end(self) -> int:
        return self.gpa + self.memsize


@dataclass(frozen=True)
class LoadPlan:
    """How to start an image: segments, CPU mode, entry, extra registers."""

    format: str                        # "flat", "elf32", "elf64", "multiboot"
    mode: str                          # a pykvm.x86.layout.MODES name
    entry: int
    segments: tuple[Segment, ...]
    regs: dict[str, int] = field(default_factory=dict)   # e.g. multiboot's eax/ebx
    extra_writes: tuple[Segment, ...] = ()               # boot-protocol data (multiboot info)
    notes: str = ""

    def check_fits(self, is_mapped, reserved_end: int) -> None:
        """Raise LoaderError unless every segment lies in RAM and above ``reserved_end``.

        ``is_mapped(gpa, size)`` answers for guest RAM; real-mode images may
        use low memory, other modes must stay clear of pykvm's tables.
        """
        for seg in self.segments:
            if seg.memsize <= 0:
                continue
            if self.mode != "real" and seg.gpa < reserved_end:
                raise LoaderError(
                    f"{self.format} segment at {seg.gpa:#x} overlaps pykvm's tables below {reserved_end:#x}"
                )
            if self.mode == "real" and seg.end > 0xA0000:
                raise LoaderError(f"a real-mode image must end below 0xa0000; this one ends at {seg.end:#x}")
            if not is_mapped(seg.gpa, seg.memsize):
                raise LoaderError(
                    f"{self.format} segment {seg.gpa:#x}-{seg.end - 1:#x} ({seg.memsize} bytes) "
                    "does not fit in guest memory"
                )
