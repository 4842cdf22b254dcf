"""What every boot protocol hands its kernel: C strings, a memory map, one block of boot data.

Multiboot's information structure, Linux's command line and PVH's
``hvm_start_info`` are all structures that point at each other by physical
address.  ``BootBlock`` lays such a family out in one contiguous block: the
pieces are added first (so the block's size is known), the block is placed
in free guest RAM, and only then are the pointers filled in as ``base +
offset``.
"""

from __future__ import annotations

from collections.abc import Sequence

from pykvm.errors import LoaderError
from pykvm.loaders.plan import Segment
from pykvm.loaders.source import ImageSource

#: A module (``-initrd`` entry): a source, or a source with its string (Multiboot's
#: ``"file arg1 arg2"``; without one, the module's string is the source's name).
Module = ImageSource | tuple[ImageSource, str]


def module_pairs(modules: Sequence[Module]) -> list[tuple[ImageSource, str]]:
    """Every module as ``(source, string)``."""
    pairs = []
    for i, module in enumerate(modules, 1):
        if isinstance(module, ImageSource):
            pairs.append((module, module.name))
        elif (isinstance(module, tuple) and len(module) == 2 and isinstance(module[0], ImageSource)
              and isinstance(module[1], str)):
            pairs.append(module)
        else:
            raise TypeError(f"module {i} must be an ImageSource or (ImageSource, str), not {module!r}")
    return pairs


def split_initrd(option: str) -> list[tuple[str, str]]:
    """QEMU's ``-initrd`` for Multiboot: ``"a.mod arg1 arg2,b.mod"`` -> ``[(path, string), ...]``.

    Entries are separated by commas (``,,`` is a comma in a name); an
    entry's string is the whole entry and its file is the part before the
    first space, as hw/i386/multiboot.c reads them.  Open each path with
    ``ImageSource.open`` and pass ``(source, string)`` pairs as ``modules``.
    """
    entries, current, i = [], [], 0
    while i < len(option):
        if option[i] == ",":
            if option.startswith(",,", i):
                current.append(",")
                i += 2
                continue
            entries.append("".join(current))
            current = []
        else:
            current.append(option[i])
        i += 1
    entries.append("".join(current))
    if not all(entry.split(" ", 1)[0] for entry in entries):
        raise LoaderError(f"-initrd {option!r}: an entry without a file name")
    return [(entry.split(" ", 1)[0], entry) for entry in entries]


def c_string(text: str, what: str) -> bytes:
    """``text`` as UTF-8 with its terminating NUL; LoaderError if it holds a NUL itself."""
    if "\0" in text:
        raise LoaderError(f"{what} contains a NUL character")
    return text.encode("utf-8", "surrogateescape") + b"\0"


class BootBlock:
    """Pieces of boot data at fixed offsets in one block, placed as a unit."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._data = bytearray()

    @property
    def size(self) -> int:
        return len(self._data)

    def add(self, data: bytes, align: int = 8) -> int:
        """Append ``data`` at the next ``align``-ed offset; return that offset."""
        offset = (len(self._data) + align - 1) // align * align
        self._data.extend(bytes(offset - len(self._data)))
        self._data.extend(data)
        return offset

    def reserve(self, size: int, align: int = 8) -> int:
        """Room for a structure filled in later with ``put`` (once the block's address is known)."""
        return self.add(bytes(size), align)

    def put(self, offset: int, data: bytes) -> None:
        self._data[offset:offset + len(data)] = data

    def segment(self, base: int) -> Segment:
        return Segment(base, len(self._data), data=bytes(self._data), what=self.what)
