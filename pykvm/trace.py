"""See inside the vCPU: single-stepping, breakpoints and exit tracing.

A :class:`Tracer` drives a :class:`~pykvm.machine.Machine` one instruction
at a time with ``KVM_SET_GUEST_DEBUG``::

    with Machine(memory="16M") as m:
        m.load_guest("hello16")
        tracer = Tracer(m)
        for step in tracer.trace(50):
            print(format_step(step))

The mechanics (this class and the values it returns: :class:`Step`,
:class:`ExitEvent`, :class:`Stop`, :class:`Breakpoint`) are separate from
the printing (``format_*`` functions at the end), so labs can reuse either.

How each feature works, and what KVM does underneath:

- ``step()``: KVM_GUESTDBG_SINGLESTEP, one KVM_EXIT_DEBUG per instruction.
  Port and MMIO exits in between go to the machine's devices as in a normal
  run (serial output still works) and are recorded on the step.  The
  registers are read before and after, and the step lists those that
  changed.  A ``hlt`` at CPL 0 is run *without* single-step: KVM would
  otherwise step over it without halting (seen on nested kvm_pvm hosts),
  and the trace would run on into whatever follows it.  An instruction
  that exits to user space is completed with ``immediate_exit`` set: on
  kvm_pvm its single-step trap is lost, and a plain re-entry would run the
  next instruction too before trapping.
- hardware breakpoints: DR0-DR3 and DR7 through KVM_GUESTDBG_USE_HW_BP (at
  most four).  An instruction breakpoint fires *before* the instruction, so
  continuing from one re-triggers it; ``cont()`` steps over it first: one
  single-step with the breakpoints disabled, then the breakpoints go back.
- software breakpoints: ``int3`` written over the instruction while the
  guest runs, with KVM_GUESTDBG_USE_SW_BP.  Whether the host supports that
  is probed once per CPU mode on a scratch VM (:func:`debug_support`); where
  it does not (nested kvm_pvm: the ``int3`` ends in KVM_EXIT_INTERNAL_ERROR
  at CPL 0), :meth:`Tracer.add_breakpoint` falls back to a hardware
  breakpoint and says so in the breakpoint's ``note``.
- ``exits()``: one :class:`ExitEvent` per exit that reaches user space.
  Where single-stepping works it steps, so each event names the exact
  instruction that caused it (KVM leaves RIP after an OUT, MMIO write or
  HLT but *at* an IN or MMIO read, so RIP alone does not tell).  Where it
  does not (CPL 3 on kvm_pvm), the guest runs freely and each event shows
  RIP as KVM left it.

While the tracer steps, the C loop's fast ranges are cleared so that every
exit reaches Python; :meth:`Tracer.close` (or leaving a ``with`` block)
restores them and turns guest debugging off.  The loop still counts every
exit, so ``machine.loop.counters()`` includes the stepping.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

from pykvm import exits
from pykvm._native_loader import lib
from pykvm.bus import UnmappedAccess
from pykvm.devices import DeviceStop
from pykvm.dispatch import dispatch
from pykvm.errors import KvmError
from pykvm.runloop import RET_CODE_MASK, RET_ERROR, RET_INTR, RET_TX_PENDING
from pykvm.x86 import bits
from pykvm.x86.state import cpl as _cpl
from pykvm.x86.state import cpu_mode_name, decode_rflags

if TYPE_CHECKING:
    from pykvm.machine import Machine

__all__ = [
    "Breakpoint",
    "DebugSupport",
    "ExitEvent",
    "Instruction",
    "Step",
    "Stop",
    "Tracer",
    "TraceError",
    "debug_support",
    "probe_mode",
    "format_breakpoint",
    "format_exit",
    "format_mode",
    "format_step",
    "format_stop",
    "format_support",
]

ENABLE = lib.KVM_GUESTDBG_ENABLE
SINGLESTEP = lib.KVM_GUESTDBG_SINGLESTEP
USE_HW_BP = lib.KVM_GUESTDBG_USE_HW_BP
USE_SW_BP = lib.KVM_GUESTDBG_USE_SW_BP

MAX_HW_BREAKPOINTS = 4
MAX_INSN_BYTES = 15
_DR6_HIT_MASK = 0xF  # B0-B3: which DRn matched
_DR7_FIXED = 0x0600  # GE and the reserved always-one bit 10, as QEMU's gdbstub sets them
INT3 = b"\xcc"

GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
        "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")
REGS = GPRS + ("rflags",)
_CONTROL = ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")
_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")


_KVM_REASON = {"io_out": "io", "io_in": "io", "mmio_write": "mmio", "mmio_read": "mmio"}


class TraceError(RuntimeError):
    """The host cannot do what was asked (e.g. single-step in this CPU mode), or bad tracer input."""


# ---------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Instruction:
    """One decoded instruction.

    ``address`` is what the CPU's instruction pointer held (IP in 16-bit
    code), ``linear`` is CS.base + that (what breakpoints and page walks
    use); ``bits`` is 16, 32 or 64, the mode capstone decoded it in.
    """

    address: int
    linear: int
    raw: bytes
    text: str
    bits: int

    @property
    def mnemonic(self) -> str:
        return self.text.split(" ", 1)[0]


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


@dataclass(frozen=True)
class DebugSupport:
    """What KVM_SET_GUEST_DEBUG does in one CPU mode on this host (measured).

    ``notes`` maps a feature (``singlestep``, ``hw_breakpoints``,
    ``sw_breakpoints``) to why it failed, for those that did.
    """

    mode: str
    singlestep: bool
    hw_breakpoints: bool
    sw_breakpoints: bool
    notes: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------
# Probing the host
# ---------------------------------------------------------------------------

_support_cache: dict[str, DebugSupport] = {}
_support_lock = threading.Lock()


def probe_mode(sregs) -> str:
    """The ``setup_mode`` name nearest to the vCPU's current mode (for :func:`debug_support`)."""
    if not sregs.cr0 & bits.CR0_PE:
        return "real"
    level = _cpl(sregs.cs.selector, sregs.ss.dpl)
    if sregs.efer & bits.EFER_LMA:
        return "long_user" if level == 3 else "long"
    if sregs.cr0 & bits.CR0_PG:
        return "paged32"
    return "protected"


def _probe_one(kvm, mode: str, code: bytes, control: int, hw_offset: int | None) -> tuple[object, int, int]:
    """Run ``code`` in a scratch VM in ``mode`` with guest debugging; return (exit, rip, load address)."""
    from pykvm.machine import Machine

    with Machine(memory="2M", kvm=kvm) as scratch:
        info = scratch.load_image(code, mode=mode)
        base = info["load_addr"]
        if mode == "real":
            # Vector 3 of the real-mode IVT -> the final OUT, so an int3 the guest takes ends quickly.
            scratch.memory.write(3 * 4, (base + len(code) - 2).to_bytes(2, "little") + b"\0\0")
        debugreg = ()
        if hw_offset is not None:
            debugreg = (base + hw_offset, 0, 0, 0, 0, 0, 0, _DR7_FIXED | 0x2)
        scratch.vcpu.set_guest_debug(control, debugreg)
        exit = scratch.vcpu.run()
        return exit, scratch.vcpu.get_regs().rip, base


# Every probe ends with ``out 0x80, al``: an exit at any privilege level (IOPL 3 in long_user).
_PROBE_END = b"\xe6\x80"


def _describe_failure(exit, feature: str) -> str:
    if isinstance(exit, exits.InternalError):
        return f"ends in KVM_EXIT_INTERNAL_ERROR ({exit.suberror_name})"
    if isinstance(exit, exits.Shutdown):
        return "makes the guest shut down (the #DB/#BP went to the guest: triple fault)"
    if isinstance(exit, exits.Debug):
        return f"stops at the wrong place (debug exception {exit.exception} at {exit.pc:#x})"
    if isinstance(exit, exits.IoOut) and feature == "sw_breakpoints":
        return "does not stop the guest (the int3 went to the guest's own #BP handler)"
    if isinstance(exit, exits.IoOut):
        return "does not stop the guest (it ran on to the probe's final OUT)"
    return f"does not stop the guest (it ran on to {getattr(exit, 'reason', exit)})"


def debug_support(mode: str, kvm=None) -> DebugSupport:
    """Measure single-step, hardware and software breakpoints in ``mode`` on this host.

    Each feature runs a few instructions in a scratch 2 MiB VM (about a
    millisecond each); the answer is cached per mode for the process.
    ``mode`` is a ``setup_mode`` name (see :func:`probe_mode`).
    """
    with _support_lock:
        if mode in _support_cache:
            return _support_cache[mode]
        from pykvm.x86.modes import ModeNotSupported

        notes: dict[str, str] = {}
        results: dict[str, bool] = {}
        nops = b"\x90\x90\x90\x90" + _PROBE_END
        probes = {
            "singlestep": (nops, ENABLE | SINGLESTEP, None, 1, 1),
            "hw_breakpoints": (nops, ENABLE | USE_HW_BP, 2, 1, 2),
            "sw_breakpoints": (b"\x90\xcc\x90\x90" + _PROBE_END, ENABLE | USE_SW_BP, None, 3, 1),
        }
        for feature, (code, control, hw_offset, exception, offset) in probes.items():
            try:
                exit, rip, base = _probe_one(kvm, mode, code, control, hw_offset)
            except ModeNotSupported as exc:
                results[feature] = False
                notes[feature] = f"this host cannot run {mode} mode ({exc})"
                continue
            ok = isinstance(exit, exits.Debug) and exit.exception == exception and rip in (base + offset,)
            if not ok and feature == "sw_breakpoints" and isinstance(exit, exits.Debug) and exit.exception == 3:
                ok = rip in (base + offset, base + offset + 1)  # some hosts leave RIP after the int3
            results[feature] = ok
            if not ok:
                what = {
                    "singlestep": "KVM_GUESTDBG_SINGLESTEP",
                    "hw_breakpoints": "a hardware breakpoint (KVM_GUESTDBG_USE_HW_BP)",
                    "sw_breakpoints": "int3 with KVM_GUESTDBG_USE_SW_BP",
                }[feature]
                notes[feature] = f"{what} {_describe_failure(exit, feature)} in {mode} mode on this host{_host_hint()}"
        support = DebugSupport(mode, results["singlestep"], results["hw_breakpoints"], results["sw_breakpoints"],
                               notes)
        _support_cache[mode] = support
        return support


def _host_hint() -> str:
    try:
        from pykvm.check import nested_kvm_module

        module = nested_kvm_module()
    except Exception:
        module = None
    return f" (nested KVM: {module})" if module else ""


# ---------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------

_capstone: dict[int, object] = {}


def _disassembler(nbits: int):
    md = _capstone.get(nbits)
    if md is None:
        import capstone

        mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[nbits]
        md = capstone.Cs(capstone.CS_ARCH_X86, mode)
        _capstone[nbits] = md
    return md


def decode(code: bytes, address: int, nbits: int, linear: int | None = None) -> Instruction | None:
    """The first instruction in ``code`` (at ``address``, in ``nbits``-bit mode), or None."""
    for addr, size, mnemonic, op_str in _disassembler(nbits).disasm_lite(code, address, 1):
        text = f"{mnemonic} {op_str}".strip()
        return Instruction(addr, address if linear is None else linear, bytes(code[:size]), text, nbits)
    return None


def disassemble(code: bytes, address: int, nbits: int, count: int, linear: int | None = None) -> list[Instruction]:
    """Up to ``count`` instructions from ``code``; undecodable bytes end the list."""
    out = []
    base = address if linear is None else linear
    for addr, size, mnemonic, op_str in _disassembler(nbits).disasm_lite(code, address, count):
        offset = addr - address
        out.append(Instruction(addr, base + offset, bytes(code[offset:offset + size]),
                               f"{mnemonic} {op_str}".strip(), nbits))
    return out


def _regs_tuple(regs) -> tuple[int, ...]:
    return tuple(getattr(regs, name) for name in REGS)


def _sregs_tuple(sregs) -> tuple[int, ...]:
    values = [getattr(sregs, name) for name in _CONTROL]
    values += [getattr(sregs, name).selector for name in _SEGMENTS]
    values += [sregs.gdt.base, sregs.gdt.limit, sregs.idt.base, sregs.idt.limit]
    return tuple(values)


_SREG_NAMES = _CONTROL + _SEGMENTS + ("gdt.base", "gdt.limit", "idt.base", "idt.limit")


def _diff(names, before, after) -> list[tuple[str, int, int]]:
    return [(n, a, b) for n, a, b in zip(names, before, after) if a != b]


# ---------------------------------------------------------------------------
# The tracer
# ---------------------------------------------------------------------------


class Tracer:
    """Single-step, break and watch exits on a :class:`~pykvm.machine.Machine`'s vCPU.

    ``on_exit`` (optional) is called with each :class:`ExitEvent` as it
    happens.  The tracer is not thread-safe: use it from the thread that
    would call ``machine.run()``.
    """

    def __init__(self, machine: "Machine", *, on_exit: Callable[[ExitEvent], None] | None = None) -> None:
        self.machine = machine
        self.vcpu = machine.vcpu
        self.on_exit = on_exit
        self.steps_done = 0
        self.exits_seen = 0
        self.debug_exits = 0
        self.exit_counts: dict[str, int] = {}
        self._breakpoints: dict[int, Breakpoint] = {}
        self._next_bp = 1
        self._debug_state: tuple[int, tuple[int, ...]] | None = None
        self._ranges_cleared = False
        self._stop: Stop | None = None
        self._walk_cache: dict[tuple, tuple[int, tuple]] = {}
        self.last_result = None
        self.notes: list[str] = []
        """What the host could not do, in words (fallbacks taken so far)."""

    # -- lifecycle -------------------------------------------------------------
    def close(self) -> None:
        """Turn guest debugging off and give the C loop its fast ranges back."""
        self._set_debug(0, ())
        self._restore_ranges()

    def __enter__(self) -> "Tracer":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.vcpu.closed:
            self.close()

    def _clear_ranges(self) -> None:
        if not self._ranges_cleared:
            self.machine.loop.set_ranges([])  # every exit to Python, so we see it
            self._ranges_cleared = True

    def _restore_ranges(self) -> None:
        if self._ranges_cleared:
            m = self.machine
            m.loop.set_ranges(m.fast_ranges() if m.c_loop else [])
            self._ranges_cleared = False

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
        from pykvm.cpustate import code_bits

        regs = regs or self.vcpu.get_regs()
        sregs = sregs or self.vcpu.get_sregs()
        nbits = code_bits(sregs)
        ip = regs.rip & (0xFFFF if nbits == 16 else (1 << 64) - 1)
        linear = (sregs.cs.base + ip) & (0xFFFFFFFF if nbits != 64 else (1 << 64) - 1)
        code = self._read_code(sregs, linear, MAX_INSN_BYTES)
        if not code:
            return None
        return decode(code, ip, nbits, linear) or Instruction(ip, linear, code[:1], "(bad)", nbits)

    def _page_gpa(self, sregs, page: int) -> int | None:
        """Guest-physical address of the linear ``page`` (cached; each use re-checks the entries walked)."""
        from pykvm.x86.paging import translate

        memory = self.machine.memory
        key = (sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer, page)
        hit = self._walk_cache.get(key)
        if hit is not None:
            gpa, entries = hit
            if all(memory.read(addr, size) == value for addr, size, value in entries):
                return gpa
        tr = translate(memory.read, sregs, page)
        if tr.gpa is None:
            return None
        entries = tuple((lv.address, lv.entry_size, lv.entry.to_bytes(lv.entry_size, "little")) for lv in tr.levels)
        if len(self._walk_cache) > 256:
            self._walk_cache.clear()
        self._walk_cache[key] = (tr.gpa, entries)
        return tr.gpa

    def _read_code(self, sregs, linear: int, size: int) -> bytes:
        """Up to ``size`` bytes at a linear address, stopping at the first unmapped byte."""
        memory = self.machine.memory
        paged = bool(sregs.cr0 & bits.CR0_PG)
        out = b""
        while len(out) < size:
            address = linear + len(out)
            page, offset = address & ~0xFFF, address & 0xFFF
            gpa = self._page_gpa(sregs, page) if paged else page & 0xFFFFFFFF
            chunk = min(size - len(out), 0x1000 - offset)
            if gpa is None or not memory.is_mapped(gpa + offset, chunk):
                break
            out += memory.read(gpa + offset, chunk)
        return out

    @staticmethod
    def linear_rip(regs, sregs) -> int:
        from pykvm.cpustate import code_bits

        nbits = code_bits(sregs)
        if nbits == 64:
            return regs.rip
        return (sregs.cs.base + (regs.rip & (0xFFFF if nbits == 16 else 0xFFFFFFFF))) & 0xFFFFFFFF

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
        if actual == "hw":
            if not support.hw_breakpoints:
                raise TraceError(support.notes.get("hw_breakpoints", "hardware breakpoints do not work here"))
            used = {b.slot for b in self._breakpoints.values() if b.kind == "hw"}
            free = [i for i in range(MAX_HW_BREAKPOINTS) if i not in used]
            if not free:
                raise TraceError(f"all {MAX_HW_BREAKPOINTS} debug registers are in use; delete a breakpoint first")
            slot = free[0]
        else:
            slot = None
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
        dr7 = _DR7_FIXED
        for bp in self._breakpoints.values():
            if bp.kind == "hw":
                dr[bp.slot] = bp.address
                dr7 |= 2 << (bp.slot * 2)  # Gn; R/Wn = LENn = 0: instruction execution
        dr[7] = dr7
        return tuple(dr)

    # -- the exit loop -------------------------------------------------------------
    def _record(self, exit, rip: int | None, rip_at_exit: int, insn: Instruction | None, stepped: bool) -> ExitEvent:
        self.exits_seen += 1
        self.exit_counts[exit.reason] = self.exit_counts.get(exit.reason, 0) + 1
        event = ExitEvent(self.exits_seen, exit, rip, rip_at_exit, insn, stepped)
        if self.on_exit is not None:
            self.on_exit(event)
        return event

    def _run(self, control: int, debugreg: tuple[int, ...], insn: Instruction | None,
             events: list[ExitEvent], *, one_exit: bool = False) -> tuple[object, Stop | None]:
        """KVM_RUN until an exit that is not port/MMIO I/O; I/O goes to the devices.

        Returns (final exit, stop-or-None); ``events`` collects the exits.
        With ``insn`` None (not stepping) RIP is read at each exit instead.
        ``one_exit``: return after the first exit, even I/O (once handled).

        While single-stepping, an I/O exit is completed with ``immediate_exit``
        set (api.rst: re-entering with immediate_exit completes the pending
        operation without running further instructions), and the step ends
        there: on some hosts (nested kvm_pvm) the single-step trap of an
        instruction that exited to user space is lost, and re-entering
        normally would run the *next* instruction too before trapping.  The
        final exit is then None.
        """
        m = self.machine
        self._clear_ranges()
        self._set_debug(control, debugreg)
        run = self.vcpu.kvm_run
        loop = m.loop
        stepping = insn is not None and bool(control & SINGLESTEP)
        completing = False
        while True:
            ret = loop.run()
            if ret & RET_TX_PENDING:
                m.serial.accept_transmitted(loop.take_tx())
            code = ret & RET_CODE_MASK
            if code == RET_INTR:
                run.immediate_exit = 0
                if completing:
                    return None, None  # the I/O instruction has completed, and nothing after it ran
                continue
            if code == RET_ERROR:
                run.immediate_exit = 0
                raise KvmError("KVM_RUN", loop.error_errno)
            run.immediate_exit = 0
            exit = exits.decode(run)
            if isinstance(exit, exits.Debug):
                self.debug_exits += 1
                return exit, None
            stepped = insn is not None
            rip_now = self.vcpu.get_regs().rip
            where = insn if stepped else self.instruction()
            events.append(self._record(exit, insn.address if stepped else None, rip_now, where, stepped))
            if not isinstance(exit, (exits.IoOut, exits.IoIn, exits.MmioWrite, exits.MmioRead)):
                return exit, None
            try:
                answer = dispatch(exit, m.pio, m.mmio)
            except DeviceStop as stop:
                if stepping:
                    self._complete_pending()
                return exit, Stop(stop.reason, stop.status, "", self.vcpu.get_regs().rip, exit=exit)
            except UnmappedAccess as exc:
                return exit, Stop("guest-error", None, f"{exc} at RIP {rip_now:#x}", rip_now, exit=exit)
            if answer is not None:
                if isinstance(exit, exits.IoIn):
                    exits.complete_io_in(run, answer)
                else:
                    exits.complete_mmio_read(run, answer)
            if one_exit:
                return exit, None
            if stepping:
                run.immediate_exit = 1
                completing = True

    def _complete_pending(self) -> None:
        """Finish the I/O instruction KVM is waiting on, without running any other (immediate_exit)."""
        run = self.vcpu.kvm_run
        run.immediate_exit = 1
        try:
            ret = self.machine.loop.run()
        finally:
            run.immediate_exit = 0
        if ret & RET_CODE_MASK not in (RET_INTR,):
            if isinstance(exits.decode(run), exits.Debug):
                self.debug_exits += 1

    def _final_stop(self, exit, rip: int) -> Stop:
        """A Stop for an exit that ends the run (anything but Debug and I/O)."""
        m = self.machine
        if isinstance(exit, exits.Hlt):
            return Stop("hlt", 0, "", rip, exit=exit)
        if isinstance(exit, exits.Shutdown):
            return Stop("shutdown", None, "triple fault or shutdown\n" + m.describe_cpu(), rip, exit=exit)
        if isinstance(exit, exits.InternalError):
            return Stop("internal-error", None, f"KVM internal error: {exit.suberror_name}\n" + m.describe_cpu(),
                        rip, exit=exit)
        if isinstance(exit, exits.FailEntry):
            return Stop("fail-entry", None,
                        f"VM entry failed, hardware reason {exit.hardware_entry_failure_reason:#x}\n"
                        + m.describe_cpu(), rip, exit=exit)
        if isinstance(exit, exits.SystemEvent):
            return Stop("system-event", None, f"system event type {exit.type}", rip, exit=exit)
        return Stop("unknown", None, f"unhandled exit {exit}\n" + m.describe_cpu(), rip, exit=exit)

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
        insn = self.instruction(regs, sregs)
        if insn is None:
            from pykvm.cpustate import code_bits

            insn = Instruction(regs.rip, self.linear_rip(regs, sregs), b"", "(not in guest memory)", code_bits(sregs))
        events: list[ExitEvent] = []
        level = 0 if not sregs.cr0 & bits.CR0_PE else _cpl(sregs.cs.selector, sregs.ss.dpl)
        if insn.mnemonic == "hlt" and level == 0:
            # Stepping would skip over the HLT without halting: let it halt for real.
            exit, stop = self._run(0, (), insn, events)
        else:
            exit, stop = self._run(ENABLE | SINGLESTEP, (), insn, events)
        regs_after = self.vcpu.get_regs()
        sregs_after = self.vcpu.get_sregs()
        if stop is None and exit is not None and not isinstance(exit, exits.Debug):
            stop = self._final_stop(exit, regs_after.rip)
        changed = _diff(REGS, _regs_tuple(regs), _regs_tuple(regs_after))
        changed += _diff(_SREG_NAMES, _sregs_tuple(sregs), _sregs_tuple(sregs_after))
        if stop is None:
            bp = self._breakpoints.get(self.linear_rip(regs_after, sregs_after))
            if bp is not None:
                bp.hits += 1
                stop = Stop("breakpoint", None, "", regs_after.rip, bp, exit)
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
        if self._breakpoints and self.linear_rip(regs, sregs) in self._breakpoints:
            step = self.step()  # breakpoints are not armed while stepping: this steps over it
            if step.stop is not None:
                return step.stop  # the guest stopped, or the next instruction is a breakpoint too
        self._restore_ranges()
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
            regs = self.vcpu.get_regs()
            sregs = self.vcpu.get_sregs()
            dbg = result.last_exit
            bp = None
            if dbg.exception == 3:
                linear = self.linear_rip(regs, sregs)
                bp = self._breakpoints.get(linear) or self._breakpoints.get(linear - 1)
                if bp is not None and linear == bp.address + 1:
                    regs.rip -= 1  # a host that reports RIP after the int3
                    self.vcpu.set_regs(regs)
            else:
                for candidate in self._breakpoints.values():
                    if candidate.kind == "hw" and dbg.dr6 & (1 << candidate.slot):
                        bp = candidate
            if bp is not None:
                bp.hits += 1
                stop = Stop("breakpoint", None, "", regs.rip, bp, dbg)
            else:
                stop = Stop("debug", None, result.message, regs.rip, exit=dbg)
        else:
            stop = Stop(result.ended, result.exit_status, result.message, result.regs.get("rip", 0),
                        exit=result.last_exit)
        self._stop = stop
        return stop

    def _insert_sw(self, sw: list[Breakpoint]) -> list[tuple[int, bytes]]:
        from pykvm.cpustate import linear_to_physical

        saved = []
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
            while max_exits is None or count < max_exits:
                events: list[ExitEvent] = []
                exit, stop = self._run(0, (), None, events, one_exit=True)
                for event in events:
                    count += 1
                    yield event
                if stop is None and not isinstance(exit, (exits.IoOut, exits.IoIn, exits.MmioWrite,
                                                         exits.MmioRead, exits.Debug)):
                    stop = self._final_stop(exit, self.vcpu.get_regs().rip)
                if stop is not None:
                    self._stop = stop
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


# ---------------------------------------------------------------------------
# Printing (separate from the mechanics above)
# ---------------------------------------------------------------------------


def _reg_label(name: str, nbits: int) -> str:
    if nbits == 64 or name not in REGS:
        return name
    if name == "rflags":
        return "eflags"
    if name[1:] in ("ax", "bx", "cx", "dx", "si", "di", "sp", "bp"):
        return "e" + name[1:]
    return name


def format_changes(changed, nbits: int = 64) -> str:
    """``ecx=0xd7 eflags=0x46[ZF PF]``: the after-values of changed registers."""
    parts = []
    for name, before, after in changed:
        label = _reg_label(name, nbits)
        if name == "rflags":
            flags = " ".join(decode_rflags(after))
            parts.append(f"{label}={after:#x}[{flags}]")
        else:
            parts.append(f"{label}={after:#x}")
    return " ".join(parts)


def _printable(data: bytes) -> str:
    text = data.decode("latin-1")
    if all(32 <= ord(c) < 127 for c in text):
        return f" {text!r}"
    if text == "\n":
        return " '\\n'"
    return ""


def _data(data: bytes, limit: int = 16) -> str:
    if len(data) <= limit:
        return data.hex() + _printable(data)
    return f"{data[:limit].hex()}... ({len(data)} bytes)"


def format_exit_details(exit) -> str:
    """The exit's payload in words: port/address, size, data."""
    if isinstance(exit, exits.IoOut):
        rep = f" x{exit.count}" if exit.count > 1 else ""
        return f"port {exit.port:#06x} size {exit.size}{rep} data {_data(exit.data)}"
    if isinstance(exit, exits.IoIn):
        rep = f" x{exit.count}" if exit.count > 1 else ""
        return f"port {exit.port:#06x} size {exit.size}{rep}"
    if isinstance(exit, exits.MmioWrite):
        return f"addr {exit.address:#x} size {len(exit.data)} data {_data(exit.data)}"
    if isinstance(exit, exits.MmioRead):
        return f"addr {exit.address:#x} size {exit.size}"
    if isinstance(exit, exits.InternalError):
        return exit.suberror_name
    if isinstance(exit, exits.FailEntry):
        return f"hardware reason {exit.hardware_entry_failure_reason:#x}"
    if isinstance(exit, exits.SystemEvent):
        return f"type {exit.type}"
    return ""


def format_exit(event: ExitEvent) -> str:
    """One line: number, reason, port/address and data, RIP, the instruction."""
    details = format_exit_details(event.exit)
    if event.stepped:
        rip = f"rip {event.rip:#x}"
        insn = event.instruction.text if event.instruction else "?"
    else:
        rip = f"rip {event.rip_at_exit:#x} (at exit)"
        insn = f"next: {event.instruction.text}" if event.instruction else "?"
    return f"{event.number:6d}  {event.reason:<14} {details:<40} {rip:<22} {insn}".rstrip()


def format_step(step: Step, *, show_exits: bool = True) -> str:
    """``     1  0x8000  fc                 cld                     eflags=0x2[]``, then exits and the stop."""
    insn = step.instruction
    raw = insn.raw.hex(" ")
    line = f"{step.number:6d}  {insn.linear:#010x}  {raw:<23}  {insn.text:<31}  {format_changes(step.changed, insn.bits)}"
    lines = [line.rstrip()]
    if show_exits:
        for event in step.exits:
            lines.append(f"{'':8}-> {event.reason} {format_exit_details(event.exit)}".rstrip())
    if step.stop is not None:
        lines.append(f"{'':8}== {format_stop(step.stop)}")
    return "\n".join(lines)


def format_stop(stop: Stop) -> str:
    """One line: why the guest stopped and where."""
    if stop.reason == "breakpoint" and stop.breakpoint is not None:
        bp = stop.breakpoint
        return f"breakpoint {bp.number} at {bp.address:#x} ({bp.kind}, hit {bp.hits})"
    status = "" if stop.status is None else f" (status {stop.status})"
    first = stop.message.splitlines()[0] if stop.message else ""
    return f"{stop.reason}{status} at rip {stop.rip:#x}" + (f": {first}" if first else "")


def format_breakpoint(bp: Breakpoint) -> str:
    where = f"DR{bp.slot}" if bp.slot is not None else "int3"
    line = f"{bp.number:3d}  {bp.address:#018x}  {bp.kind} ({where})  hits {bp.hits}"
    if bp.note:
        line += f"\n     note: {bp.note}"
    return line


def format_mode(sregs) -> str:
    """``real mode, 16-bit code, CPL 0``: the mode name, code size and CPL."""
    from pykvm.cpustate import code_bits

    mode = cpu_mode_name(sregs.cr0, sregs.cr4, sregs.efer, bool(sregs.cs.l), bool(sregs.cs.db))
    level = 0 if mode == "real" else _cpl(sregs.cs.selector, sregs.ss.dpl)
    return f"{mode} mode, {code_bits(sregs)}-bit code, CPL {level}"


def format_support(support: DebugSupport) -> str:
    def word(ok: bool) -> str:
        return "yes" if ok else "no"

    lines = [f"guest debugging in {support.mode} mode: single-step {word(support.singlestep)}, "
             f"hardware breakpoints {word(support.hw_breakpoints)}, "
             f"software breakpoints {word(support.sw_breakpoints)}"]
    lines += [f"  {feature}: {why}" for feature, why in support.notes.items()]
    return "\n".join(lines)
