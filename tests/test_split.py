"""The guest / kernel / user split of a run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.kvm


def run(name, args=(0, 0), c_loop=True):
    from pykvm.platform.machine import Machine

    with Machine(memory="16M", c_loop=c_loop) as m:
        m.load_guest(name, args=args)
        return m.run(timeout=20)


def test_hello64_split_adds_up():
    split = run("hello64").split
    assert split.kvm_exits is not None
    assert split.user_exits == split.by_reason["io"]["total"] + split.by_reason["hlt"]["total"]
    assert split.by_reason["io"]["total"] == len("Hello from long mode\nchecksum 0x00000000\n")
    assert split.kernel_exits + split.user_exits == split.kvm_exits
    assert split.kernel_exits > 0 and split.user_exits > 0
    assert split.handled_in_c == split.by_reason["io"]["total"]  # the UART hot path
    assert split.handled_in_python == 1  # the final HLT
    from pykvm.host import nested_kvm_module

    if nested_kvm_module() == "kvm_pvm":
        # Every CPL-0 instruction is emulated there: at least one per byte printed.
        assert split.insn_emulation >= split.by_reason["io"]["total"]


def test_cpuid_exits_stay_in_the_kernel():
    # At CPL 3 CPUID traps to KVM, which answers it in the kernel.  (At CPL 0
    # on kvm_pvm the instruction emulator executes it without any exit.)
    from pykvm.host import nested_kvm_module

    n = 300
    result = run("bench64u", args=(5, n))
    assert result.regs["rax"] == n  # the guest did execute its CPUIDs
    split = result.split
    assert split.user_exits == 1  # only the final reset write came back
    # kvm_pvm answers CPUID in its world switcher without counting an exit, so
    # only elsewhere does the kernel's counter show them.
    if nested_kvm_module() != "kvm_pvm":
        assert split.kernel_exits >= n


def test_python_path_moves_exits_from_c_to_python():
    fast, slow = run("hello64").split, run("hello64", c_loop=False).split
    assert fast.user_exits == slow.user_exits
    assert slow.handled_in_c == 0 and slow.handled_in_python == fast.user_exits


def test_histograms_count_every_user_exit():
    split = run("bench64", args=(1, 500)).split
    io = split.histograms["io"]
    assert sum(io["roundtrip"]) == split.by_reason["io"]["total"]
    assert sum(io["handle"]) == split.by_reason["io"]["total"]


def test_time_is_accounted():
    split = run("bench64u", args=(1, 2000)).split  # port 0x700 has no device: Python answers
    assert 0 < split.seconds_in_run <= split.seconds
    assert split.seconds_in_python > 0 and split.seconds_in_c == 0
    split = run("hello64u").split  # the UART's transmit register is handled in C
    assert split.seconds_in_c > 0


def test_cli_stats_and_json(tmp_path):
    out = tmp_path / "split.json"
    proc = subprocess.run(
        [sys.executable, "-m", "pykvm", "run", "--guest", "hello64", "--stats", "--stats-json", str(out)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "handled in the kernel" in proc.stderr and "returned to user space" in proc.stderr
    data = json.loads(out.read_text())
    assert data["kernel_exits"] + data["user_exits"] == data["kvm_exits"]
    assert data["kernel_exits"] > 0 and data["user_exits"] > 0
    assert data["by_reason"]["io"]["c"] == data["handled_in_c"]
