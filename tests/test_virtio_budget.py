"""One doorbell does a bounded round of work; the rest continues later, and a stop is never held up.

Regression: 256 transmit chains, each an indirect table of 32,768
descriptors, kept the host busy 32 s after a 1 s timeout; chains of 4 GiB
each (every descriptor pointing at the same 16 MiB) pushed 1 TiB to the
console backend in 58 s.  Now indirect tables are bounded by the queue
size, each notification does at most ``ROUND_CHAINS`` chains and
``ROUND_BYTES`` bytes (a chain cut in the middle resumes where it stopped),
and the run's stop flags are looked at between rounds.
"""

from __future__ import annotations

import time

import pytest

from pykvm.memory import GuestMemory
from pykvm.virtio import VIRTIO_F_INDIRECT_DESC, VIRTIO_F_VERSION_1, VirtioConsole, VirtioMmioDevice
from pykvm.virtio.mock_driver import MmioDriver

MiB = 1 << 20
SIZE = 256  # queue size


class CountingBackend:
    """Counts the bytes the console sends, without keeping them."""

    def __init__(self) -> None:
        self.bytes = 0
        self.writes = 0

    def start(self, deliver) -> None:
        pass

    def write(self, data: bytes) -> None:
        self.bytes += len(data)
        self.writes += 1

    def close(self) -> None:
        pass


def hostile_console(memory, chains: int, descriptors: int, length: int):
    """A console whose transmitq holds ``chains`` chains, each an indirect table of ``descriptors``
    descriptors of ``length`` bytes, all pointing at the same buffer."""
    backend = CountingBackend()
    console = VirtioConsole(backend, queue_size=SIZE)
    transport = VirtioMmioDevice(console, memory)
    driver = MmioDriver(transport, memory)
    rings = driver.start((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_INDIRECT_DESC),
                         {0: (SIZE, 0x10000, 0x20000, 0x30000), 1: (SIZE, 0x40000, 0x50000, 0x60000)})
    tx = rings[1]
    table = 0x100000
    for i in range(chains):
        tx.add_indirect(table + i * 16 * descriptors, [(0x800000, length, False)] * descriptors)
    return backend, transport, driver


@pytest.fixture
def big_memory():
    mem = GuestMemory()
    mem.add_region(0, 0x800000 + 16 * MiB)
    yield mem
    mem.close()


def test_indirect_tables_longer_than_the_queue_put_the_device_in_needs_reset(big_memory):
    backend, transport, driver = hostile_console(big_memory, 1, SIZE * 2, 1)
    driver.notify(1)
    assert transport.errors == 1 and "longer than the queue" in transport.last_error
    assert backend.bytes == 0


def test_one_doorbell_is_one_round_and_the_rest_is_rescheduled(big_memory):
    backend, transport, driver = hostile_console(big_memory, SIZE, SIZE, 1024)  # 256 chains of 256 KiB
    rounds = []
    transport.reschedule = rounds.append
    driver.notify(1)
    assert rounds == [1]  # more was waiting: continue queue 1 later
    assert backend.bytes <= VirtioConsole.ROUND_BYTES
    chains_done = transport.queues[1].used_idx
    assert 0 < chains_done <= VirtioConsole.ROUND_CHAINS
    while rounds:  # the platform's continuation, one round at a time
        rounds.pop()
        transport.process_queue(1)
    assert backend.bytes == SIZE * SIZE * 1024  # nothing lost over the rounds
    assert transport.queues[1].used_idx == SIZE and transport.errors == 0


def test_a_4_gib_chain_is_cut_into_rounds_and_resumed(big_memory):
    backend, transport, driver = hostile_console(big_memory, 1, SIZE, 16 * MiB)  # one chain of 4 GiB
    rounds = []
    transport.reschedule = rounds.append
    driver.notify(1)
    assert backend.bytes == VirtioConsole.ROUND_BYTES  # cut inside the chain
    assert transport.queues[1].used_idx == 0  # not returned until all of it is sent
    for _ in range(3):
        rounds.pop()
        transport.process_queue(1)
    assert backend.bytes == 4 * VirtioConsole.ROUND_BYTES  # each round goes on where the last stopped


def test_without_a_scheduler_the_rounds_run_in_the_call(big_memory):
    backend, transport, driver = hostile_console(big_memory, 80, 4, 100)
    driver.notify(1)  # no reschedule set: a device test sees all the work done
    assert backend.bytes == 80 * 4 * 100 and transport.queues[1].used_idx == 80


@pytest.mark.kvm
@pytest.mark.parametrize("notify", ["python", "ioeventfd"])
def test_a_deadline_ends_the_run_even_while_a_doorbell_has_work(notify):
    """A guest ringing the doorbell of a hostile ring forever: the timeout still ends the run promptly."""
    from pykvm.platform.machine import Machine

    with Machine(memory="64M", irqchip=notify != "python") as m:
        backend = CountingBackend()
        _console, transport = m.add_virtio_console(backend, notify=notify, queue_size=SIZE)
        driver = MmioDriver(transport, m.memory)
        rings = driver.start((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_F_INDIRECT_DESC),
                             {0: (SIZE, 0x400000, 0x410000, 0x420000), 1: (SIZE, 0x430000, 0x440000, 0x450000)})
        for i in range(SIZE):  # every chain 4 GiB: 256 descriptors of 16 MiB at 0x1000000
            rings[1].add_indirect(0x500000 + i * 16 * SIZE, [(0x1000000, 16 * MiB, False)] * SIZE)
        notify_addr = m.virtio_devices[0].base + 0x50
        # long mode: mov rax, QueueNotify; again: mov dword [rax], 1; jmp again
        code = b"\x48\xb8" + notify_addr.to_bytes(8, "little") + b"\xc7\x00\x01\x00\x00\x00" + b"\xeb\xf8"
        m.load_image(code, mode="long")
        started = time.monotonic()
        result = m.run(timeout=0.5)
        elapsed = time.monotonic() - started
        assert result.ended == "timeout", result.message
        assert elapsed < 5, f"the deadline waited {elapsed:.1f} s for device work"
        assert backend.bytes > 0  # the device did work meanwhile
    # close() returned: the I/O thread was not stuck in a doorbell either
