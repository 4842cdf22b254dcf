"""Putting virtio devices on a machine: windows, interrupt lines, doorbell paths, the I/O thread.

A virtio device (``pykvm.virtio``) sits behind a virtio-mmio window of
0x200 bytes (from 0xd0000000) with one interrupt line.  Two things connect
it to the VM, each chosen per device:

``notify`` -- how the driver's doorbell (a write of the queue index to
QueueNotify, base + 0x50) reaches the device:

* ``"python"``: an MMIO exit to user space, handled by the transport on the
  vCPU thread;
* ``"c"``: an MMIO exit to user space that the C loop answers by signalling
  an eventfd (the transport offers that row: ``VirtioMmioDevice.fast_rows``),
  then resumes the guest at once; the I/O thread processes every queue of
  the device.  With ``c_loop=False`` this is ``"python"``;
* ``"ioeventfd"``: no exit to user space: KVM_IOEVENTFD on the register with
  datamatch = queue index, one eventfd per queue; the I/O thread processes
  that queue.

``interrupt`` -- how the level-triggered line reaches the in-kernel irqchip:
``"irq_line"`` (KVM_IRQ_LINE on each level change, from whichever thread
changed it) or ``"irqfd"`` (KVM_IRQFD with a resamplefd: the device writes
the irqfd when its line goes high; after the guest's EOI KVM lowers the
line and signals the resamplefd, and the I/O thread writes the irqfd again
if the line is still high).  Without an irqchip there are no interrupts:
``"irq_line"`` then does nothing (a polling driver still works) and
``"irqfd"`` is refused.

The I/O thread (``pykvm.platform.iothread``) owns every eventfd made here
and closes them; :meth:`VirtioWiring.close` stops it before guest memory
is unmapped.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

from pykvm.errors import KvmError
from pykvm.log import get_logger
from pykvm.platform import layout
from pykvm.platform.iothread import IoThread

log = get_logger("pykvm.platform.virtio")

NOTIFY_PATHS = ("python", "c", "ioeventfd")
INTERRUPT_PATHS = ("irq_line", "irqfd")


@dataclass
class VirtioSlot:
    """A virtio device a machine carries: its window, line and notification paths.

    ``fds`` names the eventfds wired for it (``irqfd``, ``resamplefd``,
    ``ioeventfd<queue>``, ``doorbell``); the machine's I/O thread owns them.
    """

    name: str
    device: object
    transport: object
    base: int
    irq: int
    notify: str
    interrupt: str
    fds: dict[str, int] = field(default_factory=dict)


class VirtioWiring:
    """The virtio devices of one machine and everything that connects them to the VM.

    ``add_device(device, mmio=, length=, name=)`` / ``remove_device(device)``
    put a transport on the MMIO bus; ``irq_line(gsi)`` gives the KVM_IRQ_LINE
    callable for a line.
    """

    def __init__(self, vm, memory, *, irqchip: bool, add_device: Callable[..., None],
                 remove_device: Callable[[object], None], irq_line: Callable[[int], Callable[[bool], None]],
                 post: Callable[[Callable[[], None]], None] | None = None) -> None:
        self.vm = vm
        self.memory = memory
        self.irqchip = irqchip
        self._add_device = add_device
        self._remove_device = remove_device
        self._irq_line = irq_line
        self._post = post  # run work on the vCPU thread before it re-enters the guest
        self.slots: list[VirtioSlot] = []
        self.iothread: IoThread | None = None  # made by the first device that needs it

    def add(self, device, *, base: int | None = None, irq: int | None = None, notify: str = "python",
            interrupt: str = "irq_line", name: str | None = None):
        """Put ``device`` behind a virtio-mmio window; return its transport (see the module docstring)."""
        from pykvm.virtio import VirtioMmioDevice

        if notify not in NOTIFY_PATHS:
            raise ValueError(f"notify must be 'python', 'c' or 'ioeventfd', not {notify!r}")
        if interrupt not in INTERRUPT_PATHS:
            raise ValueError(f"interrupt must be 'irq_line' or 'irqfd', not {interrupt!r}")
        if interrupt == "irqfd" and not self.irqchip:
            raise ValueError("interrupt='irqfd' needs the in-kernel irqchip: Machine(irqchip=True)")
        if base is None:
            base = layout.VIRTIO_MMIO_BASE
            while any(slot.base == base for slot in self.slots):
                base += layout.VIRTIO_MMIO_SIZE
        taken = dict(layout.RESERVED_IRQS)
        taken.update({slot.irq: slot.name for slot in self.slots})
        if irq is None:
            irq = next((i for i in range(5, layout.IOAPIC_PINS) if i not in taken), None)
            if irq is None:
                raise ValueError(f"no free IRQ for another virtio device (GSIs 5-{layout.IOAPIC_PINS - 1} are taken)")
        if not 0 <= irq < layout.IOAPIC_PINS:
            raise ValueError(f"irq {irq} is not a GSI of the in-kernel IOAPIC (0-{layout.IOAPIC_PINS - 1})")
        if irq in taken:
            raise ValueError(f"irq {irq} is taken by {taken[irq]}")
        name = name or f"virtio{len(self.slots)}-{device.name}"
        transport = VirtioMmioDevice(device, self.memory, name=name)
        self._add_device(transport, mmio=base, length=layout.VIRTIO_MMIO_SIZE, name=name)  # checks overlaps
        slot = VirtioSlot(name, device, transport, base, irq, notify, interrupt)
        self.slots.append(slot)
        if (notify != "python" or interrupt == "irqfd") and self.iothread is None:
            self.iothread = IoThread(f"pykvm-io-{name}")
        try:
            self._wire(slot)
        except BaseException:
            self._unwire(slot)
            raise
        return transport

    def _wire(self, slot: VirtioSlot) -> None:
        """Connect a device's doorbell and interrupt line as its slot says."""
        from pykvm.virtio.mmio import QUEUE_NOTIFY

        io, transport = self.iothread, slot.transport
        # A queue with more work than one round continues where its doorbell is served.
        if io is not None:
            transport.reschedule = lambda index, t=transport: io.call_soon(lambda: t.process_queue(index))
        elif self._post is not None:
            transport.reschedule = lambda index, t=transport: self._post(lambda: t.process_queue(index))
        if slot.interrupt == "irq_line":
            transport.interrupt = self._irq_line(slot.irq)
        else:
            irqfd, resamplefd = io.eventfd(), io.eventfd()
            self.vm.irqfd(irqfd, slot.irq, resamplefd=resamplefd)
            slot.fds.update(irqfd=irqfd, resamplefd=resamplefd)

            def raise_line(level: bool, fd: int = irqfd) -> None:
                if level:
                    os.eventfd_write(fd, 1)  # lowering it is KVM's job, at the guest's EOI

            def resample(transport=transport, fd: int = irqfd) -> None:
                with transport.lock:  # the guest's EOI lowered the line: is it still high?
                    if transport.irq_level:
                        os.eventfd_write(fd, 1)

            transport.interrupt = raise_line
            io.watch(resamplefd, resample)
        if slot.notify == "ioeventfd":
            for index in range(len(transport.queues)):
                fd = io.eventfd()
                self.vm.ioeventfd(fd, slot.base + QUEUE_NOTIFY, 4, datamatch=index)
                slot.fds[f"ioeventfd{index}"] = fd
                io.watch(fd, lambda t=transport, i=index: t.process_queue(i))
        elif slot.notify == "c":
            fd = io.eventfd()
            slot.fds["doorbell"] = fd

            def all_queues(t=transport) -> None:
                for index in range(len(t.queues)):
                    t.process_queue(index)

            io.watch(fd, all_queues)
            transport.set_doorbell(fd)  # the transport offers the C loop its QueueNotify row

    def _unwire(self, slot: VirtioSlot) -> None:
        """Undo a partly wired add (the eventfds stay with the I/O thread until close())."""
        from pykvm.virtio.mmio import QUEUE_NOTIFY

        if slot.transport.doorbell_fd >= 0:
            slot.transport.set_doorbell(-1)
        for what, fd in slot.fds.items():
            if self.iothread is not None:
                self.iothread.unwatch(fd)
            try:
                if what.startswith("ioeventfd"):
                    self.vm.ioeventfd(fd, slot.base + QUEUE_NOTIFY, 4, datamatch=int(what[9:]), deassign=True)
                elif what == "irqfd":
                    self.vm.irqfd(fd, slot.irq, deassign=True)
            except KvmError:
                pass  # it was never assigned
        self._remove_device(slot.transport)
        self.slots.remove(slot)

    def cmdline(self) -> str:
        """``virtio_mmio.device=0x200@0xd0000000:5`` per device: what Linux needs to find them."""
        from pykvm.virtio import linux_cmdline

        return " ".join(linux_cmdline(slot.base, slot.irq) for slot in self.slots)

    def close(self) -> None:
        """Stop the I/O thread, close the devices (and their backends); the thread closes the eventfds."""
        if self.iothread is not None:
            self.iothread.close()  # joins the thread; closes irqfds, resamplefds and ioeventfds
        for slot in self.slots:
            close = getattr(slot.device, "close", None)
            if close is not None:
                try:
                    close()
                except Exception as exc:  # a backend's problem must not leak the VM's fds
                    log.warning("closing %s failed: %s", slot.name, exc)
        self.slots = []


def add_blk(machine, image, *, read_only: bool = False, serial: str = "", base: int | None = None,
            irq: int | None = None, notify: str = "ioeventfd", interrupt: str | None = None,
            name: str | None = None, **blk_options):
    """A virtio-blk disk on ``image`` for ``machine`` (``Machine.add_virtio_blk``); ``(disk, transport)``.

    The defaults put the disk's requests on the I/O thread: the doorbell is
    an ioeventfd (no exit to user space) and, with an irqchip, the interrupt
    an irqfd.  The machine owns the disk and closes it (and so the image)
    with itself; if adding it fails the image stays the caller's.
    """
    from pykvm.virtio.blk import VirtioBlk

    disk = VirtioBlk(image, read_only=read_only, serial=serial, **blk_options)
    if interrupt is None:
        interrupt = "irqfd" if machine.irqchip else "irq_line"
    transport = machine.add_virtio(disk, base=base, irq=irq, notify=notify, interrupt=interrupt, name=name)
    return disk, transport
