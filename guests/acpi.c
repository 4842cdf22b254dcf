/*
 * acpi.c - finding and walking the ACPI tables (ACPI 6.5, 5.2): the RSDP
 * by its signature and checksum in the EBDA's first KiB and in
 * 0xE0000-0xFFFFF on 16-byte boundaries (5.2.5.1), the RSDT (4-byte
 * entries) and XSDT (8-byte entries) it points at (5.2.7, 5.2.8), and the
 * MADT's interrupt controller structures (5.2.12).
 *
 * Every length read from memory is bounded before it is used, so garbage
 * where a table should be ends a walk instead of running through memory.
 */
#include "pc.h"

#define BDA_EBDA_SEGMENT 0x40e          /* the BIOS data area's EBDA segment word */
#define RSDP_V1_LENGTH   20
#define SDT_MAX_LENGTH   0x100000       /* no table here is larger */
#define MADT_ENTRIES     44             /* header, local APIC address, flags */

uint8_t acpi_sum(const void *p, uint32_t n)
{
    const uint8_t *b = p;
    uint8_t sum = 0;
    while (n--)
        sum = (uint8_t)(sum + *b++);
    return sum;
}

static const struct acpi_rsdp *scan_rsdp(uintptr_t start, uintptr_t end)
{
    for (uintptr_t p = start; p + RSDP_V1_LENGTH <= end; p += 16) {
        const char *s = phys(p);
        if (s[0] == 'R' && !memcmp(s, "RSD PTR ", 8) && !acpi_sum(s, RSDP_V1_LENGTH))
            return (const struct acpi_rsdp *)s;
    }
    return NULL;
}

const struct acpi_rsdp *acpi_find_rsdp(void)
{
    uintptr_t ebda = (uintptr_t)*(const volatile uint16_t *)phys(BDA_EBDA_SEGMENT) << 4;
    const struct acpi_rsdp *rsdp = NULL;
    if (ebda >= 0x80000 && ebda < 0xa0000)      /* a plausible EBDA only */
        rsdp = scan_rsdp(ebda, ebda + 1024);
    return rsdp ? rsdp : scan_rsdp(0xe0000, 0x100000);
}

static const struct acpi_header *sdt_at(uint64_t addr)
{
    if (!addr || addr >> 32)
        return NULL;                    /* nothing, or out of a 32-bit guest's reach */
    const struct acpi_header *h = phys((uintptr_t)addr);
    return h->length >= sizeof(*h) && h->length <= SDT_MAX_LENGTH ? h : NULL;
}

const struct acpi_header *acpi_rsdt(const struct acpi_rsdp *rsdp)
{
    return sdt_at(rsdp->rsdt_address);
}

const struct acpi_header *acpi_xsdt(const struct acpi_rsdp *rsdp)
{
    return rsdp->revision >= 2 ? sdt_at(rsdp->xsdt_address) : NULL;
}

static uint32_t sdt_entry_size(const struct acpi_header *sdt)
{
    return memcmp(sdt->signature, "XSDT", 4) ? 4 : 8;
}

uint32_t acpi_sdt_count(const struct acpi_header *sdt)
{
    return (sdt->length - (uint32_t)sizeof(*sdt)) / sdt_entry_size(sdt);
}

const struct acpi_header *acpi_sdt_entry(const struct acpi_header *sdt, uint32_t i)
{
    const uint8_t *entries = (const uint8_t *)(sdt + 1);
    uint64_t addr;
    if (sdt_entry_size(sdt) == 8)
        memcpy(&addr, entries + 8 * i, 8);      /* XSDT entries are not 8-byte aligned */
    else
        addr = *(const uint32_t *)(entries + 4 * i);
    return sdt_at(addr);
}

const struct acpi_header *acpi_find(const struct acpi_rsdp *rsdp, const char *signature)
{
    const struct acpi_header *root = acpi_xsdt(rsdp);
    if (!root)
        root = acpi_rsdt(rsdp);
    if (!root)
        return NULL;
    for (uint32_t i = 0, n = acpi_sdt_count(root); i < n; i++) {
        const struct acpi_header *t = acpi_sdt_entry(root, i);
        if (t && !memcmp(t->signature, signature, 4))
            return t;
    }
    return NULL;
}

const uint8_t *madt_next(const struct acpi_header *madt, const uint8_t *entry)
{
    const uint8_t *end = (const uint8_t *)madt + madt->length;
    entry = entry ? entry + entry[1] : (const uint8_t *)madt + MADT_ENTRIES;
    if (entry + 2 > end || entry[1] < 2 || entry + entry[1] > end)
        return NULL;                    /* the end, or an entry that does not fit */
    return entry;
}

uint32_t madt_cpus(const struct acpi_header *madt, uint32_t *ids, uint32_t max)
{
    uint32_t n = 0;
    for (const uint8_t *e = madt_next(madt, NULL); e; e = madt_next(madt, e)) {
        uint32_t id, flags;
        if (e[0] == MADT_LOCAL_APIC && e[1] >= 8) {
            id = e[3];
            flags = *(const uint32_t *)(e + 4);
        } else if (e[0] == MADT_X2APIC && e[1] >= 16) {
            id = *(const uint32_t *)(e + 4);
            flags = *(const uint32_t *)(e + 8);
        } else {
            continue;
        }
        if (!(flags & MADT_LAPIC_ENABLED))
            continue;
        if (n < max)
            ids[n] = id;
        n++;
    }
    return n;
}
