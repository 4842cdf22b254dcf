/*
 * uart_irq.S - an interrupt-driven 16550 driver (real mode).
 *
 * Real mode because it must run everywhere: KVM's instruction emulator
 * implements IRET only in real mode (arch/x86/kvm/emulate.c, em_iret), and
 * on hosts where ring-0 code is emulated (kvm_pvm) a protected-mode handler
 * could never return.
 *
 * Needs the in-kernel irqchip (Machine(irqchip=True)).  Sets up its own
 * interrupt table (the real-mode IDT, i.e. the IVT at 0, vectors 0-47:
 * IDTR loaded explicitly), remaps the 8259 PIC pair to vectors 0x20-0x2f with
 * only IRQ 4 (COM1) unmasked, programs the UART like uart_echo and enables
 * its "received data available" interrupt (IER bit 0) with OUT2 set (on a
 * PC, OUT2 gates the UART's interrupt line).  Prints "irq ready\n", then
 * sleeps in HLT.  The interrupt handler moves every received byte into a
 * ring buffer and sends the PIC an EOI; the main loop echoes the ring
 * until it sees 0x04 (EOT), prints "\nbye\n" and stops with the i8042
 * reset: EAX = bytes echoed, EDI = interrupts taken.  An unexpected
 * exception prints "fault" and stops with EAX = 0xffffffff.
 */
#include "defs.inc"

#if GUEST_MODE != MODE_REAL
# error "uart_irq is a real-mode guest"
#endif

#define EOT          0x04
#define PIC1_CMD     0x20
#define PIC1_DATA    0x21
#define PIC2_CMD     0xa0
#define PIC2_DATA    0xa1
#define PIC_EOI      0x20
#define IRQ_BASE     0x20
#define COM1_VECTOR  (IRQ_BASE + 4)
#define NR_VECTORS   48

    .intel_syntax noprefix
    CODE_BITS

    .section .text.start, "ax"
    .globl _start
_start:
    cld
    xor ax, ax
    mov ds, ax
    mov es, ax
    /* Interrupt table: exceptions -> fault, PIC vectors -> spurious, 0x24 -> COM1. */
    xor ecx, ecx
1:  mov ax, offset fault
    cmp cx, IRQ_BASE
    jb 2f
    mov ax, offset spurious
    cmp cx, COM1_VECTOR
    jne 2f
    mov ax, offset com1_isr
2:  call set_vector
    inc cx
    cmp cx, NR_VECTORS
    jb 1b
    lidt [idtr]

    /* 8259 initialisation words: ICW1 edge+ICW4, ICW2 vector base,
     * ICW3 cascade on IRQ 2, ICW4 8086 mode; then the masks (OCW1). */
    OUTB PIC1_CMD, 0x11
    OUTB PIC2_CMD, 0x11
    OUTB PIC1_DATA, IRQ_BASE
    OUTB PIC2_DATA, IRQ_BASE + 8
    OUTB PIC1_DATA, 0x04
    OUTB PIC2_DATA, 0x02
    OUTB PIC1_DATA, 0x01
    OUTB PIC2_DATA, 0x01
    OUTB PIC1_DATA, 0xef            /* only IRQ 4 */
    OUTB PIC2_DATA, 0xff

    OUTB UART_IER, 0x00
    OUTB UART_LCR, 0x80             /* DLAB */
    OUTB UART_DLL, 0x01
    OUTB UART_DLM, 0x00
    OUTB UART_LCR, 0x03             /* 8N1 */
    OUTB UART_FCR, 0xc7             /* FIFOs on and cleared, trigger 14 */
    OUTB UART_MCR, 0x0b             /* DTR, RTS, OUT2: the IRQ line is gated by OUT2 */

    mov esi, offset msg_ready
    call uart_puts
    OUTB UART_IER, 0x01             /* interrupt on received data */

    xor ebp, ebp                    /* bytes echoed */
    sti
wait:
    hlt                             /* sleeps in the kernel until an interrupt */
drain:
    cli
    mov bx, [ring_tail]
    cmp bx, [ring_head]
    je 3f
    movzx eax, byte ptr [ring + bx]
    inc bx
    and bx, 0xff
    mov [ring_tail], bx
    sti
    cmp al, EOT
    je bye
    call uart_putc
    inc ebp
    jmp drain
3:  sti
    jmp wait

bye:
    cli
    mov esi, offset msg_bye
    call uart_puts
    mov eax, ebp
    mov edi, [irq_count]
    I8042_RESET_FOREVER

/* set_vector: real-mode interrupt table entry CX -> CS:AX (4 bytes: offset, segment). */
set_vector:
    mov bx, cx
    shl bx, 2
    mov word ptr [bx], ax
    mov word ptr [bx + 2], cs
    ret

com1_isr:
    push ax
    push bx
    push dx
    inc dword ptr [irq_count]
1:  mov dx, UART_LSR
    in al, dx
    test al, UART_LSR_DR
    jz 2f
    mov dx, UART_RBR
    in al, dx
    mov bx, [ring_head]
    mov [ring + bx], al
    inc bx
    and bx, 0xff
    mov [ring_head], bx
    jmp 1b
2:  mov al, PIC_EOI
    out PIC1_CMD, al
    pop dx
    pop bx
    pop ax
    iret

spurious:
    push ax
    mov al, PIC_EOI
    out PIC1_CMD, al
    pop ax
    iret

fault:
    cli
    mov esi, offset msg_fault
    call uart_puts
    mov eax, 0xffffffff
    I8042_RESET_FOREVER

#define LIB_UART_POLLED
#include "lib.inc"

    .section .rodata, "a"
msg_ready:
    .asciz "irq ready\n"
msg_bye:
    .asciz "\nbye\n"
msg_fault:
    .asciz "fault\n"
    .balign 4
idtr:                               /* the real-mode interrupt table at 0 */
    .word NR_VECTORS * 4 - 1
    .long 0

    .section .bss, "aw", @nobits
    .balign 4
ring_head:
    .skip 2
ring_tail:
    .skip 2
irq_count:
    .skip 4
ring:
    .skip 256

    .section .note.GNU-stack, "", @progbits
