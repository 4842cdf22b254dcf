/*
 * pc.h - the PC platform as the Multiboot guests probe it: QEMU's fw_cfg,
 * the CMOS/RTC, PCI configuration mechanism #1, the PIT and the TSC, ACPI
 * tables, the local APIC and AP start-up.  Each part has its own .c file;
 * the specifications are named there.
 */
#ifndef PC_H
#define PC_H

#include "rt32.h"

/* --- fw_cfg (fwcfg.c; QEMU docs/specs/fw_cfg.rst) ----------------------------- */
#define FW_CFG_SIGNATURE    0x0000      /* "QEMU" */
#define FW_CFG_ID           0x0001      /* bit 0 traditional interface, bit 1 DMA */
#define FW_CFG_RAM_SIZE     0x0003      /* le64 */
#define FW_CFG_NB_CPUS      0x0005      /* le16, CPUs at boot */
#define FW_CFG_MAX_CPUS     0x000f      /* le16 */
#define FW_CFG_FILE_DIR     0x0019
#define FW_CFG_ID_DMA       0x02

struct fw_cfg_file {                    /* a file directory entry, big-endian */
    uint32_t size;
    uint16_t select;
    uint16_t reserved;
    char name[56];
};

int fw_cfg_present(void);               /* the selector-0 signature is "QEMU" */
void fw_cfg_select(uint16_t key);      /* and read from the item's start */
void fw_cfg_read_data(void *buf, uint32_t n);  /* the next n bytes of the selected item */
void fw_cfg_read(uint16_t key, void *buf, uint32_t n);  /* both */
uint32_t fw_cfg_read_le(uint16_t key, uint32_t bytes);      /* 1 to 4 bytes */
uint64_t fw_cfg_read_le64(uint16_t key);
/* Read n bytes of item key into buf by DMA: 0 on success, -1 on a device error
 * or when the transfer does not finish within a bounded number of polls. */
int fw_cfg_dma_read(uint16_t key, void *buf, uint32_t n);
/* What the DMA address register reads as: "QEMU CFG" where DMA exists. */
void fw_cfg_dma_signature(char out[9]);

/* --- CMOS / RTC (cmos.c; MC146818A data sheet) ------------------------------------ */
uint8_t cmos_read(uint8_t reg);
/* The seconds register, read as the RTC allows: only while UIP is clear. */
uint8_t cmos_read_seconds(void);

/* --- PCI configuration mechanism #1 (pci.c; PCI Local Bus 3.0, 3.2.2.3.2) ------- */
uint32_t pci_config_read32(uint32_t bus, uint32_t dev, uint32_t fn, uint32_t reg);

/* --- time: PIT channel 2 and the TSC (timer.c) ----------------------------------- */
/* The TSC's rate, from a PIT channel 2 one-shot of 50 ms (Linux's
 * pit_calibrate_tsc()); 0 if there is no PIT (timer.c). */
uint32_t tsc_calibrate_khz(void);
extern uint32_t tsc_khz;                /* set by tsc_calibrate_khz() */
void delay_us(uint32_t us);
/* A TSC deadline ms milliseconds from now. */
uint64_t deadline_ms(uint32_t ms);
static inline int past(uint64_t deadline)
{
    return rdtsc() >= deadline;
}

/* --- ACPI (acpi.c; ACPI 6.5, 5.2) -------------------------------------------------- */
struct acpi_header {
    char signature[4];
    uint32_t length;
    uint8_t revision, checksum;
    char oem_id[6], oem_table_id[8];
    uint32_t oem_revision, creator_id, creator_revision;
} __attribute__((packed));

struct acpi_rsdp {
    char signature[8];                  /* "RSD PTR " */
    uint8_t checksum;                   /* the first 20 bytes sum to 0 */
    char oem_id[6];
    uint8_t revision;                   /* 0: ACPI 1.0 (20 bytes); 2: 36 bytes, XSDT */
    uint32_t rsdt_address;
    uint32_t length;
    uint64_t xsdt_address;
    uint8_t extended_checksum;          /* all `length` bytes sum to 0 */
    uint8_t reserved[3];
} __attribute__((packed));

uint8_t acpi_sum(const void *p, uint32_t n);    /* 0 for a valid checksum */
/* The RSDP: the EBDA's first KiB, then 0xE0000-0xFFFFF, 16-byte steps
 * (5.2.5.1); NULL if none has a valid checksum. */
const struct acpi_rsdp *acpi_find_rsdp(void);
/* The RSDT, and the XSDT (revision >= 2, below 4 GiB); NULL if absent or
 * implausibly long. */
const struct acpi_header *acpi_rsdt(const struct acpi_rsdp *rsdp);
const struct acpi_header *acpi_xsdt(const struct acpi_rsdp *rsdp);
/* An RSDT's or XSDT's entries, and entry i (NULL for one out of reach). */
uint32_t acpi_sdt_count(const struct acpi_header *sdt);
const struct acpi_header *acpi_sdt_entry(const struct acpi_header *sdt, uint32_t i);
/* The first table with this signature (XSDT first, else RSDT), or NULL. */
const struct acpi_header *acpi_find(const struct acpi_rsdp *rsdp, const char *signature);

/* MADT (5.2.12) */
#define MADT_LOCAL_APIC     0
#define MADT_IO_APIC        1
#define MADT_OVERRIDE       2
#define MADT_LAPIC_ENABLED  0x1
#define MADT_X2APIC         9
/* The MADT entry after ``entry`` (the first for NULL); NULL at the end. */
const uint8_t *madt_next(const struct acpi_header *madt, const uint8_t *entry);
/* Enabled Processor Local APIC entries; their APIC IDs into ids[max]. */
uint32_t madt_cpus(const struct acpi_header *madt, uint32_t *ids, uint32_t max);

/* --- the local APIC, xAPIC mode (lapic.c; Intel SDM vol. 3, chapter 10) --------- */
#define LAPIC_BASE          0xfee00000
#define LAPIC_ID            0x020
#define LAPIC_EOI           0x0b0
#define LAPIC_SVR           0x0f0
#define LAPIC_ICR_LOW       0x300
#define LAPIC_ICR_HIGH      0x310
#define LAPIC_LVT_TIMER     0x320
#define LAPIC_TIMER_INITIAL 0x380
#define LAPIC_TIMER_DIVIDE  0x3e0
#define ICR_FIXED           0x00000
#define ICR_INIT            0x00500
#define ICR_STARTUP         0x00600
#define ICR_PENDING         0x01000     /* delivery status: send pending */
#define ICR_ASSERT          0x04000
#define ICR_LEVEL           0x08000
#define ICR_ALL_BUT_SELF    0xc0000
#define MSR_APIC_BASE       0x1b

static inline uint32_t lapic_read(uint32_t reg)
{
    return mmio_read32(LAPIC_BASE + reg);
}

static inline void lapic_write(uint32_t reg, uint32_t value)
{
    mmio_write32(LAPIC_BASE + reg, value);
}

uint32_t lapic_id(void);
void lapic_enable(uint32_t spurious_vector);    /* SVR bit 8: accept fixed interrupts */
/* Send icr_low to APIC ID dest (ignored by the shorthands); 0 once the APIC
 * accepted it, -1 if the delivery status stayed pending. */
int lapic_send_ipi(uint32_t dest, uint32_t icr_low);
static inline void lapic_eoi(void)
{
    lapic_write(LAPIC_EOI, 0);
}

/* --- AP start-up (smp.c, trampoline.S) ----------------------------------------- */
struct smp_result {
    uint32_t started;                   /* APs that reached ap_start() */
    uint32_t apic_ids[AP_MAX];          /* theirs, in arrival order */
    uint32_t apic_id_sum;               /* of every CPU, the BSP included */
};

/* What each AP runs after reporting in (interrupts off); NULL: halt. */
typedef void (*ap_main_fn)(uint32_t index, uint32_t apic_id);

/* INIT-SIPI-SIPI to all but self, then wait up to timeout_ms for
 * expected_aps to report in; fills *result either way.  Needs
 * tsc_calibrate_khz() first.  Returns EXIT_OK, EXIT_TIMEOUT (too few
 * reported in) or EXIT_FAIL (an IPI not accepted, or more APs than
 * AP_MAX). */
int smp_start_aps(uint32_t expected_aps, ap_main_fn ap_main, uint32_t timeout_ms, struct smp_result *result);
/* The CPUs the platform says it has: fw_cfg's NB_CPUS where fw_cfg answers,
 * else the MADT's enabled processors, else 0; *source names which. */
uint32_t platform_cpu_count(const char **source);

#endif /* PC_H */
