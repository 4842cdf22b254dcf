/*
 * spin.S - spin16 (real), spin64 (long), spin64u (long_user): `jmp .`
 *
 * Never exits on its own: for timeout, signal and KVM_RUN-interruption
 * tests (immediate_exit, a signal, or pthread_kill from another thread).
 * spin16/spin64 run at CPL 0 (each iteration is emulated on the pykvm
 * development host, about 1 us); spin64u runs natively at CPL 3.
 */
#include "defs.inc"

    .intel_syntax noprefix
    CODE_BITS

    .section .text.start, "ax"
    .globl _start
_start:
    jmp _start

    .section .note.GNU-stack, "", @progbits
