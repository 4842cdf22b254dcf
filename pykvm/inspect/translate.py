"""The whole address chain of one guest address: GVA -> GPA -> HVA -> HPA.

Four address spaces meet in a KVM guest (Documentation/virt/kvm/mmu.rst):

- **GVA**, guest virtual (here: linear, after segmentation): what the
  guest's instructions use.  The guest's own page tables (CR3) map it to
- **GPA**, guest physical: what the guest thinks is RAM.  A KVM memory slot
  (KVM_SET_USER_MEMORY_REGION) says which
- **HVA**, host virtual address in this process backs it: pykvm's mmap of
  that slot, at the same offset.  The host kernel's page tables map it to
- **HPA**, host physical: the page frame, which ``/proc/self/pagemap``
  tells (only to CAP_SYS_ADMIN; others see PFN 0) once the page is
  faulted in.

:func:`translate_address` walks all of it with pykvm's own page walker
(:mod:`pykvm.x86.paging`) and returns an :class:`AddressChain` whose
``str()`` shows every step, including each page-table level.  It also asks
KVM_TRANSLATE and says whether KVM agrees (nested kvm_pvm hosts answer
``valid=0`` for everything: pykvm's walker is the source of truth there).
:func:`mappings` lists the guest's mappings (the monitor's ``info mem``).
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from pykvm.x86 import bits
from pykvm.x86.paging import Translation, paging_mode_of, translate

if TYPE_CHECKING:
    from pykvm.memory import GuestMemory

__all__ = ["AddressChain", "HostPage", "Mapping", "host_page", "mappings", "format_mappings", "translate_address"]

PAGE_SIZE = 4096
PAGEMAP = "/proc/self/pagemap"
KPAGEFLAGS = "/proc/kpageflags"

_PM_PRESENT = 1 << 63
_PM_SWAPPED = 1 << 62
_PM_FILE = 1 << 61
_PM_EXCLUSIVE = 1 << 56
_PM_PFN_MASK = (1 << 55) - 1

# Documentation/admin-guide/mm/pagemap.rst, /proc/kpageflags bits worth showing.
_KPF_NAMES = {10: "buddy", 12: "anon", 15: "compound-head", 16: "compound-tail", 17: "hugetlb",
              21: "ksm", 22: "thp", 24: "zero-page"}


@dataclass(frozen=True)
class HostPage:
    """What ``/proc/self/pagemap`` says about the host page behind an HVA.

    ``hpa`` is None when it cannot be told; ``note`` then says why.
    ``flags`` come from ``/proc/kpageflags`` where readable (``anon``,
    ``thp``, ``zero-page``...).
    """

    hva: int
    hpa: int | None
    present: bool
    note: str
    flags: tuple[str, ...] = ()
    faulted_in: bool = False


def host_page(hva: int, *, touch: Callable[[], Any] | None = None, pagemap: str = PAGEMAP,
              kpageflags: str = KPAGEFLAGS) -> HostPage:
    """Read the pagemap entry of ``hva``; if the page is not present and ``touch`` is
    given, call it (it should read the byte, faulting the page in) and read again."""
    page_offset = hva & (PAGE_SIZE - 1)
    try:
        fd = os.open(pagemap, os.O_RDONLY)
    except OSError as exc:
        return HostPage(hva, None, False, f"cannot open {pagemap}: {exc.strerror}")
    try:
        def entry() -> int:
            raw = os.pread(fd, 8, (hva // PAGE_SIZE) * 8)
            return struct.unpack("<Q", raw)[0] if len(raw) == 8 else 0

        value = entry()
        faulted = False
        if not value & _PM_PRESENT and touch is not None:
            touch()
            faulted = True
            value = entry()
    except OSError as exc:
        return HostPage(hva, None, False, f"cannot read {pagemap}: {exc.strerror}")
    finally:
        os.close(fd)
    if not value & _PM_PRESENT:
        why = "swapped out" if value & _PM_SWAPPED else "not faulted in yet (never touched)"
        return HostPage(hva, None, False, f"the host page is {why}", faulted_in=faulted)
    pfn = value & _PM_PFN_MASK
    if pfn == 0:
        return HostPage(hva, None, True,
                        "present, but /proc/self/pagemap hides PFNs from processes without CAP_SYS_ADMIN",
                        faulted_in=faulted)
    flags = _kpageflags(pfn, kpageflags)
    note = f"PFN {pfn:#x} from {pagemap}"
    if faulted:
        note += " (faulted in by reading it first)"
    return HostPage(hva, pfn * PAGE_SIZE + page_offset, True, note, flags, faulted)


def _kpageflags(pfn: int, path: str) -> tuple[str, ...]:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return ()
    try:
        raw = os.pread(fd, 8, pfn * 8)
    except OSError:
        return ()
    finally:
        os.close(fd)
    if len(raw) != 8:
        return ()
    value = struct.unpack("<Q", raw)[0]
    return tuple(name for bit, name in sorted(_KPF_NAMES.items()) if value >> bit & 1)


@dataclass(frozen=True)
class AddressChain:
    """GVA -> GPA (each page-table level) -> HVA (which slot) -> HPA.

    ``walk`` is pykvm's page walk (``walk.levels`` holds each level);
    ``gpa`` is None when the walk faulted.  ``slot``/``slot_gpa``/
    ``slot_size``/``slot_hva`` describe the memory slot holding the GPA
    (None when no slot does: an access there is MMIO).  ``host`` is what
    pagemap said.  ``kvm_valid``/``kvm_gpa`` are KVM_TRANSLATE's answer
    (None when not asked or it failed; ``kvm_note`` says more).
    """

    gva: int
    mode: str
    walk: Translation
    gpa: int | None
    slot: int | None = None
    slot_gpa: int | None = None
    slot_size: int | None = None
    slot_hva: int | None = None
    hva: int | None = None
    host: HostPage | None = None
    kvm_valid: bool | None = None
    kvm_gpa: int | None = None
    kvm_note: str = ""
    nested: str | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def hpa(self) -> int | None:
        return self.host.hpa if self.host is not None else None

    @property
    def levels(self):
        return self.walk.levels

    def __str__(self) -> str:
        lines = [f"GVA {self.gva:#x} ({self.mode})"]
        lines += ["  " + line for line in str(self.walk).splitlines()]
        if self.gpa is None:
            lines.append("GPA: none (the guest's page tables do not map it; an access would #PF)")
        elif self.slot is None:
            lines.append(f"GPA {self.gpa:#x}: no memory slot holds it (an access exits to user space as MMIO)")
        else:
            offset = self.gpa - self.slot_gpa
            last = self.slot_gpa + self.slot_size - 1
            lines.append(f"GPA {self.gpa:#x} -> slot {self.slot} (GPA {self.slot_gpa:#x}-{last:#x}, "
                         f"{_size(self.slot_size)}) at offset {offset:#x}")
            lines.append(f"HVA {self.hva:#x} (slot {self.slot}'s mmap at {self.slot_hva:#x} + {offset:#x})")
            host = self.host
            if host is None:
                pass
            elif host.hpa is None:
                lines.append(f"HPA: unknown: {host.note}")
            else:
                flags = f" [{' '.join(host.flags)}]" if host.flags else ""
                lines.append(f"HPA {host.hpa:#x} ({host.note}){flags}")
                if self.nested:
                    lines.append(f"  (this host is itself a VM, nested KVM {self.nested}: its 'physical' "
                                 "addresses are guest-physical to the outer hypervisor)")
        if self.kvm_valid is None:
            if self.kvm_note:
                lines.append(f"KVM_TRANSLATE: {self.kvm_note}")
        elif not self.kvm_valid:
            lines.append("KVM_TRANSLATE: valid=0" + (f" ({self.kvm_note})" if self.kvm_note else ""))
        else:
            agree = "agrees" if self.kvm_gpa == self.gpa else f"DISAGREES (pykvm's walker says {self.gpa!s})"
            lines.append(f"KVM_TRANSLATE: {self.kvm_gpa:#x} ({agree})")
        lines += list(self.notes)
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= unit and n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n} bytes"


def translate_address(vcpu, memory: "GuestMemory", gva: int, *, sregs=None, kvm_translate: bool = True,
                      fault_in: bool = True, pagemap: str = PAGEMAP) -> AddressChain:
    """Follow ``gva`` (a linear address) through the vCPU's page tables, the
    memory slots, this process's mappings and the host's page frames.

    ``fault_in``: when the host page is not present yet, read one byte of
    it through the HVA so that pagemap has a frame to report (a never
    written anonymous page then maps the shared zero page).
    """
    from pykvm.x86.state import cpu_mode_name

    sregs = sregs if sregs is not None else vcpu.get_sregs()
    mode = cpu_mode_name(sregs.cr0, sregs.cr4, sregs.efer, bool(sregs.cs.l), bool(sregs.cs.db))
    walk = translate(memory.read, sregs, gva)
    gpa = walk.gpa
    fields: dict[str, Any] = {}
    if gpa is not None:
        region = next((r for r in memory.regions if r.contains(gpa)), None)
        if region is not None:
            hva = region.hva + (gpa - region.gpa)
            touch = (lambda: memory.read(gpa, 1)) if fault_in else None
            fields.update(slot=region.slot, slot_gpa=region.gpa, slot_size=region.size, slot_hva=region.hva,
                          hva=hva, host=host_page(hva, touch=touch, pagemap=pagemap))
    if kvm_translate and vcpu is not None:
        try:
            tr = vcpu.translate(gva)
            fields["kvm_valid"] = bool(tr.valid)
            if tr.valid:
                fields["kvm_gpa"] = tr.physical_address
            else:
                fields["kvm_note"] = ("KVM gives no translation; on this nested host it answers valid=0 even for "
                                      "mapped addresses, so the chain above comes from pykvm's own walker"
                                      if gpa is not None else "KVM agrees it is unmapped")
        except OSError as exc:
            fields["kvm_note"] = f"failed: {exc}"
    try:
        from pykvm.host import nested_kvm_module

        fields["nested"] = nested_kvm_module()
    except Exception:
        pass
    return AddressChain(gva, mode, walk, gpa, **fields)


# ---------------------------------------------------------------------------
# The guest's mappings (info mem)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Mapping:
    """A run of linear addresses mapped to contiguous guest-physical ones with the same rights."""

    start: int
    end: int        # exclusive
    gpa: int
    writable: bool
    user: bool
    executable: bool

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def rights(self) -> str:
        return "r" + ("w" if self.writable else "-") + ("x" if self.executable else "-")


_SHAPES = {
    # name: (entry size, index bits per level, lowest linear bit per level, levels that may map a page)
    "32bit": (4, (10, 10), (22, 12), (0,)),
    "pae": (8, (2, 9, 9), (30, 21, 12), (1,)),
    "4level": (8, (9, 9, 9, 9), (39, 30, 21, 12), (1, 2)),
}


def mappings(read: Callable[[int, int], bytes], sregs, *, limit: int = 1 << 16) -> list[Mapping]:
    """Every present mapping of the guest's page tables, merged into runs (like QEMU's ``info mem``).

    ``read(gpa, size)`` reads guest memory.  Returns ``[]`` with paging off.
    Stops after ``limit`` leaf entries (page tables of big guests are long).
    """
    mode = paging_mode_of(sregs.cr0, sregs.cr4, sregs.efer)
    if mode not in _SHAPES:
        return []
    entry_size, index_bits, shifts, large = _SHAPES[mode]
    nxe = bool(sregs.efer & bits.EFER_NXE)
    pse = bool(sregs.cr4 & bits.CR4_PSE)
    last = len(shifts) - 1
    if mode == "4level":
        root = sregs.cr3 & bits.PTE_ADDR_MASK
    elif mode == "pae":
        root = sregs.cr3 & bits.CR3_PAE_ADDR_MASK
    else:
        root = sregs.cr3 & bits.PTE32_ADDR_MASK
    leaves: list[tuple[int, int, int, bool, bool, bool]] = []

    def visit(table: int, level: int, base: int, writable: bool, user: bool, no_exec: bool) -> None:
        count = 1 << index_bits[level]
        try:
            raw = read(table, count * entry_size)
        except Exception:
            return
        entries = struct.unpack_from("<" + ("I" if entry_size == 4 else "Q") * count, raw)
        for index, entry in enumerate(entries):
            if len(leaves) >= limit:
                return
            if not entry & bits.PTE_P:
                continue
            va = base | (index << shifts[level])
            if mode == "4level" and level == 0 and va >> 47:
                va |= ((1 << 64) - 1) ^ ((1 << 48) - 1)  # sign-extend: the upper half
            if mode == "pae" and level == 0:
                w, u = writable, user  # PDPTEs carry no rights
            else:
                w, u = writable and bool(entry & bits.PTE_RW), user and bool(entry & bits.PTE_US)
            nx = no_exec or (entry_size == 8 and nxe and bool(entry >> 63))
            ps = bool(entry & bits.PTE_PS) and level in large and (pse or mode != "32bit")
            if level == last or ps:
                size = 1 << shifts[level]
                if mode == "32bit" and ps:
                    pa = (entry & bits.PTE32_ADDR_MASK_4M) | (
                        ((entry & bits.PTE32_PSE36_MASK) >> bits.PTE32_PSE36_SHIFT) << 32)
                elif mode == "32bit":
                    pa = entry & bits.PTE32_ADDR_MASK
                else:
                    pa = entry & bits.PTE_ADDR_MASK & ~(size - 1)
                leaves.append((va, size, pa, w, u, not nx))
            else:
                mask = bits.PTE32_ADDR_MASK if entry_size == 4 else bits.PTE_ADDR_MASK
                visit(entry & mask, level + 1, va, w, u, nx)

    visit(root, 0, 0, True, True, False)
    merged: list[Mapping] = []
    for va, size, pa, w, u, x in leaves:
        prev = merged[-1] if merged else None
        if (prev is not None and prev.end == va and prev.gpa + prev.size == pa
                and (prev.writable, prev.user, prev.executable) == (w, u, x)):
            merged[-1] = Mapping(prev.start, va + size, prev.gpa, w, u, x)
        else:
            merged.append(Mapping(va, va + size, pa, w, u, x))
    return merged


def format_mappings(maps: list[Mapping]) -> str:
    """``0000000000000000-0000000100000000 0000000000000000 4 GiB rwx supervisor`` lines."""
    return "\n".join(
        f"{m.start:016x}-{(m.end & ((1 << 64) - 1)):016x} {m.gpa:016x} {_size(m.size):>8} {m.rights} "
        f"{'user' if m.user else 'supervisor'}"
        for m in maps
    )
