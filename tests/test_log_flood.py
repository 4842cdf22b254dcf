"""A guest cannot flood the host's log: every line it can trigger is rate-limited (pykvm.ratelimit).

Regression: every misaligned virtio-mmio access logged a WARNING (100,000
accesses, 12.5 MB of log), and new virtqueue error messages were logged
without limit once 256 distinct ones had been seen.
"""

from __future__ import annotations

import logging

from pykvm.platform.bus import Bus
from pykvm.ratelimit import GuestLog
from pykvm.virtio import VirtioConsole, VirtioMmioDevice
from pykvm.virtio.queue import VirtqueueError


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_guest_log_once_per_key_and_a_burst_per_interval(caplog):
    clock = Clock()
    glog = GuestLog("pykvm.test", burst=5, interval=1.0, max_keys=100, clock=clock)
    with caplog.at_level(logging.WARNING, "pykvm.test"):
        for key in range(50):
            glog.warning(key, "line %d", key)
        assert len(caplog.records) == 5  # the burst, then held back
        for _ in range(10):
            glog.warning(0, "line %d", 0)  # a repeat: never again at WARNING
        assert len(caplog.records) == 5
        clock.now = 1.5
        glog.warning(999, "line %d", 999)
        assert caplog.records[-1].getMessage() == "line 999 (45 similar lines held back)"
        clock.now = 1000.0
        for key in range(1000, 2000):  # more keys than it remembers: bounded for good
            clock.now += 1.0
            glog.warning(key, "line %d", key)
    assert len(caplog.records) <= 100 + 5
    assert glog.suppressed > 0


def test_misaligned_virtio_mmio_accesses_log_a_bounded_number_of_lines(caplog, memory):
    transport = VirtioMmioDevice(VirtioConsole(None), memory)
    with caplog.at_level(logging.DEBUG):
        caplog.set_level(logging.WARNING)
        for i in range(100_000):
            transport.read(1 + (i % 3), 2)  # never an aligned 32-bit access
            transport.write(2, b"\x01")
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert 1 <= len(warnings) <= 25, len(warnings)


def test_distinct_virtqueue_errors_log_a_bounded_number_of_lines(caplog, memory):
    transport = VirtioMmioDevice(VirtioConsole(None), memory)
    with caplog.at_level(logging.WARNING):
        for i in range(5000):
            transport._device_error(VirtqueueError(f"virtqueue 0: descriptor {i} points nowhere"))
    assert transport.errors == 5000
    assert len(caplog.records) <= 25


def test_unmapped_accesses_log_a_bounded_number_of_lines(caplog):
    bus = Bus("pio")
    with caplog.at_level(logging.WARNING):
        for port in range(0x10000):
            bus.read(port, 1)
            bus.write(port, b"\0")
    assert bus.unmapped == 2 * 0x10000
    assert len(caplog.records) <= 25
