/* pykvm's hot exit path: a KVM_RUN loop that handles the exits it owns.
 *
 * The Python side fills a table of port/MMIO ranges and what to do with each
 * access (drop it, answer a constant, buffer transmitted bytes, stop on a
 * debug-exit write, signal an eventfd).  pykvm_loop_run() calls KVM_RUN until
 * an exit arrives that no range owns; that one is left in kvm_run for Python.
 * cffi releases the GIL around the call, so one thread per vCPU works.
 *
 * Every exit is counted per reason and timestamped with the TSC: time inside
 * KVM_RUN, time in C handlers, time in Python handlers (measured from the
 * return to Python until the next call), and log2 histograms in nanoseconds.
 *
 * This header is the contract's only declaration.  pykvm/_build.py hands the
 * part between the "cffi" markers to cffi's cdef() after two mechanical
 * rewrites: "#define NAME value" becomes "#define NAME ..." and an array
 * size "[NAME]" becomes "[...]", so every value and size comes from the
 * compiler, never from a second copy typed in Python.
 */
#ifndef PYKVM_RUNLOOP_H
#define PYKVM_RUNLOOP_H

#include <stdint.h>
#include <linux/kvm.h>

/* cffi: begin */
#define PYKVM_MAX_RANGES   64
#define PYKVM_NR_REASONS   64   /* exit_reason values >= this share the last slot */
#define PYKVM_HIST_BUCKETS 32   /* bucket i counts durations in [2^i, 2^(i+1)) ns */

/* Address space of a range. */
#define PYKVM_SPACE_PIO  0
#define PYKVM_SPACE_MMIO 1

/* What a read of the range does. */
#define PYKVM_READ_PASS  0      /* return to Python */
#define PYKVM_READ_CONST 1      /* answer with read_value (little-endian) */

/* What a write to the range does.  Every write C handles is counted in the
 * range's hits and its value kept in last_value, so the device that owns
 * the range can account for it exactly as if it had seen the write. */
#define PYKVM_WRITE_PASS       0  /* return to Python */
#define PYKVM_WRITE_DROP       1  /* discard (a POST-code sink) */
#define PYKVM_WRITE_TXBUF      2  /* append 1-byte writes to the transmit buffer */
#define PYKVM_WRITE_DEBUG_EXIT 3  /* stop the loop: status = (value << 1) | 1 */
#define PYKVM_WRITE_EVENTFD    4  /* a doorbell: add 1 to the eventfd write_fd, resume the guest */

/* Why pykvm_loop_run() returned.  The low 7 bits are the code; for the four
 * single-access I/O codes the (unsigned) return value also packs the access,
 * so the Python handler needs no further reads of kvm_run for the common case:
 *   bits 8-11:  size in bytes (1, 2, 4 or 8)
 *   bits 16-31: the port (PIO); the MMIO address is in io_addr
 *   io_value:   the data of a write, little-endian
 * Answer a read by storing io_value and setting io_answer = 1: the next
 * pykvm_loop_run() copies it into kvm_run before re-entering the guest.
 * With decode_all set, every exit Python sees is PYKVM_RET_EXIT (a tracer
 * decodes each one into a value). */
#define PYKVM_RET_EXIT       0  /* any other exit for Python: decode kvm_run */
#define PYKVM_RET_DEBUG_EXIT 1  /* the guest wrote to a debug-exit range: see stop_status */
#define PYKVM_RET_INTR       2  /* KVM_RUN returned EINTR/EAGAIN (signal or immediate_exit) */
#define PYKVM_RET_ERROR      3  /* KVM_RUN failed (or the vCPU is gone): see error_errno */
#define PYKVM_RET_PIO_OUT    4  /* one OUT (not REP) */
#define PYKVM_RET_PIO_IN     5  /* one IN: answer through io_value/io_answer */
#define PYKVM_RET_MMIO_WRITE 6  /* one MMIO store of at most 8 bytes */
#define PYKVM_RET_MMIO_READ  7  /* one MMIO load: answer through io_value/io_answer */
#define PYKVM_RET_CODE_MASK  0x7f
#define PYKVM_RET_TX_PENDING 0x80 /* flag: the transmit buffer holds bytes; drain it first */
#define PYKVM_RET_SIZE_SHIFT 8
#define PYKVM_RET_PORT_SHIFT 16

struct pykvm_range {
    uint64_t base;
    uint64_t length;
    uint64_t read_value;
    uint32_t space;
    uint32_t read_action;
    uint32_t write_action;
    uint32_t id;          /* the Python side's handle */
    uint64_t hits;        /* accesses handled in C (a REP string access counts each element) */
    uint64_t write_hits;  /* ... of which writes */
    uint64_t last_value;  /* the value of the last write handled in C */
    int32_t write_fd;     /* PYKVM_WRITE_EVENTFD: the eventfd to signal (else unused) */
    uint32_t reserved;
};

struct pykvm_loop {
    /* set up by Python; vcpu_fd < 0 or run == NULL once the vCPU is closed */
    int vcpu_fd;
    struct kvm_run *run;
    uint32_t nranges;
    uint32_t decode_all;        /* hand every exit to Python as PYKVM_RET_EXIT */
    struct pykvm_range ranges[PYKVM_MAX_RANGES];
    uint8_t *txbuf;             /* bytes written to PYKVM_WRITE_TXBUF ranges */
    uint32_t txcap;
    uint32_t txlen;             /* Python drains it and resets to 0 */
    uint32_t txowner;           /* index of the range whose bytes txbuf holds */
    uint64_t ns_per_tsc_q32;    /* TSC ticks -> ns, 32.32 fixed point */

    /* results of the last return */
    uint64_t stop_status;
    int error_errno;
    uint64_t io_addr;           /* PYKVM_RET_MMIO_*: the guest-physical address */
    uint64_t io_value;          /* write data, or Python's answer to a read */
    uint32_t io_answer;         /* set by Python: copy io_value into kvm_run */

    /* statistics, cumulative over calls */
    uint64_t exits[PYKVM_NR_REASONS];      /* every exit KVM_RUN returned */
    uint64_t exits_c[PYKVM_NR_REASONS];    /* ... handled here */
    uint64_t exits_py[PYKVM_NR_REASONS];   /* ... handed to Python */
    uint64_t returns;                      /* returns to Python, of any kind */
    uint64_t tsc_in_run;                   /* inside the KVM_RUN ioctl */
    uint64_t tsc_in_c;                     /* in C handlers */
    uint64_t tsc_in_py;                    /* from return to Python to the next call */
    uint64_t hist_handle[PYKVM_NR_REASONS][PYKVM_HIST_BUCKETS];
    uint64_t hist_roundtrip[PYKVM_NR_REASONS][PYKVM_HIST_BUCKETS];

    /* bookkeeping for the exit last handed to Python */
    int32_t pending_reason;     /* -1 when none */
    uint64_t pending_exit_tsc;
    uint64_t pending_entry_tsc;
};

/* Run until an exit Python must see, a debug-exit, a signal or an error. */
uint32_t pykvm_loop_run(struct pykvm_loop *loop);

/* Forget the Python exit in flight (e.g. after a stop) so it is not timed. */
void pykvm_loop_clear_pending(struct pykvm_loop *loop);

/* One bare KVM_RUN with TSC timestamps, for pykvm's own measurements. */
int pykvm_run_once(int vcpu_fd, uint64_t *tsc_before, uint64_t *tsc_after);

/* ioctl wrappers that return -errno instead of setting errno. */
long pykvm_ioctl(int fd, unsigned long request, unsigned long arg);
long pykvm_ioctl_ptr(int fd, unsigned long request, void *arg);

/* Mappings owned by pykvm objects. */
void *pykvm_mmap_anon(uint64_t size, int *err);
void *pykvm_mmap_fd(int fd, uint64_t size, int *err);
int pykvm_munmap(void *addr, uint64_t size);
int pykvm_madvise(void *addr, uint64_t size, int advice);

/* statfs(2)'s f_type for path (e.g. HUGETLBFS_MAGIC), or -errno. */
long long pykvm_statfs_type(const char *path);

/* A no-op handler for the vCPU kick signal: its only job is to make a
 * blocked KVM_RUN return EINTR.  Installed without SA_RESTART. */
int pykvm_install_kick_handler(int signo);

uint64_t pykvm_rdtsc(void);

/* Empty the coalesced MMIO/PIO ring (the page at KVM_COALESCED_MMIO_PAGE_OFFSET
 * of the vCPU mapping): copy up to max entries, oldest first, into out as
 * struct kvm_coalesced_mmio (24 bytes each) and hand their slots back to KVM.
 * Returns the number copied. */
int pykvm_drain_coalesced(void *ring_page, struct kvm_coalesced_mmio *out, int max);
/* cffi: end */

#endif
