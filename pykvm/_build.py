"""cffi builder for ``pykvm._native`` (out-of-line API mode).

``setup.py`` names this file in ``cffi_modules``; ``make`` runs it in place.
The C compiler reads ``<linux/kvm.h>``, so every constant and struct layout
comes from the kernel's own header: the cdef below only says which names
pykvm uses (``#define X ...`` and structs ending in ``...;``).
"""

from __future__ import annotations

import pathlib
import re

from cffi import FFI

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"

# Integer constants from <linux/kvm.h> / <asm/kvm.h>, values filled in by the
# compiler.  Group by the ioctl or field they belong to.
KVM_CONSTANTS = """
KVM_API_VERSION
KVM_GET_API_VERSION KVM_CREATE_VM KVM_CHECK_EXTENSION KVM_GET_VCPU_MMAP_SIZE
KVM_GET_SUPPORTED_CPUID KVM_GET_MSR_INDEX_LIST
KVM_SET_USER_MEMORY_REGION KVM_SET_TSS_ADDR KVM_SET_IDENTITY_MAP_ADDR
KVM_CREATE_IRQCHIP KVM_CREATE_PIT2 KVM_REINJECT_CONTROL KVM_IRQ_LINE KVM_IOEVENTFD KVM_IRQFD
KVM_GET_IRQCHIP KVM_SET_IRQCHIP KVM_GET_PIT2 KVM_SET_PIT2 KVM_SET_GSI_ROUTING
KVM_GET_CLOCK KVM_SET_CLOCK KVM_GET_TSC_KHZ KVM_GET_XSAVE KVM_SET_XSAVE KVM_SIGNAL_MSI
KVM_REGISTER_COALESCED_MMIO KVM_UNREGISTER_COALESCED_MMIO KVM_GET_DIRTY_LOG
KVM_CLEAR_DIRTY_LOG KVM_ENABLE_CAP KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
KVM_CREATE_VCPU KVM_GET_STATS_FD KVM_RUN
KVM_GET_REGS KVM_SET_REGS KVM_GET_SREGS KVM_SET_SREGS KVM_GET_FPU KVM_SET_FPU
KVM_GET_MSRS KVM_SET_MSRS KVM_GET_CPUID2 KVM_SET_CPUID2
KVM_GET_LAPIC KVM_SET_LAPIC KVM_GET_VCPU_EVENTS KVM_SET_VCPU_EVENTS
KVM_GET_MP_STATE KVM_SET_MP_STATE KVM_GET_DEBUGREGS KVM_SET_DEBUGREGS
KVM_GET_XCRS KVM_SET_XCRS KVM_SET_GUEST_DEBUG KVM_TRANSLATE KVM_SET_SIGNAL_MASK
KVM_CAP_IRQCHIP KVM_CAP_HLT KVM_CAP_USER_MEMORY KVM_CAP_SET_TSS_ADDR
KVM_CAP_EXT_CPUID KVM_CAP_PIT2 KVM_CAP_IRQFD KVM_CAP_IOEVENTFD
KVM_CAP_COALESCED_MMIO KVM_CAP_COALESCED_PIO KVM_CAP_SET_GUEST_DEBUG
KVM_CAP_IMMEDIATE_EXIT KVM_CAP_BINARY_STATS_FD KVM_CAP_READONLY_MEM
KVM_CAP_SET_IDENTITY_MAP_ADDR KVM_CAP_NR_MEMSLOTS KVM_CAP_MAX_VCPUS
KVM_CAP_NR_VCPUS KVM_CAP_DEBUGREGS KVM_CAP_XCRS KVM_CAP_XSAVE
KVM_CAP_VCPU_EVENTS KVM_CAP_MP_STATE KVM_CAP_SYNC_MMU KVM_CAP_INTERNAL_ERROR_DATA
KVM_CAP_X86_USER_SPACE_MSR KVM_CAP_SPLIT_IRQCHIP KVM_CAP_TSC_CONTROL
KVM_CAP_SYNC_REGS KVM_CAP_DIRTY_LOG_RING KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
KVM_CAP_USER_NMI KVM_CAP_IOEVENTFD_ANY_LENGTH KVM_CAP_X86_ROBUST_SINGLESTEP
KVM_CAP_GET_TSC_KHZ KVM_CAP_ADJUST_CLOCK KVM_CAP_IRQ_ROUTING KVM_CAP_SIGNAL_MSI
KVM_EXIT_UNKNOWN KVM_EXIT_EXCEPTION KVM_EXIT_IO KVM_EXIT_HYPERCALL KVM_EXIT_DEBUG
KVM_EXIT_HLT KVM_EXIT_MMIO KVM_EXIT_IRQ_WINDOW_OPEN KVM_EXIT_SHUTDOWN
KVM_EXIT_FAIL_ENTRY KVM_EXIT_INTR KVM_EXIT_SET_TPR KVM_EXIT_TPR_ACCESS
KVM_EXIT_NMI KVM_EXIT_INTERNAL_ERROR KVM_EXIT_SYSTEM_EVENT KVM_EXIT_IOAPIC_EOI
KVM_EXIT_X86_RDMSR KVM_EXIT_X86_WRMSR KVM_EXIT_DIRTY_RING_FULL
KVM_EXIT_IO_IN KVM_EXIT_IO_OUT
KVM_INTERNAL_ERROR_EMULATION KVM_INTERNAL_ERROR_SIMUL_EX
KVM_INTERNAL_ERROR_DELIVERY_EV KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON
KVM_SYSTEM_EVENT_SHUTDOWN KVM_SYSTEM_EVENT_RESET KVM_SYSTEM_EVENT_CRASH
KVM_MEM_LOG_DIRTY_PAGES KVM_MEM_READONLY
KVM_IOEVENTFD_FLAG_DATAMATCH KVM_IOEVENTFD_FLAG_PIO KVM_IOEVENTFD_FLAG_DEASSIGN
KVM_IRQFD_FLAG_DEASSIGN KVM_IRQFD_FLAG_RESAMPLE
KVM_IRQCHIP_PIC_MASTER KVM_IRQCHIP_PIC_SLAVE KVM_IRQCHIP_IOAPIC
KVM_IRQ_ROUTING_IRQCHIP KVM_IRQ_ROUTING_MSI
KVM_PIT_SPEAKER_DUMMY
KVM_GUESTDBG_ENABLE KVM_GUESTDBG_SINGLESTEP KVM_GUESTDBG_USE_SW_BP
KVM_GUESTDBG_USE_HW_BP KVM_GUESTDBG_INJECT_DB KVM_GUESTDBG_INJECT_BP
KVM_MP_STATE_RUNNABLE KVM_MP_STATE_UNINITIALIZED KVM_MP_STATE_INIT_RECEIVED
KVM_MP_STATE_HALTED KVM_MP_STATE_SIPI_RECEIVED
KVM_STATS_TYPE_MASK KVM_STATS_TYPE_CUMULATIVE KVM_STATS_TYPE_INSTANT
KVM_STATS_TYPE_PEAK KVM_STATS_TYPE_LINEAR_HIST KVM_STATS_TYPE_LOG_HIST
KVM_STATS_UNIT_MASK KVM_STATS_UNIT_NONE KVM_STATS_UNIT_BYTES
KVM_STATS_UNIT_SECONDS KVM_STATS_UNIT_CYCLES KVM_STATS_UNIT_BOOLEAN
KVM_STATS_BASE_MASK KVM_STATS_BASE_POW10 KVM_STATS_BASE_POW2
KVM_COALESCED_MMIO_PAGE_OFFSET
""".split()

# Constants newer than some build hosts' headers: compiled in only where the
# header has them (pykvm.constants reports which are missing).
GUARDED_CONSTANTS = """
KVM_CAP_GUEST_MEMFD KVM_CAP_XSAVE2 KVM_GET_XSAVE2 KVM_CAP_X86_NOTIFY_VMEXIT
KVM_EXIT_NOTIFY KVM_EXIT_MEMORY_FAULT KVM_CAP_MEMORY_FAULT_INFO
""".split()

LIBC_CDEF = """
#define PYKVM_ROUTING_U_OFFSET ...
#define PYKVM_IRQCHIP_CHIP_OFFSET ...
#define MADV_HUGEPAGE ...
#define MADV_DONTNEED ...
#define MADV_MERGEABLE ...
#define MADV_NOHUGEPAGE ...
#define MADV_POPULATE_WRITE ...
#define HUGETLBFS_MAGIC ...
#define SIGUSR1 ...
"""

_CDEF_BEGIN, _CDEF_END = "/* cffi: begin */", "/* cffi: end */"


def runloop_cdef(header: str) -> str:
    """The C loop's contract for cffi, derived from csrc/runloop.h (its only declaration).

    The part between the cffi markers is valid cdef once the values and
    array sizes are left to the compiler: ``#define NAME value`` becomes
    ``#define NAME ...`` and ``[NAME]`` becomes ``[...]``.
    """
    try:
        body = header[header.index(_CDEF_BEGIN) + len(_CDEF_BEGIN):header.index(_CDEF_END)]
    except ValueError:
        raise RuntimeError("csrc/runloop.h lacks its cffi: begin/end markers") from None
    body = re.sub(r"^#define\s+(\w+)\s+\S.*$", r"#define \1 ...", body, flags=re.M)
    return re.sub(r"\[[A-Z_][A-Z0-9_]*\]", "[...]", body)


def _guarded_source() -> tuple[str, str]:
    """Declare newer constants as variables, -1 where the header lacks them."""
    cdef = "".join(f"static const long long PYKVM_HAVE_{name};\n" for name in GUARDED_CONSTANTS)
    src = "".join(
        f"#ifdef {name}\nstatic const long long PYKVM_HAVE_{name} = {name};\n"
        f"#else\nstatic const long long PYKVM_HAVE_{name} = -1;\n#endif\n"
        for name in GUARDED_CONSTANTS
    )
    return cdef, src


def make_ffi() -> FFI:
    ffi = FFI()
    guarded_cdef, guarded_src = _guarded_source()
    ffi.cdef((CSRC / "kvm_structs.cdef").read_text())
    ffi.cdef("".join(f"#define {name} ...\n" for name in KVM_CONSTANTS))
    ffi.cdef(LIBC_CDEF + runloop_cdef((CSRC / "runloop.h").read_text()) + guarded_cdef)
    ffi.set_source(
        "pykvm._native",
        '#include <signal.h>\n#include <stddef.h>\n#include <sys/mman.h>\n#include <linux/magic.h>\n'
        '#include "runloop.h"\n'
        "#define PYKVM_ROUTING_U_OFFSET offsetof(struct kvm_irq_routing_entry, u)\n"
        "#define PYKVM_IRQCHIP_CHIP_OFFSET offsetof(struct kvm_irqchip, chip)\n" + guarded_src,
        sources=[str(CSRC / "runloop.c")],
        include_dirs=[str(CSRC)],
        extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    )
    return ffi


ffibuilder = make_ffi()


def remove_stale_builds(keep: pathlib.Path) -> list[pathlib.Path]:
    """Delete every other ``_native*.so`` beside ``keep``: one build, never a stale one that wins.

    ``make`` names the extension after the interpreter (``_native.cpython-311-...so``);
    ``pip install -e .`` builds it for the stable ABI (``_native.abi3.so``).  Python
    would import whichever suffix it tries first, so the other must go.
    """
    removed = []
    for other in keep.parent.glob("_native*.so"):
        if other.name != keep.name:
            other.unlink()
            removed.append(other)
    return removed


def build_in_place() -> pathlib.Path:
    """Compile under build/cffi and copy the extension next to this file (``make``)."""
    import shutil

    root = pathlib.Path(__file__).resolve().parent.parent
    built = pathlib.Path(ffibuilder.compile(tmpdir=str(root / "build" / "cffi")))
    target = root / "pykvm" / built.name
    # Copy, then rename over the old file: processes that have the old
    # extension mapped keep its inode (truncating it in place would crash them).
    partial = target.with_name(target.name + ".tmp")
    shutil.copy2(built, partial)
    partial.replace(target)
    remove_stale_builds(target)
    return target


if __name__ == "__main__":
    print(build_in_place())
