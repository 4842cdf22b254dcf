"""Snapshots (pykvm.state.snapshot): a guest saved mid-run and restored goes on byte for byte as an uninterrupted run.

Guests chosen for determinism: primes64u computes at CPL 3 without
reading a clock; iobench64u's UART stream is a fixed sequence; smp prints
its report (only ``tsc_khz``, a measurement, differs between any two runs).
Bad files are refused before /dev/kvm is even opened.
"""

from __future__ import annotations

import errno
import os
import re
import struct
import zlib

import pytest

from pykvm import guests
from pykvm.devices import Uart16550
from pykvm.devices.cmos import Cmos
from pykvm.devices.pci import PciHost
from pykvm.state import snapshot_format as fmt
from pykvm.state.snapshot_format import SnapshotError, read_snapshot, write_snapshot

PRIMES_N = 10_000_000  # about 1.7 s natively here: a 0.3 s timeout stops it mid-computation
STREAM_N = 20_000  # iobench64u's UART stream: about 1.5 s (an exit per byte)


def machine_class():
    from pykvm.platform.machine import Machine

    return Machine


# -- the file format, without KVM --------------------------------------------------------------------------
def test_memory_is_stored_sparse_and_read_back(tmp_path):
    region = bytearray(64 * fmt.PAGE_SIZE)
    region[5 * 4096:5 * 4096 + 3] = b"abc"
    region[63 * 4096 + 4095] = 7
    path = str(tmp_path / "s.snap")
    size = write_snapshot(path, {"m": 1}, {"blob": b"\x00\xff"}, [(0x100000, memoryview(region))])
    assert size == os.path.getsize(path) < 3 * fmt.PAGE_SIZE  # 2 of 64 pages stored
    snap = read_snapshot(path)
    assert snap.machine == {"m": 1} and snap.state == {"blob": b"\x00\xff"}
    (base, length, payload), = snap.ram
    assert (base, length) == (0x100000, len(region))
    target = bytearray(b"\x55" * len(region))  # stale bytes: zero pages are written as zeros
    fmt.load_pages(memoryview(target), payload)
    assert target == region


class FullDisk:
    """A file object whose writes fail with ENOSPC once ``room`` bytes are written."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("where", ["write", "fsync"])
def test_a_failed_save_leaves_no_file_and_the_old_one_intact(tmp_path, monkeypatch, where):
    path = tmp_path / "s.snap"
    path.write_bytes(b"the previous snapshot")

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    if where == "fsync":
        monkeypatch.setattr(fmt.os, "fsync", no_space)
    else:
        real_fdopen = os.fdopen
        monkeypatch.setattr(fmt.os, "fdopen", lambda fd, mode: FullDisk(real_fdopen(fd, mode), 1000))
    region = bytearray(8192)
    region[0] = region[4096] = 1  # two pages to store: more than the disk's 1000 bytes
    with pytest.raises(OSError) as info:
        write_snapshot(str(path), {}, {}, [(0, memoryview(region))])
    assert info.value.errno == errno.ENOSPC
    assert sorted(os.listdir(tmp_path)) == ["s.snap"] and path.read_bytes() == b"the previous snapshot"


def test_device_states_round_trip():
    uart = Uart16550()
    uart.write(3, b"\x03")
    uart.write(1, b"\x05")
    uart.write(2, b"\xc1")
    uart.enqueue_input(b"x" * 20)
    again = Uart16550()
    again.load_state(uart.save_state())
    assert again.snapshot() == uart.snapshot() and again.read(0, 1) == b"x"
    cmos = Cmos()
    cmos.write(0, b"\x0b")
    cmos.write(1, b"\x42")
    other = Cmos()
    other.load_state(cmos.save_state())
    assert other.save_state() == cmos.save_state()
    pci = PciHost()
    pci.write(0, (0x80000000 | 0x04).to_bytes(4, "little"))
    pci.write(4, (0x0107).to_bytes(2, "little"))
    fresh = PciHost()
    fresh.load_state(pci.save_state())
    assert fresh.host_bridge.config == pci.host_bridge.config and fresh.config_address == pci.config_address
    with pytest.raises(Exception, match="version"):
        fresh.load_state({"version": 99})


# -- round trips -------------------------------------------------------------------------------------------------
def run_whole(make, load, timeout=120):
    with make() as m:
        load(m)
        result = m.run(timeout=timeout)
        return result, bytes(m.pc.capture.data)


@pytest.mark.kvm
def test_primes_paused_mid_computation_ends_with_the_same_registers(tmp_path):
    Machine = machine_class()
    whole, whole_out = run_whole(lambda: Machine(memory="16M"), lambda m: m.load_guest("primes64u", args=(PRIMES_N, 0)))
    assert whole.ended == "reset" and whole.regs["rax"] == 664579
    path = str(tmp_path / "primes.snap")
    with Machine(memory="16M") as m:
        m.load_guest("primes64u", args=(PRIMES_N, 0))
        part = m.run(timeout=0.3)
        assert part.ended == "timeout" and part.serial == b""  # stopped mid-computation
        info = m.save(path)
    assert info["bytes"] == os.path.getsize(path) < 1 << 20  # 16 MiB of RAM, a few pages touched
    with Machine.restore(path) as m:
        rest = m.run(timeout=120)
        assert rest.ended == "reset"
        assert rest.regs == whole.regs
        assert bytes(m.pc.capture.data) == whole_out == b"primes below 10000000: 664579\n"


def stop_after(marker: bytes, holder: list):
    seen = bytearray()

    def sink(data: bytes) -> None:
        seen.extend(data)
        if marker in seen:
            holder[0].request_stop("paused")
    return sink


@pytest.mark.kvm
def test_uart_stream_paused_by_a_stop_request_continues_byte_for_byte(tmp_path):
    Machine = machine_class()
    whole, whole_out = run_whole(lambda: Machine(memory="16M"), lambda m: m.load_guest("iobench64u", args=(1, STREAM_N)))
    assert len(whole_out) == STREAM_N
    holder: list = []
    count = [0]

    def sink(data: bytes) -> None:
        count[0] += len(data)
        if count[0] >= STREAM_N // 3:
            holder[0].request_stop("paused")

    path = str(tmp_path / "stream.snap")
    with Machine(memory="16M", serial=sink) as m:
        holder.append(m)
        m.load_guest("iobench64u", args=(1, STREAM_N))
        assert m.run(timeout=120).ended == "paused"
        first = bytes(m.pc.capture.data)
        m.save(path)
    assert STREAM_N // 3 <= len(first) < STREAM_N
    with Machine.restore(path) as m:
        rest = m.run(timeout=120)
        assert first + bytes(m.pc.capture.data) == whole_out
        assert rest.ended == whole.ended and rest.regs["rax"] == whole.regs["rax"]  # the stream's Adler-32


def mask_tsc(text: bytes) -> bytes:
    return re.sub(rb"tsc_khz: \d+", b"tsc_khz: N", text)


@pytest.mark.kvm
@pytest.mark.parametrize("marker", [b"trampoline:", b"cpus: "], ids=["before-init-sipi", "aps-halted"])
def test_smp_guest_restores_irqchip_lapics_and_mp_states(tmp_path, marker):
    Machine = machine_class()

    def boot(m):
        m.load_image(guests.file("smp"), format="multiboot", name="smp")

    whole, whole_out = run_whole(lambda: Machine(memory="64M", platform="pc", cpus=2), boot)
    assert whole.ended == "debug-exit" and b"done: ok" in whole_out
    holder: list = []
    path = str(tmp_path / "smp.snap")
    with Machine(memory="64M", platform="pc", cpus=2, serial=stop_after(marker, holder)) as m:
        holder.append(m)
        boot(m)
        assert m.run(timeout=120).ended == "paused"
        first = bytes(m.pc.capture.data)
        states = [vcpu.get_mp_state() for vcpu in m.vcpus]
        m.save(path)
    assert b"done:" not in first
    with Machine.restore(path) as m:
        assert [vcpu.get_mp_state() for vcpu in m.vcpus] == states
        rest = m.run(timeout=120)
        assert (rest.ended, rest.exit_status) == (whole.ended, whole.exit_status)
        assert mask_tsc(first + bytes(m.pc.capture.data)) == mask_tsc(whole_out)


# -- bad files: refused before anything is created ---------------------------------------------------------
@pytest.fixture(scope="module")
def good_snapshot(tmp_path_factory):
    Machine = machine_class()
    path = str(tmp_path_factory.mktemp("snap") / "good.snap")
    with Machine(memory="16M") as m:
        m.load_guest("hello64u")
        m.save(path)
    return path


def rewrite(data: bytes, *, crc: bool = True) -> bytes:
    """``data`` with its trailer's checksum made right again (a file edited on purpose)."""
    body = data[:-16]
    return body + struct.pack("<4sQI", b"CRC3", 4, zlib.crc32(body)) if crc else data


def bad_files(good: bytes) -> dict[str, tuple[bytes, str]]:
    middle = len(good) // 2
    machine_at = good.index(b'"memory": ') + len(b'"memory": ')
    wrong_memory = good[:machine_at] + good[machine_at:].replace(b"16777216", b"16777217", 1)
    malformed = good[:machine_at] + good[machine_at:].replace(b"16777216", b'"16M"   ', 1)
    return {
        "corrupt": (good[:middle] + bytes([good[middle] ^ 0x40]) + good[middle + 1:], "checksum mismatch"),
        "truncated": (good[:middle], "truncated"),
        "wrong-version": (good[:8] + struct.pack("<I", 99) + good[12:], "version 99"),
        "not-a-snapshot": (b"\x7fELF" + bytes(100), "not a pykvm snapshot"),
        "empty": (b"", "not a pykvm snapshot"),
        "malformed-machine": (rewrite(malformed), "malformed"),
        "edited-machine": (rewrite(wrong_memory), "memory regions"),
    }


@pytest.mark.kvm
@pytest.mark.parametrize("kind", ["corrupt", "truncated", "wrong-version", "not-a-snapshot", "empty",
                                  "malformed-machine"])
def test_a_bad_file_is_refused_before_kvm_is_opened(tmp_path, good_snapshot, monkeypatch, kind):
    from pykvm.system import Kvm

    data, message = bad_files(open(good_snapshot, "rb").read())[kind]
    path = tmp_path / f"{kind}.snap"
    path.write_bytes(data)

    def no_kvm(*args, **kwargs):
        raise AssertionError("/dev/kvm was opened for a bad snapshot")

    monkeypatch.setattr(Kvm, "__init__", no_kvm)
    with pytest.raises(SnapshotError) as info:
        machine_class().restore(str(path))
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.kvm
def test_wrong_machine_refused(tmp_path, good_snapshot, monkeypatch, open_fd_count):
    from pykvm.system import Kvm

    Machine = machine_class()
    data, message = bad_files(open(good_snapshot, "rb").read())["edited-machine"]
    edited = tmp_path / "edited.snap"
    edited.write_bytes(data)
    before = open_fd_count()
    with pytest.raises(SnapshotError, match=message):
        Machine.restore(str(edited))  # the regions do not add up to the memory size: found once built
    assert open_fd_count() == before  # ... and the machine made for it is closed again
    monkeypatch.setattr(Kvm, "__init__", lambda *a, **k: pytest.fail("/dev/kvm opened"))
    with pytest.raises(SnapshotError, match="wrong machine: the snapshot's cpus is 1, this machine's is 2"):
        Machine.restore(good_snapshot, expect={"cpus": 2})


@pytest.mark.kvm
def test_restore_into_a_machine_of_another_shape_is_refused(good_snapshot):
    from pykvm.state.snapshot import load_into

    Machine = machine_class()
    with Machine(memory="32M") as m:
        with pytest.raises(SnapshotError, match="wrong machine: the snapshot's memory"):
            load_into(m, read_snapshot(good_snapshot))
    with Machine(memory="16M") as m:
        m.add_uart(2, None)
        with pytest.raises(SnapshotError, match="com2"):
            load_into(m, read_snapshot(good_snapshot))


@pytest.mark.kvm
def test_save_refused_while_running_or_closed(tmp_path):
    import threading

    Machine = machine_class()
    m = Machine(memory="16M")
    m.load_guest("spin64u")
    started = threading.Event()
    errors = []

    def runner():
        started.set()
        m.run(timeout=30)

    thread = threading.Thread(target=runner)
    thread.start()
    started.wait(10)
    while m.vcpu.runner is None and thread.is_alive():
        threading.Event().wait(0.001)
    try:
        m.save(str(tmp_path / "x.snap"))
    except SnapshotError as exc:
        errors.append(str(exc))
    m.request_stop()
    thread.join(30)
    m.close()
    assert errors and "running" in errors[0]
    with pytest.raises(SnapshotError, match="closed"):
        m.save(str(tmp_path / "y.snap"))
    assert os.listdir(tmp_path) == []


@pytest.mark.kvm
def test_pattern_guest_checks_every_word_after_a_restore(tmp_path):
    """pattern64u verifies each word of its 4 MiB before rewriting it: a page lost in the file would show."""
    Machine = machine_class()
    whole, whole_out = run_whole(lambda: Machine(memory="16M"), lambda m: m.load_guest("pattern64u", args=(400, 4)))
    assert whole_out.endswith(b"pattern: ok\n") and whole.regs["rax"] == 400
    path = str(tmp_path / "pattern.snap")
    with Machine(memory="16M") as m:
        m.load_guest("pattern64u", args=(400, 4))
        assert m.run(timeout=0.2).ended == "timeout"
        first = bytes(m.pc.capture.data)
        m.save(path)
    assert b"pattern: ok" not in first
    with Machine.restore(path) as m:
        rest = m.run(timeout=120)
        assert first + bytes(m.pc.capture.data) == whole_out
        assert rest.regs == whole.regs
