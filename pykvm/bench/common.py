"""Small pieces every benchmark uses: errors, medians, guest specs, host facts."""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from statistics import median

from pykvm.errors import BenchError  # noqa: F401  (re-exported: the benchmarks raise it)

__all__ = [
    "BENCH_GUESTS",
    "KVM_DEVICE",
    "BenchError",
    "BenchGuest",
    "child_env",
    "host_info",
    "median",
]

KVM_DEVICE = "/dev/kvm"

#: Guest RAM given to every exit benchmark (pykvm's Machine default).
EXIT_MEMORY = 64 << 20


@dataclass(frozen=True)
class BenchGuest:
    """One benchmark guest: its name, CPU mode and the privilege level its loop runs at."""

    name: str
    mode: str
    cpl: int
    description: str

    @property
    def label(self) -> str:
        return f"{self.name} (CPL {self.cpl})"


BENCH_GUESTS: dict[str, BenchGuest] = {
    g.name: g
    for g in (
        BenchGuest("bench64", "long", 0, "64-bit long mode, CPL 0 (ring-0 code is emulated on a pvm host)"),
        BenchGuest("bench64u", "long_user", 3, "64-bit long mode, CPL 3 (runs natively)"),
        BenchGuest("bench32", "protected", 0, "32-bit protected mode, CPL 0: the multiboot guest QEMU also runs"),
    )
}


def guest_problem(guest: str) -> str | None:
    """Why a section that runs ``guest`` cannot run here: no usable /dev/kvm, or the extension or guest unbuilt."""
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return f"{KVM_DEVICE} is missing or not readable and writable by this user"
    try:
        import pykvm._native_loader  # noqa: F401
        from pykvm import guests

        guests.path(guest)
    except Exception as exc:  # the C extension or the guest is not built
        return str(exc)
    return None


def pykvm_root() -> Path:
    """The directory holding the ``pykvm`` package (for a child's PYTHONPATH)."""
    import pykvm

    return Path(pykvm.__file__).resolve().parent.parent


def child_env() -> dict[str, str]:
    """The environment for a child Python process that must import this pykvm."""
    env = dict(os.environ)
    root = str(pykvm_root())
    parts = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in parts:
        env["PYTHONPATH"] = os.pathsep.join([root, *parts])
    return env


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def host_info() -> dict:
    """What the numbers depend on: kernel, CPU, nesting, Python."""
    return {
        "kernel": platform.release(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "nested_pvm": os.path.exists("/sys/module/kvm_pvm"),
        "kvm_modules": sorted(m for m in ("kvm_intel", "kvm_amd", "kvm_pvm") if os.path.exists(f"/sys/module/{m}")),
    }


def pykvm_info() -> dict:
    """pykvm's version and, in a git checkout, the commit measured (read-only git queries)."""
    import subprocess

    import pykvm

    info: dict = {"version": getattr(pykvm, "__version__", "unknown"), "commit": None, "dirty": None}
    root = pykvm_root()
    if (root / ".git").exists():
        try:
            head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                  capture_output=True, text=True, timeout=10, check=False)
            status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10, check=False)
        except (OSError, subprocess.SubprocessError):
            return info
        if head.returncode == 0:
            info["commit"] = head.stdout.strip()
            info["dirty"] = bool(status.stdout.strip())
    return info


def ensure_median(values: list[float]) -> float:
    """The median, refusing an empty list with a clear error."""
    if not values:
        raise BenchError("no samples to take a median of")
    return median(values)
