"""The monitor's ``savevm FILE``, ``loadvm FILE`` and ``migrate URI`` (QEMU's names), on ``pykvm.state``.

QEMU keeps its snapshots inside a qcow2 image and names them; pykvm's
monitor writes and reads one snapshot file instead.  The monitor pauses the
guest for either command and resumes it afterwards if it was running, as
QEMU does; an answer is one line (what was written, or why not).
"""

from __future__ import annotations

__all__ = ["STATE_COMMANDS", "info_migrate", "loadvm", "migrate", "savevm", "state_command"]

STATE_COMMANDS = ("savevm", "loadvm", "migrate")


def state_command(monitor, name: str, rest: str) -> str:
    """The monitor's ``savevm``, ``loadvm`` (with the guest paused, resumed after) and ``migrate``."""
    if name == "migrate":
        return migrate(monitor, rest)
    action = savevm if name == "savevm" else loadvm
    return monitor._with_vcpu(lambda: action(monitor.machine, rest))


def info_migrate(monitor) -> str:
    """``info migrate``: the last migration's status and counts."""
    return str(getattr(monitor, "migration", None) or "Migration status: none")


def _path(rest: str, command: str) -> str:
    from pykvm.state.snapshot_format import SnapshotError

    path = rest.strip()
    if not path or len(path.split()) != 1:
        raise SnapshotError(f"{command} FILE: give one file name")
    return path


def savevm(machine, rest: str) -> str:
    """Save the (paused) machine to FILE."""
    from pykvm.state.snapshot import save
    from pykvm.state.snapshot_format import SnapshotError

    try:
        path = _path(rest, "savevm")
        info = save(machine, path)
    except SnapshotError as exc:
        return f"savevm: {exc}"
    except OSError as exc:
        return f"savevm: {rest.strip()}: {exc.strerror or exc}"
    return f"saved {path}: {info['bytes']} bytes in {info['seconds'] * 1000:.1f} ms"


def loadvm(machine, rest: str) -> str:
    """Load FILE into the (paused) machine, which must have the snapshot's shape."""
    from pykvm.state.snapshot import load_into
    from pykvm.state.snapshot_format import SnapshotError, read_snapshot

    try:
        path = _path(rest, "loadvm")
        snapshot = read_snapshot(path)  # checked whole before anything of the machine changes
        load_into(machine, snapshot)
    except SnapshotError as exc:
        return f"loadvm: {exc}"
    rip = machine.vcpu.get_regs().rip
    return f"loaded {path}: rip {rip:#x}"


def migrate(monitor, rest: str) -> str:
    """``migrate tcp:HOST:PORT|unix:PATH``: live migration, the guest running until the last round.

    Blocks until it ends (completed: the guest stays paused here, as QEMU's
    postmigrate; failed: it runs on if it was running); ``info migrate``
    shows the status and counts.
    """
    from pykvm.state.migration import MigrationStatus, migrate as move, parse_address

    address = rest.strip()
    try:
        parse_address(address)
    except ValueError as exc:
        return f"migrate: {exc}"
    if getattr(monitor, "migration", None) is not None and monitor.migration.status == "active":
        return "migrate: a migration is already active"
    monitor.migration = MigrationStatus()
    move(monitor.machine, address, pause=lambda: monitor._pause(reason="paused"), resume=monitor.start,
         status=monitor.migration)
    status = monitor.migration
    if status.status == "failed":
        return f"migrate: failed: {status.error}"
    return f"migration completed: {status.pages} pages in {status.rounds} rounds, downtime {status.downtime_ms:.0f} ms"
