"""The tiny freestanding guests shipped with pykvm.

The sources live in ``guests/`` at the top of the repository; ``make -C
guests`` assembles them into flat binaries (and the Multiboot PC guests
into ELF kernels) in this package's ``bin/`` directory.  This module names
them and says how to run each one: its CPU mode (one of the contract's mode
names), load address, privilege level, arguments and how it stops.  It imports only pykvm's error tree and the
platform's layout (pure data), so it works before the C extension is built.

Example::

    from pykvm import guests
    image = guests.path("hello64").read_bytes()
    info = guests.info("hello64")      # mode "long", load_addr 0x100000

Every guest checks itself: it computes something and reports it on COM1
and in EAX/RAX, so a test asserts a value, not just "it halted".

The Multiboot PC guests (``format == "multiboot"``: mbinfo, smp, pcprobe,
acpiscan, ipiping, ata) are ELF32 kernels that QEMU's ``-M pc -kernel`` boots
unchanged.  They report lines ``key: value`` on COM1, ending with ``done: ok``
or ``done: fail <why>``, and stop through isa-debug-exit at port 0xf4;
:mod:`pykvm.guests.reports` parses the report.
"""

from __future__ import annotations

import os
import struct

from pykvm.errors import GuestNotBuilt, GuestNotFound
from pykvm.platform.layout import LOAD_ADDR, REAL_MODE_LOAD_ADDR as REAL_LOAD_ADDR
from pykvm.values import Value

__all__ = [
    "BENCH_KINDS",
    "BENCH_PARAMS_MAGIC",
    "BENCH_PARAMS_OFFSET",
    "BIN_DIR",
    "GUESTS",
    "GuestInfo",
    "GuestNotBuilt",
    "GuestNotFound",
    "bench_params_offset",
    "info",
    "names",
    "patch_bench_params",
    "path",
    "symbols",
]

#: Where ``make -C guests`` writes the binaries.
#: Where the binaries are (a str: pathlib is imported by :func:`path` only, not on every start).
BIN_DIR: str = os.path.join(os.path.dirname(os.path.realpath(__file__)), "bin")


#: File offset of the 16-byte parameter block in ``bench32.bin``:
#: 8-byte magic ``PKVMARGS``, then little-endian u32 kind and u32 N.
#: Read by the guest only when a multiboot loader started it.
BENCH_PARAMS_OFFSET = 0x30
BENCH_PARAMS_MAGIC = b"PKVMARGS"

#: Exit-benchmark kinds (argument 0 of bench32, bench64, bench64u).
BENCH_KINDS: dict[str, int] = {
    "empty": 0,
    "out": 1,
    "in": 2,
    "mmio_write": 3,
    "mmio_read": 4,
    "cpuid": 5,
    "hlt": 6,
}

_BENCH_ARGS = (
    "arg0 (EDI/RDI) = kind: 0 empty loop, 1 OUT port 0x700, 2 IN port 0x700, "
    "3 MMIO write 0xe0000000, 4 MMIO read 0xe0000000, 5 CPUID leaf 0, 6 HLT; "
    "arg1 (ESI/RSI) = N iterations (0 means 1000); "
    "result RAX = N, or 0xffffffff for an unknown kind"
)


_VIRTIO_ARGS = (
    "arg0 (RDI) = mode: 0 round trip, 1 reset the device mid-transfer then round trip; "
    "result RAX = bytes echoed, or 0xffffffff000000NN on failure (NN: guests/virtio.h, "
    "guests/virtio_test.c); RCX = bytes received in all"
)


_MULTIBOOT_ARGS = (
    "none in registers (EAX = 0x2BADB002, EBX = the Multiboot information); reports `key: value` "
    "lines on COM1 ending with `done: ok` or `done: fail <why>` (pykvm.guests.reports.parse_report), "
    "then writes the status to port 0xf4 (0 ok, 1 a check failed, 2 not started by a Multiboot "
    "loader, 3 the platform lacks something, 4 a timeout, 5 a CPU exception)"
)


class GuestInfo(Value):
    """What a host needs to know to run one guest.

    Attributes:
        name: file stem of the binary (``bin/<name>.bin``).
        mode: CPU mode name from the contract: ``real``, ``protected``,
            ``paged32``, ``long`` or ``long_user``.
        load_addr: guest-physical load address; also the entry point.
        description: one line: what the guest does and reports.
        cpl: privilege level the code runs at (0, or 3 for ``long_user``).
        args: what arg0 (EDI/RDI) and arg1 (ESI/RSI) mean, and the result.
        stop: how the guest ends: ``hlt`` (KVM_EXIT_HLT), ``reset`` (0xFE
            written to port 0x64), ``never`` (spins until stopped),
            ``shutdown`` (triple fault, KVM_EXIT_SHUTDOWN) or ``debug-exit``
            (a 4-byte write of the status to isa-debug-exit at port 0xf4:
            :data:`pykvm.guests.reports.DEBUG_EXIT_CODES`).
        format: ``flat`` (``bin/<name>.bin``, loaded at ``load_addr`` and
            entered in ``mode``) or ``multiboot`` (``bin/<name>.elf``, a
            Multiboot v1 ELF32 kernel: the loader places it, ``mode`` and
            ``load_addr`` only describe where it starts).
        needs: what the guest needs from the platform besides RAM, COM1 and
            its loader: ``pc`` (QEMU ``-M pc``'s fw_cfg, CMOS/RTC, PCI
            configuration ports, PIT channel 2 with port 0x61, ACPI tables
            in the BIOS area, the xAPIC at 0xfee00000), ``smp`` (more than
            one CPU, the APs started by INIT-SIPI-SIPI), ``irqchip`` (the
            in-kernel PIC/IOAPIC/LAPIC: it takes interrupts), ``input`` (it
            reads COM1 until end of input: EOT, 0x04), ``virtio-echo`` (a
            virtio console whose host side echoes what it receives).
            ``pykvm run --guest`` provides each of them.
        cmdline: the default kernel command line (Multiboot guests).
    """

    __slots__ = ("name", "mode", "load_addr", "description", "cpl", "args", "stop", "format", "needs", "cmdline")

    def __init__(self, name: str, mode: str, load_addr: int, description: str, cpl: int, args: str, stop: str,
                 format: str = "flat", needs: tuple[str, ...] = (), cmdline: str = "") -> None:
        self.name = name
        self.mode = mode
        self.load_addr = load_addr
        self.description = description
        self.cpl = cpl
        self.args = args
        self.stop = stop
        self.format = format
        self.needs = needs
        self.cmdline = cmdline

    @property
    def file_name(self) -> str:
        """The binary's name in :data:`BIN_DIR`: ``<name>.bin`` or, for Multiboot kernels, ``<name>.elf``."""
        return f"{self.name}.elf" if self.format == "multiboot" else f"{self.name}.bin"


def _guest(name: str, mode: str, description: str, args: str = "none", needs: tuple[str, ...] = ()) -> GuestInfo:
    """Build a GuestInfo, deriving load address, CPL and ending from the mode."""
    user = mode == "long_user"
    return GuestInfo(
        name=name,
        mode=mode,
        load_addr=REAL_LOAD_ADDR if mode == "real" else LOAD_ADDR,
        description=description,
        cpl=3 if user else 0,
        args=args,
        stop="reset" if user else "hlt",
        needs=needs,
    )


def _multiboot(name: str, description: str, needs: tuple[str, ...] = ("pc",), cmdline: str = "") -> GuestInfo:
    """A Multiboot PC guest (guests/README.md): ELF32, 32-bit protected mode, ends through isa-debug-exit."""
    return GuestInfo(
        name=name,
        mode="protected",
        load_addr=LOAD_ADDR,
        description=description,
        cpl=0,
        args=_MULTIBOOT_ARGS + (f"; command line {cmdline!r} by default" if cmdline else ""),
        stop="debug-exit",
        format="multiboot",
        needs=needs,
        cmdline=cmdline,
    )


def _hello(name: str, mode: str, words: str) -> GuestInfo:
    """A hello guest: greeting plus Adler-32 of its own image."""
    return _guest(
        name,
        mode,
        f'prints "Hello from {words}\\n" and "checksum 0x%08x\\n" (Adler-32 of '
        "its image) on COM1; result EAX = the checksum",
    )


#: Every shipped guest, by name.
GUESTS: dict[str, GuestInfo] = {
    g.name: g
    for g in (
        _hello("hello16", "real", "real mode"),
        _hello("hello32", "protected", "32-bit protected mode"),
        _hello("hello32p", "paged32", "32-bit paged mode"),
        _hello("hello64", "long", "long mode"),
        _hello("hello64u", "long_user", "long mode, ring 3"),
        _guest(
            "primes64u",
            "long_user",
            'counts primes below N natively at CPL 3, prints "primes below N: X\\n"',
            "arg0 (EDI) = N (0 means 100000); result RAX = X "
            "(9592 below 100000, 78498 below 1000000)",
        ),
        _guest(
            "memtouch64u",
            "long_user",
            "writes its own address into the first quadword of every 4 KiB page of a range, natively at "
            "CPL 3 (dirty logging, KSM, the TLB's reach: docs/labs/08-memory-backing.md)",
            "arg0 (RDI) = first address (0 means 0x200000); arg1 (RSI) = pages (bits 0-31, 0 means 256) "
            "| passes << 32 (0 means 1); result RAX = writes made",
        ),
        _guest(
            "bench32",
            "protected",
            "exit benchmark loop; also a Multiboot v1 kernel (a.out kludge) that "
            "reads kind and N from its PKVMARGS block and ends via isa-debug-exit",
            _BENCH_ARGS + "; kind 6 is unsupported under a multiboot loader (RAX = 0)",
        ),
        _guest("bench64", "long", "exit benchmark loop at CPL 0", _BENCH_ARGS),
        _guest(
            "bench64u",
            "long_user",
            "exit benchmark loop at CPL 3 (native execution)",
            _BENCH_ARGS + "; kind 6 (HLT) is unsupported at CPL 3: stops at once, RAX = 0",
        ),
        _guest(
            "fuzz64u",
            "long_user",
            "a hostile guest: seeded random reads and writes of every register the host lists in its "
            "plan at 0x300000 (pykvm.guests.fuzzplan), natively at CPL 3; then a write to the "
            "debug-exit port proves it can still reach it",
            "none (the plan says everything); results in the plan: done = accesses made, "
            "answers = XOR of the values read",
        ),
        _guest(
            "uart_echo",
            "protected",
            "programs the 16550 at 0x3f8, prints \"uart ready\\n\", echoes input "
            "until 0x04 (EOT), prints \"\\nbye\\n\"; polls LSR before every byte",
            "none; result EAX = number of bytes echoed",
            needs=("input",),
        ),
        GuestInfo(
            "uart_irq",
            "real",
            REAL_LOAD_ADDR,
            "interrupt-driven 16550 driver (real mode): own interrupt table, 8259 PIC remapped, IRQ 4; "
            "echoes input until 0x04 (EOT); needs Machine(irqchip=True)",
            0,
            "none; result EAX = bytes echoed, EDI = interrupts taken",
            "reset",
            needs=("irqchip", "input"),
        ),
        GuestInfo(
            "virtio64u",
            "long_user",
            LOAD_ADDR,
            "virtio-console driver in freestanding C, polling at CPL 3: finds the device at 0xd0000000, "
            "negotiates VERSION_1, sets up receiveq and transmitq, sends a message and waits for the "
            "host's echo; needs a virtio-console whose backend echoes",
            3,
            _VIRTIO_ARGS,
            "reset",
            needs=("virtio-echo",),
        ),
        GuestInfo(
            "virtio64",
            "long",
            LOAD_ADDR,
            "the virtio64u driver at CPL 0, interrupt-driven: own IDT, 8259 PIC, the device's IRQ; "
            "handlers end without IRET (kvm_pvm cannot emulate it); needs Machine(irqchip=True)",
            0,
            _VIRTIO_ARGS + "; arg1 (RSI) = the device's IRQ (0 means 5); "
            "RBX = interrupts taken, RDI = InterruptStatus bits seen",
            "reset",
            needs=("irqchip", "virtio-echo"),
        ),
        GuestInfo(
            "iobench64u",
            "long_user",
            LOAD_ADDR,
            "moves N bytes guest->host or host->guest through the 16550 (an exit per byte) or "
            "virtio-console (64 KiB buffers, polled), natively at CPL 3 (benchmarks/io_models.py)",
            3,
            "arg0 (RDI) = kind: 1 UART transmit, 2 UART receive, 3 virtio transmit, 4 virtio receive; "
            "arg1 (RSI) = N bytes (0 means 65536); result RAX = Adler-32 of the bytes moved, "
            "RBX = N, RCX = TSC ticks of the transfer, RDI = virtio doorbells rung",
            "reset",
        ),
        GuestInfo(
            "gdbdemo64",
            "long",
            LOAD_ADDR,
            "a guest to debug with GDB, at CPL 0 (where this host can step and break): fib(20) into "
            "fib_result, checkpoint() to break at, a loop adding 1..5 into counter to watch; prints "
            "\"gdbdemo: fib(20) = 6765, counter = 15\\n\"; its ELF with symbols is bin/gdbdemo64.debug "
            "(symbols())",
            0,
            "none; result RAX = fib_result + counter (6780), RBX = checkpoint()'s value (6766)",
            "reset",
        ),
        GuestInfo(
            "pattern64u",
            "long_user",
            LOAD_ADDR,
            "writes a pattern over a buffer at 4 MiB round after round, checking every word before it is "
            "overwritten (so a page a snapshot or migration lost is found), natively at CPL 3; prints "
            "\"round R ok\" per round and \"pattern: ok\"; reads no clock",
            3,
            "arg0 (RDI) = rounds (0 means 1000); arg1 (RSI) = MiB of buffer (0 means 8); result RAX = rounds, "
            "RBX = the buffer's bytes, or RAX = 0xffffffff00000001 after \"pattern: bad word at ADDR\"",
            "reset",
        ),
        GuestInfo("spin16", "real", REAL_LOAD_ADDR, "jmp . forever (timeout tests)", 0, "none", "never"),
        GuestInfo("spin64", "long", LOAD_ADDR, "jmp . forever at CPL 0 (timeout tests)", 0, "none", "never"),
        GuestInfo(
            "spin64u",
            "long_user",
            LOAD_ADDR,
            "jmp . forever at CPL 3, running natively (timeout tests)",
            3,
            "none",
            "never",
        ),
        GuestInfo(
            "triple64",
            "long",
            LOAD_ADDR,
            "executes UD2 with an empty IDT: triple fault, KVM_EXIT_SHUTDOWN",
            0,
            "none",
            "shutdown",
        ),
        _multiboot(
            "mbinfo",
            "prints its Multiboot information (flags, memory, command line, loader name, modules with "
            "their Adler-32, memory map, and where each lies) and checks that nothing is in page 0, "
            "overlaps the kernel or another module",
            needs=(),
        ),
        _multiboot(
            "smp",
            "SMP bring-up: CPU count from fw_cfg (MADT cross-check), INIT-SIPI-SIPI with a real-mode "
            "trampoline at 0x8000, each AP adds its APIC ID with lock xadd; prints cpus, apic_ids, sum",
            needs=("pc", "smp"),
        ),
        _multiboot(
            "pcprobe",
            "reads fw_cfg (signature, ID, CPUs, RAM size, file directory, a DMA read), the CMOS memory "
            "bytes, register D and a ticking RTC, and PCI bus 0; cross-checks CPUs and RAM size",
        ),
        _multiboot(
            "acpiscan",
            "finds the RSDP, checks every ACPI table's checksum, prints the MADT's CPUs, IOAPIC and "
            "overrides, and measures the PM timer against the PIT-calibrated TSC (3.579545 MHz +-2%)",
        ),
        _multiboot(
            "rtcirq",
            "the RTC's periodic interrupt (1024 Hz) through the remapped 8259s (IRQ 8 at vector 0x28), "
            "waited for in sti; hlt; `count=N` interrupts (default 64); prints the rate it saw",
            cmdline="count=64",
        ),
        _multiboot(
            "s3wake",
            "ACPI S3: arms the RTC alarm and RTC_EN, leaves a real-mode stub in the FACS waking vector "
            "and suspends; the stub reports PM1_STS >> 9 (0x42: woken by the RTC) through debug-exit",
        ),
        _multiboot(
            "ipiping",
            "two CPUs ping-pong fixed IPIs (vector 0x30) N times, handlers without IRET; prints the TSC "
            "cycles per round trip; `iterations=N` on the command line, `spin=1` to keep the other APs busy",
            needs=("pc", "smp"),
            cmdline="iterations=1000",
        ),
        _multiboot(
            "ata",
            "drives the primary IDE channel's ATA disk by polled PIO: IDENTIFY, a pattern written over "
            "`sectors=N` sectors, FLUSH CACHE, read back and compared (Adler-32s), the IDNF and ABRT "
            "errors; `bench=1` times 4 KiB sequential/random reads and writes (`word=1`: inw/outw per word)",
            cmdline="sectors=64",
        ),
        _multiboot(
            "blk",
            "a virtio-blk driver (polling, requests in flight): writes a pattern over n blocks, flushes, "
            "reads it back and prints both checksums; burst and benchmark modes (guests/blk.c); the device "
            "from virtio_mmio.device= on the command line, else found by a scan",
            needs=(),
        ),
    )
}


def names() -> list[str]:
    """Return the names of all shipped guests, sorted."""
    return sorted(GUESTS)


def info(name: str) -> GuestInfo:
    """Return the GuestInfo of guest *name*.

    Raises:
        GuestNotFound: *name* is not a shipped guest.
    """
    try:
        return GUESTS[name]
    except KeyError:
        raise GuestNotFound(
            f"unknown guest {name!r}; known guests: {', '.join(names())}"
        ) from None


def file(name: str, bin_dir: str | os.PathLike | None = None) -> str:
    """The file name of guest *name*'s binary (``.bin``, or ``.elf`` for a Multiboot guest).

    Args:
        name: a guest name from :func:`names`.
        bin_dir: directory holding the binaries; default :data:`BIN_DIR`
            (use it with ``make -C guests OUT=...``).

    Raises:
        GuestNotFound: *name* is not a shipped guest.
        GuestNotBuilt: the binary does not exist yet.
    """
    guest = info(name)
    found = os.path.join(os.fspath(bin_dir) if bin_dir is not None else BIN_DIR, guest.file_name)
    if not os.path.isfile(found):
        raise GuestNotBuilt(
            f"guest {name!r} is not built: {found} does not exist; "
            "run `make -C guests` in the pykvm source tree"
        )
    return found


def symbols(name: str, bin_dir: str | os.PathLike | None = None) -> str:
    """The ELF with symbols of guest *name* for a debugger (``bin/<name>.debug``; ``gdb -ex 'file ...'``).

    Raises:
        GuestNotFound: *name* is not a shipped guest.
        GuestNotBuilt: the guest ships no such file (or it is not built yet).
    """
    info(name)
    found = os.path.join(os.fspath(bin_dir) if bin_dir is not None else BIN_DIR, f"{name}.debug")
    if not os.path.isfile(found):
        raise GuestNotBuilt(f"guest {name!r} has no ELF with symbols: {found} does not exist "
                            "(only the guests in guests/Makefile's DEBUG_GUESTS ship one)")
    return found


def path(name: str, bin_dir: str | os.PathLike | None = None):
    """:func:`file` as a ``pathlib.Path``."""
    from pathlib import Path

    return Path(file(name, bin_dir))


def bench_params_offset(name: str = "bench32") -> int:
    """Return the file offset of the PKVMARGS parameter block of *name*.

    Only ``bench32`` has one (it is the multiboot-capable benchmark guest).

    Raises:
        GuestNotFound: *name* is not a shipped guest.
        ValueError: the guest has no parameter block.
    """
    info(name)
    if name != "bench32":
        raise ValueError(f"guest {name!r} has no PKVMARGS parameter block (only bench32)")
    return BENCH_PARAMS_OFFSET


def patch_bench_params(image: bytes, kind: int, n: int) -> bytes:
    """Return a copy of the bench32 *image* with kind and N in its parameter block.

    The patched image, booted by a multiboot loader (QEMU ``-kernel``), runs
    *n* iterations of *kind* without any register setup.

    Raises:
        ValueError: the image has no PKVMARGS block at the expected offset,
            or kind / n do not fit in 32 bits.
    """
    off = BENCH_PARAMS_OFFSET
    if image[off : off + len(BENCH_PARAMS_MAGIC)] != BENCH_PARAMS_MAGIC:
        raise ValueError(f"no {BENCH_PARAMS_MAGIC!r} block at offset {off:#x}: not bench32.bin")
    if not (0 <= kind <= 0xFFFFFFFF and 0 <= n <= 0xFFFFFFFF):
        raise ValueError(f"kind and n must be u32, got kind={kind} n={n}")
    patched = bytearray(image)
    start = off + len(BENCH_PARAMS_MAGIC)
    patched[start : start + 8] = struct.pack("<II", kind, n)
    return bytes(patched)
