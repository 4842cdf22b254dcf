"""The GDB stub's target on a real machine: a :class:`~pykvm.platform.machine.Machine` behind GdbTarget.

:class:`KvmTarget` implements :class:`~pykvm.state.gdb_target.GdbTarget`
with KVM.  It owns the guest's run: a worker thread runs it (``start()``
without a debugger, ``resume()`` with one) while the stub's thread serves
GDB, and every stop stops every vCPU (all-stop).

* Registers: ``pykvm.state.gdb_kvm_regs`` (KVM_GET/SET_REGS, SREGS, FPU).
  The architecture follows the vCPU's mode of the moment.
* Memory: by guest *virtual* (linear) address, through pykvm's own page
  walker with the vCPU's CR3 (``pykvm.x86.cpu_view.read_linear``).
* ``c``: every vCPU runs through ``Machine.run()`` (the C loop, devices,
  output as in a normal run) with KVM_SET_GUEST_DEBUG arming the
  breakpoints; a KVM_EXIT_DEBUG ends the run (``VcpuStop("debug")``).  A
  vCPU resting on an instruction breakpoint is stepped over it first (a
  debug-register breakpoint fires *before* its instruction).
* ``s``: the one vCPU runs its own loop with KVM_GUESTDBG_SINGLESTEP (every
  exit decoded, I/O completed without running on: the loop's
  ``after_io="complete"``); the others stay stopped.  A ``hlt`` at CPL 0
  without the in-kernel irqchip is run, not stepped: KVM would step over it.
* Threads are vCPUs (GDB thread N is vCPU N-1).
* ``Z0`` software breakpoints: ``int3`` patched in for each run, where the
  host delivers them (``pykvm.inspect.debug_support`` measures it per
  mode); elsewhere -- every mode on nested kvm_pvm hosts -- a debug
  register instead.  ``Z1``: DR0-DR3 and DR7 through KVM_GUESTDBG_USE_HW_BP.
* ``Z2``/``Z4`` watchpoints: debug registers (R/W 01 and 11, split into
  aligned 1/2/4/8-byte pieces) where the host delivers data breakpoints
  (``debug_support.data_breakpoints``).  Where it does not (kvm_pvm: the
  CPL-0 emulator ignores them), a write watchpoint is *stepped*: the vCPU
  runs one instruction at a time and the watched bytes are compared after
  each (GDB's ``watch`` reports a change of value, so that is what it
  needs).  That needs one vCPU; access watchpoints need the hardware.
  ``Z3`` (read) is refused: x86 has no read-only data breakpoint (QEMU
  refuses it too).
"""

from __future__ import annotations

import threading

from pykvm import exits
from pykvm.errors import GuestMemoryError
from pykvm.inspect.debug_support import (
    DR7_FIXED, ENABLE, SINGLESTEP, USE_HW_BP, USE_SW_BP, data_breakpoints, debug_support, probe_mode,
)
from pykvm.log import get_logger
from pykvm.state import gdb_kvm_regs
from pykvm.state.gdb_target import SIGINT, SIGTRAP, StopEvent
from pykvm.x86 import bits
from pykvm.x86.cpu_view import linear_rip, linear_to_physical, read_linear
from pykvm.x86.state import cpl

logger = get_logger(__name__)

SIGSEGV = 11
#: The reasons this target asks the machine to stop with.
ATTACH, INTERRUPT = "gdb-attach", "gdb-interrupt"
#: How a run ends when the guest crashed: reported as SIGSEGV (registers can be read), then as exited.
CRASHES = frozenset({"shutdown", "internal-error", "fail-entry", "guest-error", "error", "unknown"})
CRASH_STATUS = 3  # what pykvm run exits with after a crash (pykvm.cli.status.EXIT_GUEST_CRASHED)
DEBUG_REGISTERS = 4
INT3 = b"\xcc"
HLT = 0xF4
DR6_BS = 1 << 14  # single-step
_LEN_BITS = {1: 0b00, 2: 0b01, 4: 0b11, 8: 0b10}  # DR7 LENn (8 bytes: 64-bit mode; SDM Vol. 3B §18.2.4)
_RW_BITS = {1: 0b00, 2: 0b01, 4: 0b11}            # by Z kind: execute, write, read/write
_WATCH_REASON = {2: "watch", 4: "awatch"}


def _ignore(_exit) -> None:
    """The step's observer: every exit decoded, none recorded."""


def pieces(address: int, length: int) -> list[tuple[int, int]]:
    """Aligned (address, 1/2/4/8) pieces covering ``length`` bytes: what one debug register can watch."""
    out = []
    end = address + length
    while address < end:
        size = 8
        while size > 1 and (address % size or address + size > end):
            size //= 2
        out.append((address, size))
        address += size
    return out


class Placed:
    """One inserted Z breakpoint: how it is implemented here."""

    __slots__ = ("kind", "address", "length", "how", "slots", "pieces", "note")

    def __init__(self, kind: int, address: int, length: int, how: str, slots=(), pieces=(), note=""):
        self.kind, self.address, self.length = kind, address, length
        self.how = how            # "sw" (int3), "hw" (debug registers) or "stepped" (compared after each step)
        self.slots = tuple(slots)
        self.pieces = tuple(pieces)
        self.note = note


class KvmTarget:
    """A Machine as the GDB stub's target (see the module docstring)."""

    def __init__(self, machine) -> None:
        self.machine = machine
        self.vcpus = machine.vcpus
        self.loops = machine.loops
        self.placed: dict[tuple[int, int, int], Placed] = {}
        self.notes: list[str] = []
        """What this host could not do, in words (the fallbacks taken)."""
        self.result = None                 # the RunResult of the last free run
        self.ended: str | None = None      # why the guest ended (a RunResult.ended word); None while it can run
        self.end_status: int | None = None
        self.end_message = ""
        self.ended_event = threading.Event()
        self._lock = threading.Condition()
        self._worker: threading.Thread | None = None
        self._stop: StopEvent | None = None   # what the worker's last run ended with, until wait() takes it
        self._crash_reported = False

    # --- running: the worker thread --------------------------------------------------

    @property
    def running(self) -> bool:
        with self._lock:
            return self._worker is not None and self._stop is None

    def start(self) -> None:
        """Let the guest run without a debugger (``pykvm run -gdb`` without ``-S``, and after ``D``)."""
        self._launch(self._free_run)

    def _launch(self, work) -> None:
        self._join()
        with self._lock:
            if self.ended is not None:
                self._stop = self._exited()
                return
            self._stop = None
            self._worker = threading.Thread(target=self._work, args=(work,), name="pykvm-gdb-run", daemon=True)
            self._worker.start()

    def _work(self, work) -> None:
        try:
            stop = work()
        except Exception as error:  # a host error: the guest cannot go on; say so and never leave wait() hanging
            logger.debug("GDB target: the run failed", exc_info=error)
            stop = self._end("error", None, f"{type(error).__name__}: {error}")
        with self._lock:
            self.machine.cancel_stop()  # an interrupt that came after the run had ended for another reason
            self._stop = stop
            self._lock.notify_all()
            if self.ended is not None:
                self.ended_event.set()  # only now: the stop GDB is to hear of is there for wait() to take

    def _join(self) -> None:
        worker = self._worker
        if worker is not None and worker is not threading.current_thread():
            worker.join()
        self._worker = None

    def _end(self, reason: str, status: int | None, message: str = "") -> StopEvent:
        """The guest ended (or crashed): remember how; the stop GDB is told."""
        if reason == "debug-exit" and status is None:
            status = self.machine.debug_exit.exit_status
        self.ended, self.end_status, self.end_message = reason, status, message
        if reason in CRASHES and not self._crash_reported:
            self._crash_reported = True
            return StopEvent(self.machine.last_stop_vcpu + 1, SIGSEGV, "signal")
        return self._exited()

    def _exited(self) -> StopEvent:
        """GDB's ``W``: the device's exit status; a crash is pykvm's own status for one (3)."""
        status = self.end_status if self.end_status is not None else CRASH_STATUS if self.ended in CRASHES else 0
        return StopEvent(1, reason="exited", exit_status=status & 0xFF)

    def end(self, reason: str) -> None:
        """The session ends the guest (timeout, a signal, the debugger's ``k``): stop any run, mark it ended."""
        with self._lock:
            running = self._worker is not None and self._stop is None
            if running:
                self.machine.request_stop(reason)
            elif self.ended is None:
                self._end(reason, None)
        if running:
            self._join()
            with self._lock:
                if self.ended is None:  # the run ended for its own reason first, say a breakpoint
                    self._end(reason, None)
        self.ended_event.set()

    def close(self) -> None:
        self.end("closed")

    def wait_reported(self, timeout: float) -> bool:
        """Wait until wait() has handed out the last stop (a debugger heard of it); False after ``timeout`` s."""
        with self._lock:
            return self._lock.wait_for(lambda: self._stop is None, timeout)

    # --- GdbTarget: the stub's side ------------------------------------------------------

    def attach(self) -> StopEvent:
        with self._lock:
            if self._worker is not None and self._stop is None:
                self.machine.request_stop(ATTACH)
            while self._worker is not None and self._stop is None:
                self._lock.wait()
            stop, self._stop = self._stop, None
            self._lock.notify_all()  # (wait_reported)
        self._join()
        if self.ended is not None:
            return self._exited()
        if stop is not None and stop.reason not in ("exited", "interrupt"):
            return stop  # the run had stopped by itself: a breakpoint of a former session, a crash
        return StopEvent(stop.thread if stop is not None else 1, SIGTRAP, "signal")

    def threads(self) -> list[int]:
        return list(range(1, len(self.vcpus) + 1))

    def _vcpu(self, thread: int):
        if not 1 <= thread <= len(self.vcpus):
            raise ValueError(f"no thread {thread} (vCPUs 1 to {len(self.vcpus)})")
        return self.vcpus[thread - 1]

    def arch(self, thread: int) -> str:
        return gdb_kvm_regs.architecture(self._vcpu(thread).get_sregs())

    def read_registers(self, thread: int) -> dict[str, int]:
        return gdb_kvm_regs.read_registers(self._vcpu(thread))

    def write_registers(self, thread: int, values: dict[str, int]) -> None:
        gdb_kvm_regs.write_registers(self._vcpu(thread), values)

    def read_memory(self, thread: int, address: int, length: int) -> bytes:
        return read_linear(self.machine.memory, self._vcpu(thread).get_sregs(), address, length)

    def write_memory(self, thread: int, address: int, data: bytes) -> None:
        memory, sregs = self.machine.memory, self._vcpu(thread).get_sregs()
        chunks, offset = [], 0
        while offset < len(data):  # check every page first: nothing is written unless all of it can be
            linear = address + offset
            size = min(len(data) - offset, 0x1000 - (linear & 0xFFF))
            gpa = linear_to_physical(memory, sregs, linear)
            if gpa is None or not memory.is_mapped(gpa, size):
                raise GuestMemoryError(f"{linear:#x} is not mapped to guest RAM")
            chunks.append((gpa, offset, size))
            offset += size
        for gpa, offset, size in chunks:
            memory.write(gpa, bytes(data[offset:offset + size]))

    def resume(self, actions: dict[int | None, str]) -> None:
        stepping = [t for t in self.threads() if actions.get(t, actions.get(None)) == "s"]
        if stepping:
            index = stepping[0] - 1
            self._launch(lambda: self._step_event(index))
        else:
            self._launch(self._continue)

    def wait(self, timeout: float | None) -> StopEvent | None:
        with self._lock:
            if self._stop is None and not self._lock.wait_for(lambda: self._stop is not None, timeout):
                return None
            stop, self._stop = self._stop, None
            self._lock.notify_all()  # (wait_reported)
        self._join()
        return stop

    def interrupt(self) -> None:
        with self._lock:
            if self._worker is not None and self._stop is None:
                self.machine.request_stop(INTERRUPT)

    def detach(self) -> None:
        self.placed.clear()
        with self._lock:  # GDB may go away while the guest runs: stop that run, then run on undebugged
            if self._worker is not None and self._stop is None:
                self.machine.request_stop(ATTACH)
            while self._worker is not None and self._stop is None:
                self._lock.wait()
            self._stop = None
        self._join()
        if self.ended is None:
            for vcpu in self.vcpus:
                vcpu.set_guest_debug(0)
            self.start()

    def kill(self) -> None:
        self.placed.clear()
        self.end("killed")

    # --- breakpoints -------------------------------------------------------------------

    def _mode(self) -> str:
        return probe_mode(self.vcpus[0].get_sregs())

    def _free_slots(self) -> list[int]:
        used = {slot for placed in self.placed.values() for slot in placed.slots}
        return [slot for slot in range(DEBUG_REGISTERS) if slot not in used]

    def _take_slots(self, count: int, what: str) -> list[int]:
        free = self._free_slots()
        if len(free) < count:
            raise RuntimeError(f"{what} needs {count} debug register(s); {len(free)} of {DEBUG_REGISTERS} are free")
        return free[:count]

    def insert_breakpoint(self, kind: int, address: int, length: int) -> bool:
        key = (kind, address, length)
        if key in self.placed:
            return True
        if kind == 3:
            return False  # x86 debug registers watch writes or all accesses, never reads alone
        mode = self._mode()
        if kind in (0, 1):
            support = debug_support(mode, self.machine.kvm)
            if kind == 0 and support.sw_breakpoints:
                self.placed[key] = Placed(kind, address, length, "sw")
                return True
            if not support.hw_breakpoints:
                raise RuntimeError(support.notes.get("hw_breakpoints", "hardware breakpoints do not work here"))
            note = ""
            if kind == 0:
                note = (f"software breakpoint at {address:#x}: {support.notes.get('sw_breakpoints', '')}; "
                        "using a debug register instead")
                if note not in self.notes:
                    self.notes.append(note)
                    logger.info("GDB stub: %s", note)
            self.placed[key] = Placed(kind, address, length, "hw", self._take_slots(1, "a breakpoint"),
                                      ((address, 1),), note)
            return True
        works, why = data_breakpoints(mode, self.machine.kvm)
        parts = pieces(address, max(length, 1))
        if works:
            self.placed[key] = Placed(kind, address, length, "hw", self._take_slots(len(parts), "a watchpoint"),
                                      parts)
            return True
        if kind == 4:
            raise RuntimeError(f"access watchpoints need data breakpoints, and {why}")
        if len(self.vcpus) > 1:
            raise RuntimeError(f"{why}; a stepped write watchpoint needs a machine with one vCPU")
        note = f"write watchpoint at {address:#x}: {why}; stepping the guest and comparing instead"
        if note not in self.notes:
            self.notes.append(note)
            logger.info("GDB stub: %s", note)
        self.placed[key] = Placed(kind, address, length, "stepped", note=note)
        return True

    def remove_breakpoint(self, kind: int, address: int, length: int) -> bool:
        if kind == 3:
            return False
        self.placed.pop((kind, address, length), None)
        return True

    def _debugreg(self, *, instructions: bool = True) -> tuple[int, ...]:
        """DR0-DR3, DR6, DR7 for KVM_SET_GUEST_DEBUG (instruction breakpoints left out when stepping)."""
        dr = [0] * 8
        dr7 = DR7_FIXED
        for placed in self.placed.values():
            if placed.how != "hw" or (placed.kind in (0, 1) and not instructions):
                continue
            for slot, (address, size) in zip(placed.slots, placed.pieces):
                dr[slot] = address
                dr7 |= 2 << (slot * 2)  # Gn
                if placed.kind not in (0, 1):
                    dr7 |= (_RW_BITS[placed.kind] << (16 + 4 * slot)) | (_LEN_BITS[size] << (18 + 4 * slot))
        dr[7] = dr7
        return tuple(dr)

    def _slot_hit(self, dr6: int) -> Placed | None:
        for placed in self.placed.values():
            if any(dr6 & (1 << slot) for slot in placed.slots):
                return placed
        return None

    def _hit_event(self, thread: int, placed: Placed) -> StopEvent:
        if placed.kind in (0, 1):
            return StopEvent(thread, SIGTRAP, "breakpoint", address=placed.address)
        return StopEvent(thread, SIGTRAP, _WATCH_REASON.get(placed.kind, "watch"), address=placed.address)

    def _instruction_breakpoints(self) -> set[int]:
        return {placed.address for placed in self.placed.values() if placed.kind in (0, 1)}

    # --- the runs (on the worker thread) -------------------------------------------------

    def _free_run(self) -> StopEvent:
        for vcpu in self.vcpus:
            vcpu.set_guest_debug(0)
        return self._run_machine()

    def _continue(self) -> StopEvent:
        if any(placed.how == "stepped" for placed in self.placed.values()):
            return self._stepped_continue()  # (it checks breakpoints after each step: none to step over)
        breakpoints = self._instruction_breakpoints()
        if breakpoints:
            for index, vcpu in enumerate(self.vcpus):  # a breakpoint fires before its instruction: step over it
                if linear_rip(vcpu.get_regs(), vcpu.get_sregs()) in breakpoints:
                    stop = self._step_event(index)
                    if stop.reason != "step":
                        return stop
        hw = any(placed.how == "hw" for placed in self.placed.values())
        sw = [placed for placed in self.placed.values() if placed.how == "sw"]
        control = (ENABLE | (USE_HW_BP if hw else 0) | (USE_SW_BP if sw else 0)) if hw or sw else 0
        debugreg = self._debugreg() if hw else ()
        for vcpu in self.vcpus:
            vcpu.set_guest_debug(control, debugreg)
        saved = self._insert_int3(sw)
        try:
            return self._run_machine()
        finally:
            for gpa, original in reversed(saved):
                self.machine.memory.write(gpa, original)

    def _insert_int3(self, sw: list[Placed]) -> list[tuple[int, bytes]]:
        saved: list[tuple[int, bytes]] = []
        memory, sregs = self.machine.memory, self.vcpus[0].get_sregs()
        for placed in sw:
            gpa = linear_to_physical(memory, sregs, placed.address)
            if gpa is None or not memory.is_mapped(gpa):
                logger.warning("GDB stub: breakpoint at %#x is not in mapped memory: not inserted", placed.address)
                continue
            saved.append((gpa, memory.read(gpa, 1)))
            memory.write(gpa, INT3)
        return saved

    def _run_machine(self) -> StopEvent:
        result = self.machine.run()
        self.result = result
        thread = self.machine.last_stop_vcpu + 1
        if result.ended == "debug" and isinstance(result.last_exit, exits.Debug):
            return self._debug_event(thread, result.last_exit)
        return self._stop_event(thread, result.ended, result.exit_status, result.message)

    def _stop_event(self, thread: int, reason: str, status: int | None, message: str) -> StopEvent:
        """A run that ended other than by a debug exit: asked by this target, or the guest's end."""
        if reason == ATTACH:
            return StopEvent(thread, SIGTRAP, "signal")
        if reason in (INTERRUPT, "paused", "monitor"):
            return StopEvent(thread, SIGINT, "interrupt")
        return self._end(reason, status, message)

    def _debug_event(self, thread: int, debug: exits.Debug) -> StopEvent:
        if debug.exception == 3:  # int3 of a software breakpoint
            vcpu = self.vcpus[thread - 1]
            regs = vcpu.get_regs()
            linear = linear_rip(regs, vcpu.get_sregs())
            addresses = {p.address for p in self.placed.values() if p.how == "sw"}
            if linear not in addresses and linear - 1 in addresses:
                regs.rip -= 1  # KVM leaves RIP after the int3: GDB wants the breakpoint's address
                vcpu.set_regs(regs)
                linear -= 1
            return StopEvent(thread, SIGTRAP, "breakpoint", address=linear)
        placed = self._slot_hit(debug.dr6)
        if placed is not None:
            return self._hit_event(thread, placed)
        return StopEvent(thread, SIGTRAP, "step" if debug.dr6 & DR6_BS else "signal")

    def _read(self, sregs, linear: int, size: int, tlb: dict | None = None) -> bytes:
        """``read_linear``; with ``tlb``, page translations are remembered (the stepped continue's many reads).

        The remembered ones are keyed by the paging registers and kept for one
        continue: a guest that edits a live page-table entry without
        changing CR3 may be read through the old mapping until GDB resumes again.
        """
        memory = self.machine.memory
        if tlb is None or (linear & 0xFFF) + size > 0x1000:
            return read_linear(memory, sregs, linear, size)
        key = (sregs.cr3, sregs.cr0, sregs.cr4, sregs.efer, linear >> 12)
        page = tlb.get(key)
        if page is None:
            page = linear_to_physical(memory, sregs, linear & ~0xFFF)
            if page is None or not memory.is_mapped(page, 0x1000):
                return read_linear(memory, sregs, linear, size)
            tlb[key] = page
        return memory.read(page + (linear & 0xFFF), size)

    def _step_event(self, index: int, *, armed: bool = False, state=None, tlb: dict | None = None) -> StopEvent:
        """Execute one instruction of vCPU ``index``; the others stay stopped.

        ``state``: the vCPU's (regs, sregs), when the caller has just read them.
        """
        vcpu, loop = self.vcpus[index], self.loops[index]
        regs, sregs = state or (vcpu.get_regs(), vcpu.get_sregs())
        halts = (not self.machine.irqchip and (not sregs.cr0 & bits.CR0_PE or cpl(sregs.cs.selector, sregs.ss.dpl)
                                                == 0)
                 and self._read(sregs, linear_rip(regs, sregs), 1, tlb) == bytes((HLT,)))
        if halts or not armed:  # (armed: the stepped continue set SINGLESTEP once for all its steps)
            debugreg = self._debugreg(instructions=False)
            watching = any(debugreg[:4])
            vcpu.set_guest_debug((0 if halts else ENABLE | SINGLESTEP) | (ENABLE | USE_HW_BP if watching else 0),
                                 debugreg if watching else ())
        stop = loop.run(observe=_ignore, after_io=None if halts else "complete")
        if stop.pending_io and not halts:
            loop.complete_pending()  # a device ended the run inside the instruction: finish it
        thread = index + 1
        if stop.reason == "debug" and isinstance(stop.exit, exits.Debug):
            placed = self._slot_hit(stop.exit.dr6)
            if placed is not None and placed.kind not in (0, 1):
                return self._hit_event(thread, placed)
            return StopEvent(thread, SIGTRAP, "step")
        if stop.reason == "io":
            return StopEvent(thread, SIGTRAP, "step")
        self.machine.last_stop_vcpu = index
        return self._stop_event(thread, stop.reason, stop.status, stop.message)

    def _stepped_continue(self) -> StopEvent:
        """Continue one instruction at a time, comparing the watched bytes after each (the host has no data breakpoints)."""
        vcpu = self.vcpus[0]
        watched = [placed for placed in self.placed.values() if placed.how == "stepped"]
        breakpoints = self._instruction_breakpoints()
        tlb: dict = {}
        state = (vcpu.get_regs(), vcpu.get_sregs())
        before = [self._read(state[1], placed.address, max(placed.length, 1), tlb) for placed in watched]
        vcpu.set_guest_debug(ENABLE | SINGLESTEP)
        while True:
            stop = self._step_event(0, armed=True, state=state, tlb=tlb)
            if stop.reason != "step":
                return stop
            state = (vcpu.get_regs(), vcpu.get_sregs())
            after = [self._read(state[1], placed.address, max(placed.length, 1), tlb) for placed in watched]
            for placed, old, new in zip(watched, before, after):
                if old != new:
                    return self._hit_event(1, placed)
            before = after
            if breakpoints:
                pc = linear_rip(*state)
                if pc in breakpoints:
                    return StopEvent(1, SIGTRAP, "breakpoint", address=pc)
