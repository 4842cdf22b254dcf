"""The virtio-mmio transport, version 2 (virtio 1.x spec section 4.2).

A virtio-mmio device is a window of guest-physical addresses: 32-bit
control registers from offset 0x000 to 0x0ff, then the device-specific
configuration space from 0x100 (4.2.2).  The driver finds the device by its
MagicValue ("virt"), negotiates features through two 32-bit pages, tells
the device where each virtqueue lives, and kicks queues by writing their
index to QueueNotify; the device answers through one interrupt line and the
InterruptStatus register.

:class:`VirtioMmioDevice` is that window, as a bus device (it implements
``read(offset, size)``/``write(offset, data)`` over :data:`MMIO_SIZE`
bytes) wrapped around a :class:`pykvm.virtio.VirtioDevice`.

Rules it follows (4.2.2.1, 2.1.2, 2.2.1, 6.1):

* MagicValue is 0x74726976, Version is 2; VendorID is :data:`VENDOR_ID`
  (``"pykv"``; Linux ignores it).
* Features: the device offers its own bits plus VIRTIO_F_VERSION_1 and the
  ring features the queue code implements (indirect descriptors, event
  index).  FEATURES_OK is refused -- it stays clear when the driver writes
  it -- when the driver did not accept VERSION_1 or accepted a bit that was
  not offered.  DriverFeatures is frozen once FEATURES_OK is set.
* Status: the driver can only add bits (2.1.1: it MUST NOT clear one);
  writing 0 resets the device: queues, features, InterruptStatus, status.
  DRIVER_OK is refused without FEATURES_OK.  The device processes queues
  only after DRIVER_OK and not after NEEDS_RESET or FAILED.
* A queue's registers are ignored while its QueueReady is 1 (4.2.2.2), and
  the device never touches a queue whose QueueReady is 0.  Writing
  QueueReady=1 validates the layout; a bad one leaves QueueReady at 0 and
  sets NEEDS_RESET.
* InterruptStatus bit 0 = used buffer, bit 1 = configuration change; each
  stays set until the driver writes it to InterruptACK.  The interrupt line
  is level-triggered: high exactly while InterruptStatus is non-zero.
* ConfigGeneration changes whenever the device changes its configuration.
* The driver MUST use aligned 32-bit accesses for 0x000-0x0ff (4.2.2.2);
  any other access there is logged and ignored, reads return all-ones.
  Configuration-space accesses go to the device at any width.
* Registers that do not exist in this device read as 0 (write-only and
  reserved ones) or as all-ones (the shared-memory length/base registers,
  "no such region"); writes to read-only registers are ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pykvm.virtio import (
    RING_FEATURES,
    STATUS_ACKNOWLEDGE,
    STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER,
    STATUS_DRIVER_OK,
    STATUS_FAILED,
    STATUS_FEATURES_OK,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VirtioDevice,
)
from pykvm.devices import FastRow
from pykvm.log import get_logger
from pykvm.platform.layout import VIRTIO_MMIO_BASE
from pykvm.ratelimit import GuestLog
from pykvm.virtio.queue import GuestMemoryLike, SplitVirtqueue, VirtqueueError

log = get_logger("pykvm.virtio.mmio")

__all__ = ["MMIO_SIZE", "VIRTIO_MMIO_BASE", "VirtioMmioDevice", "linux_cmdline"]

#: Bytes of guest-physical address space each device occupies.
MMIO_SIZE = 0x200

# Register offsets (4.2.2, table "MMIO Device Register Layout").  R = the
# driver reads it, W = the driver writes it.
MAGIC_VALUE = 0x000  # R
VERSION = 0x004  # R
DEVICE_ID = 0x008  # R
VENDOR_ID_REG = 0x00C  # R
DEVICE_FEATURES = 0x010  # R: 32 feature bits, page DeviceFeaturesSel
DEVICE_FEATURES_SEL = 0x014  # W
DRIVER_FEATURES = 0x020  # W: 32 feature bits, page DriverFeaturesSel
DRIVER_FEATURES_SEL = 0x024  # W
QUEUE_SEL = 0x030  # W: which queue the Queue* registers refer to
QUEUE_NUM_MAX = 0x034  # R: 0 = no such queue
QUEUE_NUM = 0x038  # W: queue size the driver chose
QUEUE_READY = 0x044  # RW
QUEUE_NOTIFY = 0x050  # W: the queue index (the doorbell)
INTERRUPT_STATUS = 0x060  # R
INTERRUPT_ACK = 0x064  # W
STATUS = 0x070  # RW: device status (2.1)
QUEUE_DESC_LOW = 0x080  # W: descriptor table address, bits 0-31
QUEUE_DESC_HIGH = 0x084  # W: bits 32-63
QUEUE_DRIVER_LOW = 0x090  # W: available ring ("driver area")
QUEUE_DRIVER_HIGH = 0x094
QUEUE_DEVICE_LOW = 0x0A0  # W: used ring ("device area")
QUEUE_DEVICE_HIGH = 0x0A4
SHM_SEL = 0x0AC  # W: shared memory regions (virtio 1.2); this device has none
SHM_LEN_LOW = 0x0B0  # R
SHM_LEN_HIGH = 0x0B4
SHM_BASE_LOW = 0x0B8
SHM_BASE_HIGH = 0x0BC
QUEUE_RESET = 0x0C0  # RW with VIRTIO_F_RING_RESET, which is not offered
CONFIG_GENERATION = 0x0FC  # R
CONFIG = 0x100  # device-specific configuration space

MAGIC = 0x74726976  # "virt", little-endian
MMIO_VERSION = 2  # 1 is the legacy interface
#: Our VendorID: "pykv" little-endian.  (QEMU uses 0x554D4551, "QEMU".)
VENDOR_ID = int.from_bytes(b"pykv", "little")

# InterruptStatus / InterruptACK bits (4.2.2).
INTERRUPT_VRING = 1  # the device used a buffer in some queue
INTERRUPT_CONFIG = 2  # the configuration changed (or the device needs a reset)

FEATURE_PAGES = 2  # 64 feature bits, two 32-bit pages

# Status bits a driver may set; NEEDS_RESET is the device's own.
_DRIVER_STATUS_BITS = (
    STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK | STATUS_FAILED
)
_QUEUE_ADDRESS_REGISTERS = {
    QUEUE_DESC_LOW: ("desc_addr", 0),
    QUEUE_DESC_HIGH: ("desc_addr", 32),
    QUEUE_DRIVER_LOW: ("driver_addr", 0),
    QUEUE_DRIVER_HIGH: ("driver_addr", 32),
    QUEUE_DEVICE_LOW: ("device_addr", 0),
    QUEUE_DEVICE_HIGH: ("device_addr", 32),
}
_ALL_ONES_REGISTERS = {SHM_LEN_LOW, SHM_LEN_HIGH, SHM_BASE_LOW, SHM_BASE_HIGH}


def linux_cmdline(base: int = VIRTIO_MMIO_BASE, irq: int = 5, size: int = MMIO_SIZE,
                  device_id: int | None = None) -> str:
    """The Linux parameter that declares a virtio-mmio device.

    ``virtio_mmio.device=<size>@<baseaddr>:<irq>[:<id>]`` (Linux
    ``drivers/virtio/virtio_mmio.c``; needs CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES),
    e.g. ``virtio_mmio.device=0x200@0xd0000000:5``.  Give one per device.
    """
    text = f"virtio_mmio.device={size:#x}@{base:#x}:{irq}"
    if device_id is not None:
        text += f":{device_id}"
    return text


#: What a snapshot keeps of each split virtqueue (pykvm.virtio.queue.SplitVirtqueue).
_QUEUE_STATE = ("size", "desc_addr", "driver_addr", "device_addr", "ready", "event_idx", "indirect",
                "last_avail_idx", "used_idx", "_signalled_used")


class VirtioMmioDevice:
    """A virtio device behind the virtio-mmio register window (4.2).

    ``device`` is the device type (e.g. :class:`pykvm.virtio.VirtioConsole`),
    ``memory`` the guest memory its queues live in, ``interrupt(level)`` the
    interrupt line, called on each level change.  ``ring_features`` are the
    ring features offered on top of the device's own bits and
    VIRTIO_F_VERSION_1 (pass 0 to offer neither indirect descriptors nor the
    event index).

    Thread safety: one re-entrant lock (:attr:`lock`, the device's)
    serialises register accesses, :meth:`process_queue` and host-side device
    calls, so a vCPU thread, an ioeventfd thread and a backend thread may all
    use the device.
    """

    length = MMIO_SIZE

    def __init__(
        self,
        device: VirtioDevice,
        memory: GuestMemoryLike,
        interrupt: Callable[[bool], None] | None = None,
        *,
        name: str | None = None,
        ring_features: int = RING_FEATURES,
    ) -> None:
        self.device = device
        self.memory = memory
        self.interrupt = interrupt
        self.name = name or device.name
        self.lock = device.lock  # one lock for the transport and its device
        self.device_features = device.features | (1 << VIRTIO_F_VERSION_1) | ring_features
        self.queues = [SplitVirtqueue(memory, size, i) for i, size in enumerate(device.queue_sizes)]
        self.config_generation = 0
        self.notifications = 0  # queue notifications handled (all paths)
        self.errors = 0  # VirtqueueErrors seen (each set NEEDS_RESET)
        self.last_error: str | None = None
        self._log = GuestLog(log)  # every line below is the guest's doing: rate-limited
        self._irq_level = False
        #: ``reschedule(index)``: continue queue ``index`` later (set by the platform; None: at once, here).
        self.reschedule: Callable[[int], None] | None = None
        #: The eventfd a C-loop doorbell signals (notify="c"), or -1: then QueueNotify exits to Python.
        self.doorbell_fd = -1
        self.fast_path_changed: Callable[[], None] | None = None
        self._clear_registers()
        device.attach(self, self.queues)

    # -- state -------------------------------------------------------------------

    def _clear_registers(self) -> None:
        self.status = 0
        self.driver_features = 0
        self.interrupt_status = 0
        self._device_features_sel = 0
        self._driver_features_sel = 0
        self._accepted_unknown_page = False  # a non-zero write beyond bit 63
        self._queue_sel = 0
        for queue in self.queues:
            queue.reset()

    def reset(self) -> None:
        """Reset the device (the driver wrote 0 to Status, or the machine resets).

        4.2.2.1: clears InterruptStatus and every QueueReady; the device
        forgets the negotiated features and its queues.  The interrupt line
        goes low.  ConfigGeneration keeps counting.
        """
        with self.lock:
            self.device.reset()
            self._clear_registers()
            self._update_line()

    def save_state(self) -> dict:
        """The transport's registers and every queue's layout and positions (version 1).

        The device type's host side (a console's backend, input not yet
        delivered) is not part of it: what the guest sees of it is in guest
        memory (the rings) and here; ``pykvm.state.snapshot`` saves a machine
        with virtio devices only when their queues are idle.
        """
        with self.lock:
            return {"version": 1, "status": self.status, "driver_features": self.driver_features,
                    "interrupt_status": self.interrupt_status, "config_generation": self.config_generation,
                    "device_features_sel": self._device_features_sel,
                    "driver_features_sel": self._driver_features_sel,
                    "accepted_unknown_page": self._accepted_unknown_page, "queue_sel": self._queue_sel,
                    "irq": self._irq_level,
                    "queues": [{name: getattr(q, name) for name in _QUEUE_STATE} for q in self.queues]}

    def load_state(self, state: dict) -> None:
        from pykvm.devices import DeviceError, check_state

        s = check_state(self, state)
        if len(s["queues"]) != len(self.queues):
            raise DeviceError(f"{self.name}: {len(s['queues'])} saved queues, the device has {len(self.queues)}")
        with self.lock:
            self.status, self.driver_features = s["status"], s["driver_features"]
            self.interrupt_status, self.config_generation = s["interrupt_status"], s["config_generation"]
            self._device_features_sel, self._driver_features_sel = s["device_features_sel"], s["driver_features_sel"]
            self._accepted_unknown_page, self._queue_sel = s["accepted_unknown_page"], s["queue_sel"]
            self._irq_level = s["irq"]
            for queue, saved in zip(self.queues, s["queues"]):
                for name in _QUEUE_STATE:
                    setattr(queue, name, saved[name])

    @property
    def running(self) -> bool:
        """True while the device may process queues (DRIVER_OK, not broken)."""
        return bool(self.status & STATUS_DRIVER_OK) and not self.status & (
            STATUS_DEVICE_NEEDS_RESET | STATUS_FAILED
        )

    @property
    def irq_level(self) -> bool:
        """The current level of the interrupt line (InterruptStatus != 0)."""
        return self._irq_level

    def _selected_queue(self) -> SplitVirtqueue | None:
        if self._queue_sel < len(self.queues):
            return self.queues[self._queue_sel]
        return None

    # -- the bus device ------------------------------------------------------------

    def read(self, offset: int, size: int) -> bytes:
        """A guest read: a register (aligned 32 bits) or configuration space."""
        with self.lock:
            if offset >= CONFIG:
                data = self.device.read_config(offset - CONFIG, size)
                return data[:size].ljust(size, b"\xff")
            if size != 4 or offset % 4:
                self._bad_access("read", offset, size)
                return b"\xff" * size
            return self._read_register(offset).to_bytes(4, "little")

    def write(self, offset: int, data: bytes) -> None:
        """A guest write: a register (aligned 32 bits) or configuration space."""
        with self.lock:
            if offset >= CONFIG:
                self.device.write_config(offset - CONFIG, bytes(data))
                return
            if len(data) != 4 or offset % 4:
                self._bad_access("write", offset, len(data))
                return
            self._write_register(offset, int.from_bytes(data, "little"))

    def _bad_access(self, kind: str, offset: int, size: int) -> None:
        self._log.warning(
            ("misaligned", kind, offset, size),
            "%s: %d-byte %s at register offset %#x ignored: virtio-mmio registers "
            "take aligned 32-bit accesses (spec 4.2.2.2)", self.name, size, kind, offset,
        )

    # -- the C loop's doorbell ------------------------------------------------------

    def set_doorbell(self, fd: int) -> None:
        """Let the C loop take QueueNotify writes by signalling eventfd ``fd`` (-1: no more)."""
        self.doorbell_fd = fd
        if self.fast_path_changed is not None:
            self.fast_path_changed()

    def fast_rows(self) -> tuple[FastRow, ...]:
        """QueueNotify as an eventfd doorbell while one is set (the I/O thread processes every queue)."""
        if self.doorbell_fd < 0:
            return ()
        return (FastRow(QUEUE_NOTIFY, 4, read="pass", write="eventfd", write_fd=self.doorbell_fd,
                        name="notify"),)

    def fast_hits(self, row: FastRow, hits: int, last_value: int) -> None:
        """Doorbells C signalled: the notifications themselves are counted when the queues are processed."""

    def _read_register(self, offset: int) -> int:
        queue = self._selected_queue()
        if offset == MAGIC_VALUE:
            return MAGIC
        if offset == VERSION:
            return MMIO_VERSION
        if offset == DEVICE_ID:
            return self.device.device_id
        if offset == VENDOR_ID_REG:
            return VENDOR_ID
        if offset == DEVICE_FEATURES:
            page = self._device_features_sel
            return self.device_features >> (32 * page) & 0xFFFFFFFF if page < FEATURE_PAGES else 0
        if offset == QUEUE_NUM_MAX:
            return queue.max_size if queue else 0
        if offset == QUEUE_READY:
            return int(queue.ready) if queue else 0
        if offset == INTERRUPT_STATUS:
            return self.interrupt_status
        if offset == STATUS:
            return self.status
        if offset == CONFIG_GENERATION:
            return self.config_generation
        if offset in _ALL_ONES_REGISTERS:
            return 0xFFFFFFFF
        log.debug("%s: read of write-only or reserved register %#x", self.name, offset)
        return 0

    def _write_register(self, offset: int, value: int) -> None:
        if offset == DEVICE_FEATURES_SEL:
            self._device_features_sel = value
        elif offset == DRIVER_FEATURES_SEL:
            self._driver_features_sel = value
        elif offset == DRIVER_FEATURES:
            self._write_driver_features(value)
        elif offset == QUEUE_SEL:
            self._queue_sel = value
        elif offset == QUEUE_NUM or offset in _QUEUE_ADDRESS_REGISTERS:
            self._write_queue_layout(offset, value)
        elif offset == QUEUE_READY:
            self._write_queue_ready(value)
        elif offset == QUEUE_NOTIFY:
            self.process_queue(value & 0xFFFF)  # bits 16-31: NOTIFICATION_DATA, not offered
        elif offset == INTERRUPT_ACK:
            self.interrupt_status &= ~value
            self._update_line()
        elif offset == STATUS:
            self._write_status(value)
        elif offset == SHM_SEL:
            pass  # no shared memory regions: every selection reads as absent
        else:
            log.debug("%s: write of %#x to read-only or reserved register %#x ignored",
                      self.name, value, offset)

    # -- feature negotiation (2.2, 3.1.1) --------------------------------------------

    def _write_driver_features(self, value: int) -> None:
        if self.status & STATUS_FEATURES_OK:
            log.debug("%s: DriverFeatures written after FEATURES_OK; ignored", self.name)
            return
        page = self._driver_features_sel
        if page >= FEATURE_PAGES:
            self._accepted_unknown_page |= value != 0
            return
        shift = 32 * page
        self.driver_features = (self.driver_features & ~(0xFFFFFFFF << shift)) | (value << shift)

    def _features_acceptable(self) -> bool:
        """May FEATURES_OK be set?  (2.2.1, 6.1: VERSION_1 is required.)"""
        accepted = self.driver_features
        if accepted & ~self.device_features or self._accepted_unknown_page:
            self._log.info("features", "%s: driver accepted features not offered (%#x); FEATURES_OK refused",
                     self.name, accepted & ~self.device_features)
            return False
        if not accepted >> VIRTIO_F_VERSION_1 & 1:
            self._log.info("version", "%s: driver did not accept VIRTIO_F_VERSION_1 (legacy driver?); "
                     "FEATURES_OK refused", self.name)
            return False
        return True

    # -- the status register (2.1) -------------------------------------------------

    def _write_status(self, value: int) -> None:
        if value == 0:
            self.reset()
            return
        if self.status & ~value & _DRIVER_STATUS_BITS:
            log.debug("%s: driver tried to clear status bits %#x; kept (2.1.1)",
                      self.name, self.status & ~value & _DRIVER_STATUS_BITS)
        new = value & ~self.status & _DRIVER_STATUS_BITS
        if new & STATUS_FEATURES_OK and not self._features_acceptable():
            new &= ~STATUS_FEATURES_OK
        if new & STATUS_DRIVER_OK and not (self.status | new) & STATUS_FEATURES_OK:
            self._log.info("driver-ok", "%s: DRIVER_OK without FEATURES_OK; refused", self.name)
            new &= ~STATUS_DRIVER_OK
        self.status |= new
        if new & STATUS_DRIVER_OK:
            self._guarded(self.device.activate, self.driver_features)
            # Buffers made available before DRIVER_OK were not processed then.
            for index, queue in enumerate(self.queues):
                if queue.ready:
                    self.process_queue(index)

    # -- virtqueue set-up (4.2.3.2) ------------------------------------------------

    def _write_queue_layout(self, offset: int, value: int) -> None:
        queue = self._selected_queue()
        if queue is None or queue.ready:
            log.debug("%s: queue register %#x written for queue %d (%s); ignored", self.name,
                      offset, self._queue_sel, "ready" if queue else "no such queue")
            return
        if offset == QUEUE_NUM:
            queue.size = value
            return
        attribute, shift = _QUEUE_ADDRESS_REGISTERS[offset]
        old = getattr(queue, attribute)
        setattr(queue, attribute, (old & ~(0xFFFFFFFF << shift)) | (value << shift))

    def _write_queue_ready(self, value: int) -> None:
        queue = self._selected_queue()
        if queue is None:
            return
        if not value & 1:
            queue.disable()
        elif not queue.ready:
            self._guarded(
                queue.enable,
                event_idx=bool(self.driver_features >> VIRTIO_F_EVENT_IDX & 1),
                indirect=bool(self.driver_features >> VIRTIO_F_INDIRECT_DESC & 1),
            )

    # -- notifications, both ways -------------------------------------------------------

    def process_queue(self, index: int) -> None:
        """Process queue ``index``: the driver notified it (4.2.3.3).

        The QueueNotify register calls this; so may the host directly, from
        any thread, when the notification arrived another way (the C run
        loop, or an ioeventfd).  Does nothing unless the device is running
        and the queue ready.  The device does one round of work; if more is
        waiting, :attr:`reschedule` is asked to call this again later (the
        platform hands it to the I/O thread or the vCPU loop, which look at
        their stop flags between rounds); without one, the rounds run here.
        """
        while True:
            with self.lock:
                if not self.running:
                    return
                if not 0 <= index < len(self.queues) or not self.queues[index].ready:
                    log.debug("%s: notification for queue %d ignored (no such queue or not ready)",
                              self.name, index)
                    return
                self.notifications += 1
                more = self._guarded(self.device.notify, index)
            if not more:
                return
            if self.reschedule is not None:
                self.reschedule(index)
                return

    def signal_used(self, index: int) -> None:
        """Raise the used-buffer interrupt if queue ``index``'s driver wants it (2.7.7)."""
        with self.lock:
            queue = self.queues[index]
            if self.running and queue.ready and queue.needs_notification():
                self._raise(INTERRUPT_VRING)

    def config_changed(self) -> None:
        """Bump ConfigGeneration; interrupt the driver if it is running (4.2.2.1)."""
        with self.lock:
            self.config_generation = (self.config_generation + 1) & 0xFFFFFFFF
            if self.status & STATUS_DRIVER_OK:
                self._raise(INTERRUPT_CONFIG)

    def _raise(self, bits: int) -> None:
        self.interrupt_status |= bits
        self._update_line()

    def _update_line(self) -> None:
        level = self.interrupt_status != 0
        if level != self._irq_level:
            self._irq_level = level
            if self.interrupt is not None:
                self.interrupt(level)

    # -- errors ------------------------------------------------------------------

    def _guarded(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``function`` and return what it returns; a VirtqueueError puts the device in NEEDS_RESET."""
        try:
            return function(*args, **kwargs)
        except VirtqueueError as error:
            self._device_error(error)

    def _device_error(self, error: VirtqueueError) -> None:
        """2.1.2: set DEVICE_NEEDS_RESET; tell a running driver by a config interrupt."""
        message = str(error)
        self.errors += 1
        self.last_error = message
        self._log.warning(message, "%s: %s; device needs reset", self.name, message)
        if self.status & STATUS_DEVICE_NEEDS_RESET:
            return
        self.status |= STATUS_DEVICE_NEEDS_RESET
        if self.status & STATUS_DRIVER_OK:
            self._raise(INTERRUPT_CONFIG)

    def __repr__(self) -> str:
        return (f"VirtioMmioDevice({self.name!r}, id={self.device.device_id}, "
                f"status={self.status:#x}, interrupt_status={self.interrupt_status:#x})")
