"""Bad input never ends in a traceback: one line on stderr and exit status 2, nothing lost.

Each case here was found by trying the command line as a hostile user would
(regressions: tracebacks and exit 1 for ``-m inf``, ``--args -1``, ``--input
'abc\\'``, ``--input '€'``; ``--timeout nan`` hung for good; ``-serial
file:/dev/full`` gave two chained tracebacks and no summary; a 2 GiB kernel
file was read whole before the "does not fit" error).
"""

from __future__ import annotations

import os
import random
import resource
import subprocess
import sys

import pytest


def pykvm(*args: str, timeout: float = 60, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pykvm", *args], capture_output=True, timeout=timeout, **kwargs)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    err = proc.stderr.decode("utf-8", "replace")
    assert "Traceback" not in err, err
    assert proc.returncode == 2, (proc.returncode, err)
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.mark.parametrize("args, says", [
    (["-m", "inf"], "-m inf"),
    (["-m", "1e400"], "-m 1e400"),
    (["-m", "nan"], "-m nan"),
    (["-m", "0"], "-m 0"),
    (["-m", "1.0001K"], "whole number"),
    (["--args", "-1"], "64-bit register"),
    (["--args", "0x10000000000000000"], "64-bit register"),
    (["--args", "1,2,3"], "one or two"),
    (["--timeout", "nan"], "finite"),
    (["--timeout", "inf"], "finite"),
    (["--timeout", "-1"], "finite"),
    (["--input", "abc\\"], "escape"),
    (["--input", "\\xZZ"], "hex digits"),
    (["--input", "\\q"], "unknown escape"),
])
def test_bad_arguments_are_one_line_and_exit_2(args, says):
    line = one_line_error(pykvm("run", "--guest", "hello64", *args))
    assert says in line, line


@pytest.mark.kvm
def test_input_is_utf8_with_escapes():
    proc = pykvm("run", "--guest", "uart_echo", "--input", "€ ok\\x04")
    assert proc.returncode == 0, proc.stderr
    assert "€ ok".encode() in proc.stdout


@pytest.mark.kvm
def test_a_command_line_that_is_not_utf8_reaches_the_kernel_as_bytes():
    from pykvm import guests

    proc = pykvm("run", "--kernel", str(guests.path("bench32")), "-append", os.fsdecode(b"\xff\xfe"))
    assert proc.returncode == 1, proc.stderr  # bench32 ends with debug-exit status (0 << 1) | 1
    assert b"Traceback" not in proc.stderr


@pytest.mark.kvm
@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="no /dev/full on this host")
def test_a_serial_file_that_fills_up_ends_the_run_with_one_line_and_exit_2():
    proc = pykvm("run", "--guest", "hello64", "-serial", "file:/dev/full")
    err = proc.stderr.decode()
    assert "Traceback" not in err
    assert proc.returncode == 2, err
    assert err.startswith("serial output failed: [Errno 28] No space left on device"), err


@pytest.mark.kvm
def test_a_huge_kernel_file_is_refused_without_being_read(tmp_path):
    big = tmp_path / "big.bin"
    with open(big, "wb") as f:
        f.truncate(2 << 30)  # sparse: 2 GiB that cost no disk

    def limit_memory():  # 512 MiB of address space: reading the file whole would fail with MemoryError
        resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))

    proc = pykvm("run", "--kernel", str(big), "-m", "64M", preexec_fn=limit_memory)
    line = one_line_error(proc)
    assert "does not fit" in line, line


def test_i8042_refuses_an_empty_write_with_a_device_error():
    from pykvm.devices import I8042
    from pykvm.errors import DeviceError

    with pytest.raises(DeviceError):
        I8042().write(0, b"")


# SIGINT at a random moment while pykvm loads its modules and runs: the entry point's own code runs
# from the first line, so the signal comes from a thread of that process, never too early for it
# (the interpreter's own start-up, before any pykvm code, is Python's to report).
_CTRL_C_AT = """
import os, signal, sys, threading, time
delay = float(sys.argv[1])
threading.Thread(target=lambda: (time.sleep(delay), os.kill(os.getpid(), signal.SIGINT)), daemon=True).start()
sys.argv = ["pykvm", "run", "--guest", "spin64u", "--timeout", "5"]
from pykvm.__main__ import entry
entry()
"""


@pytest.mark.kvm
def test_ctrl_c_at_any_moment_of_start_up_is_one_line():
    """Regression: Ctrl-C while pykvm's modules loaded printed a KeyboardInterrupt traceback."""
    rng = random.Random(7)
    for _ in range(8):
        proc = subprocess.run([sys.executable, "-c", _CTRL_C_AT, str(rng.uniform(0.0, 0.15))],
                              capture_output=True, timeout=30)
        assert b"Traceback" not in proc.stderr, proc.stderr.decode()
        assert proc.returncode == 130, (proc.returncode, proc.stderr)
