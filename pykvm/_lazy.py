"""Package names imported on first use (PEP 562), so that ``import pykvm.x`` costs only what is used.

A package lists its public names and the module each comes from; the
module is imported when a name is first read (``from pykvm.x86 import
setup_mode``, ``pykvm.x86.walk``) and the value is kept in the package.
``pykvm run`` imports only the modules a run needs: start-up time is the
interpreter plus what the guest uses.
"""

from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, exports: dict[str, str]):
    """``__getattr__`` and ``__dir__`` for ``package``, serving ``exports`` (name -> module)."""

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)  # the next read is a plain attribute
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__
