"""The `ata` guest drives the emulated IDE disk on pykvm and on QEMU: what it stores is what the image holds.

The guest (guests/ata.c) resets the primary channel, IDENTIFYs the disk,
writes a pattern over N sectors, flushes, reads it back and reports the
Adler-32 of both.  Each run is checked three ways: the guest's checksums
agree with each other, with the pattern computed here, and with the image
as the host reads it afterwards -- a raw file directly, a qcow2 image both
through pykvm's reader and through ``qemu-img convert -O raw``.  The same
guest on QEMU's ``-M pc`` (PIIX3 IDE) must report the same checksums:
that holds the model to a real IDE implementation.  They differ on purpose
in one place: a command past the last sector ends with IDNF on pykvm (ATA8-ACS
says so) and with ABRT on QEMU.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import zlib

import pytest

from pykvm import guests
from pykvm.block import create_image, open_image
from pykvm.guests.reports import parse_report, qemu_exit_status

pytestmark = pytest.mark.kvm

QEMU = shutil.which("qemu-system-x86_64")
QEMU_IMG = shutil.which("qemu-img")
TIMEOUT = 300
DISK_BYTES = 8 << 20
SECTOR = 512
LBA, SECTORS, SEED = 1000, 40, 0x1410  # 16 + 16 + 8: LBA28 and LBA48 commands both
CMDLINE = f"lba={LBA} sectors={SECTORS} seed={SEED:#x}"


def pattern(first: int, count: int, seed: int) -> bytes:
    """What the guest writes: sector s's 32-bit word j is (s * 0x9E3779B1) ^ (j * 0x85EBCA77) ^ seed."""
    out = bytearray()
    for s in range(first, first + count):
        base = (s * 0x9E3779B1 & 0xFFFFFFFF) ^ seed
        out += struct.pack("<128I", *(base ^ (j * 0x85EBCA77 & 0xFFFFFFFF) for j in range(128)))
    return bytes(out)


def run_pykvm(image_path, cmdline: str, fmt: str) -> tuple[dict, object]:
    from pykvm.platform.machine import Machine

    with open_image(image_path, format=fmt) as image, Machine("128M", platform="pc") as m:
        channel = m.add_ide_disk(image)
        m.load_image(str(guests.path("ata")), format="multiboot", cmdline=cmdline, name="ata")
        result = m.run(timeout=TIMEOUT)
        assert result.ended == "debug-exit" and result.exit_status == qemu_exit_status(0), result.serial_text
        return parse_report(result.serial_text, strict=True), channel.stats


def run_qemu(image_path, cmdline: str) -> dict:
    command = [QEMU, "-accel", "kvm", "-M", "pc", "-m", "128", "-nodefaults", "-display", "none", "-no-reboot",
               "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
               "-kernel", str(guests.path("ata")), "-append", cmdline,
               "-drive", f"file={image_path},if=ide,format=raw"]
    proc = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT)
    text = proc.stdout.decode("latin-1")
    assert proc.returncode == qemu_exit_status(0), f"{proc.returncode}\n{text}\n{proc.stderr.decode()}"
    return parse_report(text, strict=True)


def host_bytes(image_path, fmt: str) -> bytes:
    """The virtual disk's bytes as the host reads them after the run."""
    with open_image(image_path, format=fmt, read_only=True) as image:
        return image.read(0, image.size)


def check_report(r: dict, disk: bytes) -> None:
    expected = pattern(LBA, SECTORS, SEED)
    assert r["done"] == "ok" and r["mismatched_sectors"] == 0
    assert r["capacity_sectors"] == DISK_BYTES // SECTOR == r["identify"]["lba48_sectors"]
    assert r["capacity_bytes"] == DISK_BYTES and r["identify"]["lba28_sectors"] == DISK_BYTES // SECTOR
    assert r["written_adler32"] == r["read_adler32"] == zlib.adler32(expected)
    assert disk[LBA * SECTOR:(LBA + SECTORS) * SECTOR] == expected
    assert disk[:LBA * SECTOR].count(0) == LBA * SECTOR  # nothing else was touched
    assert disk[(LBA + SECTORS) * SECTOR:].count(0) == len(disk) - (LBA + SECTORS) * SECTOR
    assert r["reset_status"] & 0xC9 == 0x40 and r["signature"] == [1, 1, 0, 0]  # DRDY; the ATA signature
    assert r["slave_status"] == 0  # device 1 is absent
    assert r["flush"] == {"status": 0x50, "ext_status": 0x50}
    assert r["identify_packet"]["status"] & 1 and r["identify_packet"]["error"] == 0x04  # ABRT
    assert r["beyond_end"]["status"] & 1  # ERR: the sector past the last does not exist
    assert r["identify"]["w83"] & (1 << 10 | 1 << 12 | 1 << 13) == 1 << 10 | 1 << 12 | 1 << 13


@pytest.fixture(scope="module")
def raw_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("ata") / "disk.raw"
    create_image(path, "raw", DISK_BYTES)
    report, stats = run_pykvm(path, CMDLINE, "raw")
    return report, stats, path


def test_pykvm_raw_image(raw_run):
    report, stats, path = raw_run
    check_report(report, path.read_bytes())
    assert report["model"] == "PYKVM HARDDISK" and report["serial"] == "PYKVM0001"
    assert report["identify"]["sum"] == 0 and report["identify"]["integrity"] & 0xFF == 0xA5
    assert report["beyond_end"]["error"] == 0x10  # IDNF, as ATA8-ACS specifies
    assert stats["sectors_written"] == stats["sectors_read"] == SECTORS


def test_pykvm_qcow2_image(tmp_path):
    path = tmp_path / "disk.qcow2"
    create_image(path, "qcow2", DISK_BYTES)
    report, _ = run_pykvm(path, CMDLINE, "qcow2")
    disk = host_bytes(path, "qcow2")
    check_report(report, disk)
    if QEMU_IMG is None:
        pytest.skip("qemu-img is not installed: the qcow2 image was read back by pykvm only")
    raw = tmp_path / "converted.raw"
    subprocess.run([QEMU_IMG, "check", str(path)], check=True, capture_output=True)
    subprocess.run([QEMU_IMG, "convert", "-f", "qcow2", "-O", "raw", str(path), str(raw)], check=True)
    assert raw.read_bytes() == disk


def test_pykvm_word_pio(tmp_path):
    """inw/outw per 16 bits instead of rep insw/outsw: one exit per word, the same bytes."""
    path = tmp_path / "disk.raw"
    create_image(path, "raw", DISK_BYTES)
    report, _ = run_pykvm(path, "word=1 lba=7 sectors=3 seed=0x99", "raw")
    assert report["pio"] == "word" and report["done"] == "ok"
    assert report["read_adler32"] == zlib.adler32(pattern(7, 3, 0x99))
    assert path.read_bytes()[7 * SECTOR:10 * SECTOR] == pattern(7, 3, 0x99)


def test_pykvm_bench_mode_reports_every_workload(tmp_path):
    path = tmp_path / "disk.raw"
    create_image(path, "raw", DISK_BYTES)
    report, stats = run_pykvm(path, "bench=1 ops=3 region=64", "raw")
    assert [b["workload"] for b in report["bench"]] == ["seq-read", "seq-write", "rand-read", "rand-write"]
    assert all(b["ops"] == 3 and b["bytes"] == 3 * 4096 and b["cycles"] > 0 for b in report["bench"])
    assert stats["sectors_read"] == stats["sectors_written"] == 6 * 8


@pytest.mark.slow
@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed (Debian: apt install qemu-system-x86)")
def test_qemu_reports_the_same(raw_run, tmp_path):
    path = tmp_path / "disk.raw"
    create_image(path, "raw", DISK_BYTES)
    r = run_qemu(path, CMDLINE)
    check_report(r, path.read_bytes())
    ours = raw_run[0]
    for key in ("written_adler32", "read_adler32", "capacity_sectors", "signature", "slave_status", "flush"):
        assert r[key] == ours[key], key
    for word in ("lba28_sectors", "lba48_sectors", "w0", "w83", "w86"):
        assert r["identify"][word] == ours["identify"][word], word
    assert r["model"] == "QEMU HARDDISK"
    assert r["beyond_end"]["error"] in (0x04, 0x10)  # QEMU aborts (ABRT) where ATA8-ACS says IDNF


@pytest.mark.parametrize("drive", ["-drive", "-hda"])
def test_qemus_command_line_runs_unchanged_under_pykvm_run(tmp_path, drive):
    """``-drive file=IMG,if=ide,format=raw`` (and ``-hda IMG``) put the ATA disk on the primary channel."""
    path = tmp_path / "disk.raw"
    create_image(path, "raw", DISK_BYTES)
    disk = [drive, f"file={path},if=ide,format=raw"] if drive == "-drive" else [drive, str(path)]
    command = [sys.executable, "-m", "pykvm", "run", "-accel", "kvm", "-M", "pc", "-m", "128", "-nodefaults",
               "-display", "none", "-no-reboot", "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
               "-kernel", str(guests.path("ata")), "-append", CMDLINE, *disk]
    proc = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT)
    text = proc.stdout.decode("latin-1")
    assert proc.returncode == qemu_exit_status(0), f"{proc.returncode}\n{text}\n{proc.stderr.decode()}"
    check_report(parse_report(text, strict=True), path.read_bytes())
    if drive == "-hda":
        assert "format was not specified" in proc.stderr.decode()  # probed, and said so, as QEMU does
