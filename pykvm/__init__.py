"""pykvm: drive Linux's /dev/kvm directly from Python.

The raw layer mirrors the kernel API one ioctl per method:
``Kvm`` (the /dev/kvm system fd) -> ``Vm`` -> ``Vcpu``.  ``Machine`` puts
memory, vCPUs, buses, devices and a loader together and runs a guest.

Names are imported lazily so that the pure-Python parts (devices, x86
helpers, guests) work before the C extension is built.
"""

from __future__ import annotations

from pykvm import timeline

timeline.mark("interpreter")  # the first line of pykvm that runs: the interpreter and site are done

from pykvm._lazy import lazy_exports  # noqa: E402

# pykvm logs through logging, imported at the first line logged (pykvm.log), which also gives the
# "pykvm" logger the NullHandler that keeps Python's last-resort handler from printing to stderr.

__version__ = "0.1.0"

_LAZY = {
    "Kvm": "pykvm.system",
    "Vm": "pykvm.vm",
    "Vcpu": "pykvm.vcpu",
    "GuestMemory": "pykvm.memory",
    "MemoryBacking": "pykvm.memory_backing",
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


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
