/*
 * crt32.S - entry of the Multiboot PC guests (32-bit protected mode, CPL 0).
 *
 * The Multiboot v1 header (Multiboot Specification 0.6.96, 3.1) comes
 * first in the image; the kernel is an ELF32 file, so the header carries no
 * load addresses (flags bit 16 clear): the loader (QEMU's -kernel, pykvm)
 * loads the PT_LOAD segments and enters _start with EAX = 0x2BADB002, EBX =
 * the information structure, paging off and flat CS/DS/ES/SS.  GDTR, IDTR
 * and ESP are undefined (3.2), so _start loads its own GDT before any
 * segment register, takes its own stack, clears .bss, loads the IDT and
 * calls rt_main(EAX, EBX) (rt32.c).
 *
 * Interrupts.  On the kvm_pvm hosts pykvm is developed on, KVM's
 * instruction emulator runs all CPL-0 code and implements IRET only in
 * real mode (arch/x86/kvm/emulate.c, emulate_iret): a protected-mode IRET
 * stops the guest with an emulation failure.  So, as in crt64.S, handlers
 * never return with IRET:
 *
 *   - interrupts are enabled in one place only, wait_for_interrupt(), which
 *     executes `sti; hlt` (the interrupt is taken after the HLT starts, so
 *     none is lost between deciding to wait and sleeping);
 *   - the entry stub pushes an error-code slot and the vector, and
 *     isr_common checks that the interrupted EIP is that HLT; the frame
 *     the CPU pushed (EIP, CS, EFLAGS: no privilege change, no error code)
 *     sits right below wait_for_interrupt's return address, so dropping it
 *     and executing `ret` returns from wait_for_interrupt() with the vector
 *     in EAX and IF = 0 (an interrupt gate cleared it), as if the sleep had
 *     just ended.
 *
 * No state is lost: the interrupted context is the HLT, and
 * wait_for_interrupt() keeps no registers of its own.  The finding needs no
 * per-CPU variable, so every CPU may sleep in it at once.  Exceptions
 * (vectors 0-31) and interrupts anywhere else go to rt_exception(), which
 * reports and stops.
 */
#include "rt32.h"

    .intel_syntax noprefix
    .code32

/* --- the Multiboot header: first in the image, 4-byte aligned ---------- */
    .section .multiboot, "a"
    .balign 4
multiboot_header:
    .long MB_HEADER_MAGIC
    .long MB_HEADER_FLAGS
    .long -(MB_HEADER_MAGIC + MB_HEADER_FLAGS)

/* --- entry ---------------------------------------------------------------- */
    .section .text.start, "ax"
    .globl _start
_start:
    cli
    cld
    lgdt [gdt_descriptor]           /* through DS, which the loader made flat */
    jmp CODE_SEL:1f
1:  mov cx, DATA_SEL
    mov ds, cx
    mov es, cx
    mov fs, cx
    mov gs, cx
    mov ss, cx
    mov esp, offset bsp_stack_top
    mov esi, eax                    /* the loader's magic */
    mov edx, ebx                    /* the information structure */
    mov edi, offset _bss_start      /* the loader should have zeroed .bss; make sure */
    mov ecx, offset _bss_end
    sub ecx, edi
    xor eax, eax
    rep stosb
    push edx
    push esi
    call idt_build
    call idt_load
    call rt_main                    /* (magic, mbi); does not return */
    jmp halt

/* void debug_exit(uint32_t status): isa-debug-exit, then halt for ever. */
    .globl debug_exit
debug_exit:
    mov eax, [esp + 4]
    mov dx, DEBUG_EXIT_PORT
    out dx, eax                     /* QEMU exits with status (eax << 1) | 1 */
halt:
    cli
    hlt
    jmp halt

/* void idt_load(void) */
    .globl idt_load
idt_load:
    lidt [idt_descriptor]
    ret

/* Fill the IDT: vector v -> isr_stubs + 16 * v, 32-bit interrupt gates. */
idt_build:
    mov eax, offset isr_stubs
    mov edi, offset idt
    mov ecx, IDT_VECTORS
2:  mov [edi], ax                   /* offset 15:0 */
    mov word ptr [edi + 2], CODE_SEL
    mov word ptr [edi + 4], 0x8e00  /* present, DPL 0, 32-bit interrupt gate */
    mov edx, eax
    shr edx, 16
    mov [edi + 6], dx               /* offset 31:16 */
    add eax, ISR_STUB_SIZE
    add edi, 8
    dec ecx
    jnz 2b
    ret

/* uint32_t wait_for_interrupt(void): called and returns with IF = 0. */
    .globl wait_for_interrupt
wait_for_interrupt:
3:  sti
wfi_hlt:
    hlt
wfi_after_hlt:                      /* the EIP an interrupt during the HLT saves */
    cli                             /* woken without an interrupt: sleep again */
    jmp 3b

/* Entry stubs, 16 bytes each.  Those of vectors without an error code push
 * a 0 in its place, so isr_common always sees: vector, error code, EIP, CS,
 * EFLAGS. */
.macro ISR_STUB vector
    .balign ISR_STUB_SIZE
.if (\vector == 8) || (\vector >= 10 && \vector <= 14) || (\vector == 17) || (\vector == 21) || (\vector == 29) || (\vector == 30)
.else
    push 0
.endif
    push \vector
    jmp isr_common
.endm

    .balign ISR_STUB_SIZE
isr_stubs:
    .altmacro
    .set vector, 0
    .rept IDT_VECTORS
    ISR_STUB %vector
    .set vector, vector + 1
    .endr
    .noaltmacro

isr_common:                         /* [esp] vector, +4 error, +8 EIP, +12 CS, +16 EFLAGS */
    cmp dword ptr [esp], 32
    jb 4f                           /* an exception */
    mov eax, [esp + 8]
    cmp eax, offset wfi_after_hlt
    je 5f
    cmp eax, offset wfi_hlt         /* (before the HLT: cannot happen after STI, harmless) */
    jne 4f                          /* an interrupt outside wait_for_interrupt */
5:  mov eax, [esp]                  /* the vector: wait_for_interrupt's result */
    add esp, 20                     /* drop the stub's words and the CPU's frame */
    ret                             /* from wait_for_interrupt, IF = 0 */
4:  push esp                        /* the frame, for the report */
    call rt_exception               /* reports and exits; does not return */
    jmp halt

/* --- data --------------------------------------------------------------------- */
    .data
    .balign 8
    .globl gdt
gdt:
    .quad 0                         /* null */
    .quad 0x00cf9a000000ffff        /* CODE_SEL: base 0, limit 4 GiB, 32-bit code */
    .quad 0x00cf92000000ffff        /* DATA_SEL: base 0, limit 4 GiB, data */
    .balign 4
    .word 0
gdt_descriptor:
    .word GDT_LIMIT
    .long gdt
    .word 0
idt_descriptor:
    .word IDT_VECTORS * 8 - 1
    .long idt

    .bss
    .balign 8
idt:
    .skip IDT_VECTORS * 8
    .balign 16
    .skip 16384
bsp_stack_top:

    .section .note.GNU-stack, "", @progbits
