"""Torn metadata: a power cut in the middle of the last journal record or of a superblock.

kill -9 cannot tear a write (the kernel finishes what it was given), and the
moment of a checkpoint is too short to hit at random, so these tests make the
tear by hand on the pool file, where a commit or a checkpoint lands, and
assert that the pool opens by itself at the last consistent state, with
``check`` clean (no problem, no leaked chunk or page, free space as it was).

The pool runs in this process (real O_DIRECT file, real AIO engine). To stand
for "the power went off right after the journal write", page images are never
written home: recovery has only the journal to go by.
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from conftest import pattern

from nbdserver.pool import journal
from nbdserver.pool.format import PAGE_SIZE, SUPERBLOCK_COPIES, FormatError, Superblock
from nbdserver.pool.pool import Pool, read_superblock
from nbdserver.storage.buffers import BufferPool
from nbdserver.storage.engine import make_engine
from nbdserver.volume import VolumeBackend

KiB = 1024
MiB = 1024 * KiB
SECTOR = 512


@asynccontextmanager
async def opened(path: Path) -> AsyncIterator[Pool]:
    """The pool at `path`, open in this process (recovering it if need be)."""
    import asyncio

    engine = make_engine(asyncio.get_running_loop())
    try:
        pool = await Pool.open(path, engine, BufferPool())
        try:
            yield pool
        finally:
            if not pool.closed:
                await pool.close()
    finally:
        engine.close()


async def write(backend: VolumeBackend, offset: int, data: bytes) -> None:
    import asyncio

    fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    backend.write(offset, memoryview(data), False, fut.set_result)
    assert await fut is None


async def trim(backend: VolumeBackend, offset: int, length: int) -> None:
    import asyncio

    fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    backend.trim(offset, length, False, fut.set_result)
    assert await fut is None


async def read(backend: VolumeBackend, offset: int, length: int) -> bytes:
    import asyncio

    fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    backend.read(offset, length, fut.set_result)
    result = await fut
    out = bytearray(length)
    for start, n, data in result.chunks:  # type: ignore[attr-defined]
        if data is not None:
            out[start - offset:start - offset + n] = data
    result.release()  # type: ignore[attr-defined]
    return bytes(out)


async def assert_clean(pool: Pool) -> None:
    report = await pool.check()
    assert report.ok, report.problems
    assert report.leaked_chunks == 0 and report.leaked_pages == 0


def overwrite(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def read_raw(path: Path, offset: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(length)


def journal_records(path: Path) -> list[journal.ReplayedRecord]:
    """The complete records recovery would replay, oldest first."""
    sb = read_superblock(path)
    start = sb.layout.journal_start

    def pages(ring_page: int, count: int) -> bytes:
        return read_raw(path, (start + ring_page) * PAGE_SIZE, count * PAGE_SIZE)

    return [r for r in journal.read_records(pages, sb.layout.journal_pages, sb.journal_tail,
                                            sb.journal_seq)
            if isinstance(r, journal.ReplayedRecord)]


def tear_record(path: Path, record: journal.ReplayedRecord, how: str) -> None:
    """Damage `record` on disk the way an interrupted journal write would."""
    start = read_superblock(path).layout.journal_start + record.position
    rng = random.Random(7)
    if how == "tail pages never written":
        keep = max(1, record.total_pages // 2)
        overwrite(path, (start + keep) * PAGE_SIZE,
                  bytes((record.total_pages - keep) * PAGE_SIZE))
    elif how == "last sector torn":
        at = (start + record.total_pages) * PAGE_SIZE - SECTOR
        overwrite(path, at, rng.randbytes(SECTOR))
    elif how == "header never written":
        overwrite(path, start * PAGE_SIZE, bytes(PAGE_SIZE))
    else:
        assert how == "intact", how


@pytest.mark.parametrize("how", ["intact", "tail pages never written", "last sector torn",
                                 "header never written"])
async def test_a_torn_last_journal_record_is_not_replayed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    path = tmp_path / "pool.img"
    Pool.create(path, 64 * MiB)
    a, b, c = pattern(64 * KiB, 1), pattern(64 * KiB, 2), pattern(64 * KiB, 3)
    async with opened(path) as pool:
        monkeypatch.setattr(pool, "_write_home", lambda images: None)  # power cut: see above
        vol = await pool.create_volume("a", 1 * MiB)
        backend = VolumeBackend(pool, vol)
        await write(backend, 0, a)
        await pool.commit()  # state A: the last commit the torn one must fall back to
        free_a = pool.data.free
        # The last commit: new chunks, chunks freed, a catalog change, all in one record.
        await write(backend, 64 * KiB, b)
        await trim(backend, 0, 16 * KiB)
        await pool.create_volume("b", 1 * MiB)  # commits everything above
        free_b = pool.data.free
        await backend.close()
        pool.abandon()  # the crash
    records = journal_records(path)
    assert len(records) >= 2
    tear_record(path, records[-1], how)

    async with opened(path) as pool:
        names = {v.name for v in pool.live_volumes()}
        backend = VolumeBackend(pool, pool.volume("a"))
        got = await read(backend, 0, 128 * KiB)
        if how == "intact":  # the complete record is replayed: the newer state
            assert names == {"a", "b"}
            assert got == bytes(16 * KiB) + a[16 * KiB:] + b
            assert pool.data.free == free_b
        else:  # the torn one is not: exactly the previous state
            assert names == {"a"}
            assert got == a + bytes(64 * KiB)
            assert pool.data.free == free_a
        await assert_clean(pool)
        await write(backend, 128 * KiB, c)  # and the pool goes on from there
        await backend.close()
    async with opened(path) as pool:
        backend = VolumeBackend(pool, pool.volume("a"))
        assert await read(backend, 128 * KiB, 64 * KiB) == c
        await backend.close()
        await assert_clean(pool)


def superblock_copies(path: Path) -> list[bytes]:
    return [read_raw(path, i * PAGE_SIZE, PAGE_SIZE) for i in range(SUPERBLOCK_COPIES)]


def newest_copy(copies: list[bytes]) -> int:
    seqs = []
    for raw in copies:
        try:
            seqs.append(Superblock.unpack(raw).seq)
        except FormatError:
            seqs.append(-1)
    return seqs.index(max(seqs))


@pytest.mark.parametrize("how", ["garbled", "torn at a sector"])
@pytest.mark.parametrize("when", ["first checkpoint", "later checkpoint"])
async def test_a_torn_superblock_write_falls_back_to_the_older_copy(
        tmp_path: Path, when: str, how: str) -> None:
    """A checkpoint writes the superblock over its older copy. Torn, the other copy (with an
    older journal tail) is used, and the journal still holds every commit after that tail:
    the pool opens at its last state."""
    path = tmp_path / "pool.img"
    Pool.create(path, 64 * MiB)
    a, b = pattern(64 * KiB, 1), pattern(64 * KiB, 2)
    before = superblock_copies(path)
    async with opened(path) as pool:  # its close commits and checkpoints
        backend = VolumeBackend(pool, await pool.create_volume("a", 1 * MiB))
        await write(backend, 0, a)
        await backend.close()
    if when == "later checkpoint":
        before = superblock_copies(path)
        async with opened(path) as pool:
            backend = VolumeBackend(pool, pool.volume("a"))
            await write(backend, 64 * KiB, b)
            await backend.close()
            await pool.create_volume("b", 1 * MiB)
    copies = superblock_copies(path)
    newest = newest_copy(copies)
    new, old = copies[newest], before[newest]  # the last checkpoint wrote `new` over `old`
    assert new != old
    if how == "garbled":
        damaged = random.Random(3).randbytes(PAGE_SIZE)
    else:
        k = 3  # sectors of the new copy that reached the disk; the rest is still the old one
        damaged = new[:k * SECTOR] + old[k * SECTOR:]
    overwrite(path, newest * PAGE_SIZE, damaged)
    with pytest.raises(FormatError):
        Superblock.unpack(damaged)

    async with opened(path) as pool:
        backend = VolumeBackend(pool, pool.volume("a"))
        assert await read(backend, 0, 64 * KiB) == a
        if when == "later checkpoint":
            assert {v.name for v in pool.live_volumes()} == {"a", "b"}
            assert await read(backend, 64 * KiB, 64 * KiB) == b
        else:
            assert {v.name for v in pool.live_volumes()} == {"a"}
        await backend.close()
        await assert_clean(pool)
    for raw in superblock_copies(path):  # recovery and the next checkpoint rewrote both
        Superblock.unpack(raw)
