"""pykvm.inspect.tracer and `pykvm trace`: single-stepping, breakpoints, exit tracing.

The guests check themselves (Adler-32 of their own image), so a trace that
lost or repeated an instruction, or a breakpoint that was not stepped over
correctly, shows up as a wrong checksum, not just as odd output.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zlib

import capstone
import pytest

from pykvm.inspect.tracer import Tracer

from pykvm import guests

REAL_BASE = 0x8000
LONG_BASE = 0x100000

STEP_LINE = re.compile(r"^\s*(\d+)  (0x[0-9a-f]+)  ((?:[0-9a-f]{2} ?)+?)\s{2,}(\S.*?)(?:\s{2,}(\S.*))?$")
EXIT_LINE = re.compile(r"^\s*(\d+)  (\S+)\s+(.*?)\s+rip (0x[0-9a-f]+)( \(at exit\))?\s+(.*)$")


def pykvm(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "pykvm", *args], capture_output=True, timeout=timeout)


def capstone_disasm(code: bytes, address: int, nbits: int, count: int):
    mode = {16: capstone.CS_MODE_16, 32: capstone.CS_MODE_32, 64: capstone.CS_MODE_64}[nbits]
    md = capstone.Cs(capstone.CS_ARCH_X86, mode)
    return [(i.address, bytes(i.bytes), f"{i.mnemonic} {i.op_str}".strip()) for i in md.disasm(code, address)][:count]


def parse_steps(stdout: bytes):
    steps = []
    for line in stdout.decode().splitlines():
        m = STEP_LINE.match(line)
        if m:
            number, address, raw, text, changes = m.groups()
            steps.append((int(number), int(address, 16), bytes.fromhex(raw.replace(" ", "")), text.strip(),
                          changes or ""))
    return steps


def branch_target(text: str) -> int | None:
    m = re.match(r"^(?:j\w+|call|loop\w*) (0x[0-9a-f]+)$", text)
    return int(m.group(1), 16) if m else None


def adler32_loop_address(name: str, base: int, nbits: int) -> int:
    """The `lods` in the guest's adler32 loop: the first call's target, then the first lods there."""
    image = guests.path(name).read_bytes()
    insns = capstone_disasm(image, base, nbits, 10_000)
    call = next(text for _, _, text in insns if text.startswith("call"))
    target = int(call.split()[1], 16)
    return next(address for address, _, text in insns if address >= target and text.startswith("lods"))


# ---------------------------------------------------------------------------
# Without KVM: decoding and printing
# ---------------------------------------------------------------------------


def test_decode_uses_the_requested_mode():
    from pykvm.x86.disasm import decode

    code = bytes.fromhex("66be00800000")
    assert decode(code, 0x8001, 16).text == "mov esi, 0x8000"
    assert decode(code, 0x8001, 16).raw == code
    assert decode(code, 0x100001, 32).text == "mov si, 0x8000"
    assert decode(b"", 0, 64) is None


def test_format_step_and_changes():
    from pykvm.inspect.trace_format import format_step
    from pykvm.inspect.tracer import Step, Stop
    from pykvm.x86.disasm import Instruction

    insn = Instruction(0x8001, 0x8001, bytes.fromhex("66be00800000"), "mov esi, 0x8000", 16)
    step = Step(2, insn, (("rsi", 0, 0x8000), ("rflags", 2, 0x46)), (), None, 0x8007)
    line = format_step(step)
    assert line.split() == ["2", "0x00008001", "66", "be", "00", "80", "00", "00", "mov", "esi,", "0x8000",
                            "esi=0x8000", "eflags=0x46[PF", "ZF]"]
    halted = Step(3, Instruction(0x8037, 0x8037, b"\xf4", "hlt", 16), (), (), Stop("hlt", 0, "", 0x8038), 0x8038)
    assert format_step(halted).splitlines()[-1].strip() == "== hlt (status 0) at rip 0x8038"


def test_format_exit_lines():
    from pykvm import exits
    from pykvm.inspect.trace_format import format_exit
    from pykvm.inspect.tracer import ExitEvent
    from pykvm.x86.disasm import Instruction

    out = ExitEvent(3, exits.IoOut(0x3F8, 1, 1, b"H"), 0x100045, 0x100046,
                    Instruction(0x100045, 0x100045, b"\xee", "out dx, al", 64), True)
    assert EXIT_LINE.match(format_exit(out)).groups() == (
        "3", "io_out", "port 0x03f8 size 1 data 48 'H'", "0x100045", None, "out dx, al")
    assert out.kvm_reason == "io"
    mmio = ExitEvent(4, exits.MmioRead(0xE0000000, 4), None, 0x100014, None, False)
    assert "addr 0xe0000000 size 4" in format_exit(mmio) and "(at exit)" in format_exit(mmio)
    assert mmio.kvm_reason == "mmio"


# ---------------------------------------------------------------------------
# The done-criterion: `pykvm trace --guest hello16 --max 50`
# ---------------------------------------------------------------------------


@pytest.mark.kvm
def test_trace_hello16_prints_50_instructions_in_16_bit_syntax():
    proc = pykvm("trace", "--guest", "hello16", "--max", "50")
    assert proc.returncode == 0, proc.stderr
    steps = parse_steps(proc.stdout)
    assert [s[0] for s in steps] == list(range(1, 51))
    assert len(proc.stdout.decode().splitlines()) == 50  # nothing else on stdout
    assert b"real mode, 16-bit code, CPL 0" in proc.stderr
    assert b"50 instructions" in proc.stderr

    image = guests.path("hello16").read_bytes()
    first = capstone_disasm(image, REAL_BASE, 16, 1)[0]
    assert steps[0][1] == REAL_BASE and steps[0][2] == first[1] and steps[0][3] == first[2]
    # 16-bit syntax: the operand-size prefix makes 32-bit moves, as capstone says in 16-bit mode only.
    assert steps[1][3] == "mov esi, 0x8000"
    for (n, address, raw, text, _), following in zip(steps, steps[1:] + [None]):
        offset = address - REAL_BASE
        assert raw == image[offset:offset + len(raw)], f"step {n}: bytes are not the guest's"
        assert capstone_disasm(raw, address, 16, 1)[0][2] == text
        if following is None:
            continue
        fallthrough = address + len(raw)
        target = branch_target(text)
        if text.startswith(("call", "jmp")):
            assert following[1] == target, f"step {n}: {text} went to {following[1]:#x}"
        elif target is not None:  # a conditional jump: taken or not
            assert following[1] in (target, fallthrough), f"step {n}: {text}"
        elif text.startswith("ret"):
            pass
        else:
            assert following[1] == fallthrough, f"step {n}: {text} then {following[1]:#x}"


@pytest.mark.kvm
def test_tracing_hello16_to_the_end_halts_with_the_right_checksum():
    from pykvm.platform.machine import Machine

    image = guests.path("hello16").read_bytes()
    serial = bytearray()
    with Machine(memory="16M", serial=serial.extend) as m:
        m.load_guest("hello16")
        with Tracer(m) as tracer:
            steps = list(tracer.trace())
        last = steps[-1]
        assert last.instruction.text == "hlt"
        assert last.stop is not None and last.stop.reason == "hlt"
        assert [e.reason for e in last.exits] == ["hlt"]  # a real HLT exit, not a stepped-over hlt
        assert m.vcpu.get_regs().rax & 0xFFFFFFFF == zlib.adler32(image)
        assert bytes(serial) == f"Hello from real mode\nchecksum 0x{zlib.adler32(image):08x}\n".encode()
        outs = [e for s in steps for e in s.exits if e.reason == "io_out"]
        assert b"".join(e.exit.data for e in outs) == bytes(serial)
        assert all(e.instruction.text == "out dx, al" and e.rip == e.instruction.address for e in outs)


def check_control_flow(steps) -> None:
    """Each step's successor is where its instruction sends the CPU: no instruction skipped or repeated."""
    returns = []
    for step, following in zip(steps, steps[1:]):
        insn = step.instruction
        fallthrough = insn.address + len(insn.raw)
        target = branch_target(insn.text)
        nxt = following.instruction.address
        where = f"step {step.number}: {insn.text} at {insn.address:#x} then {nxt:#x}"
        if insn.text.startswith("call"):
            returns.append(fallthrough)
            assert nxt == target, where
        elif insn.text.startswith("jmp"):
            assert nxt == target, where
        elif target is not None:
            assert nxt in (target, fallthrough), where
        elif insn.text.startswith("ret"):
            assert nxt == returns.pop(), where
        else:
            assert nxt == fallthrough, where


@pytest.mark.kvm
@pytest.mark.parametrize("name", ["hello16", "hello64"])
def test_whole_trace_follows_the_control_flow_through_port_io(name):
    """A step that exits to user space (OUT) must not swallow the next instruction (kvm_pvm loses its trap)."""
    from pykvm.platform.machine import Machine

    with Machine(memory="16M", serial=None) as m:
        m.load_guest(name)
        with Tracer(m) as tracer:
            steps = list(tracer.trace())
    assert steps[-1].stop.reason == "hlt"
    check_control_flow(steps)
    outs = [s for s in steps if s.exits and s.exits[0].reason == "io_out"]
    assert len(outs) == 41 and all(len(s.exits) == 1 for s in outs)


@pytest.mark.kvm
def test_each_kind_of_exit_is_charged_to_its_own_instruction(tmp_path):
    # long mode: mov al,0x41; out 0x80,al; mov dx,0x3f8; out dx,al; in al,dx; mov rax,0xe0000000;
    #            mov ecx,0x55; mov [rax],ecx; mov edx,[rax]; hlt
    code = bytes([0xB0, 0x41, 0xE6, 0x80, 0x66, 0xBA, 0xF8, 0x03, 0xEE, 0xEC, 0x48, 0xB8]) + (0xE0000000).to_bytes(
        8, "little") + bytes([0xB9, 0x55, 0, 0, 0, 0x89, 0x08, 0x8B, 0x10, 0xF4])
    image = tmp_path / "io.bin"
    image.write_bytes(code)
    proc = pykvm("trace", "--kernel", str(image), "--mode", "long", "--exits")
    assert proc.returncode == 0, proc.stderr
    got = [(m.group(2), int(m.group(4), 16), m.group(6)) for m in map(EXIT_LINE.match, proc.stdout.decode().splitlines())]
    assert got == [
        ("io_out", 0x100002, "out 0x80, al"),
        ("io_out", 0x100008, "out dx, al"),
        ("io_in", 0x100009, "in al, dx"),
        ("mmio_write", 0x100019, "mov dword ptr [rax], ecx"),
        ("mmio_read", 0x10001B, "mov edx, dword ptr [rax]"),
        ("hlt", 0x10001D, "hlt"),
    ]
    proc = pykvm("trace", "--kernel", str(image), "--mode", "long")
    steps = parse_steps(proc.stdout)
    assert [s[1] for s in steps] == [0x100000, 0x100002, 0x100004, 0x100008, 0x100009, 0x10000A, 0x100014,
                                     0x100019, 0x10001B, 0x10001D]
    changes = {s[3]: s[4] for s in steps}
    assert changes["mov dx, 0x3f8"] == "rdx=0x3f8"
    assert changes["in al, dx"] == "rax=0x0"  # the UART's receive buffer is empty
    assert changes["mov edx, dword ptr [rax]"] == "rdx=0xffffffff"  # unmapped MMIO reads as all-ones


@pytest.mark.kvm
def test_changed_registers_match_a_re_execution():
    """Run the same guest again with raw KVM_RUN single-steps and diff the registers independently."""
    from pykvm import exits
    from pykvm.platform.machine import Machine
    from pykvm.inspect.debug_support import ENABLE, SINGLESTEP
    from pykvm.inspect.tracer import REGS

    n = 400
    with Machine(memory="16M") as m:
        m.load_guest("hello64")
        with Tracer(m) as tracer:
            steps = list(tracer.trace(n))
    assert len(steps) == n
    with Machine(memory="16M") as raw:
        raw.load_guest("hello64")
        raw.vcpu.set_guest_debug(ENABLE | SINGLESTEP)
        for step in steps:
            before = raw.vcpu.get_regs()
            assert before.rip == step.instruction.address
            exit = raw.vcpu.run()
            assert isinstance(exit, exits.Debug) and exit.exception == 1
            after = raw.vcpu.get_regs()
            expected = [(r, getattr(before, r), getattr(after, r)) for r in REGS
                        if getattr(before, r) != getattr(after, r)]
            got = [c for c in step.changed if c[0] in REGS]
            assert got == expected, f"step {step.number} {step.instruction.text}"
            assert after.rip == step.rip_after
    by_text = {s.instruction.text: s.changed for s in steps}
    assert by_text["mov esi, 0x100000"] == (("rsi", 0, 0x100000),)
    assert by_text["mov ecx, 0xc9"] == (("rcx", 0, 0xC9),)


@pytest.mark.kvm
def test_trace_max_10000_is_fast_enough():
    import time

    start = time.monotonic()
    proc = pykvm("trace", "--guest", "spin16", "--max", "10000")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 10000 and all(line.split()[2:4] == ["eb", "fe"] for line in lines)
    assert time.monotonic() - start < 60


# ---------------------------------------------------------------------------
# Breakpoints
# ---------------------------------------------------------------------------


@pytest.mark.kvm
def test_hardware_breakpoint_stops_once_per_pass_and_steps_over():
    from pykvm.platform.machine import Machine

    image = guests.path("hello64").read_bytes()
    address = adler32_loop_address("hello64", LONG_BASE, 64)
    with Machine(memory="16M") as m:
        m.load_guest("hello64")
        with Tracer(m) as tracer:
            bp = tracer.add_breakpoint(address)
            assert (bp.kind, bp.slot) == ("hw", 0)
            rsi_seen = []
            for _ in range(len(image) + 5):
                stop = tracer.cont(timeout=20)
                if stop.reason != "breakpoint":
                    break
                regs = m.vcpu.get_regs()
                assert stop.breakpoint is bp and regs.rip == address == stop.rip
                assert bp.hits == len(rsi_seen) + 1
                rsi_seen.append(regs.rsi)
            assert stop.reason == "hlt", stop
    # one hit per byte summed: the lods moved on each time, nothing re-triggered or was skipped
    assert rsi_seen == list(range(LONG_BASE, LONG_BASE + len(image)))
    assert bp.hits == len(image)


@pytest.mark.kvm
def test_continuing_from_a_breakpoint_reaches_hlt_with_the_checksum():
    from pykvm.platform.machine import Machine

    image = guests.path("hello64").read_bytes()
    address = adler32_loop_address("hello64", LONG_BASE, 64)
    serial = bytearray()
    with Machine(memory="16M", serial=serial.extend) as m:
        m.load_guest("hello64")
        with Tracer(m) as tracer:
            bp = tracer.add_breakpoint(address)
            assert tracer.cont(timeout=20).reason == "breakpoint"
            tracer.remove_breakpoint(bp.number)
            stop = tracer.cont(timeout=20)
        assert stop.reason == "hlt" and stop.status == 0
        assert m.vcpu.get_regs().rax == zlib.adler32(image)
        assert bytes(serial) == f"Hello from long mode\nchecksum 0x{zlib.adler32(image):08x}\n".encode()


@pytest.mark.kvm
def test_software_breakpoint_falls_back_to_hardware_where_the_host_cannot():
    from pykvm.host import nested_kvm_module
    from pykvm.platform.machine import Machine
    from pykvm.inspect.debug_support import debug_support

    image = guests.path("hello64").read_bytes()
    address = adler32_loop_address("hello64", LONG_BASE, 64)
    support = debug_support("long")
    if nested_kvm_module() == "kvm_pvm":
        assert not support.sw_breakpoints
        assert "KVM_EXIT_INTERNAL_ERROR" in support.notes["sw_breakpoints"]
    with Machine(memory="16M", serial=None) as m:
        m.load_guest("hello64")
        with Tracer(m) as tracer:
            bp = tracer.add_breakpoint(address, "sw")
            assert bp.requested == "sw"
            if not support.sw_breakpoints:
                assert bp.kind == "hw" and bp.slot == 0
                assert "software breakpoints do not work here" in bp.note
                assert "using a hardware breakpoint instead" in bp.note
                assert any("software breakpoints do not work here" in n for n in tracer.notes)
            else:
                assert bp.kind == "sw" and bp.note == ""
            stop = tracer.cont(timeout=20)
            assert stop.reason == "breakpoint" and stop.breakpoint is bp
            assert m.vcpu.get_regs().rip == address
            assert m.memory.read(address, 1) == image[address - LONG_BASE:address - LONG_BASE + 1]  # no int3 left
            tracer.clear_breakpoints()
            assert tracer.cont(timeout=20).reason == "hlt"
        assert m.vcpu.get_regs().rax == zlib.adler32(image)


@pytest.mark.kvm
def test_cli_sw_break_reports_the_fallback_and_stops_there():
    from pykvm.inspect.debug_support import debug_support

    address = adler32_loop_address("hello64", LONG_BASE, 64)
    proc = pykvm("trace", "--guest", "hello64", "--sw-break", hex(address), "--max", "2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode().splitlines()
    assert lines[0].startswith(f"== breakpoint 1 at {address:#x}")
    assert parse_steps(proc.stdout)[0][1] == address
    if not debug_support("long").sw_breakpoints:
        assert b"software breakpoints do not work here" in proc.stderr
        assert b"using a hardware breakpoint instead" in proc.stderr


@pytest.mark.kvm
def test_too_many_hardware_breakpoints_is_refused():
    from pykvm.platform.machine import Machine
    from pykvm.errors import TraceError

    with Machine(memory="16M") as m:
        m.load_guest("hello64")
        with Tracer(m) as tracer:
            for i in range(4):
                assert tracer.add_breakpoint(LONG_BASE + i).slot == i
            with pytest.raises(TraceError, match="all 4 debug registers are in use"):
                tracer.add_breakpoint(LONG_BASE + 0x10)
            tracer.remove_breakpoint(2)
            assert tracer.add_breakpoint(LONG_BASE + 0x10).slot == 1


# ---------------------------------------------------------------------------
# --exits
# ---------------------------------------------------------------------------


@pytest.mark.kvm
@pytest.mark.parametrize("name", ["hello64", "hello16"])
def test_exits_mode_has_one_line_per_exit_matching_run_result(name):
    from pykvm.platform.machine import Machine

    with Machine(memory="64M", serial=None) as m:
        m.load_guest(name)
        result = m.run(timeout=20)
    expected = {reason: v["total"] for reason, v in result.exits.items() if reason != "intr"}

    proc = pykvm("trace", "--guest", name, "--exits", "--max", "100000")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode().splitlines()
    parsed = [EXIT_LINE.match(line) for line in lines]
    assert all(parsed), [line for line, p in zip(lines, parsed) if not p]
    kvm_name = {"io_out": "io", "io_in": "io", "mmio_write": "mmio", "mmio_read": "mmio"}
    counts: dict[str, int] = {}
    for p in parsed:
        reason = kvm_name.get(p.group(2), p.group(2))
        counts[reason] = counts.get(reason, 0) + 1
    assert counts == expected
    assert [int(p.group(1)) for p in parsed] == list(range(1, len(lines) + 1))
    # each line names the instruction that caused it, and the data is what the guest printed
    outs = [p for p in parsed if p.group(2) == "io_out"]
    assert all(p.group(6) == "out dx, al" and p.group(5) is None for p in outs)
    data = bytes(int(re.search(r"data ([0-9a-f]{2})", p.group(3)).group(1), 16) for p in outs)
    assert data == result.serial
    assert parsed[-1].group(2) == "hlt" and parsed[-1].group(6) == "hlt"


@pytest.mark.kvm
def test_cpl3_tracing_is_refused_clearly_where_the_host_cannot_step():
    from pykvm.inspect.debug_support import debug_support

    support = debug_support("long_user")
    proc = pykvm("trace", "--guest", "hello64u", "--max", "5")
    if support.singlestep:
        assert proc.returncode == 0 and len(parse_steps(proc.stdout)) == 5
        return
    assert proc.returncode == 4
    assert b"cannot run on this host: cannot single-step" in proc.stderr
    # --exits still works: it runs freely and says so
    proc = pykvm("trace", "--guest", "hello64u", "--exits", "--max", "3")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.decode().splitlines()
    assert len(lines) == 3 and all("(at exit)" in line for line in lines)
    assert b"running freely" in proc.stderr


BAD_TRACE_INPUT = [
    (["trace", "--guest", "hello64", "--max", "0"], b"must be a positive number"),
    (["trace", "--guest", "nope"], b"unknown guest 'nope'"),
    (["trace", "--guest", "hello64"] + ["--break", "0x100000"] * 5, b"at most 4 breakpoints"),
    (["trace"], b"give a -kernel FILE or a --guest NAME"),
]


@pytest.mark.kvm
@pytest.mark.parametrize("args, message", BAD_TRACE_INPUT)
def test_trace_bad_input_exits_2_with_one_line(args, message):
    proc = pykvm(*args)
    assert proc.returncode == 2
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and message in proc.stderr, proc.stderr


@pytest.mark.kvm
def test_debug_support_is_measured_and_cached():
    from pykvm.inspect.debug_support import debug_support

    first = debug_support("long")
    assert first.singlestep and first.hw_breakpoints  # the tests above rely on these
    assert debug_support("long") is first
