"""A guarantee covers map pages too: thin volumes never take the metadata pages that
guaranteed volumes' maps may still need (Pool.may_take_page, BlockMap.page_bound).

The metadata area is a fixed share of the pool, and a thin volume's scattered writes
can fill it long before the data area (a map page or two per isolated chunk with the
tiny nodes used here). Before page promises, the guaranteed volume's next map page
then failed with ENOSPC ("no free metadata page") although its chunks were promised.

The extent design bounds them by keeping every node but the root at least half full
(ExtentMap._join).
"""

from __future__ import annotations

import errno
import random

import pytest
from poolkit import PoolEnv, PoolFactory, Vol, design_names, pattern

from nbdserver.errors import NbdError, UserError
from nbdserver.pool.format import PAGE_SIZE

G_CHUNKS = 64
HOG_CHUNKS = 3072  # logical size of the thin volume (linear: thick, so its data is taken)
# The hog writes one chunk in STRIDE: a new leaf (and more) per write. (Extent's tiny
# leaves hold 4 records, one per isolated chunk.)
STRIDE = {"extent": 2}


async def _fill_metadata(env: PoolEnv, hog: Vol) -> tuple[int, bytearray]:
    """Write a chunk in every stride of `hog` until ENOSPC; the metadata area, not the
    data area, must be what ran out. Returns the chunk that failed, and hog's model."""
    chunk = env.chunk_size
    model = bytearray(hog.size)
    for lc in range(0, HOG_CHUNKS, STRIDE.get(env.design, 16)):
        data = pattern(1000 + lc, chunk)
        try:
            await hog.write(lc * chunk, data)
        except NbdError as e:
            assert e.errno == errno.ENOSPC, e
            assert "metadata" in str(e), e
            assert env.pool.data.free > G_CHUNKS, "data ran out first: the test proves nothing"
            return lc, model
        model[lc * chunk:(lc + 1) * chunk] = data
    raise AssertionError("the thin volume never ran out of metadata pages")


@pytest.mark.parametrize("design", design_names())
async def test_a_guaranteed_volume_gets_the_map_pages_thin_ones_may_not_take(
        make_pool: PoolFactory, design: str) -> None:
    env = await make_pool(design)  # tiny nodes: many map pages per chunk
    pool = env.pool
    chunk = env.chunk_size
    g = await env.create("g", G_CHUNKS * chunk, guarantee=True)
    bound = pool.map.page_bound(pool.volume("g")) or 0
    assert bound
    assert pool.info()["metadata_reserved_bytes"] == bound * PAGE_SIZE
    info = await pool.volume_info(pool.volume("g"))
    assert info["metadata_reserved_bytes"] == bound * PAGE_SIZE
    hog = await env.create("hog", HOG_CHUNKS * chunk)
    refused, hog_model = await _fill_metadata(env, hog)
    assert refused > 8 * STRIDE.get(design, 16)
    assert pool.meta.free >= bound  # what is promised stayed free

    # Every chunk of g, in an order that makes its tree grow one branch at a time.
    model = bytearray(G_CHUNKS * chunk)
    for lc in [*range(0, G_CHUNKS, 4), *range(1, G_CHUNKS, 2), *range(2, G_CHUNKS, 4)]:
        data = pattern(lc, chunk)
        await g.write(lc * chunk, data)
        model[lc * chunk:(lc + 1) * chunk] = data
    # Trims and rewrites at random reshape g's map (extent: records cut and joined, nodes
    # emptied and refilled): it still never needs a page beyond its promise.
    rng = random.Random(f"reshape-{design}")
    for step in range(300):
        lc = rng.randrange(G_CHUNKS)
        n = min(G_CHUNKS - lc, rng.choice((1, 1, 2, 5)))
        if rng.random() < 0.4:
            await g.trim(lc * chunk, n * chunk)
            model[lc * chunk:(lc + n) * chunk] = bytes(n * chunk)
        else:
            data = pattern(2000 + step, n * chunk)
            await g.write(lc * chunk, data)
            model[lc * chunk:(lc + n) * chunk] = data
    await g.flush()
    assert await g.read_all() == model
    assert await hog.read_all() == hog_model

    # The thin volume is still refused, also after a reopen counts the promises again.
    await env.reopen()
    hog = env.vol("hog")
    with pytest.raises(NbdError) as e:
        await hog.write(refused * chunk, pattern(5, chunk))
    assert e.value.errno == errno.ENOSPC
    assert await env.vol("g").read_all() == model
    await env.assert_clean()


@pytest.mark.parametrize("design", design_names())
async def test_a_page_promise_the_pool_cannot_keep_is_refused(make_pool: PoolFactory,
                                                             design: str) -> None:
    """A guaranteed create, and a clone of a guaranteed volume (its map becomes shared,
    so it may copy every page again), need every promise to fit in the free pages."""
    env = await make_pool(design)
    chunk = env.chunk_size
    g = await env.create("g", G_CHUNKS * chunk, guarantee=True)
    await env.create("t", 4 * chunk)  # thin, never snapshotted
    hog = await env.create("hog", HOG_CHUNKS * chunk)
    await _fill_metadata(env, hog)
    for lc in range(G_CHUNKS):
        await g.write(lc * chunk, pattern(lc, chunk))  # g takes promised pages
    if design == "linear":  # t's first snapshot needs a page for its snapshot list
        with pytest.raises(UserError, match=r"cannot clone 't'.*no free metadata page"):
            await env.snapshot("t", "ts")
    else:  # a radix or extent clone takes no page
        await env.snapshot("t", "ts")
    volumes = env.names()
    with pytest.raises(UserError, match=r"cannot guarantee 'g2'.*metadata pages"):
        await env.create("g2", G_CHUNKS * chunk, guarantee=True)
    with pytest.raises(UserError, match=r"cannot clone 'g'.*metadata pages"):
        await env.snapshot("g", "s")
    assert env.names() == volumes
    # Space given back makes both possible, and the snapshot keeps what g had.
    await env.delete("hog")
    await env.create("g2", G_CHUNKS * chunk, guarantee=True)
    s = await env.snapshot("g", "s")
    want = b"".join(pattern(lc, chunk) for lc in range(G_CHUNKS))
    assert await s.read_all() == want
    await g.write(0, pattern(99, G_CHUNKS * chunk))  # copies every page it shares with s
    assert await s.read_all() == want
    await env.assert_clean()
