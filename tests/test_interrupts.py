"""Interrupts through the in-kernel irqchip: the UART's IRQ 4 reaches a guest's own handler.

The guest (uart_irq) runs in real mode: KVM's instruction emulator returns
from interrupts (IRET) only in real mode, and on kvm_pvm hosts ring-0 code
is emulated.
"""

from __future__ import annotations

import os
import threading
import time

import pytest

pytestmark = pytest.mark.kvm


def feed_later(machine, chunks, delay=0.2):
    def run():
        for chunk in chunks:
            time.sleep(delay)
            machine.feed_serial(chunk)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_uart_interrupt_reaches_the_guest_handler():
    from pykvm.platform.machine import Machine

    with Machine(memory="16M", irqchip=True) as m:
        m.load_guest("uart_irq")
        feeder = feed_later(m, [b"inter", b"rupt\x04"])
        result = m.run(timeout=10)
        feeder.join()
    assert result.ended == "reset", result.message
    assert result.serial_text == "irq ready\ninterrupt\nbye\n"
    assert result.regs["rax"] == len("interrupt")
    assert 1 <= result.regs["rdi"] <= 2 * len("interrupt\x04")  # interrupts taken by its handler
    assert "hlt" not in result.exits  # with an irqchip, HLT sleeps in the kernel


def test_without_irqchip_hlt_comes_back_to_user_space():
    from pykvm.platform.machine import Machine

    with Machine(memory="16M", irqchip=False) as m:
        m.load_guest("uart_irq")
        result = m.run(timeout=10)
    assert result.ended == "hlt"  # nothing could ever wake it: pykvm ends the run
    assert result.serial_text == "irq ready\n"


def test_irqfd_raises_the_line_without_a_syscall_from_the_vcpu_thread():
    from pykvm.platform.machine import Machine

    with Machine(memory="16M", irqchip=True) as m:
        m.load_guest("uart_irq")
        efd = os.eventfd(0)
        try:
            m.vm.irqfd(efd, 4)  # KVM_IRQFD: GSI 4 = COM1's line on the PIC

            def pulse():
                time.sleep(0.2)
                for _ in range(3):
                    os.eventfd_write(efd, 1)  # the kernel injects IRQ 4; the handler finds no data
                    time.sleep(0.05)
                m.feed_serial(b"\x04")

            pulser = threading.Thread(target=pulse, daemon=True)
            pulser.start()
            result = m.run(timeout=10)
            pulser.join()
            m.vm.irqfd(efd, 4, deassign=True)
        finally:
            os.close(efd)
    assert result.ended == "reset", result.message
    assert result.regs["rax"] == 0  # nothing echoed
    assert result.regs["rdi"] >= 4  # three irqfd pulses and the EOT's interrupt
