/*
 * ata.c - guest_main of `ata`: drive the primary IDE channel's ATA disk by
 * polled PIO (ATA/ATAPI-6 register interface, ATA8-ACS commands) and check
 * what it stores.
 *
 * The check (the default):
 *   1. software reset (SRST), nIEN set: the driver polls, no interrupts;
 *   2. IDENTIFY DEVICE: model, serial, firmware, the LBA28 and LBA48
 *      capacities, capability words, the integrity word's checksum;
 *   3. device 1 selected: its status (0 where there is none);
 *   4. writes a pattern over `sectors=N` sectors from `lba=L` (defaults 64
 *      and 0) in commands of up to CHUNK sectors, alternately WRITE SECTORS
 *      and WRITE SECTORS EXT; sector s's 32-bit word j is
 *      (s * 0x9E3779B1) ^ (j * 0x85EBCA77) ^ seed (`seed=`, default 0x1410);
 *   5. FLUSH CACHE and FLUSH CACHE EXT;
 *   6. reads it back (READ SECTORS / READ SECTORS EXT alternately) and
 *      compares; reports the Adler-32 of what it wrote and of what it read;
 *   7. the errors: READ SECTORS EXT of the sector past the last, and
 *      IDENTIFY PACKET DEVICE (an ATA disk aborts it): status and error.
 *
 * The benchmark (`bench=1`): 4 KiB requests (8 sectors, one command each)
 * over the first `region=` sectors (default 2048: 1 MiB), `ops=K` of each
 * workload in the `workloads=` mask (1 sequential read, 2 sequential
 * write, 4 random read, 8 random write; default 15), each timed with the
 * TSC: `bench: workload=NAME ops=K bytes=B cycles=C`.  The data port is
 * moved with `rep insw`/`rep outsw` as Linux's ata_sff_data_xfer does (KVM
 * reads `rep insw` ahead, one exit per sector, but emulates `rep outsw` one
 * word, one exit, at a time), or with `word=1` one `inw`/`outw` per 16 bits
 * (one exit per 2 bytes both ways: the textbook cost of full emulation).
 *
 * `tsc_khz=K` gives the TSC rate instead of calibrating it against the PIT.
 *
 * No IRQ is needed: nIEN stays set and the driver polls BSY/DRQ, each wait
 * bounded (EXIT_TIMEOUT).
 */
#include "pc.h"

#define ATA_DATA        0x1f0
#define ATA_ERROR       0x1f1
#define ATA_FEATURES    0x1f1
#define ATA_COUNT       0x1f2
#define ATA_LBA_LOW     0x1f3
#define ATA_LBA_MID     0x1f4
#define ATA_LBA_HIGH    0x1f5
#define ATA_DEVICE      0x1f6
#define ATA_STATUS      0x1f7
#define ATA_COMMAND     0x1f7
#define ATA_CONTROL     0x3f6           /* alternate status on reads */

#define ST_BSY  0x80
#define ST_DRDY 0x40
#define ST_DF   0x20
#define ST_DRQ  0x08
#define ST_ERR  0x01
#define CTL_NIEN 0x02
#define CTL_SRST 0x04

#define CMD_READ_SECTORS      0x20
#define CMD_READ_SECTORS_EXT  0x24
#define CMD_WRITE_SECTORS     0x30
#define CMD_WRITE_SECTORS_EXT 0x34
#define CMD_IDENTIFY_PACKET   0xa1
#define CMD_FLUSH_CACHE       0xe7
#define CMD_FLUSH_CACHE_EXT   0xea
#define CMD_IDENTIFY          0xec

#define SECTOR          512
#define CHUNK           16              /* sectors per command in the check */
#define BENCH_SECTORS   8               /* 4 KiB per request */
#define POLL_LIMIT      1000000u        /* status reads: each one an exit */
#define RESET_TIMEOUT_MS 2000

static uint16_t identify_words[256];
static uint8_t buffer[CHUNK * SECTOR] __attribute__((aligned(SECTOR)));
static uint8_t expected[CHUNK * SECTOR] __attribute__((aligned(SECTOR)));
static int word_pio;                    /* 1: inw/outw per word; 0: rep insw/outsw */
static int timed_out;

/* The 400 ns a host waits after writing the command (four alternate-status reads). */
static void ata_delay(void)
{
    for (int i = 0; i < 4; i++)
        (void)inb(ATA_CONTROL);
}

/* Status once BSY is clear (ST_BSY if the wait ran out). */
static uint8_t ata_wait(void)
{
    for (uint32_t i = 0; i < POLL_LIMIT; i++) {
        uint8_t status = inb(ATA_STATUS);
        if (!(status & ST_BSY))
            return status;
    }
    timed_out = 1;
    return ST_BSY;
}

static void pio_in(void *dst)
{
    if (word_pio) {
        uint16_t *p = dst;
        for (int i = 0; i < SECTOR / 2; i++)
            p[i] = inw(ATA_DATA);
    } else {
        uint32_t n = SECTOR / 2;
        __asm__ __volatile__("cld; rep insw" : "+D"(dst), "+c"(n) : "d"(ATA_DATA) : "memory");
    }
}

static void pio_out(const void *src)
{
    if (word_pio) {
        const uint16_t *p = src;
        for (int i = 0; i < SECTOR / 2; i++)
            outw(ATA_DATA, p[i]);
    } else {
        uint32_t n = SECTOR / 2;
        __asm__ __volatile__("cld; rep outsw" : "+S"(src), "+c"(n) : "d"(ATA_DATA) : "memory");
    }
}

/* Load the task file for count sectors at lba: LBA48 (ext) or LBA28. */
static void ata_task_file(uint64_t lba, uint32_t count, int ext)
{
    if (ext) {
        outb(ATA_DEVICE, 0x40);
        outb(ATA_COUNT, (uint8_t)(count >> 8));
        outb(ATA_LBA_LOW, (uint8_t)(lba >> 24));
        outb(ATA_LBA_MID, (uint8_t)(lba >> 32));
        outb(ATA_LBA_HIGH, (uint8_t)(lba >> 40));
    } else {
        outb(ATA_DEVICE, (uint8_t)(0xe0 | ((lba >> 24) & 0x0f)));
    }
    outb(ATA_COUNT, (uint8_t)count);
    outb(ATA_LBA_LOW, (uint8_t)lba);
    outb(ATA_LBA_MID, (uint8_t)(lba >> 8));
    outb(ATA_LBA_HIGH, (uint8_t)(lba >> 16));
}

/* A PIO data-in command of count sectors into buf; the final status (ERR set on failure). */
static uint8_t ata_read(uint64_t lba, uint32_t count, int ext, uint8_t *buf)
{
    ata_task_file(lba, count, ext);
    outb(ATA_COMMAND, ext ? CMD_READ_SECTORS_EXT : CMD_READ_SECTORS);
    ata_delay();
    for (uint32_t i = 0; i < count; i++) {
        uint8_t status = ata_wait();
        if (status & (ST_ERR | ST_DF | ST_BSY) || !(status & ST_DRQ))
            return status | ST_ERR;
        pio_in(buf + i * SECTOR);
    }
    return ata_wait();
}

static uint8_t ata_write(uint64_t lba, uint32_t count, int ext, const uint8_t *buf)
{
    ata_task_file(lba, count, ext);
    outb(ATA_COMMAND, ext ? CMD_WRITE_SECTORS_EXT : CMD_WRITE_SECTORS);
    ata_delay();
    for (uint32_t i = 0; i < count; i++) {
        uint8_t status = ata_wait();
        if (status & (ST_ERR | ST_DF | ST_BSY) || !(status & ST_DRQ))
            return status | ST_ERR;
        pio_out(buf + i * SECTOR);
    }
    return ata_wait();
}

static uint8_t ata_simple(uint8_t command)
{
    outb(ATA_DEVICE, 0xa0);
    outb(ATA_COMMAND, command);
    ata_delay();
    return ata_wait();
}

static void fill_pattern(uint8_t *buf, uint64_t first, uint32_t count, uint32_t seed)
{
    uint32_t *w = (uint32_t *)buf;
    for (uint32_t s = 0; s < count; s++) {
        uint32_t base = (uint32_t)(first + s) * 0x9e3779b1u ^ seed;
        for (uint32_t j = 0; j < SECTOR / 4; j++)
            *w++ = base ^ j * 0x85ebca77u;
    }
}

/* An IDENTIFY string: words first..last, the first character in each high byte. */
static void print_ata_string(const char *key, int first, int last)
{
    char text[48];
    int n = 0;
    for (int i = first; i <= last; i++) {
        text[n++] = (char)(identify_words[i] >> 8);
        text[n++] = (char)identify_words[i];
    }
    while (n > 0 && text[n - 1] == ' ')
        n--;
    text[n] = 0;
    print("%s: ", key);
    put_escaped(text, (uint32_t)n);
    put_char('\n');
}

static int ata_reset(void)
{
    uint8_t floating = inb(ATA_STATUS);
    if (floating == 0xff || floating == 0x7f)   /* nothing drives the bus (0x7f: DD7's pull-down) */
        return fail(EXIT_MISSING, "no ATA device on the primary channel (status 0x%x)", floating);
    outb(ATA_CONTROL, CTL_NIEN | CTL_SRST);
    delay_us(5);                        /* SRST held at least 5 us */
    outb(ATA_CONTROL, CTL_NIEN);
    delay_us(2000);                     /* BSY within 400 ns; the device has 2 ms before we look */
    /* Select device 0 until it answers: after a reset a host re-selects the
     * device (Linux's ata_sff_wait_after_reset does); QEMU performs SRST
     * later, in its main loop, and its reset may leave device 1 selected. */
    uint8_t status = 0;
    uint64_t deadline = deadline_ms(RESET_TIMEOUT_MS);
    do {
        outb(ATA_DEVICE, 0xa0);
        ata_delay();
        status = ata_wait();
    } while ((status == 0 || status & ST_BSY) && !past(deadline));
    timed_out = 0;
    print("reset_status: 0x%x\n", status);
    print("signature: %u %u %u %u\n", inb(ATA_COUNT), inb(ATA_LBA_LOW), inb(ATA_LBA_MID), inb(ATA_LBA_HIGH));
    if (status == 0xff || status == 0x7f || status == 0)
        return fail(EXIT_MISSING, "no ATA device 0 on the primary channel (status 0x%x)", status);
    if (status & ST_BSY)
        return fail(EXIT_TIMEOUT, "the disk stayed busy after the reset");
    return EXIT_OK;
}

static int ata_identify(uint64_t *sectors)
{
    uint8_t status = ata_simple(CMD_IDENTIFY);
    if (status & (ST_ERR | ST_BSY) || !(status & ST_DRQ))
        return fail(EXIT_FAIL, "IDENTIFY DEVICE: status 0x%x error 0x%x", status, inb(ATA_ERROR));
    pio_in(identify_words);
    uint8_t sum = 0;
    for (int i = 0; i < SECTOR; i++)
        sum = (uint8_t)(sum + ((uint8_t *)identify_words)[i]);
    uint32_t lba28 = identify_words[60] | (uint32_t)identify_words[61] << 16;
    uint64_t lba48 = 0;
    for (int i = 3; i >= 0; i--)
        lba48 = lba48 << 16 | identify_words[100 + i];
    int has48 = identify_words[83] & (1u << 10);
    *sectors = has48 ? lba48 : lba28;
    print_ata_string("model", 27, 46);
    print_ata_string("serial", 10, 19);
    print_ata_string("firmware", 23, 26);
    print("identify: lba28_sectors=%u lba48_sectors=%llu w0=0x%x w49=0x%x w83=0x%x w86=0x%x "
          "integrity=0x%x sum=0x%x\n", lba28, lba48, identify_words[0], identify_words[49],
          identify_words[83], identify_words[86], identify_words[255], sum);
    print("capacity_sectors: %llu\n", *sectors);
    print("capacity_bytes: %llu\n", *sectors * SECTOR);
    print("after_identify_status: 0x%x\n", ata_wait());
    return EXIT_OK;
}

static int check(const char *cmdline, uint64_t capacity)
{
    uint32_t n = 64, lba = 0, seed = 0x1410;
    cmdline_u32(cmdline, "sectors", &n);
    cmdline_u32(cmdline, "lba", &lba);
    cmdline_u32(cmdline, "seed", &seed);
    if ((uint64_t)lba + n > capacity)
        return fail(EXIT_FAIL, "sectors=%u from lba=%u do not fit the %llu-sector disk", n, lba, capacity);
    print("check: lba=%u sectors=%u seed=0x%x\n", lba, n, seed);

    uint32_t written = 1, read = 1, mismatches = 0, commands = 0;
    for (uint32_t done = 0; done < n; done += CHUNK, commands++) {
        uint32_t count = n - done < CHUNK ? n - done : CHUNK;
        fill_pattern(expected, lba + done, count, seed);
        written = adler32(written, expected, count * SECTOR);
        uint8_t status = ata_write(lba + done, count, (int)(commands & 1), expected);
        if (status & (ST_ERR | ST_DF | ST_BSY))
            return fail(EXIT_FAIL, "write at %u: status 0x%x error 0x%x", lba + done, status, inb(ATA_ERROR));
    }
    uint8_t flush = ata_simple(CMD_FLUSH_CACHE), flush_ext = ata_simple(CMD_FLUSH_CACHE_EXT);
    print("flush: status=0x%x ext_status=0x%x\n", flush, flush_ext);
    if ((flush | flush_ext) & (ST_ERR | ST_DF | ST_BSY))
        return fail(EXIT_FAIL, "FLUSH CACHE failed");
    commands = 0;
    for (uint32_t done = 0; done < n; done += CHUNK, commands++) {
        uint32_t count = n - done < CHUNK ? n - done : CHUNK;
        uint8_t status = ata_read(lba + done, count, (int)(commands & 1), buffer);
        if (status & (ST_ERR | ST_DF | ST_BSY))
            return fail(EXIT_FAIL, "read at %u: status 0x%x error 0x%x", lba + done, status, inb(ATA_ERROR));
        read = adler32(read, buffer, count * SECTOR);
        fill_pattern(expected, lba + done, count, seed);
        for (uint32_t s = 0; s < count; s++)
            mismatches += memcmp(buffer + s * SECTOR, expected + s * SECTOR, SECTOR) != 0;
    }
    print("written_adler32: 0x%08x\n", written);
    print("read_adler32: 0x%08x\n", read);
    print("mismatched_sectors: %u\n", mismatches);

    /* The errors: the sector past the last; a command an ATA disk aborts. */
    uint8_t status = ata_read(capacity, 1, 1, buffer);
    print("beyond_end: status=0x%x error=0x%x\n", ata_wait(), inb(ATA_ERROR));
    (void)status;
    status = ata_simple(CMD_IDENTIFY_PACKET);
    print("identify_packet: status=0x%x error=0x%x\n", status, inb(ATA_ERROR));
    if (mismatches)
        return fail(EXIT_FAIL, "%u sectors read back differ from what was written", mismatches);
    return EXIT_OK;
}

static int bench(const char *cmdline, uint64_t capacity)
{
    static const char *const names[4] = {"seq-read", "seq-write", "rand-read", "rand-write"};
    uint32_t region = 2048, ops = 256, workloads = 15;
    cmdline_u32(cmdline, "region", &region);
    cmdline_u32(cmdline, "ops", &ops);
    cmdline_u32(cmdline, "workloads", &workloads);
    region -= region % BENCH_SECTORS;
    if (region == 0 || region > capacity)
        return fail(EXIT_FAIL, "region=%u sectors does not fit the %llu-sector disk", region, capacity);
    print("bench_config: region=%u ops=%u pio=%s request_bytes=%u\n", region, ops,
          word_pio ? "word" : "rep", BENCH_SECTORS * SECTOR);
    fill_pattern(buffer, 0, BENCH_SECTORS, 0x4b1d);
    for (uint32_t w = 0; w < 4; w++) {
        if (!(workloads & (1u << w)))
            continue;
        int write = w & 1, random = w >> 1;
        uint32_t state = 0x2545f491u, slots = region / BENCH_SECTORS;
        uint64_t start = rdtsc();
        for (uint32_t i = 0; i < ops; i++) {
            uint32_t slot = random ? xorshift32(&state) % slots : i % slots;
            uint32_t lba = slot * BENCH_SECTORS;
            uint8_t status = write ? ata_write(lba, BENCH_SECTORS, 0, buffer)
                                   : ata_read(lba, BENCH_SECTORS, 0, buffer);
            if (status & (ST_ERR | ST_DF | ST_BSY))
                return fail(EXIT_FAIL, "%s at %u: status 0x%x error 0x%x", names[w], lba, status,
                            inb(ATA_ERROR));
        }
        uint64_t cycles = rdtsc() - start;
        print("bench: workload=%s ops=%u bytes=%u cycles=%llu\n", names[w], ops, ops * BENCH_SECTORS * SECTOR,
              cycles);
    }
    return EXIT_OK;
}

int guest_main(const struct multiboot_info *mbi)
{
    const char *cmdline = mb_cmdline(mbi);
    uint32_t value = 0;
    word_pio = cmdline_u32(cmdline, "word", &value) && value;
    int benchmark = cmdline_u32(cmdline, "bench", &value) && value;
    print("pio: %s\n", word_pio ? "word" : "rep");
    /* `tsc_khz=` skips the PIT calibration: its polls of port 0x61 are exits a
     * benchmark would have to subtract, and their number varies. */
    if (!cmdline_u32(cmdline, "tsc_khz", &tsc_khz) || tsc_khz == 0)
        tsc_calibrate_khz();
    print("tsc_khz: %u\n", tsc_khz);
    int status = ata_reset();
    if (status != EXIT_OK)
        return status;
    outb(ATA_DEVICE, 0xb0);             /* device 1: absent, its status reads 0 */
    print("slave_status: 0x%x\n", inb(ATA_STATUS));
    outb(ATA_DEVICE, 0xa0);
    uint64_t capacity = 0;
    status = ata_identify(&capacity);
    if (status != EXIT_OK)
        return status;
    status = benchmark ? bench(cmdline, capacity) : check(cmdline, capacity);
    if (status != EXIT_OK)
        return status;
    if (timed_out)
        return fail(EXIT_TIMEOUT, "a wait for BSY to clear ran out");
    return done_ok();
}
