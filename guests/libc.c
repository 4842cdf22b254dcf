/*
 * libc.c - the routines gcc may call on its own even in freestanding code
 * (memset, memcpy, memcmp), strlen, Adler-32 and xorshift32, written once for both
 * guest runtimes.  Not compiled on its own: glib.c (64-bit, guest.h's
 * types) and rt32.c (32-bit, rt32.h's types) include it, so each gets it
 * built for its own mode; it needs uint8_t, uint32_t, uint64_t, uintptr_t
 * and size_t from the includer.
 */

/* The three routines gcc may emit calls to even in freestanding code.
 * Word-sized where both pointers allow it: at CPL 0 every instruction
 * counts. */
void *memset(void *dst, int c, size_t n)
{
    uint8_t *d = dst;
    if (((uintptr_t)d & 7) == 0) {
        uint64_t w = 0x0101010101010101UL * (uint8_t)c;
        for (; n >= 8; n -= 8, d += 8)
            *(uint64_t *)d = w;
    }
    while (n--)
        *d++ = (uint8_t)c;
    return dst;
}

void *memcpy(void *dst, const void *src, size_t n)
{
    uint8_t *d = dst;
    const uint8_t *s = src;
    if ((((uintptr_t)d | (uintptr_t)s) & 7) == 0)
        for (; n >= 8; n -= 8, d += 8, s += 8)
            *(uint64_t *)d = *(const uint64_t *)s;
    while (n--)
        *d++ = *s++;
    return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const uint8_t *x = a, *y = b;
    for (; n; n--, x++, y++)
        if (*x != *y)
            return *x < *y ? -1 : 1;
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

/* Adler-32 as zlib computes it: a = 1 + sum of bytes, b = sum of the a's,
 * both mod 65521.  The modulo is deferred for NMAX bytes, the most that
 * cannot overflow 32 bits (zlib's adler32.c). */
#define ADLER_MOD 65521U
#define ADLER_NMAX 5552

uint32_t adler32(uint32_t adler, const uint8_t *p, size_t n)
{
    uint32_t a = adler & 0xffff, b = adler >> 16;
    while (n) {
        size_t chunk = n < ADLER_NMAX ? n : ADLER_NMAX;
        n -= chunk;
        while (chunk--) {
            a += *p++;
            b += a;
        }
        a %= ADLER_MOD;
        b %= ADLER_MOD;
    }
    return b << 16 | a;
}

/* Marsaglia's xorshift32 (13, 17, 5): the next of a seeded sequence; state must not be 0. */
uint32_t xorshift32(uint32_t *state)
{
    uint32_t x = *state;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    return *state = x;
}
