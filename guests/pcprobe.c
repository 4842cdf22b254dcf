/*
 * pcprobe.c - guest_main of `pcprobe`: read what a PC's firmware-facing
 * devices say about the machine and cross-check them.
 *
 *   fw_cfg  the signature, the ID (bit 1: DMA), NB_CPUS, MAX_CPUS,
 *           RAM_SIZE, the file directory; with DMA, the DMA register's
 *           signature and the signature item read again by DMA.
 *   CMOS    the memory-size bytes as a PC BIOS reads them (0x15-0x18,
 *           0x30-0x31, 0x34-0x35, 0x5b-0x5d) and QEMU's CPU count (0x5f),
 *           status register D (bit 7: valid RAM and time), and that the
 *           seconds register, read under the UIP protocol, changes within
 *           SECONDS_TIMEOUT_MS.
 *   PCI     the host bridge at 00:00.0 and every function on bus 0.
 *   firmware what a BIOS leaves behind for the kernel: the PICs' masks, PIT
 *           channel 0 counting (two latched reads), the boot CPU's LAPIC
 *           (SVR, LINT0, LINT1), the BIOS data area's COM1 address and base
 *           memory size, and the IVT's INT 08h vector.
 *
 * Cross-checks: the DMA read gives "QEMU"; CMOS 0x5f + 1 = NB_CPUS; the
 * RAM the CMOS bytes describe = RAM_SIZE (where they can describe it: more
 * than 16 MiB below 4 GiB, not saturated).
 */
#include "pc.h"

#define FILES_MAX          64
#define SECONDS_TIMEOUT_MS 2500
#define CMOS_REG_D         0x0d
#define CMOS_D_VRT         0x80
#define MiB                (1024u * 1024u)

static int probe_fw_cfg(uint32_t *nb_cpus, uint64_t *ram_size)
{
    if (!fw_cfg_present()) {
        print("fw_cfg: absent\n");
        return fail(EXIT_MISSING, "no fw_cfg signature \"QEMU\" at port 0x510");
    }
    print("fw_cfg: present\n");
    print("fw_cfg_signature: QEMU\n");
    uint32_t id = fw_cfg_read_le(FW_CFG_ID, 4);
    *nb_cpus = fw_cfg_read_le(FW_CFG_NB_CPUS, 2);
    *ram_size = fw_cfg_read_le64(FW_CFG_RAM_SIZE);
    print("fw_cfg_id: 0x%x\n", id);
    print("fw_cfg_dma: %u\n", (id & FW_CFG_ID_DMA) ? 1u : 0u);
    print("fw_cfg_nb_cpus: %u\n", *nb_cpus);
    print("fw_cfg_max_cpus: %u\n", fw_cfg_read_le(FW_CFG_MAX_CPUS, 2));
    print("fw_cfg_ram_size: 0x%llx\n", *ram_size);

    uint32_t count;
    fw_cfg_select(FW_CFG_FILE_DIR);
    fw_cfg_read_data(&count, 4);
    count = be32(count);
    print("fw_cfg_files: %u\n", count);
    for (uint32_t i = 0; i < count && i < FILES_MAX; i++) {
        struct fw_cfg_file f;
        fw_cfg_read_data(&f, sizeof(f));
        f.name[sizeof(f.name) - 1] = 0;
        print("fw_cfg_file: select=0x%x size=%u name=", be16(f.select), be32(f.size));
        put_escaped(f.name, sizeof(f.name));
        put_char('\n');
    }

    if (id & FW_CFG_ID_DMA) {
        char reg[9], signature[5] = {0};
        fw_cfg_dma_signature(reg);
        print("fw_cfg_dma_register: ");
        put_escaped(reg, 8);
        put_char('\n');
        if (fw_cfg_dma_read(FW_CFG_SIGNATURE, signature, 4))
            return fail(EXIT_FAIL, "the fw_cfg DMA read of the signature failed");
        print("fw_cfg_dma_read: ");
        put_escaped(signature, 4);
        put_char('\n');
        if (memcmp(signature, "QEMU", 4))
            return fail(EXIT_FAIL, "the signature read by DMA is not \"QEMU\"");
    }
    return EXIT_OK;
}

static uint32_t cmos_word(uint8_t low_reg)
{
    return cmos_read(low_reg) | (uint32_t)cmos_read((uint8_t)(low_reg + 1)) << 8;
}

static int probe_cmos(uint32_t nb_cpus, uint64_t ram_size)
{
    uint32_t above_16m = cmos_word(0x34);
    uint32_t above_4g = cmos_word(0x5b) | (uint32_t)cmos_read(0x5d) << 16;
    uint32_t cpus_minus_1 = cmos_read(0x5f), reg_d = cmos_read(CMOS_REG_D);
    print("cmos_base_kib: %u\n", cmos_word(0x15));
    print("cmos_ext_kib: %u\n", cmos_word(0x17));
    print("cmos_ext2_kib: %u\n", cmos_word(0x30));
    print("cmos_above_16m_64k: %u\n", above_16m);
    print("cmos_above_4g_64k: %u\n", above_4g);
    print("cmos_cpus_minus_1: %u\n", cpus_minus_1);
    print("cmos_reg_d: 0x%x\n", reg_d);
    if (!(reg_d & CMOS_D_VRT))
        return fail(EXIT_FAIL, "CMOS register D says the RAM and time are not valid");
    if (cpus_minus_1 + 1 != nb_cpus)
        return fail(EXIT_FAIL, "CMOS 0x5f says %u CPUs, fw_cfg %u", cpus_minus_1 + 1, nb_cpus);
    if (above_16m && above_16m < 0xffff) {
        uint64_t ram = 16 * MiB + (uint64_t)above_16m * 65536 + (uint64_t)above_4g * 65536;
        print("cmos_ram_size: 0x%llx\n", ram);
        if (ram != ram_size)
            return fail(EXIT_FAIL, "the CMOS memory bytes describe 0x%llx bytes, fw_cfg 0x%llx", ram, ram_size);
    }

    uint8_t first = cmos_read_seconds(), now = first;
    uint64_t start = rdtsc(), deadline = deadline_ms(SECONDS_TIMEOUT_MS);
    while (now == first && !past(deadline))
        now = cmos_read_seconds();
    print("cmos_seconds_changed: %u\n", now != first ? 1u : 0u);
    print("cmos_seconds_wait_ms: %u\n", (uint32_t)udiv64(rdtsc() - start, tsc_khz, NULL));
    if (now == first)
        return fail(EXIT_TIMEOUT, "the RTC's seconds did not change within %u ms", SECONDS_TIMEOUT_MS);
    return EXIT_OK;
}

static void print_function(const char *key, uint32_t dev, uint32_t fn)
{
    uint32_t id = pci_config_read32(0, dev, fn, 0x00);
    uint32_t class = pci_config_read32(0, dev, fn, 0x08) >> 8;
    print("%s: bdf=00:%02x.%u vendor=0x%04x device=0x%04x class=0x%06x\n", key, dev, fn, id & 0xffff, id >> 16,
          class);
}

static int probe_pci(void)
{
    uint32_t host = pci_config_read32(0, 0, 0, 0x00), functions = 0;
    if ((host & 0xffff) == 0xffff)
        return fail(EXIT_MISSING, "no PCI host bridge at 00:00.0");
    print_function("pci_host", 0, 0);
    for (uint32_t dev = 0; dev < 32; dev++) {
        if ((pci_config_read32(0, dev, 0, 0x00) & 0xffff) == 0xffff)
            continue;
        uint32_t header_type = pci_config_read32(0, dev, 0, 0x0c) >> 16 & 0xff;
        uint32_t fns = header_type & 0x80 ? 8 : 1;     /* multi-function device */
        for (uint32_t fn = 0; fn < fns; fn++) {
            if (fn && (pci_config_read32(0, dev, fn, 0x00) & 0xffff) == 0xffff)
                continue;
            print_function("pci", dev, fn);
            functions++;
        }
    }
    print("pci_functions: %u\n", functions);
    return EXIT_OK;
}

static void probe_firmware_state(void)
{
    print("pic_master_mask: 0x%x\n", inb(0x21));
    print("pic_slave_mask: 0x%x\n", inb(0xa1));
    uint32_t counts[2];
    for (int i = 0; i < 2; i++) {
        outb(0x43, 0x00);                     /* latch channel 0's count (its access mode stays) */
        uint32_t lo = inb(0x40);
        counts[i] = lo | (uint32_t)inb(0x40) << 8;
        if (i == 0)
            delay_us(200);
    }
    print("pit0_counting: %u\n", counts[0] != counts[1] ? 1u : 0u);
    print("lapic_svr: 0x%x\n", lapic_read(LAPIC_SVR));
    print("lapic_lint0: 0x%x\n", lapic_read(0x350));
    print("lapic_lint1: 0x%x\n", lapic_read(0x360));
    uintptr_t low = 0;
    __asm__("" : "+r"(low));                   /* the first KiB is memory here, not a null pointer */
    print("bda_com1: 0x%x\n", mmio_read32(low + 0x400) & 0xffff);
    print("bda_base_kib: %u\n", mmio_read32(low + 0x413) & 0xffff);
    print("ivt_int08_set: %u\n", mmio_read32(low + 8 * 4) != 0 ? 1u : 0u);  /* offset, then segment */
}

int guest_main(const struct multiboot_info *mbi)
{
    (void)mbi;
    uint32_t nb_cpus = 0;
    uint64_t ram_size = 0;
    if (!tsc_calibrate_khz())
        return fail(EXIT_MISSING, "PIT channel 2 never counted down: no TSC rate");
    print("tsc_khz: %u\n", tsc_khz);
    int status = probe_fw_cfg(&nb_cpus, &ram_size);
    if (status == EXIT_OK)
        status = probe_cmos(nb_cpus, ram_size);
    if (status == EXIT_OK)
        status = probe_pci();
    if (status == EXIT_OK)
        probe_firmware_state();
    return status == EXIT_OK ? done_ok() : status;
}
