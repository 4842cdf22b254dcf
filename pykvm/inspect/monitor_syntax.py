"""The monitor's little languages: addresses (``0x1000``, ``$rip+4``), ``/Nfs`` formats, and what x prints.

QEMU's monitor spells them this way; :mod:`pykvm.inspect.monitor` parses
its command lines with these and formats ``x``/``xp`` output with them.
"""

from __future__ import annotations

import re

from pykvm.errors import MonitorError

__all__ = ["format_unit", "number", "parse_address", "parse_format", "read_physical"]

_REG_ALIASES = {"pc": "rip", "ip": "rip", "eip": "rip", "sp": "rsp", "esp": "rsp", "eflags": "rflags"}
_REG_FIELDS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12",
               "r13", "r14", "r15", "rip", "rflags")
_ADDR_RE = re.compile(r"^\s*(\$?[A-Za-z0-9_]+)\s*(?:([+-])\s*(\S+))?\s*$")


def parse_address(text: str, regs=None) -> int:
    """``0x100000``, ``1048576``, ``$rip``, ``$pc+4``, ``$rsp-0x10`` -> an integer."""
    m = _ADDR_RE.match(text)
    if not m:
        raise MonitorError(f"bad address {text!r}")
    base, sign, offset = m.groups()
    if base.startswith("$"):
        name = base[1:].lower()
        name = _REG_ALIASES.get(name, name)
        if name not in _REG_FIELDS:
            raise MonitorError(f"unknown register {base!r}")
        if regs is None:
            raise MonitorError("registers are not available")
        value = getattr(regs, name)
    else:
        value = number(base)
    if sign:
        delta = number(offset)
        value = value + delta if sign == "+" else value - delta
    if value < 0:
        raise MonitorError(f"address {text!r} is negative")
    return value


def number(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        try:
            return int(text, 16)  # QEMU takes bare hex too
        except ValueError:
            raise MonitorError(f"not a number: {text!r}") from None


_FMT_RE = re.compile(r"^(\d*)([xduoci]?)([bhwg]?)$")
_SIZES = {"b": 1, "h": 2, "w": 4, "g": 8}


def parse_format(fmt: str) -> tuple[int, str, int]:
    m = _FMT_RE.match(fmt)
    if not m:
        raise MonitorError(f"bad format /{fmt}: use /Nx, /Ni, /Nd, /Nu, /Nc with size b, h, w or g")
    count, kind, size = m.groups()
    return int(count or 1), kind or "x", _SIZES[size] if size else 4


def read_physical(memory, address: int, size: int) -> bytes:
    """Up to ``size`` bytes of guest-physical memory, stopping where RAM stops."""
    out = bytearray()
    while len(out) < size:
        at = address + len(out)
        if not memory.is_mapped(at):
            break
        region = memory.region_at(at)
        out += memory.read(at, min(size - len(out), region.end - at))
    return bytes(out)


def format_unit(data: bytes, kind: str, size: int) -> str:
    value = int.from_bytes(data, "little")
    if kind == "x":
        return f"{value:#0{2 + 2 * size}x}"
    if kind == "d":
        return str(int.from_bytes(data, "little", signed=True))
    if kind == "u":
        return str(value)
    if kind == "o":
        return f"{value:#o}"
    if kind == "c":
        return repr(data.decode("latin-1"))
    return f"{value:#x}"
