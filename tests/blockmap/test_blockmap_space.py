"""Thin provisioning and guarantees, for every design.

- A thin volume that fills the pool gets ENOSPC (errno 28) on the write that
  finds no chunk, and nothing else suffers: its earlier data, other volumes'
  data and the pool check stay fine; freeing space makes writes work again.
  (Thick designs have no thin origins: there a fork's copies fill the pool.)
- ``guarantee`` creation fails with a clear UserError when the pool cannot
  promise the space, and changes nothing.
- A guaranteed volume keeps writing, also after trimming and rewriting, while a
  thin volume exhausts the rest of the pool.
"""

from __future__ import annotations

import asyncio
import errno
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import pytest
from poolkit import (
    HoldingEngine,
    MiB,
    PoolEnv,
    PoolFactory,
    Vol,
    design_names,
    pattern,
    zero_runs,
)

from nbdserver.backend.base import STATE_HOLE
from nbdserver.blockmap.base import ASK, Claim, MapStats
from nbdserver.errors import NbdError, UserError
from nbdserver.pool.format import VolumeRecord
from nbdserver.pool.pool import CheckReport


async def thin_hog(env: PoolEnv, name: str, chunks: int) -> Vol:
    """A writable volume whose writes take new chunks from the pool, `chunks` of them at
    most: a thin volume, or (thick designs) a fork of an origin that takes a copy."""
    size = chunks * env.chunk_size
    try:
        return await env.create(name, size)
    except UserError:
        origin = min(chunks, env.pool.available_chunks() * 2 // 3) * env.chunk_size
        await env.create(f"{name}-origin", origin)
        return await env.fork(f"{name}-origin", name)


async def fill(vol: Vol, chunk: int, start: int = 0) -> int:
    """Write whole chunks from `start` until ENOSPC; returns the chunk that failed."""
    lc = start
    while True:
        try:
            await vol.write(lc * chunk, pattern(lc, chunk))
        except NbdError as e:
            assert e.errno == errno.ENOSPC, e
            return lc
        lc += 1
        assert lc * chunk < vol.size, "the volume ended before the pool filled"


@pytest.mark.parametrize("design", design_names())
async def test_thin_volume_fills_the_pool(make_pool: PoolFactory, design: str) -> None:
    env = await make_pool(design, size=6 * MiB, small=False)
    pool = env.pool
    chunk = env.chunk_size
    other = await env.create("other", 16 * chunk)
    await other.write(0, pattern(7, 16 * chunk))
    hog = await thin_hog(env, "hog", 4 * pool.layout.data_chunks)
    failed = await fill(hog, chunk)
    assert failed > 0
    with pytest.raises(NbdError) as e:
        await hog.write(failed * chunk + 100, b"x" * 100)  # a partial write needs a copy too
    assert e.value.errno == errno.ENOSPC
    before = await hog.read(0, failed * chunk)
    # Nothing of the failed writes is visible; everything before is intact.
    assert await hog.read(failed * chunk, chunk) == bytes(chunk)
    for lc in range(failed):
        if before[lc * chunk:(lc + 1) * chunk] != pattern(lc, chunk):
            pytest.fail(f"chunk {lc} of the thin volume changed")
    assert await other.read_all() == pattern(7, 16 * chunk)
    await env.assert_clean()
    # Free some space: writes work again once the free is durable.
    await hog.trim(0, 8 * chunk)
    await hog.flush()
    await hog.write(failed * chunk, pattern(failed, chunk))
    assert await hog.read(failed * chunk, chunk) == pattern(failed, chunk)
    await env.reopen()
    assert await env.vol("other").read_all() == pattern(7, 16 * chunk)
    await env.assert_clean()


@pytest.mark.parametrize("design", design_names())
async def test_guarantee_refused_when_the_pool_cannot_promise(make_pool: PoolFactory,
                                                              design: str) -> None:
    env = await make_pool(design, size=6 * MiB, small=False)
    pool = env.pool
    chunk = env.chunk_size
    avail = pool.available_chunks()
    reserved = pool.state.data_reserved
    with pytest.raises(UserError) as e:
        await env.create("big", (avail + 1) * chunk, guarantee=True)
    assert "big" in str(e.value) and ("guarantee" in str(e.value) or "free" in str(e.value))
    assert "big" not in env.names()
    assert pool.state.data_reserved == reserved and pool.available_chunks() == avail
    g = await env.create("g", (avail // 2) * chunk, guarantee=True)
    assert pool.available_chunks() <= avail - avail // 2
    with pytest.raises(UserError):
        await env.create("g2", (avail // 2 + 2) * chunk, guarantee=True)
    await g.write(0, pattern(1, chunk))
    await env.assert_clean()
    # The same through the CLI: a message for people, no traceback, a failing exit status.
    await env.close()
    proc = subprocess.run([sys.executable, "-m", "nbdserver", "volume", "create", str(env.path),
                           "huge", "--size", str(avail * chunk), "--guarantee"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "huge" in proc.stderr and "Traceback" not in proc.stderr
    await env.open()
    assert "huge" not in env.names()


@pytest.mark.parametrize("design", ["radix", "extent"])
async def test_a_clone_of_a_guaranteed_volume_that_cannot_be_promised_names_both(
        make_pool: PoolFactory, design: str) -> None:
    """Once a guaranteed volume shares its chunks with a fork, each rewrite needs a new
    one: the clone promises them, or is refused. The refusal names the fork being made
    and why the source needs more (it named only the source, as if its own guarantee
    were being asked for)."""
    env = await make_pool(design, size=6 * MiB, small=False)
    chunk = env.chunk_size
    g = await env.create("g", (env.pool.available_chunks() * 6 // 10) * chunk, guarantee=True)
    await g.write(0, pattern(2, g.size))
    with pytest.raises(UserError) as refused:
        await env.fork("g", "vm1")
    message = str(refused.value)
    assert message.startswith("cannot clone 'g' into 'vm1': 'g' is guaranteed, and once it "
                              "shares its chunks each rewrite needs a new one"), message
    assert "cannot guarantee 'g': it needs" in message, message
    assert "vm1" not in env.names()
    await env.assert_clean()


@pytest.mark.parametrize("design", design_names())
async def test_guaranteed_volume_keeps_writing_while_thin_one_fills_pool(
        make_pool: PoolFactory, design: str) -> None:
    env = await make_pool(design, size=6 * MiB, small=False)
    pool = env.pool
    chunk = env.chunk_size
    n = 48
    g = await env.create("g", n * chunk, guarantee=True)
    model = bytearray(n * chunk)
    await g.write(0, pattern(1, (n // 2) * chunk))
    model[:(n // 2) * chunk] = pattern(1, (n // 2) * chunk)
    hog = await thin_hog(env, "hog", 4 * pool.layout.data_chunks)
    await fill(hog, chunk)
    # The rest of the guaranteed volume, and a rewrite of all of it (partial and whole).
    await g.write((n // 2) * chunk, pattern(2, (n // 2) * chunk))
    model[(n // 2) * chunk:] = pattern(2, (n // 2) * chunk)
    for lc in range(0, n, 3):
        await g.write(lc * chunk + 10, b"\x42" * 20)
        model[lc * chunk + 10:lc * chunk + 30] = b"\x42" * 20
    assert await g.read_all() == model
    # Trim part of it, let the thin volume take what it can, and write it again.
    await g.trim(0, 16 * chunk)
    model[:16 * chunk] = bytes(16 * chunk)
    await g.flush()
    await fill(hog, chunk, start=(await _first_hole(hog, chunk)))
    await g.write(0, pattern(3, 16 * chunk))
    model[:16 * chunk] = pattern(3, 16 * chunk)
    await g.write(5 * chunk + 7, b"\x99" * 9)
    model[5 * chunk + 7:5 * chunk + 16] = b"\x99" * 9
    assert await g.read_all() == model
    await env.reopen()
    assert await env.vol("g").read_all() == model
    await env.assert_clean()


async def _first_hole(vol: Vol, chunk: int) -> int:
    data = await vol.read_all()
    for lc in range(vol.size // chunk):
        if not any(data[lc * chunk:(lc + 1) * chunk]):
            return lc
    return vol.size // chunk


async def _guaranteed_in_a_full_pool(make_pool: PoolFactory,
                                     design: str) -> tuple[PoolEnv, Vol, bytearray]:
    """A guaranteed volume "g" of 48 chunks, written in full (its content returned), in a
    pool whose every other chunk a thin volume has taken."""
    env = await make_pool(design, size=6 * MiB, small=False)
    chunk = env.chunk_size
    g = await env.create("g", 48 * chunk, guarantee=True)
    model = bytearray(pattern(1, 48 * chunk))
    await g.write(0, bytes(model))
    hog = await thin_hog(env, "hog", 4 * env.pool.layout.data_chunks)
    await fill(hog, chunk)
    assert env.pool.available_chunks() <= 0
    return env, g, model


@pytest.mark.parametrize("design", design_names())
async def test_rewrite_right_after_a_trim_in_a_full_pool(make_pool: PoolFactory,
                                                        design: str) -> None:
    """The chunks a trim frees are reused only once a commit makes the trim durable. In a
    full pool they are the only free space: a write that needs them waits for that
    commit instead of failing with ENOSPC (a guaranteed volume must never see ENOSPC)."""
    env, g, model = await _guaranteed_in_a_full_pool(make_pool, design)
    chunk = env.chunk_size
    for first in (0, 20):  # no flush between the trim and the rewrite
        await g.trim(first * chunk, 16 * chunk)
        data = pattern(2 + first, 16 * chunk)
        await g.write(first * chunk, data)
        model[first * chunk:(first + 16) * chunk] = data
    assert await g.read_all() == model
    await env.reopen()
    assert await env.vol("g").read_all() == model
    await env.assert_clean()


@pytest.mark.parametrize("design", design_names())
async def test_write_zeroes_right_after_a_trim_in_a_full_pool(make_pool: PoolFactory,
                                                              design: str) -> None:
    """The same for WRITE_ZEROES that must allocate (NO_HOLE: the zeros are written), whole
    chunks or partial ones: it waits for the trim's commit too, instead of ENOSPC."""
    env, g, model = await _guaranteed_in_a_full_pool(make_pool, design)
    chunk = env.chunk_size
    n = g.size // chunk
    for start, length in ((0, 16 * chunk), (20 * chunk + 512, 16 * chunk - 1024)):
        first = start // chunk
        await g.trim(first * chunk, 16 * chunk)  # no flush between the trim and the zeroes
        model[first * chunk:(first + 16) * chunk] = bytes(16 * chunk)
        await g.zero(start, length, may_trim=False)
    assert await g.read_all() == model
    assert not zero_runs(await g.block_status(0, n * chunk), STATE_HOLE), "NO_HOLE left holes"
    await env.reopen()
    assert await env.vol("g").read_all() == model
    await env.assert_clean()


@pytest.mark.parametrize("design", design_names())
async def test_a_guaranteed_volume_never_takes_what_another_is_promised(
        make_pool: PoolFactory, design: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two guaranteed volumes in a full pool. g1 trims and at once rewrites: the chunks
    promised to it again are the ones its trim freed, quarantined until the trim's
    commit. Before, a guaranteed volume could take any free chunk, so g1's rewrite took
    the chunks backing g2's promise; g2's write found none, waited once for the commit,
    and when g1 did the same again meanwhile, failed with ENOSPC. Now a guaranteed
    volume takes from the unpromised chunks and its own promise only: g1 waits for its
    own freed chunks instead."""
    env = await make_pool(design, size=16 * MiB, small=False)
    pool = env.pool
    c = env.chunk_size
    if design == "linear":  # (its guaranteed volumes that take chunks are forks)
        await env.create("o", 64 * c)
        g1 = await env.fork("o", "g1", guarantee=True)
        g2 = await env.fork("o", "g2", guarantee=True)
    else:
        g1 = await env.create("g1", 64 * c, guarantee=True)
        g2 = await env.create("g2", 16 * c, guarantee=True)
    await g1.write(0, pattern(1, 64 * c))
    hog = await thin_hog(env, "hog", 4 * pool.layout.data_chunks)
    await fill(hog, c)
    await pool.commit()

    async def g1_trim_and_rewrite(first: int) -> None:
        await g1.trim(first * c, 16 * c)
        await g1.write(first * c, pattern(first + 100, 16 * c))

    await g1_trim_and_rewrite(0)
    plain = pool.reuse_freed
    again: list[int] = []

    async def reuse_freed() -> None:  # g2 waits for freed space: g1 comes in first
        await plain()
        if not again:
            again.append(1)
            await g1_trim_and_rewrite(16)

    monkeypatch.setattr(pool, "reuse_freed", reuse_freed)
    await g2.write(0, pattern(9, c))  # must never fail
    assert await g2.read(0, c) == pattern(9, c)
    want = bytearray(pattern(1, 64 * c))
    want[:16 * c] = pattern(100, 16 * c)
    if again:  # (g2 waited: now it should not need to)
        want[16 * c:32 * c] = pattern(116, 16 * c)
    assert await g1.read_all() == want
    await env.assert_clean()


async def test_a_guaranteed_volume_rewriting_chunks_no_longer_shared_keeps_others_promises(
        make_pool: PoolFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """radix sends a whole-chunk write to a chunk no longer shared (its snapshot was
    deleted) into a fresh chunk, freeing the old one at the next commit
    (``fresh_for_claims``), but only in a thin volume. A guaranteed volume doing so
    took a chunk from its promise, not charged (the old one was freed), and the pool
    had one usable chunk fewer until the commit: g2, promised one last chunk, found
    none, waited for the commit, and when g1 did it again meanwhile, failed with
    ENOSPC. A guaranteed volume claims such a chunk in place, as before."""
    env = await make_pool("radix", size=16 * MiB, small=False)
    pool = env.pool
    c = env.chunk_size
    g1 = await env.create("g1", 64 * c, guarantee=True)
    await g1.write(0, pattern(1, 32 * c))  # 32 written, 32 holes promised
    await env.snapshot("g1", "s")
    await env.delete("s")  # g1's chunks are its own again
    g2 = await env.create("g2", 16 * c, guarantee=True)
    hog = await thin_hog(env, "hog", 4 * pool.layout.data_chunks)
    await fill(hog, c)
    await pool.commit()
    assert type(pool.map.write_target(pool.volume("g1"), 0)) is Claim
    for lc in range(15):  # g2 uses all of its promise but one chunk
        await g2.write(lc * c, pattern(50 + lc, c))
    await g1.write(0, pattern(200, c))
    rewritten = [1]
    plain = pool.reuse_freed

    async def reuse_freed() -> None:  # g2 waits for freed space; g1 goes on rewriting
        await plain()
        for _ in range(2):  # (the second through the leaf the first walk learned)
            await g1.write(rewritten[0] * c, pattern(200 + rewritten[0], c))
            rewritten[0] += 1

    monkeypatch.setattr(pool, "reuse_freed", reuse_freed)
    await g2.write(15 * c, pattern(99, c))  # promised: must never fail
    assert await g2.read(15 * c, c) == pattern(99, c)
    want = bytearray(pattern(1, 32 * c) + bytes(32 * c))
    for lc in range(rewritten[0]):
        want[lc * c:(lc + 1) * c] = pattern(200 + lc, c)
    assert await g1.read_all() == want
    # The one-chunk short form says so too, from a leaf it knows through g1's own path.
    bmap = pool.map
    v1 = pool.volume("g1")
    left = range(rewritten[0], 32)
    assert [type(bmap.write_target(v1, lc)) for lc in left] == [Claim] * len(left)
    assert any(k % (1 << 23) == v1.id for k in bmap._leaves), "no leaf known: proves nothing"
    assert [bmap.write_chunk(v1, lc) for lc in left] == [ASK] * len(left)
    await env.assert_clean()


async def test_a_linear_origin_trim_over_chunks_a_fork_reads_waits_for_space(
        make_pool: PoolFactory) -> None:
    """A TRIM of a linear origin over chunks a fork still reads is written as zeros (the
    fork gets its copies first). In a full pool whose only free chunks are the fork's
    own, just trimmed and rewritten (quarantined until the commit), that write must
    wait for the commit as any write does; it failed with ENOSPC, where the same bytes
    sent as a WRITE succeeded."""
    env = await make_pool("linear", size=16 * MiB, small=False)
    pool = env.pool
    c = env.chunk_size
    o = await env.create("o", 64 * c, guarantee=True)
    await o.write(0, pattern(1, 64 * c))
    f = await env.fork("o", "f")  # reserves its copies: 64 chunks
    await f.write(0, pattern(2, 32 * c))  # its own chunks for 0-31
    hog = await thin_hog(env, "hog", 4 * pool.layout.data_chunks)
    await fill(hog, c)
    await pool.commit()
    await f.trim(0, 16 * c)  # freed, quarantined until a commit ...
    await f.write(0, pattern(3, 16 * c))  # ... and taken again at once
    await o.trim(32 * c, 32 * c)  # f still reads 32-63 from o: copied out first
    assert await f.read(32 * c, 32 * c) == pattern(1, 64 * c)[32 * c:]
    assert await o.read(32 * c, 32 * c) == bytes(32 * c)
    await env.assert_clean()


async def test_a_linear_snapshot_being_deleted_takes_no_copies(make_pool: PoolFactory) -> None:
    """Deleting a snapshot gives its promise of space back at once (with the delete's
    mark); the origin preserves chunks for it until the mark is durable (a crash would
    bring it back). Its copies needed chunks the promise no longer held: with the
    mark's commit slow and a thin volume taking the space given back, the guaranteed
    origin's write failed with ENOSPC. Now the origin waits for the mark to be durable
    and copies nothing into a snapshot that cannot come back."""
    env = await make_pool("linear", size=16 * MiB, small=False)
    pool = env.pool
    c = env.chunk_size
    o = await env.create("o", 256 * c, guarantee=True)
    await o.write(0, pattern(1, 256 * c))
    await env.snapshot("o", "s")  # promised its copies: 256 chunks
    hog = await thin_hog(env, "hog", 4 * pool.layout.data_chunks)
    lc = await fill(hog, c)
    await pool.commit()
    fast = threading.Event()
    plain = pool.device.flush

    def flush() -> None:  # the data fdatasync of a commit takes a while (until `fast`)
        fast.wait(15)
        plain()

    pool.device.flush = flush  # type: ignore[method-assign]
    await env.release("s")
    delete = asyncio.ensure_future(pool.delete_volume("s"))
    deadline = time.monotonic() + 10
    while pool.state.data_reserved:  # the mark is made; its commit is in its fdatasync
        assert time.monotonic() < deadline, "s's promise was never given back"
        await asyncio.sleep(0.01)
    await fill(hog, c, start=lc)  # the thin volume takes what s no longer holds
    assert not delete.done()  # (still in the window)
    write = asyncio.ensure_future(o.write(0, pattern(9, c)))  # copies chunk 0 for s
    await asyncio.sleep(0.2)  # first? not once s is gone: it waits for the mark
    fast.set()
    await write
    await delete
    assert await o.read(0, 2 * c) == pattern(9, c) + pattern(1, 256 * c)[c:2 * c]
    await env.assert_clean()


@pytest.mark.parametrize("design", [d for d in design_names() if d != "linear"])
async def test_a_guarantee_right_after_a_trim_waits_for_the_freed_chunks(
        make_pool: PoolFactory, design: str) -> None:
    """(Thin designs: linear's thin volumes are forks.) In a full pool, a thin volume
    trims; its chunks are free but reusable only once a commit makes the trim durable.
    A guaranteed create or fork right then was refused ("only 0 bytes are free") while
    `pool info` counted them free; now it waits for that commit, as a write does."""
    env = await make_pool(design, size=6 * MiB, small=False)
    pool = env.pool
    c = env.chunk_size
    hog = await thin_hog(env, "hog", 4 * pool.layout.data_chunks)
    await fill(hog, c)
    await pool.commit()
    await hog.trim(0, 64 * c)
    assert pool.available_chunks() < 32
    g = await env.create("g", 32 * c, guarantee=True)
    await g.write(0, pattern(1, 32 * c))
    await hog.trim(64 * c, 64 * c)
    await env.fork("g", "f", guarantee=True)  # (g's copies too: 64 chunks)
    with pytest.raises(UserError, match=r"cannot guarantee 'h': it needs [0-9.]+ [KMG]iB more "
                       r"but only [0-9.]+ ([KMG]i)?B is free"):  # still refused past the room
        await env.create("h", 256 * c, guarantee=True)
    assert await g.read(0, 32 * c) == pattern(1, 32 * c)
    await env.assert_clean()


# -- a promise shrinks back once the sharing that made it grow ends ------------------------
# (Designs with clones of clones: a linear guaranteed volume that takes chunks is a
# snapshot or fork, which cannot be cloned, so its promise never grows past its need.)

SHARING = [d for d in design_names() if d != "linear"]
N = 48  # the guaranteed volume's chunks, of which WRITTEN are written
WRITTEN = 32


async def _half_written(make_pool: PoolFactory,
                        design: str) -> tuple[PoolEnv, Vol, bytearray]:
    """A guaranteed volume "g" of N chunks, the first WRITTEN written: promised the rest."""
    env = await make_pool(design, size=6 * MiB, small=False)
    c = env.chunk_size
    g = await env.create("g", N * c, guarantee=True)
    model = bytearray(N * c)
    model[:WRITTEN * c] = pattern(1, WRITTEN * c)
    await g.write(0, bytes(model[:WRITTEN * c]))
    assert env.pool.volume("g").reserved == N - WRITTEN
    return env, g, model


async def _promise_still_covers_every_write(env: PoolEnv, g: Vol, model: bytearray) -> None:
    """A thin volume takes every chunk not promised; g then rewrites every chunk, whole
    and partly, and never gets ENOSPC; its content survives a reopen."""
    c = env.chunk_size
    hog = await thin_hog(env, "hog", 4 * env.pool.layout.data_chunks)
    await fill(hog, c)
    for lc in range(N):
        data = pattern(100 + lc, c)
        await g.write(lc * c, data)
        model[lc * c:(lc + 1) * c] = data
    for lc in range(0, N, 5):
        await g.write(lc * c + 100, b"\x77" * 50)
        model[lc * c + 100:lc * c + 150] = b"\x77" * 50
    assert await g.read_all() == model
    await env.reopen()
    assert await env.vol("g").read_all() == model
    await env.assert_clean()


@pytest.mark.parametrize("design", SHARING)
async def test_deleting_the_clones_gives_a_promise_back(make_pool: PoolFactory,
                                                        design: str) -> None:
    """A snapshot of g makes its written chunks shared: g is promised all N again. A fork
    of that snapshot, and the snapshot's deletion (a tombstone: the fork still shares
    g's chunks through it), keep that promise; the fork's deletion ends the sharing,
    and g is promised only its holes again, also after a reopen, and that is enough."""
    env, _g, model = await _half_written(make_pool, design)
    pool = env.pool
    c = env.chunk_size
    await env.snapshot("g", "s")
    assert pool.volume("g").reserved == N
    f = await env.fork("s", "f")
    await f.write((WRITTEN + 4) * c, pattern(5, 4 * c))  # (where g has holes)
    await env.delete("s")
    assert pool.volume("g").reserved == N, "g still shares its chunks with f"
    await env.assert_clean()
    await env.delete("f")
    assert pool.volume("g").reserved == N - WRITTEN
    assert pool.state.data_reserved == N - WRITTEN
    assert pool.info()["reserved_bytes"] == (N - WRITTEN) * c
    await env.reopen()
    assert env.pool.volume("g").reserved == N - WRITTEN
    await env.assert_clean()
    await _promise_still_covers_every_write(env, env.vol("g"), model)


@pytest.mark.parametrize("design", SHARING)
async def test_a_trim_while_the_promise_is_counted_is_promised_again(
        make_pool: PoolFactory, design: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The count of g's exclusive chunks is a walk that I/O interleaves with. A trim of
    every written chunk right after the walk counted them frees them (and promises them
    again): the new promise must not be the stale count's, which would leave WRITTEN
    chunks unpromised."""
    env, g, model = await _half_written(make_pool, design)
    pool = env.pool
    c = env.chunk_size
    await env.snapshot("g", "s")
    await env.delete("s")  # (g's chunks are its own again, but still promised)
    await env.snapshot("g", "s")
    counted = pool.volume_stats

    async def count_then_trim(vol: VolumeRecord) -> MapStats:
        stats = await counted(vol)
        if vol.name == "g":
            assert stats.exclusive_chunks == WRITTEN
            await g.trim(0, WRITTEN * c)
        return stats

    monkeypatch.setattr(pool, "volume_stats", count_then_trim)
    await env.delete("s")
    monkeypatch.undo()
    model[:WRITTEN * c] = bytes(WRITTEN * c)
    assert pool.volume("g").reserved == N
    await env.assert_clean()
    await _promise_still_covers_every_write(env, g, model)


@pytest.mark.parametrize("design", SHARING)
async def test_a_clone_while_the_promise_is_counted_keeps_it(
        make_pool: PoolFactory, design: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A snapshot of g taken while the count walks shares every chunk again: the count
    is void and g keeps its whole promise until that snapshot is deleted too."""
    env, g, model = await _half_written(make_pool, design)
    pool = env.pool
    await env.snapshot("g", "s")
    counted = pool.volume_stats

    async def count_then_snapshot(vol: VolumeRecord) -> MapStats:
        stats = await counted(vol)
        if vol.name == "g":
            await env.snapshot("g", "t")
        return stats

    monkeypatch.setattr(pool, "volume_stats", count_then_snapshot)
    await env.delete("s")
    monkeypatch.undo()
    assert pool.volume("g").reserved == N
    await env.assert_clean()
    await env.delete("t")
    assert pool.volume("g").reserved == N - WRITTEN
    await _promise_still_covers_every_write(env, g, model)


@pytest.mark.parametrize("design", SHARING)
async def test_pool_check_names_a_promise_smaller_than_the_need(make_pool: PoolFactory,
                                                               design: str) -> None:
    env, _g, _model = await _half_written(make_pool, design)
    pool = env.pool
    vol = pool.volume("g")

    def shrink_too_far() -> None:
        pool.update_volume(vol, reserved=N - WRITTEN - 1)
        pool.update_state(data_reserved=pool.state.data_reserved - 1)

    await pool.cache.run(shrink_too_far)
    report = await env.check()
    assert report.problems == [f"volume 'g' is guaranteed but promised {N - WRITTEN - 1} "
                               f"chunks, and its holes and shared chunks need {N - WRITTEN}"]


@pytest.mark.parametrize("design", SHARING)
async def test_copies_in_flight_while_the_promise_shrinks_are_not_charged(
        make_pool: PoolFactory, design: str) -> None:
    """g's writes over chunks it shares with the snapshot s are planned as copies (a fresh
    chunk each), and held at the device while s is deleted: the promise shrinks to g's
    holes, the old chunks being g's alone now. Mapping the copies then frees those old
    chunks, which changes nothing g may need, so they must not consume its promise
    (they did: g was left a chunk short per copy, and its last writes got ENOSPC)."""
    env, g, model = await _half_written(make_pool, design)
    pool = env.pool
    c = env.chunk_size
    await env.snapshot("g", "s")
    await env.release("g")
    holder = HoldingEngine(pool.engine)
    pool.engine = holder  # (before the volume's backend is made again)
    g = env.vol("g")
    holder.hold_writes(pool.layout.data_start, 1 << 62)
    writes = [(lc * c, pattern(200 + lc, c)) for lc in range(8)]  # a chunk each
    writes.append((8 * c, pattern(300, 4 * c)))  # four chunks in one request
    writes.append((12 * c + 100, b"\x55" * 50))  # part of a chunk
    tasks = [asyncio.ensure_future(g.write(offset, data)) for offset, data in writes]
    deadline = time.monotonic() + 30
    while len(holder.held_writes) < len(writes):
        assert time.monotonic() < deadline, f"{len(holder.held_writes)} writes held"
        await asyncio.sleep(0.01)
    await env.delete("s")
    assert pool.volume("g").reserved == N - WRITTEN
    holder.release()
    await asyncio.gather(*tasks)
    for offset, data in writes:
        model[offset:offset + len(data)] = data
    assert pool.volume("g").reserved == N - WRITTEN
    await env.assert_clean()
    await _promise_still_covers_every_write(env, g, model)


@pytest.mark.parametrize("design", design_names())
async def test_pool_check_during_the_deletion_of_a_guaranteed_volume(
        make_pool: PoolFactory, design: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A volume being deleted has given its promise back while its map is still there:
    that is no problem for pool check (a running server answers one between the steps
    of a long deletion)."""
    env = await make_pool(design, size=6 * MiB, small=False)
    pool = env.pool
    c = env.chunk_size
    g = await env.create("g", N * c, guarantee=True)
    await g.write(0, pattern(1, WRITTEN * c))
    victim = "g"
    if design == "linear":  # (an origin needs no promise: a guaranteed fork does)
        f = await env.fork("g", "f", guarantee=True)
        await f.write(0, pattern(2, WRITTEN * c))
        victim = "f"
    release = pool._release
    reports: list[CheckReport] = []

    async def check_first(vol: VolumeRecord, progress: Callable[[int], None] | None = None,
                          tally: list[int] | None = None) -> int:
        reports.append(await pool.check())
        return await release(vol, progress, tally)

    monkeypatch.setattr(pool, "_release", check_first)
    await env.delete(victim)
    assert reports and reports[0].ok, reports[0].problems


@pytest.mark.parametrize("design", SHARING)
async def test_a_failed_count_keeps_the_promise_and_the_deletion(
        make_pool: PoolFactory, design: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A device error while counting g's exclusive chunks fails neither the deletion nor
    anything else: g keeps its larger promise, which is safe."""
    env, _g, _model = await _half_written(make_pool, design)
    pool = env.pool
    await env.snapshot("g", "s")

    async def broken(vol: VolumeRecord) -> MapStats:
        raise OSError(errno.EIO, "read of a map page")

    monkeypatch.setattr(pool, "volume_stats", broken)
    await env.delete("s")
    monkeypatch.undo()
    assert "s" not in env.names()
    assert pool.volume("g").reserved == N
    await env.assert_clean()
