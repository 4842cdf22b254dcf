"""ELF executables (System V ABI; ELF-64 Object File Format 1.5): headers, PT_LOAD, PT_NOTE.

Only the ELF header, the program header table and note segments are read
(small reads); each PT_LOAD becomes a segment that refers to its file range,
loaded at its *physical* address (p_paddr) and zero-filled to p_memsz, as
QEMU's ``load_elf`` and GRUB do for kernels.  The entry e_entry is a virtual
address, translated through the PT_LOAD that holds it.

Plain ELF images (``format="elf"``) start in pykvm's ``long`` mode (ELF64) or
``protected`` mode (ELF32).  The Multiboot and PVH loaders use this parser
for their ELF kernels.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from pykvm.errors import LoaderError
from pykvm.loaders.plan import LoadPlan, Segment, span
from pykvm.loaders.source import ImageSource
from pykvm.values import Value

ELF_MAGIC = b"\x7fELF"
ELFCLASS32, ELFCLASS64 = 1, 2
ELFDATA2LSB = 1
EV_CURRENT = 1
ET_EXEC = 2
EM_386, EM_X86_64 = 3, 62
PT_LOAD, PT_NOTE = 1, 4
MAX_PROGRAM_HEADERS = 64
MAX_NOTE_BYTES = 64 << 10   # notes are read from the first 64 KiB of PT_NOTE segments, in all
MAX_PHYSICAL = {ELFCLASS32: 1 << 32, ELFCLASS64: 1 << 52}   # 52: the architectural MAXPHYADDR limit

_EHDR = {ELFCLASS32: ("<HHIIIIIHHHHHH", 52, 32, EM_386), ELFCLASS64: ("<HHIQQQIHHHHHH", 64, 56, EM_X86_64)}


class ProgramHeader(Value):
    __slots__ = ("index", "type", "offset", "vaddr", "paddr", "filesz", "memsz", "align")

    def __init__(self, index: int, type: int, offset: int, vaddr: int, paddr: int, filesz: int, memsz: int,
                 align: int) -> None:
        self.index = index
        self.type = type
        self.offset = offset
        self.vaddr = vaddr
        self.paddr = paddr
        self.filesz = filesz
        self.memsz = memsz
        self.align = align


class ElfImage(Value):
    """The parts of an ELF executable a loader needs."""

    __slots__ = ("source", "bits", "entry", "loads", "note_headers")

    def __init__(self, source: ImageSource, bits: int, entry: int, loads: tuple[ProgramHeader, ...],
                 note_headers: tuple[ProgramHeader, ...]) -> None:
        self.source = source
        self.bits = bits  # 32 or 64
        self.entry = entry  # e_entry, a virtual address
        self.loads = loads  # non-empty PT_LOADs, by physical address
        self.note_headers = note_headers

    def entry_physical(self) -> int:
        """e_entry translated to the physical address of the PT_LOAD that holds it."""
        for ph in self.loads:
            if ph.vaddr <= self.entry < ph.vaddr + ph.memsz:
                return self.entry - ph.vaddr + ph.paddr
        raise LoaderError(f"{self.source.name}: ELF entry point {self.entry:#x} is in no loadable segment")

    def segments(self, what: str = "kernel") -> tuple[Segment, ...]:
        single = len(self.loads) == 1
        return tuple(
            Segment(ph.paddr, ph.memsz, self.source if ph.filesz else None, ph.offset if ph.filesz else 0,
                    ph.filesz, what=what if single else f"{what} segment {ph.index}")
            for ph in self.loads
        )

    def end(self) -> int:
        """The end of the highest PT_LOAD (with its .bss)."""
        return max(ph.paddr + ph.memsz for ph in self.loads)

    def notes(self) -> Iterator[tuple[bytes, int, bytes]]:
        """``(name, type, desc)`` of every note in the PT_NOTE segments (name without its NUL)."""
        budget = MAX_NOTE_BYTES
        for ph in self.note_headers:
            data = self.source.read(ph.offset, min(ph.filesz, budget))
            budget -= len(data)
            align = 8 if ph.align == 8 else 4
            pos = 0
            while pos + 12 <= len(data):
                namesz, descsz, kind = struct.unpack_from("<III", data, pos)
                name_at = pos + 12
                desc_at = name_at + _round(namesz, align)
                next_at = desc_at + _round(descsz, align)
                if desc_at + descsz > len(data):
                    raise LoaderError(f"{self.source.name}: a note in PT_NOTE {ph.index} runs past its segment")
                yield data[name_at:name_at + namesz].rstrip(b"\0"), kind, data[desc_at:desc_at + descsz]
                pos = next_at


def _round(n: int, align: int) -> int:
    return (n + align - 1) // align * align


def is_elf(head: bytes) -> bool:
    return head[:4] == ELF_MAGIC


def read_elf(source: ImageSource) -> ElfImage:
    """Parse and check an x86 ELF executable's headers; LoaderError for anything malformed."""
    name = source.name
    ident = source.read(0, min(source.size, 16))
    if not is_elf(ident):
        raise LoaderError(f"{name} is not an ELF image (no \\x7fELF magic)")
    if len(ident) < 16:
        raise LoaderError(f"{name}: too short for an ELF header ({source.size} bytes)")
    elf_class, data, version = ident[4], ident[5], ident[6]
    if elf_class not in _EHDR:
        raise LoaderError(f"{name}: unknown ELF class {elf_class}")
    if data != ELFDATA2LSB:
        raise LoaderError(f"{name}: the ELF image is not little-endian")
    if version != EV_CURRENT:
        raise LoaderError(f"{name}: ELF version {version} is not 1")
    fmt, ehsize, phsize, machine_wanted = _EHDR[elf_class]
    bits = 32 if elf_class == ELFCLASS32 else 64
    if source.size < ehsize:
        raise LoaderError(f"{name}: the ELF{bits} header is truncated ({source.size} of {ehsize} bytes)")
    (e_type, e_machine, _, e_entry, e_phoff, _, _, _, e_phentsize, e_phnum, _, _, _) = struct.unpack(
        fmt, source.read(16, ehsize - 16))
    if e_type != ET_EXEC:
        raise LoaderError(f"{name}: ELF type {e_type} is not an executable (ET_EXEC)")
    if e_machine != machine_wanted:
        raise LoaderError(f"{name}: ELF{bits} machine {e_machine} is not x86 ({machine_wanted})")
    if e_phentsize != phsize or not 0 < e_phnum <= MAX_PROGRAM_HEADERS:
        raise LoaderError(f"{name}: bad program header table ({e_phnum} entries of {e_phentsize} bytes)")
    if e_phoff + e_phnum * phsize > source.size:
        raise LoaderError(f"{name}: the program header table runs past the end of the file")
    table = source.read(e_phoff, e_phnum * phsize)

    loads, notes = [], []
    for i in range(e_phnum):
        ph = _program_header(i, elf_class, table, i * phsize)
        if ph.type not in (PT_LOAD, PT_NOTE):
            continue
        if ph.offset + ph.filesz > source.size:
            raise LoaderError(f"{name}: segment {i}: bytes {ph.offset:#x}+{ph.filesz:#x} run past the end "
                              f"of the file ({source.size:#x} bytes)")
        if ph.type == PT_NOTE:
            notes.append(ph)
            continue
        if ph.memsz == 0:
            continue
        if ph.filesz > ph.memsz:
            raise LoaderError(f"{name}: segment {i}: file size {ph.filesz:#x} exceeds memory size {ph.memsz:#x}")
        if ph.paddr + ph.memsz > MAX_PHYSICAL[elf_class]:
            raise LoaderError(f"{name}: segment {i}: physical range {span(ph.paddr, ph.paddr + ph.memsz)} "
                              "is out of range")
        loads.append(ph)
    if not loads:
        raise LoaderError(f"{name}: the ELF image has no loadable segment")
    loads.sort(key=lambda ph: ph.paddr)
    for a, b in zip(loads, loads[1:]):
        if b.paddr < a.paddr + a.memsz:
            raise LoaderError(f"{name}: segments {a.index} and {b.index} overlap at {b.paddr:#x}")
    return ElfImage(source, bits, e_entry, tuple(loads), tuple(notes))


def _program_header(index: int, elf_class: int, table: bytes, at: int) -> ProgramHeader:
    if elf_class == ELFCLASS64:
        p_type, _, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align = struct.unpack_from(
            "<IIQQQQQQ", table, at)
    else:
        p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _, p_align = struct.unpack_from(
            "<IIIIIIII", table, at)
    return ProgramHeader(index, p_type, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, p_align)


def plan_elf(source: ImageSource, *, mode: str | None = None) -> LoadPlan:
    """Load the PT_LOAD segments; start at the physical entry in ``mode`` (default: long / protected)."""
    elf = read_elf(source)
    return LoadPlan(
        format=f"elf{elf.bits}", cpu=mode or ("long" if elf.bits == 64 else "protected"),
        entry=elf.entry_physical(), regs={}, segments=elf.segments(),
        notes=f"{len(elf.loads)} PT_LOAD segment(s), {span(elf.loads[0].paddr, elf.end())}",
    )
