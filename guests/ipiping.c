/*
 * ipiping.c - guest_main of `ipiping`: two CPUs play ping-pong with fixed
 * IPIs and the BSP times the round trips with the TSC.
 *
 * The BSP starts the APs (smp.c); the first to report in answers, the
 * others halt, or, with `spin=1` on the command line, spin in a PAUSE loop
 * with interrupts off for ever: with more vCPUs than host cores that makes
 * the two players compete for the cores (overcommit).  The BSP waits until
 * every other AP spins before it starts timing.  Each round: the BSP sends PING_VECTOR to the AP and sleeps
 * in wait_for_interrupt(); the AP, asleep there too, wakes with the
 * interrupt, signals EOI and sends PING_VECTOR back; the BSP wakes and
 * signals EOI.  N rounds (the `iterations=` word of the command line,
 * default 1000) after WARMUP untimed ones.
 *
 * Why interrupts with handlers that never IRET (crt32.S): on kvm_pvm hosts
 * the instruction emulator that runs CPL-0 code cannot execute IRET in
 * protected mode, and polling the IRR with interrupts masked does not work
 * either: an interrupt the CPU never accepts stays in the IRR, so the
 * second IPI of the same vector would be lost in the first.  Accepting the
 * interrupt in `sti; hlt` and dropping its frame works on both QEMU and
 * there, and measures what an OS's IPI costs: send, deliver, wake, EOI.
 *
 * A watchdog, the BSP's local APIC timer (one-shot, divide by 1, the
 * largest count: 4.3 s on KVM's 1 GHz APIC clock), is re-armed every
 * REARM_ROUNDS rounds; if it fires, an IPI got lost.
 */
#include "pc.h"

#define PING_VECTOR        0x30
#define WATCHDOG_VECTOR    0x3e
#define SPURIOUS_VECTOR    0x3f
#define DEFAULT_ITERATIONS 1000
#define MAX_ITERATIONS     10000000
#define WARMUP             16
#define REARM_ROUNDS       64
#define AP_TIMEOUT_MS      5000
#define TIMER_DIVIDE_BY_1  0x0b
#define PIC_MASTER_DATA    0x21
#define PIC_SLAVE_DATA     0xa1

static volatile uint32_t bsp_apic_id, pong_apic_id, pong_ready, pongs, ap_other_interrupts;
static volatile uint32_t spin_others, spinning;

/* On the first AP: answer every ping, for ever.  The others return (halt) or spin. */
static void pong(uint32_t index, uint32_t apic_id)
{
    if (index != 0) {
        if (!spin_others)
            return;
        atomic_inc(&spinning);
        for (;;)
            cpu_relax();
    }
    idt_load();
    lapic_enable(SPURIOUS_VECTOR);
    pong_apic_id = apic_id;
    barrier();
    pong_ready = 1;
    for (;;) {
        uint32_t vector = wait_for_interrupt();
        if (vector == SPURIOUS_VECTOR)
            continue;                   /* a spurious interrupt takes no EOI */
        lapic_eoi();
        if (vector != PING_VECTOR) {
            ap_other_interrupts++;
            continue;
        }
        pongs++;
        lapic_send_ipi(bsp_apic_id, ICR_ASSERT | ICR_FIXED | PING_VECTOR);
    }
}

static uint32_t bsp_other_interrupts;

/* One ping and its pong: 0, or -1 if the watchdog fired first. */
static int round_trip(uint32_t ap)
{
    lapic_send_ipi(ap, ICR_ASSERT | ICR_FIXED | PING_VECTOR);
    for (;;) {
        uint32_t vector = wait_for_interrupt();
        if (vector == SPURIOUS_VECTOR)
            continue;
        lapic_eoi();
        if (vector == PING_VECTOR)
            return 0;
        if (vector == WATCHDOG_VECTOR)
            return -1;
        bsp_other_interrupts++;
    }
}

static void watchdog(uint32_t count)
{
    lapic_write(LAPIC_TIMER_INITIAL, count);    /* (re)starts it; 0 stops it */
}

int guest_main(const struct multiboot_info *mbi)
{
    uint32_t iterations = DEFAULT_ITERATIONS;
    const char *cmdline = mb_cmdline(mbi), *source;
    if (cmdline_u32(cmdline, "iterations", &iterations) && (iterations < 1 || iterations > MAX_ITERATIONS))
        return fail(EXIT_FAIL, "iterations=%u: give 1 to %u", iterations, MAX_ITERATIONS);
    uint32_t spin = 0;
    if (cmdline_u32(cmdline, "spin", &spin) && spin > 1)
        return fail(EXIT_FAIL, "spin=%u: give 0 (the other APs halt) or 1 (they spin)", spin);
    spin_others = spin;
    print("iterations: %u\n", iterations);
    uint32_t cpus = platform_cpu_count(&source);
    print("cpus: %u\n", cpus);
    if (cpus < 2)
        return fail(EXIT_MISSING, "needs 2 CPUs, the platform has %u (%s)", cpus, source);

    outb(PIC_MASTER_DATA, 0xff);        /* the 8259s stay quiet: only IPIs wake us */
    outb(PIC_SLAVE_DATA, 0xff);
    bsp_apic_id = lapic_id();
    lapic_enable(SPURIOUS_VECTOR);
    print("bsp_apic_id: %u\n", bsp_apic_id);
    if (!tsc_calibrate_khz())
        return fail(EXIT_MISSING, "PIT channel 2 never counted down: no TSC rate");
    print("tsc_khz: %u\n", tsc_khz);

    static struct smp_result started;
    int status = smp_start_aps(cpus - 1, pong, AP_TIMEOUT_MS, &started);
    if (status != EXIT_OK)
        return fail(status, "%u of %u APs reported in", started.started, cpus - 1);
    uint64_t deadline = deadline_ms(AP_TIMEOUT_MS);
    while (!pong_ready && !past(deadline))
        cpu_relax();
    if (!pong_ready)
        return fail(EXIT_TIMEOUT, "the AP did not get ready to answer");
    while (spinning < (spin_others ? cpus - 2 : 0) && !past(deadline))
        cpu_relax();
    if (spinning < (spin_others ? cpus - 2 : 0))
        return fail(EXIT_TIMEOUT, "%u of %u other APs started spinning", spinning, cpus - 2);
    uint32_t ap = pong_apic_id;
    print("ap_apic_id: %u\n", ap);
    print("spinning_aps: %u\n", spinning);
    print("vector: 0x%x\n", PING_VECTOR);

    lapic_write(LAPIC_TIMER_DIVIDE, TIMER_DIVIDE_BY_1);
    lapic_write(LAPIC_LVT_TIMER, WATCHDOG_VECTOR);  /* one-shot, unmasked */
    watchdog(0xffffffff);
    for (uint32_t i = 0; i < WARMUP; i++)
        if (round_trip(ap))
            return fail(EXIT_TIMEOUT, "warm-up round %u: no answer before the watchdog", i);
    uint64_t start = rdtsc();
    for (uint32_t i = 0; i < iterations; i++) {
        if (!(i % REARM_ROUNDS))
            watchdog(0xffffffff);
        if (round_trip(ap)) {
            watchdog(0);
            return fail(EXIT_TIMEOUT, "round %u: no answer before the watchdog", i);
        }
    }
    uint64_t cycles = rdtsc() - start;
    watchdog(0);

    uint64_t per_round = udiv64(cycles, iterations, NULL);
    print("round_trips: %u\n", pongs - WARMUP);
    print("tsc_cycles: %llu\n", cycles);
    print("cycles_per_round_trip: %llu\n", per_round);
    print("ns_per_round_trip: %llu\n", udiv64(per_round * 1000000, tsc_khz, NULL));
    print("other_interrupts: %u\n", bsp_other_interrupts + ap_other_interrupts);
    if (pongs != WARMUP + iterations)
        return fail(EXIT_FAIL, "the AP answered %u pings, %u were sent", pongs, WARMUP + iterations);
    return done_ok();
}
