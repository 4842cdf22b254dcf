"""One build of the extension, and the C contract declared once (csrc/runloop.h)."""

from __future__ import annotations

import pathlib

import pytest

import pykvm


def test_one_extension_beside_the_package():
    """`make` and `pip install -e .` name the extension differently; the stale one must never be left to win."""
    package = pathlib.Path(pykvm.__file__).resolve().parent
    builds = sorted(p.name for p in package.glob("_native*.so"))
    if not builds:
        pytest.skip("pykvm._native is not built beside the sources (an installed wheel keeps it elsewhere)")
    assert len(builds) == 1, f"stale extension builds side by side: {builds}"
    from pykvm import _native

    assert pathlib.Path(_native.__file__).name == builds[0]


def test_remove_stale_builds_keeps_only_the_new_one(tmp_path):
    from pykvm._build import remove_stale_builds

    for name in ("_native.abi3.so", "_native.cpython-311-x86_64-linux-gnu.so", "other.so"):
        (tmp_path / name).write_bytes(b"")
    remove_stale_builds(tmp_path / "_native.cpython-311-x86_64-linux-gnu.so")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["_native.cpython-311-x86_64-linux-gnu.so", "other.so"]


def test_the_cdef_is_derived_from_the_header():
    from pykvm._build import CSRC, runloop_cdef

    header = (CSRC / "runloop.h").read_text()
    cdef = runloop_cdef(header)
    assert "#define PYKVM_MAX_RANGES ..." in cdef  # values come from the compiler
    assert "struct pykvm_range ranges[...];" in cdef  # so do array sizes
    assert "#include" not in cdef and "PYKVM_RUNLOOP_H" not in cdef
    for line in cdef.splitlines():
        assert not (line.startswith("#define") and not line.endswith("...")), line


def test_the_header_without_markers_is_refused():
    from pykvm._build import runloop_cdef

    with pytest.raises(RuntimeError, match="markers"):
        runloop_cdef("struct x { int a; };")
