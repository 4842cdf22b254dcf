"""ACPI S3, suspend to RAM: the machine sleeps, and resumes at the FACS waking vector.

ACPI 6.4 section 16.1.3 and 7.4.2: the OS writes its resume address to the
FACS's firmware waking vector, then SLP_TYP (the DSDT's ``\\_S3_``, 1 on
QEMU's PC) with SLP_EN to PM1a_CNT.  The CPUs stop; memory keeps its
contents.  A wake event (here: the RTC alarm with PM1_EN.RTC_EN set, the
one QEMU's PC has, or the monitor's ``system_wakeup``) starts the machine
again the way firmware does it: the boot CPU in real mode at
``CS:IP = (vector >> 4):(vector & 0xf)``, interrupts off; the application
processors waiting for the OS's INIT-SIPI; PM1_STS's WAK_STS and the wake
cause's status bit set.  A waking vector of 0 means the OS asked for none:
firmware would boot again, which ends the run as a reset does.

While the machine sleeps no vCPU thread runs: ``Machine.run`` waits in
:meth:`SleepState.wait_for_wake` (which honours the run's timeout and stop
requests) and, after a wake, runs the vCPUs again.
"""

from __future__ import annotations

import threading
import time

from pykvm.devices.acpi_pm import WAKE_OTHER, WAKE_RTC

__all__ = ["SleepState", "WAKE_MONITOR"]

WAKE_MONITOR = "monitor"  # ``system_wakeup``: no status bit of its own (PM1_STS.WAK_STS only)


class SleepState:
    """Whether the machine is in S3, and what wakes it (see the module docstring)."""

    def __init__(self, machine, timers, pm, cmos, waking_vector_addr: int) -> None:
        self.machine, self.timers, self.pm, self.cmos = machine, timers, pm, cmos
        self.waking_vector_addr = waking_vector_addr
        self.suspended = False
        self.suspends = 0  # how many times the guest entered S3 (the run summary and tests)
        self._event = threading.Event()
        self._outcome: str | None = None
        timers.listeners.append(self._check_rtc_alarm)

    def suspend(self) -> None:
        """The guest wrote SLP_EN with S3's SLP_TYP (called from the PM device, under the devices' lock)."""
        self.suspended, self._outcome = True, None
        self.suspends += 1
        self._event.clear()
        self.timers.poke()  # the alarm must be watched while nothing runs

    def _check_rtc_alarm(self) -> None:
        if self.suspended and self._outcome is None and self.pm.rtc_wake_enabled \
                and self.cmos.alarm_interrupt_pending():
            self._finish(WAKE_RTC)

    def wakeup(self) -> bool:
        """The monitor's ``system_wakeup``; False when the machine is not asleep."""
        if not self.suspended:
            return False
        self._finish(WAKE_MONITOR)
        return True

    def interrupt(self, reason: str) -> None:
        """A stop request while asleep (the monitor's ``stop``/``quit``, close()): the wait returns it."""
        if self.suspended and self._outcome is None:
            self._finish("stop:" + reason)

    def _finish(self, outcome: str) -> None:
        self._outcome = outcome
        self._event.set()

    def wait_for_wake(self, deadline: float | None) -> str:
        """Sleep until a wake event ("wake") or the end of the run: "timeout" or the stop's reason.

        ``deadline`` is ``time.perf_counter()`` time (the run's clock).  After "wake" the CPUs are
        set up to resume; otherwise the machine stays asleep (a later run
        waits again).
        """
        while not self._event.wait(None if deadline is None else max(0.0, deadline - time.perf_counter())):
            if deadline is not None and time.perf_counter() >= deadline:
                return "timeout"
        outcome = self._outcome
        if outcome.startswith("stop:"):
            self._outcome = None
            self._event.clear()
            return outcome[5:]
        self._resume(outcome)
        return "wake"

    def _resume(self, cause: str) -> None:
        from pykvm._native import lib
        from pykvm.platform.firmware_chips import program_legacy_chips

        m = self.machine
        vector = int.from_bytes(m.memory.read(self.waking_vector_addr, 4), "little")
        self.suspended = False
        if vector == 0:
            m.request_stop("reset")  # no waking vector: firmware would boot from scratch
            return
        for vcpu in m.vcpus[1:]:
            vcpu.set_mp_state(lib.KVM_MP_STATE_INIT_RECEIVED)  # waiting for the OS's SIPI
        real_mode_at(m.vcpus[0], vector >> 4, vector & 0xF)
        m.vcpus[0].set_mp_state(lib.KVM_MP_STATE_RUNNABLE)
        if m.irqchip:
            program_legacy_chips(m.vm, m.vcpus[0])  # what firmware sets up again on the resume path
        with self.timers.lock:
            self.pm.wake(WAKE_OTHER if cause == WAKE_MONITOR else cause)


def real_mode_at(vcpu, cs_selector: int, ip: int) -> None:
    """The CPU state firmware jumps to a waking vector with: real mode, flat 64 KiB segments, IF clear."""
    from pykvm.x86 import bits
    from pykvm.x86.modes import mode_registers
    from pykvm.x86.segments import real_mode_ldt, real_mode_segment, real_mode_tr

    sregs = vcpu.get_sregs()
    real_mode_segment(cs_selector, code=True).to_kvm(sregs.cs)
    for name in ("ds", "es", "fs", "gs", "ss"):
        real_mode_segment(0).to_kvm(getattr(sregs, name))
    real_mode_tr().to_kvm(sregs.tr)
    real_mode_ldt().to_kvm(sregs.ldt)
    sregs.gdt.base, sregs.gdt.limit = 0, 0xFFFF
    sregs.idt.base, sregs.idt.limit = 0, 0xFFFF
    sregs.cr0, sregs.cr4, sregs.efer = mode_registers("real")
    sregs.cr3 = 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip, regs.rflags, regs.rsp = ip, bits.RFLAGS_FIXED, 0
    vcpu.set_regs(regs)
