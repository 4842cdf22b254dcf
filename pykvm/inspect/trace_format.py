"""Printing what the tracer saw: steps, exits, stops, breakpoints, the CPU mode, host support.

Separate from the mechanics (``pykvm.inspect.tracer``) so that labs and the
command line can reuse either.  The shapes::

         1  0x00008000  fc                       cld
         2  0x00008001  66 be 00 80 00 00        mov esi, 0x8000                  esi=0x8000
    ...
         1  io_out         port 0x03f8 size 1 data 48 'H'          rip 0x100013           out dx, al
"""

from __future__ import annotations

from pykvm import exits
from pykvm.inspect.debug_support import DebugSupport
from pykvm.inspect.tracer import REGS, Breakpoint, ExitEvent, Step, Stop
from pykvm.x86.cpu_view import code_bits
from pykvm.x86.state import cpl, cpu_mode_name, decode_rflags

__all__ = ["format_breakpoint", "format_changes", "format_exit", "format_exit_details", "format_mode",
           "format_step", "format_stop", "format_support"]


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
    mode = cpu_mode_name(sregs.cr0, sregs.cr4, sregs.efer, bool(sregs.cs.l), bool(sregs.cs.db))
    level = 0 if mode == "real" else cpl(sregs.cs.selector, sregs.ss.dpl)
    return f"{mode} mode, {code_bits(sregs)}-bit code, CPL {level}"


def format_support(support: DebugSupport) -> str:
    def word(ok: bool) -> str:
        return "yes" if ok else "no"

    lines = [f"guest debugging in {support.mode} mode: single-step {word(support.singlestep)}, "
             f"hardware breakpoints {word(support.hw_breakpoints)}, "
             f"software breakpoints {word(support.sw_breakpoints)}"]
    lines += [f"  {feature}: {why}" for feature, why in support.notes.items()]
    return "\n".join(lines)
