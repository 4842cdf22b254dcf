/*
 * smp_test.c - guest_main of `smp`: bring up every application processor
 * as an SMP kernel does (smp.c: INIT-SIPI-SIPI, a real-mode trampoline at
 * 0x8000) and check that each reported in.
 *
 * The CPU count comes from fw_cfg's NB_CPUS (after checking its "QEMU"
 * signature), with the ACPI MADT as the fallback and, where both exist, a
 * cross-check.  Each AP reads its APIC ID, adds it to a shared sum with
 * `lock xadd`, raises a counter with `lock inc` and halts (`cli; hlt`).
 * The BSP waits up to AP_TIMEOUT_MS, prints `cpus`, the sorted `apic_ids`
 * and their `sum`, and passes only if the count matches, the IDs are
 * distinct and they add up to the sum.
 */
#include "pc.h"

#define AP_TIMEOUT_MS  5000
#define SPURIOUS_VECTOR 0x3f

static void print_id_list(const char *key, const uint32_t *ids, uint32_t n)
{
    print("%s:", key);
    for (uint32_t i = 0; i < n; i++)
        print(" %u", ids[i]);
    put_char('\n');
}

/* The MADT's count, printed as a cross-check; -1 without ACPI. */
static int madt_cross_check(void)
{
    uint32_t ids[AP_MAX + 1];
    const struct acpi_rsdp *rsdp = acpi_find_rsdp();
    const struct acpi_header *madt = rsdp ? acpi_find(rsdp, "APIC") : NULL;
    if (!madt)
        return -1;
    uint32_t n = madt_cpus(madt, ids, ARRAY_SIZE(ids));
    print("madt_cpus: %u\n", n);
    return (int)n;
}

int guest_main(const struct multiboot_info *mbi)
{
    (void)mbi;
    const char *source;
    uint32_t expected = platform_cpu_count(&source);
    print("cpus_expected: %u\n", expected);
    print("cpus_source: %s\n", source);
    if (!expected)
        return fail(EXIT_MISSING, "no CPU count: neither fw_cfg nor an ACPI MADT");
    if (expected > AP_MAX + 1)
        return fail(EXIT_MISSING, "%u CPUs, but this guest has stacks for %u", expected, AP_MAX + 1);
    int madt = madt_cross_check();
    if (madt >= 0 && (uint32_t)madt != expected)
        return fail(EXIT_FAIL, "fw_cfg says %u CPUs, the MADT %d", expected, madt);

    uint32_t bsp = lapic_id();
    print("apic_base_msr: 0x%llx\n", rdmsr(MSR_APIC_BASE));
    print("bsp_apic_id: %u\n", bsp);
    lapic_enable(SPURIOUS_VECTOR);
    if (!tsc_calibrate_khz())
        return fail(EXIT_MISSING, "PIT channel 2 never counted down: no TSC rate");
    print("tsc_khz: %u\n", tsc_khz);
    print("trampoline: 0x%x\n", TRAMPOLINE_ADDR);

    static struct smp_result result;
    int status = expected > 1 ? smp_start_aps(expected - 1, NULL, AP_TIMEOUT_MS, &result) : EXIT_OK;
    if (expected == 1)
        result.apic_id_sum = bsp;       /* nothing to start */

    uint32_t ids[AP_MAX + 1], sum = 0, cpus = result.started + 1;
    ids[0] = bsp;
    for (uint32_t i = 0; i < result.started && i < AP_MAX; i++)
        ids[i + 1] = result.apic_ids[i];
    sort_u32(ids, cpus);
    print("cpus: %u\n", cpus);
    print_id_list("apic_ids", ids, cpus);
    print("sum: %u\n", result.apic_id_sum);

    if (status == EXIT_TIMEOUT)
        return fail(status, "%u of %u APs reported in within %u ms", result.started, expected - 1, AP_TIMEOUT_MS);
    if (status != EXIT_OK)
        return fail(status, "an IPI was not accepted, or more APs than %u started", AP_MAX);
    if (cpus != expected)
        return fail(EXIT_FAIL, "%u CPUs reported in, %u expected", cpus, expected);
    for (uint32_t i = 0; i < cpus; i++) {
        sum += ids[i];
        if (i && ids[i] == ids[i - 1])
            return fail(EXIT_FAIL, "APIC ID %u reported twice", ids[i]);
    }
    if (sum != result.apic_id_sum)
        return fail(EXIT_FAIL, "the APIC IDs add up to %u, the shared sum is %u", sum, result.apic_id_sum);
    return done_ok();
}
