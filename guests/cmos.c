/*
 * cmos.c - the CMOS RAM and real-time clock behind ports 0x70/0x71
 * (Motorola MC146818A data sheet): write the register number to 0x70
 * (bit 7, the NMI mask, left clear), read its value from 0x71.
 *
 * The clock's registers change once a second during an update cycle,
 * announced by register A's UIP bit 244 us ahead; a reader waits until UIP
 * is clear and then has at least that long to read them consistently.
 */
#include "pc.h"

#define CMOS_INDEX    0x70
#define CMOS_DATA     0x71
#define RTC_SECONDS   0x00
#define RTC_REG_A     0x0a
#define RTC_A_UIP     0x80
#define RTC_UIP_POLLS 10000         /* an update lasts under 2 ms */

uint8_t cmos_read(uint8_t reg)
{
    outb(CMOS_INDEX, reg & 0x7f);
    return inb(CMOS_DATA);
}

uint8_t cmos_read_seconds(void)
{
    for (uint32_t polls = 0; polls < RTC_UIP_POLLS; polls++)
        if (!(cmos_read(RTC_REG_A) & RTC_A_UIP))
            break;
    return cmos_read(RTC_SECONDS);
}
