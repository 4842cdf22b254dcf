"""QEMU on the same guest: its user-space exit cost and its memory footprint.

QEMU boots ``bench32`` as a Multiboot kernel (``-kernel``); the guest takes
its kind and N from the PKVMARGS block patched into a copy of the image
(:func:`pykvm.guests.patch_bench_params`) and leaves through
``isa-debug-exit`` (QEMU then exits with status 1).  QEMU's per-exit cost is

    (median wall time with N operations - median wall time of the empty loop of N) / N

so QEMU's start-up and tear-down (tens of milliseconds) cancel out; N is
large enough that their jitter stays small next to the N exits.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

BINARY = "qemu-system-x86_64"
MACHINES = ("microvm", "pc")  # microvm first; pc only if microvm refuses the guest
QEMU_MEMORY = "64M"
START_TIMEOUT = 60.0


def _command(binary: str, machine: str, image: Path) -> list[str]:
    return [
        binary, "-accel", "kvm", "-M", machine, "-m", QEMU_MEMORY,
        "-nodefaults", "-no-user-config", "-nographic",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
        "-kernel", str(image),
    ]


def _patched(kind: int, n: int, directory: Path) -> Path:
    from pykvm import guests

    image = guests.patch_bench_params(guests.path("bench32").read_bytes(), kind, n)
    path = directory / f"bench32-k{kind}-n{n}.bin"
    path.write_bytes(image)
    return path


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout, check=False)


def probe() -> dict:
    """Is QEMU installed and able to boot bench32 with KVM?  Which machine type works?"""
    binary = shutil.which(BINARY)
    if binary is None:
        return {"available": False, "reason": f"{BINARY} is not installed (apt-get install qemu-system-x86)"}
    try:
        version = _run([binary, "--version"], 30).stdout.splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError) as exc:
        return {"available": False, "reason": f"{binary} --version failed: {exc}"}
    errors = []
    with tempfile.TemporaryDirectory(prefix="pykvm-qemu-") as tmp:
        image = _patched(0, 1, Path(tmp))
        for machine in MACHINES:
            cmd = _command(binary, machine, image)
            try:
                proc = _run(cmd, START_TIMEOUT)
            except (OSError, subprocess.SubprocessError) as exc:
                errors.append(f"-M {machine}: {exc}")
                continue
            if proc.returncode == 1:  # isa-debug-exit with value 0: (0 << 1) | 1
                note = "" if machine == "microvm" else f"-M microvm refused the guest ({'; '.join(errors)})"
                return {"available": True, "reason": None, "binary": binary, "version": version,
                        "machine": machine, "command": " ".join(cmd[:-1] + ["IMAGE"]), "note": note}
            errors.append(f"-M {machine}: exit status {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return {"available": False, "reason": "; ".join(errors), "binary": binary, "version": version}


def exit_runs(info: dict, kinds, n: int, reps: int, progress: Callable[[str], None]) -> dict[str, list[int]]:
    """Wall nanoseconds of ``reps`` QEMU runs per kind (kinds interleaved, one process each)."""
    samples: dict[str, list[int]] = {k.name: [] for k in kinds}
    with tempfile.TemporaryDirectory(prefix="pykvm-qemu-") as tmp:
        images = {k.name: _patched(k.number, n, Path(tmp)) for k in kinds}
        # One unmeasured start warms the page cache with QEMU's binary and libraries.
        _run(_command(info["binary"], info["machine"], images[kinds[0].name]), START_TIMEOUT)
        for rep in range(reps):
            for kind in kinds:
                cmd = _command(info["binary"], info["machine"], images[kind.name])
                t0 = time.perf_counter_ns()
                proc = _run(cmd, START_TIMEOUT + n * 1e-4)
                elapsed = time.perf_counter_ns() - t0
                if proc.returncode != 1:
                    from pykvm.bench.common import BenchError

                    raise BenchError(f"QEMU {kind.name}: exit status {proc.returncode}: {proc.stderr.strip()[-300:]}")
                samples[kind.name].append(elapsed)
                progress(f"qemu {kind.name} rep {rep + 1}/{reps}")
    return samples


def rss_command(info: dict, directory: Path) -> list[str]:
    """QEMU booting bench32 (empty loop, N = 1): the process whose peak RSS is compared."""
    return _command(info["binary"], info["machine"], _patched(0, 1, directory))
