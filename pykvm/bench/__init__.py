"""pykvm's benchmarks: exit latency, VM lifecycle, memory, start-up, I/O models and boot, against the limits.

``pykvm bench`` (and ``make bench``, ``python benchmarks/run_all.py``) calls
:func:`main`.  Every figure is compared with a reference measured in the
same run: the raw-C program ``rawbench.c`` (no pykvm code: the physical limit
of the host) and, where ``qemu-system-x86_64`` is installed, QEMU on the same
guest.  Absolute times depend heavily on the host (a nested KVM is about 10x
slower per exit than bare metal); the ratios are what to read.

Output: Markdown tables on stdout, JSON (``--out``, default
``benchmarks/results/`` in a source tree) and a PNG chart when matplotlib
(the ``bench`` extra) is installed.  ``--quick`` runs in well under a minute
for CI; the full run takes a few minutes.

Modules: :mod:`.exit_latency`, :mod:`.lifecycle`, :mod:`.memory`,
:mod:`.startup`, :mod:`.io_models`, :mod:`.disk_models`, :mod:`.boot` (with
:mod:`.boot_report`), :mod:`.qemu`, :mod:`.raw` (build and drive
``rawbench.c``), :mod:`.report`.  ``io_models``, ``disk_models`` and ``boot``
are scripts of their own as well (``benchmarks/*.py``) with their own JSON.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

__all__ = ["SECTIONS", "default_out_dir", "main"]

SECTIONS = ("exits", "lifecycle", "memory", "startup", "io_models", "disk_models", "boot")
DEFAULT_SECTIONS = SECTIONS


def default_out_dir() -> Path:
    """``benchmarks/results`` of the source tree pykvm runs from, else ``./pykvm-bench-results``."""
    import pykvm

    tree = Path(pykvm.__file__).resolve().parent.parent / "benchmarks"
    if tree.is_dir() and os.access(tree, os.W_OK):
        return tree / "results"
    return Path.cwd() / "pykvm-bench-results"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pykvm bench",
        description="Measure pykvm against a raw-C KVM loop and QEMU: exit latency, VM lifecycle, memory.",
    )
    p.add_argument("--quick", action="store_true", help="small N and few reps: under a minute (CI)")
    p.add_argument("--only", default=",".join(DEFAULT_SECTIONS),
                   help=f"comma-separated sections to run, of {','.join(SECTIONS)} "
                        f"(default: all; io_models, disk_models and boot are also benchmarks/*.py)")
    p.add_argument("--out", type=Path, help="directory for JSON and PNG (default: benchmarks/results)")
    p.add_argument("--name", default="bench", help="file name stem of the results (default: bench)")
    p.add_argument("--reps", type=int, help="runs per measurement (default 21, quick 5; at least 5)")
    p.add_argument("--no-qemu", action="store_true", help="skip QEMU even if it is installed")
    p.add_argument("--no-chart", action="store_true", help="do not draw the PNG chart")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def _preflight() -> str | None:
    from pykvm.bench.common import KVM_DEVICE

    if not os.path.exists(KVM_DEVICE):
        return f"{KVM_DEVICE} does not exist: KVM is not available on this host"
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return f"{KVM_DEVICE} is not readable and writable by this user (add yourself to the kvm group)"
    try:
        from pykvm import guests

        for name in ("bench32", "bench64", "bench64u", "hello64"):
            guests.path(name)
    except (LookupError, OSError) as exc:  # GuestNotBuilt, GuestNotFound
        return str(exc)
    try:
        import pykvm._native_loader  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"pykvm's C extension is not built ({exc}); run `python -m pykvm._build`"
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks; print Markdown; write JSON (and PNG).  Returns an exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `pykvm bench -- --quick`
        argv = argv[1:]
    args = _parser().parse_args(argv)
    sections = [s.strip() for s in args.only.split(",") if s.strip()]
    everything = set(sections) == set(DEFAULT_SECTIONS)
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        print(f"pykvm bench: unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}",
              file=sys.stderr)
        return 2
    if args.reps is not None and args.reps < 5:
        print("pykvm bench: --reps must be at least 5 (medians of fewer runs are not reported)", file=sys.stderr)
        return 2
    problem = _preflight()
    out_dir = args.out or default_out_dir()
    if out_dir.exists() and not out_dir.is_dir():
        problem = f"--out {out_dir}: not a directory (the results are several files)"
    if problem:
        print(f"pykvm bench: {problem}", file=sys.stderr)
        return 2
    if "disk_models" in sections:
        from pykvm.bench import disk_models

        disk_args = (["--quick"] if args.quick else []) + (["--no-qemu"] if args.no_qemu else [])
        disk_args += ["--out", str(out_dir)] + (["--no-chart"] if args.no_chart else [])
        status = disk_models.main(disk_args)
        sections = [s for s in sections if s != "disk_models"]
        if not sections or status:
            return status
    if "io_models" in sections:
        from pykvm.bench import io_models

        io_args = (["--quick"] if args.quick else []) + ["--out", str(out_dir)]
        status = io_models.main(io_args)
        sections = [s for s in sections if s != "io_models"]
        if not sections or status:
            return status
    if "boot" in sections:
        from pykvm.bench import boot

        boot_args = ["--quick"] if args.quick else []
        boot_args += ["--out", str(out_dir)] + (["--no-qemu"] if args.no_qemu else [])
        boot_args += (["--no-chart"] if args.no_chart else []) + (["--no-progress"] if args.no_progress else [])
        if everything:  # Linux to its banner takes minutes per VMM here: only when boot is asked for by name
            boot_args.append("--no-linux")
        status = boot.main(boot_args)
        sections = [s for s in sections if s != "boot"]
        if not sections or status:
            return status

    from pykvm.bench import exit_latency, lifecycle, memory, report, startup
    from pykvm.bench.common import BenchError, host_info, pykvm_info
    from pykvm.bench.raw import build

    try:
        build()  # fail early, with the compiler's message, if rawbench.c cannot be built
    except BenchError as exc:
        print(f"pykvm bench: {exc}", file=sys.stderr)
        return 2

    exit_cfg = exit_latency.Config.quick_config() if args.quick else exit_latency.Config()
    life_cfg = lifecycle.Config.quick_config() if args.quick else lifecycle.Config()
    if args.reps:
        exit_cfg.reps = args.reps
        life_cfg.reps = max(args.reps, life_cfg.reps)
    exit_cfg.qemu = not args.no_qemu
    mem_reps = 1 if args.quick else 3
    start_cfg = startup.Config.quick_config() if args.quick else startup.Config()
    if args.reps:
        start_cfg.reps = args.reps

    units = 0
    units += exit_latency.plan_units(exit_cfg) if "exits" in sections else 0
    units += lifecycle.plan_units(life_cfg) if "lifecycle" in sections else 0
    units += memory.plan_units(mem_reps) if "memory" in sections else 0
    units += startup.plan_units(start_cfg) if "startup" in sections else 0
    progress = report.Progress(units, enabled=not args.no_progress)

    started = time.monotonic()
    results: dict = {
        "schema": 1,
        "tool": "pykvm bench",
        "quick": bool(args.quick),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": host_info(),
        "pykvm": pykvm_info(),
        "sections": sections,
        "errors": {},
    }
    status = 0
    try:
        for section, run in (
            ("exits", lambda: ("exit_latency", exit_latency.measure(exit_cfg, progress))),
            ("lifecycle", lambda: ("lifecycle", lifecycle.measure(life_cfg, progress))),
            ("memory", lambda: ("memory", memory.measure(mem_reps, progress))),
            ("startup", lambda: ("startup", startup.measure(start_cfg, progress))),
        ):
            if section not in sections:
                continue
            try:
                key, value = run()
                results[key] = value
            except BenchError as exc:
                results["errors"][section] = str(exc)
                status = 1
    except KeyboardInterrupt:
        progress.finish()
        print("pykvm bench: interrupted", file=sys.stderr)
        return 130
    progress.finish()
    results["duration_s"] = time.monotonic() - started
    results["targets"] = report.targets(results)

    stem = f"{args.name}-quick" if args.quick else args.name
    print(report.markdown(results), flush=True)  # the results are out before anything can fail to be written
    try:
        json_path = report.write_json(results, out_dir / f"{stem}.json")
    except OSError as exc:
        print(f"pykvm bench: cannot write the JSON to {out_dir}: {exc.strerror or exc} "
              "(the tables above are the results)", file=sys.stderr)
        return 2
    print(f"JSON: {json_path}", file=sys.stderr)
    if not args.no_chart and "exit_latency" in results:
        png = report.chart(results, out_dir / f"{stem}.png")
        if png is None:
            print("chart: skipped (matplotlib is not installed: pip install 'pykvm[bench]')", file=sys.stderr)
        else:
            print(f"chart: {png}", file=sys.stderr)
    if not args.no_chart and "startup" in results:
        png = report.startup_chart(results, out_dir / f"{stem}-startup.png")
        if png is not None:
            print(f"chart: {png}", file=sys.stderr)
    for section, error in results["errors"].items():
        print(f"pykvm bench: {section} failed: {error}", file=sys.stderr)
    return status
