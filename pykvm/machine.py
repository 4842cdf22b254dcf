"""``Machine``: memory + a vCPU + buses + devices + a loader + the run loop.

This is the layer most users touch::

    with Machine(memory="64M") as m:
        m.load_guest("hello64")
        result = m.run(timeout=5)
        print(result.serial_text, result.ended)

The default devices are what tiny test guests expect of a PC: a 16550 UART
on COM1 (0x3f8, IRQ 4), QEMU's isa-debug-exit at 0xf4, a POST-code sink at
0x80 and the i8042's reset line at 0x64.  Exits go first to the C loop,
which handles the ranges it was given (the UART's transmit register, the
debug-exit port, ...) and returns the rest to Python's buses.
"""

from __future__ import annotations

import logging
import functools
import os
import queue
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from pykvm import exits
from pykvm.bus import Bus, UnmappedAccess
from pykvm.devices import DebugExit, DeviceStop, I8042, Port80, Uart16550
from pykvm.dispatch import dispatch
from pykvm.errors import GuestError, KvmError, LoaderError
from pykvm._native_loader import lib
from pykvm.memory import GuestMemory, parse_size
from pykvm.runloop import (
    MMIO, PIO, READ_CONST, READ_PASS, RET_CODE_MASK, RET_DEBUG_EXIT, RET_ERROR, RET_INTR, RET_MMIO_READ,
    RET_MMIO_WRITE, RET_PIO_IN, RET_PIO_OUT, RET_TX_PENDING, WRITE_DEBUG_EXIT, WRITE_DROP, WRITE_TXBUF,
    FastRange, RunLoop,
)
from pykvm.split import ExitSplit, compute_split
from pykvm.system import Kvm
from pykvm.watchdog import shared_watchdog
from pykvm.x86 import layout

COM1_PORT = 0x3F8
COM1_IRQ = 4
DEBUG_EXIT_PORT = 0xF4
POST_PORT = 0x80
I8042_COMMAND_PORT = 0x64

# Guest-physical space above RAM that stays free for MMIO (virtio, benchmarks).
MMIO_HOLE_START = 0xC000_0000
HIGH_MEMORY_START = 1 << 32

# pykvm's GDT, TSS, page tables and stack live below this address.
_LOW_RESERVED_END = layout.STACK_TOP

# Keep at most this much serial output in a RunResult; a runaway guest
# printing forever must not exhaust host memory.
SERIAL_CAPTURE_LIMIT = 16 << 20

KICK_SIGNAL = signal.SIGRTMIN

_kick_installed = False


def _install_kick_handler() -> None:
    """A no-op handler for the kick signal, so a signalled KVM_RUN returns EINTR."""
    global _kick_installed
    if not _kick_installed:
        from pykvm._native_loader import lib

        rc = lib.pykvm_install_kick_handler(int(KICK_SIGNAL))
        if rc < 0:
            raise OSError(-rc, os.strerror(-rc), "sigaction")
        _kick_installed = True


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


@dataclass(frozen=True)
class RunResult:
    """How a run ended and what the guest did.

    ``ended`` is one of: ``hlt``, ``debug-exit``, ``reset``, ``shutdown``
    (triple fault), ``timeout``, ``interrupted`` (Ctrl-C), ``internal-error``,
    ``fail-entry``, ``guest-error`` (strict bus), ``system-event``,
    ``debug``, ``unknown``, or the reason given to ``request_stop``
    (``paused``).  ``exit_status`` is what a command line should
    return: the debug-exit status, 0 on a clean HLT or reset, None otherwise.
    """

    ended: str
    exit_status: int | None
    serial: bytes
    exits: dict[str, dict[str, int]]
    seconds: float
    seconds_in_run: float
    seconds_in_c: float
    seconds_in_python: float
    regs: dict[str, int] = field(default_factory=dict)
    message: str = ""
    last_exit: object = None
    c_hits: dict[str, int] = field(default_factory=dict)
    split: ExitSplit | None = None

    @property
    def serial_text(self) -> str:
        return self.serial.decode("utf-8", "replace")

    @property
    def clean(self) -> bool:
        """True for a guest that stopped itself (HLT, reset or debug-exit)."""
        return self.ended in ("hlt", "reset", "debug-exit")

    @property
    def user_exits(self) -> int:
        return sum(v["total"] for k, v in self.exits.items() if k != "intr")

    def summary(self) -> str:
        """One line for stderr: how it ended, status, exits and time."""
        by_reason = ", ".join(f"{name} {v['total']}" for name, v in sorted(self.exits.items()))
        status = "-" if self.exit_status is None else str(self.exit_status)
        line = (
            f"pykvm: {self.ended} (status {status}) after {self.seconds * 1e3:.1f} ms; "
            f"user exits: {by_reason or 'none'}"
        )
        if self.message:
            line += f"; {self.message.splitlines()[0]}"
        return line


class Machine:
    """One VM with one vCPU, its memory, buses and devices.

    ``memory``: RAM size (``"64M"``, ``"1G"`` or bytes), mapped from
    guest-physical 0 (split around the MMIO hole above 3 GiB).
    ``strict``: an access to an unmapped port/address stops the run.
    ``c_loop``: let the C loop handle the devices' hot paths (False sends
    every exit to Python, for comparison).  ``irqchip``: create the
    in-kernel PIC/IOAPIC/LAPIC and PIT (HLT then waits for interrupts).
    ``serial``: a callable receiving the guest's COM1 bytes as they come
    (the result keeps them too).
    """

    def __init__(
        self,
        memory: str | int = "64M",
        *,
        strict: bool = False,
        c_loop: bool = True,
        irqchip: bool = False,
        serial: Callable[[bytes], None] | None = None,
        kvm: Kvm | None = None,
    ) -> None:
        self.memory_size = parse_size(memory)
        if self.memory_size < 2 << 20:
            raise ValueError("memory must be at least 2M (pykvm keeps its tables below 1 MiB)")
        if self.memory_size > (64 << 30):
            raise ValueError("memory larger than 64G is not supported")
        self._own_kvm = kvm is None
        self.kvm = kvm or Kvm()
        self.vm = None
        self.memory: GuestMemory | None = None
        self.vcpu = None
        try:
            self.vm = self.kvm.create_vm()
            self.memory = GuestMemory(self.vm)
            low = min(self.memory_size, MMIO_HOLE_START)
            self.memory.add_region(0, _round_up(low))
            if self.memory_size > low:
                self.memory.add_region(HIGH_MEMORY_START, _round_up(self.memory_size - low))
            self.irqchip = irqchip
            if irqchip:
                self.vm.create_irqchip()
                self.vm.create_pit2()
            self.vcpu = self.vm.create_vcpu(0)
            self.vcpu.set_cpuid2(_supported_cpuid(self.kvm))
            self.loop = RunLoop(self.vcpu)
            self.vcpu_stats = None
            if self.kvm.check_extension(lib.KVM_CAP_BINARY_STATS_FD):
                self.vcpu_stats = self.vcpu.stats_fd()  # kernel-mode exit counts for the split
        except BaseException:
            self.close()
            raise
        self.c_loop = c_loop
        self.pio = Bus("pio", strict=strict)
        self.mmio = Bus("mmio", strict=strict)
        self._serial_sink = serial
        self._serial_out = bytearray()
        self._serial_dropped = 0
        self._mark_fast_dirty()
        self._devices: list[tuple[object, str, int, int]] = []
        self._virtio: list[VirtioSlot] = []  # add_virtio(): transports and their wiring
        self._notify_ranges: list[FastRange] = []  # C-loop doorbells (notify="c")
        self._coalesced_zones: list[tuple[int, int, bool]] = []  # add_coalesced_zone()
        self.iothread = None  # pykvm.iothread.IoThread, made by the first device that needs it
        self.serial = Uart16550(output=self._on_serial, interrupt=self._irq_callback(COM1_IRQ))
        self.serial.on_state_change = self._mark_fast_dirty
        self.debug_exit = DebugExit()
        self.post = Port80()
        self.i8042 = I8042()
        self.add_device(self.serial, port=COM1_PORT, length=8, name="com1")
        self.add_device(self.debug_exit, port=DEBUG_EXIT_PORT, length=1, name="debug-exit")
        self.add_device(self.post, port=POST_PORT, length=1, name="port80")
        self.add_device(self.i8042, port=I8042_COMMAND_PORT, length=1, name="i8042")
        self.extra_fast_ranges: list[FastRange] = []
        self.loaded: dict | None = None
        self._input: queue.SimpleQueue[bytes] = queue.SimpleQueue()
        self._input_waiting = False
        self._vcpu_thread: int | None = None
        self._stop_request: str | None = None

    # -- ownership -----------------------------------------------------------
    def close(self) -> None:
        """Close the stats fd, vCPU, memory, VM and (if owned) /dev/kvm, in that order.

        Virtio devices go first: the I/O thread stops (its handlers touch
        guest memory), consoles close their backends, the eventfds close.
        """
        self._close_virtio()
        if getattr(self, "vcpu_stats", None) is not None:
            self.vcpu_stats.close()
        if self.vcpu is not None:
            self.vcpu.close()
        if self.memory is not None:
            self.memory.close()
        if self.vm is not None:
            self.vm.close()
        if self._own_kvm and self.kvm is not None:
            self.kvm.close()

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- devices ---------------------------------------------------------------
    def add_device(
        self, device, *, port: int | None = None, mmio: int | None = None, length: int | None = None,
        name: str | None = None,
    ) -> None:
        """Register ``device`` on the PIO bus (``port=``) or the MMIO bus (``mmio=``)."""
        if (port is None) == (mmio is None):
            raise ValueError("give exactly one of port= or mmio=")
        length = length or getattr(device, "length", None)
        if not length:
            raise ValueError("give length= (the device has no 'length' attribute)")
        bus, base, kind = (self.pio, port, "pio") if port is not None else (self.mmio, mmio, "mmio")
        bus.register(base, length, device, name)
        self._devices.append((device, kind, base, length))
        self._mark_fast_dirty()

    def _irq_callback(self, irq: int) -> Callable[[bool], None]:
        def raise_line(level: bool) -> None:
            if self.irqchip:
                self.vm.irq_line(irq, int(level))
        return raise_line

    def _on_serial(self, data: bytes) -> None:
        room = SERIAL_CAPTURE_LIMIT - len(self._serial_out)
        self._serial_out += data[:room]
        self._serial_dropped += max(0, len(data) - room)
        if self._serial_sink is not None:
            self._serial_sink(data)

    def _mark_fast_dirty(self) -> None:
        self._fast_dirty = True
        self._attention = True  # the run loop checks this one flag per exit

    def fast_ranges(self) -> list[FastRange]:
        """The C loop's table for the devices' current state."""
        ranges = list(self.extra_fast_ranges)
        for device, kind, base, length in self._devices:
            space = PIO if kind == "pio" else MMIO
            if isinstance(device, DebugExit):
                ranges.append(FastRange(space, base, length, READ_CONST, WRITE_DEBUG_EXIT, (1 << 64) - 1, "debug-exit"))
            elif isinstance(device, Port80):
                ranges.append(FastRange(space, base, length, READ_CONST, WRITE_DROP, 0xFF, "port80"))
            elif isinstance(device, Uart16550) and device.tx_fast_path_ok:
                ranges.append(FastRange(space, base, 1, READ_PASS, WRITE_TXBUF, 0, "uart-thr"))
        ranges.extend(self._notify_ranges)
        # An exit inside a coalesced zone means KVM's ring is full: Python must
        # see it, drain the ring (older writes) first, then handle this one.
        return [r for r in ranges if not self._in_coalesced_zone(r)]

    def _in_coalesced_zone(self, r: FastRange) -> bool:
        return any(
            (r.space == PIO) == pio and r.base < base + length and base < r.base + r.length
            for base, length, pio in self._coalesced_zones
        )

    def _sync_fast_ranges(self) -> None:
        self.loop.set_ranges(self.fast_ranges() if self.c_loop else [])
        self._fast_dirty = False

    def _drain_tx(self) -> None:
        data = self.loop.take_tx()
        if data:
            self.serial.accept_transmitted(data)

    # -- virtio devices and I/O handled in the kernel ----------------------------------
    def add_virtio_console(
        self, backend=None, *, base: int | None = None, irq: int | None = None, notify: str = "python",
        interrupt: str = "irq_line", name: str | None = None, **console_options,
    ):
        """Add a virtio-console on virtio-mmio; return ``(console, transport)``.

        ``backend`` is the console's host side (``pykvm.virtio.backends``;
        None discards output and gives no input); ``console_options`` go to
        :class:`pykvm.virtio.VirtioConsole`.  The machine owns the console:
        ``close()`` closes it and its backend.  The other arguments are
        :meth:`add_virtio`'s.
        """
        from pykvm.virtio import VirtioConsole

        console = VirtioConsole(backend, **console_options)
        try:
            transport = self.add_virtio(console, base=base, irq=irq, notify=notify, interrupt=interrupt,
                                        name=name)
        except BaseException:
            console.close()
            raise
        return console, transport

    def add_virtio(
        self, device, *, base: int | None = None, irq: int | None = None, notify: str = "python",
        interrupt: str = "irq_line", name: str | None = None,
    ):
        """Put virtio ``device`` behind a virtio-mmio window; return its transport.

        ``base``: guest-physical address of the 0x200-byte window (default:
        0xd0000000, then the next free 0x200).  ``irq``: its interrupt line
        (default 5, then 6, ...; not 0, 2 or COM1's 4).

        ``notify`` -- how the driver's doorbell (a write of the queue index
        to QueueNotify, base + 0x50) reaches the device:

        * ``"python"``: an MMIO exit to user space, handled by the transport
          on the vCPU thread (the C loop passes it to Python);
        * ``"c"``: an MMIO exit to user space, handled by the C loop: it
          signals an eventfd and resumes the guest at once; the machine's
          I/O thread then processes every queue of the device (the C loop
          does not pass the value on).  With ``c_loop=False`` this is
          ``"python"``;
        * ``"ioeventfd"``: no exit to user space: KVM_IOEVENTFD on the
          register with datamatch = queue index, one eventfd per queue; the
          I/O thread processes that queue.

        ``interrupt`` -- how the level-triggered line reaches the in-kernel
        irqchip: ``"irq_line"`` (KVM_IRQ_LINE on each level change, from
        whichever thread changed it) or ``"irqfd"`` (KVM_IRQFD with a
        resamplefd: the device writes the irqfd when its line goes high;
        after the guest's EOI KVM lowers the line and signals the
        resamplefd, and the I/O thread writes the irqfd again if the line
        is still high).  Without ``irqchip=True`` there are no interrupts:
        ``"irq_line"`` then does nothing (a polling driver still works) and
        ``"irqfd"`` is refused.
        """
        from pykvm.iothread import IoThread
        from pykvm.virtio import VirtioMmioDevice
        from pykvm.virtio.mmio import MMIO_SIZE
        from pykvm.x86.layout import VIRTIO_MMIO_BASE

        if notify not in ("python", "c", "ioeventfd"):
            raise ValueError(f"notify must be 'python', 'c' or 'ioeventfd', not {notify!r}")
        if interrupt not in ("irq_line", "irqfd"):
            raise ValueError(f"interrupt must be 'irq_line' or 'irqfd', not {interrupt!r}")
        if interrupt == "irqfd" and not self.irqchip:
            raise ValueError("interrupt='irqfd' needs the in-kernel irqchip: Machine(irqchip=True)")
        if base is None:
            base = VIRTIO_MMIO_BASE
            while any(slot.base == base for slot in self._virtio):
                base += MMIO_SIZE
        taken = {0: "the PIT", 2: "the PIC cascade", COM1_IRQ: "COM1"}
        taken.update({slot.irq: slot.name for slot in self._virtio})
        if irq is None:
            irq = next((i for i in range(5, 24) if i not in taken), None)
            if irq is None:
                raise ValueError("no free IRQ for another virtio device (GSIs 5-23 are taken)")
        if irq in taken:
            raise ValueError(f"irq {irq} is taken by {taken[irq]}")
        if not 0 <= irq < 24:
            raise ValueError(f"irq {irq} is not a GSI of the in-kernel IOAPIC (0-23)")
        name = name or f"virtio{len(self._virtio)}-{device.name}"
        transport = VirtioMmioDevice(device, self.memory, name=name)
        self.add_device(transport, mmio=base, length=MMIO_SIZE, name=name)  # checks overlaps first
        slot = VirtioSlot(name, device, transport, base, irq, notify, interrupt)
        self._virtio.append(slot)

        if (notify != "python" or interrupt == "irqfd") and self.iothread is None:
            self.iothread = IoThread(f"pykvm-io-{name}")
        try:
            self._wire_virtio(slot)
        except BaseException:
            self._unwire_virtio(slot)
            raise
        return transport

    def _wire_virtio(self, slot: VirtioSlot) -> None:
        """Connect a virtio device's doorbell and interrupt line as its slot says (add_virtio)."""
        from pykvm.runloop import WRITE_EVENTFD
        from pykvm.virtio.mmio import QUEUE_NOTIFY

        io, transport = self.iothread, slot.transport
        if slot.interrupt == "irq_line":
            transport.interrupt = self._irq_callback(slot.irq)
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
            self._notify_ranges.append(FastRange(MMIO, slot.base + QUEUE_NOTIFY, 4, READ_PASS, WRITE_EVENTFD,
                                                 0, f"{slot.name}-notify", fd))
            self._mark_fast_dirty()

            def all_queues(t=transport) -> None:
                for index in range(len(t.queues)):
                    t.process_queue(index)

            io.watch(fd, all_queues)

    def _unwire_virtio(self, slot: VirtioSlot) -> None:
        """Undo a partly wired add_virtio (the eventfds stay with the I/O thread until close())."""
        from pykvm.virtio.mmio import QUEUE_NOTIFY

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
        self._notify_ranges = [r for r in self._notify_ranges if r.name != f"{slot.name}-notify"]
        self.mmio.unregister(slot.transport)
        self._devices = [d for d in self._devices if d[0] is not slot.transport]
        self._virtio.remove(slot)
        self._mark_fast_dirty()

    @property
    def virtio_devices(self) -> list[VirtioSlot]:
        """The virtio devices added, with their base, IRQ and notification paths."""
        return list(self._virtio)

    def virtio_cmdline(self) -> str:
        """The Linux parameters that declare this machine's virtio-mmio devices.

        ``virtio_mmio.device=0x200@0xd0000000:5`` per device (Linux needs
        CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES); add ``console=hvc0`` for a console.
        """
        from pykvm.virtio import linux_cmdline

        return " ".join(linux_cmdline(slot.base, slot.irq) for slot in self._virtio)

    def add_coalesced_zone(self, *, port: int | None = None, mmio: int | None = None, length: int) -> None:
        """Let KVM buffer guest writes to a range in the coalesced ring instead of exiting.

        KVM_REGISTER_COALESCED_MMIO (``port=``: a port range, needs
        KVM_CAP_COALESCED_PIO).  Reads still exit.  The machine hands the
        buffered writes to the buses, oldest first, whenever KVM_RUN returns
        (before handling that exit), and at the end of a run; when the ring
        is full the next write exits as usual, so nothing is lost.  Only
        writes whose sole effect is the data (e.g. a UART's THR while
        ``tx_fast_path_ok``) may be coalesced.  Register zones before
        ``run()``.  The C loop leaves a zone's exits to Python: such an exit
        means the ring is full, and only Python drains it.
        """
        if (port is None) == (mmio is None):
            raise ValueError("give exactly one of port= or mmio=")
        pio = port is not None
        base = port if pio else mmio
        self.vm.register_coalesced_mmio(base, length, pio=pio)
        self._coalesced_zones.append((base, length, pio))
        self._mark_fast_dirty()

    def _flush_coalesced(self) -> None:
        """Hand the writes buffered in the coalesced ring to the devices, oldest first.

        A run of byte writes to COM1's THR while it is a plain transmit goes
        to the UART in one ``accept_transmitted`` call, as the C loop's
        transmit buffer does; anything else goes through the buses.
        """
        if not self._coalesced_zones:
            return
        transmitted = bytearray()
        for addr, data, is_pio in self.vcpu.drain_coalesced():
            if is_pio and addr == COM1_PORT and len(data) == 1 and self.serial.tx_fast_path_ok:
                transmitted += data
                continue
            if transmitted:
                self.serial.accept_transmitted(bytes(transmitted))
                transmitted.clear()
            (self.pio if is_pio else self.mmio).write(addr, data)
        if transmitted:
            self.serial.accept_transmitted(bytes(transmitted))

    def _close_virtio(self) -> None:
        """Stop the I/O thread, close virtio consoles, close the eventfds (close())."""
        io = getattr(self, "iothread", None)
        if io is not None:
            io.close()  # joins the thread; closes irqfds, resamplefds and ioeventfds
        for slot in getattr(self, "_virtio", ()):
            close = getattr(slot.device, "close", None)
            if close is not None:
                try:
                    close()
                except Exception as exc:  # a backend's problem must not leak the VM's fds
                    logging.getLogger("pykvm.machine").warning("closing %s failed: %s", slot.name, exc)
        self._virtio = []
        self._notify_ranges = []

    # -- loading -----------------------------------------------------------------
    def load_guest(self, name: str, args: tuple[int, int] = (0, 0)) -> dict:
        """Load a shipped guest (``pykvm guests``) and put the vCPU in its CPU mode."""
        from pykvm import guests

        info = guests.info(name)
        return self.load_image(guests.path(name).read_bytes(), format="flat", mode=info.mode,
                               load_addr=info.load_addr, args=args, name=name)

    def load_image(
        self, image: bytes | str | os.PathLike, *, format: str = "auto", mode: str | None = None,
        load_addr: int | None = None, entry: int | None = None, args: tuple[int, int] = (0, 0),
        cmdline: str = "", name: str | None = None,
    ) -> dict:
        """Load an image (flat, ELF or Multiboot; see ``pykvm.loaders``) and set up its CPU mode.

        Flat images go to ``load_addr`` (default 0x100000, 0x8000 in real
        mode) and start in ``mode`` (default ``long``).  Nothing is written
        to guest memory unless the whole image fits.
        """
        from pykvm.loaders import plan_image
        from pykvm.x86.modes import setup_mode

        if not isinstance(image, (bytes, bytearray)):
            path = os.fspath(image)
            try:
                with open(path, "rb") as f:
                    image = f.read()
            except OSError as exc:
                raise LoaderError(f"cannot read {path}: {exc.strerror}") from None
            name = name or os.path.basename(path)
        plan = plan_image(bytes(image), format=format, mode=mode, load_addr=load_addr, entry=entry,
                          memory_size=self.memory_size, cmdline=cmdline)
        try:
            plan.check_fits(self.memory.is_mapped, _LOW_RESERVED_END)
        except LoaderError as exc:
            raise LoaderError(f"{exc} ({self.memory_size >> 20} MiB: {self.memory.describe()})") from None
        for seg in plan.segments + plan.extra_writes:
            self.memory.write(seg.gpa, seg.data)
            if seg.memsize > len(seg.data):
                self.memory.write(seg.gpa + len(seg.data), bytes(seg.memsize - len(seg.data)))
        setup = setup_mode(plan.mode, self.vcpu, self.memory, entry=plan.entry, args=args)
        if plan.regs:
            regs = self.vcpu.get_regs()
            for reg, value in plan.regs.items():
                setattr(regs, reg, value)
            self.vcpu.set_regs(regs)
        size = sum(s.memsize for s in plan.segments)
        self.loaded = {"name": name, "format": plan.format, "mode": plan.mode, "entry": plan.entry,
                       "load_addr": min(s.gpa for s in plan.segments), "size": size, "setup": setup,
                       "notes": plan.notes}
        return self.loaded

    # -- running -------------------------------------------------------------------
    def kick(self, thread_id: int) -> None:
        """Make the vCPU thread leave KVM_RUN: immediate_exit, then a signal (api.rst 'immediate_exit')."""
        run = self.vcpu.kvm_run if self.vcpu is not None else None
        if run is not None:
            run.immediate_exit = 1
            try:
                signal.pthread_kill(thread_id, KICK_SIGNAL)
            except (ProcessLookupError, OSError):
                pass

    def feed_serial(self, data: bytes) -> None:
        """Queue host input for COM1; safe from any thread (the vCPU is kicked to take it)."""
        self._input.put(bytes(data))
        self._input_waiting = True
        self._attention = True
        thread = self._vcpu_thread
        if thread is not None:
            self.kick(thread)

    def request_stop(self, reason: str = "paused") -> None:
        """Ask a running ``run()`` to return soon with ``ended == reason``; safe from any thread.

        The monitor's ``stop`` uses it; ``run()`` again continues the guest
        where it stopped.
        """
        self._stop_request = reason
        thread = self._vcpu_thread
        if thread is not None:
            self.kick(thread)

    def _drain_input(self) -> None:
        self._input_waiting = False
        while not self._input.empty():
            self.serial.enqueue_input(self._input.get_nowait())

    def run(self, timeout: float | None = None, *, flush_interval: float = 0.05) -> RunResult:
        """Run the guest until it stops, fails, times out or Ctrl-C; return a ``RunResult``.

        The process's watchdog thread (``pykvm.watchdog``) kicks the vCPU out
        of KVM_RUN when ``timeout`` seconds have passed and, when a serial
        sink is attached, every ``flush_interval`` seconds while the C loop
        holds output, so the sink sees it promptly.
        Never raises for anything the guest does; host errors (KvmError) propagate.
        """
        _install_kick_handler()
        started = time.perf_counter()
        me = threading.get_ident()
        deadline = None if timeout is None else started + timeout
        ended, status, message, last = "unknown", None, "", None
        c0 = self.loop.counters()
        h0 = self.loop.histograms()
        kernel0 = self.vcpu_stats.read() if self.vcpu_stats is not None else None
        self._vcpu_thread = me
        if self._stop_request is not None:
            self.vcpu.kvm_run.immediate_exit = 1  # asked before this run started
        loop_state = self.loop._loop
        pending = (lambda: bool(loop_state.txlen)) if self._serial_sink is not None else None
        watchdog = shared_watchdog()
        watch = watchdog.arm(self.kick, me, deadline, pending, flush_interval)
        try:
            ended, status, message, last = self._run_until_stop(watch.timed_out)
        except KeyboardInterrupt:
            ended, message = "interrupted", "stopped by Ctrl-C"
        finally:
            watchdog.disarm(watch)
            self._vcpu_thread = None
            self.vcpu.kvm_run.immediate_exit = 0
            self.loop.clear_pending()
            self._flush_coalesced()
            self._drain_tx()
        return self._result(ended, status, message, last, started, c0, h0, kernel0)

    def _run_until_stop(self, timed_out: threading.Event) -> tuple[str, int | None, str, object]:
        """The vCPU loop.  Hot path first: single port/MMIO accesses arrive
        packed in the C loop's return value (csrc/runloop.h) and go straight
        to the buses; every other exit is decoded into a value."""
        run = self.vcpu.kvm_run
        state = self.loop.state
        loop_run = functools.partial(lib.pykvm_loop_run, state)  # GIL released inside
        pio_read, pio_write = self.pio.read, self.pio.write
        mmio_read, mmio_write = self.mmio.read, self.mmio.write
        coalesced = self._coalesced_zones  # empty for most machines
        tx_pending, code_mask, pio_out = RET_TX_PENDING, RET_CODE_MASK, RET_PIO_OUT
        while True:
            if self._attention:  # the fast-path table or host input changed
                self._attention = False
                if self._fast_dirty:
                    self._sync_fast_ranges()
                if self._input_waiting:
                    self._drain_input()
            ret = loop_run()
            if coalesced:
                self._flush_coalesced()  # older than what C buffered and than this exit
            if ret & tx_pending:
                self._drain_tx()  # before Python touches the UART again
            code = ret & code_mask
            try:
                if code == pio_out:
                    size = (ret >> 8) & 0xF
                    value = state.io_value
                    pio_write(ret >> 16, _BYTE[value] if size == 1 else value.to_bytes(size, "little"))
                    continue
                if code == RET_PIO_IN:
                    state.io_value = int.from_bytes(pio_read(ret >> 16, (ret >> 8) & 0xF), "little")
                    state.io_answer = 1
                    continue
                if code == RET_MMIO_WRITE:
                    mmio_write(state.io_addr, state.io_value.to_bytes((ret >> 8) & 0xF, "little"))
                    continue
                if code == RET_MMIO_READ:
                    state.io_value = int.from_bytes(mmio_read(state.io_addr, (ret >> 8) & 0xF), "little")
                    state.io_answer = 1
                    continue
                if code == RET_DEBUG_EXIT:
                    return "debug-exit", self.loop.stop_status, "", None
                if code == RET_INTR:
                    if timed_out.is_set():
                        return "timeout", None, "stopped by --timeout", None
                    if self._stop_request is not None:
                        reason, self._stop_request = self._stop_request, None
                        return reason, None, "", None
                    run.immediate_exit = 0
                    continue  # a kick for input or output; Python ran its signal handlers
                if code == RET_ERROR:
                    raise KvmError("KVM_RUN", self.loop.error_errno)
                exit = exits.decode(run)
                if isinstance(exit, (exits.IoOut, exits.IoIn, exits.MmioWrite, exits.MmioRead)):
                    answer = dispatch(exit, self.pio, self.mmio)  # REP string I/O, wide MMIO
                    if answer is not None:
                        if isinstance(exit, exits.IoIn):
                            exits.complete_io_in(run, answer)
                        else:
                            exits.complete_mmio_read(run, answer)
                    continue
            except DeviceStop as stop:
                return stop.reason, stop.status, "", None
            except UnmappedAccess as exc:
                rip = self.vcpu.get_regs().rip
                exc.rip = rip
                return "guest-error", None, str(GuestError(_with_rip(str(exc), rip), rip)), None
            return self._final_exit(exit)

    def _final_exit(self, exit) -> tuple[str, int | None, str, object]:
        """How a run ends on an exit that is not I/O."""
        if isinstance(exit, exits.Hlt):
            return "hlt", 0, "", exit
        if isinstance(exit, exits.Shutdown):
            return "shutdown", None, "triple fault or shutdown\n" + self.describe_cpu(), exit
        if isinstance(exit, exits.InternalError):
            return "internal-error", None, f"KVM internal error: {exit.suberror_name}\n" + self.describe_cpu(), exit
        if isinstance(exit, exits.FailEntry):
            return "fail-entry", None, (
                f"VM entry failed, hardware reason {exit.hardware_entry_failure_reason:#x}\n" + self.describe_cpu()
            ), exit
        if isinstance(exit, exits.SystemEvent):
            return "system-event", None, f"system event type {exit.type}", exit
        if isinstance(exit, exits.Debug):
            return "debug", None, f"debug exception {exit.exception} at {exit.pc:#x}", exit
        return "unknown", None, f"unhandled exit {exit}\n" + self.describe_cpu(), exit

    def _result(self, ended, status, message, last, started, c0, h0, kernel0) -> RunResult:
        from pykvm.exits import REASON_NAMES

        seconds = time.perf_counter() - started
        c1 = self.loop.counters()
        per_reason = {}
        for reason, now in c1["exits"].items():
            before = c0["exits"].get(reason, {"total": 0, "c": 0, "python": 0})
            delta = {k: now[k] - before[k] for k in now}
            if delta["total"]:
                per_reason[REASON_NAMES.get(reason, str(reason))] = delta
        kernel1 = self.vcpu_stats.read() if self.vcpu_stats is not None else None
        histograms = {}
        for reason, now in self.loop.histograms().items():
            before = h0.get(reason, {"handle": [0] * len(now["handle"]), "roundtrip": [0] * len(now["roundtrip"])})
            delta = {k: [a - b for a, b in zip(now[k], before[k])] for k in now}
            if any(delta["roundtrip"]):
                histograms[REASON_NAMES.get(reason, str(reason))] = delta
        split = compute_split(
            kernel0, kernel1, per_reason, seconds,
            c1["seconds_in_run"] - c0["seconds_in_run"],
            c1["seconds_in_c"] - c0["seconds_in_c"],
            c1["seconds_in_python"] - c0["seconds_in_python"],
            histograms,
        )
        regs = self.vcpu.get_regs()
        if self._serial_dropped:
            message = (message + "\n" if message else "") + f"{self._serial_dropped} serial bytes not kept"
        return RunResult(
            ended=ended,
            exit_status=status,
            serial=bytes(self._serial_out),
            exits=per_reason,
            seconds=seconds,
            seconds_in_run=c1["seconds_in_run"] - c0["seconds_in_run"],
            seconds_in_c=c1["seconds_in_c"] - c0["seconds_in_c"],
            seconds_in_python=c1["seconds_in_python"] - c0["seconds_in_python"],
            regs={name: getattr(regs, name) for name in _REG_NAMES},
            message=message,
            last_exit=last,
            c_hits=self.loop.hits(),
            split=split,
        )

    def describe_cpu(self) -> str:
        """Register dump and the instruction bytes at RIP (for error reports)."""
        from pykvm.cpustate import describe

        try:
            return describe(self.vcpu, self.memory)
        except Exception as exc:  # a report must never hide the original problem
            return f"(register dump unavailable: {exc})"

    # -- looking inside (pykvm.translate, pykvm.trace, pykvm.monitor) ------------------
    def translate(self, gva: int):
        """The chain GVA -> GPA (each page-table level) -> HVA (which slot) -> HPA, as a
        ``pykvm.translate.AddressChain``; ``print()`` it.  ``gva`` is a linear address."""
        from pykvm.translate import translate_address

        return translate_address(self.vcpu, self.memory, gva)

    def tracer(self, **kwargs):
        """A ``pykvm.trace.Tracer`` on this machine: single-step, breakpoints, exit tracing."""
        from pykvm.trace import Tracer

        return Tracer(self, **kwargs)

    def cancel_stop(self) -> None:
        """Forget a ``request_stop()`` that came after the run had already ended for another reason."""
        self._stop_request = None


_BYTE = [bytes((i,)) for i in range(256)]  # one-byte OUT data without a to_bytes call

_REG_NAMES = (
    "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split()
)


_cpuid_cache: dict[str, object] = {}


def _supported_cpuid(kvm: Kvm):
    """KVM_GET_SUPPORTED_CPUID, asked once per process and device: the answer never changes."""
    if kvm.path not in _cpuid_cache:
        _cpuid_cache[kvm.path] = kvm.supported_cpuid()
    return _cpuid_cache[kvm.path]


def _round_up(size: int, page: int = 4096) -> int:
    return (size + page - 1) // page * page


def _with_rip(text: str, rip: int) -> str:
    return text if "RIP" in text else f"{text} at RIP {rip:#x}"
