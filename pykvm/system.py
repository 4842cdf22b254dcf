"""The /dev/kvm system file descriptor: ``Kvm``.

First of the three fd levels of the KVM API (system -> VM -> vCPU), named as
in rust-vmm's kvm-ioctls.  Each method issues one ioctl; its docstring's first
line names it.  See the kernel's Documentation/virt/kvm/api.rst, section 4.
"""

from __future__ import annotations

import errno
import os

from pykvm._native_loader import ffi, lib
from pykvm.errors import KvmError, check
from pykvm.fdowner import FdOwner

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:
    from pykvm.vm import Vm

DEFAULT_DEVICE = "/dev/kvm"


class Kvm(FdOwner):
    """An open /dev/kvm.  Close it with ``close()`` or a ``with`` block.

    VMs created from it stay valid after it is closed: they own their fds.
    """

    def __init__(self, path: str = DEFAULT_DEVICE) -> None:
        try:
            self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise KvmError(f"open({path})", exc.errno or 0) from None
        self.path = path

    def __repr__(self) -> str:
        return f"<Kvm {self.path} fd={self._fd}>"

    # -- ioctls --------------------------------------------------------------
    def api_version(self) -> int:
        """KVM_GET_API_VERSION: 12 on every kernel since 2.6.22."""
        return check("KVM_GET_API_VERSION", lib.pykvm_ioctl(self.fd, lib.KVM_GET_API_VERSION, 0))

    def check_extension(self, cap: int) -> int:
        """KVM_CHECK_EXTENSION: 0 if ``cap`` is absent, else a positive (often informative) value."""
        return check("KVM_CHECK_EXTENSION", lib.pykvm_ioctl(self.fd, lib.KVM_CHECK_EXTENSION, cap))

    def vcpu_mmap_size(self) -> int:
        """KVM_GET_VCPU_MMAP_SIZE: bytes to mmap from a vCPU fd (kvm_run and the pages after it)."""
        return check("KVM_GET_VCPU_MMAP_SIZE", lib.pykvm_ioctl(self.fd, lib.KVM_GET_VCPU_MMAP_SIZE, 0))

    def supported_cpuid(self, max_entries: int = 256):
        """KVM_GET_SUPPORTED_CPUID: the CPUID leaves KVM can expose, as ``struct kvm_cpuid2 *``.

        Retries with a larger buffer on E2BIG, as the API asks.
        """
        while True:
            cpuid = ffi.new("struct kvm_cpuid2 *", {"nent": max_entries, "entries": max_entries})
            rc = lib.pykvm_ioctl_ptr(self.fd, lib.KVM_GET_SUPPORTED_CPUID, cpuid)
            if rc == -errno.E2BIG and max_entries < 4096:  # the table is larger
                max_entries *= 2
                continue
            check("KVM_GET_SUPPORTED_CPUID", rc)
            return cpuid

    def msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSR indices KVM saves and restores."""
        count = 64
        while True:
            msrs = ffi.new("struct kvm_msr_list *", {"nmsrs": count, "indices": count})
            rc = lib.pykvm_ioctl_ptr(self.fd, lib.KVM_GET_MSR_INDEX_LIST, msrs)
            if rc == -errno.E2BIG and msrs.nmsrs > count:  # nmsrs now holds the size needed
                count = msrs.nmsrs
                continue
            check("KVM_GET_MSR_INDEX_LIST", rc)
            return [msrs.indices[i] for i in range(msrs.nmsrs)]

    def create_vm(self, machine_type: int = 0) -> "Vm":
        """KVM_CREATE_VM: a new VM, which owns its own fd."""
        from pykvm.vm import Vm

        fd = check("KVM_CREATE_VM", lib.pykvm_ioctl(self.fd, lib.KVM_CREATE_VM, machine_type))
        return Vm(fd, self.vcpu_mmap_size())
