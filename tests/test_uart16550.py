"""The 16550A UART model, register by register (PC16550D datasheet)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pykvm.devices.uart16550 import (
    DLL,
    DLM,
    FCR,
    IER,
    IIR,
    LCR,
    LSR,
    MCR,
    MSR,
    RBR,
    SCR,
    THR,
    Uart16550,
)

# Register values used below, spelled out as a driver would write them.
DLAB = 0x80
LOOP, OUT2, OUT1, RTS, DTR = 0x10, 0x08, 0x04, 0x02, 0x01
ERBFI, ETBEI, ELSI, EDSSI = 0x01, 0x02, 0x04, 0x08
FIFO_ON = 0x01
LSR_DR, LSR_OE, LSR_IDLE = 0x01, 0x02, 0x60  # IDLE = THRE | TEMT


class Harness:
    """A UART with its output and interrupt edges recorded."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.edges: list[bool] = []
        self.uart = Uart16550(output=self.out.extend, interrupt=self.edges.append)

    def get(self, offset: int) -> int:
        return self.uart.read(offset, 1)[0]

    def set(self, offset: int, value: int) -> None:
        self.uart.write(offset, bytes([value]))


@pytest.fixture
def h() -> Harness:
    return Harness()


def test_power_on_values(h):
    # Datasheet Table VIII (reset states); MSR shows the host's DCD|DSR|CTS.
    assert [h.get(r) for r in (IER, IIR, LCR, MCR, LSR, MSR)] == [
        0x00, 0x01, 0x00, 0x00, 0x60, 0xB0,
    ]
    assert h.uart.tx_fast_path_ok
    assert not h.uart.irq_level and h.edges == []


def test_transmit(h):
    for byte in b"Hi\n":
        h.set(THR, byte)
    assert bytes(h.out) == b"Hi\n"
    assert h.uart.bytes_out == 3
    assert h.get(LSR) == LSR_IDLE  # THRE and TEMT stay set


# -- divisor latch --------------------------------------------------------------


def test_dlab_divisor_round_trip_leaves_rbr_thr_ier_alone(h):
    h.set(IER, ERBFI | ELSI)
    h.uart.enqueue_input(b"k")
    h.set(LCR, DLAB | 0x03)  # 8N1, divisor latch visible
    h.set(DLL, 0x01)  # 115200 baud
    h.set(DLM, 0x00)
    assert (h.get(DLL), h.get(DLM)) == (0x01, 0x00)
    h.set(DLM, 0x12)
    assert (h.get(DLL), h.get(DLM)) == (0x01, 0x12)
    assert h.out == b""  # the DLL writes transmitted nothing
    assert h.get(LSR) & LSR_DR  # reading DLL consumed nothing
    h.set(LCR, 0x03)
    assert h.get(IER) == ERBFI | ELSI
    assert h.get(RBR) == ord("k")
    h.set(THR, ord("!"))
    assert h.out == b"!"
    h.set(LCR, DLAB)
    assert (h.get(DLL), h.get(DLM)) == (0x01, 0x12)


# -- loopback and modem lines -----------------------------------------------------


def test_loopback_echo(h):
    h.set(MCR, LOOP)
    assert not h.get(LSR) & LSR_DR
    h.set(THR, ord("A"))
    assert h.out == b""  # nothing leaves the chip in loopback
    assert h.uart.bytes_out == 0
    assert h.get(LSR) == LSR_DR | LSR_IDLE
    assert h.get(RBR) == ord("A")
    assert h.get(LSR) == LSR_IDLE


@pytest.mark.parametrize(
    "mcr, msr_lines",
    [
        (RTS, 0x10),  # RTS -> CTS
        (DTR, 0x20),  # DTR -> DSR
        (OUT1, 0x40),  # OUT1 -> RI
        (OUT2, 0x80),  # OUT2 -> DCD
        (RTS | OUT2, 0x90),  # Linux's loopback probe expects 0x90
        (DTR | RTS | OUT1 | OUT2, 0xF0),
    ],
)
def test_loopback_reflects_mcr_in_msr(h, mcr, msr_lines):
    h.set(MCR, LOOP | mcr)
    assert h.get(MSR) & 0xF0 == msr_lines


def test_msr_delta_bits_are_cleared_on_read(h):
    h.set(MCR, LOOP)  # inputs drop from DCD|DSR|CTS to nothing
    assert h.get(MSR) == 0x0B  # DDCD | DDSR | DCTS
    assert h.get(MSR) == 0x00
    h.set(MCR, LOOP | OUT1)  # RI rises: TERI reports only the fall
    assert h.get(MSR) == 0x40
    h.set(MCR, LOOP)
    assert h.get(MSR) == 0x04  # TERI
    h.set(MCR, LOOP | RTS)
    assert h.get(MSR) == 0x11  # CTS | DCTS
    assert h.get(MSR) == 0x10


def test_modem_status_interrupt(h):
    h.set(IER, EDSSI)
    h.set(MCR, LOOP | OUT2)  # CTS/DSR drop, DCD stays: deltas pending
    assert h.get(IIR) == 0x00  # modem status, pending
    assert h.edges == [True]
    h.get(MSR)
    assert h.get(IIR) == 0x01
    assert h.edges == [True, False]


def test_mcr_and_ier_unused_bits_read_zero(h):
    h.set(MCR, 0xFF)
    h.set(IER, 0xFF)
    assert (h.get(MCR), h.get(IER)) == (0x1F, 0x0F)


def test_lsr_and_msr_are_read_only(h):
    h.set(LSR, 0x00)
    h.set(MSR, 0x00)
    assert (h.get(LSR), h.get(MSR)) == (LSR_IDLE, 0xB0)


@given(st.integers(0, 255))
def test_scratch_register_round_trip(value):
    h = Harness()
    h.set(SCR, value)
    assert h.get(SCR) == value
    assert h.out == b""


# -- receiver, FIFO and overrun --------------------------------------------------------


def test_fifo_fill_then_overrun(h):
    h.set(FCR, FIFO_ON)
    h.set(MCR, LOOP)
    for byte in range(16):
        h.set(THR, byte)
    assert h.get(LSR) == LSR_DR | LSR_IDLE  # full, no error yet
    h.set(THR, 0xEE)  # no room: lost in the shift register
    assert h.get(LSR) == LSR_DR | LSR_OE | LSR_IDLE
    assert h.get(LSR) == LSR_DR | LSR_IDLE  # reading LSR cleared OE
    assert bytes(h.get(RBR) for _ in range(16)) == bytes(range(16))
    assert h.get(LSR) == LSR_IDLE


def test_overrun_without_fifo_overwrites_rbr(h):
    h.set(MCR, LOOP)
    h.set(THR, ord("a"))
    assert not h.get(LSR) & LSR_OE
    h.set(THR, ord("b"))  # RBR not read yet: "a" is destroyed
    assert h.get(LSR) == LSR_DR | LSR_OE | LSR_IDLE
    assert h.get(RBR) == ord("b")
    assert h.get(LSR) == LSR_IDLE


def test_fcr_clears_receive_fifo(h):
    h.set(FCR, FIFO_ON)
    h.set(MCR, LOOP)
    for byte in b"hello":
        h.set(THR, byte)
    h.set(FCR, FIFO_ON | 0x02)  # clear RX
    assert h.get(LSR) == LSR_IDLE
    h.set(THR, ord("x"))
    h.set(FCR, FIFO_ON | 0x04)  # clear TX leaves RX alone
    assert h.get(RBR) == ord("x")


def test_switching_fifo_mode_clears_receiver(h):
    h.set(MCR, LOOP)
    h.set(THR, ord("a"))
    h.set(FCR, 0x02)  # bit 0 clear: the other bits are not programmed
    assert h.get(LSR) & LSR_DR
    h.set(FCR, FIFO_ON)  # 16450 -> FIFO mode empties the receiver
    assert not h.get(LSR) & LSR_DR
    h.set(THR, ord("b"))
    h.set(FCR, 0x00)  # and back
    assert not h.get(LSR) & LSR_DR


def test_iir_reports_fifos_enabled(h):
    assert h.get(IIR) == 0x01
    h.set(FCR, FIFO_ON)
    assert h.get(IIR) == 0xC1
    h.set(FCR, 0)
    assert h.get(IIR) == 0x01


def test_host_input_drains_into_fifo_as_guest_reads(h):
    h.set(FCR, FIFO_ON)
    data = bytes(range(40))
    h.uart.enqueue_input(data)
    assert h.uart.pending_input == 40 - 16
    assert h.uart.bytes_in == 16
    assert h.get(RBR) == 0
    assert h.uart.pending_input == 40 - 17
    received = bytes([0]) + bytes(h.get(RBR) for _ in range(39))
    assert received == data
    assert h.uart.pending_input == 0
    assert h.uart.bytes_in == 40
    assert not h.get(LSR) & (LSR_DR | LSR_OE)  # flow control: no overrun


def test_host_input_without_fifo_is_one_byte_at_a_time(h):
    h.uart.enqueue_input(b"abc")
    assert h.uart.pending_input == 2
    assert bytes(h.get(RBR) for _ in range(3)) == b"abc"
    assert not h.get(LSR) & LSR_DR


def test_fcr_clear_hands_host_bytes_back(h):
    # The host end is flow controlled: a FIFO reset (which every driver does
    # while initialising) must not drop what the host already typed.
    h.set(FCR, FIFO_ON)
    h.uart.enqueue_input(bytes(range(20)))
    assert h.uart.pending_input == 4
    h.set(FCR, FIFO_ON | 0x02)
    assert [h.get(RBR) for _ in range(20)] == list(range(20))
    assert h.uart.bytes_in == 20
    assert h.uart.pending_input == 0


def test_fcr_clear_drops_loopback_bytes(h):
    h.set(FCR, FIFO_ON)
    h.set(MCR, LOOP)
    h.set(THR, 0x41)
    assert h.get(LSR) & LSR_DR
    h.set(FCR, FIFO_ON | 0x02)
    assert not h.get(LSR) & LSR_DR


def test_loopback_disconnects_host_input(h):
    h.set(MCR, LOOP)
    h.uart.enqueue_input(b"z")
    assert h.uart.pending_input == 1
    assert not h.get(LSR) & LSR_DR
    h.set(MCR, 0)
    assert h.uart.pending_input == 0
    assert h.get(RBR) == ord("z")


def test_empty_rbr_reads_zero(h):
    assert h.get(RBR) == 0


# -- interrupts ---------------------------------------------------------------------


def test_iir_priorities(h):
    h.set(IER, ERBFI | ETBEI | ELSI | EDSSI)
    h.set(MCR, LOOP)  # modem status deltas pending
    h.set(THR, ord("x"))
    h.set(THR, ord("y"))  # overrun; THRE re-armed by the writes
    assert h.get(IIR) == 0x06  # receiver line status first
    h.get(LSR)  # clears OE
    assert h.get(IIR) == 0x04  # then received data available
    h.get(RBR)
    assert h.get(IIR) == 0x02  # then THR empty; this read clears it
    assert h.get(IIR) == 0x00  # then modem status
    h.get(MSR)
    assert h.get(IIR) == 0x01  # nothing pending


def test_thre_survives_an_iir_read_that_reports_something_else(h):
    h.set(IER, ERBFI | ETBEI)
    h.uart.enqueue_input(b"q")
    assert h.get(IIR) == 0x04
    assert h.get(IIR) == 0x04
    h.get(RBR)
    assert h.get(IIR) == 0x02  # still pending: only its own report clears it
    assert h.get(IIR) == 0x01


def test_thre_interrupt_cleared_by_iir_and_rearmed_by_thr(h):
    h.set(MCR, OUT2)
    h.set(IER, ETBEI)  # THR is empty: the interrupt fires at once
    assert h.edges == [True]
    assert h.get(IIR) == 0x02
    assert h.edges == [True, False]
    h.set(THR, ord("."))  # clears THRE, sent at once, THRE again
    assert h.edges == [True, False, True]
    h.set(IER, 0)
    assert h.edges == [True, False, True, False]
    assert h.get(IIR) == 0x01


def test_receive_trigger_level_and_character_timeout(h):
    h.set(FCR, FIFO_ON | 0x40)  # trigger level 4
    h.set(IER, ERBFI)
    h.uart.enqueue_input(b"ab")
    assert h.get(IIR) == 0xCC  # below the trigger: character timeout
    h.uart.enqueue_input(b"cd")
    assert h.get(IIR) == 0xC4  # at the trigger: received data available


def test_interrupt_line_needs_out2(h):
    h.set(IER, ERBFI)
    h.uart.enqueue_input(b"ab")
    assert h.get(IIR) == 0x04  # pending ...
    assert h.edges == [] and not h.uart.irq_level  # ... but gated by OUT2
    h.set(MCR, OUT2 | DTR | RTS)
    assert h.edges == [True] and h.uart.irq_level
    h.get(RBR)  # "b" moves into RBR: still pending, no new edge
    assert h.edges == [True]
    h.get(RBR)
    assert h.edges == [True, False]
    h.uart.enqueue_input(b"c")
    assert h.edges == [True, False, True]
    h.set(MCR, DTR | RTS)  # drop OUT2: the line falls though data waits
    assert h.edges == [True, False, True, False]
    assert h.get(IIR) == 0x04


def test_overrun_raises_line_status_interrupt(h):
    h.set(IER, ELSI)
    h.set(MCR, LOOP | OUT2)
    h.set(THR, 1)
    assert h.edges == []
    h.set(THR, 2)
    assert h.edges == [True] and h.get(IIR) == 0x06
    h.get(LSR)
    assert h.edges == [True, False]


def test_reset_restores_power_on_state_but_keeps_scr_and_divisor(h):
    h.set(SCR, 0x5A)
    h.set(LCR, DLAB)
    h.set(DLL, 0x03)
    h.set(LCR, 0)
    h.set(IER, ETBEI)
    h.set(MCR, OUT2 | LOOP)
    h.set(THR, 1)
    assert h.uart.irq_level
    h.uart.reset()
    assert h.edges[-1] is False
    assert [h.get(r) for r in (IER, IIR, LCR, MCR, LSR, MSR)] == [
        0x00, 0x01, 0x00, 0x00, 0x60, 0xB0,
    ]
    assert h.get(SCR) == 0x5A
    h.set(LCR, DLAB)
    assert h.get(DLL) == 0x03


# -- access shape -----------------------------------------------------------------


def test_multi_byte_access_is_split_into_registers(h):
    h.set(SCR, 0x77)
    assert h.uart.read(LSR, 3) == bytes([0x60, 0xB0, 0x77])
    h.uart.write(THR, b"A\x00")  # THR then IER
    assert h.out == b"A"


@pytest.mark.parametrize("offset, size", [(8, 1), (7, 2), (-1, 1), (0, 0)])
def test_access_outside_registers_is_rejected(h, offset, size):
    with pytest.raises(ValueError):
        h.uart.read(offset, size)


# -- the C run loop's transmit fast path --------------------------------------------


@pytest.mark.parametrize(
    "offset, value",
    [(LCR, DLAB), (MCR, LOOP), (IER, ETBEI), (IER, ETBEI | ERBFI)],
)
def test_fast_path_refused_when_thr_write_has_side_effects(h, offset, value):
    h.set(offset, value)
    assert not h.uart.tx_fast_path_ok
    h.set(offset, 0)
    assert h.uart.tx_fast_path_ok


def test_fast_path_allowed_with_receive_interrupts(h):
    h.set(IER, ERBFI | ELSI | EDSSI)
    h.set(MCR, OUT2 | DTR | RTS)
    h.set(FCR, FIFO_ON | 0x06)
    h.set(LCR, 0x03)
    assert h.uart.tx_fast_path_ok


def test_fast_path_changed_called_when_fast_path_flips(h):
    calls = []
    h.uart.fast_path_changed = lambda: calls.append(h.uart.tx_fast_path_ok)
    h.set(LCR, 0x03)  # no change
    assert calls == []
    h.set(LCR, DLAB | 0x03)
    assert calls == [False]
    h.set(LCR, DLAB)  # still off
    assert calls == [False]
    h.set(LCR, 0x03)
    h.set(IER, ETBEI)
    h.set(IER, 0)
    assert calls == [False, True, False, True]


def test_accept_transmitted_uses_one_output_call_on_the_fast_path():
    chunks = []
    uart = Uart16550(output=chunks.append)
    uart.accept_transmitted(b"Hello from long mode\n")
    assert chunks == [b"Hello from long mode\n"]
    assert uart.bytes_out == 21
    uart.accept_transmitted(b"")
    assert len(chunks) == 1


def _state(uart: Uart16550) -> dict:
    """Everything the model holds, minus the host's callables."""
    hooks = {"output", "interrupt", "fast_path_changed"}
    return {k: v for k, v in vars(uart).items() if k not in hooks}


def _dump_registers(h: Harness) -> list[int]:
    """What a guest can read, in a fixed order (reads have side effects)."""
    lcr = h.get(LCR)
    h.set(LCR, lcr | DLAB)
    divisor = [h.get(DLL), h.get(DLM)]
    h.set(LCR, lcr & ~DLAB)
    regs = [h.get(r) for r in (IER, IIR, LCR, MCR, LSR, MSR, SCR, RBR)]
    return divisor + regs + [h.uart.irq_level]


register_writes = st.lists(
    st.tuples(st.integers(0, 7), st.integers(0, 255)), max_size=12
)


@given(
    setup=register_writes,
    host_input=st.binary(max_size=20),
    text=st.binary(min_size=1, max_size=40),
)
def test_fast_path_equivalent_to_byte_by_byte_writes(setup, host_input, text):
    """accept_transmitted(text) == write(0, b) for each b, in every state."""
    slow, fast = Harness(), Harness()
    for h in (slow, fast):
        for offset, value in setup:
            h.set(offset, value)
        h.uart.enqueue_input(host_input)
    for byte in text:
        slow.set(THR, byte)
    fast.uart.accept_transmitted(text)
    assert fast.out == slow.out
    assert fast.edges == slow.edges
    assert _state(fast.uart) == _state(slow.uart)
    assert _dump_registers(fast) == _dump_registers(slow)


def test_fast_path_equivalence_on_the_fast_branch():
    slow, fast = Harness(), Harness()
    for h in (slow, fast):
        h.set(LCR, 0x03)
        h.set(IER, ERBFI)
        h.set(MCR, OUT2 | DTR | RTS)
        assert h.uart.tx_fast_path_ok
    text = b"checksum 0x1234abcd\n"
    for byte in text:
        slow.set(THR, byte)
    fast.uart.accept_transmitted(text)
    assert fast.out == slow.out == text
    assert _state(fast.uart) == _state(slow.uart)
    assert _dump_registers(fast) == _dump_registers(slow)


def test_snapshot_has_no_side_effects(h):
    h.set(FCR, FIFO_ON)
    h.set(IER, 0x03)  # RDA and THRE interrupts: IIR reads would clear THRE
    h.set(MCR, 0x08)  # OUT2
    h.uart.enqueue_input(b"abc")
    first = h.uart.snapshot()
    assert first == h.uart.snapshot()  # taking it changed nothing
    assert first["rx_fifo"] == b"abc" and first["lsr"] & LSR_DR and first["irq"]
    assert first["iir"] & 0x0F == h.get(IIR) & 0x0F  # the guest's view agrees
    assert [h.get(RBR) for _ in range(3)] == list(b"abc")


@given(st.lists(st.tuples(st.booleans(), st.integers(0, 7), st.integers(0, 255), st.binary(max_size=3)),
                max_size=200))
def test_garbage_from_the_guest_never_breaks_the_model(ops):
    """Any sequence of register reads/writes (and host input) keeps the chip consistent."""
    from pykvm.devices.uart16550 import Uart16550

    out, levels = [], []
    uart = Uart16550(output=out.append, interrupt=levels.append)
    for is_write, offset, value, host in ops:
        if host:
            uart.enqueue_input(host)
        if is_write:
            uart.write(offset, bytes([value]))
        else:
            assert len(uart.read(offset, 1)) == 1
        snap = uart.snapshot()
        assert len(snap["rx_fifo"]) <= 16  # never more than the FIFO holds
        assert snap["irq"] == (levels[-1] if levels else False)  # edges only, and the last one is the level
        assert all(isinstance(chunk, bytes) for chunk in out)
    assert all(a != b for a, b in zip(levels, levels[1:]))  # interrupt() is called only on changes
