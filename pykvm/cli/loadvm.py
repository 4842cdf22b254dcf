"""``-loadvm FILE`` and ``-incoming file:FILE|tcp:HOST:PORT|unix:PATH``: a run that starts from a saved or
migrated state instead of a boot.

``-incoming tcp:...|unix:...`` listens there and waits for one source
(the monitor's ``migrate``, ``pykvm.state.migration``): its machine
description is checked as a file's is, then the pages and the state come
in and the guest runs on here.

The file is read and checked whole -- magic, version, checksum, lengths,
and its machine against what the command line says (``-m``, ``-smp``,
``-M`` when given) -- before anything is opened or created: a bad file is
one line and exit status 2.  The machine is then built in the snapshot's
shape, the command line adds its endpoints and devices as for a boot
(the same options the saved run had, as QEMU asks), and the state is
loaded in place of a kernel (``pykvm.state.snapshot``).
"""

from __future__ import annotations

from pykvm.errors import UsageError

__all__ = ["expected_shape", "load", "read_checked", "snapshot_option"]


def snapshot_option(loadvm: str | None, incoming: str | None) -> tuple[str | None, str | None]:
    """(snapshot file, migration address) of ``-loadvm FILE`` / ``-incoming URI`` (UsageError if neither fits)."""
    if loadvm is not None and incoming is not None:
        raise UsageError("-loadvm and -incoming: give one of them")
    if loadvm is not None:
        if not loadvm:
            raise UsageError("-loadvm: give a snapshot FILE")
        return loadvm, None
    scheme, _, rest = incoming.partition(":")
    if scheme == "file" and rest:
        return rest, None
    if scheme in ("tcp", "unix"):
        from pykvm.state.migration import parse_address

        try:
            parse_address(incoming)
        except ValueError as exc:
            raise UsageError(f"-incoming {exc}") from None
        return None, incoming
    if scheme in ("exec", "fd", "defer"):
        raise UsageError(f"-incoming {incoming}: pykvm takes file:FILE, tcp:HOST:PORT or unix:PATH")
    raise UsageError(f"-incoming {incoming}: use file:FILE, tcp:HOST:PORT or unix:PATH")


def expected_shape(config) -> dict:
    """What the command line fixes of the machine: -m, -smp and -M where they were given."""
    expected = {}
    if config.memory_given:
        expected["memory"] = config.memory
    if config.topology:  # -smp was given (it always records maxcpus)
        expected["cpus"] = config.cpus
    if config.machine is not None:
        expected["platform"] = "pc" if config.machine == "pc" else "basic"
    return expected


def read_checked(config):
    """``(snapshot, shape)``: the file (or the source's description) checked against the command line.

    UsageError, one line, if it fails; for ``-incoming tcp:|unix:`` the
    first value is the :class:`~pykvm.state.migration.Incoming` connection.
    """
    from pykvm.state.snapshot import check_expected, machine_shape
    from pykvm.state.snapshot_format import SnapshotError, read_snapshot

    if config.incoming is not None:
        return _accept(config)
    try:
        snapshot = read_snapshot(config.loadvm)
        shape = machine_shape(snapshot)
        check_expected(snapshot, expected_shape(config))
    except SnapshotError as exc:
        raise UsageError(f"-loadvm: {exc}") from None
    return snapshot, shape


def _accept(config):
    import sys

    from pykvm.state.migration import Incoming
    from pykvm.state.snapshot import check_expected
    from pykvm.state.snapshot_format import SnapshotError

    try:
        incoming = Incoming(config.incoming)
    except OSError as exc:
        raise UsageError(f"-incoming {config.incoming}: {exc.strerror or exc}") from None
    try:
        sys.stderr.write(f"pykvm: waiting for a migration on {config.incoming}\n")
        sys.stderr.flush()
        incoming.accept(timeout=config.timeout)
        shape = incoming.shape()
        check_expected(incoming.snapshot(), expected_shape(config))
    except (SnapshotError, OSError) as exc:
        incoming.close()
        raise UsageError(f"-incoming: {exc}") from None
    return incoming, shape


def load(machine, snapshot) -> None:
    """Load the state into the machine the session built (UsageError if the machine is not the snapshot's)."""
    from pykvm.state.migration import Incoming
    from pykvm.state.snapshot import load_into
    from pykvm.state.snapshot_format import SnapshotError

    if isinstance(snapshot, Incoming):
        try:
            snapshot.receive_into(machine)  # the session's machine has run nothing yet
        except (SnapshotError, OSError) as exc:
            raise UsageError(f"-incoming: {exc}") from None
        finally:
            snapshot.close()
        return
    try:
        load_into(machine, snapshot, fresh=True)  # the session's machine has run nothing yet
    except SnapshotError as exc:
        raise UsageError(f"-loadvm: {exc}") from None
