"""Exceptions raised by pykvm.

``KvmError`` is the one error of the raw layer (like rust-vmm's
``kvm_ioctls::Error``): an ``OSError`` that also names the ioctl that failed.
The errno is read right after the failing call, never later.
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


class GuestError(PykvmError):
    """The guest did something the machine cannot continue from.

    Examples: an access to an unmapped port in strict mode, an internal
    error from KVM's instruction emulator.  ``rip`` is the guest RIP when known.
    """

    def __init__(self, message: str, rip: int | None = None) -> None:
        super().__init__(message)
        self.rip = rip


class GuestMemoryError(PykvmError, ValueError):
    """A host-side access to guest memory fell outside every mapped region."""


class LoaderError(PykvmError, ValueError):
    """A guest image is malformed, missing or does not fit in guest memory."""


class DeviceError(PykvmError):
    """A device model was misused by the host (not by the guest)."""


def check(ioctl: str, rc: int, detail: str = "") -> int:
    """Turn a ``pykvm_ioctl`` return value (``-errno`` on failure) into a result."""
    if rc < 0:
        raise KvmError(ioctl, -rc, detail)
    return rc
