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
  A design that places chunks next-fit (radix) claims ``ahead``: a run of
  ``SPARE_RUN`` units at once, handed out in order (the *spare* run: claimed,
  but not in flight), so that a 4 KiB first write after a snapshot costs one
  scan of a refcount page per run instead of one per chunk. Spare units count
  as free space, and are let go when a scan finds nothing else free. (Designs
  that place chunks by hints do not claim ahead: the spare run would stand where
  their hints point.)
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
import re
import struct
from array import array
from collections.abc import Callable, Iterable
from functools import partial

from nbdserver.errors import NbdError
from nbdserver.pool.format import PAGE_HEADER_SIZE, PT_REFCOUNT, REFS_PER_PAGE
from nbdserver.pool.pages import PageCache

_U32 = struct.Struct("<I")
_ZERO_COUNTS = bytes(4 * REFS_PER_PAGE)
_ZERO4 = b"\0\0\0\0"
_FREE_RUNS = re.compile(rb"\x00+")
SPARE_RUN = 64  # units an unhinted claim takes ahead (see the module note)


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
        self.spare = range(0)  # claimed ahead, not in flight: handed out from the start
        self.quarantine: set[int] = set()
        self._freed_since_snapshot: list[int] = []
        self.frees = 0  # units that reached a count of zero so far (undone with their change)
        self._freed_by_commit: dict[int, list[int]] = {}
        self.cursor = 0
        self.used = 0

    # -- counting ------------------------------------------------------------------------

    def entries_in_page(self, page_index: int) -> int:
        return min(REFS_PER_PAGE, self.count - page_index * REFS_PER_PAGE)

    def index_page(self, page_index: int, raw: bytes | bytearray | memoryview) -> None:
        """Count the free entries of one refcount page (when the pool opens)."""
        n = self.entries_in_page(page_index)
        span = bytes(raw[PAGE_HEADER_SIZE:PAGE_HEADER_SIZE + 4 * n])
        if span == (_ZERO_COUNTS if n == REFS_PER_PAGE else bytes(4 * n)):
            free = n  # all free (most pages of a large pool): one memcmp
        else:
            free = memoryview(span).cast("I").tolist().count(0)
        self.free_in_page[page_index] = free
        self.used += n - free

    @property
    def free(self) -> int:
        return self.count - self.used

    def get(self, unit: int) -> int:
        page = self.cache.get(self.first_page + unit // REFS_PER_PAGE)
        return int(_U32.unpack_from(page, PAGE_HEADER_SIZE + 4 * (unit % REFS_PER_PAGE))[0])

    def _change(self, unit: int, by: int) -> int:
        """Add `by` (+1 or -1) to the count of `unit` in one page access; the old count.

        (The hot path of every map change: one lookup of the page, one undo entry.)"""
        pi, i = divmod(unit, REFS_PER_PAGE)
        off = PAGE_HEADER_SIZE + 4 * i
        page = self.cache.modify_span(self.first_page + pi, off, 4, PT_REFCOUNT)
        old: int = _U32.unpack_from(page, off)[0]
        if old + by < 0:
            raise AssertionError(f"{self.what} {unit}: reference count already zero")
        _U32.pack_into(page, off, old + by)
        if old == 0:
            self._count_change(pi, 1)
        elif old + by == 0:
            self._count_change(pi, -1)
        return old

    def incref(self, unit: int, by: int = 1) -> int:
        old = self._change(unit, by)
        claimed = self.claimed
        if unit in claimed:
            claimed.discard(unit)
            self.cache.add_undo(partial(claimed.add, unit))
        return old + by

    def decref(self, unit: int) -> int:
        """Drop one reference; a unit reaching zero is freed (and quarantined if asked)."""
        old = self._change(unit, -1)
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
        self.frees += n

        def undo() -> None:
            del freed[-n:]
            self.frees -= n
            self.quarantine.difference_update(held)

        self.cache.add_undo(undo)

    # -- runs of consecutive units (block maps that map ranges: extents) -----------------------

    def _pieces(self, unit: int, count: int) -> Iterable[tuple[int, int, int]]:
        """(refcount page index, first entry, entries) for the units [unit, unit+count)."""
        if unit < 0 or count < 0 or unit + count > self.count:
            raise AssertionError(f"{self.what}s {unit}..{unit + count - 1} out of range")
        while count > 0:
            pi, first = divmod(unit, REFS_PER_PAGE)
            n = min(count, REFS_PER_PAGE - first)
            yield pi, first, n
            unit += n
            count -= n

    def get_run(self, unit: int, count: int) -> list[int]:
        """The reference counts of `count` consecutive units from `unit`."""
        out: list[int] = []
        for pi, first, n in self._pieces(unit, count):
            page = self.cache.get(self.first_page + pi)
            off = PAGE_HEADER_SIZE + 4 * first
            out += memoryview(page)[off:off + 4 * n].cast("I").tolist()
        return out

    def incref_run(self, unit: int, count: int) -> None:
        """:meth:`incref` each of `count` consecutive units, one page at a time."""
        if count == 1:
            self.incref(unit)
            return
        for pi, first, n in self._pieces(unit, count):
            off = PAGE_HEADER_SIZE + 4 * first
            page = self.cache.get(self.first_page + pi)
            old = memoryview(page)[off:off + 4 * n].cast("I").tolist()
            page = self.cache.modify(self.first_page + pi, PT_REFCOUNT)
            memoryview(page)[off:off + 4 * n].cast("I")[:] = array("I", [c + 1 for c in old])
            born = old.count(0)
            if born:
                self._count_change(pi, born)
                base = pi * REFS_PER_PAGE + first
                claimed = self.claimed
                if claimed:
                    taken: Iterable[int] = range(base, base + n)  # (a batch's fresh chunks)
                    if not (born == n and claimed.issuperset(taken)):
                        taken = [base + i for i, c in enumerate(old)
                                 if not c and base + i in claimed]
                    if taken:
                        claimed.difference_update(taken)
                        self.cache.add_undo(partial(claimed.update, taken))

    def incref_runs(self, runs: list[tuple[int, int]]) -> None:
        """:meth:`incref_run` of each (unit, count) run, adjacent runs joined first (the
        chunks of a batch of writes, claimed one after another, make one run)."""
        if not runs:
            return
        ordered = sorted(runs)
        unit, count = ordered[0]
        for u, n in ordered[1:]:
            if u == unit + count:
                count += n
            else:
                self.incref_run(unit, count)
                unit, count = u, n
        self.incref_run(unit, count)

    def pages_spanned(self, unit: int, count: int) -> int:
        """How many refcount pages the units [unit, unit+count) have their counts in."""
        return (unit + count - 1) // REFS_PER_PAGE - unit // REFS_PER_PAGE + 1

    def decref_run(self, unit: int, count: int) -> None:
        """:meth:`decref` each of `count` consecutive units, one page at a time."""
        for pi, first, n in self._pieces(unit, count):
            off = PAGE_HEADER_SIZE + 4 * first
            page = self.cache.get(self.first_page + pi)
            old = memoryview(page)[off:off + 4 * n].cast("I").tolist()
            if 0 in old:
                bad = pi * REFS_PER_PAGE + first + old.index(0)
                raise AssertionError(f"{self.what} {bad}: reference count already zero")
            page = self.cache.modify(self.first_page + pi, PT_REFCOUNT)
            memoryview(page)[off:off + 4 * n].cast("I")[:] = array("I", [c - 1 for c in old])
            if 1 in old:
                base = pi * REFS_PER_PAGE + first
                gone = [base + i for i, c in enumerate(old) if c == 1]
                self._count_change(pi, -len(gone))
                self._note_freed(gone)

    def _count_change(self, pi: int, delta: int) -> None:
        """`delta` units of refcount page `pi` became used (> 0) or free (< 0)."""
        self.free_in_page[pi] -= delta
        self.used += delta

        def undo() -> None:
            self.free_in_page[pi] += delta
            self.used -= delta

        self.cache.add_undo(undo)

    def _taken_map(self, pi: int, claimed_free: bool) -> bytes:
        """One byte per entry of refcount page `pi`: 0 if the unit is free and usable."""
        n = self.entries_in_page(pi)
        base = pi * REFS_PER_PAGE
        excluded: list[int] = []
        for units in (self.quarantine,) if claimed_free else (self.claimed, self.quarantine):
            if len(units) <= n:
                excluded += [u for u in units if base <= u < base + n]
            else:  # a big set (a large delete's frees): look up this page's units in it
                excluded += units.intersection(range(base, base + n))
        if self.free_in_page[pi] == n and not excluded:
            return bytes(n)
        page = self.cache.get(self.first_page + pi)
        raw = memoryview(page)[PAGE_HEADER_SIZE:PAGE_HEADER_SIZE + 4 * n]
        acc = 0
        for b in range(4):  # a count is zero when all four of its bytes are
            acc |= int.from_bytes(raw[b::4], "little")
        taken = bytearray(acc.to_bytes(n, "little"))
        for unit in excluded:
            taken[unit - base] = 1
        return bytes(taken)

    def find_free_run(self, near: int, want: int, pages: int | None = None, *,
                      claimed_free: bool = False) -> tuple[int, int] | None:
        """A run of consecutive free, usable units near `near`.

        Scans refcount pages forward from the one holding `near` (at most `pages`
        of them, wrapping round at the end of the table; runs do not wrap) and
        returns ``(start, length)`` of the first run of at least `want` units
        (`length` may then be a lower bound), else of the longest run seen, else
        None. With `claimed_free`, units claimed for writes in flight count as
        free, so that the chunks of one stream written concurrently all get the
        same answer. Cost: a few microseconds per refcount page scanned (plus a
        look-up of its units in the claimed and quarantined sets when those are
        larger than a page), full pages skipped without reading them.
        """
        if self.count == 0 or want <= 0:
            return None
        first_pi = min(max(near, 0), self.count - 1) // REFS_PER_PAGE
        limit = self.pages if pages is None else min(pages, self.pages)
        best: tuple[int, int] | None = None
        run_start, run_len = 0, 0  # the run reaching the end of the previous page
        for k in range(limit):
            pi = (first_pi + k) % self.pages
            if pi == 0 and k:
                run_len = 0  # runs do not wrap round
            base = pi * REFS_PER_PAGE
            n = self.entries_in_page(pi)
            if not self.free_in_page[pi]:
                run_len = 0
                continue
            taken = self._taken_map(pi, claimed_free)
            for m in _FREE_RUNS.finditer(taken):
                s, e = m.span()
                if s == 0 and run_len:
                    start, length = run_start, run_len + e
                else:
                    start, length = base + s, e - s
                if length >= want:
                    return start, length
                if best is None or length > best[1]:
                    best = start, length
                if e == n:
                    run_start, run_len = start, length
            if not taken or taken[-1]:
                run_len = 0
        return best

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

    def claim(self, hint: int | None = None, *, ahead: bool = False) -> int:
        """Take a free unit for an in-flight write; its count is set when it is mapped.
        With `ahead` (and no hint), O(1) from the spare run (see the module note)."""
        if ahead and hint is None:
            spare = self.spare
            if spare:
                self.spare = spare[1:]
                if self.cache.in_mtr:
                    self.cache.add_undo(partial(setattr, self, "spare", spare))
                return spare[0]
            if not self.cache.in_mtr:  # (a rollback would not give a new spare run back)
                first, n = self.claim_run(None, SPARE_RUN)
                self.spare = range(first + 1, first + n)
                return first
        unit = self._find_or_let_go(hint)
        self.claimed.add(unit)
        if self.cache.in_mtr:
            self.cache.add_undo(lambda: self.claimed.discard(unit))
        return unit

    def _find_or_let_go(self, hint: int | None) -> int:
        """find_free, letting the spare run go if nothing else is free; ENOSPC if none."""
        unit = self.find_free(hint)
        if unit is None and self.spare:
            self._let_spare_go()
            unit = self.find_free(hint)
        if unit is None:
            raise NbdError(errno.ENOSPC, f"no free {self.what}")
        return unit

    def _let_spare_go(self) -> None:
        spare = self.spare
        self.claimed.difference_update(spare)
        self.spare = range(0)
        if self.cache.in_mtr:
            def undo() -> None:
                self.claimed.update(spare)
                self.spare = spare

            self.cache.add_undo(undo)

    @property
    def in_flight(self) -> int:
        """Units claimed for writes in flight (spare ones not counted)."""
        return len(self.claimed) - len(self.spare)

    def takeable(self) -> int:
        """Free units a claim may take now: not in flight, not quarantined (the spare run
        counts: it is free). Plain arithmetic, as every first write asks."""
        return (self.count - self.used - len(self.claimed) + len(self.spare)
                - len(self.quarantine))

    def claim_run(self, hint: int | None, limit: int) -> tuple[int, int]:
        """Claim up to `limit` consecutive free units, the first as :meth:`claim` picks it
        (within one refcount page); returns (first unit, how many)."""
        unit = self._find_or_let_go(hint)
        pi, i = divmod(unit, REFS_PER_PAGE)
        room = min(limit, self.entries_in_page(pi) - i)
        n = 1
        if room > 1:
            page = self.cache.get(self.first_page + pi)
            off = PAGE_HEADER_SIZE + 4 * i
            counts = memoryview(page)[off:off + 4 * room].cast("I").tolist()
            usable = self._usable
            while n < room and not counts[n] and usable(unit + n):
                n += 1
        units = range(unit, unit + n)
        self.claimed.update(units)
        if self.cache.in_mtr:
            self.cache.add_undo(partial(self.claimed.difference_update, units))
        if self.cursor == unit + 1:  # next-fit goes on after the run
            self.cursor = unit + n if unit + n < self.count else 0
        return unit, n

    def unclaim(self, unit: int) -> None:
        self.claimed.discard(unit)

    def allocate(self, hint: int | None = None) -> int:
        """Take a free unit and count one reference to it (inside a mini-transaction)."""
        unit = self._find_or_let_go(hint)
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

    def freed_pending_count(self) -> int:
        return len(self._freed_since_snapshot)

    def iter_counts(self, read: Callable[[int], bytes | bytearray]) -> Iterable[tuple[int, int]]:
        """(unit, count) for every unit with a nonzero count, reading pages with `read`."""
        for pi in range(self.pages):
            raw = read(self.first_page + pi)
            n = self.entries_in_page(pi)
            counts = memoryview(raw)[PAGE_HEADER_SIZE:PAGE_HEADER_SIZE + 4 * n].cast("I")
            for i, c in enumerate(counts):
                if c:
                    yield pi * REFS_PER_PAGE + i, c


class Recount:
    """References counted anew (by `pool check`) for the units of one table.

    One byte per unit (256 MiB for 1 TiB of 4 KiB chunks), whatever is referenced; the
    references past 255 go in a dict, as do units outside the table (a damaged map).
    :meth:`compare` reads the table a page at a time and compares whole pages at
    once, so a clean pool costs a few C-level operations per refcount page.
    """

    SATURATED = 255

    def __init__(self, count: int) -> None:
        self.count = count
        self.counts = array("B", [0]) * count  # (not from bytes: that would be twice)
        self.more: dict[int, int] = {}  # unit -> references past SATURATED
        self.outside: dict[int, int] = {}  # unit outside the table -> references
        self.referenced = 0  # units referenced at least once

    def add(self, unit: int) -> None:
        if not 0 <= unit < self.count:
            self.outside[unit] = self.outside.get(unit, 0) + 1
            return
        counts = self.counts
        c = counts[unit]
        if c == 0:
            self.referenced += 1
        if c < self.SATURATED:
            counts[unit] = c + 1
        else:
            self.more[unit] = self.more.get(unit, 0) + 1

    def total(self, unit: int) -> int:
        return self.counts[unit] + self.more.get(unit, 0)

    def compare(self, table: RefTable, read: Callable[[int], bytes | bytearray],
                what: str, complete: bool = True) -> tuple[list[str], int, int]:
        """(problems, leaked units, units in use on disk) of `table` against this count.
        Not `complete` (a map could not be read whole): units counted more on disk than
        found may be referenced from the pages that could not be read, so they are not
        called leaked, only counted in one line."""
        problems: list[str] = []
        leaked = used = unverified = 0
        more_by_page: dict[int, list[int]] = {}
        for unit in self.more:
            more_by_page.setdefault(unit // REFS_PER_PAGE, []).append(unit)
        for pi in range(table.pages):
            raw = read(table.first_page + pi)
            n = table.entries_in_page(pi)
            lo = pi * REFS_PER_PAGE
            disk = array("I", bytes(raw[PAGE_HEADER_SIZE:PAGE_HEADER_SIZE + 4 * n]))
            mine = array("I", self.counts[lo:lo + n])
            for unit in more_by_page.get(pi, ()):
                mine[unit - lo] = self.total(unit)
            used += n - disk.count(0)
            if mine == disk:
                continue
            for i in range(n):
                count, want = disk[i], mine[i]
                if count == want:
                    continue
                unit = lo + i
                if want < count and not complete:
                    unverified += 1
                elif want == 0:
                    leaked += 1
                    problems.append(f"{what} {unit}: leaked (reference count {count}, "
                                    "nothing references it)")
                elif count == 0:
                    problems.append(f"{what} {unit}: referenced {want} time(s) but free")
                else:
                    problems.append(f"{what} {unit}: reference count {count}, but "
                                    f"{want} reference(s) found")
        for unit, want in sorted(self.outside.items()):
            problems.append(f"{what} {unit}: referenced {want} time(s), but the pool has "
                            f"{table.count} {what}s")
        if unverified:
            problems.append(f"{what}s: {unverified} with more references on disk than the "
                            "readable maps hold (the unreadable pages named above may hold "
                            "the rest; not counted as leaked)")
        if used != table.used:
            problems.append(f"{what}s: {used} in use on disk, {table.used} counted in memory")
        return problems, leaked, used
