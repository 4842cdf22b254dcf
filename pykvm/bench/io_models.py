"""Emulated versus paravirtual I/O: N bytes through the 16550 and through virtio-console.

The guest is ``iobench64u`` (long mode, CPL 3: its own work runs natively,
so the figures are the I/O path's).  It moves N bytes guest -> host ("tx")
or host -> guest ("rx") through one of these models:

=====  ===============================  ==================================================
(a)    ``uart_python``                  16550, every access handled in Python
                                        (``Machine(c_loop=False)``): one exit per byte out,
                                        two per byte in (LSR, then RBR)
(b)    ``uart_c``                       16550 with the C loop taking THR writes
(c)    ``uart_coalesced``               16550 with THR in a coalesced PIO zone: KVM buffers
                                        the writes in a ring; one exit per full ring
(d)    ``virtio``                       virtio-console, 64 KiB buffers, doorbells by
                                        KVM_IOEVENTFD, interrupt line by irqfd
       ``virtio_c``, ``virtio_python``  the same with the doorbell taken by the C loop
                                        (an exit, no Python) or by Python (an exit)
=====  ===============================  ==================================================

(b) and (c) have no receive direction: the C loop takes only THR writes and
KVM coalesces only writes, so LSR/RBR reads go to Python exactly as in (a).
The virtio driver polls its used rings and asks the device not to
interrupt: on the kvm_pvm development host a CPL-3 guest cannot take an
interrupt (the handler would have to IRET at CPL 0, which KVM's emulator
cannot do there), so in (d) the irqfd is wired but stays quiet.

Per run: MB/s over the transfer as the guest timed it with its TSC (from
the first byte to the last; machine creation and virtio set-up excluded),
MB/s over the whole ``run()``, exits per KB moved -- returned to user space
(pykvm's own count) and all (KVM's ``exits`` statistic, which adds the
exits the kernel handled: ioeventfd, coalesced writes, host interrupts) --
and each model's throughput as a multiple of (a) in the same direction,
measured in the same invocation.  Every run checks the data: the guest's
Adler-32 of what it sent or received against the host's.

The target (issue 5): virtio-console >= 20 x the emulated UART.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

from pykvm.bench.common import BenchError, ensure_median, host_info

__all__ = ["MODELS", "TARGET_RATIO", "Config", "Model", "main", "markdown", "measure", "run_once"]

GUEST = "iobench64u"
KIND = {("uart", "tx"): 1, ("uart", "rx"): 2, ("virtio", "tx"): 3, ("virtio", "rx"): 4}
DIRECTIONS = ("tx", "rx")
DIRECTION_TITLES = {"tx": "guest → host", "rx": "host → guest"}
TARGET_RATIO = 20.0
RUN_TIMEOUT = 120.0
MEMORY = "64M"  # the guest's virtio buffers sit at 16-24 MiB


@dataclass(frozen=True)
class Model:
    """One way of moving bytes: the device, and how the machine is wired."""

    key: str
    label: str  # "(a)" ... or "" for the extra rows
    title: str
    device: str  # "uart" or "virtio"
    not_applicable: dict[str, str]  # direction -> why it is not measured


_NO_C_READS = "the C loop takes only THR writes: LSR/RBR reads go to Python, which is (a)"
_NO_COALESCED_READS = "KVM coalesces writes only: every LSR/RBR read exits, which is (a)"

MODELS: list[Model] = [
    Model("uart_python", "(a)", "16550, Python handlers", "uart", {}),
    Model("uart_c", "(b)", "16550, C loop", "uart", {"rx": _NO_C_READS}),
    Model("uart_coalesced", "(c)", "16550, coalesced PIO", "uart", {"rx": _NO_COALESCED_READS}),
    Model("virtio", "(d)", "virtio-console, ioeventfd + irqfd", "virtio", {}),
    Model("virtio_c", "", "virtio-console, C-loop doorbell + irqfd", "virtio", {}),
    Model("virtio_python", "", "virtio-console, Python doorbell + irqfd", "virtio", {}),
]
MODEL_BY_KEY = {m.key: m for m in MODELS}
BASELINE = "uart_python"
VIRTIO_NOTIFY = {"virtio": "ioeventfd", "virtio_c": "c", "virtio_python": "python"}


@dataclass
class Config:
    """Bytes per run and runs per measurement.  Exit-per-byte models get fewer bytes."""

    reps: int = 5
    n_uart_python: int = 32 << 10
    n_uart_c: int = 64 << 10
    n_uart_coalesced: int = 256 << 10
    n_uart_rx: int = 8 << 10
    n_virtio: int = 256 << 20
    quick: bool = False

    @classmethod
    def quick_config(cls) -> "Config":
        return cls(reps=3, n_uart_python=8 << 10, n_uart_c=16 << 10, n_uart_coalesced=64 << 10,
                   n_uart_rx=2 << 10, n_virtio=64 << 20, quick=True)

    def n_for(self, model: Model, direction: str) -> int:
        if model.device == "virtio":
            return self.n_virtio
        if direction == "rx":
            return self.n_uart_rx
        return {"uart_python": self.n_uart_python, "uart_c": self.n_uart_c,
                "uart_coalesced": self.n_uart_coalesced}[model.key]


def plan_units(cfg: Config) -> int:
    """Runs :func:`measure` makes (for a progress bar)."""
    cells = sum(1 for m in MODELS for d in DIRECTIONS if d not in m.not_applicable)
    return cells * cfg.reps


class _CountingBackend:
    """A console backend that keeps only the count and Adler-32 of what the guest sent."""

    def __init__(self) -> None:
        self.count = 0
        self.adler = 1

    def start(self, deliver) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.count += len(data)
        self.adler = zlib.adler32(data, self.adler)

    def close(self) -> None:
        pass


@dataclass
class Sample:
    """One run."""

    guest_seconds: float  # the transfer, timed by the guest's TSC
    wall_seconds: float  # the whole Machine.run()
    user_exits: int
    kvm_exits: int | None
    doorbells: int


def run_once(model: Model, direction: str, n: int, rx_data: bytes | None = None) -> Sample:
    """Move ``n`` bytes once through ``model``; check the data; return the timings and exits."""
    from pykvm.platform.machine import Machine
    from pykvm.platform.cloop import tsc_hz

    if direction in model.not_applicable:
        raise ValueError(f"{model.key} has no {direction} direction: {model.not_applicable[direction]}")
    if direction == "rx" and (rx_data is None or len(rx_data) != n):
        raise ValueError("rx runs need rx_data of n bytes")
    virtio = model.device == "virtio"
    options = {"irqchip": True} if virtio else {"c_loop": model.key == "uart_c"}
    backend = _CountingBackend()
    with Machine(memory=MEMORY, **options) as m:
        if virtio:
            console, _ = m.add_virtio_console(backend, notify=VIRTIO_NOTIFY[model.key], interrupt="irqfd",
                                              max_pending_input=max(n, 1 << 20))
            if direction == "rx":
                console.enqueue_input(rx_data)
        elif direction == "rx":
            m.serial.enqueue_input(rx_data)
        if model.key == "uart_coalesced":
            m.add_coalesced_zone(port=0x3F8, length=1)  # THR only
        m.load_guest(GUEST, args=(KIND[model.device, direction], n))
        result = m.run(timeout=RUN_TIMEOUT)
        regs = result.regs
        if result.ended != "reset":
            raise BenchError(f"{model.key} {direction}: the guest ended with {result.ended!r}: "
                             f"{result.message.splitlines()[0] if result.message else ''}")
        if regs["rax"] >> 32 == 0xFFFFFFFF:
            raise BenchError(f"{model.key} {direction}: the guest failed with code {regs['rax'] & 0xFFFFFFFF}; "
                             f"serial: {result.serial_text.strip()!r}")
        if regs["rbx"] != n:
            raise BenchError(f"{model.key} {direction}: the guest moved {regs['rbx']} bytes, not {n}")
        if direction == "rx":
            seen, expected = regs["rax"], zlib.adler32(rx_data)
            what = "the guest's Adler-32 of what it received"
        elif virtio:
            seen, expected = backend.adler, regs["rax"]
            what = f"Adler-32 of the {backend.count} bytes the console's backend received"
            if backend.count != n:
                raise BenchError(f"{model.key} tx: the backend received {backend.count} bytes, not {n}")
        else:
            seen, expected = zlib.adler32(result.serial), regs["rax"]
            what = f"Adler-32 of the {len(result.serial)} bytes on COM1"
            if len(result.serial) != n:
                raise BenchError(f"{model.key} tx: COM1 carried {len(result.serial)} bytes, not {n}")
        if seen != expected:
            raise BenchError(f"{model.key} {direction}: {what} is {seen:#010x}, expected {expected:#010x}")
        split = result.split
        return Sample(
            guest_seconds=regs["rcx"] / tsc_hz(),
            wall_seconds=result.seconds,
            user_exits=split.user_exits if split else result.user_exits,
            kvm_exits=split.kvm_exits if split else None,
            doorbells=regs["rdi"] if virtio else 0,
        )


def _rx_data(n: int) -> bytes:
    return os.urandom(n)


def measure(cfg: Config, progress=None) -> dict:
    """Every applicable (model, direction), ``cfg.reps`` times, interleaved rep by rep."""
    cells = [(m, d) for m in MODELS for d in DIRECTIONS if d not in m.not_applicable]
    rx_data = {n: _rx_data(n) for n in {cfg.n_for(m, "rx") for m, d in cells if d == "rx"}}
    samples: dict[tuple[str, str], list[Sample]] = {(m.key, d): [] for m, d in cells}
    started = time.monotonic()
    for _rep in range(cfg.reps):
        for model, direction in cells:
            n = cfg.n_for(model, direction)
            samples[model.key, direction].append(
                run_once(model, direction, n, rx_data.get(n) if direction == "rx" else None))
            if progress is not None:
                progress(f"{model.key} {direction}")
    rows = []
    for model in MODELS:
        for direction in DIRECTIONS:
            if direction in model.not_applicable:
                rows.append({"model": model.key, "label": model.label, "title": model.title,
                             "direction": direction, "status": "n/a",
                             "reason": model.not_applicable[direction]})
                continue
            rows.append(_row(model, direction, cfg.n_for(model, direction), samples[model.key, direction]))
    baseline = {r["direction"]: r for r in rows if r["model"] == BASELINE and r["status"] == "ok"}
    for r in rows:
        base = baseline.get(r["direction"])
        if r["status"] == "ok" and base:
            r["ratio_to_a"] = r["mb_per_s"] / base["mb_per_s"]
            r["wall_ratio_to_a"] = r["wall_mb_per_s"] / base["wall_mb_per_s"]
    return {
        "guest": GUEST,
        "guest_mode": "long_user (CPL 3)",
        "reps": cfg.reps,
        "quick": cfg.quick,
        "seconds": time.monotonic() - started,
        "models": [{"key": m.key, "label": m.label, "title": m.title, "device": m.device} for m in MODELS],
        "rows": rows,
        "targets": targets(rows),
    }


def _row(model: Model, direction: str, n: int, runs: list[Sample]) -> dict:
    guest_s = ensure_median([s.guest_seconds for s in runs])
    wall_s = ensure_median([s.wall_seconds for s in runs])
    user = ensure_median([s.user_exits for s in runs])
    kvm_values = [s.kvm_exits for s in runs if s.kvm_exits is not None]
    kvm = ensure_median(kvm_values) if kvm_values else None
    kib = n / 1024
    return {
        "model": model.key, "label": model.label, "title": model.title, "direction": direction,
        "status": "ok", "bytes": n, "runs": len(runs),
        "guest_seconds": guest_s, "wall_seconds": wall_s,
        "mb_per_s": n / guest_s / 1e6, "wall_mb_per_s": n / wall_s / 1e6,
        "user_exits": user, "kvm_exits": kvm,
        "user_exits_per_kb": user / kib, "exits_per_kb": None if kvm is None else kvm / kib,
        "doorbells": ensure_median([s.doorbells for s in runs]),
        "samples_guest_seconds": [s.guest_seconds for s in runs],
    }


def targets(rows: list[dict]) -> list[dict]:
    """Virtio-console (d) against the emulated UART (a), per direction."""
    out = []
    for direction in DIRECTIONS:
        row = next((r for r in rows if r["model"] == "virtio" and r["direction"] == direction), None)
        value = row.get("ratio_to_a") if row else None
        out.append({
            "target": f"virtio-console (d) / 16550 with Python handlers (a), {DIRECTION_TITLES[direction]}",
            "value": value, "limit": TARGET_RATIO, "met": None if value is None else bool(value >= TARGET_RATIO),
        })
    return out


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------


def _fmt_rate(mb: float) -> str:
    if mb >= 100:
        return f"{mb:,.0f}"
    if mb >= 1:
        return f"{mb:.1f}"
    return f"{mb:.4f}"


def _fmt_exits(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:,.0f}" if value >= 10 else (f"{value:.2f}" if value >= 0.01 else f"{value:.4f}")


def _fmt_ratio(value: float | None) -> str:
    if value is None:
        return "–"
    return f"{value:,.0f}×" if value >= 10 else f"{value:.2f}×"


def markdown(section: dict) -> list[str]:
    """The table (one line per model, both directions side by side) and the targets."""
    rows = {(r["model"], r["direction"]): r for r in section["rows"]}
    notes: dict[str, int] = {}
    head = " | ".join(f"{DIRECTION_TITLES[d]}: MB/s | exits/KB user / all | × (a)" for d in DIRECTIONS)
    lines = [
        "## I/O models: emulated 16550 versus virtio-console",
        "",
        f"Guest `{section['guest']}` ({section['guest_mode']}); median of {section['reps']} runs per cell. "
        "MB/s over the transfer as the guest timed it (TSC); exits per KB moved: returned to user space / "
        "all (KVM's `exits` statistic, kernel-handled ones included); × (a) = MB/s over (a)'s, same "
        "direction, same invocation.",
        "",
        f"| model | {head} |",
        "|---|" + "---:|---:|---:|" * len(DIRECTIONS),
    ]
    for model in section["models"]:
        cells = []
        for d in DIRECTIONS:
            r = rows.get((model["key"], d))
            if r is None or r["status"] != "ok":
                mark = notes.setdefault(r["reason"] if r else "not measured", len(notes) + 1)
                cells += [f"n/a [{mark}]", "", ""]
                continue
            cells += [_fmt_rate(r["mb_per_s"]),
                      f"{_fmt_exits(r['user_exits_per_kb'])} / {_fmt_exits(r['exits_per_kb'])}",
                      _fmt_ratio(r.get("ratio_to_a"))]
        name = f"{model['label']} {model['title']}".strip()
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    for reason, mark in notes.items():
        lines.append(f"[{mark}] {reason}  ")
    lines += [
        "The virtio driver polls its used rings with interrupts suppressed (a CPL-3 guest cannot take "
        "interrupts on a kvm_pvm host: the handler's IRET at CPL 0 cannot be emulated there).",
        "",
        "| target | measured | limit | met |",
        "|---|---|---|---|",
    ]
    for t in section["targets"]:
        value = "n/a" if t["value"] is None else _fmt_ratio(t["value"])
        met = "–" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {value} | ≥ {t['limit']:.0f}× | {met} |")
    lines.append("")
    return lines


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="io_models",
        description="Move N bytes through the emulated 16550 and through virtio-console; "
                    "MB/s, exits per KB and ratios to the 16550 with Python handlers.",
    )
    p.add_argument("--quick", action="store_true", help="small N and 3 runs per cell: well under a minute (CI)")
    p.add_argument("--reps", type=int, help="runs per cell (default 5, quick 3; at least 3)")
    p.add_argument("--out", type=Path, help="directory for the JSON (default: benchmarks/results)")
    p.add_argument("--name", default="io_models", help="file name stem of the results (default: io_models)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    return p


def _preflight() -> str | None:
    """Why the benchmark cannot run here (None: it can)."""
    from pykvm.bench.common import guest_problem

    return guest_problem(GUEST)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print Markdown; write JSON.  Returns an exit status."""
    from pykvm.bench import default_out_dir, report

    args = _parser().parse_args(argv)
    if args.reps is not None and args.reps < 3:
        print("io_models: --reps must be at least 3", file=sys.stderr)
        return 2
    problem = _preflight()
    if problem:
        print(f"io_models: {problem}", file=sys.stderr)
        return 2
    cfg = Config.quick_config() if args.quick else Config()
    if args.reps:
        cfg.reps = args.reps
    progress = report.Progress(plan_units(cfg), enabled=not args.no_progress)
    results: dict = {
        "schema": 1,
        "tool": "benchmarks/io_models.py",
        "quick": bool(args.quick),
        "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": host_info(),
        "errors": {},
    }
    started = time.monotonic()
    status = 0
    try:
        results["io_models"] = measure(cfg, progress)
    except BenchError as exc:
        results["errors"]["io_models"] = str(exc)
        status = 1
    except KeyboardInterrupt:
        progress.finish()
        print("io_models: interrupted", file=sys.stderr)
        return 130
    progress.finish()
    results["duration_s"] = time.monotonic() - started
    results["targets"] = results.get("io_models", {}).get("targets", [])
    lines = [f"# pykvm I/O models ({'quick' if args.quick else 'full'} run)", ""]
    host = results["host"]
    nested = "pvm-nested KVM" if host.get("nested_pvm") else ", ".join(host.get("kvm_modules", [])) or "KVM"
    lines += [f"Host: {host.get('cpu')}, {host.get('cpus')} CPUs, Linux {host.get('kernel')}, {nested}, "
              f"Python {host.get('python')}; {results['started']}, {results['duration_s']:.0f} s.", ""]
    if "io_models" in results:
        lines += markdown(results["io_models"])
    for section, error in results["errors"].items():
        lines += [f"**{section} failed:** {error}", ""]
    print("\n".join(lines))
    out_dir = args.out or default_out_dir()
    stem = f"{args.name}-quick" if args.quick else args.name
    json_path = report.write_json(results, out_dir / f"{stem}.json")
    print(f"JSON: {json_path}", file=sys.stderr)
    for section, error in results["errors"].items():
        print(f"io_models: {section} failed: {error}", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
