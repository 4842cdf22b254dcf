"""The options of ``pykvm run`` and ``pykvm trace``: QEMU's where QEMU has them, pykvm's own beside them.

One table (:data:`RUN_OPTIONS`), read by the grammar (``pykvm.cli.grammar``)
and by ``--help`` (:func:`help_text`), which lists every option with one
line and marks those pykvm accepts for QEMU command lines but ignores.
docs/cli.md holds the same list with the QEMU-to-pykvm table.
"""

from __future__ import annotations

from pykvm.cli.grammar import Option, index

Q, P, IGNORED = "qemu", "pykvm", "ignored"

RUN_OPTIONS: list[Option] = [
    # what to boot
    Option(("-kernel",), "FILE", "boot FILE: a Multiboot, Linux bzImage/PVH vmlinux, ELF or flat image"),
    Option(("-initrd",), "FILES", "Multiboot modules 'a args,b' (,, is a comma); a Linux initrd", repeat=True),
    Option(("-append",), "CMDLINE", "the kernel command line (Multiboot, Linux, PVH)"),
    Option(("--guest",), "NAME", "a shipped guest (pykvm guests); it says what it needs", kind=P),
    # the machine
    Option(("-m",), "SIZE", "RAM: a bare number is MiB; K/M/G/T suffixes; size=SIZE[,slots=,maxmem=]"),
    Option(("-smp",), "N[,...]", "vCPUs: N[,cores=,threads=,sockets=,maxcpus=]: a host thread each"),
    Option(("-machine", "-M"), "TYPE[,...]", "pc (fw_cfg, CMOS, ACPI, PCI, in-kernel irqchip; the default for "
           "kernels) or microvm (pykvm's basic machine; the default for flat images); accel=kvm, "
           "kernel_irqchip=on|off|split, mem-merge=on|off (KSM)", dest="machine", repeat=True),
    Option(("-mem-prealloc",), None, "allocate all of guest RAM before the guest starts (MADV_POPULATE_WRITE)",
           dest="mem_prealloc"),
    Option(("-mem-path",), "DIR", "guest RAM from an unlinked file in the hugetlbfs mount DIR (needs its free "
           "huge pages)", dest="mem_path"),
    Option(("-cpu",), "MODEL[,...]", "host[,+feature,-feature]: KVM's CPUID with QEMU's feature names"),
    Option(("-accel",), "ACCEL", "kvm (the only accelerator)"),
    Option(("-enable-kvm",), None, "the same as -accel kvm", dest="enable_kvm"),
    Option(("-name",), "NAME", "the VM's name (shown by the monitor's info name)"),
    Option(("-device",), "DRIVER[,...]", "isa-debug-exit,iobase=,iosize=; virtio-serial-device; "
           "virtconsole,chardev=ID; virtio-blk-device,drive=ID; pc-testdev; pci-testdev (-M pc)", repeat=True),
    Option(("-drive",), "file=F[,...]", "a disk: file=F,if=virtio|none,format=raw|qcow2,cache=writeback|"
           "writethrough|none|unsafe|directsync,readonly=on|off,media=disk,id=ID", repeat=True),
    Option(("-hda",), "FILE", "an IDE disk: not emulated (use -drive file=FILE,if=virtio)", repeat=True),
    Option(("-global",), "DRIVER.PROP=VALUE", "kvm-pit.lost_tick_policy=delay|discard, "
           "isa-debug-exit.iobase=, isa-debug-exit.iosize=, virtio-mmio.force-legacy=false", repeat=True),
    Option(("-nodefaults",), None, "no default serial console and monitor (the debug-exit and POST ports "
           "stay)"),
    Option(("-no-reboot",), None, "a reset ends the run (pykvm's behaviour anyway)", dest="no_reboot"),
    Option(("-S",), None, "start with the vCPUs stopped (until the monitor's cont)", dest="freeze"),
    Option(("-loadvm",), "FILE", "restore the snapshot FILE (the monitor's savevm) and run on from there; "
           "-kernel/--guest may be left out"),
    Option(("-incoming",), "URI", "file:FILE (the same as -loadvm FILE), or tcp:HOST:PORT / unix:PATH: wait there "
           "for a live migration (the monitor's migrate)"),
    Option(("-s",), None, "the GDB stub on tcp::1234 (shorthand for -gdb tcp::1234)", dest="gdb_default"),
    Option(("-gdb",), "DEV", "the GDB stub on DEV: tcp::PORT, tcp:HOST:PORT, unix:PATH"),
    # character devices and the terminal
    Option(("-serial",), "DEV", "COM1..COM4 in order: stdio, mon:stdio, null, none, file:PATH, pty, "
           "unix:PATH,server, tcp:HOST:PORT,server, chardev:ID", repeat=True),
    Option(("-monitor",), "DEV", "the monitor on DEV (stdio, none, or a -serial kind)"),
    Option(("-chardev",), "KIND,id=ID[,...]", "a character device: stdio, null, file,path=, pty, "
           "socket,path=|host=,port=,server=on", repeat=True),
    Option(("-nographic",), None, "no display: serial (and monitor, Ctrl-a c) on the terminal"),
    Option(("-display",), "TYPE", "none (pykvm never has a display)"),
    # accepted for QEMU command lines, with no effect here
    Option(("-no-user-config",), None, "no user configuration files (pykvm reads none)", kind=IGNORED,
           dest="no_user_config"),
    Option(("-vga",), "TYPE", "no display adapter is emulated", kind=IGNORED),
    Option(("-net",), "OPTS", "no network devices are emulated (-net none is what pykvm has)", kind=IGNORED,
           repeat=True),
    Option(("-nic",), "OPTS", "no network devices are emulated", kind=IGNORED, repeat=True),
    Option(("-boot",), "OPTS", "there is no firmware boot order: -kernel boots directly", kind=IGNORED),
    Option(("-rtc",), "OPTS", "the RTC follows the host's clock (base=utc)", kind=IGNORED),
    Option(("-k",), "LAYOUT", "no keyboard is emulated", kind=IGNORED),
    Option(("-usb",), None, "no USB is emulated", kind=IGNORED),
    Option(("-msg",), "OPTS", "pykvm's messages have one format", kind=IGNORED),
    # pykvm's own
    Option(("--mode",), "MODE", "CPU mode of a flat --kernel image: real, protected, paged32, long, "
           "long_user", kind=P),
    Option(("--format",), "FORMAT", "image format: auto, flat, elf, multiboot, linux (a bzImage's kernel unpacked by pykvm), "
           "linux-decompressor (entered at the bzImage's own decompressor), pvh", kind=P),
    Option(("--load-addr",), "ADDR", "load address of a flat image (default 0x100000, real mode 0x8000)",
           kind=P),
    Option(("--args",), "A0[,A1]", "guest arguments in EDI/RDI and ESI/RSI", kind=P),
    Option(("--hugepages",), None, "RAM in huge pages: a hugetlbfs mount with enough free pages, else "
           "transparent huge pages (MADV_HUGEPAGE)", kind=P),
    Option(("--mem-merge",), None, "let KSM merge identical guest pages (MADV_MERGEABLE; -machine mem-merge=on)",
           kind=P, dest="mem_merge"),
    Option(("--timeout",), "S", "stop after S seconds (exit 124)", kind=P),
    Option(("--strict",), None, "an access to an unmapped port or address stops the run (exit 3)", kind=P),
    Option(("--no-c-loop",), None, "handle every exit in Python (for comparison)", kind=P),
    Option(("--input",), "TEXT", "bytes to type into the console (\\n \\r \\t \\0 \\xHH escapes) "
           "instead of the terminal", kind=P),
    Option(("--monitor-script",), "FILE", "monitor commands from FILE, answers on stdout (starts stopped)",
           kind=P),
    Option(("--summary",), None, "print the one-line run summary on stderr even when it is not a "
           "terminal", kind=P),
    Option(("--stats",), None, "print the guest/kernel/user split of the exits and the time", kind=P),
    Option(("--stats-json",), "FILE", "write the split as JSON", kind=P),
    Option(("-help", "-h"), None, "this help", dest="help"),
]

TRACE_OPTIONS: list[Option] = [o for o in RUN_OPTIONS if o.key in (
    "kernel", "initrd", "append", "guest", "m", "machine", "cpu", "accel", "enable_kvm", "mode", "format",
    "load_addr", "args", "serial", "help", "no_user_config", "nodefaults", "display", "nographic")] + [
    Option(("--max",), "N", "stop after N instructions (with --exits: N exits); default 10000", kind=P),
    Option(("--exits",), None, "one line per exit (reason, port/address, data, RIP, instruction)", kind=P),
    Option(("--break",), "ADDR", "run freely to linear ADDR (hardware breakpoint), then trace", kind=P,
           dest="hw_break", repeat=True),
    Option(("--sw-break",), "ADDR", "the same with an int3 breakpoint (hardware where the host cannot)",
           kind=P, dest="sw_break", repeat=True),
]

RUN_TABLE = index(RUN_OPTIONS)
TRACE_TABLE = index(TRACE_OPTIONS)


def help_text(command: str, options: list[Option], summary: str) -> str:
    """``--help``: every option, one line each, QEMU's first, then pykvm's, then the ignored ones."""
    lines = [f"usage: pykvm {command} [options]", "", summary, ""]
    for kind, title in ((Q, "QEMU's options"), (P, "pykvm's options"),
                        (IGNORED, "accepted for QEMU command lines, and ignored")):
        group = [o for o in options if o.kind == kind]
        if not group:
            continue
        lines.append(f"{title}:")
        for o in group:
            spelling = " | ".join(o.names) + (f" {o.value}" if o.value else "")
            lines.append(f"  {spelling:<30} {o.help}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
