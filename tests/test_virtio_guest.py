"""Real guests driving virtio-console through a Machine: every notification and interrupt path.

The guests (guests/virtio_test.c) find the device at 0xd0000000, negotiate,
set up both queues, send a message and wait for the host's echo:
``virtio64u`` polls at CPL 3; ``virtio64`` sleeps in HLT at CPL 0 and is
woken by the device's interrupt through the in-kernel 8259.  Mode 1 resets
the device with buffers in flight and starts again.
"""

from __future__ import annotations

import re
import threading
import zlib

import pytest

from pykvm.virtio.backends import FdBackend, MemoryBackend
from pykvm.virtio.mmio import QUEUE_NOTIFY

pytestmark = pytest.mark.kvm

GREETING = b"hello through virtio-console\n"
AFTER_RESET = b"and again after a reset\n"
NOTIFY_PATHS = ("python", "c", "ioeventfd")


class EchoBackend(MemoryBackend):
    """Sends back whatever the guest transmits, at once or after ``delay`` seconds."""

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.delay = delay
        self.timers: list[threading.Timer] = []

    def write(self, data: bytes) -> None:
        super().write(data)
        if self.delay:
            timer = threading.Timer(self.delay, self._deliver, (bytes(data),))
            self.timers.append(timer)
            timer.start()
        else:
            self._deliver(bytes(data))

    def close(self) -> None:
        for timer in self.timers:
            timer.cancel()


def run_guest(guest, *, notify="python", interrupt="irq_line", irqchip=None, mode=0, delay=0.0):
    """Run a virtio guest with an echo backend; return (result, machine facts)."""
    from pykvm.platform.machine import Machine

    if irqchip is None:
        irqchip = guest == "virtio64" or interrupt == "irqfd"
    backend = EchoBackend(delay)
    with Machine(memory="32M", irqchip=irqchip) as m:
        _console, transport = m.add_virtio_console(backend, notify=notify, interrupt=interrupt)
        register_writes = []
        python_write = transport.write

        def counting_write(offset, data):  # what reached Python's MMIO bus
            register_writes.append(offset)
            python_write(offset, data)

        transport.write = counting_write
        m.load_guest(guest, args=(mode, 0))
        result = m.run(timeout=30)
        slot = m.virtio_devices[0]
        wakeups = dict(m.iothread.wakeups) if m.iothread else {}
        facts = {
            "output": bytes(backend.output),
            "python_notifies": register_writes.count(QUEUE_NOTIFY),
            "c_notifies": result.c_hits.get(f"{slot.name}.notify", 0),
            "wakeups": {name: wakeups.get(fd, 0) for name, fd in slot.fds.items()},
            "notifications": transport.notifications,
            "errors": transport.errors,
        }
    return result, facts


def check_round_trip(result, facts, guest, message=GREETING):
    assert result.ended == "reset", result.message
    assert result.regs["rax"] == len(message), result.serial_text
    assert facts["errors"] == 0
    mode_word = "interrupts" if guest == "virtio64" else "polling"
    assert f"{guest}: virtio-console ready at 0xd0000000, {mode_word}\n" in result.serial_text
    assert result.serial_text.endswith(f"{guest}: echo ok, {len(message)} bytes\n")
    assert facts["output"].endswith(message)


def check_notify_path(facts, notify):
    """The doorbells went the way asked, and only that way."""
    if notify == "python":
        assert facts["python_notifies"] >= 2  # at least the receiveq's and the transmitq's
        assert facts["c_notifies"] == 0
    elif notify == "c":
        assert facts["python_notifies"] == 0
        assert facts["c_notifies"] >= 2
        assert facts["wakeups"]["doorbell"] >= 1
    else:
        assert facts["python_notifies"] == 0 and facts["c_notifies"] == 0
        assert facts["wakeups"]["ioeventfd0"] >= 1 and facts["wakeups"]["ioeventfd1"] >= 1


# -- polled (CPL 3) --------------------------------------------------------------


@pytest.mark.parametrize("notify", NOTIFY_PATHS)
@pytest.mark.parametrize("irqchip,interrupt", [(False, "irq_line"), (True, "irq_line"), (True, "irqfd")])
def test_polled_round_trip(notify, irqchip, interrupt):
    result, facts = run_guest("virtio64u", notify=notify, interrupt=interrupt, irqchip=irqchip)
    check_round_trip(result, facts, "virtio64u")
    check_notify_path(facts, notify)
    assert facts["output"] == GREETING


def test_polled_round_trip_reaches_python_only_for_set_up():
    """With ioeventfd the data path has no user exit: only register set-up and COM1 reach user space."""
    result, facts = run_guest("virtio64u", notify="ioeventfd")
    check_round_trip(result, facts, "virtio64u")
    mmio = result.exits["mmio"]
    assert mmio["python"] == mmio["total"] < 60  # probe, negotiation, two queues; no doorbells
    assert facts["notifications"] >= 2


# -- interrupt-driven (CPL 0) --------------------------------------------------------


@pytest.mark.parametrize("notify", NOTIFY_PATHS)
@pytest.mark.parametrize("interrupt", ["irq_line", "irqfd"])
def test_interrupt_driven_round_trip(notify, interrupt):
    # The echo comes 50 ms later, so the guest must sleep in HLT until the
    # device's interrupt wakes it.
    result, facts = run_guest("virtio64", notify=notify, interrupt=interrupt, delay=0.05)
    check_round_trip(result, facts, "virtio64")
    check_notify_path(facts, notify)
    interrupts, status_seen = result.regs["rbx"], result.regs["rdi"]
    assert interrupts >= 1
    assert status_seen == 1  # used-buffer interrupts only (bit 1 would be an error)
    assert "hlt" not in result.exits  # with the irqchip, HLT sleeps in the kernel
    if interrupt == "irqfd":
        assert facts["wakeups"]["resamplefd"] >= 1  # the guest's EOI came back to the device


def test_without_irqchip_the_interrupt_driven_guest_waits_forever():
    from pykvm.platform.machine import Machine

    with Machine(memory="32M", irqchip=False) as m:
        m.add_virtio_console(EchoBackend(delay=0.05))
        m.load_guest("virtio64")
        result = m.run(timeout=5)
    # Without an in-kernel irqchip nothing can wake the guest's HLT: it comes
    # back to user space, and pykvm ends the run there.
    assert result.ended == "hlt"
    assert "interrupts" in result.serial_text


# -- reset mid-transfer ----------------------------------------------------------------

_ABANDONED = re.compile(rb"(abandoned buffer #[0-3]\n)*")


@pytest.mark.parametrize("guest,notify,interrupt", [
    ("virtio64u", "python", "irq_line"),
    ("virtio64u", "c", "irq_line"),
    ("virtio64u", "ioeventfd", "irqfd"),
    ("virtio64", "ioeventfd", "irqfd"),
    ("virtio64", "python", "irq_line"),
])
def test_reset_mid_transfer_then_start_again(guest, notify, interrupt):
    result, facts = run_guest(guest, notify=notify, interrupt=interrupt, mode=1,
                              delay=0.02 if guest == "virtio64" else 0.0)
    check_round_trip(result, facts, guest, AFTER_RESET)
    assert f"{guest}: reset mid-transfer, starting again\n" in result.serial_text
    output = facts["output"]
    # Whatever the device took of the abandoned buffers before the reset came
    # out whole and in order; nothing after the reset but the new message.
    abandoned = output[: -len(AFTER_RESET)]
    assert _ABANDONED.fullmatch(abandoned), output
    # The guest skipped stale echoes that arrived after it started again.
    assert len(AFTER_RESET) <= result.regs["rcx"] <= len(output)


# -- the machine's wiring ----------------------------------------------------------------


def test_linux_cmdline_and_default_placement():
    from pykvm.platform.machine import Machine

    with Machine(memory="16M", irqchip=True) as m:
        m.add_virtio_console()
        m.add_virtio_console(notify="ioeventfd", interrupt="irqfd")
        assert m.virtio_cmdline() == (
            "virtio_mmio.device=0x200@0xd0000000:5 virtio_mmio.device=0x200@0xd0000200:6")
        first, second = m.virtio_devices
        assert (first.base, first.irq, first.notify, first.interrupt) == (0xD0000000, 5, "python", "irq_line")
        assert (second.base, second.irq) == (0xD0000200, 6)
        assert set(second.fds) == {"irqfd", "resamplefd", "ioeventfd0", "ioeventfd1"}


def test_bad_wiring_is_refused():
    from pykvm.platform.bus import BusError
    from pykvm.platform.machine import Machine

    with Machine(memory="16M") as m:
        with pytest.raises(ValueError, match="irqchip"):
            m.add_virtio_console(interrupt="irqfd")
        with pytest.raises(ValueError, match="notify"):
            m.add_virtio_console(notify="carrier-pigeon")
        with pytest.raises(ValueError, match="COM1"):
            m.add_virtio_console(irq=4)
        with pytest.raises(ValueError, match="SCI"):
            m.add_virtio_console(irq=9)  # the PC's own lines are not free either
        m.add_virtio_console(irq=10)
        with pytest.raises(ValueError, match="taken"):
            m.add_virtio_console(irq=10, base=0xD0001000)
        with pytest.raises(BusError):
            m.add_virtio_console(base=0xD0000100, irq=11)  # overlaps the first window
        assert len(m.virtio_devices) == 1


def test_a_failed_wiring_is_undone():
    import os

    from pykvm.errors import KvmError
    from pykvm.platform.machine import Machine

    with Machine(memory="16M", irqchip=True) as m:
        squatter = os.eventfd(0)
        try:
            m.vm.ioeventfd(squatter, 0xD0000000 + QUEUE_NOTIFY, 4, datamatch=1)  # queue 1's doorbell, taken
            with pytest.raises(KvmError) as info:
                m.add_virtio_console(notify="ioeventfd", interrupt="irqfd")
            assert info.value.ioctl == "KVM_IOEVENTFD"
            assert m.virtio_devices == [] and m.mmio.find(0xD0000000) is None
            m.vm.ioeventfd(squatter, 0xD0000000 + QUEUE_NOTIFY, 4, datamatch=1, deassign=True)
        finally:
            os.close(squatter)
        m.add_virtio_console(EchoBackend(), notify="ioeventfd", interrupt="irqfd")  # same window, same IRQ
        m.load_guest("virtio64u")
        result = m.run(timeout=30)
    assert result.ended == "reset" and result.regs["rax"] == len(GREETING)


def test_fifty_machines_leave_no_fd_or_thread_behind(open_fd_count):
    """Each machine has a console, an I/O thread, ioeventfds, an irqfd; some run the guest."""
    import os

    from pykvm.platform.machine import Machine

    fds_before, threads_before = open_fd_count(), threading.active_count()
    for i in range(50):
        with Machine(memory="16M", irqchip=True) as m:
            if i % 10 == 0:  # a backend with its own thread and fds, closed by the machine
                r, w = os.pipe()
                backend = FdBackend(r, w, close_fds=True)
            else:
                backend = EchoBackend()
            notify = NOTIFY_PATHS[i % 3]
            m.add_virtio_console(backend, notify=notify, interrupt="irqfd")
            assert m.iothread.running
            if i % 5 == 0:
                m.load_guest("virtio64u")
                result = m.run(timeout=30)
                assert result.ended == "reset"
    assert open_fd_count() == fds_before
    assert threading.active_count() == threads_before


# -- the pieces underneath: the C loop's doorbell and coalesced PIO ---------------------


def test_c_loop_eventfd_action_signals_once_per_write():
    import os

    from pykvm.platform.machine import Machine
    from pykvm.platform.cloop import MMIO, READ_PASS, WRITE_EVENTFD, FastRange

    n = 500
    with Machine(memory="16M") as m:
        efd = os.eventfd(0, os.EFD_NONBLOCK)
        try:
            m.extra_fast_ranges.append(FastRange(MMIO, 0xE0000000, 4, READ_PASS, WRITE_EVENTFD, 0, "door", efd))
            m.load_guest("bench64u", args=(3, n))  # n MMIO writes to 0xe0000000
            result = m.run(timeout=30)
            assert result.ended == "reset" and result.regs["rax"] == n
            assert os.eventfd_read(efd) == n
            assert result.c_hits["door"] == n
            assert result.exits["mmio"]["python"] == 0
        finally:
            os.close(efd)


def test_c_loop_eventfd_action_falls_back_to_python_when_the_write_fails():
    from pykvm.platform.machine import Machine
    from pykvm.platform.cloop import MMIO, READ_PASS, WRITE_EVENTFD, FastRange

    n = 20
    with Machine(memory="16M") as m:
        m.extra_fast_ranges.append(FastRange(MMIO, 0xE0000000, 4, READ_PASS, WRITE_EVENTFD, 0, "door", -1))
        m.load_guest("bench64u", args=(3, n))
        result = m.run(timeout=30)
    assert result.ended == "reset" and result.regs["rax"] == n
    assert result.exits["mmio"]["python"] == n  # EBADF: each write went to the bus instead


def _stream(n: int) -> bytes:
    """iobench64u's transmit stream: 8-byte word i is (i + 1) * 0x9e3779b97f4a7c15."""
    words = (n + 7) // 8
    return b"".join((((i + 1) * 0x9E3779B97F4A7C15) & (2**64 - 1)).to_bytes(8, "little")
                    for i in range(words))[:n]


@pytest.mark.parametrize("coalesced", [False, True])
def test_uart_transmit_through_a_coalesced_zone_keeps_every_byte_in_order(coalesced):
    from pykvm.platform.machine import Machine

    n = 3000  # several full rings
    with Machine(memory="16M", c_loop=False) as m:
        if coalesced:
            m.add_coalesced_zone(port=0x3F8, length=1)
        m.load_guest("iobench64u", args=(1, n))
        result = m.run(timeout=60)
    assert result.ended == "reset"
    assert result.serial == _stream(n)
    assert result.regs["rax"] == zlib.adler32(result.serial)
    if coalesced:
        assert result.user_exits < n // 50  # one per full ring, not one per byte
    else:
        assert result.user_exits > n


def test_virtio_receive_in_big_buffers():
    """Host -> guest: 3 MiB queued before the run arrive whole (the guest's Adler-32)."""
    import os

    from pykvm.platform.machine import Machine

    data = os.urandom(3 << 20)
    with Machine(memory="64M", irqchip=True) as m:
        console, _ = m.add_virtio_console(notify="ioeventfd", interrupt="irqfd", max_pending_input=len(data))
        console.enqueue_input(data)
        m.load_guest("iobench64u", args=(4, len(data)))
        result = m.run(timeout=60)
        assert console.bytes_in == len(data)
    assert result.ended == "reset", result.message
    assert result.regs["rax"] == zlib.adler32(data)
    assert result.regs["rbx"] == len(data)
