"""A vCPU's state for people: register dumps and the code at RIP.

Used by error reports (shutdown, internal error, failed entry), the monitor
and the tracer.  The bytes at RIP are found with pykvm's own page walker
(KVM_TRANSLATE is not trusted: on nested pvm hosts it answers valid=0) and
disassembled by capstone in the vCPU's current mode.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pykvm.x86 import bits
from pykvm.x86.state import cpu_mode_name, format_regs, format_sregs

if TYPE_CHECKING:
    from pykvm.memory import GuestMemory
    from pykvm.vcpu import Vcpu

MAX_INSN_BYTES = 15


def code_bits(sregs) -> int:
    """16, 32 or 64: the default operand size of the code being executed (CR0.PE, EFER.LMA, CS.L/CS.D)."""
    if not sregs.cr0 & bits.CR0_PE:
        return 16
    if sregs.efer & bits.EFER_LMA and sregs.cs.l:
        return 64
    return 32 if sregs.cs.db else 16


def linear_to_physical(memory: "GuestMemory", sregs, linear: int) -> int | None:
    """Translate a linear address with the guest's own page tables (None if unmapped)."""
    from pykvm.x86.paging import paging_mode_of, walk

    mode = paging_mode_of(sregs.cr0, sregs.cr4, sregs.efer)
    if mode == "none":
        return linear & 0xFFFFFFFF
    try:
        return walk(memory.read, sregs.cr3, linear, mode).gpa
    except Exception:
        return None


def read_virtual(memory: "GuestMemory", sregs, linear: int, size: int) -> bytes:
    """Up to ``size`` bytes at a linear address, stopping at the first unmapped byte."""
    out = bytearray()
    while len(out) < size:
        gpa = linear_to_physical(memory, sregs, linear + len(out))
        if gpa is None or not memory.is_mapped(gpa):
            break
        page_left = 4096 - (gpa & 0xFFF)
        chunk = min(size - len(out), page_left)
        while chunk and not memory.is_mapped(gpa, chunk):
            chunk -= 1
        if not chunk:
            break
        out += memory.read(gpa, chunk)
    return bytes(out)


def disassemble(code: bytes, address: int, nbits: int, count: int = 1) -> list[tuple[int, bytes, str]]:
    """Decode ``count`` instructions: (address, bytes, "mnemonic operands")."""
    import capstone

    mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[nbits]
    md = capstone.Cs(capstone.CS_ARCH_X86, mode)
    out = []
    for insn in md.disasm(code, address):
        out.append((insn.address, bytes(insn.bytes), f"{insn.mnemonic} {insn.op_str}".strip()))
        if len(out) == count:
            break
    return out


def instruction_at_rip(vcpu: "Vcpu", memory: "GuestMemory", regs=None, sregs=None) -> tuple[int, bytes, str] | None:
    """The instruction at CS:RIP, or None if its bytes are not in guest memory."""
    regs = regs or vcpu.get_regs()
    sregs = sregs or vcpu.get_sregs()
    nbits = code_bits(sregs)
    rip = regs.rip & (0xFFFF if nbits == 16 else (1 << 64) - 1)
    linear = (sregs.cs.base + rip) & (0xFFFFFFFF if nbits != 64 else (1 << 64) - 1)
    code = read_virtual(memory, sregs, linear, MAX_INSN_BYTES)
    decoded = disassemble(code, rip, nbits) if code else []
    if decoded:
        return decoded[0]
    return (rip, code, "(undecodable)") if code else None


def format_code_at_rip(vcpu: "Vcpu", memory: "GuestMemory", regs=None, sregs=None) -> str:
    """One line: 'code at RIP 0x...: <bytes>  <instruction>' (or why there is none)."""
    regs = regs or vcpu.get_regs()
    insn = instruction_at_rip(vcpu, memory, regs, sregs)
    if insn is None:
        return f"code at RIP {regs.rip:#x}: not in guest memory"
    address, raw, text = insn
    return f"code at RIP {address:#x}: {raw.hex(' ')}  {text}"


def describe(vcpu: "Vcpu", memory: "GuestMemory") -> str:
    """Registers, segments, control registers and the instruction at RIP."""
    regs = vcpu.get_regs()
    sregs = vcpu.get_sregs()
    return "\n".join([format_regs(regs), format_sregs(sregs), format_code_at_rip(vcpu, memory, regs, sregs)])


def mode_name(sregs, rflags: int = 0) -> str:
    return cpu_mode_name(sregs.cr0, sregs.cr4, sregs.efer, bool(sregs.cs.l), bool(sregs.cs.db), rflags)
