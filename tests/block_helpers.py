"""Shared by the block-layer tests: guest I/O against a bytearray model, random I/O, the img tool.

A plain module (not a test module): test_block_raw, test_qcow2,
test_qcow2_qemu and test_imgtool import it, and the crash-consistency test's
child process imports it too (tests/ on its path).
"""

from __future__ import annotations

import os
import random

from hypothesis import strategies as st

from pykvm.block.imgtool import main as imgtool_main


def o_direct_works(directory) -> bool:
    """Whether the filesystem holding ``directory`` accepts O_DIRECT (tmpfs before Linux 6.6 does not)."""
    path = os.path.join(directory, ".o-direct-probe")
    try:
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_DIRECT, 0o600))
        return True
    except OSError:
        return False
    finally:
        if os.path.exists(path):
            os.unlink(path)


@st.composite
def operations(draw, size):
    kind = draw(st.sampled_from(["write", "zeroes", "zeroes-unmap", "discard", "read", "flush"]))
    offset = draw(st.integers(0, size))
    length = draw(st.integers(0, min(size - offset, 9000)))
    return kind, offset, length, draw(st.integers(1, 255))


def apply_and_compare(image, model: bytearray, ops, backing: bytes | None = None) -> None:
    """Run operations on an image and a bytearray model; every read must match the model."""
    for kind, offset, length, byte in ops:
        end = offset + length
        if kind == "write":
            image.write(offset, bytes([byte]) * length)
            model[offset:end] = bytes([byte]) * length
        elif kind.startswith("zeroes"):
            image.write_zeroes(offset, length, unmap=kind == "zeroes-unmap")
            model[offset:end] = bytes(length)
        elif kind == "discard":
            image.discard(offset, length)
            after = image.read(offset, length)
            under = backing[offset:end] if backing is not None else bytes(length)
            for i, value in enumerate(after):   # advisory: as before, zero, or what lies below
                assert value in (model[offset + i], 0, under[i]), (kind, offset, length, i)
            model[offset:end] = after
        elif kind == "flush":
            image.flush()
        assert image.read(offset, length) == model[offset:end]
    assert image.read(0, image.size) == model


def random_guest_io(image, rng: random.Random, count: int, after_each=lambda: None) -> None:
    """Random writes, zeroes, discards and flushes (tests/test_qcow2_qemu.py runs it in a child to SIGKILL)."""
    for _ in range(count):
        offset = rng.randrange(0, image.size - 5000)
        choice = rng.random()
        if choice < 0.7:
            image.write(offset, bytes([rng.randrange(256)]) * rng.randrange(1, 5000))
        elif choice < 0.85:
            image.write_zeroes(offset, rng.randrange(1, 5000), unmap=rng.random() < 0.5)
        elif choice < 0.95:
            image.discard(offset, rng.randrange(1, 5000))
        else:
            image.flush()
        after_each()


def run_imgtool(capsys, *args) -> tuple[int, str, str]:
    code = imgtool_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err
