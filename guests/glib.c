/*
 * glib.c - the freestanding C guests' little library: COM1 output, the
 * libc routines gcc may call on its own (memset, memcpy, memcmp) and Adler-32
 * (those in libc.c, shared with the 32-bit runtime rt32.c).
 *
 * Output goes straight to COM1's THR without polling LSR, as the contract
 * allows (pykvm's 16550 transmits instantly).
 */
#include "guest.h"

uint64_t guest_aux[3];

void putc_com1(char c)
{
    outb(COM1, (uint8_t)c);
}

void puts_com1(const char *s)
{
    while (*s)
        putc_com1(*s++);
}

void puthex(uint64_t value)
{
    int shift = 60;
    while (shift > 0 && !(value >> shift & 0xf))
        shift -= 4;
    puts_com1("0x");
    for (; shift >= 0; shift -= 4)
        putc_com1("0123456789abcdef"[value >> shift & 0xf]);
}

void putdec(uint64_t value)
{
    char digits[24];
    int n = 0;
    do {
        digits[n++] = (char)('0' + value % 10);
        value /= 10;
    } while (value);
    while (n)
        putc_com1(digits[--n]);
}

#include "libc.c"
