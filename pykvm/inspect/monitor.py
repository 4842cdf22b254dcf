"""A QEMU-style monitor for a running :class:`~pykvm.platform.machine.Machine`.

``pykvm run ... -monitor stdio`` gives a ``(pykvm)`` prompt; so does
``--monitor-script FILE`` for a file of commands (answers on stdout; the
guest then starts stopped, as with QEMU's ``-S``).  The commands, spelled
as in QEMU's monitor where QEMU has them::

    info registers      registers with RFLAGS, CR0, CR3, CR4, EFER decoded,
                        segments, mode name, CPL, debug registers, code at RIP
    info cpus           every vCPU: PC, mode, state, thread (* the selected one)
    cpu N               select vCPU N for info registers, info mem, x and translate
    info mem            the guest's mappings, from its page tables
    info stats          exits per reason (C loop / Python), time split, KVM's vCPU stats
    info break          breakpoints
    info status         running or stopped, and why
    x/Ni ADDR           disassemble N instructions at linear ADDR (16/32/64-bit as the vCPU)
    x/Nx ADDR           N words in hex at linear ADDR (x/Nxb, x/Nxh, x/Nxw, x/Nxg for sizes)
    xp/Nx PADDR         the same at a guest-physical address
    translate GVA       GVA -> GPA (each level) -> HVA (slot) -> HPA
    stop | cont         pause / resume the guest
    step [N]            single-step N instructions (default 1), printing each
    break ADDR [hw|sw]  breakpoint at linear ADDR (sw falls back to hw where the host cannot)
    delete [N]          delete breakpoint N, or all
    wait [SECONDS]      (pykvm) wait until the guest stops: for scripts, after cont
    system_wakeup       wake a guest suspended to RAM (ACPI S3; -M pc)
    quit                stop the guest and leave

Addresses are numbers (``0x100000``, ``1048576``) or registers (``$rip``,
``$pc``, ``$rsp+8``).  Commands that read the vCPU while the guest runs
pause it for the moment they need, as QEMU's do.

:class:`Monitor` needs no terminal: ``execute(line)`` returns the answer, so
tests feed lines and check what comes back.  ``pykvm.inspect.console_mux``
shares one terminal between the guest's serial console and the monitor.
"""

from __future__ import annotations

import functools
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterable

from pykvm._native_loader import lib
from pykvm.errors import MonitorError, TraceError
from pykvm.inspect.monitor_syntax import format_unit, number, parse_address, parse_format, read_physical
from pykvm.inspect.monitor_snapshot import STATE_COMMANDS, info_migrate, state_command
from pykvm.inspect.registers import dump_registers
from pykvm.inspect.trace_format import format_breakpoint, format_mode, format_step, format_stop
from pykvm.inspect.tracer import Stop, Tracer
from pykvm.x86 import bits
from pykvm.x86.cpu_view import code_bits, read_linear
from pykvm.x86.disasm import disassemble

if TYPE_CHECKING:
    from pykvm.platform.machine import Machine

__all__ = ["Monitor", "MonitorError", "parse_address", "wait_until_stopped", "PROMPT", "HELP"]

PROMPT = "(pykvm) "

HELP = """\
info registers|cpus|mem|stats|break|status | cpu N   (cpu selects the vCPU info, x and translate show)
x/Ni ADDR | x/Nx[bhwg] ADDR | xp/Nx[bhwg] PADDR
translate GVA
stop | cont | step [N] | wait [SECONDS]   (cont returns at once; wait blocks until the guest stops)
break ADDR [hw|sw] | delete [N]
system_wakeup   (resume a guest suspended to RAM, ACPI S3)
savevm FILE | loadvm FILE | migrate tcp:HOST:PORT|unix:PATH | info migrate   (pykvm.inspect.monitor_snapshot)
quit
ADDR: a number (0x100000) or a register ($rip, $pc, $rsp+8)"""

_PAUSE_REASON = "monitor"  # request_stop reason for the monitor's own short pauses


# ---------------------------------------------------------------------------
# The monitor
# ---------------------------------------------------------------------------


class Monitor:
    """Commands on a machine; ``execute(line) -> answer``.

    ``notify`` (optional) receives a line when the guest stops by itself
    while running (breakpoint, HLT...); without it, ``wait`` and ``info
    status`` report that.  ``timeout`` bounds ``wait`` without an argument.
    """

    def __init__(self, machine: "Machine", *, notify: Callable[[str], None] | None = None,
                 wait_timeout: float = 60.0) -> None:
        self.machine = machine
        self.selected = 0  # the vCPU info registers, info mem, x and translate show (cpu N)
        self.tracer = Tracer(machine)
        self.notify = notify
        self.wait_timeout = wait_timeout
        self.quit_requested = False
        self.last_stop: Stop | None = None
        self._worker: threading.Thread | None = None
        self._worker_tid: int | None = None
        self._worker_stop: Stop | None = None
        self._worker_error: BaseException | None = None
        self._stopped_event = threading.Event()
        self._lock = threading.RLock()
        self._stats_fd = None
        self._ever_ran = False
        self._busy = False
        self._deferred: list[str] = []
        self._notice_lock = threading.Lock()

    # -- lifecycle -------------------------------------------------------------------
    @property
    def running(self) -> bool:
        worker = self._worker
        return worker is not None and worker.is_alive()

    def close(self) -> None:
        """Stop the guest if it runs; turn guest debugging off."""
        self._pause(reason="paused")
        if self._stats_fd is not None:
            self._stats_fd.close()
            self._stats_fd = None
        if not self.machine.vcpu.closed:
            self.tracer.close()

    def __enter__(self) -> "Monitor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- running the guest in a worker thread --------------------------------------------
    def start(self) -> None:
        """Resume the guest in a worker thread (``cont``)."""
        with self._lock:
            if self.running:
                return
            self._join()
            self._stopped_event.clear()
            self._worker_stop = None
            self._worker_error = None
            self._ever_ran = True
            self._worker = threading.Thread(target=self._work, name="pykvm-vcpu0", daemon=True)
            self._worker.start()

    def _work(self) -> None:
        self._worker_tid = threading.get_native_id()
        try:
            stop = self.tracer.cont()
        except BaseException as exc:  # reported by the next command; the thread must not die silently
            self._worker_error = exc
            stop = Stop("error", None, f"{type(exc).__name__}: {exc}")
        self._worker_stop = stop
        self._worker_tid = None
        if stop.reason not in (_PAUSE_REASON, "paused"):
            self.last_stop = stop
            self._notice(f"guest stopped: {format_stop(stop)}")
        self._stopped_event.set()

    def _notice(self, text: str) -> None:
        """Tell ``notify`` now, or after the command being executed (whose answer comes first)."""
        with self._notice_lock:
            if self.notify is None:
                return
            if self._busy:
                self._deferred.append(text)
                return
        self.notify(text)

    def _join(self) -> None:
        worker = self._worker
        if worker is not None:
            worker.join()
            self._worker = None
            stop = self._worker_stop
            if stop is not None and stop.reason not in (_PAUSE_REASON, "paused"):
                self.machine.cancel_stop()  # our request (if any) came after the run had ended

    def _pause(self, reason: str = _PAUSE_REASON) -> bool:
        """Stop the worker if it runs; return True if it was running."""
        with self._lock:
            if not self.running:
                self._join()
                return False
            self.machine.request_stop(reason)
            self._join()
            stop = self._worker_stop
            if stop is not None and stop.reason == "paused":
                self.last_stop = stop
            return stop is not None and stop.reason in (_PAUSE_REASON, "paused")

    def _with_vcpu(self, action: Callable[[], str]) -> str:
        """Run ``action`` with the vCPU stopped; resume afterwards if it was running."""
        was_running = self._pause()
        try:
            return action()
        finally:
            if was_running:
                self.start()

    # -- commands ----------------------------------------------------------------------
    def execute(self, line: str) -> str:
        """Run one command line; return its answer ('' for none).  Never raises for bad input.

        With ``notify`` set, a stop that happened while the command ran is
        appended to the answer (except for ``wait``, whose answer says it).
        """
        with self._notice_lock:
            self._busy = True
        try:
            answer = self._execute(line)
        finally:
            with self._notice_lock:
                self._busy = False
                deferred, self._deferred = self._deferred, []
        if deferred and line.split()[:1] not in (["wait"], ["stop"]):
            answer = "\n".join(([answer] if answer else []) + deferred)
        return answer

    def _execute(self, line: str) -> str:
        line = line.strip()
        if not line or line.startswith("#"):
            return ""
        head, _, rest = line.partition(" ")
        name, _, fmt = head.partition("/")
        rest = rest.strip()
        if name in ("x", "xp") and not fmt and rest.startswith("/"):  # "x /4x ADDR", as QEMU takes it
            fmt, _, rest = rest[1:].partition(" ")
            rest = rest.strip()
        handler = {
            "info": self._cmd_info, "i": self._cmd_info,
            "cpu": self._cmd_cpu,
            "x": self._cmd_x, "xp": self._cmd_xp,
            "translate": self._cmd_translate,
            "stop": self._cmd_stop,
            "cont": self._cmd_cont, "c": self._cmd_cont,
            "step": self._cmd_step, "s": self._cmd_step,
            "break": self._cmd_break, "b": self._cmd_break,
            "delete": self._cmd_delete, "d": self._cmd_delete,
            "wait": self._cmd_wait,
            "system_wakeup": self._cmd_system_wakeup,
            **{name: functools.partial(state_command, self, name) for name in STATE_COMMANDS},
            "quit": self._cmd_quit, "q": self._cmd_quit,
            "help": self._cmd_help, "?": self._cmd_help,
        }.get(name)
        if handler is None:
            return f"unknown command: '{name}' (try help)"
        if fmt and name not in ("x", "xp"):
            return f"{name} takes no /format"
        try:
            if name in ("x", "xp"):
                return handler(fmt, rest)
            return handler(rest)
        except (MonitorError, TraceError) as exc:
            return str(exc)
        except OSError as exc:
            return f"error: {exc}"

    def run_script(self, lines: Iterable[str], write: Callable[[str], None]) -> None:
        """Execute ``lines`` in order, writing ``(pykvm) command`` and its answer for each."""
        for line in lines:
            text = line.strip()
            if not text or text.startswith("#"):
                continue
            write(f"{PROMPT}{text}\n")
            answer = self.execute(text)
            if answer:
                write(answer.rstrip("\n") + "\n")
            if self.quit_requested:
                return

    def _cmd_help(self, rest: str) -> str:
        return HELP

    def _cmd_quit(self, rest: str) -> str:
        self._pause(reason="paused")
        self.quit_requested = True
        return ""

    # info ...
    def _cmd_info(self, rest: str) -> str:
        what = rest.split()[0] if rest.split() else ""
        table = {
            "registers": self._info_registers, "cpus": self._info_cpus, "mem": self._info_mem,
            "stats": self._info_stats, "break": self._info_break, "breakpoints": self._info_break,
            "status": self._info_status, "tlb": self._info_mem, "migrate": lambda: info_migrate(self),
        }
        if not what:
            return "info registers|cpus|mem|stats|break|status|name"
        if what == "name":
            return getattr(self, "name", "") or "(no name: -name NAME gives one)"
        if what not in table:
            return f"unknown info command {what!r}: info registers|cpus|mem|stats|break|status|name"
        return table[what]()

    def _info_registers(self) -> str:
        return self._with_vcpu(lambda: dump_registers(self.vcpu, self.machine.memory))

    def _state_words(self) -> str:
        board = self.machine.board
        if board is not None and board.sleep.suspended:
            return "suspended (ACPI S3)"
        if self.running:
            return "running"
        if self.last_stop is None:
            return "stopped" + (" (not started)" if not self._ever_ran else "")
        return f"stopped: {format_stop(self.last_stop)}"

    def _info_status(self) -> str:
        return f"VM status: {self._state_words()}"

    def _info_cpus(self) -> str:
        state = self._state_words()
        tid = self._worker_tid

        def read() -> str:
            lines = []
            for vcpu in self.machine.vcpus:
                regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
                thread = f" thread_id={tid}" if tid and vcpu.id == 0 else ""
                mark = "*" if vcpu is self.vcpu else " "
                waiting = (" (waiting for SIPI)" if vcpu.id and vcpu.get_mp_state() == lib.KVM_MP_STATE_UNINITIALIZED
                           else "")
                lines.append(f"{mark} CPU #{vcpu.id}: pc={regs.rip:#018x} ({format_mode(sregs)}){thread} {state}"
                             f"{waiting}")
            return "\n".join(lines)
        return self._with_vcpu(read)

    def _cmd_cpu(self, rest: str) -> str:
        """``cpu N``: the vCPU that info registers, info mem, x and translate show (QEMU's ``cpu``)."""
        try:
            index = int(rest, 0)
        except ValueError:
            return "cpu N (a vCPU index: see info cpus)"
        if not 0 <= index < len(self.machine.vcpus):
            return f"no CPU #{index}: this machine has {len(self.machine.vcpus)}"
        self.selected = index
        return ""

    @property
    def vcpu(self):
        """The selected vCPU (``cpu N``; the boot CPU until then)."""
        return self.machine.vcpus[self.selected]

    def _info_mem(self) -> str:
        from pykvm.inspect.translate import format_mappings, mappings

        def read() -> str:
            sregs = self.vcpu.get_sregs()
            if not sregs.cr0 & bits.CR0_PG:
                return ("paging is off (CR0.PG=0): linear addresses are guest-physical; RAM: "
                        + self.machine.memory.describe())
            maps = mappings(self.machine.memory.read, sregs)
            if not maps:
                return "no mappings (the page tables map nothing)"
            return format_mappings(maps)
        return self._with_vcpu(read)

    def _info_stats(self) -> str:
        from pykvm.exits import REASON_NAMES

        counters = self.machine.loop.cloop.counters()
        lines = ["exits that reached user space (total = C loop + Python):"]
        user_total = 0
        for reason, c in sorted(counters["exits"].items(), key=lambda kv: REASON_NAMES.get(kv[0], str(kv[0]))):
            name = REASON_NAMES.get(reason, str(reason))
            if name != "intr":
                user_total += c["total"]
            lines.append(f"  {name:<16} {c['total']:>8}  (C {c['c']}, Python {c['python']})")
        if len(lines) == 1:
            lines.append("  none yet")
        lines.append(
            f"time in KVM_RUN {counters['seconds_in_run'] * 1e3:.3f} ms, in C handlers "
            f"{counters['seconds_in_c'] * 1e3:.3f} ms, in Python handlers {counters['seconds_in_python'] * 1e3:.3f} ms"
        )
        tr = self.tracer
        lines.append(f"tracer: {tr.steps_done} steps, {tr.debug_exits} single-step/breakpoint debug exits")
        try:
            if self._stats_fd is None:
                self._stats_fd = self.vcpu.stats_fd()
            values = self._stats_fd.read()
        except OSError as exc:
            lines.append(f"vCPU stats: KVM_GET_STATS_FD failed: {exc}")
            return "\n".join(lines)
        shown = {k: v for k, v in values.items() if isinstance(v, int) and v}
        lines.append(f"vCPU stats ({self._stats_fd.id or 'KVM_GET_STATS_FD'}, nonzero counters):")
        for key in sorted(shown):
            lines.append(f"  {key:<28} {shown[key]}")
        if isinstance(values.get("exits"), int):
            kernel = values["exits"] - user_total
            lines.append(f"exits handled in the kernel (vCPU 'exits' minus those above): {max(kernel, 0)}")
        return "\n".join(lines)

    def _info_break(self) -> str:
        bps = self.tracer.breakpoints
        if not bps:
            return "no breakpoints"
        return "\n".join(format_breakpoint(bp) for bp in bps)

    # memory
    def _cmd_x(self, fmt: str, rest: str) -> str:
        return self._examine(fmt, rest, physical=False)

    def _cmd_xp(self, fmt: str, rest: str) -> str:
        return self._examine(fmt, rest, physical=True)

    def _examine(self, fmt: str, rest: str, physical: bool) -> str:
        count, kind, size = parse_format(fmt)
        if not rest:
            raise MonitorError(f"{'xp' if physical else 'x'}/{fmt} needs an address")
        if count > 4096:
            raise MonitorError("at most 4096 units at a time")

        def read() -> str:
            vcpu, memory = self.vcpu, self.machine.memory
            regs, sregs = vcpu.get_regs(), vcpu.get_sregs()
            address = parse_address(rest, regs)
            if kind == "i":
                want = count * 15
                if physical:
                    data = read_physical(memory, address, want)
                else:
                    data = read_linear(memory, sregs, address, want)
                if not data:
                    raise MonitorError(f"Cannot access memory at {address:#x}")
                nbits = code_bits(sregs)
                ip = address
                if not physical and nbits == 16:
                    ip = (address - sregs.cs.base) & 0xFFFF  # capstone wants IP for relative targets
                insns = disassemble(data, ip, nbits, count, linear=address)
                if not insns:
                    return f"{address:#018x}:  {data[:1].hex()}  (bad)"
                return "\n".join(f"{i.linear:#018x}:  {i.raw.hex(' '):<24} {i.text}" for i in insns)
            want = count * size
            data = read_physical(memory, address, want) if physical else read_linear(memory, sregs, address, want)
            if len(data) < size:
                raise MonitorError(f"Cannot access memory at {address:#x}")
            units = [data[i:i + size] for i in range(0, len(data) - len(data) % size, size)]
            per_line = max(1, 16 // size)
            lines = []
            for start in range(0, len(units), per_line):
                cells = [format_unit(u, kind, size) for u in units[start:start + per_line]]
                lines.append(f"{address + start * size:016x}: " + " ".join(cells))
            if len(units) < count:
                lines.append(f"Cannot access memory at {address + len(units) * size:#x}")
            return "\n".join(lines)
        return self._with_vcpu(read)

    def _cmd_translate(self, rest: str) -> str:
        from pykvm.inspect.translate import translate_address

        if not rest:
            raise MonitorError("translate needs a guest-virtual (linear) address")

        def read() -> str:
            address = parse_address(rest, self.vcpu.get_regs())
            return str(translate_address(self.vcpu, self.machine.memory, address))
        return self._with_vcpu(read)

    # execution control
    def _cmd_stop(self, rest: str) -> str:
        if not self.running:
            return f"already stopped at rip {self.machine.vcpu.get_regs().rip:#x}"
        self._pause(reason="paused")
        return f"stopped at rip {self.machine.vcpu.get_regs().rip:#x}"

    def _cmd_cont(self, rest: str) -> str:
        if self.running:
            return "already running"
        rip = self.machine.vcpu.get_regs().rip
        self.last_stop = None
        self.start()
        return f"continuing at rip {rip:#x}"

    def _cmd_step(self, rest: str) -> str:
        count = number(rest) if rest else 1
        if count < 1:
            raise MonitorError("step takes a positive count")
        self._pause(reason="paused")
        lines = [format_step(step) for step in self.tracer.trace(count)]
        self.last_stop = self.tracer.last_stop or Stop("step", None, "", self.machine.vcpu.get_regs().rip)
        return "\n".join(lines)

    def _cmd_system_wakeup(self, rest: str) -> str:
        """QEMU's system_wakeup: a wake event for a machine in ACPI S3 (it resumes at the waking vector)."""
        board = self.machine.board
        if board is None or not board.sleep.wakeup():
            return "the guest is not suspended"
        return ""

    def _cmd_wait(self, rest: str) -> str:
        seconds = float(rest) if rest else self.wait_timeout
        worker = self._worker
        if worker is None:
            return f"VM status: {self._state_words()}"
        worker.join(seconds)
        if worker.is_alive():
            return f"still running after {seconds:g} s"
        self._join()
        return f"VM status: {self._state_words()}"

    def _cmd_break(self, rest: str) -> str:
        parts = rest.split()
        if not parts or len(parts) > 2 or (len(parts) == 2 and parts[1] not in ("hw", "sw")):
            raise MonitorError("break ADDR [hw|sw]")
        kind = parts[1] if len(parts) == 2 else "hw"

        def add() -> str:
            address = parse_address(parts[0], self.machine.vcpu.get_regs())
            bp = self.tracer.add_breakpoint(address, kind)
            where = f"DR{bp.slot}" if bp.slot is not None else "int3"
            line = f"breakpoint {bp.number} at {bp.address:#x} ({bp.kind}, {where})"
            if bp.note:
                line += f"\nnote: {bp.note}"
            return line
        return self._with_vcpu(add)

    def _cmd_delete(self, rest: str) -> str:
        def delete() -> str:
            if not rest:
                n = self.tracer.clear_breakpoints()
                return f"deleted {n} breakpoint{'s' if n != 1 else ''}"
            bp = self.tracer.remove_breakpoint(number(rest))
            return f"deleted breakpoint {bp.number} at {bp.address:#x}"
        return self._with_vcpu(delete)


def wait_until_stopped(monitor: Monitor, timeout: float | None) -> Stop | None:
    """Block until the guest stops by itself (or ``timeout`` seconds pass: then pause it)."""
    worker = monitor._worker
    deadline = None if timeout is None else time.monotonic() + timeout
    while worker is not None and worker.is_alive():
        left = None if deadline is None else deadline - time.monotonic()
        if left is not None and left <= 0:
            monitor._pause(reason="paused")
            return Stop("timeout", None, "stopped by --timeout")
        worker.join(0.1 if left is None else min(left, 0.1))
    monitor._join()
    return monitor.last_stop
