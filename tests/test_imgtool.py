"""``pykvm img``: the commands' output, exit codes and error handling (no qemu-img needed)."""

from __future__ import annotations

import os
import struct

import pytest

from pykvm.block import create_image, open_image
from block_helpers import run_imgtool as run

MiB = 1 << 20


def test_create_and_info_for_qcow2(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, "create", "-f", "qcow2", "disk.qcow2", "1G")
    assert (code, err) == (0, "")
    assert out == ("Formatting 'disk.qcow2', fmt=qcow2 cluster_size=65536 extended_l2=off compression_type=zlib "
                   "size=1073741824 lazy_refcounts=off refcount_bits=16\n")
    code, out, err = run(capsys, "info", "disk.qcow2")
    allocated = os.stat("disk.qcow2").st_blocks * 512
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        "image: disk.qcow2", "file format: qcow2", "virtual size: 1 GiB (1073741824 bytes)",
        f"disk size: {allocated // 1024} KiB", "cluster_size: 65536", "Format specific information:",
        "    compat: 1.1", "    compression type: zlib", "    lazy refcounts: false", "    refcount bits: 16",
        "    corrupt: false", "    extended l2: false"]


def test_info_for_v2_with_a_relative_backing_file(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.mkdir("sub")
    assert run(capsys, "create", "-f", "raw", "sub/base.raw", "2M")[0] == 0
    code, out, _ = run(capsys, "create", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4k", "-b", "base.raw",
                       "-F", "raw", "sub/top.qcow2")
    assert code == 0
    assert "size=2097152 compat=0.10 backing_file=base.raw backing_fmt=raw lazy_refcounts=off" in out
    lines = run(capsys, "info", "sub/top.qcow2")[1].splitlines()
    assert lines[2] == "virtual size: 2 MiB (2097152 bytes)"
    assert lines[4:7] == ["cluster_size: 4096", "backing file: base.raw (actual path: sub/base.raw)",
                          "backing file format: raw"]
    assert lines[7:] == ["Format specific information:", "    compat: 0.10", "    compression type: zlib",
                         "    refcount bits: 16"]


def test_info_for_raw(tmp_path, capsys):
    path = tmp_path / "r.raw"
    assert run(capsys, "create", "-f", "raw", path, "1000")[1] == f"Formatting '{path}', fmt=raw size=1000\n"
    code, out, _ = run(capsys, "info", path)
    assert code == 0
    assert out.splitlines()[1:4] == ["file format: raw", "virtual size: 1 KiB (1024 bytes)", "disk size: 0 B"]


def test_check_exit_codes(tmp_path, capsys):
    path = tmp_path / "c.qcow2"
    create_image(path, "qcow2", MiB, cluster_size=512)
    with open_image(path) as image:
        image.write(0, b"c" * 2048)
    code, out, err = run(capsys, "check", path)
    assert (code, err) == (0, "")
    assert out == "No errors were found on the image.\n4/2048 = 0.20% allocated, 0.00% fragmented, " \
                  "0.00% compressed clusters\nImage end offset: 4608\n"
    with open(path, "r+b") as f:                  # an extra cluster with a refcount: a leak
        f.seek(0, 2)
        f.write(bytes(512))
        f.seek(0x400 + 2 * 9)
        f.write(struct.pack(">H", 1))
    code, out, err = run(capsys, "check", path)
    assert (code, err) == (3, "Leaked cluster 9 refcount=1 reference=0\n")
    assert "1 leaked clusters were found on the image." in out
    with open(path, "r+b") as f:                  # a data cluster without a refcount: corruption
        f.seek(0x400 + 2 * 5)
        f.write(struct.pack(">H", 0))
    code, out, err = run(capsys, "check", path)
    assert code == 2
    assert "ERROR cluster 5 refcount=0 reference=1" in err.splitlines()
    assert "Data may be corrupted, or further writes to the image may corrupt it." in out
    raw = tmp_path / "r.raw"
    create_image(raw, "raw", 4096)
    assert run(capsys, "check", raw) == (63, "", "pykvm img: This image format does not support checks\n")


def test_convert_round_trip(tmp_path, capsys):
    source = tmp_path / "src.raw"
    source.write_bytes(os.urandom(100_000) + bytes(300_000) + b"end")
    assert run(capsys, "convert", "-O", "qcow2", "-o", "cluster_size=4096,compat=0.10", source,
               tmp_path / "x.qcow2")[0] == 0
    with open_image(tmp_path / "x.qcow2") as image:
        assert image.header.version == 2 and image.cluster_size == 4096
    assert run(capsys, "convert", "-f", "qcow2", "-O", "raw", tmp_path / "x.qcow2", tmp_path / "back.raw")[0] == 0
    back = (tmp_path / "back.raw").read_bytes()
    assert back == source.read_bytes() + bytes(len(back) - 400_003)
    assert os.stat(tmp_path / "back.raw").st_blocks * 512 < 200_000        # the zeroes stayed holes


@pytest.mark.parametrize("args, message", [
    ([], "expecting a command (info, create, check, convert)"),
    (["frobnicate"], "Command not found: frobnicate"),
    (["info"], "expected 1 arguments"),
    (["info", "/nonexistent/x.qcow2"], "No such file or directory"),
    (["info", "-f", "vmdk", "x"], "Unknown file format 'vmdk'"),
    (["info", "-z", "x"], "option -z not recognized"),
    (["create", "-f", "qcow2", "{tmp}/a.qcow2", "1abc"], "Invalid image size"),
    (["create", "-f", "qcow2", "{tmp}/a.qcow2"], "needs a size"),
    (["create", "-f", "qcow2", "-o", "cluster_size=1000", "{tmp}/a.qcow2", "1M"], "Cluster size must be"),
    (["create", "-f", "qcow2", "-o", "colour=blue", "{tmp}/a.qcow2", "1M"], "Invalid option 'colour=blue'"),
    (["create", "-f", "qcow2", "-b", "base.raw", "{tmp}/a.qcow2", "1M"], "without backing format"),
    (["create", "-f", "raw", "-o", "compat=1.1", "{tmp}/a.raw", "1M"], "Invalid options for file format 'raw'"),
    (["convert", "-c", "-O", "qcow2", "in", "out"], "compressed"),
    (["info", "-f", "qcow2", "{tmp}/plain.raw"], "Image is not in qcow2 format"),
    (["info", "{tmp}/v9.qcow2"], "unsupported qcow2 version 9"),
    (["check", "{tmp}/v9.qcow2"], "unsupported qcow2 version 9"),
])
def test_errors_are_one_line_and_exit_2(tmp_path, capsys, args, message):
    create_image(tmp_path / "plain.raw", "raw", 4096)
    create_image(tmp_path / "v9.qcow2", "qcow2", MiB)
    with open(tmp_path / "v9.qcow2", "r+b") as f:
        f.seek(4)
        f.write(struct.pack(">I", 9))
    code, out, err = run(capsys, *[a.format(tmp=tmp_path) for a in args])
    assert code == 2
    assert message in err
    assert out == "" and err.count("\n") == 1 and err.startswith("pykvm img: ")
    assert "Traceback" not in err


def test_help(capsys):
    code, out, err = run(capsys, "--help")
    assert code == 0 and out.startswith("usage: pykvm img") and err == ""
