"""The shared watchdog: kicks at deadlines and for pending output, never after disarm."""

from __future__ import annotations

import threading
import time

from pykvm.watchdog import Watchdog


def test_deadline_kicks_once_and_sets_timed_out():
    dog = Watchdog()
    kicks = []
    watch = dog.arm(kicks.append, 1234, time.perf_counter() + 0.05)
    time.sleep(0.2)
    assert kicks == [1234] and watch.timed_out.is_set()
    dog.disarm(watch)


def test_disarm_before_the_deadline_means_no_kick():
    dog = Watchdog()
    kicks = []
    watch = dog.arm(kicks.append, 1, time.perf_counter() + 0.1)
    dog.disarm(watch)
    time.sleep(0.2)
    assert kicks == [] and not watch.timed_out.is_set()


def test_flush_kicks_only_while_output_is_pending():
    dog = Watchdog()
    kicks = []
    pending = threading.Event()
    watch = dog.arm(kicks.append, 7, None, pending.is_set, interval=0.02)
    time.sleep(0.1)
    assert kicks == []
    pending.set()
    time.sleep(0.1)
    dog.disarm(watch)
    count = len(kicks)
    assert count >= 2 and set(kicks) == {7}
    time.sleep(0.1)
    assert len(kicks) == count  # nothing after disarm


def test_one_thread_serves_several_runs():
    dog = Watchdog()
    kicks = []
    now = time.perf_counter()
    watches = [dog.arm(kicks.append, i, now + 0.02 * (i + 1)) for i in range(3)]
    time.sleep(0.3)
    assert kicks == [0, 1, 2]
    assert sum(t.name == "pykvm-watchdog" for t in threading.enumerate()) >= 1
    for w in watches:
        dog.disarm(w)


def test_nothing_to_watch_starts_no_thread():
    dog = Watchdog()
    dog.arm(lambda _: None, 1, None, None)
    assert dog._thread is None
