"""The PIO/MMIO bus: range checks, dispatch, unmapped accesses, statistics."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm.platform.bus import Bus, BusError, UnmappedAccess


class Recorder:
    """A device that logs its accesses and answers reads with its offset."""

    def __init__(self, name: str = "rec") -> None:
        self.name = name
        self.accesses: list[tuple[str, int, object]] = []

    def read(self, offset: int, size: int) -> bytes:
        self.accesses.append(("read", offset, size))
        return bytes([offset & 0xFF] * size)

    def write(self, offset: int, data: bytes) -> None:
        self.accesses.append(("write", offset, bytes(data)))


# -- registration checks ------------------------------------------------------


def test_range_boundaries():
    bus = Bus("pio")
    dev = Recorder()
    bus.register(0x3F8, 8, dev)
    assert bus.find(0x3F7) is None
    assert bus.find(0x3F8) == (0x3F8, dev)
    assert bus.find(0x3FF) == (0x3F8, dev)
    assert bus.find(0x400) is None
    assert bus.read(0x3F8, 1) == b"\x00"
    assert bus.read(0x3FF, 1) == b"\x07"
    assert bus.read(0x400, 1) == b"\xff"
    assert dev.accesses == [("read", 0, 1), ("read", 7, 1)]


def test_zero_length_rejected():
    bus = Bus("pio")
    with pytest.raises(BusError, match="zero length"):
        bus.register(0x80, 0, Recorder())
    with pytest.raises(BusError):
        bus.register(0x80, -1, Recorder())
    assert len(bus) == 0


def test_pio_overflow():
    bus = Bus("pio")
    bus.register(0xFFFF, 1, Recorder("last"))  # ends exactly at 0x10000
    assert bus.find(0xFFFF) is not None
    with pytest.raises(BusError, match="0x10000"):
        bus.register(0xFFFF, 2, Recorder("too-long"))
    with pytest.raises(BusError):
        bus.register(0x10000, 1, Recorder("past-end"))
    with pytest.raises(BusError):
        bus.register(-1, 1, Recorder("negative"))


def test_mmio_overflow():
    bus = Bus("mmio")
    top = 2**64
    bus.register(top - 0x1000, 0x1000, Recorder("top-page"))
    assert bus.find(top - 1) is not None
    with pytest.raises(BusError):
        bus.register(top - 0x1000, 0x1001, Recorder("too-long"))
    with pytest.raises(BusError):
        bus.register(top, 1, Recorder("past-end"))


def test_pio_space_is_not_mmio_space():
    # 0x10000 is a perfectly good MMIO address.
    Bus("mmio").register(0x10000, 0x1000, Recorder())
    with pytest.raises(ValueError):
        Bus("isa")


@pytest.mark.parametrize(
    "base, length",
    [
        (0x3F8, 8),  # identical
        (0x3F0, 9),  # overlaps the first byte
        (0x3FF, 4),  # overlaps the last byte
        (0x3FA, 2),  # inside
        (0x3F0, 0x20),  # contains
    ],
)
def test_overlap_rejected_naming_both_ranges(base, length):
    bus = Bus("pio")
    bus.register(0x3F8, 8, Recorder("uart"))
    with pytest.raises(BusError) as error:
        bus.register(base, length, Recorder("intruder"))
    message = str(error.value)
    assert "0x3f8-0x3ff (uart)" in message
    assert f"{base:#x}-{base + length - 1:#x} (intruder)" in message
    assert len(bus) == 1


def test_adjacent_ranges_accepted():
    bus = Bus("pio")
    low, mid, high = Recorder("low"), Recorder("mid"), Recorder("high")
    bus.register(0x3F8, 8, mid)
    bus.register(0x3F0, 8, low)
    bus.register(0x400, 8, high)
    assert [m.name for m in bus] == ["low", "mid", "high"]
    assert bus.find(0x3F7) == (0x3F0, low)
    assert bus.find(0x3F8) == (0x3F8, mid)
    assert bus.find(0x400) == (0x400, high)


ranges = st.lists(
    st.tuples(st.integers(0, 0xFFFF), st.integers(1, 0x40)), max_size=40
)


@given(ranges)
def test_random_ranges_never_overlap(candidates):
    """Accepted ranges are disjoint, found at both ends, and every rejection
    is justified by a real overlap or overflow (checked by brute force)."""
    bus = Bus("pio")
    accepted: list[tuple[int, int]] = []
    for n, (base, length) in enumerate(candidates):
        conflict = base + length > 0x10000 or any(
            base < b + l and b < base + length for b, l in accepted
        )
        try:
            bus.register(base, length, Recorder(f"dev{n}"))
        except BusError:
            assert conflict
        else:
            assert not conflict
            accepted.append((base, length))
    listed = [(m.base, m.length) for m in bus]
    assert listed == sorted(accepted)
    for (b1, l1), (b2, _) in zip(listed, listed[1:]):
        assert b1 + l1 <= b2
    for base, length in accepted:
        assert bus.find(base)[0] == base
        assert bus.find(base + length - 1)[0] == base


def test_duplicate_names_rejected_but_one_device_may_have_two_ranges():
    bus = Bus("pio")
    dev = Recorder("kbd")
    bus.register(0x60, 1, dev)
    bus.register(0x64, 1, dev)
    assert bus.find(0x60)[1] is bus.find(0x64)[1] is dev
    with pytest.raises(BusError, match="name"):
        bus.register(0x70, 1, Recorder("kbd"))
    bus.register(0x70, 1, Recorder("kbd"), name="rtc")
    assert [m.name for m in bus] == ["kbd", "kbd", "rtc"]


def test_default_name_is_class_name():
    class Nameless:
        def read(self, offset, size):
            return bytes(size)

        def write(self, offset, data):
            pass

    bus = Bus("mmio")
    bus.register(0xD0000000, 0x200, Nameless())
    assert [m.name for m in bus] == ["Nameless"]


def test_unregister_then_register_again():
    bus = Bus("pio")
    first, second = Recorder("first"), Recorder("second")
    bus.register(0x80, 1, first)
    with pytest.raises(BusError):
        bus.register(0x80, 1, second)
    bus.unregister(0x80)
    assert bus.find(0x80) is None
    bus.register(0x80, 1, second)
    assert bus.find(0x80) == (0x80, second)
    bus.unregister(second)
    assert len(bus) == 0
    with pytest.raises(BusError):
        bus.unregister(0x80)
    with pytest.raises(BusError):
        bus.unregister(second)


def test_unregister_device_removes_all_its_ranges():
    bus = Bus("pio")
    dev, other = Recorder("kbd"), Recorder("other")
    bus.register(0x60, 1, dev)
    bus.register(0x62, 1, other)
    bus.register(0x64, 1, dev)
    bus.unregister(dev)
    assert [m.name for m in bus] == ["other"]
    assert bus.find(0x61) is None and bus.find(0x62)[1] is other


def test_unregister_needs_exact_base():
    bus = Bus("pio")
    bus.register(0x3F8, 8, Recorder())
    with pytest.raises(BusError):
        bus.unregister(0x3F9)
    assert len(bus) == 1


# -- dispatch -----------------------------------------------------------------


def test_device_sees_offsets_and_data():
    bus = Bus("mmio")
    dev = Recorder()
    bus.register(0xD0000000, 0x200, dev)
    bus.write(0xD0000010, b"\x01\x02\x03\x04")
    assert bus.read(0xD00001FC, 4) == b"\xfc" * 4
    assert dev.accesses == [
        ("write", 0x10, b"\x01\x02\x03\x04"),
        ("read", 0x1FC, 4),
    ]


def test_access_running_past_the_range_is_unmapped():
    bus = Bus("pio")
    dev = Recorder()
    bus.register(0x80, 1, dev)
    assert bus.read(0x80, 2) == b"\xff\xff"
    bus.write(0x80, b"\x12\x34")
    assert dev.accesses == []
    assert bus.unmapped == 2
    # ... even when the next range is adjacent: an access never spans devices.
    bus.register(0x81, 1, Recorder("next"))
    assert bus.read(0x80, 2) == b"\xff\xff"


def test_device_returning_wrong_size_is_an_error():
    class Short(Recorder):
        def read(self, offset, size):
            return b"\x00"

    bus = Bus("pio")
    bus.register(0x700, 4, Short())
    with pytest.raises(BusError, match="1 bytes for a 4-byte read"):
        bus.read(0x700, 4)


def test_stats_count_accesses_per_device():
    bus = Bus("pio")
    bus.register(0x80, 1, Recorder("post"))
    bus.register(0xF4, 1, Recorder("exit"))
    for _ in range(3):
        bus.write(0x80, b"\x00")
    bus.read(0x80, 1)
    bus.read(0xF4, 1)
    bus.read(0x1234, 1)
    assert bus.stats == {"post": 4, "exit": 1}
    assert bus.unmapped == 1


def test_device_stop_propagates():
    class Stopper(Recorder):
        def write(self, offset, data):
            raise RuntimeError("stop")

    bus = Bus("pio")
    bus.register(0xF4, 1, Stopper())
    with pytest.raises(RuntimeError, match="stop"):
        bus.write(0xF4, b"\x01")


# -- unmapped accesses ----------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_unmapped_read_is_all_ones(size):
    assert Bus("mmio").read(0xE0000000, size) == b"\xff" * size
    assert Bus("pio").read(0x700, size) == b"\xff" * size


def test_unmapped_logging_is_rate_limited(caplog):
    bus = Bus("pio")
    with caplog.at_level(logging.DEBUG, logger="pykvm.bus"):
        bus.write(0x1234, b"\x00", rip=0x100012)
        bus.write(0x1234, b"\x00", rip=0x100012)
        bus.read(0x1234, 1)
        bus.read(0x4321, 2)
    levels = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert levels == [
        (logging.WARNING, "unmapped PIO write to port 0x1234 (1 byte) at RIP 0x100012"),
        (logging.DEBUG, "unmapped PIO write to port 0x1234 (1 byte) at RIP 0x100012"),
        (logging.DEBUG, "unmapped PIO read from port 0x1234 (1 byte)"),
        (logging.WARNING, "unmapped PIO read from port 0x4321 (2 bytes)"),
    ]


def test_strict_bus_raises_with_port_and_rip():
    bus = Bus("pio", strict=True)
    with pytest.raises(UnmappedAccess) as error:
        bus.write(0x1234, b"\x00", rip=0x100012)
    assert str(error.value) == (
        "unmapped PIO write to port 0x1234 (1 byte) at RIP 0x100012"
    )
    e = error.value
    assert (e.kind, e.address, e.size, e.is_write, e.rip) == (
        "pio", 0x1234, 1, True, 0x100012,
    )


def test_strict_mmio_read_message():
    bus = Bus("mmio")
    bus.strict = True  # strictness can be switched on later
    with pytest.raises(UnmappedAccess, match=r"unmapped MMIO read from address "
                       r"0xe0000000 \(4 bytes\) at RIP 0xffffffff81000000"):
        bus.read(0xE0000000, 4, rip=0xFFFFFFFF81000000)


def test_strict_bus_still_serves_mapped_ranges():
    bus = Bus("pio", strict=True)
    bus.register(0x80, 1, Recorder())
    assert bus.read(0x80, 1) == b"\x00"
