"""One ``pykvm run``: the machine its options describe, the terminals and sockets around it, the run.

:class:`Session` owns everything the run opens -- the machine, every
character device, the terminal's mode, the SIGTERM handler -- and closes
it all on the way out, whichever way that is.  Two ways to run:

* **direct**: the main thread runs the guest (``Machine.run``), a reader
  thread forwards input; used when no monitor is reachable (``-serial
  stdio``, ``-serial file:...``, ``--input``, pipes without ``mon:``);
* **monitored**: the guest runs on the monitor's worker thread and the main
  thread serves the terminal (``mon:stdio``, the default on a terminal:
  Ctrl-a c reaches the monitor) and any monitor socket; ``-S`` and
  ``--monitor-script`` start it stopped.
"""

from __future__ import annotations

import sys

from pykvm import timeline
from pykvm.cli.config import RunConfig
from pykvm.cli.endpoints import Endpoint, open_endpoint
from pykvm.cli.status import (
    EXIT_GUEST_FAILED, EXIT_HOST_CANNOT, exit_status, install_stop_signals, restore_signals, stderr, stop_line,
)
from pykvm.errors import UsageError
from pykvm.platform.cpuid import CpuidError


class Echo:
    """A console backend that sends back what the guest writes (the ``virtio-echo`` need)."""

    def __init__(self) -> None:
        self._deliver = None

    def start(self, deliver) -> None:
        self._deliver = deliver

    def write(self, data: bytes) -> None:
        if self._deliver is not None:
            self._deliver(bytes(data))

    def close(self) -> None:
        pass


class TerminalBackend:
    """A virtio console's backend on the terminal: output to stdout, input from the session's reader."""

    def __init__(self, session: "Session") -> None:
        self.session = session

    def start(self, deliver) -> None:
        self.session.guest_input = deliver

    def write(self, data: bytes) -> None:
        self.session.terminal.write(data)

    def close(self) -> None:
        pass


class Session:
    """The machine, endpoints and terminal of one run; ``run()`` returns the exit status."""

    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.info = None  # the shipped guest's GuestInfo
        self.machine = None
        self.terminal = None
        self.endpoints: list[Endpoint] = []
        self.serial: Endpoint | None = None
        self.monitor_endpoint: Endpoint | None = None
        self.guest_input = None  # where terminal/pipe input goes: COM1 or a virtio console
        self.hang_up = None  # what end of input does
        self.virtio_on_terminal = False
        self.extra_serials: list[Endpoint] = []  # COM2..COM4
        self.debug_exit_defaults: dict[str, str] = {}  # -global isa-debug-exit.PROP=VALUE
        self.drive_cmdline = ""  # virtio_mmio.device= words of the -drive disks, for the kernel
        self._signals = None
        self._stop_reason: str | None = None
        self.stop_signal: int | None = None  # the signal that ended the run, if one did
        self.on_stop = self._stop  # what SIGTERM/SIGHUP do (the monitored run replaces it)
        self.gdb_server = None  # -gdb/-s: the stub's server (pykvm.cli.gdb_run), closed before the machine
        self.snapshot = None  # -loadvm's checked file (pykvm.cli.loadvm), loaded in place of a kernel

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._signals is not None:
            restore_signals(self._signals)
            self._signals = None
        if self.gdb_server is not None:
            self.gdb_server.close()
            self.gdb_server = None
        if self.machine is not None:
            self.machine.close()
        if hasattr(self.snapshot, "close"):  # -incoming's connection, when the run ended before it was used
            self.snapshot.close()
        for endpoint in self.endpoints:
            endpoint.close()
        if self.terminal is not None:
            self.terminal.close()

    # -- building ---------------------------------------------------------------------
    def _needs(self) -> tuple[str, ...]:
        return self.info.needs if self.info is not None else ()

    def _platform(self) -> str:
        """``pc`` for -M pc, for a kernel in a boot protocol's format and for a guest that needs it; else ``basic``.

        A flat image (``--mode``, ``--load-addr``, or bytes no loader
        recognises) runs on pykvm's basic machine, as do ``-M microvm`` command lines.
        """
        c = self.config
        if c.machine == "pc":
            return "pc"
        if c.machine == "microvm":
            return "basic"
        if c.guest is not None:
            return "pc" if "pc" in self._needs() else "basic"
        if c.format != "auto":
            return "basic" if c.format == "flat" else "pc"
        if c.mode is not None or c.load_addr is not None:
            return "basic"
        from pykvm.errors import LoaderError
        from pykvm.loaders import ImageSource, detect_format

        try:
            with ImageSource.open(c.kernel) as source:
                return "basic" if detect_format(source) == "flat" else "pc"
        except LoaderError as exc:
            raise UsageError(str(exc)) from None

    def _irqchip(self, platform: str, cpus: int) -> bool:
        c, needs = self.config, self._needs()
        if c.irqchip == "split":
            raise UsageError("-machine kernel_irqchip=split: pykvm has the in-kernel irqchip (on) or none (off)")
        if c.irqchip == "off":
            why = ("-M pc has the in-kernel PIC, IOAPIC and PIT" if platform == "pc" else
                   f"{c.guest} takes interrupts" if "irqchip" in needs else
                   f"-smp {cpus}: the APs start by INIT-SIPI through the in-kernel LAPIC" if cpus > 1 else None)
            if why:
                raise UsageError(f"-machine kernel_irqchip=off: {why}; it needs the in-kernel irqchip")
            return False
        return c.irqchip == "on" or "irqchip" in needs or platform == "pc" or cpus > 1

    def _serial_specs(self) -> list[str]:
        """COM1..COM4's -serial values; COM1's default is the terminal (shared with the monitor)."""
        c = self.config
        if c.serials:
            return c.serials
        if c.nodefaults:
            return ["none"]  # QEMU's -nodefaults: no serial port unless one is asked for
        if c.gdb is not None:
            return ["stdio"]  # the debugger controls the guest: no monitor on the terminal (pykvm.cli.gdb_run)
        return ["mon:stdio"]  # QEMU's -nographic, and pykvm's default: there is no display

    def _open_serials(self) -> None:
        """Open every -serial endpoint: COM1's is ``self.serial``, the others' are kept for :meth:`_add_uarts`."""
        c = self.config
        specs = self._serial_specs()
        self.extra_serials = []
        for n, spec in enumerate(specs):
            if n == 0 and spec == "mon:stdio" and c.monitor == "stdio":
                endpoint = Endpoint("mux")  # -monitor stdio: both on the terminal, the monitor first
            else:
                endpoint = open_endpoint(spec, c.chardevs, what="-serial", label=f"serial{n}")
                self.endpoints.append(endpoint)
            if n == 0:
                self.serial = endpoint
            elif endpoint.kind in ("stdio", "mux"):
                raise UsageError(f"-serial {spec}: only COM1 can be on the terminal (COM{n + 1} here)")
            else:
                self.extra_serials.append(endpoint)

    def _open_monitor(self) -> Endpoint | None:
        c = self.config
        if c.monitor in (None, "none", "stdio") or c.monitor == "mon:stdio":
            return None  # none, or on the terminal through the mux
        endpoint = open_endpoint(c.monitor, c.chardevs, what="-monitor", label="monitor0")
        self.endpoints.append(endpoint)
        return endpoint if endpoint.kind == "backend" else None

    def _uses_terminal(self) -> bool:
        return self.serial.kind in ("stdio", "mux") or self.config.monitor == "stdio" or self.virtio_on_terminal

    def build(self) -> None:
        """Open the endpoints and make the machine the options describe."""
        from pykvm import guests
        from pykvm.cli.terminal import Terminal
        from pykvm.platform.machine import Machine

        c = self.config
        if c.guest is not None:
            try:
                self.info = guests.info(c.guest)
            except LookupError as exc:
                raise UsageError(str(exc)) from None
        if c.gdb is not None:
            from pykvm.cli.gdb_run import check_gdb_options

            check_gdb_options(c)
        shape = None
        if c.loadvm is not None or c.incoming is not None:  # checked before anything is opened or created
            from pykvm.cli.loadvm import read_checked

            self.snapshot, shape = read_checked(c)
        self._open_serials()
        self.monitor_endpoint = self._open_monitor()
        signals = self.serial.kind == "stdio" and c.monitor != "stdio"
        self.terminal = Terminal(signals=signals)
        sink = None
        if self.serial.kind in ("stdio", "mux"):
            sink = self.terminal.write
        elif self.serial.kind == "backend":
            sink = self.serial.backend.write
        platform = shape["platform"] if shape else self._platform()
        drivers = {d.driver for d in c.devices}
        cpus = c.cpus if c.cpus > 1 or "smp" not in self._needs() else 2  # an SMP guest gets two unless told
        topology = c.topology
        irqchip = self._irqchip(platform, cpus)
        if irqchip and self.info is not None and self.info.stop == "hlt" and shape is None:
            reason = "-smp" if cpus > 1 else "-M pc" if platform == "pc" else "-machine kernel_irqchip=on"
            raise UsageError(f"{c.guest} ends with HLT, which the in-kernel irqchip ({reason} needs it) keeps "
                             "waiting for an interrupt: it would never end")
        for note in c.memory_notes:  # what -mem-path/--hugepages/--mem-merge cannot do on this host
            stderr(f"pykvm: warning: {note}")
        shape = shape or dict(memory=c.memory, irqchip=irqchip, cpus=cpus, threads=topology.get("threads", 1),
                              cores=topology.get("cores"), cpu_features=c.cpu_features, platform=platform,
                              pc_testdev="pc-testdev" in drivers, pci_testdev="pci-testdev" in drivers)
        try:
            self.machine = Machine(**shape, memory_backing=c.memory_backing, strict=c.strict, c_loop=c.c_loop,
                                   serial=sink, kernel_stats=c.stats or c.stats_json is not None)
        except CpuidError as exc:
            raise UsageError(f"-cpu: {exc}") from None
        except ValueError as exc:  # the machine refused its shape (memory size, CPUs, platform): say why
            raise UsageError(str(exc)) from None
        m = self.machine
        self.guest_input = m.feed_serial
        self.hang_up = m.serial.host_hung_up
        if self.serial.kind == "backend":
            self.serial.backend.start(m.feed_serial)
        elif self.serial.kind == "none":
            m.remove_device(m.serial)  # -serial none: no COM1 (its ports read 0xff, as unassigned ones do)
        self._add_uarts()
        self._apply_globals()
        self._add_devices()
        for line in [e.announce for e in self.endpoints if e.announce]:
            stderr(f"pykvm: {line}")

    def _add_uarts(self) -> None:
        """COM2..COM4 for the second to fourth -serial (``none`` leaves the port out)."""
        m = self.machine
        for n, endpoint in enumerate(self.extra_serials, start=2):
            if endpoint.kind == "none":
                continue
            if endpoint.kind == "null":
                m.add_uart(n, None)
                continue
            uart = m.add_uart(n, endpoint.backend.write)
            endpoint.backend.start(lambda data, uart=uart: m.feed_serial(data, uart))

    def _apply_globals(self) -> None:
        """-global DRIVER.PROP=VALUE, for the properties pykvm has; any other is refused by name."""
        m = self.machine
        for driver, prop, value in self.config.globals:
            if (driver, prop) == ("kvm-pit", "lost_tick_policy"):
                if value not in ("delay", "discard"):
                    raise UsageError(f"-global kvm-pit.lost_tick_policy={value}: use delay or discard")
                if not m.irqchip:
                    raise UsageError("-global kvm-pit.lost_tick_policy: the PIT comes with the in-kernel irqchip "
                                     "(add -machine kernel_irqchip=on)")
                m.vm.reinject_control(value == "delay")  # KVM_REINJECT_CONTROL
            elif driver == "isa-debug-exit" and prop in ("iobase", "iosize"):
                self.debug_exit_defaults[prop] = value
            elif (driver, prop) == ("virtio-mmio", "force-legacy"):
                if value not in ("false", "off", "no"):
                    raise UsageError(f"-global virtio-mmio.force-legacy={value}: pykvm's virtio-mmio is version 2 "
                                     "(virtio 1.x) only; use force-legacy=false")
            else:
                raise UsageError(f"-global {driver}.{prop}: pykvm has no such property (it has "
                                 "kvm-pit.lost_tick_policy, isa-debug-exit.iobase, isa-debug-exit.iosize, "
                                 "virtio-mmio.force-legacy)")

    def _add_devices(self) -> None:
        from pykvm.devices import DebugExit

        c, m = self.config, self.machine
        if "virtio-echo" in self._needs():
            m.add_virtio_console(Echo())
        if c.drives:
            from pykvm.cli.drives import attach_drives

            self.drive_cmdline = attach_drives(self)
        consoles = [d for d in c.devices if d.driver == "virtconsole"]
        for device in c.devices:
            if device.driver == "isa-debug-exit":
                props = {**self.debug_exit_defaults, **device.props}
                unknown = set(props) - {"iobase", "iosize"}
                if unknown:
                    raise UsageError(f"-device isa-debug-exit: unknown property {sorted(unknown)[0]!r} "
                                     "(iobase=, iosize=)")
                iobase = self._number(props.get("iobase", "0x501"), "-device isa-debug-exit,iobase")
                iosize = self._number(props.get("iosize", "1"), "-device isa-debug-exit,iosize")
                if iosize not in (1, 2, 4):
                    raise UsageError(f"-device isa-debug-exit,iosize={iosize}: use 1, 2 or 4")
                m.remove_device(m.debug_exit)
                m.pc.debug_exit = DebugExit(iosize)
                try:
                    m.add_device(m.pc.debug_exit, port=iobase, length=iosize, name="debug-exit")
                except ValueError as exc:
                    raise UsageError(f"-device isa-debug-exit,iobase={iobase:#x}: {exc}") from None
        for device in consoles:
            ident = device.props.get("chardev")
            if ident is None:
                raise UsageError("-device virtconsole: needs chardev=ID")
            if ident not in c.chardevs:
                raise UsageError(f"-device virtconsole,chardev={ident}: no -chardev with id={ident}")
            from pykvm.cli.endpoints import open_chardev

            endpoint = open_chardev(ident, *c.chardevs[ident], what="-device virtconsole", label=ident)
            self.endpoints.append(endpoint)
            if endpoint.kind in ("stdio", "mux"):
                self.virtio_on_terminal = True
                m.add_virtio_console(TerminalBackend(self), notify="ioeventfd", interrupt="irqfd"
                                     if m.irqchip else "irq_line")
            else:
                m.add_virtio_console(endpoint.backend)  # None for null: output dropped, no input
                endpoint.backend = None  # the machine closes the console and its backend

    @staticmethod
    def _number(text: str, what: str) -> int:
        try:
            return int(text, 0)
        except ValueError:
            raise UsageError(f"{what}={text}: not a number") from None

    def load(self) -> int | None:
        """Load the kernel or guest; an exit status when the host cannot run it, else None."""
        from pykvm import guests
        from pykvm.errors import GuestNotBuilt, GuestNotFound, LoaderError, ModeNotSupported
        from pykvm.loaders import split_initrd

        c, m = self.config, self.machine
        if self.snapshot is not None:
            from pykvm.cli.loadvm import load

            return load(m, self.snapshot)
        try:
            if c.guest is not None:
                if c.append or c.initrd or (self.drive_cmdline and self.info.format == "multiboot"):
                    if self.info.format != "multiboot":
                        raise UsageError(f"-append and -initrd go with a kernel; {c.guest} takes --args")
                    m.load_image(guests.file(c.guest), format="multiboot",
                                 cmdline=self._cmdline(c.append or self.info.cmdline),
                                 modules=self._modules(split_initrd), name=c.guest)
                else:
                    m.load_guest(c.guest, args=c.args)
            else:
                if c.format == "auto" and (c.load_addr is not None or c.mode is not None):
                    self._refuse_flat_options_on_a_kernel()
                m.load_image(c.kernel, format=c.format, mode=c.mode, load_addr=c.load_addr, args=c.args,
                             cmdline=self._cmdline(c.append), modules=self._modules(split_initrd))
        except (LoaderError, GuestNotFound, GuestNotBuilt) as exc:
            raise UsageError(str(exc)) from None
        except ModeNotSupported as exc:
            stderr(f"pykvm run: cannot run on this host: {exc}")
            return EXIT_HOST_CANNOT
        return None

    def _cmdline(self, append: str) -> str:
        """The kernel's command line: -append, then the -drive disks' virtio_mmio.device= (as QEMU microvm adds)."""
        return " ".join(part for part in (append, self.drive_cmdline) if part)

    def _refuse_flat_options_on_a_kernel(self) -> None:
        """--mode/--load-addr mean a flat image: an ELF or a kernel given them would run its own headers."""
        from pykvm.loaders import ImageSource, detect_format

        with ImageSource.open(self.config.kernel) as source:
            kind = detect_format(source)
        if kind != "flat":
            raise UsageError(f"{self.config.kernel} is a {kind} image: --mode and --load-addr are for flat images "
                             f"(add --format flat to load its bytes as they are)")

    def _modules(self, split_initrd) -> list[tuple[str, str]]:
        """-initrd values as (path, string) pairs; the machine opens (and closes) the files."""
        modules = []
        for value in self.config.initrd:
            try:
                modules += split_initrd(value)
            except ValueError as exc:
                raise UsageError(f"-initrd {value}: {exc}") from None
        return modules

    # -- running ----------------------------------------------------------------------
    def _monitored(self) -> bool:
        c = self.config
        return (self.serial.kind == "mux" or c.monitor == "stdio" or self.monitor_endpoint is not None
                or c.monitor_script is not None or c.freeze)

    def run(self) -> int:
        self.build()
        timeline.mark("built")
        status = self.load()
        timeline.mark("loaded")
        if status is not None:
            return status
        if self.config.gdb is not None:
            from pykvm.cli.gdb_run import run_gdb

            self._signals = install_stop_signals(self._on_signal)
            return run_gdb(self)
        if self.config.freeze and not (self.serial.kind == "mux" or self.config.monitor == "stdio"
                                       or self.monitor_endpoint is not None or self.config.monitor_script):
            raise UsageError("-S needs a monitor to continue the guest: add -monitor stdio, a -monitor "
                             "socket or --monitor-script FILE")
        self._signals = install_stop_signals(self._on_signal)
        if self._monitored():
            from pykvm.cli.monitored import run_monitored

            return run_monitored(self)
        return self._run_direct()

    def _on_signal(self, reason: str, signo: int) -> None:
        self.stop_signal = signo
        self.on_stop(reason)

    def _stop(self, reason: str) -> None:
        self._stop_reason = reason
        self.machine.request_stop(reason)

    def feed(self, data: bytes) -> None:
        """Input for the guest (from the terminal, a pipe or --input)."""
        if self.guest_input is not None:
            self.guest_input(data)

    def _start_input(self) -> None:
        c = self.config
        if c.input is not None:
            self.feed(c.input)
            return
        if self._uses_terminal():
            self.terminal.enter_raw()
            self.terminal.start_reader(self.feed, self._end_of_input)

    def _end_of_input(self) -> None:
        self.machine.loop.post(self.hang_up)

    def _run_direct(self) -> int:
        self._start_input()
        try:
            result = self.machine.run(timeout=self.config.timeout)
        finally:
            self.terminal.restore()
        timeline.mark("ran")
        return self.report(result)

    def report(self, result) -> int:
        """The summary (when someone watches stderr), errors, --stats; the exit status."""
        c = self.config
        explain = bool(result.message) and result.ended not in ("timeout", "interrupted", "terminated", "paused")
        if sys.stderr.isatty() or c.summary or c.stats:
            stderr(result.summary(with_message=not explain))  # the message follows in full: once
        else:
            line = stop_line(result.ended, timeout=c.timeout, signo=self.stop_signal)
            if line:
                stderr(line)
        if explain:
            stderr(result.message)
        if result.split is not None and (c.stats or c.stats_json):
            self._report_split(result.split)
        failed = self._guest_failure(result)
        if failed:
            stderr(f"pykvm run: {failed}")
            return EXIT_GUEST_FAILED
        return exit_status(result.ended, result.exit_status)

    def _guest_failure(self, result) -> str:
        """A shipped guest that says it failed (RAX = 0xffffffff000000NN: guests/guest.h's GUEST_FAIL)."""
        if self.info is None or not result.clean or self.info.format == "multiboot":
            return ""
        rax = result.regs.get("rax", 0)
        if rax >> 32 == 0xFFFFFFFF:
            return f"{self.info.name} reported a failure: code {rax & 0xFFFFFFFF:#x} (see guests/README.md)"
        return ""

    def _report_split(self, split) -> None:
        import json

        from pykvm.inspect.split import format_split

        c = self.config
        if c.stats:
            stderr(format_split(split))
        if c.stats_json:
            try:
                with open(c.stats_json, "w") as f:
                    json.dump(split.to_json(), f, indent=2)
            except OSError as exc:
                raise UsageError(f"--stats-json {c.stats_json}: {exc.strerror}") from None

