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
    """Exclusive locks over half-open ranges [start, end) of units (bytes, chunks).

    Ranges of one unit (a 4 KiB write of one chunk, the common case) are indexed by
    their unit, so that checking a small range costs O(its length + wide ranges held),
    not O(everything held): dozens of writes in flight each hold one.
    """

    def __init__(self) -> None:
        self.held: dict[int, _Held] = {}  # key -> every held range (empty: nothing held)
        self._wide: dict[int, _Held] = {}  # key -> held ranges longer than one unit
        self._unit: dict[int, _Held] = {}  # unit -> the held range of that one unit
        self._next = 0

    def __bool__(self) -> bool:
        return bool(self.held)

    def overlapping(self, start: int, end: int) -> list[_Held]:
        out = [h for h in self._wide.values() if h.start < end and start < h.end]
        unit = self._unit
        if unit:
            if end - start <= len(unit):
                for u in range(start, end):
                    h = unit.get(u)
                    if h is not None:
                        out.append(h)
            else:
                out += [h for u, h in unit.items() if start <= u < end]
        return out

    def unit_held(self, unit: int) -> bool:
        """Whether a held range covers `unit` (:meth:`overlapping` of one unit, cheaper)."""
        if unit in self._unit:
            return True
        wide = self._wide
        return bool(wide) and any(h.start <= unit < h.end for h in wide.values())

    def _add(self, start: int, end: int) -> int:
        key = self._next
        self._next += 1
        held = self.held[key] = _Held(start, end)
        if end - start == 1:
            self._unit[start] = held
        else:
            self._wide[key] = held
        return key

    def try_hold(self, start: int, end: int) -> int | None:
        """Lock [start, end) at once if nothing overlapping is held; the key for
        :meth:`release`, or None."""
        if self.held and (self.unit_held(start) if end - start == 1
                          else self.overlapping(start, end)):
            return None
        return self._add(start, end)

    def hold_unit(self, unit: int) -> int:
        """Lock the one unit `unit`, which the caller saw free with no await since (the
        hot path of a one-chunk write: no check again); the key for :meth:`release`."""
        return self._add(unit, unit + 1)

    def release(self, key: int) -> None:
        held = self.held.pop(key)
        if held.end - held.start == 1:
            del self._unit[held.start]
        else:
            del self._wide[key]
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
        key = self._add(start, end)
        try:
            yield
        finally:
            self.release(key)
