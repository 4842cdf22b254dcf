/*
 * triple64.S - a guest that crashes on purpose (long mode, CPL 0).
 *
 * Executes UD2.  With the contract's empty IDT (limit 0) the #UD cannot be
 * delivered: #GP, then #DF, then a triple fault, which KVM reports as
 * KVM_EXIT_SHUTDOWN.  For tests of how pykvm reports a dead guest.
 */
#include "defs.inc"

    .intel_syntax noprefix
    CODE_BITS

    .section .text.start, "ax"
    .globl _start
_start:
    ud2
    jmp _start

    .section .note.GNU-stack, "", @progbits
