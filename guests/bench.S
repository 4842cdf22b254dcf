/*
 * bench.S - exit-benchmark guests bench32, bench64, bench64u from one source.
 *
 * Arguments: EDI/RDI = kind, ESI/RSI = N iterations (0 means 1000).
 *   kind 0  empty loop, no exit (the baseline)
 *   kind 1  `out dx, al`  one byte to port 0x700
 *   kind 2  `in al, dx`   one byte from port 0x700
 *   kind 3  32-bit MMIO write to 0xe0000000
 *   kind 4  32-bit MMIO read from 0xe0000000
 *   kind 5  `cpuid` leaf 0 (EAX is zeroed before each CPUID)
 *   kind 6  `hlt` (CPL 0 only; the host resumes the vCPU after each HLT
 *           exit).  RAX is 0 during the loop and N at the final HLT, so a
 *           host can tell them apart.  Unsupported where HLT cannot work:
 *           at CPL 3 (bench64u) and in multiboot mode (interrupts are off
 *           under QEMU, so HLT would never return): there the guest stops
 *           at once with RAX = 0 iterations.
 * Each loop body is the operation, then `dec`/`jnz` on the counter.
 * At the end RAX = N (the iterations done), then HLT (CPL 0) or the i8042
 * reset (CPL 3).  Unknown kind: RAX = 0xffffffff and stop.
 *
 * bench32 (-DBENCH_MULTIBOOT) also starts with a short JMP over a
 * Multiboot v1 header (a.out kludge) and a 16-byte parameter block at file
 * offset BENCH_PARAMS_OFFSET (0x30): "PKVMARGS", u32 kind, u32 N.  Entered
 * by a multiboot loader (EAX == 0x2BADB002), it takes kind and N from the
 * block instead of EDI/ESI, uses its own stack, and after the loop writes
 * 0 to port 0xf4 (QEMU isa-debug-exit) and halts with interrupts off.
 */
#include "defs.inc"

    .intel_syntax noprefix
    CODE_BITS

    .section .text.start, "ax"
    .globl _start
_start:
#ifdef BENCH_MULTIBOOT
# if BITS != 32
#  error "the multiboot entry is 32-bit code"
# endif
    jmp mb_check                    /* 2 bytes; pykvm enters here too */

    .org 4                          /* fails to assemble if the JMP grew */
mb_header:                          /* Multiboot v1, 4-byte aligned */
    .long MB_HEADER_MAGIC
    .long MB_FLAG_AOUT_KLUDGE
    .long (0 - (MB_HEADER_MAGIC + MB_FLAG_AOUT_KLUDGE)) & 0xffffffff
    .long mb_header                 /* header_addr */
    .long _start                    /* load_addr = 0x100000 */
    .long _image_end                /* load_end_addr */
    .long _bss_end                  /* bss_end_addr (the stack below) */
    .long _start                    /* entry_addr */

    .org BENCH_PARAMS_OFFSET
bench_params:                       /* patched in a copy of the file */
    .ascii "PKVMARGS"
bench_param_kind:
    .long BENCH_KIND_EMPTY
bench_param_n:
    .long BENCH_DEFAULT_N

mb_check:
    cmp eax, MB_LOADER_MAGIC
    jne 1f
    mov esp, offset mb_stack_top    /* ESP is undefined at multiboot entry */
    mov edi, dword ptr [bench_param_kind]
    mov esi, dword ptr [bench_param_n]
    push 1                          /* finish: leave through isa-debug-exit */
    cmp edi, BENCH_KIND_HLT
    je unsupported
    jmp bench
1:  push 0                          /* finish: the normal CPL-0 ending */
#endif

bench:
    cld
    test xSI, xSI
    jnz 1f
    mov esi, BENCH_DEFAULT_N
1:  mov xBP, xSI                    /* N: the result */
    xor eax, eax                    /* RAX = 0 while looping */
    cmp xDI, BENCH_KIND_EMPTY
    je kind_empty
    cmp xDI, BENCH_KIND_OUT
    je kind_out
    cmp xDI, BENCH_KIND_IN
    je kind_in
    cmp xDI, BENCH_KIND_MMIO_W
    je kind_mmio_write
    cmp xDI, BENCH_KIND_MMIO_R
    je kind_mmio_read
    cmp xDI, BENCH_KIND_CPUID
    je kind_cpuid
    cmp xDI, BENCH_KIND_HLT
    je kind_hlt
    mov eax, 0xffffffff             /* unknown kind */
    jmp finish

kind_empty:
1:  dec xSI
    jnz 1b
    jmp done

kind_out:
    mov dx, PORT_BENCH
1:  out dx, al
    dec xSI
    jnz 1b
    jmp done

kind_in:
    mov dx, PORT_BENCH
1:  in al, dx
    dec xSI
    jnz 1b
    jmp done

kind_mmio_write:
    mov ebx, MMIO_BENCH
1:  mov dword ptr [xBX], eax
    dec xSI
    jnz 1b
    jmp done

kind_mmio_read:
    mov ebx, MMIO_BENCH
1:  mov eax, dword ptr [xBX]
    dec xSI
    jnz 1b
    jmp done

kind_cpuid:
1:  xor eax, eax                    /* leaf 0 every time */
    cpuid
    dec xSI
    jnz 1b
    jmp done

kind_hlt:
#if CPL == 3
    /* HLT would #GP at CPL 3: unsupported, fall through. */
#else
1:  hlt
    dec xSI
    jnz 1b
    jmp done
#endif

unsupported:
    xor eax, eax                    /* no iterations done */
    jmp finish

done:
    mov xAX, xBP

finish:                             /* RAX = result */
#ifdef BENCH_MULTIBOOT
    pop edx
    test edx, edx
    jz 2f
    mov esi, offset debug_exit_value
    mov dx, PORT_DEBUG_EXIT
    outsb                           /* writes 0, keeps EAX */
    cli
1:  hlt
    jmp 1b
debug_exit_value:
    .byte 0
2:
#endif
    STOP

#ifdef BENCH_MULTIBOOT
    /* QEMU's -kernel first looks for a Linux header ("HdrS" at file offset
     * 0x202) in an 8 KiB buffer it fills only up to the file size: pad the
     * image to 1 KiB so that check reads zeros, not stale stack bytes. */
    .balign 0x400, 0

    .section .bss, "aw", @nobits
    .balign 16
    .skip 4096
mb_stack_top:
#endif

    .section .note.GNU-stack, "", @progbits
