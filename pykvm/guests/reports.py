"""The reports of the Multiboot PC guests (mbinfo, smp, pcprobe, acpiscan, ipiping, rtcirq, s3wake, ata, blk), parsed.

Each guest writes lines ``key: value`` to COM1 (``guests/README.md`` lists
every key): first ``guest: NAME``, last ``done: ok`` or ``done: fail
<why>``.  :func:`parse_report` turns them into a dict, typed by the guest's
schema, so that a test can compare a pykvm run, a QEMU run and what both
were given.  The value kinds:

``int``
    ``0x1f`` or ``31``.
``ints``
    numbers separated by spaces: ``0 1 2 3`` -> ``[0, 1, 2, 3]``.
``str``
    the value as written.
``text``
    a string the guest escaped: bytes outside printable ASCII, and ``\\``,
    as ``\\xNN``; decoded here.
``fields``
    ``name=value`` words -> a dict; a value that is a number becomes an
    int, except in the string fields (:data:`STRING_FIELDS`); a field in
    :data:`TEXT_FIELDS` comes last and is the rest of the line, decoded
    like ``text``.

A key marked repeated (``fields[]``) gives a list of every line with that
key in order, ``[]`` when there is none.  Lines before the last ``guest:``
line (firmware output, an earlier boot) and after ``done:`` are not part of
the report; keys a schema does not name are kept as strings (a list when
repeated).

Imports nothing from pykvm but the error tree: the guests' registry and the
tests use it without the C extension.
"""

from __future__ import annotations

import re

from pykvm.errors import ReportError

__all__ = [
    "DEBUG_EXIT_CODES",
    "GUEST_SCHEMAS",
    "ReportError",
    "STRING_FIELDS",
    "TEXT_FIELDS",
    "debug_exit_code",
    "parse_report",
    "qemu_exit_status",
]


#: What the guests write to isa-debug-exit (port 0xf4, 4 bytes) as they stop.
DEBUG_EXIT_CODES: dict[int, str] = {
    0: "ok: every check passed",
    1: "fail: a check failed (the done line says which)",
    2: "not started by a Multiboot loader (EAX was not 0x2BADB002)",
    3: "the platform lacks what the guest needs (no fw_cfg, RSDP, PM timer, second CPU, ...)",
    4: "a bounded wait ran out (APs, RTC, IPI watchdog)",
    5: "an unexpected CPU exception or interrupt",
}


def qemu_exit_status(code: int) -> int:
    """The exit status of QEMU when the guest writes *code* to isa-debug-exit: ``code << 1 | 1``."""
    return code << 1 | 1


def debug_exit_code(status: int) -> int | None:
    """The code a guest wrote, from QEMU's exit status; None if QEMU ended otherwise (an even status)."""
    return status >> 1 if status & 1 else None


#: Field names whose values stay strings even when they look like numbers.
STRING_FIELDS = frozenset({"sig", "via", "checksum", "bdf"})
#: Field names that end a line and take the rest of it, escaped text.
TEXT_FIELDS = frozenset({"text", "name", "oem"})

_COMMON = {"guest": "str", "done": "str", "exception": "fields"}

#: Every guest's keys and their kinds (module docstring); ``[]`` marks a repeated key.
GUEST_SCHEMAS: dict[str, dict[str, str]] = {
    "mbinfo": {
        "magic": "int", "kernel": "fields", "mbi": "fields", "flags": "int",
        "mem_lower": "int", "mem_upper": "int", "boot_device": "int",
        "cmdline": "fields", "boot_loader_name": "fields",
        "mods_count": "int", "mods": "fields", "module": "fields[]",
        "mmap": "fields", "mmap_entry": "fields[]",
    },
    "smp": {
        "cpus_expected": "int", "cpus_source": "str", "madt_cpus": "int", "apic_base_msr": "int",
        "bsp_apic_id": "int", "tsc_khz": "int", "trampoline": "int",
        "cpus": "int", "apic_ids": "ints", "sum": "int",
    },
    "pcprobe": {
        "tsc_khz": "int",
        "fw_cfg": "str", "fw_cfg_signature": "text", "fw_cfg_id": "int", "fw_cfg_dma": "int",
        "fw_cfg_nb_cpus": "int", "fw_cfg_max_cpus": "int", "fw_cfg_ram_size": "int",
        "fw_cfg_files": "int", "fw_cfg_file": "fields[]",
        "fw_cfg_dma_register": "text", "fw_cfg_dma_read": "text",
        "cmos_base_kib": "int", "cmos_ext_kib": "int", "cmos_ext2_kib": "int",
        "cmos_above_16m_64k": "int", "cmos_above_4g_64k": "int", "cmos_cpus_minus_1": "int",
        "cmos_reg_d": "int", "cmos_ram_size": "int",
        "cmos_seconds_changed": "int", "cmos_seconds_wait_ms": "int",
        "pci_host": "fields", "pci": "fields[]", "pci_functions": "int",
        "pic_master_mask": "int", "pic_slave_mask": "int", "pit0_counting": "int",
        "lapic_svr": "int", "lapic_lint0": "int", "lapic_lint1": "int",
        "bda_com1": "int", "bda_base_kib": "int", "ivt_int08_set": "int",
    },
    "acpiscan": {
        "rsdp": "fields", "rsdp_xsdt": "int", "rsdp_extended_checksum": "str",
        "rsdt": "fields", "xsdt": "fields", "table": "fields[]", "tables_bad": "int",
        "madt": "fields", "madt_lapic": "fields[]", "madt_cpus": "int",
        "ioapic": "fields[]", "iso": "fields[]",
        "pm_tmr_blk": "int", "pm_tmr_len": "int", "pm_tmr_32bit": "int",
        "tsc_khz": "int", "pm_ticks": "int", "tsc_ticks": "int", "pm_timer_hz": "int",
    },
    "rtcirq": {"count": "int", "tsc_khz": "int", "rtc_irqs": "int", "rtc_irqs_without_pf": "int",
               "other_interrupts": "int", "elapsed_ms": "int", "rtc_irq_hz": "int"},
    "s3wake": {"facs": "int", "pm1a_evt": "int", "pm1a_cnt": "int", "state": "str"},
    "ipiping": {
        "iterations": "int", "cpus": "int", "bsp_apic_id": "int", "tsc_khz": "int",
        "ap_apic_id": "int", "spinning_aps": "int", "vector": "int", "round_trips": "int", "tsc_cycles": "int",
        "cycles_per_round_trip": "int", "ns_per_round_trip": "int", "other_interrupts": "int",
    },
    "ata": {
        "pio": "str", "tsc_khz": "int", "reset_status": "int", "signature": "ints", "slave_status": "int",
        "model": "text", "serial": "text", "firmware": "text", "identify": "fields",
        "capacity_sectors": "int", "capacity_bytes": "int", "after_identify_status": "int",
        "check": "fields", "flush": "fields", "written_adler32": "int", "read_adler32": "int",
        "mismatched_sectors": "int", "beyond_end": "fields", "identify_packet": "fields",
        "bench_config": "fields", "bench": "fields[]",
    },
    "blk": {
        "device": "fields", "features": "int", "capacity": "int", "limits": "fields", "id": "fields",
        "written": "fields", "flushed": "str", "read": "fields", "ro_write": "int", "bench": "fields",
        "interrupts": "int",
        "burst": "str[]",
    },
}

_LINE = re.compile(r"([a-z][a-z0-9_]*):(?: (.*))?")
_NUMBER = re.compile(r"0x[0-9a-fA-F]+|-?[0-9]+")
_FIELD_NAME = re.compile(r"([a-z][a-z0-9_]*)=")
_ESCAPE = re.compile(r"\\x([0-9a-fA-F]{2})")


def _unescape(text: str) -> str:
    return _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)


def _number(text: str) -> int:
    if not _NUMBER.fullmatch(text):
        raise ValueError(f"not a number: {text!r}")
    return int(text, 16) if text.startswith("0x") else int(text, 10)


def _fields(text: str) -> dict[str, int | str]:
    fields: dict[str, int | str] = {}
    pos = 0
    while pos < len(text):
        match = _FIELD_NAME.match(text, pos)
        if match is None:
            raise ValueError(f"expected name=value at {text[pos:]!r}")
        name, start = match.group(1), match.end()
        if name in fields:
            raise ValueError(f"field {name!r} twice")
        if name in TEXT_FIELDS:
            fields[name] = _unescape(text[start:])
            break
        end = text.find(" ", start)
        end = len(text) if end < 0 else end
        value = text[start:end]
        fields[name] = value if name in STRING_FIELDS or not _NUMBER.fullmatch(value) else _number(value)
        pos = end + 1
    return fields


_CONVERT = {
    "int": _number,
    "ints": lambda text: [_number(word) for word in text.split()],
    "str": lambda text: text,
    "text": _unescape,
    "fields": _fields,
}


def parse_report(text: str, strict: bool = False) -> dict:
    """The report in *text* (a guest's COM1 output), as a dict typed by the guest's schema.

    Args:
        text: everything the guest's serial port produced; earlier output
            (firmware, a previous boot) is skipped up to the last
            ``guest:`` line.
        strict: also refuse a line that is not ``key: value``, a missing
            ``done:`` line and anything after it.

    Raises:
        ReportError: no ``guest:`` line, a value that is not of its key's
            kind, or (strict) junk or a truncated report.
    """
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("guest: ")]
    if not starts:
        raise ReportError("no 'guest: NAME' line: not a guest report")
    first = starts[-1]
    schema = {**GUEST_SCHEMAS.get(lines[first][len("guest: "):], {}), **_COMMON}
    report: dict = {key: [] for key, kind in schema.items() if kind.endswith("[]")}
    done_at = None
    for number, line in enumerate(lines[first:], start=first + 1):
        if done_at is not None:
            if strict and line.strip():
                raise ReportError(f"line {number}: {line!r} after the done line (line {done_at})")
            continue
        match = _LINE.fullmatch(line)
        if match is None:
            if strict:
                raise ReportError(f"line {number}: {line!r} is not 'key: value'")
            continue
        key, value = match.group(1), match.group(2) or ""
        kind = schema.get(key, "str")
        repeated = kind.endswith("[]")
        try:
            parsed = _CONVERT[kind.removesuffix("[]")](value)
        except ValueError as exc:
            raise ReportError(f"line {number}: {key}: {exc}") from None
        if repeated:
            report[key].append(parsed)
        elif key not in report:
            report[key] = parsed
        elif key in schema:
            raise ReportError(f"line {number}: {key!r} again, but it is not a repeated key")
        else:  # an unknown key seen again: keep every value
            previous = report[key]
            report[key] = (previous if isinstance(previous, list) else [previous]) + [parsed]
        if key == "done":
            done_at = number
    if strict and done_at is None:
        raise ReportError("no 'done:' line: the report is truncated")
    return report
