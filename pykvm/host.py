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


# -- memory: KSM, transparent huge pages, hugetlbfs (Documentation/admin-guide/mm/) ------------------

KSM_DIR = "/sys/kernel/mm/ksm"
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
HUGEPAGES_DIR = "/sys/kernel/mm/hugepages"


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def ksm_run() -> int | None:
    """``/sys/kernel/mm/ksm/run``: 0 ksmd stopped, 1 merging, 2 unmerging; None without KSM (ksm.rst)."""
    return _read_int(f"{KSM_DIR}/run")


def ksm_counters() -> dict[str, int]:
    """KSM's page counters (pages_shared, pages_sharing, pages_unshared, full_scans, ...); empty without KSM."""
    names = ("pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "full_scans",
             "pages_to_scan", "sleep_millisecs")
    values = {name: _read_int(f"{KSM_DIR}/{name}") for name in names}
    return {name: value for name, value in values.items() if value is not None}


def thp_mode() -> str | None:
    """The selected word of ``transparent_hugepage/enabled``: always, madvise or never; None without THP."""
    try:
        with open(THP_ENABLED) as f:
            words = f.read().split()
    except OSError:
        return None
    return next((w[1:-1] for w in words if w.startswith("[")), None)


def hugepage_pools() -> dict[int, tuple[int, int]]:
    """Huge page size in bytes -> (reserved, free), from /sys/kernel/mm/hugepages/hugepages-<N>kB/."""
    pools: dict[int, tuple[int, int]] = {}
    try:
        names = os.listdir(HUGEPAGES_DIR)
    except OSError:
        return pools
    for name in names:
        if name.startswith("hugepages-") and name.endswith("kB"):
            size = int(name[len("hugepages-"):-2]) << 10
            total = _read_int(f"{HUGEPAGES_DIR}/{name}/nr_hugepages")
            free = _read_int(f"{HUGEPAGES_DIR}/{name}/free_hugepages")
            pools[size] = (total or 0, free or 0)
    return dict(sorted(pools.items()))


def hugetlbfs_mounts() -> list[tuple[str, int]]:
    """(mount point, huge page size in bytes) of every hugetlbfs mount (/proc/mounts; statvfs's f_bsize)."""
    mounts = []
    try:
        with open("/proc/mounts") as f:
            lines = f.read().splitlines()
    except OSError:
        return mounts
    for line in lines:
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "hugetlbfs":
            point = fields[1].replace("\\040", " ")
            try:
                mounts.append((point, os.statvfs(point).f_bsize))
            except OSError:
                continue
    return mounts


def ksm_process_stat(pid: str = "self") -> dict[str, int]:
    """``/proc/PID/ksm_stat`` (Linux 6.1+): ksm_merging_pages (this process's pages KSM merged), ksm_rmap_items, ..."""
    stat: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/ksm_stat") as f:
            for line in f:
                name, _, value = line.partition(" ")
                if value.strip().lstrip("-").isdigit():
                    stat[name] = int(value)
    except OSError:
        pass
    return stat
