"""pykvm.guests.reports parses the Multiboot PC guests' reports; the guests are registered and built right.

No QEMU and no KVM: the samples are what the guests printed under QEMU
-M pc (tests/test_pc_guests_qemu.py runs them), shortened.
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pykvm import guests
from pykvm.errors import GuestNotBuilt, PykvmError
from pykvm.guests.reports import (
    DEBUG_EXIT_CODES,
    GUEST_SCHEMAS,
    TEXT_FIELDS,
    ReportError,
    debug_exit_code,
    parse_report,
    qemu_exit_status,
)

MBINFO = """\
guest: mbinfo
magic: 0x2badb002
kernel: start=0x100000 end=0x1065b0
mbi: addr=0x9500 size=72
flags: 0x24f
mem_lower: 639
mem_upper: 129920
boot_device: 0x8000ffff
cmdline: addr=0x10704e length=29 text=/k/mbinfo.elf foo=bar x\\x5cy
boot_loader_name: addr=0x107081 length=4 text=qemu
mods_count: 2
mods: addr=0x107000 size=32
module: index=0 start=0x108000 end=0x109388 size=5000 adler32=0xed63adab string_addr=0x107020 text=/m/mod0.bin arg=1
module: index=1 start=0x10a000 end=0x10a00d size=13 adler32=0x234904c5 string_addr=0x10703a text=/m/mod1.txt
mmap: addr=0x9000 length=48 entries=2
mmap_entry: base=0x0 length=0x9fc00 type=1
mmap_entry: base=0x100000 length=0x7ee0000 type=1
done: ok
"""

SMP = """\
guest: smp
cpus_expected: 4
cpus_source: fw_cfg
madt_cpus: 4
apic_base_msr: 0xfee00900
bsp_apic_id: 0
tsc_khz: 2600832
trampoline: 0x8000
cpus: 4
apic_ids: 0 1 2 3
sum: 6
done: ok
"""

PCPROBE = """\
guest: pcprobe
tsc_khz: 2600555
fw_cfg: present
fw_cfg_signature: QEMU
fw_cfg_id: 0x3
fw_cfg_dma: 1
fw_cfg_nb_cpus: 2
fw_cfg_ram_size: 0x8000000
fw_cfg_files: 2
fw_cfg_file: select=0x22 size=20 name=etc/acpi/rsdp
fw_cfg_file: select=0x2c size=1024 name=genroms/multiboot dma.bin
fw_cfg_dma_register: QEMU CFG
fw_cfg_dma_read: QEMU
cmos_base_kib: 640
cmos_reg_d: 0x80
pci_host: bdf=00:00.0 vendor=0x8086 device=0x1237 class=0x060000
pci: bdf=00:00.0 vendor=0x8086 device=0x1237 class=0x060000
pci: bdf=00:01.0 vendor=0x8086 device=0x7000 class=0x060100
pci_functions: 2
done: ok
"""

ACPISCAN = """\
guest: acpiscan
rsdp: addr=0xf59d0 revision=0 rsdt=0x7fe1ad8 oem=BOCHS 
rsdt: addr=0x7fe1ad8 length=40 entries=1 checksum=ok
table: via=rsdt sig=FACP addr=0x7fe1984 length=116 revision=1 checksum=ok
table: via=fadt sig=1234 addr=0x7fe0040 length=6468 revision=1 checksum=bad
tables_bad: 1
iso: bus=0 source=0 gsi=2 flags=0x0
pm_timer_hz: 3580287
done: fail 1 tables with a wrong checksum
"""

IPIPING = """\
guest: ipiping
iterations: 1000
cpus: 2
vector: 0x30
round_trips: 1000
tsc_cycles: 48018904
cycles_per_round_trip: 48018
done: ok
"""


def test_mbinfo_sample():
    r = parse_report(MBINFO, strict=True)
    assert r["guest"] == "mbinfo" and r["done"] == "ok"
    assert r["magic"] == 0x2BADB002 and r["flags"] == 0x24F and r["mem_lower"] == 639
    assert r["kernel"] == {"start": 0x100000, "end": 0x1065B0}
    assert r["cmdline"] == {"addr": 0x10704E, "length": 29, "text": "/k/mbinfo.elf foo=bar x\\y"}
    assert r["module"][0] == {"index": 0, "start": 0x108000, "end": 0x109388, "size": 5000,
                              "adler32": 0xED63ADAB, "string_addr": 0x107020, "text": "/m/mod0.bin arg=1"}
    assert [m["text"] for m in r["module"]] == ["/m/mod0.bin arg=1", "/m/mod1.txt"]
    assert r["mmap_entry"] == [{"base": 0, "length": 0x9FC00, "type": 1},
                               {"base": 0x100000, "length": 0x7EE0000, "type": 1}]


def test_smp_sample():
    r = parse_report(SMP, strict=True)
    assert r["apic_ids"] == [0, 1, 2, 3] and r["sum"] == 6 and r["cpus_source"] == "fw_cfg"
    assert r["apic_base_msr"] == 0xFEE00900 and r["trampoline"] == 0x8000


def test_pcprobe_sample():
    r = parse_report(PCPROBE, strict=True)
    assert r["fw_cfg_dma_register"] == "QEMU CFG" and r["fw_cfg_ram_size"] == 128 << 20
    assert r["fw_cfg_file"][1] == {"select": 0x2C, "size": 1024, "name": "genroms/multiboot dma.bin"}
    assert r["pci_host"]["bdf"] == "00:00.0"  # a string field, never a number
    assert [p["device"] for p in r["pci"]] == [0x1237, 0x7000]


def test_acpiscan_sample_keeps_signatures_and_trailing_text():
    r = parse_report(ACPISCAN, strict=True)
    assert r["rsdp"]["oem"] == "BOCHS "  # text fields keep their spaces
    assert [t["sig"] for t in r["table"]] == ["FACP", "1234"]  # sig stays a string even when it is digits
    assert r["table"][1]["checksum"] == "bad"
    assert r["done"] == "fail 1 tables with a wrong checksum"
    assert r["madt_lapic"] == [] and r["ioapic"] == []  # repeated keys are lists even when absent


def test_ipiping_sample():
    r = parse_report(IPIPING, strict=True)
    assert r["vector"] == 0x30 and r["cycles_per_round_trip"] == 48018


def test_firmware_noise_and_earlier_boots_are_skipped():
    text = "SeaBIOS (version 1.16)\r\nguest: smp\r\ncpus: 9\r\n\x1b[2J\n" + SMP + "trailing garbage\n"
    r = parse_report(text)
    assert r["cpus"] == 4  # from the last boot
    with pytest.raises(ReportError, match="after the done line"):
        parse_report(text, strict=True)


def test_strict_refuses_junk_and_truncation():
    with pytest.raises(ReportError, match="not 'key: value'"):
        parse_report("guest: smp\ncpus 4\ndone: ok\n", strict=True)
    with pytest.raises(ReportError, match="truncated"):
        parse_report("guest: smp\ncpus: 4\n", strict=True)
    assert parse_report("guest: smp\ncpus: 4\n") == {"guest": "smp", "cpus": 4}


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "no 'guest: NAME' line"),
        ("cpus: 4\n", "no 'guest: NAME' line"),
        ("guest: smp\ncpus: four\n", "cpus: not a number"),
        ("guest: smp\ncpus: 4\ncpus: 5\n", "not a repeated key"),
        ("guest: mbinfo\nkernel: start=1 start=2\n", "field 'start' twice"),
        ("guest: mbinfo\nkernel: start=1 junk\n", "expected name=value"),
        ("guest: smp\napic_ids: 0 x\n", "not a number"),
    ],
)
def test_malformed_values_are_report_errors(text, message):
    with pytest.raises(ReportError, match=message) as caught:
        parse_report(text)
    assert isinstance(caught.value, PykvmError) and isinstance(caught.value, ValueError)


def test_unknown_guests_and_keys_are_kept_as_strings():
    r = parse_report("guest: other\nx: 1\ny: a\ny: b\nempty:\ndone: ok\n", strict=True)
    assert r == {"guest": "other", "x": "1", "y": ["a", "b"], "empty": "", "done": "ok"}


def test_debug_exit_codes():
    assert [qemu_exit_status(c) for c in sorted(DEBUG_EXIT_CODES)] == [1, 3, 5, 7, 9, 11]
    assert [debug_exit_code(qemu_exit_status(c)) for c in DEBUG_EXIT_CODES] == list(DEBUG_EXIT_CODES)
    assert debug_exit_code(0) is None and debug_exit_code(2) is None  # QEMU's own exits are even


# --- the guests' escaping, mirrored: a report built from values parses back to them -------------------

def escape(text: str) -> str:
    """As rt32.c's put_escaped(): printable ASCII except backslash kept, the rest \\xNN."""
    return "".join(c if " " <= c <= "~" and c != "\\" else f"\\x{ord(c):02x}" for c in text)


field_names = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True).filter(lambda n: n not in TEXT_FIELDS)
numbers = st.integers(min_value=0, max_value=(1 << 64) - 1)
latin1 = st.text(st.characters(min_codepoint=1, max_codepoint=255), max_size=40)


@given(fields=st.dictionaries(field_names, numbers, max_size=6), text=latin1, hexadecimal=st.booleans())
@settings(max_examples=200, deadline=None)
def test_fields_round_trip(fields, text, hexadecimal):
    words = [f"{name}={value:#x}" if hexadecimal else f"{name}={value}" for name, value in fields.items()]
    words.append(f"text={escape(text)}")
    report = parse_report(f"guest: mbinfo\nmodule: {' '.join(words)}\ndone: ok\n", strict=True)
    assert report["module"] == [{**fields, "text": text}]


@given(st.text(max_size=400))
@settings(max_examples=300, deadline=None)
def test_any_text_parses_or_is_a_report_error(text):
    try:
        report = parse_report(text)
    except ReportError:
        return
    assert isinstance(report, dict) and "guest" in report


@given(st.lists(st.sampled_from(MBINFO.splitlines() + PCPROBE.splitlines() + ["", "junk", "x: 1"]), max_size=30))
@settings(max_examples=200, deadline=None)
def test_shuffled_report_lines_parse_or_are_report_errors(lines):
    try:
        parse_report("\n".join(lines))
    except ReportError:
        pass


# --- the registry and the built kernels --------------------------------------------------------

MULTIBOOT_GUESTS = sorted(name for name in guests.names() if guests.info(name).format == "multiboot")


def test_every_multiboot_guest_has_a_schema():
    assert MULTIBOOT_GUESTS == sorted(GUEST_SCHEMAS) == ["acpiscan", "ata", "blk", "ipiping", "mbinfo", "pcprobe",
                                                         "rtcirq", "s3wake", "smp"]
    for name in MULTIBOOT_GUESTS:
        info = guests.info(name)
        assert info.stop == "debug-exit" and info.file_name == f"{name}.elf" and info.cpl == 0
        assert set(info.needs) <= {"pc", "smp"}
    assert guests.info("ipiping").cmdline == "iterations=1000" and guests.info("ipiping").needs == ("pc", "smp")
    assert guests.info("hello64").format == "flat" and guests.info("hello64").file_name == "hello64.bin"


def multiboot_header(image: bytes) -> tuple[int, int]:
    """(file offset, flags) of the first valid Multiboot v1 header in the first 8 KiB."""
    for offset in range(0, min(len(image), 8192) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", image, offset)
        if magic == 0x1BADB002 and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return offset, flags
    raise AssertionError("no Multiboot header in the first 8 KiB")


@pytest.mark.parametrize("name", MULTIBOOT_GUESTS)
def test_built_kernel_is_a_multiboot_elf32_that_qemu_accepts(name):
    try:
        image = guests.path(name).read_bytes()
    except GuestNotBuilt as exc:
        pytest.skip(str(exc))
    assert image[:4] == b"\x7fELF" and image[4] == 1 and image[5] == 1  # ELF32, little-endian
    e_type, e_machine, _, e_entry, e_phoff = struct.unpack_from("<HHIII", image, 16)
    assert e_type == 2 and e_machine == 3  # an executable for the 80386: QEMU refuses x86-64 kernels
    _, flags = multiboot_header(image)
    assert flags == 0x3  # page-aligned modules and memory information; no a.out kludge: the ELF says where
    phentsize, phnum = struct.unpack_from("<HH", image, 42)
    loads = []
    for i in range(phnum):
        p_type, p_offset, _, p_paddr, p_filesz, p_memsz = struct.unpack_from("<6I", image, e_phoff + i * phentsize)
        if p_type == 1:
            loads.append((p_paddr, p_memsz))
            assert p_offset + p_filesz <= len(image)
    assert loads and min(paddr for paddr, _ in loads) == 0x100000  # nothing below 1 MiB, page 0 least of all
    assert any(paddr <= e_entry < paddr + size for paddr, size in loads)
