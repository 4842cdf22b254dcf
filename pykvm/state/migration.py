"""Live migration: a running machine moved to another process over a socket, pre-copy style.

The source (:func:`migrate`, the monitor's ``migrate tcp:HOST:PORT`` or
``migrate unix:PATH``) talks to a destination that waits with ``pykvm run
-incoming tcp:...|unix:...`` (:class:`Incoming`).  The stream is a series of
messages, each a 4-byte tag and a u64 length::

    MACH  the machine description (JSON, as a snapshot's): the destination builds the machine from it
    PAGE  u64 guest-physical address, then whole 4 KiB pages from there
    STAT  the state without RAM (JSON, pykvm.state.snapshot.capture_state)
    DONE  the end; the destination answers OKAY once the state is loaded

Pre-copy, as QEMU does it: dirty logging on (``pykvm.state.dirty``), every
non-zero page sent while the guest runs, then rounds of the pages the guest
dirtied meanwhile until a round is small (or ``MAX_ROUNDS``); then the guest
is paused, the last dirty pages go, and -- because KVM logs only the guest's
own writes, not the host's (a device's DMA) -- every page is compared with
the crc32 of what was sent and resent if it differs.  Then the state, DONE,
and the destination's OKAY: the source stays paused (QEMU's
``postmigrate``).  If anything fails before OKAY (a dropped connection, a
refusal), the source turns dirty logging off and resumes the guest if it
was running: it never stops for a migration that did not happen.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
import zlib

from pykvm.state.dirty import PAGE_SIZE, dirty_pages, start_logging, stop_logging
from pykvm.state.snapshot import apply_state, capture_state, check_expected, describe, machine_shape
from pykvm.state.snapshot_format import Snapshot, SnapshotError, decode, encode

__all__ = ["Incoming", "MigrationStatus", "MAX_ROUNDS", "migrate", "parse_address"]

_MSG = struct.Struct("<4sQ")
_GPA = struct.Struct("<Q")
MAX_ROUNDS = 8
#: A round this small (pages) is the last one before the pause.
SMALL_ROUND = 64
_RUN = 256  # pages per PAGE message at most
_ZERO_CRC = zlib.crc32(bytes(PAGE_SIZE))
_CONNECT_SECONDS = 10.0


def parse_address(text: str) -> tuple[int, object]:
    """``tcp:HOST:PORT`` or ``unix:PATH`` -> (socket family, address); ValueError otherwise."""
    scheme, _, rest = text.partition(":")
    if scheme == "unix" and rest:
        return socket.AF_UNIX, rest
    if scheme == "tcp":
        host, _, port = rest.rpartition(":")
        if port.isdigit() and 0 < int(port) < 65536:
            return socket.AF_INET, (host or "127.0.0.1", int(port))
    raise ValueError(f"{text}: use tcp:HOST:PORT or unix:PATH")


class MigrationStatus:
    """What ``info migrate`` shows: status (none, active, completed, failed), why, and the counts."""

    def __init__(self) -> None:
        self.status = "none"
        self.error = ""
        self.rounds = 0
        self.pages = 0
        self.bytes = 0
        self.downtime_ms = 0.0
        self.total_ms = 0.0

    def __str__(self) -> str:
        if self.status == "none":
            return "Migration status: none"
        lines = [f"Migration status: {self.status}" + (f" ({self.error})" if self.error else ""),
                 f"rounds: {self.rounds}", f"pages sent: {self.pages}", f"bytes sent: {self.bytes}"]
        if self.status == "completed":
            lines += [f"total time: {self.total_ms:.0f} ms", f"downtime: {self.downtime_ms:.0f} ms"]
        return "\n".join(lines)


# -- the wire ----------------------------------------------------------------------------------------------
def _send(sock, tag: bytes, payload: bytes = b"") -> int:
    sock.sendall(_MSG.pack(tag, len(payload)) + payload)
    return _MSG.size + len(payload)


def _recv_exact(sock, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise SnapshotError("migration: the connection closed in the middle of the stream")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(sock) -> tuple[bytes, bytes]:
    tag, length = _MSG.unpack(_recv_exact(sock, _MSG.size))
    return tag, _recv_exact(sock, length)


# -- the source ---------------------------------------------------------------------------------------------
def _connect(address: str) -> socket.socket:
    family, where = parse_address(address)
    deadline = time.monotonic() + _CONNECT_SECONDS
    while True:  # the destination may still be starting: it listens once its process is up
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.connect(where)
            return sock
        except (ConnectionRefusedError, FileNotFoundError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
        except BaseException:
            sock.close()
            raise


def _send_pages(sock, memory, pages: list[int], sent: dict, status: MigrationStatus) -> None:
    """Send ``pages`` (ascending guest-physical addresses) in runs; remember each page's crc32."""
    i = 0
    while i < len(pages):
        j = i + 1
        while j < len(pages) and j - i < _RUN and pages[j] == pages[j - 1] + PAGE_SIZE:
            j += 1
        data = memory.read(pages[i], (j - i) * PAGE_SIZE)
        for k in range(j - i):
            sent[pages[i] + k * PAGE_SIZE] = zlib.crc32(data[k * PAGE_SIZE:(k + 1) * PAGE_SIZE])
        status.bytes += _send(sock, b"PAGE", _GPA.pack(pages[i]) + data)
        status.pages += j - i
        i = j


def _all_pages(memory, sent: dict, *, changed_only: bool) -> list[int]:
    """Non-zero pages (first round), or every page whose crc32 differs from what was sent (the check)."""
    pages = []
    for region in memory.regions:
        view = memory.view(region.gpa, region.size)
        for start in range(0, region.size, 64 * PAGE_SIZE):
            block = view[start:start + 64 * PAGE_SIZE].tobytes()
            if not changed_only and block == bytes(len(block)):
                continue
            for offset in range(0, len(block), PAGE_SIZE):
                gpa = region.gpa + start + offset
                crc = zlib.crc32(block[offset:offset + PAGE_SIZE])
                if crc != sent.get(gpa, _ZERO_CRC):
                    pages.append(gpa)
    return pages


def migrate(machine, address: str, *, pause, resume, status: MigrationStatus | None = None) -> MigrationStatus:
    """Move ``machine`` to the destination at ``address``; the guest runs during the pre-copy rounds.

    ``pause()`` stops the guest and returns whether it was running;
    ``resume()`` runs it again (used only if the migration fails).  Never
    raises for a failed migration: the returned status says why.
    """
    status = status or MigrationStatus()
    status.status, status.error, status.rounds, status.pages, status.bytes = "active", "", 0, 0, 0
    started = time.perf_counter()
    was_running = None
    sock = None
    logging = False
    try:
        sock = _connect(address)
        status.bytes += _send(sock, b"MACH", json.dumps(describe(machine), sort_keys=True).encode())
        start_logging(machine.memory)
        logging = True
        sent: dict[int, int] = {}
        pending = _all_pages(machine.memory, sent, changed_only=False)  # round 0: every non-zero page
        while True:
            _send_pages(sock, machine.memory, pending, sent, status)
            status.rounds += 1
            pending = dirty_pages(machine.memory)
            if len(pending) <= SMALL_ROUND or status.rounds >= MAX_ROUNDS:
                break
        paused_at = time.perf_counter()
        was_running = pause()
        pending = sorted(set(pending) | set(dirty_pages(machine.memory)))
        _send_pages(sock, machine.memory, pending, sent, status)
        _send_pages(sock, machine.memory, _all_pages(machine.memory, sent, changed_only=True), sent, status)
        status.bytes += _send(sock, b"STAT", json.dumps(encode(capture_state(machine)), sort_keys=True).encode())
        status.bytes += _send(sock, b"DONE")
        sock.settimeout(60)
        tag, payload = _recv(sock)
        if tag != b"OKAY":
            raise SnapshotError(f"the destination refused: {payload.decode('utf-8', 'replace')}")
        status.downtime_ms = (time.perf_counter() - paused_at) * 1000
        status.total_ms = (time.perf_counter() - started) * 1000
        status.status = "completed"
    except (OSError, SnapshotError, ValueError) as exc:
        status.status = "failed"
        status.error = str(exc) if not isinstance(exc, OSError) or not exc.strerror else exc.strerror
        if was_running:
            resume()
    finally:
        if logging:
            stop_logging(machine.memory)
        if sock is not None:
            sock.close()
    return status


# -- the destination ---------------------------------------------------------------------------------------------
class Incoming:
    """The destination's side: listen at ``address``, take one source, build from its description, load.

    ``description()`` (after :meth:`accept`) is the source's machine
    description; :meth:`receive_into` writes the pages and loads the state
    into the machine built from it, then answers OKAY.  Close it when done.
    """

    def __init__(self, address: str) -> None:
        family, where = parse_address(address)
        self.address = address
        self._unix_path = where if family == socket.AF_UNIX else None
        self._listener = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        self._conn = None
        try:
            if family == socket.AF_INET:
                self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind(where)
            self._listener.listen(1)
        except OSError:
            self.close()
            raise
        self.description: dict | None = None

    @property
    def port(self) -> int | None:
        """The TCP port listened on (for ``tcp:...:0``)."""
        return self._listener.getsockname()[1] if self._unix_path is None else None

    def accept(self, timeout: float | None = None) -> dict:
        """Wait for the source and read its machine description (SnapshotError if the stream is not one)."""
        self._listener.settimeout(timeout)
        try:
            self._conn, _ = self._listener.accept()
        except socket.timeout:
            raise SnapshotError(f"migration: no source connected to {self.address}") from None
        self._conn.settimeout(None)
        tag, payload = _recv(self._conn)
        if tag != b"MACH":
            raise SnapshotError("migration: the stream does not start with a machine description")
        try:
            self.description = json.loads(payload)
        except ValueError:
            raise SnapshotError("migration: the machine description is not valid JSON") from None
        return self.description

    def snapshot(self) -> Snapshot:
        """The description as a Snapshot (for ``check_expected`` and ``machine_shape``)."""
        return Snapshot(self.description, {}, [], f"migration from {self.address}")

    def shape(self) -> dict:
        return machine_shape(self.snapshot())

    def receive_into(self, machine) -> None:
        """Pages, then the state, into the (new, not yet run) machine; answer OKAY.  SnapshotError if it fails."""
        check_expected(self.snapshot(), {key: machine.shape[key] for key in machine.shape})
        conn = self._conn
        while True:
            tag, payload = _recv(conn)
            if tag == b"PAGE":
                gpa, = _GPA.unpack_from(payload)
                data = payload[_GPA.size:]
                if len(data) % PAGE_SIZE or not machine.memory.is_mapped(gpa, max(len(data), 1)):
                    raise SnapshotError(f"migration: pages at {gpa:#x}+{len(data):#x} are not this machine's RAM")
                machine.memory.write(gpa, data)
            elif tag == b"STAT":
                try:
                    state = decode(json.loads(payload))
                except ValueError:
                    raise SnapshotError("migration: the state is not valid JSON") from None
                apply_state(machine, state, f"migration from {self.address}")
            elif tag == b"DONE":
                break
            else:
                raise SnapshotError(f"migration: unexpected message {tag!r}")
        _send(conn, b"OKAY")

    def close(self) -> None:
        for sock in (self._conn, self._listener):
            if sock is not None:
                sock.close()
        self._conn = self._listener = None
        if self._unix_path is not None:
            try:
                os.unlink(self._unix_path)
            except OSError:
                pass
            self._unix_path = None

