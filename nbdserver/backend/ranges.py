"""Range locks: serialize operations whose byte ranges overlap.

Used for read-modify-write of partial device blocks or chunks. The table holds
only ranges currently locked, so it is empty (and free to check) on the hot
path; acquiring scans the held ranges, O(held).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class _Held:
    """One held range; the event to wake waiters is made only when someone waits."""

    __slots__ = ("end", "event", "start")

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self.event: asyncio.Event | None = None


class RangeLocks:
    """Exclusive locks over half-open byte ranges [start, end)."""

    def __init__(self) -> None:
        self._held: dict[int, _Held] = {}
        self._next = 0

    def __bool__(self) -> bool:
        return bool(self._held)

    def overlapping(self, start: int, end: int) -> list[_Held]:
        return [h for h in self._held.values() if h.start < end and start < h.end]

    def try_hold(self, start: int, end: int) -> int | None:
        """Lock [start, end) at once if nothing overlapping is held; the key for
        :meth:`release`, or None."""
        if self._held and self.overlapping(start, end):
            return None
        key = self._next
        self._next += 1
        self._held[key] = _Held(start, end)
        return key

    def release(self, key: int) -> None:
        held = self._held.pop(key)
        if held.event is not None:
            held.event.set()

    @asynccontextmanager
    async def hold(self, start: int, end: int) -> AsyncIterator[None]:
        while True:
            waits = self.overlapping(start, end)
            if not waits:
                break
            first = waits[0]
            if first.event is None:
                first.event = asyncio.Event()
            await first.event.wait()
        key = self._next
        self._next += 1
        self._held[key] = _Held(start, end)
        try:
            yield
        finally:
            self.release(key)
