"""virtio-console (virtio spec 5.3) behind virtio-mmio, driven by a Python driver.

The driver here does what Linux's ``virtio_console.c`` does: it negotiates
features, sets up the receive and transmit queues, fills the receiveq with
empty buffers, and sends output through the transmitq.  Everything lives in
real guest memory (``GuestMemory(vm=None)``); no VM is needed.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from virtio_helpers import (
    DATA, MEMORY_SIZE, RecordingMemory, check_writes, hostile_memory, hostile_rings, snapshot, write_hostile_ring,
)

from pykvm.virtio.mock_driver import MmioDriver
from pykvm.virtio import (
    STATUS_DEVICE_NEEDS_RESET,
    VIRTIO_F_EVENT_IDX,
    VIRTIO_F_INDIRECT_DESC,
    VIRTIO_F_VERSION_1,
    VirtioConsole,
    VirtioMmioDevice,
)
from pykvm.virtio import mmio as R
from pykvm.virtio.backends import (
    FdBackend,
    FileBackend,
    MemoryBackend,
    StdioBackend,
    UnixSocketBackend,
)
from pykvm.virtio.console import (
    CONSOLE_PORT,
    DEVICE_ADD,
    DEVICE_READY,
    PORT_NAME,
    PORT_OPEN,
    PORT_READY,
    RESIZE,
    VIRTIO_CONSOLE_F_EMERG_WRITE,
    VIRTIO_CONSOLE_F_MULTIPORT,
    VIRTIO_CONSOLE_F_SIZE,
    port_queues,
)

VERSION_1 = 1 << VIRTIO_F_VERSION_1
EVENT_IDX = 1 << VIRTIO_F_EVENT_IDX
INDIRECT = 1 << VIRTIO_F_INDIRECT_DESC
SIZE = 1 << VIRTIO_CONSOLE_F_SIZE
MULTIPORT = 1 << VIRTIO_CONSOLE_F_MULTIPORT

# Ring layouts (size 8): queue index -> (size, desc, avail, used).
LAYOUT = {i: (8, 0x1000 + 0x1000 * i, 0x1800 + 0x1000 * i, 0x1C00 + 0x1000 * i) for i in range(6)}
RX_BUF, TX_BUF = DATA, DATA + 0x8000


class Guest:
    """A console, its transport, and a driver for them."""

    def __init__(self, memory, features: int = VERSION_1, queues=(0, 1), **console_args) -> None:
        self.memory = memory
        self.backend = MemoryBackend()
        self.console = VirtioConsole(self.backend, queue_size=8, **console_args)
        self.edges: list[bool] = []
        self.transport = VirtioMmioDevice(self.console, memory, self.edges.append)
        self.driver = MmioDriver(self.transport, memory)
        self.rings = self.driver.start(features, {i: LAYOUT[i] for i in queues})
        self.rx, self.tx = self.rings[0], self.rings[1]

    def post_receive_buffers(self, count: int = 4, size: int = 16, queue: int = 0) -> list[int]:
        """Fill the receiveq with empty buffers, as the driver's fill_queue() does."""
        ring = self.rings[queue]
        base = RX_BUF + 0x1000 * queue
        heads = [ring.add([(base + 0x100 * i, size, True)]) for i in range(count)]
        self.driver.notify(queue)
        return heads

    def transmit(self, data: bytes, queue: int = 1) -> int:
        self.memory.write(TX_BUF, data)
        head = self.rings[queue].add([(TX_BUF, len(data), False)])
        self.driver.notify(queue)
        return head

    def received(self, queue: int = 0) -> bytes:
        """Collect the used receive buffers' bytes, in order."""
        ring = self.rings[queue]
        out = b""
        for head, length in ring.take_used():
            addr = struct.unpack("<Q", self.memory.read(ring.desc + 16 * head, 8))[0]
            out += self.memory.read(addr, length)
        return out

    @property
    def needs_reset(self) -> bool:
        return bool(self.driver.status & STATUS_DEVICE_NEEDS_RESET)


# -- identification and configuration ------------------------------------------------------


def test_console_identity_and_features(memory):
    g = Guest(memory)
    assert g.driver.r32(R.DEVICE_ID) == 3
    offered = g.driver.device_features()
    assert offered & VERSION_1 and offered & (1 << VIRTIO_CONSOLE_F_EMERG_WRITE)
    assert not offered & SIZE and not offered & MULTIPORT  # no size given, one port
    g.driver.w32(R.QUEUE_SEL, 2)
    assert g.driver.r32(R.QUEUE_NUM_MAX) == 0  # no control queues without MULTIPORT


def test_config_space_layout(memory):
    g = Guest(memory, size=(132, 43))
    assert g.driver.device_features() & SIZE
    cols, rows, max_nr_ports, emerg_wr = struct.unpack("<HHII", g.transport.read(R.CONFIG, 12))
    assert (cols, rows, max_nr_ports, emerg_wr) == (132, 43, 1, 0)
    assert g.transport.read(R.CONFIG + 2, 2) == struct.pack("<H", 43)


def test_resize_changes_generation_and_interrupts(memory):
    g = Guest(memory, VERSION_1 | SIZE, size=(80, 25))
    generation = g.driver.r32(R.CONFIG_GENERATION)
    g.console.resize(100, 30)
    assert g.driver.r32(R.CONFIG_GENERATION) != generation
    assert g.driver.ack() == R.INTERRUPT_CONFIG and g.edges == [True, False]
    assert struct.unpack("<HH", g.transport.read(R.CONFIG, 4)) == (100, 30)


def test_emergency_write_works_before_setup(memory):
    console = VirtioConsole(backend := MemoryBackend())
    transport = VirtioMmioDevice(console, memory)
    for byte in b"early!":  # 5.3.5.1: even on an unconfigured device
        transport.write(R.CONFIG + 8, struct.pack("<I", 0x4200 | byte))
    transport.write(R.CONFIG + 8, b"\n")  # a byte-wide access works too
    assert backend.output == b"early!\n" and console.bytes_out == 7


def test_emergency_write_not_offered(memory):
    console = VirtioConsole(backend := MemoryBackend(), emergency_write=False)
    transport = VirtioMmioDevice(console, memory)
    transport.write(R.CONFIG + 8, b"x\0\0\0")
    assert backend.output == b""


# -- guest -> host -------------------------------------------------------------------------


def test_transmit_round_trip(memory):
    g = Guest(memory)
    head = g.transmit(b"Hello from the guest\n")
    assert g.backend.output == b"Hello from the guest\n"
    assert g.tx.take_used() == [(head, 0)]  # the device wrote nothing into it
    assert g.driver.r32(R.INTERRUPT_STATUS) == R.INTERRUPT_VRING and g.edges == [True]
    assert g.driver.ack() == R.INTERRUPT_VRING and g.edges == [True, False]


def test_transmit_chain_of_several_buffers(memory):
    g = Guest(memory)
    memory.write(TX_BUF, b"abc")
    memory.write(TX_BUF + 0x100, b"defg")
    g.tx.add([(TX_BUF, 3, False), (TX_BUF + 0x100, 4, False)])
    g.driver.notify(1)
    assert g.backend.output == b"abcdefg"


def test_transmit_indirect(memory):
    g = Guest(memory, VERSION_1 | INDIRECT)
    memory.write(TX_BUF, b"indirect ")
    memory.write(TX_BUF + 0x100, b"works")
    head = g.tx.add_indirect(0xE000, [(TX_BUF, 9, False), (TX_BUF + 0x100, 5, False)])
    g.driver.notify(1)
    assert g.backend.output == b"indirect works" and g.tx.take_used() == [(head, 0)]


def test_writable_buffer_in_transmitq_needs_reset(memory):
    g = Guest(memory)
    g.tx.add([(TX_BUF, 8, True)])
    g.driver.notify(1)
    assert g.needs_reset and g.driver.r32(R.INTERRUPT_STATUS) == R.INTERRUPT_CONFIG
    assert "transmitq" in g.transport.last_error


def test_backend_failure_does_not_break_the_guest(memory, caplog):
    class Broken(MemoryBackend):
        def write(self, data: bytes) -> None:
            raise BrokenPipeError("reader went away")

    console = VirtioConsole(Broken(), queue_size=8)
    transport = VirtioMmioDevice(console, memory)
    rings = MmioDriver(transport, memory).start(VERSION_1, {0: LAYOUT[0], 1: LAYOUT[1]})
    memory.write(TX_BUF, b"lost")
    with caplog.at_level(logging.WARNING, "pykvm.virtio.console"):
        for _ in range(3):
            rings[1].add([(TX_BUF, 4, False)])
            transport.process_queue(1)
    assert len(rings[1].take_used()) == 3 and not transport.status & STATUS_DEVICE_NEEDS_RESET
    assert caplog.text.count("backend write failed") == 1


# -- host -> guest ----------------------------------------------------------------------------


def test_receive_round_trip(memory):
    g = Guest(memory)
    heads = g.post_receive_buffers()
    assert g.rx.used_idx == 0 and g.edges == []  # nothing to say yet
    g.backend.feed(b"ls -l\n")
    used = g.rx.take_used()
    assert used == [(heads[0], 6)]
    assert memory.read(RX_BUF, 6) == b"ls -l\n"
    assert g.driver.ack() == R.INTERRUPT_VRING and g.edges == [True, False]
    assert g.console.bytes_in == 6 and g.console.pending_input() == 0


def test_input_spans_buffers_and_waits_for_more(memory):
    g = Guest(memory)
    g.post_receive_buffers(count=2, size=4)
    g.console.enqueue_input(b"0123456789")
    assert g.received() == b"01234567"
    assert g.console.pending_input() == 2  # waits for the driver's next buffer
    g.post_receive_buffers(count=1, size=16)
    assert g.received() == b"89"


def test_input_before_driver_ok_is_kept(memory):
    console = VirtioConsole(backend := MemoryBackend(), queue_size=8)
    backend.feed(b"typed early")
    transport = VirtioMmioDevice(console, memory)
    driver = MmioDriver(transport, memory)
    assert driver.negotiate(VERSION_1)
    rx = driver.setup_queue(0, *LAYOUT[0])
    driver.setup_queue(1, *LAYOUT[1])
    rx.add([(RX_BUF, 64, True)])
    driver.notify(0)  # before DRIVER_OK: not processed
    assert rx.used_idx == 0
    driver.add_status(4)  # DRIVER_OK
    assert rx.take_used() == [(0, 11)] and memory.read(RX_BUF, 11) == b"typed early"


def test_pending_input_is_bounded(memory, caplog):
    g = Guest(memory, max_pending_input=8)
    with caplog.at_level(logging.WARNING, "pykvm.virtio.console"):
        g.console.enqueue_input(b"0123456789")
        g.console.enqueue_input(b"more")
    assert g.console.pending_input() == 8 and g.console.dropped_input == 6
    assert caplog.text.count("dropping") == 1
    g.post_receive_buffers(count=1, size=64)
    assert g.received() == b"01234567"


def test_readable_buffer_in_receiveq_needs_reset(memory):
    g = Guest(memory)
    g.rx.add([(RX_BUF, 8, False)])
    g.driver.notify(0)
    g.console.enqueue_input(b"x")
    assert g.needs_reset and "receiveq" in g.transport.last_error
    assert g.edges == [True]  # the configuration-change interrupt (2.1.2)


def test_receive_into_indirect_buffers(memory):
    g = Guest(memory, VERSION_1 | INDIRECT)
    head = g.rx.add_indirect(0xE000, [(RX_BUF, 3, True), (RX_BUF + 0x100, 5, True)])
    g.driver.notify(0)
    g.console.enqueue_input(b"abcdefgh")
    assert g.rx.take_used() == [(head, 8)]
    assert memory.read(RX_BUF, 3) == b"abc" and memory.read(RX_BUF + 0x100, 5) == b"defgh"


# -- notification suppression ------------------------------------------------------------


def test_no_interrupt_flag_suppresses_used_notifications(memory):
    g = Guest(memory)
    g.tx.set_avail_flags(1)  # VIRTQ_AVAIL_F_NO_INTERRUPT: Linux's console polls its transmitq
    g.transmit(b"quiet")
    assert g.backend.output == b"quiet" and g.tx.used_idx == 1
    assert g.edges == [] and g.driver.r32(R.INTERRUPT_STATUS) == 0


def test_event_idx_suppression(memory):
    g = Guest(memory, VERSION_1 | EVENT_IDX)
    g.tx.set_avail_flags(1)  # ignored with EVENT_IDX (2.7.7.2)
    g.tx.set_used_event(2)  # interrupt me when used.idx passes 2
    for expected in ([], [], [True]):
        g.transmit(b".")
        assert g.edges == expected
    assert g.tx.avail_event == 3  # the device re-armed: "notify me at 3"
    g.driver.ack()
    g.transmit(b".")  # used.idx 4: past used_event 2 long ago, no interrupt
    assert g.edges == [True, False]
    assert g.backend.output == b"...."


def test_event_idx_on_the_receive_side(memory):
    g = Guest(memory, VERSION_1 | EVENT_IDX)
    g.rx.set_used_event(0)
    g.post_receive_buffers(count=2, size=4)
    g.console.enqueue_input(b"12345678")  # fills both buffers in one batch
    assert g.rx.used_idx == 2 and g.edges == [True]
    assert g.received() == b"12345678"
    g.driver.ack()
    g.console.enqueue_input(b"9")
    assert g.console.pending_input() == 1
    assert g.rx.avail_event == 2  # starved: the device asked to hear of buffer 2
    g.rx.set_used_event(2)
    g.post_receive_buffers(count=1, size=4)
    assert g.received() == b"9" and g.edges == [True, False, True]


# -- reset ----------------------------------------------------------------------------------


def test_reset_mid_transfer_then_fresh_setup(memory):
    g = Guest(memory)
    g.post_receive_buffers(count=1, size=4)
    g.console.enqueue_input(b"abcdefgh")  # 4 bytes delivered, 4 pending
    g.tx.add([(TX_BUF, 4, False)])  # made available, never notified
    g.driver.w32(R.STATUS, 0)  # the driver resets in the middle
    assert g.edges == [True, False] and g.driver.r32(R.INTERRUPT_STATUS) == 0
    assert g.console.pending_input() == 4  # host input survives a device reset
    # A fresh initialisation, with the rings somewhere else.
    layout = {0: (4, 0x8000, 0x8800, 0x8C00), 1: (4, 0x9000, 0x9800, 0x9C00)}
    rings = g.driver.start(VERSION_1, layout)
    rings[0].add([(RX_BUF + 0x400, 16, True)])
    g.driver.notify(0)
    assert rings[0].take_used() == [(0, 4)] and memory.read(RX_BUF + 0x400, 4) == b"efgh"
    memory.write(TX_BUF, b"again")
    rings[1].add([(TX_BUF, 5, False)])
    g.driver.notify(1)
    assert g.backend.output == b"again"  # the stale transmit buffer was never sent


def test_recovery_after_needs_reset(memory):
    g = Guest(memory)
    g.tx.add([(MEMORY_SIZE + 0x1000, 4, False)])
    g.driver.notify(1)
    assert g.needs_reset
    g.console.enqueue_input(b"hi")  # the host carries on; the device is stopped
    g.driver.ack()
    rings = g.driver.start(VERSION_1, {0: LAYOUT[0], 1: LAYOUT[1]})
    rings[0].add([(RX_BUF, 8, True)])
    g.driver.notify(0)
    assert rings[0].take_used() == [(0, 2)] and not g.needs_reset


# -- multiport (5.3.6.2) -----------------------------------------------------------------------


def control_messages(g: Guest) -> list[tuple[int, int, int, bytes]]:
    """The (id, event, value, payload) messages the device put in the control receiveq."""
    out = []
    ring = g.rings[2]
    for head, length in ring.take_used():
        addr = struct.unpack("<Q", g.memory.read(ring.desc + 16 * head, 8))[0]
        data = g.memory.read(addr, length)
        out.append((*struct.unpack("<IHH", data[:8]), data[8:]))
    return out


def send_control(g: Guest, port: int, event: int, value: int) -> None:
    g.memory.write(TX_BUF + 0x800, struct.pack("<IHH", port, event, value))
    g.rings[3].add([(TX_BUF + 0x800, 8, False)])
    g.driver.notify(3)


def test_multiport_conversation(memory):
    extra = MemoryBackend()
    g = Guest(memory, VERSION_1 | MULTIPORT, queues=range(6), ports=[("org.pykvm.port1", extra)])
    assert struct.unpack("<I", g.transport.read(R.CONFIG + 4, 4))[0] == 2  # max_nr_ports
    for i in range(8):  # control receive buffers
        g.rings[2].add([(DATA + 0x4000 + 0x100 * i, 64, True)])
    g.driver.notify(2)
    send_control(g, 0xFFFFFFFF, DEVICE_READY, 1)
    assert control_messages(g) == [(0, DEVICE_ADD, 0, b""), (1, DEVICE_ADD, 0, b"")]
    send_control(g, 0, PORT_READY, 1)
    assert control_messages(g) == [(0, CONSOLE_PORT, 1, b""), (0, PORT_OPEN, 1, b"")]
    send_control(g, 1, PORT_READY, 1)
    assert control_messages(g) == [(1, PORT_NAME, 1, b"org.pykvm.port1"), (1, PORT_OPEN, 1, b"")]
    send_control(g, 1, PORT_OPEN, 1)
    assert g.console.ports[1].guest_open
    assert g.rings[3].used_idx == 4
    # Data on port 1 uses queues 4 and 5.
    assert port_queues(1) == (4, 5)
    g.transmit(b"to port 1", queue=5)
    assert extra.output == b"to port 1" and g.backend.output == b""
    g.post_receive_buffers(count=1, size=32, queue=4)
    extra.feed(b"from host")
    assert g.received(queue=4) == b"from host"
    # A resize goes out as a control message on the console port (cols, rows).
    g.console.resize(120, 40)
    assert control_messages(g) == [(0, RESIZE, 0, struct.pack("<HH", 120, 40))]


def test_multiport_messages_wait_for_control_buffers(memory):
    g = Guest(memory, VERSION_1 | MULTIPORT, queues=range(6), ports=[("p1", MemoryBackend())])
    send_control(g, 0, DEVICE_READY, 1)
    assert control_messages(g) == []
    g.rings[2].add([(DATA + 0x4000, 64, True)])
    g.driver.notify(2)
    assert control_messages(g) == [(0, DEVICE_ADD, 0, b"")]
    g.rings[2].add([(DATA + 0x4100, 64, True)])
    g.driver.notify(2)
    assert control_messages(g) == [(1, DEVICE_ADD, 0, b"")]


def test_multiport_bad_port_ids_are_ignored(memory):
    g = Guest(memory, VERSION_1 | MULTIPORT, queues=range(6), ports=[("p1", MemoryBackend())])
    send_control(g, 7, PORT_READY, 1)
    send_control(g, 0, 99, 1)
    assert not g.needs_reset and g.rings[3].used_idx == 2


def test_single_port_driver_on_a_multiport_device(memory):
    # A driver that does not accept MULTIPORT gets plain port 0.
    g = Guest(memory, VERSION_1, ports=[("p1", MemoryBackend())])
    g.transmit(b"plain")
    assert g.backend.output == b"plain"


# -- hostile drivers (hypothesis) ------------------------------------------------------------

RX_RING = (0x1000, 0x2000, 0x3000)  # region A of hostile_memory(); tables at 0x5000
TX_RING = (0x6000, 0x6800, 0x7000)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rx=hostile_rings(), tx=hostile_rings(), features=st.sampled_from([0, EVENT_IDX, INDIRECT, EVENT_IDX | INDIRECT]))
def test_hostile_rings_through_the_console(rx, tx, features):
    """Random descriptor tables: only NEEDS_RESET, no exception, no stray write."""
    with hostile_memory() as memory:
        recorder = RecordingMemory(memory)
        backend = MemoryBackend()
        console = VirtioConsole(backend, queue_size=8)
        edges: list[bool] = []
        transport = VirtioMmioDevice(console, recorder, edges.append)
        driver = MmioDriver(transport, memory)
        assert driver.negotiate(VERSION_1 | features)
        for index, spec, (desc, avail, used) in ((0, rx, RX_RING), (1, tx, TX_RING)):
            write_hostile_ring(memory, spec, desc, avail, used)
            driver.w32(R.QUEUE_SEL, index)
            driver.w32(R.QUEUE_NUM, spec["size"])
            driver.w32(R.QUEUE_DESC_LOW, desc)
            driver.w32(R.QUEUE_DRIVER_LOW, avail)
            driver.w32(R.QUEUE_DEVICE_LOW, used)
            driver.w32(R.QUEUE_READY, 1)
        before = snapshot(memory)
        console.enqueue_input(b"\x5a" * 300)
        driver.add_status(4)  # DRIVER_OK: processes both queues
        driver.notify(0)
        driver.notify(1)
        console.enqueue_input(b"more")
        assert recorder.violations == []
        check_writes(memory, before, recorder.writes,
                     [(RX_RING[0], rx["size"]), (TX_RING[0], tx["size"])],
                     [(RX_RING[2], rx["size"]), (TX_RING[2], tx["size"])])
        broken = bool(driver.status & STATUS_DEVICE_NEEDS_RESET)
        assert broken == (transport.errors > 0)
        if broken:
            assert transport.interrupt_status & R.INTERRUPT_CONFIG and edges[-1] is True
        # Whatever happened, a reset and a clean set-up work.
        driver.ack()
        rings = driver.start(VERSION_1, {0: (4, 0x10000, 0x10800, 0x10C00), 1: (4, 0x11000, 0x11800, 0x11C00)})
        rings[0].add([(0x12000, 8, True)])
        driver.notify(0)
        assert not driver.status & STATUS_DEVICE_NEEDS_RESET and rings[0].used_idx == 1


# -- backends ----------------------------------------------------------------------------------


def test_memory_backend_input_before_start():
    backend = MemoryBackend()
    backend.feed(b"early")
    got: list[bytes] = []
    backend.start(got.append)
    backend.feed(b"late")
    assert got == [b"early", b"late"]
    backend.write(b"out")
    assert backend.take_output() == b"out" and backend.output == b""


def test_file_backend(tmp_path, memory):
    path = tmp_path / "console.log"
    backend = FileBackend(path)
    g_console = VirtioConsole(backend, queue_size=8)
    transport = VirtioMmioDevice(g_console, memory)
    rings = MmioDriver(transport, memory).start(VERSION_1, {0: LAYOUT[0], 1: LAYOUT[1]})
    memory.write(TX_BUF, b"to a file\n")
    rings[1].add([(TX_BUF, 10, False)])
    transport.process_queue(1)
    g_console.close()
    assert path.read_bytes() == b"to a file\n"
    appended = FileBackend(path, append=True)
    appended.write(b"more\n")
    appended.close()
    assert path.read_bytes() == b"to a file\nmore\n"


def wait_for(predicate, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.005)


def test_fd_backend_with_pipes():
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    backend = FdBackend(in_r, out_w, close_fds=True)
    got = bytearray()
    backend.start(got.extend)
    os.write(in_w, b"keys")
    wait_for(lambda: got == b"keys")
    backend.write(b"screen")
    assert os.read(out_r, 100) == b"screen"
    os.close(in_w)  # end of input: the thread stops reading, close still works
    backend.close()
    backend.close()
    os.close(out_r)


def test_stdio_backend_output_only(capfd):
    backend = StdioBackend(input=False)
    backend.start(lambda data: None)
    backend.write(b"on stdout\n")
    backend.close()
    assert capfd.readouterr().out == "on stdout\n"


def test_unix_socket_backend(tmp_path, memory):
    path = str(tmp_path / "console.sock")
    backend = UnixSocketBackend(path)
    g_console = VirtioConsole(backend, queue_size=8)
    transport = VirtioMmioDevice(g_console, memory)
    driver = MmioDriver(transport, memory)
    rings = driver.start(VERSION_1, {0: LAYOUT[0], 1: LAYOUT[1]})
    try:
        backend.write(b"boot log\n")  # before any client: buffered
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        client.settimeout(5)
        assert client.recv(100) == b"boot log\n"
        wait_for(lambda: backend.connected)
        second = socket.socket(socket.AF_UNIX)
        second.connect(path)
        second.settimeout(5)
        assert second.recv(10) == b""  # refused: one client at a time
        second.close()
        # Guest output reaches the client; client input reaches the guest.
        memory.write(TX_BUF, b"guest says hi")
        rings[1].add([(TX_BUF, 13, False)])
        driver.notify(1)
        assert client.recv(100) == b"guest says hi"
        rings[0].add([(RX_BUF, 64, True)])
        driver.notify(0)
        client.sendall(b"typed")
        wait_for(lambda: rings[0].used_idx == 1)
        assert memory.read(RX_BUF, 5) == b"typed"
        client.close()
        wait_for(lambda: not backend.connected)
        # The next client may connect.
        third = socket.socket(socket.AF_UNIX)
        third.connect(path)
        wait_for(lambda: backend.connected)
        third.close()
    finally:
        g_console.close()
    assert not os.path.exists(path)


def test_unix_socket_backend_drops_beyond_its_buffer(tmp_path):
    backend = UnixSocketBackend(tmp_path / "s", buffer_limit=10)
    backend.write(b"0123456789ABC")
    backend.write(b"D")
    assert backend.dropped == 4
    backend.close()


def test_unix_socket_backend_path_handling(tmp_path):
    path = tmp_path / "s"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()  # an earlier run left the socket file behind
    UnixSocketBackend(path).close()
    path.write_text("not a socket")
    with pytest.raises(FileExistsError):
        UnixSocketBackend(path)
