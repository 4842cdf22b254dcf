"""Every shipped guest in its CPU mode: the guest checks itself, the test checks the guest.

Each run is done twice, with the C loop taking the hot path and with every
exit handled in Python: the guest-visible results must be identical.
"""

from __future__ import annotations

import re
import zlib

import pytest

from pykvm import guests

pytestmark = pytest.mark.kvm

HELLO = {
    "hello16": "real mode",
    "hello32": "32-bit protected mode",
    "hello32p": "32-bit paged mode",
    "hello64": "long mode",
    "hello64u": "long mode, ring 3",
}

PATHS = [pytest.param(True, id="c-loop"), pytest.param(False, id="python")]


def run_guest(name, *, c_loop=True, args=(0, 0), memory="16M", timeout=20, serial_input=None):
    from pykvm.platform.machine import Machine

    with Machine(memory=memory, c_loop=c_loop) as m:
        m.load_guest(name, args=args)
        if serial_input is not None:
            m.feed_serial(serial_input)
        return m.run(timeout=timeout)


def host_lacks_32bit_paging() -> bool:
    """kvm_pvm (nested KVM without hardware virtualization) pages only in long mode."""
    from pykvm.host import nested_kvm_module

    return nested_kvm_module() == "kvm_pvm"


@pytest.mark.parametrize("c_loop", PATHS)
@pytest.mark.parametrize("name", sorted(HELLO))
def test_hello_guest_checks_its_own_image(name, c_loop):
    if name == "hello32p" and host_lacks_32bit_paging():
        pytest.skip("kvm_pvm cannot run 32-bit paging (test_paged32_refused_clearly checks the refusal)")
    result = run_guest(name, c_loop=c_loop)
    image = guests.path(name).read_bytes()
    expected = zlib.adler32(image)
    assert result.clean, result.message
    assert result.ended == guests.info(name).stop
    assert result.exit_status == 0
    assert result.serial_text == f"Hello from {HELLO[name]}\nchecksum 0x{expected:08x}\n"
    assert result.regs["rax"] & 0xFFFFFFFF == expected


@pytest.mark.skipif(not host_lacks_32bit_paging(), reason="only kvm_pvm hosts refuse 32-bit paging")
def test_paged32_refused_clearly():
    from pykvm.platform.machine import Machine
    from pykvm.x86.modes import ModeNotSupported

    with Machine(memory="16M") as m:
        with pytest.raises(ModeNotSupported, match=r"paged32.*CR0.*PG.*kvm_pvm"):
            m.load_guest("hello32p")


@pytest.mark.parametrize("name", sorted(set(HELLO) - {"hello32p"}))
def test_c_loop_takes_the_transmit_hot_path(name):
    fast = run_guest(name, c_loop=True)
    slow = run_guest(name, c_loop=False)
    assert fast.serial == slow.serial and fast.regs["rax"] == slow.regs["rax"]
    nbytes = len(fast.serial)
    assert fast.c_hits["com1.thr"] == nbytes
    assert fast.exits["io"]["c"] >= nbytes and slow.exits["io"]["c"] == 0
    assert slow.exits["io"]["python"] >= nbytes


@pytest.mark.parametrize("n, primes", [(100, 25), (0, 9592), (1_000_000, 78498)])
def test_primes_in_ring3(n, primes):
    result = run_guest("primes64u", args=(n, 0))
    assert result.ended == "reset"
    assert result.regs["rax"] == primes
    shown = n or 100000
    assert result.serial_text == f"primes below {shown}: {primes}\n"


@pytest.mark.parametrize("c_loop", PATHS)
def test_uart_echo_guest(c_loop):
    result = run_guest("uart_echo", c_loop=c_loop, serial_input=b"hello, uart\x04")
    assert result.ended == "hlt", result.message
    assert result.serial_text == "uart ready\nhello, uart\nbye\n"
    assert result.regs["rax"] & 0xFFFFFFFF == len("hello, uart")


BENCH_KINDS = {"out": ("io", 1), "in": ("io", 2), "mmio_write": ("mmio", 3), "mmio_read": ("mmio", 4)}


@pytest.mark.parametrize("guest", ["bench32", "bench64", "bench64u"])
@pytest.mark.parametrize("kind", sorted(BENCH_KINDS))
def test_bench_guest_makes_exactly_n_exits(guest, kind):
    reason, number = BENCH_KINDS[kind]
    n = 200
    result = run_guest(guest, args=(number, n))
    assert result.clean, result.message
    assert result.regs["rax"] == n
    resets = 1 if guest == "bench64u" and reason == "io" else 0  # CPL 3 stops with an OUT to 0x64
    assert result.exits[reason]["total"] == n + resets


def test_bench_guest_hlt_kind():
    from pykvm.platform.machine import Machine

    with Machine(memory="16M") as m:
        m.load_guest("bench64", args=(6, 5))
        halts = 0
        while True:
            r = m.run(timeout=10)
            assert r.ended == "hlt"
            halts += 1
            if r.regs["rax"] == 5:
                break
        assert halts == 6  # N HLTs in the loop, then the final one


def test_cpuid_bench_is_handled_in_the_kernel():
    result = run_guest("bench64", args=(5, 300))
    assert result.ended == "hlt" and result.regs["rax"] == 300
    assert "io" not in result.exits  # CPUID never reached user space


def test_triple_fault_ends_with_a_register_dump():
    result = run_guest("triple64")
    assert result.ended == "shutdown"
    assert result.exit_status is None
    assert "rip" in result.message and "mode: long 64-bit" in result.message
    assert re.search(r"code at RIP 0x[0-9a-f]+: 0f 0b\s+ud2", result.message)


@pytest.mark.parametrize("name", ["spin16", "spin64", "spin64u"])
def test_timeout_stops_a_spinning_guest(name):
    import time

    start = time.perf_counter()
    result = run_guest(name, timeout=0.3)
    elapsed = time.perf_counter() - start
    assert result.ended == "timeout"
    assert 0.3 <= elapsed < 0.3 + 0.1 + 0.2  # stops within 100 ms (+ VM setup)
    assert result.regs["rip"] == guests.info(name).load_addr  # still at its `jmp .`


@pytest.mark.parametrize("c_loop", PATHS)
def test_coalesced_uart_transmit_loses_nothing(c_loop):
    from pykvm.platform.machine import Machine

    n = 32768
    with Machine(memory="16M", c_loop=c_loop) as m:
        m.add_coalesced_zone(port=0x3F8, length=1)  # THR writes go to KVM's ring
        m.load_guest("iobench64u", args=(1, n))
        result = m.run(timeout=60)
    assert result.ended == "reset", result.message
    assert len(result.serial) == n and zlib.adler32(result.serial) == result.regs["rax"]
    # Only ring-full writes (and the final reset) come back to user space.
    assert result.exits["io"]["total"] < n // 50
