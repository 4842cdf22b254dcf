"""``pykvm trace``: single-step a guest and print each instruction, or each exit (``--exits``).

    pykvm trace --guest hello16 --max 50          every instruction and the registers it changed
    pykvm trace --guest hello64 --exits           one line per exit and the instruction behind it
    pykvm trace --guest hello64 --break 0x100040  run freely to a breakpoint, then step

The machine is built as ``pykvm run`` builds it (``-serial`` defaults to
``null`` here: COM1 is there, and the trace shows the guest's port writes).  Exit status as
``run``'s for how the guest ended; 4 where this host cannot single-step.
"""

from __future__ import annotations

import sys

from pykvm.cli.config import number, run_config
from pykvm.cli.grammar import parse
from pykvm.cli.options import TRACE_OPTIONS, TRACE_TABLE, help_text
from pykvm.cli.status import EXIT_HOST_CANNOT, EXIT_OK, exit_status, stderr
from pykvm.errors import UsageError

SUMMARY = "Single-step a guest: each instruction and the registers it changed, or each exit."


def _stop_status(stop) -> int:
    """The exit status for how a traced guest ended (None: it did not end)."""
    if stop is None or stop.reason in ("breakpoint", "step", "paused"):
        return EXIT_OK
    return exit_status(stop.reason, stop.status)


def cmd_trace(argv: list[str]) -> int:
    from pykvm.cli.session import Session
    from pykvm.errors import TraceError
    from pykvm.inspect.trace_format import format_exit, format_mode, format_step, format_stop
    from pykvm.inspect.tracer import Tracer

    parsed = parse(argv, TRACE_TABLE, command="pykvm trace")
    if parsed.flag("help"):
        sys.stdout.write(help_text("trace", TRACE_OPTIONS, SUMMARY))
        return EXIT_OK
    config = run_config(parsed)
    if not config.serials:
        config.serials = ["null"]
    limit = number(parsed.get("max", "10000"), "--max")
    if limit <= 0:
        raise UsageError("--max: must be a positive number")
    hw = [number(a, "--break") for a in parsed.all("hw_break")]
    sw = [number(a, "--sw-break") for a in parsed.all("sw_break")]
    if len(hw) + len(sw) > 4:
        raise UsageError("at most 4 breakpoints (x86 has four debug registers)")
    out = sys.stdout
    with Session(config) as session:
        session.build()
        status = session.load()
        if status is not None:
            return status
        machine = session.machine
        with Tracer(machine) as tracer:
            name = machine.loaded.get("name") or config.kernel
            stderr(f"pykvm trace: {name}: {format_mode(machine.vcpu.get_sregs())}")
            noted = 0
            try:
                for address in hw:
                    tracer.add_breakpoint(address, "hw")
                for address in sw:
                    tracer.add_breakpoint(address, "sw")
                for note in tracer.notes:
                    stderr(f"pykvm trace: {note}")
                noted = len(tracer.notes)
                if tracer.breakpoints:
                    stop = tracer.cont()
                    print(f"== {format_stop(stop)}", file=out)
                    if stop.reason != "breakpoint":
                        stderr(f"pykvm trace: the guest stopped before any breakpoint: {format_stop(stop)}")
                        return _stop_status(stop)
                count = 0
                if parsed.flag("exits"):
                    for event in tracer.exits(limit):
                        for note in tracer.notes[noted:]:
                            stderr(f"pykvm trace: {note}")
                        noted = len(tracer.notes)
                        print(format_exit(event), file=out)
                        count += 1
                else:
                    for step in tracer.trace(limit):
                        print(format_step(step), file=out)
                        count += 1
            except TraceError as exc:
                out.flush()
                stderr(f"pykvm trace: cannot run on this host: {exc}")
                return EXIT_HOST_CANNOT
            out.flush()
            for note in tracer.notes[noted:]:
                stderr(f"pykvm trace: {note}")
            stop = tracer.last_stop
            what = f"{count} exit{'s' if count != 1 else ''}" if parsed.flag("exits") else f"{count} instructions"
            ended = format_stop(stop) if stop is not None and stop.reason != "breakpoint" else (
                f"--max {limit} reached at rip {machine.vcpu.get_regs().rip:#x}")
            counts = ", ".join(f"{k} {v}" for k, v in sorted(tracer.exit_counts.items())) or "none"
            stderr(f"pykvm trace: {what}; {ended}; user exits: {counts} "
                   f"(+{tracer.debug_exits} debug exits from single-stepping)")
            if stop is not None and stop.message and not stop.clean and stop.reason != "breakpoint":
                stderr(stop.message)
            return _stop_status(stop if stop is None or stop.reason != "breakpoint" else None)
