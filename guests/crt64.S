/*
 * crt64.S - the entry of the freestanding C guests (64-bit, CPL 0 or 3).
 *
 * _start clears .bss (not part of the flat image), calls
 * guest_main(RDI, RSI) and stops with the i8042 reset: RAX = guest_main's
 * value, RBX/RCX/RDI = guest_aux[0..2].  The reset, not HLT, because with
 * the in-kernel irqchip a HLT with interrupts off never comes back to the
 * host.
 *
 * At CPL 0 this file also holds the interrupt entry points and
 * wait_for_interrupt(), built around one limitation of the hosts pykvm is
 * developed on: there, CPL-0 code is run by KVM's instruction emulator,
 * which implements IRET only in real mode (arch/x86/kvm/emulate.c,
 * em_iret), so a long-mode handler cannot return with IRET.  Our handlers
 * do not return:
 *
 *   - interrupts are enabled in one place only, wait_for_interrupt(), which
 *     saves RSP, then does `sti; hlt` (a pending interrupt is taken after
 *     the HLT starts, so no wake-up is lost between checking and sleeping);
 *   - the handler drops its interrupt frame by reloading that RSP, calls
 *     the C handler guest_interrupt(vector) (acknowledge the device and the
 *     PIC), and executes `ret`: wait_for_interrupt() returns to its caller
 *     with interrupts off again, exactly as if the sleep had ended.
 *
 * Nothing is lost: the interrupted context was the `hlt` in
 * wait_for_interrupt(), whose caller-saved registers the C ABI lets it
 * clobber, and guest_interrupt() preserves the callee-saved ones.  The IDT
 * entries are interrupt gates, so IF stays 0 in the handler.  An interrupt
 * anywhere else (impossible with IF=0) and every exception (vectors 0-31)
 * go to guest_fault(), which reports and stops.
 */
#include "defs.inc"

#if BITS != 64
# error "crt64.S is for the 64-bit modes"
#endif

    .intel_syntax noprefix
    CODE_BITS

    .section .text.start, "ax"
    .globl _start
_start:
    cld
    mov r12, rdi
    mov r13, rsi
    mov edi, offset _image_end      /* clear .bss, 8 bytes at a time */
    mov ecx, offset _bss_end
    sub ecx, edi
    add ecx, 7
    shr ecx, 3
    xor eax, eax
    rep stosq
    mov rdi, r12
    mov rsi, r13
    call guest_main
guest_stop:                         /* RAX = the result */
    mov rbx, [guest_aux]
    mov rcx, [guest_aux + 8]
    mov rdi, [guest_aux + 16]
    I8042_RESET_FOREVER

#if CPL == 0
    .text
/* void wait_for_interrupt(void): called and returns with IF = 0. */
    .globl wait_for_interrupt
wait_for_interrupt:
    mov [wfi_rsp], rsp
1:  sti
    hlt
    cli                             /* woken without an interrupt: sleep again */
    jmp 1b

/* 48 entry stubs of 16 bytes: vector v at isr_stubs + 16 * v. */
.macro ISR_STUB vector
    .balign 16
    mov edi, \vector
    jmp isr_common
.endm

    .balign 16
    .globl isr_stubs
isr_stubs:
    .altmacro
    .set vector, 0
    .rept 48
    ISR_STUB %vector
    .set vector, vector + 1
    .endr
    .noaltmacro

isr_common:
    cmp edi, 32
    jb 2f                           /* an exception */
    mov rax, [wfi_rsp]
    test rax, rax
    jz 2f                           /* an interrupt outside wait_for_interrupt */
    mov rsp, rax                    /* drop the frame: wait_for_interrupt's stack */
    mov qword ptr [wfi_rsp], 0
    sub rsp, 8                      /* 16-byte alignment at the call (ABI) */
    call guest_interrupt            /* C: acknowledge the device and the PIC */
    add rsp, 8
    ret                             /* wait_for_interrupt returns, IF = 0 */
2:  mov rsi, rsp                    /* the frame: [error code,] RIP, CS, RFLAGS */
    and rsp, -16
    call guest_fault                /* reports; RAX = a failure code */
    jmp guest_stop

    .bss
    .balign 8
wfi_rsp:                            /* RSP in wait_for_interrupt, 0 outside it */
    .skip 8
#endif

    .section .note.GNU-stack, "", @progbits
