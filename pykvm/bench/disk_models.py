"""Disk models: full emulation (ATA PIO), paravirtual (virtio-blk) and the host file itself, side by side.

The KVM notes give the classic disk row -- full emulation 45 %, paravirtual
85 %, passthrough 95 % of native -- and this section measures it on this
host.  Four workloads of 4 KiB requests (8 sectors, one command each) over
the first 1 MiB of a 16 MiB raw image: sequential and random reads and
writes (the random offsets come from the same xorshift sequence
everywhere).  Rows:

``ata-pio``, ``ata-pio-word``
    the ``ata`` guest (guests/ata.c) on pykvm's ``-M pc`` with the disk on
    the emulated IDE channel (``pykvm.platform.ide``), polled PIO moving the
    data port with ``rep insw``/``rep outsw`` as Linux does, or ``word=1``:
    one ``inw``/``outw`` per 16 bits.  One run per workload; MB/s from the
    guest's TSC count of its request loop; exits per MB from the run's own
    counts (``RunResult.split``) less those of the same run with 0 requests
    (start-up, TSC calibration, the report).
``ata-pio-qemu``, ``ata-pio-word-qemu``
    the same guest and image on ``qemu-system-x86_64 -M pc`` (PIIX3 IDE,
    ``-drive if=ide,format=raw``); one boot runs the four workloads.  QEMU
    does not count exits: the guest and KVM are the same, so they are
    pykvm's.
``host-file``
    the "passthrough" ceiling: ``os.pread``/``os.pwrite`` of 4 KiB blocks
    on a raw image file from Python (page cache, no fsync: what both VMMs'
    ``cache=writeback`` does with a guest's writes).
virtio-blk
    rows from :func:`pykvm.bench.disk_virtio.rows` (another section's
    module), shown as "not measured" where that module is missing.

Every row is ``{"model", "workload", "mb_per_s", "exits_per_mb", "notes"}``
plus ``category`` and ``pct_of_host`` (MB/s as a percentage of the host
file's in the same workload, same invocation).

What to expect on this host (kvm_pvm, nested): an exit to user space costs
~8 us in C and ~25 us through pykvm's Python dispatch, so PIO is bounded by
exits, not by the disk.  KVM batches ``rep insw`` into one exit per sector
(its emulator reads ahead up to a page) but emulates ``rep outsw`` one
element, so one exit, per 16-bit word: writes cost as much as ``word=1``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pykvm.bench.common import BenchError, ensure_median, host_info

__all__ = ["WORKLOADS", "Config", "host_file_rows", "main", "markdown", "measure"]

GUEST = "ata"
WORKLOADS = ("seq-read", "seq-write", "rand-read", "rand-write")
WORKLOAD_BIT = {w: 1 << i for i, w in enumerate(WORKLOADS)}
REQUEST = 4096
SECTOR = 512
IMAGE_BYTES = 16 << 20
REGION_SECTORS = 2048  # the workloads' 1 MiB
XORSHIFT_SEED = 0x2545F491  # guests/ata.c's
RUN_TIMEOUT = 300.0
MEMORY = "128M"
MISSING_VIRTIO = "not measured: virtio-blk bench missing"
NOTES_TABLE = {"full emulation": 45, "paravirtual": 85, "passthrough": 95}  # % of native, the KVM notes
MODEL_TITLES = {
    "ata-pio": "ATA PIO, pykvm (rep insw/outsw)",
    "ata-pio-word": "ATA PIO, pykvm (inw/outw per word)",
    "ata-pio-qemu": "ATA PIO, QEMU -M pc (rep insw/outsw)",
    "ata-pio-word-qemu": "ATA PIO, QEMU -M pc (inw/outw per word)",
    "host-file": "host file, pread/pwrite 4 KiB",
}


@dataclass
class Config:
    """Requests per workload and runs per cell."""

    reps: int = 3
    ops: int = 128  # rep insw/outsw
    ops_word: int = 16  # inw/outw per word: 2048 exits per request
    host_ops: int = 8192
    qemu: bool = True
    quick: bool = False

    @classmethod
    def quick_config(cls) -> "Config":
        return cls(reps=1, ops=16, ops_word=2, host_ops=1024, quick=True)


def category(model: str) -> str:
    if model == "host-file":
        return "passthrough"
    return "paravirtual" if "virtio" in model else "full emulation"


def _row(model: str, workload: str, mb_per_s: float | None, exits_per_mb: float | None, notes: str,
         **extra) -> dict:
    return {"model": model, "workload": workload, "mb_per_s": mb_per_s, "exits_per_mb": exits_per_mb,
            "notes": notes, **extra}


def _xorshift_slots(ops: int, slots: int) -> list[int]:
    """The guest's random request slots (xorshift32 from XORSHIFT_SEED, modulo the slots)."""
    x, out = XORSHIFT_SEED, []
    for _ in range(ops):
        x ^= x << 13 & 0xFFFFFFFF
        x ^= x >> 17
        x ^= x << 5 & 0xFFFFFFFF
        out.append(x % slots)
    return out


def _make_image(directory: str) -> str:
    from pykvm.block import create_image

    path = os.path.join(directory, "disk.raw")
    if os.path.exists(path):
        os.unlink(path)
    create_image(path, "raw", IMAGE_BYTES)
    return path


def _bench_cmdline(ops: int, workloads: int, word: bool, hz: float) -> str:
    """The guest's command line; ``tsc_khz=`` spares it the PIT calibration (a varying number of exits)."""
    return (f"bench=1 ops={ops} region={REGION_SECTORS} workloads={workloads} tsc_khz={int(hz // 1000)}"
            + (" word=1" if word else ""))


# --- pykvm ----------------------------------------------------------------------------


def _pykvm_run(image_path: str, cmdline: str) -> tuple[dict, int, int | None, float]:
    """One boot of the guest: (its report, exits to user space, all exits, host TSC Hz)."""
    from pykvm import guests
    from pykvm.block import open_image
    from pykvm.guests.reports import parse_report, qemu_exit_status
    from pykvm.platform.cloop import tsc_hz
    from pykvm.platform.machine import Machine

    with open_image(image_path, format="raw") as image, Machine(MEMORY, platform="pc") as m:
        m.add_ide_disk(image)
        m.load_image(str(guests.path(GUEST)), format="multiboot", cmdline=cmdline, name=GUEST)
        result = m.run(timeout=RUN_TIMEOUT)
        if result.ended != "debug-exit" or result.exit_status != qemu_exit_status(0):
            raise BenchError(f"pykvm {cmdline!r}: the guest ended with {result.ended!r} "
                             f"({result.exit_status}): {result.serial_text.strip()[-300:]!r}")
        split = result.split
        user = split.user_exits if split else result.user_exits
        return parse_report(result.serial_text), user, split.kvm_exits if split else None, tsc_hz(m.vcpu)


def pykvm_rows(cfg: Config, word: bool, image_path: str, hz: float, progress=None) -> list[dict]:
    model = "ata-pio-word" if word else "ata-pio"
    ops = cfg.ops_word if word else cfg.ops
    rows = []
    for workload in WORKLOADS:
        bit = WORKLOAD_BIT[workload]
        _, user0, kvm0, _ = _pykvm_run(image_path, _bench_cmdline(0, bit, word, hz))  # the fixed costs
        seconds, users, kvms = [], [], []
        for _ in range(cfg.reps):
            report, user, kvm, hz = _pykvm_run(image_path, _bench_cmdline(ops, bit, word, hz))
            (entry,) = [b for b in report["bench"] if b["workload"] == workload]
            seconds.append(entry["cycles"] / hz)
            users.append(user - user0)
            if kvm is not None and kvm0 is not None:
                kvms.append(kvm - kvm0)
            if progress is not None:
                progress(f"{model} {workload}")
        mb = ops * REQUEST / 1e6
        rows.append(_row(model, workload, mb / ensure_median(seconds), ensure_median(users) / mb,
                         f"{ops} requests, median of {cfg.reps}; exits returned to user space, less a 0-request run",
                         kvm_exits_per_mb=ensure_median(kvms) / mb if kvms else None,
                         samples_seconds=seconds))
    return rows


# --- QEMU -------------------------------------------------------------------------------


def qemu_rows(cfg: Config, word: bool, image_path: str, hz: float, progress=None) -> list[dict]:
    from pykvm import guests
    from pykvm.guests.reports import parse_report, qemu_exit_status

    model = "ata-pio-word-qemu" if word else "ata-pio-qemu"
    qemu = shutil.which("qemu-system-x86_64")
    if qemu is None or not cfg.qemu:
        why = "not measured: qemu-system-x86_64 is not installed" if qemu is None else "not measured: --no-qemu"
        return [_row(model, w, None, None, why) for w in WORKLOADS]
    ops = cfg.ops_word if word else cfg.ops
    command = [qemu, "-accel", "kvm", "-M", "pc", "-m", "128", "-nodefaults", "-display", "none", "-no-reboot",
               "-serial", "stdio", "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
               "-kernel", str(guests.path(GUEST)), "-append", _bench_cmdline(ops, 15, word, hz),
               "-drive", f"file={image_path},if=ide,format=raw"]
    seconds: dict[str, list[float]] = {w: [] for w in WORKLOADS}
    for _ in range(cfg.reps):
        try:
            proc = subprocess.run(command, stdin=subprocess.DEVNULL, capture_output=True, timeout=RUN_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise BenchError(f"QEMU {model}: no end within {RUN_TIMEOUT:.0f} s") from None
        text = proc.stdout.decode("latin-1")
        if proc.returncode != qemu_exit_status(0):
            raise BenchError(f"QEMU {model}: exit status {proc.returncode}: {text.strip()[-300:]!r}")
        for entry in parse_report(text)["bench"]:
            seconds[entry["workload"]].append(entry["cycles"] / hz)
        if progress is not None:
            progress(model)
    mb = ops * REQUEST / 1e6
    return [_row(model, w, mb / ensure_median(seconds[w]), None,
                 f"{ops} requests, median of {cfg.reps} boots; QEMU counts no exits (same guest: pykvm's)",
                 samples_seconds=seconds[w]) for w in WORKLOADS]


# --- the host file ---------------------------------------------------------------------------


def host_file_rows(cfg: Config, image_path: str) -> list[dict]:
    """pread/pwrite of 4 KiB blocks on the image file: what the host itself does without a VM."""
    slots = REGION_SECTORS * SECTOR // REQUEST
    block = bytes(range(256)) * (REQUEST // 256)
    rows = []
    fd = os.open(image_path, os.O_RDWR)
    try:
        for workload in WORKLOADS:
            offsets = ([i % slots * REQUEST for i in range(cfg.host_ops)] if workload.startswith("seq")
                       else [s * REQUEST for s in _xorshift_slots(cfg.host_ops, slots)])
            runs = []
            for _ in range(max(cfg.reps, 3)):
                start = time.perf_counter()
                if workload.endswith("read"):
                    for off in offsets:
                        os.pread(fd, REQUEST, off)
                else:
                    for off in offsets:
                        os.pwrite(fd, block, off)
                runs.append(time.perf_counter() - start)
            rows.append(_row("host-file", workload, cfg.host_ops * REQUEST / 1e6 / ensure_median(runs), None,
                             f"{cfg.host_ops} requests from Python, page cache, no fsync; no VM, no exits",
                             samples_seconds=runs))
    finally:
        os.close(fd)
    return rows


def virtio_rows(quick: bool) -> list[dict]:
    """virtio-blk's rows from pykvm.bench.disk_virtio, or "not measured" rows where it is missing."""
    try:
        from pykvm.bench import disk_virtio  # written beside this section; merged later
    except ImportError:
        return [_row("virtio-blk", w, None, None, MISSING_VIRTIO) for w in WORKLOADS]
    return [dict(r) for r in disk_virtio.rows(quick)]


# --- the section ---------------------------------------------------------------------------------


def host_tsc_hz() -> float:
    """The host's TSC rate (KVM_GET_TSC_KHZ): both VMMs' guests run on it unscaled."""
    from pykvm.platform.cloop import tsc_hz
    from pykvm.platform.machine import Machine

    with Machine("2M", kernel_stats=False) as m:
        return tsc_hz(m.vcpu)


def plan_units(cfg: Config) -> int:
    return 2 * len(WORKLOADS) * cfg.reps + (2 * cfg.reps if cfg.qemu else 0)


def measure(cfg: Config, progress=None) -> dict:
    """Every row, then each one's percentage of the host file's MB/s and the notes' table."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="pykvm-disk-") as directory:
        rows = host_file_rows(cfg, _make_image(directory))
        hz = host_tsc_hz()
        for word in (False, True):
            rows += pykvm_rows(cfg, word, _make_image(directory), hz, progress)
        for word in (False, True):
            rows += qemu_rows(cfg, word, _make_image(directory), hz, progress)
    rows += virtio_rows(cfg.quick)
    host = {r["workload"]: r["mb_per_s"] for r in rows if r["model"] == "host-file"}
    for r in rows:
        r["category"] = category(r["model"])
        base = host.get(r["workload"])
        r["pct_of_host"] = 100.0 * r["mb_per_s"] / base if r["mb_per_s"] and base else None
    return {
        "guest": GUEST, "request_bytes": REQUEST, "region_bytes": REGION_SECTORS * SECTOR,
        "image_bytes": IMAGE_BYTES, "reps": cfg.reps, "quick": cfg.quick, "tsc_hz": hz,
        "seconds": time.monotonic() - started, "workloads": list(WORKLOADS), "rows": rows,
        "summary": summary(rows),
    }


def summary(rows: list[dict]) -> list[dict]:
    """The notes' table: per category, its representative row's percentage of the host file, per workload."""
    picks = {"full emulation": "ata-pio", "passthrough": "host-file"}
    virtio = [r["model"] for r in rows if category(r["model"]) == "paravirtual"]
    if virtio:
        picks["paravirtual"] = virtio[0]
    out = []
    for cat, notes_pct in NOTES_TABLE.items():
        model = picks.get(cat)
        cells = {r["workload"]: r.get("pct_of_host") for r in rows if r["model"] == model}
        values = [v for v in cells.values() if v is not None]
        out.append({"category": cat, "model": model, "notes_pct": notes_pct, "pct_by_workload": cells,
                    "mean_pct": sum(values) / len(values) if values else None})
    return out


# --- output ------------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    """Three significant digits (thousands grouped): the figures span seven orders of magnitude."""
    if value is None:
        return "–"
    return f"{value:,.0f}" if value >= 1000 else f"{value:.3g}"


def markdown(section: dict) -> list[str]:
    lines = [
        "## Disk models: ATA PIO (full emulation), virtio-blk (paravirtual), the host file (passthrough)",
        "",
        f"4 KiB requests over the first {section['region_bytes'] >> 20} MiB of a raw image; median of "
        f"{section['reps']} runs. MB/s (10^6 bytes) as the guest timed its request loop (TSC); exits per MB "
        "returned to user space; % = MB/s over the host file's, same workload, same invocation.",
        "",
        "| model | " + " | ".join(f"{w}: MB/s | exits/MB | % host" for w in section["workloads"]) + " |",
        "|---|" + "---:|---:|---:|" * len(section["workloads"]),
    ]
    by = {(r["model"], r["workload"]): r for r in section["rows"]}
    notes: dict[str, int] = {}
    for model in dict.fromkeys(r["model"] for r in section["rows"]):
        cells = []
        for w in section["workloads"]:
            r = by.get((model, w))
            if r is None or r["mb_per_s"] is None:
                mark = notes.setdefault(r["notes"] if r else "not measured", len(notes) + 1)
                cells += [f"n/a [{mark}]", "", ""]
                continue
            cells += [_fmt(r["mb_per_s"]), _fmt(r["exits_per_mb"]) if r["exits_per_mb"] is not None else "–",
                      _fmt(r["pct_of_host"])]
        lines.append(f"| {MODEL_TITLES.get(model, model)} | " + " | ".join(cells) + " |")
    lines.append("")
    for reason, mark in notes.items():
        lines.append(f"[{mark}] {reason}  ")
    lines += ["", "The notes' row, measured here (% of the host file's MB/s; mean of the four workloads):", "",
              "| | the notes | here: model | " + " | ".join(section["workloads"]) + " | mean |",
              "|---|---:|---|" + "---:|" * (len(section["workloads"]) + 1)]
    for s in section["summary"]:
        cells = [_fmt(s["pct_by_workload"].get(w)) for w in section["workloads"]]
        lines.append(f"| {s['category']} | {s['notes_pct']} % | {s['model'] or '–'} | " + " | ".join(cells)
                     + f" | {_fmt(s['mean_pct'])} |")
    lines.append("")
    return lines


def chart(section: dict, png: Path) -> Path | None:
    """MB/s per workload and model, log scale (None without matplotlib)."""
    from pykvm.bench.report import pyplot

    plt = pyplot()
    if plt is None:
        return None
    models = [m for m in dict.fromkeys(r["model"] for r in section["rows"])
              if any(r["model"] == m and r["mb_per_s"] for r in section["rows"])]
    by = {(r["model"], r["workload"]): r["mb_per_s"] for r in section["rows"]}
    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.8 / max(len(models), 1)
    for i, model in enumerate(models):
        xs = [j + i * width for j in range(len(section["workloads"]))]
        ax.bar(xs, [by.get((model, w)) or 0 for w in section["workloads"]], width,
               label=MODEL_TITLES.get(model, model))
    ax.set_yscale("log")
    ax.set_xticks([j + width * (len(models) - 1) / 2 for j in range(len(section["workloads"]))])
    ax.set_xticklabels(section["workloads"])
    ax.set_ylabel("MB/s (log)")
    ax.set_title("4 KiB requests: full emulation vs paravirtual vs the host file")
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return png


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="disk_models", description="ATA PIO, virtio-blk and the host file: "
                                "MB/s and exits per MB for 4 KiB sequential and random reads and writes.")
    p.add_argument("--quick", action="store_true", help="few requests, one run per cell (CI)")
    p.add_argument("--reps", type=int, help="runs per cell (default 3, quick 1)")
    p.add_argument("--no-qemu", action="store_true", help="skip QEMU even if it is installed")
    p.add_argument("--out", type=Path, help="directory for the JSON and PNG (default: benchmarks/results)")
    p.add_argument("--name", default="disk_models", help="file name stem (default: disk_models)")
    p.add_argument("--no-chart", action="store_true", help="do not draw the PNG chart")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def _preflight() -> str | None:
    """Why the benchmark cannot run here (None: it can)."""
    from pykvm.bench.common import guest_problem

    return guest_problem(GUEST)


def main(argv: list[str] | None = None) -> int:
    """Run the section; print Markdown; write JSON (and PNG).  Returns an exit status."""
    from pykvm.bench import default_out_dir, report

    args = _parser().parse_args(argv)
    if args.reps is not None and args.reps < 1:
        print("disk_models: --reps must be at least 1", file=sys.stderr)
        return 2
    problem = _preflight()
    if problem:
        print(f"disk_models: {problem}", file=sys.stderr)
        return 2
    cfg = Config.quick_config() if args.quick else Config()
    cfg.reps = args.reps or cfg.reps
    cfg.qemu = not args.no_qemu
    progress = report.Progress(plan_units(cfg), enabled=not args.no_progress)
    results: dict = {"schema": 1, "tool": "benchmarks/disk_models.py", "quick": bool(args.quick),
                     "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                     "host": host_info(), "errors": {}}
    started, status = time.monotonic(), 0
    try:
        results["disk_models"] = measure(cfg, progress)
    except BenchError as exc:
        results["errors"]["disk_models"] = str(exc)
        status = 1
    except KeyboardInterrupt:
        progress.finish()
        print("disk_models: interrupted", file=sys.stderr)
        return 130
    progress.finish()
    results["duration_s"] = time.monotonic() - started
    lines = [f"# pykvm disk models ({'quick' if args.quick else 'full'} run)", "",
             f"Host: {results['host'].get('cpu')}, {results['host'].get('cpus')} CPUs, "
             f"{results['started']}, {results['duration_s']:.0f} s.", ""]
    if "disk_models" in results:
        lines += markdown(results["disk_models"])
    for section, error in results["errors"].items():
        lines += [f"**{section} failed:** {error}", ""]
    print("\n".join(lines), flush=True)
    out_dir = args.out or default_out_dir()
    stem = f"{args.name}-quick" if args.quick else args.name
    try:
        json_path = report.write_json(results, out_dir / f"{stem}.json")
    except OSError as exc:
        print(f"disk_models: cannot write the JSON to {out_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"JSON: {json_path}", file=sys.stderr)
    if not args.no_chart and "disk_models" in results:
        png = chart(results["disk_models"], out_dir / f"{stem}.png")
        print(f"chart: {png}" if png else "chart: skipped (matplotlib is not installed)", file=sys.stderr)
    for section, error in results["errors"].items():
        print(f"disk_models: {section} failed: {error}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
