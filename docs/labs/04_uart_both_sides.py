"""Lab 4: a device from both sides -- the 16550 UART.

Run:  python docs/labs/04_uart_both_sides.py

Part 1, the guest's side: ``uart_echo`` programs COM1 like a real driver and
echoes what it receives.  A logging wrapper sits between the port-I/O bus
and pykvm's 16550 model, so every IN and OUT the guest makes is recorded
and decoded, the way a logic analyser on the ISA bus would see it.

Part 2, the host's side: the same model with no VM at all.  The recorded
writes are replayed into a fresh ``Uart16550``, then the host types more
than the FIFO holds and we watch LSR, IIR and the FIFO.
"""

from __future__ import annotations

from pykvm import Machine
from pykvm.devices import uart16550 as u
from pykvm.devices.uart16550 import Uart16550

COM1 = 0x3F8
INPUT = b"hi\x04"  # 'h', 'i', then EOT, which makes uart_echo stop

READ_NAMES = {0: "RBR", 1: "IER", 2: "IIR", 3: "LCR", 4: "MCR", 5: "LSR", 6: "MSR", 7: "SCR"}
WRITE_NAMES = {0: "THR", 1: "IER", 2: "FCR", 3: "LCR", 4: "MCR", 5: "LSR", 6: "MSR", 7: "SCR"}


def bits(value: int, names: dict[int, str]) -> str:
    return " ".join(name for bit, name in names.items() if value & bit) or "-"


LSR_BITS = {u.LSR_DR: "DR", u.LSR_OE: "OE", u.LSR_THRE: "THRE", u.LSR_TEMT: "TEMT"}
MCR_BITS = {u.MCR_DTR: "DTR", u.MCR_RTS: "RTS", u.MCR_OUT1: "OUT1", u.MCR_OUT2: "OUT2", u.MCR_LOOP: "LOOP"}
IER_BITS = {u.IER_ERBFI: "ERBFI", u.IER_ETBEI: "ETBEI", u.IER_ELSI: "ELSI", u.IER_EDSSI: "EDSSI"}
IIR_SOURCES = {u.IIR_NONE: "no interrupt pending", u.IIR_RLS: "line status", u.IIR_RDA: "data available",
               u.IIR_TIMEOUT: "character timeout", u.IIR_THRE: "THR empty", u.IIR_MODEM: "modem status"}


def describe(write: bool, offset: int, value: int, dlab: bool) -> tuple[str, str]:
    """Register name and meaning of one access, decoded from the bus traffic alone."""
    if dlab and offset in (0, 1):
        return ("DLL" if offset == 0 else "DLM"), "divisor latch " + ("low" if offset == 0 else "high") + " byte"
    name = (WRITE_NAMES if write else READ_NAMES)[offset]
    if name in ("THR", "RBR"):
        return name, repr(chr(value))
    if name == "LCR":
        words = f"{5 + (value & 3)} data bits, {'2' if value & 4 else '1'} stop, parity {'on' if value & 8 else 'off'}"
        if value & u.LCR_DLAB:
            return name, "DLAB=1: offsets 0-1 become the divisor latch"
        return name, "DLAB=0, " + words
    if name == "FCR":
        parts = ["FIFOs on" if value & u.FCR_ENABLE else "FIFOs off"]
        parts += ["clear RX"] * bool(value & u.FCR_CLEAR_RX) + ["clear TX"] * bool(value & u.FCR_CLEAR_TX)
        parts.append(f"RX trigger {u.RX_TRIGGER_LEVELS[value >> 6]}")
        return name, ", ".join(parts)
    if name == "MCR":
        return name, bits(value, MCR_BITS)
    if name == "IER":
        return name, bits(value, IER_BITS) if value else "all interrupts off"
    if name == "LSR":
        return name, bits(value, LSR_BITS)
    if name == "IIR":
        return name, IIR_SOURCES.get(value & 0x0F, "?") + (", FIFOs on" if value & 0xC0 else "")
    return name, ""


class Traced:
    """Sits on the bus in place of the UART: records each access, then forwards it."""

    name = "com1"
    length = 8

    def __init__(self, device: Uart16550) -> None:
        self.device = device
        self.log: list[tuple[str, int, int]] = []  # ("R"/"W", offset, value)

    def read(self, offset: int, size: int) -> bytes:
        data = self.device.read(offset, size)
        self.log += [("R", offset + i, b) for i, b in enumerate(data)]
        return data

    def write(self, offset: int, data: bytes) -> None:
        self.log += [("W", offset + i, b) for i, b in enumerate(data)]
        self.device.write(offset, data)

    # The UART owns its fast path: the wrapper offers the C loop the UART's rows
    # and hands back what C did, so only the accesses C leaves to Python are traced.
    def fast_rows(self):
        return self.device.fast_rows()

    def fast_transmitted(self, row, data: bytes) -> None:
        self.device.fast_transmitted(row, data)

    def fast_hits(self, row, hits: int, last_value: int) -> None:
        self.device.fast_hits(row, hits, last_value)


def run_echo(c_loop: bool) -> tuple[Machine, Traced, object]:
    m = Machine(memory="16M", c_loop=c_loop)
    traced = Traced(m.serial)
    m.pio.unregister(m.serial)                       # take the model off the bus...
    m.pio.register(COM1, 8, traced, "com1")          # ...and put the wrapper there
    m.load_guest("uart_echo")
    m.feed_serial(INPUT)                             # typed before the guest even starts
    result = m.run(timeout=10)
    return m, traced, result


def print_trace(log: list[tuple[str, int, int]]) -> None:
    """Each programming access in full; then one line per byte moved, with the LSR polls before it."""
    dlab = False
    polls: list[int] = []
    print(f"  {'#':>3}  {'access':<16} {'reg':<4} {'value':<5} meaning")
    for i, (rw, offset, value) in enumerate(log, 1):
        name, meaning = describe(rw == "W", offset, value, dlab)
        if rw == "W" and name == "LCR":
            dlab = bool(value & u.LCR_DLAB)
        if name == "LSR" and rw == "R":
            polls.append(value)  # folded into the next data line
            continue
        if name in ("THR", "RBR"):
            verb = "sent" if name == "THR" else "received"
            waited = ""
            if polls:
                waited = (f"after {len(polls)} LSR poll{'s' * (len(polls) > 1)}"
                          f" (last {polls[-1]:#04x}: {bits(polls[-1], LSR_BITS)})")
            print(f"  {i:>3}  {verb + ' ' + meaning:<16} {name:<4} {value:#04x}  {waited}")
            polls = []
            continue
        port = COM1 + offset
        access = f"out {port:#x} <- {value:02x}" if rw == "W" else f"in  {port:#x} -> {value:02x}"
        print(f"  {i:>3}  {access:<16} {name:<4} {value:#04x}  {meaning}")
    if polls:
        print(f"       ({len(polls)} more LSR polls)")


def part1() -> dict:
    print("Part 1: the guest's side (uart_echo, every access goes to Python: Machine(c_loop=False))")
    m, traced, result = run_echo(c_loop=False)
    with m:
        print(f"  input typed by the host: {INPUT!r}")
        print_trace(traced.log)
        reads = sum(1 for rw, _, _ in traced.log if rw == "R")
        writes = len(traced.log) - reads
        lsr_polls = sum(1 for rw, off, _ in traced.log if rw == "R" and off == u.LSR)
        print(f"\n  guest output: {result.serial_text!r}; EAX = {result.regs['rax']} bytes echoed; ended: {result.ended}")
        print(f"  accesses traced: {len(traced.log)} ({reads} reads, {writes} writes; {lsr_polls} were LSR polls)")
        print(f"  bus counter m.pio.stats['com1'] = {m.pio.stats['com1']} (one per exit that reached the bus)")
        print(f"  every access was a KVM_EXIT_IO: user-space exits for io = {result.exits['io']['total']}")
        state = {"log": list(traced.log), "total": len(traced.log), "stats": m.pio.stats["com1"],
                 "io": result.exits["io"]["total"], "rax": result.regs["rax"], "text": result.serial_text}

    print("\n  The same run with the C loop (the default): plain THR writes never reach Python")
    m, traced, result = run_echo(c_loop=True)
    with m:
        in_c = result.c_hits.get("com1.thr", 0)
        print(f"  traced in Python {len(traced.log)} + handled in C {in_c} = {len(traced.log) + in_c} "
              f"(the Python-only run traced {state['total']})")
        print(f"  output identical: {result.serial_text == state['text']}")
        state.update(c_traced=len(traced.log), c_hits=in_c)
    return state


def part2(log: list[tuple[str, int, int]]) -> None:
    print("\nPart 2: the host's side (the same model, no VM: Uart16550(output=..., interrupt=...))")
    sent = bytearray()
    irq_changes: list[bool] = []
    uart = Uart16550(output=sent.extend, interrupt=irq_changes.append)
    init = []
    for rw, offset, value in log:  # replay the guest's programming: its writes before its first read
        if rw == "R":
            break
        init.append((offset, value))
        uart.write(offset, bytes([value]))
    print(f"  replayed the guest's {len(init)} programming writes (offset=value): "
          + ", ".join(f"{o}={v:#04x}" for o, v in init))
    uart.write(u.LCR, bytes([uart.read(u.LCR, 1)[0] | u.LCR_DLAB]))  # the host peeks at the divisor
    divisor = uart.read(u.DLL, 1)[0] | uart.read(u.DLM, 1)[0] << 8
    uart.write(u.LCR, bytes([uart.read(u.LCR, 1)[0] & ~u.LCR_DLAB]))
    print(f"  divisor latch {divisor} -> {115200 // divisor} baud (1.8432 MHz / 16 / divisor; stored, never used:"
          " the model has no wire)")
    print(f"  LCR {uart.read(u.LCR, 1)[0]:#04x}, MCR {uart.read(u.MCR, 1)[0]:#04x} ({bits(uart.read(u.MCR, 1)[0], MCR_BITS)}),"
          f" IER {uart.read(u.IER, 1)[0]:#04x}")
    lsr = uart.read(u.LSR, 1)[0]
    print(f"  LSR {lsr:#04x} = {bits(lsr, LSR_BITS)}: nothing received, transmitter empty")

    typed = b"0123456789abcdefXYZW"
    uart.enqueue_input(typed)
    in_fifo = len(typed) - uart.pending_input
    print(f"\n  host types {len(typed)} bytes: {in_fifo} enter the receiver FIFO (it holds {u.FIFO_SIZE}), "
          f"{uart.pending_input} wait in the host queue (no overrun: the host side is flow-controlled)")
    lsr = uart.read(u.LSR, 1)[0]
    iir = uart.read(u.IIR, 1)[0]
    print(f"  LSR {lsr:#04x} = {bits(lsr, LSR_BITS)}; IIR {iir:#04x} = {IIR_SOURCES[iir & 0x0F]}"
          " (IER is 0, so no source is enabled)")
    uart.write(u.IER, bytes([u.IER_ERBFI]))
    iir = uart.read(u.IIR, 1)[0]
    print(f"  guest-style write IER=ERBFI -> IIR {iir:#04x} = {IIR_SOURCES[iir & 0x0F]} "
          f"(FIFO level {in_fifo} >= trigger 14); interrupt line now {'high' if uart.irq_level else 'low'}"
          f" (MCR.OUT2 gates it onto IRQ 4)")
    got = bytearray()
    while uart.read(u.LSR, 1)[0] & u.LSR_DR:
        got += uart.read(u.RBR, 1)
    print(f"  read RBR while LSR.DR: {bytes(got)!r} ({len(got)} bytes; the queue refilled the FIFO as it drained)")
    lsr = uart.read(u.LSR, 1)[0]
    print(f"  LSR {lsr:#04x} = {bits(lsr, LSR_BITS)}; interrupt line {'high' if uart.irq_level else 'low'};"
          f" line changes seen by the host: {['high' if x else 'low' for x in irq_changes]}")
    uart.write(u.IER, b"\0")

    uart.write(u.MCR, bytes([u.MCR_LOOP]))
    for value in range(0x41, 0x41 + u.FIFO_SIZE + 2):  # one OUT per byte, as the CPU does
        uart.write(u.THR, bytes([value]))
    lsr = uart.read(u.LSR, 1)[0]
    print(f"\n  loopback (MCR.LOOP): the guest writes {u.FIFO_SIZE + 2} bytes to THR without reading:"
          f" LSR {lsr:#04x} = {bits(lsr, LSR_BITS)} -- two bytes were lost (OE); reading LSR cleared OE:"
          f" {uart.read(u.LSR, 1)[0]:#04x}")
    print(f"  bytes sent to the host's output sink in part 2: {bytes(sent)!r} (loopback keeps them on the chip)")
    assert got == typed and lsr & u.LSR_OE


def main() -> None:
    print("Lab 4: a device from both sides, the 16550 UART\n")
    state = part1()
    part2(state["log"])
    ok = (state["text"] == "uart ready\nhi\nbye\n" and state["rax"] == 2
          and state["total"] == state["stats"] == state["io"]
          and state["c_traced"] + state["c_hits"] == state["total"])
    print(f"\nresult: {'ok' if ok else 'FAILED'}")


if __name__ == "__main__":
    main()
