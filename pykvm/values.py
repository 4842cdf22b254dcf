"""Small value classes without ``dataclasses``: fields in ``__slots__``, compared, shown and hashed by them.

``dataclasses`` builds each class by generating and compiling source code
(and imports ``inspect``, ``ast`` and ``re`` to do so): some 10 ms of every
``pykvm run``'s start went there for the twenty-odd records on a run's
path.  A :class:`Value` subclass lists its fields in ``__slots__`` and
writes its ``__init__``; this base gives it what a dataclass would:

* ``repr``: ``Name(field=value, ...)`` in field order;
* ``==`` and ``hash``: same class and equal fields (hashable when the
  fields are);
* :meth:`replace`: a copy with some fields changed (``dataclasses.replace``);
* :meth:`fields`: ``{name: value}`` in order (``dataclasses.asdict``, one
  level deep);
* pickling, by the constructor's arguments (when ``__init__`` takes the
  fields in order, as every pykvm value's does).

Values are read-only by convention: nothing in pykvm changes one after it
is made.
"""

from __future__ import annotations


class Value:
    """Base of a value class: subclasses set ``__slots__`` (the fields, in order) and ``__init__``."""

    __slots__ = ()
    _fields: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        # the fields: the slots of the Value bases, then the class's own (private "_x" slots are not fields)
        own = tuple(n for n in cls.__dict__.get("__slots__", ()) if not n.startswith("_"))
        cls._fields = tuple(dict.fromkeys(cls._fields + own))

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        """The fields, in order."""
        return cls._fields

    def fields(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self._fields}

    def replace(self, **changes: object):
        """A copy with ``changes`` applied (the constructor is called with every field by name)."""
        return type(self)(**{**self.fields(), **changes})

    def __repr__(self) -> str:
        inner = ", ".join(f"{name}={value!r}" for name, value in self.fields().items())
        return f"{type(self).__name__}({inner})"

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        return all(getattr(self, n) == getattr(other, n) for n in self._fields)

    def __hash__(self) -> int:
        return hash((type(self), *(getattr(self, n) for n in self._fields)))

    def __reduce__(self):
        return type(self), tuple(getattr(self, n) for n in self._fields)
