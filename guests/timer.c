/*
 * timer.c - time for the guests: the TSC's rate measured against PIT
 * channel 2 (Intel 8254 data sheet), then delays and deadlines in TSC
 * ticks.
 *
 * As Linux's pit_calibrate_tsc(): port 0x61 bit 0 opens channel 2's gate
 * (bit 1, the speaker, stays off), the channel counts down 50 ms once in
 * mode 0, and its OUT pin, read back as port 0x61 bit 5, rises at zero.
 * The TSC ticks in between give its rate.  Each try also bounds its own
 * error (the TSC brackets of the load and of the polls around the rise)
 * and is kept only if that is under 1/500 of the window; a vCPU preempted
 * at the wrong moment costs a retry, not a wrong rate.
 */
#include "pc.h"

#define PIT_HZ            1193182       /* the PIT's input clock */
#define PIT_CH2_DATA      0x42
#define PIT_COMMAND       0x43
#define PIT_CH2_ONE_SHOT  0xb0          /* channel 2, low then high byte, mode 0, binary */
#define PORT_61           0x61          /* NMI status and control */
#define PORT_61_GATE2     0x01
#define PORT_61_SPEAKER   0x02
#define PORT_61_OUT2      0x20
#define CALIBRATE_MS      50
#define CALIBRATE_COUNT   (PIT_HZ / 1000 * CALIBRATE_MS)  /* 59650 PIT ticks */
#define CALIBRATE_POLLS   1000000       /* a PIT that never fires: give up */
#define CALIBRATE_TRIES   8

uint32_t tsc_khz;

/* TSC ticks of one CALIBRATE_COUNT one-shot; *error = how far off that can
 * be.  Each port access is bracketed by TSC reads, because the moment the
 * platform samples the PIT lies somewhere inside it (a vCPU preempted in an
 * exit resumes long after the sample): the start lies in the bracket of the
 * write that loads the count, the rise between the first sample of the last
 * poll that saw OUT2 low and the end of the first that saw it high.  0 if
 * OUT2 was already high at the first poll (mode 0 drives it low from the
 * command on, so: no PIT, whose port 0x61 reads all-ones, or a vCPU
 * preempted for the whole window) or never rose. */
static uint64_t pit_one_shot(uint64_t *error, int *never)
{
    outb(PORT_61, (uint8_t)((inb(PORT_61) & ~PORT_61_SPEAKER) | PORT_61_GATE2));
    outb(PIT_COMMAND, PIT_CH2_ONE_SHOT);
    outb(PIT_CH2_DATA, CALIBRATE_COUNT & 0xff);
    uint64_t load_begin = rdtsc();
    outb(PIT_CH2_DATA, CALIBRATE_COUNT >> 8);   /* counting starts */
    uint64_t load_end = rdtsc(), low_begin = load_begin;
    for (uint32_t polls = 0; polls < CALIBRATE_POLLS; polls++) {
        uint64_t begin = rdtsc();
        int risen = inb(PORT_61) & PORT_61_OUT2;
        uint64_t end = rdtsc();
        if (risen) {
            *error = (load_end - load_begin) + (end - low_begin);
            return polls ? end - load_begin : 0;
        }
        low_begin = begin;
    }
    *never = 1;
    return 0;
}

uint32_t tsc_calibrate_khz(void)
{
    uint64_t best = 0, best_error = ~0ull;
    int never = 0;
    for (int try = 0; try < CALIBRATE_TRIES && !never; try++) {
        uint64_t error = 0, ticks = pit_one_shot(&error, &never);
        if (!ticks)
            continue;
        if (error < best_error) {
            best = ticks;
            best_error = error;
        }
        if (error * 500 < ticks)
            break;                      /* precise enough */
    }
    /* best ticks in CALIBRATE_COUNT / PIT_HZ seconds, in kHz (0: no PIT) */
    tsc_khz = (uint32_t)udiv64(best * PIT_HZ, CALIBRATE_COUNT * 1000u, NULL);
    return tsc_khz;
}

void delay_us(uint32_t us)
{
    uint64_t end = rdtsc() + udiv64((uint64_t)us * tsc_khz, 1000, NULL);
    while (rdtsc() < end)
        cpu_relax();
}

uint64_t deadline_ms(uint32_t ms)
{
    return rdtsc() + (uint64_t)ms * tsc_khz;
}
