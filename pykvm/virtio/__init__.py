"""Virtio paravirtual devices: the virtio-mmio transport, split virtqueues, a console.

Virtio (OASIS "Virtual I/O Device (VIRTIO) Version 1.x"; section numbers in
this package refer to it) splits a paravirtual device in three layers, and so
does this package:

=====================  ==========================================  =====================
layer                  what it does                                module
=====================  ==========================================  =====================
transport (4.2)        registers the driver uses to find, set up   :mod:`.mmio`
                       and kick the device; the interrupt line
virtqueues (2.7)       rings in guest memory carrying buffers      :mod:`.queue`
device type (5.x)      what the buffers mean                       :mod:`.console`
host side              where a console's bytes come from and go    :mod:`.backends`
=====================  ==========================================  =====================

This module holds what every layer shares: device status bits (2.1),
reserved feature bits (6), and :class:`VirtioDevice`, the base class of the
device types, which talks to its transport through :class:`VirtioTransport`.

How a machine wires a virtio-mmio console
-----------------------------------------

::

    from pykvm.virtio import VirtioConsole, VirtioMmioDevice, linux_cmdline
    from pykvm.virtio.backends import StdioBackend

    console = VirtioConsole(StdioBackend())
    transport = VirtioMmioDevice(console, machine.memory, interrupt=irq_line(5))
    machine.add_device(transport, mmio=0xd0000000)        # length 0x200
    cmdline += " " + linux_cmdline(0xd0000000, 5)         # + " console=hvc0"

* **memory**: the machine's :class:`pykvm.memory.GuestMemory` (anything with
  ``read``/``write``/``is_mapped``).  Every guest address is checked against it.
* **interrupt**: ``interrupt(level: bool)``, called on each change of the
  line's level.  The line is *level-triggered*: asserted while
  InterruptStatus is non-zero, deasserted when the driver's InterruptACK
  clears it.  Map it to ``KVM_IRQ_LINE(irq, level)``.  With an irqfd, use
  ``KVM_IRQFD_FLAG_RESAMPLE`` (a level-triggered irqfd): write the irqfd
  when the level goes high; when the resamplefd fires (the guest's EOI),
  write it again if ``transport.irq_level`` is still True.
* **registers**: the transport is a bus :class:`pykvm.devices.Device` of
  ``length`` 0x200 bytes; register it on the MMIO bus at its base (the
  contract puts virtio-mmio devices from ``0xd0000000``; give each further
  device the next 0x200 or 0x1000 and its own IRQ).  Linux finds it through
  the ``virtio_mmio.device=<size>@<base>:<irq>`` parameter that
  :func:`linux_cmdline` formats.
* **notifications**: the driver writes a queue index to QueueNotify (offset
  0x50).  Three ways to deliver it, all ending in the same method:

  1. in Python: the MMIO write reaches :meth:`VirtioMmioDevice.write`, which
     calls :meth:`VirtioMmioDevice.process_queue`;
  2. in the C run loop: its WRITE_EVENTFD action signals an eventfd and
     resumes the guest at once, without passing on the queue index; the
     machine's I/O thread then calls ``transport.process_queue(i)`` for
     every queue of the device (an empty queue costs one ring read);
  3. with ``KVM_IOEVENTFD`` on ``base + 0x50`` (4 bytes, datamatch = queue
     index): no exit at all; a host thread waits on the eventfd and calls
     ``transport.process_queue(index)``.

  :meth:`VirtioMmioDevice.process_queue` takes the transport's lock, so it
  may run on any thread while a vCPU thread accesses the registers.
* **host input** (console): ``console.enqueue_input(data)`` from any thread,
  or a backend's reader thread does it.

Errors: a driver that breaks the virtqueue rules makes the queue code raise
:class:`VirtqueueError`; the transport catches it, sets DEVICE_NEEDS_RESET,
raises the configuration-change interrupt (2.1.2), logs it once and the
host carries on.  The driver recovers by resetting the device.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from abc import ABC

from pykvm._lazy import lazy_exports
from pykvm.log import get_logger

TYPE_CHECKING = False  # typing.TYPE_CHECKING, without importing typing at run time
if TYPE_CHECKING:  # annotations only: the queue module comes with the device types that use it
    from pykvm.virtio.queue import SplitVirtqueue

log = get_logger("pykvm.virtio")

# Device status bits (2.1).  The driver sets them in this order; the device
# sets NEEDS_RESET, and refuses FEATURES_OK by leaving it clear.
STATUS_ACKNOWLEDGE = 1  # the guest found the device
STATUS_DRIVER = 2  # the guest has a driver for it
STATUS_DRIVER_OK = 4  # the driver is set up and ready
STATUS_FEATURES_OK = 8  # the driver accepted features and the device agreed
STATUS_DEVICE_NEEDS_RESET = 64  # the device hit an error it cannot recover from
STATUS_FAILED = 128  # the driver gave up on the device

# Reserved feature bits (6): ring and transport features, shared by all device types.
VIRTIO_F_INDIRECT_DESC = 28  # descriptors may point at indirect tables (2.7.5.3)
VIRTIO_F_EVENT_IDX = 29  # used_event / avail_event notification suppression (2.7.7, 2.7.10)
VIRTIO_F_VERSION_1 = 32  # the device follows virtio 1.x, not the legacy interface

#: The ring features implemented by :mod:`pykvm.virtio.queue`.
RING_FEATURES: int = (1 << VIRTIO_F_INDIRECT_DESC) | (1 << VIRTIO_F_EVENT_IDX)


class VirtioTransport(ABC):
    """What a device type needs from its transport (mmio here; PCI could be another); structural."""

    lock: threading.RLock

    def process_queue(self, index: int) -> None:
        """Let the device process queue ``index`` now, under the lock (one round; the rest later)."""
        ...

    def signal_used(self, index: int) -> None:
        """The device pushed used elements on queue ``index``: interrupt if wanted."""
        ...

    def config_changed(self) -> None:
        """The device's configuration space changed."""
        ...

    @classmethod
    def __subclasshook__(cls, other: type):
        if cls is not VirtioTransport:
            return NotImplemented
        return all(callable(getattr(other, n, None)) for n in ("process_queue", "signal_used", "config_changed"))


class VirtioDevice:
    """Base class of a virtio device type (spec chapter 5).

    A subclass sets :attr:`device_id`, passes its queues' maximum sizes and
    its device-specific feature bits (0-23) to ``__init__``, and overrides:

    * :meth:`notify` -- process a queue (the driver kicked it, or the host
      has something for it); may raise :class:`VirtqueueError`.  It does at
      most one round of work -- :attr:`ROUND_CHAINS` chains and
      :attr:`ROUND_BYTES` bytes -- and returns True when more is waiting: the
      transport then continues later (``reschedule``), so one doorbell can
      never keep a host thread busy, nor make a stop or a deadline wait;
    * :meth:`config_space` / :meth:`write_config` -- its configuration space;
    * :meth:`on_activate` / :meth:`on_reset` -- start and stop.

    The transport calls every method here holding :attr:`lock` (which it
    shares), and only lets :meth:`notify` run while the driver has set
    DRIVER_OK and the device is not broken.
    """

    device_id = 0
    name = "virtio"
    #: Work done per call of :meth:`notify` at most (then it returns True and is called again).
    ROUND_CHAINS = 64
    ROUND_BYTES = 16 << 20

    def __init__(self, queue_sizes: Sequence[int], features: int = 0) -> None:
        self.queue_sizes = tuple(queue_sizes)
        #: Device-specific feature bits offered (the transport adds the rest).
        self.features = features
        #: The features the driver accepted, valid once :attr:`active`.
        self.driver_features = 0
        self.active = False
        self.transport: VirtioTransport | None = None
        self.queues: list[SplitVirtqueue] = []
        #: Serialises the device; its transport uses the same lock, so host
        #: threads (backends, ioeventfd) and vCPU threads take turns.
        self.lock = threading.RLock()

    # -- called by the transport -------------------------------------------------

    def attach(self, transport: VirtioTransport, queues: list[SplitVirtqueue]) -> None:
        """Bind the device to its transport and the queues it created."""
        if self.transport is not None:
            raise ValueError(f"{self.name} is already attached to a transport")
        self.transport = transport
        self.queues = queues

    def activate(self, driver_features: int) -> None:
        """The driver set DRIVER_OK having accepted ``driver_features``."""
        self.driver_features = driver_features
        self.active = True
        self.on_activate()

    def reset(self) -> None:
        """The driver reset the device (wrote 0 to the status register)."""
        self.active = False
        self.driver_features = 0
        self.on_reset()

    def notify(self, index: int) -> bool:
        """Process queue ``index`` (one round at most); True when work is left for another round."""
        raise NotImplementedError

    def config_space(self) -> bytes:
        """The device-specific configuration space as the driver reads it."""
        return b""

    def read_config(self, offset: int, size: int) -> bytes:
        """A driver read of ``size`` bytes at ``offset`` in the configuration space.

        Bytes past the end of the space read as all-ones (nothing answers).
        """
        data = self.config_space()[offset : offset + size]
        return data + b"\xff" * (size - len(data))

    def write_config(self, offset: int, data: bytes) -> None:
        """A driver write to the configuration space (ignored by default)."""
        log.debug("%s: ignoring config write of %d bytes at %#x", self.name, len(data), offset)

    def on_activate(self) -> None:
        """Hook: the device starts operating (DRIVER_OK)."""

    def on_reset(self) -> None:
        """Hook: forget per-driver state (the transport has reset the queues)."""

    # -- helpers for subclasses --------------------------------------------------

    def has_feature(self, bit: int) -> bool:
        """True when the driver accepted feature ``bit``."""
        return bool(self.driver_features >> bit & 1)

    def signal_used(self, index: int) -> None:
        """Tell the transport we pushed used elements on queue ``index``."""
        if self.transport is not None:
            self.transport.signal_used(index)

    def config_changed(self) -> None:
        """Tell the transport the configuration space changed."""
        if self.transport is not None:
            self.transport.config_changed()

    def kick(self, index: int) -> None:
        """Host side: have the transport process queue ``index`` (any thread)."""
        if self.transport is not None:
            self.transport.process_queue(index)


# The submodules import the names above; they are imported when first used (a run with no
# virtio device never loads them).
__getattr__, __dir__ = lazy_exports(__name__, {
    "VirtioConsole": "pykvm.virtio.console",
    "VirtioMmioDevice": "pykvm.virtio.mmio",
    "linux_cmdline": "pykvm.virtio.mmio",
    "SplitVirtqueue": "pykvm.virtio.queue",
    "VirtqueueError": "pykvm.errors",
})

__all__ = [
    "RING_FEATURES",
    "STATUS_ACKNOWLEDGE",
    "STATUS_DEVICE_NEEDS_RESET",
    "STATUS_DRIVER",
    "STATUS_DRIVER_OK",
    "STATUS_FAILED",
    "STATUS_FEATURES_OK",
    "VIRTIO_F_EVENT_IDX",
    "VIRTIO_F_INDIRECT_DESC",
    "VIRTIO_F_VERSION_1",
    "SplitVirtqueue",
    "VirtioConsole",
    "VirtioDevice",
    "VirtioMmioDevice",
    "VirtioTransport",
    "VirtqueueError",
    "linux_cmdline",
]
