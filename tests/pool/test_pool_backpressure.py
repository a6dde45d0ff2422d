"""Back-pressure: metadata operations racing a commit cannot grow the next journal record
past the ring (it would be refused, and every later commit with it)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from poolkit import PoolEnv, design_names

from nbdserver.pool.pool import Pool

# Linear volumes are thick: a write maps nothing new, so there is nothing to pile up.
pytestmark = pytest.mark.parametrize("design", [d for d in design_names() if d != "linear"])


async def _map_many(env: PoolEnv, chunks: int) -> None:
    pool = env.pool
    vol = pool.volume("v")

    def install(lc: int) -> None:
        pc = pool.claim_chunk(vol, pool.map.alloc_hint(vol, lc))
        pool.map.map(vol, lc, pc)

    commits: list[asyncio.Task[None]] = []
    for lc in range(0, chunks, 3):  # spread out: each map dirties its own pages
        if not pool._commit_lock.locked():
            commits.append(asyncio.ensure_future(pool.commit()))
        await pool.run(lambda lc=lc: install(lc))
    await asyncio.gather(*commits)


async def test_operations_during_a_commit_wait_instead_of_overflowing_the_journal(
        tmp_path: Path, design: str) -> None:
    env = PoolEnv(tmp_path / "pool.img", design, size=256 * 1024 * 1024,
                  journal_bytes=256 * 1024)  # a 64-page ring
    await env.open()
    pool = env.pool
    await pool.create_volume("v", 8 * 1024 * 1024)
    seen: list[int] = []
    real = Pool.commit

    async def watching(self: Pool) -> None:
        seen.append(self.cache.dirty_count)
        await real(self)

    Pool.commit = watching  # type: ignore[method-assign]
    try:
        await _map_many(env, 1024)
    finally:
        Pool.commit = real  # type: ignore[method-assign]
    assert max(seen) <= pool.dirty_limit() + 64  # one operation's worth over, at most
    report = await pool.check()
    assert report.ok, report.problems
    await env.close()
