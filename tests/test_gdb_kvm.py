"""The GDB stub on real guests: Debian's gdb in batch mode against ``pykvm run -S -gdb tcp::0``.

The guest is ``gdbdemo64`` (guests/gdbdemo.c, CPL 0: the only level this
host can step and break at), with its symbols from ``bin/gdbdemo64.debug``.
Each test asserts what the guest computed (read by GDB through the stub's
page walker, or printed by the guest on COM1) and what GDB reported.
Every gdb and every pykvm runs under a timeout; skipped, with the reason,
where gdb is not installed (CI installs it).
"""

from __future__ import annotations

import os
import re
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import threading

import pytest

from pykvm import guests

GDB = shutil.which("gdb")
pytestmark = [pytest.mark.kvm, pytest.mark.skipif(GDB is None, reason="gdb is not installed (apt-get install gdb)")]
TIMEOUT = 60
PROBLEMS = ("Remote 'g' packet reply", "internal-error", "Remote failure reply", "Remote connection closed",
            "Could not insert")
LISTENING = re.compile(r"GDB stub listening on tcp:127\.0\.0\.1:(\d+)")


class Pykvm:
    """``pykvm run ARGS -gdb tcp::0``, its port read from the line it prints on stderr."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "pykvm", "run", *args, "-gdb", "tcp::0",
                                      "--timeout", str(TIMEOUT)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.stderr_head = b""
        selector = selectors.DefaultSelector()
        selector.register(self.proc.stderr, selectors.EVENT_READ)
        while b"\n" not in self.stderr_head:
            if not selector.select(TIMEOUT):
                self.proc.kill()
                raise AssertionError("pykvm did not say where the stub listens")
            chunk = os.read(self.proc.stderr.fileno(), 4096)
            if not chunk:
                break
            self.stderr_head += chunk
        selector.close()
        found = LISTENING.search(self.stderr_head.decode())
        if found is None:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"pykvm did not start the stub: {self.stderr_head.decode()}")
        self.port = int(found.group(1))

    def gdb_argv(self, commands: list[str], symbols: str | None = None) -> list[str]:
        argv = [GDB, "-nx", "-batch", "-ex", "set confirm off"]
        if symbols:
            argv += ["-ex", f"file {symbols}"]
        for command in [f"target remote 127.0.0.1:{self.port}", *commands]:
            argv += ["-ex", command]
        return argv

    def gdb(self, commands: list[str], symbols: str | None = None, problems=PROBLEMS) -> str:
        done = subprocess.run(self.gdb_argv(commands, symbols), capture_output=True, text=True, timeout=TIMEOUT,
                              stdin=subprocess.DEVNULL)
        for problem in problems:
            assert problem not in done.stdout + done.stderr, done.stdout + done.stderr
        return done.stdout

    def finish(self) -> tuple[int, str, str]:
        try:
            out, err = self.proc.communicate(timeout=TIMEOUT)
        finally:
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode, out.decode(), (self.stderr_head + err).decode()


def test_break_read_step_watch_and_run_to_the_end():
    vm = Pykvm("--guest", "gdbdemo64", "-S")
    out = vm.gdb([
        "break checkpoint", "continue", "p fib_result", "p/x $pc", "x/2i $pc", "stepi", "p/x $pc",
        "info registers rip cr0 efer", "watch counter", "continue", "delete", "continue",
    ], symbols=guests.symbols("gdbdemo64"))
    status, stdout, stderr = vm.finish()
    assert "Breakpoint 1, checkpoint (value=6765) at gdbdemo.c" in out
    assert "$1 = 6765" in out                                   # fib(20), computed by the guest, read by GDB
    at = int(re.search(r"^\$2 = (0x[0-9a-f]+)$", out, re.M).group(1), 16)
    second = re.findall(r"^ +(0x[0-9a-f]+) <checkpoint\+\d+>:", out, re.M)
    after = int(re.search(r"^\$3 = (0x[0-9a-f]+)$", out, re.M).group(1), 16)
    assert after == int(second[0], 16) > at                    # stepi: RIP went to the next instruction
    assert re.search(r"^rip\s+0x%x\s+0x%x <checkpoint\+\d+>$" % (after, after), out, re.M)
    assert re.search(r"^cr0\s+0x[0-9a-f]+\s+\[ PE .*PG \]$", out, re.M)
    assert re.search(r"^efer\s+0x[0-9a-f]+\s+\[ .*LME LMA.* \]$", out, re.M)
    assert "Hardware watchpoint 2: counter\n\nOld value = 0\nNew value = 1\n" in out
    assert "[Inferior 1 (Remote target) exited normally]" in out
    assert status == 0, stderr
    assert stdout == "gdbdemo: fib(20) = 6765, counter = 15\n"


def test_writes_reach_the_guest_registers_and_memory():
    vm = Pykvm("--guest", "gdbdemo64", "-S")
    out = vm.gdb([
        "break checkpoint", "continue", "set var fib_result = 1000", "p fib_result",
        "set $rax = 0x123456789", "p/x $rax", "set $eax = 0x55", "p/x $rax",
        "set $rdi = 100", "finish", "delete", "continue",
    ], symbols=guests.symbols("gdbdemo64"))
    status, stdout, stderr = vm.finish()
    assert "$1 = 1000" in out
    assert "$2 = 0x123456789" in out
    assert "$3 = 0x100000055" in out                           # GDB's $eax: the low half of rax
    assert re.search(r"^Value returned is \$4 = 101$", out, re.M)  # checkpoint(100): RDI reached the vCPU
    assert "[Inferior 1 (Remote target) exited normally]" in out
    assert status == 0, stderr
    assert stdout == "gdbdemo: fib(20) = 1000, counter = 15\n"  # the guest printed what GDB wrote


def test_a_debugger_stops_a_running_guest_and_kills_it():
    vm = Pykvm("--guest", "spin64")                             # no -S: it runs until GDB attaches
    out = vm.gdb(["p/x $pc", "x/i $pc", "kill"])
    status, _, stderr = vm.finish()
    pc = int(re.search(r"^\$1 = (0x[0-9a-f]+)$", out, re.M).group(1), 16)
    assert pc == guests.info("spin64").load_addr               # spin64 is one `jmp .`
    assert re.search(r"=> 0x%x:\s+jmp\s+0x%x" % (pc, pc), out)
    assert "[Inferior 1 (Remote target) killed]" in out
    assert status == 0
    assert "the debugger killed the guest" in stderr


def test_a_crash_stops_as_sigsegv_and_the_registers_can_be_read():
    vm = Pykvm("--guest", "triple64", "-S")
    out = vm.gdb(["continue", "x/i $pc", "continue"])
    status, _, stderr = vm.finish()
    assert "Program received signal SIGSEGV" in out
    assert re.search(r"=> 0x[0-9a-f]+:\s+ud2", out)             # where it died: the ud2 with no IDT
    assert "[Inferior 1 (Remote target) exited with code 03]" in out
    assert status == 3
    assert "triple fault" in stderr


def test_smp_vcpus_are_threads():
    vm = Pykvm("--guest", "smp", "-smp", "2", "-S")
    out = vm.gdb(["info threads", "thread 2", "info registers cs", "continue"])
    status, stdout, stderr = vm.finish()
    assert re.search(r"^\* 1\s+Thread 1 \(vCPU 0\) 0x0*100010 in \?\? \(\)$", out, re.M)  # the Multiboot entry
    assert re.search(r"^  2\s+Thread 2 \(vCPU 1\) 0x0*fff0 in \?\? \(\)$", out, re.M)     # waiting for SIPI
    assert re.search(r"^cs\s+0xf000\s+61440$", out, re.M)
    assert "[Inferior 1 (Remote target) exited with code 01]" in out  # isa-debug-exit (0 << 1) | 1
    assert "cpus: 2\n" in stdout and "done: ok" in stdout
    assert status == 1, stderr


def test_ctrl_c_interrupts_a_running_guest():
    from pykvm.platform.machine import Machine
    from pykvm.state.gdb_kvm import KvmTarget
    from pykvm.state.gdb_server import GdbServer

    class Observed(KvmTarget):
        def __init__(self, machine) -> None:
            super().__init__(machine)
            self.resumed = threading.Event()

        def resume(self, actions) -> None:
            super().resume(actions)
            self.resumed.set()

    with Machine(memory="16M") as machine:
        machine.load_guest("spin64")
        target = Observed(machine)
        with GdbServer(target, "tcp::0") as server:
            port = server.bound_address.port
            argv = [GDB, "-nx", "-batch", "-ex", f"target remote 127.0.0.1:{port}", "-ex", "continue",
                    "-ex", "p/x $pc", "-ex", "detach"]
            gdb = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   stdin=subprocess.DEVNULL)
            try:
                assert target.resumed.wait(TIMEOUT), "GDB never resumed the guest"
                gdb.send_signal(signal.SIGINT)  # GDB sends the 0x03 byte: the stub stops the vCPU
                out, _ = gdb.communicate(timeout=TIMEOUT)
            finally:
                gdb.kill()
                gdb.wait()
            assert target.running  # detached: the guest runs on
            again = subprocess.run([GDB, "-nx", "-batch", "-ex", f"target remote 127.0.0.1:{port}",
                                    "-ex", "p/x $pc", "-ex", "detach"],
                                   capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
            assert target.running
        target.close()
    assert "Program received signal SIGINT, Interrupt." in out
    assert "$1 = 0x100000" in out
    assert "[Inferior 1 (Remote target) detached]" in out
    assert "$1 = 0x100000" in again.stdout                   # a second debugger stopped the running guest
    assert "[Inferior 1 (Remote target) detached]" in again.stdout
    assert target.ended == "closed"


def test_a_port_in_use_is_one_line_and_status_2():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "pykvm", "run", "--guest", "gdbdemo64", "-gdb", f"tcp::{port}"],
                              capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert f"-gdb tcp::{port}:" in done.stderr and "in use" in done.stderr
    assert done.stdout == ""


def test_the_monitor_is_refused_with_the_stub():
    done = subprocess.run([sys.executable, "-m", "pykvm", "run", "--guest", "gdbdemo64", "-s", "-monitor", "stdio"],
                          capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    assert done.returncode == 2
    assert "cannot be used with the GDB stub yet" in done.stderr and done.stderr.count("\n") == 1


def test_unix_socket(tmp_path):
    path = tmp_path / "gdb.sock"
    proc = subprocess.Popen([sys.executable, "-m", "pykvm", "run", "--guest", "gdbdemo64", "-S", "-gdb",
                             f"unix:{path}", "--timeout", str(TIMEOUT), "--summary"],  # --summary: it says where it listens
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert f"listening on unix:{path}" in proc.stderr.readline()
        done = subprocess.run([GDB, "-nx", "-batch", "-ex", f"file {guests.symbols('gdbdemo64')}",
                               "-ex", f"target remote {path}", "-ex", "p/x $pc", "-ex", "continue"],
                              capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
        out, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        proc.kill()
        proc.wait()
    assert "$1 = 0x100000" in done.stdout
    assert "[Inferior 1 (Remote target) exited normally]" in done.stdout
    assert out == "gdbdemo: fib(20) = 6765, counter = 15\n"
    assert proc.returncode == 0
    assert not path.exists()  # the server removed its socket


def test_watchpoint_pieces_and_the_x87_tag_word():
    from pykvm.state.gdb_kvm import pieces
    from pykvm.state.gdb_kvm_regs import abridged_tag, full_tag

    assert pieces(0x1000, 8) == [(0x1000, 8)]
    assert pieces(0x1003, 6) == [(0x1003, 1), (0x1004, 4), (0x1008, 1)]
    assert pieces(0x1006, 4) == [(0x1006, 2), (0x1008, 2)]
    one = (0x3FFF << 64) | (1 << 63)             # 1.0: valid
    stack = [one, 0, 0, 0, 0, 0, 0, 0]           # ST(0) = 1.0, ST(1) = +0.0, the rest empty
    fsw = 6 << 11                                # TOP = 6: ST(0) is physical register 6, ST(1) is 7
    word = full_tag(0b1100_0000, fsw, stack)
    assert word == 0b01_00_11_11_11_11_11_11    # physical 7: zero, physical 6: valid, 0-5: empty
    assert abridged_tag(word) == 0b1100_0000
    assert full_tag(0, 0, [0] * 8) == 0xFFFF     # FNINIT's state: every register empty
