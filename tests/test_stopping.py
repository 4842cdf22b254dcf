"""Stopping a running guest from another thread: request_stop, close() of the machine or the vCPU.

Regression: ``Machine.close()`` while ``run()`` ran on another thread unmapped
``kvm_run`` under the C loop and killed the process with SIGSEGV (7 of 7
tries with spin64u).  Now close() kicks the run, waits for it to return, and
only then releases anything.
"""

from __future__ import annotations

import threading

import pytest

from pykvm.platform.machine import Machine

pytestmark = pytest.mark.kvm

BOUND = 20.0  # seconds: only a hang takes this long


class Runner(threading.Thread):
    """Runs ``machine.run()`` and records its result or the exception it raised."""

    def __init__(self, machine: Machine) -> None:
        super().__init__(daemon=True)
        self.machine = machine
        self.result = None
        self.error: BaseException | None = None
        self.started_running = threading.Event()

    def run(self) -> None:
        self.machine.loop.post(self.started_running.set)  # set on the vCPU thread, just before KVM_RUN
        try:
            self.result = self.machine.run(timeout=BOUND)
        except BaseException as exc:  # reported by the test
            self.error = exc


@pytest.mark.parametrize("guest", ["spin64u", "spin64", "spin16"])
def test_close_from_another_thread_stops_the_run_first(guest):
    for _ in range(10):
        m = Machine(memory="16M")
        m.load_guest(guest)
        runner = Runner(m)
        runner.start()
        assert runner.started_running.wait(BOUND)
        m.close()  # returns only once the run has let go of the vCPU
        runner.join(BOUND)
        assert not runner.is_alive()
        assert runner.error is None, runner.error
        assert runner.result.ended == "closed"
        assert runner.result.regs == {}  # the vCPU was gone: no registers to report


def test_a_closed_machine_cannot_run():
    m = Machine(memory="16M")
    m.load_guest("hello64")
    m.close()
    with pytest.raises(ValueError, match="closed"):
        m.run()


def test_closing_a_raw_vcpu_under_its_run(kvm):
    """The raw layer too: Vcpu.close() from another thread kicks vcpu.run() and waits for it."""
    from pykvm import exits
    from pykvm.memory import GuestMemory

    with kvm.create_vm() as vm, GuestMemory(vm) as memory:
        memory.add_region(0, 0x10000)
        memory.write(0x1000, b"\xeb\xfe")  # jmp .
        vcpu = vm.create_vcpu(0)
        sregs = vcpu.get_sregs()
        sregs.cs.base = sregs.cs.selector = 0
        vcpu.set_sregs(sregs)
        regs = vcpu.get_regs()
        regs.rip, regs.rflags = 0x1000, 2
        vcpu.set_regs(regs)
        outcome: list = []
        entered = threading.Event()

        def spin():
            entered.set()
            try:
                outcome.append(vcpu.run())
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=spin, daemon=True)
        thread.start()
        assert entered.wait(BOUND)
        vcpu.close()
        thread.join(BOUND)
        assert not thread.is_alive()
        assert len(outcome) == 1
        # Either the kick came while it was inside KVM_RUN (EINTR) or before it entered (refused).
        assert outcome[0] is exits.INTERRUPTED or isinstance(outcome[0], ValueError), outcome
        assert vcpu.closed


def test_request_stop_from_another_thread_pauses_and_the_guest_goes_on():
    with Machine(memory="16M") as m:
        m.load_guest("primes64u", args=(3_000_000, 0))
        runner = Runner(m)
        runner.start()
        assert runner.started_running.wait(BOUND)
        m.request_stop("paused")
        runner.join(BOUND)
        assert runner.result.ended == "paused"
        result = m.run(timeout=BOUND)  # continue where it stopped
        assert result.ended == "reset" and result.regs["rax"] == 216816  # primes below 3,000,000


@pytest.mark.kvm
def test_a_stop_signal_pending_at_kvm_run_ends_the_run_at_once():
    """Regression: a Ctrl-C that came between the loop's last look and KVM_RUN waited for the guest's next exit.

    The soak's random stops found it: SIGINT to the main thread while a
    spinning CPL-3 guest (no exits) was about to enter KVM_RUN; the run went
    on until its 30 s timeout.  Here the signal is made pending before the
    run starts (blocked on this thread, then raised), the state it is in
    when it lands just before KVM_RUN: the run must end by it, not by the
    timeout.
    """
    import signal

    seen = []
    with Machine(memory="16M") as m:
        m.load_guest("spin64u")

        def on_sigint(signo, frame):
            seen.append(signo)
            m.request_stop("interrupted")

        previous = signal.signal(signal.SIGINT, on_sigint)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            signal.raise_signal(signal.SIGINT)  # pending on this thread
            result = m.run(timeout=20)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
            signal.signal(signal.SIGINT, previous)
    assert result.ended == "interrupted", result.summary()
    assert seen == [signal.SIGINT]


@pytest.mark.kvm
def test_a_run_leaves_the_threads_signal_mask_as_it_found_it():
    import signal

    with Machine(memory="16M") as m:
        m.load_guest("hello64")
        before = signal.pthread_sigmask(signal.SIG_BLOCK, set())
        assert m.run(timeout=20).ended == "hlt"
        assert signal.pthread_sigmask(signal.SIG_BLOCK, set()) == before
