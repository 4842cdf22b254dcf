/*
 * lapic.c - the local APIC in xAPIC mode (Intel SDM vol. 3, chapter 10):
 * 32-bit registers at 0xfee00000 (paging is off, so the physical address
 * is the pointer), the ID in bits 31-24 of register 0x20, interrupts sent
 * by writing the destination to ICR bits 63-56 and then the command to
 * ICR bits 31-0.
 */
#include "pc.h"

#define LAPIC_SVR_ENABLE 0x100
#define IPI_POLLS        100000         /* KVM delivers at once; real APICs in microseconds */

uint32_t lapic_id(void)
{
    return lapic_read(LAPIC_ID) >> 24;
}

void lapic_enable(uint32_t spurious_vector)
{
    lapic_write(LAPIC_SVR, LAPIC_SVR_ENABLE | (spurious_vector & 0xff));
}

int lapic_send_ipi(uint32_t dest, uint32_t icr_low)
{
    lapic_write(LAPIC_ICR_HIGH, dest << 24);
    lapic_write(LAPIC_ICR_LOW, icr_low);    /* this write sends it */
    for (uint32_t polls = 0; polls < IPI_POLLS; polls++)
        if (!(lapic_read(LAPIC_ICR_LOW) & ICR_PENDING))
            return 0;
    return -1;
}
