"""Disks on the command line: ``-drive``, ``-hda`` and ``-device virtio-blk-device``, in QEMU's spelling.

``-drive file=F,if=virtio,format=raw|qcow2,cache=MODE,readonly=on|off,media=disk,id=ID``
puts image F behind a virtio-blk device (``pykvm.virtio.blk``) on a
virtio-mmio window; the kernel finds it through the
``virtio_mmio.device=0x200@BASE:IRQ`` parameter pykvm appends to its
command line.  ``if=none`` only declares the drive, for a
``-device virtio-blk-device,drive=ID[,serial=S]`` (QEMU microvm's way), so
the same command line runs on both.

* ``if=`` -- the one place an interface is chosen (:data:`INTERFACES`):
  ``virtio`` and ``none`` as above; ``ide`` (QEMU's default when ``if=`` is
  left out, and what ``-hda`` means) is the emulated ATA PIO disk on the
  primary IDE channel (``pykvm.devices.ata``: one disk, the primary master);
  ``scsi``, ``floppy``, ``sd``, ``mtd`` and ``pflash`` are not emulated and
  refused with one line.
* ``format=`` -- ``raw`` or ``qcow2``; left out, the file is probed and, as
  QEMU does, a warning says so (a guest that writes the first bytes of a raw
  disk could make it look like qcow2).
* ``cache=`` -- QEMU's five modes, mapped as QEMU maps them
  (``pykvm.block.hostfile``): ``writeback`` (default), ``writethrough``
  (a flush after each write), ``none`` (O_DIRECT), ``directsync`` (both),
  ``unsafe`` (flushes ignored).
* ``readonly=on`` -- the image is opened read-only and the device offers
  VIRTIO_BLK_F_RO: the guest's writes fail with IOERR.
* ``media=cdrom`` is refused: a virtio-blk device is a disk.

Everything a value can get wrong is refused when the options are read
(:func:`parse_drive`, a ``UsageError``: one line, exit 2); images are
opened when the machine is built (:func:`attach_drives`), and one that
cannot be opened is a one-line error too.
"""

from __future__ import annotations

from pykvm.cli.grammar import split_suboptions
from pykvm.errors import UsageError
from pykvm.values import Value

CACHE_MODES = ("writeback", "writethrough", "none", "directsync", "unsafe")  # pykvm.block.hostfile.CACHE_MODES
FORMATS = ("raw", "qcow2")
KEYS = ("file", "if", "format", "cache", "readonly", "media", "id", "index")
#: if= values QEMU knows that pykvm does not emulate (one line, exit 2).  To add an interface: an
#: ``_attach_<if>`` function below, its name in :data:`INTERFACES`, and out of this list.
NOT_EMULATED = ("scsi", "floppy", "sd", "mtd", "pflash", "xen", "virtio-ccw")
DEFAULT_INTERFACE = "ide"  # QEMU's for -drive without if= on a PC
BLK_DEVICES = ("virtio-blk-device", "virtio-blk")


class Drive(Value):
    """One checked ``-drive``: the file, the interface, the format (None: probe), cache mode, read-only, id."""

    __slots__ = ("file", "interface", "format", "cache", "read_only", "id", "option")
    __hash__ = None

    def __init__(self, file: str, interface: str = "virtio", format: str | None = None, cache: str = "writeback",
                 read_only: bool = False, id: str | None = None, option: str = "-drive") -> None:
        self.file = file
        self.interface = interface
        self.format = format
        self.cache = cache
        self.read_only = read_only
        self.id = id
        self.option = option  # how the user spelled it, for messages


def _on_off(value: str, what: str) -> bool:
    if value in ("on", "yes", "true"):
        return True
    if value in ("off", "no", "false"):
        return False
    raise UsageError(f"{what}={value}: use on or off")


def parse_drive(text: str, *, option: str = "-drive") -> Drive:
    """``-drive`` sub-options -> a :class:`Drive`; UsageError for anything pykvm cannot attach."""
    items = split_suboptions(text, None, option=option)
    props: dict[str, str] = {}
    for key, value in items:
        if key not in KEYS:
            raise UsageError(f"{option} {text}: unknown key {key!r} (pykvm knows {', '.join(KEYS)})")
        props[key] = value
    interface = props.get("if", DEFAULT_INTERFACE)
    shown = props.get("file", text)
    if interface in NOT_EMULATED:
        default = "" if "if" in props else f" (QEMU's default for {option} without if=)"
        raise UsageError(f"{option} {shown}: if={interface}{default} is not emulated, use if=virtio")
    if interface not in INTERFACES:
        raise UsageError(f"{option} if={interface}: use if=virtio (or if=none with -device virtio-blk-device)")
    if props.get("media", "disk") != "disk":
        raise UsageError(f"{option} media={props['media']}: CD-ROMs are not emulated (media=disk)")
    if "file" not in props or not props["file"]:
        raise UsageError(f"{option} {text}: needs file=IMAGE (an empty drive is not emulated)")
    fmt = props.get("format")
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"{option} format={fmt}: pykvm reads {', '.join(FORMATS)}")
    cache = props.get("cache", "writeback")
    if cache not in CACHE_MODES:
        raise UsageError(f"{option} cache={cache}: use one of {', '.join(CACHE_MODES)}")
    read_only = _on_off(props["readonly"], f"{option} readonly") if "readonly" in props else False
    if "index" in props:
        try:
            int(props["index"], 0)
        except ValueError:
            raise UsageError(f"{option} index={props['index']}: not a number") from None
    if interface == "none" and "id" not in props:
        raise UsageError(f"{option} {text}: if=none needs id=ID (for -device virtio-blk-device,drive=ID)")
    return Drive(props["file"], interface, fmt, cache, read_only, props.get("id"), option)


def hda(path: str) -> Drive:
    """``-hda F``: QEMU's first IDE disk, i.e. ``-drive file=F,index=0,media=disk`` with if=ide."""
    return parse_drive("file=" + path.replace(",", ",,"), option="-hda")


def check_drives(drives: list[Drive], devices: list) -> None:
    """Ids unique; every -device virtio-blk-device names an if=none drive, each drive used once."""
    ids: dict[str, Drive] = {}
    for drive in drives:
        if drive.id is not None:
            if drive.id in ids:
                raise UsageError(f"-drive id={drive.id}: the id is used twice")
            ids[drive.id] = drive
    if sum(drive.interface == "ide" for drive in drives) > 1:
        raise UsageError("-drive if=ide: pykvm emulates one IDE disk (the primary master); use if=virtio for more")
    used: set[str] = set()
    for device in devices:
        if device.driver not in BLK_DEVICES:
            continue
        unknown = set(device.props) - {"drive", "serial", "id"}
        if unknown:
            raise UsageError(f"-device {device.driver}: unknown property {sorted(unknown)[0]!r} (drive=, serial=)")
        name = device.props.get("drive")
        if name is None:
            raise UsageError(f"-device {device.driver}: needs drive=ID")
        drive = ids.get(name)
        if drive is None:
            raise UsageError(f"-device {device.driver},drive={name}: no -drive with id={name}")
        if drive.interface != "none" or name in used:
            raise UsageError(f"-device {device.driver},drive={name}: the drive is already in use "
                             f"(give it if=none, and to one device)")
        if len(device.props.get("serial", "").encode()) > 20:
            raise UsageError(f"-device {device.driver},serial=: at most 20 bytes")
        used.add(name)


def open_drive(drive: Drive):
    """The drive's image, opened as its options say (a probed format is announced, as QEMU warns)."""
    from pykvm.block import open_image, probe_format
    from pykvm.cli.status import stderr
    from pykvm.errors import ImageError

    try:
        fmt = drive.format
        if fmt is None:
            fmt = probe_format(drive.file)
            stderr(f"pykvm: warning: image format was not specified for {drive.file!r} and probing guessed "
                   f"{fmt}; name it (format={fmt}) for images a guest writes")
        return open_image(drive.file, format=fmt, read_only=drive.read_only, cache=drive.cache)
    except ImageError as exc:
        raise UsageError(f"{drive.option} file={drive.file}: {exc}") from None


def _attach_virtio(machine, drive: Drive, name: str, serial: str = "") -> str:
    """A virtio-blk device on the drive; its ``virtio_mmio.device=`` word."""
    from pykvm.virtio import linux_cmdline

    image = open_drive(drive)
    try:
        _, transport = machine.add_virtio_blk(image, read_only=drive.read_only, serial=serial,
                                              name=f"virtio-blk-{name}")
    except BaseException:
        image.close()
        raise
    slot = next(s for s in machine.virtio_devices if s.transport is transport)
    return linux_cmdline(slot.base, slot.irq)


def _attach_none(machine, drive: Drive, name: str, device=None) -> str:
    """if=none: the drive belongs to the ``-device`` naming it (virtio-blk-device), or to nobody."""
    if device is None:
        return ""  # declared and unused, as QEMU allows
    return _attach_virtio(machine, drive, name, device.props.get("serial", ""))


def _attach_ide(machine, drive: Drive, name: str) -> str:
    """if=ide (and -hda): the ATA PIO disk at 0x1f0-0x1f7/0x3f6, IRQ 14; the kernel needs no words for it."""
    image = open_drive(drive)
    try:
        machine.add_ide_disk(image)
    except BaseException:
        image.close()
        raise
    machine.own(image)
    return ""


#: if= -> how a drive of that interface goes on the machine: (machine, drive, name[, device]) -> kernel words.
INTERFACES = {"virtio": _attach_virtio, "none": _attach_none, "ide": _attach_ide}


def attach_drives(session) -> str:
    """Put every drive on the machine, in command-line order; the kernel command-line words they need."""
    config, machine = session.config, session.machine
    devices = {d.props["drive"]: d for d in config.devices if d.driver in BLK_DEVICES and "drive" in d.props}
    words = []
    for n, drive in enumerate(config.drives):
        name = drive.id or f"drive{n}"
        if drive.interface == "none":
            words.append(_attach_none(machine, drive, name, devices.get(drive.id)))
        else:
            words.append(INTERFACES[drive.interface](machine, drive, name))
    return " ".join(w for w in words if w)
