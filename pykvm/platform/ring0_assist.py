"""Finishing the few ring-0 instructions a nested host's emulator gives up on (KVM_EXIT_INTERNAL_ERROR).

On a kvm_pvm host (PLATFORM.md) guest code at CPL 0 runs through KVM's
instruction emulator, which lacks some instructions: KVM_RUN then returns
KVM_EXIT_INTERNAL_ERROR, suberror KVM_INTERNAL_ERROR_EMULATION, RIP at the
instruction, nothing executed.  Hardware runs them, and so does this module
for the ones whose effect is small and exactly specified (Intel SDM vol. 2):

``int3`` (CC)
    A #BP (vector 3) delivered through the IDT as a software interrupt,
    64-bit mode (SDM vol. 3A 6.14 "Exception and interrupt handling in
    64-bit mode"): the gate's stack (its IST entry from the TSS, else the
    current RSP) aligned down to 16 bytes; SS, RSP, RFLAGS, CS and the
    address after the ``int3`` pushed; CS:RIP from the gate; TF, NT, RF
    cleared, IF too through an interrupt gate.  Linux executes one at boot
    (``int3_selftest``, arch/x86/kernel/alternative.c).
``fwait`` / ``wait`` (9B)
    Checks for pending unmasked x87 exceptions; with none (the kernel
    runs with none) and CR0.TS or CR0.MP clear it is a no-op.
``clac`` / ``stac`` (0F 01 CA / CB)
    Clear or set RFLAGS.AC (SMAP's user-access window).
``stmxcsr m32`` (0F AE /3), and ``ldmxcsr m32`` (0F AE /2) of the value MXCSR holds
    MXCSR as KVM_GET_XSAVE reports it (the legacy area's byte 24) stored,
    or a load that changes nothing; the operand's address decoded from
    ModRM, SIB and displacement, RIP-relative and FS/GS overrides included.
    Linux's ``kernel_fpu_begin`` loads the default 0x1f80 that MXCSR
    already holds.  A load of another value is refused: kvm_pvm keeps
    MXCSR at 0x1f80 whatever KVM_SET_FPU or KVM_SET_XSAVE say (and
    KVM_GET_FPU reports 0), so pykvm could not make it take effect.
``popcnt r, r`` (F3 [REX] 0F B8 /r, register operands)
    The destination gets the number of set bits of the source (32-bit
    results zero-extended); ZF = source is zero, CF OF SF AF PF cleared.
    Linux's ``hweight`` alternatives use this form; a CPUID edit cannot
    hide POPCNT on kvm_pvm (its guests see the host's bit).

Anything else -- or an ``int3`` outside 64-bit mode, a gate that is not
present -- is left alone: the run stops with the internal error as before.
What the assist did is counted in :attr:`Ring0Assist.counts`.  A debugger's
``int3`` never comes here: software breakpoints do not work on kvm_pvm, and
pykvm's tracer plants hardware breakpoints there instead.

``cmpxchg16b`` (an atomic 16-byte compare-and-exchange: not finished here,
where another vCPU could interleave) is hidden instead: Machine clears
CPUID.01H:ECX.CX16 on kvm_pvm hosts (:data:`HIDDEN`), which this host's KVM
honours, so Linux's SLUB takes its lock-based path.  XSAVE's bit cannot be
hidden there (kvm_pvm guests see the host's), so Linux needs ``noxsave`` on
its command line, or it stops at the first ``xrstor`` (docs/linux.md).
"""

from __future__ import annotations

import struct

from pykvm.x86 import bits

__all__ = ["HIDDEN", "Ring0Assist"]

#: CPU features Machine hides from guests on kvm_pvm hosts (QEMU's names, pykvm.platform.cpuid).
HIDDEN = ("cx16",)

KVM_INTERNAL_ERROR_EMULATION = 1  # <linux/kvm.h>; pykvm.exits names the suberror the same way
BP_VECTOR = 3
GATE_INTERRUPT, GATE_TRAP = 0xE, 0xF
XSAVE_MXCSR = 24                  # the XSAVE area's legacy (FXSAVE) image: MXCSR at byte 24
TSS64_IST1 = 0x24                 # the 64-bit TSS: IST1..IST7, 8 bytes each
RFLAGS_TF, RFLAGS_IF, RFLAGS_NT, RFLAGS_RF, RFLAGS_AC = 1 << 8, 1 << 9, 1 << 14, 1 << 16, 1 << 18
RFLAGS_ZF = 1 << 6
ARITH_FLAGS = 1 << 0 | 1 << 2 | 1 << 4 | 1 << 6 | 1 << 7 | 1 << 11    # CF PF AF ZF SF OF
#: struct kvm_regs's names for the general registers, by their encoding (SDM vol. 2 table 2-2).
GPR = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")


class AssistError(Exception):
    """The instruction cannot be finished here (the internal error stands)."""


class Ring0Assist:
    """Called with an internal-error exit; True when it finished the instruction and the vCPU may go on."""

    def __init__(self, vcpu, memory) -> None:
        self.vcpu = vcpu
        self.memory = memory
        self.counts: dict[str, int] = {}

    def __call__(self, exit) -> bool:
        if getattr(exit, "suberror", None) != KVM_INTERNAL_ERROR_EMULATION:
            return False
        regs, sregs = self.vcpu.get_regs(), self.vcpu.get_sregs()
        if sregs.cs.dpl != 0 or not sregs.efer & bits.EFER_LMA or not sregs.cs.l:
            return False  # only 64-bit ring 0 (where this host emulates)
        try:
            code = self._code(sregs, regs.rip)
            if code[:1] == b"\xcc":
                self._deliver(regs, sregs, BP_VECTOR, regs.rip + 1)
                name = "int3"
            elif code[:1] == b"\x9b" and not (sregs.cr0 & bits.CR0_TS and sregs.cr0 & bits.CR0_MP):
                regs.rip += 1
                name = "fwait"
            elif code[:3] in (b"\x0f\x01\xca", b"\x0f\x01\xcb"):
                regs.rflags = regs.rflags | RFLAGS_AC if code[2] == 0xCB else regs.rflags & ~RFLAGS_AC
                regs.rip += 3
                name = "stac" if code[2] == 0xCB else "clac"
            elif (name := self._popcnt(regs, code) or self._mxcsr(regs, sregs, code)) is None:
                return False
        except AssistError:
            return False
        self.vcpu.set_regs(regs)
        self.counts[name] = self.counts.get(name, 0) + 1
        return True

    def _popcnt(self, regs, code: bytes) -> str | None:
        """``popcnt`` with register operands: "popcnt" when done, None when ``code`` is another form."""
        at, rex = 1, 0
        if code[:1] != b"\xf3":
            return None
        if 0x40 <= code[at] <= 0x4F:
            rex, at = code[at], at + 1
        if code[at:at + 2] != b"\x0f\xb8" or code[at + 2] >> 6 != 3:
            return None
        modrm = code[at + 2]
        dest = (modrm >> 3 & 7) | (rex & 4) << 1          # ModRM.reg, REX.R
        source = (modrm & 7) | (rex & 1) << 3               # ModRM.rm, REX.B
        width = 64 if rex & 8 else 32
        value = getattr(regs, GPR[source]) & ((1 << width) - 1)
        setattr(regs, GPR[dest], bin(value).count("1"))
        regs.rflags = regs.rflags & ~ARITH_FLAGS | (RFLAGS_ZF if value == 0 else 0)
        regs.rip += at + 3
        return "popcnt"

    def _mxcsr(self, regs, sregs, code: bytes) -> str | None:
        """``ldmxcsr``/``stmxcsr`` with a memory operand: its name when done, None for another instruction."""
        segment, at = 0, 0
        if code[at] in (0x64, 0x65):  # FS, GS override (the others have base 0 in 64-bit mode)
            segment, at = (sregs.fs.base if code[at] == 0x64 else sregs.gs.base), at + 1
        rex = code[at] if 0x40 <= code[at] <= 0x4F else 0
        at += 1 if rex else 0
        if code[at:at + 2] != b"\x0f\xae" or code[at + 2] >> 6 == 3 or (code[at + 2] >> 3 & 7) not in (2, 3):
            return None
        code = self._code(sregs, regs.rip, 16)  # the whole instruction: SIB and a 32-bit displacement too
        address, length = memory_operand(regs, code, at + 2, rex)
        address = (address + segment) & 0xFFFFFFFFFFFFFFFF
        mxcsr = self.vcpu.get_xsave().region[XSAVE_MXCSR // 4]
        if code[at + 2] >> 3 & 7 == 2:
            (value,) = struct.unpack("<I", self._read(sregs, address, 4))
            if value != mxcsr:
                raise AssistError(f"ldmxcsr of {value:#x} over {mxcsr:#x}: this host cannot set MXCSR")
            name = "ldmxcsr"
        else:
            self._write(sregs, address, struct.pack("<I", mxcsr))
            name = "stmxcsr"
        regs.rip += at + 2 + length
        return name

    # -- guest memory by linear address ------------------------------------------------------
    def _physical(self, sregs, linear: int, size: int) -> int:
        from pykvm.x86.cpu_view import linear_to_physical

        gpa = linear_to_physical(self.memory, sregs, linear)
        if gpa is None or (linear & 0xFFF) + size > 0x1000 or not self.memory.is_mapped(gpa, size):
            raise AssistError(f"{linear:#x} is not mapped")  # (the kernel's stacks and tables are page-aligned)
        return gpa

    def _code(self, sregs, rip: int, size: int = 6) -> bytes:
        """The instruction's first ``size`` bytes (zeroes where guest RAM ends), across pages."""
        from pykvm.x86.cpu_view import read_linear

        code = read_linear(self.memory, sregs, rip, size)
        if not code:
            raise AssistError(f"RIP {rip:#x} is not mapped")
        return code + bytes(size - len(code))

    def _read(self, sregs, linear: int, size: int) -> bytes:
        return self.memory.read(self._physical(sregs, linear, size), size)

    def _write(self, sregs, linear: int, data: bytes) -> None:
        self.memory.write(self._physical(sregs, linear, len(data)), data)

    # -- 64-bit exception delivery (SDM vol. 3A 6.14) ----------------------------------------
    def _deliver(self, regs, sregs, vector: int, return_rip: int) -> None:
        if vector * 16 + 15 > sregs.idt.limit:
            raise AssistError("vector beyond the IDT limit")
        gate = self._read(sregs, sregs.idt.base + vector * 16, 16)
        low, selector, ist, attributes, middle, high = struct.unpack_from("<HHBBHI", gate)
        kind, present = attributes & 0xF, attributes & 0x80
        if not present or kind not in (GATE_INTERRUPT, GATE_TRAP) or selector & ~3 != sregs.cs.selector & ~3:
            raise AssistError("not a present gate into the current code segment")
        rsp = regs.rsp
        if ist & 7:
            (rsp,) = struct.unpack("<Q", self._read(sregs, sregs.tr.base + TSS64_IST1 + 8 * ((ist & 7) - 1), 8))
        rsp &= ~0xF
        frame = struct.pack("<QQQQQ", return_rip, sregs.cs.selector, regs.rflags, regs.rsp, sregs.ss.selector)
        rsp -= len(frame)
        for at in range(0, len(frame), 8):  # RIP at the lowest address, SS at the highest; 8-aligned qwords
            self._write(sregs, rsp + at, frame[at:at + 8])
        regs.rsp = rsp
        regs.rip = low | middle << 16 | high << 32
        regs.rflags &= ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | (RFLAGS_IF if kind == GATE_INTERRUPT else 0))


def memory_operand(regs, code: bytes, at: int, rex: int) -> tuple[int, int]:
    """``(address, bytes)`` of the 64-bit memory operand whose ModRM byte is ``code[at]`` (SDM vol. 2 2.1.5, 2.2.1).

    ``address`` before any segment base; ``bytes``: ModRM, SIB and
    displacement.  RIP-relative addresses count from the instruction's end,
    which needs its length: only instructions that end with the operand
    (no immediate) are decoded here.
    """
    modrm = code[at]
    mod, rm = modrm >> 6, modrm & 7
    length = 1
    if rm == 4:  # a SIB byte follows
        sib = code[at + 1]
        length += 1
        scale, index, base = 1 << (sib >> 6), (sib >> 3 & 7) | (rex & 2) << 2, sib & 7
        address = 0 if index == 4 else getattr(regs, GPR[index]) * scale   # index 4 (rsp): none
        if base == 5 and mod == 0:
            address += struct.unpack_from("<i", code, at + length)[0]
            length += 4
        else:
            address += getattr(regs, GPR[base | (rex & 1) << 3])
    elif rm == 5 and mod == 0:  # RIP-relative: disp32 from the end of the instruction
        disp = struct.unpack_from("<i", code, at + 1)[0]
        return regs.rip + at + 5 + disp, 5
    else:
        address = getattr(regs, GPR[rm | (rex & 1) << 3])
    if mod == 1:
        address += struct.unpack_from("<b", code, at + length)[0]
        length += 1
    elif mod == 2:
        address += struct.unpack_from("<i", code, at + length)[0]
        length += 4
    return address & 0xFFFFFFFFFFFFFFFF, length
