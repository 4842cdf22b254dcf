/*
 * trampoline.S - where an application processor starts (Intel SDM vol. 3,
 * 10.4 "MP initialization"; the MP Specification 1.4, appendix B).
 *
 * A STARTUP IPI with vector VV starts the AP in real mode at CS:IP =
 * VV00:0000, i.e. at physical VV000.  smp.c copies ap_trampoline ..
 * ap_trampoline_end to TRAMPOLINE_ADDR (0x8000, vector 0x08) before the
 * IPIs.  The code addresses its data through CS, so it runs from any page:
 * it loads the kernel's GDT (lgdt with a 32-bit base), sets CR0.PE and
 * jumps to ap_entry32 in the kernel image, in 32-bit protected mode.
 *
 * ap_entry32 takes the next AP stack with a `lock xadd` on ap_next (so APs
 * starting at once never share one) and calls ap_start(index) (smp.c),
 * which does not return.
 */
#include "rt32.h"

    .intel_syntax noprefix

    .section .rodata.trampoline, "a"
    .code16
    .globl ap_trampoline, ap_trampoline_end
ap_trampoline:
    cli
    cld
    data32 lgdt cs:[ap_gdt_descriptor - ap_trampoline]
    mov eax, cr0
    or eax, 1                       /* PE */
    mov cr0, eax
    data32 jmp CODE_SEL:ap_entry32  /* a far jump with a 32-bit offset */
    .balign 4
    .word 0
ap_gdt_descriptor:
    .word GDT_LIMIT
    .long gdt                       /* crt32.S */
ap_trampoline_end:

    .text
    .code32
ap_entry32:
    mov cx, DATA_SEL
    mov ds, cx
    mov es, cx
    mov fs, cx
    mov gs, cx
    mov ss, cx
    mov eax, 1
    lock xadd [ap_next], eax        /* EAX = this AP's index */
    cmp eax, AP_MAX
    jae 1f                          /* more APs than stacks: ap_next tells the BSP */
    mov esp, eax
    inc esp
    imul esp, esp, AP_STACK_SIZE
    add esp, offset ap_stacks       /* the top of stack `index` */
    push eax
    call ap_start                   /* smp.c; does not return */
1:  cli
    hlt
    jmp 1b

    .bss
    .balign 4
    .globl ap_next
ap_next:                            /* APs that reached protected mode */
    .skip 4
    .balign 16
ap_stacks:
    .skip AP_MAX * AP_STACK_SIZE

    .section .note.GNU-stack, "", @progbits
