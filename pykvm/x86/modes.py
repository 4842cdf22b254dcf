"""Put a vCPU into one of the five CPU modes of the contract.

:func:`setup_mode` does what a boot loader would do before jumping to a
kernel -- build a GDT, a TSS and page tables, load the control registers and
the segment registers -- except that with KVM the host writes the registers
directly (``KVM_SET_SREGS``/``KVM_SET_REGS``) instead of executing
``lgdt``/``mov cr0``/``ljmp``.

=============  ==================  ===================  =========  ===========  ===================
mode           CR0                 CR4                  EFER       CS           paging
=============  ==================  ===================  =========  ===========  ===================
``real``       CD NW ET (reset)    0                    0          0x0000       off
``protected``  PE MP ET NE         OSFXSR OSXMMEXCPT    0          0x08         off
``paged32``    PE MP ET NE WP PG   PSE OSFXSR ...       0          0x08         32-bit, 4 MiB pages
``long``       PE MP ET NE WP PG   PAE OSFXSR ...       LME LMA    0x08 (L=1)   4-level, 2 MiB
``long_user``  PE MP ET NE WP PG   PAE OSFXSR ...       LME LMA    0x23 (CPL3)  same, U/S=1
=============  ==================  ===================  =========  ===========  ===================

In ``long_user`` the TSS carries an I/O permission bitmap allowing ports
0-0x3fff besides RFLAGS.IOPL=3: kvm_pvm nested hosts ignore IOPL for CPL-3
port I/O but honour the bitmap.  On such hosts ``paged32`` is impossible
(KVM drops CR0.PG outside long mode); :func:`setup_mode` then raises
:class:`ModeNotSupported` instead of leaving a guest that triple-faults.

CR4.OSFXSR and OSXMMEXCPT (with CR0.MP set and EM clear) let guests use SSE,
which gcc emits freely in 64-bit code.  EFER.NXE and SCE are left clear:
KVM accepts them only if the guest's CPUID has NX/SYSCALL.

**Long modes need CPUID first.**  KVM rejects ``EFER.LME`` in
``KVM_SET_SREGS`` unless the vCPU's CPUID (``KVM_SET_CPUID2``) reports long
mode (CPUID.80000001H:EDX.LM, bit 29).  Setting CPUID is the caller's job:
do it before calling :func:`setup_mode` with ``long`` or ``long_user``.

This module only uses ``vcpu.get_sregs()``, ``vcpu.set_sregs(sregs)``,
``vcpu.get_regs()``, ``vcpu.set_regs(regs)`` and ``memory.write(gpa, data)``;
the objects returned by the getters need the attributes of ``struct
kvm_sregs`` and ``struct kvm_regs``.
"""

from __future__ import annotations

import functools
from array import array
from collections.abc import Mapping

from pykvm.errors import ModeNotSupported, PageTableError
from pykvm.values import Value

from . import bits
from .segments import USER_IO_PORTS, FlatGdt, Gdt, Segment, flat_gdt, real_mode_segment, tss32, tss64
from .state import MODES, check_mode, decode_cr0, decode_cr4, decode_efer, decode_rflags, format_table

__all__ = ["MODES", "ModeNotSupported", "ModeSetup", "TablePlacement", "mode_registers", "setup_mode"]


class TablePlacement(Value):
    """Where :func:`setup_mode` writes the structures it builds (guest-physical addresses).

    The GDT, the TSS (with its I/O bitmap in ``long_user``), an empty IDT,
    the identity-map page tables in ``[page_tables, page_tables_end)``, and
    the initial stacks: ``stack_top`` (RSP), ``kernel_stack_top`` (the TSS's
    RSP0, where CPL 3 -> 0 switches to) and ``real_stack`` (SS:SP in real
    mode, below 1 MiB).  Where they go is the platform's choice
    (``pykvm.platform.cpu_tables``); this module only needs to be told.
    """

    __slots__ = ("gdt", "tss", "idt", "page_tables", "page_tables_end", "kernel_stack_top", "stack_top", "real_stack")

    def __init__(self, gdt: int, tss: int, idt: int, page_tables: int, page_tables_end: int, kernel_stack_top: int,
                 stack_top: int, real_stack: int) -> None:
        self.gdt = gdt
        self.tss = tss
        self.idt = idt
        self.page_tables = page_tables
        self.page_tables_end = page_tables_end
        self.kernel_stack_top = kernel_stack_top
        self.stack_top = stack_top
        self.real_stack = real_stack

    #: Bytes :meth:`window` needs: GDT, TSS, IDT, 64 KiB of tables, 16 KiB kernel stack, 64 KiB stack.
    WINDOW_SIZE = 0x27000

    @classmethod
    def window(cls, base: int) -> "TablePlacement":
        """Everything packed into ``WINDOW_SIZE`` bytes from page-aligned ``base``."""
        if base % 0x1000:
            raise ValueError(f"the table window must be page-aligned, not {base:#x}")
        return cls(gdt=base, tss=base + 0x1000, idt=base + 0x2000, page_tables=base + 0x3000,
                   page_tables_end=base + 0x13000, kernel_stack_top=base + 0x17000, stack_top=base + 0x27000,
                   real_stack=base + 0x27000)

    def ranges(self, mode: str) -> list[tuple[int, int]]:
        """``(start, end)`` of what :func:`setup_mode` writes or uses in ``mode`` (for overlap checks)."""
        check_mode(mode)
        if mode == "real":
            return [(self.real_stack - 0x1000, self.real_stack)]
        used = [(self.gdt, self.gdt + 0x1000), (self.tss, self.tss + 0x1000), (self.idt, self.idt + 0x1000),
                (self.kernel_stack_top - 0x4000, self.kernel_stack_top), (self.stack_top - 0x10000, self.stack_top)]
        if mode != "protected":
            used.append((self.page_tables, self.page_tables_end))
        return used


TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:  # what setup_mode needs of its arguments (see the module docstring)
    from typing import Any, Protocol

    class _Vcpu(Protocol):
        def get_sregs(self) -> Any: ...
        def set_sregs(self, sregs: Any) -> Any: ...
        def get_regs(self) -> Any: ...
        def set_regs(self, regs: Any) -> Any: ...

    class _Memory(Protocol):
        def write(self, gpa: int, data: bytes) -> Any: ...


_CR0_PROTECTED = bits.CR0_PE | bits.CR0_MP | bits.CR0_ET | bits.CR0_NE
_CR0_PAGED = _CR0_PROTECTED | bits.CR0_WP | bits.CR0_PG
_CR4_SSE = bits.CR4_OSFXSR | bits.CR4_OSXMMEXCPT


def mode_registers(mode: str) -> tuple[int, int, int]:
    """The ``(cr0, cr4, efer)`` :func:`setup_mode` loads for *mode*.

    (CR3 depends on where the page tables go.)
    """
    check_mode(mode)
    if mode == "real":
        return bits.CR0_RESET, 0, 0
    if mode == "protected":
        return _CR0_PROTECTED, _CR4_SSE, 0
    if mode == "paged32":
        return _CR0_PAGED, _CR4_SSE | bits.CR4_PSE, 0
    return _CR0_PAGED, _CR4_SSE | bits.CR4_PAE, bits.EFER_LME | bits.EFER_LMA


class ModeSetup(Value):
    """What :func:`setup_mode` did; ``print()`` it for a summary.

    Attributes:
        mode: the contract's mode name.
        entry: linear address of the first instruction.
        stack: initial stack pointer (linear).
        args: the values put in RDI and RSI.
        cr0, cr3, cr4, efer, rflags: the values loaded.
        rip, rsp: the register values (in real mode, offsets from CS/SS).
        gdt: the GDT written at ``gdt_base`` (``None`` in real mode).
        gdt_base, gdt_limit, idt_base, idt_limit: GDTR and IDTR.
        tss_base: where the TSS was written (``None`` in real mode).
        page_tables: ``(start, end)`` of the page-table pages written, or
            ``None`` without paging.
        segments: the value given to each segment register (cs, ds, es,
            fs, gs, ss, tr, ldt).
    """

    __slots__ = ("mode", "entry", "stack", "args", "cr0", "cr3", "cr4", "efer", "rflags", "rip", "rsp", "gdt",
                 "gdt_base", "gdt_limit", "idt_base", "idt_limit", "tss_base", "page_tables", "segments")

    def __init__(self, mode: str, entry: int, stack: int, args: tuple[int, int], cr0: int, cr3: int, cr4: int,
                 efer: int, rflags: int, rip: int, rsp: int, gdt: Gdt | None, gdt_base: int, gdt_limit: int,
                 idt_base: int, idt_limit: int, tss_base: int | None, page_tables: tuple[int, int] | None,
                 segments: Mapping[str, Segment] | None = None) -> None:
        self.mode = mode
        self.entry = entry
        self.stack = stack
        self.args = args
        self.cr0 = cr0
        self.cr3 = cr3
        self.cr4 = cr4
        self.efer = efer
        self.rflags = rflags
        self.rip = rip
        self.rsp = rsp
        self.gdt = gdt
        self.gdt_base = gdt_base
        self.gdt_limit = gdt_limit
        self.idt_base = idt_base
        self.idt_limit = idt_limit
        self.tss_base = tss_base
        self.page_tables = page_tables
        self.segments = {} if segments is None else segments

    def __str__(self) -> str:
        long_mode = bool(self.efer & bits.EFER_LMA)
        regs = [
            ["cr0", f"{self.cr0:#x}", " ".join(decode_cr0(self.cr0))],
            ["cr3", f"{self.cr3:#x}", ""],
            ["cr4", f"{self.cr4:#x}", " ".join(decode_cr4(self.cr4))],
            ["efer", f"{self.efer:#x}", " ".join(decode_efer(self.efer))],
            ["rflags", f"{self.rflags:#x}", " ".join(decode_rflags(self.rflags))],
            ["rip", f"{self.rip:#x}", f"entry {self.entry:#x}"],
            ["rsp", f"{self.rsp:#x}", f"stack {self.stack:#x}"],
            ["rdi, rsi", f"{self.args[0]:#x}, {self.args[1]:#x}", "arguments"],
            ["gdtr", f"{self.gdt_base:#x}", f"limit {self.gdt_limit:#x}"],
            ["idtr", f"{self.idt_base:#x}", f"limit {self.idt_limit:#x}"],
        ]
        if self.tss_base is not None:
            regs.append(["tss", f"{self.tss_base:#x}", ""])
        if self.page_tables is not None:
            start, end = self.page_tables
            regs.append(["tables", f"{start:#x}-{end:#x}", f"{(end - start) // 4096} pages"])
        segs = [
            [name, f"{seg.selector:#06x}", f"{seg.base:#x}", f"{seg.limit:#x}", seg.describe(long_mode), seg.flags()]
            for name, seg in self.segments.items()
        ]
        parts = [
            f"mode {self.mode}",
            format_table(["register", "value", "meaning"], regs),
            "",
            format_table(["seg", "selector", "base", "limit", "type", "flags"], segs),
        ]
        if self.gdt is not None:
            parts += ["", str(self.gdt)]
        return "\n".join(parts)


# The bits that make the mode; if KVM drops one, the guest runs in another mode.
_KEY_BITS = (
    ("CR0", bits.CR0_PE | bits.CR0_PG, decode_cr0),
    ("CR4", bits.CR4_PSE | bits.CR4_PAE, decode_cr4),
    ("EFER", bits.EFER_LME | bits.EFER_LMA, decode_efer),
)


def _check_registers_kept(mode: str, sregs: object, cr0: int, cr4: int, efer: int) -> None:
    """Raise :class:`ModeNotSupported` if KVM changed a key bit of the mode."""
    lost = []
    for (name, mask, decode), wanted in zip(_KEY_BITS, (cr0, cr4, efer), strict=True):
        got = getattr(sregs, name.lower())
        if (got ^ wanted) & mask:
            changed = decode((got ^ wanted) & mask)
            lost.append(f"{name} {wanted:#x} -> {got:#x} ({' '.join(changed)} changed)")
    if lost:
        hint = ""
        if mode == "paged32":
            hint = " This host runs paging only in long mode (kvm_pvm nested KVM does so)."
        raise ModeNotSupported(f"KVM did not keep the {mode} mode's registers: {'; '.join(lost)}.{hint}")


@functools.lru_cache(maxsize=16)
def identity_tables(mode: str, start: int, end: int) -> tuple[int, tuple[int, int], tuple[tuple[int, bytes], ...]]:
    """The page tables of a paged mode's 4 GiB identity map in ``[start, end)``: (CR3, region used, pages).

    Written out in closed form, the entries as the SDM lays them out (vol. 3A
    4.3 and 4.5): ``paged32`` is one page directory of 1024 4 MiB pages
    (PDE.PS with CR4.PSE); ``long`` and ``long_user`` are a PML4 whose
    first entry points at a PDPT whose four entries point at four page
    directories of 512 2 MiB pages each (U/S set at every level in
    ``long_user``).  The pages follow each other from ``start`` in that
    order; ``pykvm.x86.paging``'s general builder makes the same bytes (the
    tests compare them), but costs milliseconds and a module import here.
    """
    leaf = bits.PTE_P | bits.PTE_RW | bits.PTE_PS
    if mode == "paged32":
        tables = [array("I", ((i << 22) | leaf for i in range(1024)))]
    elif mode in ("long", "long_user"):
        upper = bits.PTE_P | bits.PTE_RW | bits.PTE_US  # upper levels allow all; the leaf decides
        leaf |= bits.PTE_US if mode == "long_user" else 0
        pml4 = array("Q", bytes(4096))
        pdpt = array("Q", bytes(4096))
        pml4[0] = (start + 0x1000) | upper
        for gib in range(4):
            pdpt[gib] = (start + 0x2000 + gib * 0x1000) | upper
        directories = [array("Q", (((gib << 30) | (i << 21)) | leaf for i in range(512))) for gib in range(4)]
        tables = [pml4, pdpt, *directories]
    else:
        raise ValueError(f"mode {mode!r} has no page tables")
    used_end = start + 0x1000 * len(tables)
    if used_end > end:
        raise PageTableError(f"the identity map needs {len(tables)} table pages; [{start:#x}, {end:#x}) "
                             f"holds {(end - start) // 0x1000}")
    pages = tuple((start + 0x1000 * n, table.tobytes()) for n, table in enumerate(tables))
    return start, (start, used_end), pages


def _real_mode_address(linear: int, what: str) -> tuple[int, int]:
    """Split a linear address below 1 MiB into (segment selector, offset)."""
    if not 0 <= linear < 1 << 20:
        raise ValueError(f"real-mode {what} {linear:#x} is not below 1 MiB")
    if linear <= 0xFFFF:
        return 0, linear
    segment = (linear >> 4) & 0xF000
    return segment, linear - (segment << 4)


def setup_mode(
    mode: str,
    vcpu: _Vcpu,
    memory: _Memory,
    entry: int,
    stack: int | None = None,
    args: tuple[int, int] = (0, 0),
    *,
    tables: TablePlacement,
) -> ModeSetup:
    """Put *vcpu* in *mode*, ready to run at *entry*.

    *mode* is one of :data:`MODES`.  The GDT, TSS and page tables are
    written into *memory* where *tables* says (``pykvm.platform.cpu_tables``
    has the guests' contract and relocated windows).  RIP = *entry*, RSP =
    *stack* (``None``: the placement's stack for the mode), RDI/RSI = *args*,
    RFLAGS = 0x2 (0x3002 in ``long_user``: IOPL 3, so port I/O works at
    CPL 3).  Other general registers keep their values.

    For ``long`` and ``long_user``, ``KVM_SET_CPUID2`` with the LM bit must
    have been done before, or KVM refuses EFER.LME (see module docstring).

    After ``KVM_SET_SREGS`` the registers are read back: if KVM silently
    dropped CR0.PE/PG, CR4.PSE/PAE or EFER.LME/LMA, :class:`ModeNotSupported`
    is raised rather than letting the guest triple-fault (kvm_pvm hosts
    do this to ``paged32``).

    In ``long_user`` the TSS also holds an I/O permission bitmap for ports
    0-0x3fff (:data:`~pykvm.x86.segments.USER_IO_PORTS`), because some
    nested hosts ignore IOPL for CPL-3 port I/O.
    """
    check_mode(mode)
    if stack is None:
        stack = tables.real_stack if mode == "real" else tables.stack_top
    flat: FlatGdt = flat_gdt(mode, tss_base=tables.tss)
    cr0, cr4, efer = mode_registers(mode)
    cr3 = 0
    page_tables: tuple[int, int] | None = None
    gdt: Gdt | None = None
    tss_base: int | None = None
    segments = {
        "cs": flat.cs, "ds": flat.ds, "es": flat.ds, "fs": flat.ds,
        "gs": flat.ds, "ss": flat.ss, "tr": flat.tr, "ldt": flat.ldt,
    }

    if mode == "real":
        cs_sel, rip = _real_mode_address(entry, "entry")
        ss_sel, rsp = _real_mode_address(stack, "stack")
        segments["cs"] = real_mode_segment(cs_sel, code=True)
        segments["ss"] = real_mode_segment(ss_sel)
        gdt_base, gdt_limit = 0, 0xFFFF  # the reset values
        idt_base, idt_limit = 0, 0xFFFF  # (the real-mode IVT sits at 0)
        rflags = bits.RFLAGS_FIXED
    else:
        gdt = flat.gdt
        gdt_base, gdt_limit = tables.gdt, gdt.limit
        idt_base, idt_limit = tables.idt, 0
        memory.write(gdt_base, bytes(gdt))
        tss_base = tables.tss
        if mode in ("long", "long_user"):
            io_ports = USER_IO_PORTS if mode == "long_user" else 0
            memory.write(tss_base, tss64(rsp0=tables.kernel_stack_top, io_ports=io_ports))
        else:
            memory.write(tss_base, tss32(esp0=tables.kernel_stack_top, ss0=flat.ds.selector))
        if mode in ("paged32", "long", "long_user"):
            cr3, page_tables, pages = identity_tables(mode, tables.page_tables, tables.page_tables_end)
            for gpa, data in pages:
                memory.write(gpa, data)
        rip, rsp = entry, stack
        rflags = bits.RFLAGS_FIXED
        if mode == "long_user":
            rflags |= bits.RFLAGS_IOPL_MASK

    sregs = vcpu.get_sregs()
    for name, segment in segments.items():
        segment.to_kvm(getattr(sregs, name))
    sregs.gdt.base, sregs.gdt.limit = gdt_base, gdt_limit
    sregs.idt.base, sregs.idt.limit = idt_base, idt_limit
    sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer = cr0, cr3, cr4, efer
    vcpu.set_sregs(sregs)
    _check_registers_kept(mode, vcpu.get_sregs(), cr0, cr4, efer)

    regs = vcpu.get_regs()
    regs.rip, regs.rsp, regs.rflags = rip, rsp, rflags
    regs.rdi, regs.rsi = args
    vcpu.set_regs(regs)

    return ModeSetup(
        mode=mode, entry=entry, stack=stack, args=(args[0], args[1]),
        cr0=cr0, cr3=cr3, cr4=cr4, efer=efer, rflags=rflags, rip=rip, rsp=rsp,
        gdt=gdt, gdt_base=gdt_base, gdt_limit=gdt_limit, idt_base=idt_base, idt_limit=idt_limit,
        tss_base=tss_base, page_tables=page_tables, segments=segments,
    )

