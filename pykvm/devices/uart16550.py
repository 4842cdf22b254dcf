"""The 16550A UART, the PC's serial port (COM1 is 8 registers at 0x3f8).

Register names, bits and behaviour follow National Semiconductor's PC16550D
datasheet ("Universal Asynchronous Receiver/Transmitter with FIFOs"), Table II
and the register descriptions of section 8.  The model is decoupled from the
VM as rust-vmm's ``vm-superio`` is: it sees register offsets 0..7, sends
transmitted bytes to an ``output`` callable and drives its interrupt line
through an ``interrupt`` callable.

What is simplified, and why:

* Time does not exist.  A byte written to THR leaves at once, so THRE and TEMT
  are always set and the transmitter FIFO is always empty.  The receiver's
  character timeout (4 character times without data) is taken as already
  elapsed: with FIFOs on, data below the trigger level reports IIR "character
  timeout" at once, as a real chip would a moment later.
* There is no line: parity, framing and break errors never happen, and the
  divisor (baud rate) and LCR are stored but change nothing.
* Host input is flow-controlled: :meth:`Uart16550.enqueue_input` queues bytes
  on the host side and they enter the receiver only as it has room, so host
  input never overruns.  Overruns happen as on the chip when the sender does
  not wait: in loopback mode, a guest writing faster than it reads.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from pykvm.devices import DeviceError, FastRow

# Register offsets (datasheet Table II).  Offsets 0 and 1 hold the divisor
# latch (DLL, DLM) instead while LCR.DLAB is set; offset 2 is IIR when read
# and FCR when written; offset 0 is RBR when read and THR when written.
RBR = THR = DLL = 0
IER = DLM = 1
IIR = FCR = 2
LCR = 3
MCR = 4
LSR = 5
MSR = 6
SCR = 7
REGISTER_COUNT = 8

# IER: Interrupt Enable Register (bits 4-7 are always 0).
IER_ERBFI = 0x01  # received data available
IER_ETBEI = 0x02  # transmitter holding register empty
IER_ELSI = 0x04  # receiver line status
IER_EDSSI = 0x08  # modem status
IER_MASK = 0x0F

# IIR: Interrupt Identification Register.  Bit 0 is 0 while an interrupt is
# pending; bits 1-3 identify the highest-priority one (datasheet Table IV).
IIR_NONE = 0x01
IIR_RLS = 0x06  # priority 1: receiver line status (OE, PE, FE, BI)
IIR_RDA = 0x04  # priority 2: received data available (at trigger level)
IIR_TIMEOUT = 0x0C  # priority 2: character timeout (data below trigger)
IIR_THRE = 0x02  # priority 3: transmitter holding register empty
IIR_MODEM = 0x00  # priority 4: modem status
IIR_FIFOS_ON = 0xC0  # bits 6-7 set while FCR bit 0 enables the FIFOs

# FCR: FIFO Control Register (write-only).
FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_CLEAR_TX = 0x04
FCR_TRIGGER = 0xC0  # receiver trigger level, bits 6-7
RX_TRIGGER_LEVELS = (1, 4, 8, 14)
FIFO_SIZE = 16

# LCR: Line Control Register.  Only DLAB changes what the model does.
LCR_DLAB = 0x80  # divisor latch access bit

# MCR: Modem Control Register (bits 5-7 are always 0).
MCR_DTR = 0x01
MCR_RTS = 0x02
MCR_OUT1 = 0x04
MCR_OUT2 = 0x08  # on a PC, gates the UART's interrupt onto the IRQ line
MCR_LOOP = 0x10
MCR_MASK = 0x1F

# LSR: Line Status Register.
LSR_DR = 0x01  # data ready
LSR_OE = 0x02  # overrun error (cleared by reading LSR)
LSR_THRE = 0x20  # transmitter holding register empty
LSR_TEMT = 0x40  # transmitter empty (THR and shift register)

# MSR: Modem Status Register.  Bits 0-3 are "delta" bits, set when the
# corresponding input changes and cleared when MSR is read.
MSR_DCTS = 0x01
MSR_DDSR = 0x02
MSR_TERI = 0x04  # trailing edge of RI (RI went from on to off)
MSR_DDCD = 0x08
MSR_CTS = 0x10
MSR_DSR = 0x20
MSR_RI = 0x40
MSR_DCD = 0x80

# The host side of the cable: a terminal that is connected and ready.
# QEMU and vm-superio present the same lines.
HOST_MODEM_LINES = MSR_DCD | MSR_DSR | MSR_CTS

DEFAULT_DIVISOR = 12  # 9600 baud from the PC's 1.8432 MHz clock


FROM_HOST = 0x100  # marks receiver bytes that came from the host queue


class Uart16550:
    """A 16550A UART: registers at offsets 0..7, one interrupt line.

    ``output`` receives every byte the guest transmits (in loopback mode
    nothing leaves the chip).  ``interrupt(level)`` is called each time the
    interrupt line changes level; as on a PC the line is asserted only while
    MCR.OUT2 is set and an enabled interrupt is pending.

    Multi-byte accesses are split into byte accesses at consecutive offsets,
    as the PC bus does for an 8-bit device.
    """

    name = "uart16550"
    length = REGISTER_COUNT

    def __init__(
        self,
        output: Callable[[bytes], None] | None = None,
        interrupt: Callable[[bool], None] | None = None,
    ) -> None:
        self.output = output
        self.interrupt = interrupt
        #: Called after a register write that changed :meth:`fast_rows` (set by the platform).
        self.fast_path_changed: Callable[[], None] | None = None
        self.bytes_out = 0  # bytes transmitted to ``output``
        self.bytes_in = 0  # bytes moved from the host queue into the receiver
        self._host_input: deque[int] = deque()
        # RBR, or the receiver FIFO.  Bytes that came from the host queue carry
        # FROM_HOST so that a FIFO reset can hand them back (see _clear_rx).
        self._rx: deque[int] = deque()
        self._irq_level = False
        self._host_lines = HOST_MODEM_LINES  # what the host's end drives (outside the chip: a reset keeps it)
        # Neither the divisor latch nor SCR is touched by a master reset.
        self._divisor = DEFAULT_DIVISOR
        self._scr = 0
        self.reset()

    def reset(self) -> None:
        """Master reset: the register values of datasheet Table VIII.

        The host input queue is outside the chip and survives.
        """
        self._ier = 0
        self._lcr = 0
        self._mcr = 0
        self._fcr = 0  # only the FIFO enable and trigger bits are kept
        self._rx.clear()
        self._overrun = False
        # THRE interrupt latch: set when THR becomes empty while ETBEI is on,
        # cleared by an IIR read that reports it or by a THR write.
        self._thre_pending = False
        self._modem_lines = self._host_lines  # MSR bits 4-7
        self._modem_deltas = 0  # MSR bits 0-3
        self._fill_receiver()
        self._update_interrupt()
        if self.fast_path_changed:
            self.fast_path_changed()  # the fast path is allowed again

    # -- the guest's side: register reads and writes ------------------------

    def read(self, offset: int, size: int) -> bytes:
        """Read ``size`` registers starting at ``offset``."""
        _check_access(offset, size)
        result = bytearray()
        for register in range(offset, offset + size):
            result.append(self._read_register(register))
            self._update_interrupt()
        return bytes(result)

    def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` to the registers starting at ``offset``."""
        _check_access(offset, len(data))
        fast_path_before = self.tx_fast_path_ok
        for register, value in enumerate(data, start=offset):
            self._write_register(register, value)
            self._update_interrupt()
        if self.fast_path_changed and self.tx_fast_path_ok != fast_path_before:
            self.fast_path_changed()

    def snapshot(self) -> dict[str, int | bool | bytes]:
        """The model's state without side effects (no IIR/LSR/MSR/RBR read happens).

        For monitors, labs and tests: what the registers hold, the receive
        FIFO's contents and the interrupt line, as the host sees them.
        """
        return {
            "ier": self._ier,
            "iir": self._pending_interrupt() | (0xC0 if self._fifo_enabled else 0),
            "fcr": self._fcr,
            "lcr": self._lcr,
            "mcr": self._mcr,
            "lsr": self._lsr(),
            "msr": self._modem_lines | self._modem_deltas,
            "scr": self._scr,
            "divisor": self._divisor,
            "rx_fifo": bytes(v & 0xFF for v in self._rx),
            "host_queue": len(self._host_input),
            "irq": self._irq_level,
        }

    def save_state(self) -> dict:
        """Registers, the receiver (host bytes marked), the host queue, the line levels (version 1)."""
        return {"version": 1, "ier": self._ier, "lcr": self._lcr, "mcr": self._mcr, "fcr": self._fcr,
                "scr": self._scr, "divisor": self._divisor, "rx": list(self._rx), "overrun": self._overrun,
                "thre_pending": self._thre_pending, "modem_lines": self._modem_lines,
                "modem_deltas": self._modem_deltas, "host_lines": self._host_lines,
                "host_input": bytes(self._host_input), "irq": self._irq_level,
                "bytes_out": self.bytes_out, "bytes_in": self.bytes_in}

    def load_state(self, state: dict) -> None:
        """The state :meth:`save_state` returned; the line level is the irqchip's to restore, not re-raised."""
        from pykvm.devices import check_state

        s = check_state(self, state)
        self._ier, self._lcr, self._mcr, self._fcr = s["ier"], s["lcr"], s["mcr"], s["fcr"]
        self._scr, self._divisor = s["scr"], s["divisor"]
        self._rx = deque(s["rx"])
        self._overrun, self._thre_pending = s["overrun"], s["thre_pending"]
        self._modem_lines, self._modem_deltas, self._host_lines = s["modem_lines"], s["modem_deltas"], s["host_lines"]
        self._host_input = deque(s["host_input"])
        self._irq_level = s["irq"]
        self.bytes_out, self.bytes_in = s["bytes_out"], s["bytes_in"]
        if self.fast_path_changed:
            self.fast_path_changed()

    def _read_register(self, register: int) -> int:
        dlab = self._lcr & LCR_DLAB
        if register == RBR:
            return self._divisor & 0xFF if dlab else self._read_rbr()
        if register == IER:
            return self._divisor >> 8 if dlab else self._ier
        if register == IIR:
            return self._read_iir()
        if register == LCR:
            return self._lcr
        if register == MCR:
            return self._mcr
        if register == LSR:
            return self._read_lsr()
        if register == MSR:
            return self._read_msr()
        return self._scr

    def _write_register(self, register: int, value: int) -> None:
        dlab = self._lcr & LCR_DLAB
        if register == THR:
            if dlab:
                self._divisor = (self._divisor & 0xFF00) | value
            else:
                self._transmit(value)
        elif register == IER:
            if dlab:
                self._divisor = (value << 8) | (self._divisor & 0xFF)
            else:
                self._write_ier(value)
        elif register == FCR:
            self._write_fcr(value)
        elif register == LCR:
            self._lcr = value
        elif register == MCR:
            self._write_mcr(value)
        elif register == SCR:
            self._scr = value
        # LSR and MSR are read-only (LSR writes are a factory test mode).

    # -- receiver -------------------------------------------------------------

    @property
    def _fifo_enabled(self) -> bool:
        return bool(self._fcr & FCR_ENABLE)

    @property
    def _rx_capacity(self) -> int:
        # Without FIFOs (16450 mode) the receiver holds one byte in RBR.
        return FIFO_SIZE if self._fifo_enabled else 1

    def _read_rbr(self) -> int:
        if not self._rx:
            return 0  # undefined on the chip; 0 is as good as any
        value = self._rx.popleft() & 0xFF
        self._fill_receiver()
        return value

    def _receive(self, value: int) -> None:
        """A byte arrives on the serial input, ready or not (loopback)."""
        if len(self._rx) < self._rx_capacity:
            self._rx.append(value)
            return
        # Overrun.  In 16450 mode the new byte destroys the one in RBR; with
        # FIFOs it is lost in the shift register and the FIFO is kept.
        self._overrun = True
        if not self._fifo_enabled:
            self._rx[0] = value

    def _fill_receiver(self) -> None:
        """Move host input into the receiver while it has room.

        In loopback mode the serial input is disconnected, so host input
        waits until loopback is turned off.
        """
        if self._mcr & MCR_LOOP:
            return
        while self._host_input and len(self._rx) < self._rx_capacity:
            self._rx.append(self._host_input.popleft() | FROM_HOST)
            self.bytes_in += 1

    def _clear_rx(self) -> None:
        """Empty the receiver (FIFO reset or mode switch).

        Loopback bytes are lost, as on the chip.  Bytes from the host queue
        go back to its front: the host end of this virtual wire is flow
        controlled, so input typed before the guest initialised the UART
        (which resets the FIFO) is not silently dropped.
        """
        from_host = [v & 0xFF for v in self._rx if v & FROM_HOST]
        self._rx.clear()
        self._host_input.extendleft(reversed(from_host))
        self.bytes_in -= len(from_host)

    def _lsr(self) -> int:
        """LSR's value; reading it through the guest also clears OE (_read_lsr)."""
        value = LSR_THRE | LSR_TEMT  # transmission is instantaneous
        if self._rx:
            value |= LSR_DR
        if self._overrun:
            value |= LSR_OE
        return value

    def _read_lsr(self) -> int:
        value = self._lsr()
        self._overrun = False  # error bits are cleared by reading LSR
        return value

    def _write_fcr(self, value: int) -> None:
        enable = value & FCR_ENABLE
        if enable != self._fcr & FCR_ENABLE:
            # Switching between FIFO and 16450 mode empties the FIFOs.
            self._clear_rx()
        if not enable:
            # Other bits are not programmed unless bit 0 is set.
            self._fcr = 0
        else:
            if value & FCR_CLEAR_RX:
                self._clear_rx()
            # FCR_CLEAR_TX: the transmitter FIFO is always empty here.
            self._fcr = value & (FCR_ENABLE | FCR_TRIGGER)
        self._fill_receiver()

    # -- transmitter ----------------------------------------------------------

    def _transmit(self, value: int) -> None:
        if self._mcr & MCR_LOOP:
            self._receive(value)  # THR is wired to the receiver
        else:
            if self.output:
                self.output(bytes((value,)))
            self.bytes_out += 1
        # Writing THR clears a pending THRE interrupt, and the instantaneous
        # transmission empties THR again at once: the net effect is to re-arm it.
        self._thre_pending = bool(self._ier & IER_ETBEI)

    def _write_ier(self, value: int) -> None:
        value &= IER_MASK
        if value & IER_ETBEI and not self._ier & IER_ETBEI:
            # Enabling ETBEI while THR is empty raises the THRE interrupt at
            # once (as on the 16550A; drivers rely on it to start sending).
            self._thre_pending = True
        elif not value & IER_ETBEI:
            self._thre_pending = False
        self._ier = value

    # -- modem control --------------------------------------------------------

    def _write_mcr(self, value: int) -> None:
        was_loopback = self._mcr & MCR_LOOP
        self._mcr = value & MCR_MASK
        if self._mcr & MCR_LOOP:
            # Loopback wires the outputs to the inputs: RTS->CTS, DTR->DSR,
            # OUT1->RI, OUT2->DCD (datasheet, MCR bit 4).
            mcr = self._mcr
            lines = (
                (MSR_CTS if mcr & MCR_RTS else 0)
                | (MSR_DSR if mcr & MCR_DTR else 0)
                | (MSR_RI if mcr & MCR_OUT1 else 0)
                | (MSR_DCD if mcr & MCR_OUT2 else 0)
            )
        else:
            lines = self._host_lines
            if was_loopback:
                self._fill_receiver()  # the serial input is connected again
        self._set_modem_lines(lines)

    def host_hung_up(self) -> None:
        """The host's end of the line went away (end of input): DCD and DSR drop, as on a real line.

        Bytes already queued are still delivered; a guest that watches MSR
        (or enables the modem-status interrupt) learns that no more will come.
        """
        self._host_lines = MSR_CTS
        if not self._mcr & MCR_LOOP:
            self._set_modem_lines(self._host_lines)
            self._update_interrupt()

    def _set_modem_lines(self, lines: int) -> None:
        changed = self._modem_lines ^ lines
        # CTS, DSR and DCD report any change; RI only its trailing edge.
        deltas = (changed >> 4) & (MSR_DCTS | MSR_DDSR | MSR_DDCD)
        if self._modem_lines & MSR_RI and not lines & MSR_RI:
            deltas |= MSR_TERI
        self._modem_deltas |= deltas
        self._modem_lines = lines

    def _read_msr(self) -> int:
        value = self._modem_lines | self._modem_deltas
        self._modem_deltas = 0
        return value

    # -- interrupts -----------------------------------------------------------

    def _pending_interrupt(self) -> int:
        """The IIR identification of the highest-priority enabled interrupt."""
        ier = self._ier
        if ier & IER_ELSI and self._overrun:
            return IIR_RLS
        if ier & IER_ERBFI and self._rx:
            trigger = RX_TRIGGER_LEVELS[self._fcr >> 6]
            if self._fifo_enabled and len(self._rx) < trigger:
                return IIR_TIMEOUT
            return IIR_RDA
        if ier & IER_ETBEI and self._thre_pending:
            return IIR_THRE
        if ier & IER_EDSSI and self._modem_deltas:
            return IIR_MODEM
        return IIR_NONE

    def _read_iir(self) -> int:
        source = self._pending_interrupt()
        if source == IIR_THRE:
            # Reading IIR clears THRE only when it is the source it reports.
            self._thre_pending = False
        return source | (IIR_FIFOS_ON if self._fifo_enabled else 0)

    def _update_interrupt(self) -> None:
        level = bool(self._mcr & MCR_OUT2) and self._pending_interrupt() != IIR_NONE
        if level != self._irq_level:
            self._irq_level = level
            if self.interrupt:
                self.interrupt(level)

    @property
    def irq_level(self) -> bool:
        """The current level of the interrupt line."""
        return self._irq_level

    # -- the host's side ------------------------------------------------------

    def enqueue_input(self, data: bytes) -> None:
        """Queue bytes for the guest to receive, as if typed on a terminal.

        They enter the receiver as it has room (at most 16 with FIFOs, else
        1) and the rest wait in an unbounded host-side queue.
        """
        self._host_input.extend(data)
        self._fill_receiver()
        self._update_interrupt()

    @property
    def pending_input(self) -> int:
        """Bytes queued by the host that have not entered the receiver yet."""
        return len(self._host_input)

    # -- support for the C run loop's transmit fast path --------------------

    @property
    def tx_fast_path_ok(self) -> bool:
        """True when a guest write to offset 0 is a plain transmit.

        Then the write's only effects are a byte for ``output`` and
        ``bytes_out += 1``, so a run loop may buffer such writes and hand them
        over later through :meth:`accept_transmitted`.  It is not a plain
        transmit when DLAB is set (the write goes to DLL), in loopback mode
        (the byte goes to the receiver) or when ETBEI is set (the write
        re-arms the THRE interrupt, which may change the interrupt line).
        """
        return not (
            self._lcr & LCR_DLAB or self._mcr & MCR_LOOP or self._ier & IER_ETBEI
        )

    def fast_rows(self) -> tuple[FastRow, ...]:
        """While THR writes are plain transmits, the C loop may buffer them (``txbuf``)."""
        return (_THR_ROW,) if self.tx_fast_path_ok else ()

    def fast_transmitted(self, row: FastRow, data: bytes) -> None:
        """Bytes the C loop buffered from the THR row: as if each had been written here."""
        self.accept_transmitted(data)

    def fast_hits(self, row: FastRow, hits: int, last_value: int) -> None:
        """Nothing to add: the transmitted bytes themselves came through :meth:`fast_transmitted`."""

    def accept_transmitted(self, data: bytes) -> None:
        """Account for bytes the guest wrote to THR while the model was away.

        The result is exactly that of ``write(0, bytes([b]))`` for each byte.
        The run loop must hand its buffer over before any other access to this
        device, so that the bytes are seen in the order the guest wrote them.
        """
        if not data:
            return
        if self.tx_fast_path_ok:
            if self.output:
                self.output(bytes(data))
            self.bytes_out += len(data)
        else:
            for value in data:
                self.write(THR, bytes((value,)))


_THR_ROW = FastRow(THR, 1, read="pass", write="txbuf", name="thr")


def _check_access(offset: int, size: int) -> None:
    if size < 1 or offset < 0 or offset + size > REGISTER_COUNT:
        raise DeviceError(
            f"16550 access of {size} byte(s) at offset {offset} is outside 0..7"
        )
