"""-drive, -hda and -device virtio-blk-device (pykvm/cli/drives.py): QEMU's spelling, checked before anything runs."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pykvm.cli.config import run_config
from pykvm.cli.grammar import parse
from pykvm.cli.options import RUN_TABLE
from pykvm.errors import UsageError

K = ("-kernel", "k.elf")


def config(*argv):
    return run_config(parse([*K, *argv], RUN_TABLE))


def refused(*argv) -> str:
    with pytest.raises(UsageError) as info:
        config(*argv)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_a_virtio_drive_with_every_key():
    drive, = config("-drive", "file=a,,b.qcow2,if=virtio,format=qcow2,cache=none,readonly=on,media=disk,id=d,"
                              "index=0").drives
    assert (drive.file, drive.interface, drive.format, drive.cache, drive.read_only, drive.id) == (
        "a,b.qcow2", "virtio", "qcow2", "none", True, "d")
    drive, = config("-drive", "file=x,if=virtio").drives
    assert drive.format is None and drive.cache == "writeback" and not drive.read_only  # probe; QEMU's default


@pytest.mark.parametrize("mode", ["writeback", "writethrough", "none", "unsafe", "directsync"])
def test_every_qemu_cache_mode_is_taken(mode):
    assert config("-drive", f"file=x,if=virtio,cache={mode}").drives[0].cache == mode


@pytest.mark.parametrize("argv, message", [
    (("-hda", "a.img", "-drive", "file=b.img,if=ide"), "pykvm emulates one IDE disk (the primary master)"),
    (("-drive", "file=d.img,if=scsi"), "if=scsi is not emulated"),
    (("-drive", "file=d.img,if=bogus"), "-drive if=bogus: use if=virtio"),
    (("-drive", "file=d.iso,if=virtio,media=cdrom"), "CD-ROMs are not emulated"),
    (("-drive", "if=virtio"), "needs file=IMAGE"),
    (("-drive", "file=d,if=virtio,format=vmdk"), "format=vmdk: pykvm reads raw, qcow2"),
    (("-drive", "file=d,if=virtio,cache=fast"), "cache=fast: use one of writeback"),
    (("-drive", "file=d,if=virtio,readonly=maybe"), "readonly=maybe: use on or off"),
    (("-drive", "file=d,if=virtio,aio=native"), "unknown key 'aio'"),
    (("-drive", "file=d,if=none"), "if=none needs id=ID"),
    (("-drive", "file=a,if=none,id=x", "-drive", "file=b,if=none,id=x"), "id=x: the id is used twice"),
    (("-device", "virtio-blk-device"), "needs drive=ID"),
    (("-device", "virtio-blk-device,drive=y"), "no -drive with id=y"),
    (("-drive", "file=a,if=virtio,id=v", "-device", "virtio-blk-device,drive=v"), "already in use"),
    (("-drive", "file=a,if=none,id=v", "-device", "virtio-blk-device,drive=v,num-queues=2"),
     "unknown property 'num-queues'"),
])
def test_what_pykvm_cannot_attach_is_refused_in_one_line(argv, message):
    assert message in refused(*argv)


@pytest.mark.kvm
def test_bad_drives_exit_2_with_one_line_and_create_nothing(tmp_path):
    missing = tmp_path / "missing.qcow2"
    for argv in (["-hda", str(missing)], ["-drive", f"file={missing},if=virtio,format=qcow2"],
                 ["-global", "virtio-mmio.force-legacy=true"]):
        proc = subprocess.run([sys.executable, "-m", "pykvm", "run", "--guest", "hello64", *argv],
                              capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert not missing.exists()
