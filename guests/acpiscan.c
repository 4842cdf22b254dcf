/*
 * acpiscan.c - guest_main of `acpiscan`: find and check the ACPI tables
 * as an OS does (ACPI 6.5, 5.2), then measure the PM timer.
 *
 *   - the RSDP (acpi.c: the EBDA's first KiB, then 0xE0000-0xFFFFF), its
 *     checksum and, for revision >= 2, its extended checksum;
 *   - the RSDT and, where present below 4 GiB, the XSDT: every table they
 *     list, and the DSDT the FADT points at, with its signature, length
 *     and checksum;
 *   - the MADT (5.2.12): enabled Processor Local APICs, the I/O APICs and
 *     the interrupt source overrides;
 *   - the FADT's PM_TMR_BLK (5.2.9; X_PM_TMR_BLK where only it is set),
 *     read twice around a TSC-timed PM_WINDOW_MS; the TSC's rate comes
 *     from PIT channel 2 (timer.c), and the PM timer's must come out at
 *     3.579545 MHz within PM_TOLERANCE_PPM (4.8.2.1).
 */
#include "pc.h"

#define PM_TIMER_HZ       3579545
#define PM_TOLERANCE_PPM  20000         /* 2 %: the TSC's own calibration is good to 0.2 % */
#define PM_WINDOW_MS      100           /* a 24-bit PM timer wraps after 4.7 s */
#define PM_READ_TRIES     5

/* FADT fields (5.2.9, table 5.9): byte offsets */
#define FADT_DSDT         40
#define FADT_PM_TMR_BLK   76
#define FADT_PM_TMR_LEN   91
#define FADT_FLAGS        112
#define FADT_X_DSDT       140
#define FADT_X_PM_TMR_BLK 208           /* a Generic Address Structure: space id, ..., address at +4 */
#define FADT_TMR_VAL_EXT  (1u << 8)     /* a 32-bit PM timer (else 24-bit) */
#define GAS_SYSTEM_IO     1

static uint32_t tables_bad;

static uint32_t field32(const struct acpi_header *t, uint32_t offset)
{
    return offset + 4 <= t->length ? *(const uint32_t *)((const uint8_t *)t + offset) : 0;
}

static uint64_t field64(const struct acpi_header *t, uint32_t offset)
{
    uint64_t v = 0;
    if (offset + 8 <= t->length)
        memcpy(&v, (const uint8_t *)t + offset, 8);
    return v;
}

/* `table: via=.. sig=.. addr=.. length=.. revision=.. checksum=ok|bad` */
static void print_table(const char *via, const struct acpi_header *t)
{
    int ok = !acpi_sum(t, t->length);
    print("table: via=%s sig=", via);
    put_escaped(t->signature, 4);
    print(" addr=0x%x length=%u revision=%u checksum=%s\n", (uint32_t)(uintptr_t)t, t->length, t->revision,
          ok ? "ok" : "bad");
    if (!ok)
        tables_bad++;
}

static void walk_sdt(const char *name, const struct acpi_header *sdt)
{
    int ok = !acpi_sum(sdt, sdt->length);
    uint32_t n = acpi_sdt_count(sdt);
    print("%s: addr=0x%x length=%u entries=%u checksum=%s\n", name, (uint32_t)(uintptr_t)sdt, sdt->length, n,
          ok ? "ok" : "bad");
    if (!ok)
        tables_bad++;
    for (uint32_t i = 0; i < n; i++) {
        const struct acpi_header *t = acpi_sdt_entry(sdt, i);
        if (t)
            print_table(name, t);
        else
            print("table: via=%s missing=%u\n", name, i);
    }
}

static void print_madt(const struct acpi_header *madt)
{
    print("madt: addr=0x%x lapic_addr=0x%x flags=0x%x\n", (uint32_t)(uintptr_t)madt, field32(madt, 36),
          field32(madt, 40));
    for (const uint8_t *e = madt_next(madt, NULL); e; e = madt_next(madt, e)) {
        if (e[0] == MADT_LOCAL_APIC && e[1] >= 8)
            print("madt_lapic: uid=%u apic_id=%u flags=0x%x\n", e[2], e[3], *(const uint32_t *)(e + 4));
        else if (e[0] == MADT_IO_APIC && e[1] >= 12)
            print("ioapic: id=%u addr=0x%x gsi_base=%u\n", e[2], *(const uint32_t *)(e + 4),
                  *(const uint32_t *)(e + 8));
        else if (e[0] == MADT_OVERRIDE && e[1] >= 10)
            print("iso: bus=%u source=%u gsi=%u flags=0x%x\n", e[2], e[3], *(const uint32_t *)(e + 4),
                  *(const uint16_t *)(e + 8));
    }
    print("madt_cpus: %u\n", madt_cpus(madt, NULL, 0));
}

/* The PM timer's port from the FADT, 0 if it has none. */
static uint32_t pm_timer_port(const struct acpi_header *fadt)
{
    uint32_t port = field32(fadt, FADT_PM_TMR_BLK);
    const uint8_t *gas = (const uint8_t *)fadt + FADT_X_PM_TMR_BLK;
    if (!port && FADT_X_PM_TMR_BLK + 12 <= fadt->length && gas[0] == GAS_SYSTEM_IO)
        port = (uint32_t)field64(fadt, FADT_X_PM_TMR_BLK + 4);
    return port < 0x10000 ? port : 0;
}

/* PM-timer and TSC ticks over PM_WINDOW_MS; each reading of the PM timer
 * is bracketed by two TSC reads, and a try whose bracket is long (the vCPU
 * was preempted) is repeated. */
static void measure_pm_timer(uint16_t port, uint32_t mask, uint32_t *pm_ticks, uint64_t *tsc_ticks)
{
    uint64_t window = (uint64_t)PM_WINDOW_MS * tsc_khz, slack = udiv64(window, 1000, NULL);
    for (int try = 0; try < PM_READ_TRIES; try++) {
        uint64_t a0 = rdtsc();
        uint32_t p0 = inl(port);
        uint64_t b0 = rdtsc();
        while (rdtsc() < b0 + window)
            cpu_relax();
        uint64_t a1 = rdtsc();
        uint32_t p1 = inl(port);
        uint64_t b1 = rdtsc();
        *pm_ticks = (p1 - p0) & mask;
        *tsc_ticks = ((a1 + b1) >> 1) - ((a0 + b0) >> 1);     /* between the brackets' middles */
        if (b0 - a0 < slack && b1 - a1 < slack)
            return;
    }
}

static int check_pm_timer(const struct acpi_header *fadt)
{
    uint32_t port = pm_timer_port(fadt), flags = field32(fadt, FADT_FLAGS);
    uint32_t mask = flags & FADT_TMR_VAL_EXT ? 0xffffffffu : 0xffffffu;
    print("pm_tmr_blk: 0x%x\n", port);
    print("pm_tmr_len: %u\n", FADT_PM_TMR_LEN < fadt->length ? ((const uint8_t *)fadt)[FADT_PM_TMR_LEN] : 0u);
    print("pm_tmr_32bit: %u\n", mask == 0xffffffffu ? 1u : 0u);
    if (!port)
        return fail(EXIT_MISSING, "the FADT has no PM timer block");
    if (!tsc_calibrate_khz())
        return fail(EXIT_MISSING, "PIT channel 2 never counted down: no TSC rate");
    print("tsc_khz: %u\n", tsc_khz);

    uint32_t pm_ticks;
    uint64_t tsc_ticks;
    measure_pm_timer((uint16_t)port, mask, &pm_ticks, &tsc_ticks);
    if (!tsc_ticks || tsc_ticks >> 32)
        return fail(EXIT_FAIL, "a %u ms TSC window of 0x%llx ticks", PM_WINDOW_MS, tsc_ticks);
    uint32_t hz = (uint32_t)udiv64((uint64_t)pm_ticks * tsc_khz * 1000, (uint32_t)tsc_ticks, NULL);
    uint32_t off = hz > PM_TIMER_HZ ? hz - PM_TIMER_HZ : PM_TIMER_HZ - hz;
    print("pm_ticks: %u\n", pm_ticks);
    print("tsc_ticks: %llu\n", tsc_ticks);
    print("pm_timer_hz: %u\n", hz);
    if ((uint64_t)off * 1000000 > (uint64_t)PM_TIMER_HZ * PM_TOLERANCE_PPM)
        return fail(EXIT_FAIL, "the PM timer runs at %u Hz, not %u Hz within %u ppm", hz, PM_TIMER_HZ,
                    PM_TOLERANCE_PPM);
    return EXIT_OK;
}

int guest_main(const struct multiboot_info *mbi)
{
    (void)mbi;
    const struct acpi_rsdp *rsdp = acpi_find_rsdp();
    if (!rsdp)
        return fail(EXIT_MISSING, "no RSDP in the EBDA or 0xE0000-0xFFFFF");
    print("rsdp: addr=0x%x revision=%u rsdt=0x%x oem=", (uint32_t)(uintptr_t)rsdp, rsdp->revision,
          rsdp->rsdt_address);
    put_escaped(rsdp->oem_id, sizeof(rsdp->oem_id));
    put_char('\n');
    if (rsdp->revision >= 2) {
        int ok = rsdp->length >= sizeof(*rsdp) && rsdp->length <= 4096 && !acpi_sum(rsdp, rsdp->length);
        print("rsdp_xsdt: 0x%llx\n", rsdp->xsdt_address);
        print("rsdp_extended_checksum: %s\n", ok ? "ok" : "bad");
        if (!ok)
            return fail(EXIT_FAIL, "the RSDP's extended checksum is wrong");
    }

    const struct acpi_header *rsdt = acpi_rsdt(rsdp), *xsdt = acpi_xsdt(rsdp);
    if (!rsdt && !xsdt)
        return fail(EXIT_MISSING, "the RSDP points at neither an RSDT nor an XSDT");
    if (rsdt)
        walk_sdt("rsdt", rsdt);
    if (xsdt)
        walk_sdt("xsdt", xsdt);
    const struct acpi_header *fadt = acpi_find(rsdp, "FACP"), *madt = acpi_find(rsdp, "APIC");
    if (fadt) {
        uint64_t dsdt = field64(fadt, FADT_X_DSDT);
        const struct acpi_header *t = phys(dsdt && !(dsdt >> 32) ? (uint32_t)dsdt : field32(fadt, FADT_DSDT));
        if ((uintptr_t)t && t->length >= sizeof(*t) && t->length <= 0x100000)
            print_table("fadt", t);
    }
    print("tables_bad: %u\n", tables_bad);
    if (madt)
        print_madt(madt);
    if (tables_bad)
        return fail(EXIT_FAIL, "%u tables with a wrong checksum", tables_bad);
    if (!madt)
        return fail(EXIT_MISSING, "no MADT (signature APIC)");
    if (!fadt)
        return fail(EXIT_MISSING, "no FADT (signature FACP)");
    int status = check_pm_timer(fadt);
    return status == EXIT_OK ? done_ok() : status;
}
