"""The blk guest (guests/blk.c) on pykvm's virtio-blk, through ``pykvm run -drive ...``, and on QEMU microvm.

The guest writes a pattern over its blocks, flushes, reads them back and
prints checksums; the host then reads the image *file* -- with pykvm's
block layer and, for qcow2, with ``qemu-img convert -O raw`` -- and checks
that every block holds exactly the pattern and that the checksums agree.
The crash test SIGKILLs ``pykvm run`` in the middle of a write burst, 20
times, and asks ``qemu-img check`` after each kill.
"""

from __future__ import annotations

import os
import random
import select
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest

from pykvm import guests
from pykvm.block import open_image
from pykvm.guests.reports import parse_report, qemu_exit_status

pytestmark = pytest.mark.kvm

QEMU = shutil.which("qemu-system-x86_64")
QEMU_IMG = shutil.which("qemu-img")
TIMEOUT = 120
DEBUG_EXIT = ["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]
needs_qemu_img = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img is not installed (apt install qemu-utils)")


# -- what the guest writes (guests/blk.c, "verify") -------------------------------------------

def pattern(seed: int, sector: int, spb: int) -> bytes:
    """xorshift32 words from seed ^ (sector * 0x9E3779B1), 128 per sector."""
    state = (seed ^ (sector * 0x9E3779B1)) & 0xFFFFFFFF or 1
    words = []
    for _ in range(128 * spb):
        state ^= (state << 13) & 0xFFFFFFFF
        state ^= state >> 17
        state ^= (state << 5) & 0xFFFFFFFF
        words.append(state)
    return struct.pack(f"<{len(words)}I", *words)


def fnv(words) -> int:
    h = 2166136261
    for w in words:
        h = ((h ^ w) * 16777619) & 0xFFFFFFFF
    return h


def checksum(blocks: list[bytes]) -> int:
    """The guest's checksum: FNV-1a over the blocks' FNV-1a hashes of their 32-bit words."""
    return fnv(fnv(struct.unpack(f"<{len(b) // 4}I", b)) for b in blocks)


class Layout:
    def __init__(self, n=16, spb=8, stride=None, start=0, seed=1):
        self.n, self.spb, self.stride, self.start, self.seed = n, spb, stride or spb, start, seed

    @property
    def append(self) -> str:
        return f"n={self.n} spb={self.spb} stride={self.stride} start={self.start} seed={self.seed}"

    def sectors(self):
        return [self.start + k * self.stride for k in range(self.n)]

    def expected(self) -> list[bytes]:
        return [pattern(self.seed, s, self.spb) for s in self.sectors()]

    def read(self, path, fmt) -> list[bytes]:
        with open_image(path, format=fmt, read_only=True) as image:
            return [image.read(s * 512, self.spb * 512) for s in self.sectors()]


def pykvm_run(*args: str, append: str) -> dict:
    command = [sys.executable, "-m", "pykvm", "run", "-nodefaults", "-serial", "stdio", *DEBUG_EXIT, *args,
               "-kernel", str(guests.path("blk")), "-append", append]
    proc = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT)
    text = proc.stdout.decode("latin-1")
    assert proc.returncode == qemu_exit_status(0), f"exit {proc.returncode}\n{text}\n{proc.stderr.decode()}"
    return parse_report(text, strict=True)


def qemu_img(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([QEMU_IMG, *args], capture_output=True, text=True, timeout=60)


def check_report(report: dict, layout: Layout, blocks: list[bytes]) -> None:
    assert report["done"] == "ok", report
    want = checksum(layout.expected())
    assert blocks == layout.expected()  # every block holds exactly the pattern
    assert int(report["written"]["checksum"], 16) == want == int(report["read"]["checksum"], 16)
    assert report["written"]["blocks"] == layout.n


# -- raw and qcow2 ------------------------------------------------------------------------

@pytest.mark.parametrize("cache", ["writeback", "writethrough", "none", "unsafe", "directsync"])
def test_raw_disk_holds_what_the_guest_wrote(tmp_path, cache):
    path = tmp_path / "disk.raw"
    path.write_bytes(b"\x5a" * (4 << 20))
    layout = Layout(n=12, spb=8, stride=24, start=3, seed=0xC0FFEE)
    report = pykvm_run("-drive", f"file={path},if=virtio,format=raw,cache={cache}", append=layout.append)
    assert report["device"]["from"] == "cmdline" and report["device"]["base"] == 0xD0000000
    assert report["capacity"] == (4 << 20) // 512
    check_report(report, layout, layout.read(path, "raw"))
    data = path.read_bytes()  # the bytes between the blocks are untouched
    assert data[:3 * 512] == b"\x5a" * 3 * 512 and data[(3 + 8) * 512:(3 + 24) * 512] == b"\x5a" * 16 * 512


@needs_qemu_img
def test_qcow2_disk_holds_what_the_guest_wrote_and_qemu_agrees(tmp_path):
    path = tmp_path / "disk.qcow2"
    # 4 KiB clusters: an L2 table maps 2 MiB, a refcount block covers 8 MiB; the stride crosses both.
    assert qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", str(path), "64M").returncode == 0
    layout = Layout(n=24, spb=16, stride=5000, start=7, seed=42)  # 8 KiB blocks, not cluster-aligned
    report = pykvm_run("-drive", f"file={path},if=virtio,format=qcow2", append=layout.append)
    check_report(report, layout, layout.read(path, "qcow2"))
    check = qemu_img("check", str(path))
    assert check.returncode == 0, check.stdout + check.stderr
    raw = tmp_path / "converted.raw"
    assert qemu_img("convert", "-O", "raw", str(path), str(raw)).returncode == 0
    assert layout.read(raw, "raw") == layout.expected()


def test_read_only_drive_refuses_writes_and_keeps_the_image(tmp_path):
    path = tmp_path / "disk.raw"
    content = bytes(range(256)) * (1 << 12)  # 1 MiB
    path.write_bytes(content)
    layout = Layout(n=8, spb=8)
    report = pykvm_run("-drive", f"file={path},if=virtio,format=raw,readonly=on", append=layout.append)
    assert report["done"] == "ok" and report["ro_write"] == 1  # VIRTIO_BLK_S_IOERR
    assert report["features"] & 1 << 5  # VIRTIO_BLK_F_RO
    assert path.read_bytes() == content
    assert int(report["read"]["checksum"], 16) == checksum(layout.read(path, "raw"))


def test_probing_a_qcow2_says_so(tmp_path):
    path = tmp_path / "disk.qcow2"
    from pykvm.block import create_image

    create_image(path, "qcow2", 1 << 20)
    command = [sys.executable, "-m", "pykvm", "run", "-nodefaults", "-serial", "stdio", *DEBUG_EXIT,
               "-drive", f"file={path},if=virtio", "-kernel", str(guests.path("blk")), "-append", "n=4"]
    proc = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT)
    assert proc.returncode == qemu_exit_status(0)
    assert "probing guessed qcow2" in proc.stderr.decode()
    assert Layout(n=4).read(path, "qcow2") == Layout(n=4).expected()


def test_interrupt_driven_driver_through_the_irqfd(tmp_path):
    """irq=1: the guest sleeps in HLT until the device's interrupt (irqfd with resampling, -M pc's irqchip)."""
    path = tmp_path / "disk.raw"
    path.write_bytes(bytes(1 << 20))
    layout = Layout(n=8, spb=8)
    report = pykvm_run("-drive", f"file={path},if=virtio,format=raw", append=layout.append + " irq=1")
    check_report(report, layout, layout.read(path, "raw"))
    assert report["device"]["irq"] == 5 and report["interrupts"] >= 1
    report = pykvm_run("-drive", f"file={path},if=virtio,format=raw", append="mode=2 n=64 depth=1 irq=1")
    assert report["bench"]["requests"] == 64 and report["interrupts"] >= 1


def test_the_benchmark_measures_a_pykvm_run(tmp_path):
    from pykvm.bench import disk_virtio

    image = tmp_path / "disk.raw"
    disk_virtio._make_image(str(image))
    rate, exits = disk_virtio._run_once("pykvm", str(image), "rand-read", 128, str(tmp_path))
    assert rate > 0 and exits > 0


# -- the same command line on QEMU microvm and on pykvm -------------------------------------

@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed (apt install qemu-system-x86)")
def test_qemu_microvm_and_pykvm_run_the_same_command_line(tmp_path):
    layout = Layout(n=16, spb=8, stride=8, seed=99)
    results = {}
    for who in ("qemu", "pykvm"):
        path = tmp_path / f"{who}.raw"
        path.write_bytes(bytes(1 << 20))
        argv = ["-M", "microvm", "-enable-kvm", "-m", "64M", "-nodefaults", "-no-user-config", "-nographic",
                "-serial", "stdio", *DEBUG_EXIT, "-global", "virtio-mmio.force-legacy=false",
                "-device", "virtio-blk-device,drive=d0,serial=same-line", "-drive",
                f"id=d0,if=none,file={path},format=raw", "-kernel", str(guests.path("blk")), "-append",
                layout.append]
        command = [QEMU, *argv] if who == "qemu" else [sys.executable, "-m", "pykvm", "run", *argv]
        proc = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=TIMEOUT)
        text = proc.stdout.decode("latin-1")
        assert proc.returncode == qemu_exit_status(0), f"{who}: {proc.returncode}\n{text}{proc.stderr.decode()}"
        report = parse_report(text, strict=True)
        check_report(report, layout, layout.read(path, "raw"))
        assert report["id"]["text"] == "same-line"
        results[who] = report
    assert results["qemu"]["read"] == results["pykvm"]["read"]


# -- crash consistency ----------------------------------------------------------------------

KILLS = 20


@needs_qemu_img
@pytest.mark.slow
def test_sigkill_during_a_write_burst_leaves_a_qcow2_qemu_img_accepts(tmp_path):
    """20 kills at random moments of a write burst: qemu-img check exits 0 (clean) or 3 (leaks), never 2."""
    rng = random.Random(20261201)
    path = tmp_path / "burst.qcow2"
    assert qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", str(path), "256M").returncode == 0
    outcomes = []
    for kill in range(KILLS):
        # Random 4 KiB writes over 256 MiB: each one a new data cluster, often a new L2 table or refcount block.
        append = f"mode=1 rand=1 n=1 span=65536 spb=8 depth=8 seed={kill + 1}"
        command = [sys.executable, "-m", "pykvm", "run", "-nodefaults", "-serial", "stdio", *DEBUG_EXIT,
                   "-drive", f"file={path},if=virtio,format=qcow2", "-kernel", str(guests.path("blk")),
                   "-append", append]
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            seen = b""
            deadline = time.monotonic() + TIMEOUT
            while b"burst: started" not in seen:  # the guest is writing
                assert time.monotonic() < deadline, f"kill {kill}: the burst did not start: {seen!r}"
                ready, _, _ = select.select([proc.stdout], [], [], 1.0)
                if ready:
                    chunk = os.read(proc.stdout.fileno(), 4096)
                    assert chunk, f"kill {kill}: pykvm ended before the burst: {seen!r} {proc.stderr.read()!r}"
                    seen += chunk
            time.sleep(rng.uniform(0.0, 0.5))  # a random point in the burst
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.kill()
            proc.communicate(timeout=30)
        check = qemu_img("check", str(path))
        outcomes.append(check.returncode)
        assert check.returncode in (0, 3), f"kill {kill}: qemu-img check exit {check.returncode}\n{check.stdout}"
    info = qemu_img("check", "--output=json", str(path))
    assert info.returncode in (0, 3)
    assert '"allocated-clusters"' in info.stdout
    print(f"qemu-img check exits after {KILLS} kills: {outcomes}")
