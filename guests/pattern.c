/*
 * pattern.c - pattern64u: fills a buffer with a pattern, round after round, and checks every word of it
 * before it is overwritten, natively at CPL 3.  Written for live migration and snapshots: a page the
 * move lost or left stale is found at the next visit, wherever in the run the move happened.
 *
 * RDI = rounds (0 means 1000), RSI = MiB of buffer (0 means 8), at PATTERN_BASE (4 MiB).
 * Round r writes word i = mix(i, r) after checking that it still holds mix(i, r - 1) (round 0 finds
 * zeros), and prints "round r ok\n"; after the last round every word is checked once more and
 * "pattern: ok\n" is printed.  A word that does not hold what this guest wrote prints
 * "pattern: bad word at ADDR in round r\n" and stops with RAX = GUEST_FAIL(1).
 * Result RAX = rounds done, RBX = the buffer's size in bytes.  Nothing here reads a clock: the output
 * is the same on every run.
 */
#include "guest.h"

#define PATTERN_BASE 0x400000UL

static uint64_t mix(uint64_t i, uint64_t round)
{
    uint64_t x = (i + 1) * 0x9e3779b97f4a7c15UL ^ (round + 1) * 0xbf58476d1ce4e5b9UL;
    x ^= x >> 31;
    return x * 0x94d049bb133111ebUL;
}

static uint64_t bad(volatile uint64_t *word, uint64_t round)
{
    puts_com1("pattern: bad word at ");
    puthex((uint64_t)(uintptr_t)word);
    puts_com1(" in round ");
    putdec(round);
    putc_com1('\n');
    return GUEST_FAIL(1);
}

uint64_t guest_main(uint64_t rounds, uint64_t mib)
{
    if (!rounds)
        rounds = 1000;
    if (!mib)
        mib = 8;
    volatile uint64_t *buffer = (volatile uint64_t *)PATTERN_BASE;
    uint64_t words = mib << 17;
    guest_aux[0] = mib << 20;
    for (uint64_t r = 0; r < rounds; r++) {
        for (uint64_t i = 0; i < words; i++) {
            uint64_t expected = r ? mix(i, r - 1) : 0;
            if (buffer[i] != expected)
                return bad(&buffer[i], r);
            buffer[i] = mix(i, r);
        }
        puts_com1("round ");
        putdec(r);
        puts_com1(" ok\n");
    }
    for (uint64_t i = 0; i < words; i++)
        if (buffer[i] != mix(i, rounds - 1))
            return bad(&buffer[i], rounds);
    puts_com1("pattern: ok\n");
    return rounds;
}
