/*
 * memtouch64u.S - write one quadword to every 4 KiB page of a range, natively at CPL 3.
 *
 * Arguments: RDI = the range's first address (rounded down to a page; 0 means
 * 0x200000), RSI = pages in bits 0-31 (0 means 256) and passes over the range
 * in bits 32-63 (0 means 1).  Each write stores the page's own address at its
 * start, so the pages of one guest all differ while two guests given the same
 * arguments hold the same bytes (what KSM merges across VMs), and the host can
 * check every page it was told about.  One access per page is also the
 * worst case for the TLB: a range larger than the TLB's reach misses on every
 * write (docs/labs/08-memory-backing.md).
 *
 * Uses no stack and no memory but the range: the pages it dirties are the
 * range's and the page-table entries the MMU marks accessed/dirty.
 * Result: RAX = writes made (pages x passes), then the i8042 reset.
 */
#include "defs.inc"

#if GUEST_MODE != MODE_LONG_USER
# error "memtouch64u is a long_user guest"
#endif

    .intel_syntax noprefix
    CODE_BITS

    .section .text.start, "ax"
    .globl _start
_start:
    mov r8, rdi                     /* first address */
    test r8, r8
    jnz 1f
    mov r8d, 0x200000
1:  and r8, -4096
    mov r9d, esi                    /* pages */
    test r9d, r9d
    jnz 2f
    mov r9d, 256
2:  mov rdx, rsi
    shr rdx, 32                     /* passes */
    jnz 3f
    mov edx, 1
3:  xor eax, eax                    /* writes made */
next_pass:
    mov rdi, r8
    mov rcx, r9
next_page:
    mov [rdi], rdi
    add rdi, 4096
    inc rax
    dec rcx
    jnz next_page
    dec rdx
    jnz next_pass
    STOP

    .section .note.GNU-stack, "", @progbits
