"""A KVM vCPU's registers under GDB's x86 names: KVM_GET/SET_REGS, SREGS, FPU and one MSR.

The GDB stub's target (:mod:`pykvm.state.gdb_kvm`) reads and writes
registers through this module, in the register dict of
:mod:`pykvm.state.gdb_target` (x86-64 names whatever the mode):

* ``rax``..``r15``, ``rip``, ``eflags``: ``struct kvm_regs`` (KVM_GET_REGS);
* the six segment selectors, ``fs_base``, ``gs_base``, ``cr0``, ``cr2``,
  ``cr3``, ``cr4``, ``cr8``, ``efer``: ``struct kvm_sregs`` (KVM_GET_SREGS);
* ``st0``-``st7``, ``fctrl``..``fop``, ``xmm0``-``xmm15``, ``mxcsr``:
  ``struct kvm_fpu`` (KVM_GET_FPU, the FXSAVE image);
* ``k_gs_base``: MSR IA32_KERNEL_GS_BASE (KVM_GET_MSRS).

GDB's ``ftag`` is the full x87 tag word (two bits per physical register);
FXSAVE keeps the abridged one (a bit per register: empty or not), so the
full tag is rebuilt from each register's value (Intel SDM Vol. 1 §10.5.1.1).

Writes go back only to the structures whose values changed, so a ``G``
packet that rewrites every register leaves the FPU and the segment state
alone.  A segment selector is not written: loading one means loading its
descriptor from the guest's GDT, which a debugger should not do behind the
guest's back; a change is refused (the unchanged value GDB writes back
with ``G`` is fine).
"""

from __future__ import annotations

from pykvm.x86 import bits

GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rip")
SELECTORS = ("cs", "ss", "ds", "es", "fs", "gs")
CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")
X87 = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")

TAG_VALID, TAG_ZERO, TAG_SPECIAL, TAG_EMPTY = 0, 1, 2, 3


def _tag(value: int) -> int:
    """The x87 tag of a non-empty 80-bit register (SDM Vol. 1 Figure 8-7)."""
    exponent = (value >> 64) & 0x7FFF
    mantissa = value & ((1 << 64) - 1)
    if exponent == 0x7FFF:
        return TAG_SPECIAL
    if exponent == 0:
        return TAG_ZERO if mantissa == 0 else TAG_SPECIAL
    return TAG_VALID if mantissa >> 63 else TAG_SPECIAL


def full_tag(abridged: int, fsw: int, stack: list[int]) -> int:
    """The 16-bit tag word from FXSAVE's abridged tag; ``stack[i]`` is ST(i)'s 80-bit value."""
    top = (fsw >> 11) & 7
    word = 0
    for physical in range(8):
        if abridged >> physical & 1:
            tag = _tag(stack[(physical - top) % 8])
        else:
            tag = TAG_EMPTY
        word |= tag << (2 * physical)
    return word


def abridged_tag(word: int) -> int:
    """FXSAVE's abridged tag: a set bit for each register whose full tag is not empty."""
    return sum(1 << physical for physical in range(8) if (word >> (2 * physical)) & 3 != TAG_EMPTY)


def _fpu_values(fpu) -> dict[str, int]:
    stack = [int.from_bytes(bytes(fpu.fpr[i])[:10], "little") for i in range(8)]
    values = {f"st{i}": stack[i] for i in range(8)}
    values.update(
        fctrl=fpu.fcw, fstat=fpu.fsw, ftag=full_tag(fpu.ftwx, fpu.fsw, stack),
        fioff=fpu.last_ip & 0xFFFFFFFF, fiseg=(fpu.last_ip >> 32) & 0xFFFF,
        fooff=fpu.last_dp & 0xFFFFFFFF, foseg=(fpu.last_dp >> 32) & 0xFFFF,
        fop=fpu.last_opcode, mxcsr=fpu.mxcsr,
    )
    for i in range(16):
        values[f"xmm{i}"] = int.from_bytes(bytes(fpu.xmm[i]), "little")
    return values


def read_registers(vcpu) -> dict[str, int]:
    """Every register of the x86-64 layout, from the vCPU (stopped)."""
    regs, sregs, fpu = vcpu.get_regs(), vcpu.get_sregs(), vcpu.get_fpu()
    values = {name: getattr(regs, name) for name in GPRS}
    values["eflags"] = regs.rflags & 0xFFFFFFFF
    for name in SELECTORS:
        values[name] = getattr(sregs, name).selector
    values["fs_base"], values["gs_base"] = sregs.fs.base, sregs.gs.base
    for name in CONTROL:
        values[name] = getattr(sregs, name)
    values.update(_fpu_values(fpu))
    try:
        values["k_gs_base"] = vcpu.get_msrs([bits.MSR_KERNEL_GS_BASE])[bits.MSR_KERNEL_GS_BASE]
    except OSError:  # KvmError: a CPU without it (left out: GDB shows it unavailable)
        pass
    return values


def write_registers(vcpu, values: dict[str, int]) -> None:
    """Set the registers named in ``values``; each KVM structure is written only if it changed."""
    unknown = set(values) - set(GPRS) - set(SELECTORS) - set(CONTROL) - set(X87) - {
        "eflags", "fs_base", "gs_base", "mxcsr", "k_gs_base"} - {f"st{i}" for i in range(8)} - {
        f"xmm{i}" for i in range(16)}
    if unknown:
        raise ValueError(f"no such registers: {', '.join(sorted(unknown))}")
    regs = vcpu.get_regs()
    changed = False
    for name in GPRS:
        if name in values and getattr(regs, name) != values[name]:
            setattr(regs, name, values[name])
            changed = True
    if "eflags" in values and regs.rflags & 0xFFFFFFFF != values["eflags"]:
        regs.rflags = (regs.rflags & ~0xFFFFFFFF) | values["eflags"]
        changed = True
    sregs = vcpu.get_sregs()
    for name in SELECTORS:
        if name in values and values[name] != getattr(sregs, name).selector:
            raise ValueError(f"changing segment selector {name} is not supported (it would load a descriptor)")
    sregs_changed = False
    for name, segment in (("fs_base", sregs.fs), ("gs_base", sregs.gs)):
        if name in values and segment.base != values[name]:
            segment.base = values[name]
            sregs_changed = True
    for name in CONTROL:
        if name in values and getattr(sregs, name) != values[name]:
            setattr(sregs, name, values[name])
            sregs_changed = True
    fpu = vcpu.get_fpu()
    before = _fpu_values(fpu)
    fpu_changed = {name: value for name, value in values.items() if name in before and before[name] != value}
    if fpu_changed:
        _apply_fpu(fpu, fpu_changed, before)
    # Order: the FPU and the MSR cannot fail on a value GDB sends; SREGS can (KVM checks CR/EFER bits).
    if sregs_changed:
        vcpu.set_sregs(sregs)
    if changed:
        vcpu.set_regs(regs)
    if fpu_changed:
        vcpu.set_fpu(fpu)
    if "k_gs_base" in values:
        vcpu.set_msrs({bits.MSR_KERNEL_GS_BASE: values["k_gs_base"]})


def _apply_fpu(fpu, changed: dict[str, int], before: dict[str, int]) -> None:
    merged = {**before, **changed}
    for i in range(8):
        if f"st{i}" in changed:
            data = changed[f"st{i}"].to_bytes(10, "little") + bytes(fpu.fpr[i])[10:]
            for k, byte in enumerate(data):
                fpu.fpr[i][k] = byte
    for i in range(16):
        if f"xmm{i}" in changed:
            for k, byte in enumerate(changed[f"xmm{i}"].to_bytes(16, "little")):
                fpu.xmm[i][k] = byte
    fpu.fcw, fpu.fsw, fpu.last_opcode = merged["fctrl"], merged["fstat"], merged["fop"]
    fpu.ftwx = abridged_tag(merged["ftag"])
    fpu.last_ip = (merged["fiseg"] << 32) | merged["fioff"]
    fpu.last_dp = (merged["foseg"] << 32) | merged["fooff"]
    fpu.mxcsr = merged["mxcsr"]


def architecture(sregs) -> str:
    """The GDB architecture of the vCPU's current mode: real mode i8086, long mode x86-64, else i386."""
    if not sregs.cr0 & bits.CR0_PE:
        return "i8086"
    return "i386:x86-64" if sregs.efer & bits.EFER_LMA else "i386"
