"""The monitor's ``savevm FILE`` and ``loadvm FILE`` (QEMU's names), on ``pykvm.state.snapshot``.

QEMU keeps its snapshots inside a qcow2 image and names them; pykvm's
monitor writes and reads one snapshot file instead.  The monitor pauses the
guest for either command and resumes it afterwards if it was running, as
QEMU does; an answer is one line (what was written, or why not).
"""

from __future__ import annotations

from pykvm.state.snapshot import load_into, save
from pykvm.state.snapshot_format import SnapshotError, read_snapshot

__all__ = ["loadvm", "savevm"]


def _path(rest: str, command: str) -> str:
    path = rest.strip()
    if not path or len(path.split()) != 1:
        raise SnapshotError(f"{command} FILE: give one file name")
    return path


def savevm(machine, rest: str) -> str:
    """Save the (paused) machine to FILE."""
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
    try:
        path = _path(rest, "loadvm")
        snapshot = read_snapshot(path)  # checked whole before anything of the machine changes
        load_into(machine, snapshot)
    except SnapshotError as exc:
        return f"loadvm: {exc}"
    rip = machine.vcpu.get_regs().rip
    return f"loaded {path}: rip {rip:#x}"
