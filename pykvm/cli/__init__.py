"""The ``pykvm`` command (also ``python -m pykvm``), spelled like QEMU where it can be.

    pykvm run -kernel FILE [QEMU's options]   boot a kernel, as qemu-system-x86_64 would
    pykvm run --guest hello64                 a shipped guest (pykvm guests lists them)
    pykvm trace --guest hello16 --max 50      single-step: each instruction, the registers it changed
    pykvm check                               can this host run guests? (like kvm-ok)
    pykvm guests                              the shipped guests and what each needs
    pykvm bench [--quick] [--only SECTIONS]   the benchmarks
    pykvm img info|create|check|convert ...   disk images, as qemu-img
    pykvm --version

Only what the command needs is imported (a run never loads the tracer,
capstone, virtio or the benchmarks unless it uses them), and the option
table costs nothing to build: start-up is the interpreter plus the machine.
docs/cli.md lists every option; exit codes are in ``pykvm.cli.run``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from pykvm.errors import UsageError

EXIT_BAD_INPUT = 2

USAGE = """usage: pykvm COMMAND [options]

commands:
  run       boot a kernel (-kernel FILE, QEMU's options) or a shipped guest (--guest NAME)
  trace     single-step a guest: each instruction and the registers it changed, or each exit
  check     can this host run guests? (like kvm-ok)
  guests    the shipped guests, their modes and what each needs
  bench     the benchmarks (pykvm bench --help)
  img       disk images: info, create, check, convert (as qemu-img)

pykvm COMMAND --help for a command's options; pykvm --version.
"""


def cmd_check(argv: list[str]) -> int:
    from pykvm.inspect.check import run_check

    if argv:
        raise UsageError(f"check takes no arguments (got {argv[0]!r})")
    usable, lines = run_check()
    print("\n".join(lines))
    return 0 if usable else 1


def cmd_guests(argv: list[str]) -> int:
    from pykvm import guests

    if argv:
        raise UsageError(f"guests takes no arguments (got {argv[0]!r})")
    width = max(len(n) for n in guests.names())
    for name in guests.names():
        g = guests.info(name)
        needs = f"  needs: {', '.join(g.needs)}" if g.needs else ""
        print(f"{name:<{width}}  {g.format:<9}  {g.mode:<9}  CPL{g.cpl}  {g.description}{needs}")
    return 0


def cmd_bench(argv: list[str]) -> int:
    try:
        from pykvm.bench import main as bench_main
    except ImportError as exc:
        raise UsageError(f"benchmarks unavailable: {exc}") from None
    return bench_main(argv)


def cmd_img(argv: list[str]) -> int:
    from pykvm.block.imgtool import main as img_main

    return img_main(argv)


def cmd_run(argv: list[str]) -> int:
    from pykvm.cli.run import cmd_run as run

    return run(argv)


def cmd_trace(argv: list[str]) -> int:
    from pykvm.cli.trace import cmd_trace as trace

    return trace(argv)


COMMANDS = {"run": cmd_run, "trace": cmd_trace, "check": cmd_check, "guests": cmd_guests, "bench": cmd_bench,
            "img": cmd_img}


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; its exit status.  Bad input is one line on stderr and status 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "-help", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0 if argv else EXIT_BAD_INPUT
    if argv[0] in ("--version", "-version"):
        from pykvm import __version__

        print(f"pykvm {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        if command.startswith("-"):  # QEMU's habit: options straight away; they are run's
            command, rest = "run", argv
        else:
            print(f"pykvm: error: unknown command {command!r} (pykvm --help lists them)", file=sys.stderr)
            return EXIT_BAD_INPUT
    try:
        return COMMANDS[command](rest)
    except UsageError as exc:
        print(f"pykvm {command}: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("pykvm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0


if __name__ == "__main__":
    sys.exit(main())
