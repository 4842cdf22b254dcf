"""Exit latency: what one VM exit costs, per exit kind and per handling path.

Every measurement runs a benchmark guest (``bench64``, ``bench64u``,
``bench32``: EDI = kind, ESI = N) that performs N operations of one kind,
and times the whole run.  The same guest with kind 0 (the bare
``dec``/``jnz`` loop, no exit) is timed on the same path, and

    per-exit µs = (median(run of kind) - median(empty run)) / N

so the loop itself and every fixed cost of a run (entering the guest,
returning the result) cancel out.  Each path's figure is then divided by the
raw-C figure of the same guest and kind, measured in the same invocation with
the runs interleaved (one run of each path in turn, rep after rep), so slow
drift of the host affects every path alike.

Paths:

``raw_c``
    ``rawbench.c``: no pykvm code, the least work per exit (the limit).
``c_loop``
    pykvm's ``Machine`` with the benchmark port/address in the C loop's
    range table (WRITE_DROP / READ_CONST): exits never reach Python.
``machine``
    ``Machine(c_loop=False)`` with a Python device registered on the bus:
    every exit is decoded, dispatched and answered in Python.
``bare``
    a Python loop over ``vcpu.run()`` (the raw layer) with a minimal handler.
``qemu``
    ``qemu-system-x86_64 -accel kvm -M microvm`` booting the multiboot guest
    ``bench32`` (see :mod:`pykvm.bench.qemu`).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pykvm.bench.common import (
    BENCH_GUESTS,
    EXIT_MEMORY,
    BenchError,
    BenchGuest,
    ensure_median,
)

PORT = 0x700
MMIO_ADDR = 0xE0000000
HLT_KIND = 6
RUN_TIMEOUT = 120.0


@dataclass(frozen=True)
class Kind:
    """An exit kind: the guest's loop (``number``) and how the host is set up (``variant``)."""

    name: str
    number: int
    variant: str
    title: str
    handled_in: str  # "user" (KVM_RUN returns) or "kernel"


EMPTY = Kind("empty", 0, "plain", "empty loop (baseline)", "none")

KINDS: list[Kind] = [
    Kind("pio_out", 1, "plain", "PIO out (port 0x700)", "user"),
    Kind("pio_in", 2, "plain", "PIO in (port 0x700)", "user"),
    Kind("mmio_write", 3, "plain", "MMIO write (0xe0000000)", "user"),
    Kind("mmio_read", 4, "plain", "MMIO read (0xe0000000)", "user"),
    Kind("hlt", HLT_KIND, "plain", "HLT (no irqchip)", "user"),
    Kind("cpuid", 5, "plain", "CPUID (kernel-handled)", "kernel"),
    Kind("coalesced_pio", 1, "coalesced_pio", "coalesced PIO out", "kernel"),
    Kind("coalesced_mmio", 3, "coalesced_mmio", "coalesced MMIO write", "kernel"),
    Kind("ioeventfd_pio", 1, "ioeventfd_pio", "ioeventfd PIO out", "kernel"),
    Kind("ioeventfd_mmio", 3, "ioeventfd_mmio", "ioeventfd MMIO write", "kernel"),
]
KIND_BY_NAME = {k.name: k for k in KINDS}

#: Kinds QEMU runs (the bench32 multiboot guest cannot HLT; QEMU's coalesced
#: and ioeventfd zones are not the guest's to choose).
QEMU_KINDS = ("pio_out", "pio_in", "mmio_write", "mmio_read", "cpuid")

PATHS = ("raw_c", "c_loop", "machine", "bare", "qemu")
PATH_TITLES = {
    "raw_c": "raw C",
    "c_loop": "pykvm C loop",
    "machine": "Machine + Python handler",
    "bare": "bare vcpu.run()",
    "qemu": "QEMU microvm",
}

#: Which kinds each guest runs: bench32 only serves the comparison with QEMU.
GUEST_KINDS = {
    "bench64": [k.name for k in KINDS],
    "bench64u": [k.name for k in KINDS],
    "bench32": list(QEMU_KINDS),
}


@dataclass
class Config:
    """How much to measure."""

    guests: tuple[str, ...] = ("bench64", "bench64u", "bench32")
    reps: int = 21
    n_cpl0: int = 10000
    n_cpl3: int = 4000
    n_qemu: int = 30000
    kernel_factor: int = 2
    qemu: bool = True
    quick: bool = False

    @classmethod
    def quick_config(cls) -> Config:
        return cls(reps=5, n_cpl0=2000, n_cpl3=1000, n_qemu=10000, kernel_factor=4, quick=True)

    def n_for(self, guest: BenchGuest, kind: Kind | None = None) -> int:
        """N of a guest's runs.  Exits handled in the kernel are cheap: ``kernel_factor``
        x N, so that they stand out of the run's fixed costs.  HLT runs a tenth of N:
        ``Machine.run()`` returns on every HLT and costs ~0.3 ms per call."""
        n = self.n_cpl3 if guest.cpl == 3 else self.n_cpl0
        if kind is not None and kind.number == HLT_KIND:
            return max(n // 10, 100)
        if kind is not None and kind.handled_in == "kernel":
            return n * self.kernel_factor
        return n


def not_applicable(guest: BenchGuest, kind: Kind, path: str, qemu_reason: str | None) -> str | None:
    """Why ``path`` cannot run ``kind`` on ``guest`` (None: it can)."""
    if kind.name == "hlt" and guest.cpl == 3:
        return "HLT is privileged: at CPL 3 it raises #GP (bench64u does not implement kind 6)"
    if path == "qemu":
        if guest.name != "bench32":
            return "QEMU boots only the multiboot guest bench32 (32-bit protected mode): see the bench32 rows"
        if kind.name not in QEMU_KINDS:
            return "not measured under QEMU"
        return qemu_reason
    return None


# ---------------------------------------------------------------------------
# Runners: one per path, built for one guest and one kind, run many times.
# ---------------------------------------------------------------------------


class _Counter:
    """A Python device for the ``machine`` path: answers zeros, counts accesses."""

    name = "bench"

    def __init__(self) -> None:
        self.count = 0

    def read(self, offset: int, size: int) -> bytes:
        self.count += 1
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        self.count += 1


class _RingDrainer:
    """A device behind a coalesced zone: it sees only the ring-full exits and empties the ring."""

    name = "bench-ring"

    def __init__(self, vcpu) -> None:
        self.vcpu = vcpu
        self.count = 0

    def read(self, offset: int, size: int) -> bytes:
        return bytes(size)

    def write(self, offset: int, data: bytes) -> None:
        self.count += 1 + len(self.vcpu.drain_coalesced())


def _variant_target(variant: str) -> tuple[int, int, bool]:
    """(address, length, is_pio) of the zone a coalesced/ioeventfd variant registers."""
    if variant.endswith("_pio"):
        return PORT, 1, True
    return MMIO_ADDR, 4, False


class Runner:
    """Runs one guest kind on one path: ``run(number, n)`` returns wall nanoseconds."""

    path = ""

    def run(self, number: int, n: int) -> int:
        raise NotImplementedError

    def close(self) -> None:
        pass


class RawRunner(Runner):
    """The raw-C reference (a ``rawbench serve`` process)."""

    path = "raw_c"

    def __init__(self, raw, guest: BenchGuest, kind: Kind) -> None:
        from pykvm import guests

        self.raw, self.kind = raw, kind
        raw.setup(guest.mode, guests.path(guest.name), kind.variant)

    def run(self, number: int, n: int) -> int:
        r = self.raw.run(number, n)
        if r["rax"] != n:
            raise BenchError(f"raw C: the guest reported {r['rax']} iterations, expected {n}")
        variant = self.kind.variant
        done = {
            "plain": r["io_exits"] + r["mmio_exits"] + max(r["hlt_exits"] - 1, 0),  # the last HLT ends the run
            "coalesced_pio": r["io_exits"] + r["coalesced"],
            "coalesced_mmio": r["mmio_exits"] + r["coalesced"],
            "ioeventfd_pio": r["eventfd"],
            "ioeventfd_mmio": r["eventfd"],
        }[variant]
        if number not in (0, 5) and done != n:
            raise BenchError(f"raw C: {done} accesses reached the host, expected {n} ({r})")
        return int(r["ns"])


class _VariantMixin:
    """Register a kind's coalesced zone or ioeventfd on a VM; check the count after a run."""

    efd: int | None = None
    drainer: _RingDrainer | None = None

    def _register_variant(self, vm, vcpu, variant: str) -> None:
        if variant == "plain":
            return
        addr, length, pio = _variant_target(variant)
        if variant.startswith("coalesced"):
            vm.register_coalesced_mmio(addr, length, pio=pio)
            self.drainer = _RingDrainer(vcpu)
        else:
            self.efd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
            vm.ioeventfd(self.efd, addr, length, pio=pio)

    def _variant_count(self) -> int | None:
        """Accesses that went through the zone since the last call (None for plain kinds)."""
        if self.efd is not None:
            try:
                return os.eventfd_read(self.efd)
            except BlockingIOError:
                return 0
        if self.drainer is not None:
            count = self.drainer.count + len(self.drainer.vcpu.drain_coalesced())
            self.drainer.count = 0
            return count
        return None

    def _close_variant(self) -> None:
        if self.efd is not None:
            os.close(self.efd)
            self.efd = None


class MachineRunner(Runner, _VariantMixin):
    """pykvm's ``Machine``: ``c_loop=True`` with a fast range, or ``c_loop=False`` with a Python device."""

    def __init__(self, guest: BenchGuest, kind: Kind, c_loop: bool) -> None:
        from pykvm.platform.machine import Machine
        from pykvm.platform.cloop import MMIO, PIO, READ_CONST, WRITE_DROP, FastRange

        self.path = "c_loop" if c_loop else "machine"
        self.guest, self.kind, self.c_loop = guest, kind, c_loop
        self.m = m = Machine(memory=EXIT_MEMORY, c_loop=c_loop)
        self.device: _Counter | None = None
        try:
            self._register_variant(m.vm, m.vcpu, kind.variant)
            if self.drainer is not None:
                addr, length, pio = _variant_target(kind.variant)
                where = {"port": addr} if pio else {"mmio": addr}
                m.add_device(self.drainer, length=length, name="bench-ring", **where)
            elif kind.variant == "plain" and c_loop:
                m.extra_fast_ranges.append(FastRange(PIO, PORT, 1, READ_CONST, WRITE_DROP, 0, "bench-pio"))
                m.extra_fast_ranges.append(FastRange(MMIO, MMIO_ADDR, 4, READ_CONST, WRITE_DROP, 0, "bench-mmio"))
            elif kind.variant == "plain":
                self.device = _Counter()
                m.add_device(self.device, port=PORT, length=1, name="bench-pio")
                m.add_device(self.device, mmio=MMIO_ADDR, length=4, name="bench-mmio")
        except BaseException:
            self.close()
            raise

    def _c_hits(self) -> int:
        hits = self.m.loop.cloop.hits()
        return hits.get("bench-pio", 0) + hits.get("bench-mmio", 0)

    def run(self, number: int, n: int) -> int:
        m = self.m
        m.load_guest(self.guest.name, args=(number, n))
        hits0 = self._c_hits()
        count0 = self.device.count if self.device is not None else 0
        if self.kind.number == HLT_KIND:
            # The HLT kind and its empty baseline both go through the HLT
            # resume loop, so the baseline holds the same fixed costs.
            ns = self._run_halts(number, n)
        else:
            t0 = time.perf_counter_ns()
            result = m.run(timeout=RUN_TIMEOUT)
            ns = time.perf_counter_ns() - t0
            if not result.clean or result.regs["rax"] != n:
                raise BenchError(
                    f"{self.path}: {self.guest.name} kind {number} ended {result.ended!r} with RAX "
                    f"{result.regs['rax']} (expected {n}): {result.message}"
                )
        # Check that the exits really took the path being measured.
        if self.kind.variant == "plain" and number in (1, 2, 3, 4):
            handled = self._c_hits() - hits0 if self.c_loop else self.device.count - count0
            if handled != n:
                raise BenchError(f"{self.path}: {handled} accesses handled on this path, expected {n}")
        via_zone = self._variant_count()
        if via_zone is not None and number != 0 and via_zone != n:
            raise BenchError(f"{self.path}: {via_zone} accesses went through the {self.kind.variant} zone, expected {n}")
        return ns

    def _run_halts(self, number: int, n: int) -> int:
        """Run to the final HLT, resuming after every other one (N + 1 HLT exits for kind 6, 1 for kind 0)."""
        m = self.m
        halts = n + 1 if number == HLT_KIND else 1
        if self.c_loop:
            # The C loop has no HLT action: each HLT comes back from
            # loop.run() and this minimal Python loop re-enters it.
            from pykvm._native_loader import lib
            from pykvm.platform.cloop import RET_CODE_MASK, RET_EXIT

            loop, run = m.loop.cloop, m.vcpu.kvm_run
            loop.set_ranges(m.fast_ranges())
            hlt_reason = lib.KVM_EXIT_HLT
            t0 = time.perf_counter_ns()
            for _ in range(halts):
                ret = loop.run()
                if ret & RET_CODE_MASK != RET_EXIT or run.exit_reason != hlt_reason:
                    raise BenchError(f"c_loop: unexpected return {ret:#x}, exit reason {run.exit_reason}")
            ns = time.perf_counter_ns() - t0
            loop.clear_pending()
            rax = m.vcpu.get_regs().rax
        else:
            # Machine.run() returns on every HLT: call it again until the last one.
            t0 = time.perf_counter_ns()
            for _ in range(halts):
                result = m.run()
                if result.ended != "hlt":
                    raise BenchError(f"machine: HLT run ended {result.ended!r}: {result.message}")
            ns = time.perf_counter_ns() - t0
            rax = result.regs["rax"]
        if rax != n:
            raise BenchError(f"{self.path}: final HLT with RAX {rax}, expected {n}")
        return ns

    def close(self) -> None:
        self._close_variant()
        self.m.close()


class BareRunner(Runner, _VariantMixin):
    """The raw layer only: Kvm -> Vm -> Vcpu and a Python loop over ``vcpu.run()``."""

    path = "bare"

    def __init__(self, guest: BenchGuest, kind: Kind) -> None:
        from pykvm import guests
        from pykvm.memory import GuestMemory
        from pykvm.system import Kvm

        self.guest, self.kind = guest, kind
        self.image = guests.path(guest.name).read_bytes()
        self.kvm = Kvm()
        self.vm = self.vcpu = self.memory = None
        try:
            self.vm = self.kvm.create_vm()
            self.memory = GuestMemory(self.vm)
            self.memory.add_region(0, EXIT_MEMORY)
            self.vcpu = self.vm.create_vcpu(0)
            self.vcpu.set_cpuid2(self.kvm.supported_cpuid())
            self._register_variant(self.vm, self.vcpu, kind.variant)
        except BaseException:
            self.close()
            raise

    def run(self, number: int, n: int) -> int:
        from pykvm import exits
        from pykvm.platform import layout
        from pykvm.platform.cpu_tables import GUEST_TABLES
        from pykvm.x86.modes import setup_mode

        vcpu, memory = self.vcpu, self.memory
        memory.write(layout.LOAD_ADDR, self.image)
        setup_mode(self.guest.mode, vcpu, memory, entry=layout.LOAD_ADDR, args=(number, n), tables=GUEST_TABLES)
        drain = vcpu.drain_coalesced if self.drainer is not None else None
        IoOut, IoIn, MmioWrite, MmioRead, Hlt = exits.IoOut, exits.IoIn, exits.MmioWrite, exits.MmioRead, exits.Hlt
        run = vcpu.run
        hlt_resumes = n if number == HLT_KIND else 0
        halts = handled = drained = 0
        t0 = time.perf_counter_ns()
        while True:
            e = run()
            t = type(e)
            if t is IoOut:
                if e.port == PORT:
                    handled += 1
                    if drain is not None:
                        drained += len(drain())
                    continue
                if e.port == 0x64:  # the i8042 reset that ends a CPL-3 guest
                    break
            elif t is IoIn:
                vcpu.complete_io_in(bytes(e.size * e.count))
                handled += 1
                continue
            elif t is MmioWrite:
                handled += 1
                if drain is not None:
                    drained += len(drain())
                continue
            elif t is MmioRead:
                vcpu.complete_mmio_read(bytes(e.size))
                handled += 1
                continue
            elif t is Hlt:
                halts += 1
                if halts <= hlt_resumes:
                    continue
                break
            raise BenchError(f"bare: unexpected exit {e}")
        ns = time.perf_counter_ns() - t0
        rax = vcpu.get_regs().rax
        if rax != n:
            raise BenchError(f"bare: {self.guest.name} kind {number} ended with RAX {rax}, expected {n}")
        zone = self._variant_count()
        if zone is not None and number != 0:
            total = zone + drained + (handled if self.drainer is not None else 0)
            if total != n:
                raise BenchError(f"bare: {total} accesses seen through the {self.kind.variant} zone, expected {n}")
        elif self.kind.variant == "plain" and number in (1, 2, 3, 4) and handled != n:
            raise BenchError(f"bare: {handled} exits handled, expected {n}")
        return ns

    def close(self) -> None:
        self._close_variant()
        for obj in (self.vcpu, self.memory, self.vm, self.kvm):
            if obj is not None:
                obj.close()


# ---------------------------------------------------------------------------
# The measurement
# ---------------------------------------------------------------------------


@dataclass
class Samples:
    """Wall times of the runs of one (guest, kind, path) and of its empty-loop runs (same N)."""

    n: int
    ns: list[int] = field(default_factory=list)
    empty_ns: list[int] = field(default_factory=list)


def _make_runner(path: str, raw, guest: BenchGuest, kind: Kind) -> Runner:
    if path == "raw_c":
        return RawRunner(raw, guest, kind)
    if path == "c_loop":
        return MachineRunner(guest, kind, c_loop=True)
    if path == "machine":
        return MachineRunner(guest, kind, c_loop=False)
    if path == "bare":
        return BareRunner(guest, kind)
    raise ValueError(path)


def plan_units(config: Config) -> int:
    """How many progress units :func:`measure` will report."""
    units = 0
    for name in config.guests:
        units += len(GUEST_KINDS[name]) * (config.reps + 1)
        if name == "bench32" and config.qemu:
            units += (len(QEMU_KINDS) + 1) * config.reps
    return units


def measure(config: Config, progress: Callable[[str], None] = lambda label: None) -> dict:
    """Run the whole exit-latency matrix; return the ``exit_latency`` section of the results."""
    from pykvm.bench import qemu
    from pykvm.bench.raw import RawBench

    local_paths = ("raw_c", "c_loop", "machine", "bare")
    qemu_info = qemu.probe() if config.qemu else {"available": False, "reason": "disabled (--no-qemu)"}
    qemu_reason = None if qemu_info["available"] else f"QEMU unavailable: {qemu_info['reason']}"
    samples: dict[tuple[str, str, str], Samples] = {}
    with RawBench() as raw:
        for gname in config.guests:
            guest = BENCH_GUESTS[gname]
            for kname in GUEST_KINDS[gname]:
                kind = KIND_BY_NAME[kname]
                paths = [p for p in local_paths if not_applicable(guest, kind, p, qemu_reason) is None]
                if paths:
                    n = config.n_for(guest, kind)
                    _measure_kind(raw, guest, kind, paths, n, config.reps, samples, progress)
                else:
                    for _ in range(config.reps + 1):
                        progress(f"{gname} {kname} (n/a)")
            if gname == "bench32" and qemu_reason is None:
                qkinds = [EMPTY] + [KIND_BY_NAME[k] for k in QEMU_KINDS]
                try:
                    runs = qemu.exit_runs(qemu_info, qkinds, config.n_qemu, config.reps, progress)
                except (BenchError, OSError, subprocess.SubprocessError) as exc:
                    qemu_reason = f"QEMU failed: {exc}"
                    qemu_info = {**qemu_info, "available": False, "reason": str(exc)}
                    continue
                for kname in QEMU_KINDS:
                    samples[(gname, kname, "qemu")] = Samples(config.n_qemu, runs[kname], runs["empty"])
    rows = []
    for gname in config.guests:
        guest = BENCH_GUESTS[gname]
        for kname in GUEST_KINDS[gname]:
            kind = KIND_BY_NAME[kname]
            raw_row: dict = {}
            for path in PATHS:
                row = _row(guest, kind, path, samples, qemu_reason)
                if path == "raw_c":
                    raw_row = row
                add_ratios(row, raw_row)
                rows.append(row)
    return {
        "unit": "us",
        "method": (
            "per_exit_us = (median of the runs of kind - median of the empty-loop runs, same path, same VM, "
            "same N, interleaved) / N / 1000; ratio = per_exit_us / raw C per_exit_us of the same guest and kind"
        ),
        "reps": config.reps,
        "guests": [
            {"name": g, "mode": BENCH_GUESTS[g].mode, "cpl": BENCH_GUESTS[g].cpl, "kinds": GUEST_KINDS[g],
             "n": config.n_for(BENCH_GUESTS[g]), "description": BENCH_GUESTS[g].description}
            for g in config.guests
        ],
        "kinds": [{"name": k.name, "guest_kind": k.number, "variant": k.variant, "title": k.title,
                   "handled_in": k.handled_in} for k in KINDS],
        "paths": [{"name": p, "title": PATH_TITLES[p]} for p in PATHS],
        "qemu": qemu_info,
        "rows": rows,
    }


def _measure_kind(raw, guest: BenchGuest, kind: Kind, paths: list[str], n: int, reps: int,
                  samples: dict, progress: Callable[[str], None]) -> None:
    """Build a runner per path; warm each up; then ``reps`` rounds of (kind, empty) on every path in turn."""
    runners: list[Runner] = []
    try:
        for path in paths:
            runners.append(_make_runner(path, raw, guest, kind))
        for runner in runners:
            # The first runs of a fresh VM pay for faulting in its memory.
            runner.run(kind.number, max(n // 5, 50))
            runner.run(0, max(n // 5, 50))
        progress(f"{guest.name} {kind.name} warm-up")
        for rep in range(reps):
            shift = rep % len(runners)
            for runner in runners[shift:] + runners[:shift]:
                got = samples.setdefault((guest.name, kind.name, runner.path), Samples(n))
                pair = ((kind.number, got.ns), (0, got.empty_ns))
                for number, into in (pair if rep % 2 == 0 else pair[::-1]):
                    into.append(runner.run(number, n))
            progress(f"{guest.name} {kind.name} rep {rep + 1}/{reps}")
    finally:
        for runner in runners:
            runner.close()


def add_ratios(row: dict, raw_row: dict) -> None:
    """Set ``ratio`` (medians) and ``best_ratio`` (fastest runs) of ``row`` against the raw-C row."""
    if row["status"] != "ok":
        return
    raw_us = raw_row.get("per_exit_us") if raw_row.get("status") == "ok" else None
    row["raw_c_us"] = raw_us
    row["ratio"] = row["per_exit_us"] / raw_us if raw_us else None
    raw_best, best = raw_row.get("best_per_exit_us"), row.get("best_per_exit_us")
    if raw_us and raw_best and best:
        row["best_ratio"] = best / raw_best


def _row(guest: BenchGuest, kind: Kind, path: str, samples: dict, qemu_reason: str | None) -> dict:
    row = {"guest": guest.name, "mode": guest.mode, "cpl": guest.cpl, "kind": kind.name, "path": path}
    reason = not_applicable(guest, kind, path, qemu_reason)
    if reason is not None:
        return {**row, "status": "n/a", "reason": reason}
    got = samples.get((guest.name, kind.name, path))
    if got is None or not got.ns or not got.empty_ns:
        return {**row, "status": "n/a", "reason": "not measured"}
    kind_ns, empty_ns = ensure_median(got.ns), ensure_median(got.empty_ns)
    per_exit_us = (kind_ns - empty_ns) / got.n / 1000.0
    row.update(n=got.n, runs=len(got.ns), kind_ns=got.ns, empty_ns=got.empty_ns,
               median_kind_ns=kind_ns, median_empty_ns=empty_ns)
    # The same from the fastest runs: host interference only ever adds time.
    best = (min(got.ns) - min(got.empty_ns)) / got.n / 1000.0
    if best > 0:
        row["best_per_exit_us"] = best
    if per_exit_us <= 0:
        return {**row, "status": "n/a",
                "reason": f"below the noise: median run {kind_ns:.0f} ns is not above the empty loop's {empty_ns:.0f} ns"}
    return {**row, "status": "ok", "per_exit_us": per_exit_us}


def main(argv: list[str] | None = None) -> int:
    """``python -m pykvm.bench.exit_latency [--quick] [pykvm bench options]``: this benchmark alone."""
    from pykvm.bench import main as bench_main

    argv = list(sys.argv[1:] if argv is None else argv)
    return bench_main(["--only", "exits", "--name", "exit_latency", *argv])


if __name__ == "__main__":
    sys.exit(main())
