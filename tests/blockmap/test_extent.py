"""The ``extent`` design: extent trees that keep data contiguous.

White-box where the design promises a shape (one extent for a sequential
write, neighbours adjacent, node splits and merges, O(1) clones, bounded
unmaps, the allocation hints, what ``check`` reports), black-box through the
real data path (:class:`~nbdserver.volume.VolumeBackend`) where it promises
bytes. Pools are real O_DIRECT files (``poolkit``); every test ends with a
clean ``pool check``.
"""

from __future__ import annotations

import asyncio
import random
import subprocess
import sys
from functools import partial
from typing import Any

import pytest
from poolkit import TINY_CACHE, MiB, PoolEnv, PoolFactory, pattern

from nbdserver.blockmap import extent as ext
from nbdserver.blockmap.base import HOLE, Claim, InPlace, Redirect
from nbdserver.errors import UserError
from nbdserver.pool.format import PAGE_HEADER_SIZE, VolumeRecord
from nbdserver.pool.pool import Pool

CHUNK = 4096


def cli(*args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nbdserver", *map(str, args)],
                          capture_output=True, text=True, timeout=120)

TINY = (2, 2, 3, 0)  # leaves of 2 records, binary interior nodes, extents of 3 chunks
SMALL = (4, 4, 8, 0)


# -- helpers --------------------------------------------------------------------------------


async def put(pool: Pool, vol: VolumeRecord, lc: int, pc: int | None = None) -> int:
    """Map a fresh chunk at `lc` the way the data path does (claim near the design's hint,
    or exactly `pc`), without data I/O. Returns the chunk."""
    def op() -> int:
        hint = pc if pc is not None else pool.map.alloc_hint(vol, lc)
        got = pool.claim_chunk(vol, hint)
        assert pc is None or got == pc, f"chunk {pc} was not free"
        pool.map.map(vol, lc, got)
        return got

    pc = await pool.run(op)
    await settle(pool)
    return pc


async def settle(pool: Pool) -> None:
    """Commit when enough is dirty. The data path yields to the loop at every I/O, so the
    pool's background commits keep up; these map-level loops do no I/O and must wait."""
    if pool.cache.dirty_count >= pool.commit_threshold():
        await pool.commit()


async def unmap_all(pool: Pool, vol: VolumeRecord, lc: int, count: int) -> int:
    """Unmap [lc, lc+count) in as many calls as the design needs; returns the call count."""
    calls = 0
    while count > 0:
        done, fill = await pool.run(partial(pool.map.unmap, vol, lc, count))
        assert fill == [] and 0 < done <= count
        lc += done
        count -= done
        calls += 1
        await settle(pool)
    return calls


async def mapping(pool: Pool, vol: VolumeRecord) -> dict[int, int]:
    """lc -> pc for every mapped chunk, from one range lookup."""
    chunks = -(-vol.size // pool.chunk_size)
    runs = await pool.cache.run(lambda: pool.map.lookup(vol, 0, chunks))
    assert sum(r.count for r in runs) == chunks
    assert [r.lc for r in runs] == sorted(r.lc for r in runs)
    out: dict[int, int] = {}
    for r in runs:
        if r.pc != HOLE:
            out.update((r.lc + k, r.pc + k) for k in range(r.count))
    return out


def tree(pool: Pool, vol: VolumeRecord) -> tuple[int, list[list[ext.Rec]]]:
    """(height, the records of each leaf in order), read straight from the pages."""
    bm = pool.map
    assert isinstance(bm, ext.ExtentMap)
    root, height = bm._state(vol)
    leaves: list[list[ext.Rec]] = []

    def walk(idx: int, level: int) -> None:
        node = pool.cache.get(bm._page(idx))
        if level:
            for _, child in ext._entries(node):
                walk(child, level - 1)
        else:
            leaves.append(ext._records(node))

    if root >= 0:
        walk(root, height - 1)
    return height, leaves


def map_pages(pool: Pool, vol: VolumeRecord) -> tuple[int, list[int]]:
    """(the pages of the volume's tree, the entries of each node but the root)."""
    bm = pool.map
    assert isinstance(bm, ext.ExtentMap)
    root, height = bm._state(vol)
    counts: list[int] = []

    def walk(idx: int, level: int) -> int:
        node = pool.cache.get(bm._page(idx))
        if idx & ext.IDX_MASK != root & ext.IDX_MASK:
            counts.append(ext._count(node))
        if not level:
            return 1
        return 1 + sum(walk(child, level - 1) for _, child in ext._entries(node))

    return (walk(root, height - 1) if root >= 0 else 0), counts


async def extents(pool: Pool, vol: VolumeRecord) -> int:
    return (await pool.volume_stats(vol)).extents


async def make(make_pool: PoolFactory, params: tuple[int, int, int, int] | None = SMALL,
               **kwargs: Any) -> PoolEnv:
    kwargs.setdefault("size", 64 * MiB)
    return await make_pool("extent", map_params=params, small=False, **kwargs)


# -- contiguity -------------------------------------------------------------------------------


@pytest.mark.parametrize("params", [None, SMALL], ids=["default-nodes", "small-nodes"])
async def test_sequential_4k_writes_make_one_extent(make_pool: PoolFactory,
                                                    params: tuple[int, int, int, int] | None
                                                    ) -> None:
    env = await make(make_pool, params)
    vol = await env.create("v", 32 * MiB)
    data = pattern(1, 8 * MiB)
    for off in range(0, len(data), CHUNK):
        await vol.write(off, data[off:off + CHUNK])
    record = env.pool.volume("v")
    stats = await env.pool.volume_stats(record)
    assert stats.mapped_chunks == len(data) // CHUNK
    assert stats.extents == 1
    assert stats.exclusive_chunks == stats.mapped_chunks
    info = await env.pool.volume_info(record)
    assert info["extents_per_gib"] == 32.0  # one extent in a 1/32 GiB volume
    assert info["mean_extent_bytes"] == len(data)
    height, leaves = tree(env.pool, record)
    cap = ext.DEFAULT_MAX_EXTENT if params is None else params[2]
    assert sum(len(leaf) for leaf in leaves) == len(data) // CHUNK // cap  # capped records
    if params is not None:
        assert height >= 4  # 256 records in leaves of 4 under nodes of 4
    assert await vol.read(0, len(data)) == data
    await env.assert_clean()


async def test_pipelined_sequential_writes_make_one_extent(make_pool: PoolFactory) -> None:
    """Eight writes in flight at once: a chunk whose predecessor is not mapped yet keeps
    the logical distance to the last mapped one, so the stream stays in one piece."""
    env = await make(make_pool)
    vol = await env.create("v", 8 * MiB)
    data = pattern(2, 4 * MiB)
    for base in range(0, len(data), 8 * CHUNK):
        await asyncio.gather(*(vol.write(off, data[off:off + CHUNK])
                               for off in range(base, base + 8 * CHUNK, CHUNK)))
    assert await extents(env.pool, env.pool.volume("v")) == 1
    assert await vol.read(0, len(data)) == data
    await env.assert_clean()


async def test_volumes_written_side_by_side_alternate_in_long_runs(
        make_pool: PoolFactory) -> None:
    """Three volumes written a chunk each in turn: radix-style next-fit would interleave
    them chunk by chunk (1024 extents each); the spread keeps whole megabytes together."""
    env = await make(make_pool)
    pool = env.pool
    vols = [await pool.create_volume(f"v{i}", 16 * MiB) for i in range(3)]
    n = 1024
    for lc in range(n):
        for vol in vols:
            await put(pool, vol, lc)
    for vol in vols:
        assert await extents(pool, vol) <= 4, await mapping(pool, vol)
        assert len(await mapping(pool, vol)) == n
    await env.assert_clean()


async def test_fork_rewrites_split_extents_and_keep_neighbours_adjacent(
        make_pool: PoolFactory) -> None:
    env = await make(make_pool)
    pool = env.pool
    golden = await env.create("golden", 4 * MiB)
    base = pattern(3, 4 * MiB)
    for off in range(0, len(base), 64 * 1024):
        await golden.write(off, base[off:off + 64 * 1024])
    assert await extents(pool, pool.volume("golden")) == 1
    fork = await env.fork("golden", "fork")
    want = bytearray(base)
    rng = random.Random(7)
    singles = sorted(rng.sample(range(0, 1024, 4), 40))  # every 4th chunk: never adjacent
    pairs = [lc + 2 for lc in singles[::4]]  # and ten pairs (lc, lc+1) written in a row
    for lc in singles:
        data = pattern(100 + lc, CHUNK)
        await fork.write(lc * CHUNK, data)
        want[lc * CHUNK:(lc + 1) * CHUNK] = data
    for lc in pairs:
        for k in (0, 1):
            data = pattern(200 + lc + k, CHUNK)
            await fork.write((lc + k) * CHUNK, data)
            want[(lc + k) * CHUNK:(lc + k + 1) * CHUNK] = data
    assert await fork.read_all() == want
    assert await golden.read_all() == base  # independence
    assert await extents(pool, pool.volume("golden")) == 1
    m = await mapping(pool, pool.volume("fork"))
    gm = await mapping(pool, pool.volume("golden"))
    for lc in pairs:
        assert m[lc + 1] == m[lc] + 1, f"pair {lc} not adjacent: {m[lc]}, {m[lc + 1]}"
    rewritten = set(singles) | set(pairs) | {lc + 1 for lc in pairs}
    assert all(m[lc] != gm[lc] for lc in rewritten)
    assert all(m[lc] == gm[lc] for lc in range(1024) if lc not in rewritten)
    # each single splits an extent in two; each pair too: at most 2 more per rewrite
    assert await extents(pool, pool.volume("fork")) <= 1 + 2 * (len(singles) + len(pairs))
    await env.assert_clean()


# -- the tree -----------------------------------------------------------------------------------


async def test_a_stream_of_records_fills_its_leaves(make_pool: PoolFactory) -> None:
    """Sequential writes whose chunks are not contiguous (a record each) fill every leaf
    but the last two: an overflowing leaf gives its first records to its left neighbour
    before it splits (a split must leave both halves half full)."""
    env = await make(make_pool, (8, 4, 8, 0))
    pool = env.pool
    vol = await pool.create_volume("v", 4 * MiB)
    for lc in range(200):
        await put(pool, vol, lc, 1000 + 2 * lc)  # a gap between chunks: no two join
    _, leaves = tree(pool, vol)
    counts = [len(leaf) for leaf in leaves]
    assert sum(counts) == 200 and all(c == 8 for c in counts[:-2]), counts
    assert len(counts) <= 200 // 8 + 1, counts
    await env.assert_clean()


async def test_merges_splits_and_collapse(make_pool: PoolFactory) -> None:
    env = await make(make_pool, (4, 4, 4, 0))
    pool = env.pool
    vol = await pool.create_volume("v", 4 * MiB)
    base = 100
    for lc in range(16):  # 16 contiguous chunks: four records of the longest length, 4
        await put(pool, vol, lc, base + lc)
    height, leaves = tree(pool, vol)
    assert (height, [len(leaf) for leaf in leaves]) == (1, [4])
    assert [(r[0], r[1], r[2]) for r in leaves[0]] == [(0, 4, 100), (4, 4, 104),
                                                         (8, 4, 108), (12, 4, 112)]
    for lc in range(16, 32):  # a fifth record: the full leaf splits (append: 3 + 2, the
        # last piece half full like every node but the root)
        await put(pool, vol, lc, base + lc)
    height, leaves = tree(pool, vol)
    assert height == 2 and sum(len(leaf) for leaf in leaves) == 8
    assert await extents(pool, vol) == 1
    # merging: 40 and 42 first, then 41 between them joins both into one record
    await put(pool, vol, 40, 300)
    await put(pool, vol, 42, 302)
    await put(pool, vol, 41, 301)
    recs = [r for leaf in tree(pool, vol)[1] for r in leaf]
    assert (40, 3, 300, vol.id | ext.TAG_WRITABLE) in recs  # fresh chunks: writable
    # splitting a record: a new chunk in the middle of [4, 8) cuts it in three
    await put(pool, vol, 5, 500)
    recs = [r for leaf in tree(pool, vol)[1] for r in leaf]
    assert [(r[0], r[1], r[2]) for r in recs if 4 <= r[0] < 8] == [(4, 1, 104), (5, 1, 500),
                                                                   (6, 2, 106)]
    assert pool.data.get(105) == 0  # the replaced chunk was freed
    m = await mapping(pool, vol)
    assert m[4] == 104 and m[5] == 500 and m[6] == 106 and m[7] == 107
    await env.assert_clean()
    pages = pool.meta.used
    # unmapping the middle of a record leaves both ends
    await unmap_all(pool, vol, 9, 2)
    m = await mapping(pool, vol)
    assert 9 not in m and 10 not in m and m[8] == 108 and m[11] == 111
    # unmapping all but the last chunk frees the emptied leaves and collapses the root
    await unmap_all(pool, vol, 0, 42)
    height, leaves = tree(pool, vol)
    assert (height, leaves) == (1, [[(42, 1, 302, vol.id | ext.TAG_WRITABLE)]])
    assert pool.meta.used < pages
    assert pool.meta.used == 1 and pool.data.used == 1
    await unmap_all(pool, vol, 42, 1)
    assert tree(pool, vol) == (0, []) and pool.meta.used == 0 and pool.data.used == 0
    await env.assert_clean()


@pytest.mark.parametrize("params", [TINY, SMALL], ids=["tiny", "small"])
@pytest.mark.parametrize("offline", [True, False], ids=["offline", "tiny-cache"])
async def test_random_operations_match_a_model(make_pool: PoolFactory,
                                               params: tuple[int, int, int, int],
                                               offline: bool) -> None:
    """Map, unmap, fork, snapshot and delete at random on deep trees (tiny nodes), with and
    without a 16-page cache (PageMiss, rollback and retry all the time); every lookup
    matches a plain dict per volume, and the pool checks clean."""
    env = await make(make_pool, params, offline=offline, size=256 * MiB, journal_bytes=None,
                     cache_bytes=8 * MiB if offline else TINY_CACHE)
    pool = env.pool
    rng = random.Random(hash((params, offline)) & 0xFFFF)
    chunks = 600
    first = await pool.create_volume("v0", chunks * CHUNK)
    vols = {first.id: first}
    model: dict[int, dict[int, int]] = {first.id: {}}
    heights = []
    steps = 1500 if offline else 300
    for step in range(steps):
        vid = rng.choice(sorted(vols))
        vol = vols[vid]
        r = rng.random()
        if r < 0.55:
            lc = rng.randrange(chunks)
            for k in range(rng.choice((1, 1, 1, 4, 9))):
                if lc + k < chunks:
                    model[vid][lc + k] = await put(pool, vol, lc + k)
        elif r < 0.7:
            lc = rng.randrange(chunks)
            count = min(chunks - lc, rng.choice((1, 3, 20, 150)))
            await unmap_all(pool, vol, lc, count)
            for k in range(lc, lc + count):
                model[vid].pop(k, None)
        elif r < 0.78 and len(vols) < 6:
            clone = await pool.clone_volume(vol.name, f"c{step}", snapshot=False)
            vols[clone.id] = clone
            model[clone.id] = dict(model[vid])
        elif r < 0.83 and len(vols) > 1:
            await pool.delete_volume(vol.name)
            del vols[vid], model[vid]
        if step % 50 == 49 or step == steps - 1:
            for v in vols.values():
                assert await mapping(pool, v) == model[v.id]
                heights.append(pool.map._state(v)[1])  # type: ignore[attr-defined]
                # Every node but the root half full; so the pages stay under the bound a
                # guarantee promises (none for TINY: half of 2 is 1).
                pages, counts = await pool.cache.run(partial(map_pages, pool, v))
                assert min(counts, default=2) >= params[0] // 2
                bound = pool.map.page_bound(v)
                assert (bound is None) == (params == TINY)
                assert bound is None or pages <= bound, (pages, bound)
                for lc in rng.sample(range(chunks), 10):
                    run = (await pool.cache.run(lambda v=v, lc=lc: pool.map.lookup(v, lc, 1)))[0]
                    assert run.lc == lc and run.count == 1
                    assert (None if run.pc == HOLE else run.pc) == model[v.id].get(lc)
            await env.assert_clean()
    assert max(heights) >= (5 if params == TINY else 3)
    for v in list(vols.values()):
        await pool.delete_volume(v.name)
    assert (pool.data.used, pool.meta.used) == (0, 0)  # reclamation: every chunk and page
    await env.assert_clean()


# -- forks ----------------------------------------------------------------------------------------


async def test_clone_costs_the_same_for_1gib_and_1tib(make_pool: PoolFactory,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    env = await make(make_pool, None)
    pool = env.pool
    committed: list[int] = []
    take = pool.cache.take_dirty

    def counting(seq: int) -> Any:
        images = take(seq)
        committed.append(len(images))
        return images

    monkeypatch.setattr(pool.cache, "take_dirty", counting)
    costs = {}
    for name, size in (("small", 1 << 30), ("huge", 1 << 40)):
        vol = await pool.create_volume(name, size)
        chunks = size // CHUNK
        for region in (0, chunks // 3, chunks - 600):  # data at the start, middle and end
            for lc in range(region, region + 600, 3):
                await put(pool, vol, lc)
        await pool.commit()
        committed.clear()
        loads = pool.cache.loads
        fork = await pool.clone_volume(name, f"{name}-fork", snapshot=False)
        costs[name] = (sum(committed), pool.cache.loads - loads)
        assert await mapping(pool, fork) == await mapping(pool, vol)
    assert costs["small"] == costs["huge"]
    assert costs["huge"][0] <= 4  # catalog, state, one refcount page (+ journal padding)
    await env.assert_clean()


async def test_writes_after_a_fork_copy_the_path_once(make_pool: PoolFactory) -> None:
    """The first write below a shared node copies the path; the next ones in that leaf
    are plain (InPlace once the chunk is this volume's own)."""
    env = await make(make_pool, (6, 4, 16, 0))
    pool = env.pool
    vol = await pool.create_volume("v", 4 * MiB)
    for lc in range(256):  # 16 records of 16 chunks in leaves of 6, 4 and 6: height 2
        await put(pool, vol, lc)
    assert tree(pool, vol)[0] == 2
    fork = await pool.clone_volume("v", "f", snapshot=False)
    target = await pool.cache.run(lambda: pool.map.write_target(fork, 150))
    assert isinstance(target, Redirect) and target.old == (await mapping(pool, vol))[150]
    pages = pool.meta.used
    pc = await put(pool, fork, 150)  # the middle leaf: room for the record's pieces
    assert pool.meta.used == pages + 2  # the root and the leaf were copied, once
    target = await pool.cache.run(lambda: pool.map.write_target(fork, 150))
    assert target == InPlace(pc)
    assert await put(pool, fork, 151) == pc + 1  # next to its neighbour
    assert pool.meta.used == pages + 2  # same leaf, same path: nothing copied again
    # the original still shares every other chunk and reads its own chunk 150
    assert isinstance(await pool.cache.run(lambda: pool.map.write_target(vol, 12)), Redirect)
    assert isinstance(await pool.cache.run(lambda: pool.map.write_target(fork, 12)), Redirect)
    assert (await mapping(pool, vol))[150] != pc
    stats = await pool.volume_stats(fork)
    assert stats.exclusive_chunks == 2 and stats.mapped_chunks == 256
    # the other leaves are still shared: one page each, counted twice
    assert (await pool.volume_stats(vol)).exclusive_chunks == 2  # its old 150 and 151
    await env.assert_clean()


async def test_a_chunk_whose_sharing_ended_is_claimed_before_it_is_written_in_place(
        make_pool: PoolFactory) -> None:
    """When the other volume stops sharing a chunk (it rewrote it, or was deleted), the
    answer is Claim (the volume layer commits and waits for reads begun before), then,
    once claimed, InPlace. A claim covers its chunk only: a neighbour that is no longer
    shared either may have stopped being shared by a change not durable yet, and only
    the claimed chunk is under the writer's lock when its commit and wait are done;
    claims of neighbours merge back into one record."""
    env = await make(make_pool, (6, 4, 16, 0))
    pool = env.pool
    bm = pool.map
    vol = await pool.create_volume("v", 4 * MiB)
    for lc in range(64):
        await put(pool, vol, lc)
    orig = await mapping(pool, vol)

    def target(v: VolumeRecord, lc: int) -> Any:
        return bm.write_target(v, lc)

    assert await pool.cache.run(lambda: target(vol, 5)) == InPlace(orig[5])
    fork = await pool.clone_volume("v", "f", snapshot=False)
    assert await pool.cache.run(lambda: target(vol, 5)) == Redirect(orig[5])
    assert await pool.cache.run(lambda: target(fork, 5)) == Redirect(orig[5])
    await put(pool, fork, 5)  # the fork copies chunk 5 away: the original's is its alone
    assert await pool.cache.run(lambda: target(vol, 5)) == Claim(orig[5])
    assert await pool.cache.run(lambda: target(vol, 6)) == Redirect(orig[6])  # still shared
    pages = pool.meta.used
    await pool.run(lambda: bm.claim(vol, 5))
    assert await pool.cache.run(lambda: target(vol, 5)) == InPlace(orig[5])
    assert await pool.cache.run(lambda: target(vol, 6)) == Redirect(orig[6])
    assert pool.meta.used == pages  # claimed in place (one reference left): nothing copied
    await env.assert_clean()
    # the fork goes: everything is the original's alone, but only after a claim
    await pool.delete_volume("f")
    assert await pool.cache.run(lambda: target(vol, 40)) == Claim(orig[40])
    await pool.run(lambda: bm.claim(vol, 40))
    assert await pool.cache.run(lambda: target(vol, 40)) == InPlace(orig[40])
    for lc in (39, 41, 50):  # its neighbours in the record, and beyond: each its own claim
        assert await pool.cache.run(lambda lc=lc: target(vol, lc)) == Claim(orig[lc])
    for lc in (39, 41):
        await pool.run(lambda lc=lc: bm.claim(vol, lc))
    _, leaves = await pool.cache.run(lambda: tree(pool, vol))
    around = [r for leaf in leaves for r in leaf if r[0] <= 40 < r[0] + r[1]]
    assert [r[:2] for r in around] == [(39, 3)]  # the three claimed chunks: one record
    assert around[0][3] & ext.TAG_WRITABLE
    assert await pool.cache.run(lambda: target(vol, 50)) == Claim(orig[50])
    with pytest.raises(AssertionError, match="not mapped"):
        await pool.run(lambda: bm.claim(vol, 100))
    assert await mapping(pool, vol) == orig
    await env.assert_clean()


async def test_unmap_is_bounded_and_drops_shared_subtrees_whole(make_pool: PoolFactory) -> None:
    env = await make(make_pool, None, size=256 * MiB)
    pool = env.pool
    n = 3 * ext.UNMAP_BUDGET
    vol = await pool.create_volume("v", n * CHUNK)

    def fill() -> None:
        for lc in range(n):
            pool.map.map(vol, lc, pool.claim_chunk(vol, pool.map.alloc_hint(vol, lc)))

    await pool.run(fill)
    assert await extents(pool, vol) == 1
    fork = await pool.clone_volume("v", "f", snapshot=False)
    used = pool.data.used
    # the fork drops most of its shared map: subtrees covered whole go by one reference
    calls = await unmap_all(pool, fork, 100, n - 200)
    assert calls == 1
    assert pool.data.used == used  # the original still references every chunk
    fm = await mapping(pool, fork)
    assert sorted(fm) == [*range(100), *range(n - 100, n)]
    assert await mapping(pool, vol) == {lc: fm.get(lc, pc)
                                        for lc, pc in (await mapping(pool, vol)).items()}
    # the original, now the only owner, frees its chunks in bounded steps
    await pool.delete_volume("f")
    calls = await unmap_all(pool, vol, 0, n)
    assert calls >= 3
    assert pool.data.used == 0 and pool.meta.used == 0
    await env.assert_clean()


# -- allocation hints ---------------------------------------------------------------------------


async def test_alloc_hints(make_pool: PoolFactory) -> None:
    env = await make(make_pool)
    pool = env.pool
    bm = pool.map
    vol = await pool.create_volume("v", 16 * MiB)
    assert await pool.cache.run(lambda: bm.alloc_hint(vol, 5)) is None  # nothing mapped
    await put(pool, vol, 10, 1000)
    await put(pool, vol, 40, 2000)

    def hint(lc: int, v: VolumeRecord = vol) -> int | None:
        return bm.alloc_hint(v, lc)

    assert await pool.cache.run(lambda: hint(11)) == 1001  # right after the predecessor
    assert await pool.cache.run(lambda: hint(13)) == 1003  # the logical gap is kept
    assert await pool.cache.run(lambda: hint(39)) == 1999  # before the nearer successor
    assert await pool.cache.run(lambda: hint(4000)) is None  # no neighbour near
    # the next chunk is taken by another volume: a random write is packed by next fit, but
    # a stream (the volume's last allocation just before) goes into a free run, leaving room
    other = await pool.create_volume("o", 16 * MiB)
    await put(pool, other, 0, 1001)
    assert await pool.cache.run(lambda: hint(11)) is None  # the last hint was for 4000
    await pool.cache.run(lambda: hint(10))
    got = await pool.cache.run(lambda: hint(11))
    assert got is not None and got not in (1001, 1002)
    spread = ext.SPREAD_BYTES // CHUNK
    assert pool.data.run_length_free(got, spread) == spread  # room to grow after it
    assert pool.data.run_length_free(got - spread // 2, spread // 2) == spread // 2  # and before
    # a fork rewriting its parent's chunk cannot go next to it: packed by next fit instead
    await put(pool, vol, 41, 2001)
    await put(pool, vol, 42, 2002)
    fork = await pool.clone_volume("v", "f", snapshot=False)
    await pool.cache.run(lambda: hint(40, fork))
    assert await pool.cache.run(lambda: hint(41, fork)) is None  # streaming, but not its own
    await pool.cache.run(lambda: hint(40))
    assert await pool.cache.run(lambda: hint(41)) not in (None, 2001)  # its own stream: spread
    await env.assert_clean()


# -- check ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage,message", [
    ("swap", "overlaps or precedes"),
    ("past-end", "beyond the end of the volume"),
    ("magic", "not an extent node"),
    ("length", "has length"),
    ("key", "out of order"),
    ("writable-shared", "writable extent"),
])
async def test_check_reports_structural_problems(make_pool: PoolFactory, damage: str,
                                                 message: str) -> None:
    env = await make(make_pool, (4, 4, 4, 0))
    pool = env.pool
    bm = pool.map
    assert isinstance(bm, ext.ExtentMap)
    vol = await pool.create_volume("v", 64 * CHUNK)
    for lc in range(0, 64, 2):
        await put(pool, vol, lc)
    if damage == "writable-shared":  # the first leaf: copied by the write, still sharing
        await pool.clone_volume("v", "f", snapshot=False)
        await put(pool, vol, 1)
    await env.assert_clean()
    root, height = bm._state(vol)
    assert height >= 2
    edge = 0 if damage == "writable-shared" else -1
    node = pool.cache.get(bm._page(root))
    leaf_idx = ext._entries(node)[edge][1] & ext.IDX_MASK
    while height > 2:  # down the right (or left) edge to the last (or first) leaf
        leaf_idx = ext._entries(pool.cache.get(bm._page(leaf_idx)))[edge][1] & ext.IDX_MASK
        height -= 1
    saved = {no: bytes(pool.cache.get(no)) for no in (bm._page(leaf_idx), bm._page(root))}
    with pool.cache.mtr():
        page = pool.cache.modify(bm._page(leaf_idx))
        recs = ext._records(page)
        if damage == "swap":
            recs[0], recs[1] = recs[1], recs[0]
        elif damage == "past-end":
            recs[-1] = (70, 1, recs[-1][2], recs[-1][3])
        elif damage == "length":
            recs[-1] = (recs[-1][0], 0, recs[-1][2], recs[-1][3])
        elif damage == "writable-shared":
            assert not recs[0][3] & ext.TAG_WRITABLE
            recs[0] = (*recs[0][:3], recs[0][3] | ext.TAG_WRITABLE)
        ext._write_node(page, 0, ext._flat_records(recs))
        if damage == "magic":
            page[PAGE_HEADER_SIZE] ^= 0xFF
        elif damage == "key":
            root_page = pool.cache.modify(bm._page(root))
            entries = ext._entries(root_page)
            entries[0], entries[1] = entries[1], entries[0]
            ext._write_node(root_page, bm._state(vol)[1] - 1, ext._flat_entries(entries))
    report = await pool.check()
    assert not report.ok
    assert any(message in p for p in report.problems), report.problems
    with pool.cache.mtr():  # repair, so that the pool closes clean
        for no, image in saved.items():
            pool.cache.modify(no)[:] = image
    await env.assert_clean()


async def test_params_are_validated(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Bad parameters are refused when the pool is made (nothing is written), and a pool
    with features this version does not know (made by a newer one) when it is opened:
    a clear error naming the pool, not a traceback."""
    from nbdserver.storage.buffers import BufferPool
    from nbdserver.storage.engine import make_engine

    for bad, why in (((1, 0, 0, 0), "leaf capacity 1 out of range"),
                     ((ext.MAX_LEAF + 1, 0, 0, 0), "leaf capacity 170 out of range"),
                     ((4, 1, 0, 0), "interior capacity 1 out of range"),
                     ((4, ext.MAX_INNER + 1, 0, 0), "interior capacity 255 out of range"),
                     ((4, 4, 8, 2), "features 0x3 unknown to this version")):
        path = tmp_path / f"p{bad[0]}-{bad[1]}-{bad[3]}.img"
        with pytest.raises(UserError, match=why):
            Pool.create(path, 16 * MiB, blockmap="extent", map_params=bad, max_volumes=16)
        assert not path.exists()
    path = tmp_path / "newer.img"
    with monkeypatch.context() as m:
        m.setattr(ext.ExtentMap, "check_params", classmethod(lambda cls, p: None))
        Pool.create(path, 16 * MiB, blockmap="extent", map_params=(4, 4, 8, 4), max_volumes=16)
    engine = make_engine(asyncio.get_running_loop())
    try:
        with pytest.raises(UserError, match=r"newer.img: block map 'extent': extent features "
                                            r"0x5 unknown to this version"):
            await Pool.open(path, engine, BufferPool(), offline=True)
    finally:
        engine.close()
    proc = cli("pool", "create", tmp_path / "cli.img", "--size", "16M", "--blockmap", "extent",
               "--fanout", "1")
    assert proc.returncode == 1 and "leaf capacity 1 out of range" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "cli.img").exists()
    proc = cli("pool", "info", path)
    assert proc.returncode == 1 and "unknown to this version" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


async def test_a_short_leaf_under_an_only_child_is_no_problem_with_binary_nodes(
        make_pool: PoolFactory) -> None:
    """With interior nodes of 2 (half full is one child), a node of one child is not
    short, so its single short leaf has no neighbour to join: such maps have no bound,
    and pool check does not ask for half-full nodes."""
    env = await make(make_pool, (4, 2, 8, 0))
    pool = env.pool
    vol = await pool.create_volume("v", 64 * CHUNK)
    for lc in range(16):
        await put(pool, vol, lc, 100 + 2 * lc)  # a record each
    await unmap_all(pool, vol, 0, 6)
    assert len(tree(pool, vol)[1][0]) == 1  # the first leaf: short, and alone
    assert pool.map.page_bound(vol) is None
    await env.assert_clean()


async def test_a_pool_made_before_half_full_nodes_keeps_its_old_rules(
        make_pool: PoolFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """A pool whose parameters lack the HALF_FULL mark (made by an older version) may hold
    short nodes: its maps get no bound (a guarantee covers chunks only, as then) and pool
    check does not ask for half-full nodes. Pools made now carry the mark."""
    env = await make(make_pool, SMALL)
    assert env.pool.sb.map_params == (*SMALL[:3], ext.HALF_FULL)
    monkeypatch.setattr(ext.ExtentMap, "new_pool_params", classmethod(lambda cls, p: p))
    env = await make(make_pool, SMALL)
    pool = env.pool
    assert pool.sb.map_params == SMALL
    g = await pool.create_volume("g", 64 * CHUNK, guarantee=True)
    assert pool.map.page_bound(g) is None and pool.pages_promised() == 0
    # Short leaves, as the older version left them (it never joined nodes).
    with monkeypatch.context() as m:
        m.setattr(ext.ExtentMap, "_refill", lambda self, items, level, changed: False)
        for lc in range(32):
            await put(pool, g, lc, 200 + 2 * lc)
        await unmap_all(pool, g, 1, 30)
    counts = map_pages(pool, g)[1]
    assert min(counts) < SMALL[0] // 2, counts
    await env.assert_clean()
    await env.reopen()
    assert env.pool.map.page_bound(env.pool.volume("g")) is None
    await env.assert_clean()


async def test_a_deleted_volume_leaves_no_placement_hint(make_pool: PoolFactory) -> None:
    """The map's memory of where each volume last wrote forgets a deleted volume (ids are
    never reused: endless create, write, delete cycles grew it for good)."""
    env = await make_pool("extent")
    for i in range(3):
        vol = await env.create(f"v{i}", 1 * MiB)
        await vol.write(0, pattern(i, 64 * 1024))
        await vol.write(512 * 1024, pattern(i, 64 * 1024))  # (a map to place it by)
        vid = env.pool.volume(f"v{i}").id
        hints = env.pool.map._last_hint  # type: ignore[attr-defined]
        assert vid in hints
        await env.delete(f"v{i}")
        assert vid not in hints, hints
    await env.assert_clean()
