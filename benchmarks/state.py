"""Snapshot benchmarks (issue 13): what a save costs per MiB the guest touched, and what a restore saves at start.

Two figures, measured in this run on this host:

* **save and restore per touched MiB**: a 256 MiB machine whose RAM has
  N MiB of non-zero pages (written by the host, pages of a fixed pattern);
  ``Machine.save`` writes them (zero pages are not stored), then
  ``Machine.restore`` builds a machine and loads the file.  Reported: the
  file's bytes per touched MiB, and milliseconds per touched MiB.
* **process start to the guest's first instruction**: ``pykvm run -loadvm
  FILE`` against a fresh boot of the same guest (``pykvm run --guest
  hello64u``), each from spawning the process to its ``loaded`` phase mark
  (``PYKVM_TIMELINE``: the machine built and the kernel -- or the snapshot
  -- in place, the next step is KVM_RUN).  Reported: medians and their ratio.

``python benchmarks/state.py [--quick] [--out FILE.json]``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

MiB = 1 << 20


def save_and_restore(touched_mib: int, directory: str) -> dict:
    from pykvm.platform.machine import Machine

    path = os.path.join(directory, f"touched{touched_mib}.snap")
    with Machine(memory="256M", kernel_stats=False) as m:
        m.load_guest("hello64u")
        pattern = bytes(range(1, 256)) * (MiB // 255 + 1)
        for mib in range(touched_mib):
            m.memory.write((16 + mib) * MiB, pattern[:MiB])  # above the guest's image and pykvm's tables
        info = m.save(path)
    started = time.perf_counter()
    with Machine.restore(path, kernel_stats=False):
        restore_seconds = time.perf_counter() - started
    os.unlink(path)
    return {"touched_mib": touched_mib, "bytes": info["bytes"], "save_ms": info["seconds"] * 1000,
            "restore_ms": restore_seconds * 1000}


def first_instruction_ms(argv: list[str]) -> float:
    """Milliseconds from spawning ``pykvm run argv`` to its ``loaded`` mark."""
    with tempfile.NamedTemporaryFile("r", suffix=".timeline") as marks:
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PYKVM_TIMELINE"] = marks.name
        env["PYTHONPATH"] = ROOT
        spawned = time.monotonic_ns()
        subprocess.run([sys.executable, "-m", "pykvm", "run", *argv, "-serial", "null", "-display", "none"],
                       stdin=subprocess.DEVNULL, capture_output=True, env=env, check=True, timeout=60)
        phases = dict(line.split() for line in open(marks.name) if line.strip())
        return (int(phases["loaded"]) - spawned) / 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repetitions")
    parser.add_argument("--out", help="write the results as JSON to this file")
    args = parser.parse_args()
    sizes = (1, 16) if args.quick else (1, 16, 64, 128)
    reps = 3 if args.quick else 7
    results: dict = {"sizes": []}
    with tempfile.TemporaryDirectory() as directory:
        print(f"{'touched MiB':>11} {'file bytes':>12} {'bytes/MiB':>10} {'save ms':>8} {'ms/MiB':>7} "
              f"{'restore ms':>10} {'ms/MiB':>7}")
        for size in sizes:
            row = save_and_restore(size, directory)
            results["sizes"].append(row)
            print(f"{size:>11} {row['bytes']:>12} {row['bytes'] / size:>10.0f} {row['save_ms']:>8.1f} "
                  f"{row['save_ms'] / size:>7.2f} {row['restore_ms']:>10.1f} {row['restore_ms'] / size:>7.2f}")
        from pykvm.platform.machine import Machine

        snap = os.path.join(directory, "hello64u.snap")
        with Machine(memory="128M", kernel_stats=False) as m:  # pykvm run's default shape
            m.load_guest("hello64u")
            m.save(snap)
        boot = [first_instruction_ms(["--guest", "hello64u"]) for _ in range(reps)]
        restore = [first_instruction_ms(["-loadvm", snap]) for _ in range(reps)]
    results["boot_ms"], results["restore_ms"] = statistics.median(boot), statistics.median(restore)
    results["restore_over_boot"] = results["restore_ms"] / results["boot_ms"]
    print(f"process start -> first guest instruction (median of {reps}): fresh boot {results['boot_ms']:.1f} ms, "
          f"-loadvm {results['restore_ms']:.1f} ms, ratio {results['restore_over_boot']:.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
