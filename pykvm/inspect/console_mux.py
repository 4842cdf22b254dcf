"""One terminal for the guest's serial console and the monitor, as QEMU's ``-nographic`` shares it.

``Ctrl-a c`` switches between console and monitor, ``Ctrl-a x`` quits,
``Ctrl-a h`` helps, ``Ctrl-a Ctrl-a`` sends a Ctrl-a to the guest.  No
terminal is needed: tests feed bytes and read what was written.
"""

from __future__ import annotations

from collections.abc import Callable

from pykvm.inspect.monitor import PROMPT, Monitor

__all__ = ["CTRL_A", "ConsoleMux", "MUX_HELP"]

CTRL_A = 0x01

MUX_HELP = (
    "C-a h    print this help\n"
    "C-a x    exit pykvm\n"
    "C-a c    switch between console and monitor\n"
    "C-a C-a  sends C-a\n"
)


class ConsoleMux:
    """Route terminal input to the guest's serial port or to the monitor.

    ``feed(data)`` takes bytes as typed; in console mode they go to
    ``to_guest``, in monitor mode they are edited into a line (echoed,
    backspace works) and executed on Enter; answers go to ``write``.
    ``Ctrl-a c`` switches, ``Ctrl-a x`` quits.  No terminal is needed:
    tests feed bytes and read what was written.
    """

    def __init__(self, monitor: Monitor, to_guest: Callable[[bytes], None] | None,
                 write: Callable[[str], None], *, start_in_monitor: bool = True) -> None:
        self.monitor = monitor
        self.to_guest = to_guest
        self.write = write
        self.in_monitor = start_in_monitor or to_guest is None
        self._escape = False
        self._line = bytearray()
        self.quit = False
        if self.in_monitor:
            self.write(PROMPT)

    def switch(self) -> None:
        if self.to_guest is None:
            self.write("\n(no serial console on this terminal)\n" + PROMPT)
            return
        self.in_monitor = not self.in_monitor
        if self.in_monitor:
            self.write("\n" + PROMPT + self._line.decode("utf-8", "replace"))
        else:
            self.write("\n")

    def feed(self, data: bytes) -> None:
        for byte in data:
            if self.quit:
                return
            if self._escape:
                self._escape = False
                if byte in (ord("c"), ord("C")):
                    self.switch()
                elif byte in (ord("x"), ord("X")):
                    self.write("\npykvm: terminated (C-a x)\n")
                    self.monitor.execute("quit")
                    self.quit = True
                elif byte in (ord("h"), ord("H"), ord("?")):
                    self.write("\n" + MUX_HELP)
                    if self.in_monitor:
                        self.write(PROMPT + self._line.decode("utf-8", "replace"))
                elif byte == CTRL_A:
                    self._deliver(bytes([CTRL_A]))
                continue
            if byte == CTRL_A:
                self._escape = True
                continue
            self._deliver(bytes([byte]))

    def _deliver(self, data: bytes) -> None:
        if not self.in_monitor:
            self.to_guest(data)
            return
        byte = data[0]
        if byte in (0x0D, 0x0A):
            line = self._line.decode("utf-8", "replace")
            self._line.clear()
            self.write("\n")
            answer = self.monitor.execute(line)
            if answer:
                self.write(answer.rstrip() + "\n")
            if self.monitor.quit_requested:
                self.quit = True
                return
            self.write(PROMPT)
        elif byte in (0x7F, 0x08):
            if self._line:
                self._line.pop()
                self.write("\b \b")
        elif byte == 0x15:  # Ctrl-U: kill the line
            self.write("\b \b" * len(self._line))
            self._line.clear()
        elif byte >= 0x20 or byte == 0x09:
            self._line.append(byte)
            self.write(chr(byte) if byte < 0x80 else "")
