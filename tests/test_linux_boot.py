"""Debian's stock kernel on ``pykvm run -M pc``, as a user would boot it (docs/linux.md).

``make linux`` puts the kernel and a busybox initramfs in
``${PYKVM_CACHE:-~/.cache/pykvm}/linux`` (pykvm.guests.linux_image); without
them this test reports itself skipped.  The kernel's ring-0 code is emulated
on a nested host (~1 us per instruction), so the test waits for lines, not
for the end: the banner, the ``Command line:`` echo and the e820 map come
about 30 s after the start here, then the run is stopped.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from pykvm.guests import linux_image

pytestmark = [pytest.mark.kvm, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CMDLINE = "console=ttyS0 earlyprintk=ttyS0 pykvm.test=e820"
MEMORY = "512M"
DEADLINE = 300          # seconds for the whole wait: generous, for a busy host
E820_LINE = re.compile(r"BIOS-e820: \[mem 0x([0-9a-f]+)-0x([0-9a-f]+)\] (.+?)\s*$")
E820_KINDS = {1: "usable", 2: "reserved", 3: "ACPI data", 4: "ACPI NVS", 5: "unusable"}


def expected_e820(memory: str) -> list[tuple[int, int, str]]:
    """What the kernel prints of the map pykvm supplies: inclusive ends, adjacent same-type entries joined
    (arch/x86/kernel/e820.c: e820__update_table sanitizes the firmware's map before printing it)."""
    from pykvm.platform.machine import Machine

    with Machine(memory=memory, platform="pc") as m:
        entries = sorted(m.memory_map().e820)
    joined: list[list[int]] = []
    for base, length, kind in entries:
        if joined and joined[-1][2] == kind and joined[-1][1] == base:
            joined[-1][1] = base + length
        else:
            joined.append([base, base + length, kind])
    return [(start, end - 1, E820_KINDS[kind]) for start, end, kind in joined]


class Console:
    """The lines of a process's output, each with the seconds since the start, read by a thread."""

    def __init__(self, argv: list[str]) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen(argv, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT)
        self.lines: list[tuple[float, str]] = []
        self._queue: queue.Queue = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self._queue.put((time.monotonic() - self.started, raw.decode(errors="replace").rstrip("\r\n")))
        self._queue.put(None)

    def wait_for(self, pattern: str, deadline: float) -> tuple[float, str] | None:
        """The first line (from the start) matching ``pattern``, waiting for more until ``deadline``."""
        found = next(((t, line) for t, line in self.lines if re.search(pattern, line)), None)
        while found is None and time.monotonic() < deadline:
            try:
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                self._queue.put(None)  # the end stays the end for the next wait
                break
            self.lines.append(item)
            if re.search(pattern, item[1]):
                found = item
        return found

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # pykvm run stops its vCPUs and exits
        try:
            return self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self._reader.join(timeout=10)

    def tail(self, n: int = 15) -> str:
        return "\n".join(f"[{t:6.1f}] {line}" for t, line in self.lines[-n:])


def test_debian_kernel_prints_its_banner_command_line_and_our_e820_map():
    reason = linux_image.missing()
    if reason:
        pytest.skip(reason)
    console = Console([sys.executable, "-m", "pykvm", "run", "-M", "pc", "-m", MEMORY, "-smp", "1",
                       "-kernel", linux_image.kernel_path(), "-initrd", linux_image.initrd_path(),
                       "-append", CMDLINE, "-nographic", "--timeout", str(DEADLINE)])
    deadline = time.monotonic() + DEADLINE
    try:
        banner = console.wait_for(r"Linux version 6\.", deadline)
        assert banner is not None, f"no banner within {DEADLINE} s:\n{console.tail()}"
        command_line = console.wait_for(r"Command line:", deadline)
        assert command_line is not None, console.tail()
        # the map ends at the first line after the e820 lines (the boot console's or NX's)
        after = console.wait_for(r"printk: bootconsole|NX \(Execute Disable\)", deadline)
        assert after is not None, console.tail()
    finally:
        status = console.stop()
    text = [line for _, line in console.lines]
    assert "Traceback" not in "\n".join(text), console.tail(40)
    assert command_line[1].split("Command line: ", 1)[1] == CMDLINE
    printed = [(int(a, 16), int(b, 16), kind) for a, b, kind in
               (m.groups() for m in map(E820_LINE.search, text) if m)]
    assert printed == expected_e820(MEMORY), "\n".join(line for line in text if "e820" in line)
    print(f"\nbanner at {banner[0]:.1f} s, command line at {command_line[0]:.1f} s, e820 done at "
          f"{after[0]:.1f} s; pykvm run exit status {status}")
