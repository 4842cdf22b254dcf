"""The guest / kernel / user split of one run, printed (``pykvm run --stats``).

The numbers come from ``pykvm.platform.results`` (``RunResult.split``, an
:class:`~pykvm.platform.results.ExitSplit`); this module only formats them.
"""

from __future__ import annotations

from pykvm.platform.results import ExitSplit

__all__ = ["format_split"]


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} us"


def _ns(ns: int) -> str:
    if ns < 1000:
        return f"{ns}ns"
    if ns < 1_000_000:
        return f"{ns / 1e3:.3g}us"
    return f"{ns / 1e6:.3g}ms"


def _histogram_line(buckets: list[int]) -> str:
    """Non-empty log2 buckets as '<8.19us:38 <16.4us:1' (bucket i holds [2^i, 2^(i+1)) ns)."""
    return " ".join(f"<{_ns(1 << (i + 1))}:{n}" for i, n in enumerate(buckets) if n) or "-"


def format_split(split: ExitSplit) -> str:
    """The split as a table (what ``pykvm run --stats`` prints)."""
    lines = ["where the exits went"]
    if split.kvm_exits is None:
        lines.append("  exits KVM saw            n/a (no KVM_GET_STATS_FD on this host)")
    else:
        lines.append(f"  exits KVM saw            {split.kvm_exits:>10,}   (vCPU stat 'exits')")
        lines.append(f"  handled in the kernel    {split.kernel_exits:>10,}   (= exits KVM saw - returned to user space)")
    lines.append(f"  returned to user space   {split.user_exits:>10,}   (counted by pykvm's run loop)")
    lines.append(f"    handled in C           {split.handled_in_c:>10,}")
    lines.append(f"    handled in Python      {split.handled_in_python:>10,}")
    if split.interrupted:
        lines.append(f"  interrupted (signals)    {split.interrupted:>10,}   (not guest exits)")
    if split.insn_emulation is not None:
        lines.append(f"  instructions emulated    {split.insn_emulation:>10,}   (vCPU stat 'insn_emulation')")
    lines.append("")
    lines.append("user-space exits by reason      total        C   Python")
    for reason, v in sorted(split.by_reason.items()):
        lines.append(f"  {reason:<26} {v['total']:>9,} {v['c']:>8,} {v['python']:>8,}")
    lines.append("")
    lines.append("kernel counters (delta)       kernel    pykvm")
    ours = {"io_exits": split.by_reason.get("io", {}).get("total", 0),
            "mmio_exits": split.by_reason.get("mmio", {}).get("total", 0),
            "halt_exits": split.by_reason.get("hlt", {}).get("total", 0)}
    for name, value in split.kernel_counters.items():
        if value or name in ours:
            mine = ours.get(name)
            note = ""
            if mine is not None and mine != value:
                note = "  <- the kernel's counter disagrees with what reached user space"
            lines.append(f"  {name:<26} {value:>9,} {'' if mine is None else f'{mine:>8,}'}{note}")
    lines.append("")
    lines.append("time")
    lines.append(f"  wall                      {_us(split.seconds):>14}")
    lines.append(f"  inside KVM_RUN            {_us(split.seconds_in_run):>14}   (guest + kernel mode)")
    lines.append(f"  C handlers                {_us(split.seconds_in_c):>14}")
    lines.append(f"  Python handlers           {_us(split.seconds_in_python):>14}")
    if split.histograms:
        lines.append("")
        lines.append("per-exit latency (log2 buckets)")
        for reason, h in sorted(split.histograms.items()):
            lines.append(f"  {reason:<6} handling   {_histogram_line(h['handle'])}")
            lines.append(f"  {reason:<6} round trip {_histogram_line(h['roundtrip'])}")
    return "\n".join(lines)
