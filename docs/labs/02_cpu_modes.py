"""Lab 2: CPU modes, from real mode to ring 3.

Run:  python docs/labs/02_cpu_modes.py

One fresh VM per mode.  For each, pykvm builds what a boot loader would
(GDT, TSS, page tables), loads the control and segment registers with
KVM_SET_SREGS, and runs the matching ``hello`` guest, which prints a
greeting and the Adler-32 checksum of its own image.  The mode is then
identified again from the registers KVM reports (KVM_GET_SREGS).
"""

from __future__ import annotations

import re
import zlib

from pykvm import Machine, guests
from pykvm.host import nested_kvm_module
from pykvm.platform import layout
from pykvm.x86.modes import ModeNotSupported, mode_registers
from pykvm.x86.paging import translate, walk
from pykvm.x86.segments import Gdt
from pykvm.x86.state import cpl, cpu_mode_name, decode_cr0, decode_cr4

MODES = [
    ("real", "hello16"),
    ("protected", "hello32"),
    ("paged32", "hello32p"),
    ("long", "hello64"),
    ("long_user", "hello64u"),
]


def banner(text: str) -> None:
    print(f"\n=== {text} " + "=" * max(0, 66 - len(text)))


def identify(sregs) -> tuple[str, int]:
    """The CPU mode and privilege level, read from registers only."""
    mode = cpu_mode_name(sregs.cr0, sregs.cr4, sregs.efer, bool(sregs.cs.l), bool(sregs.cs.db))
    level = 0 if mode == "real" else cpl(sregs.cs.selector, sregs.ss.dpl)
    return mode, level


def indent(text: str, by: str = "  ") -> str:
    return "\n".join(by + line if line else line for line in str(text).splitlines())


def run_mode(mode: str, guest: str) -> dict:
    banner(f"{mode}: guest {guest}")
    with Machine(memory="16M") as m:
        try:
            loaded = m.load_guest(guest)
        except ModeNotSupported as exc:
            return refused(m, mode, exc)
        setup = loaded["setup"]
        print("what pykvm set up (KVM_SET_SREGS / KVM_SET_REGS, tables written to guest memory):")
        print(indent(setup))

        sregs = m.vcpu.get_sregs()
        if setup.gdt is not None:
            # The GDT lives in guest memory; KVM_SET_SREGS loaded the segment
            # registers' hidden parts directly, and the guest's CPU reads the
            # table again only when it loads a selector (or takes an interrupt).
            raw = m.memory.read(sregs.gdt.base, sregs.gdt.limit + 1)
            same = Gdt.from_bytes(raw, long_mode=setup.gdt.long_mode).entries()
            same = list(same) == list(setup.gdt.entries())
            print(f"\nGDT read back from guest memory at GDTR.base {sregs.gdt.base:#x} ({len(raw)} bytes): "
                  f"{'identical to the table above' if same else 'DIFFERENT'}")
        if setup.page_tables:
            print("\npage walks with the guest's CR3 (pykvm.x86.paging, as the MMU does it):")
            for gva, what in ((setup.entry, "the entry point"), (4 << 30, "4 GiB, past the identity map")):
                print(f"  {what}:")
                print(indent(translate(m.memory.read, sregs, gva), "    "))
        else:
            print("\npaging is off: a linear address is the physical address")

        result = m.run(timeout=10)
        sregs = m.vcpu.get_sregs()
        found, level = identify(sregs)
        print(f"\nKVM_GET_SREGS after the run: cr0 {sregs.cr0:#x} cr4 {sregs.cr4:#x} efer {sregs.efer:#x} "
              f"cs.l {sregs.cs.l} cs.db {sregs.cs.db} cs {sregs.cs.selector:#x} ss.dpl {sregs.ss.dpl}")
        print(f"identified: mode {found}, CPL {level}")
        print("guest output:")
        print(indent(result.serial_text.rstrip("\n"), "  | "))
        expected = zlib.adler32(guests.path(guest).read_bytes())
        match = re.search(r"checksum 0x([0-9a-f]{8})", result.serial_text)
        ok = (result.clean and match is not None and int(match.group(1), 16) == expected
              and result.regs["rax"] & 0xFFFFFFFF == expected)
        print(f"checksum {expected:#010x} (zlib.adler32 of {guest}.bin): {'matches' if ok else 'MISMATCH'}; "
              f"run ended with {result.ended}")
        return {"mode": mode, "guest": guest, "identified": found, "cpl": level, "ok": ok}


def refused(m: Machine, mode: str, exc: ModeNotSupported) -> dict:
    """paged32 on a kvm_pvm host: show what was asked, what KVM kept, and the tables."""
    cr0, cr4, _ = mode_registers(mode)
    kept = m.vcpu.get_sregs()
    print(f"pykvm refused: {exc}")
    print(f"  asked  cr0 {cr0:#x} ({' '.join(decode_cr0(cr0))}), cr4 {cr4:#x} ({' '.join(decode_cr4(cr4))})")
    print(f"  kept   cr0 {kept.cr0:#x} ({' '.join(decode_cr0(kept.cr0))}), cr4 {kept.cr4:#x}")
    print("  KVM_SET_SREGS returned 0, but reading the registers back shows CR0.PG gone: the guest")
    print("  would fetch its first instruction with paging off and triple-fault later.")
    print("  The 32-bit page directory pykvm wrote is still in guest memory; walking it works:")
    print(indent(walk(m.memory.read, layout.PAGE_TABLES_START, layout.LOAD_ADDR, "32bit"), "    "))
    return {"mode": mode, "guest": "hello32p", "identified": "refused", "cpl": None, "ok": None}


def main() -> None:
    print("Lab 2: CPU modes, from real mode to ring 3")
    nested = nested_kvm_module()
    if nested:
        print(f"host: /dev/kvm comes from {nested} (nested KVM): paging works only in long mode here,")
        print("      so paged32 will be refused; on a bare-metal KVM host it runs like the others.")
    else:
        print("host: no nested-KVM module detected: every mode should run.")
    rows = [run_mode(mode, guest) for mode, guest in MODES]

    banner("summary")
    print(f"{'mode':<10} {'guest':<9} {'identified from KVM_GET_SREGS':<31} {'CPL':<4} result")
    for r in rows:
        level = "-" if r["cpl"] is None else str(r["cpl"])
        result = "refused (no 32-bit paging on this host)" if r["ok"] is None else ("ok" if r["ok"] else "FAILED")
        print(f"{r['mode']:<10} {r['guest']:<9} {r['identified']:<31} {level:<4} {result}")


if __name__ == "__main__":
    main()
