/*
 * guest.h - what the freestanding C guests share: port and MMIO access,
 * COM1 output, a few libc routines, Adler-32, the TSC, results.
 *
 * The C guests are built with -ffreestanding -nostdlib -mgeneral-regs-only
 * -mno-red-zone (see the Makefile): no libc, no SSE, nothing below the stack
 * pointer that an interrupt could overwrite.  crt64.S is the entry: it calls
 * guest_main(RDI, RSI) and stops with the i8042 reset, RAX = its return
 * value and RBX, RCX, RDI = guest_aux[0..2].
 *
 * GUEST_CPL (0 or 3) is set by the Makefile.  Code built for CPL 0 is
 * emulated instruction by instruction on kvm_pvm hosts: keep it short.
 */
#ifndef GUEST_H
#define GUEST_H

typedef unsigned char uint8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
typedef unsigned long uint64_t;
typedef long int64_t;
typedef unsigned long uintptr_t;
typedef unsigned long size_t;

#ifndef GUEST_CPL
# error "build with -DGUEST_CPL=0 or 3 (see guests/Makefile)"
#endif

/* --- the contract (defs.inc, pykvm/x86/layout.py) ----------------------- */
#define COM1            0x3f8
#define UART_LSR        (COM1 + 5)
#define UART_LSR_DR     0x01
#define VIRTIO_MMIO_BASE 0xd0000000UL

/* A failure code in RAX: the high half all-ones, the step in the low half. */
#define GUEST_FAIL(code) (0xffffffff00000000UL | (uint64_t)(code))

/* --- compiler and CPU ------------------------------------------------------ */
/* On x86, loads are ordered with loads and stores with stores, so the
 * virtqueue protocol needs only compiler barriers, except store -> load. */
#define barrier() __asm__ __volatile__("" ::: "memory")
#define mb() __asm__ __volatile__("lock; addl $0, (%%rsp)" ::: "memory", "cc")

#include "x86io.h"

/* --- results (crt64.S loads them into RBX, RCX, RDI at the end) ----------- */
extern uint64_t guest_aux[3];

/* --- glib.c ------------------------------------------------------------------ */
void putc_com1(char c);
void puts_com1(const char *s);
void puthex(uint64_t value);
void putdec(uint64_t value);
void *memset(void *dst, int c, size_t n);
void *memcpy(void *dst, const void *src, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
/* Adler-32 (zlib.adler32): continue from ``adler`` (1 to start) over n bytes. */
uint32_t adler32(uint32_t adler, const uint8_t *p, size_t n);
/* xorshift32: the next number of the sequence *state holds (not 0); libc.c. */
uint32_t xorshift32(uint32_t *state);

uint64_t guest_main(uint64_t arg0, uint64_t arg1);

#endif
