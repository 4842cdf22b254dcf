/*
 * rt32.h - the 32-bit runtime of the Multiboot PC guests (mbinfo, smp,
 * pcprobe, acpiscan, ipiping): constants shared with the assembly files,
 * and for C the types, port and MMIO access, the CPU helpers, the
 * Multiboot v1 information structure (Multiboot Specification 0.6.96,
 * section 3.3) and the runtime's API (rt32.c).
 *
 * The guests are freestanding C built with -m32 -ffreestanding -nostdlib
 * -mgeneral-regs-only and no libgcc (see the Makefile), so there is no
 * 64-bit division: divide with udiv64() below.  They run in 32-bit
 * protected mode, paging off, flat segments, at CPL 0; on kvm_pvm hosts
 * every instruction is emulated (about 1 us each): keep loops short.
 *
 * Output: lines `key: value` on COM1 (a polled 16550), first `guest: NAME`,
 * last `done: ok` or `done: fail <why>`; then the status goes to QEMU's
 * isa-debug-exit (port 0xf4, a 4-byte outl): EXIT_* below.
 */
#ifndef RT32_H
#define RT32_H

/* --- Multiboot v1 (3.1.1 header, 3.2 machine state) ------------------------ */
#define MB_HEADER_MAGIC     0x1BADB002
#define MB_HEADER_FLAGS     0x00000003  /* bit 0 page-aligned modules, bit 1 memory info */
#define MB_LOADER_MAGIC     0x2BADB002  /* EAX at entry */

/* --- our GDT (crt32.S): null, flat code, flat data ----------------------- */
#define CODE_SEL            0x08
#define DATA_SEL            0x10
#define GDT_LIMIT           (3 * 8 - 1)

/* --- the IDT (crt32.S): 64 vectors, 0-31 exceptions ---------------------- */
#define IDT_VECTORS         64
#define ISR_STUB_SIZE       16          /* vector v's entry stub: isr_stubs + 16 * v */

/* --- the AP start-up page (smp.c, trampoline.S) --------------------------- */
#define TRAMPOLINE_ADDR     0x8000      /* SIPI vector 0x08; below 1 MiB, not page 0 */
#define AP_MAX              31          /* APs with a stack (32 CPUs in all) */
#define AP_STACK_SIZE       2048

/* --- ports ----------------------------------------------------------------- */
#define COM1                0x3f8
#define DEBUG_EXIT_PORT     0xf4        /* QEMU: -device isa-debug-exit,iobase=0xf4,iosize=0x04 */

/* --- isa-debug-exit values (QEMU exits with status value * 2 + 1) ---------- */
#define EXIT_OK             0           /* every check passed: `done: ok` */
#define EXIT_FAIL           1           /* a check failed: `done: fail <why>` */
#define EXIT_NOT_MULTIBOOT  2           /* EAX was not 0x2BADB002 at entry */
#define EXIT_MISSING        3           /* the platform lacks what the guest needs */
#define EXIT_TIMEOUT        4           /* a bounded wait ran out */
#define EXIT_EXCEPTION      5           /* an unexpected CPU exception or interrupt */

#ifndef __ASSEMBLER__

typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long long uint64_t;
typedef int int32_t;
typedef __UINTPTR_TYPE__ uintptr_t;
typedef __SIZE_TYPE__ size_t;

#define NULL ((void *)0)
#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))

/* --- ports, MMIO, TSC, MSRs, PAUSE ------------------------------------------------ */
#include "x86io.h"

/* --- the CPU --------------------------------------------------------------------- */
#define barrier() __asm__ __volatile__("" ::: "memory")

/* Atomically add ``value`` to ``*p`` (lock xadd); returns the old value. */
static inline uint32_t atomic_fetch_add(volatile uint32_t *p, uint32_t value)
{
    __asm__ __volatile__("lock xaddl %0, %1" : "+r"(value), "+m"(*p) : : "memory", "cc");
    return value;
}

static inline void atomic_inc(volatile uint32_t *p)
{
    __asm__ __volatile__("lock incl %0" : "+m"(*p) : : "memory", "cc");
}

/* A pointer to physical address addr (paging is off).  Hidden from the
 * optimiser, which takes small constant addresses for null-pointer offsets. */
static inline void *phys(uintptr_t addr)
{
    __asm__("" : "+r"(addr));
    return (void *)addr;
}

/* Interrupts off, then HLT for ever (a resumed HLT halts again). */
static inline __attribute__((noreturn)) void halt_forever(void)
{
    for (;;)
        __asm__ __volatile__("cli; hlt" ::: "memory");
}

/* fw_cfg's big-endian fields. */
static inline uint32_t be32(uint32_t v)
{
    return __builtin_bswap32(v);
}

static inline uint16_t be16(uint16_t v)
{
    return (uint16_t)(v >> 8 | v << 8);
}

/* --- Multiboot information (3.3) ------------------------------------------------- */
#define MBI_MEMORY      (1u << 0)
#define MBI_BOOT_DEVICE (1u << 1)
#define MBI_CMDLINE     (1u << 2)
#define MBI_MODS        (1u << 3)
#define MBI_MMAP        (1u << 6)
#define MBI_LOADER_NAME (1u << 9)

struct multiboot_info {
    uint32_t flags;
    uint32_t mem_lower, mem_upper;      /* KiB at 0 and at 1 MiB */
    uint32_t boot_device;
    uint32_t cmdline;
    uint32_t mods_count, mods_addr;
    uint32_t syms[4];
    uint32_t mmap_length, mmap_addr;
    uint32_t drives_length, drives_addr;
    uint32_t config_table;
    uint32_t boot_loader_name;
    uint32_t apm_table;
};                                      /* 72 bytes: through apm_table (flags bit 10) */

struct multiboot_module {
    uint32_t mod_start, mod_end;        /* [start, end) */
    uint32_t string;
    uint32_t reserved;
};

struct multiboot_mmap_entry {
    uint32_t size;                      /* of what follows; the next entry is size + 4 on */
    uint64_t base_addr, length;
    uint32_t type;                      /* 1 available RAM, 3 ACPI, 4 preserve, 5 bad */
} __attribute__((packed));

/* The command line (flags bit 2), or "" without one. */
const char *mb_cmdline(const struct multiboot_info *mbi);

/* --- linker symbols (multiboot.ld) -------------------------------------------- */
extern char _kernel_start[], _kernel_end[];   /* the image and its .bss */

/* --- output: COM1, polled (rt32.c) --------------------------------------------- */
void put_char(char c);
void put_str(const char *s);
/* s as printable ASCII: bytes outside 0x20-0x7e and '\' as \xNN; at most max bytes. */
void put_escaped(const char *s, uint32_t max);
/* printf subset: %s %c %d %u %x %llu %llx %%, with a width and '0' padding. */
void print(const char *fmt, ...) __attribute__((format(printf, 1, 2)));

/* The last line, `done: ok` or `done: fail <why>`; returns the status. */
int done_ok(void);
int fail(int status, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

/* --- small library ---------------------------------------------------------------- */
void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
/* strlen bounded by max (for strings a loader gives). */
size_t strnlen(const char *s, size_t max);
/* Adler-32 (zlib.adler32): continue from ``adler`` (1 to start) over n bytes. */
uint32_t adler32(uint32_t adler, const uint8_t *p, size_t n);
/* xorshift32: the next number of the sequence *state holds (not 0); libc.c. */
uint32_t xorshift32(uint32_t *state);
/* n / d, and n % d in *rem (if not NULL): the 64-bit division without libgcc. */
uint64_t udiv64(uint64_t n, uint32_t d, uint32_t *rem);
/* The value of `key=NUMBER` (decimal or 0x hex) among the words of cmdline. */
int cmdline_u32(const char *cmdline, const char *key, uint32_t *value);
/* Sort n values in place (insertion sort: n is small). */
void sort_u32(uint32_t *v, uint32_t n);

/* --- interrupts (crt32.S) -------------------------------------------------------- */
void idt_load(void);                    /* lidt our IDT (each CPU once) */
/* Sleep with interrupts enabled until one arrives; return its vector, IF = 0.
 * The handler does not IRET (see crt32.S): call with interrupts off. */
uint32_t wait_for_interrupt(void);
/* Initialise both 8259s as a protected-mode kernel does (ICW1-ICW4: edge-triggered, cascaded on IRQ 2,
 * 8086 mode), the master's vectors from master_base and the slave's from slave_base, then set their
 * masks (a set bit masks the line); rt32.c. */
void pic_remap(uint8_t master_base, uint8_t slave_base, uint8_t master_mask, uint8_t slave_mask);

/* --- the ending --------------------------------------------------------------------- */
/* Write status to isa-debug-exit, then halt for ever. */
void __attribute__((noreturn)) debug_exit(uint32_t status);

/* Each guest's entry: print the findings, return an EXIT_* value. */
int guest_main(const struct multiboot_info *mbi);

#endif /* __ASSEMBLER__ */
#endif /* RT32_H */
