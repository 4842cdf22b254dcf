"""The guest / kernel / user split of one run.

KVM runs a guest in three places (see the README): guest mode, kernel mode
(exits KVM handles itself) and user mode (exits KVM_RUN returns).  pykvm
sees user-mode exits directly (the C loop counts every return of KVM_RUN);
kernel-mode exits are the difference between KVM's own ``exits`` counter
(binary stats fd, KVM_GET_STATS_FD) and that count.

Kernel counters are shown, not trusted blindly: on kvm_pvm hosts
``io_exits`` stays 0 even for port I/O that reached user space, so pykvm's
own count is printed beside it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# Exits that are returns of KVM_RUN without the guest having exited for a
# reason of its own: a signal or immediate_exit.  Reported, but not counted
# as user-mode exits.
NOT_GUEST_EXITS = ("intr",)

# Kernel statistics worth showing next to pykvm's own counts.
KERNEL_COUNTERS = (
    "exits", "io_exits", "mmio_exits", "halt_exits", "insn_emulation", "irq_exits",
    "signal_exits", "request_irq_exits", "irq_window_exits", "nmi_window_exits",
    "irq_injections", "host_state_reload", "fpu_reload", "pf_taken", "pf_fixed", "tlb_flush",
)


@dataclass(frozen=True)
class ExitSplit:
    """Where the exits of one run were handled, and where the time went."""

    kvm_exits: int | None                      # KVM's 'exits' counter; None without a stats fd
    user_exits: int                            # returned by KVM_RUN (pykvm counted them)
    kernel_exits: int | None                   # kvm_exits - user_exits
    interrupted: int                           # KVM_RUN returns for a signal / immediate_exit
    by_reason: dict[str, dict[str, int]]       # reason -> {total, c, python}
    kernel_counters: dict[str, int]            # deltas of KVM's cumulative counters
    insn_emulation: int | None                 # instructions KVM emulated
    seconds: float                             # wall time of run()
    seconds_in_run: float                      # inside the KVM_RUN ioctl (guest + kernel mode)
    seconds_in_c: float                        # C handlers
    seconds_in_python: float                   # Python handlers (return to Python .. next KVM_RUN)
    histograms: dict[str, dict[str, list[int]]] = field(default_factory=dict)  # reason -> log2-ns buckets

    @property
    def handled_in_c(self) -> int:
        return sum(v["c"] for k, v in self.by_reason.items() if k not in NOT_GUEST_EXITS)

    @property
    def handled_in_python(self) -> int:
        return sum(v["python"] for k, v in self.by_reason.items() if k not in NOT_GUEST_EXITS)

    def to_json(self) -> dict:
        data = asdict(self)
        data["handled_in_c"] = self.handled_in_c
        data["handled_in_python"] = self.handled_in_python
        return data


def compute_split(
    before: dict | None, after: dict | None, by_reason: dict[str, dict[str, int]], seconds: float,
    seconds_in_run: float, seconds_in_c: float, seconds_in_python: float,
    histograms: dict[str, dict[str, list[int]]] | None = None,
) -> ExitSplit:
    """Build the split from two readings of the vCPU stats fd and pykvm's counters."""
    interrupted = sum(by_reason.get(k, {}).get("total", 0) for k in NOT_GUEST_EXITS)
    user = sum(v["total"] for k, v in by_reason.items() if k not in NOT_GUEST_EXITS)
    counters: dict[str, int] = {}
    kvm_exits = kernel = insn = None
    if before is not None and after is not None:
        for name in KERNEL_COUNTERS:
            if name in after and isinstance(after[name], int):
                counters[name] = after[name] - before.get(name, 0)
        kvm_exits = counters.get("exits")
        insn = counters.get("insn_emulation")
        if kvm_exits is not None:
            kernel = max(kvm_exits - user, 0)
    return ExitSplit(
        kvm_exits=kvm_exits, user_exits=user, kernel_exits=kernel, interrupted=interrupted,
        by_reason=by_reason, kernel_counters=counters, insn_emulation=insn, seconds=seconds,
        seconds_in_run=seconds_in_run, seconds_in_c=seconds_in_c, seconds_in_python=seconds_in_python,
        histograms=histograms or {},
    )


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
