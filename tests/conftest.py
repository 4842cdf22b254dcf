"""Shared fixtures.  Tests marked ``kvm`` need a usable /dev/kvm.

Where /dev/kvm is absent or not accessible they are skipped with the reason;
``.ci/run`` turns any such skip into a failure on a host that has /dev/kvm.
"""

from __future__ import annotations

import os

import pytest

KVM_DEVICE = "/dev/kvm"


def kvm_unavailable_reason() -> str | None:
    if not os.path.exists(KVM_DEVICE):
        return f"{KVM_DEVICE} does not exist"
    if not os.access(KVM_DEVICE, os.R_OK | os.W_OK):
        return f"{KVM_DEVICE} is not readable and writable by this user"
    try:
        import pykvm._native  # noqa: F401
    except ImportError:
        return "pykvm._native is not built (run make)"
    return None


def pytest_collection_modifyitems(config, items):
    reason = kvm_unavailable_reason()
    if reason is None:
        return
    if os.environ.get("PYKVM_REQUIRE_KVM") and any("kvm" in item.keywords for item in items):
        # .ci/run sets this where /dev/kvm exists: a KVM test must not be skipped there.
        raise pytest.UsageError(f"PYKVM_REQUIRE_KVM is set but KVM tests cannot run: {reason}")
    skip = pytest.mark.skip(reason=f"needs KVM: {reason}")
    for item in items:
        if "kvm" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def kvm():
    from pykvm.system import Kvm

    with Kvm() as k:
        yield k


@pytest.fixture
def machine():
    from pykvm.platform.machine import Machine

    with Machine(memory="16M") as m:
        yield m


@pytest.fixture
def memory():
    """256 KiB of guest RAM at guest-physical 0, without a VM (virtio device tests)."""
    from pykvm.memory import GuestMemory
    from virtio_helpers import MEMORY_SIZE

    mem = GuestMemory()
    mem.add_region(0, MEMORY_SIZE)
    yield mem
    mem.close()


def _open_fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def open_fd_count():
    """A callable: how many file descriptors this process has open now."""
    return _open_fd_count
