"""ELF executables (System V ABI, ELF-64 Object File Format 1.5).

Each PT_LOAD program header is copied to its *physical* address (p_paddr),
zero-filled up to p_memsz.  ELF64 images start in 64-bit long mode, ELF32
in flat 32-bit protected mode; the entry is e_entry translated from the
virtual to the physical address of the segment that holds it.
"""

from __future__ import annotations

import struct

from pykvm.errors import LoaderError
from pykvm.loaders.plan import LoadPlan, Segment

ELF_MAGIC = b"\x7fELF"
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB = 1
ET_EXEC = 2
EM_386, EM_X86_64 = 3, 62
PT_LOAD = 1
MAX_SEGMENTS = 64


def is_elf(image: bytes) -> bool:
    return image[:4] == ELF_MAGIC


def plan_elf(image: bytes, *, mode: str | None = None) -> LoadPlan:
    """Plan the PT_LOAD segments of an ELF32/ELF64 little-endian x86 executable."""
    if len(image) < 52 or not is_elf(image):
        raise LoaderError("not an ELF image (too short or bad magic)")
    elf_class, data = image[4], image[5]
    if data != ELFDATA2LSB:
        raise LoaderError("ELF image is not little-endian")
    if elf_class == ELFCLASS64:
        if len(image) < 64:
            raise LoaderError("ELF64 header truncated")
        (e_type, e_machine, _, e_entry, e_phoff, _, _, _, e_phentsize, e_phnum) = struct.unpack_from(
            "<HHIQQQIHHH", image, 16)
        ph_format, ph_size, expected_machine, default_mode = "<IIQQQQQQ", 56, EM_X86_64, "long"
    elif elf_class == ELFCLASS32:
        (e_type, e_machine, _, e_entry, e_phoff, _, _, _, e_phentsize, e_phnum) = struct.unpack_from(
            "<HHIIIIIHHH", image, 16)
        ph_format, ph_size, expected_machine, default_mode = "<IIIIIIII", 32, EM_386, "protected"
    else:
        raise LoaderError(f"unknown ELF class {elf_class}")
    if e_type != ET_EXEC:
        raise LoaderError(f"ELF type {e_type} is not an executable (ET_EXEC)")
    if e_machine != expected_machine:
        raise LoaderError(f"ELF machine {e_machine} is not x86 ({expected_machine})")
    if e_phentsize != ph_size or not 0 < e_phnum <= MAX_SEGMENTS:
        raise LoaderError(f"bad program header table ({e_phnum} entries of {e_phentsize} bytes)")
    if e_phoff + e_phnum * ph_size > len(image):
        raise LoaderError("program header table runs past the end of the file")

    segments, entry_pa = [], None
    for i in range(e_phnum):
        fields = struct.unpack_from(ph_format, image, e_phoff + i * ph_size)
        if elf_class == ELFCLASS64:
            p_type, _, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _ = fields
        else:
            p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _, _ = fields
        if p_type != PT_LOAD or p_memsz == 0:
            continue
        if p_filesz > p_memsz:
            raise LoaderError(f"segment {i}: file size {p_filesz:#x} exceeds memory size {p_memsz:#x}")
        if p_offset + p_filesz > len(image):
            raise LoaderError(f"segment {i}: bytes {p_offset:#x}+{p_filesz:#x} run past the end of the file")
        if p_paddr + p_memsz > 1 << 52:
            raise LoaderError(f"segment {i}: physical address {p_paddr:#x} is out of range")
        segments.append(Segment(p_paddr, image[p_offset:p_offset + p_filesz], p_memsz))
        if p_vaddr <= e_entry < p_vaddr + p_memsz:
            entry_pa = e_entry - p_vaddr + p_paddr
    if not segments:
        raise LoaderError("ELF image has no loadable segment")
    if entry_pa is None:
        raise LoaderError(f"entry point {e_entry:#x} is in no loadable segment")
    ordered = sorted(segments, key=lambda s: s.gpa)
    for a, b in zip(ordered, ordered[1:]):
        if b.gpa < a.end:
            raise LoaderError(f"segments at {a.gpa:#x} and {b.gpa:#x} overlap")
    return LoadPlan(
        format=f"elf{32 if elf_class == ELFCLASS32 else 64}", mode=mode or default_mode,
        entry=entry_pa, segments=tuple(segments),
    )
