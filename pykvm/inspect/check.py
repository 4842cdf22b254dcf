"""``pykvm check``: can this host run pykvm guests, and how fast?

Like Ubuntu's ``kvm-ok``: CPU virtualization flags, /dev/kvm access, the API
version and each capability pykvm uses.  It also tells a nested host (this
machine itself a VM, e.g. with the ``kvm_pvm`` module) and what that means
for speed, because absolute exit times on such a host are about 10x those on
bare metal.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from pykvm.host import hardware_virtualization, in_virtual_machine, nested_kvm_module

# Capabilities pykvm relies on (required) or uses when present (optional),
# with what each one is for.
CAPABILITIES = [
    ("KVM_CAP_USER_MEMORY", True, "guest memory from anonymous mappings"),
    ("KVM_CAP_SET_TSS_ADDR", False, "real-mode support on Intel VMX"),
    ("KVM_CAP_EXT_CPUID", True, "KVM_GET_SUPPORTED_CPUID for long mode"),
    ("KVM_CAP_IMMEDIATE_EXIT", True, "stopping a running vCPU (timeout, Ctrl-C)"),
    ("KVM_CAP_READONLY_MEM", False, "read-only slots (writes become MMIO exits)"),
    ("KVM_CAP_IRQCHIP", False, "in-kernel PIC/IOAPIC/LAPIC"),
    ("KVM_CAP_PIT2", False, "in-kernel i8254 timer"),
    ("KVM_CAP_IRQFD", False, "interrupts from an eventfd"),
    ("KVM_CAP_IOEVENTFD", False, "doorbells handled in the kernel"),
    ("KVM_CAP_COALESCED_MMIO", False, "buffered MMIO writes"),
    ("KVM_CAP_COALESCED_PIO", False, "buffered port writes"),
    ("KVM_CAP_SET_GUEST_DEBUG", False, "single-step and breakpoints (pykvm trace)"),
    ("KVM_CAP_BINARY_STATS_FD", False, "kernel-mode exit statistics (--stats)"),
    ("KVM_CAP_DEBUGREGS", False, "debug registers"),
    ("KVM_CAP_XCRS", False, "XCR0"),
    ("KVM_CAP_VCPU_EVENTS", False, "pending events"),
    ("KVM_CAP_NR_MEMSLOTS", False, "memory slots per VM"),
    ("KVM_CAP_MAX_VCPUS", False, "vCPUs per VM"),
    ("KVM_CAP_TSC_CONTROL", False, "guest TSC frequency"),
    ("KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2", False, "dirty_pages() re-protects with KVM_CLEAR_DIRTY_LOG"),
]


@dataclass
class CheckLine:
    ok: bool
    label: str
    detail: str
    required: bool = True

    def render(self) -> str:
        mark = "ok  " if self.ok else ("FAIL" if self.required else "--  ")
        return f"  [{mark}] {self.label}: {self.detail}"


def run_check(device: str = "/dev/kvm") -> tuple[bool, list[str]]:
    """Return (usable, report lines)."""
    lines: list[str] = []
    checks: list[CheckLine] = []
    hw = hardware_virtualization()
    nested = nested_kvm_module()
    in_vm = in_virtual_machine()
    checks.append(CheckLine(bool(hw) or bool(nested), "CPU virtualization",
                            hw or ("none visible; /dev/kvm comes from " + nested if nested else "no vmx/svm flag"),
                            required=False))
    exists = os.path.exists(device)
    access = exists and os.access(device, os.R_OK | os.W_OK)
    checks.append(CheckLine(exists, device, "exists" if exists else "missing (load kvm_intel/kvm_amd)"))
    if exists:
        checks.append(CheckLine(access, "access", "read/write" if access else
                                "permission denied (add yourself to the 'kvm' group)"))
    usable = exists and access
    if usable:
        try:
            from pykvm._native_loader import lib
            from pykvm.system import Kvm
        except ImportError as exc:
            checks.append(CheckLine(False, "pykvm._native", str(exc)))
            usable = False
        else:
            with Kvm(device) as kvm:
                version = kvm.api_version()
                checks.append(CheckLine(version == 12, "KVM API version", str(version)))
                usable = usable and version == 12
                for name, required, why in CAPABILITIES:
                    value = kvm.check_extension(getattr(lib, name))
                    detail = (str(value) if value > 1 else "present") if value else "absent"
                    checks.append(CheckLine(bool(value), name, f"{detail} ({why})", required))
                    if required and not value:
                        usable = False
            missing = [n[len("PYKVM_HAVE_"):] for n in dir(lib)
                       if n.startswith("PYKVM_HAVE_") and getattr(lib, n) == -1]
            if missing:
                lines.append("  note: the <linux/kvm.h> pykvm was built with lacks " + ", ".join(missing)
                             + " (features that need them are disabled)")
    checks += memory_checks()
    lines[:0] = [c.render() for c in checks]
    if usable:
        lines.append("")
        lines.extend(probe_modes(device))
    lines.append("")
    if nested or in_vm:
        lines.append("This host is itself a virtual machine"
                     + (f": /dev/kvm is nested KVM from the {nested} module." if nested else "."))
        lines.append("  Expect every VM exit to cost about 10x bare metal (a port-I/O exit to user")
        lines.append("  space ~8 us, one KVM handles in the kernel ~2 us), and ring-0 guest code to be")
        lines.append("  emulated (~1 us per instruction) while ring-3 code runs natively.")
        lines.append("  Benchmarks report ratios measured in the same run for this reason.")
    lines.append("KVM acceleration can be used" if usable else "KVM acceleration can NOT be used")
    return usable, lines


def _pages(size: int) -> str:
    return f"{size >> 30} GiB" if size >= 1 << 30 else f"{size >> 20} MiB"


def memory_checks() -> list[CheckLine]:
    """KSM, transparent huge pages and hugetlbfs: what --mem-merge, --hugepages and -mem-path can do here."""
    from pykvm import host

    checks = []
    run = host.ksm_run()
    if run is None:
        checks.append(CheckLine(False, "KSM", "not in this kernel (--mem-merge has no effect)", required=False))
    else:
        state = {0: "off", 1: "running", 2: "unmerging"}.get(run, str(run))
        counters = host.ksm_counters()
        detail = f"{state} ({host.KSM_DIR}/run = {run}); pages_sharing {counters.get('pages_sharing', 0)}"
        if run != 1:
            detail += "; --mem-merge marks pages mergeable but nothing merges (root: echo 1 > run)"
        checks.append(CheckLine(run == 1, "KSM", detail, required=False))
    thp = host.thp_mode()
    detail = {"always": "always (every large anonymous mapping)", "madvise": "madvise (--hugepages asks with "
              "MADV_HUGEPAGE)", "never": "never (--hugepages falls back to 4 KiB pages)"}.get(thp, "absent")
    checks.append(CheckLine(thp in ("always", "madvise"), "transparent huge pages", detail, required=False))
    pools = host.hugepage_pools()
    pool_text = ", ".join(f"{_pages(size)}: {free} free of {total}" for size, (total, free) in pools.items())
    mounts = host.hugetlbfs_mounts()
    if mounts:
        detail = ", ".join(f"{point} ({_pages(page)} pages)" for point, page in mounts) + f"; pools {pool_text}"
        usable = any(pools.get(page, (0, 0))[1] for _, page in mounts)
    else:
        detail = f"no mount (-mem-path needs one); pools {pool_text or 'none'}"
        usable = False
    checks.append(CheckLine(usable, "hugetlbfs", detail, required=False))
    return checks


def probe_modes(device: str = "/dev/kvm") -> list[str]:
    """Measure, on scratch VMs, which CPU modes and which guest-debugging features work here."""
    from pykvm.errors import ModeNotSupported, PykvmError
    from pykvm.inspect.debug_support import debug_support
    from pykvm.memory import GuestMemory
    from pykvm.platform.cpu_tables import GUEST_TABLES
    from pykvm.platform.layout import load_address
    from pykvm.system import Kvm
    from pykvm.x86.modes import MODES, setup_mode

    lines = ["CPU modes and guest debugging (measured on scratch VMs):"]
    with Kvm(device) as kvm:
        cpuid = kvm.supported_cpuid()
        for mode in MODES:
            with kvm.create_vm() as vm, GuestMemory(vm) as memory:
                memory.add_region(0, 2 << 20)
                with vm.create_vcpu(0) as vcpu:
                    vcpu.set_cpuid2(cpuid)
                    try:
                        setup_mode(mode, vcpu, memory, entry=load_address(mode), tables=GUEST_TABLES)
                    except ModeNotSupported as exc:
                        lines.append(f"  {mode:<10} cannot run: {exc}")
                        continue
            try:
                d = debug_support(mode, kvm)
            except (PykvmError, OSError) as exc:
                lines.append(f"  {mode:<10} runs; guest debugging not measured ({exc})")
                continue
            yes = [name for name, ok in (("single-step", d.singlestep), ("hw breakpoints", d.hw_breakpoints),
                                         ("sw breakpoints", d.sw_breakpoints)) if ok]
            lines.append(f"  {mode:<10} runs; debugging: {', '.join(yes) if yes else 'none works'}")
    return lines
