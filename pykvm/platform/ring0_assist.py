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

Anything else -- or an ``int3`` outside 64-bit mode, a gate that is not
present -- is left alone: the run stops with the internal error as before.
What the assist did is counted in :attr:`Ring0Assist.counts`.
"""

from __future__ import annotations

import struct

from pykvm.x86 import bits

__all__ = ["Ring0Assist"]

KVM_INTERNAL_ERROR_EMULATION = 1  # <linux/kvm.h>; pykvm.exits names the suberror the same way
BP_VECTOR = 3
GATE_INTERRUPT, GATE_TRAP = 0xE, 0xF
TSS64_IST1 = 0x24                 # the 64-bit TSS: IST1..IST7, 8 bytes each
RFLAGS_TF, RFLAGS_IF, RFLAGS_NT, RFLAGS_RF, RFLAGS_AC = 1 << 8, 1 << 9, 1 << 14, 1 << 16, 1 << 18


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
            code = self._read(sregs, regs.rip, 3)
            if code[:1] == b"\xcc":
                self._deliver(regs, sregs, BP_VECTOR, regs.rip + 1)
                name = "int3"
            elif code[:1] == b"\x9b" and not (sregs.cr0 & bits.CR0_TS and sregs.cr0 & bits.CR0_MP):
                regs.rip += 1
                name = "fwait"
            elif code in (b"\x0f\x01\xca", b"\x0f\x01\xcb"):
                regs.rflags = regs.rflags | RFLAGS_AC if code[2] == 0xCB else regs.rflags & ~RFLAGS_AC
                regs.rip += 3
                name = "stac" if code[2] == 0xCB else "clac"
            else:
                return False
        except AssistError:
            return False
        self.vcpu.set_regs(regs)
        self.counts[name] = self.counts.get(name, 0) + 1
        return True

    # -- guest memory by linear address ------------------------------------------------------
    def _physical(self, sregs, linear: int, size: int) -> int:
        from pykvm.x86.cpu_view import linear_to_physical

        gpa = linear_to_physical(self.memory, sregs, linear)
        if gpa is None or (linear & 0xFFF) + size > 0x1000 or not self.memory.is_mapped(gpa, size):
            raise AssistError(f"{linear:#x} is not mapped")  # (the kernel's stacks and tables are page-aligned)
        return gpa

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
