/*
 * primes64u.S - count the primes below N, natively at CPL 3 (long_user).
 *
 * Argument: EDI = N (the low 32 bits of RDI; 0 means 100000).
 * Prints "primes below N: X\n" on COM1, leaves X in RAX and stops with the
 * i8042 reset.  Trial division by odd numbers up to sqrt(n): no memory is
 * used besides the stack, so the guest runs with any RAM size.
 * Reference values: 9592 primes below 100000, 78498 below 1000000.
 */
#include "defs.inc"

#if GUEST_MODE != MODE_LONG_USER
# error "primes64u is a long_user guest"
#endif

    .intel_syntax noprefix
    CODE_BITS

    .section .text.start, "ax"
    .globl _start
_start:
    cld
    mov r12d, edi                   /* N */
    test r12d, r12d
    jnz 1f
    mov r12d, 100000
1:  xor r13d, r13d                  /* X = number of primes found */
    cmp r12, 2
    jbe report                      /* no primes below 0, 1 or 2 */
    mov r13d, 1                     /* 2 */
    mov r14d, 3                     /* candidate n: odd numbers from 3 */
next_n:
    cmp r14, r12
    jae report
    mov ecx, 3                      /* trial divisor d */
try_d:
    mov rax, rcx
    imul rax, rcx
    cmp rax, r14
    ja is_prime                     /* d * d > n: no divisor found */
    mov eax, r14d
    xor edx, edx
    div ecx
    test edx, edx
    jz not_prime
    add ecx, 2
    jmp try_d
is_prime:
    inc r13d
not_prime:
    add r14, 2
    jmp next_n

report:
    mov esi, offset msg_below
    call puts
    mov eax, r12d
    call putdec32
    mov esi, offset msg_colon
    call puts
    mov eax, r13d
    call putdec32
    mov esi, offset msg_newline
    call puts
    mov eax, r13d                   /* result */
    STOP

#define LIB_PUTDEC32
#include "lib.inc"

    .section .rodata, "a"
msg_below:
    .asciz "primes below "
msg_colon:
    .asciz ": "
msg_newline:
    .asciz "\n"

    .section .note.GNU-stack, "", @progbits
