"""``pykvm img``: info, create, check and convert, with qemu-img's spelling and output.

``main(argv)`` takes the arguments after ``img`` and returns the exit code.
Output matches ``qemu-img`` 7.2 line by line where the information is the
same (``tests/test_qcow2_qemu.py`` compares them).  Exit codes: ``check``
answers as qemu-img does (0 clean, 2 corrupt, 3 leaks only, 63 the format
has no checks); any other failure (bad arguments, unreadable or invalid
files) prints one line on stderr and exits 2.
"""

from __future__ import annotations

import getopt
import os
import sys
import time
from collections.abc import Callable

from pykvm.block.formats import FORMATS, create_image, open_image, probe_format
from pykvm.block.qcow2 import Qcow2Image, check_qcow2
from pykvm.block.qcow2.header import COMPAT_LAZY_REFCOUNTS, INCOMPAT_CORRUPT, INCOMPAT_DIRTY
from pykvm.block.qcow2.create import DEFAULT_CLUSTER_SIZE
from pykvm.block.units import parse_size, size_to_str
from pykvm.errors import ImageError

USAGE = """\
usage: pykvm img COMMAND ...
  info [-f FMT] FILE
  create -f FMT [-o OPTIONS] [-b BACKING_FILE [-F BACKING_FMT]] FILE [SIZE]
  check [-f FMT] FILE
  convert [-f FMT] -O FMT [-o OPTIONS] INPUT OUTPUT
FMT is raw or qcow2.  OPTIONS (qcow2): size=, backing_file=, backing_fmt=,
cluster_size=, compat=0.10|1.1, refcount_bits=, lazy_refcounts=on|off.
SIZE takes qemu-img's suffixes: K, M, G, T, P, E."""

#: check's answer for formats without consistency checks (qemu-img's exit code 63).
EXIT_NO_CHECKS = 63
_CONVERT_CHUNK = 1 << 20


class UsageError(Exception):
    """Bad arguments: printed as one line, exit code 2."""


def main(argv: list[str] | None = None) -> int:
    """Run ``pykvm img`` with ``argv`` (the words after ``img``); return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command = COMMANDS.get(argv[0]) if argv else None
    try:
        if not argv:
            raise UsageError(f"expecting a command ({', '.join(COMMANDS)}); see --help")
        if command is None:
            raise UsageError(f"Command not found: {argv[0]}")
        return command(argv[1:])
    except (UsageError, ImageError, ValueError) as e:
        print(f"pykvm img: {e}", file=sys.stderr)
        return 2


def _options(args: list[str], short: str, positional: tuple[int, int], command: str):
    try:
        options, rest = getopt.gnu_getopt(args, short)
    except getopt.GetoptError as e:
        raise UsageError(f"{command}: {e}") from None
    low, high = positional
    if not low <= len(rest) <= high:
        raise UsageError(f"{command}: expected {low if low == high else f'{low} to {high}'} "
                         f"arguments, got {len(rest)}")
    return options, rest


def _format_option(value: str) -> str:
    if value not in FORMATS:
        raise UsageError(f"Unknown file format '{value}' (pykvm knows {', '.join(FORMATS)})")
    return value


def _detect(path: str, given: str | None) -> str:
    if not os.path.exists(path):
        raise ImageError(f"Could not open '{path}': No such file or directory")
    fmt = given or probe_format(path)
    if given == "qcow2" and probe_format(path) != "qcow2":
        raise ImageError(f"Could not open '{path}': Image is not in qcow2 format")
    return fmt


# -- info ------------------------------------------------------------------

def cmd_info(args: list[str]) -> int:
    options, (path,) = _options(args, "f:", (1, 1), "info")
    given = next((_format_option(v) for k, v in options if k == "-f"), None)
    sys.stdout.write(image_info(path, _detect(path, given)))
    return 0


def image_info(path: str, fmt: str) -> str:
    """What ``qemu-img info`` prints for an image (without opening its backing file, as qemu-img)."""
    opener = Qcow2Image.open if fmt == "qcow2" else (lambda p, **kw: open_image(p, format="raw", **kw))
    with opener(path, read_only=True) as image:
        lines = [f"image: {path}",
                 f"file format: {fmt}",
                 f"virtual size: {size_to_str(image.size)} ({image.size} bytes)",
                 f"disk size: {size_to_str(image.file.allocated_bytes())}"]
        if fmt == "qcow2":
            lines += _qcow2_info(image)
    return "\n".join(lines) + "\n"


def _qcow2_info(image: Qcow2Image) -> list[str]:
    h = image.header
    lines = [f"cluster_size: {h.cluster_size}"]
    if h.incompatible_features & INCOMPAT_DIRTY:
        lines.append("cleanly shut down: no")
    if h.backing_file:
        line = f"backing file: {h.backing_file}"
        if image.backing_path != h.backing_file:
            line += f" (actual path: {image.backing_path})"
        lines.append(line)
        if h.backing_format:
            lines.append(f"backing file format: {h.backing_format}")
    if image.snapshots:
        lines += ["Snapshot list:", "%-10s%-17s%8s%20s%13s%11s" % ("ID", "TAG", "VM SIZE", "DATE", "VM CLOCK", "ICOUNT")]
        for s in image.snapshots:
            seconds = s.vm_clock_nsec // 1_000_000_000
            clock = "%02d:%02d:%02d.%03d" % (seconds // 3600, seconds // 60 % 60, seconds % 60,
                                             s.vm_clock_nsec // 1_000_000 % 1000)
            date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(s.date_sec))
            icount = "" if s.icount is None else str(s.icount)
            lines.append("%-9s %-16s %8s%20s%13s%11s" % (s.id, s.name, size_to_str(s.vm_state_size),
                                                          date, clock, icount))
    lines += ["Format specific information:", f"    compat: {h.compat}", "    compression type: zlib"]
    if h.version >= 3:
        lines.append(f"    lazy refcounts: {_bool(h.compatible_features & COMPAT_LAZY_REFCOUNTS)}")
    lines.append(f"    refcount bits: {h.refcount_bits}")
    if h.version >= 3:
        lines += [f"    corrupt: {_bool(h.incompatible_features & INCOMPAT_CORRUPT)}", "    extended l2: false"]
    return lines


def _bool(value: int) -> str:
    return "true" if value else "false"


# -- create ----------------------------------------------------------------

def _parse_o(text: str, allowed: set[str]) -> dict[str, str]:
    values = {}
    for item in filter(None, text.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in allowed:
            raise UsageError(f"Invalid option '{item}' (known: {', '.join(sorted(allowed))})")
        values[key] = value
    return values


_CREATE_OPTIONS = {"size", "backing_file", "backing_fmt", "cluster_size", "compat", "refcount_bits",
                   "lazy_refcounts"}


def _qcow2_settings(o: dict[str, str]) -> dict:
    settings = {}
    if "cluster_size" in o:
        settings["cluster_size"] = parse_size(o["cluster_size"])
    if "compat" in o:
        settings["compat"] = o["compat"]
    if "refcount_bits" in o:
        settings["refcount_bits"] = int(o["refcount_bits"])
    if "lazy_refcounts" in o:
        if o["lazy_refcounts"] not in ("on", "off"):
            raise UsageError(f"Parameter 'lazy_refcounts' expects 'on' or 'off', not '{o['lazy_refcounts']}'")
        settings["lazy_refcounts"] = o["lazy_refcounts"] == "on"
    return settings


def cmd_create(args: list[str]) -> int:
    options, rest = _options(args, "f:o:b:F:q", (1, 2), "create")
    fmt, o, quiet = "raw", {}, False
    for key, value in options:
        if key == "-f":
            fmt = _format_option(value)
        elif key == "-o":
            o.update(_parse_o(value, _CREATE_OPTIONS))
        elif key == "-b":
            o["backing_file"] = value
        elif key == "-F":
            o["backing_fmt"] = value
        elif key == "-q":
            quiet = True
    path = rest[0]
    try:
        size = parse_size(rest[1]) if len(rest) > 1 else parse_size(o["size"]) if "size" in o else None
    except ValueError:
        raise UsageError("Invalid image size specified. You may use k, M, G, T, P or E suffixes") from None
    if fmt == "raw" and set(o) - {"size"}:
        raise UsageError(f"Invalid options for file format 'raw': {', '.join(sorted(set(o) - {'size'}))}")
    backing, backing_fmt = o.get("backing_file"), o.get("backing_fmt")
    if backing and not backing_fmt:
        raise UsageError(f"{path}: Backing file specified without backing format")
    if backing_fmt:
        _format_option(backing_fmt)
    settings = _qcow2_settings(o) if fmt == "qcow2" else {}
    created = create_image(path, fmt, size, backing_file=backing, backing_format=backing_fmt, **settings)
    if not quiet:   # qemu-img names the size asked for, before rounding to sectors
        print(_formatting_line(path, fmt, created if size is None else size, o, settings))
    return 0


def _formatting_line(path: str, fmt: str, size: int, o: dict[str, str], settings: dict) -> str:
    """qemu-img create's ``Formatting '...', fmt=...`` line."""
    if fmt == "raw":
        return f"Formatting '{path}', fmt=raw size={size}"
    words = [f"Formatting '{path}', fmt=qcow2",
             f"cluster_size={settings.get('cluster_size', DEFAULT_CLUSTER_SIZE)}",
             "extended_l2=off", "compression_type=zlib", f"size={size}"]
    if "compat" in o:
        words.append(f"compat={o['compat']}")
    if o.get("backing_file"):
        words += [f"backing_file={o['backing_file']}", f"backing_fmt={o['backing_fmt']}"]
    words += [f"lazy_refcounts={'on' if settings.get('lazy_refcounts') else 'off'}",
              f"refcount_bits={settings.get('refcount_bits', 16)}"]
    return " ".join(words)


# -- check -----------------------------------------------------------------

def cmd_check(args: list[str]) -> int:
    options, (path,) = _options(args, "f:q", (1, 1), "check")
    given = next((_format_option(v) for k, v in options if k == "-f"), None)
    quiet = any(k == "-q" for k, _ in options)
    if _detect(path, given) != "qcow2":
        print("pykvm img: This image format does not support checks", file=sys.stderr)
        return EXIT_NO_CHECKS
    result = check_qcow2(path)
    for message in result.messages:
        print(message, file=sys.stderr)
    if result.check_errors:
        print("pykvm img: Check failed", file=sys.stderr)
    elif not quiet:
        sys.stdout.write(result.report())
    return result.exit_code


# -- convert ---------------------------------------------------------------

def cmd_convert(args: list[str]) -> int:
    options, (source_path, target_path) = _options(args, "f:O:o:c", (2, 2), "convert")
    source_fmt, target_fmt, o = None, "raw", {}
    for key, value in options:
        if key == "-f":
            source_fmt = _format_option(value)
        elif key == "-O":
            target_fmt = _format_option(value)
        elif key == "-o":
            o.update(_parse_o(value, _CREATE_OPTIONS - {"size", "backing_file", "backing_fmt"}))
        elif key == "-c":
            raise UsageError("convert: pykvm does not write compressed clusters (-c)")
    settings = _qcow2_settings(o) if target_fmt == "qcow2" else {}
    with open_image(source_path, format=_detect(source_path, source_fmt), read_only=True) as source:
        create_image(target_path, target_fmt, source.size, **settings)
        with open_image(target_path, format=target_fmt) as target:
            copy_image(source, target, getattr(target, "cluster_size", 4096))
    return 0


def copy_image(source, target, granule: int) -> None:
    """Copy every byte of ``source`` into the fresh (all-zero) ``target``, skipping all-zero granules."""
    zero = bytes(granule)
    for offset in range(0, source.size, _CONVERT_CHUNK):
        data = source.read(offset, min(_CONVERT_CHUNK, source.size - offset))
        run_start = None
        for start in range(0, len(data) + granule, granule):
            piece = data[start:start + granule]
            nonzero = bool(piece) and piece != zero[:len(piece)]
            if nonzero and run_start is None:
                run_start = start
            elif not nonzero and run_start is not None:
                target.write(offset + run_start, data[run_start:start])
                run_start = None
    target.flush()


COMMANDS: dict[str, Callable[[list[str]], int]] = {
    "info": cmd_info,
    "create": cmd_create,
    "check": cmd_check,
    "convert": cmd_convert,
}

if __name__ == "__main__":
    sys.exit(main())
