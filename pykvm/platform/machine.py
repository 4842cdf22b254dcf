"""``Machine``: a VM with its memory, vCPU, buses, devices and loader, composed.

This is the layer most users touch::

    with Machine(memory="64M") as m:
        m.load_guest("hello64")
        result = m.run(timeout=5)
        print(result.serial_text, result.ended)

``Machine`` owns the lifecycle and the public API; each concept lives in a
module of its own and is only put together here:

* the guest-physical layout and every port: ``pykvm.platform.layout``;
* the default PC devices and COM1's output: ``pykvm.platform.pc``;
* the buses: ``pykvm.platform.bus``; the C loop's table the devices offer:
  ``pykvm.platform.fastpath``; coalesced zones: ``pykvm.platform.coalesced``;
* the one vCPU run loop: ``pykvm.platform.vcpu_loop``; the watchdog that
  kicks it: ``pykvm.platform.watchdog``;
* virtio devices and their eventfds: ``pykvm.platform.virtio_wiring``;
* where pykvm's own CPU tables go: ``pykvm.platform.cpu_tables``;
* run results and accounting: ``pykvm.platform.results``.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence

from pykvm._native_loader import lib
from pykvm.devices import Uart16550
from pykvm.host import nested_kvm_module
from pykvm.memory import GuestMemory, parse_size
from pykvm.platform import layout
from pykvm.platform.bus import Bus
from pykvm.platform.coalesced import CoalescedZones
from pykvm.platform.cpu_tables import place_tables
from pykvm.platform.fastpath import FastPath
from pykvm.platform.pc import SerialCapture, add_pc_devices
from pykvm.platform.machine_run import check_timeout, run_machine
from pykvm.platform.results import RunResult
from pykvm.platform.vcpu_loop import VcpuLoop
from pykvm.system import Kvm

__all__ = ["Machine", "RunResult", "check_timeout"]

MIN_MEMORY = 2 << 20
MAX_CPUS = 255  # xAPIC IDs 0-254 (255 is the broadcast ID)
#: ``basic``: pykvm's own devices (COM1, debug-exit, POST, i8042, virtio-mmio): what its guests need, and
#: QEMU's ``-M microvm`` command lines run on it.  ``pc``: also QEMU's ``-M pc`` (pykvm.platform.pc_board).
PLATFORMS = ("basic", "pc")
MAX_MEMORY = 64 << 30

_cpuid_cache: dict[str, object] = {}


def _vcpu_cpuid(kvm: Kvm, apic_id: int, threads: int, cores: int, edits: tuple):
    """The ``struct kvm_cpuid2`` of one vCPU (``pykvm.platform.cpuid``), made once per process and shape.

    KVM_GET_SUPPORTED_CPUID's answer never changes, so neither does a table
    made from it: a machine's vCPUs cost one KVM_SET_CPUID2 each.
    """
    key = (kvm.path, apic_id, threads, cores, edits)
    if key not in _cpuid_cache:
        from pykvm.platform import cpuid

        supported = _cpuid_cache.get(kvm.path)
        if supported is None:
            supported = _cpuid_cache[kvm.path] = cpuid.from_kvm(kvm.supported_cpuid())
        table = cpuid.vcpu_table(supported, apic_id=apic_id, threads=threads, cores=cores, edits=edits)
        _cpuid_cache[key] = cpuid.to_kvm(table)
    return _cpuid_cache[key]


def _round_up(size: int, page: int = layout.PAGE_SIZE) -> int:
    return (size + page - 1) // page * page


class Machine:
    """One VM: its vCPUs, memory, buses and devices.

    ``memory``: RAM size (``"64M"``, ``"1G"`` or bytes), mapped from
    guest-physical 0 (split around the MMIO hole above 3 GiB).
    ``strict``: an access to an unmapped port/address stops the run.
    ``c_loop``: let the C loop handle the devices' hot paths (False sends
    every exit to Python, for comparison).  ``irqchip``: create the
    in-kernel PIC/IOAPIC/LAPIC and PIT (HLT then waits for interrupts).
    ``serial``: a callable receiving the guest's COM1 bytes as they come
    (the result keeps them too).  ``kernel_stats``: read KVM's binary stats
    (KVM_GET_STATS_FD) so that ``RunResult.split`` counts the exits handled
    in the kernel; False saves setting them up (``pykvm run`` without
    ``--stats``).  ``cpus``: how many vCPUs (more than one needs the
    irqchip: the application processors wait for the guest's INIT-SIPI in
    the in-kernel LAPIC; ``pykvm.platform.smp``), with ``threads`` per core
    and ``cores`` per package for their CPUID topology; ``cpu_features``:
    ``-cpu``'s ``(name, on)`` edits (``pykvm.platform.cpuid``).
    ``platform``: ``basic`` or ``pc`` (:data:`PLATFORMS`; ``pc`` implies the
    irqchip and may carry ``pc_testdev`` and ``pci_testdev``).
    ``memory_backing``: how RAM is mapped (``pykvm.memory_backing.MemoryBacking``:
    prealloc, hugetlbfs, THP, KSM); None is plain anonymous memory.
    """

    def __init__(
        self,
        memory: str | int = "64M",
        *,
        strict: bool = False,
        c_loop: bool = True,
        irqchip: bool | None = None,
        serial: Callable[[bytes], None] | None = None,
        kernel_stats: bool = True,
        cpus: int = 1,
        threads: int = 1,
        cores: int | None = None,
        cpu_features: Sequence[tuple[str, bool]] = (),
        platform: str = "basic",
        pc_testdev: bool = False,
        pci_testdev: bool = False,
        kvm: Kvm | None = None,
        memory_backing=None,
    ) -> None:
        self.memory_size = parse_size(memory)
        if self.memory_size < MIN_MEMORY:
            raise ValueError("memory must be at least 2M (pykvm keeps its tables below 1 MiB)")
        if self.memory_size > MAX_MEMORY:
            raise ValueError("memory larger than 64G is not supported")
        if platform not in PLATFORMS:
            raise ValueError(f"platform must be one of {', '.join(PLATFORMS)}, not {platform!r}")
        if irqchip is None:
            irqchip = platform == "pc"  # a PC has its PIC, IOAPIC, LAPICs and PIT
        elif platform == "pc" and not irqchip:
            raise ValueError("the pc platform needs the in-kernel irqchip (pykvm emulates no PIC of its own)")
        if (pc_testdev or pci_testdev) and platform != "pc":
            raise ValueError("pc-testdev and pci-testdev are devices of the pc platform")
        if not isinstance(cpus, int) or not 1 <= cpus <= MAX_CPUS:
            raise ValueError(f"cpus must be 1 to {MAX_CPUS}, not {cpus!r}")
        if cpus > 1 and not irqchip:
            raise ValueError("more than one vCPU needs the in-kernel irqchip (irqchip=True): the APs are "
                             "started by INIT-SIPI through its LAPIC")
        #: The constructor arguments that make this machine's shape (what a snapshot records and checks).
        self.shape = dict(memory=self.memory_size, cpus=cpus, threads=threads, cores=cores, platform=platform,
                          cpu_features=[list(f) for f in cpu_features], irqchip=irqchip, pc_testdev=pc_testdev,
                          pci_testdev=pci_testdev)
        self._own_kvm = kvm is None
        self.kvm = kvm or Kvm()
        self.vm = self.memory = self.vcpu = self.loop = self.vcpu_stats = None
        self.platform = platform
        self.board = None  # the pc platform's devices and tables (pykvm.platform.pc_board.PcBoard)
        self._owned: list = []  # closed with the machine (own())
        self._run_done = threading.Event()  # clear while run() is between its first and last step
        self._run_done.set()
        self._run_thread: threading.Thread | None = None
        self.vcpus: list = []
        self.loops: list[VcpuLoop] = []
        self.stats_fds: list = []
        self.virtio = None  # pykvm.platform.virtio_wiring.VirtioWiring, made by the first add_virtio
        self.irqchip = irqchip
        self.pio = Bus("pio", strict=strict)
        self.mmio = Bus("mmio", strict=strict)
        self.fastpath = FastPath(self.pio, self.mmio)
        self.extra_fast_ranges: list = []  # rows no device owns (labs, benchmarks): absolute FastRanges
        self.loaded: dict | None = None
        self.last_stop_vcpu = 0  # the vCPU whose stop ended the last run() (the GDB stub's thread)
        self._lock = threading.Lock()  # close() against itself
        self._closed = False
        self._output_error: str | None = None  # COM1's sink failed (SerialCapture)
        try:
            self.vm = self.kvm.create_vm()
            self.memory = GuestMemory(self.vm)
            for base, size in layout.ram_regions(self.memory_size):
                self.memory.add_region(base, _round_up(size), backing=memory_backing)
            if irqchip:
                self.vm.create_irqchip()
                self.vm.create_pit2()
            self.coalesced = CoalescedZones(self.vm, self.pio, self.mmio, self.fastpath)
            stats = kernel_stats and self.kvm.check_extension(lib.KVM_CAP_BINARY_STATS_FD)
            cores = cores or max(cpus // threads, 1)
            pvm = nested_kvm_module() == "kvm_pvm"
            if pvm:  # hide what its ring-0 emulator lacks and pykvm cannot finish; the caller's edits still win
                from pykvm.platform.ring0_assist import HIDDEN

                cpu_features = (*((name, False) for name in HIDDEN), *cpu_features)
            for index in range(cpus):
                vcpu = self.vm.create_vcpu(index)
                self.vcpus.append(vcpu)
                vcpu.set_cpuid2(_vcpu_cpuid(self.kvm, index, threads, cores, tuple(cpu_features)))
                loop = VcpuLoop(vcpu, self.pio, self.mmio, self.fastpath, coalesced=self.coalesced,
                                describe_cpu=lambda index=index: self.describe_cpu(index))
                loop.c_loop = c_loop
                if pvm:  # its ring-0 emulator lacks int3, fwait, clac, stac, popcnt
                    from pykvm.platform.ring0_assist import Ring0Assist

                    loop.assist = Ring0Assist(vcpu, self.memory)
                self.loops.append(loop)
                if stats:
                    self.stats_fds.append(vcpu.stats_fd())  # kernel-mode exit counts for the split
            self.vcpu, self.loop = self.vcpus[0], self.loops[0]  # the boot processor
            self.vcpu_stats = self.stats_fds[0] if self.stats_fds else None
            capture = SerialCapture(serial, on_error=self._output_failed)
            self.pc = add_pc_devices(self.add_device, self.irq_line, capture)
            if platform == "pc":
                from pykvm.platform.pc_board import PcBoard

                self.board = PcBoard(self, pc_testdev=pc_testdev, pci_testdev=pci_testdev)
        except BaseException:
            self.close()
            raise

    # -- the default devices -----------------------------------------------------
    @property
    def serial(self):
        """COM1's 16550 (``pykvm.devices.Uart16550``)."""
        return self.pc.serial

    @property
    def debug_exit(self):
        return self.pc.debug_exit

    @property
    def post(self):
        return self.pc.post

    @property
    def i8042(self):
        return self.pc.i8042

    @property
    def c_loop(self) -> bool:
        return self.loop.c_loop

    @property
    def iothread(self):
        """The I/O thread serving virtio eventfds (None until a device needs one)."""
        return self.virtio.iothread if self.virtio is not None else None

    # -- ownership -----------------------------------------------------------------
    def close(self) -> None:
        """Stop a run in progress (from another thread too), then close everything, in order.

        The vCPU goes first (closing it kicks a running loop and waits for it
        to return), then the virtio devices and the I/O thread (their
        handlers touch guest memory), the stats fd, guest memory, the VM and
        (if owned) /dev/kvm.  Safe to call twice.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self.board is not None:
            self.board.close()
        for vcpu in self.vcpus:
            vcpu.close()
        if self._run_thread is not threading.current_thread():
            self._run_done.wait()  # the run reads the stats fds and the capture as it ends: let it finish
        if self.virtio is not None:
            self.virtio.close()
        for resource in reversed(self._owned):
            resource.close()
        for stats_fd in self.stats_fds:
            stats_fd.close()
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

    # -- devices -----------------------------------------------------------------------
    def add_device(self, device, *, port: int | None = None, mmio: int | None = None, length: int | None = None,
                   name: str | None = None) -> None:
        """Register ``device`` on the PIO bus (``port=``) or the MMIO bus (``mmio=``)."""
        if (port is None) == (mmio is None):
            raise ValueError("give exactly one of port= or mmio=")
        length = length or getattr(device, "length", None)
        if not length:
            raise ValueError("give length= (the device has no 'length' attribute)")
        bus, base = (self.pio, port) if port is not None else (self.mmio, mmio)
        bus.register(base, length, device, name)
        self.fastpath.adopt(device)

    def add_ide_disk(self, image, **identity):
        """An ATA disk on ``image`` (a BlockImage the caller owns) at the primary IDE channel (``platform.ide``)."""
        from pykvm.platform.ide import attach_ide_disk

        return attach_ide_disk(self, image, **identity)

    def own(self, resource) -> None:
        """Close ``resource`` (anything with ``close()``, e.g. a disk image) when the machine closes."""
        self._owned.append(resource)

    def remove_device(self, device) -> None:
        """Take ``device`` off whichever bus has it (its fast-path rows go with it)."""
        for bus in (self.pio, self.mmio):
            if any(r.device is device for r in bus):
                bus.unregister(device)
        self.fastpath.changed()

    def irq_line(self, irq: int) -> Callable[[bool], None]:
        """The KVM_IRQ_LINE callable for GSI ``irq`` (does nothing without an irqchip)."""
        def raise_line(level: bool) -> None:
            if self.irqchip:
                self.vm.irq_line(irq, int(level))
        return raise_line

    def _output_failed(self, why: str) -> None:
        """COM1's sink failed: end the run (the result's message says why)."""
        self._output_error = why
        self.loop.request_stop("output-error")

    def fast_ranges(self) -> list:
        """The C loop's table for the devices' current state (absolute rows)."""
        self._sync_extra_rows()
        return self.fastpath.rows()

    def _sync_extra_rows(self) -> None:
        if tuple(self.extra_fast_ranges) != self.fastpath.extra:
            self.fastpath.extra = self.extra_fast_ranges

    # -- virtio devices and I/O handled in the kernel ----------------------------------
    def add_virtio_console(self, backend=None, *, base: int | None = None, irq: int | None = None,
                           notify: str = "python", interrupt: str = "irq_line", name: str | None = None,
                           **console_options):
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

    def add_virtio_blk(self, image, **options):
        """Add a virtio-blk disk on ``image`` (a ``pykvm.block.BlockImage``); return ``(disk, transport)``.

        Options: ``read_only``, ``serial`` and the :meth:`add_virtio` ones
        (default: ioeventfd doorbell, irqfd interrupt): ``pykvm.platform.virtio_wiring.add_blk``.
        """
        from pykvm.platform.virtio_wiring import add_blk

        return add_blk(self, image, **options)

    def add_virtio(self, device, *, base: int | None = None, irq: int | None = None, notify: str = "python",
                   interrupt: str = "irq_line", name: str | None = None):
        """Put virtio ``device`` behind a virtio-mmio window; return its transport.

        ``base``: the window's guest-physical address (default 0xd0000000,
        then the next free 0x200); ``irq``: its line (default: the first
        free of 5, 6, 7, 10, 11, 16-23).  ``notify`` (``"python"``, ``"c"``,
        ``"ioeventfd"``) and ``interrupt`` (``"irq_line"``, ``"irqfd"``) are
        explained in ``pykvm.platform.virtio_wiring``.
        """
        if self.virtio is None:  # the first virtio device: its wiring (and I/O thread) come with it
            from pykvm.platform.virtio_wiring import VirtioWiring

            self.virtio = VirtioWiring(self.vm, self.memory, irqchip=self.irqchip, add_device=self.add_device,
                                       remove_device=self.remove_device, irq_line=self.irq_line,
                                       post=self.loop.post)
        return self.virtio.add(device, base=base, irq=irq, notify=notify, interrupt=interrupt, name=name)

    @property
    def virtio_devices(self) -> list:
        """The virtio devices added (``VirtioSlot``: base, IRQ and notification paths)."""
        return list(self.virtio.slots) if self.virtio is not None else []

    def virtio_cmdline(self) -> str:
        """The Linux parameters that declare this machine's virtio-mmio devices (``virtio_mmio.device=...``)."""
        return self.virtio.cmdline() if self.virtio is not None else ""

    def add_coalesced_zone(self, *, port: int | None = None, mmio: int | None = None, length: int) -> None:
        """Let KVM buffer guest writes to a range in the coalesced ring instead of exiting.

        KVM_REGISTER_COALESCED_MMIO (``port=``: a port range, needs
        KVM_CAP_COALESCED_PIO).  Reads still exit.  The writes reach the
        devices, oldest first, whenever KVM_RUN returns and at the end of a
        run (``pykvm.platform.coalesced``).  Only writes whose sole effect is
        the data (e.g. a UART's THR while it is a plain transmit) may be
        coalesced.  Register zones before ``run()``.
        """
        if (port is None) == (mmio is None):
            raise ValueError("give exactly one of port= or mmio=")
        self.coalesced.add(port if port is not None else mmio, length, pio=port is not None)

    # -- loading -------------------------------------------------------------------------
    def memory_map(self):
        """What loaders are told about this machine's memory (``pykvm.loaders.MemoryMap``)."""
        from pykvm.loaders import MemoryMap

        ram = tuple((base, _round_up(size)) for base, size in layout.ram_regions(self.memory_size))
        reserved = ((0, layout.PAGE_SIZE), (layout.EBDA_ADDR, layout.BIOS_AREA_END - layout.EBDA_ADDR))
        return MemoryMap(ram=ram, e820=tuple(layout.e820_map(self.memory_size)), reserved=reserved)

    def load_guest(self, name: str, args: tuple[int, int] = (0, 0)) -> dict:
        """Load a shipped guest (``pykvm guests``) and put the vCPU in its CPU mode."""
        from pykvm import guests

        info = guests.info(name)
        if info.format == "multiboot":
            return self.load_image(guests.file(name), format="multiboot", cmdline=info.cmdline, name=name)
        return self.load_image(guests.file(name), format="flat", mode=info.mode, load_addr=info.load_addr,
                               args=args, name=name)

    def load_image(self, image, *, format: str = "auto", mode: str | None = None, load_addr: int | None = None,
                   entry: int | None = None, args: tuple[int, int] = (0, 0), cmdline: str = "",
                   modules: Sequence = (), name: str | None = None) -> dict:
        """Load an image (bytes or a path; see ``pykvm.loaders``) and set up the CPU state it starts in.

        Flat images go to ``load_addr`` (default 0x100000, 0x8000 in real
        mode) and start in ``mode`` (default ``long``).  ``cmdline`` and
        ``modules`` (each a path, bytes or ``ImageSource``, or a ``(that,
        string)`` pair: a Multiboot module's string) go to Multiboot and
        Linux kernels.  Nothing is written to guest memory unless the whole
        plan fits; files are read only as far as the plan needs.
        """
        from pykvm.loaders import ImageSource, plan_image

        opened: list = []

        def source_of(item, label: str):
            if isinstance(item, ImageSource):
                return item
            if isinstance(item, (bytes, bytearray, memoryview)):
                src = ImageSource.from_bytes(item, label)
            else:
                src = ImageSource.open(item)
            opened.append(src)
            return src

        try:
            kernel = source_of(image, name or "<image>")
            module_sources = [
                (source_of(m[0], f"module {i + 1}"), m[1]) if isinstance(m, tuple) else source_of(m, f"module {i + 1}")
                for i, m in enumerate(modules)]
            memory_map = self.memory_map()
            plan = plan_image(kernel, memory_map=memory_map, format=format, mode=mode, load_addr=load_addr,
                              entry=entry, cmdline=cmdline, modules=module_sources,
                              kernel_name=name or kernel.name,
                              rsdp=self.board.rsdp_addr if self.board is not None else None)
            cpu = self._prepare_cpu(plan, memory_map)  # before any write: it may refuse
            if self.board is not None:
                self.board.write_memory()  # ACPI tables, IVT, BDA: what the kernel finds left by "firmware"
            for seg in plan.segments:
                if seg.memsize:
                    seg.fill(self.memory.view(seg.gpa, seg.memsize))
            setup = self._start_cpu(plan, cpu, args)
        finally:
            for src in opened:
                src.close()
        size = sum(s.memsize for s in plan.segments if s.what.startswith("kernel") or s.what in ("image", ""))
        self.loaded = {"name": name or os.path.basename(kernel.name), "format": plan.format, "cpu": plan.cpu,
                       "mode": plan.cpu, "entry": plan.entry,
                       "load_addr": min((s.gpa for s in plan.segments if s.memsize), default=0),
                       "size": size, "setup": setup, "notes": plan.notes}
        return self.loaded

    def _prepare_cpu(self, plan, memory_map):
        """The plan's CPU state, and where pykvm's tables go for it (clear of everything the plan writes)."""
        from pykvm.x86.modes import MODES

        tables_for = plan.cpu
        if plan.cpu not in MODES:  # a boot protocol's own state: pykvm.x86.boot_states
            from pykvm.x86.boot_states import table_mode

            tables_for = table_mode(plan.cpu)
        return plan.cpu, place_tables(tables_for, plan.occupied(), memory_map.ram, memory_map.reserved)

    def _start_cpu(self, plan, cpu, args):
        from pykvm.x86.modes import MODES, setup_mode

        cpu, tables = cpu
        if cpu in MODES:
            done = setup_mode(cpu, self.vcpu, self.memory, entry=plan.entry, args=args, tables=tables)
        else:
            from pykvm.x86.boot_states import setup_boot_state

            done = setup_boot_state(cpu, self.vcpu, self.memory, entry=plan.entry, tables=tables)
        if plan.regs:
            regs = self.vcpu.get_regs()
            for reg, value in plan.regs.items():
                setattr(regs, reg, value)
            self.vcpu.set_regs(regs)
        return done

    def add_uart(self, com: int, output: Callable[[bytes], None] | None) -> Uart16550:
        """A 16550 as COM``com`` (2 to 4) at its PC port and IRQ; ``output`` gets what the guest sends."""
        if not 2 <= com <= len(layout.COM_PORTS):
            raise ValueError(f"COM{com}: a PC has COM1 to COM{len(layout.COM_PORTS)} (COM1 is Machine.serial)")
        uart = Uart16550(output=output, interrupt=self.irq_line(layout.COM_IRQS[com - 1]))
        self.add_device(uart, port=layout.COM_PORTS[com - 1], length=8, name=f"com{com}")
        return uart

    # -- running -----------------------------------------------------------------------
    def feed_serial(self, data: bytes, uart: Uart16550 | None = None) -> None:
        """Queue host input for COM1 (or ``uart``); safe from any thread (the vCPU takes it before re-entering)."""
        data, uart = bytes(data), uart or self.serial
        self.loop.post(lambda: uart.enqueue_input(data))

    def request_stop(self, reason: str = "paused") -> None:
        """Ask a running ``run()`` to return soon with ``ended == reason``; safe from any thread.

        The monitor's ``stop`` uses it; ``run()`` again continues the guest
        where it stopped.  Asked between runs, the next run returns at once.
        """
        for loop in self.loops:
            loop.request_stop(reason)
        if self.board is not None:
            self.board.sleep.interrupt(reason)  # a machine in S3 has no loop running

    def cancel_stop(self) -> None:
        """Forget a ``request_stop()`` that came after the run had already ended for another reason."""
        for loop in self.loops:
            loop.cancel_stop()

    def kick(self) -> None:
        """Make every vCPU leave KVM_RUN now (each goes back in unless a stop is due)."""
        for loop in self.loops:
            loop.kick()

    def run(self, timeout: float | None = None, *, flush_interval: float = 0.05) -> RunResult:
        """Run the guest until it stops, fails, times out or Ctrl-C; return a ``RunResult``.

        ``timeout`` (seconds, finite and > 0, or None): the process's
        watchdog (``pykvm.platform.watchdog``) kicks the vCPU out of KVM_RUN
        then; while a serial sink is attached it also kicks every
        ``flush_interval`` seconds while the C loop holds output, so the sink
        sees it promptly.  ``close()`` from another thread ends the run
        (``ended == "closed"``).  Never raises for anything the guest does;
        host errors (KvmError) propagate.
        """
        return run_machine(self, timeout, flush_interval)

    # -- snapshots (pykvm.state.snapshot) --------------------------------------------------
    def save(self, path: str) -> dict:
        """Save the paused machine (after ``run()`` returned) to one file; ``{"bytes", "seconds"}``."""
        from pykvm.state.snapshot import save

        return save(self, path)

    @classmethod
    def restore(cls, path: str, *, setup: Callable[["Machine"], None] | None = None, **options) -> "Machine":
        """A machine built from a snapshot's description, ``setup(machine)``, then its state loaded."""
        from pykvm.state.snapshot import restore

        return restore(cls, path, setup=setup, **options)

    def describe_cpu(self, index: int = 0) -> str:
        """vCPU ``index``'s register dump and the instruction bytes at RIP (for error reports)."""
        from pykvm.x86.cpu_view import describe

        try:
            return describe(self.vcpus[index], self.memory)
        except Exception as exc:  # a report must never hide the original problem
            return f"(register dump unavailable: {exc})"
