"""The GDB stub's server: a listening socket and the thread that serves one client at a time.

QEMU's options, QEMU's spelling: ``-gdb tcp::1234`` (``-s`` is that),
``-gdb tcp:HOST:PORT``, ``-gdb unix:/path``; ``-S`` starts the guest
stopped until a debugger says otherwise (:meth:`GdbServer.wait_for_client`).
Unlike QEMU, ``tcp::PORT`` listens on the loopback interface only: a GDB
stub lets whoever connects read and write all of the guest.  Name a host
(``tcp:0.0.0.0:1234``) to listen elsewhere.

The server owns its socket and its thread.  The thread waits for a
client, runs a :class:`~pykvm.state.gdb_session.Session` until the client
detaches, kills or disconnects, and waits for the next; a second client
waits in the listen queue meanwhile.  Nothing a client sends can raise out
of the thread.  ``close()`` wakes it through a socket pair, shuts the
client's socket down (the session then detaches from the target, as when
GDB goes away) and joins it.
"""

from __future__ import annotations

import os
import select
import socket
import stat
import threading
from dataclasses import dataclass

from pykvm.log import get_logger
from pykvm.ratelimit import GuestLog
from pykvm.state.gdb_protocol import PacketChannel
from pykvm.state.gdb_session import Session
from pykvm.state.gdb_target import GdbTarget
from pykvm.stop_signals import block_stop_signals

logger = get_logger(__name__)

DEFAULT_PORT = 1234      # QEMU's -s
SEND_TIMEOUT = 10.0      # a client that stops reading is dropped after this many seconds
ACCEPT_RETRY_MS = 100    # the pause after a failed accept()


@dataclass(frozen=True)
class GdbAddress:
    """Where the stub listens: a TCP host and port, or a unix socket path."""

    family: str          # "tcp" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    @classmethod
    def parse(cls, spec: str) -> GdbAddress:
        """``tcp::PORT``, ``tcp:HOST:PORT``, ``tcp:[V6]:PORT`` or ``unix:PATH``; ValueError otherwise."""
        family, colon, rest = spec.partition(":")
        if family == "unix" and rest:
            return cls("unix", path=rest)
        if family != "tcp" or not colon:
            raise ValueError(f"GDB address {spec!r}: expected tcp::PORT, tcp:HOST:PORT or unix:PATH")
        host, colon, port = rest.rpartition(":")
        if not colon or not port.isdigit() or not 0 <= int(port) <= 0xFFFF:
            raise ValueError(f"GDB address {spec!r}: the port must be a number from 0 to 65535")
        host = host.removeprefix("[").removesuffix("]") or "127.0.0.1"
        return cls("tcp", host=host, port=int(port))

    def __str__(self) -> str:
        if self.family == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


class GdbServer:
    """A GDB Remote Serial Protocol server for one target."""

    def __init__(self, target: GdbTarget, address: str | GdbAddress = f"tcp::{DEFAULT_PORT}") -> None:
        self.target = target
        self.address = address if isinstance(address, GdbAddress) else GdbAddress.parse(address)
        self.log = GuestLog("pykvm.state.gdb")
        self._listener: socket.socket | None = None
        self._wake_reader, self._wake_writer = socket.socketpair()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._client: socket.socket | None = None
        self._closing = False
        self._attached = threading.Event()
        self._unix_path: str | None = None

    # --- the owner's side -------------------------------------------------------------

    def start(self) -> None:
        """Listen (so ``bound_address`` is known once this returns) and start serving."""
        if self._thread is not None:
            raise RuntimeError("the GDB server is already started")
        self._listener = self._listen()
        self._thread = threading.Thread(target=self._serve, name=f"pykvm-gdb {self.address}", daemon=True)
        self._thread.start()

    @property
    def bound_address(self) -> GdbAddress:
        """The address actually listened on (``tcp::0`` picks a free port)."""
        if self._listener is None:
            return self.address
        if self.address.family == "unix":
            return self.address
        host, port = self._listener.getsockname()[:2]
        return GdbAddress("tcp", host=host, port=port)

    @property
    def connected(self) -> bool:
        """Whether a debugger is connected now."""
        with self._lock:
            return self._client is not None

    def wait_for_client(self, timeout: float | None = None) -> bool:
        """Block until a debugger has attached (for ``-S``); False if ``timeout`` seconds passed first.

        Once a client has attached it returns True at once, even after that client left.
        """
        return self._attached.wait(timeout)

    def close(self, timeout: float = 5.0) -> None:
        """Stop serving: end any session (the target is detached), join the thread, close the sockets."""
        with self._lock:
            self._closing = True
            client = self._client
        if client is not None:
            _shutdown(client)
        try:
            self._wake_writer.send(b"x")
        except OSError:
            pass
        if self._thread is not None and self._thread is not threading.current_thread():
            # (from the thread itself, e.g. a target's kill() that shuts the machine down,
            # the sockets' closing ends it)
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("the GDB server thread did not end within %.1f s", timeout)
        for sock in (self._listener, self._wake_reader, self._wake_writer):
            if sock is not None:
                sock.close()
        self._listener = None
        if self._unix_path is not None:
            _unlink_socket(self._unix_path)
            self._unix_path = None

    def __enter__(self) -> GdbServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    # --- the server's thread ------------------------------------------------------------

    def _listen(self) -> socket.socket:
        if self.address.family == "unix":
            _unlink_socket(self.address.path)  # a stale socket from an earlier run, never another file
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                listener.bind(self.address.path)
            except OSError:
                listener.close()
                raise
            self._unix_path = self.address.path
        else:
            family = socket.AF_INET6 if ":" in self.address.host else socket.AF_INET
            listener = socket.socket(family, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                listener.bind((self.address.host, self.address.port))
            except OSError:
                listener.close()
                raise
        listener.listen(1)
        return listener

    def _serve(self) -> None:
        block_stop_signals()  # Ctrl-C is for the vCPU thread
        try:
            while True:
                client = self._accept()
                if client is None:
                    return
                try:
                    self._run_session(client)
                finally:
                    with self._lock:
                        self._client = None
                    client.close()
        except Exception:  # never let anything escape the thread
            logger.exception("the GDB server thread failed")

    def _accept(self) -> socket.socket | None:
        """The next client, or None when close() was called."""
        with self._lock:
            if self._closing:
                return None
        poll = select.poll()  # not select(): it fails for descriptors past 1023
        poll.register(self._listener, select.POLLIN)
        poll.register(self._wake_reader, select.POLLIN)
        while True:
            ready = {fd for fd, _ in poll.poll()}
            if self._wake_reader.fileno() in ready:
                return None
            try:
                client, peer = self._listener.accept()
            except OSError as error:
                self.log.warning(("accept", error.errno), "accepting a GDB client failed: %s", error)
                if _readable(self._wake_reader, ACCEPT_RETRY_MS):
                    return None
                continue  # after a pause: a lasting error (EMFILE) must not make this spin
            with self._lock:
                if self._closing:
                    client.close()
                    return None
                self._client = client
            logger.debug("GDB client connected from %s", peer or self.address)
            return client

    def _run_session(self, client: socket.socket) -> None:
        client.settimeout(SEND_TIMEOUT)
        if client.family in (socket.AF_INET, socket.AF_INET6):
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small packets, many round trips
        channel = PacketChannel(client, on_problem=self._protocol_problem)
        Session(self.target, channel, log=self.log, on_attached=self._attached.set).run()
        logger.debug("GDB client disconnected")

    def _protocol_problem(self, problem: str) -> None:
        self.log.warning(("packet", problem.split()[0]), "GDB stub: dropped a packet: %s", problem)


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _readable(sock: socket.socket, milliseconds: int) -> bool:
    """Wait up to ``milliseconds`` for ``sock`` to become readable."""
    poll = select.poll()
    poll.register(sock, select.POLLIN)
    return bool(poll.poll(milliseconds))


def _unlink_socket(path: str) -> None:
    """Remove ``path`` if it is a unix socket; leave anything else alone."""
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
    except FileNotFoundError:
        pass
