"""Back-pressure: metadata operations racing a commit cannot grow the next journal record
past the ring (it would be refused, and every later commit with it).

Also through the data path: a thousand writes in flight at once, whole chunks (the
fast path, mapped a batch of completions at a time) and partial ones (the slow path,
which loads pages), into holes and after a snapshot, with the 64-page test journal.
That once made a 744-page record: the dirty limit was checked before an operation
waited for its pages, not right before it ran, and fast-path installs did not
check it at all."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

import pytest
from poolkit import PoolEnv, design_names, pattern

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


@pytest.mark.parametrize("partial", [False, True], ids=["whole", "partial"])
async def test_a_thousand_writes_in_flight_fit_the_journal(tmp_path: Path, design: str,
                                                           partial: bool) -> None:
    env = PoolEnv(tmp_path / "pool.img", design, size=1 << 30, offline=False)
    await env.open()
    try:
        chunk = env.chunk_size
        vol = await env.create("o", 4096 * chunk)
        commits = env.pool.commits
        want: dict[int, tuple[int, bytes]] = {}

        async def write(lc: int, seed: int) -> None:
            at = lc * chunk + (512 if partial else 0)
            data = pattern(seed, chunk - (1024 if partial else 0))
            await vol.write(at, data)
            want[lc] = (at, data)

        chunks = random.Random(8).sample(range(4096), 1024)
        await asyncio.gather(*(write(lc, lc) for lc in chunks))  # into holes
        await env.snapshot("o", "s")
        await asyncio.gather(*(write(lc, lc + 7) for lc in chunks))  # copy-on-write
        assert env.pool.commits > commits + 10  # the ring really filled, many times
        for at, data in want.values():
            assert await vol.read(at, len(data)) == data
        await env.assert_clean()
    finally:
        await env.shutdown()

