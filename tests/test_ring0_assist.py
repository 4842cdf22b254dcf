"""pykvm.platform.ring0_assist: int3, fwait, stac, clac and popcnt at CPL 0 finished where the host's emulator gives up.

The guest (64-bit, CPL 0) builds an IDT with an interrupt gate for #BP,
executes ``int3`` (its handler records the frame and counts, then
``iretq``), ``fwait``, ``stac`` and ``clac`` (reading RFLAGS after each of
the two) and two ``popcnt``, and halts.  On a kvm_pvm host each of them ends
KVM_RUN with an emulation failure that the assist finishes; elsewhere the CPU runs
them and the assist is not installed.
"""

from __future__ import annotations

import pytest

LOAD = 0x100000
AFTER_INT3 = 0x50   # offsets in CODE (GNU as listing)
# lea idt,%rax; lea handler,%rbx; fill gate 3 (offset, %cs, 0x8e00 = P DPL0 interrupt gate); lidt; mov $0x11,%r12;
# int3; after: fwait; stac; pushfq; pop %r14; clac; pushfq; pop %r15;
# movabs $0xff00ff00ff,%rdi; popcnt %rdi,%rbx; xor %esi,%esi; popcnt %esi,%r13d; setz %al; hlt
# handler: mov (%rsp),%r8; mov 8(%rsp),%r9; pushfq; pop %r10; mov %rsp,%r11; add $1,%r12; iretq
CODE = bytes.fromhex(
    "488d0599000000488d1d6900000066895830668cc96689483266c74034008e48c1eb106689583648c1eb10895838c7403c000000"
    "00488d155400000066c702ff00488942020f011a49c7c411000000cc9b0f01cb9c415e0f01ca9c415f48bfff00ff00ff000000f3"
    "480fb8df31f6f3440fb8ee0f94c0f44c8b04244c8b4c24089c415a4989e34983c40148cf")
IMAGE = CODE + bytes(0x1A0 - len(CODE))   # idtr at 0x90, the IDT at 0xa0
RFLAGS_IF, RFLAGS_AC = 1 << 9, 1 << 18
CODE_MXCSR = (
    "0fae5c24f88b4424f8b9020000000fae1d2b0000008b1d25000000488d5424e089048a0fae148a0fae5424f8c74424fcadde0000"
    "0fae5c24fc8b7424fcf4669000000000")


@pytest.mark.kvm
def test_int3_fwait_stac_clac_popcnt_run_at_cpl0():
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
        assert (regs.rbx, regs.r13, regs.rax & 0xFF) == (24, 0, 1)  # popcnt: 24 bits set; of 0: 0, ZF
        if nested_kvm_module() == "kvm_pvm":
            assert m.loop.assist.counts == {"int3": 1, "fwait": 1, "stac": 1, "clac": 1, "popcnt": 2}
        else:
            assert m.loop.assist is None


@pytest.mark.kvm
def test_cx16_is_hidden_on_kvm_pvm_unless_asked_for():
    from pykvm.host import nested_kvm_module
    from pykvm.platform.machine import Machine

    # mov $1,%eax; xor %ecx,%ecx; cpuid; hlt: the guest's own CPUID.01H:ECX
    code = bytes.fromhex("b801000000" "31c9" "0fa2" "f4")
    seen = []
    for features in ((), (("cx16", True),)):
        with Machine(memory="16M", cpu_features=features) as m:
            m.load_image(code, format="flat", mode="long")
            assert m.run(timeout=20).ended == "hlt"
            seen.append(bool(m.vcpu.get_regs().rcx >> 13 & 1))
    assert seen == ([False, True] if nested_kvm_module() == "kvm_pvm" else [seen[0], True])


@pytest.mark.kvm
def test_stmxcsr_and_ldmxcsr_of_the_current_value_with_stack_rip_relative_and_sib_operands():
    from pykvm.host import nested_kvm_module
    from pykvm.platform.machine import Machine

    # stmxcsr -8(%rsp); mov -8(%rsp),%eax; mov $2,%ecx; stmxcsr data(%rip); mov data(%rip),%ebx;
    # lea -0x20(%rsp),%rdx; mov %eax,(%rdx,%rcx,4); ldmxcsr (%rdx,%rcx,4); ldmxcsr -8(%rsp);
    # movl $0xdead,-4(%rsp); stmxcsr -4(%rsp); mov -4(%rsp),%esi; hlt; data (at 0x40)
    code = bytes.fromhex(CODE_MXCSR)
    with Machine(memory="16M") as m:
        m.load_image(code, format="flat", mode="long")
        mxcsr = m.vcpu.get_xsave().region[6]
        result = m.run(timeout=20)
        assert result.ended == "hlt", result.message
        regs = m.vcpu.get_regs()
        assert mxcsr == 0x1F80 and (regs.rax, regs.rbx, regs.rsi) == (mxcsr, mxcsr, mxcsr)
        assert regs.rip == LOAD + code.index(b"\xf4") + 1
        if nested_kvm_module() == "kvm_pvm":
            assert m.loop.assist.counts == {"ldmxcsr": 2, "stmxcsr": 3}


@pytest.mark.kvm
def test_an_ldmxcsr_that_would_change_mxcsr_is_left_to_fail():
    from pykvm.host import nested_kvm_module
    from pykvm.platform.machine import Machine

    code = bytes.fromhex("c74424f8807f0000" "0fae5424f8" "f4")   # movl $0x7f80,-8(%rsp); ldmxcsr -8(%rsp); hlt
    with Machine(memory="16M") as m:
        m.load_image(code, format="flat", mode="long")
        result = m.run(timeout=20)
        if nested_kvm_module() == "kvm_pvm":   # the host cannot set MXCSR: the run stops, as without the assist
            assert result.ended == "internal-error" and "ldmxcsr" in result.message
        else:
            assert result.ended == "hlt"
