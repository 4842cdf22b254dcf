"""Import the compiled cffi extension with a clear error when it is missing."""

from __future__ import annotations

try:
    from pykvm._native import ffi, lib
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "pykvm's C extension (pykvm._native) is not built: run `make` in the "
        "source tree or `pip install .`"
    ) from exc

__all__ = ["ffi", "lib"]
