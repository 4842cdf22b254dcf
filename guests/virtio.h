/*
 * virtio.h - a minimal virtio-mmio driver for virtio-console (virtio 1.x,
 * section numbers refer to the OASIS spec, as in pykvm/virtio/), and the
 * device-independent steps other drivers (blk.c) build on.  Builds for the
 * 64-bit C guests (guest.h) and the 32-bit Multiboot guests (rt32.h).
 *
 * What it does: find the device by MagicValue/Version/DeviceID (4.2.2),
 * reset it and negotiate VIRTIO_F_VERSION_1 only (3.1.1), set up port 0's
 * receiveq (queue 0) and transmitq (queue 1) as split virtqueues (2.7,
 * 4.2.3.2), set DRIVER_OK.  Buffers are single descriptors: descriptor i
 * always belongs to the caller's buffer i, so "free" just means "not posted".
 */
#ifndef VIRTIO_H
#define VIRTIO_H

#ifdef __x86_64__
# include "guest.h"
#else
# include "rt32.h"
#endif

/* Registers (4.2.2). */
#define VIRTIO_MAGIC_VALUE      0x000
#define VIRTIO_VERSION          0x004
#define VIRTIO_DEVICE_ID        0x008
#define VIRTIO_DEVICE_FEATURES  0x010
#define VIRTIO_DEVICE_FEATURES_SEL 0x014
#define VIRTIO_DRIVER_FEATURES  0x020
#define VIRTIO_DRIVER_FEATURES_SEL 0x024
#define VIRTIO_QUEUE_SEL        0x030
#define VIRTIO_QUEUE_NUM_MAX    0x034
#define VIRTIO_QUEUE_NUM        0x038
#define VIRTIO_QUEUE_READY      0x044
#define VIRTIO_QUEUE_NOTIFY     0x050
#define VIRTIO_INTERRUPT_STATUS 0x060
#define VIRTIO_INTERRUPT_ACK    0x064
#define VIRTIO_STATUS           0x070
#define VIRTIO_QUEUE_DESC_LOW   0x080
#define VIRTIO_QUEUE_DESC_HIGH  0x084
#define VIRTIO_QUEUE_DRIVER_LOW 0x090
#define VIRTIO_QUEUE_DRIVER_HIGH 0x094
#define VIRTIO_QUEUE_DEVICE_LOW 0x0a0
#define VIRTIO_QUEUE_DEVICE_HIGH 0x0a4

#define VIRTIO_CONFIG           0x100  /* the device-specific configuration space */

#define VIRTIO_MAGIC 0x74726976  /* "virt" */
#define VIRTIO_ID_BLOCK   2
#define VIRTIO_ID_CONSOLE 3

/* Device status (2.1). */
#define STATUS_ACKNOWLEDGE 1
#define STATUS_DRIVER      2
#define STATUS_DRIVER_OK   4
#define STATUS_FEATURES_OK 8
#define STATUS_NEEDS_RESET 64
#define STATUS_FAILED      128

/* InterruptStatus bits (4.2.2). */
#define VIRTIO_INT_VRING  1
#define VIRTIO_INT_CONFIG 2

/* Split virtqueue layout (2.7.5, 2.7.6, 2.7.8). */
#define VIRTQ_DESC_F_NEXT  1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1

struct virtq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct virtq_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[];  /* then le16 used_event (unused: no VIRTIO_F_EVENT_IDX) */
};

struct virtq_used_elem {
    uint32_t id;
    uint32_t len;
};

struct virtq_used {
    uint16_t flags;
    uint16_t idx;
    struct virtq_used_elem ring[];
};

/* The largest queue this driver sets up, and the memory one queue needs:
 * descriptors at 0 (4 KiB), the available ring at 4 KiB (518 bytes), the
 * used ring at 5 KiB (2054 bytes). */
#define VQ_MAX_SIZE 256
#define VQ_MEM_SIZE 8192

struct vq {
    uint16_t index;        /* 0 = receiveq, 1 = transmitq */
    uint16_t size;
    volatile struct virtq_desc *desc;
    volatile struct virtq_avail *avail;
    volatile struct virtq_used *used;
    uint16_t avail_idx;    /* our copy of avail->idx */
    uint16_t last_used;    /* used elements consumed */
};

struct vdev {
    uintptr_t base;
    struct vq rx, tx;
};

/* Errors (returned negated; a guest reports GUEST_FAIL(code)). */
#define VERR_NO_DEVICE   1   /* no "virt" magic at the base */
#define VERR_VERSION     2   /* not a virtio-mmio version 2 (virtio 1.x) device */
#define VERR_DEVICE_ID   3   /* not a console */
#define VERR_NO_VERSION1 4   /* the device does not offer VIRTIO_F_VERSION_1 */
#define VERR_FEATURES    5   /* the device refused FEATURES_OK */
#define VERR_QUEUE       6   /* a queue is missing, too small or already live */
#define VERR_DRIVER_OK   7   /* DRIVER_OK did not stick, or the device needs a reset */
#define VERR_RESET       8   /* a reset did not clear status and queues */

/* Check for a virtio-console at ``base``; 0 or -VERR_*. */
int vdev_probe(uintptr_t base);
/* Check for a virtio-mmio version 2 device of type ``device_id`` at ``base``; 0 or -VERR_*. */
int vdev_probe_id(uintptr_t base, uint32_t device_id);
/* 3.1.1 steps 1-6 for any device type: probe, reset, ACKNOWLEDGE, DRIVER,
 * accept ``wanted`` & what the device offers of feature bits 0-31 (in
 * *accepted) plus VIRTIO_F_VERSION_1, FEATURES_OK and check it stuck. */
int vdev_negotiate(struct vdev *d, uintptr_t base, uint32_t device_id, uint32_t wanted, uint32_t *accepted);
/* 4.2.3.2: set up queue ``index`` of ``size`` entries in ``mem`` (VQ_MEM_SIZE bytes, 4 KiB aligned). */
int vq_setup(struct vdev *d, struct vq *q, uint16_t index, void *mem, uint16_t size);
/* Set DRIVER_OK and check the device is live (3.1.1 step 8). */
int vdev_driver_ok(struct vdev *d);
uint32_t vdev_config32(struct vdev *d, uint32_t offset);
/* Reset, negotiate, set up both queues of ``qsize`` entries in ``ring_mem``
 * (2 * VQ_MEM_SIZE bytes, 4 KiB aligned, zeroed here) and set DRIVER_OK.
 * ``interrupts`` = 0 asks the device not to interrupt (polling driver). */
int vdev_init(struct vdev *d, uintptr_t base, void *ring_mem, uint16_t qsize, int interrupts);
/* Write 0 to Status (reset, 4.2.2.1) and check the device forgot everything. */
int vdev_reset(struct vdev *d);
/* Read InterruptStatus and acknowledge it; returns what was pending. */
uint32_t vdev_ack_interrupt(struct vdev *d);
uint32_t vdev_status(struct vdev *d);

/* Make buffer ``id`` (``len`` bytes at ``addr``) available; ``writable``
 * for a receive buffer.  Does not notify. */
void vq_post(struct vq *q, uint16_t id, uint64_t addr, uint32_t len, int writable);
/* Make the chain at descriptor ``head`` (already written) available. */
void vq_publish(struct vq *q, uint16_t head);
/* Tell the device about posted buffers (QueueNotify). */
void vq_kick(struct vdev *d, struct vq *q);
/* Take the next used element: 1 and its id/len, or 0 when there is none. */
int vq_get_used(struct vq *q, uint32_t *id, uint32_t *len);
/* Buffers posted and not yet returned. */
static inline uint16_t vq_in_flight(const struct vq *q)
{
    return (uint16_t)(q->avail_idx - q->last_used);
}

#endif
