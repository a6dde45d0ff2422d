"""The ``linear`` design (LVM2 classic snapshots): what is particular to it.

Thick, contiguous origins; copy-out into every snapshot lacking the chunk on an
origin write (counted in chunks); no snapshot of a snapshot (API and CLI); no
deletion of an origin with snapshots; exact reclamation of a snapshot's
exceptions; never-written chunks of a recycled origin read as zeros; snapshots
stay point-in-time exact. Every test ends with a clean ``pool check``.
"""

from __future__ import annotations

import asyncio
import errno
import random
import subprocess
import sys
from pathlib import Path

import pytest
from poolkit import HoldingEngine, PoolEnv, PoolFactory, pattern
from test_blockmap_space import fill, thin_hog

from nbdserver.backend.base import ALLOCATION_DEPTH, BASE_ALLOCATION, STATE_HOLE, STATE_ZERO
from nbdserver.blockmap.base import HOLE, Claim, CopyOut, InPlace, Redirect
from nbdserver.blockmap.linear import LinearMap
from nbdserver.errors import NbdError, UserError

CHUNK = 4096
KiB = 1024
MiB = 1024 * KiB


async def linear_pool(make_pool: PoolFactory, **kwargs: object) -> PoolEnv:
    env = await make_pool("linear", **kwargs)
    assert isinstance(env.pool.map, LinearMap)
    return env


def used(env: PoolEnv) -> int:
    return env.pool.data.used


async def test_origin_is_thick_and_contiguous(make_pool: PoolFactory) -> None:
    env = await linear_pool(make_pool)
    before = used(env)
    vol = await env.create("o", 64 * CHUNK)
    assert used(env) - before == 64, "an origin allocates every chunk at creation"
    assert await vol.block_status(0, vol.size) == [(vol.size, STATE_HOLE | STATE_ZERO)]
    await vol.write(0, pattern(1, vol.size))
    assert used(env) - before == 64, "writing a thick origin allocates nothing"
    runs = await env.pool.cache.run(
        lambda: env.pool.map.lookup(env.pool.volume("o"), 0, 64))
    assert len(runs) == 1 and runs[0].count == 64 and runs[0].pc != HOLE
    assert await vol.read_all() == pattern(1, vol.size)
    with pytest.raises(UserError, match="thick"):
        await env.create("huge", env.pool.layout.data_chunks * CHUNK)
    await env.assert_clean()


@pytest.mark.parametrize("offline", [True, False])
async def test_origin_write_copies_into_every_snapshot(make_pool: PoolFactory,
                                                       offline: bool) -> None:
    env = await linear_pool(make_pool, offline=offline)
    origin = await env.create("o", 32 * CHUNK)
    old = pattern(1, origin.size)
    await origin.write(0, old)
    await env.snapshot("o", "s1")
    await env.snapshot("o", "s2")
    fork = await env.fork("o", "f1")
    rec = env.pool.volume("o")
    target = await env.pool.cache.run(lambda: env.pool.map.write_target(rec, 3))
    assert isinstance(target, CopyOut) and len(target.preserve) == 3

    base = used(env)
    await origin.write(3 * CHUNK, pattern(2, CHUNK))
    assert used(env) - base == 3, "one copy per snapshot lacking the chunk"
    await origin.write(3 * CHUNK + 100, pattern(3, 50))
    assert used(env) - base == 3, "a second write to the chunk copies nothing"
    target = await env.pool.cache.run(lambda: env.pool.map.write_target(rec, 3))
    assert target == InPlace(target.pc)

    # the fork writes chunk 5 itself: only the two snapshots need copies then
    await fork.write(5 * CHUNK + 10, b"fork")
    assert used(env) - base == 4
    await origin.write(5 * CHUNK, pattern(4, 2 * CHUNK))  # chunks 5 and 6
    assert used(env) - base == 4 + 2 + 3

    for name in ("s1", "s2"):
        assert await env.vol(name).read_all() == old, name
    want = bytearray(old)
    want[5 * CHUNK + 10:5 * CHUNK + 14] = b"fork"
    assert await fork.read_all() == want
    await env.reopen()
    for name in ("s1", "s2"):
        assert await env.vol(name).read_all() == old, name
    assert await env.vol("f1").read_all() == want
    await env.assert_clean()


@pytest.mark.parametrize("offline", [True, False])
async def test_unwritten_origin_chunk_copies_nothing(make_pool: PoolFactory,
                                                     offline: bool) -> None:
    env = await linear_pool(make_pool, offline=offline)
    origin = await env.create("o", 16 * CHUNK)
    await origin.write(0, pattern(1, CHUNK))
    snaps = [await env.snapshot("o", f"s{i}") for i in range(4)]
    base, pages = used(env), env.pool.meta.used
    await origin.write(8 * CHUNK + 7, b"late")  # chunk 8 was never written
    await origin.write(10 * CHUNK, pattern(2, 3 * CHUNK))  # nor 10..12
    assert used(env) == base, "a first write copies nothing"
    for i in range(4):
        stats = await env.pool.volume_stats(env.pool.volume(f"s{i}"))
        assert stats.metadata_pages == 0, "and touches no snapshot"
    assert env.pool.meta.used == pages  # the origin's one write-epoch leaf holds it all
    for snap in snaps:
        assert await snap.read_all() == pattern(1, CHUNK) + bytes(15 * CHUNK)
    got = await origin.read(8 * CHUNK, CHUNK)
    assert got == bytes(7) + b"late" + bytes(CHUNK - 11)
    depth = await snaps[0].block_status(0, snaps[0].size, ALLOCATION_DEPTH)
    assert depth == [(CHUNK, 2), (15 * CHUNK, 0)], "origin data shows as depth 2"

    # a snapshot taken after the first write of chunk 8 needs the copy; older ones do not
    late = await env.snapshot("o", "late")
    rec = env.pool.volume("o")
    target = await env.pool.cache.run(lambda: env.pool.map.write_target(rec, 8))
    assert target == CopyOut(target.pc, (env.pool.volume("late").id,))
    await origin.write(8 * CHUNK, pattern(3, CHUNK))
    assert used(env) == base + 1
    assert await late.read(8 * CHUNK, CHUNK) == got
    for snap in snaps:
        assert await snap.read(8 * CHUNK, CHUNK) == bytes(CHUNK)
    await env.reopen()
    assert await env.vol("late").read(8 * CHUNK, CHUNK) == got
    assert await env.vol("s0").read_all() == pattern(1, CHUNK) + bytes(15 * CHUNK)
    await env.assert_clean()


async def test_snapshot_of_snapshot_refused(make_pool: PoolFactory) -> None:
    env = await linear_pool(make_pool)
    await env.create("o", 8 * CHUNK)
    await env.snapshot("o", "s")
    await env.fork("o", "f")
    for src, what in (("s", "a snapshot"), ("f", r"a fork \(a writable snapshot\)")):
        for snapshot in (True, False):
            with pytest.raises(UserError, match=rf"'{src}' is {what}: .*LVM2 classic snapshots"
                                                r".*cannot snapshot or fork a snapshot.*"
                                                r"origin 'o'"):
                await env.pool.clone_volume(src, "x", snapshot=snapshot)
    assert sorted(env.names()) == ["f", "o", "s"]
    await env.assert_clean()


def _cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "nbdserver", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def test_cli_refuses_snapshot_of_snapshot(tmp_path: Path) -> None:
    pool = tmp_path / "p.img"
    for args in (("pool", "create", pool, "--size", "16M", "--blockmap", "linear"),
                 ("volume", "create", pool, "o", "--size", "1M"),
                 ("volume", "snapshot", pool, "o", "s"),
                 ("volume", "fork", pool, "o", "f")):
        proc = _cli(*args)
        assert proc.returncode == 0, proc.stderr
    for cmd in ("fork", "snapshot"):
        for src in ("s", "f"):
            proc = _cli("volume", cmd, pool, src, "x")
            assert proc.returncode == 1, (cmd, src, proc.stdout, proc.stderr)
            assert "cannot snapshot or fork a snapshot" in proc.stderr
            assert ("is a snapshot:" if src == "s" else "is a fork") in proc.stderr
            assert "LVM2 classic snapshots" in proc.stderr
            assert "Traceback" not in proc.stderr
    proc = _cli("volume", "delete", pool, "o")
    assert proc.returncode == 1 and "delete the snapshots first" in proc.stderr
    proc = _cli("pool", "check", pool)
    assert proc.returncode == 0 and "clean" in proc.stdout, proc.stdout + proc.stderr


async def test_delete_origin_with_snapshots_refused(make_pool: PoolFactory) -> None:
    env = await linear_pool(make_pool)
    empty = used(env)
    origin = await env.create("o", 16 * CHUNK)
    await origin.write(0, pattern(1, origin.size))
    await env.snapshot("o", "s1")
    await env.fork("o", "f1")
    await origin.write(0, pattern(2, 4 * CHUNK))
    with pytest.raises(UserError, match=r"origin of 2 snapshot\(s\).*'f1', 's1'.*delete the "
                                        r"snapshots first"):
        await env.delete("o")
    assert env.pool.volume("o") is not None
    await env.delete("s1")
    with pytest.raises(UserError, match="origin of 1 snapshot"):
        await env.delete("o")
    await env.delete("f1")
    await env.delete("o")
    assert used(env) == empty, "deleting the origin frees all of it"
    assert env.pool.meta.used == 0
    await env.assert_clean()


@pytest.mark.parametrize("offline", [True, False])
async def test_delete_snapshot_frees_exactly_its_exceptions(make_pool: PoolFactory,
                                                            offline: bool) -> None:
    env = await linear_pool(make_pool, offline=offline)
    origin = await env.create("o", 64 * CHUNK)
    await origin.write(0, pattern(1, origin.size))
    await env.snapshot("o", "s1")
    fork = await env.fork("o", "f1")
    await origin.write(0, pattern(2, 10 * CHUNK))  # 10 exceptions in each
    await env.snapshot("o", "s2")
    await origin.write(20 * CHUNK, pattern(3, 5 * CHUNK))  # 5 more in each of the three
    await fork.write(40 * CHUNK, pattern(4, 3 * CHUNK))  # 3 of the fork's own
    pool = env.pool
    stats = {n: await pool.volume_stats(pool.volume(n)) for n in ("s1", "s2", "f1")}
    assert stats["s1"].exclusive_chunks == 15 and stats["s2"].exclusive_chunks == 5
    assert stats["f1"].exclusive_chunks == 18
    s2_reads = await env.vol("s2").read_all()
    for name in ("f1", "s1"):
        chunks, pages = used(env), pool.meta.used
        await env.delete(name)
        assert chunks - used(env) == stats[name].exclusive_chunks, name
        assert pages - pool.meta.used == stats[name].metadata_pages, name
        await env.assert_clean()
    assert await env.vol("s2").read_all() == s2_reads
    await env.delete("s2")
    ostats = await pool.volume_stats(pool.volume("o"))
    assert used(env) == 64 and pool.meta.used == ostats.metadata_pages
    await env.assert_clean()


async def test_fresh_origin_on_reused_pool_reads_zeros(make_pool: PoolFactory) -> None:
    env = await linear_pool(make_pool)
    size = 48 * CHUNK
    vol = await env.create("secret", size)
    secret = pattern(77, size)
    await vol.write(0, secret)
    await vol.flush()
    rec = env.pool.volume("secret")
    runs = await env.pool.cache.run(lambda: env.pool.map.lookup(rec, 0, 48))
    old_pcs = {r.pc + i for r in runs for i in range(r.count)}
    await env.delete("secret")
    await env.reopen()

    vol = await env.create("fresh", size)
    rec = env.pool.volume("fresh")
    targets = await env.pool.cache.run(
        lambda: [env.pool.map.write_target(rec, lc) for lc in range(48)])
    assert all(isinstance(t, Redirect) and t.into != HOLE for t in targets)
    new_pcs = {t.into for t in targets if isinstance(t, Redirect)}
    assert new_pcs == old_pcs, "the test needs the fresh origin on the secret's chunks"
    assert await vol.read_all() == bytes(size)
    assert await vol.block_status(0, size) == [(size, STATE_HOLE | STATE_ZERO)]
    await vol.write(5 * CHUNK + 1000, b"new")  # a partial write: zeros around it
    await vol.write(9 * CHUNK, b"x" * 512)
    want = bytearray(size)
    want[5 * CHUNK + 1000:5 * CHUNK + 1003] = b"new"
    want[9 * CHUNK:9 * CHUNK + 512] = b"x" * 512
    assert await vol.read_all() == want
    await env.reopen()
    assert await env.vol("fresh").read_all() == want
    status = await env.vol("fresh").block_status(0, size, BASE_ALLOCATION)
    assert status[0] == (5 * CHUNK, STATE_HOLE | STATE_ZERO) and status[1] == (CHUNK, 0)
    await env.assert_clean()


@pytest.mark.parametrize("seed", [1, 2])
async def test_snapshots_are_point_in_time_exact(make_pool: PoolFactory, seed: int) -> None:
    env = await linear_pool(make_pool, offline=seed == 2)
    rng = random.Random(seed)
    size = 40 * CHUNK
    await env.create("o", size)
    model = {"o": bytearray(size)}
    forks: list[str] = []
    for step in range(120):
        op = rng.random()
        if step % 25 == 10 and len(model) < 7:
            name = f"s{step}"
            if rng.random() < 0.5:
                await env.snapshot("o", name)
            else:
                await env.fork("o", name)
                forks.append(name)
            model[name] = bytearray(model["o"])
            continue
        name = rng.choice(["o", "o", "o", *forks]) if forks else "o"
        off = rng.randrange(size)
        n = min(size - off, rng.choice([1, 100, CHUNK, 3 * CHUNK + 17]))
        if op < 0.8:
            data = pattern(rng.randrange(1 << 16), n)
            await env.vol(name).write(off, data)
            model[name][off:off + n] = data
        elif op < 0.9:
            await env.vol(name).trim(off, n)
            model[name][off:off + n] = bytes(n)
        else:
            await env.vol(name).zero(off, n, may_trim=rng.random() < 0.5)
            model[name][off:off + n] = bytes(n)
    for name, want in model.items():
        assert await env.vol(name).read_all() == want, name
    await env.assert_clean()
    await env.reopen()
    for name, want in model.items():
        assert await env.vol(name).read_all() == want, name
    await env.assert_clean()


async def test_trim(make_pool: PoolFactory) -> None:
    env = await linear_pool(make_pool)
    origin = await env.create("o", 32 * CHUNK)
    old = pattern(1, origin.size)
    await origin.write(0, old)
    snap = await env.snapshot("o", "s")
    fork = await env.fork("o", "f")
    await origin.write(0, pattern(2, 8 * CHUNK))  # both get exceptions for chunks 0..7
    base = used(env)

    # a snapshot trim drops its exceptions (zero exceptions remain) and reads zeros
    await fork.trim(0, 16 * CHUNK)
    assert base - used(env) == 8
    assert await fork.read(0, 16 * CHUNK) == bytes(16 * CHUNK)
    assert await fork.read(16 * CHUNK, 16 * CHUNK) == old[16 * CHUNK:]

    # the origin's chunks 0..7: both snapshots hold exceptions, so they become unwritten
    await origin.trim(0, 8 * CHUNK)
    status = await origin.block_status(0, 8 * CHUNK)
    assert status == [(8 * CHUNK, STATE_HOLE | STATE_ZERO)]
    # chunks 8..11: the snapshot still reads them from the origin: copied out, then zeroed
    before = used(env)
    await origin.trim(8 * CHUNK, 4 * CHUNK)
    assert used(env) - before == 4, "the snapshot gets copies of the old chunks"
    assert await origin.read(0, 12 * CHUNK) == bytes(12 * CHUNK)
    assert await snap.read_all() == old
    assert used(env) - base == 4 - 8
    await env.assert_clean()


async def test_fragmented_origin_uses_segments(make_pool: PoolFactory) -> None:
    env = await linear_pool(make_pool, map_params=(0, 0, 0, 16))  # the volume fills the pool
    free = env.pool.available_chunks()
    pieces = 6
    n = free // (2 * pieces)
    for i in range(2 * pieces):
        await env.create(f"v{i}", n * CHUNK)
    await env.create("rest", (env.pool.available_chunks() - 1) * CHUNK)
    for i in range(0, 2 * pieces, 2):
        await env.delete(f"v{i}")  # holes of n chunks, none bigger
    before_big = used(env)
    size = (pieces * n - 3) * CHUNK
    vol = await env.create("big", size)
    rec = env.pool.volume("big")
    data = pattern(5, size)
    await vol.write(0, data)
    runs = await env.pool.cache.run(lambda: env.pool.map.lookup(rec, 0, size // CHUNK))
    assert len(runs) == pieces and all(r.owner == rec.id for r in runs)
    assert await vol.read_all() == data
    stats = await env.pool.volume_stats(rec)
    assert stats.extents == pieces and stats.metadata_pages >= 2  # a segment page
    await env.reopen()
    assert await env.vol("big").read_all() == data
    await env.assert_clean()
    await env.delete("big")
    assert used(env) == before_big
    await env.assert_clean()


async def test_too_fragmented_refused(make_pool: PoolFactory) -> None:
    env = await linear_pool(make_pool, map_params=(0, 0, 0, 16))  # at most 16 segments
    for i in range(34):
        await env.create(f"v{i}", CHUNK)
    await env.create("rest", env.pool.available_chunks() * CHUNK)
    for i in range(0, 34, 2):
        await env.delete(f"v{i}")  # 17 holes of one chunk
    with pytest.raises(UserError, match="too fragmented"):
        await env.create("scattered", 17 * CHUNK)
    vol = await env.create("sixteen", 16 * CHUNK)
    await vol.write(0, pattern(9, vol.size))
    assert await vol.read_all() == pattern(9, vol.size)
    assert env.pool.available_chunks() == 1
    with pytest.raises(UserError, match="needs 8 KiB but only 4 KiB is free"):
        await env.create("two", 2 * CHUNK)
    await env.assert_clean()


async def test_copy_out_races_with_snapshot_writes(make_pool: PoolFactory) -> None:
    env = await linear_pool(make_pool, offline=False)
    origin = await env.create("o", 16 * CHUNK)
    old = pattern(1, origin.size)
    await origin.write(0, old)
    fork = await env.fork("o", "f")
    want_o = bytearray(old)
    want_f = bytearray(old)
    writes = []
    for lc in range(16):
        a = pattern(100 + lc, 300)
        b = pattern(200 + lc, 200)
        writes.append(origin.write(lc * CHUNK + 1000, a))
        writes.append(fork.write(lc * CHUNK + 2000, b))
        want_o[lc * CHUNK + 1000:lc * CHUNK + 1300] = a
        want_f[lc * CHUNK + 2000:lc * CHUNK + 2200] = b
    rng = random.Random(3)
    rng.shuffle(writes)
    await asyncio.gather(*writes)
    assert await origin.read_all() == want_o
    assert await fork.read_all() == want_f
    await env.assert_clean()


@pytest.mark.parametrize("how", ["trim", "write"])
async def test_crash_after_unflushed_unshare_by_the_fork(make_pool: PoolFactory,
                                                         how: str) -> None:
    """The fork stops reading origin chunk 0 (a trim or its own write), not flushed; the
    origin then rewrites the chunk. After a crash the fork may have lost its change, so
    the origin must have made it durable (Claim) before writing in place."""
    env = await linear_pool(make_pool)
    origin = await env.create("o", 8 * CHUNK)
    await origin.write(0, pattern(1, 8 * CHUNK))
    fork = await env.fork("o", "f")
    await env.pool.commit()
    if how == "trim":
        await fork.trim(0, CHUNK)
    else:
        await fork.write(100, b"mine")
    rec = env.pool.volume("o")
    target = await env.pool.cache.run(lambda: env.pool.map.write_target(rec, 0))
    assert isinstance(target, Claim)
    await origin.write(0, pattern(3, CHUNK))
    target = await env.pool.cache.run(lambda: env.pool.map.write_target(rec, 0))
    assert isinstance(target, InPlace), "claimed once, then in place"
    await env.crash()  # kill -9
    got = await env.vol("f").read(0, CHUNK)
    mine = bytearray(pattern(1, CHUNK))
    mine[100:104] = b"mine"
    assert got in (bytes(CHUNK) if how == "trim" else bytes(mine), pattern(1, CHUNK))
    assert await env.vol("o").read(0, CHUNK) in (pattern(3, CHUNK), pattern(1, CHUNK))
    await env.assert_clean()


async def test_guaranteed_origin_needs_its_size_once_and_snapshots_reserve(
        make_pool: PoolFactory) -> None:
    """A thick origin already owns every chunk: --guarantee must not reserve its size a
    second time (a pool with room for it once must accept it), while a guaranteed
    snapshot, whose exception store can grow to the origin's size, reserves. So does
    any snapshot of a guaranteed origin: overwriting the origin copies into it, so the
    origin's guarantee holds only if the snapshot's room is promised (or the clone is
    refused)."""
    env = await linear_pool(make_pool)
    pool = env.pool
    size = (pool.layout.data_chunks * 6 // 10) * CHUNK  # fits once, not twice
    await env.create("o", size, guarantee=True)
    origin = pool.volume("o")
    assert origin.guaranteed and origin.reserved == 0
    assert pool.state.data_reserved == 0
    with pytest.raises(UserError, match="cannot guarantee"):  # 60% more does not fit
        await env.fork("o", "g", guarantee=True)
    with pytest.raises(UserError, match="cannot clone 'o': it is guaranteed"):
        await env.fork("o", "thin")
    assert "thin" not in env.names() and pool.state.data_reserved == 0
    await env.create("t", 4 * CHUNK)  # a thin origin's snapshot reserves nothing
    await env.fork("t", "t-thin")
    assert pool.state.data_reserved == 0
    await env.assert_clean()


async def test_a_guaranteed_origin_with_a_snapshot_never_gets_enospc(
        make_pool: PoolFactory) -> None:
    """Its snapshot reserved the origin's size: with the rest of the pool taken, every
    overwrite of the origin (a copy-out into the snapshot) still succeeds."""
    env = await linear_pool(make_pool)
    pool = env.pool
    o = await env.create("o", 64 * CHUNK, guarantee=True)
    await o.write(0, pattern(1, 64 * CHUNK))
    await env.snapshot("o", "s")
    assert pool.volume("s").guaranteed and pool.volume("s").reserved == 64
    await env.create("filler", pool.available_chunks() * CHUNK)  # thick: takes the rest
    assert pool.available_chunks() == 0
    await o.write(0, pattern(2, 64 * CHUNK))  # 64 copy-outs into s
    assert await env.vol("s").read(0, 64 * CHUNK) == pattern(1, 64 * CHUNK)
    assert await o.read(0, 64 * CHUNK) == pattern(2, 64 * CHUNK)
    await env.reopen()
    assert await env.vol("s").read(0, 64 * CHUNK) == pattern(1, 64 * CHUNK)
    await env.assert_clean()


@pytest.mark.parametrize("what", ["trim", "delete"])
async def test_one_step_of_a_big_unmap_fits_the_journal(make_pool: PoolFactory,
                                                        what: str) -> None:
    """With a fan-out of 2 an exception entry can dirty two pages: a step of a trim or of
    a deletion stops once it has dirtied a quarter of the ring, so its commit record
    fits (one record larger than the ring fails the pool)."""
    env = await make_pool("linear", size=1024 * MiB, map_params=(2, 0, 0, 0), small=False,
                          journal_bytes=None, offline=False, cache_bytes=64 * MiB)
    pool = env.pool
    assert pool.ring.ring_pages == 2048  # the default journal of a 1 GiB pool
    size = 8 * MiB
    o = await env.create("o", size)
    await o.write(0, pattern(1, size))
    f = await env.fork("o", "f")
    for off in range(0, size, 1 * MiB):  # an exception for every chunk
        await f.write(off, pattern(2 + off, 1 * MiB))
    await f.flush()
    if what == "trim":
        await f.trim(0, size)
        await f.flush()
        assert await f.read(0, size) == bytes(size)
    else:
        await env.delete("f")
        await pool.commit()
    assert pool.failed is None, pool.failed
    assert await o.read(0, size) == pattern(1, size)
    await env.reopen()
    await env.assert_clean()


async def test_a_copy_out_keeps_a_write_of_the_fork_opened_meanwhile(
        make_pool: PoolFactory) -> None:
    """The origin's write copies chunk 0 out into its guaranteed fork f, which no client
    had open when the copy began (so the copy found no chunk lock of f's to hold). While
    the copy's read of the origin is slow, a client opens f and writes chunk 0 itself.
    The copy must then be dropped: mapping it threw f's write away (f read the origin's
    old data) and charged f's promise twice, and f's last write later got ENOSPC."""
    n = 16
    env = await make_pool("linear", size=6 * MiB, small=False)
    pool = env.pool
    c = env.chunk_size
    o = await env.create("o", n * c, guarantee=True)
    await o.write(0, pattern(1, n * c))
    await env.fork("o", "f", guarantee=True)
    await env.release("f")  # exported, with no client yet
    await env.release("o")
    holder = HoldingEngine(pool.engine)
    pool.engine = holder  # (before the backends are made again)
    o = env.vol("o")
    first = pool.layout.data_start + pool.map.lookup(pool.volume("o"), 0, 1)[0].pc * c
    holder.hold(first, first + c)  # the copy's read of the origin's chunk 0
    origin_write = asyncio.ensure_future(o.write(0, pattern(2, c)))
    for _ in range(1000):
        if holder.held:
            break
        await asyncio.sleep(0.005)
    assert holder.held, "the copy never read the origin"
    f = env.vol("f")  # a client opens f now
    await f.write(0, pattern(3, c))
    promised = pool.volume("f").reserved
    holder.release()
    await origin_write
    assert await f.read(0, c) == pattern(3, c), "the copy-out threw the fork's write away"
    assert await o.read(0, c) == pattern(2, c)
    assert pool.volume("f").reserved == promised
    await env.assert_clean()
    await pool.commit()
    hog = await thin_hog(env, "hog", 4 * pool.layout.data_chunks)
    await fill(hog, c)
    for lc in range(1, n):  # f's other chunks, in a full pool: none may fail
        try:
            await f.write(lc * c, pattern(50 + lc, c))
        except NbdError as e:
            raise AssertionError(f"f's write of chunk {lc}: {e}") from None
    await env.assert_clean()


async def test_big_chunks_unmap_with_a_snapshot_and_fast_zero(make_pool: PoolFactory) -> None:
    """With 1 MiB chunks, a trim of a 72 MiB origin whose snapshot still reads it all
    copies every chunk out and writes it with zeros: more than the largest I/O buffer
    (64 MiB) holds, written a step at a time. A FAST_ZERO there would copy too: refused
    (ENOTSUP) before anything changes."""
    env = await linear_pool(make_pool, size=200 * MiB, chunk_size=1 * MiB)
    origin = await env.create("o", 72 * MiB)
    old = pattern(1, origin.size)
    for pos in range(0, origin.size, 32 * MiB):  # (NBD's largest request)
        await origin.write(pos, old[pos:pos + 32 * MiB])
    snap = await env.snapshot("o", "s")
    with pytest.raises(NbdError) as refused:
        await origin.zero(0, origin.size, fast_only=True)
    assert refused.value.errno == errno.ENOTSUP, refused.value
    assert await origin.read_all() == old
    await origin.trim(0, origin.size)
    assert await origin.read_all() == bytes(origin.size)
    assert await snap.read_all() == old
    await env.assert_clean()


async def test_fast_zero_on_an_origin_is_refused_even_after_its_fork_is_gone(
        make_pool: PoolFactory) -> None:
    """A chunk a fork read and then wrote keeps its CLAIM mark on the origin after the
    fork is deleted, and zeroing it writes zeros: a FAST_ZERO on an origin is refused
    (ENOTSUP), changing nothing, with or without snapshots; a snapshot's is fast."""
    env = await linear_pool(make_pool)
    origin = await env.create("o", 8 * CHUNK)
    await origin.write(0, pattern(1, 4 * CHUNK))
    fork = await env.fork("o", "f")
    await fork.write(0, pattern(2, CHUNK))
    await fork.zero(2 * CHUNK, CHUNK, fast_only=True)  # a snapshot's zero: metadata only
    assert await fork.read(0, 3 * CHUNK) == pattern(2, CHUNK) + pattern(1, 2 * CHUNK)[
        CHUNK:2 * CHUNK] + bytes(CHUNK)
    await env.delete("f")
    with pytest.raises(NbdError) as refused:
        await origin.zero(0, CHUNK, fast_only=True)
    assert refused.value.errno == errno.ENOTSUP
    assert await origin.read(0, 4 * CHUNK) == pattern(1, 4 * CHUNK)
    await origin.zero(0, CHUNK)  # (not fast: done)
    assert await origin.read(0, CHUNK) == bytes(CHUNK)
    await env.assert_clean()
