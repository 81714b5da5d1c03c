"""A bounded write-back cache of metadata tables or table slices (QEMU's Qcow2Cache).

Entries are ``table_size`` bytes keyed by host offset: whole refcount blocks, and L2 tables in slices of
``l2-cache-entry-size`` bytes (so a miss on a 2 MiB-cluster image reads 4 KiB, not 2 MiB). ``get`` returns
the live bytearray; a caller that modifies it calls ``mark_dirty`` before its next ``await`` (only clean
entries are evicted, so a reference held across an ``await`` may have left the cache: fetch it again).

Ordering between caches (crash safety):

* ``depends_on``: another cache whose dirty entries must reach the file (and be flushed) before ours;
* ``needs_flush``: the file must be flushed before our dirty entries are written (data before L2 entries).
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from blockgraph.node import Child


class MetaCache:
    def __init__(self, name: str, file: Child, table_size: int, capacity: int,
                 factory: Callable[[int, int], bytearray] | None = None) -> None:
        self.name = name
        self.factory = factory or (lambda offset, size: bytearray(size))  # a new entry for host ``offset``
        self.file = file
        self.table_size = table_size
        self.capacity = max(2, capacity)
        self.entries: OrderedDict[int, bytearray] = OrderedDict()
        self.dirty: set[int] = set()
        self.loading: dict[int, asyncio.Future] = {}
        self.depends_on: MetaCache | None = None
        self.needs_flush = False
        self.write_lock = asyncio.Lock()

    def __len__(self) -> int:
        return len(self.entries)

    def peek(self, offset: int) -> bytearray | None:
        t = self.entries.get(offset)
        if t is not None:
            self.entries.move_to_end(offset)
        return t

    async def get(self, offset: int) -> bytearray:
        """The table at host ``offset``, read on a miss (concurrent misses share one read)."""
        t = self.entries.get(offset)
        if t is not None:
            self.entries.move_to_end(offset)
            return t
        fut = self.loading.get(offset)
        if fut is not None:
            return await asyncio.shield(fut)
        fut = self.loading[offset] = asyncio.get_running_loop().create_future()
        try:
            buf = self.factory(offset, self.table_size)
            await self.file.preadv(offset, memoryview(buf))
            await self._make_room()
            t = self.entries.setdefault(offset, buf)
            fut.set_result(t)
            return t
        except BaseException as e:
            fut.set_exception(e)
            fut.exception()  # retrieved: waiters re-raise it, no "never retrieved" warning
            raise
        finally:
            del self.loading[offset]

    async def new(self, offset: int, content: bytes | None = None) -> bytearray:
        """A table for a freshly allocated cluster, without reading it; dirty."""
        await self._make_room()
        t = self.factory(offset, self.table_size)
        if content is not None:
            t[:] = content
        self.entries[offset] = t
        self.entries.move_to_end(offset)
        self.dirty.add(offset)
        return t

    def mark_dirty(self, offset: int) -> None:
        self.dirty.add(offset)

    def discard(self, offset: int, length: int | None = None) -> None:
        """Forget the entries in ``[offset, offset+length)`` (default: one entry), e.g. a freed table's."""
        for off in range(offset, offset + (length or self.table_size), self.table_size):
            self.entries.pop(off, None)
            self.dirty.discard(off)

    def clear_clean(self) -> None:
        """Drop every clean entry (cache-clean-interval)."""
        for off in [o for o in self.entries if o not in self.dirty]:
            del self.entries[off]

    async def _make_room(self) -> None:
        while len(self.entries) >= self.capacity:
            victim = next((o for o in self.entries if o not in self.dirty), None)
            if victim is None:
                await self.flush()
                continue
            del self.entries[victim]

    async def flush(self) -> None:
        """Write every dirty table, honouring the dependencies (QEMU's qcow2_cache_write)."""
        async with self.write_lock:
            if not self.dirty:
                return
            if self.depends_on is not None:
                dep, self.depends_on = self.depends_on, None
                await dep.flush()
                await self.file.flush()
                self.needs_flush = False
            if self.needs_flush:
                await self.file.flush()
                self.needs_flush = False
            for off in sorted(self.dirty):
                t = self.entries.get(off)
                self.dirty.discard(off)
                if t is not None:
                    await self.file.pwritev(off, memoryview(bytes(t)))

    def set_dependency(self, other: MetaCache) -> None:
        self.depends_on = other

    def stats(self) -> dict[str, Any]:
        return {"entries": len(self.entries), "dirty": len(self.dirty), "capacity": self.capacity}
