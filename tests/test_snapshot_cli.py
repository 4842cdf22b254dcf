"""Snapshots from the command line: the monitor's savevm/loadvm, ``pykvm run -loadvm FILE`` and ``-incoming file:``.

The restored run is a fresh process: what it prints after the snapshot,
appended to what the saving run printed before it, is the uninterrupted
run's output, byte for byte.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

STREAM_N = 20_000  # iobench64u's UART stream (an exit per byte: about 1.5 s here)


def pykvm(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "pykvm", "run", *args], stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=timeout)


@pytest.fixture(scope="module")
def stream():
    """The uninterrupted run's COM1 output and exit status."""
    proc = pykvm("--guest", "iobench64u", "--args", f"1,{STREAM_N}", "-serial", "stdio", "-display", "none")
    assert len(proc.stdout) == STREAM_N, proc.stderr
    return proc.stdout, proc.returncode


@pytest.fixture(scope="module")
def paused(tmp_path_factory, stream):
    """A snapshot taken mid-stream by the library (a stop request after a third of the bytes) and what came before."""
    from pykvm.platform.machine import Machine

    holder: list = []
    seen = [0]

    def sink(data: bytes) -> None:
        seen[0] += len(data)
        if seen[0] >= STREAM_N // 3:
            holder[0].request_stop("paused")

    path = str(tmp_path_factory.mktemp("cli") / "stream.snap")
    with Machine(memory="128M", serial=sink) as m:  # pykvm run's default -m
        holder.append(m)
        m.load_guest("iobench64u", args=(1, STREAM_N))
        assert m.run(timeout=120).ended == "paused"
        first = bytes(m.pc.capture.data)
        m.save(path)
    assert STREAM_N // 3 <= len(first) < STREAM_N
    return path, first


@pytest.mark.kvm
@pytest.mark.parametrize("how", ["-loadvm", "-incoming"])
def test_restored_in_a_fresh_process_the_stream_goes_on(paused, stream, how):
    path, first = paused
    where = path if how == "-loadvm" else f"file:{path}"
    proc = pykvm(how, where, "-serial", "stdio", "-display", "none")
    assert (proc.returncode, proc.stderr) == (stream[1], b"")
    assert first + proc.stdout == stream[0]


@pytest.mark.kvm
def test_monitor_savevm_then_loadvm_in_a_fresh_process(tmp_path, stream):
    snap, out = tmp_path / "vm.snap", tmp_path / "first.out"
    script = tmp_path / "save.txt"
    # stopped wherever the guest is after a moment: what matters is that the two halves join
    script.write_text(f"cont\nwait 0.4\nstop\nsavevm {snap}\nquit\n")
    proc = pykvm("--guest", "iobench64u", "--args", f"1,{STREAM_N}", "--monitor-script", str(script),
                 "-serial", f"file:{out}", "-display", "none")
    assert proc.returncode == 0, proc.stderr
    assert f"saved {snap}: ".encode() in proc.stdout
    first = out.read_bytes()
    assert len(first) < STREAM_N
    # loadvm in a machine built for the guest (not booted: the script starts stopped), then cont
    script2 = tmp_path / "load.txt"
    script2.write_text(f"loadvm {snap}\ncont\nwait 120\n")
    rest = tmp_path / "rest.out"
    proc = pykvm("--guest", "iobench64u", "--args", f"1,{STREAM_N}", "--monitor-script", str(script2),
                 "-serial", f"file:{rest}", "-display", "none")
    assert f"loaded {snap}: rip ".encode() in proc.stdout, proc.stdout
    assert first + rest.read_bytes() == stream[0]


@pytest.mark.kvm
def test_monitor_savevm_answers_one_line_for_a_bad_path(tmp_path):
    script = tmp_path / "s.txt"
    script.write_text(f"savevm {tmp_path}/no/such/dir/x.snap\nloadvm {tmp_path}/missing.snap\nsavevm\nquit\n")
    proc = pykvm("--guest", "hello64u", "--monitor-script", str(script), "-serial", "none")
    lines = proc.stdout.decode().splitlines()
    assert lines[1].startswith("savevm: ") and "No such file or directory" in lines[1]
    assert lines[3].startswith("loadvm: ") and "No such file or directory" in lines[3]
    assert lines[5] == "savevm: savevm FILE: give one file name"


@pytest.mark.kvm
def test_bad_snapshot_files_exit_2_with_one_line_and_create_nothing(tmp_path, paused):
    good = open(paused[0], "rb").read()
    cases = {
        "corrupt": (good[:100] + bytes([good[100] ^ 1]) + good[101:], "checksum mismatch"),
        "truncated": (good[:len(good) // 2], "truncated"),
        "version": (good[:8] + b"\x07\x00\x00\x00" + good[12:], "snapshot format version 7"),
        "other": (b"#!/bin/sh\n", "not a pykvm snapshot"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.snap"
        path.write_bytes(data)
        out = tmp_path / f"{name}.out"
        proc = pykvm("-loadvm", str(path), "-serial", f"file:{out}")
        assert proc.returncode == 2, (name, proc.stderr)
        assert message.encode() in proc.stderr and proc.stderr.count(b"\n") == 1, proc.stderr
        assert not out.exists()  # checked before any endpoint (or VM) was made
    for args, message in [(["-m", "64M"], b"wrong machine: the snapshot's memory is 134217728"),
                          (["-smp", "2"], b"wrong machine: the snapshot's cpus is 1"),
                          (["-M", "pc"], b"wrong machine: the snapshot's platform is 'basic'"),
                          (["-serial", "stdio", "-serial", "null"], b"this machine has a device pio:0x2f8:com2"),
                          ]:
        proc = pykvm("-loadvm", paused[0], *args, *([] if "-serial" in args else ["-serial", "null"]))
        assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count(b"\n") == 1, proc.stderr
    for incoming, message in [("unix:", b"-incoming unix:: use tcp:HOST:PORT or unix:PATH"),
                              ("ftp:x", b"use file:FILE")]:
        proc = pykvm("-incoming", incoming)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
