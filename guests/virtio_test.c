/*
 * virtio_test.c - a virtio-console driver's round trip: virtio64u (CPL 3,
 * polling) and virtio64 (CPL 0, interrupt-driven through the 8259 PIC).
 *
 * The host side echoes what the console transmits (an echo backend).  The
 * guest finds the device at 0xd0000000, negotiates, sets up both queues,
 * puts one receive buffer in the receiveq, sends a message through the
 * transmitq and waits until the transmit buffer came back and the received
 * stream ends with the message.  RDI = mode:
 *
 *   0  the round trip;
 *   1  reset mid-transfer: post a receive buffer and four transmit buffers,
 *      kick, and reset the device at once (Status = 0) without waiting;
 *      check that the device forgot its queues, then set everything up
 *      again from scratch and do the round trip.  Echoes of the abandoned
 *      buffers that reach the new receive buffers are skipped.
 *
 * RSI (virtio64 only) = the device's IRQ, 0 meaning 5.
 *
 * Reports on COM1 and in registers: RAX = bytes of the echo (the message
 * length) or GUEST_FAIL(code) (virtio.h's VERR_*, or the ones below);
 * RBX = interrupts taken (virtio64); RCX = bytes received in all;
 * RDI = InterruptStatus bits seen (virtio64).
 */
#include "virtio.h"

#define ERR_BAD_LENGTH 20    /* the device used more bytes than the buffer has */
#define ERR_OVERFLOW   21    /* more echo than expected */
#define ERR_NEEDS_RESET 22   /* the device reported an error (config interrupt) */
#define ERR_BAD_MODE   23

#define QSIZE 16
#define RXBUF_SIZE 256

static uint8_t ring_mem[2 * VQ_MEM_SIZE] __attribute__((aligned(4096)));
static uint8_t rxbuf[RXBUF_SIZE] __attribute__((aligned(64)));
static uint8_t txbuf[4][64] __attribute__((aligned(64)));
static uint8_t received[1024];
static size_t nreceived;
static struct vdev dev;

static const char greeting[] = "hello through virtio-console\n";
static const char after_reset[] = "and again after a reset\n";

#if GUEST_CPL == 0
/* --- interrupts (CPL 0): IDT, 8259 PIC, the handler --------------------- */
#define PIC1_CMD  0x20
#define PIC1_DATA 0x21
#define PIC2_CMD  0xa0
#define PIC2_DATA 0xa1
#define PIC_EOI   0x20
#define IRQ_BASE  0x20

void wait_for_interrupt(void);
void guest_interrupt(uint32_t vector);
uint64_t guest_fault(uint32_t vector, const uint64_t *frame);
extern char isr_stubs[];

struct idt_gate {
    uint16_t offset0;
    uint16_t selector;
    uint8_t ist;
    uint8_t type;          /* 0x8e: present, DPL 0, 64-bit interrupt gate */
    uint16_t offset1;
    uint32_t offset2;
    uint32_t reserved;
};

static struct idt_gate idt[48] __attribute__((aligned(16)));
static uint32_t device_irq;
static volatile uint32_t interrupts;     /* taken for the device */
static volatile uint32_t status_seen;    /* InterruptStatus bits acknowledged */

static void idt_init(void)
{
    uint16_t cs;
    __asm__ __volatile__("mov %%cs, %0" : "=r"(cs));
    for (uint32_t v = 0; v < 48; v++) {
        uint64_t entry = (uintptr_t)isr_stubs + 16 * v;
        idt[v] = (struct idt_gate){(uint16_t)entry, cs, 0, 0x8e, (uint16_t)(entry >> 16),
                                   (uint32_t)(entry >> 32), 0};
    }
    struct {
        uint16_t limit;
        uint64_t base;
    } __attribute__((packed)) idtr = {sizeof(idt) - 1, (uintptr_t)idt};
    __asm__ __volatile__("lidt %0" : : "m"(idtr));
}

/* ICW1-ICW4 as a PC BIOS does, vectors 0x20-0x2f, only the device's line
 * (and the cascade, for IRQ 8-15) unmasked. */
static void pic_init(uint32_t irq)
{
    outb(PIC1_CMD, 0x11);
    outb(PIC2_CMD, 0x11);
    outb(PIC1_DATA, IRQ_BASE);
    outb(PIC2_DATA, IRQ_BASE + 8);
    outb(PIC1_DATA, 0x04);
    outb(PIC2_DATA, 0x02);
    outb(PIC1_DATA, 0x01);
    outb(PIC2_DATA, 0x01);
    if (irq < 8) {
        outb(PIC1_DATA, (uint8_t)~(1u << irq));
        outb(PIC2_DATA, 0xff);
    } else {
        outb(PIC1_DATA, (uint8_t)~(1u << 2));
        outb(PIC2_DATA, (uint8_t)~(1u << (irq - 8)));
    }
}

/* Called from isr_common with the interrupt frame already dropped. */
void guest_interrupt(uint32_t vector)
{
    if (vector == IRQ_BASE + device_irq) {
        interrupts++;
        /* Acknowledge the device first: its level-triggered line goes low,
         * so the EOI below does not see it still high. */
        status_seen |= vdev_ack_interrupt(&dev);
    }
    if (vector >= IRQ_BASE + 8)
        outb(PIC2_CMD, PIC_EOI);
    outb(PIC1_CMD, PIC_EOI);
}

#define ERR_VECTOR 32        /* + the vector: an exception or a stray interrupt */

uint64_t guest_fault(uint32_t vector, const uint64_t *frame)
{
    puts_com1(GUEST_NAME ": unexpected vector ");
    putdec(vector);
    puts_com1(", frame ");
    puthex(frame[0]);
    putc_com1(' ');
    puthex(frame[1]);
    putc_com1('\n');
    guest_aux[0] = interrupts;
    return GUEST_FAIL(ERR_VECTOR + vector);
}

static void wait_for_device(void)
{
    wait_for_interrupt();
}
#else
static void wait_for_device(void)
{
    cpu_relax();  /* polling: the used rings are in our own memory */
}
#endif

/* Leave the counters where the host reads them (guest_aux -> RBX/RCX/RDX). */
static void report_counters(void)
{
    guest_aux[1] = nreceived;
#if GUEST_CPL == 0
    guest_aux[0] = interrupts;
    guest_aux[2] = status_seen;
#endif
}

static uint64_t fail(const char *what, int code)
{
    puts_com1(GUEST_NAME ": error: ");
    puts_com1(what);
    puts_com1(" (code ");
    putdec((uint64_t)code);
    puts_com1(")\n");
    report_counters();
    return GUEST_FAIL(code);
}

/* Send ``msg`` and wait for its echo: 0, or an error code. */
static int round_trip(const char *msg)
{
    size_t len = strlen(msg);
    size_t start = nreceived;
    vq_post(&dev.rx, 0, (uintptr_t)rxbuf, RXBUF_SIZE, 1);
    vq_kick(&dev, &dev.rx);
    memcpy(txbuf[0], msg, len);
    vq_post(&dev.tx, 0, (uintptr_t)txbuf[0], (uint32_t)len, 0);
    vq_kick(&dev, &dev.tx);
    int tx_done = 0;
    for (;;) {
        uint32_t id, n;
        while (vq_get_used(&dev.tx, &id, &n))
            tx_done = vq_in_flight(&dev.tx) == 0;
        while (vq_get_used(&dev.rx, &id, &n)) {
            if (n > RXBUF_SIZE)
                return ERR_BAD_LENGTH;
            if (nreceived + n > sizeof(received))
                return ERR_OVERFLOW;
            memcpy(received + nreceived, rxbuf, n);
            nreceived += n;
            vq_post(&dev.rx, 0, (uintptr_t)rxbuf, RXBUF_SIZE, 1);
            vq_kick(&dev, &dev.rx);
        }
        if (tx_done && nreceived - start >= len && memcmp(received + nreceived - len, msg, len) == 0)
            return 0;
#if GUEST_CPL == 0
        if (status_seen & VIRTIO_INT_CONFIG)
            return ERR_NEEDS_RESET;  /* our only config change is an error (2.1.2) */
#endif
        wait_for_device();
    }
}

/* A transfer abandoned half-way: buffers in flight on both queues, then a reset. */
static int reset_mid_transfer(void)
{
    vq_post(&dev.rx, 0, (uintptr_t)rxbuf, RXBUF_SIZE, 1);
    vq_kick(&dev, &dev.rx);
    for (uint16_t k = 0; k < 4; k++) {
        static const char text[] = "abandoned buffer #k\n";
        memcpy(txbuf[k], text, sizeof(text) - 1);
        txbuf[k][sizeof(text) - 3] = (uint8_t)('0' + k);
        vq_post(&dev.tx, k, (uintptr_t)txbuf[k], sizeof(text) - 1, 0);
    }
    vq_kick(&dev, &dev.tx);
    return vdev_reset(&dev);  /* at once: the device may be processing them right now */
}

uint64_t guest_main(uint64_t mode, uint64_t arg)
{
    int interrupts_on = GUEST_CPL == 0;
#if GUEST_CPL == 0
    device_irq = arg ? (uint32_t)arg : 5;
    idt_init();
    pic_init(device_irq);
#else
    (void)arg;
#endif
    if (mode > 1)
        return fail("unknown mode", ERR_BAD_MODE);
    int err = vdev_init(&dev, VIRTIO_MMIO_BASE, ring_mem, QSIZE, interrupts_on);
    if (err)
        return fail("device set-up failed", -err);
    puts_com1(GUEST_NAME ": virtio-console ready at ");
    puthex(VIRTIO_MMIO_BASE);
    puts_com1(interrupts_on ? ", interrupts\n" : ", polling\n");
    const char *msg = greeting;
    if (mode == 1) {
        if ((err = reset_mid_transfer()) != 0)
            return fail("reset mid-transfer left state behind", -err);
        puts_com1(GUEST_NAME ": reset mid-transfer, starting again\n");
        if ((err = vdev_init(&dev, VIRTIO_MMIO_BASE, ring_mem, QSIZE, interrupts_on)) != 0)
            return fail("set-up after the reset failed", -err);
        msg = after_reset;
    }
    if ((err = round_trip(msg)) != 0)
        return fail("round trip failed", err);
    puts_com1(GUEST_NAME ": echo ok, ");
    putdec(strlen(msg));
    puts_com1(" bytes\n");
    report_counters();
    return strlen(msg);
}
