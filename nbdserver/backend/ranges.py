"""Range locks: serialize operations whose byte ranges overlap.

Used for read-modify-write of partial device blocks or chunks. The table holds
only ranges currently locked, so it is empty (and free to check) on the hot
path; acquiring scans the held ranges, O(held).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class RangeLocks:
    """Exclusive locks over half-open byte ranges [start, end)."""

    def __init__(self) -> None:
        self._held: dict[int, tuple[int, int, asyncio.Event]] = {}
        self._next = 0

    def __bool__(self) -> bool:
        return bool(self._held)

    def overlapping(self, start: int, end: int) -> list[asyncio.Event]:
        return [ev for s, e, ev in self._held.values() if s < end and start < e]

    @asynccontextmanager
    async def hold(self, start: int, end: int) -> AsyncIterator[None]:
        while True:
            waits = self.overlapping(start, end)
            if not waits:
                break
            await waits[0].wait()
        key = self._next
        self._next += 1
        self._held[key] = (start, end, asyncio.Event())
        try:
            yield
        finally:
            _, _, ev = self._held.pop(key)
            ev.set()
