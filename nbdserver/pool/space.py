"""Space maps: reference counts and allocation of data chunks and metadata pages.

Each unit (a data chunk, or a metadata page) has a u32 reference count in a
table of journaled refcount pages: 0 is free, n is the number of map entries
(or volume roots) that point to it. Sharing between volumes is expressed only
through these counts, so reclamation is exact: a unit is free again the moment
its count drops to zero, and `check` can recount every reference.

Allocation is next-fit from a cursor, or near a hint (the extent design asks
for the chunk after a logical neighbour's). An in-memory count of free entries
per refcount page, built when the pool opens, lets the search skip full pages;
it is the only memory that grows with the pool size (4 bytes per 1020 units).

Two in-memory exclusions keep freed and claimed units safe:

- *claimed*: a chunk handed out for a write still in flight. Its count is set
  when the write completes and the map points at it (so a crash never leaves a
  counted chunk that nothing references); meanwhile no one else may take it.
- *quarantine*: a chunk freed since the last durable commit, from the moment
  its count reaches zero (tables made with ``quarantine_frees``). Until that
  commit is durable the on-disk state still references it, so writing new data
  into it could leak that data into the old owner after a crash; and a read
  that looked it up before the free may still be in flight. It is released
  when the commit that recorded the free has reached the disk and every
  transfer begun before then has ended.

Metadata pages need no quarantine: nothing writes a metadata page home before
the commit that gives it its new contents is durable.
"""

from __future__ import annotations

import errno
import struct
from array import array
from collections.abc import Callable, Iterable

from nbdserver.errors import NbdError
from nbdserver.pool.format import PAGE_HEADER_SIZE, PT_REFCOUNT, REFS_PER_PAGE
from nbdserver.pool.pages import PageCache

_U32 = struct.Struct("<I")
_ZERO4 = b"\0\0\0\0"


class RefTable:
    """u32 reference counts for `count` units, stored in pages from `first_page`."""

    def __init__(self, cache: PageCache, first_page: int, count: int, what: str, *,
                 quarantine_frees: bool = False) -> None:
        self.cache = cache
        self.quarantine_frees = quarantine_frees
        self.first_page = first_page
        self.count = count
        self.what = what
        self.pages = -(-count // REFS_PER_PAGE)
        self.free_in_page = array("I", [0]) * self.pages
        self.claimed: set[int] = set()
        self.quarantine: set[int] = set()
        self._freed_since_snapshot: list[int] = []
        self._freed_by_commit: dict[int, list[int]] = {}
        self.cursor = 0
        self.used = 0

    # -- counting ------------------------------------------------------------------------

    def entries_in_page(self, page_index: int) -> int:
        return min(REFS_PER_PAGE, self.count - page_index * REFS_PER_PAGE)

    def index_page(self, page_index: int, raw: bytes | bytearray | memoryview) -> None:
        """Count the free entries of one refcount page (when the pool opens)."""
        n = self.entries_in_page(page_index)
        counts = memoryview(raw)[PAGE_HEADER_SIZE:PAGE_HEADER_SIZE + 4 * n].cast("I")
        free = counts.tolist().count(0)
        self.free_in_page[page_index] = free
        self.used += n - free

    @property
    def free(self) -> int:
        return self.count - self.used

    def get(self, unit: int) -> int:
        page = self.cache.get(self.first_page + unit // REFS_PER_PAGE)
        return int(_U32.unpack_from(page, PAGE_HEADER_SIZE + 4 * (unit % REFS_PER_PAGE))[0])

    def _set(self, unit: int, value: int, old: int) -> None:
        pi = unit // REFS_PER_PAGE
        page = self.cache.modify(self.first_page + pi, PT_REFCOUNT)
        _U32.pack_into(page, PAGE_HEADER_SIZE + 4 * (unit % REFS_PER_PAGE), value)
        if old == 0 and value:
            delta = 1
        elif value == 0 and old:
            delta = -1
        else:
            return
        self.free_in_page[pi] -= delta
        self.used += delta

        def undo() -> None:
            self.free_in_page[pi] += delta
            self.used -= delta

        self.cache.add_undo(undo)

    def incref(self, unit: int, by: int = 1) -> int:
        old = self.get(unit)
        self._set(unit, old + by, old)
        if unit in self.claimed:
            self.claimed.discard(unit)
            self.cache.add_undo(lambda: self.claimed.add(unit))
        return old + by

    def decref(self, unit: int) -> int:
        """Drop one reference; a unit reaching zero is freed (and quarantined if asked)."""
        old = self.get(unit)
        if old == 0:
            raise AssertionError(f"{self.what} {unit}: reference count already zero")
        self._set(unit, old - 1, old)
        if old == 1:
            self._note_freed([unit])
        return old - 1

    def _note_freed(self, units: list[int]) -> None:
        """`units` reached a count of zero (in a mini-transaction): remember them for the
        next commit and, with ``quarantine_frees``, keep them from reuse until it is durable."""
        freed = self._freed_since_snapshot
        freed += units
        held = units if self.quarantine_frees else []
        self.quarantine.update(held)
        n = len(units)

        def undo() -> None:
            del freed[-n:]
            self.quarantine.difference_update(held)

        self.cache.add_undo(undo)

    # -- allocation ------------------------------------------------------------------------

    def _usable(self, unit: int) -> bool:
        return unit not in self.claimed and unit not in self.quarantine

    def _scan_page(self, pi: int, start: int) -> int | None:
        """The first free, usable unit of refcount page `pi` at or after entry `start`."""
        page = self.cache.get(self.first_page + pi)
        n = self.entries_in_page(pi)
        base = PAGE_HEADER_SIZE
        end = base + 4 * n
        pos = base + 4 * start
        while True:
            pos = page.find(_ZERO4, pos, end)
            if pos < 0:
                return None
            rem = (pos - base) % 4
            if rem:
                pos += 4 - rem
                continue
            unit = pi * REFS_PER_PAGE + (pos - base) // 4
            if self._usable(unit):
                return unit
            pos += 4

    def find_free(self, hint: int | None = None) -> int | None:
        """A free unit: at `hint` or the nearest after it in its page, else next-fit."""
        if hint is not None and 0 <= hint < self.count:
            pi = hint // REFS_PER_PAGE
            if self.free_in_page[pi]:
                unit = self._scan_page(pi, hint % REFS_PER_PAGE)
                if unit is not None:
                    return unit
        pages = self.pages
        start = self.cursor // REFS_PER_PAGE
        for k in range(pages + 1):
            pi = (start + k) % pages
            if not self.free_in_page[pi]:
                continue
            unit = self._scan_page(pi, self.cursor % REFS_PER_PAGE if k == 0 else 0)
            if unit is None and k == 0:
                unit = self._scan_page(pi, 0)
            if unit is not None:
                self.cursor = unit + 1 if unit + 1 < self.count else 0
                return unit
        return None

    def claim(self, hint: int | None = None) -> int:
        """Take a free unit for an in-flight write; its count is set when it is mapped."""
        unit = self.find_free(hint)
        if unit is None:
            raise NbdError(errno.ENOSPC, f"no free {self.what}")
        self.claimed.add(unit)
        if self.cache.in_mtr:
            self.cache.add_undo(lambda: self.claimed.discard(unit))
        return unit

    def unclaim(self, unit: int) -> None:
        self.claimed.discard(unit)

    def allocate(self, hint: int | None = None) -> int:
        """Take a free unit and count one reference to it (inside a mini-transaction)."""
        unit = self.find_free(hint)
        if unit is None:
            raise NbdError(errno.ENOSPC, f"no free {self.what}")
        self.incref(unit)
        return unit

    def run_length_free(self, unit: int, limit: int) -> int:
        """How many consecutive units from `unit` are free and usable (at most `limit`)."""
        n = 0
        while n < limit and unit + n < self.count:
            u = unit + n
            if self.get(u) or not self._usable(u):
                break
            n += 1
        return n

    # -- quarantine -------------------------------------------------------------------------

    def snapshot_freed(self, commit_seq: int, quarantine: bool) -> None:
        """At a commit snapshot: the units freed so far wait for that commit to be durable."""
        freed = self._freed_since_snapshot
        self._freed_since_snapshot = []
        if quarantine and freed:
            self.quarantine.update(freed)
            self._freed_by_commit[commit_seq] = freed

    def commit_durable(self, commit_seq: int) -> None:
        for unit in self._freed_by_commit.pop(commit_seq, ()):
            self.quarantine.discard(unit)

    def freed_pending(self) -> Iterable[int]:
        return self._freed_since_snapshot

    def iter_counts(self, read: Callable[[int], bytes | bytearray]) -> Iterable[tuple[int, int]]:
        """(unit, count) for every unit with a nonzero count, reading pages with `read`."""
        for pi in range(self.pages):
            raw = read(self.first_page + pi)
            n = self.entries_in_page(pi)
            counts = memoryview(raw)[PAGE_HEADER_SIZE:PAGE_HEADER_SIZE + 4 * n].cast("I")
            for i, c in enumerate(counts):
                if c:
                    yield pi * REFS_PER_PAGE + i, c
