/*
 * virtio.c - a minimal virtio-mmio driver for virtio-console; see virtio.h.
 *
 * Every register access is an aligned 32-bit MMIO access (4.2.2.2), i.e. a
 * VM exit: the set-up below takes about 35 of them.  Data moves through
 * guest memory only; the one exit per batch is the QueueNotify doorbell.
 */
#include "virtio.h"

static uint32_t reg_read(struct vdev *d, uint32_t offset)
{
    return mmio_read32(d->base + offset);
}

static void reg_write(struct vdev *d, uint32_t offset, uint32_t value)
{
    mmio_write32(d->base + offset, value);
}

int vdev_probe_id(uintptr_t base, uint32_t device_id)
{
    if (mmio_read32(base + VIRTIO_MAGIC_VALUE) != VIRTIO_MAGIC)
        return -VERR_NO_DEVICE;
    if (mmio_read32(base + VIRTIO_VERSION) != 2)
        return -VERR_VERSION;
    if (mmio_read32(base + VIRTIO_DEVICE_ID) != device_id)
        return -VERR_DEVICE_ID;
    return 0;
}

int vdev_probe(uintptr_t base)
{
    return vdev_probe_id(base, VIRTIO_ID_CONSOLE);
}

uint32_t vdev_config32(struct vdev *d, uint32_t offset)
{
    return mmio_read32(d->base + VIRTIO_CONFIG + offset);
}

uint32_t vdev_status(struct vdev *d)
{
    return reg_read(d, VIRTIO_STATUS);
}

static void set_status(struct vdev *d, uint32_t bits)
{
    reg_write(d, VIRTIO_STATUS, reg_read(d, VIRTIO_STATUS) | bits);
}

int vdev_reset(struct vdev *d)
{
    reg_write(d, VIRTIO_STATUS, 0);
    /* 4.2.3.1: the reset is complete when Status reads 0; queues are dead. */
    if (reg_read(d, VIRTIO_STATUS) != 0)
        return -VERR_RESET;
    for (uint32_t q = 0; q < 2; q++) {
        reg_write(d, VIRTIO_QUEUE_SEL, q);
        if (reg_read(d, VIRTIO_QUEUE_READY) != 0)
            return -VERR_RESET;
    }
    return 0;
}

/* 4.2.3.2: tell the device where queue ``index`` lives and enable it. */
int vq_setup(struct vdev *d, struct vq *q, uint16_t index, void *ring_mem, uint16_t size)
{
    uint8_t *mem = ring_mem;
    reg_write(d, VIRTIO_QUEUE_SEL, index);
    if (reg_read(d, VIRTIO_QUEUE_READY) != 0)
        return -VERR_QUEUE;
    uint32_t max = reg_read(d, VIRTIO_QUEUE_NUM_MAX);
    if (max == 0 || max < size)
        return -VERR_QUEUE;
    memset(mem, 0, VQ_MEM_SIZE);  /* both rings start at index 0 */
    q->index = index;
    q->size = size;
    q->desc = (volatile struct virtq_desc *)mem;
    q->avail = (volatile struct virtq_avail *)(mem + 4096);
    q->used = (volatile struct virtq_used *)(mem + 5120);
    q->avail_idx = 0;
    q->last_used = 0;
    uint64_t desc = (uintptr_t)q->desc, avail = (uintptr_t)q->avail, used = (uintptr_t)q->used;
    reg_write(d, VIRTIO_QUEUE_NUM, size);
    reg_write(d, VIRTIO_QUEUE_DESC_LOW, (uint32_t)desc);
    reg_write(d, VIRTIO_QUEUE_DESC_HIGH, (uint32_t)(desc >> 32));
    reg_write(d, VIRTIO_QUEUE_DRIVER_LOW, (uint32_t)avail);
    reg_write(d, VIRTIO_QUEUE_DRIVER_HIGH, (uint32_t)(avail >> 32));
    reg_write(d, VIRTIO_QUEUE_DEVICE_LOW, (uint32_t)used);
    reg_write(d, VIRTIO_QUEUE_DEVICE_HIGH, (uint32_t)(used >> 32));
    reg_write(d, VIRTIO_QUEUE_READY, 1);
    if (reg_read(d, VIRTIO_QUEUE_READY) != 1)
        return -VERR_QUEUE;  /* the device rejected the layout */
    return 0;
}

int vdev_negotiate(struct vdev *d, uintptr_t base, uint32_t device_id, uint32_t wanted, uint32_t *accepted)
{
    int err = vdev_probe_id(base, device_id);
    if (err)
        return err;
    d->base = base;
    /* 3.1.1: reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK (queues and DRIVER_OK follow). */
    if ((err = vdev_reset(d)) != 0)
        return err;
    set_status(d, STATUS_ACKNOWLEDGE);
    set_status(d, STATUS_DRIVER);
    reg_write(d, VIRTIO_DEVICE_FEATURES_SEL, 1);
    if (!(reg_read(d, VIRTIO_DEVICE_FEATURES) & 1))  /* bit 32: VIRTIO_F_VERSION_1 */
        return -VERR_NO_VERSION1;
    reg_write(d, VIRTIO_DEVICE_FEATURES_SEL, 0);
    uint32_t taken = reg_read(d, VIRTIO_DEVICE_FEATURES) & wanted;
    reg_write(d, VIRTIO_DRIVER_FEATURES_SEL, 0);
    reg_write(d, VIRTIO_DRIVER_FEATURES, taken);
    reg_write(d, VIRTIO_DRIVER_FEATURES_SEL, 1);
    reg_write(d, VIRTIO_DRIVER_FEATURES, 1);
    set_status(d, STATUS_FEATURES_OK);
    if (!(reg_read(d, VIRTIO_STATUS) & STATUS_FEATURES_OK))
        return -VERR_FEATURES;
    if (accepted)
        *accepted = taken;
    return 0;
}

int vdev_driver_ok(struct vdev *d)
{
    set_status(d, STATUS_DRIVER_OK);
    uint32_t status = reg_read(d, VIRTIO_STATUS);
    if (!(status & STATUS_DRIVER_OK) || (status & (STATUS_NEEDS_RESET | STATUS_FAILED)))
        return -VERR_DRIVER_OK;
    return 0;
}

int vdev_init(struct vdev *d, uintptr_t base, void *ring_mem, uint16_t qsize, int interrupts)
{
    /* Accept VERSION_1 and nothing else: no console size, no multiport, no
     * emergency write, no indirect descriptors, no event index. */
    int err = vdev_negotiate(d, base, VIRTIO_ID_CONSOLE, 0, 0);
    if (err)
        return err;
    uint8_t *mem = ring_mem;
    if ((err = vq_setup(d, &d->rx, 0, mem, qsize)) != 0)
        return err;
    if ((err = vq_setup(d, &d->tx, 1, mem + VQ_MEM_SIZE, qsize)) != 0)
        return err;
    if (!interrupts) {
        /* 2.7.7: a polling driver asks not to be interrupted. */
        d->rx.avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;
        d->tx.avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;
    }
    return vdev_driver_ok(d);
}

uint32_t vdev_ack_interrupt(struct vdev *d)
{
    uint32_t pending = reg_read(d, VIRTIO_INTERRUPT_STATUS);
    if (pending)
        reg_write(d, VIRTIO_INTERRUPT_ACK, pending);  /* the line goes low */
    return pending;
}

void vq_post(struct vq *q, uint16_t id, uint64_t addr, uint32_t len, int writable)
{
    volatile struct virtq_desc *desc = &q->desc[id];
    desc->addr = addr;
    desc->len = len;
    desc->flags = writable ? VIRTQ_DESC_F_WRITE : 0;
    desc->next = 0;
    vq_publish(q, id);
}

void vq_publish(struct vq *q, uint16_t head)
{
    q->avail->ring[q->avail_idx % q->size] = head;
    barrier();  /* 2.7.13: the descriptors and ring entry before the index that covers them */
    q->avail_idx++;
    q->avail->idx = q->avail_idx;
}

void vq_kick(struct vdev *d, struct vq *q)
{
    /* The avail->idx store must be visible before the doorbell; both are
     * stores, which x86 keeps in order (the MMIO store is uncached). */
    barrier();
    reg_write(d, VIRTIO_QUEUE_NOTIFY, q->index);
}

int vq_get_used(struct vq *q, uint32_t *id, uint32_t *len)
{
    if (q->used->idx == q->last_used)
        return 0;
    barrier();  /* read the element after the index that covers it */
    volatile struct virtq_used_elem *e = &q->used->ring[q->last_used % q->size];
    *id = e->id;
    *len = e->len;
    q->last_used++;
    return 1;
}
