"""VM exits as values: one small immutable class per exit reason.

``decode(run)`` reads ``struct kvm_run`` right after KVM_RUN returns and
builds the matching value, like rust-vmm's ``VcpuExit`` enum.  Values carry
copies of the data (never pointers into kvm_run), so they can be kept,
compared and tested without KVM.  Answers to reads (IN, MMIO read) are
written back with ``complete_io_in`` / ``complete_mmio_read`` before the next
KVM_RUN (api.rst, "KVM_RUN ... kvm_run.io / kvm_run.mmio").

The classes are ``pykvm.values.Value`` classes rather than dataclasses: one
is built for every exit that reaches Python, and a plain ``__slots__`` class
is built in a third of a frozen dataclass's time and costs nothing at
import.
"""

from __future__ import annotations

from pykvm._native_loader import ffi, lib
from pykvm.values import Value


class Exit(Value):
    """Base of the exit values: shown, compared and hashed by their fields (``pykvm.values``)."""

    __slots__ = ()
    reason = ""


class IoOut(Exit):
    """KVM_EXIT_IO, direction OUT: ``count`` elements of ``size`` bytes (REP OUTS when count > 1)."""

    __slots__ = ("port", "size", "count", "data")
    reason = "io_out"

    def __init__(self, port: int, size: int, count: int, data: bytes) -> None:
        self.port = port
        self.size = size
        self.count = count
        self.data = data


class IoIn(Exit):
    """KVM_EXIT_IO, direction IN: the host answers ``size * count`` bytes."""

    __slots__ = ("port", "size", "count")
    reason = "io_in"

    def __init__(self, port: int, size: int, count: int) -> None:
        self.port = port
        self.size = size
        self.count = count


class MmioWrite(Exit):
    """KVM_EXIT_MMIO with is_write: a store to guest-physical ``address`` that no slot backs."""

    __slots__ = ("address", "data")
    reason = "mmio_write"

    def __init__(self, address: int, data: bytes) -> None:
        self.address = address
        self.data = data


class MmioRead(Exit):
    """KVM_EXIT_MMIO, read: the host answers ``size`` bytes."""

    __slots__ = ("address", "size")
    reason = "mmio_read"

    def __init__(self, address: int, size: int) -> None:
        self.address = address
        self.size = size


class Hlt(Exit):
    """KVM_EXIT_HLT: the guest executed HLT and there is no in-kernel irqchip to wait on."""

    __slots__ = ()
    reason = "hlt"


class Shutdown(Exit):
    """KVM_EXIT_SHUTDOWN: the vCPU shut down, usually a triple fault."""

    __slots__ = ()
    reason = "shutdown"


class FailEntry(Exit):
    """KVM_EXIT_FAIL_ENTRY: the hardware refused VM entry (invalid guest state)."""

    __slots__ = ("hardware_entry_failure_reason", "cpu")
    reason = "fail_entry"

    def __init__(self, hardware_entry_failure_reason: int, cpu: int) -> None:
        self.hardware_entry_failure_reason = hardware_entry_failure_reason
        self.cpu = cpu


class InternalError(Exit):
    """KVM_EXIT_INTERNAL_ERROR: KVM could not continue, e.g. its emulator met an unknown instruction.

    ``suberror`` is KVM_INTERNAL_ERROR_* (1 = emulation failure); ``data``
    holds the ``ndata`` extra words.
    """

    __slots__ = ("suberror", "data")
    reason = "internal_error"

    def __init__(self, suberror: int, data: tuple[int, ...]) -> None:
        self.suberror = suberror
        self.data = data

    @property
    def suberror_name(self) -> str:
        return _INTERNAL_SUBERRORS.get(self.suberror, f"suberror {self.suberror}")


class Debug(Exit):
    """KVM_EXIT_DEBUG: single-step or breakpoint (``exception`` 1 = #DB, 3 = #BP)."""

    __slots__ = ("exception", "pc", "dr6", "dr7")
    reason = "debug"

    def __init__(self, exception: int, pc: int, dr6: int, dr7: int) -> None:
        self.exception = exception
        self.pc = pc
        self.dr6 = dr6
        self.dr7 = dr7


class SystemEvent(Exit):
    """KVM_EXIT_SYSTEM_EVENT: shutdown/reset/crash requested through the in-kernel devices."""

    __slots__ = ("type", "data")
    reason = "system_event"

    def __init__(self, type: int, data: tuple[int, ...]) -> None:
        self.type = type
        self.data = data


class Hypercall(Exit):
    """KVM_EXIT_HYPERCALL: a hypercall KVM forwards to user space."""

    __slots__ = ("nr", "args")
    reason = "hypercall"

    def __init__(self, nr: int, args: tuple[int, ...]) -> None:
        self.nr = nr
        self.args = args


class Interrupted(Exit):
    """KVM_RUN returned EINTR/EAGAIN: a signal or ``immediate_exit`` (KVM_EXIT_INTR)."""

    __slots__ = ()
    reason = "interrupted"


class Unknown(Exit):
    """Any other exit reason, with the raw numbers kept for the report."""

    __slots__ = ("exit_reason", "hardware_exit_reason")
    reason = "unknown"

    def __init__(self, exit_reason: int, hardware_exit_reason: int) -> None:
        self.exit_reason = exit_reason
        self.hardware_exit_reason = hardware_exit_reason

    @property
    def name(self) -> str:
        return REASON_NAMES.get(self.exit_reason, f"exit reason {self.exit_reason}")


_HLT = Hlt()
_SHUTDOWN = Shutdown()
INTERRUPTED = Interrupted()

# Reason numbers -> names, from the constants the compiler read in <linux/kvm.h>.
REASON_NAMES: dict[int, str] = {
    getattr(lib, name): name[len("KVM_EXIT_"):].lower()
    for name in dir(lib)
    if name.startswith("KVM_EXIT_") and name not in ("KVM_EXIT_IO_IN", "KVM_EXIT_IO_OUT")
}

_INTERNAL_SUBERRORS = {
    lib.KVM_INTERNAL_ERROR_EMULATION: "emulation failure",
    lib.KVM_INTERNAL_ERROR_SIMUL_EX: "simultaneous exceptions",
    lib.KVM_INTERNAL_ERROR_DELIVERY_EV: "event delivery failed",
    lib.KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON: "unexpected exit reason",
}

_IO = lib.KVM_EXIT_IO
_MMIO = lib.KVM_EXIT_MMIO
_EXIT_HLT = lib.KVM_EXIT_HLT
_IO_OUT = lib.KVM_EXIT_IO_OUT


def decode(run) -> Exit:
    """Build the exit value for the ``struct kvm_run *`` that KVM_RUN just filled."""
    reason = run.exit_reason
    if reason == _IO:
        io = run.io
        if io.direction == _IO_OUT:
            nbytes = io.size * io.count
            data = ffi.unpack(ffi.cast("char *", run) + io.data_offset, nbytes)
            return IoOut(io.port, io.size, io.count, data)
        return IoIn(io.port, io.size, io.count)
    if reason == _MMIO:
        mmio = run.mmio
        if mmio.is_write:
            return MmioWrite(mmio.phys_addr, bytes(ffi.buffer(mmio.data, mmio.len)))
        return MmioRead(mmio.phys_addr, mmio.len)
    if reason == _EXIT_HLT:
        return _HLT
    if reason == lib.KVM_EXIT_SHUTDOWN:
        return _SHUTDOWN
    if reason == lib.KVM_EXIT_INTR:
        return INTERRUPTED
    if reason == lib.KVM_EXIT_FAIL_ENTRY:
        return FailEntry(run.fail_entry.hardware_entry_failure_reason, run.fail_entry.cpu)
    if reason == lib.KVM_EXIT_INTERNAL_ERROR:
        n = min(run.internal.ndata, 16)
        return InternalError(run.internal.suberror, tuple(run.internal.data[i] for i in range(n)))
    if reason == lib.KVM_EXIT_DEBUG:
        arch = run.debug.arch
        return Debug(arch.exception, arch.pc, arch.dr6, arch.dr7)
    if reason == lib.KVM_EXIT_SYSTEM_EVENT:
        n = min(run.system_event.ndata, 16)
        return SystemEvent(run.system_event.type, tuple(run.system_event.data[i] for i in range(n)))
    if reason == lib.KVM_EXIT_HYPERCALL:
        return Hypercall(run.hypercall.nr, tuple(run.hypercall.args))
    return Unknown(reason, run.hw.hardware_exit_reason)


def complete_io_in(run, data: bytes) -> None:
    """Answer the pending IN: copy ``size * count`` bytes into kvm_run's data area."""
    expected = run.io.size * run.io.count
    if len(data) != expected:
        raise ValueError(f"IN answer is {len(data)} bytes, the guest asked for {expected}")
    ffi.memmove(ffi.cast("char *", run) + run.io.data_offset, data, expected)


def complete_mmio_read(run, data: bytes) -> None:
    """Answer the pending MMIO read: ``len`` bytes into kvm_run.mmio.data."""
    if len(data) != run.mmio.len:
        raise ValueError(f"MMIO answer is {len(data)} bytes, the guest asked for {run.mmio.len}")
    ffi.memmove(run.mmio.data, data, len(data))
