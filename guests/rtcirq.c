/*
 * rtcirq.c - guest_main of `rtcirq`: the RTC's periodic interrupt, IRQ 8,
 * taken through the 8259s while the CPU sleeps in hlt.
 *
 * It programs the PICs as a protected-mode kernel does (ICW1-ICW4: master
 * vectors 0x20-0x27, slave 0x28-0x2f; only the cascade and IRQ 8
 * unmasked), sets register A's rate to 6 (1024 Hz) and PIE in register B,
 * and then waits for `count=N` interrupts (default 64) in `sti; hlt`, each
 * acknowledged by reading register C (PF must be set, but for the first)
 * and an EOI to both
 * PICs.  Nothing but the interrupt wakes the CPU: a platform whose RTC
 * raises IRQ 8 only when the guest touches it never gets one (code 4
 * after a TSC deadline of 10 s).  It prints the count and the rate it saw.
 */
#include "pc.h"

#define DEFAULT_COUNT   64
#define MAX_COUNT       100000
#define DEADLINE_MS     10000
#define IRQ8_VECTOR     0x28
#define RTC_REG_A       0x0a
#define RTC_REG_B       0x0b
#define RTC_REG_C       0x0c
#define RTC_A_RATE_1024 0x26        /* divider 010 (32.768 kHz), rate 6 */
#define RTC_B_PIE       0x40
#define RTC_C_PF        0x40

static void cmos_write(uint8_t reg, uint8_t value)
{
    outb(0x70, reg);
    outb(0x71, value);
}

int guest_main(const struct multiboot_info *mbi)
{
    uint32_t count = DEFAULT_COUNT;
    if (cmdline_u32(mb_cmdline(mbi), "count", &count) && (count < 1 || count > MAX_COUNT))
        return fail(EXIT_FAIL, "count=%u: give 1 to %u", count, MAX_COUNT);
    print("count: %u\n", count);
    if (!tsc_calibrate_khz())
        return fail(EXIT_MISSING, "PIT channel 2 never counted down: no TSC rate");
    print("tsc_khz: %u\n", tsc_khz);
    pic_remap(0x20, 0x28, 0xfb, 0xfe);      /* vectors 0x20 and 0x28; only IRQ 2 (cascade) and IRQ 8 */
    cmos_write(RTC_REG_A, RTC_A_RATE_1024);
    outb(0x70, RTC_REG_B);
    uint8_t b = inb(0x71);
    cmos_write(RTC_REG_B, b | RTC_B_PIE);
    (void)cmos_read(RTC_REG_C);

    uint32_t seen = 0, others = 0, without_pf = 0;
    uint64_t deadline = deadline_ms(DEADLINE_MS), start = rdtsc();
    while (seen < count && !past(deadline)) {
        uint32_t vector = wait_for_interrupt();
        if (vector != IRQ8_VECTOR) {
            others++;
            continue;
        }
        /* The first may be an edge the PIC latched before the C read above cleared PF */
        if (!(cmos_read(RTC_REG_C) & RTC_C_PF) && seen > 0)
            without_pf++;
        outb(0xa0, 0x20);                   /* EOI: slave, then master */
        outb(0x20, 0x20);
        seen++;
    }
    uint64_t cycles = rdtsc() - start;
    cmos_write(RTC_REG_B, b);               /* PIE off again */
    print("rtc_irqs: %u\n", seen);
    print("rtc_irqs_without_pf: %u\n", without_pf);
    print("other_interrupts: %u\n", others);
    uint32_t ms = (uint32_t)udiv64(cycles, tsc_khz, NULL);
    print("elapsed_ms: %u\n", ms);
    print("rtc_irq_hz: %u\n", ms ? (uint32_t)udiv64((uint64_t)seen * 1000u, ms, NULL) : 0u);
    if (seen < count)
        return fail(EXIT_TIMEOUT, "%u of %u RTC interrupts in %u ms", seen, count, DEADLINE_MS);
    if (without_pf)
        return fail(EXIT_FAIL, "%u interrupts without PF in register C", without_pf);
    return done_ok();
}
