"""The layer map of docs/architecture.md, enforced: every module imports only layers beneath it.

Imports are read from the source (module level and inside functions alike,
``TYPE_CHECKING`` blocks excepted: they are not executed), so a lazy import
that climbs the stack fails here just as a top-level one does.
"""

from __future__ import annotations

import ast
import pathlib

import pykvm

ROOT = pathlib.Path(pykvm.__file__).resolve().parent

# Bottom to top.  A module may import its own layer's modules only inside its own package.
LAYERS: list[tuple[str, ...]] = [
    ("pykvm._lazy", "pykvm.log", "pykvm.timeline", "pykvm.values"),  # start-up plumbing: lazy names, loggers,
                                                                       # phase marks, value classes
    ("pykvm.errors", "pykvm.host", "pykvm.stop_signals", "pykvm.ratelimit", "pykvm.platform.layout"),
    ("pykvm._native", "pykvm.fdowner"),  # the compiled extension (csrc/ through cffi)
    ("pykvm._native_loader",),
    ("pykvm.exits", "pykvm.stats",      # the raw layer, bottom up: exit values and the stats fd,
     "pykvm.memory_backing"),           # how guest RAM is mapped (hugetlbfs, THP, KSM, prealloc),
    ("pykvm.vcpu",),                    # then the vCPU fd,
    ("pykvm.vm", "pykvm.memory"),       # the VM fd and its memory slots,
    ("pykvm.system",),                  # the /dev/kvm fd

    ("pykvm.x86",),
    ("pykvm.loaders", "pykvm.block"),
    ("pykvm.devices",),
    ("pykvm.virtio",),
    ("pykvm.guests",),
    ("pykvm.state.snapshot_format", "pykvm.state.snapshot", "pykvm.state.dirty", "pykvm.state.migration"),  # a machine's state: below the platform, which
                                                              # offers Machine.save/restore through them
    ("pykvm.platform",),
    ("pykvm.inspect",),
    ("pykvm.state",),
    ("pykvm.bench", "pykvm.reliability"),
    ("pykvm.cli",),
    ("pykvm.__main__",),
]
BUILD_TIME = {"pykvm._build"}  # the cffi builder: runs before the package exists
TOP = "pykvm"  # the package's __init__: lazy names only (importlib), above everything


def module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(name: str) -> tuple[int, str]:
    """(rank, the prefix that matched): the most specific prefix wins (pykvm.platform.layout is low)."""
    if name == TOP:
        return len(LAYERS), TOP
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if name == prefix or name.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[1]):
                    best = (rank, prefix)
    if best is None:
        raise AssertionError(f"{name} is in no layer of the map: add it to LAYERS and docs/architecture.md")
    return best


def imports(tree: ast.AST, name: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, module) of every pykvm import, TYPE_CHECKING blocks left out."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    found = []
    base_package = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("pykvm")]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = base_package.split(".")
                module = ".".join(parts[: len(parts) - node.level + 1] + ([module] if module else []))
            if module.startswith("pykvm"):
                found += [(node.lineno, f"{module}.{a.name}") for a in node.names]
    return found


def resolve(target: str) -> str:
    """The module an import names (``pykvm.x86.bits`` for ``from pykvm.x86 import bits``)."""
    if target.startswith("pykvm._native.") or target == "pykvm._native":
        return "pykvm._native"  # the compiled extension: no .py file
    while target and not ((ROOT.parent / target.replace(".", "/")).with_suffix(".py").exists()
                          or (ROOT.parent / target.replace(".", "/") / "__init__.py").exists()):
        target = target.rpartition(".")[0]
    return target


def test_every_module_imports_only_layers_beneath_it():
    problems = []
    for path in sorted(ROOT.rglob("*.py")):
        name = module_name(path)
        if name in BUILD_TIME:
            continue
        rank, prefix = layer_of(name)
        tree = ast.parse(path.read_text())
        for line, target in imports(tree, name, path.name == "__init__.py"):
            target = resolve(target)
            if not target or target == name or target in BUILD_TIME or target == TOP:
                continue  # `import pykvm` for __version__/__file__ loads nothing (its names are lazy)
            their_rank, their_prefix = layer_of(target)
            same_package = target.split(".")[:2] == name.split(".")[:2]
            if their_rank > rank or (their_rank == rank and their_prefix != prefix and not same_package):
                problems.append(f"{path.relative_to(ROOT.parent)}:{line}: {name} (layer {rank}) imports "
                                f"{target} (layer {their_rank})")
    assert not problems, "imports that climb the layer map:\n" + "\n".join(problems)


def test_the_map_covers_every_module():
    for path in ROOT.rglob("*.py"):
        name = module_name(path)
        if name not in BUILD_TIME:
            layer_of(name)
