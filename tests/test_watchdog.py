"""The shared watchdog: kicks at deadlines and for pending output, never after disarm, never spins.

No test sleeps for a fixed time and then looks: each waits (with a generous
bound) for an event a kick sets, and proves that something did *not* happen
by the order of events -- a later deadline firing shows that an earlier one
would have fired by then.
"""

from __future__ import annotations

import math
import threading
import time

import pytest

from pykvm.platform.watchdog import Watchdog

BOUND = 10.0  # seconds: only a broken watchdog takes this long


class Kicks:
    """A kick callable that records its label and sets an event."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.events: dict[str, threading.Event] = {}
        self.lock = threading.Lock()

    def __call__(self, label: str):
        event = self.events.setdefault(label, threading.Event())

        def kick() -> None:
            with self.lock:
                self.log.append(label)
            event.set()
        return kick

    def wait(self, label: str) -> None:
        assert self.events[label].wait(BOUND), f"no kick for {label} within {BOUND} s"


def test_deadline_kicks_once_and_sets_timed_out():
    dog, kicks = Watchdog(), Kicks()
    watch = dog.arm(kicks("a"), time.perf_counter() + 0.02)
    kicks.wait("a")
    assert watch.timed_out.wait(BOUND)
    later = dog.arm(kicks("later"), time.perf_counter() + 0.02)  # proof that "a" is not kicked again
    kicks.wait("later")
    assert kicks.log == ["a", "later"]
    dog.disarm(watch)
    dog.disarm(later)


def test_disarm_before_the_deadline_means_no_kick():
    dog, kicks = Watchdog(), Kicks()
    now = time.perf_counter()
    early = dog.arm(kicks("early"), now + 0.05)
    dog.disarm(early)
    late = dog.arm(kicks("late"), now + 0.1)
    kicks.wait("late")  # the disarmed deadline was earlier: it would have come first
    assert kicks.log == ["late"] and not early.timed_out.is_set()
    dog.disarm(late)


def test_flush_kicks_only_while_output_is_pending():
    dog, kicks = Watchdog(), Kicks()
    pending = threading.Event()
    flusher = dog.arm(kicks("flush"), None, pending.is_set, interval=0.01)
    marker = dog.arm(kicks("marker"), time.perf_counter() + 0.1)
    kicks.wait("marker")  # ten flush intervals passed with nothing pending
    dog.disarm(marker)
    assert "flush" not in kicks.log
    pending.set()
    kicks.wait("flush")
    dog.disarm(flusher)
    count = kicks.log.count("flush")
    after = dog.arm(kicks("after"), time.perf_counter() + 0.1)
    kicks.wait("after")  # ten more intervals: a live flusher would have kicked again
    assert kicks.log.count("flush") == count
    dog.disarm(after)


def test_one_thread_serves_several_runs_in_deadline_order():
    dog, kicks = Watchdog(), Kicks()
    now = time.perf_counter()
    watches = [dog.arm(kicks(str(i)), now + 0.02 * (3 - i)) for i in range(3)]
    for i in range(3):
        kicks.wait(str(i))
    assert kicks.log == ["2", "1", "0"]
    assert sum(t.name == "pykvm-watchdog" for t in threading.enumerate()) >= 1
    for w in watches:
        dog.disarm(w)


def test_nothing_to_watch_starts_no_thread():
    dog = Watchdog()
    dog.arm(lambda: None, None, None)
    assert dog._thread is None


@pytest.mark.parametrize("deadline", [math.nan, math.inf, -math.inf])
def test_a_deadline_that_is_not_a_time_is_refused(deadline):
    """Regression: a NaN deadline made the thread spin holding its lock, and Ctrl-C could not stop it."""
    dog = Watchdog()
    with pytest.raises(ValueError, match="finite"):
        dog.arm(lambda: None, deadline)
    assert dog._thread is None


@pytest.mark.parametrize("interval", [0.0, -1.0, math.nan])
def test_a_flush_interval_that_cannot_be_waited_is_refused(interval):
    with pytest.raises(ValueError, match="interval"):
        Watchdog().arm(lambda: None, None, lambda: True, interval=interval)
