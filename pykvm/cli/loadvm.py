"""``-loadvm FILE`` and ``-incoming file:FILE``: a run that starts from a snapshot instead of a boot.

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


def snapshot_option(loadvm: str | None, incoming: str | None) -> str:
    """The snapshot file of ``-loadvm FILE`` or ``-incoming file:FILE`` (UsageError for anything else)."""
    if loadvm is not None and incoming is not None:
        raise UsageError("-loadvm and -incoming: give one of them")
    if loadvm is not None:
        if not loadvm:
            raise UsageError("-loadvm: give a snapshot FILE")
        return loadvm
    scheme, _, rest = incoming.partition(":")
    if scheme == "file" and rest:
        return rest
    if scheme in ("tcp", "unix", "exec", "fd", "defer"):
        raise UsageError(f"-incoming {incoming}: live migration is not implemented yet; use -incoming file:FILE")
    raise UsageError(f"-incoming {incoming}: use file:FILE")


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
    """``(snapshot, shape)``: the file checked against the command line (UsageError, one line, if it fails)."""
    from pykvm.state.snapshot import check_expected, machine_shape
    from pykvm.state.snapshot_format import SnapshotError, read_snapshot

    try:
        snapshot = read_snapshot(config.loadvm)
        shape = machine_shape(snapshot)
        check_expected(snapshot, expected_shape(config))
    except SnapshotError as exc:
        raise UsageError(f"-loadvm: {exc}") from None
    return snapshot, shape


def load(machine, snapshot) -> None:
    """Load the state into the machine the session built (UsageError if the machine is not the snapshot's)."""
    from pykvm.state.snapshot import load_into
    from pykvm.state.snapshot_format import SnapshotError

    try:
        load_into(machine, snapshot, fresh=True)  # the session's machine has run nothing yet
    except SnapshotError as exc:
        raise UsageError(f"-loadvm: {exc}") from None
