"""A vCPU's state as a person reads it: the code size, linear addresses, the code at RIP.

Pure functions of the registers (``struct kvm_regs``/``kvm_sregs`` or
anything with their attributes) and of guest memory (``read(gpa, n)``,
``is_mapped(gpa, n)``).  Linear addresses are translated with pykvm's own
page walker (``pykvm.x86.paging.translate``, which reads the real CR0/CR4/
EFER bits), not with KVM_TRANSLATE: the error reports, the tracer, the
monitor and the GDB stub all read guest code through :func:`read_linear`.
"""

from __future__ import annotations

from typing import Any, Protocol

from . import bits
from .disasm import MAX_INSN_BYTES, Instruction, decode
from .paging import translate
from .state import format_regs, format_sregs

__all__ = ["code_bits", "describe", "format_code_at_rip", "instruction_at_rip", "linear_rip", "read_linear"]

PAGE = 0x1000


class Memory(Protocol):
    def read(self, gpa: int, size: int) -> bytes: ...
    def is_mapped(self, gpa: int, size: int = 1) -> bool: ...


def code_bits(sregs: Any) -> int:
    """16, 32 or 64: the default operand size of the code being executed (CR0.PE, EFER.LMA, CS.L/CS.D)."""
    if not sregs.cr0 & bits.CR0_PE:
        return 16
    if sregs.efer & bits.EFER_LMA and sregs.cs.l:
        return 64
    return 32 if sregs.cs.db else 16


def linear_rip(regs: Any, sregs: Any) -> int:
    """CS.base + RIP, truncated to the code size (what breakpoints and page walks use)."""
    nbits = code_bits(sregs)
    if nbits == 64:
        return regs.rip
    return (sregs.cs.base + (regs.rip & (0xFFFF if nbits == 16 else 0xFFFFFFFF))) & 0xFFFFFFFF


def linear_to_physical(memory: Memory, sregs: Any, linear: int) -> int | None:
    """The guest-physical address of a linear one, through the guest's page tables (None: not mapped)."""
    if not sregs.cr0 & bits.CR0_PG:
        return linear & 0xFFFFFFFF
    try:
        return translate(memory.read, sregs, linear).gpa
    except ValueError:  # a table outside guest RAM (GuestMemoryError), or 5-level paging
        return None


def read_linear(memory: Memory, sregs: Any, linear: int, size: int) -> bytes:
    """Up to ``size`` bytes at a linear address, stopping at the first byte that is not in guest RAM."""
    out = bytearray()
    while len(out) < size:
        address = linear + len(out)
        gpa = linear_to_physical(memory, sregs, address)
        if gpa is None:
            break
        chunk = min(size - len(out), PAGE - (address & (PAGE - 1)))
        while chunk and not memory.is_mapped(gpa, chunk):
            chunk -= 1  # RAM may end inside the page
        if not chunk:
            break
        out += memory.read(gpa, chunk)
    return bytes(out)


def instruction_at_rip(memory: Memory, regs: Any, sregs: Any) -> Instruction | None:
    """The instruction at CS:RIP (``(bad)`` if its bytes do not decode), or None if they are not in RAM."""
    nbits = code_bits(sregs)
    ip = regs.rip & (0xFFFF if nbits == 16 else (1 << 64) - 1)
    linear = linear_rip(regs, sregs)
    code = read_linear(memory, sregs, linear, MAX_INSN_BYTES)
    if not code:
        return None
    return decode(code, ip, nbits, linear) or Instruction(ip, linear, code[:1], "(bad)", nbits)


def format_code_at_rip(memory: Memory, regs: Any, sregs: Any) -> str:
    """One line: 'code at RIP 0x...: <bytes>  <instruction>' (or why there is none)."""
    insn = instruction_at_rip(memory, regs, sregs)
    if insn is None:
        return f"code at RIP {regs.rip:#x}: not in guest memory"
    return f"code at RIP {insn.address:#x}: {insn.raw.hex(' ')}  {insn.text}"


def describe(vcpu: Any, memory: Memory) -> str:
    """Registers, segments, control registers and the instruction at RIP (crash reports)."""
    regs = vcpu.get_regs()
    sregs = vcpu.get_sregs()
    return "\n".join([format_regs(regs), format_sregs(sregs), format_code_at_rip(memory, regs, sregs)])
