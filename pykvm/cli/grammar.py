"""QEMU's command-line grammar: options by their whole name, values, and ``key=val,...`` sub-options.

QEMU's rules, which argparse does not follow:

* an option is ``-name`` or ``--name`` (the same option), matched by its
  whole name: no prefix matching (``-s`` is the GDB shorthand, not
  ``-serial``; ``-machine`` is not ``-m achine``);
* an option that takes a value takes the next word, whatever it looks like
  (``-m -64M`` hands ``-64M`` to ``-m``, which then refuses it); pykvm's own
  double-dash options also take ``--name=value``;
* a value may be a list of sub-options, ``-smp 4,cores=2``: the first item
  may omit its key (the option's implied key, ``cpus`` here), and ``,,`` is a
  literal comma (QEMU's ``qemu_opts_parse``);
* an unknown option is an error naming it.

:func:`parse` returns the options in order, so a repeated option
(``-device``, ``-initrd``... ) keeps every occurrence and the last ``-m``
wins where that is QEMU's rule.  Building the table costs nothing: it is a
dict of :class:`Option` values (argparse spent ~30 ms constructing its
parser on every start).
"""

from __future__ import annotations

from pykvm.errors import UsageError
from pykvm.values import Value

__all__ = ["Option", "parse", "split_suboptions", "Parsed"]


class Option(Value):
    """One option: its names, whether it takes a value, how ``--help`` describes it.

    ``kind`` is ``qemu`` (QEMU's meaning), ``pykvm`` (pykvm's own), or
    ``ignored`` (accepted for QEMU command lines, with no effect; ``--help``
    lists these as such).  ``dest`` is the name the parsed value is kept
    under (the first name without dashes, by default).
    """

    __slots__ = ("names", "value", "help", "kind", "dest", "repeat")

    def __init__(self, names: tuple[str, ...], value: str | None = None, help: str = "", kind: str = "qemu",
                 dest: str = "", repeat: bool = False) -> None:
        self.names = names
        self.value = value  # metavar when the option takes a value
        self.help = help
        self.kind = kind
        self.dest = dest
        self.repeat = repeat  # every occurrence is kept (else the last wins)

    @property
    def key(self) -> str:
        return self.dest or self.names[0].lstrip("-").replace("-", "_")


class Parsed:
    """Parsed options: ``get(key)`` (the last value), ``all(key)`` (every value), ``flag(key)``, ``rest``."""

    def __init__(self) -> None:
        self.values: dict[str, list] = {}
        self.order: list[tuple[str, object]] = []
        self.rest: list[str] = []

    def add(self, key: str, value) -> None:
        self.values.setdefault(key, []).append(value)
        self.order.append((key, value))

    def get(self, key: str, default=None):
        found = self.values.get(key)
        return found[-1] if found else default

    def all(self, key: str) -> list:
        return list(self.values.get(key, ()))

    def flag(self, key: str) -> bool:
        return key in self.values

    def __contains__(self, key: str) -> bool:
        return key in self.values


def index(options: list[Option]) -> dict[str, Option]:
    """Every spelling -> its option: ``-name``, ``--name`` (and each alias)."""
    table: dict[str, Option] = {}
    for option in options:
        for name in option.names:
            bare = name.lstrip("-")
            for spelling in (f"-{bare}", f"--{bare}"):
                if spelling in table and table[spelling] is not option:
                    raise ValueError(f"option {spelling} defined twice")
                table[spelling] = option
    return table


def parse(argv: list[str], table: dict[str, Option], *, command: str = "", positional: str | None = None) -> Parsed:
    """Parse ``argv`` against ``table``; UsageError (one line) for anything it cannot take.

    ``positional`` names what a bare word is (QEMU's is the disk image: pykvm
    refuses it with a hint); ``--`` ends the options and keeps the rest.
    """
    parsed = Parsed()
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if word == "--":
            parsed.rest = argv[i:]
            break
        if not word.startswith("-") or word == "-":
            raise UsageError(f"unexpected argument {word!r}" + (f": {positional}" if positional else ""))
        name, eq, inline = word.partition("=")
        option = table.get(name) if eq else table.get(word)
        if option is None:
            raise UsageError(f"unknown option {name if eq else word} (see --help)")
        if option.value is None:
            if eq:
                raise UsageError(f"{name} takes no value")
            parsed.add(option.key, True)
            continue
        if eq:
            if not name.startswith("--"):
                raise UsageError(f"{name}=... is not QEMU's spelling: write {name} {inline}")
            value = inline
        else:
            if i >= len(argv):
                raise UsageError(f"{word} needs a value ({option.value})")
            value = argv[i]
            i += 1
        parsed.add(option.key, value)
    return parsed


def split_suboptions(text: str, implied: str | None = None, *, option: str = "") -> list[tuple[str, str]]:
    """``4,cores=2`` -> ``[("cpus", "4"), ("cores", "2")]`` with ``implied="cpus"``; ``,,`` is a comma.

    A bare item after the first is a flag (``key`` -> ``"on"``), as QEMU
    reads ``-device virtconsole,nowait``; ``key=`` keeps an empty value.
    """
    items: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == ",":
            if text[i + 1:i + 2] == ",":
                current.append(",")
                i += 2
                continue
            items.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    items.append("".join(current))
    out: list[tuple[str, str]] = []
    for n, item in enumerate(items):
        key, eq, value = item.partition("=")
        if not eq:
            if n == 0 and implied is not None:
                out.append((implied, item))
                continue
            if not item:
                raise UsageError(f"{option} {text!r}: an empty item")
            out.append((item, "on"))
            continue
        if not key:
            raise UsageError(f"{option} {text!r}: an item without a key ({item!r})")
        out.append((key, value))
    return out
