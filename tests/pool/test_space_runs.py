"""Space maps, run-wise: ``get_run``, ``incref_run``, ``incref_runs``, ``decref_run``,
``find_free_run``.

The run operations must leave exactly the state unit-by-unit ``incref``/``decref``
leave (counts, used and free counters, claims, frees and quarantine), across
refcount-page boundaries, and roll back as completely. ``find_free_run`` must
see runs that cross pages, skip claimed and quarantined units (unless told
that claimed ones count as free), and never wrap round the end of the table.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from nbdserver.pool.format import PAGE_SIZE, REFS_PER_PAGE
from nbdserver.pool.pages import PageCache
from nbdserver.pool.pool import _read_pages_sync
from nbdserver.pool.space import RefTable
from nbdserver.storage.device import BlockDevice, open_device

R = REFS_PER_PAGE


@pytest.fixture
def device(tmp_path: Path) -> Iterator[BlockDevice]:
    dev = open_device(tmp_path / "refs.img", create_size=16 * PAGE_SIZE)
    try:
        yield dev
    finally:
        dev.close()


def table(device: BlockDevice, count: int) -> RefTable:
    async def read_page(no: int) -> bytes:
        return _read_pages_sync(device, no, 1)

    cache = PageCache(32, read_page)
    cache.sync_reader = lambda no: _read_pages_sync(device, no, 1)
    t = RefTable(cache, 0, count, "unit", quarantine_frees=True)
    for pi in range(t.pages):
        t.index_page(pi, _read_pages_sync(device, pi, 1))
    return t


def state(t: RefTable) -> tuple[list[int], int, list[int], set[int], set[int], list[int]]:
    return (t.get_run(0, t.count), t.used, list(t.free_in_page), set(t.claimed),
            set(t.quarantine), list(t.freed_pending()))


def test_runs_match_unit_operations(device: BlockDevice, tmp_path: Path) -> None:
    a = table(device, 3 * R + 7)
    other = open_device(tmp_path / "b.img", create_size=16 * PAGE_SIZE)
    try:
        b = table(other, 3 * R + 7)
        first, n = R - 5, R + 20  # crosses two page boundaries
        for t in (a, b):
            with t.cache.mtr():
                for u in (first + 3, first + 9, 2 * R + 1):
                    t.incref(u)
                t.claimed.update({first + 1, 2 * R + 2})
        with a.cache.mtr():
            a.incref_run(first, n)
            a.incref_run(first + 2, 4)
        with b.cache.mtr():
            for u in range(first, first + n):
                b.incref(u)
            for u in range(first + 2, first + 6):
                b.incref(u)
        assert state(a) == state(b)
        assert a.get_run(first, 8) == [1, 1, 2, 3, 2, 2, 1, 1]
        assert a.claimed == set()  # counted now, no longer in flight
        with a.cache.mtr():
            a.decref_run(first, n)
        with b.cache.mtr():
            for u in range(first, first + n):
                b.decref(u)
        assert state(a) == state(b)
        assert a.used == 6 and a.get_run(first, 8) == [0, 0, 1, 2, 1, 1, 0, 0]
        freed = set(range(first, first + n)) - {first + 2, first + 3, first + 4, first + 5,
                                                first + 9, 2 * R + 1}
        assert a.quarantine == freed and set(a.freed_pending()) == freed
    finally:
        other.close()


def test_runs_roll_back_completely(device: BlockDevice) -> None:
    t = table(device, 2 * R + 10)
    with t.cache.mtr():
        t.incref_run(R - 3, 6)
    t.claimed.add(R + 5)
    before = state(t)

    class Boom(Exception):
        pass

    with pytest.raises(Boom), t.cache.mtr():
        t.incref_run(R, 10)  # claims R+5
        t.decref_run(R - 3, 6)  # frees three, keeps three at 1... then frees
        t.decref_run(R, 3)
        raise Boom
    assert state(t) == before
    with pytest.raises(AssertionError, match="already zero"), t.cache.mtr():
        t.decref_run(R - 4, 3)  # R-4 is free: refused, nothing changes
    assert state(t) == before
    with pytest.raises(AssertionError, match="out of range"), t.cache.mtr():
        t.incref_run(2 * R + 5, 10)
    assert state(t) == before


def test_find_free_run(device: BlockDevice) -> None:
    t = table(device, 4 * R)
    with t.cache.mtr():
        t.incref_run(0, R - 10)  # page 0 free from R-10
        t.incref_run(R + 30, R - 30)  # page 1 free up to R+30; page 2 and 3 free
        t.incref_run(2 * R + 100, 1)
    # a run crossing into page 1: [R-10, R+30) = 40 units
    assert t.find_free_run(0, 40) == (R - 10, 40)
    # want more: the first run long enough, in page 2
    assert t.find_free_run(0, 41) == (2 * R, 100)
    # the longest seen when none is long enough, within a page limit
    assert t.find_free_run(0, 500, pages=2) == (R - 10, 40)
    # runs cross pages forward; one reaching the end of the table does not wrap round
    assert t.find_free_run(2 * R + 50, 10_000) == (2 * R + 101, 4 * R - (2 * R + 101))
    # claimed and quarantined units break runs; claimed ones can count as free
    t.claimed.add(R + 5)
    t.quarantine.add(R - 2)
    assert t.find_free_run(0, 40, pages=2) == (R + 6, 24)  # the longest seen
    assert t.find_free_run(0, 30, pages=2, claimed_free=True) == (R - 1, 31)
    assert t.find_free_run(R + 40, 6) == (R + 6, 24)
    assert t.find_free_run(R + 40, 5, pages=1) == (R, 5)  # from the start of near's page
    with t.cache.mtr():
        t.incref_run(R - 10, 40)
        t.incref_run(2 * R, 100)
        t.incref_run(2 * R + 101, 2 * R - 101)
    assert t.free == 0
    assert t.find_free_run(0, 1) is None


def test_incref_runs_matches_unit_increfs(device: BlockDevice, tmp_path: Path) -> None:
    """A batch of runs (a batch of fresh writes' chunks) in any order, adjacent ones and
    ones crossing a page boundary among them, counts exactly what incref of each unit
    counts, claims included, and rolls back whole."""
    runs = [(R + 3, 1), (R - 2, 2), (R, 3), (7, 1), (2 * R + 1, 5), (8, 1)]
    other = open_device(tmp_path / "b.img", create_size=16 * PAGE_SIZE)
    try:
        a, b = table(device, 3 * R), table(other, 3 * R)
        for t in (a, b):
            t.claimed.update(u for first, n in runs for u in range(first, first + n))
            with t.cache.mtr():
                t.incref(8)  # already counted once: goes to 2
        before = state(a)
        with pytest.raises(RuntimeError), a.cache.mtr():
            a.incref_runs(list(runs))
            raise RuntimeError("rolled back")
        assert state(a) == before
        with a.cache.mtr():
            a.incref_runs(list(runs))
        with b.cache.mtr():
            for first, n in runs:
                for u in range(first, first + n):
                    b.incref(u)
        assert state(a) == state(b)
        assert a.get_run(R - 2, 6) == [1] * 6 and a.get(8) == 2 and not a.claimed
        assert a.pages_spanned(R - 2, 6) == 2 and a.pages_spanned(7, 2) == 1
    finally:
        other.close()
