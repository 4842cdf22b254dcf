"""GDB Remote Serial Protocol framing: packets, acknowledgments, escapes, Ctrl-C.

GDB manual, appendix E "GDB Remote Serial Protocol":

* E.1 Overview: a packet is ``$payload#cs``, ``cs`` two hex digits of the
  payload's byte sum modulo 256.  In binary data (``X`` packets, ``qXfer``
  replies) the bytes ``# $ } *`` are sent as ``}`` and the byte XOR 0x20.
  A reply may be run-length encoded: ``c*N`` stands for ``c`` repeated
  ``N - 29 + 1`` times (``N`` printable, not ``#`` or ``$``).
* E.11 Packet Acknowledgment: the receiver answers each packet with ``+``
  (good checksum) or ``-`` (send it again), until both sides agree on
  ``QStartNoAckMode``.
* E.9 Interrupts: GDB interrupts a running target with a lone 0x03 byte
  between packets.

:class:`PacketReader` turns the byte stream into events with bounded
memory; :class:`PacketChannel` runs it on a socket and does the acks.
"""

from __future__ import annotations

import enum
import math
import select
import socket
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

#: The largest payload accepted (and advertised in qSupported as PacketSize).
PACKET_SIZE = 0x4000
INTERRUPT_BYTE = 0x03
_ESCAPE = 0x7D  # "}"
_NEEDS_ESCAPE = frozenset(b"#$}*")
_RLE_BASE = 29                  # a repeat count N is sent as chr(N + 29)
_RLE_MAX_REPEATS = 126 - _RLE_BASE
_RLE_FORBIDDEN = {ord("#") - _RLE_BASE, ord("$") - _RLE_BASE}  # counts 6 and 7 would frame


def checksum(payload: bytes) -> int:
    return sum(payload) & 0xFF


def frame(payload: bytes) -> bytes:
    """``$payload#cs``."""
    return b"$%s#%02x" % (payload, checksum(payload))


def escape(data: bytes) -> bytes:
    """Binary data as it may appear in a packet."""
    if not _NEEDS_ESCAPE.intersection(data):
        return bytes(data)
    out = bytearray()
    for byte in data:
        if byte in _NEEDS_ESCAPE:
            out += bytes((_ESCAPE, byte ^ 0x20))
        else:
            out.append(byte)
    return bytes(out)


def unescape(data: bytes) -> bytes:
    """The binary data an escaped packet field carries; ValueError on a dangling ``}``."""
    if _ESCAPE not in data:
        return bytes(data)
    out, i = bytearray(), 0
    while i < len(data):
        byte = data[i]
        if byte == _ESCAPE:
            if i + 1 == len(data):
                raise ValueError("escape character at the end of binary data")
            out.append(data[i + 1] ^ 0x20)
            i += 2
        else:
            out.append(byte)
            i += 1
    return bytes(out)


def run_length_encode(payload: bytes) -> bytes:
    """Shorten runs of four or more equal characters (for hex replies; never binary data)."""
    out, i, n = bytearray(), 0, len(payload)
    while i < n:
        byte = payload[i]
        run = 1
        while i + run < n and payload[i + run] == byte and run <= _RLE_MAX_REPEATS:
            run += 1
        repeats = run - 1
        if repeats in _RLE_FORBIDDEN:
            repeats = min(_RLE_FORBIDDEN) - 1
        out.append(byte)
        if repeats >= 3 and byte not in _NEEDS_ESCAPE:
            out += bytes((ord("*"), repeats + _RLE_BASE))
            i += repeats + 1
        else:
            i += 1
    return bytes(out)


def run_length_decode(payload: bytes) -> bytes:
    """Expand ``c*N`` runs (what GDB does with a reply); ValueError if malformed."""
    if b"*" not in payload:
        return bytes(payload)
    out, i = bytearray(), 0
    while i < len(payload):
        byte = payload[i]
        if byte == ord("*"):
            if not out or i + 1 == len(payload):
                raise ValueError("run-length marker without a character or a count")
            repeats = payload[i + 1] - _RLE_BASE
            if repeats < 0 or repeats > _RLE_MAX_REPEATS:
                raise ValueError(f"bad run-length count {payload[i + 1]:#x}")
            out += bytes((out[-1],)) * repeats
            i += 2
        else:
            out.append(byte)
            i += 1
    return bytes(out)


class Control(enum.Enum):
    """The single bytes sent outside packets."""

    ACK = "+"
    NAK = "-"
    INTERRUPT = "\x03"


@dataclass(frozen=True)
class Packet:
    """A packet as received: its payload, and what was wrong with it (None if nothing)."""

    payload: bytes
    problem: str | None = None


Event = Packet | Control
_BETWEEN, _PAYLOAD, _CHECKSUM = range(3)
_CONTROL_BYTES = {ord(c.value): c for c in Control}


class PacketReader:
    """Incremental parser of the byte stream GDB sends.

    Between packets it reports ``+``, ``-`` and 0x03 and ignores other
    noise; a ``$`` inside a payload starts the packet over (the sender
    gave up on the first).  A payload longer than ``max_payload`` is
    consumed but not stored, and reported with a problem, so a client can
    never make it allocate more than that.
    """

    def __init__(self, max_payload: int = PACKET_SIZE) -> None:
        self.max_payload = max_payload
        self._state = _BETWEEN
        self._payload = bytearray()
        self._overflow = False
        self._digits = bytearray()

    def feed(self, data: bytes) -> list[Event]:
        events: list[Event] = []
        i, n = 0, len(data)
        while i < n:
            if self._state == _BETWEEN:
                byte = data[i]
                i += 1
                if byte == ord("$"):
                    self._start()
                elif byte in _CONTROL_BYTES:
                    events.append(_CONTROL_BYTES[byte])
            elif self._state == _PAYLOAD:
                end = _find_either(data, i, b"#", b"$")
                self._store(data[i:end])
                i = end
                if end < n:
                    i += 1
                    if data[end] == ord("$"):
                        self._start()
                    else:
                        self._state, self._digits = _CHECKSUM, bytearray()
            else:
                self._digits.append(data[i])
                i += 1
                if len(self._digits) == 2:
                    events.append(self._finish())
        return events

    def _start(self) -> None:
        self._state, self._payload, self._overflow = _PAYLOAD, bytearray(), False

    def _store(self, chunk: bytes) -> None:
        room = self.max_payload - len(self._payload)
        if len(chunk) > room:
            self._overflow = True
            chunk = chunk[:max(room, 0)]
        self._payload += chunk

    def _finish(self) -> Packet:
        self._state = _BETWEEN
        payload, self._payload = bytes(self._payload), bytearray()
        if self._overflow:
            return Packet(b"", f"longer than {self.max_payload} bytes")
        try:
            expected = int(self._digits.decode("ascii"), 16)
        except (UnicodeDecodeError, ValueError):
            return Packet(payload, f"checksum {bytes(self._digits)!r} is not hex")
        if expected != checksum(payload):
            return Packet(payload, f"bad checksum {expected:#04x} (computed {checksum(payload):#04x})")
        return Packet(payload)


def _find_either(data: bytes, start: int, first: bytes, second: bytes) -> int:
    """Index of the first ``first`` or ``second`` at or after ``start``; len(data) if neither."""
    found = [index for index in (data.find(first, start), data.find(second, start)) if index >= 0]
    return min(found) if found else len(data)


class ConnectionClosed(Exception):
    """The client went away (end of stream, socket error) or broke the protocol beyond repair."""


class PacketChannel:
    """Packets over a connected socket, with acknowledgments while they are on.

    ``receive()`` returns the next good packet's payload (already
    acknowledged) or :data:`Control.INTERRUPT`; bad packets are refused
    with ``-`` (or dropped in no-ack mode) and never returned.  ``send()``
    frames a payload and, in ack mode, waits for ``+``, sending again on
    ``-`` or silence, at most ``retries`` times.  Events that arrive while
    it waits are kept for ``receive()``, at most ``max_pending`` of them.
    """

    def __init__(self, sock: socket.socket, *, ack_timeout: float = 2.0, retries: int = 3,
                 max_pending: int = 64, on_problem: Callable[[str], None] | None = None,
                 chunk: int = 4096) -> None:
        self.sock = sock
        self.no_ack = False
        self.ack_timeout = ack_timeout
        self.retries = retries
        self.max_pending = max_pending
        self._on_problem = on_problem or (lambda problem: None)
        self._chunk = chunk
        self._reader = PacketReader()
        self._events: deque[Event] = deque()
        self._poll = select.poll()  # not select(): it fails for descriptors past 1023
        self._poll.register(sock, select.POLLIN)

    def receive(self, timeout: float | None) -> bytes | Control | None:
        """The next packet payload or INTERRUPT; None if nothing came within ``timeout`` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            while self._events:
                taken = self._take(self._events.popleft())
                if taken is not None:
                    return taken
            if not self._fill(deadline):
                return None

    def send(self, payload: bytes) -> None:
        """Send one packet; in ack mode, until GDB acknowledges it."""
        data = frame(payload)
        for _ in range(self.retries + 1):
            self._send_raw(data)
            if self.no_ack or self._await_ack():
                return
        raise ConnectionClosed(f"no acknowledgment after {self.retries + 1} tries")

    def _take(self, event: Event) -> bytes | Control | None:
        """What receive() returns for one event (acking packets), or None to drop it."""
        if isinstance(event, Control):
            return event if event is Control.INTERRUPT else None  # a stray +/- means nothing now
        if event.problem is not None:
            self._on_problem(event.problem)
            if not self.no_ack:
                self._send_raw(b"-")
            return None
        if not self.no_ack:
            self._send_raw(b"+")
        return event.payload

    def _await_ack(self) -> bool:
        """True on ``+``, False on ``-`` or when ``ack_timeout`` passes; other events are kept."""
        deadline = time.monotonic() + self.ack_timeout
        held: list[Event] = []
        try:
            while True:
                while self._events:
                    event = self._events.popleft()
                    if event is Control.ACK:
                        return True
                    if event is Control.NAK:
                        return False
                    held.append(event)
                    if len(held) > self.max_pending:
                        raise ConnectionClosed("too many packets sent without waiting for replies")
                if not self._fill(deadline):
                    return False
        finally:
            self._events.extendleft(reversed(held))

    def _fill(self, deadline: float | None) -> bool:
        """Read what the socket has into events; False if nothing came before ``deadline``."""
        milliseconds = None if deadline is None else math.ceil(max(0.0, deadline - time.monotonic()) * 1000)
        try:
            if not self._poll.poll(milliseconds):
                return False
            data = self.sock.recv(self._chunk)
        except (OSError, ValueError) as error:  # ValueError: the socket was closed under us
            raise ConnectionClosed(str(error)) from error
        if not data:
            raise ConnectionClosed("end of stream")
        self._events.extend(self._reader.feed(data))
        if len(self._events) > self._chunk + self.max_pending:
            raise ConnectionClosed("too many events queued")
        return True

    def _send_raw(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (OSError, ValueError) as error:
            raise ConnectionClosed(str(error)) from error
