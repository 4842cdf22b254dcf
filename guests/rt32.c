/*
 * rt32.c - the 32-bit runtime of the Multiboot PC guests: COM1 output
 * through a polled 16550, the report's format, a printf subset, 64-bit
 * division without libgcc, the command line, the exception report and
 * rt_main(), which crt32.S calls.
 *
 * COM1 is programmed like a real driver (115200 8N1, FIFOs on, interrupts
 * off) and every byte waits for LSR.THRE, so the output survives QEMU's
 * real UART model as well as pykvm's instant one; a UART that never
 * becomes ready is given up on after a bounded number of polls.
 */
#include "rt32.h"

#include "libc.c"

/* --- COM1 (16550: PC16550D data sheet, registers at 0x3f8-0x3ff) ----------- */
#define UART_THR  (COM1 + 0)
#define UART_DLL  (COM1 + 0)
#define UART_IER  (COM1 + 1)
#define UART_DLM  (COM1 + 1)
#define UART_FCR  (COM1 + 2)
#define UART_LCR  (COM1 + 3)
#define UART_MCR  (COM1 + 4)
#define UART_LSR  (COM1 + 5)
#define UART_LSR_THRE 0x20
#define UART_POLLS 100000           /* LSR reads before a byte is sent anyway */

static void uart_init(void)
{
    outb(UART_IER, 0x00);           /* no interrupts */
    outb(UART_LCR, 0x80);           /* DLAB: the divisor latch */
    outb(UART_DLL, 0x01);           /* 115200 baud */
    outb(UART_DLM, 0x00);
    outb(UART_LCR, 0x03);           /* 8 data bits, no parity, 1 stop bit */
    outb(UART_FCR, 0xc7);           /* FIFOs on and cleared */
    outb(UART_MCR, 0x03);           /* DTR, RTS; OUT2 off: no IRQ */
}

void put_char(char c)
{
    for (uint32_t polls = 0; polls < UART_POLLS; polls++)
        if (inb(UART_LSR) & UART_LSR_THRE)
            break;
    outb(UART_THR, (uint8_t)c);
}

void put_str(const char *s)
{
    while (*s)
        put_char(*s++);
}

static const char hex_digits[] = "0123456789abcdef";

void put_escaped(const char *s, uint32_t max)
{
    for (uint32_t i = 0; i < max && s[i]; i++) {
        uint8_t c = (uint8_t)s[i];
        if (c >= 0x20 && c < 0x7f && c != '\\') {
            put_char((char)c);
        } else {
            put_str("\\x");
            put_char(hex_digits[c >> 4]);
            put_char(hex_digits[c & 15]);
        }
    }
}

/* --- print: %s %c %d %u %x %llu %llx %%, optional '0' and width ------------ */
static void put_number(uint64_t value, uint32_t base, uint32_t width, char pad)
{
    char digits[24];
    uint32_t n = 0, digit;
    do {
        value = udiv64(value, base, &digit);
        digits[n++] = hex_digits[digit];
    } while (value);
    while (width > n) {
        put_char(pad);
        width--;
    }
    while (n)
        put_char(digits[--n]);
}

static void vprint(const char *fmt, __builtin_va_list ap)
{
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            put_char(*fmt);
            continue;
        }
        char pad = ' ';
        uint32_t width = 0;
        int is_long_long = 0;
        fmt++;
        if (*fmt == '0')
            pad = '0';
        while (*fmt >= '0' && *fmt <= '9')
            width = width * 10 + (uint32_t)(*fmt++ - '0');
        if (fmt[0] == 'l' && fmt[1] == 'l') {
            is_long_long = 1;
            fmt += 2;
        }
        if (!*fmt) {                /* a '%' that ends the format */
            put_char('%');
            break;
        }
        switch (*fmt) {
        case 's':
            put_str(__builtin_va_arg(ap, const char *));
            break;
        case 'c':
            put_char((char)__builtin_va_arg(ap, int));
            break;
        case 'd': {
            int32_t v = __builtin_va_arg(ap, int32_t);
            uint32_t magnitude = v < 0 ? 0u - (uint32_t)v : (uint32_t)v;
            if (v < 0)
                put_char('-');
            put_number(magnitude, 10, width, pad);
            break;
        }
        case 'u':
        case 'x': {
            uint64_t v = is_long_long ? __builtin_va_arg(ap, uint64_t) : __builtin_va_arg(ap, uint32_t);
            put_number(v, *fmt == 'u' ? 10 : 16, width, pad);
            break;
        }
        case '%':
            put_char('%');
            break;
        default:                    /* not ours: show it */
            put_char('%');
            put_char(*fmt);
            break;
        }
    }
}

void print(const char *fmt, ...)
{
    __builtin_va_list ap;
    __builtin_va_start(ap, fmt);
    vprint(fmt, ap);
    __builtin_va_end(ap);
}

int done_ok(void)
{
    put_str("done: ok\n");
    return EXIT_OK;
}

int fail(int status, const char *fmt, ...)
{
    __builtin_va_list ap;
    put_str("done: fail ");
    __builtin_va_start(ap, fmt);
    vprint(fmt, ap);
    __builtin_va_end(ap);
    put_char('\n');
    return status;
}

/* --- small library ---------------------------------------------------------------- */
size_t strnlen(const char *s, size_t max)
{
    size_t n = 0;
    while (n < max && s[n])
        n++;
    return n;
}

/* Two 32-bit DIVs, high half first, as Linux's do_div() on i386: the first
 * remainder is below d, so the second quotient fits in 32 bits. */
uint64_t udiv64(uint64_t n, uint32_t d, uint32_t *rem)
{
    uint32_t high = (uint32_t)(n >> 32), low = (uint32_t)n;
    uint32_t q_high = high / d, r = high % d, q_low;
    __asm__("divl %4" : "=a"(q_low), "=d"(r) : "a"(low), "d"(r), "rm"(d) : "cc");
    if (rem)
        *rem = r;
    return (uint64_t)q_high << 32 | q_low;
}

int cmdline_u32(const char *cmdline, const char *key, uint32_t *value)
{
    size_t key_len = strlen(key);
    for (const char *p = cmdline; *p;) {
        while (*p == ' ')
            p++;
        if (!memcmp(p, key, key_len) && p[key_len] == '=') {
            const char *digits = p + key_len + 1;
            uint32_t base = 10, v = 0;
            if (digits[0] == '0' && digits[1] == 'x') {
                base = 16;
                digits += 2;
            }
            for (; *digits && *digits != ' '; digits++) {
                uint32_t d;
                if (*digits >= '0' && *digits <= '9')
                    d = (uint32_t)(*digits - '0');
                else if (base == 16 && *digits >= 'a' && *digits <= 'f')
                    d = (uint32_t)(*digits - 'a' + 10);
                else
                    return 0;       /* not a number */
                v = v * base + d;
            }
            *value = v;
            return 1;
        }
        while (*p && *p != ' ')
            p++;
    }
    return 0;
}

void sort_u32(uint32_t *v, uint32_t n)
{
    for (uint32_t i = 1; i < n; i++) {
        uint32_t x = v[i], j = i;
        for (; j > 0 && v[j - 1] > x; j--)
            v[j] = v[j - 1];
        v[j] = x;
    }
}

const char *mb_cmdline(const struct multiboot_info *mbi)
{
    return (mbi->flags & MBI_CMDLINE) && mbi->cmdline ? (const char *)(uintptr_t)mbi->cmdline : "";
}

/* --- the 8259 PICs (Intel 8259A data sheet: ICW1-ICW4, OCW1) ---------------------- */
void pic_remap(uint8_t master_base, uint8_t slave_base, uint8_t master_mask, uint8_t slave_mask)
{
    outb(0x20, 0x11); outb(0xa0, 0x11);               /* ICW1: edge, cascade, ICW4 follows */
    outb(0x21, master_base); outb(0xa1, slave_base);   /* ICW2: vector bases */
    outb(0x21, 0x04); outb(0xa1, 0x02);               /* ICW3: the slave on the master's IRQ 2 */
    outb(0x21, 0x01); outb(0xa1, 0x01);               /* ICW4: 8086 mode */
    outb(0x21, master_mask); outb(0xa1, slave_mask);  /* OCW1 */
}

/* --- exceptions (crt32.S's isr_common) ------------------------------------------ */
struct exception_frame {
    uint32_t vector, error, eip, cs, eflags;
};

void __attribute__((noreturn)) rt_exception(const struct exception_frame *frame);

void rt_exception(const struct exception_frame *frame)
{
    print("exception: vector=%u error=0x%x eip=0x%x\n", frame->vector, frame->error, frame->eip);
    fail(EXIT_EXCEPTION, "%s %u at eip 0x%x", frame->vector < 32 ? "exception" : "unexpected interrupt",
         frame->vector, frame->eip);
    debug_exit(EXIT_EXCEPTION);
}

/* --- the start ------------------------------------------------------------------- */
void __attribute__((noreturn)) rt_main(uint32_t magic, const struct multiboot_info *mbi);

void rt_main(uint32_t magic, const struct multiboot_info *mbi)
{
    uart_init();
    put_str("guest: " GUEST_NAME "\n");
    int status;
    if (magic != MB_LOADER_MAGIC)
        status = fail(EXIT_NOT_MULTIBOOT, "not started by a Multiboot loader: EAX 0x%x", magic);
    else
        status = guest_main(mbi);
    debug_exit((uint32_t)status);
}
