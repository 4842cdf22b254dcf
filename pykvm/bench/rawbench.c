/* rawbench.c - pykvm's raw-C reference: the physical limit of a KVM host.
 *
 * Uses nothing but <linux/kvm.h> and libc (no pykvm code).  It sets up the
 * same guests as pykvm (the contract's layout: GDT 0x1000, TSS 0x2000, page
 * tables 0x10000, stack 0x80000, image at 1 MiB, an identity map of 4 GiB
 * with 2 MiB pages) and loops KVM_RUN doing the least possible work per
 * exit.  Every result is one line of JSON on stdout.
 *
 *   rawbench exits MODE IMAGE VARIANT KIND N REPS
 *       MODE: protected | long | long_user
 *       VARIANT: plain | coalesced_pio | coalesced_mmio | ioeventfd_pio | ioeventfd_mmio
 *       KIND: the guest's kind number (0 empty .. 6 hlt)
 *       -> {"ns": [REPS wall times of the KVM_RUN loop], ...}
 *   rawbench lifecycle MODE IMAGE MEM_BYTES REPS
 *       open /dev/kvm, create VM, map MEM_BYTES, create vCPU (+ CPUID and
 *       mode setup), run to the end, close: ns per step for each rep.
 *   rawbench lifecycle-loop MODE IMAGE MEM_BYTES DURATION_NS
 *       one lifecycle as a warm-up, prints "ready", reads a CLOCK_MONOTONIC
 *       time in ns from stdin and waits for it (so several workers start
 *       together), then runs lifecycles back to back for at least
 *       DURATION_NS: {"count", "start_ns", "end_ns"}.
 *   rawbench rss PROGRAM [ARGS...]
 *       runs PROGRAM (stdout to /dev/null) and reports its exit status and
 *       peak RSS: {"status", "signal", "maxrss_kib"}.
 *   rawbench serve
 *       reads commands from stdin, one per line, answers one JSON line each:
 *         setup MODE IMAGE VARIANT   create a VM and load IMAGE
 *         run KIND N                 one timed run on it
 *         close                      destroy it
 *         lifecycle MODE IMAGE MEM_BYTES REPS
 *         quit
 *
 * The benchmark guests (pykvm/guests/bench.S): EDI = kind, ESI = N; kinds
 * 1 OUT 0x700, 2 IN 0x700, 3 MMIO write 0xe0000000, 4 MMIO read, 5 CPUID,
 * 6 HLT (N + 1 HLT exits, the last one ends the run).  CPL-0 guests end with
 * HLT, CPL-3 guests write 0xFE to port 0x64.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define GDT_ADDR 0x1000u
#define TSS_ADDR 0x2000u
#define IDT_ADDR 0x3000u
#define PT_ADDR 0x10000u
#define STACK_TOP 0x80000u
#define RSP0 0x6f000u
#define LOAD_ADDR 0x100000u
#define BENCH_PORT 0x700
#define BENCH_MMIO 0xe0000000ull
#define I8042_PORT 0x64
#define DEBUG_EXIT_PORT 0xf4
#define KIND_HLT 6
#define EXIT_MEM (64u << 20) /* guest RAM for exit benchmarks, as pykvm's Machine */
#define IOMAP_BYTES 0x800u   /* I/O permission bitmap for ports 0-0x3fff, as pykvm */
#define RUN_TIMEOUT_S 120

enum mode { PROTECTED, LONG, LONG_USER };
enum variant { PLAIN, COALESCED_PIO, COALESCED_MMIO, IOEVENTFD_PIO, IOEVENTFD_MMIO };

static const char *variant_names[] = {"plain", "coalesced_pio", "coalesced_mmio",
                                      "ioeventfd_pio", "ioeventfd_mmio"};

struct vm {
    int kvm, vm, vcpu, efd;
    enum mode mode;
    enum variant variant;
    uint8_t *mem;
    uint64_t mem_size;
    struct kvm_run *run;
    int run_size;
    struct kvm_coalesced_mmio_ring *ring;
    uint32_t ring_max;
};

static volatile sig_atomic_t timed_out;
static struct kvm_run *volatile alarm_run;
static char errbuf[256];

static void on_alarm(int sig)
{
    (void)sig;
    timed_out = 1;
    if (alarm_run)
        alarm_run->immediate_exit = 1;
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int fail(const char *what)
{
    snprintf(errbuf, sizeof errbuf, "%s: %s", what, strerror(errno));
    return -1;
}

static int parse_mode(const char *s, enum mode *m)
{
    if (!strcmp(s, "protected")) *m = PROTECTED;
    else if (!strcmp(s, "long")) *m = LONG;
    else if (!strcmp(s, "long_user")) *m = LONG_USER;
    else return -1;
    return 0;
}

static int parse_variant(const char *s, enum variant *v)
{
    for (int i = 0; i < 5; i++)
        if (!strcmp(s, variant_names[i])) {
            *v = (enum variant)i;
            return 0;
        }
    return -1;
}

/* ---- guest setup ------------------------------------------------------- */

static void put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

static void flat(struct kvm_segment *s, uint16_t sel, int code, int dpl, int l)
{
    memset(s, 0, sizeof *s);
    s->base = 0;
    s->limit = 0xffffffff;
    s->selector = sel;
    s->type = code ? 0xb : 0x3; /* accessed execute/read, accessed read/write */
    s->present = 1;
    s->dpl = (uint8_t)dpl;
    s->db = l ? 0 : 1;
    s->s = 1;
    s->l = (uint8_t)l;
    s->g = 1;
}

static uint64_t descriptor(int code, int dpl, int l)
{
    /* base 0, limit 0xfffff pages; P, S, type; G, D/B or L */
    uint64_t access = 0x90u | ((uint64_t)dpl << 5) | (code ? 0xbu : 0x3u);
    uint64_t flags = l ? 0xa : 0xc;
    return 0xffffull | (access << 40) | (0xfull << 48) | (flags << 52);
}

/* The GDT, TSS, page tables and registers of pykvm.x86.modes.setup_mode. */
static int setup_mode(struct vm *v, uint64_t rdi, uint64_t rsi)
{
    uint8_t *mem = v->mem;
    int is_long = v->mode != PROTECTED;
    int user = v->mode == LONG_USER;
    uint32_t tss_limit = 0x67;
    uint16_t sel_tss;
    struct kvm_sregs s;
    struct kvm_regs r;

    memset(mem + GDT_ADDR, 0, PAGE);
    memset(mem + TSS_ADDR, 0, PAGE);
    uint8_t *gdt = mem + GDT_ADDR;
    int n = 1;
    put64(gdt + 8 * n++, descriptor(1, 0, is_long));          /* 0x08 kernel code */
    put64(gdt + 8 * n++, descriptor(0, 0, 0));                /* 0x10 kernel data */
    if (user) {
        put64(gdt + 8 * n++, descriptor(0, 3, 0));            /* 0x18 user data */
        put64(gdt + 8 * n++, descriptor(1, 3, 1));            /* 0x20 user code */
    }
    uint8_t *tss = mem + TSS_ADDR;
    if (is_long) {
        uint64_t rsp0 = RSP0;
        memcpy(tss + 4, &rsp0, 8);
    } else {
        uint32_t esp0 = RSP0;
        uint16_t ss0 = 0x10;
        memcpy(tss + 4, &esp0, 4);
        memcpy(tss + 8, &ss0, 2);
    }
    uint16_t iomap = 0x68;
    if (user) {
        /* KVM on a pvm-nested host does not honour RFLAGS.IOPL=3 for CPL-3
         * port I/O: like pykvm, give the TSS an I/O bitmap allowing ports
         * 0-0x3fff (all bits 0), then its 0xff end byte inside the limit. */
        memset(tss + 0x68, 0, IOMAP_BYTES);
        tss[0x68 + IOMAP_BYTES] = 0xff;
        tss_limit = 0x68 + IOMAP_BYTES;
    }
    memcpy(tss + 102, &iomap, 2);
    sel_tss = (uint16_t)(8 * n);
    uint64_t tdesc = (tss_limit & 0xffffu) | ((uint64_t)(TSS_ADDR & 0xffffffu) << 16) |
                     ((uint64_t)(is_long ? 0x89 : 0x89) << 40) | ((uint64_t)((tss_limit >> 16) & 0xf) << 48) |
                     ((uint64_t)(TSS_ADDR >> 24) << 56);
    put64(gdt + 8 * n++, tdesc);
    if (is_long)
        put64(gdt + 8 * n++, 0); /* upper half of the 16-byte TSS descriptor */

    if (ioctl(v->vcpu, KVM_GET_SREGS, &s) < 0)
        return fail("KVM_GET_SREGS");
    s.gdt.base = GDT_ADDR;
    s.gdt.limit = (uint16_t)(8 * n - 1);
    s.idt.base = IDT_ADDR;
    s.idt.limit = 0;
    memset(&s.tr, 0, sizeof s.tr);
    s.tr.base = TSS_ADDR;
    s.tr.limit = tss_limit;
    s.tr.selector = sel_tss;
    s.tr.type = 11; /* busy TSS (32- or 64-bit) */
    s.tr.present = 1;
    memset(&s.ldt, 0, sizeof s.ldt);
    s.ldt.unusable = 1;
    if (user) {
        flat(&s.cs, 0x23, 1, 3, 1);
        flat(&s.ds, 0x1b, 0, 3, 0);
    } else {
        flat(&s.cs, 0x08, 1, 0, is_long);
        flat(&s.ds, 0x10, 0, 0, 0);
    }
    s.es = s.fs = s.gs = s.ss = s.ds;
    s.cr0 = 0x33;   /* PE MP ET NE */
    s.cr4 = 0x600;  /* OSFXSR OSXMMEXCPT */
    s.efer = 0;
    if (is_long) {
        uint64_t u = user ? 4 : 0; /* U/S at every level */
        uint8_t *pt = mem + PT_ADDR;
        memset(pt, 0, 6 * PAGE);
        put64(pt, (PT_ADDR + PAGE) | 3 | u);
        for (uint64_t i = 0; i < 4; i++) {
            put64(pt + PAGE + 8 * i, (PT_ADDR + (2 + i) * PAGE) | 3 | u);
            for (uint64_t j = 0; j < 512; j++)
                put64(pt + (2 + i) * PAGE + 8 * j, ((i * 512 + j) << 21) | 0x83 | u);
        }
        s.cr3 = PT_ADDR;
        s.cr0 |= 0x80010000u; /* PG WP */
        s.cr4 |= 0x20;        /* PAE */
        s.efer = 0x500;       /* LME LMA */
    }
    if (ioctl(v->vcpu, KVM_SET_SREGS, &s) < 0)
        return fail("KVM_SET_SREGS");
    memset(&r, 0, sizeof r);
    r.rip = LOAD_ADDR;
    r.rsp = STACK_TOP;
    r.rflags = user ? 0x3002 : 0x2;
    r.rdi = rdi;
    r.rsi = rsi;
    if (ioctl(v->vcpu, KVM_SET_REGS, &r) < 0)
        return fail("KVM_SET_REGS");
    return 0;
}

static int set_cpuid(struct vm *v)
{
    int nent = 256;
    for (;;) {
        size_t size = sizeof(struct kvm_cpuid2) + (size_t)nent * sizeof(struct kvm_cpuid_entry2);
        struct kvm_cpuid2 *c = calloc(1, size);
        if (!c)
            return fail("calloc");
        c->nent = (uint32_t)nent;
        if (ioctl(v->kvm, KVM_GET_SUPPORTED_CPUID, c) < 0) {
            free(c);
            if (errno == E2BIG && nent < 4096) {
                nent *= 2;
                continue;
            }
            return fail("KVM_GET_SUPPORTED_CPUID");
        }
        int rc = ioctl(v->vcpu, KVM_SET_CPUID2, c);
        free(c);
        return rc < 0 ? fail("KVM_SET_CPUID2") : 0;
    }
}

static int load_image(struct vm *v, const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return fail(path);
    size_t room = v->mem_size - LOAD_ADDR;
    size_t n = fread(v->mem + LOAD_ADDR, 1, room, f);
    int bad = ferror(f) || (n == room && fgetc(f) != EOF);
    fclose(f);
    if (bad || n == 0) {
        errno = EINVAL;
        return fail("image read");
    }
    return 0;
}

/* The lifecycle steps, each timed separately by lifecycle(). */
static int step_open(struct vm *v)
{
    memset(v, 0, sizeof *v);
    v->kvm = v->vm = v->vcpu = v->efd = -1;
    v->kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    return v->kvm < 0 ? fail("open /dev/kvm") : 0;
}

static int step_create_vm(struct vm *v)
{
    v->vm = ioctl(v->kvm, KVM_CREATE_VM, 0);
    return v->vm < 0 ? fail("KVM_CREATE_VM") : 0;
}

static int step_map_memory(struct vm *v, uint64_t size)
{
    v->mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (v->mem == MAP_FAILED) {
        v->mem = NULL;
        return fail("mmap guest memory");
    }
    v->mem_size = size;
    struct kvm_userspace_memory_region region = {
        .slot = 0, .flags = 0, .guest_phys_addr = 0, .memory_size = size,
        .userspace_addr = (uint64_t)(uintptr_t)v->mem,
    };
    return ioctl(v->vm, KVM_SET_USER_MEMORY_REGION, &region) < 0 ? fail("KVM_SET_USER_MEMORY_REGION") : 0;
}

static int step_create_vcpu(struct vm *v)
{
    v->vcpu = ioctl(v->vm, KVM_CREATE_VCPU, 0);
    if (v->vcpu < 0)
        return fail("KVM_CREATE_VCPU");
    v->run_size = ioctl(v->kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (v->run_size < 0)
        return fail("KVM_GET_VCPU_MMAP_SIZE");
    v->run = mmap(NULL, (size_t)v->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->vcpu, 0);
    if (v->run == MAP_FAILED) {
        v->run = NULL;
        return fail("mmap kvm_run");
    }
    return set_cpuid(v);
}

static void step_close(struct vm *v)
{
    if (v->run)
        munmap(v->run, (size_t)v->run_size);
    if (v->vcpu >= 0)
        close(v->vcpu);
    if (v->mem)
        munmap(v->mem, v->mem_size);
    if (v->efd >= 0)
        close(v->efd);
    if (v->vm >= 0)
        close(v->vm);
    if (v->kvm >= 0)
        close(v->kvm);
    v->run = NULL;
    v->mem = NULL;
    v->kvm = v->vm = v->vcpu = v->efd = -1;
}

static int add_variant(struct vm *v)
{
    struct kvm_coalesced_mmio_zone zone;
    struct kvm_ioeventfd io;

    switch (v->variant) {
    case PLAIN:
        return 0;
    case COALESCED_PIO:
    case COALESCED_MMIO:
        memset(&zone, 0, sizeof zone);
        zone.addr = v->variant == COALESCED_PIO ? BENCH_PORT : BENCH_MMIO;
        zone.size = v->variant == COALESCED_PIO ? 1 : 4;
        zone.pio = v->variant == COALESCED_PIO;
        if (ioctl(v->vm, KVM_REGISTER_COALESCED_MMIO, &zone) < 0)
            return fail("KVM_REGISTER_COALESCED_MMIO");
        v->ring = (struct kvm_coalesced_mmio_ring *)((uint8_t *)v->run + KVM_COALESCED_MMIO_PAGE_OFFSET * PAGE);
        v->ring_max = (PAGE - sizeof(struct kvm_coalesced_mmio_ring)) / sizeof(struct kvm_coalesced_mmio);
        return 0;
    case IOEVENTFD_PIO:
    case IOEVENTFD_MMIO:
        v->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (v->efd < 0)
            return fail("eventfd");
        memset(&io, 0, sizeof io);
        io.addr = v->variant == IOEVENTFD_PIO ? BENCH_PORT : BENCH_MMIO;
        io.len = v->variant == IOEVENTFD_PIO ? 1 : 4;
        io.fd = v->efd;
        io.flags = v->variant == IOEVENTFD_PIO ? KVM_IOEVENTFD_FLAG_PIO : 0;
        return ioctl(v->vm, KVM_IOEVENTFD, &io) < 0 ? fail("KVM_IOEVENTFD") : 0;
    }
    return 0;
}

/* Empty the coalesced ring; returns the entries taken. */
static uint64_t drain(struct vm *v)
{
    struct kvm_coalesced_mmio_ring *ring = v->ring;
    uint64_t n = 0;
    if (!ring)
        return 0;
    while (ring->first != ring->last) {
        ring->first = (ring->first + 1) % v->ring_max;
        n++;
    }
    return n;
}

struct outcome {
    uint64_t ns, io, mmio, hlt, coalesced, eventfd, rax;
    const char *end;
};

/* One timed run: KVM_RUN until the guest's final HLT or reset. */
static int run_guest(struct vm *v, int kind, uint64_t n, struct outcome *o)
{
    struct kvm_run *run = v->run;
    memset(o, 0, sizeof *o);
    o->end = "?";
    timed_out = 0;
    alarm_run = run;
    alarm(RUN_TIMEOUT_S);
    uint64_t t0 = now_ns();
    for (;;) {
        if (ioctl(v->vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR && !timed_out)
                continue;
            o->end = timed_out ? "timeout" : "error";
            break;
        }
        if (run->exit_reason == KVM_EXIT_IO) {
            uint8_t *data = (uint8_t *)run + run->io.data_offset;
            if (run->io.port == BENCH_PORT) {
                o->coalesced += drain(v);
                if (run->io.direction == KVM_EXIT_IO_IN)
                    memset(data, 0, (size_t)run->io.size * run->io.count);
                o->io++;
                continue;
            }
            if (run->io.direction == KVM_EXIT_IO_OUT &&
                ((run->io.port == I8042_PORT && data[0] == 0xfe) || run->io.port == DEBUG_EXIT_PORT)) {
                o->end = run->io.port == I8042_PORT ? "reset" : "debug-exit";
                break;
            }
            o->end = "unexpected-io";
            break;
        }
        if (run->exit_reason == KVM_EXIT_MMIO && run->mmio.phys_addr == BENCH_MMIO) {
            o->coalesced += drain(v);
            if (!run->mmio.is_write)
                memset(run->mmio.data, 0, sizeof run->mmio.data);
            o->mmio++;
            continue;
        }
        if (run->exit_reason == KVM_EXIT_HLT) {
            if (kind == KIND_HLT && o->hlt++ < n)
                continue;
            o->end = "hlt";
            break;
        }
        o->end = "unexpected-exit";
        break;
    }
    o->ns = now_ns() - t0;
    alarm(0);
    alarm_run = NULL;
    run->immediate_exit = 0;
    o->coalesced += drain(v);
    if (v->efd >= 0) {
        uint64_t count = 0;
        if (read(v->efd, &count, sizeof count) == sizeof count)
            o->eventfd = count;
    }
    struct kvm_regs r;
    if (ioctl(v->vcpu, KVM_GET_REGS, &r) == 0)
        o->rax = r.rax;
    return strcmp(o->end, "hlt") && strcmp(o->end, "reset") && strcmp(o->end, "debug-exit") ? -1 : 0;
}

static int vm_setup(struct vm *v, enum mode mode, const char *image, enum variant variant)
{
    if (step_open(v) || step_create_vm(v) || step_map_memory(v, EXIT_MEM) || step_create_vcpu(v))
        return -1;
    v->mode = mode;
    v->variant = variant;
    if (load_image(v, image) || add_variant(v))
        return -1;
    return 0;
}

static void print_outcome(const struct outcome *o, int kind, uint64_t n, int ok)
{
    printf("{\"ok\": %s, \"kind\": %d, \"n\": %llu, \"ns\": %llu, \"end\": \"%s\", \"rax\": %llu, "
           "\"io_exits\": %llu, \"mmio_exits\": %llu, \"hlt_exits\": %llu, \"coalesced\": %llu, "
           "\"eventfd\": %llu}\n",
           ok ? "true" : "false", kind, (unsigned long long)n, (unsigned long long)o->ns, o->end,
           (unsigned long long)o->rax, (unsigned long long)o->io, (unsigned long long)o->mmio,
           (unsigned long long)o->hlt, (unsigned long long)o->coalesced, (unsigned long long)o->eventfd);
}

static void print_error(void)
{
    printf("{\"ok\": false, \"error\": \"");
    for (const char *p = errbuf; *p; p++)
        putchar(*p == '"' || *p == '\\' ? '\'' : *p);
    printf("\"}\n");
}

static int cmd_exits(const char *mode_s, const char *image, const char *variant_s, int kind, uint64_t n, int reps)
{
    enum mode mode;
    enum variant variant;
    struct vm v;
    struct outcome o = {.end = "?"};
    if (parse_mode(mode_s, &mode) || parse_variant(variant_s, &variant)) {
        snprintf(errbuf, sizeof errbuf, "bad mode or variant");
        print_error();
        return 2;
    }
    if (vm_setup(&v, mode, image, variant)) {
        print_error();
        step_close(&v);
        return 1;
    }
    printf("{\"ok\": true, \"mode\": \"%s\", \"variant\": \"%s\", \"kind\": %d, \"n\": %llu, \"ns\": [",
           mode_s, variant_s, kind, (unsigned long long)n);
    int ok = 1;
    for (int i = 0; i < reps && ok; i++) {
        if (setup_mode(&v, (uint64_t)kind, n) || run_guest(&v, kind, n, &o))
            ok = 0;
        printf("%s%llu", i ? ", " : "", (unsigned long long)o.ns);
    }
    printf("], \"end\": \"%s\", \"rax\": %llu, \"complete\": %s}\n", o.end, (unsigned long long)o.rax,
           ok ? "true" : "false");
    step_close(&v);
    return ok ? 0 : 1;
}

/* One lifecycle with each step timed: ns[0..5] = open, create_vm,
 * map_memory, create_vcpu, run, close. */
static int lifecycle_once(enum mode mode, const char *image, uint64_t mem, uint64_t ns[6])
{
    struct vm v;
    struct outcome o;
    uint64_t t[7];
    int rc = -1;
    t[0] = now_ns();
    if (step_open(&v))
        goto out;
    t[1] = now_ns();
    if (step_create_vm(&v))
        goto out;
    t[2] = now_ns();
    if (step_map_memory(&v, mem))
        goto out;
    t[3] = now_ns();
    v.mode = mode;
    if (step_create_vcpu(&v) || load_image(&v, image) || setup_mode(&v, 0, 1))
        goto out;
    t[4] = now_ns();
    if (run_guest(&v, 0, 1, &o))
        goto out;
    t[5] = now_ns();
    rc = 0;
out:
    step_close(&v);
    t[6] = now_ns();
    if (rc == 0)
        for (int i = 0; i < 6; i++)
            ns[i] = t[i + 1] - t[i];
    return rc;
}

static int cmd_lifecycle(const char *mode_s, const char *image, uint64_t mem, int reps)
{
    static const char *steps[] = {"open", "create_vm", "map_memory", "create_vcpu", "run", "close"};
    enum mode mode;
    if (parse_mode(mode_s, &mode)) {
        snprintf(errbuf, sizeof errbuf, "bad mode");
        print_error();
        return 2;
    }
    uint64_t (*all)[6] = calloc((size_t)reps, sizeof *all);
    if (!all)
        return 1;
    for (int i = 0; i < reps; i++)
        if (lifecycle_once(mode, image, mem, all[i])) {
            print_error();
            free(all);
            return 1;
        }
    printf("{\"ok\": true, \"mem\": %llu, \"steps\": {", (unsigned long long)mem);
    for (int s = 0; s < 6; s++) {
        printf("%s\"%s\": [", s ? ", " : "", steps[s]);
        for (int i = 0; i < reps; i++)
            printf("%s%llu", i ? ", " : "", (unsigned long long)all[i][s]);
        printf("]");
    }
    printf("}}\n");
    free(all);
    return 0;
}

static int cmd_lifecycle_loop(const char *mode_s, const char *image, uint64_t mem, uint64_t duration)
{
    enum mode mode;
    uint64_t ns[6], count = 0, start, end;
    unsigned long long at_ns;
    if (parse_mode(mode_s, &mode))
        return 2;
    if (lifecycle_once(mode, image, mem, ns)) { /* warm-up, and a check */
        print_error();
        return 1;
    }
    printf("ready\n");
    fflush(stdout);
    if (scanf("%llu", &at_ns) != 1)
        return 2;
    struct timespec at = {.tv_sec = (time_t)(at_ns / 1000000000ull), .tv_nsec = (long)(at_ns % 1000000000ull)};
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &at, NULL) == EINTR)
        ;
    start = now_ns();
    do {
        if (lifecycle_once(mode, image, mem, ns)) {
            print_error();
            return 1;
        }
        count++;
        end = now_ns();
    } while (end - start < duration);
    printf("{\"ok\": true, \"count\": %llu, \"start_ns\": %llu, \"end_ns\": %llu}\n",
           (unsigned long long)count, (unsigned long long)start, (unsigned long long)end);
    return 0;
}

/* Run a program and report its peak RSS.  This small process forks it, so
 * the child's ru_maxrss starts from this process's size, not from that of a
 * large parent (Linux carries the high-water mark across fork and exec). */
static int cmd_rss(char **argv)
{
    pid_t pid = fork();
    if (pid < 0) {
        fail("fork");
        print_error();
        return 1;
    }
    if (pid == 0) {
        int null = open("/dev/null", O_RDWR);
        if (null >= 0) {
            dup2(null, 0);
            dup2(null, 1);
        }
        execvp(argv[0], argv);
        _exit(127);
    }
    int status;
    struct rusage ru;
    if (wait4(pid, &status, 0, &ru) < 0) {
        fail("wait4");
        print_error();
        return 1;
    }
    printf("{\"ok\": true, \"status\": %d, \"signal\": %d, \"maxrss_kib\": %ld}\n",
           WIFEXITED(status) ? WEXITSTATUS(status) : -1, WIFSIGNALED(status) ? WTERMSIG(status) : 0, ru.ru_maxrss);
    return 0;
}

static int cmd_serve(void)
{
    char line[4096], a[64], path[4000], c[64];
    struct vm v;
    int have_vm = 0;
    while (fgets(line, sizeof line, stdin)) {
        unsigned long long n, mem;
        int kind, reps;
        if (!strncmp(line, "quit", 4))
            break;
        if (sscanf(line, "setup %63s %3999s %63s", a, path, c) == 3) {
            enum mode mode;
            enum variant variant;
            if (have_vm)
                step_close(&v);
            have_vm = 0;
            if (parse_mode(a, &mode) || parse_variant(c, &variant)) {
                snprintf(errbuf, sizeof errbuf, "bad mode or variant");
                print_error();
            } else if (vm_setup(&v, mode, path, variant)) {
                print_error();
                step_close(&v);
            } else {
                have_vm = 1;
                printf("{\"ok\": true}\n");
            }
        } else if (sscanf(line, "run %d %llu", &kind, &n) == 2) {
            struct outcome o;
            if (!have_vm) {
                snprintf(errbuf, sizeof errbuf, "run before setup");
                print_error();
            } else if (setup_mode(&v, (uint64_t)kind, n)) {
                print_error();
            } else {
                int rc = run_guest(&v, kind, n, &o);
                print_outcome(&o, kind, n, rc == 0);
            }
        } else if (!strncmp(line, "close", 5)) {
            if (have_vm)
                step_close(&v);
            have_vm = 0;
            printf("{\"ok\": true}\n");
        } else if (sscanf(line, "lifecycle %63s %3999s %llu %d", a, path, &mem, &reps) == 4) {
            cmd_lifecycle(a, path, mem, reps);
        } else {
            snprintf(errbuf, sizeof errbuf, "unknown command");
            print_error();
        }
        fflush(stdout);
    }
    if (have_vm)
        step_close(&v);
    return 0;
}

int main(int argc, char **argv)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = on_alarm; /* no SA_RESTART: KVM_RUN returns EINTR */
    sigaction(SIGALRM, &sa, NULL);

    if (argc == 8 && !strcmp(argv[1], "exits"))
        return cmd_exits(argv[2], argv[3], argv[4], atoi(argv[5]), strtoull(argv[6], NULL, 0), atoi(argv[7]));
    if (argc == 6 && !strcmp(argv[1], "lifecycle"))
        return cmd_lifecycle(argv[2], argv[3], strtoull(argv[4], NULL, 0), atoi(argv[5]));
    if (argc == 6 && !strcmp(argv[1], "lifecycle-loop"))
        return cmd_lifecycle_loop(argv[2], argv[3], strtoull(argv[4], NULL, 0), strtoull(argv[5], NULL, 0));
    if (argc >= 3 && !strcmp(argv[1], "rss"))
        return cmd_rss(argv + 2);
    if (argc == 2 && !strcmp(argv[1], "serve"))
        return cmd_serve();
    fprintf(stderr,
            "usage: rawbench exits MODE IMAGE VARIANT KIND N REPS\n"
            "       rawbench lifecycle MODE IMAGE MEM_BYTES REPS\n"
            "       rawbench lifecycle-loop MODE IMAGE MEM_BYTES DURATION_NS\n"
            "       rawbench rss PROGRAM [ARGS...]\n"
            "       rawbench serve\n");
    return 2;
}
