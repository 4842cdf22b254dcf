"""A vCPU file descriptor: ``Vcpu``.

Third fd level of the KVM API.  One method per vCPU ioctl; the docstring's
first line names it (Documentation/virt/kvm/api.rst, section 4).  Getters
return the kernel's own structs as cffi objects (``regs.rip``,
``sregs.cs.selector``); setters take them back.  The vCPU owns its fd and
the mmap of ``struct kvm_run``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

from pykvm import exits
from pykvm._native_loader import ffi, lib
from pykvm.errors import KvmError, check
from pykvm.fdowner import FdOwner

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from pykvm.stats import StatsFd

PAGE_SIZE = 4096

# struct kvm_coalesced_mmio: u64 phys_addr, u32 len, u32 pio, u8 data[8]
_RING_FORMAT = struct.Struct("<QII8s")
_RING_ENTRY = ffi.sizeof("struct kvm_coalesced_mmio")
_RING_CAPACITY = (PAGE_SIZE - ffi.sizeof("struct kvm_coalesced_mmio_ring")) // _RING_ENTRY
assert _RING_FORMAT.size == _RING_ENTRY

_RUN_INTERRUPTED = (errno.EINTR, errno.EAGAIN)  # KVM_RUN's normal returns for a signal / immediate_exit

#: The signal that kicks a vCPU thread out of KVM_RUN (a no-op handler, no SA_RESTART).
KICK_SIGNAL = signal.SIGRTMIN

_kick_handler_lock = threading.Lock()
_kick_handler_installed = False


def install_kick_handler() -> None:
    """Install the kick signal's no-op C handler once per process, so a signalled KVM_RUN returns EINTR."""
    global _kick_handler_installed
    with _kick_handler_lock:
        if not _kick_handler_installed:
            rc = lib.pykvm_install_kick_handler(int(KICK_SIGNAL))
            if rc < 0:
                raise OSError(-rc, os.strerror(-rc), "sigaction")
            _kick_handler_installed = True


class Vcpu(FdOwner):
    """A virtual CPU.  Close it with ``close()`` or a ``with`` block (unmaps kvm_run, closes the fd).

    Runs are guarded: ``running()`` marks the thread that is inside KVM_RUN
    (``run()`` and the C loop both enter through it), so ``kick()`` knows whom
    to signal and ``close()`` from another thread first kicks that run and
    waits for it to return before unmapping ``kvm_run``; closed, the vCPU
    can never be run again.
    """

    def __init__(self, fd: int, vcpu_id: int, mmap_size: int) -> None:
        self._fd = fd
        self.id = vcpu_id
        self._mmap_size = mmap_size
        self._guard = threading.RLock()  # held by the thread running this vCPU
        self._kick_lock = threading.Lock()  # kvm_run and _runner, as kick() sees them
        self._runner: int | None = None  # threading.get_ident() of the running thread
        self._depth = 0  # nesting of running() on that thread
        self._closing = False
        self._close_deferred = False
        self._on_close: list[Callable[[], None]] = []
        install_kick_handler()
        err = ffi.new("int *")
        mapping = lib.pykvm_mmap_fd(fd, mmap_size, err)
        if mapping == ffi.NULL:
            os.close(fd)
            self._fd = -1
            raise KvmError("mmap(vcpu fd)", err[0])
        self._mapping = mapping
        self._ring_out = None  # drain_coalesced()'s buffer, made on first use
        self.kvm_run = ffi.cast("struct kvm_run *", mapping)
        """The shared ``struct kvm_run`` page: exit reason and data of the last KVM_RUN."""

    # -- who runs it, kicking and closing -----------------------------------------
    def _enter(self) -> None:
        """Claim the vCPU for this thread (re-entrant); see :meth:`running`."""
        if not self._guard.acquire(blocking=False):
            raise RuntimeError(f"vCPU {self.id} is already running on another thread")
        if self._closing or self._fd < 0:
            self._guard.release()
            raise ValueError(f"vCPU {self.id} is closed")
        self._depth += 1
        if self._depth == 1:
            self._runner = threading.get_ident()  # one store: kick() may read it at any time

    def _leave(self) -> None:
        self._depth -= 1
        outermost = self._depth == 0
        if outermost:
            self._runner = None
        self._guard.release()
        if outermost and self._close_deferred:
            self.close()  # asked for by this thread during the run

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Mark this thread as the one running the vCPU (re-entrant); ``close()`` waits for it.

        Raises ``RuntimeError`` if another thread is running this vCPU, and
        ``ValueError`` once it is closed or closing.
        """
        self._enter()
        try:
            yield
        finally:
            self._leave()

    @property
    def runner(self) -> int | None:
        """``threading.get_ident()`` of the thread running this vCPU now, or None."""
        return self._runner

    @property
    def closing(self) -> bool:
        """True once ``close()`` has begun: a run loop seeing it returns at once."""
        return self._closing

    def kick(self) -> None:
        """Make a running KVM_RUN return soon (not an ioctl; api.rst "immediate_exit").

        Sets ``kvm_run.immediate_exit`` (a KVM_RUN about to start returns at
        once) and signals the running thread (one inside the guest leaves with
        EINTR).  Safe from any thread; does nothing when no run is going on.
        """
        with self._kick_lock:
            if self.kvm_run is not None:
                self.kvm_run.immediate_exit = 1
            runner = self._runner
            if runner is not None:
                try:
                    signal.pthread_kill(runner, KICK_SIGNAL)
                except (ProcessLookupError, OSError):
                    pass

    def on_close(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` when the vCPU closes, before kvm_run is unmapped (the C loop forgets it)."""
        self._on_close.append(callback)

    def close(self) -> None:
        """Stop a run in progress (kick it, wait for it), then unmap kvm_run and close the fd.

        Called from the thread that is running the vCPU (a device handler),
        the close happens when that run returns.
        """
        if self._fd < 0:
            return
        guard = getattr(self, "_guard", None)
        if guard is None:  # __init__ failed early
            super().close()
            return
        if self._runner == threading.get_ident():
            self._closing = True
            self._close_deferred = True
            self.kick()
            return
        self._closing = True
        while not guard.acquire(timeout=0.05):
            self.kick()  # the run may have been between exits when the first kick came
        try:
            super().close()
        finally:
            guard.release()

    def _release(self) -> None:
        """Tell the C loop, then unmap kvm_run before the fd closes."""
        callbacks, self._on_close = getattr(self, "_on_close", []), []
        for callback in callbacks:
            callback()
        if getattr(self, "_mapping", None) is not None:
            with self._kick_lock:
                lib.pykvm_munmap(self._mapping, self._mmap_size)
                self._mapping = None
                self.kvm_run = None

    def __repr__(self) -> str:
        return f"<Vcpu {self.id} fd={self._fd}>"

    def _get(self, name: str, request: int, ctype: str):
        value = ffi.new(ctype)
        check(name, lib.pykvm_ioctl_ptr(self.fd, request, value))
        return value

    def _set(self, name: str, request: int, value) -> None:
        check(name, lib.pykvm_ioctl_ptr(self.fd, request, value))

    # -- running -------------------------------------------------------------
    def run(self) -> exits.Exit:
        """KVM_RUN: enter the guest until the next exit KVM returns to user space.

        Returns the decoded exit.  EINTR/EAGAIN (a signal, or ``immediate_exit``
        set) are normal: they return ``exits.Interrupted``.  The GIL is
        released while the guest runs.
        """
        self._enter()  # not `with running()`: a generator costs microseconds per exit
        try:
            rc = lib.pykvm_ioctl(self._fd, lib.KVM_RUN, 0)
            if rc < 0:
                if -rc in _RUN_INTERRUPTED:
                    return exits.INTERRUPTED
                raise KvmError("KVM_RUN", -rc)
            return exits.decode(self.kvm_run)
        finally:
            self._leave()

    @property
    def immediate_exit(self) -> bool:
        """kvm_run.immediate_exit: when set, the next KVM_RUN returns EINTR at once."""
        return bool(self.kvm_run.immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self.kvm_run.immediate_exit = int(value)

    def complete_io_in(self, data: bytes) -> None:
        """Answer the IN that the last KVM_RUN returned (written into kvm_run)."""
        exits.complete_io_in(self.kvm_run, data)

    def complete_mmio_read(self, data: bytes) -> None:
        """Answer the MMIO read that the last KVM_RUN returned."""
        exits.complete_mmio_read(self.kvm_run, data)

    def drain_coalesced(self) -> list[tuple[int, bytes, bool]]:
        """Empty the coalesced MMIO/PIO ring (the page at KVM_COALESCED_MMIO_PAGE_OFFSET).

        Returns ``(address, data, is_pio)`` for each buffered write, oldest
        first.  C copies the entries out and frees their slots in one call
        (csrc/runloop.c, pykvm_drain_coalesced); Python unpacks them in bulk.
        """
        if self._ring_out is None:
            self._ring_out = ffi.new("struct kvm_coalesced_mmio[]", _RING_CAPACITY)
        ring = ffi.cast("char *", self._mapping) + lib.KVM_COALESCED_MMIO_PAGE_OFFSET * PAGE_SIZE
        n = lib.pykvm_drain_coalesced(ring, self._ring_out, _RING_CAPACITY)
        if not n:
            return []
        raw = ffi.buffer(self._ring_out, n * _RING_ENTRY)
        return [(addr, data[:length], bool(pio)) for addr, length, pio, data in _RING_FORMAT.iter_unpack(raw)]

    # -- general-purpose and special registers ---------------------------------
    def get_regs(self):
        """KVM_GET_REGS: RAX..R15, RIP, RFLAGS as ``struct kvm_regs``."""
        return self._get("KVM_GET_REGS", lib.KVM_GET_REGS, "struct kvm_regs *")

    def set_regs(self, regs) -> None:
        """KVM_SET_REGS."""
        self._set("KVM_SET_REGS", lib.KVM_SET_REGS, regs)

    def get_sregs(self):
        """KVM_GET_SREGS: segments, descriptor tables, CR0-CR8, EFER, APIC base."""
        return self._get("KVM_GET_SREGS", lib.KVM_GET_SREGS, "struct kvm_sregs *")

    def set_sregs(self, sregs) -> None:
        """KVM_SET_SREGS."""
        self._set("KVM_SET_SREGS", lib.KVM_SET_SREGS, sregs)

    def get_fpu(self):
        """KVM_GET_FPU: x87, SSE registers and MXCSR (fxsave layout)."""
        return self._get("KVM_GET_FPU", lib.KVM_GET_FPU, "struct kvm_fpu *")

    def set_fpu(self, fpu) -> None:
        """KVM_SET_FPU."""
        self._set("KVM_SET_FPU", lib.KVM_SET_FPU, fpu)

    def get_xsave(self):
        """KVM_GET_XSAVE: the XSAVE area, 4 KiB (``struct kvm_xsave *``: the legacy FXSAVE image first, MXCSR at byte 24)."""
        return self._get("KVM_GET_XSAVE", lib.KVM_GET_XSAVE, "struct kvm_xsave *")

    def get_xsave2(self, size: int) -> bytes:
        """KVM_GET_XSAVE2: the whole XSAVE area, ``size`` bytes (KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) on the VM).

        Needs a header that has the ioctl (PYKVM_HAVE_KVM_GET_XSAVE2).
        """
        if lib.PYKVM_HAVE_KVM_GET_XSAVE2 < 0:
            raise KvmError("KVM_GET_XSAVE2", errno.ENOSYS, "the build host's <linux/kvm.h> lacks it")
        area = ffi.new("char[]", max(size, ffi.sizeof("struct kvm_xsave")))
        check("KVM_GET_XSAVE2", lib.pykvm_ioctl_ptr(self.fd, lib.PYKVM_HAVE_KVM_GET_XSAVE2, area))
        return bytes(ffi.buffer(area))

    def set_xsave(self, area: bytes) -> None:
        """KVM_SET_XSAVE: load an XSAVE area (what KVM_GET_XSAVE or KVM_GET_XSAVE2 returned)."""
        buf = ffi.new("char[]", max(len(area), ffi.sizeof("struct kvm_xsave")))
        ffi.memmove(buf, area, len(area))
        check("KVM_SET_XSAVE", lib.pykvm_ioctl_ptr(self.fd, lib.KVM_SET_XSAVE, buf))

    def get_msrs(self, indices: Sequence[int]) -> dict[int, int]:
        """KVM_GET_MSRS: read the given MSRs.  Raises if KVM read fewer than asked."""
        n = len(indices)
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": n, "entries": n})
        for i, index in enumerate(indices):
            msrs.entries[i].index = index
        got = check("KVM_GET_MSRS", lib.pykvm_ioctl_ptr(self.fd, lib.KVM_GET_MSRS, msrs))
        if got != n:
            raise KvmError("KVM_GET_MSRS", errno.EINVAL, f"MSR {indices[got]:#x} is not readable")
        return {msrs.entries[i].index: msrs.entries[i].data for i in range(n)}

    def set_msrs(self, values: Mapping[int, int]) -> None:
        """KVM_SET_MSRS: write MSRs.  Raises naming the first MSR KVM refused."""
        items = list(values.items())
        msrs = ffi.new("struct kvm_msrs *", {"nmsrs": len(items), "entries": len(items)})
        for i, (index, data) in enumerate(items):
            msrs.entries[i].index = index
            msrs.entries[i].data = data
        done = check("KVM_SET_MSRS", lib.pykvm_ioctl_ptr(self.fd, lib.KVM_SET_MSRS, msrs))
        if done != len(items):
            raise KvmError("KVM_SET_MSRS", errno.EINVAL, f"MSR {items[done][0]:#x} was refused")

    def set_cpuid2(self, cpuid) -> None:
        """KVM_SET_CPUID2: the CPUID table the guest sees (``struct kvm_cpuid2 *``)."""
        self._set("KVM_SET_CPUID2", lib.KVM_SET_CPUID2, cpuid)

    def get_cpuid2(self, max_entries: int = 256):
        """KVM_GET_CPUID2: the CPUID table set on this vCPU."""
        cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": max_entries, "entries": max_entries})
        self._set("KVM_GET_CPUID2", lib.KVM_GET_CPUID2, cpuid)
        return cpuid

    # -- interrupt controller and events -----------------------------------------
    def get_lapic(self):
        """KVM_GET_LAPIC: the local APIC's 1 KiB register page (needs an in-kernel irqchip)."""
        return self._get("KVM_GET_LAPIC", lib.KVM_GET_LAPIC, "struct kvm_lapic_state *")

    def set_lapic(self, lapic) -> None:
        """KVM_SET_LAPIC."""
        self._set("KVM_SET_LAPIC", lib.KVM_SET_LAPIC, lapic)

    def get_vcpu_events(self):
        """KVM_GET_VCPU_EVENTS: pending/injected exceptions, interrupts, NMI, SIPI."""
        return self._get("KVM_GET_VCPU_EVENTS", lib.KVM_GET_VCPU_EVENTS, "struct kvm_vcpu_events *")

    def set_vcpu_events(self, events) -> None:
        """KVM_SET_VCPU_EVENTS."""
        self._set("KVM_SET_VCPU_EVENTS", lib.KVM_SET_VCPU_EVENTS, events)

    def get_mp_state(self) -> int:
        """KVM_GET_MP_STATE: KVM_MP_STATE_RUNNABLE, _HALTED, _INIT_RECEIVED, ..."""
        return self._get("KVM_GET_MP_STATE", lib.KVM_GET_MP_STATE, "struct kvm_mp_state *").mp_state

    def set_mp_state(self, state: int) -> None:
        """KVM_SET_MP_STATE."""
        self._set("KVM_SET_MP_STATE", lib.KVM_SET_MP_STATE, ffi.new("struct kvm_mp_state *", {"mp_state": state}))

    # -- debugging ---------------------------------------------------------------
    def get_debugregs(self):
        """KVM_GET_DEBUGREGS: DR0-DR3, DR6, DR7."""
        return self._get("KVM_GET_DEBUGREGS", lib.KVM_GET_DEBUGREGS, "struct kvm_debugregs *")

    def set_debugregs(self, debugregs) -> None:
        """KVM_SET_DEBUGREGS."""
        self._set("KVM_SET_DEBUGREGS", lib.KVM_SET_DEBUGREGS, debugregs)

    def get_xcrs(self):
        """KVM_GET_XCRS: extended control registers (XCR0)."""
        return self._get("KVM_GET_XCRS", lib.KVM_GET_XCRS, "struct kvm_xcrs *")

    def set_xcrs(self, xcrs) -> None:
        """KVM_SET_XCRS."""
        self._set("KVM_SET_XCRS", lib.KVM_SET_XCRS, xcrs)

    def set_guest_debug(self, control: int, debugreg: Iterable[int] = ()) -> None:
        """KVM_SET_GUEST_DEBUG: single-step and breakpoints.

        ``control`` combines KVM_GUESTDBG_ENABLE with SINGLESTEP, USE_SW_BP,
        USE_HW_BP; ``debugreg`` gives DR0-DR3, (DR4, DR5 unused), DR6, DR7
        for hardware breakpoints.  ``control=0`` turns debugging off.
        """
        dbg = ffi.new("struct kvm_guest_debug *", {"control": control})
        for i, value in enumerate(debugreg):
            dbg.arch.debugreg[i] = value
        self._set("KVM_SET_GUEST_DEBUG", lib.KVM_SET_GUEST_DEBUG, dbg)

    def set_signal_mask(self, blocked: Iterable[int]) -> None:
        """KVM_SET_SIGNAL_MASK: the signals blocked while this thread is inside KVM_RUN (api.rst 4.26).

        ``blocked`` replaces the thread's mask for the time of KVM_RUN only; a
        signal pending and unblocked there makes KVM_RUN return EINTR at once.
        """
        sigset = 0
        for signo in blocked:
            sigset |= 1 << (int(signo) - 1)  # the kernel's sigset_t: bit signo-1, 64 signals on x86
        mask = ffi.new("char[12]")
        ffi.memmove(mask, struct.pack("<IQ", 8, sigset), 12)  # struct kvm_signal_mask {u32 len; u8 sigset[len]}
        self._set("KVM_SET_SIGNAL_MASK", lib.KVM_SET_SIGNAL_MASK, mask)

    def get_tsc_khz(self) -> int:
        """KVM_GET_TSC_KHZ: the guest's TSC frequency in kHz (the host's, unless KVM scales it)."""
        return check("KVM_GET_TSC_KHZ", lib.pykvm_ioctl(self.fd, lib.KVM_GET_TSC_KHZ, 0))

    def translate(self, linear_address: int):
        """KVM_TRANSLATE: KVM's GVA->GPA translation (``valid`` is 0 when it has none).

        On pvm-nested hosts KVM answers valid=0 even for mapped addresses;
        ``pykvm.x86.paging.walk`` is pykvm's own source of truth.
        """
        tr = ffi.new("struct kvm_translation *", {"linear_address": linear_address})
        self._set("KVM_TRANSLATE", lib.KVM_TRANSLATE, tr)
        return tr

    def stats_fd(self) -> "StatsFd":
        """KVM_GET_STATS_FD: the vCPU's binary statistics (a ``StatsFd`` that owns the fd)."""
        from pykvm.stats import StatsFd

        fd = check("KVM_GET_STATS_FD", lib.pykvm_ioctl(self.fd, lib.KVM_GET_STATS_FD, 0))
        return StatsFd(fd, f"vcpu{self.id}")
