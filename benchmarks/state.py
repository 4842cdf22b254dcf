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
* **live migration**: a machine in this process migrates (``pykvm.state.migration``,
  pre-copy) to a ``pykvm run -incoming unix:PATH`` process: an idle guest
  (``spin64u``, which writes nothing) and ``pattern64u`` rewriting a buffer of
  1, 4 and 16 MiB as fast as it can at CPL 3 (its dirty rate is its buffer
  per pass).  Reported: rounds, pages and bytes sent, total time and
  downtime (from the pause to the destination's OK).

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


def migration_case(guest: str, args: tuple[int, int], directory: str, warmup: float = 0.3) -> dict:
    """One migration of ``guest`` (running here) to a fresh ``pykvm run -incoming`` process."""
    import threading

    from pykvm.platform.machine import Machine
    from pykvm.state.migration import migrate

    sock = os.path.join(directory, f"mig-{guest}-{args[1]}.sock")
    env = dict(os.environ, PYTHONPATH=ROOT)
    destination = subprocess.Popen([sys.executable, "-m", "pykvm", "run", "-incoming", f"unix:{sock}",
                                    "-serial", "null", "-display", "none", "--timeout", "20"],
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                   env=env)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(sock):  # the destination listens once it has started
            if destination.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the destination did not listen: {destination.stderr.read().decode()}")
            time.sleep(0.01)
        with Machine(memory="64M", kernel_stats=False) as m:
            m.load_guest(guest, args=args)
            runner: list[threading.Thread] = []

            def resume() -> None:
                runner[:] = [threading.Thread(target=m.run, kwargs={"timeout": 60}, daemon=True)]
                runner[0].start()

            def pause() -> bool:
                m.request_stop("paused")
                runner[0].join()
                return True

            resume()
            time.sleep(warmup)  # the guest is writing by then (a benchmark's settling time, not a test's)
            status = migrate(m, f"unix:{sock}", pause=pause, resume=resume)
        if status.status != "completed":
            raise RuntimeError(f"migration of {guest} failed: {status.error}")
    finally:
        destination.kill()
        destination.wait()
    mib = args[1] if guest == "pattern64u" else 0
    return {"guest": guest, "dirty_mib": mib, "rounds": status.rounds, "pages": status.pages,
            "bytes": status.bytes, "total_ms": status.total_ms, "downtime_ms": status.downtime_ms}


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
        print(f"{'guest':>11} {'dirty MiB':>9} {'rounds':>6} {'pages':>7} {'MB sent':>8} {'total ms':>9} "
              f"{'downtime ms':>11}")
        results["migration"] = []
        cases = [("spin64u", (0, 0)), ("pattern64u", (0, 1)), ("pattern64u", (0, 4)), ("pattern64u", (0, 16))]
        for guest, guest_args in cases[:2] if args.quick else cases:
            row = migration_case(guest, guest_args, directory)
            results["migration"].append(row)
            print(f"{guest:>11} {row['dirty_mib']:>9} {row['rounds']:>6} {row['pages']:>7} "
                  f"{row['bytes'] / 1e6:>8.1f} {row['total_ms']:>9.0f} {row['downtime_ms']:>11.1f}")
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
