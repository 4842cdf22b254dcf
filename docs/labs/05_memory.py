"""Lab 5: memory -- GVA -> GPA -> HVA -> HPA, read-only slots, dirty logging.

Run:  python docs/labs/05_memory.py

A 64-bit guest of a few hand-assembled instructions runs on page tables
built here: the first 4 GiB identity-mapped, plus one 4 KiB page at a high
virtual address (an alias) pointing into RAM.  Besides RAM the VM has two
more memory slots: a read-only one (a "ROM") and one with dirty-page logging.
"""

from __future__ import annotations

import ctypes
import os
import struct

from pykvm import Machine
from pykvm.inspect.translate import translate_address
from pykvm.x86.paging import GiB4, KiB4, MiB2, PageTables4Level, walk

ALIAS_GVA = 0x7F00_0000_0000   # a virtual address far from anything identity-mapped
ALIAS_GPA = 0x30_0000          # the RAM page it points to
ROM_GPA = 0x100_0000           # 16 MiB: just past RAM
DIRTY_GPA = 0x200_0000         # 32 MiB
DIRTY_PAGES = 16
TABLES = (0x20000, 0x30000)    # where our page tables go (pykvm's own are at 0x10000)
CODE_GPA = 0x100000
PAGE = 4096


def disp32(addr: int) -> bytes:
    return struct.pack("<I", addr)


# 64-bit code; [disp32] is an absolute address (ModRM 04, SIB 25).
CODE = b"".join([
    b"\x48\xb8" + struct.pack("<Q", ALIAS_GVA),         # mov rax, ALIAS_GVA
    b"\xc7\x00" + b"pykv",                              # mov dword [rax], 'pykv'
    b"\x8b\x04\x25" + disp32(ROM_GPA),                  # mov eax, [ROM]
    b"\x89\x04\x25" + disp32(ROM_GPA + 8),              # mov [ROM + 8], eax
    *(b"\xc6\x04\x25" + disp32(DIRTY_GPA + p * PAGE) + b"\x01" for p in (0, 3, 7)),  # mov byte [page p], 1
    b"\xf4",                                            # hlt           (end of run 1)
    b"\xc6\x04\x25" + disp32(DIRTY_GPA + 3 * PAGE + 4) + b"\x02",  # mov byte [page 3 + 4], 2
    b"\xf4",                                            # hlt           (end of run 2)
])


class RomWrites:
    """On the MMIO bus at the ROM's address: receives the writes KVM could not put in the slot."""

    name = "rom"
    length = PAGE

    def __init__(self) -> None:
        self.writes: list[tuple[int, bytes]] = []

    def read(self, offset: int, size: int) -> bytes:
        return b"\xff" * size  # never called: reads are served from the slot

    def write(self, offset: int, data: bytes) -> None:
        self.writes.append((offset, data))


def pagemap(hva: int) -> tuple[bool, int]:
    """(present, page frame number) of a host virtual address, from /proc/self/pagemap."""
    with open("/proc/self/pagemap", "rb") as f:
        f.seek(hva // PAGE * 8)
        entry = struct.unpack("<Q", f.read(8))[0]
    return bool(entry >> 63), entry & ((1 << 55) - 1)


def one_call(m: Machine, gva: int, gpa: int, hva: int, hpa: int | None) -> None:
    """pykvm.inspect.translate does steps (1)-(3) in one call; compare, and list the guest's mappings."""
    from pykvm.inspect.translate import format_mappings, mappings

    chain = translate_address(m.vcpu, m.memory, gva)
    print("(5) the same in one call, translate_address(m.vcpu, m.memory, gva) (pykvm.inspect.translate):")
    print("\n".join("    " + line for line in str(chain).splitlines()))
    same = chain.gpa == gpa and chain.hva == hva and (hpa is None or chain.hpa == hpa)
    print(f"    agrees with steps (1)-(3): {'yes' if same else 'NO'}")
    print("    the guest's mappings (like QEMU's `info mem`):")
    print("\n".join("      " + line for line in format_mappings(mappings(m.memory.read, m.vcpu.get_sregs())).splitlines()))


def slot_flags(r) -> str:
    return " ".join(f for f, on in (("KVM_MEM_READONLY", r.readonly), ("KVM_MEM_LOG_DIRTY_PAGES", r.log_dirty)) if on) or "-"


def main() -> None:
    print("Lab 5: memory, GVA -> GPA -> HVA -> HPA, read-only slots, dirty logging\n")
    with Machine(memory="16M") as m:
        rom = m.memory.add_region(ROM_GPA, PAGE, readonly=True)
        m.memory.write(ROM_GPA, b"ROM!content")     # the host may write a read-only slot
        dirty = m.memory.add_region(DIRTY_GPA, DIRTY_PAGES * PAGE, log_dirty=True)
        rom_device = RomWrites()
        m.add_device(rom_device, mmio=ROM_GPA, length=PAGE)

        print("memory slots (KVM_SET_USER_MEMORY_REGION):")
        print(f"  {'slot':<5}{'guest-physical':<24}{'size':>7}  {'host virtual':<16}flags")
        for r in m.memory.regions:
            size = f"{r.size >> 20} MiB" if r.size >= 1 << 20 else f"{r.size >> 10} KiB"
            print(f"  {r.slot:<5}{f'{r.gpa:#x}-{r.end - 1:#x}':<24}{size:>7}  {r.hva:<#16x}{slot_flags(r)}")

        m.load_image(CODE, format="flat", mode="long", load_addr=CODE_GPA)
        tables = PageTables4Level(m.memory.write, *TABLES)
        tables.map(0, 0, GiB4, page_size=MiB2)                   # identity, 2 MiB pages
        tables.map(ALIAS_GVA, ALIAS_GPA, KiB4, page_size=KiB4)   # the alias, one 4 KiB page
        sregs = m.vcpu.get_sregs()
        sregs.cr3 = tables.cr3
        m.vcpu.set_sregs(sregs)                                  # KVM_SET_SREGS: the new CR3
        print(f"\npage tables built at {TABLES[0]:#x} ({tables.tables} pages): 4 GiB identity map (2 MiB pages)"
              f" + GVA {ALIAS_GVA:#x} -> GPA {ALIAS_GPA:#x} (4 KiB); CR3 <- {tables.cr3:#x}")

        m.memory.write(DIRTY_GPA + 5 * PAGE, b"host")  # a host write: not logged
        before = sorted(m.memory.dirty_pages(dirty))  # page numbers: GPA // 4096

        result1 = m.run(timeout=10)
        bitmap = m.vm.get_dirty_log(dirty.slot, dirty.size)        # KVM_GET_DIRTY_LOG (and clear)
        again = sorted(m.memory.dirty_pages(dirty))
        result2 = m.run(timeout=10)                                # resumes after the first hlt
        after2 = [p * PAGE for p in sorted(m.memory.dirty_pages(dirty))]

        # -- Part 1: the address chain ------------------------------------------------
        print(f"\nPart 1: one guest-virtual address down to host-physical: GVA {ALIAS_GVA:#x}")
        sregs = m.vcpu.get_sregs()
        tr = walk(m.memory.read, sregs.cr3, ALIAS_GVA, "4level")
        print("(1) GVA -> GPA: the guest's page tables (pykvm.x86.paging.walk); A and D were set by the guest's MMU")
        print("\n".join("    " + line for line in str(tr).splitlines()))
        other = walk(m.memory.read, sregs.cr3, ALIAS_GPA, "4level")
        print(f"    GVA {ALIAS_GPA:#x} (the identity map) reaches the same GPA {other.gpa:#x} through a"
              f" {other.page_size >> 20} MiB page: two virtual addresses, one physical page")
        kt = m.vcpu.translate(ALIAS_GVA)
        if kt.valid:
            print(f"    KVM_TRANSLATE agrees: valid=1, physical_address {kt.physical_address:#x}"
                  f" ({'same' if kt.physical_address == tr.gpa else 'DIFFERENT'})")
        else:
            print("    KVM_TRANSLATE answers valid=0 on this host; pykvm's walker is the source of truth")
        gpa = tr.gpa
        region = m.memory.region_at(gpa)
        hva = m.memory.hva(gpa)
        print(f"(2) GPA -> HVA: slot {region.slot} maps GPA {region.gpa:#x}-{region.end - 1:#x} at host {region.hva:#x};"
              f" {gpa:#x} - {region.gpa:#x} + {region.hva:#x} = {hva:#x}")
        present, pfn = pagemap(hva)
        if present and pfn:
            hpa = pfn * PAGE + hva % PAGE
            print(f"(3) HVA -> HPA: /proc/self/pagemap: present, page frame {pfn:#x} -> HPA {hpa:#x}")
        else:
            hpa = None
            print(f"(3) HVA -> HPA: /proc/self/pagemap: present={present}, frame hidden"
                  " (reading frame numbers needs CAP_SYS_ADMIN)")
        print(f"(4) the same bytes at every level: guest wrote b'pykv' at GVA; memory.read(GPA) ="
              f" {m.memory.read(gpa, 4)!r}; ctypes.string_at(HVA) = {ctypes.string_at(hva, 4)!r}")
        if os.path.isdir("/sys/module/kvm_pvm"):
            print("    (this host is itself a VM: its 'physical' address is translated once more by the"
                  " outer hypervisor)")
        one_call(m, ALIAS_GVA, gpa, hva, hpa)

        # -- Part 2: read-only slot ------------------------------------------------
        print(f"\nPart 2: a read-only slot at GPA {ROM_GPA:#x} (slot {rom.slot}, KVM_MEM_READONLY)")
        print(f"  the guest's read returned EAX = {result1.regs['rax'] & 0xFFFFFFFF:#010x}"
              f" ({(result1.regs['rax'] & 0xFFFFFFFF).to_bytes(4, 'little')!r}), with no exit")
        for offset, data in rom_device.writes:
            print(f"  the guest's write became KVM_EXIT_MMIO: address {ROM_GPA + offset:#x}, data {data!r}"
                  " -> given to the device on the MMIO bus")
        print(f"  the slot still holds {m.memory.read(ROM_GPA, 12)!r}; user exits of run 1: "
              + ", ".join(f"{k} {v['total']}" for k, v in sorted(result1.exits.items())))

        # -- Part 3: dirty logging -------------------------------------------------
        print(f"\nPart 3: dirty-page logging on slot {dirty.slot} (GPA {dirty.gpa:#x}, {DIRTY_PAGES} pages)")
        print(f"  host wrote page 5 before the run; KVM_GET_DIRTY_LOG -> {before} (only guest writes are logged)")
        pages = [i for i in range(DIRTY_PAGES) if bitmap[i // 8] >> (i % 8) & 1]
        print(f"  after run 1: KVM_GET_DIRTY_LOG bitmap {bitmap[:2].hex(' ')} ... -> pages {pages}"
              f" = {[hex(dirty.gpa + p * PAGE) for p in pages]}")
        print(f"  asked again at once: {again} (reading the log cleared it)")
        print(f"  after run 2 (one more write, to page 3): {[hex(a) for a in after2]}")

        ok = (tr.gpa == ALIAS_GPA and m.memory.read(ALIAS_GPA, 4) == b"pykv" and ctypes.string_at(hva, 4) == b"pykv"
              and rom_device.writes == [(8, b"ROM!")] and m.memory.read(ROM_GPA, 12) == b"ROM!content\0"
              and before == [] and pages == [0, 3, 7] and again == [] and after2 == [dirty.gpa + 3 * PAGE]
              and result1.ended == result2.ended == "hlt")
        print(f"\nresult: {'ok' if ok else 'FAILED'}")


if __name__ == "__main__":
    main()
