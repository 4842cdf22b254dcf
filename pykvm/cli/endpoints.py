"""Character devices on the command line: ``-serial``, ``-monitor`` and ``-chardev`` values, opened.

QEMU's spellings, each turned into an :class:`Endpoint`:

==========================  ==================================================================
``stdio``                   the terminal (raw mode; Ctrl-C still stops pykvm, as QEMU's signal=on)
``mon:stdio``               the terminal shared with the monitor: Ctrl-a c switches, Ctrl-a x quits
``null``                    output dropped, no input
``none``                    nothing: the device is not there (``-serial none``: no COM port)
``file:PATH``               output written to PATH, no input
``pty``                     a pseudo-terminal; pykvm says which (``char device redirected to ...``)
``unix:PATH,server``        a unix socket server, one client at a time
``tcp:HOST:PORT,server``    a TCP server (``tcp::PORT`` listens on 127.0.0.1), one client
``chardev:ID``              the ``-chardev ...,id=ID`` of that name
==========================  ==================================================================

Backends are ``pykvm.virtio.backends`` objects (``write``, ``start``,
``close``), the same for a UART and a virtio console.
"""

from __future__ import annotations

from pykvm.errors import UsageError
from pykvm.values import Value


class Endpoint(Value):
    """An opened character device: ``kind`` is ``stdio``, ``mux``, ``backend``, ``null`` or ``none``."""

    __slots__ = ("kind", "backend", "announce")
    __hash__ = None  # mutable, as the dataclass was: not hashable

    def __init__(self, kind: str, backend: object = None, announce: str = "") -> None:
        self.kind = kind
        self.backend = backend
        self.announce = announce  # a line to print (where a pty or socket is)

    def close(self) -> None:
        if self.backend is not None:
            self.backend.close()


def _socket(path: str | None, host: str | None, port: str | None, server: bool, what: str) -> Endpoint:
    from pykvm.virtio.backends import TcpSocketBackend, UnixSocketBackend

    if not server:
        raise UsageError(f"{what}: pykvm listens but does not connect out: add ,server")
    try:
        if path is not None:
            return Endpoint("backend", UnixSocketBackend(path), f"{what}: listening on unix:{path}")
        number = int(port or "", 10)
        if not 0 <= number < 1 << 16:
            raise ValueError
        backend = TcpSocketBackend(host or "127.0.0.1", number)
    except ValueError:
        raise UsageError(f"{what}: {port!r} is not a TCP port") from None
    except OSError as exc:
        raise UsageError(f"{what}: {exc.strerror or exc}") from None
    return Endpoint("backend", backend, f"{what}: listening on tcp:{backend.host}:{backend.port}")


def _flags(items: list[tuple[str, str]], what: str, allowed: tuple[str, ...]) -> dict[str, str]:
    flags = {}
    for key, value in items:
        if key not in allowed:
            raise UsageError(f"{what}: unknown option {key!r}")
        flags[key] = value
    return flags


def open_endpoint(spec: str, chardevs: dict[str, tuple[str, dict[str, str]]], *, what: str,
                  label: str) -> Endpoint:
    """Open what ``spec`` names; UsageError (one line) when it cannot be (backends imported as needed)."""
    if spec == "stdio":
        return Endpoint("stdio")
    if spec == "mon:stdio":
        return Endpoint("mux")
    if spec == "null":
        return Endpoint("null")  # the device is there; what it sends goes nowhere (no backend needed)
    if spec == "none":
        return Endpoint("none")
    if spec == "pty":
        from pykvm.virtio.backends import PtyBackend

        backend = PtyBackend(label)
        return Endpoint("backend", backend, f"char device redirected to {backend.slave_name} (label {label})")
    if spec.startswith("file:") and len(spec) > 5:
        from pykvm.virtio.backends import FileBackend

        try:
            return Endpoint("backend", FileBackend(spec[5:]))
        except OSError as exc:
            raise UsageError(f"{what} {spec}: {exc.strerror}") from None
    if spec.startswith("unix:"):
        path, *rest = spec[5:].split(",")
        flags = _flags([(r, "on") if "=" not in r else tuple(r.split("=", 1)) for r in rest], f"{what} {spec}",
                       ("server", "nowait", "wait"))
        return _socket(path, None, None, "server" in flags, f"{what} {spec}")
    if spec.startswith("tcp:"):
        address, *rest = spec[4:].split(",")
        host, sep, port = address.rpartition(":")
        if not sep:
            raise UsageError(f"{what} {spec}: use tcp:HOST:PORT,server")
        flags = _flags([(r, "on") if "=" not in r else tuple(r.split("=", 1)) for r in rest], f"{what} {spec}",
                       ("server", "nowait", "wait", "nodelay"))
        return _socket(None, host or "127.0.0.1", port, "server" in flags, f"{what} {spec}")
    if spec.startswith("chardev:"):
        ident = spec[8:]
        if ident not in chardevs:
            raise UsageError(f"{what} {spec}: no -chardev with id={ident}")
        return open_chardev(ident, *chardevs[ident], what=what, label=label)
    raise UsageError(f"{what} {spec!r}: use stdio, mon:stdio, null, none, file:PATH, pty, unix:PATH,server, "
                     f"tcp:HOST:PORT,server or chardev:ID")


def open_chardev(ident: str, kind: str, props: dict[str, str], *, what: str, label: str) -> Endpoint:
    """A ``-chardev KIND,id=ID,...`` opened."""
    name = f"-chardev {kind},id={ident}"
    if kind == "stdio":
        return Endpoint("mux" if props.get("mux") == "on" else "stdio")
    if kind == "null":
        return open_endpoint("null", {}, what=name, label=label)
    if kind == "pty":
        return open_endpoint("pty", {}, what=name, label=ident)
    if kind == "file":
        if "path" not in props:
            raise UsageError(f"{name}: needs path=")
        return open_endpoint(f"file:{props['path']}", {}, what=name, label=label)
    if kind == "socket":
        server = props.get("server", "off") in ("on", "yes", "true")
        if "path" in props:
            return _socket(props["path"], None, None, server, name)
        return _socket(None, props.get("host", "127.0.0.1"), props.get("port"), server, name)
    raise UsageError(f"{name}: use stdio, null, file, pty or socket")

