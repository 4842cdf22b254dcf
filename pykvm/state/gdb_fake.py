"""A pretend x86 machine for testing the GDB stub without KVM (like vm-virtio's mock.rs).

:class:`FakeX86Target` implements :class:`~pykvm.state.gdb_target.GdbTarget`
with a register dict per vCPU, a bytearray of memory from address 0 and a
scripted program instead of an instruction decoder: every instruction is
:data:`INSTRUCTION_SIZE` bytes, and :attr:`FakeX86Target.program` says
what the instruction at an address does (:class:`Op`); any other address
holds a plain ``nop``.  The memory holds real 4-byte ``nop``s
(``0f 1f 40 00``) so GDB's disassembly reads sensibly.

It runs lazily: ``resume()`` records what to do and ``wait()`` executes,
up to :data:`STEPS_PER_WAIT` instructions, until a breakpoint,
watchpoint, step or exit stops it.  A program with no stop ahead (a
``spin``) "runs" until ``interrupt()`` or the wait's timeout, waiting on
a condition: no sleeping, no thread.

Breakpoints behave like x86 debug registers after RF: a breakpoint at the
address a vCPU resumes from does not fire until it comes back there, and
the reported PC is the breakpoint's address.  A watchpoint fires after
the access, with the PC after the instruction.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from pykvm.errors import GuestMemoryError
from pykvm.state.gdb_target import SIGINT, SIGTRAP, SOURCE_BITS, StopEvent

INSTRUCTION_SIZE = 4
NOP4 = bytes.fromhex("0f1f4000")  # nopl 0x0(%rax): four bytes, as the model's instructions
STEPS_PER_WAIT = 10_000
WATCH_REASON = {2: "watch", 3: "rwatch", 4: "awatch"}


@dataclass(frozen=True)
class Op:
    """What one scripted instruction does."""

    kind: str                 # "nop", "store", "load", "jump", "spin" (jmp to itself), "exit"
    address: int = 0          # store/load: data address; jump: target
    size: int = 8             # store/load: bytes
    value: int = 0            # store: the value; exit: the exit status


def initial_registers(entry: int) -> dict[str, int]:
    """A vCPU just after reset into a flat mode: every register of the x86-64 layout."""
    registers = {name: 0 for name in SOURCE_BITS}
    registers.update(rip=entry, eflags=0x2, cs=0x8, ss=0x10, ds=0x10, es=0x10,
                     fctrl=0x37F, mxcsr=0x1F80, cr0=0x80000011, efer=0x500)
    return registers


@dataclass
class FakeX86Target:
    """An in-memory x86 CPU model behind the GdbTarget interface."""

    vcpus: int = 1
    memory_size: int = 0x10000
    entry: int = 0x1000
    mode: str = "i386:x86-64"
    program: dict[int, Op] = field(default_factory=dict)
    #: Every call the stub made, in order: ("resume", {...}), ("detach",), ...
    calls: list[tuple] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.memory = bytearray(self.memory_size)
        code_end = min(self.entry + 0x100, self.memory_size)
        for address in range(self.entry, code_end - INSTRUCTION_SIZE + 1, INSTRUCTION_SIZE):
            self.memory[address:address + INSTRUCTION_SIZE] = NOP4
        self.registers = {thread: initial_registers(self.entry) for thread in self.threads()}
        self.inserted: set[tuple[int, int, int]] = set()  # (Z kind, address, length)
        self.running = False
        self.exit_status: int | None = None
        self.executed = 0  # instructions run, all vCPUs together
        self._actions: dict[int | None, str] = {}
        self._interrupted = False
        self._wakeup = threading.Condition()

    # --- GdbTarget --------------------------------------------------------------------

    def attach(self) -> StopEvent:
        self.calls.append(("attach",))
        self.running = False
        if self.exit_status is not None:
            return StopEvent(1, reason="exited", exit_status=self.exit_status)
        return StopEvent(1, SIGTRAP, "signal")

    def threads(self) -> list[int]:
        return list(range(1, self.vcpus + 1))

    def arch(self, thread: int) -> str:
        return self.mode

    def read_registers(self, thread: int) -> dict[str, int]:
        return dict(self.registers[thread])

    def write_registers(self, thread: int, values: dict[str, int]) -> None:
        unknown = set(values) - set(self.registers[thread])
        if unknown:
            raise ValueError(f"no such registers: {sorted(unknown)}")
        for name, value in values.items():
            self.registers[thread][name] = value & ((1 << SOURCE_BITS[name]) - 1)

    def read_memory(self, thread: int, address: int, length: int) -> bytes:
        return bytes(self.memory[address:address + length]) if address < self.memory_size else b""

    def write_memory(self, thread: int, address: int, data: bytes) -> None:
        if address + len(data) > self.memory_size:
            raise GuestMemoryError(f"{len(data)} bytes at {address:#x} are outside the fake's memory")
        self.memory[address:address + len(data)] = data

    def resume(self, actions: dict[int | None, str]) -> None:
        self.calls.append(("resume", dict(actions)))
        with self._wakeup:
            self._actions = dict(actions)
            self._interrupted = False
            self.running = True

    def wait(self, timeout: float | None) -> StopEvent | None:
        if not self.running:
            return None
        stop = self._execute()
        with self._wakeup:
            if stop is None and not self._interrupted:
                self._wakeup.wait(timeout)
            if stop is None and self._interrupted:
                stop = StopEvent(self._running_threads()[0], SIGINT, "interrupt")
            if stop is not None:
                self.running = False
                self._actions = {}
            return stop

    def interrupt(self) -> None:
        self.calls.append(("interrupt",))
        with self._wakeup:
            self._interrupted = True
            self._wakeup.notify_all()

    def insert_breakpoint(self, kind: int, address: int, length: int) -> bool:
        self.calls.append(("insert", kind, address, length))
        self.inserted.add((kind, address, length))
        return True

    def remove_breakpoint(self, kind: int, address: int, length: int) -> bool:
        self.calls.append(("remove", kind, address, length))
        self.inserted.discard((kind, address, length))
        return True

    def detach(self) -> None:
        self.calls.append(("detach",))
        self.inserted.clear()
        self.running = True  # the guest runs on, undebugged

    def kill(self) -> None:
        self.calls.append(("kill",))
        self.running = False
        self.exit_status = 0

    # --- the model --------------------------------------------------------------------

    @property
    def breakpoints(self) -> set[int]:
        """Addresses of the inserted Z0 and Z1 breakpoints."""
        return {address for kind, address, _ in self.inserted if kind in (0, 1)}

    def _action(self, thread: int) -> str | None:
        return self._actions.get(thread, self._actions.get(None))

    def _running_threads(self) -> list[int]:
        return [thread for thread in self.threads() if self._action(thread) is not None] or [1]

    def _execute(self) -> StopEvent | None:
        """Run the resumed vCPUs until something stops them; None if nothing does (yet)."""
        if self.exit_status is not None:
            return StopEvent(1, reason="exited", exit_status=self.exit_status)
        stepping = [t for t in self.threads() if self._action(t) == "s"]
        if stepping:  # a step stops the guest after one instruction of the stepping vCPU
            thread = stepping[0]
            return self._instruction(thread) or StopEvent(thread, SIGTRAP, "step")
        continuing = [t for t in self.threads() if self._action(t) == "c"]
        breakpoints = self.breakpoints
        for count in range(STEPS_PER_WAIT):
            for thread in continuing:
                rip = self.registers[thread]["rip"]
                if count and rip in breakpoints:
                    return StopEvent(thread, SIGTRAP, "breakpoint", address=rip)
            if all(self.program.get(self.registers[t]["rip"], Op("nop")).kind == "spin" for t in continuing):
                return None  # nothing but spinning ahead: only an interrupt ends this
            for thread in continuing:
                stop = self._instruction(thread)
                if stop is not None:
                    return stop
        return None

    def _instruction(self, thread: int) -> StopEvent | None:
        """Execute the instruction at the vCPU's rip; a stop if it ended the guest or hit a watchpoint."""
        registers = self.registers[thread]
        rip = registers["rip"]
        op = self.program.get(rip, Op("nop"))
        registers["rip"] = rip + INSTRUCTION_SIZE
        self.executed += 1
        if op.kind == "exit":
            self.exit_status = op.value & 0xFF
            return StopEvent(thread, reason="exited", exit_status=self.exit_status)
        if op.kind == "spin":
            registers["rip"] = rip
        elif op.kind == "jump":
            registers["rip"] = op.address
        elif op.kind == "store":
            self.write_memory(thread, op.address, (op.value & ((1 << 8 * op.size) - 1)).to_bytes(op.size, "little"))
            return self._watch_hit(thread, op, kinds=(2, 4))
        elif op.kind == "load":
            return self._watch_hit(thread, op, kinds=(3, 4))
        return None

    def _watch_hit(self, thread: int, op: Op, kinds: tuple[int, ...]) -> StopEvent | None:
        for kind, address, length in sorted(self.inserted):
            if kind in kinds and address < op.address + op.size and op.address < address + length:
                return StopEvent(thread, SIGTRAP, WATCH_REASON[kind], address=max(address, op.address))
        return None
