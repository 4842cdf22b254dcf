"""cffi builder for ``pykvm._native`` (out-of-line API mode).

``setup.py`` names this file in ``cffi_modules``; ``make`` runs it in place.
The C compiler reads ``<linux/kvm.h>``, so every constant and struct layout
comes from the kernel's own header: the cdef below only says which names
pykvm uses (``#define X ...`` and structs ending in ``...;``).
"""

from __future__ import annotations

import pathlib

from cffi import FFI

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"

# Integer constants from <linux/kvm.h> / <asm/kvm.h>, values filled in by the
# compiler.  Group by the ioctl or field they belong to.
KVM_CONSTANTS = """
KVM_API_VERSION
KVM_GET_API_VERSION KVM_CREATE_VM KVM_CHECK_EXTENSION KVM_GET_VCPU_MMAP_SIZE
KVM_GET_SUPPORTED_CPUID KVM_GET_MSR_INDEX_LIST
KVM_SET_USER_MEMORY_REGION KVM_SET_TSS_ADDR KVM_SET_IDENTITY_MAP_ADDR
KVM_CREATE_IRQCHIP KVM_CREATE_PIT2 KVM_IRQ_LINE KVM_IOEVENTFD KVM_IRQFD
KVM_REGISTER_COALESCED_MMIO KVM_UNREGISTER_COALESCED_MMIO KVM_GET_DIRTY_LOG
KVM_CREATE_VCPU KVM_GET_STATS_FD KVM_RUN
KVM_GET_REGS KVM_SET_REGS KVM_GET_SREGS KVM_SET_SREGS KVM_GET_FPU KVM_SET_FPU
KVM_GET_MSRS KVM_SET_MSRS KVM_GET_CPUID2 KVM_SET_CPUID2
KVM_GET_LAPIC KVM_SET_LAPIC KVM_GET_VCPU_EVENTS KVM_SET_VCPU_EVENTS
KVM_GET_MP_STATE KVM_SET_MP_STATE KVM_GET_DEBUGREGS KVM_SET_DEBUGREGS
KVM_GET_XCRS KVM_SET_XCRS KVM_SET_GUEST_DEBUG KVM_TRANSLATE
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
KVM_IRQFD_FLAG_DEASSIGN
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
KVM_CAP_GUEST_MEMFD KVM_CAP_XSAVE2 KVM_CAP_X86_NOTIFY_VMEXIT
KVM_EXIT_NOTIFY KVM_EXIT_MEMORY_FAULT KVM_CAP_MEMORY_FAULT_INFO
""".split()

RUNLOOP_CONSTANTS = """
PYKVM_MAX_RANGES PYKVM_NR_REASONS PYKVM_HIST_BUCKETS
PYKVM_SPACE_PIO PYKVM_SPACE_MMIO PYKVM_READ_PASS PYKVM_READ_CONST
PYKVM_WRITE_PASS PYKVM_WRITE_DROP PYKVM_WRITE_TXBUF PYKVM_WRITE_DEBUG_EXIT
PYKVM_WRITE_EVENTFD
PYKVM_RET_EXIT PYKVM_RET_DEBUG_EXIT PYKVM_RET_INTR PYKVM_RET_ERROR
PYKVM_RET_PIO_OUT PYKVM_RET_PIO_IN PYKVM_RET_MMIO_WRITE PYKVM_RET_MMIO_READ
PYKVM_RET_CODE_MASK PYKVM_RET_TX_PENDING
""".split()

LIBC_CDEF = """
#define MADV_HUGEPAGE ...
#define MADV_DONTNEED ...
#define SIGUSR1 ...
"""

RUNLOOP_CDEF = """
struct pykvm_range {
    uint64_t base; uint64_t length; uint64_t read_value;
    uint32_t space; uint32_t read_action; uint32_t write_action; uint32_t id;
    uint64_t hits;
    int32_t write_fd; uint32_t reserved;
};
struct pykvm_loop {
    int vcpu_fd;
    struct kvm_run *run;
    uint32_t nranges;
    struct pykvm_range ranges[32];
    uint8_t *txbuf; uint32_t txcap; uint32_t txlen;
    uint64_t ns_per_tsc_q32;
    uint64_t stop_status;
    int error_errno;
    uint64_t io_addr; uint64_t io_value; uint32_t io_answer;
    uint64_t exits[64]; uint64_t exits_c[64]; uint64_t exits_py[64];
    uint64_t tsc_in_run; uint64_t tsc_in_c; uint64_t tsc_in_py;
    uint64_t hist_handle[64][32];
    uint64_t hist_roundtrip[64][32];
    int32_t pending_reason;
    ...;
};
int pykvm_loop_run(struct pykvm_loop *loop);
void pykvm_loop_clear_pending(struct pykvm_loop *loop);
int pykvm_run_once(int vcpu_fd, uint64_t *tsc_before, uint64_t *tsc_after);
long pykvm_ioctl(int fd, unsigned long request, unsigned long arg);
long pykvm_ioctl_ptr(int fd, unsigned long request, void *arg);
void *pykvm_mmap_anon(uint64_t size, int *err);
void *pykvm_mmap_fd(int fd, uint64_t size, int *err);
int pykvm_munmap(void *addr, uint64_t size);
int pykvm_madvise(void *addr, uint64_t size, int advice);
int pykvm_install_kick_handler(int signo);
uint64_t pykvm_rdtsc(void);
int pykvm_drain_coalesced(void *ring_page, struct kvm_coalesced_mmio *out, int max);
"""


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
    ffi.cdef("".join(f"#define {name} ...\n" for name in KVM_CONSTANTS + RUNLOOP_CONSTANTS))
    ffi.cdef(LIBC_CDEF + RUNLOOP_CDEF + guarded_cdef)
    ffi.set_source(
        "pykvm._native",
        '#include <signal.h>\n#include <sys/mman.h>\n#include "runloop.h"\n' + guarded_src,
        sources=[str(CSRC / "runloop.c")],
        include_dirs=[str(CSRC)],
        extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"],
    )
    return ffi


ffibuilder = make_ffi()

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
    return target


if __name__ == "__main__":
    print(build_in_place())
