"""Decode x86 register values for display.

Pure functions: they take integers (or any object with the attributes of
``struct kvm_sregs`` / ``struct kvm_regs``) and return names and text.
Nothing here touches KVM.

>>> decode_cr0(0x80000011)
['PE', 'ET', 'PG']
>>> cpu_mode_name(cr0=0x80000011, cr4=0x20, efer=0x500, cs_l=True, cs_db=False)
'long 64-bit'
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

from . import bits

#: The five CPU modes pykvm can start a vCPU in (canonical names).
#:
#: * ``real``: 16-bit real mode.
#: * ``protected``: 32-bit flat protected mode, paging off.
#: * ``paged32``: 32-bit, non-PAE paging, 4 MiB pages identity-mapping 4 GiB.
#: * ``long``: 64-bit at CPL 0, identity map of the first 4 GiB (2 MiB pages).
#: * ``long_user``: 64-bit at CPL 3 with RFLAGS.IOPL=3, same identity map with
#:   U/S=1 at every level.
MODES: tuple[str, ...] = ("real", "protected", "paged32", "long", "long_user")


def check_mode(mode: str) -> str:
    """Return *mode* if it is one of :data:`MODES`, else raise ``ValueError``."""
    if mode not in MODES:
        raise ValueError(f"unknown CPU mode {mode!r}; expected one of {', '.join(MODES)}")
    return mode

__all__ = [
    "decode_flags",
    "decode_rflags",
    "decode_cr0",
    "decode_cr4",
    "decode_efer",
    "cpu_mode_name",
    "cpl",
    "describe_segment_type",
    "format_table",
    "format_sregs",
    "format_regs",
]


def decode_flags(value: int, names: Mapping[int, str]) -> list[str]:
    """Return the names of the bits of *value* that are set, lowest bit first.

    Set bits that have no name are listed as ``bit<N>`` so nothing is hidden.
    """
    known = 0
    result: list[str] = []
    for bit, name in sorted(names.items()):
        known |= bit
        if value & bit:
            result.append(name)
    unknown = value & ~known
    n = 0
    while unknown:
        if unknown & 1:
            result.append(f"bit{n}")
        unknown >>= 1
        n += 1
    return result


def decode_rflags(value: int) -> list[str]:
    """Names of the set RFLAGS bits, with ``IOPL=n`` when IOPL is not 0.

    The always-one reserved bit 1 is not listed.

    >>> decode_rflags(0x3202)
    ['IF', 'IOPL=3']
    """
    low_mask = (1 << bits.RFLAGS_IOPL_SHIFT) - 1  # bits 11:0
    below_iopl = value & low_mask & ~bits.RFLAGS_FIXED
    above_iopl = value & ~(bits.RFLAGS_IOPL_MASK | low_mask)  # bits 14 and up
    iopl = (value & bits.RFLAGS_IOPL_MASK) >> bits.RFLAGS_IOPL_SHIFT
    names = decode_flags(below_iopl, bits.RFLAGS_NAMES)
    if iopl:
        names.append(f"IOPL={iopl}")
    return names + decode_flags(above_iopl, bits.RFLAGS_NAMES)


def decode_cr0(value: int) -> list[str]:
    """Names of the set CR0 bits (``PE``, ``PG``, ...)."""
    return decode_flags(value, bits.CR0_NAMES)


def decode_cr4(value: int) -> list[str]:
    """Names of the set CR4 bits (``PSE``, ``PAE``, ...)."""
    return decode_flags(value, bits.CR4_NAMES)


def decode_efer(value: int) -> list[str]:
    """Names of the set IA32_EFER bits (``LME``, ``LMA``, ``NXE``, ...)."""
    return decode_flags(value, bits.EFER_NAMES)


def cpu_mode_name(
    cr0: int, cr4: int, efer: int, cs_l: bool, cs_db: bool, rflags: int = 0
) -> str:
    """Name the mode the CPU executes in.

    One of ``"real"``, ``"virtual-8086"`` (only if *rflags* has VM set),
    ``"protected 16-bit"``, ``"protected 32-bit"`` (paging off),
    ``"paged 32-bit"`` (32-bit paging), ``"PAE 32-bit"``, ``"long 64-bit"``
    (IA-32e mode with CS.L=1) and ``"compatibility"`` (IA-32e mode, CS.L=0).
    Intel SDM Vol. 3A §2.2 "Modes of Operation".
    """
    if not cr0 & bits.CR0_PE:
        return "real"
    if efer & bits.EFER_LMA and cr0 & bits.CR0_PG:
        return "long 64-bit" if cs_l else "compatibility"
    if rflags & bits.RFLAGS_VM:
        return "virtual-8086"
    if cr0 & bits.CR0_PG:
        return "PAE 32-bit" if cr4 & bits.CR4_PAE else "paged 32-bit"
    return "protected 32-bit" if cs_db else "protected 16-bit"


def cpl(cs_selector: int, ss_dpl: int | None = None) -> int:
    """The current privilege level.

    Architecturally the CPL is the RPL of CS (Intel SDM Vol. 3A §5.5
    "Privilege Levels"), and the DPL of SS always equals it; KVM itself reads
    the CPL from SS.DPL.  Pass *ss_dpl* to use that; otherwise the CS
    selector's low two bits are used.  (In real mode the CPL is 0 whatever
    the selectors hold.)
    """
    if ss_dpl is not None:
        return ss_dpl & 3
    return cs_selector & bits.SELECTOR_RPL_MASK


_SYSTEM_TYPES_LEGACY = {
    bits.SYS_TYPE_TSS16_AVAILABLE: "TSS 16-bit available",
    bits.SYS_TYPE_LDT: "LDT",
    bits.SYS_TYPE_TSS16_BUSY: "TSS 16-bit busy",
    bits.SYS_TYPE_CALL_GATE16: "call gate 16-bit",
    bits.SYS_TYPE_TASK_GATE: "task gate",
    bits.SYS_TYPE_INTERRUPT_GATE16: "interrupt gate 16-bit",
    bits.SYS_TYPE_TRAP_GATE16: "trap gate 16-bit",
    bits.SYS_TYPE_TSS_AVAILABLE: "TSS 32-bit available",
    bits.SYS_TYPE_TSS_BUSY: "TSS 32-bit busy",
    bits.SYS_TYPE_CALL_GATE: "call gate 32-bit",
    bits.SYS_TYPE_INTERRUPT_GATE: "interrupt gate 32-bit",
    bits.SYS_TYPE_TRAP_GATE: "trap gate 32-bit",
}

_SYSTEM_TYPES_LONG = {
    bits.SYS_TYPE_LDT: "LDT",
    bits.SYS_TYPE_TSS_AVAILABLE: "TSS 64-bit available",
    bits.SYS_TYPE_TSS_BUSY: "TSS 64-bit busy",
    bits.SYS_TYPE_CALL_GATE: "call gate 64-bit",
    bits.SYS_TYPE_INTERRUPT_GATE: "interrupt gate 64-bit",
    bits.SYS_TYPE_TRAP_GATE: "trap gate 64-bit",
}


def describe_segment_type(
    type: int, s: bool, dpl: int, l: bool, db: bool, long_mode: bool = False  # noqa: E741 (KVM's name)
) -> str:
    """Describe a segment's type in words, e.g. ``"code 64-bit DPL3 RX"``.

    Code and data (S=1): kind, operand size (``64-bit`` if L, else ``32-bit``
    or ``16-bit`` from D/B), DPL, and access: ``R``/``W``/``X``, plus
    ``conforming`` or ``expand-down``.  System segments (S=0) are named from
    Intel SDM Table 3-2; *long_mode* selects the IA-32e meaning of the types
    (a type-9 TSS is then a 64-bit TSS).  The accessed bit is not part of
    the text.
    """
    if s:
        if type & bits.SEG_TYPE_CODE:
            size = "64-bit" if l else ("32-bit" if db else "16-bit")
            access = "RX" if type & bits.SEG_TYPE_READABLE else "X"
            extra = " conforming" if type & bits.SEG_TYPE_CONFORMING else ""
            return f"code {size} DPL{dpl} {access}{extra}"
        size = "32-bit" if db else "16-bit"
        access = "RW" if type & bits.SEG_TYPE_WRITABLE else "R"
        extra = " expand-down" if type & bits.SEG_TYPE_EXPAND_DOWN else ""
        return f"data {size} DPL{dpl} {access}{extra}"
    table = _SYSTEM_TYPES_LONG if long_mode else _SYSTEM_TYPES_LEGACY
    name = table.get(type, f"reserved system type {type:#x}")
    return f"{name} DPL{dpl}"


def format_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """Lay out *rows* under *headers* in aligned, left-justified columns.

    Cells are converted with ``str()``; trailing spaces are stripped.

    >>> print(format_table(["a", "bb"], [[1, "x"], [22, "yy"]]))
    a   bb
    1   x
    22  yy
    """
    text_rows = [[str(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for row in text_rows:
        for i, cell in enumerate(row):
            if i < len(widths):
                widths[i] = max(widths[i], len(cell))
            else:
                widths.append(len(cell))
    lines = []
    for row in [list(headers), *text_rows]:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)


_SEGMENT_NAMES = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


def _segment_flags(seg: object) -> str:
    flags = []
    for name, label in (("present", "P"), ("s", "S"), ("db", "DB"), ("l", "L"), ("g", "G"), ("avl", "AVL")):
        if getattr(seg, name):
            flags.append(label)
    if seg.s and seg.type & bits.SEG_TYPE_ACCESSED:
        flags.append("A")
    return " ".join(flags)


def format_sregs(sregs: object) -> str:
    """Render a ``struct kvm_sregs``-like object as a readable table.

    Shows the CPU mode, CPL, each control register with its decoded flags,
    the GDT/IDT registers and one line per segment register.
    """
    cs = sregs.cs
    long_mode = bool(sregs.efer & bits.EFER_LMA)
    mode = cpu_mode_name(sregs.cr0, sregs.cr4, sregs.efer, bool(cs.l), bool(cs.db))
    level = 0 if mode == "real" else cpl(cs.selector, sregs.ss.dpl)
    lines = [f"mode: {mode}, CPL {level}"]
    regs = [
        ["cr0", f"{sregs.cr0:#018x}", " ".join(decode_cr0(sregs.cr0))],
        ["cr2", f"{sregs.cr2:#018x}", ""],
        ["cr3", f"{sregs.cr3:#018x}", ""],
        ["cr4", f"{sregs.cr4:#018x}", " ".join(decode_cr4(sregs.cr4))],
        ["cr8", f"{sregs.cr8:#018x}", ""],
        ["efer", f"{sregs.efer:#018x}", " ".join(decode_efer(sregs.efer))],
        ["gdt", f"{sregs.gdt.base:#018x}", f"limit {sregs.gdt.limit:#x}"],
        ["idt", f"{sregs.idt.base:#018x}", f"limit {sregs.idt.limit:#x}"],
    ]
    lines.append(format_table(["reg", "value", "decoded"], regs))
    lines.append("")
    rows = []
    for name in _SEGMENT_NAMES:
        seg = getattr(sregs, name)
        if seg.unusable:
            kind = "null (unusable)"
        else:
            kind = describe_segment_type(seg.type, bool(seg.s), seg.dpl, bool(seg.l), bool(seg.db), long_mode)
        rows.append(
            [name, f"{seg.selector:#06x}", f"{seg.base:#010x}", f"{seg.limit:#010x}", kind, _segment_flags(seg)]
        )
    lines.append(format_table(["seg", "selector", "base", "limit", "type", "flags"], rows))
    return "\n".join(lines)


_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
         "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


def format_regs(regs: object) -> str:
    """Render a ``struct kvm_regs``-like object: GPRs in two columns, then
    RIP and RFLAGS with its decoded flags."""
    lines = []
    for i in range(0, len(_GPRS), 2):
        a, b = _GPRS[i], _GPRS[i + 1]
        lines.append(f"{a:>3} {getattr(regs, a):#018x}   {b:>3} {getattr(regs, b):#018x}")
    lines.append(f"rip {regs.rip:#018x}   rflags {regs.rflags:#x} [{' '.join(decode_rflags(regs.rflags))}]")
    return "\n".join(lines)
