/*
 * hello.S - hello16, hello32, hello32p, hello64, hello64u from one source.
 *
 * Computes Adler-32 of its own image (start = load address, length = the
 * linker's _image_size) before it writes anything, prints
 *     "Hello from <mode words>\n"  and  "checksum 0x%08x\n"
 * on COM1, and stops with the checksum in EAX/RAX: HLT at CPL 0, the
 * i8042 reset (0xFE to port 0x64) at CPL 3.
 *
 * Build: -DGUEST_MODE=MODE_REAL|MODE_PROTECTED|MODE_PAGED32|MODE_LONG|
 * MODE_LONG_USER (see Makefile).  The code is identical in every mode
 * except the operand size chosen by CODE_BITS; the host sets up the mode.
 */
#include "defs.inc"

    .intel_syntax noprefix
    CODE_BITS

    .section .text.start, "ax"
    .globl _start
_start:
    cld
    mov esi, offset _start          /* the image, as loaded */
    mov ecx, offset _image_size
    call adler32
    mov ebp, eax                    /* keep the checksum */

    mov esi, offset msg_hello
    call puts
    mov esi, offset msg_checksum
    call puts
    mov eax, ebp
    call puthex32
    mov esi, offset msg_newline
    call puts

    mov eax, ebp                    /* result (zero-extended in 64-bit) */
    STOP

#define LIB_PUTHEX32
#define LIB_ADLER32
#include "lib.inc"

    .section .rodata, "a"
msg_hello:
    .ascii "Hello from "
    .ascii MODE_WORDS
    .asciz "\n"
msg_checksum:
    .asciz "checksum 0x"
msg_newline:
    .asciz "\n"

    .section .note.GNU-stack, "", @progbits
