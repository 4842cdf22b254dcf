/*
 * uart_echo.S - a well-behaved 16550 driver (protected mode, CPL 0).
 *
 * Programs COM1 the way a real driver does: IER=0, LCR=0x80 (DLAB),
 * DLL=1, DLM=0 (115200 baud), LCR=0x03 (8N1), FCR=0xC7 (FIFOs on and
 * cleared, 14-byte trigger), MCR=0x0B (DTR, RTS, OUT2).  Prints
 * "uart ready\n", polling LSR.THRE (bit 5) before every byte, then echoes
 * every byte it receives (polling LSR.DR, bit 0) until it receives 0x04
 * (EOT, not echoed).  Prints "\nbye\n" and halts with EAX = the number of
 * bytes echoed.
 */
#include "defs.inc"

#if GUEST_MODE != MODE_PROTECTED
# error "uart_echo is a protected-mode guest"
#endif

#define EOT 0x04

    .intel_syntax noprefix
    CODE_BITS

    .section .text.start, "ax"
    .globl _start
_start:
    cld
    OUTB UART_IER, 0x00             /* no interrupts */
    OUTB UART_LCR, 0x80             /* DLAB=1: divisor latch visible */
    OUTB UART_DLL, 0x01             /* divisor 1 = 115200 baud */
    OUTB UART_DLM, 0x00
    OUTB UART_LCR, 0x03             /* DLAB=0, 8 data bits, no parity, 1 stop */
    OUTB UART_FCR, 0xc7             /* enable + clear FIFOs, trigger 14 */
    OUTB UART_MCR, 0x0b             /* DTR, RTS, OUT2 */

    mov esi, offset msg_ready
    call uart_puts

    xor ebx, ebx                    /* bytes echoed */
echo:
    mov dx, UART_LSR
1:  in al, dx
    test al, UART_LSR_DR
    jz 1b
    mov dx, UART_RBR
    in al, dx
    cmp al, EOT
    je bye
    call uart_putc
    inc ebx
    jmp echo

bye:
    mov esi, offset msg_bye
    call uart_puts
    mov eax, ebx                    /* result */
    STOP

#define LIB_UART_POLLED
#include "lib.inc"

    .section .rodata, "a"
msg_ready:
    .asciz "uart ready\n"
msg_bye:
    .asciz "\nbye\n"

    .section .note.GNU-stack, "", @progbits
