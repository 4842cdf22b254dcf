"""What the GDB stub debugs: the target interface and the x86 register layouts.

The stub (:mod:`pykvm.state.gdb_server`) speaks the protocol; a *target*
does the work on the VM: it reads and writes registers and memory, resumes
and stops vCPUs, and inserts breakpoints.  :class:`GdbTarget` is that
contract, free of KVM so the stub can be tested against a model
(:mod:`pykvm.state.gdb_fake`).

GDB learns the register set from a *target description* (GDB manual,
appendix G "Target Descriptions"; G.5 "Standard Target Features", i386):
XML features listing each register's name, width and type, in the order of
the ``g`` packet.  GDB's i386 code insists on the feature
``org.gnu.gdb.i386.core`` with all its registers, x87 ones included
(eax..edi or rax..r15, eip/rip, eflags, six segment registers, st0-st7,
fctrl..fop); ``org.gnu.gdb.i386.sse`` adds xmm0-7/15 and mxcsr, and
``org.gnu.gdb.i386.segments`` fs_base and gs_base (64-bit only: GDB 13
fails an internal assertion on the 32-bit one under its GNU/Linux OS ABI).
pykvm adds ``org.pykvm.x86.control`` (k_gs_base, cr0, cr2, cr3, cr4, cr8,
efer; fs_base and gs_base in 32-bit mode), which GDB shows with the general
registers, as QEMU does with its own.  The description says OS ABI "none":
a whole machine, not a process of some OS.

A :class:`Layout` is one such description.  Registers always travel
between stub and target under their x86-64 names (``rax``, ``rip``,
``cr0``...), whatever the CPU mode: KVM's registers are 64 bits wide.  The
32-bit layouts are views: ``eax`` is the low half of ``rax``, and writing it
keeps the high half.

CPU modes.  GDB has no description of real mode; as advised for QEMU,
real mode uses the 32-bit register set with architecture ``i8086``, which
makes GDB disassemble 16-bit code.  Addresses stay linear: GDB knows
nothing of segments, so ``$pc`` is ``eip`` (not ``cs * 16 + ip``) and a
breakpoint at ``$pc`` is right only where the code segment's base is 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Protocol, runtime_checkable

SIGINT = 2
SIGTRAP = 5

#: Why a vCPU stopped (``StopEvent.reason``).
STOP_REASONS = frozenset({
    "breakpoint",   # an inserted Z0/Z1 breakpoint; the PC is the breakpoint's address
    "watch",        # a write watchpoint (Z2) fired; ``address`` is the data address
    "rwatch",       # a read watchpoint (Z3)
    "awatch",       # an access watchpoint (Z4)
    "step",         # a single step ended
    "interrupt",    # stopped by interrupt() (GDB's Ctrl-C)
    "signal",       # any other stop: just ``signal`` (e.g. SIGTRAP at attach, SIGSEGV on a crash)
    "exited",       # the guest ended; ``exit_status`` says how
})
WATCH_REASONS = frozenset({"watch", "rwatch", "awatch"})


@dataclass(frozen=True)
class StopEvent:
    """A stop of the whole guest (all-stop mode), as seen from one vCPU."""

    thread: int                      # the vCPU that stopped (GDB thread id, from 1)
    signal: int = SIGTRAP            # GDB signal number: 5 SIGTRAP, 2 SIGINT, ...
    reason: str = "signal"           # one of STOP_REASONS
    address: int | None = None       # data address of a watchpoint; a breakpoint's address
    exit_status: int | None = None   # for "exited": the guest's exit status (0-255)

    def __post_init__(self) -> None:
        if self.reason not in STOP_REASONS:
            raise ValueError(f"unknown stop reason {self.reason!r}")
        if self.reason in WATCH_REASONS and self.address is None:
            raise ValueError(f"a {self.reason!r} stop needs the data address")


@runtime_checkable
class GdbTarget(Protocol):
    """A VM as the GDB stub sees it.  Every method is called from the stub's thread.

    Threads are vCPUs, numbered from 1.  Registers are dicts of x86-64
    names (see the module docstring); a register left out of
    :meth:`read_registers` is shown as unavailable and never written.
    Failures (a bad address, a refused value) are raised as exceptions; the
    stub turns them into ``E`` replies and the target must stay usable.
    """

    def attach(self) -> StopEvent:
        """A debugger connected: stop every vCPU (if running) and say where the guest stands."""

    def threads(self) -> list[int]:
        """The thread ids, one per vCPU, from 1."""

    def arch(self, thread: int) -> str:
        """The vCPU's current mode as a GDB architecture: "i386:x86-64", "i386" or "i8086"."""

    def read_registers(self, thread: int) -> dict[str, int]:
        """The vCPU's registers, by x86-64 name."""

    def write_registers(self, thread: int, values: dict[str, int]) -> None:
        """Set some registers (names that read_registers returned)."""

    def read_memory(self, thread: int, address: int, length: int) -> bytes:
        """Bytes at a guest virtual address as this vCPU sees it; fewer if the tail is unmapped."""

    def write_memory(self, thread: int, address: int, data: bytes) -> None:
        """Write bytes at a guest virtual address; raise if any of it cannot be written."""

    def resume(self, actions: dict[int | None, str]) -> None:
        """Start vCPUs and return at once: ``"c"`` continue or ``"s"`` step per thread.

        The key None stands for every thread not named; a thread with no
        action (and no None key) stays stopped.
        """

    def wait(self, timeout: float | None) -> StopEvent | None:
        """Block until the guest stops (then every vCPU is stopped), or None after ``timeout`` seconds."""

    def interrupt(self) -> None:
        """Stop every vCPU soon; the next wait() reports it (reason "interrupt", SIGINT)."""

    def insert_breakpoint(self, kind: int, address: int, length: int) -> bool:
        """Z0 software, Z1 hardware breakpoint, Z2 write, Z3 read, Z4 access watchpoint.

        False means this kind is not supported (GDB then does without it);
        raise when it is supported but cannot be inserted here.
        """

    def remove_breakpoint(self, kind: int, address: int, length: int) -> bool:
        """Undo insert_breakpoint; False if the kind is not supported."""

    def detach(self) -> None:
        """The debugger left: remove every breakpoint and watchpoint, let the guest run."""

    def kill(self) -> None:
        """The debugger asked to kill the guest."""


# --- target descriptions --------------------------------------------------------------


@dataclass(frozen=True)
class Register:
    """One register of a layout, as GDB sees it and where its value comes from."""

    name: str                 # as GDB shows it
    bits: int
    type: str                 # a GDB type: int64, code_ptr, i387_ext, or one the feature defines
    source: str = ""          # key in the target's register dict (defaults to name)
    group: str | None = None  # GDB register group: "float", "vector"; None lets GDB decide

    def __post_init__(self) -> None:
        if not self.source:
            object.__setattr__(self, "source", self.name)

    @property
    def size(self) -> int:
        return self.bits // 8


@dataclass(frozen=True)
class Feature:
    """One XML feature: a named group of registers and the types they use."""

    name: str                    # e.g. "org.gnu.gdb.i386.core"
    file: str                    # the annex GDB reads it from (qXfer:features:read)
    registers: tuple[Register, ...]
    types: str = ""              # XML type definitions that precede the registers

    def xml(self, first_regnum: int) -> bytes:
        lines = ['<?xml version="1.0"?>', '<!DOCTYPE feature SYSTEM "gdb-target.dtd">',
                 f'<feature name="{self.name}">']
        if self.types:
            lines.append(self.types)
        for number, register in enumerate(self.registers, first_regnum):
            group = f' group="{register.group}"' if register.group else ""
            lines.append(f'  <reg name="{register.name}" bitsize="{register.bits}" '
                         f'type="{register.type}" regnum="{number}"{group}/>')
        lines.append("</feature>")
        return ("\n".join(lines) + "\n").encode()


@dataclass(frozen=True)
class Layout:
    """A target description: the architecture, its features, the ``g`` packet's layout."""

    architecture: str
    features: tuple[Feature, ...]

    @cached_property
    def registers(self) -> tuple[Register, ...]:
        """Every register in ``g`` packet order; a register's index is its GDB number."""
        return tuple(register for feature in self.features for register in feature.registers)

    @cached_property
    def g_size(self) -> int:
        """Bytes of register data in a ``g`` packet."""
        return sum(register.size for register in self.registers)

    def documents(self) -> dict[str, bytes]:
        """Annex name -> XML: ``target.xml`` and one file per feature it includes."""
        includes = "\n".join(f'  <xi:include href="{feature.file}"/>' for feature in self.features)
        target = ('<?xml version="1.0"?>\n<!DOCTYPE target SYSTEM "gdb-target.dtd">\n'
                  f'<target version="1.0">\n  <architecture>{self.architecture}</architecture>\n'
                  '  <osabi>none</osabi>\n'
                  f'{includes}\n</target>\n').encode()
        documents = {"target.xml": target}
        regnum = 0
        for feature in self.features:
            documents[feature.file] = feature.xml(regnum)
            regnum += len(feature.registers)
        return documents

    # Values travel as little-endian hex, register after register (the g packet, p/P).

    def encode(self, register: Register, values: dict[str, int]) -> str:
        """The register's hex digits from the target's values; "xx.." if it has none."""
        value = values.get(register.source)
        if value is None:
            return "xx" * register.size
        return (value & ((1 << register.bits) - 1)).to_bytes(register.size, "little").hex()

    def encode_all(self, values: dict[str, int]) -> str:
        return "".join(self.encode(register, values) for register in self.registers)

    def merge(self, register: Register, data: bytes, current: dict[str, int]) -> int:
        """The new source value after GDB wrote ``data`` to ``register``.

        A register narrower than its source (eax of rax) replaces only its
        low bits.
        """
        value = int.from_bytes(data, "little")
        if register.bits >= SOURCE_BITS.get(register.source, register.bits):
            return value
        return (current.get(register.source, 0) & ~((1 << register.bits) - 1)) | value

    def decode_all(self, data: bytes, current: dict[str, int]) -> dict[str, int]:
        """The values a ``G`` packet's bytes set, for registers the target has.

        ``data`` may cover a prefix of the layout (whole registers only).
        """
        values, offset = {}, 0
        for register in self.registers:
            if offset + register.size > len(data):
                break
            if register.source in current:
                values[register.source] = self.merge(register, data[offset:offset + register.size], current)
            offset += register.size
        if offset != len(data):
            raise ValueError(f"{len(data)} bytes of register data do not end on a register boundary")
        return values


def _flags(type_id: str, size: int, fields: str) -> str:
    """A GDB flags type; ``fields`` is "NAME:BIT" or "NAME:FIRST-LAST" words."""
    lines = [f'  <flags id="{type_id}" size="{size}">']
    for word in fields.split():
        name, bits = word.split(":")
        start, _, end = bits.partition("-")
        lines.append(f'    <field name="{name}" start="{start}" end="{end or start}"/>')
    lines.append("  </flags>")
    return "\n".join(lines)


EFLAGS_TYPE = _flags("i386_eflags", 4, "CF:0 PF:2 AF:4 ZF:6 SF:7 TF:8 IF:9 DF:10 OF:11 IOPL:12-13 "
                                       "NT:14 RF:16 VM:17 AC:18 VIF:19 VIP:20 ID:21")
MXCSR_TYPE = _flags("i386_mxcsr", 4, "IE:0 DE:1 ZE:2 OE:3 UE:4 PE:5 DAZ:6 IM:7 DM:8 ZM:9 OM:10 "
                                     "UM:11 PM:12 FZ:15")
VEC128_TYPE = "\n".join([
    *(f'  <vector id="{vid}" type="{element}" count="{count}"/>' for vid, element, count in (
        ("v4f", "ieee_single", 4), ("v2d", "ieee_double", 2), ("v16i8", "int8", 16),
        ("v8i16", "int16", 8), ("v4i32", "int32", 4), ("v2i64", "int64", 2))),
    '  <union id="vec128">',
    *(f'    <field name="{name}" type="{vid}"/>' for name, vid in (
        ("v4_float", "v4f"), ("v2_double", "v2d"), ("v16_int8", "v16i8"), ("v8_int16", "v8i16"),
        ("v4_int32", "v4i32"), ("v2_int64", "v2i64"), ("uint128", "uint128"))),
    "  </union>",
])
CONTROL_FLAGS = {
    "cr0": "PE:0 MP:1 EM:2 TS:3 ET:4 NE:5 WP:16 AM:18 NW:29 CD:30 PG:31",
    "cr4": "VME:0 PVI:1 TSD:2 DE:3 PSE:4 PAE:5 MCE:6 PGE:7 PCE:8 OSFXSR:9 OSXMMEXCPT:10 UMIP:11 "
           "LA57:12 VMXE:13 SMXE:14 FSGSBASE:16 PCIDE:17 OSXSAVE:18 SMEP:20 SMAP:21 PKE:22 CET:23",
    "efer": "SCE:0 LME:8 LMA:10 NXE:11 SVME:12 LMSLE:13 FFXSR:14 TCE:15",
}

SEGMENT_SELECTORS = ("cs", "ss", "ds", "es", "fs", "gs")
X87_CONTROL = ("fctrl", "fstat", "ftag", "fiseg", "fioff", "foseg", "fooff", "fop")


def _x86_layout(architecture: str, width: int) -> Layout:
    """The description of a 64-bit (``width`` 64) or 32-bit x86 CPU."""
    wide = width == 64
    integer = f"int{width}"
    if wide:
        general = [(name, name) for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp")]
        general += [(f"r{n}", f"r{n}") for n in range(8, 16)]
        pc, xmm_count = ("rip", "rip"), 16
    else:  # GDB's i386 order: eax ecx edx ebx esp ebp esi edi
        general = [("e" + name[1:], name) for name in ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi")]
        pc, xmm_count = ("eip", "rip"), 8
    pointers = {"rsp", "rbp"}
    core = [Register(name, width, "data_ptr" if source in pointers else integer, source)
            for name, source in general]
    core.append(Register(pc[0], width, "code_ptr", pc[1]))
    core.append(Register("eflags", 32, "i386_eflags"))
    core += [Register(name, 32, "int32") for name in SEGMENT_SELECTORS]
    core += [Register(f"st{n}", 80, "i387_ext") for n in range(8)]
    core += [Register(name, 32, "int", group="float") for name in X87_CONTROL]
    sse = [Register(f"xmm{n}", 128, "vec128") for n in range(xmm_count)]
    sse.append(Register("mxcsr", 32, "i386_mxcsr", group="vector"))
    bases = [Register(name, width, "int") for name in ("fs_base", "gs_base")]
    control = [Register(name, width, f"x86_{name}" if name in CONTROL_FLAGS else "int")
               for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")]
    control_types = "\n".join(_flags(f"x86_{name}", width // 8, fields) for name, fields in CONTROL_FLAGS.items())
    prefix = "x86-64" if wide else "i386"
    features = [
        Feature("org.gnu.gdb.i386.core", f"{prefix}-core.xml", tuple(core), EFLAGS_TYPE),
        Feature("org.gnu.gdb.i386.sse", f"{prefix}-sse.xml", tuple(sse), VEC128_TYPE + "\n" + MXCSR_TYPE),
    ]
    if wide:
        features.append(Feature("org.gnu.gdb.i386.segments", f"{prefix}-segments.xml", tuple(bases)))
        control.insert(0, Register("k_gs_base", width, "int"))
    else:
        # GDB 13 fails an internal assertion on the 32-bit segments feature
        # under its GNU/Linux OS ABI: here fs_base and gs_base are pykvm's own.
        control[:0] = bases
    features.append(Feature("org.pykvm.x86.control", f"{prefix}-control.xml", tuple(control), control_types))
    return Layout(architecture, tuple(features))

X86_64 = _x86_layout("i386:x86-64", 64)
#: The width of every source register: what a narrower view keeps when written.
SOURCE_BITS = {register.source: register.bits for register in X86_64.registers}
I386 = _x86_layout("i386", 32)
I8086 = Layout("i8086", I386.features)

LAYOUTS = {layout.architecture: layout for layout in (X86_64, I386, I8086)}


def layout_for(architecture: str) -> Layout:
    """The description for a target's ``arch()``; ValueError if there is none."""
    try:
        return LAYOUTS[architecture]
    except KeyError:
        raise ValueError(f"no GDB register layout for architecture {architecture!r} "
                         f"(known: {', '.join(sorted(LAYOUTS))})") from None
