"""The Multiboot PC guests on pykvm's ``-M pc`` and on QEMU's: what each reports matches what it was given.

Each guest runs once per platform (module-scoped fixtures, parametrized by
``platform``): ``pykvm`` is ``pykvm run`` with the QEMU command line below,
``qemu`` is ``qemu-system-x86_64`` itself (SeaBIOS, QEMU's multiboot option
ROM, its fw_cfg, CMOS, PIIX3/PIIX4, ACPI tables), the reference pykvm's PC
platform is held to.  The same assertions check both, except where the two
differ on purpose (the boot loader's name; SeaBIOS's ``etc/table-loader``,
which pykvm, placing the ACPI tables itself, does not need).  QEMU's runs are
slow here (SeaBIOS is emulated instruction by instruction on a nested host)
and skipped, reported, where QEMU is not installed.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from pykvm import guests
from pykvm.guests.reports import parse_report, qemu_exit_status

pytestmark = pytest.mark.kvm

QEMU = shutil.which("qemu-system-x86_64")
TIMEOUT = 300  # seconds; a guest stopped by an emulation failure leaves QEMU waiting
MEMORY_MIB = 128
MiB = 1 << 20

PLATFORMS = [
    pytest.param("pykvm"),
    pytest.param("qemu", marks=[pytest.mark.slow, pytest.mark.skipif(
        QEMU is None, reason="qemu-system-x86_64 is not installed (Debian: apt install qemu-system-x86)")]),
]


@dataclass
class GuestRun:
    report: dict
    status: int
    seconds: float
    command: list[str]
    platform: str


def run_guest(platform: str, name: str, *, smp: int = 1, append: str | None = None,
              initrd: list[str] = (), status: int = 0, strict: bool = True) -> GuestRun:
    """Boot guest *name* once with QEMU's -M pc command line and parse its report (strictly: nothing else on COM1)."""
    kernel = str(guests.path(name))
    argv = [
        "-accel", "kvm", "-M", "pc", "-m", str(MEMORY_MIB), "-smp", str(smp),
        "-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-kernel", kernel,
    ]
    if append is not None:
        argv += ["-append", append]
    if initrd:
        argv += ["-initrd", ",".join(initrd)]
    command = [QEMU, *argv] if platform == "qemu" else [sys.executable, "-m", "pykvm", "run", *argv]
    start = time.monotonic()
    proc = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT)
    seconds = time.monotonic() - start
    text = proc.stdout.decode("latin-1")
    assert proc.returncode == qemu_exit_status(status), (
        f"{name} on {platform}: exit status {proc.returncode}\nCOM1:\n{text}\nstderr:\n{proc.stderr.decode()}"
    )
    return GuestRun(parse_report(text, strict=strict), proc.returncode, seconds, command, platform)


def elf_memory_end(path: Path) -> int:
    """The end of the highest PT_LOAD (p_paddr + p_memsz) of an ELF32 file."""
    data = path.read_bytes()
    phoff, = struct.unpack_from("<I", data, 28)
    phentsize, phnum = struct.unpack_from("<HH", data, 42)
    ends = []
    for i in range(phnum):
        p_type, _, _, p_paddr, _, p_memsz = struct.unpack_from("<6I", data, phoff + i * phentsize)
        if p_type == 1:
            ends.append(p_paddr + p_memsz)
    return max(ends)


# --- mbinfo ------------------------------------------------------------------------------

MODULES = {"mod0.bin": bytes(range(256)) * 19 + b"tail", "mod1.txt": b"hello module\n"}
APPEND = "pykvm-test answer=42 path=/srv/boot"


@pytest.fixture(scope="module", params=PLATFORMS)
def mbinfo(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp("modules")
    strings = []
    for i, (file_name, data) in enumerate(MODULES.items()):
        (directory / file_name).write_bytes(data)
        strings.append(f"{directory / file_name} index={i}")
    return run_guest(request.param, "mbinfo", append=APPEND, initrd=strings), strings


def test_mbinfo_reports_the_command_line_and_loader(mbinfo):
    run, _ = mbinfo
    r = run.report
    assert r["guest"] == "mbinfo" and r["done"] == "ok"
    assert r["magic"] == 0x2BADB002
    assert r["flags"] & 0x24D == 0x24D  # memory, cmdline, modules, mmap, loader name
    # QEMU puts the kernel's file name first, as GRUB does.
    assert r["cmdline"]["text"] == f"{guests.path('mbinfo')} {APPEND}"
    assert r["cmdline"]["length"] == len(r["cmdline"]["text"])
    assert r["boot_loader_name"]["text"] == run.platform  # "qemu", or "pykvm"


def test_mbinfo_reports_every_module_with_its_bytes(mbinfo):
    run, strings = mbinfo
    r = run.report
    assert r["mods_count"] == len(MODULES) == len(r["module"])
    for i, (module, data, string) in enumerate(zip(r["module"], MODULES.values(), strings)):
        assert module["index"] == i
        assert module["size"] == len(data) == module["end"] - module["start"]
        assert module["adler32"] == zlib.adler32(data)
        assert module["text"] == string
        assert module["start"] % 4096 == 0  # the header asks for page-aligned modules


def test_mbinfo_nothing_in_page_0_or_over_the_kernel(mbinfo):
    r = mbinfo[0].report
    kernel = r["kernel"]
    assert kernel["start"] == 0x100000
    assert kernel["end"] == elf_memory_end(guests.path("mbinfo"))  # .bss included
    placed = [(r["mbi"]["addr"], r["mbi"]["size"]), (r["mods"]["addr"], r["mods"]["size"]),
              (r["mmap"]["addr"], r["mmap"]["length"])]
    placed += [(r[key]["addr"], r[key]["length"] + 1) for key in ("cmdline", "boot_loader_name")]
    placed += [(m["start"], m["size"]) for m in r["module"]]
    for addr, size in placed:
        assert addr >= 0x1000, hex(addr)
        assert addr + size <= kernel["start"] or addr >= kernel["end"], hex(addr)
    modules = sorted((m["start"], m["end"]) for m in r["module"])
    assert all(end <= next_start for (_, end), (next_start, _) in zip(modules, modules[1:]))


def test_mbinfo_memory_map_matches_the_ram_given(mbinfo):
    r = mbinfo[0].report
    entries = {e["base"]: e for e in r["mmap_entry"]}
    assert r["mmap"]["entries"] == len(r["mmap_entry"]) and r["mmap"]["length"] == 24 * len(entries)
    assert entries[0]["type"] == 1 and r["mem_lower"] == entries[0]["length"] // 1024
    high = entries[0x100000]
    assert high["type"] == 1
    assert MEMORY_MIB * MiB - 2 * MiB < high["base"] + high["length"] <= MEMORY_MIB * MiB
    assert r["mem_upper"] == high["length"] // 1024


# --- smp ---------------------------------------------------------------------------------

SMP_CPUS = 4  # more vCPUs than this 2-core host has: the APs still all start


@pytest.fixture(scope="module", params=PLATFORMS)
def smp(request):
    return run_guest(request.param, "smp", smp=SMP_CPUS)


def test_smp_starts_every_ap(smp):
    r = smp.report
    assert r["done"] == "ok"
    assert r["cpus_expected"] == r["cpus"] == r["madt_cpus"] == SMP_CPUS
    assert r["cpus_source"] == "fw_cfg"
    assert r["apic_ids"] == list(range(SMP_CPUS)) and r["sum"] == sum(range(SMP_CPUS))
    assert r["bsp_apic_id"] == 0 and r["trampoline"] == 0x8000
    # IA32_APIC_BASE: 0xfee00000, xAPIC enabled (bit 11), this is the BSP (bit 8)
    assert r["apic_base_msr"] == 0xFEE00000 | 1 << 11 | 1 << 8


# --- pcprobe -----------------------------------------------------------------------------

@pytest.fixture(scope="module", params=PLATFORMS)
def pcprobe(request):
    return run_guest(request.param, "pcprobe", smp=2)


def test_pcprobe_fw_cfg(pcprobe):
    r = pcprobe.report
    assert r["done"] == "ok" and r["fw_cfg"] == "present" and r["fw_cfg_signature"] == "QEMU"
    assert r["fw_cfg_id"] & 0x3 == 0x3 and r["fw_cfg_dma"] == 1
    assert r["fw_cfg_nb_cpus"] == r["fw_cfg_max_cpus"] == 2
    assert r["fw_cfg_ram_size"] == MEMORY_MIB * MiB
    assert r["fw_cfg_dma_register"] == "QEMU CFG" and r["fw_cfg_dma_read"] == "QEMU"
    files = {f["name"]: f for f in r["fw_cfg_file"]}
    assert r["fw_cfg_files"] == len(files)
    assert {"etc/acpi/rsdp", "etc/acpi/tables", "etc/e820"} <= set(files)
    if pcprobe.platform == "qemu":
        assert "etc/table-loader" in files  # SeaBIOS builds the tables from it; pykvm places them itself
    assert files["etc/e820"]["size"] % 20 == 0 and all(f["select"] >= 0x20 for f in files.values())


def test_pcprobe_cmos_memory_bytes_and_clock(pcprobe):
    r = pcprobe.report
    assert r["cmos_base_kib"] == 640
    assert r["cmos_ext_kib"] == r["cmos_ext2_kib"] == min(0xFFFF, (MEMORY_MIB - 1) * 1024)
    assert r["cmos_above_16m_64k"] == (MEMORY_MIB - 16) * 16 and r["cmos_above_4g_64k"] == 0
    assert r["cmos_ram_size"] == MEMORY_MIB * MiB
    assert r["cmos_cpus_minus_1"] == 1
    assert r["cmos_reg_d"] & 0x80
    assert r["cmos_seconds_changed"] == 1 and r["cmos_seconds_wait_ms"] < 1500  # it ticks once a second


def test_pcprobe_pci_bus_0(pcprobe):
    r = pcprobe.report
    assert r["pci_host"] == {"bdf": "00:00.0", "vendor": 0x8086, "device": 0x1237, "class": 0x060000}  # i440FX
    found = {f["bdf"]: (f["vendor"], f["device"]) for f in r["pci"]}
    assert r["pci_functions"] == len(found)
    assert found["00:01.0"] == (0x8086, 0x7000)  # PIIX3 ISA bridge
    assert found["00:01.1"] == (0x8086, 0x7010)  # PIIX3 IDE (compatibility mode: the ATA disk's ports)
    assert found["00:01.3"] == (0x8086, 0x7113)  # PIIX4 ACPI (the PM timer's home)


def test_pcprobe_finds_the_state_firmware_leaves(pcprobe):
    """The PICs, PIT channel 0, the boot LAPIC and the BDA as SeaBIOS leaves them (QEMU's values)."""
    r = pcprobe.report
    assert (r["pic_master_mask"], r["pic_slave_mask"]) == (0xB8, 0x8E)
    assert r["pit0_counting"] == 1  # the 18.2 Hz tick runs, readable without reprogramming
    assert r["lapic_svr"] & 0x100 and (r["lapic_lint0"], r["lapic_lint1"]) == (0x8700, 0x8400)
    assert r["bda_com1"] == 0x3F8 and r["bda_base_kib"] == 639 and r["ivt_int08_set"] == 1


# --- acpiscan ----------------------------------------------------------------------------

@pytest.fixture(scope="module", params=PLATFORMS)
def acpiscan(request):
    return run_guest(request.param, "acpiscan", smp=2)


def test_acpiscan_tables(acpiscan):
    r = acpiscan.report
    assert r["done"] == "ok" and r["tables_bad"] == 0
    assert 0xE0000 <= r["rsdp"]["addr"] < 0x100000 and r["rsdp"]["addr"] % 16 == 0
    assert r["rsdt"]["checksum"] == "ok" and r["rsdt"]["entries"] == sum(t["via"] == "rsdt" for t in r["table"])
    signatures = {t["sig"] for t in r["table"]}
    assert {"FACP", "APIC", "DSDT"} <= signatures
    assert all(t["checksum"] == "ok" for t in r["table"])


def test_acpiscan_madt(acpiscan):
    r = acpiscan.report
    assert r["madt_cpus"] == 2 and [e["apic_id"] for e in r["madt_lapic"]] == [0, 1]
    assert r["madt"]["lapic_addr"] == 0xFEE00000
    assert [(io["addr"], io["gsi_base"]) for io in r["ioapic"]] == [(0xFEC00000, 0)]
    assert {"bus": 0, "source": 0, "gsi": 2, "flags": 0} in r["iso"]  # the PIT on pin 2


def test_acpiscan_pm_timer_runs_at_3_579545_mhz(acpiscan):
    r = acpiscan.report
    assert r["pm_tmr_blk"] == 0x608 and r["pm_tmr_len"] == 4
    # Recompute from the raw counts: PM ticks per second of TSC.
    hz = r["pm_ticks"] * r["tsc_khz"] * 1000 / r["tsc_ticks"]
    assert abs(hz - r["pm_timer_hz"]) <= 1
    assert abs(hz - 3_579_545) / 3_579_545 < 0.02


# --- ipiping -----------------------------------------------------------------------------

IPI_ROUNDS = 500


@pytest.fixture(scope="module", params=PLATFORMS)
def ipiping(request):
    return run_guest(request.param, "ipiping", smp=2, append=f"iterations={IPI_ROUNDS}")


def test_ipiping_counts_and_times_every_round_trip(ipiping):
    r = ipiping.report
    assert r["done"] == "ok"
    assert r["iterations"] == r["round_trips"] == IPI_ROUNDS
    assert r["cpus"] == 2 and r["bsp_apic_id"] == 0 and r["ap_apic_id"] == 1 and r["vector"] == 0x30
    assert r["spinning_aps"] == 0
    assert r["cycles_per_round_trip"] == r["tsc_cycles"] // IPI_ROUNDS
    assert r["ns_per_round_trip"] == r["cycles_per_round_trip"] * 1_000_000 // r["tsc_khz"]
    assert r["other_interrupts"] == 0


@pytest.mark.parametrize("platform", PLATFORMS)
def test_ipiping_with_the_other_aps_spinning(platform):
    """`spin=1`, 4 vCPUs: two play, two spin with interrupts off (the benchmark's overcommit case)."""
    r = run_guest(platform, "ipiping", smp=4, append="iterations=200 spin=1").report
    assert r["done"] == "ok" and r["cpus"] == 4 and r["spinning_aps"] == 2
    assert r["round_trips"] == r["iterations"] == 200 and r["other_interrupts"] == 0
    assert r["ns_per_round_trip"] == r["cycles_per_round_trip"] * 1_000_000 // r["tsc_khz"]


# --- s3wake ------------------------------------------------------------------------------

@pytest.mark.parametrize("platform", PLATFORMS)
def test_s3_suspend_and_rtc_alarm_resume_at_the_waking_vector(platform):
    """The guest suspends; the RTC alarm wakes the machine; the real-mode stub at the FACS vector reports.

    Its exit value is PM1_STS >> 9: WAK_STS (bit 15 -> 6) and RTC_STS (bit 10 -> 1), the same on QEMU.
    """
    run = run_guest(platform, "s3wake", status=0x42, strict=False)
    assert run.report["state"] == "suspending" and "done" not in run.report  # the C code never resumed
    assert (run.report["pm1a_evt"], run.report["pm1a_cnt"]) == (0x600, 0x604)
    assert run.seconds < 20  # the alarm's "don't care" fields make it go off within a second


# --- rtcirq ------------------------------------------------------------------------------

@pytest.mark.parametrize("platform", PLATFORMS)
def test_rtc_periodic_interrupts_reach_a_halted_cpu_through_the_pics(platform):
    """IRQ 8 must come while the CPU sleeps in hlt: the RTC's events are raised on time, not when touched."""
    r = run_guest(platform, "rtcirq", append="count=200").report
    assert r["done"] == "ok" and r["rtc_irqs"] == 200 and r["rtc_irqs_without_pf"] == 0
    assert r["other_interrupts"] == 0 and r["rtc_irq_hz"] > 0  # (the rate rests on the guest's TSC calibration)
