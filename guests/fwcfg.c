/*
 * fwcfg.c - QEMU's firmware configuration device on x86 (QEMU
 * docs/specs/fw_cfg.rst): a 16-bit selector at 0x510, a byte-wide data
 * port at 0x511 that reads the selected item from its start, and the DMA
 * interface at 0x514 (a 64-bit big-endian address register; writing its
 * low half at 0x518 starts the transfer described at that address).
 */
#include "pc.h"

#define FW_CFG_PORT_SEL  0x510
#define FW_CFG_PORT_DATA 0x511
#define FW_CFG_PORT_DMA  0x514

#define FW_CFG_DMA_ERROR  0x01
#define FW_CFG_DMA_READ   0x02
#define FW_CFG_DMA_SELECT 0x08
#define FW_CFG_DMA_POLLS  100000

struct fw_cfg_dma_access {              /* big-endian */
    uint32_t control;                   /* bits 31-16 the selector, with SELECT */
    uint32_t length;
    uint64_t address;
} __attribute__((aligned(16)));

void fw_cfg_select(uint16_t key)
{
    outw(FW_CFG_PORT_SEL, key);
}

void fw_cfg_read_data(void *buf, uint32_t n)
{
    uint8_t *p = buf;
    while (n--)
        *p++ = inb(FW_CFG_PORT_DATA);
}

void fw_cfg_read(uint16_t key, void *buf, uint32_t n)
{
    fw_cfg_select(key);
    fw_cfg_read_data(buf, n);
}

int fw_cfg_present(void)
{
    char signature[4];
    fw_cfg_read(FW_CFG_SIGNATURE, signature, sizeof(signature));
    return !memcmp(signature, "QEMU", 4);
}

uint32_t fw_cfg_read_le(uint16_t key, uint32_t bytes)
{
    uint8_t b[4] = {0};
    fw_cfg_read(key, b, bytes <= 4 ? bytes : 4);
    return (uint32_t)b[0] | (uint32_t)b[1] << 8 | (uint32_t)b[2] << 16 | (uint32_t)b[3] << 24;
}

uint64_t fw_cfg_read_le64(uint16_t key)
{
    uint8_t b[8];
    fw_cfg_read(key, b, sizeof(b));
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | b[i];
    return v;
}

int fw_cfg_dma_read(uint16_t key, void *buf, uint32_t n)
{
    static volatile struct fw_cfg_dma_access access;
    access.control = be32((uint32_t)key << 16 | FW_CFG_DMA_SELECT | FW_CFG_DMA_READ);
    access.length = be32(n);
    access.address = (uint64_t)be32((uint32_t)(uintptr_t)buf) << 32;   /* big-endian, high half 0 */
    barrier();
    outl(FW_CFG_PORT_DMA, 0);           /* address bits 63-32 */
    outl(FW_CFG_PORT_DMA + 4, be32((uint32_t)(uintptr_t)&access));     /* bits 31-0: go */
    for (uint32_t polls = 0; polls < FW_CFG_DMA_POLLS; polls++) {
        uint32_t control = be32(access.control);
        if (control & FW_CFG_DMA_ERROR)
            return -1;
        if (!control)
            return 0;                   /* the device cleared it: done */
        cpu_relax();
    }
    return -1;
}

void fw_cfg_dma_signature(char out[9])
{
    uint32_t high = inl(FW_CFG_PORT_DMA), low = inl(FW_CFG_PORT_DMA + 4);
    memcpy(out, &high, 4);              /* the register's bytes, in port order */
    memcpy(out + 4, &low, 4);
    out[8] = 0;
}
