/*
 * pci.c - PCI configuration mechanism #1 (PCI Local Bus Specification 3.0,
 * 3.2.2.3.2): write enable bit 31 | bus << 16 | device << 11 | function << 8
 * | register to CONFIG_ADDRESS (0xcf8), then read CONFIG_DATA (0xcfc).
 * A function that is not there reads all-ones.
 */
#include "pc.h"

#define PCI_CONFIG_ADDRESS 0xcf8
#define PCI_CONFIG_DATA    0xcfc

uint32_t pci_config_read32(uint32_t bus, uint32_t dev, uint32_t fn, uint32_t reg)
{
    outl(PCI_CONFIG_ADDRESS, 0x80000000u | bus << 16 | dev << 11 | fn << 8 | (reg & 0xfc));
    return inl(PCI_CONFIG_DATA);
}
