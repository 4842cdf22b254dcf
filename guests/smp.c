/*
 * smp.c - starting the application processors the way the MP
 * Specification 1.4 (appendix B.4) and Intel SDM vol. 3 (10.4.4) describe
 * it, as kvm-unit-tests and hobby kernels do: copy the real-mode trampoline
 * (trampoline.S) below 1 MiB, broadcast INIT to all but self, wait 10 ms,
 * then STARTUP twice with 200 us after each.  A STARTUP IPI only starts an
 * AP still waiting for one, so the second one starts those the first
 * missed and nothing twice.
 *
 * Each AP reports in from ap_start(): its APIC ID into ap_ids[], added to
 * the sum with `lock xadd`, the count raised with `lock inc`.  The BSP
 * waits for the count with a TSC deadline.
 */
#include "pc.h"

#define INIT_DELAY_US     10000
#define STARTUP_DELAY_US  200

extern const char ap_trampoline[], ap_trampoline_end[];     /* trampoline.S */
extern volatile uint32_t ap_next;

static volatile uint32_t ap_reported;
static volatile uint32_t ap_ids[AP_MAX];
static volatile uint32_t apic_id_sum;
static ap_main_fn ap_continue;

void __attribute__((noreturn)) ap_start(uint32_t index);

void ap_start(uint32_t index)
{
    uint32_t id = lapic_id();
    ap_ids[index] = id;
    atomic_fetch_add(&apic_id_sum, id);
    atomic_inc(&ap_reported);           /* last: the BSP reads ap_ids[] after it */
    if (ap_continue)
        ap_continue(index, id);
    halt_forever();
}

int smp_start_aps(uint32_t expected_aps, ap_main_fn ap_main, uint32_t timeout_ms, struct smp_result *result)
{
    int status = EXIT_OK;
    ap_continue = ap_main;
    apic_id_sum = lapic_id();           /* the BSP's, before any AP runs */
    memcpy(phys(TRAMPOLINE_ADDR), ap_trampoline, (size_t)(ap_trampoline_end - ap_trampoline));
    barrier();
    if (lapic_send_ipi(0, ICR_ALL_BUT_SELF | ICR_LEVEL | ICR_ASSERT | ICR_INIT))
        status = EXIT_FAIL;
    delay_us(INIT_DELAY_US);
    for (int i = 0; i < 2 && status == EXIT_OK; i++) {
        if (lapic_send_ipi(0, ICR_ALL_BUT_SELF | ICR_ASSERT | ICR_STARTUP | TRAMPOLINE_ADDR >> 12))
            status = EXIT_FAIL;
        delay_us(STARTUP_DELAY_US);
    }
    uint64_t deadline = deadline_ms(timeout_ms);
    while (status == EXIT_OK && ap_reported < expected_aps && !past(deadline))
        cpu_relax();
    if (status == EXIT_OK && ap_reported < expected_aps)
        status = EXIT_TIMEOUT;
    if (status == EXIT_OK && ap_next > AP_MAX)
        status = EXIT_FAIL;             /* more APs than stacks: some are parked */
    result->started = ap_reported;
    for (uint32_t i = 0; i < result->started && i < AP_MAX; i++)
        result->apic_ids[i] = ap_ids[i];
    result->apic_id_sum = apic_id_sum;
    return status;
}

uint32_t platform_cpu_count(const char **source)
{
    if (fw_cfg_present()) {
        *source = "fw_cfg";
        return fw_cfg_read_le(FW_CFG_NB_CPUS, 2);
    }
    const struct acpi_rsdp *rsdp = acpi_find_rsdp();
    const struct acpi_header *madt = rsdp ? acpi_find(rsdp, "APIC") : NULL;
    if (madt) {
        *source = "madt";
        return madt_cpus(madt, NULL, 0);
    }
    *source = "none";
    return 0;
}
