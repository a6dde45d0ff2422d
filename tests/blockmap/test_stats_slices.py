"""`volume info` walks a volume's map a slice at a time, with bounded memory.

``Pool.volume_stats`` asks the design for one slice of the volume after another
(:meth:`BlockMap.exclusive_range`), each as its own operation: a page miss
restarts one slice, not the whole walk, and the pages pinned meanwhile are one
slice's. Before, one operation walked the whole map, pinning every page it
loaded and starting again from chunk 0 after each miss: with a small cache, a
fully written 4 GiB volume took minutes and held six times the cache.

- The numbers must not depend on the slicing: slices of 1, 3, 7 and 64 chunks
  give what one slice over the whole volume gives, for every design, on volumes
  that share chunks and map pages with their parents.
- With the smallest cache, a volume whose map is many times the cache is walked
  with at most the cache plus one slice in memory, loading each page about once.
"""

from __future__ import annotations

import random
from dataclasses import asdict
from typing import Any

import pytest
from poolkit import PoolEnv, PoolFactory, design_names, pattern

from nbdserver.pool.pages import PageCache


async def _scribble(env: PoolEnv, name: str, rng: random.Random, chunks: int,
                    writes: int) -> None:
    chunk = env.chunk_size
    vol = env.vol(name)
    for _ in range(writes):
        first = rng.randrange(chunks)
        n = min(chunks - first, rng.choice((1, 1, 2, 5, 9)))
        if rng.random() < 0.15:
            await vol.trim(first * chunk, n * chunk)
        else:
            await vol.write(first * chunk, pattern(rng.randrange(1 << 30), n * chunk))


async def _family(env: PoolEnv, chunks: int) -> list[str]:
    """A volume and clones of it, each changed a little: shared chunks and pages."""
    rng = random.Random(11)
    await env.create("a", chunks * env.chunk_size)
    await _scribble(env, "a", rng, chunks, 60)
    if env.design == "linear":  # (snapshots of the origin only)
        names = ["a", "s1", "s2"]
        await env.snapshot("a", "s1")
        await _scribble(env, "a", rng, chunks, 25)
        await env.snapshot("a", "s2")
        await _scribble(env, "a", rng, chunks, 25)
        return names
    await env.fork("a", "b")
    await _scribble(env, "b", rng, chunks, 25)
    await env.snapshot("b", "c")
    await env.fork("c", "d")
    await _scribble(env, "d", rng, chunks, 25)
    await _scribble(env, "a", rng, chunks, 25)
    return ["a", "b", "c", "d"]


@pytest.mark.parametrize("design", design_names())
async def test_stats_do_not_depend_on_the_slicing(make_pool: PoolFactory, design: str,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    env = await make_pool(design)
    chunks = 301  # not a multiple of any slice
    names = await _family(env, chunks)
    pool = env.pool
    shared = 0
    for name in names:
        vol = pool.volume(name)
        pool.stats_slice = 1 << 30
        with monkeypatch.context() as m:  # one slice, from chunk 0: nothing skipped
            m.setattr(type(pool.map), "skip_empty", lambda self, v, lc, end: lc)
            whole = asdict(await pool.volume_stats(vol))
        assert whole["mapped_chunks"] > 0 and whole["metadata_pages"] > 0
        shared += whole["mapped_chunks"] - whole["exclusive_chunks"]
        for step in (1, 3, 7, 64, 0):
            pool.stats_slice = step
            got = asdict(await pool.volume_stats(vol))
            assert got == whole, f"{name}: slices of {step or 'default'} chunks"
    assert shared > 0  # the family shares chunks: exclusive counts were really tested


@pytest.mark.parametrize("design", design_names())
async def test_a_map_larger_than_the_cache_is_walked_within_it(
        make_pool: PoolFactory, design: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = await make_pool(design, offline=False, size=256 << 20)  # 16 pages of cache
    chunk = env.chunk_size
    chunks = 4096
    vol = await env.create("v", chunks * chunk)
    rng = random.Random(5)
    for first in rng.sample(range(chunks), 900):  # scattered: many map pages
        await vol.write(first * chunk, pattern(first, chunk))
    await env.pool.commit()
    pool = env.pool
    cache = pool.cache
    peak = [0]
    for name in ("load", "load_ahead"):
        plain = getattr(PageCache, name)

        async def spy(self: PageCache, *args: Any, _plain: Any = plain, **kw: Any) -> Any:
            page = await _plain(self, *args, **kw)
            peak[0] = max(peak[0], self.cached_count)
            return page

        monkeypatch.setattr(PageCache, name, spy)
    loads = cache.loads + cache.read_ahead_pages
    stats = await pool.volume_stats(pool.volume("v"))
    loaded = cache.loads + cache.read_ahead_pages - loads
    assert stats.mapped_chunks == 900
    assert stats.metadata_pages > 4 * cache.capacity  # the map is many times the cache
    # a slice pins at most its map pages (a path, and a leaf per chunk at worst) and a
    # refcount page per chunk
    slice_pages = 2 * pool.map.stats_slice() + 16
    assert peak[0] <= cache.capacity + slice_pages, (peak[0], cache.capacity, slice_pages)
    # each map page and refcount page read about once (one walk, not one per miss)
    refcount_pages = pool.data.pages
    assert loaded <= 3 * (stats.metadata_pages + refcount_pages), loaded


def _count_slices(pool: Any, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the slices the next walks ask for."""
    slices: list[int] = []
    plain = type(pool.map).exclusive_range

    def counting(self: Any, v: Any, lc: int, count: int, runs: Any) -> tuple[int, int]:
        slices.append(count)
        return plain(self, v, lc, count, runs)

    monkeypatch.setattr(type(pool.map), "exclusive_range", counting)
    return slices


@pytest.mark.parametrize("design", [d for d in design_names() if d != "linear"])
async def test_holes_are_skipped_not_walked(make_pool: PoolFactory, design: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # (linear volumes are thick: no holes to cross.) A thin 256 MiB volume, scattered
    # writes and a clone of it written too: the numbers with the holes skipped are the
    # numbers of a walk over every slice, in far fewer slices.
    env = await make_pool(design, size=256 << 20)  # (room for many small map pages)
    chunk = env.chunk_size
    chunks = (256 << 20) // chunk
    vol = await env.create("v", chunks * chunk)
    rng = random.Random(7)
    for _ in range(40):
        at = rng.randrange(chunks - 8)
        await vol.write(at * chunk, pattern(at, rng.randint(1, 8) * chunk))
    await env.fork("v", "w")
    for _ in range(10):
        at = rng.randrange(chunks - 8)
        await env.vol("w").write(at * chunk, pattern(at + 1, chunk))
    await vol.trim(0, chunks // 2 * chunk)
    pool = env.pool
    for name in ("v", "w"):
        v = pool.volume(name)
        with monkeypatch.context() as m:
            m.setattr(type(pool.map), "skip_empty", lambda self, v, lc, end: lc)
            walked = _count_slices(pool, m)
            every = await pool.volume_stats(v)
        with monkeypatch.context() as m:
            skipped = _count_slices(pool, m)
            got = await pool.volume_stats(v)
        assert got == every, name
        assert every.mapped_chunks > 0 and every.metadata_pages > 1
        assert sum(walked) == chunks
        assert len(skipped) * 2 < len(walked), (len(skipped), len(walked))
        # every slice but one after a mapped one starts where a chunk is mapped or a
        # map page starts
        assert len(skipped) <= 2 * (every.mapped_chunks + every.metadata_pages) + 1


@pytest.mark.parametrize("design", [d for d in design_names() if d != "linear"])
async def test_a_huge_thin_volume_costs_what_it_maps(make_pool: PoolFactory, design: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    # 1 PiB, thin, in a small pool: three runs written, the rest never. Walked slice by
    # slice this took tens of seconds (and hours at 8 EiB); now its slices are bounded by
    # what it maps.
    env = await make_pool(design)
    chunk = env.chunk_size
    chunks = (1 << 50) // chunk
    vol = await env.create("v", chunks * chunk)
    for at in (0, chunks // 3, chunks - 64):
        await vol.write(at * chunk, pattern(at % 997, 64 * chunk))
    pool = env.pool
    slices = _count_slices(pool, monkeypatch)
    stats = await pool.volume_stats(pool.volume("v"))
    assert stats.mapped_chunks == 3 * 64 and stats.extents >= 3
    assert stats.metadata_pages > 0
    assert len(slices) <= 2 * (stats.mapped_chunks + stats.metadata_pages) + 1, len(slices)
    empty = await env.create("e", chunks * chunk)
    slices.clear()
    assert await pool.volume_stats(pool.volume(empty.name)) == type(stats)()
    assert len(slices) <= 1, slices


@pytest.mark.parametrize("design", [d for d in design_names() if d != "linear"])
async def test_holes_and_long_runs_are_walked_in_few_slices(
        make_pool: PoolFactory, design: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # (linear volumes are thick: no holes to cross.) Where holes are not skipped (a
    # design without skip_empty), and over long mapped runs, the slices grow.
    env = await make_pool(design)
    chunk = env.chunk_size
    chunks = (1 << 30) // chunk  # a thin 1 GiB volume in a 16 MiB pool
    vol = await env.create("v", chunks * chunk)
    for at in (0, chunks // 3, chunks - 64):
        await vol.write(at * chunk, pattern(at, 64 * chunk))  # three runs, holes around
    pool = env.pool
    monkeypatch.setattr(type(pool.map), "skip_empty", lambda self, v, lc, end: lc)
    slices = _count_slices(pool, monkeypatch)
    stats = await pool.volume_stats(pool.volume("v"))
    assert stats.mapped_chunks == 3 * 64 and stats.extents >= 3
    base = pool.map.stats_slice()
    assert sum(slices) == chunks
    assert len(slices) < chunks // base // 16, (len(slices), chunks // base)


@pytest.mark.parametrize("design", ["radix", "linear"])
async def test_slow_slices_do_not_grow_and_busy_clients_come_first(
        make_pool: PoolFactory, design: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A slice that took long is not grown (a linear origin's slices are looked up in each
    of its snapshots: grown 64 times over a simple map, one slice held the event loop for
    seconds), and while volumes have I/O in flight the walk rests between its turns as
    long as it worked; with none, it only lets the loop turn."""
    import asyncio
    import time

    from nbdserver.pool import pool as pool_module

    env = await make_pool(design)
    chunks = 256
    step = 32 * env.chunk_size
    await env.create("a", chunks * env.chunk_size)
    for at in range(0, chunks * env.chunk_size, step):  # one long run, in a few writes
        await env.vol("a").write(at, pattern(at, step))
    pool = env.pool
    pool.stats_slice = 4
    vol = pool.volume("a")
    original = type(pool.map).exclusive_range
    asked: list[int] = []

    def slow(self: Any, v: Any, lc: int, count: int, runs: Any) -> Any:
        asked.append(count)
        time.sleep(pool_module.STATS_TURN / 2)  # slower than a slice may be to grow
        return original(self, v, lc, count, runs)

    monkeypatch.setattr(type(pool.map), "exclusive_range", slow)
    rests: list[float] = []
    sleep = asyncio.sleep

    async def watched(delay: float, *args: Any) -> Any:
        rests.append(delay)
        return await sleep(delay, *args)

    monkeypatch.setattr(asyncio, "sleep", watched)
    idle = await pool.volume_stats(vol)
    assert set(asked) == {4}, sorted(set(asked))  # never grown
    assert rests and not any(rests), rests[:5]  # no client: only turns of the loop
    asked.clear()
    rests.clear()
    epoch = pool.epochs.begin_write()  # a client's write in flight
    try:
        busy = await pool.volume_stats(vol)
    finally:
        pool.epochs.end_write(epoch)
    assert busy == idle
    assert rests and min(rests) >= pool_module.STATS_TURN, rests[:5]
    assert max(rests) <= 4 * pool_module.STATS_TURN + 1e-9
