"""Space maps (RefTable): counts, allocation, claims, quarantine, and their rollback.

Tables live in refcount pages of a real O_DIRECT file, read through a page cache
with a synchronous reader (as offline tools do); the pool-level tests use a
real pool's data table.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest
from poolkit import KiB, PoolFactory, pattern

from nbdserver.errors import NbdError
from nbdserver.pool.format import PAGE_SIZE, REFS_PER_PAGE
from nbdserver.pool.pages import PageCache
from nbdserver.pool.pool import _read_pages_sync
from nbdserver.pool.space import SPARE_RUN, Recount, RefTable
from nbdserver.storage.device import BlockDevice, open_device


@pytest.fixture
def device(tmp_path: Path) -> Iterator[BlockDevice]:
    dev = open_device(tmp_path / "refs.img", create_size=8 * PAGE_SIZE)
    try:
        yield dev
    finally:
        dev.close()


def make_table(device: BlockDevice, count: int, quarantine_frees: bool = True) -> RefTable:
    """A data-chunk-like table (frees quarantined) unless `quarantine_frees` is False."""
    async def read_page(no: int) -> bytes:
        return _read_pages_sync(device, no, 1)

    cache = PageCache(16, read_page)
    cache.sync_reader = lambda no: _read_pages_sync(device, no, 1)
    table = RefTable(cache, 0, count, "unit", quarantine_frees=quarantine_frees)
    for pi in range(table.pages):
        table.index_page(pi, _read_pages_sync(device, pi, 1))
    return table


def test_fresh_table_counts(device: BlockDevice) -> None:
    table = make_table(device, 2500)
    assert table.pages == 3
    assert list(table.free_in_page) == [REFS_PER_PAGE, REFS_PER_PAGE, 2500 - 2 * REFS_PER_PAGE]
    assert (table.used, table.free) == (0, 2500)
    assert list(table.iter_counts(table.cache.get)) == []


def test_recount_compares_with_the_table(device: BlockDevice) -> None:
    """What `pool check` recounts: one byte per unit, counts past 255 kept exactly, and
    every kind of disagreement with the table named (leaked, wrong count, referenced
    but free, outside the table)."""
    table = make_table(device, 2000)
    with table.cache.mtr():
        for unit, n in ((3, 1), (700, 300), (1500, 4), (1999, 2), (10, 1)):
            for _ in range(n):
                table.incref(unit)
    clean = Recount(2000)
    for unit, n in ((3, 1), (700, 300), (1500, 4), (1999, 2), (10, 1)):
        for _ in range(n):
            clean.add(unit)
    assert len(clean.counts) == 2000 and clean.total(700) == 300 and clean.referenced == 5
    assert clean.compare(table, table.cache.get, "unit") == ([], 0, 5)
    bad = Recount(2000)
    for unit, n in ((3, 1), (700, 299), (1500, 4), (1999, 2), (42, 1), (5000, 2)):
        for _ in range(n):
            bad.add(unit)
    problems, leaked, used = bad.compare(table, table.cache.get, "unit")
    assert (leaked, used) == (1, 5)
    assert problems == [
        "unit 10: leaked (reference count 1, nothing references it)",
        "unit 42: referenced 1 time(s) but free",
        "unit 700: reference count 300, but 299 reference(s) found",
        "unit 5000: referenced 2 time(s), but the pool has 2000 units",
    ]


def test_allocate_incref_decref(device: BlockDevice) -> None:
    table = make_table(device, 100)
    with table.cache.mtr():
        a = table.allocate()
        b = table.allocate()
        assert a != b
        assert table.incref(a) == 2
        assert table.get(a) == 2 and table.get(b) == 1
    assert (table.used, table.free) == (2, 98)
    assert table.free_in_page[0] == 98
    with table.cache.mtr():
        assert table.decref(a) == 1
        assert table.used == 2
        assert table.decref(a) == 0
        assert table.decref(b) == 0
    assert (table.used, table.free) == (0, 100)
    assert list(table.freed_pending()) == [a, b]
    with pytest.raises(AssertionError, match="already zero"), table.cache.mtr():
        table.decref(a)


def test_counts_are_in_the_refcount_pages(device: BlockDevice) -> None:
    table = make_table(device, 2000)
    with table.cache.mtr():
        for unit, n in ((3, 1), (1500, 4), (1999, 2)):
            for _ in range(n):
                table.incref(unit)
    assert list(table.iter_counts(table.cache.get)) == [(3, 1), (1500, 4), (1999, 2)]
    assert table.cache.dirty_count == 2  # two refcount pages changed
    fresh = RefTable(table.cache, 0, 2000, "unit")
    for pi in range(fresh.pages):
        fresh.index_page(pi, table.cache.get(pi))
    assert fresh.used == 3 and list(fresh.free_in_page) == [REFS_PER_PAGE - 1,
                                                              2000 - REFS_PER_PAGE - 2]


def test_rollback_restores_counts_claims_and_frees(device: BlockDevice) -> None:
    table = make_table(device, 100)
    with table.cache.mtr():
        a = table.allocate()
        b = table.allocate()
    c = table.claim()
    snapshot = (table.used, list(table.free_in_page), set(table.claimed),
                list(table.freed_pending()), set(table.quarantine), table.get(a))
    with pytest.raises(RuntimeError), table.cache.mtr():
        table.allocate()
        table.incref(c)  # maps the claimed unit: no longer claimed
        assert c not in table.claimed
        table.decref(a)
        table.decref(b)
        table.incref(b)  # b goes 1 -> 0 -> 1
        table.claim()
        raise RuntimeError("rolled back")
    assert (table.used, list(table.free_in_page), set(table.claimed),
            list(table.freed_pending()), set(table.quarantine), table.get(a)) == snapshot
    assert table.get(c) == 0 and table.get(b) == 1


def test_claimed_units_are_not_handed_out_again(device: BlockDevice) -> None:
    table = make_table(device, 20)
    claimed = [table.claim() for _ in range(5)]
    assert len(set(claimed)) == 5
    assert table.used == 0, "a claim sets no count"
    with table.cache.mtr():
        others = [table.allocate() for _ in range(15)]
    assert not set(others) & set(claimed)
    with pytest.raises(NbdError) as e:
        table.claim()
    assert e.value.errno == errno.ENOSPC
    table.unclaim(claimed[0])
    assert table.claim() == claimed[0]
    with table.cache.mtr():
        table.incref(claimed[1])
    assert claimed[1] not in table.claimed and table.get(claimed[1]) == 1


def test_claims_ahead_come_from_one_run_in_order(device: BlockDevice) -> None:
    """Claims `ahead` take a spare run once and hand it out in order; spare units are
    claimed (nobody else takes them) but not in flight, and counting one (mapping it)
    takes it out of the claims."""
    table = make_table(device, 3 * SPARE_RUN)
    first = [table.claim(ahead=True) for _ in range(3)]
    assert first == [first[0], first[0] + 1, first[0] + 2]
    assert len(table.claimed) == SPARE_RUN and table.in_flight == 3
    with table.cache.mtr():
        other = table.allocate()  # a plain allocation skips the spare run
    assert not first[0] <= other < first[0] + SPARE_RUN
    rest = [table.claim(ahead=True) for _ in range(SPARE_RUN - 3)]
    assert rest == list(range(first[0] + 3, first[0] + SPARE_RUN))
    assert not table.spare and table.in_flight == SPARE_RUN
    with table.cache.mtr():
        table.incref(first[0])
    assert first[0] not in table.claimed and table.in_flight == SPARE_RUN - 1
    nxt = table.claim(ahead=True)  # a new run, after the one used up
    assert nxt not in first + rest + [other]
    assert table.spare == range(nxt + 1, nxt + 1 + len(table.spare)) and table.spare


def test_a_rolled_back_claim_ahead_goes_back_to_the_spare_run(device: BlockDevice) -> None:
    table = make_table(device, 100)
    a = table.claim(ahead=True)
    spare, claimed = table.spare, set(table.claimed)
    with pytest.raises(RuntimeError), table.cache.mtr():
        b = table.claim(ahead=True)
        assert b == a + 1
        raise RuntimeError("rolled back")
    assert table.spare == spare and table.claimed == claimed
    assert table.claim(ahead=True) == a + 1


def test_a_full_table_lets_the_spare_run_go(device: BlockDevice) -> None:
    """The spare run is free space: when nothing else is free, a claim or an allocation
    takes its units rather than failing."""
    table = make_table(device, 20)
    a = table.claim(ahead=True)  # the spare run is the whole table
    assert table.in_flight == 1 and len(table.claimed) == 20
    with table.cache.mtr():
        others = [table.allocate() for _ in range(19)]
    assert a not in others and len(set(others)) == 19
    assert table.claimed == {a} and not table.spare
    with pytest.raises(NbdError) as e:
        table.claim(ahead=True)
    assert e.value.errno == errno.ENOSPC


def test_enospc_when_full(device: BlockDevice) -> None:
    table = make_table(device, 16)
    with table.cache.mtr():
        for _ in range(16):
            table.allocate()
    with pytest.raises(NbdError) as e, table.cache.mtr():
        table.allocate()
    assert e.value.errno == errno.ENOSPC and "no free unit" in str(e.value)
    assert table.used == 16


def test_next_fit_and_hints(device: BlockDevice) -> None:
    table = make_table(device, 3 * REFS_PER_PAGE)
    with table.cache.mtr():
        first = [table.allocate() for _ in range(5)]
        assert first == [0, 1, 2, 3, 4]
        table.decref(1)
    table.snapshot_freed(1, quarantine=True)
    table.commit_durable(1)
    with table.cache.mtr():
        assert table.allocate() == 5, "next fit: the cursor moves on past a freed unit"
        assert table.allocate(hint=1) == 1, "a free hint is taken"
        assert table.allocate(hint=2) == 6, "a used hint: the next free one in its page"
        assert table.allocate(hint=2000) == 2000
    table.cursor = 3 * REFS_PER_PAGE - 2
    with table.cache.mtr():
        assert table.allocate() == 3 * REFS_PER_PAGE - 2
        assert table.allocate() == 3 * REFS_PER_PAGE - 1
        assert table.allocate() == 7, "wraps round to the start"


def test_full_pages_are_skipped(device: BlockDevice) -> None:
    table = make_table(device, 3 * REFS_PER_PAGE)
    with table.cache.mtr():
        for unit in range(REFS_PER_PAGE):
            table.incref(unit)
    assert table.free_in_page[0] == 0
    table.cursor = 0
    with table.cache.mtr():
        assert table.allocate() == REFS_PER_PAGE
        assert table.allocate(hint=10) == REFS_PER_PAGE + 1
    assert table.run_length_free(REFS_PER_PAGE + 2, 50) == 50
    assert table.run_length_free(REFS_PER_PAGE - 3, 50) == 0


def test_freed_unit_waits_for_the_durable_commit(device: BlockDevice) -> None:
    """A unit freed since the last commit is still referenced on disk: it must not be
    handed out again until the commit that frees it is durable (else a crash, or an
    I/O still in flight, lets another volume's data show up in the old owner)."""
    table = make_table(device, 40)
    with table.cache.mtr():
        units = [table.allocate() for _ in range(40)]
        table.decref(units[7])
    assert table.free == 1
    with pytest.raises(NbdError):  # freed, but not durable: not usable
        table.claim(hint=units[7])
    assert table.find_free(units[7]) is None
    table.snapshot_freed(5, quarantine=True)  # the commit is being written
    assert units[7] in table.quarantine
    assert table.find_free(units[7]) is None
    table.commit_durable(4)  # an older commit: changes nothing
    assert table.find_free() is None
    table.commit_durable(5)
    assert not table.quarantine
    assert table.find_free(0) == units[7]


def test_rollback_of_a_free_keeps_the_unit_counted(device: BlockDevice) -> None:
    table = make_table(device, 10)
    with table.cache.mtr():
        a = table.allocate()
    with pytest.raises(KeyError), table.cache.mtr():
        table.decref(a)
        raise KeyError
    assert table.get(a) == 1 and a not in table.quarantine
    assert list(table.freed_pending()) == []
    table.snapshot_freed(1, quarantine=True)
    assert not table.quarantine


def test_metadata_frees_need_no_quarantine(device: BlockDevice) -> None:
    table = make_table(device, 10, quarantine_frees=False)
    with table.cache.mtr():
        a = table.allocate()
        table.decref(a)
    assert not table.quarantine
    table.snapshot_freed(3, quarantine=False)
    assert not table.quarantine
    table.cursor = a
    with table.cache.mtr():
        assert table.allocate() == a


# -- in a pool -----------------------------------------------------------------------------


async def test_pool_quarantine_outlives_inflight_transfers(make_pool: PoolFactory) -> None:
    """A chunk trimmed away is reused only after the commit that freed it is durable AND
    every transfer begun before then has ended (I/O epochs)."""
    env = await make_pool("radix")  # offline: find_free reads refcount pages synchronously
    pool = env.pool
    vol = await env.create("v", 64 * KiB)
    await vol.write(0, pattern(1, 8192))
    await vol.flush()
    (run,) = pool.map.lookup(pool.volume("v"), 0, 1)
    pc = run.pc
    reader = pool.epochs.begin_read()  # a read of that chunk, still in flight
    await vol.trim(0, 4096)
    assert pool.data.get(pc) == 0
    assert pool.data.find_free(pc) != pc, "freed but not durable: not reusable"
    await vol.flush()  # the free is durable now, but the read is still going
    assert pool.data.find_free(pc) != pc, "reusable while a read begun before may touch it"
    pool.epochs.end_read(reader)
    assert pool.data.find_free(pc) == pc
    await env.assert_clean()


async def test_pool_free_counts_follow_writes_and_trims(make_pool: PoolFactory) -> None:
    env = await make_pool("radix", chunk_size=16 * KiB)
    pool = env.pool
    free0 = pool.data.free
    vol = await env.create("v", 256 * KiB)
    await vol.write(0, pattern(2, 64 * KiB))  # 4 chunks
    assert pool.data.free == free0 - 4
    await vol.write(20 * KiB, pattern(3, 1))  # inside chunk 1: in place
    assert pool.data.free == free0 - 4
    await vol.trim(16 * KiB, 32 * KiB)  # chunks 1 and 2
    assert pool.data.free == free0 - 2
    await vol.trim(0, 100)  # partial: zeros written, chunk kept
    assert pool.data.free == free0 - 2
    await env.delete("v")
    assert pool.data.free == free0
    await env.assert_clean()


def test_claim_run_takes_consecutive_free_units(device: BlockDevice) -> None:
    table = make_table(device, 2 * REFS_PER_PAGE)
    with table.cache.mtr():
        table.incref(10)  # used
    table.claim(hint=14)  # claimed by another write
    table.quarantine.add(20)  # freed, not durable yet
    table.cursor = 0
    assert table.claim_run(hint=4, limit=100) == (4, 6), "stops before the used unit 10"
    assert table.claim_run(hint=11, limit=100) == (11, 3), "stops before the claimed 14"
    assert table.claim_run(hint=15, limit=3) == (15, 3), "at most `limit`"
    assert table.claim_run(hint=18, limit=100) == (18, 2), "stops before the quarantined 20"
    assert set(range(4, 10)) | set(range(11, 18)) | {18, 19} <= table.claimed
    assert table.used == 1, "claims set no count"
    first, n = table.claim_run(hint=REFS_PER_PAGE - 3, limit=100)
    assert (first, n) == (REFS_PER_PAGE - 3, 3), "a run stays within its refcount page"


def test_claim_run_rolls_back_and_counts_a_run_once(device: BlockDevice) -> None:
    table = make_table(device, 3 * REFS_PER_PAGE)
    before = (set(table.claimed), table.used, list(table.free_in_page), table.cursor)
    with pytest.raises(RuntimeError), table.cache.mtr():
        first, n = table.claim_run(hint=None, limit=50)
        assert n == 50 and set(range(first, first + n)) <= table.claimed
        raise RuntimeError("rolled back")
    assert (set(table.claimed), table.used, list(table.free_in_page)) == before[:3]
    first, n = table.claim_run(hint=REFS_PER_PAGE - 10, limit=40)
    assert (first, n) == (REFS_PER_PAGE - 10, 10)
    with table.cache.mtr():  # mapping the run counts each unit once and ends its claim
        table.incref_run(first, n)
        table.incref_run(REFS_PER_PAGE - 5, 20)  # across two pages, half already counted
    assert table.used == 25 and not table.claimed
    assert [table.get(u) for u in (REFS_PER_PAGE - 10, REFS_PER_PAGE - 5, REFS_PER_PAGE + 14)] \
        == [1, 2, 1]
    assert table.free_in_page[0] == REFS_PER_PAGE - 10 and table.free_in_page[1] == \
        REFS_PER_PAGE - 15
    with table.cache.mtr():
        table.decref_run(REFS_PER_PAGE - 10, 25)
    assert table.used == 5 and sorted(table.freed_pending()) == sorted(
        [*range(REFS_PER_PAGE - 10, REFS_PER_PAGE - 5), *range(REFS_PER_PAGE, REFS_PER_PAGE + 15)])
    assert table.free_in_page[0] == REFS_PER_PAGE - 5 and table.free_in_page[1] == \
        REFS_PER_PAGE


async def test_spare_chunks_count_as_free_space(make_pool: PoolFactory) -> None:
    """4 KiB first writes after a snapshot claim chunks ahead (radix): the spare ones
    are still free space for `pool info` and for every volume's writes."""
    env = await make_pool("radix")
    pool = env.pool
    vol = await env.create("v", 64 * KiB)
    await vol.write(0, pattern(1, 64 * KiB))
    await env.snapshot("v", "s")
    before = pool.available_chunks()
    await vol.write(4 * KiB, pattern(2, 4 * KiB))  # one fresh chunk
    assert pool.data.spare, "the write claimed a run ahead"
    assert pool.data.in_flight == 0
    assert pool.available_chunks() == before - 1
    await env.assert_clean()


async def test_claims_take_only_the_room_a_volume_has(make_pool: PoolFactory) -> None:
    """A claim's room (Pool._may_take, the check of every first write): a thin volume
    takes free chunks not in flight and not promised (spare ones included, as in
    available_chunks); a guaranteed volume with chunks still promised takes those.
    (Default map parameters: with tiny nodes the pool could not promise the guaranteed
    volume's map pages.)"""
    env = await make_pool("radix", small=False)
    pool = env.pool
    vol = await env.create("v", 64 * KiB)
    await vol.write(0, pattern(1, 64 * KiB))
    await env.snapshot("v", "s")
    await vol.write(4 * KiB, pattern(2, 4 * KiB))  # a spare run claimed ahead
    assert pool.data.spare
    thin = pool.volume("v")
    room = pool.available_chunks()
    pool._may_take(thin, room)  # all of it: no error
    with pytest.raises(NbdError) as e:
        pool._may_take(thin, room + 1)
    assert e.value.errno == errno.ENOSPC
    # Promise all but 3 of the room to a guaranteed volume: the thin one keeps 3 ...
    chunk = pool.chunk_size
    await env.create("g", (room - 3) * chunk, guarantee=True)
    promised = pool.volume("g")
    assert promised.reserved == room - 3 and pool.available_chunks() == 3
    pool._may_take(thin, 3)
    with pytest.raises(NbdError):
        pool._may_take(thin, 4)
    # ... and the guaranteed one may take the promised chunks and those 3.
    pool._may_take(promised, room)
    with pytest.raises(NbdError):
        pool._may_take(promised, room + 1)
