"""What guest debugging (KVM_SET_GUEST_DEBUG) does on this host, measured per CPU mode.

Single-step, hardware breakpoints (DR0-DR3 through KVM_GUESTDBG_USE_HW_BP)
and software breakpoints (``int3`` with KVM_GUESTDBG_USE_SW_BP) each run a
few instructions in a scratch 2 MiB VM (about a millisecond each); the
answer is cached per mode for the process.  On nested kvm_pvm hosts,
software breakpoints at CPL 0 end in KVM_EXIT_INTERNAL_ERROR and nothing
works at CPL 3, so the tracer and the GDB stub fall back to what does work
and say so.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from pykvm import exits
from pykvm._native_loader import lib
from pykvm.errors import ModeNotSupported
from pykvm.host import nested_kvm_module
from pykvm.x86 import bits
from pykvm.x86.state import cpl

__all__ = ["DebugSupport", "debug_support", "data_breakpoints", "probe_mode", "DR7_FIXED",
           "ENABLE", "SINGLESTEP", "USE_HW_BP", "USE_SW_BP"]

ENABLE = lib.KVM_GUESTDBG_ENABLE
SINGLESTEP = lib.KVM_GUESTDBG_SINGLESTEP
USE_HW_BP = lib.KVM_GUESTDBG_USE_HW_BP
USE_SW_BP = lib.KVM_GUESTDBG_USE_SW_BP
DR7_FIXED = 0x0600  # GE and the reserved always-one bit 10, as QEMU's gdbstub sets them


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


_cache: dict[str, DebugSupport] = {}
_lock = threading.Lock()

# Every probe ends with ``out 0x80, al``: an exit at any privilege level (IOPL 3 in long_user).
_PROBE_END = b"\xe6\x80"


def probe_mode(sregs) -> str:
    """The ``setup_mode`` name nearest to the vCPU's current mode."""
    if not sregs.cr0 & bits.CR0_PE:
        return "real"
    level = cpl(sregs.cs.selector, sregs.ss.dpl)
    if sregs.efer & bits.EFER_LMA:
        return "long_user" if level == 3 else "long"
    if sregs.cr0 & bits.CR0_PG:
        return "paged32"
    return "protected"


def _probe_one(kvm, mode: str, code: bytes, control: int, hw_offset: int | None,
               dr7: int = DR7_FIXED | 0x2) -> tuple[object, int, int]:
    """Run ``code`` in a scratch VM in ``mode`` with guest debugging; return (exit, rip, load address).

    ``hw_offset``: DR0 = load address + this, enabled by ``dr7``.
    """
    from pykvm.platform.machine import Machine

    with Machine(memory="2M", kvm=kvm) as scratch:
        info = scratch.load_image(code, mode=mode)
        base = info["load_addr"]
        if mode == "real":
            # Vector 3 of the real-mode IVT -> the final OUT, so an int3 the guest takes ends quickly.
            scratch.memory.write(3 * 4, (base + len(code) - 2).to_bytes(2, "little") + b"\0\0")
        debugreg = ()
        if hw_offset is not None:
            debugreg = (base + hw_offset, 0, 0, 0, 0, 0, 0, dr7)
        scratch.vcpu.set_guest_debug(control, debugreg)
        exit = scratch.vcpu.run()
        return exit, scratch.vcpu.get_regs().rip, base


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


_WHAT = {
    "singlestep": "KVM_GUESTDBG_SINGLESTEP",
    "hw_breakpoints": "a hardware breakpoint (KVM_GUESTDBG_USE_HW_BP)",
    "sw_breakpoints": "int3 with KVM_GUESTDBG_USE_SW_BP",
}


def debug_support(mode: str, kvm=None) -> DebugSupport:
    """Measure single-step, hardware and software breakpoints in ``mode`` on this host (cached)."""
    with _lock:
        if mode in _cache:
            return _cache[mode]
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
            ok = isinstance(exit, exits.Debug) and exit.exception == exception and rip == base + offset
            if not ok and feature == "sw_breakpoints" and isinstance(exit, exits.Debug) and exit.exception == 3:
                ok = rip in (base + offset, base + offset + 1)  # some hosts leave RIP after the int3
            results[feature] = ok
            if not ok:
                module = nested_kvm_module()
                hint = f" (nested KVM: {module})" if module else ""
                notes[feature] = f"{_WHAT[feature]} {_describe_failure(exit, feature)} in {mode} mode on this host{hint}"
        support = DebugSupport(mode, results["singlestep"], results["hw_breakpoints"], results["sw_breakpoints"],
                               notes)
        _cache[mode] = support
        return support


_data_cache: dict[str, tuple[bool, str]] = {}
# DR7 for slot 0 as a 4-byte write watchpoint: G0, R/W0 = 01 (data writes), LEN0 = 11 (4 bytes).
_DR7_WRITE4 = DR7_FIXED | 0x2 | (0b01 << 16) | (0b11 << 18)


def data_breakpoints(mode: str, kvm=None) -> tuple[bool, str]:
    """Whether a debug-register data breakpoint (a write watchpoint) stops the guest in ``mode`` (cached).

    Returns ``(works, why_not)``.  The probe stores EAX to a watched
    address and expects KVM_EXIT_DEBUG (#DB, DR6.B0) right after the store.
    On kvm_pvm hosts CPL-0 code is emulated and the emulator does not check
    data breakpoints: the store goes by unseen.  Probed in the 64-bit and
    flat 32-bit modes; real mode is not probed (reported as not working).
    """
    with _lock:
        if mode in _data_cache:
            return _data_cache[mode]
        from pykvm.platform.layout import LOAD_ADDR

        target = 0x40  # the watched dword, this far after the load address (RAM, past the code)
        if mode in ("long", "long_user"):
            store = b"\x89\x05" + (target - 6).to_bytes(4, "little")  # mov [rip + disp32], eax
        elif mode in ("protected", "paged32"):
            store = b"\x89\x05" + (LOAD_ADDR + target).to_bytes(4, "little")  # mov [disp32], eax
        else:
            answer = (False, f"data breakpoints are not probed in {mode} mode")
            _data_cache[mode] = answer
            return answer
        code = store + b"\x90\x90" + _PROBE_END
        try:
            exit, rip, base = _probe_one(kvm, mode, code, ENABLE | USE_HW_BP, target, _DR7_WRITE4)
        except ModeNotSupported as exc:
            answer = (False, f"this host cannot run {mode} mode ({exc})")
        else:
            works = isinstance(exit, exits.Debug) and exit.exception == 1 and bool(exit.dr6 & 1) \
                and rip == base + len(store)
            why = ""
            if not works:
                module = nested_kvm_module()
                hint = f" (nested KVM: {module})" if module else ""
                why = f"a write watchpoint (DR0-DR3) {_describe_failure(exit, 'watch')} in {mode} mode on this host{hint}"
            answer = (works, why)
        _data_cache[mode] = answer
        return answer
