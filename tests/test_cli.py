"""The pykvm command as a QEMU user runs it: what it prints, where, and every exit status it documents.

Exit statuses (``pykvm.cli.run``): the guest's isa-debug-exit status, 0
for a clean HLT or a monitor ``quit``, 2 bad input, 3 a guest crash, 4 a
host that cannot run the guest, 5 a shipped guest reporting a failure, 124
``--timeout``, 130 SIGINT, 143 SIGTERM/SIGHUP.  Pipes here; the terminal is
tested through a pseudo-terminal in test_console_pty.py.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import zlib

import pytest

from pykvm import guests
from pykvm.guests.reports import parse_report

BIN = guests.path("hello64").parent


def pykvm(*args, input=None, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "pykvm", *args], input=input, capture_output=True, timeout=timeout,
        stdin=None if input is not None else subprocess.DEVNULL,
    )


def hello64_output() -> bytes:
    checksum = zlib.adler32(guests.path("hello64").read_bytes())
    return f"Hello from long mode\nchecksum 0x{checksum:08x}\n".encode()


# --- quiet like QEMU -----------------------------------------------------------------------
@pytest.mark.kvm
def test_a_clean_run_prints_the_console_and_nothing_on_stderr():
    proc = pykvm("run", "--guest", "hello64")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == hello64_output()
    assert proc.stderr == b""  # harnesses written for QEMU read any stderr line as an error


@pytest.mark.kvm
def test_summary_and_library_warnings_when_asked(tmp_path):
    proc = pykvm("run", "--guest", "hello64", "--summary")
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pykvm: hlt (status 0) after "), lines
    assert "io 41" in lines[0]  # 41 port writes: the two lines, one OUT per byte
    # a guest's write to a port nobody has: silent by default, a tagged warning when watched
    image = tmp_path / "port.bin"
    image.write_bytes(bytes([0x66, 0xBA, 0x34, 0x12, 0xEE, 0xF4]))  # mov dx, 0x1234 ; out dx, al ; hlt
    quiet = pykvm("run", "-kernel", str(image), "--mode", "long")
    assert quiet.returncode == 0 and quiet.stderr == b"", quiet.stderr
    loud = pykvm("run", "-kernel", str(image), "--mode", "long", "--summary")
    assert b"pykvm: warning: unmapped PIO write to port 0x1234" in loud.stderr


@pytest.mark.kvm
def test_options_first_is_a_run_and_version_prints():
    proc = pykvm("--guest", "hello64")  # QEMU's habit: options straight away
    assert proc.returncode == 0 and proc.stdout == hello64_output()
    version = pykvm("--version")
    assert version.returncode == 0 and version.stdout.startswith(b"pykvm ")


# --- a QEMU command line, unchanged --------------------------------------------------------
@pytest.mark.kvm
def test_a_qemu_command_line_for_a_multiboot_kernel_runs_unchanged(tmp_path):
    """The command line tests/test_pc_guests_qemu.py gives qemu-system-x86_64, with pykvm run instead."""
    kernel, module = guests.path("mbinfo"), guests.path("hello16")
    argv = ["-accel", "kvm", "-M", "pc", "-m", "128", "-smp", "1", "-nodefaults", "-display", "none",
            "-no-reboot", "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-kernel", str(kernel), "-append", "a=1 b", "-initrd", f"{module} mod arg"]
    proc = pykvm("run", *argv)
    assert proc.returncode == 1, proc.stderr  # QEMU's status for the guest's "exit 0": (0 << 1) | 1
    assert proc.stderr == b""
    report = parse_report(proc.stdout.decode(), strict=True)
    assert report["cmdline"]["text"] == f"{kernel} a=1 b"
    assert report["mem_upper"] == (128 - 1) * 1024  # KiB above 1 MiB: -m 128 is 128 MiB
    (mod,) = report["module"]
    assert mod["text"] == f"{module} mod arg"
    assert mod["adler32"] == zlib.adler32(module.read_bytes())
    assert report["done"] == "ok"


@pytest.mark.kvm
def test_debug_exit_device_at_a_chosen_port_and_width(tmp_path):
    # 32-bit: mov eax, 0x2a ; mov dx, 0x501 ; out dx, eax ; hlt  -> status (0x2a << 1) | 1 = 85
    image = tmp_path / "exit.bin"
    image.write_bytes(bytes([0xB8, 0x2A, 0, 0, 0, 0x66, 0xBA, 0x01, 0x05, 0xEF, 0xF4]))
    run = ["run", "-kernel", str(image), "--mode", "protected"]
    proc = pykvm(*run, "-device", "isa-debug-exit,iobase=0x501,iosize=4")
    assert proc.returncode == 85, proc.stderr
    proc = pykvm(*run, "-global", "isa-debug-exit.iosize=4", "-device", "isa-debug-exit")
    assert proc.returncode == 85, proc.stderr  # -global gives the device's defaults; 0x501 is QEMU's iobase


# --- the serial ports ----------------------------------------------------------------------
@pytest.mark.kvm
def test_serial_file_null_and_none(tmp_path):
    out = tmp_path / "serial.txt"
    proc = pykvm("run", "--guest", "hello16", "-serial", f"file:{out}")
    assert proc.returncode == 0 and proc.stdout == b""
    assert out.read_bytes().startswith(b"Hello from real mode\n")
    for spec in ("null", "none"):
        proc = pykvm("run", "--guest", "hello16", "-serial", spec)
        assert proc.returncode == 0 and proc.stdout == b"", spec
    # none: there is no COM1 at all, so a strict run stops at the guest's first write to it
    proc = pykvm("run", "--guest", "hello16", "-serial", "none", "--strict")
    assert proc.returncode == 3 and b"unmapped PIO write to port 0x3f8" in proc.stderr


@pytest.mark.kvm
def test_a_second_serial_port_is_com2(tmp_path):
    # 64-bit: mov dx, 0x2f8 ; mov al, 'Z' ; out dx, al ; hlt
    image = tmp_path / "com2.bin"
    image.write_bytes(bytes([0x66, 0xBA, 0xF8, 0x02, 0xB0, 0x5A, 0xEE, 0xF4]))
    com2 = tmp_path / "com2.txt"
    proc = pykvm("run", "-kernel", str(image), "--mode", "long", "-serial", "stdio", "-serial", f"file:{com2}",
                 "--strict")
    assert proc.returncode == 0, proc.stderr
    assert com2.read_bytes() == b"Z" and proc.stdout == b""


@pytest.mark.kvm
def test_piped_input_reaches_the_uart_and_its_end_hangs_up_the_line():
    proc = pykvm("run", "--guest", "uart_echo", "--timeout", "30", input=b"piped\x04")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"uart ready\npiped\nbye\n"
    # no EOT: the pipe's end hangs up the UART (LSR says nothing more will come), the guest spins on; the
    # run is ended by --timeout, and everything typed was echoed
    proc = pykvm("run", "--guest", "uart_echo", "--timeout", "2", input=b"hi")
    assert proc.returncode == 124
    assert proc.stdout == b"uart ready\nhi"


@pytest.mark.kvm
def test_nodefaults_means_no_console_unless_asked():
    proc = pykvm("run", "--guest", "hello64", "-nodefaults")
    assert proc.returncode == 0 and proc.stdout == b""
    proc = pykvm("run", "--guest", "hello64", "-nodefaults", "-serial", "stdio")
    assert proc.stdout == hello64_output()


# --- guests that need devices -------------------------------------------------------------
@pytest.mark.kvm
@pytest.mark.parametrize("name, input, expected", [
    ("uart_irq", b"abc\x04", b"abc"),
    ("virtio64u", None, b"virtio64u: echo ok"),
    ("virtio64", None, b"virtio64: echo ok"),
])
def test_guests_that_need_devices_run_out_of_the_box(name, input, expected):
    proc = pykvm("run", "--guest", name, "--timeout", "60", *(() if input is None else ("--input",
                 input.decode().replace("\x04", "\\x04"))))
    assert proc.returncode == 0, proc.stderr
    assert expected in proc.stdout


@pytest.mark.kvm
def test_a_guest_that_needs_the_irqchip_says_which_option_takes_it_away():
    proc = pykvm("run", "--guest", "uart_irq", "-machine", "kernel_irqchip=off")
    assert proc.returncode == 2
    assert b"kernel_irqchip=off: uart_irq takes interrupts; it needs the in-kernel irqchip" in proc.stderr


def test_guests_lists_every_guest_and_its_needs():
    proc = pykvm("guests")
    assert proc.returncode == 0
    lines = proc.stdout.decode().splitlines()
    assert [line.split()[0] for line in lines] == guests.names()
    needs = {line.split()[0]: line.split("needs: ")[1] for line in lines if "needs: " in line}
    assert needs["uart_irq"] == "irqchip, input" and needs["virtio64u"] == "virtio-echo"


# --- the exit statuses -------------------------------------------------------------------------
@pytest.mark.kvm
def test_exit_1_and_up_is_the_guests_debug_exit_status(tmp_path):
    for value in (0, 0x2A, 0x7F):
        image = tmp_path / "exit.bin"
        image.write_bytes(bytes([0xB0, value, 0xE6, 0xF4, 0xF4]))  # mov al, value ; out 0xf4, al ; hlt
        proc = pykvm("run", "-kernel", str(image), "--mode", "long")
        assert proc.returncode == (value << 1) | 1 & 0xFF, proc.stderr
        assert proc.stderr == b""


@pytest.mark.kvm
def test_exit_3_guest_crash_with_its_register_dump():
    proc = pykvm("run", "--guest", "triple64")
    assert proc.returncode == 3
    assert b"shutdown" in proc.stderr and b"ud2" in proc.stderr and b"RIP" in proc.stderr


@pytest.mark.kvm
def test_exit_3_strict_bus_names_port_and_rip_once(tmp_path):
    image = tmp_path / "bad.bin"
    image.write_bytes(bytes([0x66, 0xBA, 0x34, 0x12, 0xEE, 0xF4]))  # mov dx, 0x1234 ; out dx, al ; hlt
    loose = pykvm("run", "-kernel", str(image), "--mode", "long")
    assert loose.returncode == 0  # logged, dropped, and the guest halts
    strict = pykvm("run", "-kernel", str(image), "--mode", "long", "--strict")
    assert strict.returncode == 3
    err = strict.stderr.decode()
    # KVM has already stepped past an OUT when it exits, so RIP is the next instruction.
    assert err.count("unmapped PIO write to port 0x1234") == 1 and "RIP 0x100005" in err
    assert "rax 0x" in err and "\ncr0   0x" in err  # the register dump


@pytest.mark.kvm
def test_exit_3_internal_error_shows_the_instruction(tmp_path):
    from pykvm.host import nested_kvm_module

    # 64-bit CPL 0: lock cmpxchg16b [rsp] ; hlt.  kvm_pvm's ring-0 emulator lacks cmpxchg16b, and pykvm's
    # ring0_assist does not finish it (it finishes popcnt, which this test used before).
    image = tmp_path / "cmpxchg16b.bin"
    image.write_bytes(bytes([0xF0, 0x48, 0x0F, 0xC7, 0x0C, 0x24, 0xF4]))
    proc = pykvm("run", "-kernel", str(image), "--mode", "long")
    if nested_kvm_module() != "kvm_pvm":
        assert proc.returncode == 0  # hardware runs it natively
        return
    assert proc.returncode == 3
    text = proc.stderr.decode()
    assert text.startswith("KVM internal error: emulation failure\n")
    assert "code at RIP 0x100000: f0 48 0f c7 0c 24  lock cmpxchg16b xmmword ptr [rsp]" in text


@pytest.mark.kvm
def test_exit_4_when_this_hosts_kvm_cannot_run_the_mode():
    from pykvm.host import nested_kvm_module

    proc = pykvm("run", "--guest", "hello32p")
    if nested_kvm_module() != "kvm_pvm":
        assert proc.returncode == 0 and proc.stdout.startswith(b"Hello from 32-bit paged mode")
        pytest.skip("this host runs paged32 guests: exit 4 needs a host that cannot (kvm_pvm)")
    assert proc.returncode == 4
    assert proc.stderr.decode().startswith("pykvm run: cannot run on this host:")


@pytest.mark.kvm
@pytest.mark.parametrize("args, code", [
    (("--guest", "iobench64u", "--args", "99,1"), "0x14"),  # an unknown transfer kind
    (("--guest", "fuzz64u"), "0x1"),  # no plan at 0x300000
])
def test_exit_5_when_a_shipped_guest_reports_a_failure(args, code):
    proc = pykvm("run", *args, "-serial", "null")
    assert proc.returncode == 5
    assert proc.stderr.decode().strip() == (
        f"pykvm run: {args[1]} reported a failure: code {code} (see guests/README.md)")


@pytest.mark.kvm
def test_exit_124_timeout_says_so():
    proc = pykvm("run", "--guest", "spin64u", "--timeout", "0.3")
    assert proc.returncode == 124
    assert proc.stderr.decode() == "pykvm: timeout: stopped after --timeout 0.3 s\n"


def _start_and_wait_for_the_guest(*args):
    """pykvm running uart_echo; returns once the guest has printed (so it is in its run loop)."""
    proc = subprocess.Popen([sys.executable, "-m", "pykvm", "run", "--guest", "uart_echo", *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = b""
    while b"uart ready\n" not in seen:
        chunk = os.read(proc.stdout.fileno(), 100)
        assert chunk, proc.stderr.read()
        seen += chunk
    return proc


@pytest.mark.kvm
@pytest.mark.parametrize("signo, status, line", [
    (signal.SIGINT, 130, "pykvm: terminating on signal 2 (interrupted)"),
    (signal.SIGTERM, 143, "pykvm: terminating on signal 15"),
    (signal.SIGHUP, 143, "pykvm: terminating on signal 1"),
])
@pytest.mark.parametrize("serial", ["stdio", "mon:stdio"])
def test_exit_130_and_143_on_signals(signo, status, line, serial):
    proc = _start_and_wait_for_the_guest("-serial", serial)
    proc.send_signal(signo)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == status, err
    assert err.decode().strip() == line


@pytest.mark.kvm
def test_a_signal_with_the_summary_asked_for_gives_the_summary():
    proc = _start_and_wait_for_the_guest("-serial", "stdio", "--summary")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 143
    assert err.decode().startswith("pykvm: terminated (status -) after ")


# --- bad input: one line, exit 2 ---------------------------------------------------------
BAD_INPUT = [
    (["run", "--guest", "no-such-guest"], "unknown guest 'no-such-guest'"),
    (["run", "-kernel", "/no/such/file"], "/no/such/file"),
    (["run", "--guest", "hello64", "-m", "1K"], "at least 2M"),
    (["run", "--guest", "hello64", "-serial", "tcp:1"], "use tcp:HOST:PORT,server"),
    (["run", "--guest", "hello64", "-serial", "vc"], "use stdio, mon:stdio, null, none, file:PATH"),
    (["run", "--guest", "hello64", "-serial", "tcp::0"], "pykvm listens but does not connect out"),
    (["run", "--guest", "hello64", "-serial", "null", "-serial", "stdio"], "only COM1 can be on the terminal"),
    (["run", "--guest", "hello64", "--mode", "long"], "--mode and --load-addr go with -kernel"),
    (["run", "--guest", "hello64", "-smp", "2"], "hello64 ends with HLT, which the in-kernel irqchip (-smp"),
    (["run", "--guest", "hello64", "-device", "pc-testdev"], "pc-testdev and pci-testdev are devices of the pc"),
    (["run", "--guest", "smp", "-machine", "kernel_irqchip=off"], "-M pc has the in-kernel PIC, IOAPIC and PIT"),
    (["run", "--guest", "hello64", "-cpu", "host,+frobnicate"], "-cpu: unknown CPU feature 'frobnicate'"),
    (["run", "--guest", "hello64", "-s", "-monitor", "stdio"], "cannot be used with the GDB stub yet"),
    (["run", "--guest", "hello64", "-s", "-serial", "mon:stdio"], "use -serial stdio"),
    (["run", "--guest", "hello64", "-device", "virtconsole"], "needs chardev=ID"),
    (["run", "--guest", "hello64", "-device", "virtconsole,chardev=x"], "no -chardev with id=x"),
    (["run", "--guest", "hello64", "-device", "isa-debug-exit,iosize=3"], "use 1, 2 or 4"),
    (["run", "--guest", "hello64", "-device", "isa-debug-exit,port=1"], "unknown property 'port'"),
    (["run", "--guest", "hello64", "-global", "kvm-pit.lost_tick_policy=slew"], "use delay or discard"),
    (["run", "--guest", "hello64", "-global", "kvm-pit.lost_tick_policy=discard"], "kernel_irqchip=on"),
    (["run", "--guest", "hello64", "-global", "e1000.mac=1"], "pykvm has no such property"),
    (["run", "--guest", "hello64", "-machine", "kernel_irqchip=split"], "the in-kernel irqchip (on) or none"),
    (["run", "--guest", "hello64", "-append", "x"], "-append and -initrd go with a kernel"),
    (["run", "--guest", "hello64", "--stats-json", "/no/such/dir/s.json", "-serial", "null"], "--stats-json"),
    (["run"], "give a -kernel FILE or a --guest NAME"),
    (["run", "-kernel"], "-kernel needs a value"),
    (["run", "disk.img"], "unexpected argument 'disk.img': a disk image"),
    (["frobnicate"], "unknown command 'frobnicate'"),
    (["check", "extra"], "check takes no arguments"),
]


@pytest.mark.kvm
@pytest.mark.parametrize("args, message", BAD_INPUT)
def test_bad_input_exits_2_with_one_line(args, message):
    proc = pykvm(*args)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert message in err


@pytest.mark.kvm
def test_flat_options_on_a_kernel_are_refused_and_format_flat_overrides(tmp_path):
    proc = pykvm("run", "-kernel", str(guests.path("mbinfo")), "--load-addr", "0x200000")
    assert proc.returncode == 2
    assert b"is a multiboot image: --mode and --load-addr are for flat images" in proc.stderr


@pytest.mark.kvm
def test_image_larger_than_memory_exits_2(tmp_path):
    image = tmp_path / "big.bin"
    image.write_bytes(b"\x90" * (3 << 20))
    proc = pykvm("run", "-kernel", str(image), "-m", "2M")
    assert proc.returncode == 2
    assert b"does not fit in guest RAM" in proc.stderr


def test_help_and_usage():
    proc = pykvm("run", "-help")
    assert proc.returncode == 0 and b"QEMU's options:" in proc.stdout and b"-kernel FILE" in proc.stdout
    assert pykvm("--help").returncode == 0
    assert pykvm().returncode == 2  # no command: the usage, and the status of bad input


# --- check ---------------------------------------------------------------------------------
@pytest.mark.kvm
def test_check_reports_capabilities_and_nested_host():
    proc = pykvm("check")
    text = proc.stdout.decode()
    assert proc.returncode == 0
    assert "KVM API version: 12" in text and "KVM_CAP_IMMEDIATE_EXIT" in text
    assert text.rstrip().endswith("KVM acceleration can be used")
    from pykvm.host import nested_kvm_module

    if nested_kvm_module():
        assert "nested KVM" in text
    assert "  long       runs; debugging: single-step, hw breakpoints" in text
    if nested_kvm_module() == "kvm_pvm":
        assert "paged32    cannot run" in text and "long_user  runs; debugging: none works" in text
