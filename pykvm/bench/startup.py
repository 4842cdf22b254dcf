"""Start-up: a whole ``pykvm run`` process against QEMU on the same kernel, and where pykvm's time goes.

What is timed is a fresh process from spawn to exit: ``CLOCK_MONOTONIC``
around ``os.posix_spawn`` and ``os.waitpid``, the programs interleaved rep
by rep (peak memory is the ``memory`` section's: a child spawned from this
process would report this process's RSS as its own high-water mark):

* ``qemu``: ``qemu-system-x86_64 -accel kvm -M microvm -m 64M -nodefaults
  -no-user-config -nographic -device isa-debug-exit,iobase=0xf4,iosize=0x04
  -kernel bench32`` (N = 1: the kernel leaves through isa-debug-exit at
  once, status 1);
* ``pykvm_bench32``: the same command line, ``python -m pykvm run`` in place
  of ``qemu-system-x86_64``;
* ``pykvm_hello64``: ``python -m pykvm run --guest hello64 -serial null``;
* ``python``, ``python_nosite``: ``python -c pass`` and ``python -S -c
  pass``, the interpreter's own start with and without ``site``.

The interpreter's start depends on its ``site-packages``: every ``.pth``
file there runs at every start (on the development host a sandbox's CA
injection imports certifi, ~10 ms that QEMU never pays).  So pykvm runs
twice: from a fresh venv of the same interpreter that sees pykvm and cffi
and nothing else (``_venv`` programs: how ``make install`` leaves it on
Debian, and how ``pip install`` into a venv does), and from this
interpreter as it is (``_here``).  The targets use the venv.

pykvm's processes run with ``PYKVM_TIMELINE`` (:mod:`pykvm.timeline`): the
marks split each run into the interpreter (spawn to pykvm's first line),
parsing the options (with the command line's imports), building the
machine (with its imports), loading the guest, running it, closing, and the
interpreter's exit.  One more run with ``python -X importtime`` says how
much of it is importing.  The bytecode caches are written first
(``compileall``), as an installed package has them.
"""

from __future__ import annotations

import compileall
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from pykvm.bench import qemu
from pykvm.bench.common import BenchError, child_env, ensure_median, pykvm_root

PHASES = ("interpreter", "parsed", "built", "loaded", "ran", "closed", "exit")
PHASE_TITLES = {
    "interpreter": "interpreter + site", "parsed": "options (imports, parse)", "built": "machine (imports, KVM)",
    "loaded": "load the guest", "ran": "run the guest", "closed": "close", "exit": "exit (+ interpreter teardown)",
}
PYKVM_PROGRAMS = ("pykvm_bench32", "pykvm_hello64", "pykvm_bench32_here", "pykvm_hello64_here")
TITLES = {
    "qemu": "QEMU -M microvm, bench32",
    "pykvm_bench32": "pykvm run, the same QEMU command line (bench32), venv",
    "pykvm_hello64": "pykvm run --guest hello64, venv",
    "pykvm_bench32_here": "the same, this interpreter",
    "pykvm_hello64_here": "pykvm run --guest hello64, this interpreter",
    "python": "python -c pass, venv",
    "python_here": "python -c pass, this interpreter",
    "python_nosite": "python -S -c pass",
}


class Config:
    """How many interleaved runs of each program (the medians need at least 5)."""

    def __init__(self, reps: int = 21, quick: bool = False) -> None:
        self.reps = reps
        self.quick = quick

    @classmethod
    def quick_config(cls) -> "Config":
        return cls(reps=7, quick=True)


def plan_units(cfg: Config) -> int:
    return cfg.reps * len(TITLES) + 1


def _spawn(argv: list[str], env: dict[str, str]) -> tuple[int, int, int]:
    """Run ``argv`` to its end with stdio on /dev/null: (spawned ns, reaped ns, exit status)."""
    null = os.open(os.devnull, os.O_RDWR)
    try:
        actions = [(os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, null, 1), (os.POSIX_SPAWN_DUP2, null, 2)]
        start = time.monotonic_ns()
        pid = os.posix_spawnp(argv[0], argv, env, file_actions=actions)
        _, wait_status = os.waitpid(pid, 0)
        end = time.monotonic_ns()
    finally:
        os.close(null)
    return start, end, os.waitstatus_to_exitcode(wait_status)


def _timeline(path: str) -> dict[str, int]:
    marks = {}
    with open(path) as f:
        for line in f:
            name, ns = line.split()
            marks[name] = int(ns)
    return marks


def _phases(spawned: int, marks: dict[str, int], ended: int) -> dict[str, float]:
    """Milliseconds of each phase: from the previous mark (the spawn, for the first) to this one."""
    out, previous = {}, spawned
    for phase in PHASES:
        if phase in marks:
            out[phase] = (marks[phase] - previous) / 1e6
            previous = marks[phase]
    out["reaped"] = (ended - previous) / 1e6
    return out


def _import_ms(argv: list[str], env: dict[str, str]) -> dict[str, float]:
    """One run under ``-X importtime``: the imports' total, pykvm's own modules, the rest."""
    import subprocess

    proc = subprocess.run([argv[0], "-X", "importtime", *argv[1:]], env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120, check=False)
    total = own = 0
    count = own_count = 0
    for match in re.finditer(r"^import time:\s+(\d+) \|\s+\d+ \|\s*(\S+)$", proc.stderr, re.M):
        us, name = int(match.group(1)), match.group(2)
        total += us
        count += 1
        if name == "pykvm" or name.startswith("pykvm."):
            own += us
            own_count += 1
    return {"total_ms": total / 1e3, "pykvm_ms": own / 1e3, "other_ms": (total - own) / 1e3,
            "modules": count, "pykvm_modules": own_count}


def make_venv(directory: str) -> str:
    """A venv of this interpreter that sees pykvm and cffi (path entries, no other .pth); its python."""
    import subprocess

    import cffi

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", directory], check=True, capture_output=True)
    python = os.path.join(directory, "bin", "python")
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                             check=True, capture_output=True, text=True).stdout.strip()
    with open(os.path.join(purelib, "pykvm-bench.pth"), "w") as f:  # lines that are paths: added, not run
        f.write(f"{pykvm_root()}\n{os.path.dirname(os.path.dirname(cffi.__file__))}\n")
    return python


def measure(cfg: Config, progress: Callable[[str], None] = lambda label: None) -> dict:
    """The ``startup`` section: every program's wall time, pykvm's phases and imports."""
    compileall.compile_dir(str(Path(pykvm_root()) / "pykvm"), quiet=1)  # an installed package has its .pyc
    here = sys.executable
    info = qemu.probe()
    with tempfile.TemporaryDirectory(prefix="pykvm-startup-") as tmp:
        venv = make_venv(os.path.join(tmp, "venv"))
        env = {k: v for k, v in child_env().items() if k != "PYTHONPATH"}  # the venv finds pykvm itself
        here_env = child_env()
        image = qemu._patched(0, 1, Path(tmp))  # bench32, N = 1: it leaves at once
        qemu_line = ["-accel", "kvm", "-M", "microvm", "-m", "64M", "-nodefaults", "-no-user-config", "-nographic",
                     "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04", "-kernel", str(image)]
        hello = ["run", "--guest", "hello64", "-serial", "null"]
        programs: dict[str, tuple[list[str], int, dict]] = {
            "pykvm_bench32": ([venv, "-m", "pykvm", "run", *qemu_line], 1, env),
            "pykvm_hello64": ([venv, "-m", "pykvm", *hello], 0, env),
            "pykvm_bench32_here": ([here, "-m", "pykvm", "run", *qemu_line], 1, here_env),
            "pykvm_hello64_here": ([here, "-m", "pykvm", *hello], 0, here_env),
            "python": ([venv, "-c", "pass"], 0, env),
            "python_here": ([here, "-c", "pass"], 0, here_env),
            "python_nosite": ([here, "-S", "-c", "pass"], 0, env),
        }
        if info["available"]:
            programs["qemu"] = ([info["binary"], *qemu_line], 1, env)
        timeline_file = os.path.join(tmp, "timeline")
        runs: dict[str, dict[str, list]] = {name: {"wall_ms": [], "phases": []} for name in programs}
        for argv, _, program_env in programs.values():  # warm the page cache: binaries, libraries, the image
            _spawn(argv, program_env)
        for rep in range(cfg.reps):
            for name, (argv, expected, program_env) in programs.items():
                run_env = {**program_env, "PYKVM_TIMELINE": timeline_file} if name in PYKVM_PROGRAMS else program_env
                spawned, reaped, status = _spawn(argv, run_env)
                if status != expected:
                    raise BenchError(f"{TITLES[name]}: exit status {status}, expected {expected} "
                                     f"(command: {' '.join(argv)})")
                runs[name]["wall_ms"].append((reaped - spawned) / 1e6)
                if name in PYKVM_PROGRAMS:  # the phases of this run add up to its wall time
                    runs[name]["phases"].append(_phases(spawned, _timeline(timeline_file), reaped))
                    os.unlink(timeline_file)
                progress(f"startup {name} {rep + 1}/{cfg.reps}")
        imports = _import_ms(programs["pykvm_bench32"][0], env)
        progress("startup imports")
    out: dict = {"reps": cfg.reps, "qemu": info, "qemu_command": " ".join(["qemu-system-x86_64", *qemu_line[:-1],
                                                                            "bench32.bin"]),
                 "programs": {}, "imports": imports}
    for name, data in runs.items():
        entry = {"title": TITLES[name], "median_ms": ensure_median(data["wall_ms"]), "fastest_ms": min(data["wall_ms"]),
                 "runs_ms": data["wall_ms"]}
        if data["phases"]:
            keys = data["phases"][0].keys()
            entry["phases_ms"] = {k: ensure_median([p[k] for p in data["phases"]]) for k in keys}
            entry["runs_phases_ms"] = data["phases"]
        out["programs"][name] = entry
    progs = out["programs"]
    out["site_ms"] = progs["python"]["median_ms"] - progs["python_nosite"]["median_ms"]
    out["site_here_ms"] = progs["python_here"]["median_ms"] - progs["python_nosite"]["median_ms"]
    if "qemu" in progs:
        q = progs["qemu"]
        for name in PYKVM_PROGRAMS:
            progs[name]["ratio"] = progs[name]["median_ms"] / q["median_ms"]
            progs[name]["fastest_ratio"] = progs[name]["fastest_ms"] / q["fastest_ms"]
    return out
