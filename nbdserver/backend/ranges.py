"""Range locks: serialize operations whose byte ranges overlap, first come first served.

Used for read-modify-write of partial device blocks or chunks. The table holds
only ranges currently locked or waited for, so it is empty (and free to check)
on the hot path; acquiring scans the entries, O(entries).

A waiter is entered in the table as soon as it asks (queued), so a later
request over any of its range sees it and queues behind it instead of slipping
in whenever the range is briefly free: a trim over a chunk that a stream of
small writes keeps locking gets its turn after the writes that came before it,
not after the stream ends. A queued entry waits only for the overlapping entries
entered before it, so waits form no cycle among one table's users.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager


class _Held:
    """One held or queued range; the event to wake waiters is made only when someone
    waits."""

    __slots__ = ("end", "event", "key", "start")

    def __init__(self, key: int, start: int, end: int) -> None:
        self.key = key
        self.start = start
        self.end = end
        self.event: asyncio.Event | None = None


class RangeLocks:
    """Exclusive locks over half-open ranges [start, end) of units (bytes, chunks).

    Ranges of one unit (a 4 KiB write of one chunk, the common case) that are held
    at once are indexed by their unit, so that checking a small range costs O(its
    length + other entries), not O(everything held): dozens of writes in flight each
    hold one. Other entries (wide ranges, and every queued one) are kept in a list
    by key.
    """

    def __init__(self) -> None:
        self.held: dict[int, _Held] = {}  # key -> every entry (empty: nothing held)
        self._wide: dict[int, _Held] = {}  # key -> entries not indexed by unit
        self._unit: dict[int, _Held] = {}  # unit -> the held range of that one unit
        self._next = 0

    def __bool__(self) -> bool:
        return bool(self.held)

    def overlapping(self, start: int, end: int) -> list[_Held]:
        """Entries (held or queued) over any unit of [start, end)."""
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
        """Whether an entry (held or queued) covers `unit` (:meth:`overlapping` of one
        unit, cheaper)."""
        if unit in self._unit:
            return True
        wide = self._wide
        return bool(wide) and any(h.start <= unit < h.end for h in wide.values())

    def _add(self, start: int, end: int, *, indexed: bool = True) -> _Held:
        key = self._next
        self._next += 1
        held = self.held[key] = _Held(key, start, end)
        if indexed and end - start == 1:
            self._unit[start] = held
        else:
            self._wide[key] = held
        return held

    def try_hold(self, start: int, end: int) -> int | None:
        """Lock [start, end) at once if nothing overlapping is held or queued; the key
        for :meth:`release`, or None."""
        if self.held and (self.unit_held(start) if end - start == 1
                          else self.overlapping(start, end)):
            return None
        return self._add(start, end).key

    def hold_unit(self, unit: int) -> int:
        """Lock the one unit `unit`, which the caller saw free with no await since (the
        hot path of a one-chunk write: no check again); the key for :meth:`release`."""
        return self._add(unit, unit + 1).key

    def release(self, key: int) -> None:
        """Unlock a held range, or withdraw a queued one."""
        held = self.held.pop(key)
        if self._unit.get(held.start) is held:
            del self._unit[held.start]
        else:
            del self._wide[key]
        if held.event is not None:
            held.event.set()

    @asynccontextmanager
    async def hold(self, start: int, end: int) -> AsyncIterator[None]:
        """Lock [start, end) once every overlapping entry entered before has gone."""
        before = self.overlapping(start, end) if self.held else []
        # Queued entries stay out of the unit index, which has room for one per unit.
        key = self._add(start, end, indexed=not before).key
        try:
            for h in before:
                if h.key in self.held:
                    if h.event is None:
                        h.event = asyncio.Event()
                    await h.event.wait()
            yield
        finally:
            self.release(key)
