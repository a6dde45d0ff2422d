"""BLOCK_STATUS over a cold map: memory stays bounded by the cache, not by the request.

A lookup that misses map pages loads them and keeps each pinned until it succeeds
(:mod:`nbdserver.pool.pages`), so one over a 1 GiB range pinned every leaf of it
(514 pages with 4 KiB chunks), and each concurrent request as many again. A cold lookup now
describes at most ``COLD_STATUS_CHUNKS`` chunks (a reply may be shorter than
asked; clients ask again from its end), and at most ``COLD_LOOKUPS`` run at once.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from poolkit import TINY_CACHE, MiB, PoolFactory, design_names, pattern

from nbdserver.backend.base import STATE_HOLE

KiB = 1024


@pytest.mark.parametrize("design", design_names())
async def test_cold_block_status_pins_a_bounded_number_of_pages(
        make_pool: PoolFactory, design: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = await make_pool(design, size=128 * MiB, small=False, offline=False,
                          cache_bytes=TINY_CACHE)
    chunk = env.chunk_size
    size = 1024 * MiB if design != "linear" else 32 * MiB  # (linear origins are thick)
    vol = await env.create("v", size)
    stride = size // 256
    written = list(range(0, size, stride))  # one chunk in each of 256 map leaves (radix)
    for at in written:
        await vol.write(at, pattern(at, chunk))
    await env.reopen()  # cold: nothing of the map in memory
    cache = env.pool.cache
    peak = 0
    load = cache.load

    async def counting_load(page_no: int, **kw: Any) -> Any:
        nonlocal peak
        page = await load(page_no, **kw)
        peak = max(peak, sum(1 for p in cache._pages.values() if p.pins))
        return page

    monkeypatch.setattr(cache, "load", counting_load)
    monkeypatch.setattr(cache, "_read_ahead", None)  # every miss through load
    vol = env.vol("v")
    answers = await asyncio.gather(*(vol.block_status(0, size) for _ in range(16)))
    for extents in answers:
        pos = 0
        for n, flags in extents:
            for at in written:
                if pos <= at < pos + n:
                    assert not flags & STATE_HOLE, (at, pos, n)
            if not flags & STATE_HOLE:
                assert any(pos <= at < pos + n or at <= pos < at + chunk for at in written)
            pos += n
        assert pos == size
    pinned_at_rest = sum(1 for p in cache._pages.values() if p.pins)
    assert peak - pinned_at_rest <= 128, f"{peak} pages pinned at once"
    await env.assert_clean()
