"""Fresh chunks are mapped a batch of I/O completions at a time.

A write into fresh chunks (a first write, or a copy-on-write of whole chunks)
is mapped once its data is on the device. The writes whose data completes in
one batch of AIO completions are mapped together, in one mini-transaction
(``VolumeBackend._install_queued``). Here many 4 KiB copy-on-writes run at
once after a snapshot:

- with every page at hand, batches of more than one write must form;
- with a small page cache and the tiny test journal, a batch meets pages that
  are not in memory (it rolls back whole) or fills the journal's share of dirty
  pages (it stops there), and maps the rest one write at a time, loading pages
  and waiting for a commit as needed: no journal record outgrows the ring;
- a device write that fails gives its claimed chunk back and maps nothing.

In every case each volume must read back what was written to it, the snapshot
what it held before, and the pool must check clean.
"""

from __future__ import annotations

import asyncio
import errno
import random
from collections.abc import Callable
from typing import Any

import pytest
from poolkit import PoolEnv, PoolFactory, design_names, pattern

from nbdserver.blockmap.base import Claim
from nbdserver.errors import NbdError
from nbdserver.volume import VolumeBackend

CHUNKS = 256


async def _snapshot(env: PoolEnv) -> None:
    """Volume "o" of CHUNKS chunks, written in full (16 chunks per write: the tiny test
    journal holds the map pages of that, with the tiny fan-out of the test pools), and
    its snapshot "s"."""
    chunk = env.chunk_size
    origin = await env.create("o", CHUNKS * chunk)
    data = pattern(1, CHUNKS * chunk)
    for at in range(0, CHUNKS * chunk, 16 * chunk):
        await origin.write(at, data[at:at + 16 * chunk])
    await env.snapshot("o", "s")


async def _cow_storm(env: PoolEnv, seed: int, writes: int) -> dict[int, bytes]:
    """`writes` concurrent whole-chunk writes of the origin (after _snapshot) at random
    distinct chunks; returns what each written chunk must hold."""
    chunk = env.chunk_size
    origin = env.vol("o")
    rng = random.Random(seed)
    chunks = rng.sample(range(CHUNKS), writes)
    new = {lc: pattern(1000 + lc, chunk) for lc in chunks}
    await asyncio.gather(*(origin.write(lc * chunk, data) for lc, data in new.items()))
    return new


async def _assert_contents(env: PoolEnv, new: dict[int, bytes]) -> None:
    chunk = env.chunk_size
    want = bytearray(pattern(1, CHUNKS * chunk))
    assert await env.vol("s").read_all() == want  # the snapshot is untouched
    for lc, data in new.items():
        want[lc * chunk:(lc + 1) * chunk] = data
    assert await env.vol("o").read_all() == want
    await env.assert_clean()


def _spy(monkeypatch: pytest.MonkeyPatch, name: str,
         before: Callable[[Any], None]) -> None:
    plain = getattr(VolumeBackend, name)

    def spy(self: VolumeBackend, *args: Any) -> Any:
        before(self)
        return plain(self, *args)

    monkeypatch.setattr(VolumeBackend, name, spy)


# linear copies a snapshot's chunks out and writes the origin in place: it maps no fresh
# chunks after a snapshot (its own tests cover that path).
REDIRECTING = [d for d in design_names() if d != "linear"]


@pytest.mark.parametrize("design", REDIRECTING)
async def test_writes_completing_together_are_mapped_in_one_batch(
        make_pool: PoolFactory, design: str, monkeypatch: pytest.MonkeyPatch) -> None:
    env = await make_pool(design)  # offline: every page at hand
    sizes: list[int] = []
    _spy(monkeypatch, "_install_queued",
         lambda backend: sizes.append(len(backend._fresh) + len(backend._installs)))
    await _snapshot(env)
    new = await _cow_storm(env, seed=3, writes=96)
    await _assert_contents(env, new)
    assert sum(sizes) >= 90, sizes  # (a few may take the slow path)
    assert max(sizes) > 1, sizes
    await env.reopen()  # and it is all in the pool, not only in memory
    env.vols.clear()
    await _assert_contents(env, new)


@pytest.mark.parametrize("design", REDIRECTING)
async def test_a_batch_that_cannot_finish_maps_the_rest_alone(
        make_pool: PoolFactory, design: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # 64 pages of cache: enough for the fast path to start, too few to keep every page
    env = await make_pool(design, offline=False, cache_bytes=64 * 4096)
    alone: list[int] = []
    _spy(monkeypatch, "_install_one", lambda backend: alone.append(1))
    await _snapshot(env)
    loads = env.pool.cache.loads
    commits = env.pool.commits
    new = await _cow_storm(env, seed=4, writes=128)
    assert alone, "no batch fell back to mapping its writes one by one"
    assert env.pool.cache.loads > loads and env.pool.commits > commits
    await _assert_contents(env, new)


class _FailingWrites:
    """The pool's real engine, except that writes overlapping [start, end) of the
    device fail with EIO (a bad sector)."""

    def __init__(self, engine: Any, start: int, end: int) -> None:
        self._engine = engine
        self.range = (start, end)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._engine, name)

    def write(self, fd: int, buf: Any, buf_offset: int, length: int, offset: int,
              callback: Callable[[int], None], dsync: bool = False) -> None:
        start, end = self.range
        if offset < end and start < offset + length:
            self._engine.loop.call_soon(callback, -errno.EIO)
            return
        self._engine.write(fd, buf, buf_offset, length, offset, callback, dsync)


@pytest.mark.parametrize("design", REDIRECTING)
async def test_a_failed_fresh_write_gives_its_chunk_back(make_pool: PoolFactory,
                                                         design: str) -> None:
    env = await make_pool(design)
    chunk = env.chunk_size
    await _snapshot(env)
    origin = env.vol("o")
    pool = env.pool
    data_start = pool.layout.data_start
    # Every chunk the pool could hand out next fails to write.
    failing = _FailingWrites(pool.engine, data_start, data_start + pool.data.count * chunk)
    backend = env.vol("o").backend
    backend.engine = failing
    used = pool.data.used
    with pytest.raises(NbdError) as err:
        await origin.write(5 * chunk, pattern(9, chunk))
    assert err.value.errno == errno.EIO
    assert not pool.data.in_flight and pool.data.used == used
    backend.engine = failing._engine
    await origin.write(6 * chunk, pattern(10, chunk))
    await _assert_contents(env, {6: pattern(10, chunk)})


async def test_whole_chunk_writes_to_chunks_no_longer_shared_go_fresh_without_a_commit(
        make_pool: PoolFactory) -> None:
    """Once a volume's snapshot is deleted, its chunks are its own again, but its map
    still says they were shared. radix sends a write of a whole such chunk into a fresh
    chunk and frees the old one, as after a snapshot, instead of claiming it in place: a
    claim must commit first whenever metadata is pending (a pool sync per write here).
    No commit may be forced, every chunk must read back, and after a commit the pool
    must hold exactly as many chunks as before (the old ones freed)."""
    env = await make_pool("radix", cache_bytes=1 << 20)
    chunk = env.chunk_size
    n = 16
    vol = await env.create("v", n * chunk)
    want = bytearray(pattern(1, n * chunk))
    await vol.write(0, bytes(want))
    await env.snapshot("v", "s")
    await env.delete("s")
    await env.pool.commit()
    pool = env.pool
    free = pool.data.free
    commits = pool.commits
    lcs = [lc for lc in range(n) if type(pool.map.write_target(pool.volume("v"), lc)) is Claim]
    assert lcs, "no chunk is claimable: the test proves nothing"
    for lc in lcs:
        data = pattern(100 + lc, chunk)
        await vol.write(lc * chunk, data)
        want[lc * chunk:(lc + 1) * chunk] = data
    assert pool.commits == commits, f"{pool.commits - commits} commit(s) forced by writes"
    assert await vol.read_all() == want
    await pool.commit()
    assert pool.data.free == free, "the old chunks were not freed, or the new ones leaked"
    await env.assert_clean()
