"""pykvm's images against the real qemu-img (Debian's qemu-utils), both ways.

Skipped, with the reason, where qemu-img is not installed; .ci/run installs
qemu-utils and turns that skip into a failure.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys

import pytest

from pykvm.bench.common import child_env  # the child imports this tree's pykvm, run from tmp_path
from pykvm.block import check_qcow2, create_image, open_image
from pykvm.block.imgtool import image_info
from block_helpers import o_direct_works
from block_helpers import run_imgtool as run_tool

QEMU_IMG = shutil.which("qemu-img")
QEMU_IO = shutil.which("qemu-io")
pytestmark = pytest.mark.skipif(QEMU_IMG is None, reason="qemu-img is not installed (Debian: apt install qemu-utils)")

MiB = 1 << 20


def qemu_img(*args, cwd=None, check=True) -> subprocess.CompletedProcess:
    result = subprocess.run([QEMU_IMG, *map(str, args)], capture_output=True, text=True, cwd=cwd, check=False)
    if check and result.returncode != 0:
        raise AssertionError(f"qemu-img {' '.join(map(str, args))}: {result.returncode}\n{result.stderr}")
    return result


def qemu_io(path, *commands) -> None:
    args = [QEMU_IO]
    for command in commands:
        args += ["-c", command]
    subprocess.run(args + [str(path)], check=True, capture_output=True)


def qemu_raw(tmp_path, image, *extra) -> bytes:
    out = tmp_path / "qemu-view.raw"
    qemu_img("convert", *extra, "-O", "raw", image, out)
    return out.read_bytes()


def random_io(image, rng: random.Random, count: int, model: bytearray | None = None) -> None:
    """Writes, zeroes and discards at random, mirrored in ``model`` (discards read back)."""
    for _ in range(count):
        offset = rng.randrange(0, image.size - 1)
        length = rng.randrange(1, min(image.size - offset, 70_000) + 1)
        choice = rng.random()
        if choice < 0.6:
            data = rng.randbytes(length) if rng.random() < 0.5 else bytes([rng.randrange(256)]) * length
            image.write(offset, data)
        elif choice < 0.8:
            image.write_zeroes(offset, length, unmap=rng.random() < 0.5)
            data = bytes(length)
        else:
            image.discard(offset, length)
            data = image.read(offset, length)
        if model is not None:
            model[offset:offset + length] = data


# -- images pykvm writes, read by qemu-img -------------------------------------------

@pytest.mark.parametrize("options", [
    dict(compat="1.1"), dict(compat="0.10"), dict(cluster_size=512), dict(cluster_size=4096, compat="0.10"),
    dict(cluster_size=2 << 20), dict(cluster_size=512, refcount_bits=1), dict(cluster_size=1024, refcount_bits=64),
], ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_images_pykvm_writes_pass_qemu_img_check_and_compare(tmp_path, options):
    path = tmp_path / "pykvm.qcow2"
    create_image(path, "qcow2", 6 * MiB, **options)
    model = bytearray(6 * MiB)
    with open_image(path) as image:
        random_io(image, random.Random(str(options)), 60, model)
    assert qemu_img("check", path).returncode == 0
    raw = tmp_path / "model.raw"
    raw.write_bytes(model)
    assert "Images are identical" in qemu_img("compare", "-f", "raw", "-F", "qcow2", raw, path).stdout
    assert qemu_raw(tmp_path, path) == model


def test_growing_the_refcount_table_is_valid_for_qemu(tmp_path):
    path = tmp_path / "grown.qcow2"
    create_image(path, "qcow2", 16 * MiB, cluster_size=512, refcount_bits=64)
    model = bytearray(16 * MiB)
    with open_image(path, cache="unsafe") as image:
        random_io(image, random.Random(3), 120, model)
    assert check_qcow2(path).exit_code == 0
    assert qemu_img("check", path).returncode == 0
    assert qemu_raw(tmp_path, path) == model


def test_backing_chains_pykvm_writes(tmp_path):
    base = os.urandom(2 * MiB)
    (tmp_path / "base.raw").write_bytes(base)
    create_image(tmp_path / "mid.qcow2", "qcow2", backing_file="base.raw", backing_format="raw", cluster_size=4096)
    create_image(tmp_path / "top.qcow2", "qcow2", 3 * MiB, backing_file="mid.qcow2", backing_format="qcow2",
                 compat="0.10")
    model = bytearray(base) + bytearray(MiB)
    with open_image(tmp_path / "mid.qcow2") as image:
        random_io(image, random.Random(1), 20, model)
    with open_image(tmp_path / "top.qcow2") as image:
        random_io(image, random.Random(2), 20, model)
    for name in ("mid.qcow2", "top.qcow2"):
        assert qemu_img("check", tmp_path / name).returncode == 0
    assert qemu_raw(tmp_path, tmp_path / "top.qcow2") == model


# -- images qemu-img writes, read by pykvm --------------------------------------------

def assert_same_view(tmp_path, path, *, compare_bytes=None):
    expected = qemu_raw(tmp_path, path) if compare_bytes is None else compare_bytes
    with open_image(path, read_only=True) as image:
        assert image.read(0, image.size) == expected


@pytest.mark.parametrize("compat", ["0.10", "1.1"])
def test_qemu_images_with_backing_files_read_the_same(tmp_path, compat):
    source = tmp_path / "src.raw"
    source.write_bytes(os.urandom(MiB) + bytes(MiB) + b"pattern!" * (MiB // 8))
    qemu_img("convert", "-O", "qcow2", "-o", f"compat={compat},cluster_size=4096", source, tmp_path / "base.qcow2")
    qemu_img("create", "-f", "qcow2", "-o", f"compat={compat}", "-b", "base.qcow2", "-F", "qcow2",
             tmp_path / "top.qcow2", cwd=tmp_path)
    if QEMU_IO:
        qemu_io(tmp_path / "top.qcow2", "write -P 0x5a 100000 300000", "write -z 600k 128k", "discard 2M 64k")
    assert_same_view(tmp_path, tmp_path / "base.qcow2", compare_bytes=source.read_bytes())
    assert_same_view(tmp_path, tmp_path / "top.qcow2")


def test_compressed_clusters_from_qemu_img_convert(tmp_path):
    source = tmp_path / "src.raw"
    source.write_bytes(os.urandom(70_000) + bytes(70_000) + b"abc" * 100_000 + os.urandom(5))
    for cluster_size in (512, 4096, 65536, 2 << 20):
        image = tmp_path / f"c{cluster_size}.qcow2"
        qemu_img("convert", "-c", "-O", "qcow2", "-o", f"cluster_size={cluster_size}", source, image)
        expected = source.read_bytes()
        expected += bytes(-len(expected) % 512)
        assert_same_view(tmp_path, image, compare_bytes=expected)
        assert check_qcow2(image).compressed_clusters > 0
        with open_image(image) as writable:              # overwrite inside compressed clusters: copy-on-write
            writable.write(250_000, b"over" * 1000)
            expected = expected[:250_000] + b"over" * 1000 + expected[254_000:]
        assert qemu_img("check", image).returncode == 0
        assert qemu_raw(tmp_path, image) == expected


@pytest.mark.skipif(QEMU_IO is None, reason="qemu-io is not installed")
def test_zero_clusters_from_qemu_io(tmp_path):
    path = tmp_path / "z.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", path, "4M")
    qemu_io(path, "write -P 7 0 1M", "write -z 64k 64k", "write -z -u 256k 64k", "write -z 2M 64k")
    assert_same_view(tmp_path, path)
    with open_image(path) as image:
        image.write(64 * 1024 + 100, b"into a zero cluster")
        image.write(2 * MiB + 4096 * 3, b"into a plain zero cluster")
    assert qemu_img("check", path).returncode == 0
    assert_same_view(tmp_path, path)


def test_writing_an_image_with_a_snapshot_keeps_the_snapshot(tmp_path):
    path = tmp_path / "snap.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=4096", path, "2M")
    if QEMU_IO:
        qemu_io(path, "write -P 1 0 512k")
    qemu_img("snapshot", "-c", "before", path)
    before = qemu_raw(tmp_path, path)
    model = bytearray(before)
    with open_image(path) as image:
        random_io(image, random.Random(5), 40, model)
    assert qemu_img("check", path).returncode == 0
    assert qemu_raw(tmp_path, path, "-l", "snapshot.name=before") == before
    assert qemu_raw(tmp_path, path) == model
    assert check_qcow2(path).exit_code == 0


# -- the img tool against qemu-img ---------------------------------------------------------

def test_info_matches_qemu_img_line_by_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    os.mkdir("sub")
    qemu_img("create", "-f", "qcow2", "sub/base.qcow2", "64M")
    qemu_img("create", "-f", "qcow2", "-o", "compat=0.10,cluster_size=4096", "v2.qcow2", "10M")
    qemu_img("create", "-f", "qcow2", "-o", "lazy_refcounts=on,refcount_bits=8", "lazy.qcow2", "1G")
    qemu_img("create", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "sub/top.qcow2")
    qemu_img("create", "-f", "raw", "disk.raw", "3M")
    create_image("ours.qcow2", "qcow2", 5 * MiB + 512, backing_file="disk.raw", backing_format="raw")
    create_image("ours-v2.qcow2", "qcow2", 1 << 40, compat="0.10", cluster_size=2 << 20)
    with open_image("ours.qcow2") as image:
        image.write(0, b"x" * 200_000)
    qemu_img("snapshot", "-c", "snap1", "sub/top.qcow2")
    for name in ("sub/base.qcow2", "v2.qcow2", "lazy.qcow2", "sub/top.qcow2", "disk.raw", "ours.qcow2",
                 "ours-v2.qcow2", os.path.join(tmp_path, "sub/top.qcow2")):
        code, out, err = run_tool(capsys, "info", name)
        assert (code, err) == (0, "")
        assert out == qemu_img("info", name).stdout, name


def test_info_shows_dirty_and_corrupt_bits_as_qemu_img(tmp_path, capsys):
    for bit, name in ((1, "dirty.qcow2"), (2, "corrupt.qcow2")):
        path = tmp_path / name
        qemu_img("create", "-f", "qcow2", "-o", "lazy_refcounts=on", path, "1M")
        with open(path, "r+b") as f:
            f.seek(79)
            f.write(bytes([bit]))
        assert image_info(str(path), "qcow2") == qemu_img("info", path).stdout


def test_create_prints_and_writes_what_qemu_img_does(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    qemu_img("create", "-f", "raw", "base.raw", "1M")
    cases = [["-f", "qcow2", "{}", "1G"], ["-f", "raw", "{}", "1000"], ["-f", "qcow2", "-o", "compat=0.10", "{}", "10M"],
             ["-f", "qcow2", "-o", "cluster_size=4k,compat=0.10", "-b", "base.raw", "-F", "raw", "{}", "2M"],
             ["-f", "qcow2", "-o", "backing_file=base.raw,backing_fmt=raw,compat=1.1", "{}"],
             ["-f", "qcow2", "-o", "lazy_refcounts=on,refcount_bits=8", "{}", "1.5G"],
             ["-f", "qcow2", "{}", "1M", "-o", "cluster_size=512"]]
    for n, case in enumerate(cases):
        ours, theirs = f"ours{n}", f"theirs{n}"
        code, out, err = run_tool(capsys, "create", *[a.format(ours) for a in case])
        assert (code, err) == (0, "")
        expected = qemu_img("create", *[a.format(theirs) for a in case]).stdout
        assert out == expected.replace(theirs, ours), case
        ours_info = qemu_img("info", ours).stdout.splitlines()
        theirs_info = qemu_img("info", theirs).stdout.splitlines()
        skip = ("image:", "disk size:")
        assert [l for l in ours_info if not l.startswith(skip)] == [l for l in theirs_info if not l.startswith(skip)]
        if "qcow2" in case:
            assert qemu_img("check", ours).returncode == 0


def test_check_matches_qemu_img_on_clean_leaky_and_corrupt_images(tmp_path, capsys):
    clean = tmp_path / "template.qcow2"
    qemu_img("create", "-f", "qcow2", "-o", "cluster_size=512", clean, "1M")
    if QEMU_IO:
        qemu_io(clean, "write -P 3 0 2k")
    else:
        with open_image(clean) as image:
            image.write(0, b"\3" * 2048)
    block = 0x400   # qemu-img's layout for 512-byte clusters: header, refcount table, refcount block, L1
    end = os.path.getsize(clean)           # 9 clusters: 4 of metadata, an L2 table, 4 of data
    variants = {"clean": [], "leaky": [(end, bytes(1024)), (block + 2 * 9, b"\0\1"), (block + 2 * 10, b"\0\3")],
                "corrupt": [(block + 2 * 5, b"\0\2"), (block + 2 * 6, b"\0\0"), (end, bytes(512)),
                            (block + 2 * 9, b"\0\1")]}
    for name, patches in variants.items():
        path = tmp_path / f"{name}.qcow2"
        shutil.copy(clean, path)
        with open(path, "r+b") as f:
            for offset, data in patches:
                f.seek(offset)
                f.write(data)
        expected = qemu_img("check", path, check=False)
        code, out, err = run_tool(capsys, "check", path)
        assert (code, out) == (expected.returncode, expected.stdout), name
        assert err == expected.stderr, name
    assert {0, 2, 3} == {qemu_img("check", tmp_path / f"{n}.qcow2", check=False).returncode for n in variants}


def test_convert_both_ways(tmp_path, capsys):
    source = tmp_path / "src.raw"
    source.write_bytes(os.urandom(300_000) + bytes(MiB) + b"tail")
    code, _, err = run_tool(capsys, "convert", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=4096", source,
                            tmp_path / "ours.qcow2")
    assert (code, err) == (0, "")
    assert qemu_img("check", tmp_path / "ours.qcow2").returncode == 0
    assert "Images are identical" in qemu_img("compare", source, tmp_path / "ours.qcow2").stdout
    assert check_qcow2(tmp_path / "ours.qcow2").allocated_clusters == -(-300_000 // 4096) + 1  # zeroes skipped
    qemu_img("convert", "-c", "-O", "qcow2", source, tmp_path / "theirs.qcow2")
    assert run_tool(capsys, "convert", "-O", "raw", tmp_path / "theirs.qcow2", tmp_path / "back.raw")[0] == 0
    back = (tmp_path / "back.raw").read_bytes()
    assert back == source.read_bytes() + bytes(len(back) - len(source.read_bytes()))


# -- crash consistency: SIGKILL at 20 moments --------------------------------------------

# The writer: the tests' random guest I/O, reporting a byte after each operation.
CHILD = r"""import os, random, sys
sys.path.insert(0, os.environ["PYKVM_TESTS_DIR"])
from block_helpers import random_guest_io
from pykvm.block import open_image
path, seed, cache = sys.argv[1], int(sys.argv[2]), sys.argv[3]
image = open_image(path, cache=cache)
os.write(1, b"ready\n")
random_guest_io(image, random.Random(seed), 1 << 60, after_each=lambda: os.write(1, b"."))
"""


def test_sigkill_at_20_moments_leaves_an_image_qemu_img_accepts(tmp_path):
    path = tmp_path / "victim.qcow2"
    create_image(path, "qcow2", 16 * MiB, cluster_size=512)    # small clusters: many allocations per write
    rng = random.Random(2024)
    modes = ("writeback", "writethrough", "unsafe", "none" if o_direct_works(tmp_path) else "writeback")
    for moment in range(20):
        writes = rng.randrange(1, 400)
        cache = modes[moment % 4]
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), str(moment), cache],
                                 stdout=subprocess.PIPE, cwd=tmp_path,
                                 env={**child_env(), "PYKVM_TESTS_DIR": os.path.dirname(__file__)})
        assert child.stdout.readline() == b"ready\n"
        done = 0
        while done < writes:
            chunk = child.stdout.read(writes - done)
            assert chunk, f"the writer died on its own after {done} writes"
            done += len(chunk)
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        result = qemu_img("check", path, check=False)
        assert result.returncode in (0, 3), (moment, result.stdout, result.stderr)
        assert "ERROR" not in result.stderr
    assert os.path.getsize(path) > MiB
    ours = check_qcow2(path)                                      # pykvm's checker agrees
    assert (ours.exit_code, ours.leaks) == (result.returncode, result.stderr.count("Leaked cluster"))
    with open_image(path) as image:                               # still usable by pykvm afterwards
        image.write(0, b"survivor")
    assert qemu_img("check", path, check=False).returncode in (0, 3)
