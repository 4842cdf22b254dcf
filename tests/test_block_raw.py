"""Raw images, the BlockImage rules, the host file's cache modes, and qemu-img's size units."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm.block import CACHE_MODES, BlockImage, HostFile, RawImage, create_image, open_image, probe_format
from pykvm.block.hostfile import DIRECT_ALIGN, cache_mode
from pykvm.block.units import parse_size, size_to_str
from pykvm.errors import ImageError

from block_helpers import apply_and_compare, o_direct_works, operations

SHM = "/dev/shm"


@pytest.fixture
def raw(tmp_path):
    path = tmp_path / "disk.raw"
    create_image(path, "raw", 64 * 1024)
    return path


def test_create_rounds_up_to_512_and_is_sparse(tmp_path):
    path = tmp_path / "r.raw"
    assert create_image(path, "raw", 1000) == 1024
    assert os.path.getsize(path) == 1024
    assert os.stat(path).st_blocks == 0
    with open_image(path) as image:
        assert isinstance(image, RawImage) and image.size == 1024 and image.format == "raw"
        assert image.read(0, 1024) == bytes(1024)


def test_a_file_that_is_not_whole_sectors_is_rounded_up_as_qemu(tmp_path):
    path = tmp_path / "odd.raw"
    path.write_bytes(b"\x07" * 1000)
    with open_image(path) as image:
        assert image.size == 1024                       # qemu-img info says 1024 bytes as well
        assert image.read(990, 34) == b"\x07" * 10 + bytes(24)


def test_round_trip_at_any_alignment(raw):
    with open_image(raw) as image:
        image.write(3, b"hello")
        image.write(65531, b"end!!")
        assert image.read(0, 10) == b"\0\0\0hello\0\0"
        assert image.read(65531, 5) == b"end!!"
        assert image.read(5, 0) == b""
    assert raw.read_bytes()[3:8] == b"hello"
    assert os.path.getsize(raw) == 65536


@pytest.mark.parametrize("offset, length", [(65536, 1), (65535, 2), (-1, 1), (0, 65537), (1 << 70, 1)])
def test_accesses_beyond_the_disk_are_image_errors(raw, offset, length):
    with open_image(raw) as image:
        with pytest.raises(ImageError, match="beyond the end|bad range"):
            image.read(offset, length)
        with pytest.raises(ImageError):
            image.write(offset, b"x" * max(length, 0))
        with pytest.raises(ImageError):
            image.write_zeroes(offset, length)
        with pytest.raises(ImageError):
            image.discard(offset, length)


def test_read_only_refuses_every_change(raw):
    with open_image(raw, read_only=True) as image:
        assert image.read_only
        for change in (lambda: image.write(0, b"x"), lambda: image.write_zeroes(0, 512),
                       lambda: image.discard(0, 512)):
            with pytest.raises(ImageError, match="read-only"):
                change()
        image.flush()  # allowed: nothing to flush


def test_closed_image_refuses_everything_and_close_twice_is_fine(raw):
    image = open_image(raw)
    image.close()
    image.close()
    assert image.closed
    with pytest.raises(ImageError, match="closed"):
        image.read(0, 1)
    with pytest.raises(ImageError, match="closed"):
        image.flush()


def test_write_zeroes_and_discard_read_back_as_zero(raw):
    with open_image(raw) as image:
        image.write(0, b"\xff" * 65536)
        image.write_zeroes(100, 5000)
        image.write_zeroes(8192, 8192, unmap=True)
        assert image.read(0, 100) == b"\xff" * 100
        assert image.read(100, 5000) == bytes(5000)
        assert image.read(5100, 10) == b"\xff" * 10
        assert image.read(8192, 8192) == bytes(8192)
        image.discard(32768, 16384)
        data = image.read(32768, 16384)
        assert data in (bytes(16384), b"\xff" * 16384)   # advisory; ext4 and tmpfs punch the hole
    assert os.path.getsize(raw) == 65536


def test_unmapping_zeroes_frees_host_blocks(raw):
    with open_image(raw) as image:
        image.write(0, os.urandom(65536))
        image.flush()
        before = image.file.allocated_bytes()
        image.write_zeroes(0, 65536, unmap=True)
        assert image.file.allocated_bytes() < before


def test_zeroes_fall_back_to_writing_when_fallocate_cannot(raw, monkeypatch):
    monkeypatch.setattr(HostFile, "zero_range", lambda self, offset, length: False)
    monkeypatch.setattr(HostFile, "punch_hole", lambda self, offset, length: False)
    with open_image(raw) as image:
        image.write(0, b"\x01" * 65536)
        image.write_zeroes(10, 3 << 20 >> 8, unmap=True)
        assert image.read(0, 20) == b"\x01" * 10 + bytes(10)
        image.discard(0, 4096)                     # a hint: nothing happens
        assert image.read(0, 10) == b"\x01" * 10


def test_cache_modes_are_qemus():
    assert set(CACHE_MODES) == {"writeback", "writethrough", "none", "directsync", "unsafe"}
    assert cache_mode("none").direct and not cache_mode("none").writethrough
    assert cache_mode("writethrough").writethrough and not cache_mode("writethrough").direct
    assert cache_mode("unsafe").no_flush
    with pytest.raises(ImageError, match="unknown cache mode"):
        cache_mode("bogus")


def test_writethrough_flushes_after_every_write(raw, monkeypatch):
    syncs = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (syncs.append(fd), real(fd)))
    with open_image(raw, cache="writethrough") as image:
        image.write(0, b"a")
        image.write_zeroes(0, 512)
        assert len(syncs) == 2
    syncs.clear()
    with open_image(raw, cache="unsafe") as image:
        image.write(0, b"a")
        image.flush()
    assert syncs == []


def test_cache_none_uses_o_direct_with_unaligned_requests(tmp_path):
    if not o_direct_works(tmp_path):
        pytest.skip(f"the filesystem holding {tmp_path} refuses O_DIRECT")
    path = tmp_path / "direct.raw"
    create_image(path, "raw", 3 * DIRECT_ALIGN + 1024)
    with open_image(path, cache="none") as image:
        assert image.file.cache.direct
        image.write(DIRECT_ALIGN - 3, b"across a block boundary")
        image.write(image.size - 5, b"12345")            # the partial block at the end of the file
        assert image.read(DIRECT_ALIGN - 3, 23) == b"across a block boundary"
        assert image.read(image.size - 7, 7) == b"\0\x0012345"
    assert os.path.getsize(path) == 3 * DIRECT_ALIGN + 1024   # O_DIRECT's whole blocks did not lengthen it
    data = path.read_bytes()
    assert data[DIRECT_ALIGN - 3:DIRECT_ALIGN + 20] == b"across a block boundary"


def test_o_direct_refused_by_the_filesystem_is_a_clear_error():
    if not os.path.isdir(SHM):
        pytest.skip("no /dev/shm (tmpfs) to try O_DIRECT on")
    path = os.path.join(SHM, f"pykvm-test-{os.getpid()}.raw")
    create_image(path, "raw", 4096)
    try:
        try:
            image = open_image(path, cache="none")
        except ImageError as e:
            assert "O_DIRECT" in str(e) and "cache=writeback" in str(e)
        else:  # a tmpfs that accepts O_DIRECT (Linux >= 6.6) must then work
            with image:
                image.write(1, b"x")
                assert image.read(0, 2) == b"\0x"
    finally:
        os.unlink(path)


def test_probe_and_unknown_formats(raw, tmp_path):
    assert probe_format(raw) == "raw"
    with pytest.raises(ImageError, match="unsupported image format"):
        open_image(raw, format="vmdk")
    with pytest.raises(ImageError, match="could not open"):
        open_image(tmp_path / "missing.raw")


def test_block_image_is_the_interface():
    assert issubclass(RawImage, BlockImage)
    with pytest.raises(TypeError):
        BlockImage(0, read_only=True, cache=cache_mode("writeback"))  # abstract


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=st.lists(operations(32768), max_size=25))
def test_raw_matches_a_bytearray_model(tmp_path, ops):
    path = tmp_path / "model.raw"
    create_image(path, "raw", 32768)
    with open_image(path, cache="unsafe") as image:
        apply_and_compare(image, bytearray(32768), ops)


@pytest.mark.parametrize("text, value", [("0", 0), ("512", 512), ("1k", 1024), ("1K", 1024), ("64M", 64 << 20),
                                         ("1.5G", 3 << 29), ("2T", 2 << 40), ("1E", 1 << 60), ("7b", 7)])
def test_parse_size_like_qemu(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "-5", "1abc", "1.5", "8E", "G"])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("value, text", [(0, "0 B"), (999, "999 B"), (1000, "0.977 KiB"), (1024, "1 KiB"), (200704, "196 KiB"),
                                         (1_024_000, "0.977 MiB"), (1_321_205, "1.26 MiB"),
                                         (1 << 30, "1 GiB"), (230400, "225 KiB"), (1 << 62, "4 EiB")])
def test_size_to_str_like_qemu(value, text):
    assert size_to_str(value) == text
