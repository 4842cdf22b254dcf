"""Faults on the host side: each run ends with a clear error, and the host keeps working.

A sink that raises, a vCPU thread signalled while it runs, an eventfd the C
loop cannot write, a device handler that raises on the I/O thread.  (A full
disk, ``-serial file:/dev/full``, is in test_bad_input.)
"""

from __future__ import annotations

import os
import signal
import threading

import pytest

from pykvm.platform.machine import Machine

pytestmark = pytest.mark.kvm


def test_a_sink_that_raises_ends_the_run_with_the_reason_and_the_host_goes_on():
    def broken(data: bytes) -> None:
        raise RuntimeError("the terminal went away")

    with Machine(memory="16M", serial=broken) as m:
        m.load_guest("hello64")
        result = m.run(timeout=10)
        assert result.ended == "output-error"
        assert "the terminal went away" in result.message
        assert result.serial.startswith(b"Hello from long mode")  # kept for the result all the same
    with Machine(memory="16M") as m:  # the host keeps working
        m.load_guest("hello64")
        assert m.run(timeout=10).ended == "hlt"


def test_a_vcpu_thread_signalled_while_it_runs_finishes_its_work():
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda signo, frame: seen.append(signo))
    try:
        with Machine(memory="16M") as m:
            m.load_guest("primes64u", args=(2_000_000, 0))
            outcome = {}
            worker = threading.Thread(target=lambda: outcome.update(result=m.run(timeout=60)))
            started = threading.Event()
            m.loop.post(started.set)
            worker.start()
            assert started.wait(30)
            for _ in range(50):
                if not worker.is_alive():
                    break
                signal.pthread_kill(worker.ident, signal.SIGUSR1)  # EINTR out of KVM_RUN, then back in
            worker.join(60)
            result = outcome["result"]
            assert result.ended == "reset" and result.regs["rax"] == 148933  # primes below 2,000,000
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_doorbell_eventfd_the_c_loop_cannot_write_falls_back_to_python():
    """The doorbell's eventfd replaced by a read-only file: C's write fails, so Python's transport takes it."""
    from pykvm.virtio.backends import MemoryBackend

    class Echo(MemoryBackend):
        def write(self, data: bytes) -> None:
            super().write(data)
            self.feed(data)

    with Machine(memory="32M") as m:
        _console, transport = m.add_virtio_console(Echo(), notify="c")
        fd = m.virtio_devices[0].fds["doorbell"]
        null = os.open("/dev/null", os.O_RDONLY)
        os.dup2(null, fd)  # the same number, now a file C cannot write an eventfd count to
        os.close(null)
        m.load_guest("virtio64u")
        result = m.run(timeout=30)
        assert result.ended == "reset" and result.regs["rax"] == len(b"hello through virtio-console\n")
        assert transport.notifications >= 2  # every doorbell was still served (by Python)


def test_an_eventfd_closed_under_the_io_thread_does_not_stop_the_others():
    """Regression: poll's POLLNVAL for a closed eventfd raised EBADF and killed the I/O thread."""
    from pykvm.platform.iothread import IoThread

    with IoThread("test-io") as io:
        doomed, alive = io.eventfd(), io.eventfd()
        served = threading.Event()
        io.watch(doomed, lambda: None)
        io.watch(alive, served.set)
        os.close(doomed)
        os.eventfd_write(alive, 1)
        assert served.wait(10), "the I/O thread stopped serving"
        assert io.running and io.errors >= 1
        io._owned.remove(doomed)  # closed by the test, not by the thread's close()
