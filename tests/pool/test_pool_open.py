"""Opening pools: page-cache sizes, locking, and what open reads."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from poolkit import TINY_CACHE, KiB, PoolEnv, PoolFactory, pattern

from nbdserver.errors import UserError
from nbdserver.pool.pool import Pool, PoolBusy
from nbdserver.storage.buffers import BufferPool
from nbdserver.storage.engine import make_engine


@pytest.mark.parametrize("offline", [False, True])
async def test_tiny_cache_with_a_large_catalog(make_pool: PoolFactory, offline: bool) -> None:
    """Only the catalog pages that hold records stay in memory (pinned), not the whole
    catalog `--max-volumes` sized: a 16-page cache over a 256-page catalog stays within
    its capacity, volumes created in it (each new catalog page loaded on demand) are all
    there after a reopen, freed slots are used again, and a page whose last record
    goes is let go."""
    env = await make_pool("radix", offline=offline, cache_bytes=TINY_CACHE, max_volumes=4096)
    cache = env.pool.cache
    assert env.pool.layout.catalog_pages == 256 > cache.capacity
    assert cache.cached_count <= cache.capacity
    vol = await env.create("v", 256 * KiB)
    await vol.write(8192, pattern(3, 100 * KiB))
    for i in range(40):  # three catalog pages of records, 16 each
        await env.create(f"w{i}", 64 * KiB)
        await env.release(f"w{i}")
    await env.reopen()
    cache = env.pool.cache
    assert cache.cached_count <= cache.capacity
    assert sorted(env.names()) == sorted(["v"] + [f"w{i}" for i in range(40)])
    assert (await env.vol("v").read(8192, 100 * KiB)) == pattern(3, 100 * KiB)
    for i in range(0, 40, 2):
        await env.delete(f"w{i}")
    await env.snapshot("v", "s")
    await env.reopen()
    assert len(env.names()) == 1 + 20 + 1
    assert (await env.vol("s").read(8192, 100 * KiB)) == pattern(3, 100 * KiB)
    layout = env.pool.layout

    def catalog_pages_pinned() -> int:
        cache = env.pool.cache
        return sum(1 for p in range(layout.catalog_start,
                                    layout.catalog_start + layout.catalog_pages)
                   if p in cache and cache._pages[p].pins)

    assert catalog_pages_pinned() == 3
    for i in range(1, 40, 2):  # every record of the last two pages goes
        await env.delete(f"w{i}")
    assert catalog_pages_pinned() == 1, "pages left without records stay pinned"
    await env.assert_clean()


async def test_second_open_is_refused(make_pool: PoolFactory) -> None:
    env = await make_pool("radix")
    engine = make_engine(asyncio.get_running_loop())
    try:
        with pytest.raises(PoolBusy, match="in use"):
            await Pool.open(env.path, engine, BufferPool())
    finally:
        engine.close()


async def test_open_waits_for_the_lock_when_asked(make_pool: PoolFactory) -> None:
    """A server starting right after another died waits a moment for the pool's lock:
    it gets the pool once the holder lets go, and PoolBusy if it never does."""
    env = await make_pool("radix")
    await env.create("v", 64 * KiB)
    engine = make_engine(asyncio.get_running_loop())
    try:
        t0 = time.monotonic()
        with pytest.raises(PoolBusy, match="in use"):
            await Pool.open(env.path, engine, BufferPool(), lock_wait=0.3)
        assert time.monotonic() - t0 >= 0.3

        async def let_go() -> None:
            await asyncio.sleep(0.2)
            await env.close()

        closing = asyncio.ensure_future(let_go())
        pool = await Pool.open(env.path, engine, BufferPool(), lock_wait=10)
        await closing
        assert [v.name for v in pool.live_volumes()] == ["v"]
        await pool.close()
    finally:
        engine.close()


def test_create_refuses_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / "p.img"
    path.write_bytes(b"x" * 4096)
    with pytest.raises(UserError, match="already exists"):
        Pool.create(path, 16 << 20)
    with pytest.raises(UserError, match="unknown block map"):
        Pool.create(tmp_path / "q.img", 16 << 20, blockmap="nope")
    with pytest.raises(UserError, match="too small"):
        Pool.create(tmp_path / "r.img", 1 << 20)


async def test_open_a_file_that_is_not_a_pool(tmp_path: Path) -> None:
    path = tmp_path / "junk.img"
    path.write_bytes(bytes(1 << 20))
    engine = make_engine(asyncio.get_running_loop())
    try:
        with pytest.raises(UserError, match="not an nbdserver pool"):
            await Pool.open(path, engine, BufferPool())
    finally:
        engine.close()


async def test_pool_env_reopen_keeps_everything(make_pool: PoolFactory) -> None:
    env: PoolEnv = await make_pool("radix", offline=False)
    a = await env.create("a", 64 * KiB)
    await a.write(0, pattern(1, 64 * KiB))
    await env.snapshot("a", "s")
    await env.reopen()
    assert env.names() == ["a", "s"]
    assert await env.vol("s").read_all() == pattern(1, 64 * KiB)
    assert env.pool.volume("s").read_only


async def test_a_missing_volume_is_named_with_the_pool_s_few_or_closest(
        make_pool: PoolFactory) -> None:
    """The message lists a pool's few volumes; of many, a count and the closest names
    (a pool may hold a million: one line, not all of them)."""
    env = await make_pool("radix")
    for name in ("golden", "vm1"):
        await env.create(name, 1 << 20)
    with pytest.raises(UserError, match=r"no volume 'vm2' in pool .* \(volumes: golden, vm1\)"):
        env.pool.volume("vm2")
    for i in range(2, 12):
        await env.create(f"vm{i}", 1 << 20)
    with pytest.raises(UserError) as missing:
        env.pool.volume("vm12")
    message = str(missing.value)
    assert "(12 volumes; did you mean 'vm2' or 'vm1' or 'vm11'?" in message, message
    assert "'nbdserver volume list' lists them)" in message and "golden" not in message
    with pytest.raises(UserError, match=r"\(12 volumes; 'nbdserver volume list' lists them\)"):
        env.pool.volume("zzzzzz")
