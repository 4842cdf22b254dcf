"""qcow2 without qemu-img: round trips, refcount invariants (checked by pykvm's own checker),
copy-on-write, backing chains, compressed and zero clusters, corrupt images, crash consistency."""

from __future__ import annotations

import os
import random
import shutil
import struct
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pykvm.block import HostFile, Qcow2Image, check_qcow2, create_image, open_image, probe_format
from pykvm.block.hostfile import cache_mode
from pykvm.block.qcow2 import create_qcow2
from pykvm.block.qcow2.header import (INCOMPAT_CORRUPT, INCOMPAT_DIRTY, KNOWN_FEATURES, V3_CREATE_LENGTH, Header,
                                      parse_header, read_header)
from pykvm.block.qcow2.layout import COMPRESSED, COPIED, OFFSET_MASK, ZERO, CompressedDescriptor
from pykvm.errors import ImageError
from block_helpers import apply_and_compare, o_direct_works, operations, random_guest_io

MiB = 1 << 20
SMALL = 512          # cluster size for the tests: an L2 table then maps 64 clusters (32 KiB)
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def make(tmp_path, name="disk.qcow2", size=4 * MiB, **options) -> str:
    path = str(tmp_path / name)
    create_image(path, "qcow2", size, **options)
    return path


def assert_clean(path, *, leaks_ok=False):
    result = check_qcow2(path)
    assert result.corruptions == 0 and result.check_errors == 0, result.messages
    if not leaks_ok:
        assert result.leaks == 0, result.messages
    return result


def u64(path, offset) -> int:
    with open(path, "rb") as f:
        f.seek(offset)
        return struct.unpack(">Q", f.read(8))[0]


def patch(path, offset, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def l2_entry(path, guest_cluster: int) -> int:
    h = read_header_of(path)
    per_table = h.cluster_size // 8
    l2 = u64(path, h.l1_table_offset + 8 * (guest_cluster // per_table)) & OFFSET_MASK
    return u64(path, l2 + 8 * (guest_cluster % per_table)) if l2 else 0


def read_bytes(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_header_of(path):
    with HostFile(path, read_only=True) as f:
        return read_header(f)


# -- creating ---------------------------------------------------------------

def test_create_uses_qemus_layout(tmp_path):
    path = make(tmp_path, size=1 << 30)
    h = read_header_of(path)
    assert (h.version, h.cluster_size, h.size, h.refcount_bits, h.header_length) == (3, 65536, 1 << 30, 16, 112)
    assert (h.refcount_table_offset, h.l1_table_offset, h.l1_size) == (0x10000, 0x30000, 2)
    assert os.path.getsize(path) == 4 * 65536
    assert {name for name in h.feature_names.values()} == set(KNOWN_FEATURES.values())
    assert assert_clean(path).image_end_offset == 4 * 65536


def test_create_v2_and_options(tmp_path):
    path = make(tmp_path, size=1000, compat="0.10", cluster_size=4096)
    h = read_header_of(path)
    assert (h.version, h.header_length, h.size, h.cluster_size, h.feature_names) == (2, 72, 1024, 4096, {})
    assert_clean(path)
    for bad in (dict(cluster_size=1000), dict(cluster_size=256), dict(compat="0.10", refcount_bits=8),
                dict(compat="0.10", lazy_refcounts=True), dict(compat="2.0"), dict(refcount_bits=3)):
        with pytest.raises(ImageError):
            make(tmp_path, "bad.qcow2", **bad)


def test_create_with_a_backing_file_takes_its_size_and_format(tmp_path):
    create_image(tmp_path / "base.raw", "raw", 3 * MiB)
    assert create_image(tmp_path / "top.qcow2", "qcow2", backing_file="base.raw") == 3 * MiB
    h = read_header_of(tmp_path / "top.qcow2")
    assert (h.backing_file, h.backing_format, h.size) == ("base.raw", "raw", 3 * MiB)
    assert probe_format(tmp_path / "top.qcow2") == "qcow2"


# -- reading and writing ------------------------------------------------------

@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_round_trip_across_clusters_and_l2_tables(tmp_path, compat):
    path = make(tmp_path, size=MiB, cluster_size=SMALL, compat=compat)
    pattern = bytes(range(256)) * 400            # 100 KiB: crosses three L2 tables
    with open_image(path) as image:
        assert isinstance(image, Qcow2Image) and image.size == MiB
        image.write(12345, pattern)
        image.write(MiB - 3, b"end")
        assert image.read(12345, len(pattern)) == pattern
        assert image.read(0, 12345) == bytes(12345)
    with open_image(path, read_only=True) as image:
        assert image.read(12345, len(pattern)) == pattern
        assert image.read(MiB - 3, 3) == b"end"
    result = assert_clean(path)
    assert result.allocated_clusters == -(-(12345 + len(pattern)) // SMALL) - 12345 // SMALL + 1


def test_in_place_overwrite_allocates_nothing(tmp_path):
    path = make(tmp_path, cluster_size=SMALL)
    with open_image(path) as image:
        image.write(0, b"a" * 4096)
    size = os.path.getsize(path)
    with open_image(path) as image:
        image.write(100, b"b" * 1000)
    assert os.path.getsize(path) == size
    assert l2_entry(path, 0) & COPIED
    assert_clean(path)


def test_sequential_io_reads_each_l2_table_once(tmp_path):
    path = make(tmp_path, size=8 * MiB, cluster_size=4096)   # one L2 table maps 2 MiB
    with open_image(path) as image:
        image.write(0, os.urandom(6 * MiB))
    with open_image(path) as image:
        for offset in range(0, 6 * MiB, 4096):
            image.read(offset, 4096)
        assert image.l2_cache.misses == 3
        assert image.l2_cache.hits >= 6 * MiB // 4096 - 3


def test_the_refcount_table_grows(tmp_path):
    # 512-byte clusters, 64-bit refcounts: one refcount block covers 32 KiB and the
    # first refcount table (one cluster, 64 entries) 2 MiB of file.
    path = make(tmp_path, size=32 * MiB, cluster_size=SMALL, refcount_bits=64)
    first_table = read_header_of(path).refcount_table_offset
    rng = random.Random(7)
    writes = [(rng.randrange(0, 32 * MiB - 4096), os.urandom(rng.randrange(1, 4096))) for _ in range(1500)]
    with open_image(path, cache="unsafe") as image:
        for offset, data in writes:
            image.write(offset, data)
    assert read_header_of(path).refcount_table_offset != first_table
    assert read_header_of(path).refcount_table_clusters > 1
    assert os.path.getsize(path) > 2 * MiB
    assert_clean(path)
    model = bytearray(32 * MiB)
    for offset, data in writes:
        model[offset:offset + len(data)] = data
    with open_image(path, read_only=True) as image:
        assert image.read(0, image.size) == model


@pytest.mark.parametrize("bits", [1, 2, 4, 8, 16, 32, 64])
def test_every_refcount_width(tmp_path, bits):
    path = make(tmp_path, size=2 * MiB, cluster_size=SMALL, refcount_bits=bits)
    with open_image(path) as image:
        image.write(1000, b"w" * 300_000)
        image.discard(100_000, 50_000)
    assert_clean(path)
    with open_image(path, read_only=True) as image:
        assert image.read(1000, 1000) == b"w" * 1000
        assert image.read(100_352, 512) == bytes(512)


def test_refcount_overflow_is_refused(tmp_path):
    path = make(tmp_path, cluster_size=SMALL, refcount_bits=1)
    with open_image(path) as image:
        with pytest.raises(ImageError, match="refcount overflow"):
            image.refcounts.set_refcount(0, 2)     # the header cluster already counts 1 of at most 1


# -- zeroes and discards -------------------------------------------------------

def test_v3_zeroes_use_the_zero_flag(tmp_path):
    path = make(tmp_path, cluster_size=SMALL)
    with open_image(path) as image:
        image.write(0, b"x" * 4 * SMALL)
        image.write_zeroes(0, SMALL)                      # keeps the preallocated cluster
        image.write_zeroes(SMALL, SMALL, unmap=True)      # frees it
        image.write_zeroes(2 * SMALL + 10, 20)            # partial: zero bytes written
        image.write_zeroes(MiB, 64 * SMALL)               # unallocated, no backing: nothing to do
        assert image.read(0, 2 * SMALL) == bytes(2 * SMALL)
        assert image.read(2 * SMALL, 40) == b"x" * 10 + bytes(20) + b"x" * 10
    first, second = l2_entry(path, 0), l2_entry(path, 1)
    assert first & ZERO and first & COPIED and first & OFFSET_MASK
    assert second == ZERO
    assert l2_entry(path, MiB // SMALL) == 0
    assert_clean(path)


def test_v2_zeroes_write_zero_bytes_or_unallocate(tmp_path):
    path = make(tmp_path, cluster_size=SMALL, compat="0.10")
    with open_image(path) as image:
        image.write(0, b"x" * 2 * SMALL)
        image.write_zeroes(0, SMALL)
        image.write_zeroes(SMALL, SMALL, unmap=True)
        assert image.read(0, 2 * SMALL) == bytes(2 * SMALL)
    assert l2_entry(path, 0) & COPIED and not l2_entry(path, 0) & ZERO
    assert l2_entry(path, 1) == 0
    assert_clean(path)


def test_discard_unmaps_whole_clusters_only(tmp_path):
    path = make(tmp_path, cluster_size=SMALL)
    with open_image(path) as image:
        image.write(0, b"d" * 3 * SMALL)
        image.discard(100, 2 * SMALL)                  # whole cluster 1 only
        assert image.read(0, 3 * SMALL) == b"d" * SMALL + bytes(SMALL) + b"d" * SMALL
    assert l2_entry(path, 1) == ZERO
    assert_clean(path)


# -- backing files --------------------------------------------------------------

def base_and_top(tmp_path, base_size=MiB, top_size=2 * MiB, compat="1.1"):
    base = os.urandom(base_size)
    (tmp_path / "base.raw").write_bytes(base)
    top = make(tmp_path, "top.qcow2", top_size, cluster_size=SMALL, compat=compat,
               backing_file="base.raw", backing_format="raw")
    return base, top


def test_unallocated_clusters_read_the_backing_file_then_zeroes(tmp_path):
    base, top = base_and_top(tmp_path)
    with open_image(top) as image:
        assert image.backing is not None and image.backing.read_only
        assert image.read(0, MiB) == base
        assert image.read(MiB - 10, 20) == base[-10:] + bytes(10)


def test_partial_cluster_writes_copy_the_backing_file(tmp_path):
    base, top = base_and_top(tmp_path)
    with open_image(top) as image:
        image.write(700, b"new")
    expected = bytearray(base)
    expected[700:703] = b"new"
    with open_image(top) as image:
        assert image.read(0, MiB) == expected
    assert (tmp_path / "base.raw").read_bytes() == base       # the backing file is never written
    assert_clean(top)


def test_relative_backing_names_resolve_against_the_image_directory(tmp_path, monkeypatch):
    base, top = base_and_top(tmp_path)
    monkeypatch.chdir("/")
    with open_image(top) as image:
        assert image.backing_path == os.path.join(str(tmp_path), "base.raw")
        assert image.read(0, 100) == base[:100]


def test_backing_chains_loops_and_missing_files(tmp_path):
    (tmp_path / "a.raw").write_bytes(b"A" * 4096)
    make(tmp_path, "b.qcow2", 4096, cluster_size=SMALL, backing_file="a.raw", backing_format="raw")
    make(tmp_path, "c.qcow2", 4096, cluster_size=SMALL, backing_file="b.qcow2", backing_format="qcow2")
    with open_image(tmp_path / "c.qcow2") as image:
        assert image.read(0, 4) == b"AAAA"
    # a loop: x -> y -> x
    make(tmp_path, "x.qcow2", 4096, backing_file="a.raw", backing_format="raw")
    make(tmp_path, "y.qcow2", 4096, backing_file="x.qcow2", backing_format="qcow2")
    make(tmp_path, "x.qcow2", 4096, backing_file="y.qcow2", backing_format="qcow2")
    with pytest.raises(ImageError, match="loop"):
        open_image(tmp_path / "x.qcow2")
    make(tmp_path, "orphan.qcow2", 4096, backing_file="a.raw", backing_format="raw")
    os.unlink(tmp_path / "a.raw")
    with pytest.raises(ImageError, match="could not open"):
        open_image(tmp_path / "orphan.qcow2")
    with Qcow2Image.open(tmp_path / "orphan.qcow2", read_only=True) as image:   # as qemu-img info
        with pytest.raises(ImageError, match="without its backing file"):
            image.read(0, 1)


def test_deep_chains_are_refused(tmp_path):
    (tmp_path / "0.raw").write_bytes(bytes(512))
    below, fmt = "0.raw", "raw"
    for n in range(1, 20):   # create_qcow2 does not open the backing file (create_image would, and refuse)
        create_qcow2(tmp_path / f"{n}.qcow2", 512, backing_file=below, backing_format=fmt)
        below, fmt = f"{n}.qcow2", "qcow2"
    with pytest.raises(ImageError, match="deeper than"):
        open_image(tmp_path / "19.qcow2")


# -- compressed clusters ----------------------------------------------------------

def add_compressed_cluster(path, guest_cluster: int, content: bytes) -> None:
    """Store ``content`` as a compressed cluster the way QEMU does (raw deflate, wbits -12)."""
    with open_image(path) as image:
        image.write(0, b"\1")                               # an L2 table for cluster 0's range
    with open_image(path) as image:                         # (a fresh open: no clusters reserved)
        cs = image.cluster_size
        deflate = zlib.compressobj(6, zlib.DEFLATED, -12)
        packed = deflate.compress(content) + deflate.flush()
        offset = -(-os.path.getsize(path) // cs) * cs + 100    # deliberately not sector aligned
        patch(path, offset, packed)
        sectors = -(-(offset % 512 + len(packed)) // 512)
        descriptor = CompressedDescriptor(image.cluster_bits)
        entry = COMPRESSED | (sectors - 1) << descriptor.shift | offset
        l2_offset = image.l1[0] & OFFSET_MASK
        patch(path, l2_offset + 8 * guest_cluster, struct.pack(">Q", entry))
        for cluster in range(offset // cs, (offset + len(packed) - 1) // cs + 1):
            image.refcounts.set_refcount(cluster, 1)
        image.refcounts.flush_changes()


def test_compressed_clusters_are_read_and_copied_on_write(tmp_path):
    path = make(tmp_path, cluster_size=4096)
    content = (b"compressible " * 400)[:4096]
    add_compressed_cluster(path, 3, content)
    result = assert_clean(path)
    assert result.compressed_clusters == 1
    with open_image(path) as image:
        assert image.read(3 * 4096, 4096) == content
        image.write(3 * 4096 + 10, b"XYZ")
        assert image.read(3 * 4096, 4096) == content[:10] + b"XYZ" + content[13:]
    assert not l2_entry(path, 3) & COMPRESSED
    assert assert_clean(path).compressed_clusters == 0     # and its old host cluster was freed


def test_a_compressed_cluster_that_does_not_inflate_is_corruption(tmp_path):
    path = make(tmp_path, cluster_size=4096)
    add_compressed_cluster(path, 2, b"z" * 4096)
    entry = l2_entry(path, 2)
    offset, _ = CompressedDescriptor(12).decode(entry)
    patch(path, offset, b"\xff" * 16)
    with open_image(path, read_only=True) as image:
        with pytest.raises(ImageError, match="corrupt qcow2 image.*inflate"):
            image.read(2 * 4096, 1)


# -- the model: random operations against a bytearray ---------------------------

@settings(max_examples=30, **SETTINGS)
@given(ops=st.lists(operations(100_000), max_size=20), compat=st.sampled_from(["0.10", "1.1"]),
       with_backing=st.booleans())
def test_qcow2_matches_a_bytearray_model(tmp_path, ops, compat, with_backing):
    for name in ("top.qcow2", "base.raw"):
        if (tmp_path / name).exists():
            os.unlink(tmp_path / name)
    if with_backing:
        base, path = base_and_top(tmp_path, base_size=60_000, top_size=100_352, compat=compat)
        model = bytearray(base) + bytearray(100_352 - len(base))
        below = bytes(model)
    else:
        path, model, below = make(tmp_path, "top.qcow2", 100_000, cluster_size=SMALL, compat=compat), None, None
        model = bytearray(100_352)
    with open_image(path, cache="unsafe") as image:
        apply_and_compare(image, model, [op for op in ops if op[1] + op[2] <= image.size], below)
    assert_clean(path)
    with open_image(path, read_only=True) as image:
        assert image.read(0, image.size) == model


# -- cache modes ---------------------------------------------------------------

@pytest.mark.parametrize("cache", ["writeback", "writethrough", "none", "directsync", "unsafe"])
def test_every_cache_mode_keeps_the_image_consistent(tmp_path, cache):
    if cache_mode(cache).direct and not o_direct_works(tmp_path):
        pytest.skip(f"the filesystem holding {tmp_path} refuses O_DIRECT")
    path = make(tmp_path, size=MiB, cluster_size=SMALL)
    with open_image(path, cache=cache) as image:
        image.write(333, b"m" * 20_000)
        image.write_zeroes(5000, 3000, unmap=True)
        image.flush()
        image.discard(0, 4096)
        assert image.read(4096, 904) == b"m" * 904
        assert image.read(5000, 3000) == bytes(3000)
    assert_clean(path)


# -- corrupt images: refused before any write ---------------------------------------

def corruptions(path):
    """(description, offset, bytes) patches that each make a valid image invalid."""
    h = read_header_of(path)
    cs = h.cluster_size
    size = os.path.getsize(path)
    l2 = u64(path, h.l1_table_offset) & OFFSET_MASK
    block = u64(path, h.refcount_table_offset)
    q = lambda value: struct.pack(">Q", value)
    i = lambda value: struct.pack(">I", value)
    return [
        ("bad magic", 0, b"QFI\x00"),
        ("unsupported qcow2 version 1", 4, i(1)),
        ("unsupported qcow2 version 4", 4, i(4)),
        ("cluster_bits 8 out of range", 20, i(8)),
        ("cluster_bits 22 out of range", 20, i(22)),
        ("encrypted", 32, i(1)),
        ("L1 table too small", 36, i(0)),
        ("L1 table too large", 36, i((32 << 20) // 8 + 1)),
        ("L1 table at .* unaligned", 40, q(h.l1_table_offset + 8)),
        ("L1 table at .* beyond the end", 40, q(size * 4 // cs * cs)),
        ("refcount table at .* unaligned", 48, q(h.refcount_table_offset + 16)),
        ("refcount table at .* beyond the end", 48, q(size * 4 // cs * cs)),
        ("no refcount table", 56, i(0)),
        ("unsupported incompatible qcow2 features: extended L2 entries \\(bit 4\\)", 72, q(1 << 4)),
        ("unsupported incompatible qcow2 features: unknown feature \\(bit 9\\)", 72, q(1 << 9)),
        ("refcount_order 7", 96, i(7)),
        ("invalid header_length", 100, i(100)),
        ("L1 entry 0 .* unaligned", h.l1_table_offset, q(COPIED | l2 + 8)),
        ("L1 entry 0 .* beyond the end", h.l1_table_offset, q(COPIED | size * 4 // cs * cs)),
        ("L1 entry 0 .* reserved bits", h.l1_table_offset, q(COPIED | 1 << 60 | l2)),
        ("refcount table entry 0 .* unaligned", h.refcount_table_offset, q(block + 24)),
        ("refcount table entry 0 .* beyond the end", h.refcount_table_offset, q(size * 4 // cs * cs)),
        ("overlap: the L2 table of L1 entry 0 and the L1 table", h.l1_table_offset, q(COPIED | h.l1_table_offset)),
        ("overlap: the L2 table of L1 entry 0 and refcount block 0", h.l1_table_offset, q(COPIED | block)),
        ("overlap: the refcount table and the L1 table", 48, q(h.l1_table_offset)),
        ("overlap: refcount block 0 and the L1 table", h.refcount_table_offset, q(h.l1_table_offset)),
        ("overlap: the L2 table of L1 entry 1 and the L2 table of L1 entry 0",
         h.l1_table_offset + 8, q(COPIED | l2)),
        ("backing file name .* does not lie in the header cluster", 8, q(cs - 4) + i(10)),
        ("runs past the header area", V3_CREATE_LENGTH, struct.pack(">II", 0x12345678, cs)),
    ]


def written_image(tmp_path, name="victim.qcow2"):
    path = make(tmp_path, name, size=8 * MiB, cluster_size=4096)    # four L2 tables' worth
    with open_image(path) as image:
        image.write(0, b"v" * 8192)
    return path


def test_every_corruption_is_refused_before_any_write(tmp_path):
    template = written_image(tmp_path, "template.qcow2")
    for description, offset, data in corruptions(template):
        path = str(tmp_path / "corrupt.qcow2")
        shutil.copy(template, path)
        patch(path, offset, data)
        before = read_bytes(path)
        with pytest.raises(ImageError, match=description):
            open_image(path, format="qcow2")
        assert read_bytes(path) == before, description


def test_named_unknown_features_use_the_images_feature_table(tmp_path):
    path = written_image(tmp_path)
    h = read_header_of(path)
    data = read_bytes(path)[:h.cluster_size]
    entry = data.index(b"\x00\x04extended L2 entries")
    patch(path, entry, b"\x00\x07frobnication".ljust(48, b"\0"))
    patch(path, 72, struct.pack(">Q", 1 << 7))
    with pytest.raises(ImageError, match=r"frobnication \(bit 7\)"):
        open_image(path)


def test_the_corrupt_bit_refuses_writing_but_allows_reading(tmp_path):
    path = written_image(tmp_path)
    patch(path, 72, struct.pack(">Q", INCOMPAT_CORRUPT))
    with pytest.raises(ImageError, match="marked corrupt"):
        open_image(path)
    with open_image(path, read_only=True) as image:
        assert image.read(0, 4) == b"vvvv"


def test_a_bad_l2_entry_found_while_running_marks_the_image_corrupt(tmp_path):
    path = written_image(tmp_path)
    h = read_header_of(path)
    l2 = u64(path, h.l1_table_offset) & OFFSET_MASK
    patch(path, l2 + 8, struct.pack(">Q", COPIED | (u64(path, l2 + 8) & OFFSET_MASK) + 512))
    with open_image(path) as image:
        assert image.read(0, 4) == b"vvvv"
        with pytest.raises(ImageError, match="not cluster aligned"):
            image.read(4096, 4)
        assert image.read_only
        with pytest.raises(ImageError, match="read-only"):
            image.write(0, b"x")
    assert read_header_of(path).incompatible_features & INCOMPAT_CORRUPT
    with pytest.raises(ImageError, match="marked corrupt"):
        open_image(path)


def test_a_guest_write_never_lands_on_metadata(tmp_path):
    path = written_image(tmp_path)
    h = read_header_of(path)
    l2 = u64(path, h.l1_table_offset) & OFFSET_MASK
    patch(path, l2 + 8, struct.pack(">Q", COPIED | h.refcount_table_offset))    # cluster 1 -> the refcount table
    table = read_bytes(path)[h.refcount_table_offset:h.refcount_table_offset + 4096]
    with open_image(path) as image:
        with pytest.raises(ImageError, match="mapped onto the refcount table"):
            image.write(4096, b"evil")
    assert read_bytes(path)[h.refcount_table_offset:h.refcount_table_offset + 4096] == table


def test_a_dirty_image_has_its_refcounts_repaired_when_opened_for_writing(tmp_path):
    path = written_image(tmp_path)
    h = read_header_of(path)
    block = u64(path, h.refcount_table_offset)
    l2 = u64(path, h.l1_table_offset) & OFFSET_MASK
    data_cluster = (u64(path, l2) & OFFSET_MASK) // 4096
    patch(path, block + 2 * data_cluster, struct.pack(">H", 0))     # refcount lost: corruption
    patch(path, block + 2 * 60, struct.pack(">H", 1))               # refcount without reference: leak
    patch(path, 72, struct.pack(">Q", INCOMPAT_DIRTY))
    assert check_qcow2(path).exit_code == 2
    with open_image(path, read_only=True) as image:                 # read-only: left as it is
        assert image.read(0, 2) == b"vv"
    assert read_header_of(path).incompatible_features & INCOMPAT_DIRTY
    with open_image(path) as image:
        image.write(8192, b"after")
    assert not read_header_of(path).incompatible_features & INCOMPAT_DIRTY
    assert_clean(path)


def test_autoclear_bits_are_cleared_before_writing(tmp_path):
    path = written_image(tmp_path)
    patch(path, 88, struct.pack(">Q", 0b11))
    with open_image(path, read_only=True):
        pass
    assert read_header_of(path).autoclear_features == 0b11
    with open_image(path):
        pass
    assert read_header_of(path).autoclear_features == 0


def test_unknown_header_extensions_survive_writes(tmp_path):
    path = make(tmp_path, cluster_size=4096)
    h = read_header_of(path)
    end = read_bytes(path)[:4096].index(b"raw external data") + 46   # end of the feature table
    patch(path, end, struct.pack(">II", 0xABCD0123, 5) + b"hello\0\0\0" + bytes(8))
    header_cluster = read_bytes(path)[:4096]
    with open_image(path) as image:
        image.write(0, os.urandom(100_000))
    assert read_bytes(path)[:4096] == header_cluster
    assert (0xABCD0123, b"hello") in read_header_of(path).extensions
    assert h.version == 3


# -- fuzzing the parsers ----------------------------------------------------------

VALID_HEADER = Header(version=3, cluster_bits=12, size=MiB, l1_size=1, l1_table_offset=3 * 4096,
                      refcount_table_offset=4096, refcount_table_clusters=1, backing_file="base.qcow2",
                      backing_format="qcow2").pack()


@settings(max_examples=400, deadline=None)
@given(flips=st.lists(st.tuples(st.integers(0, 700), st.integers(0, 255)), max_size=8),
       cut=st.integers(0, 4096))
def test_header_parser_only_raises_image_errors(flips, cut):
    data = bytearray(VALID_HEADER)
    for offset, value in flips:
        data[offset] = value
    try:
        header = parse_header(bytes(data[:cut]))
    except ImageError:
        return
    assert header.version in (2, 3) and 9 <= header.cluster_bits <= 21


@settings(max_examples=120, **SETTINGS)
@given(flips=st.lists(st.tuples(st.integers(0, 5 * 4096 - 1), st.integers(0, 255)), min_size=1, max_size=6))
def test_damaged_images_fail_only_with_image_errors(tmp_path, flips):
    path = str(tmp_path / "fuzz.qcow2")
    if not os.path.exists(tmp_path / "fuzz-template.qcow2"):
        written_image(tmp_path, "fuzz-template.qcow2")
    shutil.copy(tmp_path / "fuzz-template.qcow2", path)
    for offset, value in flips:
        patch(path, offset, bytes([value]))
    try:
        with open_image(path) as image:
            image.read(0, min(image.size, 3 * 4096))
            image.write(0, b"fuzz")
            image.write_zeroes(4096, 4096)
            image.discard(8192, 4096)
    except ImageError:
        pass


# -- crash consistency: a writer that dies after its N-th write --------------------

class Killed(BaseException):
    """Stands in for SIGKILL: nothing after it runs, no close, no flush."""


def crash_after(monkeypatch, writes: int, torn: bool):
    real = HostFile.pwritev
    count = [0]

    def pwritev(self, offset, buffers):
        count[0] += 1
        if count[0] == writes:
            if torn:   # a torn write: a sector-aligned prefix reached the file
                data = b"".join(bytes(b) for b in buffers)
                cut = (offset + len(data) // 2) // 512 * 512 - offset
                if cut > 0:
                    real(self, offset, [data[:cut]])
            raise Killed
        real(self, offset, buffers)

    monkeypatch.setattr(HostFile, "pwritev", pwritev)


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_a_writer_killed_at_any_write_leaves_at_most_leaks(tmp_path, monkeypatch, compat):
    template = make(tmp_path, "crash-template.qcow2", size=12 * MiB, cluster_size=SMALL, compat=compat)
    with open_image(template, cache="unsafe") as image:      # some data, and a full first refcount table
        random_guest_io(image, random.Random(1), 150)
    rng = random.Random(compat)
    kills = 0
    for trial in range(40):
        path = str(tmp_path / "crash.qcow2")
        shutil.copy(template, path)
        with monkeypatch.context() as m:
            crash_after(m, rng.randrange(1, 400), torn=trial % 2 == 1)
            image = open_image(path, cache=rng.choice(["unsafe", "writeback"]))
            try:
                random_guest_io(image, random.Random(trial), 300)
            except Killed:
                kills += 1
            image.file.close()       # the process is gone: its file descriptor closes, nothing else
            image._closed = True
        assert_clean(path, leaks_ok=True)
        with open_image(path) as image:                        # and it stays usable
            image.write(0, b"after the crash")
        assert_clean(path, leaks_ok=True)
    assert kills >= 35
