"""The metadata page cache: mini-transactions, PageMiss and retry, pins, eviction.

The cache reads its pages from a real O_DIRECT file of sealed pages (the same
sync page reader the pool uses), so loading verifies real checksums.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from poolkit import pattern

from nbdserver.pool.format import (
    PAGE_HEADER,
    PAGE_SIZE,
    PT_CATALOG,
    PT_MAP,
    PT_RADIX,
    FormatError,
    seal_page,
    verify_page,
)
from nbdserver.pool.pages import SPANS_PER_MTR, PageCache, PageMiss
from nbdserver.pool.pool import _read_pages_sync, _write_page_sync
from nbdserver.storage.device import BlockDevice, open_device

NPAGES = 64


def content(no: int) -> bytearray:
    page = bytearray(PAGE_SIZE)
    page[16:] = pattern(no, PAGE_SIZE - 16)
    seal_page(no, page, PT_MAP, 1)
    return page


@pytest.fixture
def device(tmp_path: Path) -> Iterator[BlockDevice]:
    dev = open_device(tmp_path / "pages.img", create_size=NPAGES * PAGE_SIZE)
    for no in range(NPAGES):
        _write_page_sync(dev, no, content(no))
    try:
        yield dev
    finally:
        dev.close()


def make_cache(device: BlockDevice, capacity: int = 16) -> PageCache:
    async def read_page(no: int) -> bytes:
        return _read_pages_sync(device, no, 1)

    return PageCache(capacity, read_page)


async def test_get_misses_then_load(device: BlockDevice) -> None:
    cache = make_cache(device)
    with pytest.raises(PageMiss) as miss:
        cache.get(3)
    assert miss.value.page_no == 3
    page = await cache.load(3)
    assert page.ptype == PT_MAP and not page.dirty and page.pins == 0
    assert cache.get(3) == content(3)
    assert cache.loads == 1
    await cache.load(3)
    assert cache.loads == 1, "a cached page is not read again"


async def test_sync_reader_loads_without_miss(device: BlockDevice) -> None:
    cache = make_cache(device)
    cache.sync_reader = lambda no: _read_pages_sync(device, no, 1)
    assert cache.get(5) == content(5) and 5 in cache


async def test_sync_reads_keep_the_cache_within_its_capacity(device: BlockDevice) -> None:
    """`pool check` and offline tools read every page of a walk synchronously; the cache
    must evict as it goes (it held every page of the walk until the next mini-transaction
    ended, so a check of a large pool held all its metadata)."""
    cache = make_cache(device)
    cache.sync_reader = lambda no: _read_pages_sync(device, no, 1)
    seen = 0
    for no in range(NPAGES):
        data = cache.get(no)
        assert data == content(no)
        seen = max(seen, cache.cached_count)
    assert seen == cache.capacity
    assert cache.evictions == NPAGES - cache.capacity
    with cache.mtr():  # pages changed in a transaction stay, whatever the reads after
        cache.modify(0)[100] = 1
        for no in range(1, NPAGES):
            cache.get(no)
        assert cache.peek(0) is not None and cache.peek(0)[100] == 1


async def test_load_verifies_checksum(device: BlockDevice) -> None:
    bad = content(7)
    bad[100] ^= 1
    _write_page_sync(device, 7, bad)
    cache = make_cache(device)
    with pytest.raises(FormatError, match="metadata page 7: checksum"):
        await cache.load(7)
    # A page written to the wrong place (another page's number in its CRC) is caught too.
    _write_page_sync(device, 8, content(9))
    with pytest.raises(FormatError, match="metadata page 8"):
        await cache.load(8)
    assert 7 not in cache and 8 not in cache


async def test_modify_outside_mtr_is_refused(device: BlockDevice) -> None:
    cache = make_cache(device)
    await cache.load(1)
    with pytest.raises(RuntimeError):
        cache.modify(1)
    with pytest.raises(RuntimeError):
        cache.create(50, PT_MAP)
    with pytest.raises(RuntimeError):
        cache.add_undo(lambda: None)
    assert not cache.in_mtr


async def test_rollback_restores_pages_and_hooks(device: BlockDevice) -> None:
    cache = make_cache(device)
    for no in (1, 2, 3):
        await cache.load(no)
    with cache.mtr():  # page 2 is dirty before the failing transaction
        cache.modify(2)[200] = 0xAB
    before2 = bytearray(cache.get(2))
    state = {"x": 0, "order": []}

    class Boom(Exception):
        pass

    with pytest.raises(Boom), cache.mtr():
        assert cache.in_mtr
        page = cache.modify(1, PT_RADIX)
        page[16:32] = b"\xff" * 16
        page = cache.modify(1)  # a second modify keeps the first before-image
        page[40] = 7
        cache.modify(2)[300] = 0xCD
        cache.create(40, PT_CATALOG)[20] = 1  # a new page
        cache.create(3, PT_RADIX)  # a cached page created anew: zero-filled
        assert not any(cache.get(3))
        state["x"] = 5
        cache.add_undo(lambda: state["order"].append("first"))
        cache.add_undo(lambda: state["order"].append("second"))
        cache.add_undo(lambda: state.__setitem__("x", 0))
        raise Boom
    assert not cache.in_mtr
    assert state["order"] == ["second", "first"], "undo hooks run newest first"
    assert state["x"] == 0
    assert cache.get(1) == content(1) and cache._pages[1].ptype == PT_MAP
    assert not cache._pages[1].dirty
    assert cache.get(2) == before2 and cache._pages[2].dirty, "was dirty before: stays dirty"
    assert cache.get(3) == content(3) and not cache._pages[3].dirty
    assert 40 not in cache
    assert cache.dirty_count == 1
    assert [no for no, _ in cache.take_dirty(9)] == [2]


async def test_rollback_restores_spans_with_images_and_dirty_marks(
        device: BlockDevice) -> None:
    """modify_span keeps only the bytes it is told of: a rollback restores them (latest
    first, after the images of pages imaged later), the page type, and the clean or
    dirty mark each page had before the transaction; a commit keeps every change."""
    cache = make_cache(device)
    for no in (1, 2, 3, 4):
        await cache.load(no)
    with cache.mtr():  # page 2 is dirty before the failing transaction
        cache.modify(2)[500] = 0x11
    before2 = bytearray(cache.get(2))
    with pytest.raises(KeyError), cache.mtr():
        cache.modify_span(1, 64, 8, PT_RADIX)[64:72] = b"\xaa" * 8
        cache.modify_span(1, 64, 8, PT_RADIX)[64:68] = b"\xbb" * 4  # the same bytes again
        cache.modify_span(1, 128, 4, PT_RADIX)[128:132] = b"\xcc" * 4
        cache.modify_span(2, 200, 4, PT_RADIX)[200:204] = b"\xdd" * 4
        # page 3: a span, then a whole image (with the span's change in it), then more
        cache.modify_span(3, 32, 8, PT_RADIX)[32:40] = b"\xee" * 8
        page = cache.modify(3)
        page[32:40] = b"\x01" * 8
        page[1000] ^= 0xFF
        cache.modify_span(3, 2000, 4, PT_RADIX)[2000:2004] = b"\x02" * 4
        # page 4: an image first, then a span (the image undoes it)
        cache.modify(4)[900] ^= 0xFF
        cache.modify_span(4, 48, 8, PT_RADIX)[48:56] = b"\x03" * 8
        assert cache.dirty_count == 4
        raise KeyError("boom")
    for no in (1, 3, 4):
        assert cache.get(no) == content(no), f"page {no} not restored"
        assert not cache._pages[no].dirty and cache._pages[no].ptype == PT_MAP
    assert cache.get(2) == before2 and cache._pages[2].dirty, "was dirty before: stays dirty"
    assert cache.dirty_count == 1
    with cache.mtr():
        cache.modify_span(1, 64, 8, PT_RADIX)[64:72] = b"\x44" * 8
    assert cache.get(1)[64:72] == b"\x44" * 8 and cache._pages[1].dirty
    with pytest.raises(KeyError), cache.mtr():  # the committed span is not undone again
        cache.modify(2)[0] ^= 1
        raise KeyError("again")
    assert cache.get(1)[64:72] == b"\x44" * 8
    with pytest.raises(RuntimeError):
        cache.modify_span(1, 64, 8, PT_RADIX)


async def test_a_long_mtr_takes_images_after_its_span_budget(device: BlockDevice) -> None:
    """Bulk work changing many entries of a page keeps SPANS_PER_MTR spans, then whole
    images (one per page), and still rolls back to the state before it."""
    cache = make_cache(device)
    await cache.load(1)
    await cache.load(2)
    with pytest.raises(KeyError), cache.mtr():
        for k in range(SPANS_PER_MTR + 50):
            off = 64 + 4 * (k % 900)
            cache.modify_span(1 + k % 2, off, 4, PT_RADIX)[off:off + 4] = b"\x5a" * 4
        assert len(cache._undo_spans) == SPANS_PER_MTR
        assert cache._undo is not None and set(cache._undo) == {1, 2}
        raise KeyError("boom")
    assert cache.get(1) == content(1) and cache.get(2) == content(2)
    assert cache.dirty_count == 0


async def test_nested_mtr_rolls_back_as_one(device: BlockDevice) -> None:
    cache = make_cache(device)
    await cache.load(1)
    await cache.load(2)
    with pytest.raises(KeyError), cache.mtr():
        cache.modify(1)[100] ^= 1
        with cache.mtr():
            cache.modify(2)[100] ^= 1
            raise KeyError("inner")
    assert cache.get(1) == content(1) and cache.get(2) == content(2)
    assert cache.dirty_count == 0


async def test_successful_mtr_keeps_changes(device: BlockDevice) -> None:
    cache = make_cache(device)
    await cache.load(1)
    hook_ran = []
    with cache.mtr():
        cache.modify(1)[100] = 0x42
        cache.create(45, PT_RADIX)[100] = 0x43
        cache.add_undo(lambda: hook_ran.append(1))
    assert not hook_ran
    assert cache.get(1)[100] == 0x42 and cache.get(45)[100] == 0x43
    assert cache.dirty_count == 2


async def test_run_retries_after_page_miss(device: BlockDevice) -> None:
    """run() loads each missing page and runs the operation again from the start; the
    changes of the failed attempts are rolled back, pins are held until it succeeds."""
    cache = make_cache(device)
    await cache.load(0)
    attempts = []
    pins_seen: list[list[int]] = []

    def op() -> int:
        attempts.append(1)
        page = cache.modify(0)
        page[100] = (page[100] + 1) & 0xFF  # rolled back unless the attempt succeeds
        total = 0
        for no in (10, 11, 12):
            total += cache.get(no)[16]
        pins_seen.append([cache._pages[no].pins for no in (10, 11, 12) if no in cache])
        return total

    total = await cache.run(op)
    assert total == sum(content(no)[16] for no in (10, 11, 12))
    assert len(attempts) == 4
    assert cache.get(0)[100] == (content(0)[100] + 1) & 0xFF, "incremented exactly once"
    assert pins_seen[-1] == [1, 1, 1], "pages loaded for the retry are pinned meanwhile"
    assert all(cache._pages[no].pins == 0 for no in (10, 11, 12)), "unpinned afterwards"


async def test_run_failure_rolls_back_and_unpins(device: BlockDevice) -> None:
    cache = make_cache(device)
    await cache.load(0)

    def op() -> None:
        cache.modify(0)[200] = 1
        cache.get(20)
        raise ValueError("ENOSPC, say")

    with pytest.raises(ValueError):
        await cache.run(op)
    assert cache.get(0) == content(0) and cache.dirty_count == 0
    assert cache._pages[20].pins == 0


async def test_more_pages_than_capacity_in_one_operation(device: BlockDevice) -> None:
    """An operation may need more pages than the cache holds: the pinned pages of the
    retries stay until it succeeds, then the cache shrinks back to its capacity."""
    cache = make_cache(device, capacity=16)
    pages = list(range(30, 30 + 24))

    def op() -> int:
        return sum(cache.get(no)[20] for no in pages)

    assert await cache.run(op) == sum(content(no)[20] for no in pages)
    assert len(cache._pages) <= cache.capacity
    assert cache.evictions >= 24 - 16


async def test_pin_keeps_a_page(device: BlockDevice) -> None:
    cache = make_cache(device)
    await cache.load(2, pin=True)
    cache.pin(2)
    for no in range(10, 40):
        await cache.load(no)
    assert 2 in cache and cache._pages[2].pins == 2
    assert len(cache._pages) == cache.capacity


async def test_eviction_is_lru(device: BlockDevice) -> None:
    cache = make_cache(device)
    for no in range(16):
        await cache.load(no)
    cache.get(0)  # 0 becomes the most recently used
    await cache.load(20)
    assert 0 in cache and 1 not in cache
    assert cache.evictions == 1


async def test_a_kept_page_marked_recent_gets_a_second_chance(device: BlockDevice) -> None:
    """A reader that keeps a Page (the radix leaf memory) bumps it by marking it recent,
    not by moving it: eviction then spares it once, as if it had been bumped."""
    cache = make_cache(device)
    cache.sync_reader = lambda no: _read_pages_sync(device, no, 1)
    kept = cache.keep(0)
    assert kept.words is not None and kept.words.format == "Q"
    for no in range(1, 16):
        await cache.load(no)  # 0 is now the least recently used
    kept.recent = True  # read through the kept page
    await cache.load(20)
    assert 0 in cache and 1 not in cache, "the recent page was spared, the next one went"
    assert not kept.recent and kept.cached
    await cache.load(21)
    assert 2 not in cache and 0 in cache, "spared pages moved to the hot end"
    for no in range(22, 40):  # not marked again: it ages out like any page
        await cache.load(no)
    assert 0 not in cache


async def test_a_kept_page_that_leaves_the_cache_says_so_and_frees_its_bytes(
        device: BlockDevice) -> None:
    """Once evicted (or dropped), a kept Page is stale: the next copy of the page is
    another Page, so `cached` turns False and the old bytes are let go (the kept Page
    must not hold memory beyond the cache's bound)."""
    cache = make_cache(device)
    cache.sync_reader = lambda no: _read_pages_sync(device, no, 1)
    kept = cache.keep(3)
    assert kept.words is not None
    assert kept.words[2] == int.from_bytes(content(3)[16:24], "little")
    for no in range(20, 40):
        await cache.load(no)
    assert 3 not in cache
    assert not kept.cached and kept.words is None and len(kept.data) == 0
    with cache.mtr():  # changed after it came back: the new Page has it, the old never
        cache.modify(3)[16] ^= 0xFF
    again = cache.keep(3)
    assert again is not kept and again.cached
    assert again.words is not None and again.words[2] != int.from_bytes(content(3)[16:24],
                                                                      "little")
    cache.drop_all()
    assert not again.cached and again.words is None


async def test_eviction_never_drops_dirty_or_home_pending_pages(device: BlockDevice) -> None:
    cache = make_cache(device)
    for no in range(20):
        await cache.load(no)
    assert len(cache._pages) == 16
    with cache.mtr():
        for no in range(4, 20):  # dirty: all 16 cached pages
            cache.modify(no)[100] ^= 0x5A
        cache.create(60, PT_MAP)  # the cache is now over capacity, with nothing evictable
    for no in range(30, 35):
        await cache.load(no)
    for no in [*range(4, 20), 60]:
        assert no in cache and cache._pages[no].dirty
    assert cache.over_capacity()
    images = cache.take_dirty(77)
    assert [no for no, _ in images] == [*range(4, 20), 60]
    for no, img in images:
        assert verify_page(no, img) == PT_MAP
        assert PAGE_HEADER.unpack_from(img)[3] == 77  # the commit's sequence number
        assert cache.get(no)[:16] == img[:16], "the cached copy carries the new header"
        assert not cache._pages[no].dirty and cache._pages[no].home_pending == 1
    for no in range(40, 50):
        await cache.load(no)
    for no in [*range(4, 20), 60]:
        assert no in cache, "a page whose home write is pending must stay"
    for no, _ in images:
        cache.home_written(no)
    assert not cache.over_capacity()
    assert sum(no in cache for no in [*range(4, 20), 60]) < 17


async def test_page_dirtied_again_while_home_pending(device: BlockDevice) -> None:
    cache = make_cache(device)
    await cache.load(5)
    with cache.mtr():
        cache.modify(5)[100] = 1
    cache.take_dirty(1)
    with cache.mtr():
        cache.modify(5)[100] = 2
    cache.take_dirty(2)
    assert cache._pages[5].home_pending == 2
    cache.home_written(5)
    for no in range(20, 40):
        await cache.load(no)
    assert 5 in cache, "one home write is still pending"
    cache.home_written(5)
    for no in range(40, 60):
        await cache.load(no)
    assert 5 not in cache


async def test_rollback_of_first_modify_after_commit_restores_sealed_header(
        device: BlockDevice) -> None:
    cache = make_cache(device)
    await cache.load(5)
    with cache.mtr():
        cache.modify(5)[100] = 1
    (_, img), = cache.take_dirty(3)
    with pytest.raises(ZeroDivisionError), cache.mtr():
        cache.modify(5)[100] = 9
        raise ZeroDivisionError
    assert cache.get(5) == img and not cache._pages[5].dirty
    assert cache._pages[5].home_pending == 1


def make_cache_ahead(device: BlockDevice, capacity: int, reads: list[tuple[int, int]],
                     during: object = None) -> PageCache:
    """A cache with read-ahead from the device; `reads` records each (first, count) read;
    `during`, if set, is called while a read-ahead is in flight."""
    async def read_page(no: int) -> bytes:
        return _read_pages_sync(device, no, 1)

    async def read_ahead(first: int, count: int) -> list[tuple[int, bytes]]:
        count = min(count, NPAGES - first)
        reads.append((first, count))
        if callable(during):
            during()
        raw = _read_pages_sync(device, first, count)
        return [(first + i, raw[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]) for i in range(count)]

    return PageCache(capacity, read_page, read_ahead)


async def test_a_scan_on_a_cold_cache_restarts_per_batch_not_per_page(
        device: BlockDevice) -> None:
    reads: list[tuple[int, int]] = []
    cache = make_cache_ahead(device, 128, reads)
    attempts = [0]

    def scan() -> int:
        attempts[0] += 1
        return sum(cache.get(no)[20] for no in range(NPAGES))

    want = sum(content(no)[20] for no in range(NPAGES))
    assert await cache.run(scan) == want
    # First miss: one page (a point lookup pays nothing extra); then 32 pages per read.
    assert reads == [(1, 32), (33, 31)], reads
    assert attempts[0] == 4, attempts  # not NPAGES + 1
    assert cache.read_ahead_pages == NPAGES - 3


async def test_read_ahead_pages_go_in_cold_and_never_evict_the_working_set(
        device: BlockDevice) -> None:
    reads: list[tuple[int, int]] = []
    cache = make_cache_ahead(device, 40, reads)
    for no in (40, 41, 42):  # the working set, recently used
        await cache.load(no)
        cache.get(no)

    def two() -> None:
        cache.get(0)
        cache.get(1)

    await cache.run(two)  # the second miss reads ahead pages 1..32
    assert reads == [(1, 32)]
    cache.capacity = 16
    cache._evict()  # the pages read ahead and not used go first
    for no in (40, 41, 42, 0, 1):
        assert no in cache, no
    assert 2 not in cache and len(cache._pages) == 16


async def test_a_full_cache_loads_one_page_at_a_time(device: BlockDevice) -> None:
    """Pages read ahead into a full cache would be evicted unused: no read-ahead there."""
    reads: list[tuple[int, int]] = []
    cache = make_cache_ahead(device, 20, reads)
    for no in range(40, 60):
        await cache.load(no)

    def two() -> None:
        cache.get(0)
        cache.get(1)

    await cache.run(two)
    assert reads == [] and 0 in cache and 1 in cache


async def test_read_ahead_skips_pages_evicted_while_it_read(device: BlockDevice) -> None:
    """A page evicted during the read may have been written home after the read saw
    it: the read's copy may be stale, so it must not be inserted."""
    reads: list[tuple[int, int]] = []
    cache: PageCache

    def evict_five() -> None:
        cache._pages.move_to_end(5, last=False)
        cache.capacity = len(cache._pages) - 1
        cache._evict()  # page 5 goes: the oldest clean page
        cache.capacity = 64

    cache = make_cache_ahead(device, 64, reads, during=evict_five)
    await cache.load(5)

    def two() -> None:
        cache.get(0)
        cache.get(1)

    await cache.run(two)
    assert 5 not in cache
    assert 6 in cache and 1 in cache


async def test_concurrent_read_aheads_track_their_own_evictions(device: BlockDevice) -> None:
    """Two read-aheads in flight, finishing in the other order, with an eviction between:
    each must end cleanly and skip only what was evicted during its own read."""
    gates = {1: asyncio.Event(), 40: asyncio.Event()}

    async def read_page(no: int) -> bytes:
        return _read_pages_sync(device, no, 1)

    async def read_ahead(first: int, count: int) -> list[tuple[int, bytes]]:
        await gates[first].wait()
        count = min(count, NPAGES - first)
        raw = _read_pages_sync(device, first, count)
        return [(first + i, raw[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]) for i in range(count)]

    cache = PageCache(64, read_page, read_ahead)
    await cache.load(33)

    def first_op() -> None:
        cache.get(0)
        cache.get(1)

    def second_op() -> None:
        cache.get(39)
        cache.get(40)

    a = asyncio.ensure_future(cache.run(first_op))
    b = asyncio.ensure_future(cache.run(second_op))
    for _ in range(10):
        await asyncio.sleep(0)
    gates[40].set()
    await b
    cache._pages.move_to_end(33, last=False)
    cache.capacity = len(cache._pages) - 1
    cache._evict()  # page 33 goes while the first read-ahead (pages 1..32) is in flight
    cache.capacity = 64
    gates[1].set()
    await a
    assert 2 in cache and 45 in cache
