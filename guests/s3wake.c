/*
 * s3wake.c - guest_main of `s3wake`: suspend to RAM (ACPI S3) and be woken
 * by the RTC alarm, as an OS does (ACPI 6.5, 7.4.2 and 16.1.3).
 *
 * From the FADT: the FACS (FIRMWARE_CTRL), PM1a_EVT_BLK and PM1a_CNT_BLK.
 * It copies a real-mode resume stub below 1 MiB and puts its address in
 * the FACS's firmware waking vector, arms the RTC alarm with "don't care"
 * fields (it goes off at the next second) and AIE, sets RTC_EN in PM1_EN,
 * prints `state: suspending`, and writes SLP_TYP 1 (QEMU's \_S3) with SLP_EN.
 *
 * The machine resumes at the waking vector in real mode: the stub reads
 * PM1_STS (WAK_STS, bit 15, and RTC_STS, bit 10, say why it woke) and
 * writes it, shifted right by 9, to the debug-exit port with a 32-bit out:
 * 0x42 for "woken by the RTC", exit status 0x85 under QEMU.  The guest never
 * returns from the SLP_EN write; if it does, it fails.
 */
#include "pc.h"

#define FADT_FIRMWARE_CTRL   36
#define FADT_PM1A_EVT_BLK    56
#define FADT_PM1A_CNT_BLK    64
#define FACS_WAKING_VECTOR   12
#define PM1_EN_RTC           (1u << 10)
#define PM1_CNT_SLP_TYP(t)   ((uint16_t)((t) << 10))
#define PM1_CNT_SLP_EN       (1u << 13)
#define QEMU_SLP_TYP_S3      1
#define CMOS_ALARM_DONT_CARE 0xc0
#define CMOS_REG_B           0x0b
#define CMOS_B_AIE           0x20
#define STUB_ADDR            0x7010u    /* CS:IP = 0x701:0 */

static uint32_t field32(const struct acpi_header *t, uint32_t offset)
{
    uint32_t v;
    __builtin_memcpy(&v, (const uint8_t *)t + offset, 4);
    return v;
}

static void cmos_write(uint8_t reg, uint8_t value)
{
    outb(0x70, reg);
    outb(0x71, value);
}

int guest_main(const struct multiboot_info *mbi)
{
    (void)mbi;
    const struct acpi_rsdp *rsdp = acpi_find_rsdp();
    const struct acpi_header *fadt = rsdp ? acpi_find(rsdp, "FACP") : NULL;
    if (!fadt)
        return fail(EXIT_MISSING, "no FADT");
    uint32_t facs = field32(fadt, FADT_FIRMWARE_CTRL);
    uint16_t evt = (uint16_t)field32(fadt, FADT_PM1A_EVT_BLK);
    uint16_t cnt = (uint16_t)field32(fadt, FADT_PM1A_CNT_BLK);
    print("facs: 0x%x\n", facs);
    print("pm1a_evt: 0x%x\n", evt);
    print("pm1a_cnt: 0x%x\n", cnt);
    if (!facs || !evt || !cnt)
        return fail(EXIT_MISSING, "no FACS or PM1a blocks");

    /* xor eax,eax; mov dx,EVT; in ax,dx; shr ax,9; mov dx,0xf4; out dx,eax; jmp $ (16-bit code):
     * PM1_STS >> 9 puts WAK_STS in bit 6 and RTC_STS in bit 1, inside QEMU's 8-bit exit code */
    uint8_t stub[] = {0x66, 0x31, 0xc0, 0xba, (uint8_t)evt, (uint8_t)(evt >> 8), 0xed, 0xc1, 0xe8, 0x09,
                      0xba, DEBUG_EXIT_PORT, 0x00, 0x66, 0xef, 0xeb, 0xfe};
    uintptr_t where = STUB_ADDR;
    __asm__("" : "+r"(where));              /* low memory, not a null pointer */
    __builtin_memcpy((void *)where, stub, sizeof stub);
    uint32_t vector = STUB_ADDR;
    __builtin_memcpy((uint8_t *)(uintptr_t)facs + FACS_WAKING_VECTOR, &vector, 4);

    for (uint8_t reg = 1; reg <= 5; reg += 2)  /* alarm seconds, minutes, hours */
        cmos_write(reg, CMOS_ALARM_DONT_CARE);
    outb(0x70, CMOS_REG_B);
    uint8_t b = inb(0x71);
    cmos_write(CMOS_REG_B, b | CMOS_B_AIE);
    outw(evt + 2, PM1_EN_RTC);               /* PM1_EN: the RTC alarm may wake us */
    print("state: suspending\n");
    outw(cnt, PM1_CNT_SLP_TYP(QEMU_SLP_TYP_S3) | PM1_CNT_SLP_EN);
    for (volatile int i = 0; i < 1000; i++)
        ;
    return fail(EXIT_FAIL, "still running after SLP_EN: S3 was not entered");
}
