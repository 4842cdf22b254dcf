"""Peak resident memory (RSS) of a whole process running a guest.

Each program is started by the small raw-C helper (``rawbench rss``), which
forks it and reads ``wait4``'s rusage of that child (``ru_maxrss``, KiB).
The helper matters: Linux carries a process's RSS high-water mark across
fork and exec, so a child forked straight from the (large) benchmark process
would report at least the benchmark's own size.  Compared:

* pykvm running ``hello64`` with ``Machine(memory="64M")`` (the issue's figure);
* pykvm running ``bench32`` (the guest QEMU can boot: same guest, same 64 MiB);
* QEMU (``-M microvm -m 64M``) booting ``bench32`` as a multiboot kernel;
* the raw-C reference running ``bench32``; and a bare ``python -c pass``
  (the interpreter's own share of pykvm's figure).

Guest RAM is mapped lazily by everyone, so RSS counts the pages a guest
touched plus each program's own code and heap.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from pykvm.bench import qemu
from pykvm.bench.common import BenchError, child_env, ensure_median

_PYKVM_RUN = """
import sys
from pykvm.platform.machine import Machine
name, mode = sys.argv[1], sys.argv[2]
with Machine(memory="64M") as m:
    if name == "bench32":
        m.load_guest(name, args=(0, 1))
    else:
        m.load_guest(name)
    r = m.run(timeout=60)
if r.ended != "hlt":
    sys.exit(f"{name} ended {r.ended}: {r.message}")
"""


def measure(reps: int = 3, progress: Callable[[str], None] = lambda label: None) -> dict:
    """Peak RSS (KiB, median of ``reps`` runs) of each program; the ``memory`` section."""
    from pykvm import guests
    from pykvm.bench.raw import build

    env = child_env()
    programs: dict[str, tuple[list[str], str]] = {
        "pykvm_hello64": ([sys.executable, "-c", _PYKVM_RUN, "hello64", "long"], "pykvm Machine, hello64"),
        "pykvm_bench32": ([sys.executable, "-c", _PYKVM_RUN, "bench32", "protected"], "pykvm Machine, bench32"),
        "raw_c_bench32": (
            [str(build()), "exits", "protected", str(guests.path("bench32")), "plain", "0", "1", "1"],
            "raw C (rawbench), bench32",
        ),
        "python_baseline": ([sys.executable, "-c", "pass"], "python -c pass (interpreter alone)"),
    }
    qemu_info = qemu.probe()
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="pykvm-rss-") as tmp:
        if qemu_info["available"]:
            programs["qemu_bench32"] = (qemu.rss_command(qemu_info, Path(tmp)), f"QEMU -M {qemu_info['machine']}, bench32")
        for key, (cmd, title) in programs.items():
            values = []
            try:
                for _ in range(reps):
                    status, kib = peak_rss_kib(cmd, env=env)
                    expected = 1 if key.startswith("qemu") else 0
                    if status != expected:
                        raise BenchError(f"{title}: exit status {status} (expected {expected})")
                    values.append(kib)
                    progress(f"memory {key}")
            except (BenchError, subprocess.SubprocessError) as exc:
                if not key.startswith("qemu"):
                    raise
                qemu_info = {**qemu_info, "available": False, "reason": f"QEMU failed: {exc}"}
                continue
            results[key] = {"title": title, "peak_rss_kib": ensure_median(values), "runs_kib": values}
    out: dict = {"unit": "KiB", "programs": results, "qemu": qemu_info}
    if "qemu_bench32" in results:
        q = results["qemu_bench32"]["peak_rss_kib"]
        out["ratio_hello64_to_qemu"] = results["pykvm_hello64"]["peak_rss_kib"] / q
        out["ratio_bench32_to_qemu"] = results["pykvm_bench32"]["peak_rss_kib"] / q
    return out


def peak_rss_kib(cmd: list[str], env: dict | None = None, timeout: float = 120.0) -> tuple[int, int]:
    """Run ``cmd`` under ``rawbench rss``; return (exit status, peak RSS in KiB)."""
    from pykvm.bench.raw import build

    proc = subprocess.run([str(build()), "rss", *cmd], capture_output=True, text=True, env=env, timeout=timeout,
                          check=False)
    try:
        report = json.loads(proc.stdout.strip().splitlines()[-1])
    except (IndexError, ValueError):
        raise BenchError(f"rawbench rss {cmd[0]}: no report (status {proc.returncode}): {proc.stderr[-300:]}") from None
    if not report.get("ok") or report["signal"]:
        raise BenchError(f"{cmd[0]} failed: {report} {proc.stderr[-300:]}")
    return report["status"], int(report["maxrss_kib"])


def plan_units(reps: int = 3) -> int:
    return 5 * reps
