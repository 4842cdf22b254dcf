"""pykvm's -M pc beyond the shipped PC guests: port 0x61, ACPI power-off, pc-testdev, SMP stops, QEMU command lines."""

from __future__ import annotations

import subprocess
import sys
import threading

import pytest

from pykvm import guests
from pykvm.devices.port61 import OUT2, Port61, channel_out


# --- port 0x61 (no KVM) --------------------------------------------------------------------
def test_channel_out_follows_the_8254_modes():
    ns_per_tick = 1e9 / 1_193_182
    assert not channel_out(100, 0, int(99 * ns_per_tick)) and channel_out(100, 0, int(101 * ns_per_tick))
    assert channel_out(100, 3, int(10 * ns_per_tick)) and not channel_out(100, 3, int(60 * ns_per_tick))
    assert not channel_out(0, 0, int(65535 * ns_per_tick))  # a count of 0 is 65536


def test_port61_reads_out2_and_hands_gate_changes_on():
    gates = []
    now = [900_000]
    port = Port61(lambda: (1193, 0, 0), gates.append, clock_ns=lambda: now[0])  # 1193 ticks: 1 ms
    assert not port.read(0, 1)[0] & OUT2  # 0.9 ms after the load: not yet
    now[0] = 1_100_000
    assert port.read(0, 1)[0] & OUT2
    port.write(0, b"\x01")
    port.write(0, b"\x03")  # the speaker bit alone: no gate change
    port.write(0, b"\x00")
    assert gates == [True, False] and port.read(0, 1)[0] & 0x3 == 0


# --- guests on Machine(platform="pc") ----------------------------------------------------------
def run_flat(code: bytes, **machine):
    from pykvm.platform.machine import Machine

    with Machine(memory="32M", platform="pc", **machine) as m:
        m.load_image(code, format="flat", mode="protected")
        return m.run(timeout=30)


@pytest.mark.kvm
def test_acpi_s5_powers_off_cleanly():
    # mov dx, 0x604 (PM1a_CNT) ; mov ax, SLP_EN | SLP_TYP 0 (the DSDT's \_S5) ; out dx, ax ; jmp $
    result = run_flat(bytes([0x66, 0xBA, 0x04, 0x06, 0x66, 0xB8, 0x00, 0x20, 0x66, 0xEF, 0xEB, 0xFE]))
    assert (result.ended, result.exit_status, result.clean) == ("poweroff", 0, True)


@pytest.mark.kvm
def test_pc_testdev_echoes_its_register():
    # mov eax, 0x12345678 ; out 0xe0, eax ; xor eax, eax ; in eax, 0xe0 ; out 0xf4, eax (debug-exit, 4 bytes)
    code = bytes([0xB8, 0x78, 0x56, 0x34, 0x12, 0xE7, 0xE0, 0x31, 0xC0, 0xE5, 0xE0, 0xE7, 0xF4, 0xEB, 0xFE])
    result = run_flat(code, pc_testdev=True)
    assert result.ended == "debug-exit" and result.exit_status == 0x12345678 << 1 | 1  # read back: echoed


@pytest.mark.kvm
def test_smp_run_joins_every_vcpu_thread_and_runs_again():
    from pykvm.platform.machine import Machine

    before = threading.active_count()
    with Machine(memory="128M", platform="pc", cpus=3) as m:
        m.load_guest("spin64u")  # the BSP spins; the APs wait for a SIPI that never comes
        first = m.run(timeout=0.3)
        second = m.run(timeout=0.3)
        assert (first.ended, second.ended) == ("timeout", "timeout")
        assert all(not t.name.startswith("pykvm-vcpu") for t in threading.enumerate())
    assert threading.active_count() <= before + 1  # the process's watchdog thread may stay


@pytest.mark.kvm
def test_smp_guest_counts_every_cpu_on_three_vcpus():
    from pykvm.guests.reports import parse_report
    from pykvm.platform.machine import Machine

    with Machine(memory="128M", platform="pc", cpus=3) as m:
        m.load_guest("smp")
        result = m.run(timeout=60)
    report = parse_report(result.serial_text, strict=True)
    assert result.ended == "debug-exit" and report["done"] == "ok"
    assert report["apic_ids"] == [0, 1, 2] and report["sum"] == 3


# --- QEMU command lines, unchanged --------------------------------------------------------------
@pytest.mark.kvm
def test_a_qemu_smp_command_line_with_initrd_append_debug_exit_and_pc_testdev(tmp_path):
    from pykvm.guests.reports import parse_report

    module = tmp_path / "m.bin"
    module.write_bytes(b"module bytes")
    argv = ["-accel", "kvm", "-M", "pc", "-m", "128", "-smp", "2", "-nodefaults", "-display", "none",
            "-no-reboot", "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-device", "pc-testdev", "-kernel", str(guests.path("mbinfo")), "-append", "x=1",
            "-initrd", f"{module} arg"]
    proc = subprocess.run([sys.executable, "-m", "pykvm", "run", *argv], capture_output=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 1, proc.stderr  # the guest's "exit 0" as QEMU reports it
    report = parse_report(proc.stdout.decode(), strict=True)
    assert report["cmdline"]["text"].endswith(" x=1") and report["module"][0]["text"] == f"{module} arg"


@pytest.mark.kvm
def test_the_pics_hold_the_bios_vector_bases_when_a_kernel_starts():
    from pykvm._native import lib
    from pykvm.platform.machine import Machine

    with Machine(memory="32M", platform="pc") as m:
        m.load_image(bytes([0xF4]), format="flat", mode="protected")
        master = m.vm.pic_state(m.vm.get_irqchip(lib.KVM_IRQCHIP_PIC_MASTER))  # temporaries: the
        slave = m.vm.pic_state(m.vm.get_irqchip(lib.KVM_IRQCHIP_PIC_SLAVE))  # pointers keep them alive
        assert (master.irq_base, slave.irq_base) == (0x08, 0x70)  # INT 08h-0Fh and INT 70h-77h
        assert (master.init4, master.init_state, slave.init4) == (1, 0, 1)
        assert m.vm.get_pit2().channels[0].mode == 3


@pytest.mark.kvm
def test_s3_waits_through_a_timeout_then_system_wakeup_resumes_in_real_mode_at_the_vector():
    from pykvm.platform.machine import Machine

    # mov dx, 0x604 (PM1a_CNT) ; mov ax, SLP_EN | SLP_TYP 1 (QEMU's \_S3) ; out dx, ax ; jmp $
    suspend = bytes([0x66, 0xBA, 0x04, 0x06, 0x66, 0xB8, 0x00, 0x24, 0x66, 0xEF, 0xEB, 0xFE])
    # real mode: xor eax, eax ; mov dx, 0x600 ; in ax, dx (PM1_STS) ; mov dx, 0xf4 ; out dx, eax ; jmp $
    resume = bytes([0x66, 0x31, 0xC0, 0xBA, 0x00, 0x06, 0xED, 0xBA, 0xF4, 0x00, 0x66, 0xEF, 0xEB, 0xFE])
    with Machine(memory="32M", platform="pc") as m:
        m.load_image(suspend, format="flat", mode="protected")
        m.memory.write(0x7010, resume)
        m.memory.write(m.board.acpi.firmware_waking_vector_addr, (0x7010).to_bytes(4, "little"))
        asleep = m.run(timeout=0.3)  # nothing armed to wake it: the run times out asleep
        assert asleep.ended == "timeout" and "suspended" in asleep.message and m.board.sleep.suspended
        again = m.run(timeout=0.2)  # a later run goes on sleeping; it does not re-execute the guest
        assert again.ended == "timeout" and m.board.sleep.suspends == 1
        assert m.board.sleep.wakeup()  # the monitor's system_wakeup
        woke = m.run(timeout=10)
        assert woke.ended == "debug-exit"
        pm1_sts = woke.exit_status >> 1
        assert pm1_sts & 0x8100 == 0x8100  # WAK_STS and PWRBTN_STS (QEMU's "other" wake reason)
        sregs = m.vcpu.get_sregs()
        assert (sregs.cs.selector, sregs.cs.base, sregs.cr0 & 1) == (0x701, 0x7010, 0)  # CS:IP = 0701:0000
