/*
 * blk.c - a virtio-blk driver (virtio 1.2 section 5.2) as a Multiboot PC
 * guest: pykvm's `-drive if=virtio` and QEMU's microvm with
 * `-device virtio-blk-device` run it unchanged.
 *
 * The device: from `virtio_mmio.device=SIZE@BASE:IRQ` on the command line
 * (Linux's parameter, which pykvm adds for its virtio devices); without
 * one the guest looks for a virtio-blk at pykvm's windows (0xd0000000 +
 * 0x200 * i) and QEMU microvm's (0xfeb00000 + 0x200 * i).  It negotiates
 * SIZE_MAX, SEG_MAX, BLK_SIZE, FLUSH, RO, DISCARD and WRITE_ZEROES (what the
 * device offers of them) and VERSION_1, sets up queue 0 and polls its used
 * ring (interrupts suppressed: VIRTQ_AVAIL_F_NO_INTERRUPT), keeping up to
 * `depth` requests in flight.  Each request is the three-descriptor chain
 * Linux uses: header, data, status.
 *
 * Command line (`key=N` words, decimal or 0x hex):
 *   mode=    0 verify (default), 1 burst, 2 seq-read, 3 seq-write,
 *            4 rand-read, 5 rand-write
 *   n=       requests (blocks) to do, default 64, at most MAX_BLOCKS for verify
 *   spb=     sectors per request, default 8 (4 KiB), at most 16
 *   stride=  sectors from one block to the next, default spb
 *   start=   the first block's sector, default 0
 *   span=    random modes: blocks to choose from, default n
 *   seed=    pattern / random seed, default 1
 *   depth=   requests in flight, 1..MAX_DEPTH, default 8
 *   irq=1    wait for the device's interrupt (8259 PIC, the IRQ from
 *            virtio_mmio.device=, below 16) instead of polling; prints
 *            `interrupts: N` (wake-ups by the device) before `done:`
 *
 * verify: writes block k (spb sectors at start + k * stride) with the
 * pattern below, FLUSHes, reads every block back and compares.  The pattern
 * of a block at sector L is xorshift32 words from state seed ^ (L *
 * 0x9E3779B1) (0 -> 1); a block's hash is FNV-1a over its 32-bit words
 * (h = (h ^ w) * 16777619 from 2166136261), the checksum FNV-1a over the
 * blocks' hashes in order.  A read-only disk (RO negotiated) must answer a
 * write with IOERR; the guest then reads and reports what is there.
 *
 * burst: writes for ever (until killed): block k % n, or a random one of
 * span with `rand=1`, each sector stamped with (magic, sector, sequence);
 * `burst: started` after the first write completed, then `burst: N` every
 * 1024 writes.
 *
 * bench modes: n requests of spb sectors, nothing computed on the data;
 * `tsc: C` = TSC cycles from the first submission to the last completion.
 *
 * Report (pykvm.guests.reports): device, features, capacity, id, then the
 * mode's lines; `done: ok` and debug-exit 0, or `done: fail <why>` and 1.
 */
#include "virtio.h"

#define VIRTIO_BLK_F_SIZE_MAX     1
#define VIRTIO_BLK_F_SEG_MAX      2
#define VIRTIO_BLK_F_RO           5
#define VIRTIO_BLK_F_BLK_SIZE     6
#define VIRTIO_BLK_F_FLUSH        9
#define VIRTIO_BLK_F_DISCARD      13
#define VIRTIO_BLK_F_WRITE_ZEROES 14
#define WANTED ((1u << VIRTIO_BLK_F_SIZE_MAX) | (1u << VIRTIO_BLK_F_SEG_MAX) | (1u << VIRTIO_BLK_F_RO) | \
                (1u << VIRTIO_BLK_F_BLK_SIZE) | (1u << VIRTIO_BLK_F_FLUSH) | (1u << VIRTIO_BLK_F_DISCARD) | \
                (1u << VIRTIO_BLK_F_WRITE_ZEROES))

#define T_IN     0
#define T_OUT    1
#define T_FLUSH  4
#define T_GET_ID 8
#define S_OK     0
#define S_IOERR  1

#define MODE_VERIFY 0
#define MODE_BURST  1
#define MODE_SEQ_READ 2
#define MODE_SEQ_WRITE 3
#define MODE_RAND_READ 4
#define MODE_RAND_WRITE 5

#define QSIZE 64
#define MAX_DEPTH 16            /* 3 descriptors each: 48 of the 64 */
#define MAX_SPB 16
#define MAX_BLOCKS 4096
#define BURST_MAGIC 0x54535242  /* "BRST" */
#define POLL_LIMIT 200000000u   /* polls without a completion before giving up */

struct blk_req {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
};

static uint8_t ring_mem[VQ_MEM_SIZE] __attribute__((aligned(4096)));
static uint8_t bufs[MAX_DEPTH][MAX_SPB * 512] __attribute__((aligned(4096)));
static struct blk_req hdrs[MAX_DEPTH];
static volatile uint8_t statuses[MAX_DEPTH];
static uint32_t slot_block[MAX_DEPTH];   /* which block a slot carries */
static uint32_t write_hash[MAX_BLOCKS], read_hash[MAX_BLOCKS];
static char id[21];
static struct vdev dev;
static struct vq rq;

static uint32_t mode = MODE_VERIFY, nblocks = 64, spb = 8, stride, start, span, seed = 1, depth = 8, rnd;
static uint32_t rng;   /* random block choice */
static uint32_t use_irq, device_irq, interrupts, stray;

/* --- interrupts (irq=1): the 8259 PIC, as a PC BIOS sets it up ------------ */
#define PIC1_CMD  0x20
#define PIC2_CMD  0xa0
#define PIC_EOI   0x20
#define IRQ_BASE  0x20    /* vectors 0x20-0x2f */

static void pic_init(uint32_t irq)
{
    pic_remap(IRQ_BASE, IRQ_BASE + 8, (uint8_t)(irq < 8 ? ~(1u << irq) : ~(1u << 2)),
              (uint8_t)(irq < 8 ? 0xff : ~(1u << (irq - 8))));
}

/* Sleep until an interrupt; for the device's, acknowledge it (its level-triggered line goes low), then EOI. */
static void sleep_for_device(void)
{
    uint32_t vector = wait_for_interrupt();
    if (vector == IRQ_BASE + device_irq) {
        interrupts++;
        vdev_ack_interrupt(&dev);
    } else {
        stray++;
    }
    if (vector >= IRQ_BASE + 8)
        outb(PIC2_CMD, PIC_EOI);
    outb(PIC1_CMD, PIC_EOI);
}

static uint32_t fnv(uint32_t h, uint32_t word)
{
    return (h ^ word) * 16777619u;
}

static uint64_t block_sector(uint32_t k)
{
    return (uint64_t)start + (uint64_t)k * stride;
}

/* The verify pattern of a block: fills buf, returns its hash. */
static uint32_t fill_pattern(uint32_t *buf, uint64_t sector)
{
    uint32_t state = seed ^ ((uint32_t)sector * 0x9E3779B1u), h = 2166136261u;
    if (!state)
        state = 1;
    for (uint32_t i = 0; i < spb * 128; i++) {
        uint32_t w = xorshift32(&state);
        buf[i] = w;
        h = fnv(h, w);
    }
    return h;
}

static uint32_t hash_words(const uint32_t *buf)
{
    uint32_t h = 2166136261u;
    for (uint32_t i = 0; i < spb * 128; i++)
        h = fnv(h, buf[i]);
    return h;
}

/* Post request ``type`` in slot s: header, data (len bytes, device-writable for IN), status. */
static void submit(uint32_t s, uint32_t type, uint64_t sector, uint32_t len)
{
    volatile struct virtq_desc *d = &rq.desc[3 * s];
    hdrs[s].type = type;
    hdrs[s].reserved = 0;
    hdrs[s].sector = sector;
    statuses[s] = 0xff;
    d[0].addr = (uintptr_t)&hdrs[s];
    d[0].len = sizeof(struct blk_req);
    d[0].flags = VIRTQ_DESC_F_NEXT;
    d[0].next = (uint16_t)(3 * s + 1);
    if (len) {
        d[1].addr = (uintptr_t)bufs[s];
        d[1].len = len;
        d[1].flags = VIRTQ_DESC_F_NEXT | (type == T_IN || type == T_GET_ID ? VIRTQ_DESC_F_WRITE : 0);
        d[1].next = (uint16_t)(3 * s + 2);
    } else {
        d[0].next = (uint16_t)(3 * s + 2);
    }
    d[2].addr = (uintptr_t)&statuses[s];
    d[2].len = 1;
    d[2].flags = VIRTQ_DESC_F_WRITE;
    d[2].next = 0;
    vq_publish(&rq, (uint16_t)(3 * s));
}

/* Wait for one completion: its slot, or -1 after POLL_LIMIT empty polls. */
static int wait_one(uint32_t *len)
{
    uint32_t head;
    for (uint32_t polls = 0; polls < POLL_LIMIT; polls++) {
        if (vq_get_used(&rq, &head, len))
            return (int)(head / 3);
        if (use_irq)
            sleep_for_device();  /* an interrupt that came meanwhile is pending in the PIC: no wake-up is lost */
        else
            cpu_relax();
    }
    return -1;
}

/* One request, synchronously: its status, or -1 on a timeout. */
static int request(uint32_t type, uint64_t sector, uint32_t len)
{
    submit(0, type, sector, len);
    vq_kick(&dev, &rq);
    uint32_t n;
    if (wait_one(&n) != 0)
        return -1;
    return statuses[0];
}

static int parse_device(const char *cmdline, uintptr_t *base, uint32_t *irq)
{
    static const char key[] = "virtio_mmio.device=";
    for (const char *p = cmdline; *p; p++) {
        if ((p != cmdline && p[-1] != ' ') || memcmp(p, key, sizeof(key) - 1))
            continue;
        p += sizeof(key) - 1;
        while (*p && *p != '@')     /* the size: the window is 0x200 whatever it says */
            p++;
        if (*p++ != '@')
            return 0;
        uint32_t v = 0, b = 10;
        if (p[0] == '0' && p[1] == 'x') {
            b = 16;
            p += 2;
        }
        for (; (*p >= '0' && *p <= '9') || (b == 16 && *p >= 'a' && *p <= 'f'); p++)
            v = v * b + (uint32_t)(*p <= '9' ? *p - '0' : *p - 'a' + 10);
        *base = v;
        *irq = 0;
        if (*p == ':')
            for (p++; *p >= '0' && *p <= '9'; p++)
                *irq = *irq * 10 + (uint32_t)(*p - '0');
        return 1;
    }
    return 0;
}

static int find_device(const char *cmdline, uintptr_t *base, uint32_t *irq, const char **how)
{
    if (parse_device(cmdline, base, irq)) {
        *how = "cmdline";
        return vdev_probe_id(*base, VIRTIO_ID_BLOCK) == 0;
    }
    static const uintptr_t windows[] = {0xd0000000u, 0xfeb00000u};
    *how = "scan";
    *irq = 0;
    for (uint32_t w = 0; w < ARRAY_SIZE(windows); w++)
        for (uint32_t i = 0; i < 24; i++) {
            *base = windows[w] + 0x200 * i;
            if (vdev_probe_id(*base, VIRTIO_ID_BLOCK) == 0)
                return 1;
        }
    return 0;
}

/* Keep ``depth`` requests in flight over blocks 0..n-1 (verify, bench): 0, -1 for a request that
 * failed (its status in *bad), or the EXIT_* status of a failure already reported. */
static int run_blocks(uint32_t type, int verify, int random, uint32_t *bad)
{
    uint32_t next = 0, done = 0, inflight = 0, free_slots[MAX_DEPTH], nfree = depth;
    for (uint32_t s = 0; s < depth; s++)
        free_slots[s] = depth - 1 - s;
    uint32_t len = spb * 512;
    while (done < nblocks) {
        int posted = 0;
        while (nfree && next < nblocks) {
            uint32_t s = free_slots[--nfree];
            uint32_t k = random ? xorshift32(&rng) % span : next;
            slot_block[s] = next;
            if (verify && type == T_OUT)
                write_hash[next] = fill_pattern((uint32_t *)bufs[s], block_sector(k));
            submit(s, type, block_sector(k), len);
            next++;
            inflight++;
            posted = 1;
        }
        if (posted)
            vq_kick(&dev, &rq);
        uint32_t n;
        int s = wait_one(&n);
        if (s < 0 || (uint32_t)s >= depth)
            return fail(EXIT_TIMEOUT, "no completion (slot %d) after %u of %u requests", s, done, nblocks);
        if (statuses[s] != S_OK) {
            *bad = statuses[s];
            return -1;
        }
        if (type == T_IN && n != len + 1)
            return fail(EXIT_FAIL, "read of %u bytes came back with used length %u", len, n);
        if (verify && type == T_IN)
            read_hash[slot_block[s]] = hash_words((const uint32_t *)bufs[s]);
        free_slots[nfree++] = (uint32_t)s;
        inflight--;
        done++;
    }
    return 0;
}

static uint32_t combine(const uint32_t *hashes)
{
    uint32_t h = 2166136261u;
    for (uint32_t k = 0; k < nblocks; k++)
        h = fnv(h, hashes[k]);
    return h;
}

static int verify(uint32_t features)
{
    uint32_t bad = 0;
    if (features & (1u << VIRTIO_BLK_F_RO)) {
        int status = request(T_OUT, block_sector(0), spb * 512);
        print("ro_write: %d\n", status);
        if (status != S_IOERR)
            return fail(EXIT_FAIL, "a read-only disk answered a write with status %d, not IOERR", status);
    } else {
        int r = run_blocks(T_OUT, 1, 0, &bad);
        if (r < 0)
            return fail(EXIT_FAIL, "a write failed with status %u", bad);
        if (r)
            return r;
        print("written: blocks=%u checksum=0x%08x\n", nblocks, combine(write_hash));
        int status = request(T_FLUSH, 0, 0);
        if (status != S_OK)
            return fail(EXIT_FAIL, "flush failed with status %d", status);
        print("flushed: ok\n");
    }
    int r = run_blocks(T_IN, 1, 0, &bad);
    if (r < 0)
        return fail(EXIT_FAIL, "a read failed with status %u", bad);
    if (r)
        return r;
    print("read: blocks=%u checksum=0x%08x\n", nblocks, combine(read_hash));
    if (!(features & (1u << VIRTIO_BLK_F_RO)))
        for (uint32_t k = 0; k < nblocks; k++)
            if (read_hash[k] != write_hash[k])
                return fail(EXIT_FAIL, "block %u (sector %llu) reads back differently", k, block_sector(k));
    if (use_irq) {
        print("interrupts: %u\n", interrupts);
        if (!interrupts || stray)
            return fail(EXIT_FAIL, "%u device interrupts, %u stray ones", interrupts, stray);
    }
    return done_ok();
}

static int burst(void)
{
    uint32_t len = spb * 512, seq = 0, started = 0;
    uint32_t free_slots[MAX_DEPTH], nfree = depth;
    for (uint32_t s = 0; s < depth; s++)
        free_slots[s] = s;
    for (;;) {
        while (nfree) {
            uint32_t s = free_slots[--nfree];
            uint32_t k = rnd ? xorshift32(&rng) % span : seq % nblocks;
            uint64_t sector = block_sector(k);
            for (uint32_t i = 0; i < spb; i++) {
                uint32_t *w = (uint32_t *)(bufs[s] + 512 * i);
                w[0] = BURST_MAGIC;
                w[1] = (uint32_t)(sector + i);
                w[2] = seq;
            }
            submit(s, T_OUT, sector, len);
            seq++;
        }
        vq_kick(&dev, &rq);
        uint32_t n;
        int s = wait_one(&n);
        if (s < 0)
            return fail(EXIT_TIMEOUT, "no completion after %u writes", seq);
        if (statuses[s] != S_OK)
            return fail(EXIT_FAIL, "a write failed with status %u", statuses[s]);
        free_slots[nfree++] = (uint32_t)s;
        if (!started++)
            print("burst: started\n");
        else if (!(started & 1023))
            print("burst: %u\n", started);
    }
}

static int bench(void)
{
    uint32_t type = mode == MODE_SEQ_READ || mode == MODE_RAND_READ ? T_IN : T_OUT;
    int random = mode == MODE_RAND_READ || mode == MODE_RAND_WRITE;
    uint32_t bad = 0;
    uint64_t t0 = rdtsc();
    int r = run_blocks(type, 0, random, &bad);
    if (r < 0)
        return fail(EXIT_FAIL, "a request failed with status %u", bad);
    if (r)
        return r;
    uint64_t t1 = rdtsc();
    print("bench: mode=%u requests=%u bytes=%llu tsc=%llu\n", mode, nblocks,
          (uint64_t)nblocks * spb * 512, t1 - t0);
    if (use_irq)
        print("interrupts: %u\n", interrupts);
    return done_ok();
}

int guest_main(const struct multiboot_info *mbi)
{
    const char *cmdline = mb_cmdline(mbi);
    cmdline_u32(cmdline, "mode", &mode);
    cmdline_u32(cmdline, "n", &nblocks);
    cmdline_u32(cmdline, "spb", &spb);
    stride = spb;
    cmdline_u32(cmdline, "stride", &stride);
    cmdline_u32(cmdline, "start", &start);
    span = nblocks;
    cmdline_u32(cmdline, "span", &span);
    cmdline_u32(cmdline, "seed", &seed);
    cmdline_u32(cmdline, "depth", &depth);
    cmdline_u32(cmdline, "rand", &rnd);
    cmdline_u32(cmdline, "irq", &use_irq);
    rng = seed ? seed : 1;
    if (mode > MODE_RAND_WRITE || !spb || spb > MAX_SPB || !depth || depth > MAX_DEPTH || !nblocks || !span
        || (mode == MODE_VERIFY && nblocks > MAX_BLOCKS))
        return fail(EXIT_FAIL, "bad parameters (mode %u, n %u, spb %u, depth %u, span %u)", mode, nblocks, spb,
                    depth, span);

    uintptr_t base;
    uint32_t irq, features;
    const char *how;
    if (!find_device(cmdline, &base, &irq, &how))
        return fail(EXIT_MISSING, "no virtio-blk device (%s)", how);
    print("device: base=0x%x irq=%u from=%s\n", (uint32_t)base, irq, how);
    if (use_irq) {
        if (!irq || irq >= 16 || irq == 2)
            return fail(EXIT_MISSING, "irq=1 needs the device's IRQ (1-15) from virtio_mmio.device=");
        device_irq = irq;
        pic_init(irq);
    }
    int err = vdev_negotiate(&dev, base, VIRTIO_ID_BLOCK, WANTED, &features);
    if (err)
        return fail(EXIT_FAIL, "feature negotiation failed (code %d)", -err);
    if ((err = vq_setup(&dev, &rq, 0, ring_mem, QSIZE)) != 0)
        return fail(EXIT_FAIL, "queue set-up failed (code %d)", -err);
    if (!use_irq)
        rq.avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;  /* 2.7.7: a polling driver asks not to be interrupted */
    if ((err = vdev_driver_ok(&dev)) != 0)
        return fail(EXIT_FAIL, "DRIVER_OK refused (code %d)", -err);
    uint64_t capacity = vdev_config32(&dev, 0) | (uint64_t)vdev_config32(&dev, 4) << 32;
    print("features: 0x%x\n", features);
    print("capacity: %llu\n", capacity);
    if (features & (1u << VIRTIO_BLK_F_SEG_MAX))
        print("limits: seg_max=%u size_max=%u blk_size=%u\n", vdev_config32(&dev, 12), vdev_config32(&dev, 8),
              vdev_config32(&dev, 20));
    int status = request(T_GET_ID, 0, 20);
    memcpy(id, bufs[0], 20);
    print("id: status=%d text=", status);
    put_escaped(id, 20);
    put_char('\n');
    if (block_sector((nblocks > span ? nblocks : span) - 1) + spb > capacity)
        return fail(EXIT_FAIL, "the blocks do not fit the disk (%llu sectors)", capacity);
    if (mode == MODE_VERIFY)
        return verify(features);
    if (mode == MODE_BURST)
        return burst();
    return bench();
}
