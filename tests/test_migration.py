"""Live migration (pykvm.state.migration): the monitor's migrate to a ``pykvm run -incoming`` in another process.

The guest is iobench64u's UART stream, which fills a buffer in guest
memory with a fixed sequence and sends it byte by byte: what the source
printed before the move and the destination after it must be the
uninterrupted run's bytes exactly.  A migration whose connection drops
leaves the source running to its normal end.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading

import pytest

STREAM_N = 20_000


def pykvm(*args, timeout=180):
    return subprocess.run([sys.executable, "-m", "pykvm", "run", *args], stdin=subprocess.DEVNULL,
                          capture_output=True, timeout=timeout)


def spawn(*args):
    return subprocess.Popen([sys.executable, "-m", "pykvm", "run", *args], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def stream():
    proc = pykvm("--guest", "iobench64u", "--args", f"1,{STREAM_N}", "-serial", "stdio", "-display", "none")
    assert len(proc.stdout) == STREAM_N, proc.stderr
    return proc.stdout, proc.returncode


def source(tmp_path, uri: str, out):
    script = tmp_path / "source.txt"
    script.write_text(f"cont\nwait 0.3\nmigrate {uri}\ninfo migrate\nwait 60\nquit\n")
    return pykvm("--guest", "iobench64u", "--args", f"1,{STREAM_N}", "--monitor-script", str(script),
                 "-serial", f"file:{out}", "-display", "none")


def free_tcp_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.kvm
@pytest.mark.parametrize("kind", ["unix", "tcp"])
def test_the_stream_goes_on_in_the_destination_process(tmp_path, stream, kind):
    uri = f"unix:{tmp_path}/mig.sock" if kind == "unix" else f"tcp:127.0.0.1:{free_tcp_port()}"
    rest = tmp_path / "rest.out"
    destination = spawn("-incoming", uri, "-serial", f"file:{rest}", "-display", "none")
    try:
        first = tmp_path / "first.out"
        proc = source(tmp_path, uri, first)
        out, err = destination.communicate(timeout=180)
    finally:
        destination.kill()
    answers = proc.stdout.decode()
    assert "migration completed: " in answers, answers + proc.stderr.decode()
    assert "Migration status: completed" in answers and "downtime: " in answers
    assert destination.returncode == stream[1], err
    assert first.read_bytes() + rest.read_bytes() == stream[0]
    assert 0 < len(rest.read_bytes())  # the destination ran the rest of it
    if kind == "unix":
        assert not os.path.exists(uri[5:])  # the listener's socket file is gone


@pytest.mark.kvm
def test_a_dropped_connection_leaves_the_source_running(tmp_path, stream):
    path = str(tmp_path / "drop.sock")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(path)
    listener.listen(1)

    def drop() -> None:
        conn, _ = listener.accept()
        conn.recv(100)  # the start of the description, then hang up
        conn.close()

    thread = threading.Thread(target=drop, daemon=True)
    thread.start()
    out = tmp_path / "all.out"
    proc = source(tmp_path, f"unix:{path}", out)
    thread.join(10)
    listener.close()
    answers = proc.stdout.decode()
    assert "migrate: failed: " in answers and "Migration status: failed" in answers, answers
    assert out.read_bytes() == stream[0]  # the guest ran on to its end, here


@pytest.mark.kvm
def test_nobody_listening_fails_cleanly_and_the_guest_runs_on(tmp_path, stream, monkeypatch):
    out = tmp_path / "all.out"
    proc = source(tmp_path, f"unix:{tmp_path}/nobody.sock", out)
    assert "migrate: failed: " in proc.stdout.decode()
    assert out.read_bytes() == stream[0]


@pytest.mark.kvm
def test_dirty_log_reports_the_pages_the_guest_writes():
    from pykvm.platform.machine import Machine
    from pykvm.state import dirty

    with Machine(memory="16M") as m:
        m.load_guest("iobench64u", args=(1, 3000))
        dirty.start_logging(m.memory)
        assert dirty.dirty_pages(m.memory) == []  # nothing written since logging began
        m.memory.write(0x800000, b"host")  # the host's writes are not logged (migration checks them apart)
        assert dirty.dirty_pages(m.memory) == []
        assert m.run(timeout=60).ended == "reset"
        pages = dirty.dirty_pages(m.memory)
        assert pages and all(m.memory.is_mapped(p, 4096) for p in pages)  # its buffer and stack
        assert dirty.dirty_pages(m.memory) == []  # reading cleared the log
        dirty.stop_logging(m.memory)


@pytest.mark.kvm
def test_bad_addresses_are_one_line():
    for args, message in [(["-incoming", "tcp:host"], b"use tcp:HOST:PORT or unix:PATH"),
                          (["-incoming", "exec:cat"], b"pykvm takes file:FILE, tcp:HOST:PORT or unix:PATH")]:
        proc = pykvm(*args)
        assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count(b"\n") == 1, proc.stderr


@pytest.mark.kvm
def test_a_guest_rewriting_4_mib_migrates_in_rounds_and_checks_every_word(tmp_path):
    """pattern64u dirties its whole buffer all the time: pre-copy runs its rounds, the pause sends the rest."""
    args = ("--guest", "pattern64u", "--args", "2000,4")
    whole = pykvm(*args, "-serial", "stdio", "-display", "none")
    assert whole.stdout.endswith(b"round 1999 ok\npattern: ok\n"), whole.stderr
    uri = f"unix:{tmp_path}/mig.sock"
    rest = tmp_path / "rest.out"
    destination = spawn("-incoming", uri, "-serial", f"file:{rest}", "-display", "none")
    try:
        first = tmp_path / "first.out"
        script = tmp_path / "source.txt"
        script.write_text(f"cont\nwait 0.3\nmigrate {uri}\ninfo migrate\nquit\n")
        proc = pykvm(*args, "--monitor-script", str(script), "-serial", f"file:{first}", "-display", "none")
        destination.communicate(timeout=180)
    finally:
        destination.kill()
    answers = proc.stdout.decode()
    assert "Migration status: completed" in answers, answers + proc.stderr.decode()
    rounds = int(answers.split("rounds: ")[1].split()[0])
    assert rounds > 1  # the guest kept dirtying pages: more than the first round was needed
    assert destination.returncode == whole.returncode
    moved = first.read_bytes() + rest.read_bytes()
    assert moved == whole.stdout  # every word checked before it was overwritten, on both sides
    assert first.read_bytes() and rest.read_bytes().endswith(b"pattern: ok\n")


@pytest.mark.kvm
def test_a_destination_of_another_shape_refuses_and_the_source_runs_on(tmp_path, stream):
    uri = f"unix:{tmp_path}/mig.sock"
    destination = spawn("-incoming", uri, "-m", "64M", "-serial", "null", "-display", "none")
    try:
        out = tmp_path / "all.out"
        proc = source(tmp_path, uri, out)
        _, err = destination.communicate(timeout=60)
    finally:
        destination.kill()
    assert destination.returncode == 2
    assert b"wrong machine: the snapshot's memory is 134217728, this machine's is 67108864" in err
    assert "migrate: failed: " in proc.stdout.decode()
    assert out.read_bytes() == stream[0]


@pytest.mark.kvm
def test_a_source_that_hangs_up_mid_stream_is_one_line_at_the_destination(tmp_path):
    import json
    import struct

    from pykvm.platform.machine import Machine
    from pykvm.state.snapshot import describe

    with Machine(memory="128M") as m:
        description = json.dumps(describe(m)).encode()
    path = tmp_path / "mig.sock"
    destination = spawn("-incoming", f"unix:{path}", "-serial", "null", "-display", "none")
    try:
        sock = socket.socket(socket.AF_UNIX)
        for _ in range(500):  # until the destination listens
            try:
                sock.connect(str(path))
                break
            except (FileNotFoundError, ConnectionRefusedError):
                threading.Event().wait(0.02)
        sock.sendall(struct.pack("<4sQ", b"MACH", len(description)) + description)
        sock.sendall(struct.pack("<4sQ", b"PAGE", 8 + 4096) + struct.pack("<Q", 0x100000) + b"\x90" * 100)
        sock.close()  # gone, mid-page
        _, err = destination.communicate(timeout=60)
    finally:
        destination.kill()
    assert destination.returncode == 2
    assert err.endswith(b"-incoming: migration: the connection closed in the middle of the stream\n"), err
    assert err.count(b"\n") == 2  # "waiting for a migration on ..." and the error
