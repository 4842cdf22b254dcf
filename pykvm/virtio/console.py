"""virtio-console: a paravirtual serial console (virtio 1.x spec section 5.3).

Device ID 3.  Each *port* is a pair of queues: a receiveq the driver fills
with empty device-writable buffers for host input, and a transmitq of
device-readable buffers with the guest's output.  Port 0 uses queues 0 and
1 and is always there; Linux shows it as ``/dev/hvc0`` (``console=hvc0``).

Features (5.3.3):

* VIRTIO_CONSOLE_F_SIZE -- ``cols``/``rows`` in the configuration space are
  valid (offered when the console is given a ``size``; :meth:`resize`
  changes them and raises a configuration-change interrupt);
* VIRTIO_CONSOLE_F_EMERG_WRITE -- a byte written to ``emerg_wr`` goes out
  on port 0 at any time, even before the driver set the device up (5.3.5.1);
* VIRTIO_CONSOLE_F_MULTIPORT -- several ports and two control queues (2 and
  3), offered when extra ports are given.  The control conversation
  (5.3.6.2): the driver sends DEVICE_READY; the device answers DEVICE_ADD
  (Linux's PORT_ADD) for each port; the driver answers PORT_READY for each;
  the device then sends CONSOLE_PORT for port 0, PORT_NAME for a named port
  and PORT_OPEN (the host end is connected).  The driver's PORT_OPEN says
  whether a guest program has the port open.

Configuration space (5.3.4), 12 bytes::

    le16 cols; le16 rows; le32 max_nr_ports; le32 emerg_wr;

``cols`` comes first as in Linux's ``<linux/virtio_console.h>`` and QEMU.
(Recent spec drafts list ``rows`` first; Linux and QEMU never did.  Linux
also reads the multiport RESIZE message as ``rows, cols`` before its 2025 fix
and ``cols, rows`` after, which is the spec's order and the one sent here.)

Data flow:

* guest -> host: a notification on a transmitq sends every available buffer
  to the port's backend (``backend.write``) and returns it with used length
  0 (the device wrote nothing into it);
* host -> guest: :meth:`VirtioConsole.enqueue_input` (or the backend's input
  thread, which calls it) queues bytes; they are copied into the receiveq's
  buffers as the driver makes them available, each buffer returned with the
  number of bytes written.  Pending input is bounded (``max_pending_input``);
  the excess is dropped and counted.

A driver that puts a device-readable buffer in a receiveq or a
device-writable one in a transmitq breaks 5.3.6.1: that is a
:class:`VirtqueueError`, and the transport puts the device in NEEDS_RESET.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial

from pykvm.log import get_logger
from pykvm.ratelimit import GuestLog
from pykvm.virtio import VirtioDevice
from pykvm.virtio.backends import ConsoleBackend
from pykvm.virtio.queue import DescriptorChain, SplitVirtqueue, VirtqueueError

log = get_logger("pykvm.virtio.console")

__all__ = ["ConsolePort", "VirtioConsole", "port_queues"]

VIRTIO_ID_CONSOLE = 3

# Feature bits (5.3.3).
VIRTIO_CONSOLE_F_SIZE = 0
VIRTIO_CONSOLE_F_MULTIPORT = 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 2

# Queues (5.3.2).
RECEIVEQ = 0  # port 0
TRANSMITQ = 1
CONTROL_RECEIVEQ = 2  # device -> driver control messages
CONTROL_TRANSMITQ = 3  # driver -> device control messages

# Control events (5.3.6.2); struct virtio_console_control { le32 id; le16 event; le16 value; }.
DEVICE_READY = 0
DEVICE_ADD = 1  # Linux: VIRTIO_CONSOLE_PORT_ADD
DEVICE_REMOVE = 2
PORT_READY = 3
CONSOLE_PORT = 4
RESIZE = 5
PORT_OPEN = 6
PORT_NAME = 7
_CONTROL = struct.Struct("<IHH")
_CONFIG = struct.Struct("<HHII")  # cols, rows, max_nr_ports, emerg_wr
EMERG_WR_OFFSET = 8

DEFAULT_QUEUE_SIZE = 256
DEFAULT_MAX_PENDING_INPUT = 1 << 20


def port_queues(port: int) -> tuple[int, int]:
    """The (receiveq, transmitq) indices of ``port`` (5.3.2)."""
    if port == 0:
        return RECEIVEQ, TRANSMITQ
    return 2 + 2 * port, 3 + 2 * port


@dataclass
class ConsolePort:
    """One port: its backend, the host input waiting for it, the driver's view of it."""

    id: int
    backend: ConsoleBackend | None
    name: str | None = None
    pending: bytearray = field(default_factory=bytearray)  # host input not yet in the guest
    ready: bool = False  # multiport: the driver sent PORT_READY
    guest_open: bool = False  # multiport: a guest program has the port open
    sending: tuple | None = None  # (chain, bytes already sent): a transmit chain cut by the round's budget

    @property
    def is_console(self) -> bool:
        return self.id == 0


class VirtioConsole(VirtioDevice):
    """A virtio console: port 0 on ``backend``, plus optional named ports.

    ``size`` = ``(cols, rows)`` offers VIRTIO_CONSOLE_F_SIZE.
    ``ports`` = ``[(name, backend), ...]`` adds ports 1, 2, ... and offers
    VIRTIO_CONSOLE_F_MULTIPORT (Linux shows them as ``/dev/vportNpM`` and
    ``/dev/virtio-ports/<name>``).  Each backend is started at once with
    this console's :meth:`enqueue_input` for its port.
    """

    device_id = VIRTIO_ID_CONSOLE
    name = "virtio-console"

    def __init__(
        self,
        backend: ConsoleBackend | None = None,
        *,
        size: tuple[int, int] | None = None,
        ports: Sequence[tuple[str, ConsoleBackend]] = (),
        emergency_write: bool = True,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        max_pending_input: int = DEFAULT_MAX_PENDING_INPUT,
    ) -> None:
        self.ports = [ConsolePort(0, backend)]
        self.ports += [ConsolePort(i, b, name) for i, (name, b) in enumerate(ports, start=1)]
        multiport = len(self.ports) > 1
        features = (
            (1 << VIRTIO_CONSOLE_F_SIZE if size else 0)
            | (1 << VIRTIO_CONSOLE_F_MULTIPORT if multiport else 0)
            | (1 << VIRTIO_CONSOLE_F_EMERG_WRITE if emergency_write else 0)
        )
        queue_count = 2 + 2 * len(self.ports) if multiport else 2
        super().__init__([queue_size] * queue_count, features)
        self.cols, self.rows = size or (0, 0)
        self.max_pending_input = max_pending_input
        self.bytes_out = 0  # guest -> host, including emergency writes
        self.bytes_in = 0  # host -> guest, delivered into receive buffers
        self.dropped_input = 0  # host input discarded because too much was pending
        self._control_out: deque[bytes] = deque()  # messages waiting for control buffers
        self._backend_errors: set[int] = set()  # ports whose backend failed (logged once)
        self._log = GuestLog(log)  # lines the driver's behaviour triggers: rate-limited
        for port in self.ports:
            if port.backend is not None:
                port.backend.start(partial(self.enqueue_input, port=port.id))

    # -- host side -----------------------------------------------------------------

    def enqueue_input(self, data: bytes, port: int = 0) -> None:
        """Queue ``data`` for the guest on ``port``, as typed input (any thread)."""
        with self.lock:
            target = self.ports[port]
            room = max(self.max_pending_input - len(target.pending), 0)
            if len(data) > room:
                if not self.dropped_input:
                    log.warning("%s: more than %d bytes of input pending; dropping",
                                self.name, self.max_pending_input)
                self.dropped_input += len(data) - room
            target.pending += data[:room]
            self.kick(port_queues(port)[0])

    def pending_input(self, port: int = 0) -> int:
        """Bytes of host input on ``port`` the guest has not received yet."""
        with self.lock:
            return len(self.ports[port].pending)

    def resize(self, cols: int, rows: int) -> None:
        """The host terminal changed size: tell the driver (5.3.6, 5.3.6.2)."""
        with self.lock:
            self.cols, self.rows = cols, rows
            if self.features >> VIRTIO_CONSOLE_F_SIZE & 1:
                self.config_changed()
            if self.active and self.has_feature(VIRTIO_CONSOLE_F_MULTIPORT) and self.ports[0].ready:
                self._send_control(0, RESIZE, 0, struct.pack("<HH", cols, rows))

    def close(self) -> None:
        """Close every port's backend."""
        for port in self.ports:
            if port.backend is not None:
                port.backend.close()

    # -- configuration space (5.3.4) -------------------------------------------------

    def config_space(self) -> bytes:
        return _CONFIG.pack(self.cols, self.rows, len(self.ports), 0)

    def write_config(self, offset: int, data: bytes) -> None:
        """Only ``emerg_wr`` is writable: its low byte goes out on port 0 (5.3.5.1)."""
        if offset == EMERG_WR_OFFSET and data and self.features >> VIRTIO_CONSOLE_F_EMERG_WRITE & 1:
            self._output(self.ports[0], data[:1])
        else:
            super().write_config(offset, data)

    # -- the transport's calls -----------------------------------------------------

    def on_reset(self) -> None:
        for port in self.ports:
            port.ready = port.guest_open = False
            port.sending = None
        self._control_out.clear()  # host input survives: it is outside the device

    def notify(self, index: int) -> bool:
        """One round of work on queue ``index``; True when more is waiting (VirtioDevice.notify)."""
        multiport = self.has_feature(VIRTIO_CONSOLE_F_MULTIPORT)
        if index == CONTROL_RECEIVEQ and multiport:
            self._flush_control()
            return False
        if index == CONTROL_TRANSMITQ and multiport:
            return self._handle_control()
        port_id, is_receiveq = self._port_of_queue(index)
        if port_id >= len(self.ports) or (port_id and not multiport):
            return False
        if is_receiveq:
            return self._fill_receiveq(self.ports[port_id])
        return self._drain_transmitq(self.ports[port_id])

    @staticmethod
    def _port_of_queue(index: int) -> tuple[int, bool]:
        if index < 2:
            return 0, index == RECEIVEQ
        return index // 2 - 1, index % 2 == 0

    # -- data ----------------------------------------------------------------------

    def _next_chain(self, queue: SplitVirtqueue) -> DescriptorChain | None:
        """Pop a chain; when the ring is empty re-arm notifications and look again."""
        chain = queue.pop()
        if chain is None and queue.enable_notification():
            chain = queue.pop()
        return chain

    def _fill_receiveq(self, port: ConsolePort) -> bool:
        """Copy pending host input into the receiveq's buffers (5.3.6), a round's worth of chains."""
        index = port_queues(port.id)[0]
        queue = self.queues[index]
        if not (self.active and queue.ready):
            return False
        used = False
        chains = 0
        while port.pending:
            if chains == self.ROUND_CHAINS:
                break
            chains += 1
            chain = self._next_chain(queue)
            if chain is None:
                break  # input waits for the driver's next buffers
            if chain.readable:
                raise VirtqueueError(f"virtqueue {index}: device-readable buffer in a receiveq (5.3.6.1)")
            written = chain.write(port.pending[: chain.writable_length])
            del port.pending[:written]
            self.bytes_in += written
            queue.push(chain, written)
            used = True
        if used:
            self.signal_used(index)
        return bool(port.pending) and chains == self.ROUND_CHAINS

    def _drain_transmitq(self, port: ConsolePort) -> bool:
        """Send available transmit buffers to the port's backend (5.3.6), one round's budget at most.

        A round ends after ROUND_CHAINS chains or ROUND_BYTES bytes, even in
        the middle of a chain (a hostile driver may describe 4 GiB in one):
        the port remembers how far it got, and the next round goes on there.
        """
        index = port_queues(port.id)[1]
        queue = self.queues[index]
        used = False
        chains, budget = 0, self.ROUND_BYTES
        while True:
            if port.sending is None:
                if chains == self.ROUND_CHAINS:
                    break
                chain = self._next_chain(queue)
                if chain is None:
                    break
                if chain.writable:
                    raise VirtqueueError(f"virtqueue {index}: device-writable buffer in a transmitq (5.3.6.1)")
                chains += 1
                port.sending = (chain, 0)
            chain, sent = port.sending
            for piece in chain.iter_readable(start=sent, limit=budget):
                self._output(port, piece)
                sent += len(piece)
                budget -= len(piece)
            if sent < chain.readable_length:  # the budget ran out inside this chain
                port.sending = (chain, sent)
                break
            port.sending = None
            queue.push(chain, 0)
            used = True
            if budget == 0:
                break
        if used:
            self.signal_used(index)
        return port.sending is not None or chains == self.ROUND_CHAINS or budget == 0

    def _output(self, port: ConsolePort, data: bytes) -> None:
        self.bytes_out += len(data)
        if port.backend is None:
            return
        try:
            port.backend.write(data)
        except OSError as error:  # the host side's problem, not the guest's
            if port.id not in self._backend_errors:
                self._backend_errors.add(port.id)
                log.warning("%s: port %d backend write failed: %s; output dropped",
                            self.name, port.id, error)

    # -- multiport control queues (5.3.6.2) ------------------------------------------

    def _send_control(self, port_id: int, event: int, value: int, extra: bytes = b"") -> None:
        self._control_out.append(_CONTROL.pack(port_id, event, value) + extra)
        self._flush_control()

    def _flush_control(self) -> None:
        """Put waiting control messages into the control receiveq's buffers."""
        queue = self.queues[CONTROL_RECEIVEQ]
        if not (self.active and queue.ready):
            return
        used = False
        while self._control_out:
            chain = self._next_chain(queue)
            if chain is None:
                break
            if chain.readable:
                raise VirtqueueError("virtqueue 2: device-readable buffer in the control receiveq")
            message = self._control_out.popleft()
            queue.push(chain, chain.write(message))
            used = True
        if used:
            self.signal_used(CONTROL_RECEIVEQ)

    def _handle_control(self) -> bool:
        """Read the driver's control messages and answer them, a round's worth at most."""
        queue = self.queues[CONTROL_TRANSMITQ]
        used = False
        chains = 0
        while chains < self.ROUND_CHAINS and (chain := self._next_chain(queue)) is not None:
            chains += 1
            if chain.writable:
                raise VirtqueueError("virtqueue 3: device-writable buffer in the control transmitq")
            message = chain.read(_CONTROL.size)
            queue.push(chain, 0)
            used = True
            if len(message) < _CONTROL.size:
                self._log.info("short", "%s: short control message (%d bytes) ignored", self.name, len(message))
                continue
            self._control_event(*_CONTROL.unpack(message))
        if used:
            self.signal_used(CONTROL_TRANSMITQ)
        return chains == self.ROUND_CHAINS

    def _control_event(self, port_id: int, event: int, value: int) -> None:
        if event == DEVICE_READY:
            if not value:
                self._log.warning("device-ready", "%s: driver reports it failed to set up the device", self.name)
                return
            for port in self.ports:
                self._send_control(port.id, DEVICE_ADD, 0)
            return
        if port_id >= len(self.ports):
            self._log.info(("unknown-port", event, port_id),
                           "%s: control event %d for unknown port %d ignored", self.name, event, port_id)
            return
        port = self.ports[port_id]
        if event == PORT_READY:
            if not value:
                self._log.warning(("port-ready", port_id), "%s: driver failed to add port %d", self.name, port_id)
                return
            port.ready = True
            if port.is_console:
                self._send_control(port_id, CONSOLE_PORT, 1)
            if port.name:
                self._send_control(port_id, PORT_NAME, 1, port.name.encode())
            self._send_control(port_id, PORT_OPEN, 1)  # the host end is connected
        elif event == PORT_OPEN:
            port.guest_open = bool(value)
            if port.guest_open:
                self._fill_receiveq(port)
        else:
            log.debug("%s: control event %d from the driver ignored", self.name, event)
