"""Decoding x86 instructions (capstone), in the vCPU's 16-, 32- or 64-bit mode.

The one disassembler wrapper of pykvm: crash reports, the tracer, the
monitor's ``x/Ni`` and the GDB stub all decode through it.  capstone is
imported on first use only, so a run that never decodes never loads it.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_INSN_BYTES = 15  # the architectural limit (Intel SDM Vol. 2 §2.3.11)

_engines: dict[int, object] = {}


@dataclass(frozen=True)
class Instruction:
    """One decoded instruction.

    ``address`` is what the CPU's instruction pointer held (IP in 16-bit
    code), ``linear`` is CS.base + that (what breakpoints and page walks
    use); ``bits`` is 16, 32 or 64, the mode it was decoded in.
    """

    address: int
    linear: int
    raw: bytes
    text: str
    bits: int

    @property
    def mnemonic(self) -> str:
        return self.text.split(" ", 1)[0]


def _engine(nbits: int):
    md = _engines.get(nbits)
    if md is None:
        import capstone

        mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[nbits]
        md = capstone.Cs(capstone.CS_ARCH_X86, mode)
        _engines[nbits] = md
    return md


def disassemble(code: bytes, address: int, nbits: int, count: int, linear: int | None = None) -> list[Instruction]:
    """Up to ``count`` instructions from ``code`` (at ``address``); undecodable bytes end the list."""
    out = []
    base = address if linear is None else linear
    for addr, size, mnemonic, op_str in _engine(nbits).disasm_lite(bytes(code), address, count):
        offset = addr - address
        out.append(Instruction(addr, base + offset, bytes(code[offset:offset + size]),
                               f"{mnemonic} {op_str}".strip(), nbits))
    return out


def decode(code: bytes, address: int, nbits: int, linear: int | None = None) -> Instruction | None:
    """The first instruction in ``code``, or None when it does not decode."""
    found = disassemble(code, address, nbits, 1, linear)
    return found[0] if found else None
