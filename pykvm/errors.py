"""Every error pykvm raises, in one tree.

::

    PykvmError
    ├── KvmError (OSError)          an ioctl/open/mmap on a KVM fd failed: .ioctl, .errno
    ├── HostCannot (RuntimeError)   this host's KVM cannot do what was asked
    │   └── ModeNotSupported        ... run a CPU mode (kvm_pvm: paging only in long mode)
    ├── GuestError                  the guest did something the machine cannot continue from
    │   └── UnmappedAccess          ... touched a port/address nothing answers, on a strict bus
    ├── GuestMemoryError (ValueError)  a host-side access fell outside guest memory
    ├── LoaderError (ValueError)    an image is malformed, missing or does not fit
    ├── BusError (ValueError)       a bus range cannot be registered as asked
    ├── DeviceError (ValueError)    a device model was called wrongly by the host (bad size, offset)
    ├── PageTableError (ValueError) a mapping that cannot be built
    ├── VirtqueueError              a virtio driver broke the virtqueue rules (device needs reset)
    ├── StateError (ValueError)     a snapshot/migration stream is corrupt, truncated or foreign
    ├── ImageError (ValueError)     a disk image is corrupt or unsupported
    ├── TraceError (RuntimeError)   the tracer cannot do what was asked
    ├── MonitorError                a monitor command cannot be carried out (its text is the answer)
    ├── GuestNotFound (LookupError) not one of the shipped guests
    ├── GuestNotBuilt (FileNotFoundError)  a shipped guest whose binary is not built
    ├── ReportError (ValueError)    a guest's report that cannot be parsed
    ├── UsageError                  bad command-line input (one line, exit status 2)
    └── BenchError (RuntimeError)   a benchmark could not measure what it set out to

``KvmError`` is the one error of the raw layer (like rust-vmm's
``kvm_ioctls::Error``).  Its errno is read right after the failing call.

Not errors, and so not here: ``pykvm.devices.DeviceStop`` (a device asking
the run loop to stop: control flow, caught by the loop).
"""

from __future__ import annotations

import errno as _errno
import os


class PykvmError(Exception):
    """Base class of every pykvm-specific error."""


class KvmError(PykvmError, OSError):
    """An ioctl (or open/mmap) on a KVM file descriptor failed.

    ``.ioctl`` is the request's name (``"KVM_CREATE_VM"``), ``.errno`` the
    error number the kernel returned, ``.strerror`` its text.
    """

    def __init__(self, ioctl: str, errno: int, detail: str = "") -> None:
        message = f"{ioctl} failed: {os.strerror(errno)} ({_errno.errorcode.get(errno, errno)})"
        if detail:
            message += f": {detail}"
        OSError.__init__(self, errno, message)
        self.ioctl = ioctl

    def __str__(self) -> str:
        return self.strerror or ""

    def __reduce__(self):  # keep .ioctl across pickling (multiprocessing benchmarks)
        return (type(self), (self.ioctl, self.errno))


class HostCannot(PykvmError, RuntimeError):
    """This host's KVM cannot do what was asked (a measured limit, not a bug)."""


class ModeNotSupported(HostCannot):
    """KVM accepted KVM_SET_SREGS but did not keep the mode's key bits.

    Seen on kvm_pvm nested hosts, which run paging only in long mode: they
    drop CR0.PG for ``paged32`` (and PAE without long mode), and the guest
    would triple-fault on its first instruction.
    """


class GuestError(PykvmError):
    """The guest did something the machine cannot continue from.

    Examples: an access to an unmapped port in strict mode, an internal
    error from KVM's instruction emulator.  ``rip`` is the guest RIP when known.
    """

    def __init__(self, message: str, rip: int | None = None) -> None:
        super().__init__(message)
        self.rip = rip


class UnmappedAccess(GuestError):
    """The guest accessed an address no device answers, on a strict bus."""

    def __init__(self, kind: str, address: int, size: int, is_write: bool, rip: int | None = None) -> None:
        self.kind = kind
        self.address = address
        self.size = size
        self.is_write = is_write
        super().__init__(describe_access(kind, address, size, is_write, rip), rip)

    def at(self, rip: int) -> "UnmappedAccess":
        """The same access, now naming the guest RIP it came from."""
        return UnmappedAccess(self.kind, self.address, self.size, self.is_write, rip)


def describe_access(kind: str, address: int, size: int, is_write: bool, rip: int | None = None) -> str:
    """Say "unmapped PIO write to port 0x1234 (1 byte) at RIP 0x100012"."""
    direction = "write to" if is_write else "read from"
    where = "port" if kind == "pio" else "address"
    plural = "" if size == 1 else "s"
    text = f"unmapped {kind.upper()} {direction} {where} {address:#x} ({size} byte{plural})"
    if rip is not None:
        text += f" at RIP {rip:#x}"
    return text


class GuestMemoryError(PykvmError, ValueError):
    """A host-side access to guest memory fell outside every mapped region."""


class MemoryBackingError(PykvmError, ValueError):
    """Guest RAM cannot be backed as asked (-mem-path not hugetlbfs, too few free huge pages, ...)."""


class LoaderError(PykvmError, ValueError):
    """A guest image is malformed, missing or does not fit in guest memory."""


class BusError(PykvmError, ValueError):
    """A range cannot be registered (or unregistered) as asked."""


class DeviceError(PykvmError, ValueError):
    """A device model was called wrongly by the host: an access size or offset it cannot take.

    A guest can never cause this: the bus only passes accesses that lie
    inside the device's range, with sizes the CPU can produce.
    """


class PageTableError(PykvmError, ValueError):
    """A mapping that cannot be built (conflict, misalignment, full region)."""


class VirtqueueError(PykvmError):
    """The driver broke the virtqueue rules; the device needs a reset.

    Raised for anything a guest can get wrong in a virtqueue: rings or
    buffers outside guest memory, misaligned rings, bad queue sizes,
    descriptor loops and over-long chains, indices out of range, nested
    indirect tables, wrong buffer directions.  It never means a host bug.
    """


class StateError(PykvmError, ValueError):
    """A saved VM state (snapshot file, migration stream) is corrupt, truncated, foreign or unwritable."""


class ImageError(PykvmError, ValueError):
    """A disk image is corrupt, of an unsupported version, or asks for a feature pykvm lacks."""


class TraceError(PykvmError, RuntimeError):
    """The host cannot do what was asked (e.g. single-step in this CPU mode), or bad tracer input."""


class MonitorError(PykvmError):
    """A command the monitor cannot carry out; its text is the answer."""


class GuestNotFound(PykvmError, LookupError):
    """The name is not one of the shipped guests."""


class GuestNotBuilt(PykvmError, FileNotFoundError):
    """The guest is known but its .bin has not been built (run make)."""


class ReportError(PykvmError, ValueError):
    """A guest report that cannot be parsed: no ``guest:`` line, a value not of its kind, or (strict) junk."""


class UsageError(PykvmError):
    """Bad command-line input: reported in one line, exit status 2."""


class BenchError(PykvmError, RuntimeError):
    """A benchmark could not measure what it set out to (a guest misbehaved, a tool is missing)."""


def check(ioctl: str, rc: int, detail: str = "") -> int:
    """Turn a ``pykvm_ioctl`` return value (``-errno`` on failure) into a result."""
    if rc < 0:
        raise KvmError(ioctl, -rc, detail)
    return rc
