"""From parsed options to a checked run configuration (:class:`RunConfig`).

Every value is checked here, before anything is created: a bad one is a
``UsageError`` naming the option (one line, exit 2).  The machine is then
built from the configuration alone (``pykvm.cli.setup``).
"""

from __future__ import annotations

import math

from pykvm.cli.grammar import Parsed, split_suboptions
from pykvm.errors import UsageError
from pykvm.values import Value

MAX_CPUS = 255  # xAPIC IDs; the MADT pykvm builds takes no x2APIC entries
MACHINE_TYPES = ("pc", "microvm")
IRQCHIP_MODES = ("on", "off", "split")
DEVICE_DRIVERS = ("isa-debug-exit", "virtio-serial-device", "virtio-serial", "virtconsole", "pc-testdev",
                  "pci-testdev", "virtio-blk-device", "virtio-blk")
DEFAULT_MEMORY = 128 << 20  # QEMU's


class Device(Value):
    """One ``-device DRIVER,prop=value,...``."""

    __slots__ = ("driver", "props")
    __hash__ = None  # mutable, as the dataclass was: not hashable

    def __init__(self, driver: str, props: dict[str, str] | None = None) -> None:
        self.driver = driver
        self.props = {} if props is None else props


class RunConfig(Value):
    """What to boot, on what machine, with which devices and terminals, and pykvm's own settings.

    A list or dict left out is a new one for each configuration.
    """

    __slots__ = (
        "guest", "kernel", "initrd", "append", "memory", "memory_given", "cpus", "topology", "machine", "irqchip",
        "cpu_features", "name", "devices", "globals", "serials", "monitor", "chardevs", "nographic", "nodefaults",
        "freeze", "gdb", "mode", "format", "load_addr", "args", "timeout", "strict", "c_loop", "input",
        "monitor_script", "summary", "stats", "stats_json", "drives", "mem_merge", "memory_backing", "memory_notes", "loadvm", "incoming",
    )
    __hash__ = None  # mutable (filled in while options are read), as the dataclass was: not hashable

    def __init__(
        self,
        guest: str | None = None,
        kernel: str | None = None,
        initrd: list[str] | None = None,
        append: str = "",
        memory: int = DEFAULT_MEMORY,
        memory_given: bool = False,
        cpus: int = 1,
        topology: dict[str, int] | None = None,
        machine: str | None = None,
        irqchip: str | None = None,
        cpu_features: list[tuple[str, bool]] | None = None,
        name: str = "",
        devices: list[Device] | None = None,
        globals: list[tuple[str, str, str]] | None = None,
        serials: list[str] | None = None,
        monitor: str | None = None,
        chardevs: dict[str, tuple[str, dict[str, str]]] | None = None,
        nographic: bool = False,
        nodefaults: bool = False,
        freeze: bool = False,
        gdb: str | None = None,
        mode: str | None = None,
        format: str = "auto",
        load_addr: int | None = None,
        args: tuple[int, int] = (0, 0),
        timeout: float | None = None,
        strict: bool = False,
        c_loop: bool = True,
        input: bytes | None = None,
        monitor_script: str | None = None,
        summary: bool = False,
        stats: bool = False,
        stats_json: str | None = None,
        drives: list | None = None,
        mem_merge: bool = False,
        memory_backing=None,
        memory_notes: list[str] | None = None,
        loadvm: str | None = None,
        incoming: str | None = None,
    ) -> None:
        self.guest = guest
        self.kernel = kernel
        self.initrd = [] if initrd is None else initrd  # -initrd values, each "a args,b" (split by the loader)
        self.append = append
        self.memory = memory
        self.memory_given = memory_given
        self.cpus = cpus
        self.topology = {} if topology is None else topology
        self.machine = machine  # None: the guest's or -kernel's default
        self.irqchip = irqchip  # kernel_irqchip=on|off|split; None: the machine's default
        self.cpu_features = [] if cpu_features is None else cpu_features  # -cpu host,+x,-y
        self.name = name
        self.devices = [] if devices is None else devices
        self.globals = [] if globals is None else globals
        self.serials = [] if serials is None else serials
        self.monitor = monitor
        self.chardevs = {} if chardevs is None else chardevs
        self.nographic = nographic
        self.nodefaults = nodefaults
        self.freeze = freeze
        self.gdb = gdb
        # pykvm's own
        self.mode = mode
        self.format = format
        self.load_addr = load_addr
        self.args = args
        self.timeout = timeout
        self.strict = strict
        self.c_loop = c_loop
        self.input = input
        self.monitor_script = monitor_script
        self.summary = summary
        self.stats = stats
        self.stats_json = stats_json
        self.drives = [] if drives is None else drives  # pykvm.cli.drives.Drive, checked
        self.mem_merge = mem_merge  # -machine mem-merge=on|off, --mem-merge
        self.memory_backing = memory_backing  # pykvm.memory_backing.MemoryBacking; None: anonymous RAM
        self.memory_notes = [] if memory_notes is None else memory_notes  # what the backing cannot do here
        self.loadvm = loadvm  # -loadvm FILE / -incoming file:FILE: the snapshot to restore (pykvm.cli.loadvm)
        self.incoming = incoming  # -incoming tcp:HOST:PORT|unix:PATH: wait for a live migration there


def number(text: str, what: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise UsageError(f"{what}: not a number: {text!r}") from None


def register_value(text: str, what: str) -> int:
    value = number(text, what)
    if not 0 <= value < 1 << 64:
        raise UsageError(f"{what}: {value:#x} does not fit a 64-bit register (0 to 2**64-1)")
    return value


def _size(text: str, what: str) -> int:
    from pykvm.memory import parse_size

    try:
        return parse_size(text)
    except ValueError as exc:
        raise UsageError(f"{what}: {exc}") from None


def _on_off(value: str, what: str) -> bool:
    if value in ("on", "yes", "true", "1"):
        return True
    if value in ("off", "no", "false", "0"):
        return False
    raise UsageError(f"{what}: {value!r} is neither on nor off")


def _memory(text: str) -> int:
    items = dict(split_suboptions(text, "size", option="-m"))
    unknown = set(items) - {"size", "slots", "maxmem"}
    if unknown:
        raise UsageError(f"-m {text}: unknown key {sorted(unknown)[0]!r} (size=, slots=, maxmem=)")
    if "size" not in items:
        raise UsageError(f"-m {text}: no size")
    return _size(items["size"], f"-m {text}")


def _smp(text: str) -> tuple[int, dict[str, int]]:
    items = split_suboptions(text, "cpus", option="-smp")
    values: dict[str, int] = {}
    for key, value in items:
        if key not in ("cpus", "cores", "threads", "sockets", "dies", "maxcpus"):
            raise UsageError(f"-smp {text}: unknown key {key!r} (cpus, cores, threads, sockets, maxcpus)")
        values[key] = number(value, f"-smp {key}")
        if values[key] < 1:
            raise UsageError(f"-smp {text}: {key} must be at least 1")
    topology = {k: v for k, v in values.items() if k not in ("cpus", "maxcpus")}
    product = math.prod(topology.values()) if topology else None
    cpus = values.get("cpus", product or 1)
    maxcpus = values.get("maxcpus", cpus)
    if product is not None and product != maxcpus:
        raise UsageError(f"-smp {text}: sockets x dies x cores x threads = {product}, not {maxcpus} CPUs")
    if cpus > maxcpus:
        raise UsageError(f"-smp {text}: {cpus} CPUs exceed maxcpus={maxcpus}")
    if maxcpus > MAX_CPUS:
        raise UsageError(f"-smp {text}: at most {MAX_CPUS} CPUs")
    topology["maxcpus"] = maxcpus
    return cpus, topology


def _machine(config: RunConfig, text: str) -> None:
    for key, value in split_suboptions(text, "type", option="-machine"):
        if key == "type":
            if value in ("help", "?"):
                raise UsageError(f"-machine: the machine types are {', '.join(MACHINE_TYPES)}")
            base = value.split("-")[0]  # pc-i440fx-7.2, pc-q35-...: pykvm's pc
            if value not in MACHINE_TYPES and base != "pc" and value != "q35":
                raise UsageError(f"-machine {value}: pykvm has {', '.join(MACHINE_TYPES)}")
            config.machine = "pc" if value not in MACHINE_TYPES else value
        elif key == "accel":
            if value != "kvm":
                raise UsageError(f"-machine accel={value}: pykvm has only kvm")
        elif key == "kernel_irqchip":
            value = {"on": "on", "off": "off", "split": "split", "yes": "on", "no": "off"}.get(value, value)
            if value not in IRQCHIP_MODES:
                raise UsageError(f"-machine kernel_irqchip={value}: use on, off or split")
            config.irqchip = value
        elif key == "mem-merge":
            config.mem_merge = _on_off(value, "-machine mem-merge")
        elif key in ("usb", "vmport", "hpet", "pit", "pic", "rtc", "acpi", "graphics", "smm", "dump-guest-core"):
            _on_off(value, f"-machine {key}")  # accepted, checked, and left to the machine type
        else:
            raise UsageError(f"-machine {text}: unknown property {key!r}")


def _cpu(config: RunConfig, text: str) -> None:
    model, *features = [item for item in text.split(",")]
    if model not in ("host", "max"):
        raise UsageError(f"-cpu {model}: pykvm has only host (KVM's own CPUID); add +feature/-feature")
    for feature in features:
        if feature[:1] in "+-" and len(feature) > 1:
            config.cpu_features.append((feature[1:], feature[0] == "+"))
        elif "=" in feature:
            name, _, value = feature.partition("=")
            config.cpu_features.append((name, _on_off(value, f"-cpu {name}")))
        else:
            raise UsageError(f"-cpu {text}: {feature!r} is not +feature, -feature or feature=on|off")


def _device(text: str) -> Device:
    items = split_suboptions(text, "driver", option="-device")
    driver = items[0][1]
    if driver in ("help", "?"):
        raise UsageError(f"-device: pykvm has {', '.join(DEVICE_DRIVERS)}")
    if driver not in DEVICE_DRIVERS:
        raise UsageError(f"-device {driver}: not a device pykvm has ({', '.join(DEVICE_DRIVERS)})")
    return Device(driver, dict(items[1:]))


def _global(text: str) -> tuple[str, str, str]:
    target, eq, value = text.partition("=")
    driver, dot, prop = target.rpartition(".")
    if not (eq and dot and driver and prop):
        raise UsageError(f"-global {text}: use DRIVER.PROP=VALUE")
    return driver, prop, value


def _chardev(text: str) -> tuple[str, str, dict[str, str]]:
    items = split_suboptions(text, "backend", option="-chardev")
    kind, props = items[0][1], dict(items[1:])
    if "id" not in props:
        raise UsageError(f"-chardev {text}: needs id=")
    if kind not in ("stdio", "null", "file", "pty", "socket"):
        raise UsageError(f"-chardev {kind}: use stdio, null, file, pty or socket")
    return props.pop("id"), kind, props


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise UsageError(f"--timeout: not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise UsageError(f"--timeout: the timeout must be a finite number of seconds above 0, not {text!r}")
    return value


def _args(text: str) -> tuple[int, int]:
    parts = [p for p in text.split(",") if p]
    if not 1 <= len(parts) <= 2:
        raise UsageError("--args: give one or two numbers: ARG0[,ARG1]")
    values = [register_value(p, "--args") for p in parts] + [0]
    return values[0], values[1]


def _gdb(text: str) -> str:
    from pykvm.state.gdb_server import GdbAddress

    try:
        GdbAddress.parse(text)
    except ValueError as exc:
        raise UsageError(f"-gdb {text}: {exc}") from None
    return text


_ESCAPES = {"\\": b"\\", "n": b"\n", "r": b"\r", "t": b"\t", "0": b"\0", "a": b"\a", "e": b"\x1b"}


def input_bytes(text: str) -> bytes:
    """``--input``'s text as bytes: UTF-8, with the escapes \\n \\r \\t \\0 \\a \\e \\\\ and \\xHH."""
    out = bytearray()
    i = 0
    while i < len(text):
        char = text[i]
        if char != "\\":
            out += char.encode("utf-8", "surrogateescape")
            i += 1
            continue
        escape = text[i + 1:i + 2]
        if escape == "x":
            digits = text[i + 2:i + 4]
            if len(digits) != 2 or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise UsageError(f"--input: \\x at offset {i} needs two hex digits")
            out.append(int(digits, 16))
            i += 4
        elif escape in _ESCAPES:
            out += _ESCAPES[escape]
            i += 2
        else:
            what = f"\\{escape}" if escape else "a lone \\ at the end"
            raise UsageError(f"--input: unknown escape {what} (use \\n \\r \\t \\0 \\xHH or \\\\)")
    return bytes(out)


def _memory_backing(config: RunConfig, parsed: Parsed) -> None:
    """-mem-prealloc, -mem-path, --hugepages, mem-merge: the backing, checked against this host before anything is made."""
    prealloc, path, huge = parsed.flag("mem_prealloc"), parsed.get("mem_path"), parsed.flag("hugepages")
    if not (prealloc or path is not None or huge or config.mem_merge):
        return
    from pykvm.errors import MemoryBackingError
    from pykvm.memory_backing import MemoryBacking, hugepages_backing

    notes = []
    if path is not None:
        backing = MemoryBacking(prealloc=prealloc, mem_path=path, merge=config.mem_merge)
    elif huge:
        backing, note = hugepages_backing(config.memory, prealloc=prealloc, merge=config.mem_merge)
        notes += [note] if note else []
    else:
        backing = MemoryBacking(prealloc=prealloc, merge=config.mem_merge)
    try:
        notes += backing.check(config.memory)
    except MemoryBackingError as exc:
        raise UsageError(f"-mem-path: {exc}") from None
    config.memory_backing, config.memory_notes = backing, notes


def run_config(parsed: Parsed) -> RunConfig:
    """Check every option and build the configuration (UsageError for the first bad one)."""
    from pykvm.x86.state import MODES

    c = RunConfig()
    c.guest, c.kernel = parsed.get("guest"), parsed.get("kernel")
    if "loadvm" in parsed or "incoming" in parsed:
        from pykvm.cli.loadvm import snapshot_option

        c.loadvm, c.incoming = snapshot_option(parsed.get("loadvm"), parsed.get("incoming"))
    if (c.guest is None) == (c.kernel is None) and not ((c.loadvm or c.incoming) and c.guest is None):
        raise UsageError("give a -kernel FILE or a --guest NAME (one of them)")
    c.initrd = parsed.all("initrd")
    c.append = parsed.get("append", "")
    if "m" in parsed:
        c.memory, c.memory_given = _memory(parsed.get("m")), True
    if "smp" in parsed:
        c.cpus, c.topology = _smp(parsed.get("smp"))
    for text in parsed.all("machine"):
        _machine(c, text)
    if parsed.flag("mem_merge"):
        c.mem_merge = True
    _memory_backing(c, parsed)
    if "accel" in parsed and parsed.get("accel").split(",")[0] != "kvm":
        raise UsageError(f"-accel {parsed.get('accel')}: pykvm has only kvm")
    if "cpu" in parsed:
        _cpu(c, parsed.get("cpu"))
    c.name = parsed.get("name", "")
    c.devices = [_device(t) for t in parsed.all("device")]
    c.globals = [_global(t) for t in parsed.all("global")]
    blk_devices = any(d.driver in ("virtio-blk-device", "virtio-blk") for d in c.devices)
    if "drive" in parsed or "hda" in parsed or blk_devices:
        from pykvm.cli.drives import check_drives, hda, parse_drive

        c.drives = [hda(t) for t in parsed.all("hda")] + [parse_drive(t) for t in parsed.all("drive")]
        check_drives(c.drives, c.devices)
    for text in parsed.all("chardev"):
        ident, kind, props = _chardev(text)
        if ident in c.chardevs:
            raise UsageError(f"-chardev: id {ident!r} is used twice")
        c.chardevs[ident] = (kind, props)
    c.serials = parsed.all("serial")
    if len(c.serials) > 4:
        raise UsageError("-serial: a PC has four COM ports")
    c.monitor = parsed.get("monitor")
    c.nographic = parsed.flag("nographic")
    display = parsed.get("display")
    if display is not None and display.split(",")[0] != "none":
        raise UsageError(f"-display {display}: pykvm has no display (-display none)")
    c.nodefaults = parsed.flag("nodefaults")
    c.freeze = parsed.flag("freeze")
    if parsed.flag("gdb_default"):
        c.gdb = "tcp::1234"
    if "gdb" in parsed:
        c.gdb = _gdb(parsed.get("gdb"))
    mode = parsed.get("mode")
    if mode is not None and mode not in MODES:
        raise UsageError(f"--mode {mode}: use one of {', '.join(MODES)}")
    c.mode = mode
    c.format = parsed.get("format", "auto")
    if c.format not in ("auto", "flat", "elf", "multiboot", "linux", "linux-decompressor", "pvh"):
        raise UsageError(f"--format {c.format}: use auto, flat, elf, multiboot, linux, linux-decompressor or pvh")
    if "load_addr" in parsed:
        c.load_addr = register_value(parsed.get("load_addr"), "--load-addr")
    if "args" in parsed:
        c.args = _args(parsed.get("args"))
    if "timeout" in parsed:
        c.timeout = _timeout(parsed.get("timeout"))
    c.strict = parsed.flag("strict")
    c.c_loop = not parsed.flag("no_c_loop")
    if "input" in parsed:
        c.input = input_bytes(parsed.get("input"))
    c.monitor_script = parsed.get("monitor_script")
    c.summary = parsed.flag("summary")
    c.stats = parsed.flag("stats")
    c.stats_json = parsed.get("stats_json")
    if c.guest is not None and (c.mode or c.load_addr is not None):
        raise UsageError("--mode and --load-addr go with -kernel; a shipped guest knows its own")
    return c
