"""The console as people use it: pykvm on a pseudo-terminal, typed into, and the terminal left as it was.

Each test starts a small wrapper on a fresh pty (``pty.fork``): it records
the terminal's mode, runs ``python -m pykvm run ...`` in the foreground
(the pty is its controlling terminal, as a shell would give it), then
prints pykvm's exit status and whether the mode afterwards is the mode
before.  The test types bytes into the pty's master side, as a keyboard
does, and reads what the terminal shows; every wait is for output, never a
sleep.
"""

from __future__ import annotations

import os
import pty
import re
import select
import signal
import sys
import time

import pytest

pytestmark = pytest.mark.kvm

WRAPPER = r"""
import os, signal, subprocess, sys, termios
signal.signal(signal.SIGINT, signal.SIG_IGN)  # a typed Ctrl-C is for pykvm, which shares the terminal
before = termios.tcgetattr(0)
proc = subprocess.Popen([sys.executable, "-m", "pykvm", "run", *sys.argv[1:]],
                        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
print(f"<pid {proc.pid}>", flush=True)
status = proc.wait()
after = termios.tcgetattr(0)
print(f"<status {status} restored {after == before}>", flush=True)
"""


class Terminal:
    """The master side of a pty running the wrapper: type, and wait for what appears."""

    def __init__(self, *args: str) -> None:
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            try:
                os.execv(sys.executable, [sys.executable, "-c", WRAPPER, *args])
            finally:
                os._exit(127)
        self.output = b""
        self.pykvm_pid = int(self.wait_for(rb"<pid (\d+)>").group(1))

    def type(self, data: bytes) -> None:
        os.write(self.fd, data)

    def wait_for(self, pattern: bytes, timeout: float = 60, start: int = 0) -> re.Match:
        """Read until ``pattern`` (a regex) appears in the output after offset ``start``."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.compile(pattern).search(self.output, start)
            if found:
                return found
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {pattern!r}; the terminal shows {self.output!r}")
            ready, _, _ = select.select([self.fd], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # EIO: the wrapper has exited and the pty is closed
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"the terminal closed before {pattern!r}; it showed {self.output!r}")
                self.output += chunk

    def finish(self) -> tuple[int, bool]:
        """pykvm's exit status, and whether the terminal's mode was restored."""
        found = self.wait_for(rb"<status (-?\d+) restored (True|False)>")
        os.waitpid(self.pid, 0)
        self.pid = 0
        return int(found.group(1)), found.group(2) == b"True"

    def close(self) -> None:
        if self.pid:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        os.close(self.fd)


@pytest.fixture
def terminal():
    opened = []

    def start(*args: str) -> Terminal:
        opened.append(Terminal(*args))
        return opened[-1]

    yield start
    for t in opened:
        t.close()


def test_typing_reaches_the_guest_and_ctrl_d_is_a_byte_for_it(terminal):
    t = terminal("--guest", "uart_echo")  # the default: console and monitor share the terminal
    t.wait_for(b"uart ready")
    mark = len(t.output)
    t.type(b"hello")
    t.wait_for(b"hello", start=mark)  # echoed by the guest (the terminal's own echo is off in raw mode)
    t.type(b"\x04")  # Ctrl-D: the EOT byte, which ends uart_echo, not the end of input
    t.wait_for(b"bye")
    assert t.finish() == (0, True)


def test_ctrl_a_x_quits(terminal):
    t = terminal("--guest", "uart_echo", "-nographic")
    t.wait_for(b"uart ready")
    t.type(b"\x01x")
    t.wait_for(b"pykvm: terminated \\(C-a x\\)")
    assert t.finish() == (0, True)


def test_ctrl_a_c_reaches_the_monitor_and_cont_resumes_the_guest(terminal):
    t = terminal("--guest", "uart_echo")
    t.wait_for(b"uart ready")
    t.type(b"ab")
    t.wait_for(b"ab")
    t.type(b"\x01c")
    mark = t.wait_for(re.escape(b"(pykvm) ")).end()
    t.type(b"stop\r")
    t.wait_for(b"stopped at rip 0x", start=mark)
    t.type(b"info registers\r")
    regs = t.wait_for(rb"rip 0x([0-9a-f]{16})[\s\S]*mode: protected", start=mark)
    assert int(regs.group(1), 16) >= 0x100000  # in uart_echo's code
    mark = regs.end()
    t.type(b"cont\r")
    t.wait_for(b"continuing at rip 0x", start=mark)
    t.type(b"\x01c")  # back to the console: the running guest echoes again
    mark = len(t.output)
    t.type(b"cd\x04")
    t.wait_for(b"cd[\\s\\S]*bye", start=mark)
    assert t.finish() == (0, True)
    assert b"unknown command" not in t.output


def test_ctrl_a_h_helps_and_ctrl_a_ctrl_a_sends_ctrl_a(terminal):
    t = terminal("--guest", "uart_echo")
    t.wait_for(b"uart ready")
    t.type(b"\x01h")
    t.wait_for(b"C-a c    switch between console and monitor")
    mark = len(t.output)
    t.type(b"\x01\x01z")
    t.wait_for(b"\x01z", start=mark)  # the guest echoed the Ctrl-a it was sent
    t.type(b"\x04")
    assert t.finish() == (0, True)


def test_ctrl_c_on_serial_stdio_stops_pykvm_and_restores_the_terminal(terminal):
    t = terminal("--guest", "uart_echo", "-serial", "stdio")
    t.wait_for(b"uart ready")
    t.type(b"\x03")  # the terminal turns it into SIGINT (QEMU's -serial stdio keeps signals)
    t.wait_for(b"pykvm: interrupted")  # the summary: stderr is the terminal
    assert t.finish() == (130, True)


def test_sigterm_restores_the_terminal(terminal):
    t = terminal("--guest", "uart_echo")
    t.wait_for(b"uart ready")
    os.kill(t.pykvm_pid, signal.SIGTERM)
    t.wait_for(b"terminating on signal 15")
    assert t.finish() == (143, True)


def test_a_guest_crash_restores_the_terminal_and_shows_the_dump(terminal):
    t = terminal("--guest", "triple64")
    t.wait_for(b"triple fault or shutdown")
    status, restored = t.finish()
    assert (status, restored) == (3, True)
    assert b"code at RIP" in t.output


def test_bad_input_leaves_the_terminal_alone(terminal):
    t = terminal("--guest", "hello64", "-m", "lots")
    t.wait_for(b"pykvm run: error: -m lots")
    assert t.finish() == (2, True)


def test_monitor_stdio_on_a_terminal_with_the_console_behind_ctrl_a_c(terminal):
    t = terminal("--guest", "uart_echo", "-monitor", "stdio")
    t.wait_for(re.escape(b"(pykvm) "))  # -monitor stdio: the monitor first
    t.wait_for(b"uart ready")
    t.type(b"info status\r")
    t.wait_for(b"VM status: running")
    t.type(b"\x01cabc")
    t.wait_for(b"abc")
    t.type(b"\x01cinfo cpus\r")
    t.wait_for(re.escape(b"* CPU #0"))
    t.type(b"quit\r")
    assert t.finish() == (0, True)
    assert b"unknown command" not in t.output  # 'abc' went to the guest, not to the monitor
