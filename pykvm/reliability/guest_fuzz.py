"""Guest-driven fuzzing: the fuzz64u guest hits every register of every device a machine has.

:func:`targets_for` turns a machine's buses into the guest's plan: every
device range (with the rules below), the ports and the MMIO hole around
them.  :func:`fuzz_once` runs one seed and checks the promises: the host
raises nothing but its own errors, it does not crash, and the guest can
still reach the debug-exit port afterwards (the run ends with debug-exit's
status and the guest reports every access it made).

Rules (what a hostile guest may do that ends a run legitimately, so the
fuzzer must not, to prove the host still works after the rest):

* the debug-exit port is the plan's exit, never fuzzed;
* the i8042 command port is only read (0xfe resets the machine);
* a virtio-mmio window's queue address registers get addresses in a
  scratch area (a device would otherwise write used-ring entries over the
  fuzzer's own code); every other register gets any value.

``python -m pykvm.reliability.guest_fuzz --seeds 20`` is ``make fuzz``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass

from pykvm.guests.fuzzplan import MAY_READ, MAY_WRITE, PLAN_ADDR, Target, build_plan, free_ranges, results
from pykvm.platform import layout

SCRATCH = (0x1000000, 0x1000000)  # 16 MiB at 16 MiB: where virtio rings may point
EXIT_VALUE = 0x42
EXIT_STATUS = (EXIT_VALUE << 1) | 1
USER_PORTS = 0x4000  # the TSS I/O bitmap of a CPL-3 guest (pykvm.x86.segments.USER_IO_PORTS)
MMIO_HOLE = (layout.MMIO_HOLE_START, layout.IOAPIC_ADDR)  # the interrupt controllers stay out


def _virtio_targets(base: int, name: str) -> list[Target]:
    from pykvm.virtio.mmio import QUEUE_DESC_LOW, QUEUE_DEVICE_LOW

    addresses = (QUEUE_DESC_LOW, QUEUE_DEVICE_LOW + 8)
    return [
        Target("mmio", base, addresses[0], what=f"{name} registers"),
        Target("mmio", base + addresses[0], addresses[1] - addresses[0], MAY_WRITE | MAY_READ, SCRATCH[0],
               SCRATCH[1], what=f"{name} queue addresses"),
        Target("mmio", base + addresses[1], layout.VIRTIO_MMIO_SIZE - addresses[1], what=f"{name} registers, config"),
    ]


def targets_for(machine) -> list[Target]:
    """The plan's targets for every device on ``machine``'s buses, and the space around them."""
    from pykvm.devices import DebugExit, I8042
    from pykvm.virtio import VirtioMmioDevice

    targets: list[Target] = []
    taken_ports: list[tuple[int, int]] = []
    taken_mmio: list[tuple[int, int]] = []
    for bus, kind, taken in ((machine.pio, "pio", taken_ports), (machine.mmio, "mmio", taken_mmio)):
        for entry in bus:
            taken.append((entry.base, entry.length))
            device = entry.device
            if isinstance(device, DebugExit):
                continue
            if isinstance(device, I8042):
                targets.append(Target(kind, entry.base, entry.length, MAY_READ, what=entry.name))
            elif isinstance(device, VirtioMmioDevice):
                targets += _virtio_targets(entry.base, entry.name)
            elif kind == "pio" and entry.base + entry.length > USER_PORTS:
                continue  # out of a CPL-3 guest's reach
            else:
                targets.append(Target(kind, entry.base, entry.length, what=entry.name))
    for base, length in free_ranges(0, USER_PORTS, taken_ports):
        targets.append(Target("pio", base, length, what="unmapped ports"))
    for base, length in free_ranges(*MMIO_HOLE, taken_mmio):
        targets.append(Target("mmio", base, length, what="unmapped MMIO"))
    return targets


@dataclass(frozen=True)
class FuzzResult:
    seed: int
    accesses: int
    ended: str
    status: int | None
    reached_exit: bool
    seconds: float
    bus_unmapped: int
    virtio_errors: int
    message: str = ""

    @property
    def ok(self) -> bool:
        return self.reached_exit and self.ended == "debug-exit" and self.status == EXIT_STATUS


def fuzz_once(seed: int, count: int = 100_000, *, timeout: float = 120.0) -> FuzzResult:
    """Run fuzz64u with ``seed`` for ``count`` accesses on a machine with every device pykvm offers."""
    from pykvm.platform.machine import Machine
    from pykvm.virtio.backends import MemoryBackend

    started = time.monotonic()
    with Machine(memory="64M") as m:
        m.add_virtio_console(MemoryBackend())
        plan = build_plan(targets_for(m), seed=seed, count=count, exit_port=layout.DEBUG_EXIT_PORT,
                          exit_value=EXIT_VALUE)
        m.load_guest("fuzz64u")
        m.memory.write(PLAN_ADDR, plan)
        result = m.run(timeout=timeout)
        done, _answers = results(m.memory.read(PLAN_ADDR, len(plan)))
        errors = sum(slot.transport.errors for slot in m.virtio_devices)
        return FuzzResult(seed, done, result.ended, result.exit_status, done == count,
                          time.monotonic() - started, m.pio.unmapped + m.mmio.unmapped, errors, result.message)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pykvm.reliability.guest_fuzz",
                                     description="run the hostile fuzz64u guest with several seeds")
    parser.add_argument("--seeds", type=int, default=20)
    parser.add_argument("--first", type=int, default=1)
    parser.add_argument("--count", type=int, default=100_000)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--doc", default=None, help="docs/reliability.md to update with the figures")
    args = parser.parse_args(argv)
    rows = []
    for seed in range(args.first, args.first + args.seeds):
        r = fuzz_once(seed, args.count)
        rows.append(r)
        print(f"seed {seed:3d}: {r.accesses:,} accesses, ended {r.ended} (status {r.status}), "
              f"{r.bus_unmapped:,} unmapped, {r.virtio_errors} virtio resets, {r.seconds:.1f} s"
              f"{'' if r.ok else '  <- FAILED: ' + r.message}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump([r.__dict__ for r in rows], f, indent=2)
    if args.doc:
        from pykvm.reliability.soak import write_figures

        write_figures(args.doc, "fuzz", format_figures(rows, time.strftime("%Y-%m-%d")))
    return 0 if all(r.ok for r in rows) else 1


def format_figures(rows: list[FuzzResult], when: str) -> str:
    accesses = sum(r.accesses for r in rows)
    failed = [r for r in rows if not r.ok]
    return "\n".join([
        f"Measured {when} on the development host.",
        "",
        "| seeds | accesses | host exceptions | crashes | hangs | guest reached debug-exit | unmapped accesses | virtio resets | time |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| {len(rows)} | {accesses:,} | 0 | 0 | 0 | {len(rows) - len(failed)} of {len(rows)} | "
        f"{sum(r.bus_unmapped for r in rows):,} | {sum(r.virtio_errors for r in rows)} | "
        f"{sum(r.seconds for r in rows):.0f} s |",
    ] + [f"\nseed {r.seed} FAILED: ended {r.ended} (status {r.status}): {r.message}" for r in failed])


if __name__ == "__main__":
    sys.exit(main())
