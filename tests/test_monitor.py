"""pykvm.inspect.monitor: the QEMU-style monitor, fed lines without a terminal, from a script, and on a pty."""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
import time
import zlib

import capstone
import pytest

from pykvm import guests

LONG_BASE = 0x100000


def hello64_puts_loop() -> int:
    """Address of the `lods` in hello64's puts (reached after the checksum is computed)."""
    image = guests.path("hello64").read_bytes()
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    insns = list(md.disasm(image, LONG_BASE))
    calls = [int(i.op_str, 16) for i in insns if i.mnemonic == "call"]
    puts = calls[1]  # adler32, then puts
    return next(i.address for i in insns if i.address >= puts and i.mnemonic.startswith("lods"))


def reg(dump: str, name: str) -> int:
    return int(re.search(rf"\b{name} (0x[0-9a-f]+)", dump).group(1), 16)


# ---------------------------------------------------------------------------
# Without KVM
# ---------------------------------------------------------------------------


def test_parse_address():
    from pykvm.inspect.monitor import MonitorError, parse_address

    class Regs:
        rip, rsp, rax = 0x100040, 0x80000, 7

    assert parse_address("0x100000") == 0x100000
    assert parse_address("1048576") == 0x100000
    assert parse_address("ffff") == 0xFFFF  # bare hex, as QEMU takes it
    assert parse_address("$pc", Regs) == 0x100040
    assert parse_address("$rip+4", Regs) == 0x100044
    assert parse_address("$rsp - 0x10", Regs) == 0x7FFF0
    for bad in ("$nope", "zz", "1 2", "$rax-8"):
        with pytest.raises(MonitorError):
            parse_address(bad, Regs)


def test_describe_cr3_and_debugregs():
    from pykvm.inspect.registers import describe_cr3, describe_debugregs
    from pykvm.x86 import bits

    class S:
        cr0 = bits.CR0_PE | bits.CR0_PG
        cr3 = 0x10000 | bits.PTE_PCD
        cr4 = bits.CR4_PAE
        efer = bits.EFER_LME | bits.EFER_LMA

    assert describe_cr3(S) == "cr3 0x10010: 4level paging, PML4 at 0x10000 [PCD]"
    S.cr4 |= bits.CR4_PCIDE
    S.cr3 = 0x10005
    assert describe_cr3(S) == "cr3 0x10005: 4level paging, PML4 at 0x10000 [PCID 5]"
    S.cr0 = bits.CR0_PE
    assert "paging is off" in describe_cr3(S)

    class D:
        db = [0x100040, 0, 0, 0x2000]
        dr6 = 0xFFFF0FF1
        dr7 = 0x0600 | 0x2 | (1 << 6) | (1 << 28) | (3 << 30)

    text = describe_debugregs(D)
    assert "dr0 0x100040 exec/1 G" in text and "dr3 0x2000 write/4 L" in text
    assert "dr6 0xffff0ff1 [B0]" in text


# ---------------------------------------------------------------------------
# A Monitor fed lines: every command, each answer checked
# ---------------------------------------------------------------------------


@pytest.mark.kvm
def test_monitor_answers_every_command():
    from pykvm.platform.machine import Machine
    from pykvm.inspect.monitor import Monitor

    image = guests.path("hello64").read_bytes()
    checksum = zlib.adler32(image)
    bp = hello64_puts_loop()
    serial = bytearray()
    with Machine(memory="16M", serial=serial.extend) as m:
        m.load_guest("hello64")
        with Monitor(m) as mon:
            ask = mon.execute

            assert ask("info status") == "VM status: stopped (not started)"

            regs = ask("info registers")
            for expected in ("rip 0x0000000000100000", "rflags 0x2", "mode: long 64-bit, CPL 0",
                             "PE MP ET NE WP PG", "PAE OSFXSR OSXMMEXCPT", "LME LMA",
                             "cr3 0x10000: 4level paging, PML4 at 0x10000",
                             "code 64-bit DPL0 RX", "data 32-bit DPL0 RW", "TSS 64-bit busy DPL0",
                             "debug: no guest breakpoints", "code at RIP 0x100000: fc  cld"):
                assert expected in regs, expected

            assert ask("info cpus") == ("* CPU #0: pc=0x0000000000100000 (long 64-bit mode, 64-bit code, CPL 0) "
                                        "stopped (not started)")
            assert ask("info mem") == "0000000000000000-0000000100000000 0000000000000000    4 GiB rwx supervisor"

            md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
            want = [(i.address, f"{i.mnemonic} {i.op_str}".strip()) for i in md.disasm(image, LONG_BASE)][:4]
            got = [(int(line.split(":")[0], 16), line.split(None, 1)[1]) for line in ask("x/4i $pc").splitlines()]
            assert [(a, re.sub(r"^(?:[0-9a-f]{2} )+\s*", "", t).strip()) for a, t in got] == want

            words = struct.unpack_from("<4I", image)
            assert ask("x/4x 0x100000") == "0000000000100000: " + " ".join(f"{w:#010x}" for w in words)
            assert ask("x/2xb 0x100000") == f"0000000000100000: {image[0]:#04x} {image[1]:#04x}"
            qwords = struct.unpack_from("<2Q", image)
            assert ask("xp/2xg 0x100000") == "0000000000100000: " + " ".join(f"{q:#018x}" for q in qwords)
            assert ask("xp/1x 0x7fffffff").startswith("Cannot access memory")

            chain = ask("translate 0x100000")
            assert "=> gpa 0x100000 (2 MiB page" in chain and "GPA 0x100000 -> slot 0" in chain and "HVA 0x" in chain

            assert ask(f"break {bp:#x}") == f"breakpoint 1 at {bp:#x} (hw, DR0)"
            assert ask("info break").startswith(f"  1  {bp:#018x}  hw (DR0)  hits 0")

            steps = ask("step 2").splitlines()
            assert len(steps) == 2 and "cld" in steps[0] and "mov esi, 0x100000" in steps[1]
            assert steps[1].rstrip().endswith("rsi=0x100000")

            assert ask("cont") == "continuing at rip 0x100006"
            assert ask("wait 20") == f"VM status: stopped: breakpoint 1 at {bp:#x} (hw, hit 1)"
            at_bp = ask("info registers")
            assert reg(at_bp, "rip") == bp and reg(at_bp, "rax") == checksum  # adler32 done, puts next

            assert ask("stop") == f"already stopped at rip {bp:#x}"
            assert ask("delete") == "deleted 1 breakpoint"
            assert ask("info break") == "no breakpoints"

            assert ask("cont") == f"continuing at rip {bp:#x}"
            assert ask("wait 20") == "VM status: stopped: hlt (status 0) at rip 0x10003a"
            assert reg(ask("info registers"), "rax") == checksum
            assert bytes(serial) == f"Hello from long mode\nchecksum 0x{checksum:08x}\n".encode()

            stats = ask("info stats")
            assert re.search(r"^  io +41  \(C \d+, Python \d+\)$", stats, re.M), stats
            assert re.search(r"^  hlt +1 ", stats, re.M)
            assert "tracer: 2 steps" in stats and "vCPU stats" in stats
            assert re.search(r"^  exits +\d+$", stats, re.M)

            assert ask("quit") == "" and mon.quit_requested


@pytest.mark.kvm
def test_monitor_stop_and_cont_a_spinning_guest():
    from pykvm.platform.machine import Machine
    from pykvm.inspect.monitor import Monitor

    with Machine(memory="16M", serial=None) as m:
        m.load_guest("spin64")
        with Monitor(m) as mon:
            assert mon.execute("cont") == "continuing at rip 0x100000"
            assert mon.execute("info status") == "VM status: running"
            assert mon.execute("wait 0.2") == "still running after 0.2 s"
            cpus = mon.execute("info cpus")  # reads the vCPU while it runs: a brief pause
            assert "pc=0x0000000000100000" in cpus and cpus.endswith("running") and "thread_id=" in cpus
            assert mon.running
            assert mon.execute("stop") == "stopped at rip 0x100000"
            assert not mon.running
            assert mon.execute("info status") == "VM status: stopped: paused at rip 0x100000"
            assert mon.execute("x/1i $pc") == "0x0000000000100000:  eb fe                    jmp 0x100000"
            assert mon.execute("cont") == "continuing at rip 0x100000"
            assert mon.execute("quit") == "" and not mon.running


@pytest.mark.kvm
def test_monitor_real_mode_and_sw_break_fallback():
    from pykvm.platform.machine import Machine
    from pykvm.inspect.monitor import Monitor
    from pykvm.inspect.debug_support import debug_support

    with Machine(memory="16M", serial=None) as m:
        m.load_guest("hello16")
        with Monitor(m) as mon:
            assert "mode: real, CPL 0" in mon.execute("info registers")
            assert mon.execute("info mem").startswith("paging is off (CR0.PG=0)")
            assert mon.execute("x/2i 0x8000").splitlines()[1].endswith("mov esi, 0x8000")  # 16-bit decoding
            answer = mon.execute("break 0x8007 sw")
            if not debug_support("real").sw_breakpoints:
                assert answer.startswith("breakpoint 1 at 0x8007 (hw, DR0)\nnote: software breakpoints do not work")
            mon.execute("cont")
            assert mon.execute("wait 10").startswith("VM status: stopped: breakpoint 1 at 0x8007")


@pytest.mark.kvm
def test_monitor_bad_input_answers_in_one_line(machine):
    from pykvm.inspect.monitor import Monitor

    machine.load_guest("hello64")
    mon = Monitor(machine)
    assert mon.execute("frobnicate") == "unknown command: 'frobnicate' (try help)"
    assert mon.execute("x/5z 0x1000").startswith("bad format /5z")
    assert mon.execute("break") == "break ADDR [hw|sw]"
    assert mon.execute("break 0x1000 maybe") == "break ADDR [hw|sw]"
    assert mon.execute("info") == "info registers|cpus|mem|stats|break|status|name"
    assert mon.execute("info foo") == "unknown info command 'foo': info registers|cpus|mem|stats|break|status|name"
    assert mon.execute("x /2x 0x100000") == mon.execute("x/2x 0x100000")  # QEMU takes the space too
    assert mon.execute("stop/x") == "stop takes no /format"
    assert mon.execute("") == "" and mon.execute("# comment") == ""
    assert "info registers" in mon.execute("help")
    assert mon.execute("x/2x $bogus") == "unknown register '$bogus'"
    assert mon.execute("delete 7") == "no breakpoint 7"
    assert mon.execute("step 0") == "step takes a positive count"
    mon.close()


# ---------------------------------------------------------------------------
# Ctrl-a c: one terminal for the guest console and the monitor
# ---------------------------------------------------------------------------


class _Recorder:
    def __init__(self):
        self.text = ""
        self.guest = bytearray()


@pytest.mark.kvm
def test_console_mux_switches_with_ctrl_a_c():
    from pykvm.platform.machine import Machine
    from pykvm.inspect.console_mux import ConsoleMux
    from pykvm.inspect.monitor import PROMPT, Monitor

    rec = _Recorder()
    with Machine(memory="16M", serial=None) as m:
        m.load_guest("hello64")
        with Monitor(m) as mon:
            mux = ConsoleMux(mon, rec.guest.extend, lambda t: setattr(rec, "text", rec.text + t))
            assert rec.text == PROMPT and mux.in_monitor
            mux.feed(b"info stx\x7fatus\n")  # typed, with a backspace
            assert "VM status: stopped (not started)" in rec.text
            assert rec.text.endswith(PROMPT)
            mux.feed(b"\x01c")  # to the guest console
            assert not mux.in_monitor
            mux.feed(b"hello\x01\x01")  # Ctrl-a Ctrl-a sends one Ctrl-a
            assert bytes(rec.guest) == b"hello\x01"
            mux.feed(b"\x01cinfo cpus\r")
            assert mux.in_monitor and "* CPU #0: pc=0x0000000000100000" in rec.text
            mux.feed(b"\x01h")
            assert "C-a c    switch between console and monitor" in rec.text
            mux.feed(b"\x01x")
            assert mux.quit and mon.quit_requested
            assert bytes(rec.guest) == b"hello\x01"  # monitor input never reached the guest


# ---------------------------------------------------------------------------
# The command line: --monitor-script and -monitor stdio (pipe and pty)
# ---------------------------------------------------------------------------


def pykvm(*args, input=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "pykvm", *args], input=input, capture_output=True, timeout=timeout)


SCRIPT = """\
# every monitor command, in order (the guest starts stopped)
info status
info registers
info cpus
info mem
x/3i 0x100000
x/4x 0x100000
xp/2xg 0x100000
translate 0x100000
break {bp:#x}
step 2
cont
wait 20
info registers
delete
stop
cont
wait 20
info stats
quit
"""


def split_transcript(text: str) -> list[tuple[str, str]]:
    """[(command, answer)] from '(pykvm) command' lines and what follows each."""
    pairs = []
    for chunk in text.split("(pykvm) ")[1:]:
        command, _, answer = chunk.partition("\n")
        pairs.append((command, answer.rstrip("\n")))
    return pairs


@pytest.mark.kvm
def test_monitor_script_from_the_command_line(tmp_path):
    bp = hello64_puts_loop()
    checksum = zlib.adler32(guests.path("hello64").read_bytes())
    script = tmp_path / "script.txt"
    script.write_text(SCRIPT.format(bp=bp))
    proc = pykvm("run", "--guest", "hello64", "--monitor-script", str(script), "-serial", "none")
    assert proc.returncode == 0, proc.stderr
    pairs = split_transcript(proc.stdout.decode())
    commands = [line for line in SCRIPT.format(bp=bp).splitlines() if line and not line.startswith("#")]
    assert [c for c, _ in pairs] == commands
    answers = dict(pairs[:9])
    assert answers["info status"] == "VM status: stopped (not started)"
    assert "mode: long 64-bit, CPL 0" in answers["info registers"] and "LME LMA" in answers["info registers"]
    assert answers["info cpus"].startswith("* CPU #0: pc=0x0000000000100000")
    assert answers["info mem"].endswith("4 GiB rwx supervisor")
    assert answers["x/3i 0x100000"].splitlines()[0].endswith("cld")
    assert answers["x/4x 0x100000"].startswith("0000000000100000: 0x")
    assert answers["xp/2xg 0x100000"].startswith("0000000000100000: 0x")
    assert "=> gpa 0x100000" in answers["translate 0x100000"]
    assert answers[f"break {bp:#x}"] == f"breakpoint 1 at {bp:#x} (hw, DR0)"
    rest = pairs[9:]
    assert len(rest[0][1].splitlines()) == 2  # step 2
    assert rest[1][1] == "continuing at rip 0x100006"
    assert rest[2][1] == f"VM status: stopped: breakpoint 1 at {bp:#x} (hw, hit 1)"
    assert reg(rest[3][1], "rip") == bp and reg(rest[3][1], "rax") == checksum
    assert rest[4][1] == "deleted 1 breakpoint"
    assert rest[5][1] == f"already stopped at rip {bp:#x}"
    assert rest[6][1] == f"continuing at rip {bp:#x}"
    assert rest[7][1] == "VM status: stopped: hlt (status 0) at rip 0x10003a"
    assert "vCPU stats" in rest[8][1] and re.search(r"^  io +41 ", rest[8][1], re.M)
    assert rest[9] == ("quit", "")
    assert proc.stderr == b""  # quiet like QEMU; --summary says how the session ended


@pytest.mark.kvm
def test_monitor_stdio_from_a_pipe_and_script_end_waits_for_the_guest(tmp_path):
    proc = pykvm("run", "--guest", "hello64", "-monitor", "stdio", "-S", "-serial", "none",
                 input=b"info status\ncont\nwait 20\n")
    assert proc.returncode == 0, proc.stderr
    assert "VM status: stopped (not started)" in proc.stdout.decode()
    assert "VM status: stopped: hlt (status 0)" in proc.stdout.decode()
    # a script that only continues: at its end pykvm waits for the guest, then exits with its status
    script = tmp_path / "s"
    script.write_text("cont\n")
    proc = pykvm("run", "--kernel", str(_exit_image(tmp_path)), "--mode", "long",
                 "--monitor-script", str(script), "--summary")
    assert proc.returncode == 85, proc.stderr
    assert b"debug-exit (status 85)" in proc.stderr


def _exit_image(tmp_path):
    image = tmp_path / "exit.bin"
    image.write_bytes(bytes([0xB0, 0x2A, 0xE6, 0xF4, 0xF4]))  # mov al, 0x2a ; out 0xf4, al ; hlt
    return image


MONITOR_BAD_INPUT = [
    (["run", "--guest", "hello64", "-S", "-serial", "stdio"], b"-S needs a monitor"),
    (["run", "--guest", "hello64", "-monitor", "tcp:1"], b"use tcp:HOST:PORT,server"),
    (["run", "--guest", "hello64", "--monitor-script", "/no/such/script"], b"--monitor-script /no/such/script"),
]


@pytest.mark.kvm
@pytest.mark.parametrize("args, message", MONITOR_BAD_INPUT)
def test_monitor_bad_input_exits_2(args, message):
    proc = pykvm(*args)
    assert proc.returncode == 2
    assert len(proc.stderr.decode().strip().splitlines()) == 1 and message in proc.stderr, proc.stderr


@pytest.mark.kvm
def test_monitor_stdio_on_a_terminal_shares_it_with_the_serial_console():
    """A real pty: cbreak mode, Ctrl-a c to the guest (uart_echo echoes), Ctrl-a c back, quit."""
    import pty
    import select

    pid, fd = pty.fork()
    if pid == 0:  # child: pykvm with the pty as its terminal
        os.execv(sys.executable, [sys.executable, "-m", "pykvm", "run", "--guest", "uart_echo", "-monitor", "stdio"])
    output = b""

    def read_until(needle: bytes, timeout: float = 30) -> bytes:
        nonlocal output
        deadline = time.monotonic() + timeout
        while needle not in output:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"timed out waiting for {needle!r}; got {output!r}")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                try:
                    output += os.read(fd, 4096)
                except OSError:
                    break
        return output

    try:
        read_until(b"(pykvm) ")
        read_until(b"uart ready")
        os.write(fd, b"info status\r")
        read_until(b"VM status: running")
        os.write(fd, b"\x01c")
        time.sleep(0.2)
        os.write(fd, b"abc")
        read_until(b"abc")  # echoed by the guest, not by the monitor
        os.write(fd, b"\x01cinfo cpus\r")
        read_until(b"* CPU #0")
        os.write(fd, b"quit\r")
        _, status = os.waitpid(pid, 0)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        if pid:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        os.close(fd)
    text = output.decode("utf-8", "replace")
    assert "unknown command" not in text  # 'abc' went to the guest, not to the monitor


@pytest.mark.kvm
def test_monitor_lists_every_vcpu_and_cpu_selects_one():
    from pykvm.inspect.monitor import Monitor
    from pykvm.platform.machine import Machine

    m = Machine(memory="128M", platform="pc", cpus=3)
    try:
        m.load_guest("spin64u")
        mon = Monitor(m)
        lines = mon.execute("info cpus").splitlines()
        assert [line[:8] for line in lines] == ["* CPU #0", "  CPU #1", "  CPU #2"]
        assert "(waiting for SIPI)" in lines[1] and "long 64-bit mode" in lines[0]
        assert mon.execute("cpu 2") == ""
        assert mon.execute("info cpus").splitlines()[2].startswith("* CPU #2")
        assert "mode: real" in mon.execute("info registers")  # the AP, still at its reset state
        assert mon.execute("cpu 3") == "no CPU #3: this machine has 3"
        assert mon.execute("cpu x") == "cpu N (a vCPU index: see info cpus)"
        mon.close()
    finally:
        m.close()


@pytest.mark.kvm
def test_monitor_shows_a_suspended_guest_and_system_wakeup_resumes_it():
    from pykvm.inspect.monitor import Monitor
    from pykvm.platform.machine import Machine

    # mov dx, 0x604 ; mov ax, SLP_EN | SLP_TYP 1 (S3) ; out dx, ax ; jmp $   (protected mode)
    suspend = bytes([0x66, 0xBA, 0x04, 0x06, 0x66, 0xB8, 0x00, 0x24, 0x66, 0xEF, 0xEB, 0xFE])
    resume = bytes([0xB0, 0x2A, 0xE6, 0xF4, 0xEB, 0xFE])  # real mode: mov al, 42 ; out 0xf4, al ; jmp $
    with Machine(memory="32M", platform="pc") as m:
        m.load_image(suspend, format="flat", mode="protected")
        m.memory.write(0x7000, resume)
        m.memory.write(m.board.acpi.firmware_waking_vector_addr, (0x7000).to_bytes(4, "little"))
        with Monitor(m) as mon:
            assert mon.execute("system_wakeup") == "the guest is not suspended"
            mon.execute("cont")
            deadline = time.monotonic() + 30
            while not m.board.sleep.suspended and time.monotonic() < deadline:
                time.sleep(0.01)  # polling a state, not timing the test: the deadline only bounds it
            assert mon.execute("info status") == "VM status: suspended (ACPI S3)"
            assert mon.execute("system_wakeup") == ""
            answer = mon.execute("wait 30")
            assert "debug-exit (status 85)" in answer, answer  # 42 << 1 | 1: the stub at the waking vector ran
