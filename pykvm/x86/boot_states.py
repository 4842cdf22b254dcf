"""The CPU states a boot protocol starts a kernel in (beside pykvm's own five modes).

A boot loader that enters a kernel past its firmware-facing code owes it a
defined machine state; with KVM the host writes that state into the
registers (``KVM_SET_SREGS``/``KVM_SET_REGS``) instead of executing the
loader's ``lgdt``/``mov cr0``/``ljmp``.  Each state is named as the load
plans name it (``pykvm.loaders.plan.CPU_STATES``):

``linux64``: Documentation/arch/x86/boot.rst, "64-bit Boot Protocol".
    Long mode with paging; an identity map covering the kernel's
    ``init_size`` window, the zero page and the command line (pykvm maps
    the whole first 4 GiB with 2 MiB pages, where every loader puts those);
    a GDT whose ``__BOOT_CS`` (0x10) is a flat execute/read code segment
    (64-bit: L=1) and ``__BOOT_DS`` (0x18) a flat read/write data segment;
    CS = ``__BOOT_CS``, DS/ES/SS = ``__BOOT_DS``; interrupts disabled;
    RSI = the zero page (``struct boot_params``).  The entry is
    ``code32_start + 0x200`` (``startup_64`` of the compressed kernel).
``linux32``: the same document, "32-bit Boot Protocol".  Protected mode,
    paging off, the same two selectors (32-bit code), interrupts disabled,
    ESI = the zero page, EBP/EDI/EBX = 0 (the load plan sets them).
``pvh32``, ``multiboot32``: Xen's docs/misc/pvh.pandoc and Multiboot 0.6.96
    section 3.2.  32-bit protected mode, paging off, flat 4 GiB code and
    data segments of any selector; pykvm's ``protected`` mode is exactly
    that.  EBX (the ``hvm_start_info`` or the Multiboot information) and
    EAX come from the load plan.

Both Linux states also get a busy TSS in TR (VMX refuses to enter a guest
whose TR is unusable; the kernel loads its own before it needs one) and an
empty IDT (any exception before the kernel's own IDT is a triple fault,
which KVM reports as a shutdown).  RFLAGS is 0x2: IF clear.

Where the GDT, TSS and page tables go is the platform's choice (a
``TablePlacement``; ``pykvm.platform.cpu_tables`` keeps them clear of
everything the plan occupies), as for :func:`pykvm.x86.modes.setup_mode`.
"""

from __future__ import annotations

from . import bits
from .modes import ModeSetup, TablePlacement, _check_registers_kept, identity_tables, mode_registers, setup_mode
from .segments import Gdt, Segment, tss32, tss64

__all__ = ["BOOT_STATES", "BOOT_CS", "BOOT_DS", "boot_gdt", "setup_boot_state", "table_mode"]

#: Each boot state and the pykvm mode whose tables (and control registers) it uses.
BOOT_STATES = {"linux64": "long", "linux32": "protected", "pvh32": "protected", "multiboot32": "protected"}

#: arch/x86/include/asm/segment.h: GDT_ENTRY_BOOT_CS = 2, GDT_ENTRY_BOOT_DS = 3.
BOOT_CS = 0x10
BOOT_DS = 0x18


def table_mode(state: str) -> str:
    """The pykvm mode whose tables ``state`` needs (for ``place_tables``); ValueError for an unknown one."""
    try:
        return BOOT_STATES[state]
    except KeyError:
        raise ValueError(f"unknown boot state {state!r}; known: {', '.join(BOOT_STATES)}") from None


def _flat(code: bool, long: bool) -> Segment:
    """A flat 4 GiB ring-0 segment: execute/read code or read/write data."""
    return Segment(limit=0xFFFFFFFF, type=bits.SEG_TYPE_CODE_RX if code else bits.SEG_TYPE_DATA_RW, present=True,
                   db=not (code and long), s=True, l=code and long, g=True)


def boot_gdt(long: bool, tss_base: int) -> tuple[Gdt, int]:
    """The boot protocol's GDT: null, unused, ``__BOOT_CS``, ``__BOOT_DS``, then a TSS; (gdt, TR selector)."""
    gdt = Gdt(long_mode=long)
    gdt.add(Segment.null())  # GDT_ENTRY_BOOT_CS is 2: slot 1 stays empty, as in the kernel's own boot GDT
    code = gdt.add(_flat(code=True, long=long))
    data = gdt.add(_flat(code=False, long=long))
    assert (gdt.selector(code), gdt.selector(data)) == (BOOT_CS, BOOT_DS)
    tss = gdt.add(Segment(base=tss_base, limit=bits.TSS64_SIZE - 1, type=bits.SYS_TYPE_TSS_BUSY, present=True))
    return gdt, gdt.selector(tss)


def setup_boot_state(state: str, vcpu, memory, entry: int, *, tables: TablePlacement) -> ModeSetup:
    """Put ``vcpu`` in boot state ``state`` at ``entry``, its tables where ``tables`` says.

    The protocol's argument registers (RSI, EBX, ...) are the load plan's
    business and are set afterwards.  For ``linux64`` the vCPU's CPUID must
    report long mode first (KVM refuses EFER.LME otherwise; see
    ``pykvm.x86.modes``).  Raises ``ModeNotSupported`` if KVM drops a bit of
    the mode.
    """
    mode = table_mode(state)
    if state in ("pvh32", "multiboot32"):
        return setup_mode(mode, vcpu, memory, entry=entry, tables=tables)
    long = state == "linux64"
    gdt, tr_selector = boot_gdt(long, tables.tss)
    memory.write(tables.gdt, bytes(gdt))
    memory.write(tables.tss, tss64(rsp0=tables.kernel_stack_top) if long
                 else tss32(esp0=tables.kernel_stack_top, ss0=BOOT_DS))
    cr0, cr4, efer = mode_registers(mode)
    cr3, page_tables = 0, None
    if long:
        cr3, page_tables, pages = identity_tables(mode, tables.page_tables, tables.page_tables_end)
        for gpa, data in pages:
            memory.write(gpa, data)
    data = gdt.segment(BOOT_DS)
    segments = {"cs": gdt.segment(BOOT_CS), "ds": data, "es": data, "fs": data, "gs": data, "ss": data,
                "tr": gdt.segment(tr_selector), "ldt": Segment.null()}

    sregs = vcpu.get_sregs()
    for name, segment in segments.items():
        segment.to_kvm(getattr(sregs, name))
    sregs.gdt.base, sregs.gdt.limit = tables.gdt, gdt.limit
    sregs.idt.base, sregs.idt.limit = tables.idt, 0
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = cr0, cr3, cr4, efer
    vcpu.set_sregs(sregs)
    _check_registers_kept(state, vcpu.get_sregs(), cr0, cr4, efer)

    regs = vcpu.get_regs()
    regs.rip, regs.rsp, regs.rflags = entry, tables.stack_top, bits.RFLAGS_FIXED
    vcpu.set_regs(regs)
    return ModeSetup(
        mode=state, entry=entry, stack=tables.stack_top, args=(regs.rdi, regs.rsi), cr0=cr0, cr3=cr3, cr4=cr4,
        efer=efer, rflags=bits.RFLAGS_FIXED, rip=entry, rsp=tables.stack_top, gdt=gdt, gdt_base=tables.gdt,
        gdt_limit=gdt.limit, idt_base=tables.idt, idt_limit=0, tss_base=tables.tss, page_tables=page_tables,
        segments=segments)
