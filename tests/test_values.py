"""pykvm.values.Value: what a dataclass gave the records on a run's path, without dataclasses."""

from __future__ import annotations

import pickle

import pytest

from pykvm.values import Value


class Point(Value):
    __slots__ = ("x", "y")

    def __init__(self, x: int, y: int = 0) -> None:
        self.x = x
        self.y = y


class Point3(Point):
    __slots__ = ("z", "_cache")

    def __init__(self, x: int, y: int = 0, z: int = 0) -> None:
        super().__init__(x, y)
        self.z = z
        self._cache = None  # a private slot: not a field


def test_fields_repr_eq_hash():
    assert Point3._fields == ("x", "y", "z")
    assert repr(Point3(1, 2, 3)) == "Point3(x=1, y=2, z=3)"
    assert Point(1, 2) == Point(1, 2) and hash(Point(1, 2)) == hash(Point(1, 2))
    assert Point(1, 2) != Point(1, 3)
    assert Point(1, 2) != Point3(1, 2)  # another class, even with the same first fields
    assert Point3(1).fields() == {"x": 1, "y": 0, "z": 0}


def test_replace_and_pickle():
    p = Point3(1, 2, 3)
    assert p.replace(z=9) == Point3(1, 2, 9) and p.z == 3
    assert pickle.loads(pickle.dumps(p)) == p
    with pytest.raises(TypeError):
        p.replace(w=1)


def test_slots_only():
    with pytest.raises(AttributeError):
        Point(1).w = 2
