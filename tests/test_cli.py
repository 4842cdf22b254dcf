"""The pykvm command: what it prints and the status it exits with."""

from __future__ import annotations

import subprocess
import sys
import zlib

import pytest

from pykvm import guests


def pykvm(*args, input=None, timeout=60):
    return subprocess.run(
        [sys.executable, "-m", "pykvm", *args], input=input, capture_output=True, timeout=timeout
    )


@pytest.mark.kvm
def test_run_hello64_prints_and_exits_zero():
    proc = pykvm("run", "--guest", "hello64")
    checksum = zlib.adler32(guests.path("hello64").read_bytes())
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"Hello from long mode\nchecksum 0x{checksum:08x}\n".encode()
    summary = proc.stderr.decode().strip().splitlines()
    assert len(summary) == 1 and summary[0].startswith("pykvm: hlt (status 0)")


@pytest.mark.kvm
def test_run_kernel_flat_image_with_mode(tmp_path):
    image = tmp_path / "hello.bin"
    image.write_bytes(guests.path("hello32").read_bytes())
    proc = pykvm("run", "--kernel", str(image), "--mode", "protected", "--load-addr", "0x100000")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(b"Hello from 32-bit protected mode\n")


@pytest.mark.kvm
def test_debug_exit_status_is_qemus(tmp_path):
    # 64-bit: mov al, 0x2a ; out 0xf4, al  -> status (0x2a << 1) | 1 = 85
    image = tmp_path / "exit.bin"
    image.write_bytes(bytes([0xB0, 0x2A, 0xE6, 0xF4, 0xF4]))
    proc = pykvm("run", "--kernel", str(image), "--mode", "long")
    assert proc.returncode == 85, proc.stderr
    assert b"debug-exit (status 85)" in proc.stderr


@pytest.mark.kvm
def test_serial_to_file_and_none(tmp_path):
    out = tmp_path / "serial.txt"
    proc = pykvm("run", "--guest", "hello16", "-serial", f"file:{out}")
    assert proc.returncode == 0 and proc.stdout == b""
    assert out.read_bytes().startswith(b"Hello from real mode\n")
    proc = pykvm("run", "--guest", "hello16", "-serial", "none")
    assert proc.returncode == 0 and proc.stdout == b""


@pytest.mark.kvm
def test_stdin_reaches_the_uart():
    proc = pykvm("run", "--guest", "uart_echo", "--timeout", "20", input=b"piped\x04")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == b"uart ready\npiped\nbye\n"


@pytest.mark.kvm
def test_timeout_exit_status():
    proc = pykvm("run", "--guest", "spin64u", "--timeout", "0.2")
    assert proc.returncode == 124
    assert b"timeout" in proc.stderr


@pytest.mark.kvm
def test_guest_crash_exit_status_and_dump():
    proc = pykvm("run", "--guest", "triple64")
    assert proc.returncode == 3
    assert b"shutdown" in proc.stderr and b"ud2" in proc.stderr


@pytest.mark.kvm
def test_strict_names_port_and_rip(tmp_path):
    # 64-bit: mov dx, 0x1234 ; out dx, al ; hlt
    image = tmp_path / "bad.bin"
    image.write_bytes(bytes([0x66, 0xBA, 0x34, 0x12, 0xEE, 0xF4]))
    loose = pykvm("run", "--kernel", str(image), "--mode", "long")
    assert loose.returncode == 0  # logged, dropped, and the guest halts
    strict = pykvm("run", "--kernel", str(image), "--mode", "long", "--strict")
    assert strict.returncode == 3
    # KVM has already stepped past an OUT when it exits, so RIP is the next instruction.
    assert b"unmapped PIO write to port 0x1234" in strict.stderr and b"RIP 0x100005" in strict.stderr


BAD_INPUT = [
    (["run", "--guest", "no-such-guest"], b"unknown guest 'no-such-guest'"),
    (["run", "--kernel", "/no/such/file"], b"no such file"),
    (["run", "--guest", "hello64", "-m", "lots"], b"bad size"),
    (["run", "--guest", "hello64", "-m", "1K"], b"at least 2M"),
    (["run", "--guest", "hello64", "--timeout", "-1"], b"finite number of seconds above 0"),
    (["run", "--guest", "hello64", "-serial", "tcp:1"], b"use stdio, file:PATH or none"),
    (["run", "--guest", "hello64", "--mode", "long"], b"go with --kernel"),
    (["run"], b"one of the arguments --guest --kernel is required"),
    (["frobnicate"], b"invalid choice"),
]


@pytest.mark.kvm
@pytest.mark.parametrize("args, message", BAD_INPUT)
def test_bad_input_exits_2_with_one_line(args, message):
    proc = pykvm(*args)
    assert proc.returncode == 2
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr.decode()
    assert message in proc.stderr


@pytest.mark.kvm
def test_image_larger_than_memory_exits_2(tmp_path):
    image = tmp_path / "big.bin"
    image.write_bytes(b"\x90" * (3 << 20))
    proc = pykvm("run", "--kernel", str(image), "-m", "2M")
    assert proc.returncode == 2
    assert b"does not fit in guest RAM" in proc.stderr


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


def test_guests_lists_every_guest():
    proc = pykvm("guests")
    assert proc.returncode == 0
    listed = [line.split()[0] for line in proc.stdout.decode().splitlines()]
    assert listed == guests.names()


@pytest.mark.kvm
def test_ctrl_c_stops_cleanly_with_a_summary():
    import signal
    import time

    proc = subprocess.Popen(
        [sys.executable, "-m", "pykvm", "run", "--guest", "spin64u"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    time.sleep(1.5)  # past interpreter start-up and VM creation
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=10)
    assert proc.returncode == 130
    assert b"interrupted" in err and b"Traceback" not in err


@pytest.mark.kvm
def test_internal_error_is_reported_with_the_instruction(tmp_path):
    from pykvm.host import nested_kvm_module

    # 64-bit CPL 0: popcnt eax, ecx ; hlt.  kvm_pvm's ring-0 emulator lacks popcnt.
    image = tmp_path / "popcnt.bin"
    image.write_bytes(bytes([0xF3, 0x0F, 0xB8, 0xC1, 0xF4]))
    proc = pykvm("run", "--kernel", str(image), "--mode", "long")
    if nested_kvm_module() != "kvm_pvm":
        assert proc.returncode == 0  # hardware runs it natively
        return
    assert proc.returncode == 3
    text = proc.stderr.decode()
    assert "internal-error" in text and "emulation failure" in text
    assert "code at RIP 0x100000: f3 0f b8 c1  popcnt eax, ecx" in text
