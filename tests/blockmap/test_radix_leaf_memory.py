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

from poolkit import PoolFactory, pattern


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
