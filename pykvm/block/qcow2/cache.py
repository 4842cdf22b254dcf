"""A least-recently-used table cache (QEMU's qcow2-cache.c, without dirty entries for L2 tables).

pykvm writes metadata through to the file as it changes it, so an L2 table
in the cache is never newer than the file and evicting it costs nothing.
Refcount blocks pass an ``on_evict`` callback that writes the entries they
changed since their last write (see refcount.py).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Hashable


class LruCache:
    """At most ``capacity`` tables, the least recently used evicted first."""

    def __init__(self, capacity: int, on_evict: Callable[[Hashable, object], None] | None = None) -> None:
        self.capacity = max(1, capacity)
        self.on_evict = on_evict
        self._tables: OrderedDict[Hashable, object] = OrderedDict()
        #: Lookups answered from memory / that had to read the file.
        self.hits = 0
        self.misses = 0

    def get(self, key: Hashable):
        """The cached table, or None (counted as a miss: the caller loads and :meth:`put`\\ s it)."""
        table = self._tables.get(key)
        if table is None:
            self.misses += 1
            return None
        self.hits += 1
        self._tables.move_to_end(key)
        return table

    def put(self, key: Hashable, table: object) -> None:
        self._tables[key] = table
        self._tables.move_to_end(key)
        while len(self._tables) > self.capacity:
            old_key, old_table = self._tables.popitem(last=False)
            if self.on_evict is not None:
                self.on_evict(old_key, old_table)

    def pop(self, key: Hashable) -> None:
        """Forget a table (its cluster was freed or rewritten elsewhere)."""
        self._tables.pop(key, None)

    def __len__(self) -> int:
        return len(self._tables)
