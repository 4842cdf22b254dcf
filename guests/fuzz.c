/*
 * fuzz.c - fuzz64u: a hostile guest.  It hits every register of every
 * device the host listed with seeded random accesses, natively at CPL 3,
 * then proves it can still reach the debug-exit port.
 *
 * The host writes a plan at FUZZ_PLAN (pykvm/guests/__init__.py builds it):
 *
 *   u64 magic "PYKVFUZZ"; u64 seed; u64 count; u64 ntargets;
 *   u64 exit_port; u64 exit_value; u64 done; u64 answers (the last two
 *   written by the guest);
 *   then ntargets x { u32 kind (0 port, 1 MMIO); u32 flags (bit 0: may
 *   write, bit 1: may read); u64 base; u64 length; u64 value_min;
 *   u64 value_span (0: any value) }
 *
 * Each of ``count`` accesses picks a target, an offset inside it, a size
 * (1, 2 or 4 bytes for ports; 1, 2, 4 or 8 for MMIO) and a read or a write
 * of a random value (value_min + random % value_span when the span is set:
 * virtio address registers get addresses in a scratch area, so a device
 * never scribbles over this guest's own code and stack).  The generator is
 * xorshift64* from the seed: the same plan replays the same accesses.
 *
 * Results, in the plan: ``done`` = accesses made, ``answers`` = XOR of
 * every value read (what the devices answered); then a 1-byte write of
 * exit_value to exit_port ends the run (isa-debug-exit: status
 * (value << 1) | 1).  A bad plan stops at once with RAX = GUEST_FAIL(1)
 * through the i8042 reset.
 */
#include "guest.h"

#define FUZZ_PLAN 0x300000UL
#define FUZZ_MAGIC 0x5a5a5546564b5950UL /* "PYKVFUZZ" little-endian */
#define MAX_TARGETS 256

#define FLAG_WRITE 1
#define FLAG_READ 2

struct target {
    uint32_t kind;
    uint32_t flags;
    uint64_t base;
    uint64_t length;
    uint64_t value_min;
    uint64_t value_span;
};

struct plan {
    uint64_t magic;
    uint64_t seed;
    uint64_t count;
    uint64_t ntargets;
    uint64_t exit_port;
    uint64_t exit_value;
    uint64_t done;
    uint64_t answers;
    struct target targets[];
};

static uint64_t state;

static uint64_t next_random(void)
{
    state ^= state >> 12;
    state ^= state << 25;
    state ^= state >> 27;
    return state * 0x2545f4914f6cdd1dUL;
}

static uint64_t port_read(uint16_t port, unsigned size)
{
    if (size == 1)
        return inb(port);
    if (size == 2)
        return inw(port);
    uint32_t value;
    __asm__ __volatile__("inl %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}

static void port_write(uint16_t port, unsigned size, uint64_t value)
{
    if (size == 1)
        outb(port, (uint8_t)value);
    else if (size == 2)
        outw(port, (uint16_t)value);
    else
        outl(port, (uint32_t)value);
}

static uint64_t mem_read(uintptr_t addr, unsigned size)
{
    switch (size) {
    case 1: return *(volatile uint8_t *)addr;
    case 2: return *(volatile uint16_t *)addr;
    case 4: return *(volatile uint32_t *)addr;
    default: return *(volatile uint64_t *)addr;
    }
}

static void mem_write(uintptr_t addr, unsigned size, uint64_t value)
{
    switch (size) {
    case 1: *(volatile uint8_t *)addr = (uint8_t)value; break;
    case 2: *(volatile uint16_t *)addr = (uint16_t)value; break;
    case 4: *(volatile uint32_t *)addr = (uint32_t)value; break;
    default: *(volatile uint64_t *)addr = value; break;
    }
}

uint64_t guest_main(uint64_t arg0, uint64_t arg1)
{
    (void)arg0;
    (void)arg1;
    struct plan *plan = (struct plan *)FUZZ_PLAN;
    if (plan->magic != FUZZ_MAGIC || plan->ntargets == 0 || plan->ntargets > MAX_TARGETS)
        return GUEST_FAIL(1);
    state = plan->seed | 1;
    uint64_t answers = 0, done = 0;
    for (uint64_t i = 0; i < plan->count; i++) {
        const struct target *t = &plan->targets[next_random() % plan->ntargets];
        uint64_t r = next_random();
        unsigned size = 1u << (r % (t->kind ? 4 : 3));  /* ports: 1, 2, 4; MMIO: 1, 2, 4, 8 */
        if (size > t->length)
            size = 1;
        uint64_t offset = (r >> 8) % (t->length - size + 1);
        int write = (t->flags & FLAG_WRITE) && (!(t->flags & FLAG_READ) || (r >> 62) & 1);
        if (!(t->flags & (FLAG_WRITE | FLAG_READ)))
            continue;
        if (write) {
            uint64_t value = next_random();
            if (t->value_span)
                value = t->value_min + value % t->value_span;
            if (t->kind == 0)
                port_write((uint16_t)(t->base + offset), size, value);
            else
                mem_write(t->base + offset, size, value);
        } else {
            answers ^= t->kind == 0 ? port_read((uint16_t)(t->base + offset), size)
                                    : mem_read(t->base + offset, size);
        }
        done++;
    }
    plan->done = done;
    plan->answers = answers;
    outb((uint16_t)plan->exit_port, (uint8_t)plan->exit_value);
    return done;  /* not reached when exit_port is a debug-exit port */
}
