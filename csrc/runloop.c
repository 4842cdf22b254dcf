/* pykvm's hot exit path; see runloop.h for the contract. */
#define _GNU_SOURCE
#include "runloop.h"

#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/vfs.h>
#include <unistd.h>
#include <x86intrin.h>

uint64_t pykvm_rdtsc(void) { return __rdtsc(); }

int pykvm_drain_coalesced(void *ring_page, struct kvm_coalesced_mmio *out, int max)
{
    struct kvm_coalesced_mmio_ring *ring = ring_page;
    const uint32_t capacity = (4096 - sizeof(*ring)) / sizeof(struct kvm_coalesced_mmio);
    uint32_t first = ring->first;
    /* KVM fills an entry, then publishes it by moving 'last' (smp_wmb). */
    uint32_t last = __atomic_load_n(&ring->last, __ATOMIC_ACQUIRE);
    int n = 0;

    while (first != last && n < max) {
        out[n++] = ring->coalesced_mmio[first];
        first = (first + 1) % capacity;
    }
    /* Free the slots only after copying them out. */
    __atomic_store_n(&ring->first, first, __ATOMIC_RELEASE);
    return n;
}

long pykvm_ioctl(int fd, unsigned long request, unsigned long arg)
{
    long rc = ioctl(fd, request, arg);
    return rc < 0 ? -errno : rc;
}

long pykvm_ioctl_ptr(int fd, unsigned long request, void *arg)
{
    long rc = ioctl(fd, request, arg);
    return rc < 0 ? -errno : rc;
}

void *pykvm_mmap_anon(uint64_t size, int *err)
{
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    *err = p == MAP_FAILED ? errno : 0;
    return p == MAP_FAILED ? NULL : p;
}

void *pykvm_mmap_fd(int fd, uint64_t size, int *err)
{
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    *err = p == MAP_FAILED ? errno : 0;
    return p == MAP_FAILED ? NULL : p;
}

int pykvm_munmap(void *addr, uint64_t size)
{
    return munmap(addr, size) < 0 ? -errno : 0;
}

int pykvm_madvise(void *addr, uint64_t size, int advice)
{
    return madvise(addr, size, advice) < 0 ? -errno : 0;
}

long long pykvm_statfs_type(const char *path)
{
    struct statfs st;
    return statfs(path, &st) < 0 ? -errno : (long long)st.f_type;
}

static void kick_handler(int signo) { (void)signo; }

int pykvm_install_kick_handler(int signo)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = kick_handler;   /* no SA_RESTART: KVM_RUN must return */
    sigemptyset(&sa.sa_mask);
    return sigaction(signo, &sa, NULL) < 0 ? -errno : 0;
}

int pykvm_run_once(int vcpu_fd, uint64_t *tsc_before, uint64_t *tsc_after)
{
    *tsc_before = __rdtsc();
    int rc = ioctl(vcpu_fd, KVM_RUN, 0);
    int err = errno;
    *tsc_after = __rdtsc();
    return rc < 0 ? -err : rc;
}

static inline uint32_t reason_slot(uint32_t reason)
{
    return reason < PYKVM_NR_REASONS ? reason : PYKVM_NR_REASONS - 1;
}

static inline uint32_t log2_bucket(const struct pykvm_loop *L, uint64_t tsc)
{
    uint64_t ns = (uint64_t)(((unsigned __int128)tsc * L->ns_per_tsc_q32) >> 32);
    uint32_t b = ns ? 63 - (uint32_t)__builtin_clzll(ns) : 0;
    return b < PYKVM_HIST_BUCKETS ? b : PYKVM_HIST_BUCKETS - 1;
}

static struct pykvm_range *find_range(struct pykvm_loop *L, uint32_t space,
                                      uint64_t addr, uint64_t len)
{
    for (uint32_t i = 0; i < L->nranges; i++) {
        struct pykvm_range *r = &L->ranges[i];
        if (r->space == space && addr >= r->base &&
            addr - r->base < r->length && len <= r->length - (addr - r->base))
            return r;
    }
    return NULL;
}

enum outcome { PASS, HANDLED, DEBUG_EXIT };

/* The guest's value of a write, little-endian, at most 8 bytes. */
static uint64_t le_value(const uint8_t *p, uint32_t len)
{
    uint64_t v = 0;
    memcpy(&v, p, len > 8 ? 8 : len);
    return v;
}

static enum outcome handle_write(struct pykvm_loop *L, struct pykvm_range *r,
                                 const uint8_t *data, uint32_t size, uint32_t count)
{
    /* The value of the last element written (REP OUTS writes count of them). */
    uint64_t value = le_value(data + (uint64_t)(count - 1) * size, size);

    switch (r->write_action) {
    case PYKVM_WRITE_DROP:
        break;
    case PYKVM_WRITE_TXBUF:
        /* Only byte writes are plain transmits; a full buffer, or one that
         * holds another range's bytes, goes to Python, which drains it
         * first, so no byte is lost or given to the wrong device. */
        if (size != 1 || L->txbuf == NULL || L->txcap - L->txlen < count ||
            (L->txlen && L->txowner != r->id))
            return PASS;
        memcpy(L->txbuf + L->txlen, data, count);
        L->txlen += count;
        L->txowner = r->id;
        break;
    case PYKVM_WRITE_DEBUG_EXIT:
        if (count != 1)
            return PASS;
        r->last_value = value;
        r->write_hits++;
        L->stop_status = (value << 1) | 1;
        return DEBUG_EXIT;
    case PYKVM_WRITE_EVENTFD: {
        /* A doorbell (virtio's QueueNotify): wake the host thread that waits
         * on the eventfd and re-enter the guest at once; that thread does
         * the work.  Like KVM_IOEVENTFD, but after a trip to user space, and
         * without the value: the thread looks at every queue of the device.
         * The write cannot block (the counter would need 2^64-2 unread
         * kicks); if it fails at all, Python handles the access instead. */
        uint64_t one = 1;
        if (write(r->write_fd, &one, sizeof(one)) != (ssize_t)sizeof(one))
            return PASS;
        break;
    }
    default:
        return PASS;
    }
    r->last_value = value;
    r->write_hits += count;
    return HANDLED;
}

static void fill_const(uint8_t *dst, uint64_t value, uint32_t size, uint32_t count)
{
    for (uint32_t i = 0; i < count; i++)
        memcpy(dst + (uint64_t)i * size, &value, size > 8 ? 8 : size);
}

static enum outcome try_handle(struct pykvm_loop *L, struct kvm_run *run)
{
    struct pykvm_range *r;
    enum outcome out = PASS;
    uint32_t elements = 1;

    switch (run->exit_reason) {
    case KVM_EXIT_IO: {
        uint32_t size = run->io.size, count = run->io.count;
        elements = count;
        uint8_t *data = (uint8_t *)run + run->io.data_offset;
        r = find_range(L, PYKVM_SPACE_PIO, run->io.port, size);
        if (r == NULL || size > 8 || count == 0)
            return PASS;
        if (run->io.direction == KVM_EXIT_IO_OUT)
            out = handle_write(L, r, data, size, count);
        else if (r->read_action == PYKVM_READ_CONST) {
            fill_const(data, r->read_value, size, count);
            out = HANDLED;
        }
        break;
    }
    case KVM_EXIT_MMIO: {
        uint32_t len = run->mmio.len;
        r = find_range(L, PYKVM_SPACE_MMIO, run->mmio.phys_addr, len);
        if (r == NULL || len > 8)
            return PASS;
        if (run->mmio.is_write)
            out = handle_write(L, r, run->mmio.data, len, 1);
        else if (r->read_action == PYKVM_READ_CONST) {
            fill_const(run->mmio.data, r->read_value, len, 1);
            out = HANDLED;
        }
        break;
    }
    default:
        return PASS;
    }
    if (out != PASS)
        r->hits += elements;
    return out;
}

void pykvm_loop_clear_pending(struct pykvm_loop *L)
{
    L->pending_reason = -1;
    L->io_answer = 0;
}

/* Classify an exit handed to Python: single accesses get a packed code.
 * Unsigned: a port at or above 0x8000 shifted left by 16 does not fit a
 * signed 32-bit int. */
static uint32_t python_exit_code(struct pykvm_loop *L, struct kvm_run *run)
{
    if (L->decode_all)
        return PYKVM_RET_EXIT;
    if (run->exit_reason == KVM_EXIT_IO && run->io.count == 1 && run->io.size <= 8) {
        uint32_t packed = ((uint32_t)run->io.size << PYKVM_RET_SIZE_SHIFT) |
                          ((uint32_t)run->io.port << PYKVM_RET_PORT_SHIFT);
        if (run->io.direction == KVM_EXIT_IO_OUT) {
            L->io_value = le_value((uint8_t *)run + run->io.data_offset, run->io.size);
            return PYKVM_RET_PIO_OUT | packed;
        }
        return PYKVM_RET_PIO_IN | packed;
    }
    if (run->exit_reason == KVM_EXIT_MMIO && run->mmio.len <= 8) {
        L->io_addr = run->mmio.phys_addr;
        if (run->mmio.is_write) {
            L->io_value = le_value(run->mmio.data, run->mmio.len);
            return PYKVM_RET_MMIO_WRITE | (run->mmio.len << PYKVM_RET_SIZE_SHIFT);
        }
        return PYKVM_RET_MMIO_READ | (run->mmio.len << PYKVM_RET_SIZE_SHIFT);
    }
    return PYKVM_RET_EXIT;
}

/* Copy Python's answer to the pending IN / MMIO read into kvm_run. */
static void complete_answer(struct pykvm_loop *L, struct kvm_run *run)
{
    if (run->exit_reason == KVM_EXIT_IO && run->io.direction == KVM_EXIT_IO_IN)
        memcpy((uint8_t *)run + run->io.data_offset, &L->io_value, run->io.size);
    else if (run->exit_reason == KVM_EXIT_MMIO && !run->mmio.is_write)
        memcpy(run->mmio.data, &L->io_value, run->mmio.len);
    L->io_answer = 0;
}

static uint32_t run_until_python(struct pykvm_loop *L)
{
    struct kvm_run *run = L->run;

    if (L->vcpu_fd < 0 || run == NULL) {   /* the vCPU was closed: never touch its mapping */
        L->error_errno = EBADF;
        return PYKVM_RET_ERROR;
    }
    for (;;) {
        if (L->io_answer)
            complete_answer(L, run);
        uint64_t t_entry = __rdtsc();

        /* The exit handed to Python last time has now been handled. */
        if (L->pending_reason >= 0) {
            uint32_t s = (uint32_t)L->pending_reason;
            uint64_t handling = t_entry - L->pending_exit_tsc;
            L->tsc_in_py += handling;
            L->hist_handle[s][log2_bucket(L, handling)]++;
            L->hist_roundtrip[s][log2_bucket(L, t_entry - L->pending_entry_tsc)]++;
            L->pending_reason = -1;
        }

        int rc = ioctl(L->vcpu_fd, KVM_RUN, 0);
        int err = errno;
        uint64_t t_exit = __rdtsc();
        L->tsc_in_run += t_exit - t_entry;

        if (rc < 0) {
            if (err == EINTR || err == EAGAIN) {
                L->exits[KVM_EXIT_INTR]++;
                return PYKVM_RET_INTR;
            }
            L->error_errno = err;
            return PYKVM_RET_ERROR;
        }

        uint32_t s = reason_slot(run->exit_reason);
        L->exits[s]++;
        enum outcome out = try_handle(L, run);
        uint64_t t_done = __rdtsc();

        if (out == PASS) {
            L->exits_py[s]++;
            L->pending_reason = (int32_t)s;
            L->pending_exit_tsc = t_exit;
            L->pending_entry_tsc = t_entry;
            return python_exit_code(L, run);
        }
        L->exits_c[s]++;
        L->tsc_in_c += t_done - t_exit;
        L->hist_handle[s][log2_bucket(L, t_done - t_exit)]++;
        L->hist_roundtrip[s][log2_bucket(L, t_done - t_entry)]++;
        if (out == DEBUG_EXIT)
            return PYKVM_RET_DEBUG_EXIT;
    }
}

uint32_t pykvm_loop_run(struct pykvm_loop *L)
{
    uint32_t ret = run_until_python(L);
    L->returns++;
    return L->txlen ? ret | PYKVM_RET_TX_PENDING : ret;
}
