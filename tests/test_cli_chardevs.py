"""Character devices on the command line, used the way a QEMU user uses them.

``-serial pty`` (a terminal program opens the pty pykvm names),
``-monitor unix:PATH,server`` (a client sends commands), ``-chardev
socket`` behind a ``virtconsole`` (the guest's virtio console reaches a
socket client), ``-serial tcp::PORT,server``.  Every wait here is for
bytes, never a sleep.
"""

from __future__ import annotations

import os
import re
import select
import socket
import subprocess
import sys
import time
import tty

import pytest

from pykvm import guests

pytestmark = pytest.mark.kvm

DOCS_CLI = __import__("pathlib").Path(__file__).resolve().parent.parent / "docs" / "cli.md"


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pykvm", "run", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def read_until(fd: int, pattern: bytes, timeout: float = 60) -> bytes:
    """Read ``fd`` until ``pattern`` (a regex) appears; everything read."""
    seen = b""
    deadline = time.monotonic() + timeout
    while not re.search(pattern, seen):
        left = deadline - time.monotonic()
        assert left > 0, f"timed out waiting for {pattern!r}; got {seen!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            assert chunk, f"end of stream before {pattern!r}; got {seen!r}"
            seen += chunk
    return seen


def announced(proc: subprocess.Popen, what: bytes) -> re.Match:
    line = read_until(proc.stderr.fileno(), what + rb".*\n")
    return re.search(what, line)


def finish(proc: subprocess.Popen) -> tuple[int, bytes, bytes]:
    out, err = proc.communicate(timeout=30)
    return proc.returncode, out, err


def test_serial_pty_is_a_terminal_a_program_can_open():
    proc = start("--guest", "uart_echo", "-serial", "pty")
    try:
        name = announced(proc, rb"pykvm: char device redirected to (/dev/pts/\d+) \(label serial0\)").group(1)
        fd = os.open(name, os.O_RDWR | os.O_NOCTTY)
        tty.setraw(fd)
        os.write(fd, b"pty!")
        read_until(fd, b"pty!")  # echoed by the guest, through the pty
        os.write(fd, b"\x04")
        read_until(fd, b"bye")
        os.close(fd)
        status, out, _ = finish(proc)
        assert status == 0 and out == b""  # the console was the pty, not stdout
    finally:
        proc.kill()
        proc.wait()


def test_monitor_on_a_unix_socket(tmp_path):
    path = tmp_path / "mon.sock"
    proc = start("--guest", "uart_echo", "-serial", "null", "-monitor", f"unix:{path},server,nowait")
    try:
        announced(proc, rb"listening on unix:")
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
            fd = client.fileno()
            read_until(fd, rb"\(pykvm\) ")
            client.sendall(b"info status\n")
            assert b"VM status: running" in read_until(fd, rb"VM status: .*\n")
            client.sendall(b"stop\ninfo registers\n")
            assert re.search(rb"rip 0x0000000000100", read_until(fd, rb"mode: protected"))
            client.sendall(b"quit\n")
            status, _, err = finish(proc)
        assert status == 0, err
    finally:
        proc.kill()
        proc.wait()


def test_virtconsole_on_a_socket_chardev(tmp_path):
    """virtio64u's driver sends a message and waits for it back: here a socket client echoes it."""
    path = tmp_path / "con.sock"
    proc = start("-kernel", str(guests.path("virtio64u")), "--mode", "long_user", "--timeout", "60",
                 "-chardev", f"socket,id=con0,path={path},server=on,wait=off",
                 "-device", "virtio-serial-device", "-device", "virtconsole,chardev=con0")
    try:
        announced(proc, rb"listening on unix:")
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(path))
            message = read_until(client.fileno(), rb"\n")
            client.sendall(message)  # the echo the guest waits for
            status, out, err = finish(proc)
        assert status == 0, err
        assert b"virtio64u: echo ok" in out
    finally:
        proc.kill()
        proc.wait()


def test_serial_on_a_tcp_server():
    proc = start("--guest", "uart_echo", "-serial", "tcp:127.0.0.1:0,server,nowait")
    try:
        port = int(announced(proc, rb"listening on tcp:127\.0\.0\.1:(\d+)").group(1))
        with socket.create_connection(("127.0.0.1", port)) as client:
            client.sendall(b"tcp\x04")
            read_until(client.fileno(), b"tcp[\\s\\S]*bye")
        status, _, err = finish(proc)
        assert status == 0, err
    finally:
        proc.kill()
        proc.wait()


def test_docs_cli_names_every_option():
    from pykvm.cli.options import RUN_OPTIONS, TRACE_OPTIONS

    text = DOCS_CLI.read_text()
    for option in RUN_OPTIONS + TRACE_OPTIONS:
        assert f"`{option.names[0]}" in text, f"docs/cli.md does not describe {option.names[0]}"
