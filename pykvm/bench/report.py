"""Output of the benchmarks: progress bar, Markdown tables, JSON, PNG chart, targets."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import TextIO

from pykvm.bench.exit_latency import KIND_BY_NAME, PATH_TITLES, PATHS


class Progress:
    """A one-line progress bar on stderr (a TTY), or a line per 10 % elsewhere."""

    def __init__(self, total: int, enabled: bool = True, stream: TextIO | None = None, width: int = 28) -> None:
        self.total = max(total, 1)
        self.done = 0
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = enabled and self.stream.isatty()
        self.width = width
        self.started = time.monotonic()
        self._last_decile = 0

    def __call__(self, label: str) -> None:
        self.advance(label)

    def advance(self, label: str = "") -> None:
        self.done = min(self.done + 1, self.total)
        if not self.enabled:
            return
        frac = self.done / self.total
        elapsed = time.monotonic() - self.started
        eta = elapsed / frac - elapsed if frac > 0 else 0.0
        if self.tty:
            filled = int(frac * self.width)
            bar = "#" * filled + "-" * (self.width - filled)
            line = f"\r[{bar}] {frac * 100:3.0f}% {elapsed:5.0f}s eta {eta:4.0f}s  {label[:40]:<40}"
            self.stream.write(line)
            self.stream.flush()
        elif self.done * 10 // self.total > self._last_decile:
            self._last_decile = self.done * 10 // self.total
            self.stream.write(f"pykvm bench: {frac * 100:3.0f}% after {elapsed:.0f}s ({label})\n")
            self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\r" + " " * (self.width + 70) + "\r")
            self.stream.flush()


# ---------------------------------------------------------------------------
# Targets of the issue, evaluated on one result set
# ---------------------------------------------------------------------------


def _row(results: dict, guest: str, kind: str, path: str) -> dict | None:
    for row in results.get("exit_latency", {}).get("rows", []):
        if (row["guest"], row["kind"], row["path"]) == (guest, kind, path):
            return row
    return None


def targets(results: dict) -> list[dict]:
    """Each target of the issue: the measured value, the limit, and whether it is met."""
    out = []

    def add(text: str, value: float | None, limit: float, detail: str = "", best: float | None = None) -> None:
        out.append({
            "target": text, "value": value, "limit": limit, "detail": detail, "best": best,
            "met": None if value is None else bool(value <= limit),
        })

    if "exit_latency" in results:
        guests = [g["name"] for g in results["exit_latency"]["guests"]]
        for guest in guests:
            for path, limit, what in (("c_loop", 1.05, "C loop"), ("machine", 1.15, "Machine + Python handler")):
                row = _row(results, guest, "pio_out", path)
                ok = row is not None and row["status"] == "ok"
                add(f"PIO out, {what} / raw C, {guest}", row.get("ratio") if ok else None, limit,
                    best=row.get("best_ratio") if ok else None)
        machine, qemu_row = _row(results, "bench32", "pio_out", "machine"), _row(results, "bench32", "pio_out", "qemu")
        if machine and qemu_row and machine["status"] == "ok" and qemu_row["status"] == "ok":
            best = None
            if machine.get("best_per_exit_us") and qemu_row.get("best_per_exit_us"):
                best = machine["best_per_exit_us"] / qemu_row["best_per_exit_us"]
            add("PIO out, Machine + Python handler / QEMU, bench32", machine["per_exit_us"] / qemu_row["per_exit_us"], 1.0,
                f"{machine['per_exit_us']:.2f} us vs {qemu_row['per_exit_us']:.2f} us", best=best)
        else:
            add("PIO out, Machine + Python handler / QEMU, bench32", None, 1.0, "QEMU not measured")
    if "lifecycle" in results and "2M" in results["lifecycle"]["sizes"]:
        total = results["lifecycle"]["sizes"]["2M"]["total"]
        add("lifecycle total at 2 MiB, pykvm raw layer / raw C", total["ratio"], 1.2,
            f"{total['pykvm_ms']:.2f} ms vs {total['raw_c_ms']:.2f} ms")
        add("lifecycle total at 2 MiB, pykvm Machine / raw C", total["machine_ratio"], 1.3,
            f"{total['machine_ms']:.2f} ms vs {total['raw_c_ms']:.2f} ms")
        rates = {(r["impl"], r["workers"]): r["vms_per_second"] for r in results["lifecycle"].get("rates", [])}
        for workers in sorted({w for _, w in rates}):
            machine, raw = rates.get(("pykvm", workers)), rates.get(("raw_c", workers))
            if machine and raw:
                # a rate: higher is better, so the limit is on raw C / pykvm
                add(f"VMs per second with {workers} worker(s), raw C / pykvm Machine", raw / machine, 1 / 0.75,
                    f"{machine:.0f} vs {raw:.0f} VMs/s")
    if "memory" in results:
        mem = results["memory"]
        ratio = mem.get("ratio_hello64_to_qemu")
        detail = ""
        if ratio is not None:
            progs = mem["programs"]
            detail = (f"{progs['pykvm_hello64']['peak_rss_kib'] / 1024:.1f} MiB vs "
                      f"{progs['qemu_bench32']['peak_rss_kib'] / 1024:.1f} MiB")
        add("peak RSS running hello64, pykvm / QEMU", ratio, 0.5, detail or "QEMU not measured")
    if "startup" in results:
        progs = results["startup"]["programs"]
        for name, what in (("pykvm_bench32", "pykvm run -kernel bench32"), ("pykvm_hello64", "pykvm run --guest hello64")):
            p, here = progs[name], progs[f"{name}_here"]
            if "ratio" in p:
                add(f"whole process, {what} (venv) / QEMU microvm", p["ratio"], 1.0,
                    f"{p['median_ms']:.1f} ms vs {progs['qemu']['median_ms']:.1f} ms; from this interpreter, with "
                    f"its site hooks ({results['startup']['site_here_ms']:.1f} ms): {here['ratio']:.2f}×",
                    best=p["fastest_ratio"])
            else:
                add(f"whole process, {what} (venv) / QEMU microvm", None, 1.0, "QEMU not measured")
    return out


# ---------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------


def _fmt_us(value: float) -> str:
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3f}"


def markdown(results: dict) -> str:
    """All sections as Markdown tables."""
    parts = [f"# pykvm benchmarks ({'quick' if results.get('quick') else 'full'} run)", ""]
    host = results.get("host", {})
    if host:
        nested = "pvm-nested KVM" if host.get("nested_pvm") else ", ".join(host.get("kvm_modules", [])) or "KVM"
        parts += [(f"Host: {host.get('cpu')}, {host.get('cpus')} CPUs, Linux {host.get('kernel')}, {nested}, "
                  f"Python {host.get('python')}; {results.get('started', '')}, "
                  f"{results.get('duration_s', 0):.0f} s."), ""]
        info = results.get("pykvm") or {}
        if info.get("commit"):
            dirty = " with uncommitted changes" if info.get("dirty") else ""
            parts[-2] += f" pykvm {info.get('version')} at {info['commit']}{dirty}."
    if "exit_latency" in results:
        parts += _exit_table(results["exit_latency"])
    if "lifecycle" in results:
        parts += _lifecycle_tables(results["lifecycle"])
    if "memory" in results:
        parts += _memory_table(results["memory"])
    if "startup" in results:
        parts += _startup_tables(results["startup"])
    if results.get("targets"):
        parts += ["## Targets", "",
                  ("measured: from the medians (the tables above); fastest runs: the same from each path's fastest "
                  "run and fastest empty run (interference on this host only ever adds time)."), "",
                  "| target | measured | limit | met | fastest runs |", "|---|---|---|---|---|"]
        for t in results["targets"]:
            value = "n/a" if t["value"] is None else f"{t['value']:.2f}×"
            met = "–" if t["met"] is None else ("yes" if t["met"] else "**no**")
            detail = f" ({t['detail']})" if t.get("detail") else ""
            best = f"{t['best']:.2f}×" if t.get("best") else "–"
            parts.append(f"| {t['target']} | {value}{detail} | ≤ {t['limit']:.2f}× | {met} | {best} |")
        parts.append("")
    for section, error in results.get("errors", {}).items():
        parts += [f"**{section} failed:** {error}", ""]
    return "\n".join(parts)


def _exit_table(section: dict) -> list[str]:
    rows = {(r["guest"], r["kind"], r["path"]): r for r in section["rows"]}
    notes: dict[str, int] = {}
    lines = [
        "## Exit latency",
        "",
        (f"µs per exit (median of {section['reps']} runs, empty loop subtracted); "
        "× = ratio to raw C, same guest and kind, same run."),
        "",
        "| guest | kind | " + " | ".join(PATH_TITLES[p] for p in PATHS) + " |",
        "|---|---|" + "---:|" * len(PATHS),
    ]
    for guest in section["guests"]:
        for kind in guest["kinds"]:
            cells = []
            for path in PATHS:
                r = rows.get((guest["name"], kind, path))
                if r is None:
                    cells.append("–")
                elif r["status"] != "ok":
                    mark = notes.setdefault(r["reason"], len(notes) + 1)
                    cells.append(f"n/a [{mark}]")
                elif path == "raw_c" or r.get("ratio") is None:
                    cells.append(_fmt_us(r["per_exit_us"]))
                else:
                    cells.append(f"{_fmt_us(r['per_exit_us'])} ({r['ratio']:.2f}×)")
            label = f"{guest['name']} (CPL {guest['cpl']})"
            lines.append(f"| {label} | {KIND_BY_NAME[kind].title} | " + " | ".join(cells) + " |")
    lines.append("")
    for reason, mark in notes.items():
        lines.append(f"[{mark}] {reason}  ")
    qemu = section.get("qemu", {})
    if qemu.get("available"):
        lines.append(f"QEMU: {qemu.get('version')}, `{qemu.get('command')}`. {qemu.get('note') or ''}")
    lines.append("")
    return lines


def _lifecycle_tables(section: dict) -> list[str]:
    sizes = section["sizes"]
    head = "| step | " + " | ".join(f"raw C {s} | pykvm {s}" for s in sizes) + " |"
    lines = [
        "## VM lifecycle",
        "",
        (f"ms per step (median of {section['reps']} lifecycles, {section['guest']} in {section['mode']} mode); "
        "pykvm = its raw layer (Kvm, Vm, GuestMemory, Vcpu, setup_mode, vcpu.run())."),
        "",
        head,
        "|---|" + "---:|---:|" * len(sizes),
    ]
    for step in section["steps"] + ["total"]:
        cells = []
        for s in sizes.values():
            v = s["total"] if step == "total" else s["steps"][step]
            cells.append(f"{v['raw_c_ms']:.3f} | {v['pykvm_ms']:.3f} ({v['ratio']:.2f}×)")
        name = "**total**" if step == "total" else step.replace("_", " ")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    machine = " | ".join(
        f"– | {s['total']['machine_ms']:.3f} ({s['total']['machine_ratio']:.2f}×)" for s in sizes.values()
    )
    lines.append(f"| Machine total | {machine} |")
    detail = "; ".join(
        f"{size}: " + ", ".join(f"{k} {v:.2f}" for k, v in s["machine_steps"].items()) for size, s in sizes.items()
    )
    lines += ["", f"Machine steps (ms): {detail}.", ""]
    if section.get("note"):
        lines += [f"{section['note']}.", ""]
    if section.get("rates"):
        lines += ["VMs per second (whole lifecycles at 2 MiB, pykvm = Machine):", "",
                  "| implementation | workers | VMs | seconds | VMs/s |", "|---|---:|---:|---:|---:|"]
        for r in section["rates"]:
            impl = "raw C" if r["impl"] == "raw_c" else "pykvm Machine"
            lines.append(f"| {impl} | {r['workers']} | {r['vms']} | {r['seconds']:.2f} | {r['vms_per_second']:.0f} |")
        lines.append("")
    return lines


def _memory_table(section: dict) -> list[str]:
    progs = section["programs"]
    qemu = progs.get("qemu_bench32", {}).get("peak_rss_kib")
    lines = ["## Peak memory", "", "| program | peak RSS (MiB) | / QEMU |", "|---|---:|---:|"]
    for p in progs.values():
        ratio = f"{p['peak_rss_kib'] / qemu:.2f}×" if qemu else "n/a"
        lines.append(f"| {p['title']} | {p['peak_rss_kib'] / 1024:.1f} | {ratio} |")
    if not qemu:
        lines.append("")
        lines.append(f"QEMU not measured: {section.get('qemu', {}).get('reason')}")
    lines.append("")
    return lines


def _startup_tables(section: dict) -> list[str]:
    from pykvm.bench.startup import PHASE_TITLES, PHASES, PYKVM_PROGRAMS

    progs = section["programs"]
    qemu = progs.get("qemu")
    lines = ["## Start-up: the whole process", "",
             (f"Spawn to exit, ms (median and fastest of {section['reps']} runs, programs interleaved); "
              f"QEMU: `{section['qemu_command']}`; pykvm runs the same command line."), "",
             "| program | median ms | fastest ms | / QEMU |", "|---|---:|---:|---:|"]
    for p in progs.values():
        ratio = f"{p['median_ms'] / qemu['median_ms']:.2f}×" if qemu else "n/a"
        lines.append(f"| {p['title']} | {p['median_ms']:.1f} | {p['fastest_ms']:.1f} | {ratio} |")
    if not qemu:
        lines += ["", f"QEMU not measured: {section['qemu'].get('reason')}"]
    heads = [PHASE_TITLES[k] for k in PHASES] + ["reaped"]
    lines += ["", "Where pykvm's time goes (ms, medians of each phase; each phase ends at its mark, "
              "`pykvm.timeline`):", "", "| program | " + " | ".join(heads) + " |",
              "|---|" + "---:|" * len(heads)]
    for name in PYKVM_PROGRAMS:
        phases = progs[name]["phases_ms"]
        lines.append(f"| {progs[name]['title']} | " + " | ".join(f"{phases.get(k, 0):.1f}"
                                                           for k in (*PHASES, "reaped")) + " |")
    imp = section["imports"]
    lines += ["", (f"Imports in one `-X importtime` run of the bench32 command (venv): {imp['total_ms']:.1f} ms over "
                   f"{imp['modules']} modules, of which pykvm's own {imp['pykvm_ms']:.1f} ms ({imp['pykvm_modules']} "
                   f"modules). `site` (python -c pass minus python -S -c pass): venv {section['site_ms']:.1f} ms, "
                   f"this interpreter {section['site_here_ms']:.1f} ms (its .pth hooks)."), ""]
    return lines


# ---------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------


def write_json(results: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display), or None where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def chart(results: dict, png: Path) -> Path | None:
    """A PNG bar chart of per-exit cost by kind and path (None if matplotlib is missing)."""
    section = results.get("exit_latency")
    if not section:
        return None
    plt = pyplot()
    if plt is None:
        return None
    rows = {(r["guest"], r["kind"], r["path"]): r for r in section["rows"]}
    guests = section["guests"]
    fig, axes = plt.subplots(len(guests), 1, figsize=(12, 3.6 * len(guests)), squeeze=False)
    colors = {"raw_c": "#444444", "c_loop": "#1f77b4", "machine": "#ff7f0e", "bare": "#2ca02c", "qemu": "#9467bd"}
    width = 0.8 / len(PATHS)
    for ax, guest in zip(axes[:, 0], guests):
        kinds = guest["kinds"]
        bars = []  # (x, value, path)
        for j, path in enumerate(PATHS):
            for i, kind in enumerate(kinds):
                r = rows.get((guest["name"], kind, path))
                if r and r["status"] == "ok":
                    bars.append((i + (j - (len(PATHS) - 1) / 2) * width, r["per_exit_us"], path))
        values = sorted(v for _, v, _ in bars) or [1.0]
        typical = values[len(values) // 2]
        # An outlier (HLT through Machine.run(), ~1 ms) would flatten every other bar: clip it and label it.
        top = 1.15 * max([v for v in values if v <= 8 * typical] or values)
        for path in PATHS:
            xs = [x for x, _, p in bars if p == path]
            ys = [min(v, top) for _, v, p in bars if p == path]
            if xs:
                ax.bar(xs, ys, width, label=PATH_TITLES[path], color=colors[path])
        for x, v, _ in bars:
            if v > top:
                ax.annotate(f"{v:.0f} µs ↑", (x, top), xytext=(0, 2), textcoords="offset points",
                            ha="center", va="bottom", fontsize=7)
        ax.set_ylim(0, top * 1.12)
        ax.set_xticks(range(len(kinds)))
        ax.set_xticklabels([KIND_BY_NAME[k].title for k in kinds], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("µs per exit")
        ax.set_title(f"{guest['name']}: {guest['mode']} mode, CPL {guest['cpl']} (N = {guest['n']})", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, ncol=len(PATHS))
    fig.suptitle("pykvm exit latency (empty loop subtracted; lower is better)")
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png


def startup_chart(results: dict, png: Path) -> Path | None:
    """A PNG of the whole-process times: pykvm's phases stacked, QEMU and the bare interpreter beside them."""
    section = results.get("startup")
    if not section:
        return None
    plt = pyplot()
    if plt is None:
        return None
    from pykvm.bench.startup import PHASE_TITLES, PHASES, PYKVM_PROGRAMS

    progs = section["programs"]
    fig, ax = plt.subplots(figsize=(11, 3.8))
    names = [n for n in ("qemu", *PYKVM_PROGRAMS, "python", "python_here", "python_nosite") if n in progs]
    colors = plt.get_cmap("tab10").colors
    for y, name in enumerate(names):
        p = progs[name]
        if "phases_ms" not in p:
            ax.barh(y, p["median_ms"], color="#9467bd" if name == "qemu" else "#999999")
            continue
        left = 0.0
        for i, phase in enumerate((*PHASES, "reaped")):
            width = p["phases_ms"].get(phase, 0.0)
            label = (PHASE_TITLES.get(phase, "reaped") if y == names.index(PYKVM_PROGRAMS[0]) else None)
            ax.barh(y, width, left=left, color=colors[i % len(colors)], label=label)
            left += width
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([progs[n]["title"] for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("ms, spawn to exit (median)")
    ax.set_title("Start-up: pykvm run against QEMU microvm on the same kernel (lower is better)", fontsize=10)
    ax.legend(fontsize=7, ncol=4, loc="lower right")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
