"""The C run loop on its own (csrc/runloop.h): its return protocol, row by row.

Each test runs a few real-mode instructions (hand-assembled below) in a
raw VM through ``pykvm.platform.cloop.CLoop`` only -- no Machine, no bus --
and checks what ``pykvm_loop_run`` returned: the code, the packed size and
port, ``io_value``/``io_addr``, answers to reads, the transmit buffer and
the hit counts.
"""

from __future__ import annotations

import errno

import pytest

from pykvm._native_loader import lib
from pykvm.platform.cloop import (
    MMIO, PIO, READ_CONST, READ_PASS, RET_CODE_MASK, RET_DEBUG_EXIT, RET_ERROR, RET_EXIT, RET_INTR,
    RET_MMIO_READ, RET_MMIO_WRITE, RET_PIO_IN, RET_PIO_OUT, RET_PORT_SHIFT, RET_SIZE_SHIFT, RET_TX_PENDING,
    WRITE_DEBUG_EXIT, WRITE_DROP, WRITE_TXBUF, CLoop, FastRange,
)

pytestmark = pytest.mark.kvm

CODE = 0x1000
RAM = 0x10000

# Real-mode instructions (16-bit operand size unless prefixed with 0x66).
def mov_dx(v): return b"\xba" + v.to_bytes(2, "little")
def mov_al(v): return b"\xb0" + bytes([v])
def mov_ax(v): return b"\xb8" + v.to_bytes(2, "little")
def mov_eax(v): return b"\x66\xb8" + v.to_bytes(4, "little")
def out_imm(port): return b"\xe6" + bytes([port])
def in_imm(port): return b"\xe4" + bytes([port])
OUT_DX_AL, OUT_DX_AX, OUT_DX_EAX = b"\xee", b"\xef", b"\x66\xef"
IN_DX_AL, IN_DX_AX = b"\xec", b"\xed"
HLT = b"\xf4"
MOV_DS_AX = b"\x8e\xd8"
def mov_word_mem(addr, v): return b"\xc7\x06" + addr.to_bytes(2, "little") + v.to_bytes(2, "little")
def mov_ax_mem(addr): return b"\xa1" + addr.to_bytes(2, "little")
def rep_outsb(port, source, count):
    return b"\xfc" + mov_dx(port) + b"\xbe" + source.to_bytes(2, "little") + b"\xb9" + count.to_bytes(2, "little") \
        + b"\xf3\x6e"


@pytest.fixture
def vm(kvm):
    """A raw VM with 64 KiB of RAM; ``vm.start(code)`` loads real-mode code at 0x1000 and returns a CLoop."""
    from pykvm.memory import GuestMemory

    class Raw:
        def __init__(self):
            self.vm = kvm.create_vm()
            self.memory = GuestMemory(self.vm)
            self.memory.add_region(0, RAM)
            self.vcpu = self.vm.create_vcpu(0)

        def start(self, code: bytes, ranges=()) -> CLoop:
            self.memory.write(CODE, code)
            sregs = self.vcpu.get_sregs()
            for seg in (sregs.cs, sregs.ds, sregs.es, sregs.ss):
                seg.base = seg.selector = 0
            self.vcpu.set_sregs(sregs)
            regs = self.vcpu.get_regs()
            regs.rip, regs.rflags, regs.rsp = CODE, 0x2, 0x8000
            self.vcpu.set_regs(regs)
            loop = CLoop(self.vcpu)
            loop.set_ranges(list(ranges))
            return loop

        def close(self):
            self.vcpu.close()
            self.memory.close()
            self.vm.close()

    raw = Raw()
    yield raw
    raw.close()


def unpack(ret: int) -> tuple[int, int, int]:
    return ret & RET_CODE_MASK, (ret >> RET_SIZE_SHIFT) & 0xF, ret >> RET_PORT_SHIFT


def run_to_hlt(loop: CLoop, vm) -> None:
    ret = loop.run()
    assert ret & RET_CODE_MASK == RET_EXIT and vm.vcpu.kvm_run.exit_reason == lib.KVM_EXIT_HLT, hex(ret)


@pytest.mark.parametrize("port", [0x7FFF, 0x8000, 0xC000, 0xFFFF])
@pytest.mark.parametrize("size, value, insn", [
    (1, 0x5A, lambda v: mov_al(v) + OUT_DX_AL),
    (2, 0xBEEF, lambda v: mov_ax(v) + OUT_DX_AX),
    (4, 0xDEADBEEF, lambda v: mov_eax(v) + OUT_DX_EAX),
])
def test_pio_out_packs_port_and_size_unsigned(vm, port, size, value, insn):
    """Regression: ports from 0x8000 came back negative (port << 16 overflowed an int)."""
    loop = vm.start(mov_dx(port) + insn(value) + HLT)
    code, got_size, got_port = unpack(loop.run())
    assert (code, got_size, got_port) == (RET_PIO_OUT, size, port)
    assert loop.state.io_value == value
    run_to_hlt(loop, vm)


@pytest.mark.parametrize("port", [0x7FFF, 0x8000, 0xC000, 0xFFFF])
def test_pio_in_is_answered_through_io_value(vm, port):
    loop = vm.start(mov_dx(port) + IN_DX_AX + HLT)
    code, size, got_port = unpack(loop.run())
    assert (code, size, got_port) == (RET_PIO_IN, 2, port)
    loop.state.io_value, loop.state.io_answer = 0x1234, 1
    run_to_hlt(loop, vm)
    assert vm.vcpu.get_regs().rax & 0xFFFF == 0x1234
    assert loop.state.io_answer == 0  # consumed


def test_mmio_write_and_read_carry_the_address(vm):
    # DS = 0x2000: [0] is guest-physical 0x20000, beyond the 64 KiB of RAM.
    loop = vm.start(mov_ax(0x2000) + MOV_DS_AX + mov_word_mem(0x10, 0xCAFE) + mov_ax_mem(0x20) + HLT)
    code, size, _ = unpack(loop.run())
    assert (code, size, loop.state.io_addr, loop.state.io_value) == (RET_MMIO_WRITE, 2, 0x20010, 0xCAFE)
    code, size, _ = unpack(loop.run())
    assert (code, size, loop.state.io_addr) == (RET_MMIO_READ, 2, 0x20020)
    loop.state.io_value, loop.state.io_answer = 0xF00D, 1
    run_to_hlt(loop, vm)
    assert vm.vcpu.get_regs().rax & 0xFFFF == 0xF00D


def test_debug_exit_row_stops_with_qemus_status(vm):
    loop = vm.start(mov_al(0x31) + out_imm(0xF4) + HLT,
                    [FastRange(PIO, 0xF4, 1, READ_CONST, WRITE_DEBUG_EXIT, 0xFF, "debug-exit")])
    assert loop.run() & RET_CODE_MASK == RET_DEBUG_EXIT
    assert loop.stop_status == (0x31 << 1) | 1
    _, hits, writes, last = loop.row(0)
    assert (hits, writes, last) == (1, 1, 0x31)


def test_read_const_row_answers_in_c(vm):
    loop = vm.start(in_imm(0x80) + HLT, [FastRange(PIO, 0x80, 1, READ_CONST, WRITE_DROP, 0xAB, "post")])
    run_to_hlt(loop, vm)  # no return to Python for the IN
    assert vm.vcpu.get_regs().rax & 0xFF == 0xAB
    _, hits, writes, _ = loop.row(0)
    assert (hits, writes) == (1, 0)


def test_immediate_exit_returns_intr(vm):
    loop = vm.start(HLT)
    vm.vcpu.kvm_run.immediate_exit = 1
    assert loop.run() & RET_CODE_MASK == RET_INTR
    vm.vcpu.kvm_run.immediate_exit = 0
    run_to_hlt(loop, vm)


def test_a_closed_vcpu_is_never_entered(kvm):
    """The loop forgets the vCPU's fd and kvm_run when it closes: EBADF, not a crash on unmapped memory."""
    from pykvm.memory import GuestMemory

    with kvm.create_vm() as vmfd, GuestMemory(vmfd) as memory:
        memory.add_region(0, RAM)
        vcpu = vmfd.create_vcpu(0)
        loop = CLoop(vcpu)
        vcpu.close()
        assert loop.run() & RET_CODE_MASK == RET_ERROR
        assert loop.error_errno == errno.EBADF


def test_transmit_buffer_keeps_order_and_flags_the_next_return(vm):
    text = b"abc"
    code = b"".join(mov_dx(0x3F8) + mov_al(c) + OUT_DX_AL for c in text) + out_imm(0x80) + HLT
    loop = vm.start(code, [FastRange(PIO, 0x3F8, 1, READ_PASS, WRITE_TXBUF, 0, "thr")])
    ret = loop.run()
    assert ret & RET_TX_PENDING
    assert unpack(ret) == (RET_PIO_OUT, 1, 0x80)
    assert loop.take_tx() == (0, text)
    assert not loop.run() & RET_TX_PENDING  # drained
    assert loop.take_tx() == (-1, b"")


def test_transmit_buffer_holds_one_rows_bytes_at_a_time(vm):
    """A second UART's byte goes to Python while the buffer holds the first's, so no byte changes owner."""
    rows = [FastRange(PIO, 0x3F8, 1, READ_PASS, WRITE_TXBUF, 0, "com1"),
            FastRange(PIO, 0x2F8, 1, READ_PASS, WRITE_TXBUF, 0, "com2")]
    code = mov_dx(0x3F8) + mov_al(ord("a")) + OUT_DX_AL + mov_dx(0x2F8) + mov_al(ord("b")) + OUT_DX_AL + HLT
    loop = vm.start(code, rows)
    ret = loop.run()
    assert ret & RET_TX_PENDING and unpack(ret) == (RET_PIO_OUT, 1, 0x2F8)
    assert loop.take_tx() == (0, b"a")
    run_to_hlt(loop, vm)


def test_rep_outs_counts_every_element(vm):
    loop = vm.start(rep_outsb(0x80, 0x3000, 5) + HLT, [FastRange(PIO, 0x80, 1, READ_CONST, WRITE_DROP, 0xFF, "post")])
    vm.memory.write(0x3000, b"\x01\x02\x03\x04\x05")
    run_to_hlt(loop, vm)
    _, hits, writes, last = loop.row(0)
    assert (hits, writes, last) == (5, 5, 0x05)


def test_hit_counts_survive_a_table_rebuild(vm):
    post = FastRange(PIO, 0x80, 1, READ_CONST, WRITE_DROP, 0xFF, "post")
    code = (mov_al(1) + out_imm(0x80)) * 3 + out_imm(0x81) + (mov_al(2) + out_imm(0x80)) * 2 + HLT
    loop = vm.start(code, [post])
    assert unpack(loop.run()) == (RET_PIO_OUT, 1, 0x81)
    assert loop.row(0)[1] == 3
    other = FastRange(PIO, 0x70, 2, READ_PASS, WRITE_DROP, 0, "cmos")
    loop.set_ranges([other, post])  # the row moves; its counts go with it
    assert loop.row(1)[1:] == (3, 3, 1)
    run_to_hlt(loop, vm)
    assert loop.row(1)[1:] == (5, 5, 2) and loop.row(0)[1] == 0
    assert loop.hits() == {"cmos": 0, "post": 5}


def test_decode_all_returns_plain_exits(vm):
    loop = vm.start(mov_dx(0x8000) + OUT_DX_AL + HLT)
    loop.decode_all = True
    assert loop.run() & RET_CODE_MASK == RET_EXIT
    run = vm.vcpu.kvm_run
    assert (run.exit_reason, run.io.port, run.io.direction) == (lib.KVM_EXIT_IO, 0x8000, lib.KVM_EXIT_IO_OUT)


def test_counters_split_c_from_python(vm):
    code = (mov_al(1) + out_imm(0x80)) * 4 + out_imm(0x81) + HLT
    loop = vm.start(code, [FastRange(PIO, 0x80, 1, READ_CONST, WRITE_DROP, 0xFF, "post")])
    loop.run()
    run_to_hlt(loop, vm)
    io = loop.counters()["exits"][lib.KVM_EXIT_IO]
    assert io == {"total": 5, "c": 4, "python": 1}
    assert loop.returns == 2


def test_too_many_rows_are_refused(vm):
    from pykvm.platform.cloop import MAX_RANGES

    loop = vm.start(HLT)
    with pytest.raises(ValueError, match="at most"):
        loop.set_ranges([FastRange(MMIO, 0x1000_0000 + 16 * i, 8) for i in range(MAX_RANGES + 1)])
