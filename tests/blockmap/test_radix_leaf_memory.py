"""The radix leaf memory keeps cached pages, and must never read a stale one.

A radix volume remembers the leaves it reached through a writable path, as the
page cache's own Page objects (``PageCache.keep``): a 4 KiB read or write then
reads one entry of a kept page, without the cache's lookup. A kept page that
leaves the cache is stale: the next copy of that page is another object, and a
change made to it after it came back is not in the old one. Here, with the
smallest cache (16 pages) and a tiny fan-out, a leaf is learned, evicted, then
changed (a first write into a hole of that leaf maps a chunk there), and the
next read must see the change; memory of kept pages must not outlive the cache.
"""

from __future__ import annotations

from poolkit import PoolFactory, Vol, pattern


async def test_a_leaf_evicted_then_changed_is_read_afresh(make_pool: PoolFactory) -> None:
    env = await make_pool("radix")  # fan-out 4, a 16-page cache, pages read as needed
    chunk = env.chunk_size
    fanout = env.pool.map.fanout
    leaves = 64
    vol = await env.create("v", leaves * fanout * chunk)
    for leaf in range(leaves):  # one chunk per leaf written: every leaf exists
        await vol.write(leaf * fanout * chunk, pattern(leaf, chunk))
    await env.pool.commit()  # clean pages can be evicted
    hole = 1  # in leaf 0, next to the written chunk
    assert await vol.read(hole * chunk, chunk) == bytes(chunk)
    bmap = env.pool.map
    key = next(k for k, page in bmap._leaves.items() if page.cached
               and page.words is not None and k % (1 << 23) == env.pool.volume("v").id
               and k >> 23 == 0)
    kept = bmap._leaves[key]
    for leaf in range(1, leaves):  # reads of other leaves push leaf 0 out of the cache
        assert await vol.read(leaf * fanout * chunk, chunk) == pattern(leaf, chunk)
    assert not kept.cached, "leaf 0 was not evicted: the test proves nothing"
    assert len(kept.data) == 0, "an evicted kept page still holds its bytes"
    data = pattern(99, chunk)
    await vol.write(hole * chunk, data)  # maps a chunk in leaf 0: a new copy of the page
    assert await vol.read(hole * chunk, chunk) == data
    assert await vol.read(0, chunk) == pattern(0, chunk)
    await env.pool.commit()
    await env.assert_clean()


async def test_a_fork_reads_shared_leaves_from_memory_and_never_writes_through_them(
        make_pool: PoolFactory) -> None:
    """A fork reading what it shares learns those leaves for reads only: their entries
    keep the writable bits of the volume that wrote them, so a write through them would
    land in the origin's chunk. After the fork has read a leaf, writes by the fork, by
    the origin and the origin's deletion must each leave both volumes reading their own
    bytes."""
    env = await make_pool("radix", cache_bytes=1 << 20)  # every page stays cached
    chunk = env.chunk_size
    fanout = env.pool.map.fanout
    chunks = 8 * fanout
    origin = await env.create("o", chunks * chunk)
    base = pattern(1, chunks * chunk)
    await origin.write(0, base)
    fork = await env.fork("o", "f")
    bmap = env.pool.map
    fid = env.pool.volume("f").id

    async def chunk_by_chunk(vol: Vol) -> bytes:
        """The volume read one chunk per request: the path that uses the leaf memory."""
        return b"".join([await vol.read(lc * chunk, chunk) for lc in range(chunks)])

    def known(vid: int) -> tuple[set[int], set[int]]:
        """The leaf indexes the map remembers for the volume: for reads, for writes."""
        return ({k >> 23 for k in bmap._read_leaves if k % (1 << 23) == vid},
                {k >> 23 for k in bmap._leaves if k % (1 << 23) == vid})

    for lc in range(0, chunks, fanout):  # the fork reads one chunk of every leaf
        assert await fork.read(lc * chunk, chunk) == base[lc * chunk:(lc + 1) * chunk]
    reads, writes = known(fid)
    assert reads == set(range(8)) and writes == set(), "shared leaves: for reads only"
    for lc in range(0, chunks, fanout):  # served from memory now: the same bytes
        assert await fork.read(lc * chunk + chunk, chunk) == base[(lc + 1) * chunk:
                                                                   (lc + 2) * chunk]
    want_f = bytearray(base)
    want_o = bytearray(base)
    await fork.write(3 * chunk, pattern(2, chunk))  # a copy on write, not in place
    want_f[3 * chunk:4 * chunk] = pattern(2, chunk)
    await origin.write(fanout * chunk, pattern(3, chunk))  # the origin's own copy
    want_o[fanout * chunk:(fanout + 1) * chunk] = pattern(3, chunk)
    for lc in range(0, chunks, fanout // 2):  # the fork learns again, then the origin goes
        await fork.read(lc * chunk, chunk)
    assert await chunk_by_chunk(origin) == want_o
    assert await chunk_by_chunk(fork) == want_f
    assert await origin.read_all() == want_o  # (runs of chunks: walks)
    assert await fork.read_all() == want_f
    await env.delete("o")  # the fork is now the only path to what it shared
    for lc in range(0, chunks, fanout // 2):
        await fork.read(lc * chunk, chunk)
    await fork.write(5 * fanout * chunk, pattern(4, chunk))  # claims, in place
    want_f[5 * fanout * chunk:(5 * fanout + 1) * chunk] = pattern(4, chunk)
    assert await chunk_by_chunk(fork) == want_f
    await env.pool.commit()
    await env.assert_clean()


async def test_a_leaf_copied_by_one_fork_is_forgotten_for_that_fork_only(
        make_pool: PoolFactory) -> None:
    """A first write that copies a leaf changes one volume's leaf: the map forgets that
    leaf of that volume and nothing else (many clones each copying their leaves would
    otherwise make every other volume walk its tree again). Every volume must still read
    its own bytes, from memory and by walks."""
    env = await make_pool("radix", cache_bytes=1 << 20)  # every page stays cached
    chunk = env.chunk_size
    fanout = env.pool.map.fanout
    chunks = 8 * fanout  # eight leaves below two interior nodes (fan-out 4: height 3)
    origin = await env.create("o", chunks * chunk)
    base = pattern(1, chunks * chunk)
    await origin.write(0, base)
    vols = {"o": origin, "f1": await env.fork("o", "f1"), "f2": await env.fork("o", "f2")}
    want = {name: bytearray(base) for name in vols}
    bmap = env.pool.map
    ids = {name: env.pool.volume(name).id for name in vols}

    def known() -> dict[str, tuple[dict[int, int], dict[int, int]]]:
        """For each volume, the leaves it remembers for reads and for writes: leaf
        index -> page number."""
        return {name: ({k >> 23: p.no for k, p in bmap._read_leaves.items()
                        if k % (1 << 23) == vid},
                       {k >> 23: p.no for k, p in bmap._leaves.items()
                        if k % (1 << 23) == vid})
                for name, vid in ids.items()}

    async def learn_and_check() -> None:
        for name, vol in vols.items():
            got = b"".join([await vol.read(lc * chunk, chunk) for lc in range(chunks)])
            assert got == want[name], f"{name} read other bytes chunk by chunk"
            assert await vol.read_all() == want[name], f"{name} read other bytes"

    async def write(name: str, lc: int, seed: int) -> None:
        await vols[name].write(lc * chunk, pattern(seed, chunk))
        want[name][lc * chunk:(lc + 1) * chunk] = pattern(seed, chunk)

    await write("f1", 0, 2)  # copies f1's root, its first interior node and leaf 0
    await learn_and_check()
    before = known()
    assert set(before["f1"][0]) == set(range(8)) == set(before["f2"][0])
    shared = before["f2"][0][2]
    assert before["f1"][0][2] == shared, "leaf 2 is not shared yet: the test proves nothing"
    await write("f1", 2 * fanout, 3)  # copies leaf 2 only: f1's path to it is its own already
    after = known()
    assert after["o"] == before["o"] and after["f2"] == before["f2"], \
        "another volume's leaves were forgotten"
    reads, writes = after["f1"]
    assert reads.get(2, -1) != shared, "f1 still reads leaf 2 from the page it shared"
    assert {k: v for k, v in reads.items() if k != 2} == {
        k: v for k, v in before["f1"][0].items() if k != 2}, "f1 forgot other leaves"
    assert {k: v for k, v in writes.items() if k != 2} == before["f1"][1]
    await learn_and_check()
    await write("f2", 2 * fanout, 4)  # f2's own copies of the same leaf
    await write("f1", 2 * fanout, 5)  # in place now
    await write("o", 2 * fanout + 1, 6)  # the origin's copy of what both forks share
    await learn_and_check()
    await env.pool.commit()
    await env.assert_clean()
