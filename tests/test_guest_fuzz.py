"""The hostile guest: fuzz64u hits every register of every device with seeded random accesses.

CI runs one seed (100,000 accesses); ``make fuzz`` runs 20 and docs/reliability.md
holds the latest figures.  The promises: the host raises nothing outside its
own error types, it does not crash, and afterwards the guest still reaches the
debug-exit port, having made every access it planned.
"""

from __future__ import annotations

import pytest

from pykvm.guests.fuzzplan import MAY_READ, Target, build_plan, free_ranges, results

pytestmark = pytest.mark.kvm


def test_one_seed_of_100000_accesses():
    from pykvm.reliability.guest_fuzz import EXIT_STATUS, fuzz_once

    r = fuzz_once(seed=1, count=100_000)
    assert r.reached_exit and r.accesses == 100_000, r
    assert (r.ended, r.status) == ("debug-exit", EXIT_STATUS), r.message
    assert r.bus_unmapped > 10_000  # it really went off the map, not only to the devices


def test_the_plan_covers_every_device_and_spares_the_exit():
    from pykvm.platform import layout
    from pykvm.platform.machine import Machine
    from pykvm.reliability.guest_fuzz import targets_for
    from pykvm.virtio.backends import MemoryBackend

    with Machine(memory="16M") as m:
        m.add_virtio_console(MemoryBackend())
        targets = targets_for(m)
    named = {t.what for t in targets}
    assert {"com1", "port80", "i8042", "unmapped ports", "unmapped MMIO"} <= named
    assert any("queue addresses" in t.what and t.value_span for t in targets)
    assert not any(t.kind == "pio" and t.base <= layout.DEBUG_EXIT_PORT < t.base + t.length for t in targets)
    i8042 = next(t for t in targets if t.what == "i8042")
    assert i8042.flags == MAY_READ


def test_plan_layout_and_results():
    plan = build_plan([Target("pio", 0x80, 1)], seed=5, count=10, exit_port=0xF4, exit_value=1)
    assert plan[:8] == b"PYKVFUZZ" and results(plan) == (0, 0)
    with pytest.raises(ValueError):
        build_plan([], seed=1, count=1, exit_port=0xF4, exit_value=1)


def test_free_ranges():
    assert free_ranges(0, 100, [(10, 5), (50, 60)]) == [(0, 10), (15, 35)]
    assert free_ranges(0, 10, []) == [(0, 10)]
