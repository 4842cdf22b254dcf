"""The host side of a console: where the guest's output goes, where its input comes from.

A backend is anything with three methods (:class:`ConsoleBackend`):

* ``write(data)`` -- the guest transmitted ``data``.  Called on the thread
  that processes the transmit queue (a vCPU thread or an ioeventfd thread),
  with the device's lock held, so it must not wait for the backend's own
  reader thread (none here do);
* ``start(deliver)`` -- begin delivering host input: the backend calls
  ``deliver(data)`` from any thread whenever it has input for the guest
  (the console passes its ``enqueue_input``);
* ``close()`` -- stop threads, close files and sockets.  Safe to call twice.

The backends, like QEMU's ``-chardev`` kinds:

=====================  =========================================================
:class:`MemoryBackend`  output kept in a ``bytearray``, input fed by ``feed()`` (tests)
:class:`FileBackend`    output written to a file; no input (QEMU ``file:``)
:class:`FdBackend`      output to one file descriptor, input read from another
:class:`StdioBackend`   an :class:`FdBackend` on the process's stdin and stdout
:class:`NullBackend`    output dropped, no input (QEMU ``null``)
:class:`PtyBackend`     a pseudo-terminal pair; a terminal program opens the slave (QEMU ``pty``)
:class:`UnixSocketBackend`  a listening unix socket; one client at a time (QEMU ``unix:PATH,server``)
:class:`TcpSocketBackend`   a listening TCP socket on loopback; one client (QEMU ``tcp:HOST:PORT,server``)
=====================  =========================================================

The same backends serve a UART's COM port (the command line's ``-serial``)
and a virtio console: they are QEMU's character devices.  A backend's input
may end (end of file on a pipe, a closed pty): it then calls the
``on_eof`` callable it was given, so the device can tell the guest.

Threads: :class:`FdBackend` and :class:`UnixSocketBackend` each run one
daemon thread that waits (``poll``) on their inputs and on a wake-up pipe,
so ``close()`` stops them promptly.  Nothing here puts a terminal in raw
mode; the caller (the CLI) does that if it wants keystrokes unbuffered.
"""

from __future__ import annotations

import errno
import os
import select
import selectors
import socket
import stat
import sys
import threading
import time
from abc import ABC
from collections.abc import Callable

from pykvm.log import get_logger
from pykvm.stop_signals import block_stop_signals

log = get_logger("pykvm.virtio.backends")

Deliver = Callable[[bytes], None]

__all__ = [
    "ConsoleBackend",
    "FdBackend",
    "FileBackend",
    "MemoryBackend",
    "NullBackend",
    "PtyBackend",
    "StdioBackend",
    "TcpSocketBackend",
    "UnixSocketBackend",
]

_READ_SIZE = 4096


class ConsoleBackend(ABC):
    """What a console needs from its host side (structural: any class with these three methods is one)."""

    def start(self, deliver: Deliver) -> None:
        """Begin calling ``deliver(data)`` with host input (from any thread)."""
        ...

    def write(self, data: bytes) -> None:
        """Take bytes the guest transmitted."""
        ...

    def close(self) -> None:
        """Release threads, files and sockets."""
        ...

    @classmethod
    def __subclasshook__(cls, other: type):
        if cls is not ConsoleBackend:
            return NotImplemented
        return all(callable(getattr(other, name, None)) for name in ("start", "write", "close"))


class MemoryBackend:
    """Output collected in :attr:`output`; input given with :meth:`feed` (for tests)."""

    def __init__(self) -> None:
        self.output = bytearray()
        self._deliver: Deliver | None = None
        self._early = bytearray()  # fed before start()

    def start(self, deliver: Deliver) -> None:
        self._deliver = deliver
        if self._early:
            early, self._early = bytes(self._early), bytearray()
            deliver(early)

    def write(self, data: bytes) -> None:
        self.output += data

    def feed(self, data: bytes) -> None:
        """Send ``data`` to the guest, as if typed."""
        if self._deliver is None:
            self._early += data
        else:
            self._deliver(bytes(data))

    def take_output(self) -> bytes:
        """Return the output so far and clear it."""
        data = bytes(self.output)
        self.output.clear()
        return data

    def close(self) -> None:
        pass


class NullBackend:
    """Output dropped, no input: QEMU's ``null`` character device."""

    def start(self, deliver: Deliver) -> None:
        pass

    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


class FileBackend:
    """Guest output written to the file at ``path`` (truncated, or appended to)."""

    def __init__(self, path: str | os.PathLike[str], *, append: bool = False) -> None:
        self.path = os.fspath(path)
        self._file = open(self.path, "ab" if append else "wb", buffering=0)  # noqa: SIM115

    def start(self, deliver: Deliver) -> None:
        pass  # a file gives no input

    def write(self, data: bytes) -> None:
        _write_all(self._file.fileno(), data)

    def close(self) -> None:
        self._file.close()


class _ThreadedBackend:
    """A backend with one reader thread that ``poll``s its fds and a wake-up pipe."""

    thread_name = "console-backend"

    def __init__(self) -> None:
        self._deliver: Deliver | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._selector = selectors.PollSelector()  # poll, unlike epoll, takes regular files
        self._selector.register(self._wake_r, selectors.EVENT_READ)

    def start(self, deliver: Deliver) -> None:
        if self._thread is not None:
            raise RuntimeError("backend already started")
        self._deliver = deliver
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (a wake-up is pending anyway) or closed

    def _run(self) -> None:
        block_stop_signals()  # Ctrl-C is for the vCPU thread
        while not self._stopping:
            self._before_select()
            for key, events in self._selector.select():
                if key.fd == self._wake_r:
                    _drain(self._wake_r)
                elif not self._stopping:
                    self._ready(key.fileobj, events)

    def _before_select(self) -> None:
        """Hook: adjust the registered events before each wait."""

    def _ready(self, fileobj: object, events: int) -> None:
        raise NotImplementedError

    def _stop_thread(self) -> None:
        self._stopping = True
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _close_pipe(self) -> None:
        self._selector.close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass


class FdBackend(_ThreadedBackend):
    """Output written to ``output_fd``; input read from ``input_fd`` by a thread.

    Either may be None (no output, no input).  Writes block until the fd
    takes all the bytes, as a terminal would make QEMU wait.  At end of
    input the thread stops reading.  ``close_fds`` closes both fds on
    :meth:`close`.
    """

    thread_name = "console-fd"

    def __init__(self, input_fd: int | None, output_fd: int | None, *, close_fds: bool = False,
                 on_eof: Callable[[], None] | None = None) -> None:
        super().__init__()
        self.input_fd = input_fd
        self.output_fd = output_fd
        self.close_fds = close_fds
        self.on_eof = on_eof  # the input ended (end of file, a hang-up): no more input will come
        self.input_ended = False
        self._closed = False
        if input_fd is not None:
            self._selector.register(input_fd, selectors.EVENT_READ)

    def write(self, data: bytes) -> None:
        if self.output_fd is not None and not self._closed:
            _write_all(self.output_fd, data)

    def _ready(self, fileobj: object, events: int) -> None:
        assert self.input_fd is not None and self._deliver is not None
        try:
            data = os.read(self.input_fd, _READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            log.warning("console input fd %d: %s; no more input", self.input_fd, error)
            data = b""
        if not data:
            self._selector.unregister(self.input_fd)  # end of input: the guest sees no more bytes
            self.input_ended = True
            if self.on_eof is not None:
                self.on_eof()
            return
        self._deliver(data)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_thread()
        self._close_pipe()
        if self.close_fds:
            for fd in {self.input_fd, self.output_fd} - {None}:
                os.close(fd)  # type: ignore[arg-type]


class PtyBackend(FdBackend):
    """A pseudo-terminal: the guest's side is the master, a terminal program opens :attr:`slave_name`.

    As QEMU's ``-serial pty`` does, it says where: ``char device redirected
    to /dev/pts/N (label serial0)`` (the caller prints it).  A slave that is
    closed and opened again is fine: input resumes when one is open.
    """

    thread_name = "console-pty"

    def __init__(self, label: str = "serial0") -> None:
        import tty

        master, slave = os.openpty()
        tty.setraw(slave)  # bytes as they are: the guest does its own line discipline
        self.slave_name = os.ttyname(slave)
        self.label = label
        os.close(slave)  # a client opens it by name; meanwhile reads on the master see EIO
        os.set_blocking(master, False)
        super().__init__(master, master, close_fds=True)

    def _ready(self, fileobj: object, events: int) -> None:
        try:
            data = os.read(self.input_fd, _READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as error:
            if error.errno == errno.EIO:  # no slave open right now: wait for one
                time.sleep(0.05)
                return
            raise
        if data and self._deliver is not None:
            self._deliver(data)

    def write(self, data: bytes) -> None:
        try:
            super().write(data)
        except OSError as error:
            if error.errno != errno.EIO:  # with no slave open, output is lost, as on a real line
                raise


class StdioBackend(FdBackend):
    """The process's stdout for output and (unless ``input=False``) stdin for input."""

    def __init__(self, *, input: bool = True) -> None:
        sys.stdout.flush()  # what Python buffered goes out before the guest's bytes
        super().__init__(sys.stdin.fileno() if input else None, sys.stdout.fileno())


class _SocketServerBackend(_ThreadedBackend):
    """A listening socket: one client is the console's other end (see UnixSocketBackend)."""

    thread_name = "console-socket"

    def __init__(self, listener: socket.socket, name: str, *, buffer_limit: int = 1 << 20) -> None:
        super().__init__()
        self.path = name
        self.buffer_limit = buffer_limit
        self.dropped = 0
        self._lock = threading.Lock()  # guards _outbuf
        self._outbuf = bytearray()
        self._client: socket.socket | None = None
        self._closed = False
        self._listener = listener
        self._listener.listen(1)
        self._listener.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ)

    @property
    def connected(self) -> bool:
        """True while a client is connected."""
        return self._client is not None

    def write(self, data: bytes) -> None:
        with self._lock:
            room = self.buffer_limit - len(self._outbuf)
            if len(data) > room:
                self.dropped += len(data) - max(room, 0)
                data = data[: max(room, 0)]
            self._outbuf += data
        if data:
            self._wake()

    def _before_select(self) -> None:
        if self._client is None:
            return
        with self._lock:
            pending = bool(self._outbuf)
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if pending else 0)
        self._selector.modify(self._client, events)

    def _ready(self, fileobj: object, events: int) -> None:
        if fileobj is self._listener:
            self._accept()
            return
        if events & selectors.EVENT_READ:
            self._receive()
        if events & selectors.EVENT_WRITE and self._client is not None:
            self._send()

    def _accept(self) -> None:
        try:
            client, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        if self._client is not None:
            log.info("%s: a console client is already connected; refusing another", self.path)
            client.close()
            return
        client.setblocking(False)
        self._client = client
        self._selector.register(client, selectors.EVENT_READ)

    def _receive(self) -> None:
        assert self._client is not None and self._deliver is not None
        try:
            data = self._client.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop_client()
            return
        self._deliver(data)

    def _send(self) -> None:
        assert self._client is not None
        with self._lock:
            chunk = bytes(self._outbuf[:65536])
        try:
            sent = self._client.send(chunk)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop_client()
            return
        with self._lock:
            del self._outbuf[:sent]

    def _drop_client(self) -> None:
        if self._client is not None:
            self._selector.unregister(self._client)
            self._client.close()
            self._client = None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop_thread()
        self._drop_client()
        self._listener.close()
        self._close_pipe()
        self._remove()

    def _remove(self) -> None:
        """Hook: remove what binding the listener created."""


class UnixSocketBackend(_SocketServerBackend):
    """A unix socket server at ``path``: one client is the console's other end.

    The socket listens from construction, so a client (``socat - UNIX:path``,
    ``nc -U path``) may connect before the guest runs.  While a client is
    connected, further connections are accepted and closed at once.  When the
    client leaves, the next one may connect.

    Output never blocks the guest: it is buffered (up to ``buffer_limit``
    bytes; beyond that it is dropped and counted in :attr:`dropped`) and the
    thread sends it as the client reads.  Output written while no client is
    connected waits in the same buffer, so a late client sees the boot log.
    """

    thread_name = "console-unix"

    def __init__(self, path: str | os.PathLike[str], *, buffer_limit: int = 1 << 20) -> None:
        path = os.fspath(path)
        _remove_stale_socket(path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(path)
        except OSError:
            listener.close()
            raise
        super().__init__(listener, path, buffer_limit=buffer_limit)

    def _remove(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


class TcpSocketBackend(_SocketServerBackend):
    """A TCP server on ``host:port`` (loopback unless told otherwise): the same, over TCP.

    Port 0 picks a free one: :attr:`port` says which.
    """

    thread_name = "console-tcp"

    def __init__(self, host: str, port: int, *, buffer_limit: int = 1 << 20) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((host, port))
        except OSError:
            listener.close()
            raise
        self.host, self.port = host, listener.getsockname()[1]
        super().__init__(listener, f"{host}:{self.port}", buffer_limit=buffer_limit)


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte of ``data`` to ``fd``, waiting if it is non-blocking."""
    view = memoryview(data)
    while view:
        try:
            written = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        except InterruptedError:
            continue
        view = view[written:]


def _drain(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except (BlockingIOError, OSError):
        pass


def _remove_stale_socket(path: str) -> None:
    """Remove a socket left at ``path`` by an earlier run; refuse any other file."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise FileExistsError(errno.EEXIST, "not a socket; refusing to replace it", path)
    os.unlink(path)
