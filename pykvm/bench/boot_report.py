"""The ``boot`` section's Markdown tables and PNG chart (the measurements are :mod:`pykvm.bench.boot`'s)."""

from __future__ import annotations

from pathlib import Path

QEMU_TITLES = {"qemu_pc": "QEMU pc", "qemu_microvm": "QEMU microvm"}


def _title(entry: dict) -> str:
    return f"{'QEMU' if entry['vmm'] == 'qemu' else 'pykvm run'} -M {entry['machine']}"


def _ms(summary: dict) -> str:
    return f"{summary['median_ms']:,.1f} ({summary['fastest_ms']:,.1f})"


def _ratio_cells(entry: dict, metric: str, qemus: list[str]) -> list[str]:
    ratios = (entry.get("ratio") or {}).get(metric, {})
    return [f"{ratios[q]:.2f}×" if q in ratios else "–" for q in qemus]


def _host_line(results: dict) -> str:
    host = results.get("host", {})
    nested = "pvm-nested KVM" if host.get("nested_pvm") else ", ".join(host.get("kvm_modules", [])) or "KVM"
    line = (f"Host: {host.get('cpu')}, {host.get('cpus')} CPUs, Linux {host.get('kernel')}, {nested}, "
            f"Python {host.get('python')}; {results.get('started', '')}, {results.get('duration_s', 0):.0f} s.")
    info = results.get("pykvm") or {}
    if info.get("commit"):
        dirty = " (uncommitted changes)" if info.get("dirty") else ""
        line += f" pykvm {info.get('version')} at {info['commit']}{dirty}."
    return line


def _multiboot_table(part: dict, qemu: dict) -> list[str]:
    progs = part["programs"]
    qemus = [q for q in QEMU_TITLES if q in progs]
    heads = [f"× {QEMU_TITLES[q]}" for q in qemus]
    lines = [f"### Multiboot kernel `{part['guest']}`: first serial byte and debug-exit", "",
             (f"ms from the spawn, median (fastest) of {part['reps']} runs, VMMs interleaved; × = pykvm's median "
              "over QEMU's, same run. First byte: the first byte COM1 (`-serial stdio`, a pipe) delivers; "
              "exit: the process reaped after the guest's isa-debug-exit."), "",
             "| VMM | first byte ms | " + " | ".join(heads) + (" | " if heads else "") + "exit ms | "
             + " | ".join(heads) + (" |" if heads else ""),
             "|---|---:|" + "---:|" * len(heads) + "---:|" + "---:|" * len(heads)]
    for entry in progs.values():
        cells = [_ms(entry["first_byte"]), *_ratio_cells(entry, "first_byte", qemus),
                 _ms(entry["exit"]), *_ratio_cells(entry, "exit", qemus)]
        lines.append(f"| {_title(entry)} | " + " | ".join(cells) + " |")
    lines.append("")
    first = next(iter(progs.values()))
    lines.append(f"Command line (each VMM with its own `-M`): `{first['command']}`.")
    if not qemus:
        lines.append(f"QEMU not measured: {qemu.get('reason')}.")
    else:
        lines.append("QEMU's `-M pc` runs SeaBIOS before the kernel (ring-0 code: emulated on a kvm_pvm host); "
                     "`-M microvm` boots the Multiboot kernel directly, as pykvm does on both machines.")
    lines.append("")
    return lines


def _linux_table(part: dict) -> list[str]:
    lines = ["### Linux bzImage: to its banner", ""]
    if "skipped" in part:
        where = f" ({', '.join(part['missing'])} missing)" if part.get("missing") else ""
        return lines + [f"skipped: {part['skipped']}{where}.", ""]
    progs = part["programs"]
    qemus = [q for q in QEMU_TITLES if progs.get(q, {}).get("status") == "ok"]
    heads = [f"banner × {QEMU_TITLES[q]}" for q in qemus]
    lines += [(f"`{Path(part['kernel']).name}` ({part['kernel_bytes'] / 2**20:.1f} MiB, {part['payload']} "
               f"payload) with `-initrd "
               f"{Path(part['initrd']).name}` and `-append \"{part['append']}\"`: ms from the spawn to the first "
               f"serial byte and to `Linux version` on COM1 (then the VMM is killed), median (fastest) of "
               f"{part['reps']} runs."), "",
              "| VMM | first byte ms | banner ms | " + " | ".join(heads) + (" | " if heads else "") + "first line |",
              "|---|---:|---:|" + "---:|" * len(heads) + "---|"]
    notes: list[str] = []
    for entry in progs.values():
        if entry["status"] != "ok":
            notes.append(entry["reason"])
            cells = [f"n/a [{len(notes)}]", "–", *("–" for _ in qemus), ""]
        else:
            first = entry["first_line"][:48].replace("|", "\\|").replace("`", "'")
            cells = [_ms(entry["first_byte"]), _ms(entry["banner"]), *_ratio_cells(entry, "banner", qemus),
                     f"`{first}`" if first else ""]
        lines.append(f"| {_title(entry)} | " + " | ".join(cells) + " |")
    lines.append("")
    lines += [f"[{i}] {reason}  " for i, reason in enumerate(notes, 1)]
    lines += ["The first byte is whatever part of the kernel prints first: with QEMU's firmware the real-mode "
              "set-up code's `Probing EDD` (each character twice on microvm, where the BIOS console also "
              "reaches COM1), "
              "with a VMM that enters the kernel past its set-up code the decompressor's (`earlyprintk`) or "
              "the banner itself. The time to the banner is mostly the decompressor, ring-0 code that KVM "
              "emulates instruction by instruction on a kvm_pvm host, and an xz payload takes many times longer "
              "to undo than an lz4 one.", ""]
    return lines


def _ipi_table(part: dict) -> list[str]:
    lines = ["### IPI round trip between two vCPUs", "",
             (f"`{part['guest']}` on `-M pc`: µs per round trip as the guest times it with its TSC "
              f"({part['iterations']} round trips a run), median (fastest) of {part['reps']} runs."), "",
             "| case | pykvm µs | QEMU µs | pykvm / QEMU |", "|---|---:|---:|---:|"]
    for entry in part["cases"].values():
        cells = []
        for platform in ("pykvm", "qemu"):
            p = entry["platforms"].get(platform)
            cells.append(f"{p['median_us']:.1f} ({p['fastest_us']:.1f})" if p else "n/a")
        cells.append(f"{entry['ratio']:.2f}×" if "ratio" in entry else "n/a")
        lines.append(f"| {entry['title']} | " + " | ".join(cells) + " |")
    lines += ["", "Each round trip: send the IPI, the other vCPU wakes from `hlt`, EOIs and answers, the first "
              "wakes and EOIs; with an in-kernel irqchip (both VMMs) none of it reaches user space. On "
              "`-M microvm` ipiping cannot run (QEMU's PIT channel 2 never counts down there: no TSC rate; "
              "pykvm's microvm has no fw_cfg or MADT to count the CPUs with).", ""]
    return lines


def markdown(results: dict) -> str:
    """The section as Markdown: a table per part."""
    parts = [f"## Boot ({'quick' if results.get('quick') else 'full'} run)", "", _host_line(results), ""]
    section = results.get("boot")
    if section:
        if "multiboot" in section:
            parts += _multiboot_table(section["multiboot"], section["qemu"])
        if "linux" in section:
            parts += _linux_table(section["linux"])
        if "ipi" in section:
            parts += _ipi_table(section["ipi"])
        qemu = section["qemu"]
        parts += [f"QEMU: {qemu['version']}." if qemu.get("available") else f"QEMU not measured: {qemu['reason']}.",
                  ""]
    for name, error in results.get("errors", {}).items():
        parts += [f"**{name} failed:** {error}", ""]
    return "\n".join(parts)


def chart(results: dict, png: Path) -> Path | None:
    """A PNG: the medians of every part, pykvm beside QEMU (None if matplotlib is missing)."""
    section = results.get("boot")
    if not section:
        return None
    from pykvm.bench.report import pyplot

    plt = pyplot()
    if plt is None:
        return None
    panels = []  # (title, unit, [(label, {series: value})])
    if "multiboot" in section:
        rows = [(_title(e), {"first serial byte": e["first_byte"]["median_ms"], "debug-exit": e["exit"]["median_ms"]})
                for e in section["multiboot"]["programs"].values()]
        panels.append((f"Multiboot {section['multiboot']['guest']}: spawn to ...", "ms (log scale)", rows))
    linux = section.get("linux", {})
    if linux.get("programs"):
        rows = [(_title(e), {"first serial byte": e["first_byte"]["median_ms"], "banner": e["banner"]["median_ms"]})
                for e in linux["programs"].values() if e["status"] == "ok"]
        if rows:
            panels.append(("Linux: spawn to ...", "ms (log scale)", rows))
    if "ipi" in section:
        rows = [(c["title"].split(" (")[0], {f"{p} µs": v["median_us"] for p, v in c["platforms"].items()})
                for c in section["ipi"]["cases"].values()]
        panels.append(("IPI round trip, -M pc", "µs per round trip", rows))
    fig, axes = plt.subplots(len(panels), 1, figsize=(10, 2.2 + 0.55 * sum(len(r) for _, _, r in panels)),
                             squeeze=False)
    colors = plt.get_cmap("tab10").colors
    offset = 0  # each panel its own colours: the series differ (metrics above, VMMs in the IPI panel)
    for ax, (title, unit, rows) in zip(axes[:, 0], panels):
        series = list(dict.fromkeys(k for _, values in rows for k in values))
        height = 0.8 / len(series)
        for j, name in enumerate(series):
            ys = [i + (j - (len(series) - 1) / 2) * height for i, (_, values) in enumerate(rows) if name in values]
            xs = [values[name] for _, values in rows if name in values]
            ax.barh(ys, xs, height, label=name, color=colors[(offset + j) % len(colors)])
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels([label for label, _ in rows], fontsize=8)
        ax.invert_yaxis()
        if "log" in unit:
            ax.set_xscale("log")
        ax.set_xlabel(unit, fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.grid(axis="x", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        offset += len(series)
    fig.suptitle("pykvm against QEMU: boot and IPIs (medians; lower is better)", fontsize=11)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png
