/*
 * iobench.c - iobench64u: move N bytes between guest and host, through the
 * 16550 or through virtio-console, natively at CPL 3 (long_user).
 *
 * RDI = kind, RSI = N (bytes, 0 means 65536):
 *
 *   1  UART transmit: one `out` to THR per byte (no LSR polling: pykvm's
 *      16550 transmits instantly), i.e. one VM exit per byte;
 *   2  UART receive: per byte, poll LSR until DR, then `in` from RBR: two
 *      VM exits per byte (the host queued the N bytes beforehand);
 *   3  virtio transmit: 64 KiB buffers on the transmitq, up to 64 in
 *      flight; one doorbell per 4 buffers posted;
 *   4  virtio receive: 64 receive buffers of 64 KiB kept posted; one
 *      doorbell per batch of buffers handed back (the host queued the N
 *      bytes beforehand).
 *
 * The virtio kinds poll the used rings (no interrupts: an interrupt at
 * CPL 3 would need an IRET at CPL 0, which kvm_pvm cannot emulate) and ask
 * the device not to interrupt.  The transmitted bytes are a fixed
 * pseudo-random stream, generated as they are sent.
 *
 * Results: RAX = Adler-32 of the bytes moved (the host compares it with
 * zlib.adler32 of what it saw), or GUEST_FAIL(code); RBX = bytes moved;
 * RCX = TSC ticks from the first byte to the last (set-up excluded);
 * RDI = doorbells rung (virtio).
 */
#include "virtio.h"

#define KIND_UART_TX   1
#define KIND_UART_RX   2
#define KIND_VIRTIO_TX 3
#define KIND_VIRTIO_RX 4

#define ERR_BAD_KIND   20
#define ERR_BAD_LENGTH 21    /* the device used more than the buffer's length */

#define UART_THR COM1
#define UART_RBR COM1
#define CHUNK 4096           /* UART: bytes generated / checksummed at a time */

#define VBUFS 64             /* virtio buffers (and queue size) */
#define VBUF_SIZE 65536
#define TX_KICK_BATCH 4      /* buffers posted per doorbell */
#define TX_AREA 0x1000000UL  /* 64 x 64 KiB transmit buffers at 16 MiB */
#define RX_AREA 0x1400000UL  /* 64 x 64 KiB receive buffers at 20 MiB */

static uint8_t ring_mem[2 * VQ_MEM_SIZE] __attribute__((aligned(4096)));
static uint8_t chunk[CHUNK] __attribute__((aligned(64)));
static struct vdev dev;

/* The transmitted stream: 8-byte word i (from 0) is (i + 1) * golden ratio. */
static uint64_t stream_word(uint64_t i)
{
    return (i + 1) * 0x9e3779b97f4a7c15UL;
}

/* Fill ``len`` bytes at ``dst`` with the stream from byte ``pos`` (a multiple of 8). */
static void fill_stream(uint8_t *dst, uint64_t pos, size_t len)
{
    uint64_t *w = (uint64_t *)dst;
    uint64_t first = pos / 8;
    size_t words = len / 8;
    for (size_t i = 0; i < words; i++)
        w[i] = stream_word(first + i);
    if (len % 8) {
        uint64_t last = stream_word(first + words);
        memcpy(dst + 8 * words, &last, len % 8);
    }
}

static uint64_t uart_tx(uint64_t n)
{
    uint32_t adler = 1;
    for (uint64_t pos = 0; pos < n; pos += CHUNK) {
        size_t len = n - pos < CHUNK ? n - pos : CHUNK;
        fill_stream(chunk, pos, len);
        adler = adler32(adler, chunk, len);
        for (size_t i = 0; i < len; i++)
            outb(UART_THR, chunk[i]);
    }
    return adler;
}

static uint64_t uart_rx(uint64_t n)
{
    uint32_t adler = 1;
    for (uint64_t pos = 0; pos < n; pos += CHUNK) {
        size_t len = n - pos < CHUNK ? n - pos : CHUNK;
        for (size_t i = 0; i < len; i++) {
            while (!(inb(UART_LSR) & UART_LSR_DR))
                ;
            chunk[i] = inb(UART_RBR);
        }
        adler = adler32(adler, chunk, len);
    }
    return adler;
}

static uint8_t *vbuf(uintptr_t area, uint32_t id)
{
    return (uint8_t *)(area + (uintptr_t)id * VBUF_SIZE);
}

static uint64_t virtio_tx(uint64_t n)
{
    uint16_t free_ids[VBUFS], nfree = 0;
    uint32_t lengths[VBUFS];
    for (uint16_t id = 0; id < VBUFS; id++)
        free_ids[nfree++] = (uint16_t)(VBUFS - 1 - id);
    uint32_t adler = 1;
    uint64_t posted = 0, done = 0, kicks = 0;
    while (done < n) {
        uint32_t id, len;
        while (vq_get_used(&dev.tx, &id, &len)) {
            done += lengths[id];
            free_ids[nfree++] = (uint16_t)id;
        }
        if (posted == n || nfree == 0) {
            cpu_relax();
            continue;
        }
        for (int k = 0; k < TX_KICK_BATCH && posted < n && nfree; k++) {
            uint16_t b = free_ids[--nfree];
            uint32_t size = n - posted < VBUF_SIZE ? (uint32_t)(n - posted) : VBUF_SIZE;
            fill_stream(vbuf(TX_AREA, b), posted, size);
            adler = adler32(adler, vbuf(TX_AREA, b), size);
            lengths[b] = size;
            vq_post(&dev.tx, b, (uintptr_t)vbuf(TX_AREA, b), size, 0);
            posted += size;
        }
        vq_kick(&dev, &dev.tx);
        kicks++;
    }
    guest_aux[2] = kicks;
    return adler;
}

static uint64_t virtio_rx(uint64_t n)
{
    for (uint16_t id = 0; id < VBUFS; id++)
        vq_post(&dev.rx, id, (uintptr_t)vbuf(RX_AREA, id), VBUF_SIZE, 1);
    vq_kick(&dev, &dev.rx);
    uint32_t adler = 1;
    uint64_t received = 0, kicks = 1;
    while (received < n) {
        uint32_t id, len, got = 0;
        while (vq_get_used(&dev.rx, &id, &len)) {
            if (len > VBUF_SIZE)
                return GUEST_FAIL(ERR_BAD_LENGTH);
            adler = adler32(adler, vbuf(RX_AREA, id), len);
            received += len;
            vq_post(&dev.rx, (uint16_t)id, (uintptr_t)vbuf(RX_AREA, id), VBUF_SIZE, 1);
            got++;
        }
        if (got) {
            vq_kick(&dev, &dev.rx);
            kicks++;
        } else {
            cpu_relax();
        }
    }
    guest_aux[2] = kicks;
    return adler;
}

uint64_t guest_main(uint64_t kind, uint64_t n)
{
    if (n == 0)
        n = 65536;
    if (kind == KIND_VIRTIO_TX || kind == KIND_VIRTIO_RX) {
        int err = vdev_init(&dev, VIRTIO_MMIO_BASE, ring_mem, VBUFS, 0);
        if (err) {
            puts_com1("iobench64u: virtio set-up failed\n");
            return GUEST_FAIL(-err);
        }
    } else if (kind != KIND_UART_TX && kind != KIND_UART_RX) {
        return GUEST_FAIL(ERR_BAD_KIND);
    }
    uint64_t t0 = rdtsc(), result;
    switch (kind) {
    case KIND_UART_TX:
        result = uart_tx(n);
        break;
    case KIND_UART_RX:
        result = uart_rx(n);
        break;
    case KIND_VIRTIO_TX:
        result = virtio_tx(n);
        break;
    default:
        result = virtio_rx(n);
        break;
    }
    guest_aux[1] = rdtsc() - t0;
    guest_aux[0] = n;
    return result;
}
