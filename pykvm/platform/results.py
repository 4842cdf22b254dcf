"""What a run did: ``RunResult``, and the accounting of exits and time behind it.

``RunAccounting`` reads the vCPU loops' counters (pykvm's own, from the C
loop) and KVM's binary statistics (KVM_GET_STATS_FD) when a run starts and
when it ends, and turns the differences into a :class:`RunResult`: how the
run ended, the guest's serial output, exits per reason (handled in C or in
Python), the time split, and the guest / kernel / user split of the exits
(:class:`ExitSplit`; ``pykvm.inspect.split.format_split`` prints it).

KVM runs a guest in three places (see the README): guest mode, kernel mode
(exits KVM handles itself) and user mode (exits KVM_RUN returns).  pykvm
sees user-mode exits directly (the C loop counts every return of KVM_RUN);
kernel-mode exits are the difference between KVM's own ``exits`` counter
and that count.  Kernel counters are shown, not trusted blindly: on kvm_pvm
hosts ``io_exits`` stays 0 even for port I/O that reached user space.
"""

from __future__ import annotations

import time

from pykvm.exits import REASON_NAMES
from pykvm.values import Value

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


class ExitSplit(Value):
    """Where the exits of one run were handled, and where the time went."""

    __slots__ = ("kvm_exits", "user_exits", "kernel_exits", "interrupted", "by_reason", "kernel_counters",
                 "insn_emulation", "seconds", "seconds_in_run", "seconds_in_c", "seconds_in_python", "histograms")

    def __init__(
        self,
        kvm_exits: int | None,                      # KVM's 'exits' counter; None without a stats fd
        user_exits: int,                            # returned by KVM_RUN (pykvm counted them)
        kernel_exits: int | None,                   # kvm_exits - user_exits
        interrupted: int,                           # KVM_RUN returns for a signal / immediate_exit
        by_reason: dict[str, dict[str, int]],       # reason -> {total, c, python}
        kernel_counters: dict[str, int],            # deltas of KVM's cumulative counters
        insn_emulation: int | None,                 # instructions KVM emulated
        seconds: float,                             # wall time of run()
        seconds_in_run: float,                      # inside the KVM_RUN ioctl (guest + kernel mode)
        seconds_in_c: float,                        # C handlers
        seconds_in_python: float,                   # Python handlers (return to Python .. next KVM_RUN)
        histograms: dict[str, dict[str, list[int]]] | None = None,  # reason -> log2-ns buckets ({} if None)
    ) -> None:
        self.kvm_exits = kvm_exits
        self.user_exits = user_exits
        self.kernel_exits = kernel_exits
        self.interrupted = interrupted
        self.by_reason = by_reason
        self.kernel_counters = kernel_counters
        self.insn_emulation = insn_emulation
        self.seconds = seconds
        self.seconds_in_run = seconds_in_run
        self.seconds_in_c = seconds_in_c
        self.seconds_in_python = seconds_in_python
        self.histograms = {} if histograms is None else histograms

    @property
    def handled_in_c(self) -> int:
        return sum(v["c"] for k, v in self.by_reason.items() if k not in NOT_GUEST_EXITS)

    @property
    def handled_in_python(self) -> int:
        return sum(v["python"] for k, v in self.by_reason.items() if k not in NOT_GUEST_EXITS)

    def to_json(self) -> dict:
        """The fields, then ``handled_in_c`` and ``handled_in_python``: fresh dicts and lists (as ``asdict``)."""
        data = self.fields()
        data["by_reason"] = {k: dict(v) for k, v in self.by_reason.items()}
        data["kernel_counters"] = dict(self.kernel_counters)
        data["histograms"] = {k: {name: list(b) for name, b in v.items()} for k, v in self.histograms.items()}
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




REGISTER_NAMES = tuple("rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split())


class RunResult(Value):
    """How a run ended and what the guest did.

    ``ended`` is one of: ``hlt``, ``debug-exit``, ``reset``, ``shutdown``
    (triple fault), ``timeout``, ``interrupted`` (Ctrl-C), ``internal-error``,
    ``fail-entry``, ``guest-error`` (strict bus), ``system-event``,
    ``debug``, ``closed`` (``close()`` from another thread), ``unknown``, or
    the reason given to ``request_stop`` (``paused``).  ``exit_status`` is
    what a command line should return: the debug-exit status, 0 on a clean
    HLT or reset, None otherwise.
    """

    __slots__ = ("ended", "exit_status", "serial", "exits", "seconds", "seconds_in_run", "seconds_in_c",
                 "seconds_in_python", "regs", "message", "last_exit", "c_hits", "split")

    def __init__(self, ended: str, exit_status: int | None, serial: bytes, exits: dict[str, dict[str, int]],
                 seconds: float, seconds_in_run: float, seconds_in_c: float, seconds_in_python: float,
                 regs: dict[str, int] | None = None, message: str = "", last_exit: object = None,
                 c_hits: dict[str, int] | None = None, split: ExitSplit | None = None) -> None:
        self.ended = ended
        self.exit_status = exit_status
        self.serial = serial
        self.exits = exits
        self.seconds = seconds
        self.seconds_in_run = seconds_in_run
        self.seconds_in_c = seconds_in_c
        self.seconds_in_python = seconds_in_python
        self.regs = {} if regs is None else regs
        self.message = message
        self.last_exit = last_exit
        self.c_hits = {} if c_hits is None else c_hits
        self.split = split

    @property
    def serial_text(self) -> str:
        return self.serial.decode("utf-8", "replace")

    @property
    def clean(self) -> bool:
        """True for a guest that stopped itself (HLT, reset, debug-exit or ACPI power-off)."""
        return self.ended in ("hlt", "reset", "debug-exit", "poweroff")

    @property
    def user_exits(self) -> int:
        return sum(v["total"] for k, v in self.exits.items() if k not in NOT_GUEST_EXITS)

    def summary(self, *, with_message: bool = True) -> str:
        """One line for stderr: how it ended, status, exits and time (and the message's first line)."""
        by_reason = ", ".join(f"{name} {v['total']}" for name, v in sorted(self.exits.items()))
        status = "-" if self.exit_status is None else str(self.exit_status)
        line = (
            f"pykvm: {self.ended} (status {status}) after {self.seconds * 1e3:.1f} ms; "
            f"user exits: {by_reason or 'none'}"
        )
        if self.message and with_message:
            line += f"; {self.message.splitlines()[0]}"
        return line


class RunAccounting:
    """Counters of a machine's vCPU loops and stats fds, read at the start of a run and at its end."""

    def __init__(self, loops, stats_fds) -> None:
        self.loops = list(loops)
        self.stats_fds = [fd for fd in stats_fds if fd is not None]
        self.started = time.perf_counter()
        self._counters0 = [loop.cloop.counters() for loop in self.loops]
        self._histograms0 = [loop.cloop.histograms() for loop in self.loops]
        self._kernel0 = self._read_kernel()

    def _read_kernel(self) -> dict | None:
        if not self.stats_fds:
            return None
        total: dict[str, int] = {}
        for fd in self.stats_fds:
            for name, value in fd.read().items():
                if isinstance(value, int):
                    total[name] = total.get(name, 0) + value
        return total

    def result(self, ended: str, status: int | None, message: str, last_exit, serial: bytes,
               regs: dict[str, int]) -> RunResult:
        """The RunResult of the run that started when this object was made."""
        seconds = time.perf_counter() - self.started
        per_reason: dict[str, dict[str, int]] = {}
        times = {"seconds_in_run": 0.0, "seconds_in_c": 0.0, "seconds_in_python": 0.0}
        histograms: dict[str, dict[str, list[int]]] = {}
        hits: dict[str, int] = {}
        for loop, c0, h0 in zip(self.loops, self._counters0, self._histograms0):
            c1 = loop.cloop.counters()
            for key in times:
                times[key] += c1[key] - c0[key]
            for reason, now in c1["exits"].items():
                before = c0["exits"].get(reason, {"total": 0, "c": 0, "python": 0})
                name = REASON_NAMES.get(reason, str(reason))
                into = per_reason.setdefault(name, {"total": 0, "c": 0, "python": 0})
                for k in into:
                    into[k] += now[k] - before[k]
            for reason, now in loop.cloop.histograms().items():
                empty = [0] * len(now["handle"])
                before = h0.get(reason, {"handle": empty, "roundtrip": empty})
                name = REASON_NAMES.get(reason, str(reason))
                into = histograms.setdefault(name, {"handle": [0] * len(empty), "roundtrip": [0] * len(empty)})
                for k in ("handle", "roundtrip"):
                    into[k] = [a + b - c for a, b, c in zip(into[k], now[k], before[k])]
            for name, n in loop.cloop.hits().items():
                hits[name] = hits.get(name, 0) + n
        per_reason = {k: v for k, v in per_reason.items() if v["total"]}
        histograms = {k: v for k, v in histograms.items() if any(v["roundtrip"])}
        split = compute_split(self._kernel0, self._read_kernel(), per_reason, seconds,
                              times["seconds_in_run"], times["seconds_in_c"], times["seconds_in_python"],
                              histograms)
        return RunResult(ended=ended, exit_status=status, serial=serial, exits=per_reason, seconds=seconds,
                         regs=regs, message=message, last_exit=last_exit, c_hits=hits, split=split, **times)
