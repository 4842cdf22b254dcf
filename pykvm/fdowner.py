"""The owner of one file descriptor: close once, in ``close()`` or a ``with`` block.

Kvm, Vm, Vcpu and StatsFd each own the fd the kernel gave them (open(2),
KVM_CREATE_VM, KVM_CREATE_VCPU, KVM_GET_STATS_FD).  Using a closed object
raises ValueError rather than issuing an ioctl on a number the process may
have reused for something else.
"""

from __future__ import annotations

import os


class FdOwner:
    """Base class: ``self._fd`` is the owned descriptor, -1 once closed."""

    _fd: int = -1

    @property
    def fd(self) -> int:
        if self._fd < 0:
            raise ValueError(f"{type(self).__name__} is closed")
        return self._fd

    @property
    def closed(self) -> bool:
        return self._fd < 0

    def _release(self) -> None:
        """Free resources other than the fd (subclasses); called before the fd closes."""

    def close(self) -> None:
        """Release and close.  Safe to call more than once."""
        self._release()
        if self._fd >= 0:
            fd, self._fd = self._fd, -1
            os.close(fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} fd={self._fd}>"
