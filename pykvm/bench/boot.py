"""Boot: a fresh process to a kernel's first serial byte and to its end, and IPI round trips, against QEMU.

Three parts, each a ratio to QEMU measured in the same invocation (programs
interleaved rep by rep, medians over the reps):

``multiboot``
    The Multiboot kernel ``mbinfo`` (guests/mbinfo.c: it prints its
    Multiboot information to COM1 and leaves through isa-debug-exit) under
    ``pykvm run`` and under ``qemu-system-x86_64``, each with ``-M pc`` and
    with ``-M microvm`` and the same command line otherwise.  Timed from
    the spawn (``CLOCK_MONOTONIC`` just before ``posix_spawn``) to the
    first byte the child writes to its stdout -- a pipe this process polls:
    ``-serial stdio`` puts COM1 there -- and to the child reaped after its
    debug-exit (exit status 1 = ``(0 << 1) | 1``, checked with the report's
    ``done: ok``).  QEMU's ``-M pc`` runs SeaBIOS first (emulated
    instruction by instruction on a nested host); with ``-nodefaults`` it
    writes nothing to COM1, so the first byte is the guest's in every row.
``linux``
    The Linux bzImage at ``${PYKVM_CACHE:-~/.cache/pykvm}/linux/vmlinuz``
    with ``initrd.cpio.gz`` beside it (``make linux`` puts them there), with
    ``-append "console=ttyS0 earlyprintk=ttyS0"``: spawn to the first
    serial byte (the decompressor's) and to the banner (``Linux version``),
    when the VMM is killed.  Skipped, and the JSON says so, when the files
    are absent.
``ipi``
    The ``ipiping`` guest (guests/ipiping.c) on ``-M pc``: two vCPUs
    ping-pong fixed IPIs and the guest times the round trips with its TSC
    (``ns_per_round_trip``); with ``-smp 2``, ``-smp 4`` with the two other
    APs halted, and ``-smp 4`` with them spinning (``spin=1``): four busy
    vCPUs on a two-core host, the overcommitted case.

pykvm runs from a venv of this interpreter that sees only pykvm and cffi,
as in the ``startup`` section (:func:`pykvm.bench.startup.make_venv`), with
its bytecode compiled first.  ``python benchmarks/boot.py`` and ``pykvm
bench --only boot`` call :func:`main`; :mod:`pykvm.bench.boot_report` makes
the tables and the chart.
"""

from __future__ import annotations

import argparse
import datetime
import os
import select
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pykvm.bench.common import BenchError, child_env, ensure_median, host_info, pykvm_info, pykvm_root

__all__ = ["Config", "linux_files", "main", "measure", "watch"]

MEMORY = "128M"
LINUX_MEMORY = "256M"
LINUX_APPEND = "console=ttyS0 earlyprintk=ttyS0"
BANNER = b"Linux version"
DEBUG_EXIT = ["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]
COMMON = ["-accel", "kvm", "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio"]
EXIT_OK = 1  # what a VMM exits with after isa-debug-exit got 0: (0 << 1) | 1
RUN_TIMEOUT = 120.0  # seconds, one Multiboot or ipiping run
LINUX_TIMEOUT = 1800.0  # the decompressor is emulated on a nested host: minutes for an XZ payload

#: The VMMs of the Multiboot part: (program, machine type).
MULTIBOOT_PROGRAMS = {"qemu_pc": ("qemu", "pc"), "qemu_microvm": ("qemu", "microvm"),
                      "pykvm_pc": ("pykvm", "pc"), "pykvm_microvm": ("pykvm", "microvm")}
LINUX_PROGRAMS = {"qemu_pc": ("qemu", "pc"), "qemu_microvm": ("qemu", "microvm"), "pykvm_pc": ("pykvm", "pc")}
#: The ipiping cases: (-smp, spin=).
IPI_CASES = {"smp2": (2, 0), "smp4_halt": (4, 0), "smp4_spin": (4, 1)}
IPI_TITLES = {"smp2": "-smp 2", "smp4_halt": "-smp 4, the other 2 APs halted",
              "smp4_spin": "-smp 4, the other 2 APs spinning (overcommit: 4 busy vCPUs, 2 cores)"}
PARTS = ("multiboot", "linux", "ipi")


class Config:
    """Repetitions per part (interleaved) and the round trips per ipiping run."""

    def __init__(self, reps: int = 11, linux_reps: int = 3, ipi_reps: int = 7, ipi_iterations: int = 5000,
                 quick: bool = False) -> None:
        self.reps = reps
        self.linux_reps = linux_reps
        self.ipi_reps = ipi_reps
        self.ipi_iterations = ipi_iterations
        self.linux_timeout = LINUX_TIMEOUT
        self.quick = quick
        self.parts = PARTS
        self.qemu = True

    @classmethod
    def quick_config(cls) -> "Config":
        cfg = cls(reps=3, linux_reps=1, ipi_reps=3, ipi_iterations=500, quick=True)
        cfg.linux_timeout = 300.0
        return cfg


def plan_units(cfg: Config) -> int:
    units = 0
    units += cfg.reps * len(MULTIBOOT_PROGRAMS) if "multiboot" in cfg.parts else 0
    units += cfg.linux_reps * len(LINUX_PROGRAMS) if "linux" in cfg.parts else 0
    units += cfg.ipi_reps * len(IPI_CASES) * 2 if "ipi" in cfg.parts else 0
    return units


# ---------------------------------------------------------------------------
# One child, watched through its stdout
# ---------------------------------------------------------------------------


@dataclass
class Watched:
    """What one child did: milliseconds from the spawn (None: it never happened), status, output."""

    first_byte_ms: float | None
    marker_ms: float | None
    end_ms: float
    status: int
    output: bytes
    stderr: str
    timed_out: bool

    def why(self) -> str:
        """A one-line account of a run that went wrong, for an error or an n/a cell."""
        if self.timed_out:
            return f"no end within the timeout ({self.end_ms / 1000:.0f} s)"
        lines = [line.strip() for line in self.stderr.splitlines() if line.strip() and "warning:" not in line]
        lines = lines or [line.strip() for line in self.output.decode("latin-1").splitlines() if line.strip()]
        return f"exit status {self.status}: {lines[-1][:300] if lines else 'no output'}"


def watch(argv: list[str], env: dict[str, str], timeout: float, marker: bytes | None = None) -> Watched:
    """Spawn *argv* with stdout on a pipe; time its first byte, *marker* (then kill it) and its end.

    stdin is /dev/null and stderr a temporary file (a pipe could fill and
    stall the child).  The clock is read right after ``poll`` says bytes
    are there, before they are read.
    """
    read_end, write_end = os.pipe()
    null = os.open(os.devnull, os.O_RDONLY)
    with tempfile.TemporaryFile() as err:
        actions = [(os.POSIX_SPAWN_DUP2, null, 0), (os.POSIX_SPAWN_DUP2, write_end, 1),
                   (os.POSIX_SPAWN_DUP2, err.fileno(), 2), (os.POSIX_SPAWN_CLOSE, read_end)]
        try:
            start = time.monotonic_ns()
            pid = os.posix_spawnp(argv[0], argv, env, file_actions=actions)
        except OSError:
            os.close(read_end)
            raise
        finally:
            os.close(write_end)
            os.close(null)
        first = mark = None
        timed_out = False
        output = bytearray()
        deadline = start + int(timeout * 1e9)
        poller = select.poll()
        poller.register(read_end, select.POLLIN)
        try:
            while True:
                left_ms = (deadline - time.monotonic_ns()) // 1_000_000
                if left_ms <= 0 or not poller.poll(left_ms):
                    timed_out = True
                    os.kill(pid, signal.SIGKILL)
                    break
                now = time.monotonic_ns()
                chunk = os.read(read_end, 65536)
                if not chunk:  # EOF: the child has gone (or closed its stdout)
                    break
                if first is None:
                    first = now
                searched_from = max(0, len(output) - len(marker or b""))
                output += chunk
                if marker is not None and output.find(marker, searched_from) >= 0:
                    mark = now
                    os.kill(pid, signal.SIGKILL)  # seen: no need for the rest of the boot
                    break
        finally:
            os.close(read_end)
            _, wait_status = os.waitpid(pid, 0)
            end = time.monotonic_ns()
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")

    def ms(ns: int | None) -> float | None:
        return None if ns is None else (ns - start) / 1e6

    return Watched(ms(first), ms(mark), ms(end), os.waitstatus_to_exitcode(wait_status), bytes(output), stderr,
                   timed_out)


# ---------------------------------------------------------------------------
# The three parts
# ---------------------------------------------------------------------------


def linux_files() -> tuple[Path, Path]:
    """``${PYKVM_CACHE:-~/.cache/pykvm}/linux/vmlinuz`` and ``initrd.cpio.gz`` (which may not exist)."""
    cache = Path(os.environ.get("PYKVM_CACHE") or Path.home() / ".cache" / "pykvm")
    return cache / "linux" / "vmlinuz", cache / "linux" / "initrd.cpio.gz"


class _Vmms:
    """The two command lines: QEMU's binary, and pykvm run from the venv."""

    def __init__(self, qemu_binary: str | None, venv_python: str, env: dict[str, str]) -> None:
        self.qemu_binary = qemu_binary
        self.venv_python = venv_python
        self.env = env

    def argv(self, program: str, machine: str, args: list[str]) -> list[str]:
        head = [self.qemu_binary] if program == "qemu" else [self.venv_python, "-m", "pykvm", "run"]
        return [*head, "-M", machine, *args]

    @staticmethod
    def shown(program: str, machine: str, args: list[str]) -> str:
        """The command line as the tables show it (paths shortened)."""
        head = "qemu-system-x86_64" if program == "qemu" else "pykvm run"
        return " ".join([head, "-M", machine, *(os.path.basename(a) if os.sep in a else a for a in args)])


def _summary(samples: list[float]) -> dict:
    return {"median_ms": ensure_median(samples), "fastest_ms": min(samples), "runs_ms": samples}


def _report(w: Watched, what: str) -> dict:
    """The guest's report from a run that must have ended through debug-exit with ``done: ok``."""
    from pykvm.guests.reports import ReportError, parse_report

    try:
        report = parse_report(w.output.decode("latin-1"))
    except ReportError as exc:
        raise BenchError(f"{what}: {w.why()}; its report: {exc}") from None
    if w.status != EXIT_OK or report.get("done") != "ok":
        raise BenchError(f"{what}: {w.why()} (done: {report.get('done')})")
    return report


def _multiboot(cfg: Config, vmms: _Vmms, programs: dict, progress: Callable[[str], None]) -> dict:
    from pykvm import guests

    kernel = str(guests.path("mbinfo"))
    args = [*COMMON, "-m", MEMORY, *DEBUG_EXIT, "-kernel", kernel]
    runs: dict[str, dict[str, list[float]]] = {name: {"first_byte": [], "exit": []} for name in programs}
    for name, (program, machine) in programs.items():  # warm the page cache: binaries, libraries, the kernel
        watch(vmms.argv(program, machine, args), vmms.env, RUN_TIMEOUT)
    for rep in range(cfg.reps):
        for name, (program, machine) in programs.items():
            w = watch(vmms.argv(program, machine, args), vmms.env, RUN_TIMEOUT)
            _report(w, f"mbinfo under {vmms.shown(program, machine, args)}")
            runs[name]["first_byte"].append(w.first_byte_ms)
            runs[name]["exit"].append(w.end_ms)
            progress(f"boot multiboot {name} {rep + 1}/{cfg.reps}")
    out: dict = {"guest": "mbinfo", "reps": cfg.reps, "programs": {}}
    for name, (program, machine) in programs.items():
        out["programs"][name] = {"vmm": program, "machine": machine, "command": vmms.shown(program, machine, args),
                                 "first_byte": _summary(runs[name]["first_byte"]), "exit": _summary(runs[name]["exit"])}
    _ratios(out["programs"], ("first_byte", "exit"))
    return out


def _ratios(progs: dict, metrics: tuple[str, ...]) -> None:
    """Each pykvm program's medians over each QEMU program's, per metric: ``ratio[metric][qemu_name]``."""
    for entry in progs.values():
        if entry["vmm"] != "pykvm" or entry.get("status", "ok") != "ok":
            continue
        entry["ratio"] = {}
        for metric in metrics:
            entry["ratio"][metric] = {
                qname: entry[metric]["median_ms"] / q[metric]["median_ms"]
                for qname, q in progs.items() if q["vmm"] == "qemu" and q.get("status", "ok") == "ok"}


#: The magic numbers of the compressed payload of a bzImage (what the decompressor has to undo).
PAYLOAD_MAGIC = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\x5d\x00\x00": "lzma", b"\xfd7zXZ\x00": "xz",
                 b"\x89LZO": "lzo", b"\x02\x21\x4c\x18": "lz4", b"\x28\xb5\x2f\xfd": "zstd"}


def payload_format(kernel: Path) -> str:
    """The compression of a bzImage's payload: boot protocol >= 2.08 gives its offset (``payload_offset``)."""
    import struct

    with open(kernel, "rb") as f:
        head = f.read(0x250)
        if len(head) < 0x250 or head[0x202:0x206] != b"HdrS":
            return "unknown"
        setup_sects = head[0x1F1] or 4
        payload_offset, = struct.unpack_from("<I", head, 0x248)
        f.seek((setup_sects + 1) * 512 + payload_offset)
        magic = f.read(6)
    return next((name for m, name in PAYLOAD_MAGIC.items() if magic.startswith(m)), "unknown")


def _first_line(output: bytes) -> str:
    """The first line the kernel printed (what the first byte belongs to), as text."""
    line = output.lstrip(b"\r\n").split(b"\n", 1)[0].rstrip(b"\r")
    return line[:120].decode("latin-1")


def _linux(cfg: Config, vmms: _Vmms, programs: dict, progress: Callable[[str], None]) -> dict:
    kernel, initrd = linux_files()
    missing = [str(p) for p in (kernel, initrd) if not p.is_file()]
    if missing:
        return {"skipped": "run make linux", "missing": missing, "kernel": str(kernel), "initrd": str(initrd)}
    args = [*COMMON, "-m", LINUX_MEMORY, "-kernel", str(kernel), "-initrd", str(initrd), "-append", LINUX_APPEND]
    runs: dict[str, dict] = {name: {"first_byte": [], "banner": [], "failed": None} for name in programs}
    for rep in range(cfg.linux_reps):
        for name, (program, machine) in programs.items():
            run = runs[name]
            if run["failed"] is None:  # a VMM that cannot boot this kernel is not asked again
                w = watch(vmms.argv(program, machine, args), vmms.env, cfg.linux_timeout, marker=BANNER)
                if w.marker_ms is None:
                    run["failed"] = (f"no banner within {cfg.linux_timeout:.0f} s" if w.timed_out else
                                     f"ended before the banner: {w.why()}")
                else:
                    run["first_byte"].append(w.first_byte_ms)
                    run["banner"].append(w.marker_ms)
                    run["first_line"] = _first_line(w.output)
            progress(f"boot linux {name} {rep + 1}/{cfg.linux_reps}")
    out: dict = {"kernel": str(kernel), "initrd": str(initrd), "kernel_bytes": kernel.stat().st_size,
                 "payload": payload_format(kernel), "append": LINUX_APPEND, "timeout_s": cfg.linux_timeout,
                 "reps": cfg.linux_reps, "programs": {}}
    for name, (program, machine) in programs.items():
        entry: dict = {"vmm": program, "machine": machine, "command": vmms.shown(program, machine, args)}
        if runs[name]["failed"] is not None:
            entry.update(status="n/a", reason=runs[name]["failed"])
        else:
            entry.update(status="ok", first_byte=_summary(runs[name]["first_byte"]),
                         banner=_summary(runs[name]["banner"]), first_line=runs[name]["first_line"])
        out["programs"][name] = entry
    _ratios(out["programs"], ("first_byte", "banner"))
    return out


def _ipi(cfg: Config, vmms: _Vmms, with_qemu: bool, progress: Callable[[str], None]) -> dict:
    from pykvm import guests

    kernel = str(guests.path("ipiping"))
    platforms = ("pykvm", "qemu") if with_qemu else ("pykvm",)
    samples: dict = {case: {p: [] for p in platforms} for case in IPI_CASES}
    commands: dict = {}
    for rep in range(cfg.ipi_reps):
        for case, (smp, spin) in IPI_CASES.items():
            args = [*COMMON, "-m", MEMORY, "-smp", str(smp), *DEBUG_EXIT, "-kernel", kernel,
                    "-append", f"iterations={cfg.ipi_iterations} spin={spin}"]
            for platform in platforms:
                commands[(case, platform)] = vmms.shown(platform, "pc", args)
                w = watch(vmms.argv(platform, "pc", args), vmms.env, RUN_TIMEOUT)
                report = _report(w, f"ipiping under {commands[(case, platform)]}")
                if report["round_trips"] != cfg.ipi_iterations or report["spinning_aps"] != (smp - 2) * spin:
                    raise BenchError(f"ipiping under {commands[(case, platform)]}: {report['round_trips']} round "
                                     f"trips, {report['spinning_aps']} APs spinning")
                samples[case][platform].append(report["ns_per_round_trip"] / 1000)
                progress(f"boot ipi {case} {platform} {rep + 1}/{cfg.ipi_reps}")
    out: dict = {"guest": "ipiping", "iterations": cfg.ipi_iterations, "reps": cfg.ipi_reps, "cases": {}}
    for case, (smp, spin) in IPI_CASES.items():
        entry: dict = {"title": IPI_TITLES[case], "smp": smp, "spin": bool(spin), "platforms": {}}
        for platform in platforms:
            us = samples[case][platform]
            entry["platforms"][platform] = {"command": commands[(case, platform)], "median_us": ensure_median(us),
                                            "fastest_us": min(us), "runs_us": us}
        if with_qemu:
            entry["ratio"] = entry["platforms"]["pykvm"]["median_us"] / entry["platforms"]["qemu"]["median_us"]
        out["cases"][case] = entry
    return out


def measure(cfg: Config, progress: Callable[[str], None] = lambda label: None) -> dict:
    """The ``boot`` section: every part of *cfg.parts*, QEMU's rows where it is installed."""
    import compileall

    from pykvm.bench import qemu
    from pykvm.bench.startup import make_venv

    compileall.compile_dir(str(Path(pykvm_root()) / "pykvm"), quiet=1)  # an installed package has its .pyc
    info = qemu.probe() if cfg.qemu else {"available": False, "reason": "--no-qemu"}
    out: dict = {"qemu": info, "parts": list(cfg.parts)}
    with tempfile.TemporaryDirectory(prefix="pykvm-boot-") as tmp:
        venv = make_venv(os.path.join(tmp, "venv"))
        env = {k: v for k, v in child_env().items() if k != "PYTHONPATH"}  # the venv finds pykvm itself
        vmms = _Vmms(info.get("binary") if info["available"] else None, venv, env)

        def only_ours(programs: dict) -> dict:
            return programs if info["available"] else {n: p for n, p in programs.items() if p[0] == "pykvm"}

        if "multiboot" in cfg.parts:
            out["multiboot"] = _multiboot(cfg, vmms, only_ours(MULTIBOOT_PROGRAMS), progress)
        if "linux" in cfg.parts:
            out["linux"] = _linux(cfg, vmms, only_ours(LINUX_PROGRAMS), progress)
        if "ipi" in cfg.parts:
            out["ipi"] = _ipi(cfg, vmms, info["available"], progress)
    return out


# ---------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="benchmarks/boot.py",
        description="Process start to a kernel's first serial byte, its end or Linux's banner, and IPI round "
                    "trips: pykvm against QEMU.")
    p.add_argument("--quick", action="store_true", help="3 reps (1 for Linux), 500 round trips: for CI")
    p.add_argument("--reps", type=int, help="runs per Multiboot program (default 11, quick 3; at least 3)")
    p.add_argument("--linux-reps", type=int, help="runs per VMM to the Linux banner (default 3, quick 1)")
    p.add_argument("--ipi-reps", type=int, help="ipiping runs per case and VMM (default 7, quick 3)")
    p.add_argument("--iterations", type=int, help="IPI round trips per ipiping run (default 5000, quick 500)")
    p.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts, of {','.join(PARTS)}")
    p.add_argument("--linux-timeout", type=float, help=f"seconds one VMM may take to the banner "
                                                        f"(default {LINUX_TIMEOUT:.0f}, quick 300)")
    p.add_argument("--no-linux", action="store_true", help="leave the Linux part out (it takes minutes here)")
    p.add_argument("--no-qemu", action="store_true", help="skip QEMU even if it is installed")
    p.add_argument("--out", type=Path, help="directory for the JSON and PNG (default: benchmarks/results)")
    p.add_argument("--name", default="boot", help="file name stem of the results (default: boot)")
    p.add_argument("--no-chart", action="store_true", help="do not draw the PNG chart")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def _config(args: argparse.Namespace) -> Config | str:
    """The Config of the options, or what is wrong with them."""
    cfg = Config.quick_config() if args.quick else Config()
    for option, attr, least in (("--reps", "reps", 3), ("--linux-reps", "linux_reps", 1),
                                ("--ipi-reps", "ipi_reps", 1), ("--iterations", "ipi_iterations", 1),
                                ("--linux-timeout", "linux_timeout", 1)):
        value = getattr(args, option[2:].replace("-", "_"))
        if value is not None:
            if value < least:
                return f"{option} must be at least {least}"
            setattr(cfg, attr, value)
    parts = tuple(p.strip() for p in args.only.split(",") if p.strip())
    unknown = sorted(set(parts) - set(PARTS))
    if unknown or not parts:
        return f"--only: unknown part(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(PARTS)}"
    cfg.parts = tuple(p for p in PARTS if p in parts and not (p == "linux" and args.no_linux))
    cfg.qemu = not args.no_qemu
    return cfg


def main(argv: list[str] | None = None) -> int:
    """Run the boot benchmark; print Markdown; write JSON (and PNG).  Returns an exit status."""
    from pykvm.bench import boot_report, default_out_dir, report
    from pykvm.bench.common import guest_problem

    args = _parser().parse_args(argv)
    cfg = _config(args)
    problem = cfg if isinstance(cfg, str) else guest_problem("mbinfo") or guest_problem("ipiping")
    out_dir = args.out or default_out_dir()
    if problem is None and out_dir.exists() and not out_dir.is_dir():
        problem = f"--out {out_dir}: not a directory"
    if problem:
        print(f"boot: {problem}", file=sys.stderr)
        return 2
    progress = report.Progress(plan_units(cfg), enabled=not args.no_progress)
    results: dict = {
        "schema": 1,
        "tool": "benchmarks/boot.py",
        "quick": bool(args.quick),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": host_info(),
        "pykvm": pykvm_info(),
        "errors": {},
    }
    started = time.monotonic()
    status = 0
    try:
        results["boot"] = measure(cfg, progress)
    except BenchError as exc:
        results["errors"]["boot"] = str(exc)
        status = 1
    except KeyboardInterrupt:
        progress.finish()
        print("boot: interrupted", file=sys.stderr)
        return 130
    progress.finish()
    results["duration_s"] = time.monotonic() - started
    if "boot" in results and "linux" not in results["boot"] and args.no_linux:
        results["boot"]["linux"] = {"skipped": "--no-linux"}
    print(boot_report.markdown(results), flush=True)
    stem = f"{args.name}-quick" if args.quick else args.name
    try:
        json_path = report.write_json(results, out_dir / f"{stem}.json")
    except OSError as exc:
        print(f"boot: cannot write the JSON to {out_dir}: {exc.strerror or exc} (the tables above are the results)",
              file=sys.stderr)
        return 2
    print(f"JSON: {json_path}", file=sys.stderr)
    if not args.no_chart and "boot" in results:
        png = boot_report.chart(results, out_dir / f"{stem}.png")
        if png is None:
            print("chart: skipped (matplotlib is not installed: pip install 'pykvm[bench]')", file=sys.stderr)
        else:
            print(f"chart: {png}", file=sys.stderr)
    for section, error in results["errors"].items():
        print(f"boot: {section} failed: {error}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
