"""See inside the vCPU: single-stepping, breakpoints and exit tracing.

A :class:`Tracer` drives a :class:`~pykvm.platform.machine.Machine` one
instruction at a time with ``KVM_SET_GUEST_DEBUG``, through the machine's
one vCPU loop (``pykvm.platform.vcpu_loop``)::

    with Machine(memory="16M") as m:
        m.load_guest("hello16")
        with Tracer(m) as tracer:
            for step in tracer.trace(50):
                print(format_step(step))          # pykvm.inspect.trace_format

The mechanics are here (this class and its values: :class:`Step`,
:class:`ExitEvent`, :class:`Stop`, :class:`Breakpoint`); the printing is in
``pykvm.inspect.trace_format``.  How each feature works, and what KVM does
underneath:

- ``step()``: KVM_GUESTDBG_SINGLESTEP, one KVM_EXIT_DEBUG per instruction.
  The loop runs with every exit decoded (the C loop's rows are off), so
  each port and MMIO exit is recorded on the step before the devices handle
  it.  A ``hlt`` at CPL 0 is run *without* single-step: KVM would otherwise
  step over it without halting (seen on nested kvm_pvm hosts).  An
  instruction that exits to user space is completed with ``immediate_exit``
  (the loop's ``after_io="complete"``): on kvm_pvm its single-step trap is
  lost, and a plain re-entry would run the next instruction too.
- hardware breakpoints: DR0-DR3 and DR7 through KVM_GUESTDBG_USE_HW_BP (at
  most four).  An instruction breakpoint fires *before* the instruction, so
  continuing from one re-triggers it; ``cont()`` steps over it first.
- software breakpoints: ``int3`` written over the instruction while the
  guest runs, with KVM_GUESTDBG_USE_SW_BP, where the host supports it
  (``pykvm.inspect.debug_support`` measures that); elsewhere a hardware
  breakpoint is used instead and the breakpoint's ``note`` says why.
- ``exits()``: one :class:`ExitEvent` per exit that reaches user space,
  stepping where the host can (each event then names the exact
  instruction: KVM leaves RIP after an OUT, MMIO write or HLT but *at* an IN
  or MMIO read), else running freely with RIP as KVM left it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pykvm import exits
from pykvm.errors import TraceError
from pykvm.inspect.debug_support import (
    DR7_FIXED, ENABLE, SINGLESTEP, USE_HW_BP, USE_SW_BP, DebugSupport, debug_support, probe_mode,
)
from pykvm.x86 import bits
from pykvm.x86.cpu_view import code_bits, instruction_at_rip, linear_rip, linear_to_physical
from pykvm.x86.disasm import Instruction
from pykvm.x86.state import cpl

if TYPE_CHECKING:
    from pykvm.platform.machine import Machine

__all__ = ["Breakpoint", "ExitEvent", "Step", "Stop", "TraceError", "Tracer", "GPRS", "REGS",
           "MAX_HW_BREAKPOINTS"]

MAX_HW_BREAKPOINTS = 4
INT3 = b"\xcc"

GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
REGS = GPRS + ("rflags",)
_CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")
_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")
_SREG_NAMES = _CONTROL + _SEGMENTS + ("gdt.base", "gdt.limit", "idt.base", "idt.limit")
_KVM_REASON = {"io_out": "io", "io_in": "io", "mmio_write": "mmio", "mmio_read": "mmio"}


@dataclass(frozen=True)
class ExitEvent:
    """An exit that reached user space while tracing.

    ``rip`` is the address of the instruction that caused it when the
    tracer single-stepped (exact), else ``None``; ``rip_at_exit`` is RIP as
    KVM left it.  ``instruction`` is the causing instruction when known,
    else the one at ``rip_at_exit``.
    """

    number: int
    exit: object
    rip: int | None
    rip_at_exit: int
    instruction: Instruction | None
    stepped: bool

    @property
    def reason(self) -> str:
        """pykvm's name: ``io_out``, ``io_in``, ``mmio_write``, ``mmio_read``, ``hlt``, ..."""
        return getattr(self.exit, "reason", type(self.exit).__name__)

    @property
    def kvm_reason(self) -> str:
        """KVM's KVM_EXIT_* name, as ``RunResult.exits`` counts them: ``io``, ``mmio``, ``hlt``, ..."""
        return _KVM_REASON.get(self.reason, self.reason)


@dataclass(frozen=True)
class Stop:
    """Why the guest stopped.

    ``reason`` uses RunResult's words (``hlt``, ``debug-exit``, ``reset``,
    ``shutdown``, ``internal-error``, ``fail-entry``, ``guest-error``,
    ``timeout``, ``paused``, ...) plus ``breakpoint``.  ``rip`` is RIP
    afterwards.
    """

    reason: str
    status: int | None = None
    message: str = ""
    rip: int = 0
    breakpoint: "Breakpoint | None" = None
    exit: object = None

    @property
    def clean(self) -> bool:
        return self.reason in ("hlt", "reset", "debug-exit")


@dataclass(frozen=True)
class Step:
    """One executed instruction and what it did.

    ``changed`` lists ``(name, before, after)`` for every general register,
    RFLAGS, control register, EFER, segment selector and descriptor-table
    register it changed (RIP is not listed: the next step's address shows
    it).  ``exits`` are the user-space exits it caused; ``stop`` is set when
    the guest stopped at this instruction (HLT, debug-exit, triple fault...).
    """

    number: int
    instruction: Instruction
    changed: tuple[tuple[str, int, int], ...]
    exits: tuple[ExitEvent, ...] = ()
    stop: Stop | None = None
    rip_after: int = 0


@dataclass
class Breakpoint:
    """A breakpoint at a linear address.

    ``requested`` is the kind asked for (``hw`` or ``sw``), ``kind`` the
    one in use; ``note`` says why they differ.  ``slot`` is the debug
    register (0-3) of a hardware breakpoint; ``hits`` counts stops.
    """

    number: int
    address: int
    kind: str
    requested: str
    slot: int | None = None
    note: str = ""
    hits: int = 0


def _regs_tuple(regs) -> tuple[int, ...]:
    return tuple(getattr(regs, name) for name in REGS)


def _sregs_tuple(sregs) -> tuple[int, ...]:
    values = [getattr(sregs, name) for name in _CONTROL]
    values += [getattr(sregs, name).selector for name in _SEGMENTS]
    values += [sregs.gdt.base, sregs.gdt.limit, sregs.idt.base, sregs.idt.limit]
    return tuple(values)


def _diff(names, before, after) -> list[tuple[str, int, int]]:
    return [(n, a, b) for n, a, b in zip(names, before, after) if a != b]


class Tracer:
    """Single-step, break and watch exits on a :class:`~pykvm.platform.machine.Machine`'s vCPU.

    ``on_exit`` (optional) is called with each :class:`ExitEvent` as it
    happens.  The tracer is not thread-safe: use it from the thread that
    would call ``machine.run()``.
    """

    def __init__(self, machine: "Machine", *, on_exit: Callable[[ExitEvent], None] | None = None) -> None:
        self.machine = machine
        self.vcpu = machine.vcpu
        self.loop = machine.loop
        self.on_exit = on_exit
        self.steps_done = 0
        self.exits_seen = 0
        self.debug_exits = 0
        self.exit_counts: dict[str, int] = {}
        self._breakpoints: dict[int, Breakpoint] = {}
        self._next_bp = 1
        self._debug_state: tuple[int, tuple[int, ...]] | None = None
        self._stop: Stop | None = None
        self.last_result = None
        self.notes: list[str] = []
        """What the host could not do, in words (fallbacks taken so far)."""

    # -- lifecycle -------------------------------------------------------------
    def close(self) -> None:
        """Turn guest debugging off (the C loop's rows come back with the next normal run)."""
        self._set_debug(0, ())

    def __enter__(self) -> "Tracer":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.vcpu.closed:
            self.close()

    def _set_debug(self, control: int, debugreg: tuple[int, ...]) -> None:
        state = (control, tuple(debugreg))
        if state != self._debug_state:
            self.vcpu.set_guest_debug(control, debugreg)
            self._debug_state = state

    # -- state -------------------------------------------------------------------
    def support(self, sregs=None) -> DebugSupport:
        """What this host's KVM can do in the vCPU's current mode (probed once per mode)."""
        return debug_support(probe_mode(sregs or self.vcpu.get_sregs()), self.machine.kvm)

    def instruction(self, regs=None, sregs=None) -> Instruction | None:
        """The instruction at CS:RIP, or None when its bytes are not in guest memory."""
        regs = regs or self.vcpu.get_regs()
        sregs = sregs or self.vcpu.get_sregs()
        return instruction_at_rip(self.machine.memory, regs, sregs)

    @staticmethod
    def linear_rip(regs, sregs) -> int:
        return linear_rip(regs, sregs)

    # -- breakpoints ---------------------------------------------------------------
    @property
    def breakpoints(self) -> list[Breakpoint]:
        return sorted(self._breakpoints.values(), key=lambda b: b.number)

    def add_breakpoint(self, address: int, kind: str = "hw") -> Breakpoint:
        """Break before the instruction at linear ``address``.

        ``kind`` is ``hw`` (a debug register; at most four) or ``sw``
        (``int3``).  A software breakpoint the host cannot deliver in the
        vCPU's current mode becomes a hardware one, with ``note`` saying why
        (also appended to :attr:`notes`).
        """
        if kind not in ("hw", "sw"):
            raise TraceError(f"breakpoint kind {kind!r}: use hw or sw")
        if address in self._breakpoints:
            return self._breakpoints[address]
        note = ""
        actual = kind
        support = self.support()
        if kind == "sw" and not support.sw_breakpoints:
            actual = "hw"
            note = (f"software breakpoints do not work here: {support.notes.get('sw_breakpoints', 'unsupported')}; "
                    "using a hardware breakpoint instead")
        slot = None
        if actual == "hw":
            if not support.hw_breakpoints:
                raise TraceError(support.notes.get("hw_breakpoints", "hardware breakpoints do not work here"))
            used = {b.slot for b in self._breakpoints.values() if b.kind == "hw"}
            free = [i for i in range(MAX_HW_BREAKPOINTS) if i not in used]
            if not free:
                raise TraceError(f"all {MAX_HW_BREAKPOINTS} debug registers are in use; delete a breakpoint first")
            slot = free[0]
        bp = Breakpoint(self._next_bp, address, actual, kind, slot, note)
        self._next_bp += 1
        self._breakpoints[address] = bp
        if note:
            self.notes.append(f"breakpoint {bp.number} at {address:#x}: {note}")
        return bp

    def remove_breakpoint(self, which: int) -> Breakpoint:
        """Delete the breakpoint numbered ``which`` (or, failing that, at address ``which``)."""
        for bp in self._breakpoints.values():
            if bp.number == which:
                return self._breakpoints.pop(bp.address)
        if which in self._breakpoints:
            return self._breakpoints.pop(which)
        raise TraceError(f"no breakpoint {which:#x}" if which > 999 else f"no breakpoint {which}")

    def clear_breakpoints(self) -> int:
        """Delete every breakpoint; return how many there were."""
        n = len(self._breakpoints)
        self._breakpoints.clear()
        return n

    def _hw_debugreg(self) -> tuple[int, ...]:
        dr = [0, 0, 0, 0, 0, 0, 0, 0]
        dr7 = DR7_FIXED
        for bp in self._breakpoints.values():
            if bp.kind == "hw":
                dr[bp.slot] = bp.address
                dr7 |= 2 << (bp.slot * 2)  # Gn; R/Wn = LENn = 0: instruction execution
        dr[7] = dr7
        return tuple(dr)

    # -- running through the machine's loop -------------------------------------------------
    def _record(self, exit, rip: int | None, insn: Instruction | None) -> ExitEvent:
        self.exits_seen += 1
        self.exit_counts[exit.reason] = self.exit_counts.get(exit.reason, 0) + 1
        stepped = rip is not None
        where = insn if stepped else self.instruction()
        event = ExitEvent(self.exits_seen, exit, rip, self.vcpu.get_regs().rip, where, stepped)
        if self.on_exit is not None:
            self.on_exit(event)
        return event

    def _stop_from(self, stop, rip: int) -> Stop | None:
        """A tracer Stop for how the loop's run ended (None: the step simply ended)."""
        if stop.reason == "debug":
            self.debug_exits += 1
            return None
        if stop.reason == "io":
            return None
        return Stop(stop.reason, stop.status, stop.message, rip, exit=stop.exit)

    # -- stepping ------------------------------------------------------------------
    def step(self) -> Step:
        """Execute one instruction; return what it was and what it changed.

        Raises :class:`TraceError` where the host cannot single-step in the
        current mode (CPL 3 on kvm_pvm: the guest would triple-fault).
        Breakpoints are not armed while stepping (every instruction is seen
        anyway); a step that lands on one sets ``stop`` to a ``breakpoint``.
        """
        regs = self.vcpu.get_regs()
        sregs = self.vcpu.get_sregs()
        support = self.support(sregs)
        if not support.singlestep:
            raise TraceError(f"cannot single-step: {support.notes.get('singlestep', 'unsupported')}")
        insn = self.instruction(regs, sregs) or Instruction(
            regs.rip, linear_rip(regs, sregs), b"", "(not in guest memory)", code_bits(sregs))
        events: list[ExitEvent] = []
        level = 0 if not sregs.cr0 & bits.CR0_PE else cpl(sregs.cs.selector, sregs.ss.dpl)
        stepping = not (insn.mnemonic == "hlt" and level == 0)  # stepping would skip over a HLT
        self._set_debug(ENABLE | SINGLESTEP if stepping else 0, ())
        loop_stop = self.loop.run(observe=lambda exit: events.append(self._record(exit, insn.address, insn)),
                                  after_io="complete" if stepping else None)
        if stepping and loop_stop.pending_io:
            self.loop.complete_pending()  # a device stopped the run inside the instruction: finish it
        if loop_stop.exit is not None and loop_stop.reason not in ("debug", "io"):
            events.append(self._record(loop_stop.exit, insn.address, insn))  # HLT, shutdown, ...
        regs_after = self.vcpu.get_regs()
        sregs_after = self.vcpu.get_sregs()
        stop = self._stop_from(loop_stop, regs_after.rip)
        changed = _diff(REGS, _regs_tuple(regs), _regs_tuple(regs_after))
        changed += _diff(_SREG_NAMES, _sregs_tuple(sregs), _sregs_tuple(sregs_after))
        if stop is None:
            bp = self._breakpoints.get(linear_rip(regs_after, sregs_after))
            if bp is not None:
                bp.hits += 1
                stop = Stop("breakpoint", None, "", regs_after.rip, bp, loop_stop.exit)
        self.steps_done += 1
        self._stop = stop
        return Step(self.steps_done, insn, tuple(changed), tuple(events), stop, regs_after.rip)

    def trace(self, max_steps: int | None = None, *, stop_at_breakpoints: bool = False) -> Iterator[Step]:
        """Step up to ``max_steps`` instructions (None: until the guest stops).

        Ends after a step whose ``stop`` is set (HLT, debug-exit, crash...);
        with ``stop_at_breakpoints``, also after landing on a breakpoint.
        """
        n = 0
        while max_steps is None or n < max_steps:
            step = self.step()
            n += 1
            yield step
            if step.stop is not None and (step.stop.reason != "breakpoint" or stop_at_breakpoints):
                return

    def cont(self, timeout: float | None = None) -> Stop:
        """Run freely until a breakpoint or until the guest stops; return why.

        Uses ``machine.run()`` (the C loop, devices, ``request_stop()`` and
        the timeout all work as in a normal run) with the breakpoints armed.
        If RIP is on a breakpoint it is stepped over first.
        """
        m = self.machine
        regs = self.vcpu.get_regs()
        sregs = self.vcpu.get_sregs()
        if self._breakpoints and linear_rip(regs, sregs) in self._breakpoints:
            step = self.step()  # breakpoints are not armed while stepping: this steps over it
            if step.stop is not None:
                return step.stop  # the guest stopped, or the next instruction is a breakpoint too
        sw = [bp for bp in self._breakpoints.values() if bp.kind == "sw"]
        hw = any(bp.kind == "hw" for bp in self._breakpoints.values())
        control = (ENABLE | (USE_HW_BP if hw else 0) | (USE_SW_BP if sw else 0)) if (hw or sw) else 0
        self._set_debug(control, self._hw_debugreg() if hw else ())
        saved = self._insert_sw(sw)
        try:
            result = m.run(timeout=timeout)
        finally:
            self._remove_sw(saved)
        self.last_result = result
        if result.ended == "debug" and isinstance(result.last_exit, exits.Debug):
            stop = self._breakpoint_stop(result)
        else:
            stop = Stop(result.ended, result.exit_status, result.message, result.regs.get("rip", 0),
                        exit=result.last_exit)
        self._stop = stop
        return stop

    def _breakpoint_stop(self, result) -> Stop:
        """Which breakpoint a KVM_EXIT_DEBUG of a free run hit."""
        regs = self.vcpu.get_regs()
        sregs = self.vcpu.get_sregs()
        dbg = result.last_exit
        bp = None
        if dbg.exception == 3:
            linear = linear_rip(regs, sregs)
            bp = self._breakpoints.get(linear) or self._breakpoints.get(linear - 1)
            if bp is not None and linear == bp.address + 1:
                regs.rip -= 1  # a host that reports RIP after the int3
                self.vcpu.set_regs(regs)
        else:
            for candidate in self._breakpoints.values():
                if candidate.kind == "hw" and dbg.dr6 & (1 << candidate.slot):
                    bp = candidate
        if bp is None:
            return Stop("debug", None, result.message, regs.rip, exit=dbg)
        bp.hits += 1
        return Stop("breakpoint", None, "", regs.rip, bp, dbg)

    def _insert_sw(self, sw: list[Breakpoint]) -> list[tuple[int, bytes]]:
        saved: list[tuple[int, bytes]] = []
        if not sw:
            return saved
        sregs = self.vcpu.get_sregs()
        memory = self.machine.memory
        for bp in sw:
            gpa = linear_to_physical(memory, sregs, bp.address)
            if gpa is None or not memory.is_mapped(gpa):
                raise TraceError(f"software breakpoint {bp.number} at {bp.address:#x} is not in mapped memory")
            saved.append((gpa, memory.read(gpa, 1)))
            memory.write(gpa, INT3)
        return saved

    def _remove_sw(self, saved: list[tuple[int, bytes]]) -> None:
        for gpa, original in reversed(saved):
            self.machine.memory.write(gpa, original)

    # -- exits mode ------------------------------------------------------------------
    def exits(self, max_exits: int | None = None) -> Iterator[ExitEvent]:
        """Run the guest and yield each exit that reaches user space, up to ``max_exits``.

        Single-steps where the host can (each event then names the exact
        instruction); otherwise runs freely and says so in :attr:`notes`.
        Debug exits caused by the stepping itself are not events (they are
        counted in :attr:`debug_exits`).  :attr:`last_stop` tells how it ended.
        """
        support = self.support()
        count = 0
        if not support.singlestep:
            self.notes.append(
                f"cannot single-step ({support.notes.get('singlestep', 'unsupported')}): running freely, "
                "so each exit shows RIP as KVM left it (after an OUT, MMIO write or HLT; at an IN or MMIO read)"
            )
            self._stop = None
            self._set_debug(0, ())
            while max_exits is None or count < max_exits:
                events: list[ExitEvent] = []
                loop_stop = self.loop.run(observe=lambda exit: events.append(self._record(exit, None, None)),
                                          after_io="return")
                for event in events:
                    count += 1
                    yield event
                if loop_stop.reason != "io":
                    if loop_stop.exit is not None and not events:
                        count += 1
                        yield self._record(loop_stop.exit, None, None)
                    self._stop = self._stop_from(loop_stop, self.vcpu.get_regs().rip)
                    return
            return
        while max_exits is None or count < max_exits:
            step = self.step()
            for event in step.exits:
                count += 1
                yield event
                if max_exits is not None and count >= max_exits:
                    return
            if step.stop is not None and step.stop.reason != "breakpoint":
                return

    @property
    def last_stop(self) -> Stop | None:
        """How the last step, trace, cont or exits run ended (None: the guest can go on)."""
        return self._stop
