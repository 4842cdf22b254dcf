/*
 * gdbdemo.c - a guest to debug with GDB (tests/test_gdb_kvm.py, docs/gdb.md).
 *
 * 64-bit, CPL 0: on nested kvm_pvm hosts only CPL-0 code can be
 * single-stepped and stopped by a breakpoint (pykvm.inspect.debug_support),
 * so the work is kept small (every instruction is emulated there).
 * Built with -g; the ELF with its symbols ships as bin/gdbdemo64.debug
 * for GDB's `file`, the flat image as bin/gdbdemo64.bin.
 *
 * It computes fib(FIB_N) into `fib_result`, calls checkpoint() with it (a
 * function to break at), then adds 1, 2, ... ROUNDS into `counter` (a
 * variable to watch), prints "gdbdemo: fib(20) = 6765, counter = 15" and
 * ends with the i8042 reset: RAX = fib_result + counter.
 */
#include "guest.h"

void guest_interrupt(uint32_t vector);
uint64_t guest_fault(uint32_t vector, const uint64_t *frame);

#define FIB_N 20
#define ROUNDS 5

volatile uint64_t fib_result;   /* set before checkpoint() is called */
volatile uint64_t counter;      /* written once per round */
volatile uint64_t checkpoints;  /* how many times checkpoint() ran */

static uint64_t fib(unsigned n)
{
    uint64_t a = 0, b = 1;
    while (n--) {
        uint64_t next = a + b;
        a = b;
        b = next;
    }
    return a;
}

__attribute__((noinline)) uint64_t checkpoint(uint64_t value)
{
    checkpoints = checkpoints + 1;
    return value + checkpoints;
}

/* crt64.S's entry points at CPL 0: this guest takes no interrupt and sets no IDT. */
void guest_interrupt(uint32_t vector)
{
    (void)vector;
}

uint64_t guest_fault(uint32_t vector, const uint64_t *frame)
{
    (void)frame;
    return GUEST_FAIL(vector);
}

uint64_t guest_main(uint64_t arg0, uint64_t arg1)
{
    (void)arg0;
    (void)arg1;
    fib_result = fib(FIB_N);
    guest_aux[0] = checkpoint(fib_result);
    for (uint64_t round = 1; round <= ROUNDS; round++)
        counter = counter + round;
    puts_com1("gdbdemo: fib(");
    putdec(FIB_N);
    puts_com1(") = ");
    putdec(fib_result);
    puts_com1(", counter = ");
    putdec(counter);
    puts_com1("\n");
    return fib_result + counter;
}
