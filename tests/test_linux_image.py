"""make linux's pieces that need no network: the cache paths and the initramfs (newc cpio, gzip)."""

from __future__ import annotations

import gzip

from pykvm.guests import linux_image


def read_newc(archive: bytes) -> list[tuple[str, int, bytes, tuple[int, int]]]:
    """(name, mode, data, rdev) of each record up to the trailer (buffer-format.rst), checking the padding."""
    out, at = [], 0
    while True:
        assert archive[at:at + 6] == b"070701" and at % 4 == 0
        fields = [int(archive[at + 6 + 8 * i:at + 14 + 8 * i], 16) for i in range(13)]
        mode, filesize, rdev, namesize = fields[1], fields[6], (fields[9], fields[10]), fields[11]
        name_at = at + 110
        name = archive[name_at:name_at + namesize - 1].decode()
        assert archive[name_at + namesize - 1] == 0
        data_at = (name_at + namesize + 3) & ~3
        at = (data_at + filesize + 3) & ~3
        if name == "TRAILER!!!":
            assert at == len(archive)
            return out
        out.append((name, mode, archive[data_at:data_at + filesize], rdev))


def test_cache_paths_follow_pykvm_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("PYKVM_CACHE", str(tmp_path))
    assert linux_image.kernel_path() == str(tmp_path / "linux" / "vmlinuz")
    assert linux_image.initrd_path() == str(tmp_path / "linux" / "initrd.cpio.gz")
    assert "make linux" in linux_image.missing()
    monkeypatch.delenv("PYKVM_CACHE")
    assert linux_image.cache_dir().endswith("/.cache/pykvm/linux")


def test_initramfs_holds_busybox_the_console_node_and_init():
    image = linux_image.initramfs(b"\x7fELF busybox")
    assert image == linux_image.initramfs(b"\x7fELF busybox")       # deterministic (gzip mtime 0)
    entries = {name: (mode, data, rdev) for name, mode, data, rdev in read_newc(gzip.decompress(image))}
    assert entries["bin/busybox"] == (0o100755, b"\x7fELF busybox", (0, 0))
    assert entries["bin/sh"] == (0o120777, b"busybox", (0, 0))
    assert entries["dev/console"] == (0o020600, b"", (5, 1))
    mode, init, _ = entries["init"]
    assert mode == 0o100755 and init.startswith(b"#!/bin/busybox sh\n")
    assert linux_image.MARKER.encode() in init and b"poweroff -f" in init and b"pykvm.shell" in init
    assert all(entries[d][0] == 0o040755 for d in ("bin", "dev", "proc", "sys"))


def test_a_static_elf_is_told_from_a_dynamic_one(tmp_path):
    from loader_images import make_elf

    static = make_elf([(0x400000, 0x400000, b"\x90", 1)], entry=0x400000)
    dynamic = bytearray(static)
    dynamic[64:68] = (3).to_bytes(4, "little")           # the first program header becomes PT_INTERP
    (tmp_path / "static").write_bytes(static)
    (tmp_path / "dynamic").write_bytes(bytes(dynamic))
    assert linux_image._is_static_elf(str(tmp_path / "static"))
    assert not linux_image._is_static_elf(str(tmp_path / "dynamic"))
    assert not linux_image._is_static_elf(str(tmp_path / "absent"))
