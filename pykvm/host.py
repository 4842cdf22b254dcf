"""Facts about the host pykvm runs on, read from /proc and /sys.

Below everything else in pykvm (it imports nothing of pykvm), so any layer
may ask: is ``/dev/kvm`` nested KVM (the ``kvm_pvm`` module), which CPU
flags are visible.  ``pykvm check`` (``pykvm.inspect.check``) turns these
into a report.
"""

from __future__ import annotations

import functools
import os

#: Modules that provide /dev/kvm inside a VM without VT-x/AMD-V.
NESTED_KVM_MODULES = ("kvm_pvm",)


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The ``flags`` line of /proc/cpuinfo (empty where unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def nested_kvm_module() -> str | None:
    """The name of a nested-KVM module if one provides /dev/kvm (kvm_pvm), else None."""
    for name in NESTED_KVM_MODULES:
        if os.path.isdir(f"/sys/module/{name}"):
            return name
    return None


def hardware_virtualization() -> str | None:
    """``vmx (Intel VT-x)`` or ``svm (AMD-V)`` when the CPU shows the flag, else None."""
    flags = cpu_flags()
    if "vmx" in flags:
        return "vmx (Intel VT-x)"
    if "svm" in flags:
        return "svm (AMD-V)"
    return None


def in_virtual_machine() -> bool:
    """True when the CPU says it runs under a hypervisor (the ``hypervisor`` flag)."""
    return "hypervisor" in cpu_flags()


def online_cpus() -> int:
    """CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except OSError:
        return os.cpu_count() or 1
