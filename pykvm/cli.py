"""The ``pykvm`` command (also ``python -m pykvm``), spelled like QEMU where it can be.

    pykvm check                         can this host run guests? (like kvm-ok)
    pykvm guests                        the shipped guests, one line each
    pykvm run --guest hello64           boot a shipped guest, serial on stdout
    pykvm run --kernel img.bin --mode long --load-addr 0x100000
    pykvm bench [--quick]               exit-latency and lifecycle benchmarks
    pykvm trace --guest hello16 --max 50    single-step: each instruction, registers it changed
    pykvm trace --guest hello64 --exits     one line per exit and the instruction behind it
    pykvm run --guest hello64 -monitor stdio -S     QEMU-style monitor (Ctrl-a c: console/monitor)
    pykvm run --guest hello64 --monitor-script cmds.txt   the same from a file (starts stopped)

Exit status of ``run``: the guest's isa-debug-exit status ``(v << 1) | 1``
when it wrote port 0xf4; 0 on a clean HLT or i8042 reset; 2 on bad input
(with a one-line error); 3 when the guest crashed (triple fault, KVM
internal error, failed entry, strict-bus violation); 4 when this host's
KVM cannot run the guest's CPU mode (e.g. 32-bit paging on kvm_pvm);
124 on --timeout; 130 on Ctrl-C.  A one-line summary goes to stderr.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import threading
from typing import Callable, Sequence

from pykvm.errors import UsageError

EXIT_BAD_INPUT = 2
EXIT_GUEST_CRASHED = 3
EXIT_HOST_CANNOT = 4
EXIT_TIMEOUT = 124
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + traceback
        raise UsageError(message)


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def _args_pair(text: str) -> tuple[int, int]:
    parts = [_int(p) for p in text.split(",") if p]
    if not 1 <= len(parts) <= 2:
        raise argparse.ArgumentTypeError("give one or two numbers: ARG0[,ARG1]")
    for value in parts:
        if not 0 <= value < 1 << 64:
            raise argparse.ArgumentTypeError(f"{value:#x} does not fit a 64-bit register (0 to 2**64-1)")
    return (parts + [0])[0], (parts + [0, 0])[1]


def _count(text: str) -> int:
    value = _int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError("must be a positive number")
    return value


def _timeout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"the timeout must be a finite number of seconds above 0, not {text!r}")
    return value


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


def _add_image_args(parser: argparse.ArgumentParser) -> None:
    """What to boot and how: shared by ``run`` and ``trace``."""
    from pykvm.x86.state import MODES

    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--guest", metavar="NAME", help="a shipped guest (see `pykvm guests`)")
    what.add_argument("--kernel", metavar="FILE", help="an image: flat binary, ELF or Multiboot")
    parser.add_argument("-m", "--memory", default="64M", help="guest RAM, e.g. 64M, 1G (default 64M)")
    parser.add_argument("--mode", choices=MODES, default=None, help="CPU mode for a flat --kernel (default long)")
    parser.add_argument("--format", choices=("auto", "flat", "elf", "multiboot"), default="auto",
                        help="image format for --kernel (default: detect Multiboot, ELF, else flat)")
    parser.add_argument("-append", "--append", default="", metavar="CMDLINE",
                        help="command line for a Multiboot kernel")
    parser.add_argument("--load-addr", type=_int, default=None, metavar="ADDR",
                        help="load address for --kernel (default 0x100000, 0x8000 in real mode)")
    parser.add_argument("--args", type=_args_pair, default=(0, 0), metavar="A0[,A1]",
                        help="guest arguments in EDI/RDI and ESI/RSI")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pykvm", description="Drive /dev/kvm directly: tiny guests, exits you can see.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sub.add_parser("check", help="can this host run guests? (like kvm-ok)")
    sub.add_parser("guests", help="list the shipped guests")

    run = sub.add_parser("run", help="run a guest; serial output on stdout")
    _add_image_args(run)
    run.add_argument("-serial", "--serial", default="stdio", metavar="DEV",
                     help="stdio | file:PATH | none (default stdio)")
    run.add_argument("--timeout", type=_timeout, default=None, metavar="S", help="stop after S seconds")
    run.add_argument("--strict", action="store_true", help="stop on an access to an unmapped port or address")
    run.add_argument("--no-c-loop", action="store_true", help="handle every exit in Python (for comparison)")
    run.add_argument("-nographic", "--nographic", action="store_true", help="accepted for QEMU habits; no effect")
    run.add_argument("--stats", action="store_true",
                     help="print the guest/kernel/user split of the exits and where the time went")
    run.add_argument("--stats-json", metavar="FILE", default=None, help="write the split as JSON")
    run.add_argument("--input", metavar="TEXT", default=None,
                     help="bytes to type into COM1 (escapes like \\x04 allowed) instead of reading stdin")

    run.add_argument("-monitor", "--monitor", default=None, metavar="DEV",
                     help="stdio | none: QEMU's monitor on the terminal (Ctrl-a c switches with the serial console)")
    run.add_argument("--monitor-script", metavar="FILE", default=None,
                     help="run monitor commands from FILE, answers on stdout (the guest starts stopped, as with -S)")
    run.add_argument("-S", dest="freeze", action="store_true",
                     help="with a monitor: start with the vCPU stopped until `cont` (QEMU's -S)")

    trace = sub.add_parser("trace", help="single-step a guest: each instruction with the registers it changed")
    _add_image_args(trace)
    trace.add_argument("--max", type=_count, default=10000, metavar="N",
                       help="stop after N instructions (with --exits: N exits); default 10000")
    trace.add_argument("--exits", action="store_true",
                       help="one line per exit (reason, port/address, data, RIP, instruction) instead")
    trace.add_argument("--break", dest="hw_breaks", type=_int, action="append", default=[], metavar="ADDR",
                       help="run freely to linear ADDR (hardware breakpoint), then trace; repeatable")
    trace.add_argument("--sw-break", dest="sw_breaks", type=_int, action="append", default=[], metavar="ADDR",
                       help="the same with an int3 software breakpoint (falls back to hardware where the host "
                            "cannot)")
    trace.add_argument("-serial", "--serial", default="none", metavar="DEV",
                       help="stdio | file:PATH | none (default none: the trace shows the guest's port writes)")

    bench = sub.add_parser("bench", help="run the benchmarks (exit latency, lifecycle)", add_help=False)
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    return parser


def _serial_sink(spec: str) -> tuple[Callable[[bytes], None] | None, Callable[[], None]]:
    """Turn -serial's value into (sink, close)."""
    if spec == "stdio":
        out = sys.stdout.buffer

        def write(data: bytes) -> None:
            out.write(data)
            out.flush()
        return write, lambda: None
    if spec == "none":
        return None, lambda: None
    if spec.startswith("file:") and len(spec) > 5:
        try:
            fd = os.open(spec[5:], os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise UsageError(f"-serial {spec}: {exc.strerror}") from None

        def write_file(data: bytes) -> None:  # unbuffered: a failure shows at once, not at close
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        return write_file, lambda: os.close(fd)
    raise UsageError(f"-serial {spec!r}: use stdio, file:PATH or none")


def _forward_stdin(machine) -> None:
    """Feed stdin to COM1 from a daemon thread (ends at EOF)."""
    fd = sys.stdin.fileno()

    def pump() -> None:
        while True:
            try:
                data = os.read(fd, 4096)
            except OSError:
                return
            if not data:
                return
            machine.feed_serial(data)
    threading.Thread(target=pump, name="pykvm-stdin", daemon=True).start()


def cmd_run(args: argparse.Namespace) -> int:
    machine, close_sink = _open_machine(args, strict=args.strict, c_loop=not args.no_c_loop)
    try:
        status = _load_for(machine, args, "run")
        if status is not None:
            return status
        if args.monitor not in (None, "none") or args.monitor_script is not None or args.freeze:
            return _monitor_session(machine, args)
        if args.input is not None:
            machine.feed_serial(input_bytes(args.input))
        elif args.serial == "stdio" and not sys.stdin.isatty():
            _forward_stdin(machine)
        result = machine.run(timeout=args.timeout)
    finally:
        machine.close()
        close_sink()
    print(result.summary(), file=sys.stderr)
    if result.message and result.ended not in ("timeout", "interrupted"):
        print(result.message, file=sys.stderr)
    if result.split is not None and (args.stats or args.stats_json):
        _report_split(result.split, args)
    if result.exit_status is not None:
        return result.exit_status
    return _failure_status(result.ended)


def _report_split(split, args: argparse.Namespace) -> None:
    import json

    from pykvm.inspect.split import format_split

    if args.stats:
        print(format_split(split), file=sys.stderr)
    if args.stats_json:
        try:
            with open(args.stats_json, "w") as f:
                json.dump(split.to_json(), f, indent=2)
        except OSError as exc:
            print(f"pykvm run: cannot write {args.stats_json}: {exc.strerror}", file=sys.stderr)


def cmd_check(args: argparse.Namespace) -> int:
    from pykvm.inspect.check import run_check

    usable, lines = run_check()
    print("\n".join(lines))
    return 0 if usable else 1


def cmd_guests(args: argparse.Namespace) -> int:
    from pykvm import guests

    width = max(len(n) for n in guests.names())
    for name in guests.names():
        g = guests.info(name)
        print(f"{name:<{width}}  {g.mode:<9}  CPL{g.cpl}  {g.description}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    try:
        from pykvm.bench import main as bench_main
    except ImportError as exc:
        raise UsageError(f"benchmarks unavailable: {exc}") from None
    return bench_main(args.bench_args)


def _open_machine(args: argparse.Namespace, **options):
    """Check the image arguments, open the serial sink and make the Machine: (machine, close_sink)."""
    from pykvm.platform.machine import Machine

    if args.guest is not None and (args.mode or args.load_addr is not None):
        raise UsageError("--mode and --load-addr go with --kernel; a shipped guest knows its own")
    if args.kernel is not None and not os.path.isfile(args.kernel):
        raise UsageError(f"--kernel {args.kernel}: no such file")
    sink, close_sink = _serial_sink(args.serial)
    try:
        return Machine(memory=args.memory, serial=sink, **options), close_sink
    except ValueError as exc:
        close_sink()
        raise UsageError(f"-m {args.memory}: {exc}") from None


def _load_for(machine, args, command: str) -> int | None:
    """Load --guest or --kernel into ``machine``; a status to return when the host cannot, else None."""
    from pykvm.errors import GuestNotBuilt, GuestNotFound, LoaderError, ModeNotSupported

    try:
        if args.guest is not None:
            machine.load_guest(args.guest, args=args.args)
        else:
            machine.load_image(args.kernel, format=args.format, mode=args.mode, load_addr=args.load_addr,
                               args=args.args, cmdline=args.append)
    except (LoaderError, GuestNotFound, GuestNotBuilt) as exc:
        raise UsageError(str(exc)) from None
    except ModeNotSupported as exc:
        print(f"pykvm {command}: cannot run on this host: {exc}", file=sys.stderr)
        return EXIT_HOST_CANNOT
    return None


def _failure_status(ended: str) -> int:
    """The exit status of a run that did not end cleanly: timeout, Ctrl-C, output that failed, or a crash."""
    return {"timeout": EXIT_TIMEOUT, "interrupted": EXIT_INTERRUPTED, "output-error": EXIT_BAD_INPUT}.get(
        ended, EXIT_GUEST_CRASHED)


def _stop_status(stop) -> int:
    """The exit status for how a traced or monitored guest ended (None: it did not end)."""
    if stop is None or stop.reason in ("breakpoint", "step", "paused"):
        return 0
    if stop.clean:
        return stop.status or 0
    return _failure_status(stop.reason)


def cmd_trace(args: argparse.Namespace) -> int:
    """Single-step a guest and print each instruction, or each exit (``--exits``); see pykvm.inspect.tracer."""
    from pykvm.errors import TraceError
    from pykvm.inspect.trace_format import format_exit, format_mode, format_step, format_stop
    from pykvm.inspect.tracer import Tracer

    if len(args.hw_breaks) + len(args.sw_breaks) > 4:
        raise UsageError("at most 4 breakpoints (x86 has four debug registers)")
    machine, close_sink = _open_machine(args)
    out = sys.stdout
    try:
        status = _load_for(machine, args, "trace")
        if status is not None:
            return status
        with Tracer(machine) as tracer:
            name = machine.loaded.get("name") or args.kernel
            print(f"pykvm trace: {name}: {format_mode(machine.vcpu.get_sregs())}", file=sys.stderr)
            noted = 0
            try:
                for address in args.hw_breaks:
                    tracer.add_breakpoint(address, "hw")
                for address in args.sw_breaks:
                    tracer.add_breakpoint(address, "sw")
                for note in tracer.notes:
                    print(f"pykvm trace: {note}", file=sys.stderr)
                noted = len(tracer.notes)
                if tracer.breakpoints:
                    stop = tracer.cont()
                    print(f"== {format_stop(stop)}", file=out)
                    if stop.reason != "breakpoint":
                        print(f"pykvm trace: the guest stopped before any breakpoint: {format_stop(stop)}",
                              file=sys.stderr)
                        return _stop_status(stop)
                count = 0
                if args.exits:
                    for event in tracer.exits(args.max):
                        for note in tracer.notes[noted:]:
                            print(f"pykvm trace: {note}", file=sys.stderr)
                        noted = len(tracer.notes)
                        print(format_exit(event), file=out)
                        count += 1
                else:
                    for step in tracer.trace(args.max):
                        print(format_step(step), file=out)
                        count += 1
            except TraceError as exc:
                out.flush()
                print(f"pykvm trace: cannot run on this host: {exc}", file=sys.stderr)
                return EXIT_HOST_CANNOT
            out.flush()
            for note in tracer.notes[noted:]:
                print(f"pykvm trace: {note}", file=sys.stderr)
            stop = tracer.last_stop
            what = f"{count} exit{'s' if count != 1 else ''}" if args.exits else f"{count} instructions"
            ended = format_stop(stop) if stop is not None and stop.reason != "breakpoint" else (
                f"--max {args.max} reached at rip {machine.vcpu.get_regs().rip:#x}")
            counts = ", ".join(f"{k} {v}" for k, v in sorted(tracer.exit_counts.items())) or "none"
            print(f"pykvm trace: {what}; {ended}; user exits: {counts} "
                  f"(+{tracer.debug_exits} debug exits from single-stepping)", file=sys.stderr)
            if stop is not None and stop.message and not stop.clean and stop.reason != "breakpoint":
                print(stop.message, file=sys.stderr)
            return _stop_status(stop if stop is None or stop.reason != "breakpoint" else None)
    finally:
        machine.close()
        close_sink()


def _monitor_session(machine, args: argparse.Namespace) -> int:
    """`run` with -monitor stdio or --monitor-script: the guest runs under pykvm.inspect.monitor."""
    from pykvm.inspect.console_mux import ConsoleMux
    from pykvm.inspect.monitor import PROMPT, Monitor, wait_until_stopped
    from pykvm.inspect.trace_format import format_stop

    if args.monitor not in (None, "none", "stdio"):
        raise UsageError(f"-monitor {args.monitor!r}: use stdio or none (or --monitor-script FILE)")
    if args.monitor == "stdio" and args.monitor_script is not None:
        raise UsageError("give -monitor stdio or --monitor-script FILE, not both")
    if args.monitor_script is None and args.monitor in (None, "none"):
        raise UsageError("-S needs a monitor to continue the guest: add -monitor stdio or --monitor-script FILE")
    lines = None
    if args.monitor_script is not None:
        try:
            with open(args.monitor_script, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError as exc:
            raise UsageError(f"--monitor-script {args.monitor_script}: {exc.strerror}") from None
    if args.input is not None:
        machine.feed_serial(input_bytes(args.input))
    out = sys.stdout

    def write(text: str) -> None:
        out.write(text)
        out.flush()

    how = "end of script"
    with Monitor(machine) as monitor:
        if lines is not None:
            if args.serial == "stdio" and args.input is None and not sys.stdin.isatty():
                _forward_stdin(machine)
            monitor.run_script(lines, write)  # a script starts stopped (-S implied)
        else:
            how = "end of input"
            fd = sys.stdin.fileno()
            saved = None
            if os.isatty(fd):
                import termios
                import tty

                saved = termios.tcgetattr(fd)
                tty.setcbreak(fd)
            to_guest = machine.feed_serial if args.serial == "stdio" else None
            mux = ConsoleMux(monitor, to_guest, write)
            monitor.notify = lambda line: write(f"\n{line}\n" + (PROMPT if mux.in_monitor else ""))
            if not args.freeze:
                monitor.start()
            try:
                while not mux.quit:
                    data = os.read(fd, 1024)
                    if not data:
                        write("\n")
                        break
                    mux.feed(data)
            finally:
                if saved is not None:
                    termios.tcsetattr(fd, termios.TCSADRAIN, saved)
        if monitor.quit_requested:
            how = "quit"
        else:
            stop = wait_until_stopped(monitor, args.timeout)
            if stop is not None and stop.reason == "timeout":
                monitor.last_stop = stop
    stop = monitor.last_stop
    state = format_stop(stop) if stop is not None else "not run"
    print(f"pykvm: monitor session ended ({how}); guest: {state}", file=sys.stderr)
    return 0 if how == "quit" else _stop_status(stop)


COMMANDS = {"run": cmd_run, "check": cmd_check, "guests": cmd_guests, "bench": cmd_bench, "trace": cmd_trace}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["bench"]:  # its options belong to pykvm.bench's own parser
            return cmd_bench(argparse.Namespace(bench_args=argv[1:]))
        args = parser.parse_args(argv)
        return COMMANDS[args.command](args)
    except UsageError as exc:
        command = argv[0] if argv and argv[0] in COMMANDS else ""
        print(f"pykvm{(' ' + command) if command else ''}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("pykvm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
