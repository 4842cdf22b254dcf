"""pykvm.platform.ring0_assist: int3, fwait, stac and clac at CPL 0 finished where the host's emulator gives up.

The guest (64-bit, CPL 0) builds an IDT with an interrupt gate for #BP,
executes ``int3`` (its handler records the frame and counts, then
``iretq``), ``fwait``, ``stac`` and ``clac``, reading RFLAGS after each of
the last two, and halts.  On a kvm_pvm host each of those four ends KVM_RUN
with an emulation failure that the assist finishes; elsewhere the CPU runs
them and the assist is not installed.
"""

from __future__ import annotations

import pytest

LOAD = 0x100000
AFTER_INT3, HANDLER = 0x50, 0x5E   # offsets in CODE (GNU as listing)
# lea idt,%rax; lea handler,%rbx; fill gate 3 (offset, %cs, 0x8e00 = P DPL0 interrupt gate); lidt; mov $0x11,%r12;
# int3; after: fwait; stac; pushfq; pop %r14; clac; pushfq; pop %r15; hlt
# handler: mov (%rsp),%r8; mov 8(%rsp),%r9; pushfq; pop %r10; mov %rsp,%r11; add $1,%r12; iretq
CODE = bytes.fromhex(
    "488d0589000000488d1d5000000066895830668cc96689483266c74034008e48c1eb106689583648c1eb10895838c7403c00000000"
    "488d154400000066c702ff00488942020f011a49c7c411000000cc9b0f01cb9c415e0f01ca9c415ff44c8b04244c8b4c24089c415a"
    "4989e34983c40148cf")
IMAGE = CODE + bytes(0x190 - len(CODE))   # idtr at 0x80, the IDT at 0x90
RFLAGS_IF, RFLAGS_AC = 1 << 9, 1 << 18


@pytest.mark.kvm
def test_int3_fwait_stac_clac_run_at_cpl0():
    from pykvm.host import cpu_flags, nested_kvm_module
    from pykvm.platform.machine import Machine

    if nested_kvm_module() != "kvm_pvm" and "smap" not in cpu_flags():
        pytest.skip("stac and clac need SMAP, which this CPU lacks")
    with Machine(memory="16M") as m:
        m.load_image(IMAGE, format="flat", mode="long")
        regs = m.vcpu.get_regs()
        regs.rflags |= RFLAGS_IF                # so the interrupt gate's clearing of IF shows
        m.vcpu.set_regs(regs)
        stack = regs.rsp
        result = m.run(timeout=20)
        assert result.ended == "hlt", result.message
        regs = m.vcpu.get_regs()
        assert regs.r12 == 0x12                                  # the #BP handler ran once
        assert regs.r8 == LOAD + AFTER_INT3                      # the pushed RIP: after the int3
        assert regs.r9 == m.vcpu.get_sregs().cs.selector
        assert regs.r11 == (stack & ~0xF) - 40                   # SS, RSP, RFLAGS, CS, RIP on the aligned stack
        assert not regs.r10 & RFLAGS_IF and regs.rflags & RFLAGS_IF   # cleared by the gate, restored by iretq
        assert regs.r14 & RFLAGS_AC and not regs.r15 & RFLAGS_AC  # stac, then clac
        if nested_kvm_module() == "kvm_pvm":
            assert m.loop.assist.counts == {"int3": 1, "fwait": 1, "stac": 1, "clac": 1}
        else:
            assert m.loop.assist is None
