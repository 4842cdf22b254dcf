"""A process killed between any two of pykvm's writes to a qcow2 file leaves an image qemu-img accepts.

A SIGKILL loses nothing the process already wrote (it is in the page
cache) and everything it had not: what is left is a *prefix* of its
writes, in program order.  So the test records every change pykvm's qcow2
code makes to the file (``pwritev``, ``truncate``, ``fallocate``), replays
them one by one on a copy of the image it started from, and checks the copy
after each of many of them: no corruption (refcount lower than the
references, a table entry pointing at garbage), leaks at most -- exit 0 or 3
of ``qemu-img check``, never 2.  The workload is built to reach every kind
of metadata change: new L2 tables, new refcount blocks, a refcount table
that outgrows its clusters and moves, in-place overwrites, zeroing with and
without unmap, discards that free clusters (deferred decrements), flushes.

The guest-level version of this, ``pykvm run`` killed twenty times during a
write burst, is in test_virtio_blk_guest.py.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess

import pytest

from pykvm.block import create_image, open_image
from pykvm.block.hostfile import FALLOC_FL_PUNCH_HOLE
from pykvm.block.qcow2 import check_qcow2

QEMU_IMG = shutil.which("qemu-img")


def record_changes(image) -> list[tuple]:
    """Make ``image``'s host file log every change it makes, in order; return the log."""
    file, log = image.file, []
    pwritev, truncate, fallocate = file.pwritev, file.truncate, file._fallocate

    def logged_pwritev(offset, buffers):
        log.append(("write", offset, b"".join(bytes(memoryview(b).cast("B")) for b in buffers)))
        pwritev(offset, buffers)

    def logged_truncate(size):
        log.append(("truncate", size))
        truncate(size)

    def logged_fallocate(mode, offset, length):
        done = fallocate(mode, offset, length)
        if done:
            log.append(("zero", offset, length, bool(mode & FALLOC_FL_PUNCH_HOLE)))
        return done

    file.pwritev, file.truncate, file._fallocate = logged_pwritev, logged_truncate, logged_fallocate
    return log


def replay(fd: int, change: tuple) -> None:
    if change[0] == "write":
        os.pwrite(fd, change[2], change[1])
    elif change[0] == "truncate":
        os.ftruncate(fd, change[1])
    else:
        _, offset, length, keep_size = change
        size = os.fstat(fd).st_size
        end = min(offset + length, size) if keep_size else offset + length
        if end > offset:
            os.pwrite(fd, bytes(end - offset), offset)


def workload(image, rng: random.Random) -> None:
    size, done = image.size, []
    for step in range(400):
        what = rng.random()
        offset = rng.randrange(0, size - 65536) // 512 * 512
        if what < 0.7 or not done:
            image.write(offset, bytes([step & 0xFF]) * rng.choice([512, 4096, 16384, 20480]))
            done.append(offset)
        elif what < 0.8:
            image.write(rng.choice(done), b"\x77" * 4096)  # an overwrite: in place
        elif what < 0.9:
            image.write_zeroes(rng.choice(done), 8192, unmap=rng.random() < 0.5)
        else:
            image.discard(rng.choice(done), 16384)
        if step % 40 == 39:
            image.flush()


@pytest.mark.parametrize("cache", ["writeback", "unsafe"])
def test_every_prefix_of_the_writes_is_a_consistent_image(tmp_path, cache):
    path, start = tmp_path / "live.qcow2", tmp_path / "start.qcow2"
    # 512-byte clusters and 64-bit refcounts: a refcount block covers 32 KiB, the first refcount table
    # 2 MiB, so a few MiB of writes need new blocks and a bigger, moved table.
    create_image(path, "qcow2", 64 << 20, cluster_size=512, refcount_bits=64)
    shutil.copy(path, start)
    image = open_image(path, format="qcow2", cache=cache)
    log = record_changes(image)
    refcount_table = image.header.refcount_table_offset
    workload(image, random.Random(14))
    assert image.header.refcount_table_offset != refcount_table  # the table moved
    image.close()
    assert check_qcow2(path).exit_code == 0  # a clean close leaks nothing

    rng = random.Random(2)
    checked = set(rng.sample(range(len(log)), min(len(log), 120)))
    checked.update(i for i, change in enumerate(log) if change[0] == "write" and change[1] < 512)  # header writes
    replica = tmp_path / "replica.qcow2"
    shutil.copy(start, replica)
    fd = os.open(replica, os.O_RDWR)
    outcomes = {0: 0, 3: 0}
    try:
        for i, change in enumerate(log):
            replay(fd, change)
            if i in checked:
                code = check_qcow2(replica).exit_code
                assert code in (0, 3), f"killed after change {i} of {len(log)} ({change[:2]}): exit {code}\n" \
                                       f"{check_qcow2(replica).messages[:5]}"
                outcomes[code] += 1
                if QEMU_IMG and i % 40 == 0:
                    qemu = subprocess.run([QEMU_IMG, "check", str(replica)], capture_output=True, text=True)
                    assert qemu.returncode in (0, 3), f"after change {i}: qemu-img check says\n{qemu.stdout}"
    finally:
        os.close(fd)
    assert outcomes[3] > 0  # some prefixes did leak (the allocation pool): the check sees leaks
