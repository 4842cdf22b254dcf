"""pykvm: drive Linux's /dev/kvm directly from Python.

The raw layer mirrors the kernel API one ioctl per method:
``Kvm`` (the /dev/kvm system fd) -> ``Vm`` -> ``Vcpu``.  ``Machine`` puts
memory, vCPUs, buses, devices and a loader together and runs a guest.

Names are imported lazily so that the pure-Python parts (devices, x86
helpers, guests) work before the C extension is built.
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

# A library logs; the application decides what reaches the terminal (the CLI
# does, tagged "warning:").  Without a handler of its own, Python's last-resort
# handler would print pykvm's warnings to stderr.
logging.getLogger("pykvm").addHandler(logging.NullHandler())

__version__ = "0.1.0"

_LAZY = {
    "Kvm": "pykvm.system",
    "Vm": "pykvm.vm",
    "Vcpu": "pykvm.vcpu",
    "GuestMemory": "pykvm.memory",
    "Machine": "pykvm.platform.machine",
    "RunResult": "pykvm.platform.results",
    "Tracer": "pykvm.inspect.tracer",
    "Monitor": "pykvm.inspect.monitor",
    "PykvmError": "pykvm.errors",
    "KvmError": "pykvm.errors",
    "GuestError": "pykvm.errors",
    "LoaderError": "pykvm.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pykvm' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
