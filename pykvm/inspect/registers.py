"""Register dumps for people: what ``info registers`` shows.

General registers, RFLAGS, control registers and EFER decoded, segments with
their descriptors, the mode and CPL, what CR3 points at, the debug
registers, and the instruction at RIP.
"""

from __future__ import annotations

from pykvm.x86 import bits
from pykvm.x86.cpu_view import format_code_at_rip
from pykvm.x86.paging import paging_mode_of
from pykvm.x86.state import format_regs, format_sregs

__all__ = ["describe_cr3", "describe_debugregs", "dump_registers"]


def describe_cr3(sregs) -> str:
    """What CR3 points at in the current paging mode, with its PWT/PCD/PCID bits."""
    cr3 = sregs.cr3
    mode = paging_mode_of(sregs.cr0, sregs.cr4, sregs.efer)
    if mode == "none":
        return f"cr3 {cr3:#x}: paging is off (CR0.PG=0), CR3 unused"
    if mode in ("4level", "5level"):
        root = "PML5" if mode == "5level" else "PML4"
        base = cr3 & bits.PTE_ADDR_MASK
    elif mode == "pae":
        root, base = "PDPT", cr3 & bits.CR3_PAE_ADDR_MASK
    else:
        root, base = "page directory", cr3 & bits.PTE32_ADDR_MASK
    extra = []
    if sregs.cr4 & bits.CR4_PCIDE:
        extra.append(f"PCID {cr3 & 0xFFF}")
    else:
        if cr3 & bits.PTE_PWT:
            extra.append("PWT")
        if cr3 & bits.PTE_PCD:
            extra.append("PCD")
    tail = f" [{' '.join(extra)}]" if extra else ""
    return f"cr3 {cr3:#x}: {mode} paging, {root} at {base:#x}{tail}"


_DR7_RW = {0: "exec", 1: "write", 2: "io", 3: "rw"}
_DR7_LEN = {0: 1, 1: 2, 2: 8, 3: 4}


def describe_debugregs(debugregs) -> str:
    """DR0-DR3 with DR7's enables and conditions; DR6's hit bits."""
    dr7, dr6 = debugregs.dr7, debugregs.dr6
    parts = []
    for i in range(4):
        enabled = [name for name, bit in (("L", 2 * i), ("G", 2 * i + 1)) if dr7 >> bit & 1]
        if enabled or debugregs.db[i]:
            rw = _DR7_RW[(dr7 >> (16 + 4 * i)) & 3]
            length = _DR7_LEN[(dr7 >> (18 + 4 * i)) & 3]
            state = "".join(enabled) or "off"
            parts.append(f"dr{i} {debugregs.db[i]:#x} {rw}/{length} {state}")
    hits = [f"B{i}" for i in range(4) if dr6 >> i & 1] + (["BS"] if dr6 >> 14 & 1 else [])
    line = f"dr6 {dr6:#x}{' [' + ' '.join(hits) + ']' if hits else ''}  dr7 {dr7:#x}"
    return "debug: " + ("; ".join(parts) + "; " if parts else "no guest breakpoints; ") + line


def dump_registers(vcpu, memory) -> str:
    """Everything ``info registers`` shows: GPRs, RFLAGS, control registers,
    EFER, CR3's table, segments (with descriptors decoded), mode and CPL,
    debug registers, and the instruction at RIP."""
    regs = vcpu.get_regs()
    sregs = vcpu.get_sregs()
    lines = [format_regs(regs), format_sregs(sregs), describe_cr3(sregs)]
    try:
        lines.append(describe_debugregs(vcpu.get_debugregs()))
    except OSError as exc:
        lines.append(f"debug: KVM_GET_DEBUGREGS failed: {exc}")
    lines.append(format_code_at_rip(memory, regs, sregs))
    return "\n".join(lines)
