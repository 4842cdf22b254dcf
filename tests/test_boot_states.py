"""The Linux boot protocols' CPU states (pykvm.x86.boot_states), checked by tiny kernels that look at them.

Each kernel is a synthetic bzImage (tests/loader_images.py) whose code reads
the zero page through RSI/ESI, its own CS and DS and CR0, and halts; the
test asserts what it read.  ``linux-decompressor`` enters the image where
boot.rst says (64-bit: code32_start + 0x200; 32-bit: code32_start); a
gzip payload holding a vmlinux ELF is unpacked by pykvm and entered at its
``e_entry`` (pykvm.loaders.linux_payload).
"""

from __future__ import annotations

import gzip
import struct

import pytest

from loader_images import make_bzimage, make_elf
from pykvm.x86 import bits
from pykvm.x86.boot_states import BOOT_CS, BOOT_DS, boot_gdt, table_mode

# mov 0x202(%rsi),%eax; mov %cs,%cx; mov %ds,%dx; mov %cr0,%r8; movabs $0x1122334455667788,%r9; hlt
CODE64 = bytes.fromhex("8b8602020000 668cc9 668cda 410f20c0 49b98877665544332211 f4")
# mov 0x202(%esi),%eax; mov %cs,%cx; mov %ds,%dx; mov %cr0,%esp; hlt
CODE32 = bytes.fromhex("8b8602020000 668cc9 668cda 0f20c4 f4")
HDRS = int.from_bytes(b"HdrS", "little")


def test_boot_gdt_has_the_protocols_selectors():
    for long in (True, False):
        gdt, tr = boot_gdt(long, tss_base=0x5000)
        cs, ds = gdt.segment(BOOT_CS), gdt.segment(BOOT_DS)
        assert (BOOT_CS, BOOT_DS, tr) == (0x10, 0x18, 0x20)
        assert cs.is_code and cs.l == long and cs.db == (not long) and (cs.base, cs.limit, cs.g) == (0, 0xFFFFFFFF, True)
        assert not ds.is_code and ds.type & bits.SEG_TYPE_WRITABLE and (ds.base, ds.limit) == (0, 0xFFFFFFFF)
        assert gdt.segment(tr).base == 0x5000 and gdt.segment(tr).type == bits.SYS_TYPE_TSS_BUSY
        assert gdt.segment(0x08).is_null     # entry 1 is unused, as in the kernel's own boot GDT
    assert [table_mode(s) for s in ("linux64", "linux32", "pvh32")] == ["long", "protected", "protected"]
    with pytest.raises(ValueError, match="unknown boot state"):
        table_mode("linux16")


def _run(tmp_path, image: bytes, format: str):
    from pykvm.platform.machine import Machine

    path = tmp_path / "bzImage"
    path.write_bytes(image)
    with Machine(memory="64M") as m:
        info = m.load_image(str(path), format=format, cmdline="console=ttyS0")
        result = m.run(timeout=20)
        return info, result, m.vcpu.get_regs(), m.vcpu.get_sregs()


@pytest.mark.kvm
def test_64_bit_boot_protocol_entry(tmp_path):
    image = make_bzimage(xloadflags=0x01, payload=b"\x90" * 0x200 + CODE64)
    info, result, regs, sregs = _run(tmp_path, image, "linux-decompressor")
    assert (info["cpu"], info["entry"]) == ("linux64", 0x1000200)
    assert result.ended == "hlt", result.message
    assert regs.rax & 0xFFFFFFFF == HDRS                 # RSI pointed at the zero page
    assert (regs.rcx & 0xFFFF, regs.rdx & 0xFFFF) == (BOOT_CS, BOOT_DS)
    assert regs.r8 & bits.CR0_PG and regs.r8 & bits.CR0_PE
    assert regs.r9 == 0x1122334455667788                 # a 64-bit immediate: the code ran in 64-bit mode
    assert sregs.efer & bits.EFER_LMA and not regs.rflags & bits.RFLAGS_IF
    assert sregs.ss.selector == sregs.es.selector == BOOT_DS


@pytest.mark.kvm
def test_32_bit_boot_protocol_entry(tmp_path):
    image = make_bzimage(xloadflags=0, payload=CODE32)
    info, result, regs, sregs = _run(tmp_path, image, "linux")  # no payload to unpack: the 32-bit entry
    assert (info["cpu"], info["entry"]) == ("linux32", 0x1000000)
    assert result.ended == "hlt", result.message
    assert regs.rax & 0xFFFFFFFF == HDRS
    assert (regs.rcx & 0xFFFF, regs.rdx & 0xFFFF) == (BOOT_CS, BOOT_DS)
    cr0 = regs.rsp & 0xFFFFFFFF
    assert cr0 & bits.CR0_PE and not cr0 & bits.CR0_PG      # protected mode, paging off
    assert (regs.rbx, regs.rbp, regs.rdi) == (0, 0, 0)      # boot.rst: EBP, EDI and EBX must be zero
    assert not sregs.efer & bits.EFER_LMA and not regs.rflags & bits.RFLAGS_IF


def gzip_vmlinux_bzimage(code: bytes, *, paddr: int = 0x1000000, entry_offset: int = 0x100) -> bytes:
    """A bzImage whose payload (payload_offset/payload_length) is a gzip-compressed vmlinux ELF."""
    text = b"\x90" * entry_offset + code
    vmlinux = make_elf([(paddr, 0xFFFFFFFF81000000, text, 0x200000)], entry=paddr + entry_offset)
    stub = b"\xf4" * 0x400                               # the "decompressor": never runs
    payload = gzip.compress(vmlinux, mtime=0)
    image = bytearray(make_bzimage(xloadflags=0x01, version=0x20F, init_size=0x800000, payload=stub + payload))
    struct.pack_into("<II", image, 0x248, len(stub), len(payload))
    return bytes(image)


@pytest.mark.kvm
def test_unpacked_vmlinux_is_entered_at_its_startup_64(tmp_path):
    info, result, regs, sregs = _run(tmp_path, gzip_vmlinux_bzimage(CODE64), "linux")
    assert (info["cpu"], info["entry"]) == ("linux64", 0x1000100)
    assert "gzip payload unpacked by pykvm" in info["notes"]
    assert result.ended == "hlt", result.message
    assert regs.rax & 0xFFFFFFFF == HDRS and regs.r9 == 0x1122334455667788
    assert (regs.rcx & 0xFFFF, regs.rdx & 0xFFFF) == (BOOT_CS, BOOT_DS)
