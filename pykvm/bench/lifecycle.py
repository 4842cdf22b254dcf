"""VM lifecycle: open -> create VM -> map memory -> create vCPU -> run to HLT -> close.

Each step is timed separately, for pykvm's raw layer (``Kvm``, ``Vm``,
``GuestMemory``, ``Vcpu``, ``setup_mode``, ``vcpu.run()``) and for the raw-C
reference doing the same work with bare ioctls, runs interleaved; pykvm's
``Machine`` (constructor, ``load_guest``, ``run``, ``close``) is timed as a
whole beside them.  The guest is ``bench64`` with N = 1: the host sets up
long mode (GDT, TSS, 4 GiB identity map with 2 MiB pages), the guest enters
and halts.  One more configuration, ``2M-protected``, runs ``bench32`` in
32-bit protected mode, which needs no page tables.

"create vCPU" includes what makes the vCPU runnable: KVM_CREATE_VCPU, the
kvm_run mapping, KVM_SET_CPUID2, loading the image and the CPU-mode setup
(tables in guest memory, KVM_SET_SREGS, KVM_SET_REGS).

VMs per second: 1 and 2 worker processes each run whole lifecycles back to
back for a fixed time, all starting at the same CLOCK_MONOTONIC instant;
the rate is the VMs completed over the wall time from that start to the last
worker's end.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from pykvm.bench.common import BenchError, child_env, ensure_median

STEPS = ("open", "create_vm", "map_memory", "create_vcpu", "run", "close")
MACHINE_STEPS = ("create", "load_guest", "run", "close")
SIZES = {"2M": 2 << 20, "64M": 64 << 20, "1G": 1 << 30}
GUEST, MODE = "bench64", "long"
#: The measured configurations: label -> (memory bytes, guest, CPU mode).  The
#: last one runs bench32 in 32-bit protected mode, which needs no page
#: tables: it shows how much of the long-mode figure is building them.
CONFIGS = {
    "2M": (SIZES["2M"], GUEST, MODE),
    "64M": (SIZES["64M"], GUEST, MODE),
    "1G": (SIZES["1G"], GUEST, MODE),
    "2M-protected": (SIZES["2M"], "bench32", "protected"),
}


@dataclass
class Config:
    reps: int = 20
    sizes: tuple[str, ...] = tuple(CONFIGS)
    rate_seconds: float = 3.0
    workers: tuple[int, ...] = (1, 2)
    quick: bool = False

    @classmethod
    def quick_config(cls) -> Config:
        return cls(reps=5, rate_seconds=1.0, quick=True)


def _now() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def pykvm_once(image: bytes, mem: int, mode: str = MODE) -> dict[str, int]:
    """One lifecycle through pykvm's raw layer; nanoseconds per step."""
    from pykvm import exits
    from pykvm.memory import GuestMemory
    from pykvm.system import Kvm
    from pykvm.platform import layout
    from pykvm.platform.cpu_tables import GUEST_TABLES
    from pykvm.x86.modes import setup_mode

    t = [_now()]
    kvm = Kvm()
    t.append(_now())
    vm = kvm.create_vm()
    t.append(_now())
    memory = GuestMemory(vm)
    memory.add_region(0, mem)
    t.append(_now())
    vcpu = vm.create_vcpu(0)
    vcpu.set_cpuid2(kvm.supported_cpuid())
    memory.write(layout.LOAD_ADDR, image)
    setup_mode(mode, vcpu, memory, entry=layout.LOAD_ADDR, args=(0, 1), tables=GUEST_TABLES)
    t.append(_now())
    while True:
        exit = vcpu.run()
        if type(exit) is exits.Hlt:
            break
        if type(exit) is not exits.Interrupted:
            raise BenchError(f"lifecycle: unexpected exit {exit}")
    t.append(_now())
    rax = vcpu.get_regs().rax
    vcpu.close()
    memory.close()
    vm.close()
    kvm.close()
    t.append(_now())
    if rax != 1:
        raise BenchError(f"lifecycle: the guest returned {rax}, expected 1")
    return {step: t[i + 1] - t[i] for i, step in enumerate(STEPS)}


def machine_once(mem: int, guest: str = GUEST) -> dict[str, int]:
    """One lifecycle through ``Machine``; nanoseconds per step."""
    from pykvm.platform.machine import Machine

    t0 = _now()
    m = Machine(memory=mem)
    t1 = _now()
    try:
        m.load_guest(guest, args=(0, 1))
        t2 = _now()
        result = m.run(timeout=30)
        t3 = _now()
    finally:
        m.close()
    t4 = _now()
    if result.ended != "hlt" or result.regs["rax"] != 1:
        raise BenchError(f"lifecycle (Machine): ended {result.ended} with RAX {result.regs['rax']}")
    return {"create": t1 - t0, "load_guest": t2 - t1, "run": t3 - t2, "close": t4 - t3}


def plan_units(config: Config) -> int:
    return len(config.sizes) * config.reps + 2 * len(config.workers)


def measure(config: Config, progress: Callable[[str], None] = lambda label: None) -> dict:
    """The ``lifecycle`` section: per-step medians (ms) at each size, and VMs/s."""
    from pykvm import guests
    from pykvm.bench.raw import RawBench

    sizes = {}
    with RawBench() as raw:
        # Warm-up: imports, TSC calibration, the kernel's first-VM costs.
        raw.lifecycle(MODE, guests.path(GUEST), SIZES["2M"], 1)
        pykvm_once(guests.path(GUEST).read_bytes(), SIZES["2M"])
        machine_once(SIZES["2M"])
        for label in config.sizes:
            mem, guest, mode = CONFIGS[label]
            image_path = guests.path(guest)
            image = image_path.read_bytes()
            raw_steps = {s: [] for s in STEPS}
            py_steps = {s: [] for s in STEPS}
            m_steps = {s: [] for s in MACHINE_STEPS}
            for rep in range(config.reps):
                for s, v in raw.lifecycle(mode, image_path, mem, 1).items():
                    raw_steps[s].extend(v)
                for s, v in pykvm_once(image, mem, mode).items():
                    py_steps[s].append(v)
                for s, v in machine_once(mem, guest).items():
                    m_steps[s].append(v)
                progress(f"lifecycle {label} rep {rep + 1}/{config.reps}")
            sizes[label] = {"guest": guest, "mode": mode, **_summarize(mem, raw_steps, py_steps, m_steps)}
    rates = []
    for impl in ("raw_c", "pykvm"):
        for workers in config.workers:
            rates.append(vms_per_second(impl, workers, config.rate_seconds))
            progress(f"lifecycle rate {impl} x{workers}")
    return {
        "unit": "ms",
        "guest": GUEST,
        "mode": MODE,
        "note": "2M-protected: bench32 in 32-bit protected mode (no page tables to build)",
        "reps": config.reps,
        "steps": list(STEPS),
        "machine_steps": list(MACHINE_STEPS),
        "sizes": sizes,
        "rates": rates,
    }


def _ms(values: list[int]) -> float:
    return ensure_median(values) / 1e6


def _summarize(mem: int, raw_steps: dict, py_steps: dict, m_steps: dict) -> dict:
    raw_total = [sum(vals) for vals in zip(*raw_steps.values())]
    py_total = [sum(vals) for vals in zip(*py_steps.values())]
    m_total = [sum(vals) for vals in zip(*m_steps.values())]
    steps = {}
    for s in STEPS:
        r, p = _ms(raw_steps[s]), _ms(py_steps[s])
        steps[s] = {"raw_c_ms": r, "pykvm_ms": p, "ratio": p / r}
    r, p, m = _ms(raw_total), _ms(py_total), _ms(m_total)
    return {
        "bytes": mem,
        "steps": steps,
        "total": {"raw_c_ms": r, "pykvm_ms": p, "ratio": p / r, "machine_ms": m, "machine_ratio": m / r},
        "machine_steps": {s: _ms(v) for s, v in m_steps.items()},
        "samples_ns": {"raw_c": raw_steps, "pykvm": py_steps, "machine": m_steps},
    }


def vms_per_second(impl: str, workers: int, seconds: float, mem: int = SIZES["2M"]) -> dict:
    """Run ``workers`` processes of whole lifecycles for ``seconds``; VMs per second overall.

    Each worker warms up, says ``ready``, and waits for a common start time
    sent on its stdin, so process start-up and imports are not counted.
    """
    from pykvm import guests
    from pykvm.bench.raw import build

    duration = int(seconds * 1e9)
    if impl == "raw_c":
        cmd = [str(build()), "lifecycle-loop", MODE, str(guests.path(GUEST)), str(mem), str(duration)]
    else:
        cmd = [sys.executable, "-m", "pykvm.bench.lifecycle", "--worker", "--mem", str(mem),
               "--duration-ns", str(duration)]
    procs = [subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=child_env())
             for _ in range(workers)]
    try:
        for proc in procs:
            line = proc.stdout.readline().strip()
            if line != "ready":
                raise BenchError(f"lifecycle worker ({impl}) did not start: {line or proc.wait()}")
        start = _now() + int(20e6)
        for proc in procs:
            proc.stdin.write(f"{start}\n")
            proc.stdin.flush()
        reports = []
        for proc in procs:
            out, _ = proc.communicate(timeout=seconds + 60)
            if proc.returncode != 0:
                raise BenchError(f"lifecycle worker ({impl}) failed with status {proc.returncode}: {out.strip()[-300:]}")
            reports.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    count = sum(r["count"] for r in reports)
    wall = max(r["end_ns"] for r in reports) - min(r["start_ns"] for r in reports)
    return {"impl": impl, "workers": workers, "vms": count, "seconds": wall / 1e9, "vms_per_second": count / (wall / 1e9)}


def _worker(mem: int, duration: int) -> int:
    """One VMs/s worker (``Machine`` lifecycles): see :func:`vms_per_second`."""
    machine_once(mem)  # warm-up: imports and TSC calibration
    print("ready", flush=True)
    start = int(sys.stdin.readline())
    while (delay := start - _now()) > 0:
        time.sleep(delay / 1e9)
    begin = _now()
    count = 0
    while True:
        machine_once(mem)
        count += 1
        end = _now()
        if end - begin >= duration:
            break
    print(json.dumps({"ok": True, "count": count, "start_ns": begin, "end_ns": end}), flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m pykvm.bench.lifecycle [--quick] [pykvm bench options]``: this benchmark alone."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--worker" in argv:  # one VMs/s worker process (see vms_per_second)
        parser = argparse.ArgumentParser(prog="pykvm.bench.lifecycle --worker")
        parser.add_argument("--worker", action="store_true")
        parser.add_argument("--mem", type=int, default=SIZES["2M"])
        parser.add_argument("--duration-ns", type=int, default=int(1e9))
        args = parser.parse_args(argv)
        return _worker(args.mem, args.duration_ns)
    from pykvm.bench import main as bench_main

    return bench_main(["--only", "lifecycle", "--name", "lifecycle", *argv])


if __name__ == "__main__":
    sys.exit(main())
