"""IoThread: one host thread per machine waiting on eventfds (no KVM needed)."""

from __future__ import annotations

import logging
import os
import threading
import time

import pytest

from pykvm.platform.iothread import IoThread


def wait_for(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.002)


def test_a_signalled_eventfd_runs_its_handler_on_the_thread():
    seen = []
    with IoThread("test-io") as io:
        fd = io.eventfd()
        io.watch(fd, lambda: seen.append(threading.current_thread().name))
        assert io.running
        os.eventfd_write(fd, 1)
        wait_for(lambda: seen)
        assert seen == ["test-io"]
        assert io.wakeups[fd] == 1


def test_signals_before_the_read_coalesce_into_one_call():
    calls = []
    gate = threading.Event()
    with IoThread() as io:
        first, second = io.eventfd(), io.eventfd()
        io.watch(first, lambda: gate.wait(5))  # holds the thread while `second` is signalled 3 times
        io.watch(second, lambda: calls.append(1))
        os.eventfd_write(first, 1)
        time.sleep(0.05)
        for _ in range(3):
            os.eventfd_write(second, 1)
        gate.set()
        wait_for(lambda: calls)
        time.sleep(0.05)
        assert calls == [1]


def test_watch_after_start_and_unwatch():
    calls = []
    with IoThread() as io:
        a, b = io.eventfd(), io.eventfd()
        io.watch(a, lambda: calls.append("a"))
        io.watch(b, lambda: calls.append("b"))  # the running thread picks it up
        os.eventfd_write(b, 1)
        wait_for(lambda: "b" in calls)
        io.unwatch(b)
        time.sleep(0.02)
        os.eventfd_write(b, 1)
        os.eventfd_write(a, 1)
        wait_for(lambda: "a" in calls)
        time.sleep(0.05)
        assert calls == ["b", "a"]
        with pytest.raises(ValueError):
            io.watch(a, lambda: None)


def test_a_failing_handler_is_logged_and_the_thread_carries_on(caplog):
    calls = []

    def broken():
        raise RuntimeError("device bug")

    with caplog.at_level(logging.ERROR, logger="pykvm.iothread"), IoThread() as io:
        bad, good = io.eventfd(), io.eventfd()
        io.watch(bad, broken)
        io.watch(good, lambda: calls.append(1))
        os.eventfd_write(bad, 1)
        wait_for(lambda: io.errors == 1)
        os.eventfd_write(good, 1)
        wait_for(lambda: calls)
    assert "device bug" in caplog.text


def test_close_joins_the_thread_and_closes_every_eventfd(open_fd_count):
    before_fds, before_threads = open_fd_count(), threading.active_count()
    for _ in range(20):
        io = IoThread()
        fds = [io.eventfd() for _ in range(4)]
        for fd in fds:
            io.watch(fd, lambda: None)
        os.eventfd_write(fds[0], 1)
        io.close()
        io.close()  # twice is fine
        assert not io.running
        with pytest.raises(ValueError):
            io.eventfd()
    assert open_fd_count() == before_fds
    assert threading.active_count() == before_threads


def test_close_waits_for_a_running_handler():
    done = []
    io = IoThread()
    fd = io.eventfd()
    io.watch(fd, lambda: (time.sleep(0.1), done.append(1)))
    os.eventfd_write(fd, 1)
    time.sleep(0.02)
    io.close()
    assert done == [1]
